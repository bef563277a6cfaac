// top_candidates.cu: a top-k sampling step's candidates, selected where the logits are, so that
// the step copies back about k (id, logit) pairs per sequence instead of the vocabulary's logits
// and the host's sampler works on those alone (issue 7: "sampling on the device, only the chosen
// token copied back"; the draw itself stays on the host: sampler::sample_candidates).
//
// phi3_top_candidates: logits [rows, cols] f32; wanted [rows, 2] int (limit, count), or NULL when
// every row wants (uniform_limit, uniform_count) (no copy of the requests for a pass whose rows
// all ask the same); out [rows, 1 + 2 * stride] int. Row r takes the min(count, stride) largest
// logits among its ids below min(limit, cols) that are above -inf (NaN never taken), ranked as
// the host's sampler::top_candidates ranks them: f32 total order (0.0 above -0.0), ties to the
// lower id.
// out row: [n, ids[stride], logit bits[stride]], the n taken in no particular order (the host
// sorts them by id); n = 0 for count <= 0 or limit <= 0 (a row that wants something else).
//
// How: each id's sort key is (the logit's bits mapped to unsigned total order, 0 for NaN/-inf;
// then the id complemented, so a lower id ranks higher). A radix select over the key's bytes,
// most significant first, finds the count-th largest key: per pass a histogram of the next byte
// among the ids that match the prefix found so far (one histogram per warp, to spread the shared
// atomics, then summed), and thread 0 walks it from the top. It stops as soon as the ids
// matching the prefix are exactly the ones still needed (usually within the logit's bytes; the
// id bytes only break ties across the count-th). Then every id at or above the prefix is written
// out through an atomic slot counter. One pass reads the row (128 KiB for Phi-3) 1 + up to 6
// times, from L2 after the first.
// Launch: grid (rows), block TOPC_THREADS. Rust launcher: ops.rs (launch_top_candidates).
#include "common.cuh"

#define TOPC_THREADS 1024
#define TOPC_WARPS (TOPC_THREADS / 32)

// The logit's place in f32 total order as an unsigned number; 0 for NaN and -inf (never taken:
// every other value maps above 0x007fffff).
__device__ __forceinline__ unsigned int candidate_key(float v) {
    if (!(v > PHI3_NEG_INF)) return 0u;
    const unsigned int b = __float_as_uint(v);
    return (b >> 31) ? ~b : (b | 0x80000000u);
}

extern "C" __global__ void __launch_bounds__(TOPC_THREADS)
    phi3_top_candidates(const float* logits, const int* wanted, int uniform_limit,
                        int uniform_count, int cols, int stride, int* out) {
    __shared__ unsigned int hist[TOPC_WARPS][256];
    __shared__ unsigned int part[32];
    // The prefix found so far: key bits under key_mask equal key_prefix, complemented-id bits
    // under id_mask equal id_prefix; `need` of the ids matching it are still to be taken.
    __shared__ unsigned int key_prefix, key_mask, id_prefix, id_mask, need, done, taken;
    const int row = blockIdx.x;
    const float* x = logits + (size_t)row * cols;
    const int limit = min(wanted ? wanted[2 * row] : uniform_limit, cols);
    const int count = min(wanted ? wanted[2 * row + 1] : uniform_count, stride);
    int* o = out + (size_t)row * (1 + 2 * stride);
    if (limit <= 0 || count <= 0) {
        if (threadIdx.x == 0) o[0] = 0;
        return;
    }
    // Bytes of the complemented id that can differ (ids below limit).
    int id_bytes = 1;
    while (id_bytes < 4 && (((unsigned int)(limit - 1)) >> (8 * id_bytes)) != 0u) ++id_bytes;
    const int warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) {
        key_prefix = key_mask = id_prefix = id_mask = 0u;
        need = (unsigned int)count;
        done = 0u;
        taken = 0u;
    }
    __syncthreads();
    for (int pass = 0; pass < 4 + id_bytes; ++pass) {
        if (done) break;  // read after a barrier: the same for every thread
        for (int i = threadIdx.x; i < TOPC_WARPS * 256; i += blockDim.x) hist[i >> 8][i & 255] = 0u;
        __syncthreads();
        const unsigned int kp = key_prefix, km = key_mask, ip = id_prefix, im = id_mask;
        const bool on_key = pass < 4;
        const int shift = on_key ? 24 - 8 * pass : 8 * (id_bytes - 1 - (pass - 4));
        for (int c = threadIdx.x; c < limit; c += blockDim.x) {
            const unsigned int k = candidate_key(x[c]), nid = ~(unsigned int)c;
            if (k != 0u && (k & km) == kp && (nid & im) == ip) {
                atomicAdd(&hist[warp][((on_key ? k : nid) >> shift) & 255u], 1u);
            }
        }
        __syncthreads();
        if (threadIdx.x < 256) {
            unsigned int s = 0u;
            for (int w = 0; w < TOPC_WARPS; ++w) s += hist[w][threadIdx.x];
            hist[0][threadIdx.x] = s;
        }
        __syncthreads();
        // part[t]: the ids under the 8 digits 255 - 8t down to 248 - 8t.
        if (threadIdx.x < 32) {
            unsigned int s = 0u;
            for (int j = 0; j < 8; ++j) s += hist[0][255 - 8 * threadIdx.x - j];
            part[threadIdx.x] = s;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned int total = 0u;
            for (int t = 0; t < 32; ++t) total += part[t];
            if (total <= need) {
                // Only on the first pass (later ones match at least `need` + 1 ids): every id
                // above -inf is taken, which the empty prefix says.
                done = 1u;
            } else {
                // The digit d where the ids above it fall short of `need` and those at or above
                // it do not.
                unsigned int above = 0u;
                int t = 0;
                while (t < 31 && above + part[t] < need) above += part[t++];
                int d = 255 - 8 * t;
                for (int j = 0; j < 7 && above + hist[0][d] < need; ++j) above += hist[0][d--];
                need -= above;
                if (on_key) {
                    key_prefix |= (unsigned int)d << shift;
                    key_mask |= 255u << shift;
                } else {
                    id_prefix |= (unsigned int)d << shift;
                    id_mask |= 255u << shift;
                }
                if (hist[0][d] == need) done = 1u;  // all ids matching the prefix are taken
            }
        }
        __syncthreads();
    }
    // Every id at or above the prefix: key bits above it, or equal and complemented-id bits at
    // or above it.
    const unsigned int kp = key_prefix, km = key_mask, ip = id_prefix, im = id_mask;
    for (int c = threadIdx.x; c < limit; c += blockDim.x) {
        const float v = x[c];
        const unsigned int k = candidate_key(v), nid = ~(unsigned int)c;
        if (k != 0u && ((k & km) > kp || ((k & km) == kp && (nid & im) >= ip))) {
            const unsigned int slot = atomicAdd(&taken, 1u);
            if (slot < (unsigned int)count) {
                o[1 + slot] = c;
                o[1 + stride + slot] = (int)__float_as_uint(v);
            }
        }
    }
    __syncthreads();
    // More than count would be a bug in the select; the host reports it rather than guess.
    if (threadIdx.x == 0) o[0] = (int)taken;
}
