// argmax.cu: greedy decoding's choice, made where the logits are, so that a greedy decode step
// copies one id per sequence back to the host instead of the vocabulary's logits (issue 7: "only
// the chosen token copied back").
//
// phi3_argmax_rows: logits [rows, cols] f32, limits [rows] int or NULL (then every row's limit is
// uniform_limit: no copy of the limits for a pass whose rows all ask the same), out [rows] int.
// out[r] is the lowest id below min(limit of r, cols) whose logit is the largest number among
// those ids, or -1 when none of them is above -inf (all NaN or -inf, or a limit <= 0). The rule of
// the host's sampler::greedy_choice: ties go to the lowest id (torch.argmax), NaN is never
// chosen, -0.0 and 0.0 tie.
// Two passes over the row (the second mostly from L2): the block's largest number (fmaxf passes
// over NaN), then the block's lowest id holding it, both through block_max (ids negated, as
// floats: exact below 2^24, and a vocabulary is far smaller).
// Launch: grid (rows), block ARGMAX_THREADS. Rust launcher: ops.rs (argmax_rows).
#include "common.cuh"

#define ARGMAX_THREADS 1024

extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
    phi3_argmax_rows(const float* logits, const int* limits, int uniform_limit, int cols,
                     int* out) {
    __shared__ float scratch[32];
    const float* x = logits + (size_t)blockIdx.x * cols;
    const int limit = min(limits ? limits[blockIdx.x] : uniform_limit, cols);
    float best = PHI3_NEG_INF;
    for (int c = threadIdx.x; c < limit; c += blockDim.x) best = fmaxf(best, x[c]);
    best = block_max(best, scratch);
    // Each thread's first id holding the maximum (its ids ascend), as -id; -cols when it has
    // none, below every -id.
    float first = -(float)cols;
    if (best > PHI3_NEG_INF) {
        for (int c = threadIdx.x; c < limit; c += blockDim.x) {
            if (x[c] == best) {
                first = -(float)c;
                break;
            }
        }
    }
    first = block_max(first, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = best > PHI3_NEG_INF ? (int)(-first) : -1;
}
