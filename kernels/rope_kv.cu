// rope_kv.cu: LongRoPE on q and k of fused qkv rows, and the write of k and v into the paged KV
// cache (HF apply_rotary_pos_emb with rotate_half, GPT-NeoX layout).
//
// phi3_rope_store_kv: for every row of a batch of sequences (rows of all sequences concatenated):
//   qkv [rows, (n_heads + 2 n_kv_heads) * head_dim] f32: q heads, then k heads, then v heads;
//   cos, sin [rows, half] f32 (attention factor included; half = rotary_dim / 2);
//   q_out [rows, n_heads * head_dim] f32: rotated q;
//   slabs [n_slabs] u64, blocks_per_slab, block_len: the KV pool (layout in common.cuh);
//   row_pos [rows] u32: the row's position in its sequence;
//   row_table [rows] u32: where the row's sequence's block table starts in `tables`;
//   tables [...] u32: block ids, each sequence's in position order.
//   Rotated k and plain v go to token pos % 16 of block table[pos / 16], layer `layer`, as bf16
//   (round to nearest even). Nothing else of the pool is written.
// Rotation of dims d < 2 * half of each head, with j = d mod half:
//   d <  half: out[d] = x[d] * cos[j] - x[d + half] * sin[j]
//   d >= half: out[d] = x[d] * cos[j] + x[d - half] * sin[j]
// Dims >= 2 * half (partial rotary) pass through. Each thread writes elements it alone reads
// into, from the unmodified input, so there are no hazards.
// Launch: grid (rows), block 256 with a stride loop over the row's elements; one launch for the
// whole batch. Rust launcher: ops.rs (rope_store_kv).
#include "common.cuh"

extern "C" __global__ void phi3_rope_store_kv(const float* qkv, const float* cos, const float* sin,
                                              float* q_out, const unsigned long long* slabs,
                                              const unsigned int* row_pos,
                                              const unsigned int* row_table,
                                              const unsigned int* tables, int blocks_per_slab,
                                              int block_len, int layer, int n_heads,
                                              int n_kv_heads, int head_dim, int half) {
    const int row = blockIdx.x;
    const int pos = (int)row_pos[row];
    int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    const unsigned int block = tables[row_table[row] + pos / PHI3_KV_BLOCK_TOKENS];
    bf16* blk = kv_block(slabs, blocks_per_slab, block_len, block);
    bf16* k_row = kv_row(blk, layer, 0, pos % PHI3_KV_BLOCK_TOKENS, kv_dim);
    bf16* v_row = kv_row(blk, layer, 1, pos % PHI3_KV_BLOCK_TOKENS, kv_dim);
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
            k_row[e - q_dim] = f32_to_bf16(v);
        } else {
            v_row[e - q_dim - kv_dim] = f32_to_bf16(v);
        }
    }
}
