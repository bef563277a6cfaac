// rope_kv.cu: LongRoPE on q and k of fused qkv rows, and the KV-cache write (HF
// apply_rotary_pos_emb with rotate_half, GPT-NeoX layout).
//
// phi3_rope_store_kv: for rows row0 .. row0 + n_rows of one sequence (cache positions
//   pos0 .. pos0 + n_rows):
//   qkv [rows, (n_heads + 2 n_kv_heads) * head_dim] f32: q heads, then k heads, then v heads;
//   cos, sin [rows, half] f32 (attention factor included; half = rotary_dim / 2);
//   q_out [rows, n_heads * head_dim] f32: rotated q;
//   k_cache, v_cache [capacity, n_kv_heads * head_dim] bf16 (this layer): rotated k and plain v
//   are written at the row's position.
// Rotation of dims d < 2 * half of each head, with j = d mod half:
//   d <  half: out[d] = x[d] * cos[j] - x[d + half] * sin[j]
//   d >= half: out[d] = x[d] * cos[j] + x[d - half] * sin[j]
// Dims >= 2 * half (partial rotary) pass through. Each thread writes elements it alone reads
// into, from the unmodified input, so there are no hazards.
// Launch: grid (n_rows), block 256 with a stride loop over the row's elements.
// Rust launcher: ops.rs (rope_store_kv).
#include "common.cuh"

extern "C" __global__ void phi3_rope_store_kv(const float* qkv, const float* cos, const float* sin,
                                              float* q_out, bf16* k_cache, bf16* v_cache,
                                              int row0, int pos0, int n_heads, int n_kv_heads,
                                              int head_dim, int half) {
    int row = row0 + blockIdx.x;
    int pos = pos0 + blockIdx.x;
    int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    const float* x = qkv + (size_t)row * (q_dim + 2 * kv_dim);
    const float* c = cos + (size_t)row * half;
    const float* s = sin + (size_t)row * half;
    for (int e = threadIdx.x; e < q_dim + 2 * kv_dim; e += blockDim.x) {
        float v = x[e];
        if (e < q_dim + kv_dim) {
            int d = e % head_dim;
            if (d < half) {
                v = x[e] * c[d] + (-x[e + half]) * s[d];
            } else if (d < 2 * half) {
                v = x[e] * c[d - half] + x[e - half] * s[d - half];
            }
        }
        if (e < q_dim) {
            q_out[(size_t)row * q_dim + e] = v;
        } else if (e < q_dim + kv_dim) {
            k_cache[(size_t)pos * kv_dim + (e - q_dim)] = f32_to_bf16(v);
        } else {
            v_cache[(size_t)pos * kv_dim + (e - q_dim - kv_dim)] = f32_to_bf16(v);
        }
    }
}
