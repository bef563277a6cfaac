// attention.cu: causal (optionally windowed) GQA attention over the bf16 KV cache, for prefill and
// for single-token decode (HF eager_attention_forward: softmax(q k^T * scale) v).
//
// phi3_attention: one block per (query row, query head) of one sequence.
//   q [rows, n_heads * head_dim] f32 (rotated); k_cache, v_cache [capacity, n_kv_heads * head_dim]
//   bf16 (this layer); out [rows, n_heads * head_dim] f32. Row row0 + r is at position pos0 + r and
//   sees keys first..pos, first = max(0, pos + 1 - window) when window > 0, else 0. Query head h
//   reads KV head h / (n_heads / n_kv_heads).
// Online softmax over tiles of 128 keys: each thread scores one key of the tile (q is in shared
// memory), the block finds the tile's max and sum, rescales its running sum and accumulator, and
// each thread accumulates the weighted values of the tile for its output dims (tid and tid + 128,
// so head_dim <= 256). All arithmetic is f32; exp is the accurate expf.
// Correctness first: decode uses the same kernel (grid (1, n_heads)); reading each KV head once for
// all its query heads and splitting long contexts across blocks are later optimisations.
// Launch: grid (n_rows, n_heads), block 128 (ATT_THREADS). Rust launcher: ops.rs (attention).
#include "common.cuh"

#define ATT_THREADS 128
#define ATT_MAX_HEAD_DIM 256

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
phi3_attention(const float* q, const bf16* k_cache, const bf16* v_cache, float* out, int row0,
               int pos0, int n_heads, int n_kv_heads, int head_dim, float scale, int window) {
    __shared__ float qs[ATT_MAX_HEAD_DIM];
    __shared__ float ps[ATT_THREADS];
    __shared__ float scratch[32];
    const int tid = threadIdx.x;
    const int row = row0 + blockIdx.x, pos = pos0 + blockIdx.x, h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    const float* qr = q + (size_t)row * q_dim + (size_t)h * head_dim;
    for (int d = tid; d < head_dim; d += ATT_THREADS) qs[d] = qr[d];
    __syncthreads();

    const int first = window > 0 ? max(0, pos + 1 - window) : 0;
    const int d0 = tid, d1 = tid + ATT_THREADS;
    float m = PHI3_NEG_INF, l = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
    for (int t0 = first; t0 <= pos; t0 += ATT_THREADS) {
        const int j = t0 + tid;
        float s = PHI3_NEG_INF;
        if (j <= pos) {
            const bf16* kr = k_cache + (size_t)j * kv_dim + (size_t)kvh * head_dim;
            float dot = 0.0f;
            for (int d = 0; d < head_dim; ++d) dot += qs[d] * to_f32(kr[d]);
            s = dot * scale;
        }
        // block_max synchronises, so every thread has finished reading ps of the previous tile
        // before it is overwritten below. Key t0 is always visible, so m_new is finite.
        const float m_new = fmaxf(m, block_max(s, scratch));
        const float corr = expf(m - m_new);  // 0 on the first tile (m = -inf)
        const float p = j <= pos ? expf(s - m_new) : 0.0f;
        ps[tid] = p;
        l = l * corr + block_sum(p, scratch);  // also makes ps visible to the whole block
        acc0 *= corr;
        acc1 *= corr;
        const int n_t = min(ATT_THREADS, pos + 1 - t0);
        const bf16* vt = v_cache + (size_t)t0 * kv_dim + (size_t)kvh * head_dim;
        for (int t = 0; t < n_t; ++t) {
            const float pt = ps[t];
            if (d0 < head_dim) acc0 += pt * to_f32(vt[(size_t)t * kv_dim + d0]);
            if (d1 < head_dim) acc1 += pt * to_f32(vt[(size_t)t * kv_dim + d1]);
        }
        m = m_new;
    }
    float* o = out + (size_t)row * q_dim + (size_t)h * head_dim;
    if (d0 < head_dim) o[d0] = acc0 / l;
    if (d1 < head_dim) o[d1] = acc1 / l;
}
