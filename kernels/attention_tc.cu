// attention_tc.cu: causal (optionally windowed) GQA attention on tensor cores over the paged bf16
// KV cache, for the prefill rows of a pass (phi3_attention_prefill) and for its decode rows
// (phi3_attention_decode, described at attention_decode_impl below). Flash attention: an online
// softmax over tiles of keys, so the score matrix never leaves registers and memory stays linear
// in the context. Both kernels share the q fragments (ap_q_fragments), the key tile loads
// (ap_load_tile) and each warp's step over the keys of a tile (ap_warp_keys).
//
// phi3_attention_prefill / phi3_attention_prefill_fast: q [rows, n_heads * head_dim] f32 (rotated),
// out [rows, n_heads * head_dim] f32; slabs, blocks_per_slab, block_len, layer, row_pos,
// row_table and tables as phi3_attention (attention.cu) reads them; tiles [n_tiles][2] u32:
// (first row, rows <= AP_ROWS) of each tile of query rows, consecutive rows of one sequence at
// consecutive positions (kv.rs, pack_batch). Needs head_dim % 16 == 0 and head_dim <= AP_HD_MAX;
// the launcher leaves other shapes to phi3_attention. Row r at position pos sees its sequence's
// keys first..pos, first = max(0, pos + 1 - window) when window > 0, else 0.
//
// A block computes one tile of query rows for one query head: AP_WARPS warps of 16 rows each.
// Keys come in tiles of AP_KEYS that start at multiples of AP_KEYS of the sequence's positions
// (not of the query tile), from the tile holding the first key the block's first row sees to the
// one holding its last row's position, double-buffered in shared memory by cp.async (positions
// outside that range are zero-filled, never read from the pool). Per key tile each warp computes
// S = q k^T with mma.m16n8k16 (bf16 in, f32 accumulation; k through ldmatrix), scales and masks
// it, updates each row's running max and sum, and adds P v to its accumulator (P from the S
// registers, which already have the mma's A layout; v through ldmatrix.trans). Each row's max and
// sum are reduced over the 4 lanes that hold it.
//
// Precision: keys and values are the cache's bf16. q (f32) and p (f32 in [0, 1]) must enter the
// mma as bf16. phi3_attention_prefill splits each into hi = bf16(x) plus lo = bf16(x - hi), two
// mmas in place of one, so |x - hi - lo| <= 2^-16 |x| and the result stays within f32 noise of
// phi3_attention's f32 arithmetic (host check: at most 6e-6 of sum p |v|). The _fast kernel rounds
// q and p to bf16 once (the precision of FlashAttention-2 and of torch's bf16 SDPA: 2^-8 relative
// per input; host check: up to 3e-3 of sum p |v|) for half the tensor work.
// exp is the accurate expf in both.
//
// Batch invariance (issue 10): a row's result depends on its own q, position and keys only. Key
// tiles sit at fixed positions; a key tile that holds none of a row's keys leaves the row's max,
// sum and accumulator exactly as they were (p = 0 and correction e^0 = 1, or everything 0 while
// the row has seen no key, the exponents then taken against 0 so that no -inf - -inf appears); and
// each sum runs in the same order whichever tile, block or batch the row is in. So a prompt's
// attention is the same however its rows are chunked into passes and tiles, or batched.
//
// Launch: phi3_attention_prefill grid (n_tiles, n_heads); phi3_attention_decode grid (rows,
// n_kv_heads, most key slices of a row); both block AP_THREADS, AP_SMEM_BYTES of dynamic shared
// memory. Rust launchers: ops.rs (launch_attention_prefill, launch_attention); constants
// mirrored there and in kv.rs.
#include "common.cuh"

// AP_ROWS, AP_HD_MAX and AP_SMEM_BYTES are mirrored in ops.rs and kv.rs (a test compares).
#define AP_WARPS 4
#define AP_THREADS (32 * AP_WARPS)
#define AP_ROWS 64
#define AP_KEYS 64
#define AP_HD_MAX 128
// Row stride of every shared tile in bf16 values: 272 bytes, so the 8 rows of one ldmatrix phase
// fall in different banks.
#define AP_STRIDE (AP_HD_MAX + 8)
// Two stages of [keys, values][AP_KEYS][AP_STRIDE] bf16 (the first stage also stages q: hi, lo).
#define AP_STAGE (2 * AP_KEYS * AP_STRIDE)
#define AP_SMEM_BYTES 69632
static_assert(AP_ROWS == 16 * AP_WARPS, "one warp per 16 query rows");
static_assert(AP_SMEM_BYTES == 2 * AP_STAGE * 2, "two stages of bf16 keys and values");
static_assert(2 * AP_ROWS <= 2 * AP_KEYS, "q hi and lo fit the first stage");

// Keys and values of key tile `kt` (positions kt * AP_KEYS ..) into `stage`: the positions in
// lo..hi by cp.async from the pool, the others zero. Commits one cp.async group.
__device__ __forceinline__ void ap_load_tile(unsigned short* stage, int kt, int lo, int hi,
                                             const unsigned long long* slabs,
                                             const unsigned int* table, int blocks_per_slab,
                                             int block_len, int layer, int kv_dim, int head_off,
                                             int head_dim) {
    const int vecs = head_dim >> 3;  // 16-byte pieces of a row
    for (int i = threadIdx.x; i < 2 * AP_KEYS * vecs; i += AP_THREADS) {
        const int which = i / (AP_KEYS * vecs);  // 0: keys, 1: values
        const int rem = i - which * AP_KEYS * vecs;
        const int r = rem / vecs, c = (rem - r * vecs) * 8;
        unsigned short* dst = stage + (which * AP_KEYS + r) * AP_STRIDE + c;
        const int j = kt * AP_KEYS + r;
        if (j >= lo && j <= hi) {
            bf16* blk =
                kv_block(slabs, blocks_per_slab, block_len, table[j / PHI3_KV_BLOCK_TOKENS]);
            cp_async16(dst, kv_row(blk, layer, which, j % PHI3_KV_BLOCK_TOKENS, kv_dim) +
                                head_off + c);
        } else {
            vec_store(dst, make_uint4(0u, 0u, 0u, 0u));
        }
    }
    cp_async_commit();
}

// The low and high halves of a packed bf16 pair, as f32.
__device__ __forceinline__ float bf16_lo(unsigned int p) { return __uint_as_float(p << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int p) { return __uint_as_float(p & 0xffff0000u); }

// Rows 0..n_rows - 1 of q (row r at src + r * stride, head_dim f32 each, 16-byte aligned), zero
// past n_rows up to `rows`, into shared memory as bf16 hi (and lo) [rows][AP_STRIDE]; then each
// warp's A fragments of rows w0..w0+15: qa (hi) and qb (lo) per 16 columns. Ends with a barrier,
// after which the staging area may be reused.
template <bool SPLIT>
__device__ __forceinline__ void ap_q_fragments(unsigned short* stage, const float* src,
                                               size_t stride, int n_rows, int rows, int w0,
                                               int head_dim, unsigned int (*qa)[4],
                                               unsigned int (*qb)[4]) {
    unsigned short* q_hi = stage;
    unsigned short* q_lo = stage + rows * AP_STRIDE;
    const int quads = head_dim >> 2;
    for (int i = threadIdx.x; i < rows * quads; i += AP_THREADS) {
        const int r = i / quads, c = (i - r * quads) * 4;
        float4 v = {0.0f, 0.0f, 0.0f, 0.0f};
        if (r < n_rows) v = vec_load<float4>(src + r * stride + c);
        const float x[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const bf16 hi = f32_to_bf16(x[e]);
            q_hi[r * AP_STRIDE + c + e] = hi.bits;
            if (SPLIT) q_lo[r * AP_STRIDE + c + e] = f32_to_bf16(x[e] - to_f32(hi)).bits;
        }
    }
    __syncthreads();
    // Matrices: rows 0-7 / 8-15 (lane bit 3) of columns 0-7 / 8-15 (lane bit 4).
    const int lane = threadIdx.x & 31;
    const int r = w0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < AP_HD_MAX / 16; ++kk) {
        if (kk < (head_dim >> 4)) {
            ldmatrix_x4<false>(qa[kk], q_hi + r * AP_STRIDE + 16 * kk + c);
            if (SPLIT) ldmatrix_x4<false>(qb[kk], q_lo + r * AP_STRIDE + 16 * kk + c);
        }
    }
    __syncthreads();
}

// One warp's step over NT * 8 keys of a stage, for its 16 query rows (fragments qa, qb): S = q k^T
// (mma), scaled and masked (key j is visible to the thread's accumulator row i, 0 for row g and 1
// for g + 8, iff f_row[i] <= j <= p_row[i]), each row's running max m, sum l and accumulator o
// updated (online softmax), then o += P v. ks, vs: the keys' and values' rows in the stage (row
// stride AP_STRIDE); key0: the position of the first key.
// A step in which none of a row's keys is visible leaves that row's m, l and o exactly as they
// were (p = 0, correction e^0 = 1, or 0 while the row has seen nothing).
template <bool SPLIT, int NT>
__device__ __forceinline__ void ap_warp_keys(const unsigned int (*qa)[4],
                                             const unsigned int (*qb)[4], const unsigned short* ks,
                                             const unsigned short* vs, int key0, const int* f_row,
                                             const int* p_row, int n_k16, float scale, float* m,
                                             float* l, float (*o)[4]) {
    const int lane = threadIdx.x & 31, t = lane & 3;
    // s[j]: keys 8j..8j+7.
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < AP_HD_MAX / 16; ++kk) {
        if (kk >= n_k16) break;
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            // Matrices: keys 0-7 / 8-15 (lane bit 4) of columns 0-7 / 8-15 (lane bit 3), so
            // b[0..1] is key tile 2np and b[2..3] key tile 2np + 1.
            unsigned int b[4];
            ldmatrix_x4<false>(b, ks + (16 * np + (lane & 7) + (lane >> 4) * 8) * AP_STRIDE +
                                      16 * kk + ((lane >> 3) & 1) * 8);
            mma_16816<false>(s[2 * np], qa[kk], b);
            mma_16816<false>(s[2 * np + 1], qa[kk], b + 2);
            if (SPLIT) {
                mma_16816<false>(s[2 * np], qb[kk], b);
                mma_16816<false>(s[2 * np + 1], qb[kk], b + 2);
            }
        }
    }

    // Scale and mask; each row's new max.
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = e >> 1, key = key0 + 8 * j + 2 * t + (e & 1);
            const bool seen = key <= p_row[i] && key >= f_row[i];
            s[j][e] = seen ? s[j][e] * scale : PHI3_NEG_INF;
            mx[i] = fmaxf(mx[i], s[j][e]);
        }
    }
    float base[2], corr[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        base[i] = mx[i] == PHI3_NEG_INF ? 0.0f : mx[i];  // no key seen yet: p = 0, not NaN
        corr[i] = expf(m[i] - base[i]);                  // 0 while m = -inf; 1 if unchanged
        m[i] = mx[i];
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float p = expf(s[j][e] - base[e >> 1]);
            s[j][e] = p;
            sum[e >> 1] += p;
        }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 1);
        sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 2);
        l[i] = l[i] * corr[i] + sum[i];
    }
#pragma unroll
    for (int n = 0; n < AP_HD_MAX / 8; ++n) {
        if (n >= 2 * n_k16) break;
#pragma unroll
        for (int e = 0; e < 4; ++e) o[n][e] *= corr[e >> 1];
    }

    // o += P v, 16 keys at a time: P's A fragment is s[2ks] (keys 0-7) and s[2ks + 1] (8-15).
#pragma unroll
    for (int ks16 = 0; ks16 < NT / 2; ++ks16) {
        const float* s0 = s[2 * ks16];
        const float* s1 = s[2 * ks16 + 1];
        const unsigned int pa[4] = {pack_bf16x2(s0[0], s0[1]), pack_bf16x2(s0[2], s0[3]),
                                    pack_bf16x2(s1[0], s1[1]), pack_bf16x2(s1[2], s1[3])};
        unsigned int pb[4] = {0u, 0u, 0u, 0u};
        if (SPLIT) {
            pb[0] = pack_bf16x2(s0[0] - bf16_lo(pa[0]), s0[1] - bf16_hi(pa[0]));
            pb[1] = pack_bf16x2(s0[2] - bf16_lo(pa[1]), s0[3] - bf16_hi(pa[1]));
            pb[2] = pack_bf16x2(s1[0] - bf16_lo(pa[2]), s1[1] - bf16_hi(pa[2]));
            pb[3] = pack_bf16x2(s1[2] - bf16_lo(pa[3]), s1[3] - bf16_hi(pa[3]));
        }
#pragma unroll
        for (int dp = 0; dp < AP_HD_MAX / 16; ++dp) {
            if (dp >= n_k16) break;
            // Transposed matrices: keys 0-7 / 8-15 (lane bit 3) of columns 0-7 / 8-15 (lane
            // bit 4), so b[0..1] is output columns 16dp..+7 and b[2..3] 16dp+8..+15.
            unsigned int b[4];
            ldmatrix_x4<true>(b, vs + (16 * ks16 + (lane & 7) + ((lane >> 3) & 1) * 8) *
                                          AP_STRIDE +
                                     16 * dp + (lane >> 4) * 8);
            mma_16816<false>(o[2 * dp], pa, b);
            mma_16816<false>(o[2 * dp + 1], pa, b + 2);
            if (SPLIT) {
                mma_16816<false>(o[2 * dp], pb, b);
                mma_16816<false>(o[2 * dp + 1], pb, b + 2);
            }
        }
    }
}

template <bool SPLIT>
__device__ __forceinline__ void attention_prefill_impl(
    const float* q, const unsigned long long* slabs, const unsigned int* row_pos,
    const unsigned int* row_table, const unsigned int* tiles, const unsigned int* tables,
    float* out, int blocks_per_slab, int block_len, int layer, int n_heads, int n_kv_heads,
    int head_dim, float scale, int window) {
    PHI3_DYNAMIC_SMEM(unsigned short, smem);
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const int row0 = (int)tiles[2 * blockIdx.x], n_rows = (int)tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
    const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    const int n_k16 = head_dim >> 4;  // 16-wide steps of head_dim
    const int pos_lo = (int)row_pos[row0], pos_hi = pos_lo + n_rows - 1;
    const unsigned int* table = tables + row_table[row0];

    unsigned int qa[AP_HD_MAX / 16][4], qb[AP_HD_MAX / 16][4];
    ap_q_fragments<SPLIT>(smem, q + (size_t)row0 * q_dim + (size_t)h * head_dim, q_dim, n_rows,
                          AP_ROWS, 16 * warp, head_dim, qa, qb);

    // This thread's rows of the tile: ra and ra + 8 (accumulator elements e < 2 and e >= 2).
    const int ra = warp * 16 + g;
    int p_row[2], f_row[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = ra + 8 * i;
        p_row[i] = r < n_rows ? pos_lo + r : -1;  // a padding row sees no key
        f_row[i] = window > 0 ? max(0, p_row[i] + 1 - window) : 0;
    }
    float o[AP_HD_MAX / 8][4];
#pragma unroll
    for (int n = 0; n < AP_HD_MAX / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {PHI3_NEG_INF, PHI3_NEG_INF}, l[2] = {0.0f, 0.0f};

    const int first_lo = window > 0 ? max(0, pos_lo + 1 - window) : 0;
    const int kt_first = first_lo / AP_KEYS, kt_last = pos_hi / AP_KEYS;
    const int head_off = kvh * head_dim;
    ap_load_tile(smem, kt_first, first_lo, pos_hi, slabs, table, blocks_per_slab, block_len, layer,
                 kv_dim, head_off, head_dim);
    for (int kt = kt_first; kt <= kt_last; ++kt) {
        const unsigned short* ks = smem + ((kt - kt_first) & 1) * AP_STAGE;
        if (kt < kt_last) {
            // The next tile's copies fly while this one is computed.
            ap_load_tile(smem + ((kt + 1 - kt_first) & 1) * AP_STAGE, kt + 1, first_lo, pos_hi,
                         slabs, table, blocks_per_slab, block_len, layer, kv_dim, head_off,
                         head_dim);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        ap_warp_keys<SPLIT, AP_KEYS / 8>(qa, qb, ks, ks + AP_KEYS * AP_STRIDE, kt * AP_KEYS, f_row,
                                         p_row, n_k16, scale, m, l, o);
        __syncthreads();  // every warp is done with this stage before it is loaded again
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = ra + 8 * i;
        if (r >= n_rows) continue;
        float* orow = out + (size_t)(row0 + r) * q_dim + (size_t)h * head_dim;
#pragma unroll
        for (int n = 0; n < AP_HD_MAX / 8; ++n) {
            if (n >= 2 * n_k16) break;
            orow[8 * n + 2 * t] = o[n][2 * i] / l[i];
            orow[8 * n + 2 * t + 1] = o[n][2 * i + 1] / l[i];
        }
    }
}

// The decode rows (row_split[row] != ATT_PREFILL): one block per (row, KV head, key slice). The
// KV head's group of query heads (at most 16) are the rows of the mma, so each key and value is
// read once for all of them, and the block's 4 warps take 16 keys each of every 64-key tile,
// each keeping its own max, sum and accumulator; at the end the 4 are merged in warp order
// through shared memory. Key slices (flash-decoding) as phi3_attention: a row at
// position pos >= split_keys (row_split[row] its first slot) has keys 0..pos in slices of
// split_keys, block z computing slice z and writing its unnormalised accumulator, max and sum to
// `part` (phi3_attention's layout), the last of a (row, KV head)'s slices to finish merging them
// into `out` (att_merge_slices, tickets[row * n_kv_heads + kvh]); other rows take all their keys
// in block z = 0 and write `out`.
template <bool SPLIT>
__device__ __forceinline__ void attention_decode_impl(
    const float* q, const unsigned long long* slabs, const unsigned int* row_pos,
    const unsigned int* row_table, const unsigned int* row_split, const unsigned int* tables,
    float* out, float* part, unsigned int* tickets, int blocks_per_slab, int block_len, int layer,
    int n_heads, int n_kv_heads, int head_dim, float scale, int window, int split_keys,
    int split_slots) {
    PHI3_DYNAMIC_SMEM(unsigned short, smem);
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const int row = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const unsigned int slot0 = row_split[row];
    if (slot0 == ATT_PREFILL) return;  // phi3_attention_prefill's row
    const int pos = (int)row_pos[row];
    int lo, hi;  // this block's keys
    if (!att_block_keys(slot0, split, pos, window, split_keys, &lo, &hi)) return;
    const int group = n_heads / n_kv_heads, h0 = kvh * group;
    const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    const int n_k16 = head_dim >> 4;
    const unsigned int* table = tables + row_table[row];

    // Every warp holds the same 16 rows: the group's query heads, zero past the group.
    unsigned int qa[AP_HD_MAX / 16][4], qb[AP_HD_MAX / 16][4];
    ap_q_fragments<SPLIT>(smem, q + (size_t)row * q_dim + (size_t)h0 * head_dim, head_dim, group,
                          16, 0, head_dim, qa, qb);
    const int f_row[2] = {lo, lo};
    const int p_row[2] = {g < group ? hi : -1, g + 8 < group ? hi : -1};
    float o[AP_HD_MAX / 8][4];
#pragma unroll
    for (int n = 0; n < AP_HD_MAX / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {PHI3_NEG_INF, PHI3_NEG_INF}, l[2] = {0.0f, 0.0f};

    const int head_off = kvh * head_dim;
    const int kt_first = lo / AP_KEYS, kt_last = hi / AP_KEYS;  // none when lo > hi
    if (lo <= hi) {
        ap_load_tile(smem, kt_first, lo, hi, slabs, table, blocks_per_slab, block_len, layer,
                     kv_dim, head_off, head_dim);
    }
    for (int kt = kt_first; lo <= hi && kt <= kt_last; ++kt) {
        const unsigned short* ks = smem + ((kt - kt_first) & 1) * AP_STAGE;
        if (kt < kt_last) {
            ap_load_tile(smem + ((kt + 1 - kt_first) & 1) * AP_STAGE, kt + 1, lo, hi, slabs, table,
                         blocks_per_slab, block_len, layer, kv_dim, head_off, head_dim);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const int k16 = 16 * warp;  // this warp's keys of the tile
        ap_warp_keys<SPLIT, 2>(qa, qb, ks + k16 * AP_STRIDE, ks + (AP_KEYS + k16) * AP_STRIDE,
                               kt * AP_KEYS + k16, f_row, p_row, n_k16, scale, m, l, o);
        __syncthreads();
    }

    // Merge the warps in order: M = max of their maxima, sum and accumulator rescaled to it.
    // Shared memory (the stages are free now): per warp, 16 rows of max and sum, then
    // [16][AP_HD_MAX] accumulators, all f32.
    float* ms = reinterpret_cast<float*>(smem);
    float* ls = ms + AP_WARPS * 16;
    float* os = ls + AP_WARPS * 16;
    if (t == 0) {
        ms[warp * 16 + g] = m[0];
        ms[warp * 16 + g + 8] = m[1];
        ls[warp * 16 + g] = l[0];
        ls[warp * 16 + g + 8] = l[1];
    }
#pragma unroll
    for (int n = 0; n < AP_HD_MAX / 8; ++n) {
        if (n >= 2 * n_k16) break;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = g + (e >= 2 ? 8 : 0), d = 8 * n + 2 * t + (e & 1);
            os[(warp * 16 + r) * AP_HD_MAX + d] = o[n][e];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * head_dim; i += AP_THREADS) {
        const int r = i / head_dim, d = i - r * head_dim;
        float mx = PHI3_NEG_INF;
        for (int w = 0; w < AP_WARPS; ++w) mx = fmaxf(mx, ms[w * 16 + r]);
        const float base = mx == PHI3_NEG_INF ? 0.0f : mx;  // an empty slice: all zero
        float acc = 0.0f, sum = 0.0f;
        for (int w = 0; w < AP_WARPS; ++w) {
            const float c = expf(ms[w * 16 + r] - base);  // 0 for a warp that saw no key
            acc += os[(w * 16 + r) * AP_HD_MAX + d] * c;
            sum += ls[w * 16 + r] * c;
        }
        if (slot0 == ATT_NO_SPLIT) {
            out[(size_t)row * q_dim + (size_t)(h0 + r) * head_dim + d] = acc / sum;
        } else {
            // Unnormalised accumulator, max and sum (-inf, 0, 0 for an empty slice).
            const size_t at = (size_t)(slot0 + split) * n_heads + h0 + r;
            part[at * head_dim + d] = acc;
            if (d == 0) {
                float* ml = part + (size_t)split_slots * n_heads * head_dim + 2 * at;
                ml[0] = mx;
                ml[1] = sum;
            }
        }
    }
    if (slot0 == ATT_NO_SPLIT) return;
    const int n_s = pos / split_keys + 1;
    if (last_arrival(tickets + (size_t)row * gridDim.y + kvh, (unsigned int)n_s)) {
        att_merge_slices(part, out, slot0, n_s, row, h0, group, n_heads, head_dim, split_slots);
    }
}

extern "C" __global__ void __launch_bounds__(AP_THREADS)
    phi3_attention_prefill(const float* q, const unsigned long long* slabs,
                           const unsigned int* row_pos, const unsigned int* row_table,
                           const unsigned int* tiles, const unsigned int* tables, float* out,
                           int blocks_per_slab, int block_len, int layer, int n_heads,
                           int n_kv_heads, int head_dim, float scale, int window) {
    attention_prefill_impl<true>(q, slabs, row_pos, row_table, tiles, tables, out, blocks_per_slab,
                                 block_len, layer, n_heads, n_kv_heads, head_dim, scale, window);
}

extern "C" __global__ void __launch_bounds__(AP_THREADS)
    phi3_attention_prefill_fast(const float* q, const unsigned long long* slabs,
                                const unsigned int* row_pos, const unsigned int* row_table,
                                const unsigned int* tiles, const unsigned int* tables, float* out,
                                int blocks_per_slab, int block_len, int layer, int n_heads,
                                int n_kv_heads, int head_dim, float scale, int window) {
    attention_prefill_impl<false>(q, slabs, row_pos, row_table, tiles, tables, out,
                                  blocks_per_slab, block_len, layer, n_heads, n_kv_heads, head_dim,
                                  scale, window);
}

extern "C" __global__ void __launch_bounds__(AP_THREADS)
    phi3_attention_decode(const float* q, const unsigned long long* slabs,
                          const unsigned int* row_pos, const unsigned int* row_table,
                          const unsigned int* row_split, const unsigned int* tables, float* out,
                          float* part, unsigned int* tickets, int blocks_per_slab, int block_len,
                          int layer, int n_heads, int n_kv_heads, int head_dim, float scale,
                          int window, int split_keys, int split_slots) {
    attention_decode_impl<true>(q, slabs, row_pos, row_table, row_split, tables, out, part,
                                tickets, blocks_per_slab, block_len, layer, n_heads, n_kv_heads,
                                head_dim, scale, window, split_keys, split_slots);
}

extern "C" __global__ void __launch_bounds__(AP_THREADS)
    phi3_attention_decode_fast(const float* q, const unsigned long long* slabs,
                               const unsigned int* row_pos, const unsigned int* row_table,
                               const unsigned int* row_split, const unsigned int* tables,
                               float* out, float* part, unsigned int* tickets, int blocks_per_slab,
                               int block_len, int layer, int n_heads, int n_kv_heads,
                               int head_dim, float scale, int window, int split_keys,
                               int split_slots) {
    attention_decode_impl<false>(q, slabs, row_pos, row_table, row_split, tables, out, part,
                                 tickets, blocks_per_slab, block_len, layer, n_heads, n_kv_heads,
                                 head_dim, scale, window, split_keys, split_slots);
}
