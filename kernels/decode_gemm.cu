// decode_gemm.cu: y = x @ w^T for the decode rows of a pass (one to a few hundred tokens), on
// tensor cores, with a summation order that does not depend on how many tokens there are.
//
// phi3_decode_gemm_<bf16|f16>: w [out, in] (row-major, nn.Linear layout), x [ntok, in] f32 (the
// activations; each block rounds the chunk it stages to the weight's 16-bit type, to nearest
// even as phi3_f32_to_<type> does, so no conversion kernel runs before it), y [ntok, out] f32.
// phi3_decode_gemm_swiglu_<bf16|f16>: the same with x = silu(gate) * up of gate_up
// [ntok, 2 * in] (gate columns first; swiglu_f32 of common.cuh, as phi3_swiglu computes it),
// taken while staging: down_proj of a decode step without the activation's own launch.
// Needs in % 32 == 0 and w, x 16-byte aligned (the launcher checks; otherwise it runs one GEMV
// per row).
//
// Why: a sequence decoded in a batch must get the logits it gets alone (issue 10). cuBLAS picks
// its algorithm, tiling and split by the row count, so a token's dot products are summed in an
// order that depends on its batch. Here every output y[t, o] is the same sequence of operations
// whatever ntok is: the K range is split into `gridDim.y` slices chosen from (out, in) and the
// device alone, each slice is accumulated chunk by chunk in increasing k by one mma.m16n8k16
// chain, and the slices are added in order. Tokens are independent columns of the mma, so the
// other tokens of the batch (and the zero padding to a multiple of 8) never enter a token's sums.
// One solo decode step is the ntok = 1 case of the same kernel.
//
// Layout: a block of DG_WARPS warps owns DG_ROWS = 16 * DG_WARPS output rows and up to DG_TOK
// tokens (blockIdx.z picks the token slice, blockIdx.y the K slice). Per chunk of DG_KC columns
// each warp loads its 16 weight rows straight into registers (lane g = lane / 4 reads rows g and
// g + 8, 16 bytes at column 8 * (lane % 4) of every 32), the block stages the chunk of x for its
// tokens in shared memory, and each warp runs two mmas per 32 columns per 8 tokens.
// The mma's k slots are a permutation of the 32 columns: a lane's 16-byte load holds columns
// 8t..8t+7, of which 8t..8t+3 feed the first mma (slots 2t, 2t+1, 2t+8, 2t+9) and 8t+4..8t+7 the
// second, for A (weights) and B (x) alike, so every product pairs the same column of both.
// Weights are read once per token slice, so up to DG_TOK tokens cost one pass over the weights.
//
// K slices: with splits > 1 each block writes its sums to `part` ([splits, ntok, out] scratch),
// and the last of a tile's `splits` blocks to finish (last_arrival on tickets[z * gridDim.x + x],
// zero before the launch and left zero) adds the tile's slices in order 0, 1, .., splits - 1 into
// y. With splits = 1 blocks write y directly and part and tickets are not read.
//
// Launch: grid (ceil(out / DG_ROWS), splits, ceil(ntok / DG_TOK)), block 32 * DG_WARPS.
// Rust launcher: ops.rs (launch_decode_gemm); constants mirrored there.
#include "common.cuh"

#define DG_WARPS 4
#define DG_ROWS (16 * DG_WARPS)
#define DG_TOK 64
#define DG_KC 128
// Row stride of the staged x in 16-bit elements: 64 bytes of padding put the 8 token rows read by
// one quarter-warp in different banks.
#define DG_XS_STRIDE (DG_KC + 32)

// 8 f32 rounded to bf16 or f16, packed in order.
template <bool F16> __device__ __forceinline__ uint4 pack8(const float* v) {
    auto pair = [](float lo, float hi) {
        const unsigned short l = F16 ? f32_to_f16(lo).bits : f32_to_bf16(lo).bits;
        const unsigned short h = F16 ? f32_to_f16(hi).bits : f32_to_bf16(hi).bits;
        return (unsigned int)l | ((unsigned int)h << 16);
    };
    return make_uint4(pair(v[0], v[1]), pair(v[2], v[3]), pair(v[4], v[5]), pair(v[6], v[7]));
}

// 8 consecutive f32 at p (16-byte aligned).
__device__ __forceinline__ void load8(const float* p, float* v) {
    const float4 a = vec_load<float4>(p);
    const float4 b = vec_load<float4>(p + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// Columns c..c+7 of token row `tok` of the input, rounded: x [.., in], or silu(gate) * up of
// gate_up [.., 2 * in] for SWIGLU.
template <bool F16, bool SWIGLU>
__device__ __forceinline__ uint4 stage8(const float* x, int tok, int in, int c) {
    float v[8];
    if (SWIGLU) {
        float u[8];
        const float* gate = x + (size_t)tok * 2 * in + c;
        load8(gate, v);
        load8(gate + in, u);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = swiglu_f32(v[i], u[i]);
    } else {
        load8(x + (size_t)tok * in + c, v);
    }
    return pack8<F16>(v);
}

template <bool F16, bool SWIGLU>
__device__ void decode_gemm_impl(const unsigned short* w, const float* x, float* y, float* part,
                                 unsigned int* tickets, int in, int out, int ntok,
                                 int k_per_split) {
    __shared__ __align__(16) unsigned short xs[DG_TOK * DG_XS_STRIDE];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * DG_ROWS + warp * 16;
    const int tok0 = blockIdx.z * DG_TOK;
    const int nt = min(DG_TOK, ntok - tok0);
    const int ntiles = (nt + 7) >> 3;
    const int k_begin = blockIdx.y * k_per_split;
    const int k_end = min(in, k_begin + k_per_split);
    // Rows past `out` load the last row and are never stored.
    const unsigned short* w_lo = w + (size_t)min(row0 + g, out - 1) * in + 8 * t;
    const unsigned short* w_hi = w + (size_t)min(row0 + g + 8, out - 1) * in + 8 * t;

    float acc[DG_TOK / 8][4];
#pragma unroll
    for (int j = 0; j < DG_TOK / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    for (int k0 = k_begin; k0 < k_end; k0 += DG_KC) {
        const int kc = min(DG_KC, k_end - k0);  // a multiple of 32
        // This chunk's weights first, so that their loads are in flight while x is staged.
        uint4 wl[DG_KC / 32], wh[DG_KC / 32];
#pragma unroll
        for (int s = 0; s < DG_KC / 32; ++s) {
            if (32 * s < kc) {
                wl[s] = vec_load<uint4>(w_lo + k0 + 32 * s);
                wh[s] = vec_load<uint4>(w_hi + k0 + 32 * s);
            }
        }
        __syncthreads();  // the previous chunk's x is no longer read
        const int vecs = kc >> 3;  // 16-byte vectors per token row
        for (int i = threadIdx.x; i < ntiles * 8 * vecs; i += blockDim.x) {
            const int r = i / vecs, c = (i - r * vecs) * 8;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);  // padding tokens: zero columns of B
            if (r < nt) v = stage8<F16, SWIGLU>(x, tok0 + r, in, k0 + c);
            vec_store(xs + r * DG_XS_STRIDE + c, v);
        }
        __syncthreads();
#pragma unroll
        for (int s = 0; s < DG_KC / 32; ++s) {
            if (32 * s >= kc) break;
            const unsigned int a0[4] = {wl[s].x, wh[s].x, wl[s].y, wh[s].y};
            const unsigned int a1[4] = {wl[s].z, wh[s].z, wl[s].w, wh[s].w};
#pragma unroll
            for (int j = 0; j < DG_TOK / 8; ++j) {
                if (j >= ntiles) break;
                const uint4 xb = vec_load<uint4>(xs + (8 * j + g) * DG_XS_STRIDE + 32 * s + 8 * t);
                const unsigned int b0[2] = {xb.x, xb.y};
                const unsigned int b1[2] = {xb.z, xb.w};
                mma_16816<F16>(acc[j], a0, b0);
                mma_16816<F16>(acc[j], a1, b1);
            }
        }
    }

    // Accumulator (row g or g + 8 of the warp's 16, token 2t or 2t + 1 of the tile).
    const int splits = (int)gridDim.y;
    float* ys = splits > 1 ? part + (size_t)blockIdx.y * ntok * out : y;
#pragma unroll
    for (int j = 0; j < DG_TOK / 8; ++j) {
        if (j >= ntiles) break;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = row0 + g + (e >= 2 ? 8 : 0);
            const int tok = 8 * j + 2 * t + (e & 1);
            if (row < out && tok < nt) ys[(size_t)(tok0 + tok) * out + row] = acc[j][e];
        }
    }
    if (splits == 1) return;
    if (!last_arrival(tickets + blockIdx.z * gridDim.x + blockIdx.x, (unsigned int)splits)) return;
    // The tile's slices in order; consecutive threads take consecutive rows of a token.
    const size_t stride = (size_t)ntok * out;
    for (int i = threadIdx.x; i < nt * DG_ROWS; i += blockDim.x) {
        const int tok = tok0 + i / DG_ROWS, row = blockIdx.x * DG_ROWS + i % DG_ROWS;
        if (row >= out) continue;
        const size_t at = (size_t)tok * out + row;
        float v = __ldcg(part + at);
        for (int s = 1; s < splits; ++s) v += __ldcg(part + s * stride + at);
        y[at] = v;
    }
}

extern "C" __global__ void __launch_bounds__(32 * DG_WARPS)
    phi3_decode_gemm_bf16(const unsigned short* w, const float* x, float* y, float* part,
        unsigned int* tickets, int in, int out, int ntok, int k_per_split) {
    decode_gemm_impl<false, false>(w, x, y, part, tickets, in, out, ntok, k_per_split);
}

extern "C" __global__ void __launch_bounds__(32 * DG_WARPS)
    phi3_decode_gemm_f16(const unsigned short* w, const float* x, float* y, float* part,
        unsigned int* tickets, int in, int out, int ntok, int k_per_split) {
    decode_gemm_impl<true, false>(w, x, y, part, tickets, in, out, ntok, k_per_split);
}

extern "C" __global__ void __launch_bounds__(32 * DG_WARPS)
    phi3_decode_gemm_swiglu_bf16(const unsigned short* w, const float* x, float* y, float* part,
        unsigned int* tickets, int in, int out, int ntok, int k_per_split) {
    decode_gemm_impl<false, true>(w, x, y, part, tickets, in, out, ntok, k_per_split);
}

extern "C" __global__ void __launch_bounds__(32 * DG_WARPS)
    phi3_decode_gemm_swiglu_f16(const unsigned short* w, const float* x, float* y, float* part,
        unsigned int* tickets, int in, int out, int ntok, int k_per_split) {
    decode_gemm_impl<true, true>(w, x, y, part, tickets, in, out, ntok, k_per_split);
}
