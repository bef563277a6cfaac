// gemv_quant.cu: y = W x for up to QTOK tokens (the decode rows of a pass) with int8 or int4
// weights, dequantized in registers, f32 activations and f32 accumulation. Layouts:
// phi3-core/src/loader/quant.rs.
//
// phi3_gemv_int8:       q [out, in] int8 (row-major), scales [out] f32, x [ntok, in] f32,
//                       y [ntok, out] f32; y[t, r] = scales[r] * sum_c x[t, c] * q[r, c].
// phi3_gemv_int4_bf16 / phi3_gemv_int4_f16:
//                       packed [out, in / 2] u8 (column 2i in the LOW nibble of byte i),
//                       scales [out, in / group] bf16 or f16, zeros [out, in / group] u8 (0..=15),
//                       x [ntok, in] f32, y [ntok, out] f32, group 32 | 64 | 128;
//                       y[t, r] = sum_g scale[r, g] * sum_{c in g} x[t, c] * (q[r, c] - zero[r, g]).
// The _x8 kernels take ntok = 1..=QTOK tokens: each weight chunk is loaded and dequantized once
// for all of them. The plain kernels take one token (ntok = 1) and need a third of the registers
// (80 against 230 for int4 at sm_90), so batch-1 decode keeps its occupancy. Both instantiate the
// same template, and a token's sums are the same operations in the same order in either and
// whatever ntok is (every multiply-add is an explicit fmaf, so contraction cannot differ): a
// token's result does not depend on the tokens it was launched with, the batch invariance the
// scheduler needs (issue 10). More tokens take several launches.
//
// Work split: one warp computes QROWS = 4 consecutive rows, so every x value a lane loads serves
// four weight rows (x is re-read from L1 once per four rows; with one row per warp the L1 traffic
// of x would be 4x (int8) or 8x (int4) the weight bytes and L1, not DRAM, would bound the kernel).
// Lane l takes 16-byte chunks l, l + 32, ... of each row (one uint4 load per row per chunk, loads
// of neighbouring lanes coalesce into 512 contiguous bytes); the four rows' loads are issued
// before any is used. Weight loads bypass L1 (ld.global.nc.L1::no_allocate: each byte is read
// once) so x stays resident there. Partial sums are combined with warp shuffles.
// Launch: grid (ceil(out / 8)), block 64 (2 warps x 4 rows). Rust launcher: ops.rs (gemv_int8,
// gemv_int4).
//
// Dequantization without int->float conversions (I2F runs at 1/4 rate and would bound the kernel):
// - int8: the byte, sign-flipped (q + 128, by one XOR per 4 bytes), is placed by one PRMT in the
//   low mantissa of 2^23: float bits 0x4b0000uu = 2^23 + u exactly, and subtracting 2^23 + 128
//   gives q exactly. Per weight: PRMT, FADD, FFMA.
// - int4: a nibble placed in the mantissa of 1.0 at bits 19..22 reads as 1 + q/16, at bits 15..18
//   as 1 + q/256, both exact. One shift puts a byte's low nibble (even column) at bits 15..18 and
//   its high nibble (odd column) at 19..22; one LOP3 each ((t & mask) | 0x3f800000) makes the
//   float. Per 32-column chunk the lane accumulates a15 = sum_even x (1 + q/256) and
//   a19 = sum_odd x (1 + q/16), and with the chunk's x sums xe, xo (computed once per chunk, shared
//   by the four rows): sum x q = 256 (a15 - xe) + 16 (a19 - xo). The zero point is the usual trick,
//   sum x (q - z) = sum x q - z (xe + xo), applied per chunk (a chunk never straddles a group).
//   Per weight: 0.5 SHF, 1 LOP3, 1 FFMA (the exact 2^23 route would add an FADD and a shift per
//   weight, which at int4's 2 weights per byte would make the kernel issue-bound below DRAM speed).
//   Rounding: a15 carries x's chunk sum at full weight, so its f32 rounding error (~2^-24 of
//   sum |x|) is amplified 256x relative to the q term: a relative error of order 1e-5 of the
//   chunk's dot product (1e-6 for the odd columns), against ~1e-7 for plain f32. The gpu-check
//   tolerance for quantized GEMV against the CPU (1e-4) leaves 10x headroom over that estimate.
// Expected speed (not measured: written and NVRTC-compiled without a GPU): bound by the bytes of
// q, scales and zeros read once. The _x8 kernels hold 8 tokens' sums (int4: 230 registers, so 8
// warps per SM and fewer loads in flight): below that bound, but one weight pass serves 8 tokens.
#include "common.cuh"

#define QROWS 4
#define QTOK 8  // tokens of the _x8 kernels

// 16 bytes of weights, read once: not cached in L1 (keeps x there).
__device__ __forceinline__ uint4 load_stream16(const void* p) {
#ifdef PHI3_HOST_EMULATION  // kernels/host-check
    return vec_load<uint4>(p);
#else
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
#endif
}

__device__ __forceinline__ unsigned int word(uint4 v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// ---------------------------------------------------------------------------------------------
// int8

// Exact q (an int8 held in byte b of w ^ 0x80808080) as a float: 2^23 + (q + 128) - (2^23 + 128).
__device__ __forceinline__ float int8_at(unsigned int wx, unsigned int b) {
    return __uint_as_float(__byte_perm(wx, 0x4b000000u, 0x7440u | b)) - 8388736.0f;
}

// sum_{c in chunk} x[c] q[c] for 16 columns (the 4 words of v), x as 4 float4.
__device__ __forceinline__ float int8_chunk_dot(uint4 v, const float4* xv) {
    float a = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const unsigned int wx = word(v, j) ^ 0x80808080u;
        a = fmaf(xv[j].x, int8_at(wx, 0), a);
        a = fmaf(xv[j].y, int8_at(wx, 1), a);
        a = fmaf(xv[j].z, int8_at(wx, 2), a);
        a = fmaf(xv[j].w, int8_at(wx, 3), a);
    }
    return a;
}

// Partial sums of this lane for rows r0 .. r0 + QROWS - 1 and tokens 0 .. ntok - 1 (rows past
// `out` repeat the last row; the caller discards them).
template <int NT>
__device__ __forceinline__ void gemv_int8_lane(const signed char* q, const float* x, int in,
                                               int out, int ntok, int r0, int lane,
                                               float (*acc)[QROWS]) {
    const signed char* wr[QROWS];
#pragma unroll
    for (int r = 0; r < QROWS; ++r) wr[r] = q + (size_t)min(r0 + r, out - 1) * in;
    if ((in & 15) == 0 && aligned16(q, x)) {
        const int chunks = in >> 4;
        for (int c = lane; c < chunks; c += 32) {
            uint4 v[QROWS];
#pragma unroll
            for (int r = 0; r < QROWS; ++r) v[r] = load_stream16(wr[r] + (size_t)c * 16);
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (t >= ntok) break;
                const float4* xp = reinterpret_cast<const float4*>(x + (size_t)t * in + c * 16);
                float4 xv[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) xv[i] = vec_load<float4>(xp + i);
#pragma unroll
                for (int r = 0; r < QROWS; ++r) acc[t][r] += int8_chunk_dot(v[r], xv);
            }
        }
    } else {
        // Rows not 16-byte aligned (in % 16 != 0) or an offset sub-slice: one element per lane.
        for (int c = lane; c < in; c += 32) {
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (t >= ntok) break;
                const float xc = x[(size_t)t * in + c];
#pragma unroll
                for (int r = 0; r < QROWS; ++r) acc[t][r] = fmaf(xc, (float)wr[r][c], acc[t][r]);
            }
        }
    }
}

// Every lane's sums of one warp's rows, reduced and stored for each token.
template <bool SCALED, int NT>
__device__ __forceinline__ void store_rows(float (*acc)[QROWS], const float* scales, float* y,
                                           int out, int ntok, int r0, int lane) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        if (t >= ntok) break;
#pragma unroll
        for (int r = 0; r < QROWS; ++r) {
            const float s = warp_sum(acc[t][r]);
            if (lane == 0 && r0 + r < out) {
                y[(size_t)t * out + r0 + r] = SCALED ? scales[r0 + r] * s : s;
            }
        }
    }
}

template <int NT>
__device__ __forceinline__ void gemv_int8_impl(const signed char* q, const float* scales,
                                               const float* x, float* y, int in, int out,
                                               int ntok) {
    const int lane = threadIdx.x & 31;
    const int r0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * QROWS;
    if (r0 >= out) return;  // whole warps leave together
    float acc[NT][QROWS] = {};
    gemv_int8_lane<NT>(q, x, in, out, ntok, r0, lane, acc);
    store_rows<true, NT>(acc, scales, y, out, ntok, r0, lane);
}

extern "C" __global__ void phi3_gemv_int8(const signed char* __restrict__ q,
                                          const float* __restrict__ scales,
                                          const float* __restrict__ x, float* __restrict__ y,
                                          int in, int out, int ntok) {
    gemv_int8_impl<1>(q, scales, x, y, in, out, ntok);
}
extern "C" __global__ void phi3_gemv_int8_x8(const signed char* __restrict__ q,
                                             const float* __restrict__ scales,
                                             const float* __restrict__ x, float* __restrict__ y,
                                             int in, int out, int ntok) {
    gemv_int8_impl<QTOK>(q, scales, x, y, in, out, ntok);
}

// ---------------------------------------------------------------------------------------------
// int4

// Nibble at bits 15..18 of t as 1 + q/256; nibble at bits 19..22 as 1 + q/16 (both exact).
__device__ __forceinline__ float nib15(unsigned int t) {
    return __uint_as_float((t & 0x00078000u) | 0x3f800000u);
}
__device__ __forceinline__ float nib19(unsigned int t) {
    return __uint_as_float((t & 0x00780000u) | 0x3f800000u);
}

// sum_{c in chunk} x[c] q[c] for 32 columns (the 32 nibbles of v), x as 8 float4, given the
// chunk's sums of x over its even (xe) and odd (xo) columns. See the header for the method.
__device__ __forceinline__ float int4_chunk_dot(uint4 v, const float4* xv, float xe, float xo) {
    float a15 = 0.0f, a19 = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        // Word j holds columns 8j .. 8j + 7; byte b holds columns 8j + 2b (low) and 8j + 2b + 1.
        const unsigned int w = word(v, j);
        const float4 lo = xv[2 * j], hi = xv[2 * j + 1];
        const unsigned int t0 = w << 15, t1 = w << 7, t2 = w >> 1, t3 = w >> 9;
        a15 = fmaf(lo.x, nib15(t0), a15);
        a19 = fmaf(lo.y, nib19(t0), a19);
        a15 = fmaf(lo.z, nib15(t1), a15);
        a19 = fmaf(lo.w, nib19(t1), a19);
        a15 = fmaf(hi.x, nib15(t2), a15);
        a19 = fmaf(hi.y, nib19(t2), a19);
        a15 = fmaf(hi.z, nib15(t3), a15);
        a19 = fmaf(hi.w, nib19(t3), a19);
    }
    return fmaf(256.0f, a15 - xe, 16.0f * (a19 - xo));
}

template <int NT, typename S>
__device__ __forceinline__ void gemv_int4_lane(const unsigned char* packed, const S* scales,
                                               const unsigned char* zeros, const float* x, int in,
                                               int out, int ntok, int group, int r0, int lane,
                                               float (*acc)[QROWS]) {
    const int ng = in / group;
    const unsigned char* wr[QROWS];
    const S* sr[QROWS];
    const unsigned char* zr[QROWS];
#pragma unroll
    for (int r = 0; r < QROWS; ++r) {
        const size_t row = (size_t)min(r0 + r, out - 1);
        wr[r] = packed + row * (size_t)(in >> 1);
        sr[r] = scales + row * ng;
        zr[r] = zeros + row * ng;
    }
    if (aligned16(packed, x)) {
        // in is a multiple of the group (>= 32), so rows are whole 16-byte chunks.
        const int chunks = in >> 5;
        const int gshift = __ffs(group >> 5) - 1;  // chunks per group: 1, 2 or 4
        for (int c = lane; c < chunks; c += 32) {
            uint4 v[QROWS];
#pragma unroll
            for (int r = 0; r < QROWS; ++r) v[r] = load_stream16(wr[r] + (size_t)c * 16);
            const int g = c >> gshift;
            float s[QROWS], z[QROWS];
#pragma unroll
            for (int r = 0; r < QROWS; ++r) {
                s[r] = to_f32(sr[r][g]);
                z[r] = (float)zr[r][g];
            }
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (t >= ntok) break;
                const float4* xp = reinterpret_cast<const float4*>(x + (size_t)t * in + c * 32);
                float4 xv[8];
                float xe = 0.0f, xo = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    xv[i] = vec_load<float4>(xp + i);
                    xe += xv[i].x + xv[i].z;
                    xo += xv[i].y + xv[i].w;
                }
#pragma unroll
                for (int r = 0; r < QROWS; ++r) {
                    const float dot = fmaf(-z[r], xe + xo, int4_chunk_dot(v[r], xv, xe, xo));
                    acc[t][r] = fmaf(s[r], dot, acc[t][r]);
                }
            }
        }
    } else {
        // An offset sub-slice (never produced by the backend): one element per lane.
        for (int c = lane; c < in; c += 32) {
            const int g = c / group;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (t >= ntok) break;
                const float xc = x[(size_t)t * in + c];
#pragma unroll
                for (int r = 0; r < QROWS; ++r) {
                    const int qv = (wr[r][c >> 1] >> ((c & 1) * 4)) & 15;
                    const float w = (float)qv - (float)zr[r][g];
                    acc[t][r] = fmaf(xc * to_f32(sr[r][g]), w, acc[t][r]);
                }
            }
        }
    }
}

template <int NT, typename S>
__device__ __forceinline__ void gemv_int4_impl(const unsigned char* packed, const S* scales,
                                               const unsigned char* zeros, const float* x,
                                               float* y, int in, int out, int group, int ntok) {
    const int lane = threadIdx.x & 31;
    const int r0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * QROWS;
    if (r0 >= out) return;  // whole warps leave together
    float acc[NT][QROWS] = {};
    gemv_int4_lane<NT>(packed, scales, zeros, x, in, out, ntok, group, r0, lane, acc);
    store_rows<false, NT>(acc, nullptr, y, out, ntok, r0, lane);
}

extern "C" __global__ void phi3_gemv_int4_bf16(const unsigned char* __restrict__ packed,
                                               const bf16* __restrict__ scales,
                                               const unsigned char* __restrict__ zeros,
                                               const float* __restrict__ x, float* __restrict__ y,
                                               int in, int out, int group, int ntok) {
    gemv_int4_impl<1>(packed, scales, zeros, x, y, in, out, group, ntok);
}
extern "C" __global__ void phi3_gemv_int4_f16(const unsigned char* __restrict__ packed,
                                              const f16* __restrict__ scales,
                                              const unsigned char* __restrict__ zeros,
                                              const float* __restrict__ x, float* __restrict__ y,
                                              int in, int out, int group, int ntok) {
    gemv_int4_impl<1>(packed, scales, zeros, x, y, in, out, group, ntok);
}
extern "C" __global__ void phi3_gemv_int4_bf16_x8(const unsigned char* __restrict__ packed,
                                                  const bf16* __restrict__ scales,
                                                  const unsigned char* __restrict__ zeros,
                                                  const float* __restrict__ x,
                                                  float* __restrict__ y, int in, int out,
                                                  int group, int ntok) {
    gemv_int4_impl<QTOK>(packed, scales, zeros, x, y, in, out, group, ntok);
}
extern "C" __global__ void phi3_gemv_int4_f16_x8(const unsigned char* __restrict__ packed,
                                                 const f16* __restrict__ scales,
                                                 const unsigned char* __restrict__ zeros,
                                                 const float* __restrict__ x,
                                                 float* __restrict__ y, int in, int out,
                                                 int group, int ntok) {
    gemv_int4_impl<QTOK>(packed, scales, zeros, x, y, in, out, group, ntok);
}
