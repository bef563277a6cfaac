// dequant.cu: int8 / int4 weights -> bf16, a block of rows at a time, for the prefill path
// (the bf16 rows then go to cuBLAS GemmEx with the existing bf16 GEMM). Layouts:
// phi3-core/src/loader/quant.rs.
//
// phi3_dequant_int8:      q [out, in] int8, scales [out] f32
//                         -> w [rows, in] bf16, w[r, c] = bf16(scales[row0 + r] * q[row0 + r, c]).
// phi3_dequant_int4_bf16 / phi3_dequant_int4_f16:
//                         packed [out, in / 2] u8 (column 2i in the LOW nibble of byte i),
//                         scales [out, in / group] bf16 | f16, zeros [out, in / group] u8
//                         -> w [rows, in] bf16, w[r, c] = bf16(scale * (q - zero)) of row row0 + r.
// The product is exact in f32 (int8: one rounding of scale * q; int4: an 8- or 11-bit scale
// times an integer of at most 4 bits) and is rounded to nearest even bf16 once.
// Each thread writes 8 consecutive bf16 (one 16-byte store) from 8 int8 (8 bytes) or 8 int4
// (4 bytes) when `in` is a multiple of 8 (always for int4: in is a multiple of the group);
// otherwise (int8 only) one element per step. Grid-stride loops, block 256.
// Rust launcher: ops.rs (dequant).
#include "common.cuh"

#define GRID_STRIDE(i, n)                                                                     \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;   \
         i < (n); i += (unsigned long long)gridDim.x * blockDim.x)

extern "C" __global__ void phi3_dequant_int8(const signed char* __restrict__ q,
                                             const float* __restrict__ scales,
                                             bf16* __restrict__ w, int row0, int rows, int in) {
    const signed char* src = q + (size_t)row0 * in;
    const float* s = scales + row0;
    if ((in & 7) == 0) {
        const int oct = in >> 3;
        const unsigned long long n = (unsigned long long)rows * oct;
        GRID_STRIDE(i, n) {
            const int r = (int)((unsigned int)i / (unsigned int)oct);  // n < 2^31 (launcher)
            const float sr = s[r];
            const uint2 v = vec_load<uint2>(src + i * 8);
            const unsigned int words[2] = {v.x, v.y};
            unsigned int outw[4];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const unsigned int b = words[h];
                // Bytes as signed values: shift each to the top, then arithmetic shift down.
                const float q0 = (float)((int)(b << 24) >> 24);
                const float q1 = (float)((int)(b << 16) >> 24);
                const float q2 = (float)((int)(b << 8) >> 24);
                const float q3 = (float)((int)b >> 24);
                outw[2 * h] = pack_bf16x2(sr * q0, sr * q1);
                outw[2 * h + 1] = pack_bf16x2(sr * q2, sr * q3);
            }
            vec_store(w + i * 8, make_uint4(outw[0], outw[1], outw[2], outw[3]));
        }
    } else {
        const unsigned long long n = (unsigned long long)rows * in;
        GRID_STRIDE(i, n) w[i] = f32_to_bf16(s[(unsigned int)i / (unsigned int)in] * (float)src[i]);
    }
}

template <typename S>
__device__ __forceinline__ void dequant_int4_impl(const unsigned char* packed, const S* scales,
                                                  const unsigned char* zeros, bf16* w, int row0,
                                                  int rows, int in, int group) {
    const int ng = in / group;
    const unsigned char* src = packed + (size_t)row0 * (in >> 1);
    const S* s = scales + (size_t)row0 * ng;
    const unsigned char* z = zeros + (size_t)row0 * ng;
    const int oct = in >> 3;  // 8 columns = 4 bytes, never straddling a group (group >= 32)
    const unsigned long long n = (unsigned long long)rows * oct;
    GRID_STRIDE(i, n) {
        const int r = (int)((unsigned int)i / (unsigned int)oct);  // n < 2^31 (launcher)
        const int c = ((int)i - r * oct) * 8;
        const size_t gi = (size_t)r * ng + c / group;
        const float sc = to_f32(s[gi]);
        const float zc = (float)z[gi];
        const unsigned int b = *reinterpret_cast<const unsigned int*>(src + i * 4);
        unsigned int outw[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float lo = (float)((b >> (8 * k)) & 15u) - zc;
            const float hi = (float)((b >> (8 * k + 4)) & 15u) - zc;
            outw[k] = pack_bf16x2(sc * lo, sc * hi);
        }
        vec_store(w + i * 8, make_uint4(outw[0], outw[1], outw[2], outw[3]));
    }
}

extern "C" __global__ void phi3_dequant_int4_bf16(const unsigned char* __restrict__ packed,
                                                  const bf16* __restrict__ scales,
                                                  const unsigned char* __restrict__ zeros,
                                                  bf16* __restrict__ w, int row0, int rows, int in,
                                                  int group) {
    dequant_int4_impl(packed, scales, zeros, w, row0, rows, in, group);
}
extern "C" __global__ void phi3_dequant_int4_f16(const unsigned char* __restrict__ packed,
                                                 const f16* __restrict__ scales,
                                                 const unsigned char* __restrict__ zeros,
                                                 bf16* __restrict__ w, int row0, int rows, int in,
                                                 int group) {
    dequant_int4_impl(packed, scales, zeros, w, row0, rows, in, group);
}
