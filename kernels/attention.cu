// attention.cu: causal (optionally windowed) GQA attention over the paged bf16 KV cache, for
// prefill and for decode, every sequence of a batch in one launch (HF eager_attention_forward:
// softmax(q k^T * scale) v).
//
// phi3_attention: one block per (query row, KV head, chunk of up to ATT_MAX_GROUP of the query
//   heads that read that KV head) of the batch (rows of all sequences concatenated). Each key and
//   value row is read once for all the block's query heads, not once per query head (4x less KV
//   traffic for Phi-3-medium's 40 query over 10 KV heads, whose groups of 4 fit one chunk).
//   q [rows, n_heads * head_dim] f32 (rotated); out [rows, n_heads * head_dim] f32;
//   slabs [n_slabs] u64, blocks_per_slab, block_len: the KV pool (layout in common.cuh), read at
//   layer `layer`;
//   row_pos [rows] u32: the row's position in its sequence;
//   row_table [rows] u32: where the row's sequence's block table starts in `tables`;
//   row_split [rows] u32, part, tickets, split_keys, split_slots: split keys (below);
//   tables [...] u32: block ids, each sequence's in position order (key j of a sequence is token
//   j % 16 of block table[j / 16]).
//   A row at position pos sees its own sequence's keys first..pos, first = max(0, pos + 1 - window)
//   when window > 0, else 0. Query head h reads KV head h / (n_heads / n_kv_heads).
// Online softmax over tiles of 128 keys, per query head: each thread scores one key of the tile
// for every head of the block (q is in shared memory; the key row read with 16-byte loads when
// head_dim is a multiple of 8, which keeps each row 16-byte aligned in the pool) and looks up that key's value row (in
// shared memory), the block finds each head's tile max and sum, rescales its running sum and
// accumulator, and each thread accumulates the weighted values of the tile for its output dims
// (tid and tid + 128, so head_dim <= 256). Per head, scores sum q[d] * k[d] over d in order and
// values are added in key order, so a head's result does not depend on which heads share its
// block. All arithmetic is f32; exp is the accurate expf.
// Barriers: ps[g] and vs of a tile are written only after the tile's first block reduction, whose
// __syncthreads follows every thread's reads of the previous tile; the last reduction of the tile
// makes them visible before the value loop.
// Split keys (flash-decoding): a decode row at position pos >= split_keys has its positions
// 0..pos cut into slices of split_keys (row_split[row]: its first slot in `part`; ATT_NO_SPLIT
// or ATT_PREFILL for other rows, whose block covers all their keys). Block z computes slice z
// alone and writes its unnormalised accumulator, max and sum to `part`
// ([split_slots][n_heads][head_dim] floats, then [split_slots][n_heads][2]), and the last of a
// (row, blockIdx.y)'s slices to finish merges them into `out` (att_merge_slices in common.cuh,
// counting arrivals in tickets[row * gridDim.y + blockIdx.y], zero before and after). A long
// context is then spread over pos / split_keys + 1 blocks per KV head instead of one. Which rows
// split, and where, depends on each row's own position only (the host's batch descriptor,
// kv.rs), so a row's result does not depend on its batch.
// Tensor cores (attention_tc.cu) take the rows their kernels handle: with bit 0 of `skip` set the
// blocks of rows marked ATT_PREFILL return at once (phi3_attention_prefill computes them), with
// bit 1 those of the other rows (phi3_attention_decode); with 0 this kernel computes every row.
// Launch: grid (rows, n_kv_heads * ceil(group / ATT_MAX_GROUP), most slices of a row), block 128
// (ATT_THREADS), where group = n_heads / n_kv_heads. Rust launcher: ops.rs (attention).
#include "common.cuh"

#define ATT_THREADS 128
#define ATT_MAX_HEAD_DIM 256
#define ATT_MAX_GROUP 8

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
phi3_attention(const float* q, const unsigned long long* slabs, const unsigned int* row_pos,
                   const unsigned int* row_table, const unsigned int* row_split,
                   const unsigned int* tables, float* out, float* part, unsigned int* tickets,
                   int blocks_per_slab,
                   int block_len, int layer, int n_heads, int n_kv_heads, int head_dim,
                   float scale, int window, int split_keys, int split_slots,
                   int skip) {
    __shared__ float qs[ATT_MAX_GROUP][ATT_MAX_HEAD_DIM];
    __shared__ float ps[ATT_MAX_GROUP][ATT_THREADS];
    __shared__ const bf16* vs[ATT_THREADS];
    __shared__ float scratch[32];
    const int tid = threadIdx.x;
    const int group = n_heads / n_kv_heads;
    const int chunks = (group + ATT_MAX_GROUP - 1) / ATT_MAX_GROUP;
    const int row = blockIdx.x, kvh = blockIdx.y / chunks, chunk = blockIdx.y % chunks;
    const int h0 = kvh * group + chunk * ATT_MAX_GROUP;          // the block's first query head
    const int n_g = min(ATT_MAX_GROUP, group - chunk * ATT_MAX_GROUP);  // and how many
    const int pos = (int)row_pos[row];
    const unsigned int* table = tables + row_table[row];
    const unsigned int slot0 = row_split[row];
    const int split = blockIdx.z;
    const bool whole = slot0 >= ATT_PREFILL;  // ATT_NO_SPLIT or ATT_PREFILL
    if (skip & (slot0 == ATT_PREFILL ? 1 : 2)) return;  // a tensor-core kernel's row
    int lo, hi;  // this block's keys
    if (!att_block_keys(slot0, split, pos, window, split_keys, &lo, &hi)) return;
    const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    for (int g = 0; g < n_g; ++g) {
        const float* qr = q + (size_t)row * q_dim + (size_t)(h0 + g) * head_dim;
        for (int d = tid; d < head_dim; d += ATT_THREADS) qs[g][d] = qr[d];
    }
    __syncthreads();

    const int d0 = tid, d1 = tid + ATT_THREADS;
    // Indexed only by unrolled loops, so they stay in registers.
    float m[ATT_MAX_GROUP], l[ATT_MAX_GROUP], acc0[ATT_MAX_GROUP], acc1[ATT_MAX_GROUP];
#pragma unroll
    for (int g = 0; g < ATT_MAX_GROUP; ++g) {
        m[g] = PHI3_NEG_INF;
        l[g] = acc0[g] = acc1[g] = 0.0f;
    }
    for (int t0 = lo; t0 <= hi; t0 += ATT_THREADS) {
        const int j = t0 + tid;
        float s[ATT_MAX_GROUP];
#pragma unroll
        for (int g = 0; g < ATT_MAX_GROUP; ++g) s[g] = PHI3_NEG_INF;
        const bf16* vr = nullptr;
        if (j <= hi) {
            bf16* blk = kv_block(slabs, blocks_per_slab, block_len,
                                 table[j / PHI3_KV_BLOCK_TOKENS]);
            const int t = j % PHI3_KV_BLOCK_TOKENS;
            const bf16* kr = kv_row(blk, layer, 0, t, kv_dim) + (size_t)kvh * head_dim;
            vr = kv_row(blk, layer, 1, t, kv_dim) + (size_t)kvh * head_dim;
            float dot[ATT_MAX_GROUP];
#pragma unroll
            for (int g = 0; g < ATT_MAX_GROUP; ++g) dot[g] = 0.0f;
            if ((head_dim & 7) == 0 && aligned16(kr, kr)) {
                // The key row in 16-byte loads (8 per row of 128), summed in the same d order.
                for (int d = 0; d < head_dim; d += 8) {
                    float k8[8];
                    bf16x8_to_f32(vec_load<uint4>(kr + d), k8);
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
#pragma unroll
                        for (int g = 0; g < ATT_MAX_GROUP; ++g) {
                            if (g < n_g) dot[g] += qs[g][d + e] * k8[e];
                        }
                    }
                }
            } else {
                for (int d = 0; d < head_dim; ++d) {
                    const float k = to_f32(kr[d]);
#pragma unroll
                    for (int g = 0; g < ATT_MAX_GROUP; ++g) {
                        if (g < n_g) dot[g] += qs[g][d] * k;
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < ATT_MAX_GROUP; ++g) s[g] = dot[g] * scale;
        }
#pragma unroll
        for (int g = 0; g < ATT_MAX_GROUP; ++g) {
            if (g >= n_g) break;  // uniform across the block: every thread leaves together
            // Key t0 is always visible, so m_new is finite.
            const float m_new = fmaxf(m[g], block_max(s[g], scratch));
            if (g == 0) vs[tid] = vr;  // after the tile's first barrier (see the header)
            const float corr = expf(m[g] - m_new);  // 0 on the first tile (m = -inf)
            const float p = j <= hi ? expf(s[g] - m_new) : 0.0f;
            ps[g][tid] = p;
            l[g] = l[g] * corr + block_sum(p, scratch);
            acc0[g] *= corr;
            acc1[g] *= corr;
            m[g] = m_new;
        }
        const int n_t = min(ATT_THREADS, hi + 1 - t0);
        for (int t = 0; t < n_t; ++t) {
            const bf16* vt = vs[t];
            const float v0 = d0 < head_dim ? to_f32(vt[d0]) : 0.0f;
            const float v1 = d1 < head_dim ? to_f32(vt[d1]) : 0.0f;
#pragma unroll
            for (int g = 0; g < ATT_MAX_GROUP; ++g) {
                if (g < n_g) {
                    acc0[g] += ps[g][t] * v0;
                    acc1[g] += ps[g][t] * v1;
                }
            }
        }
    }
#pragma unroll
    for (int g = 0; g < ATT_MAX_GROUP; ++g) {
        if (g >= n_g) break;
        if (whole) {
            float* o = out + (size_t)row * q_dim + (size_t)(h0 + g) * head_dim;
            if (d0 < head_dim) o[d0] = acc0[g] / l[g];
            if (d1 < head_dim) o[d1] = acc1[g] / l[g];
        } else {
            // Unnormalised accumulator, running max and sum (-inf, 0, 0 for an empty slice).
            const size_t at = (size_t)(slot0 + split) * n_heads + h0 + g;
            float* a = part + at * head_dim;
            if (d0 < head_dim) a[d0] = acc0[g];
            if (d1 < head_dim) a[d1] = acc1[g];
            if (tid == 0) {
                float* ml = part + (size_t)split_slots * n_heads * head_dim + 2 * at;
                ml[0] = m[g];
                ml[1] = l[g];
            }
        }
    }
    if (whole) return;
    const int n_s = pos / split_keys + 1;
    if (last_arrival(tickets + (size_t)row * gridDim.y + blockIdx.y, (unsigned int)n_s)) {
        att_merge_slices(part, out, slot0, n_s, row, h0, n_g, n_heads, head_dim, split_slots);
    }
}
