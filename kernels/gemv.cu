// gemv.cu: y = W x for one token (decode), weights in their stored dtype, f32 accumulation.
//
// phi3_gemv_<dtype>: w [out, in] (row-major, nn.Linear layout), x [in] f32, y [out] f32.
// One warp per output row; a block of 256 threads computes 8 rows. When `in` is a multiple of the
// elements in 16 bytes (8 for bf16/f16, 4 for f32) every lane reads W and x with 16-byte loads
// (rows then start 16-byte aligned when w and x do: cuMemAlloc gives 256-byte and cuMemAllocAsync
// at least 16-byte alignment; the kernel checks the addresses, so an offset sub-slice takes the
// scalar loop instead of faulting); otherwise a scalar loop. The warp's partial sums are combined with shuffles. Bandwidth bound: W is read once.
// Launch: grid (ceil(out / 8)), block 256. Rust launcher: ops.rs (gemv).
#include "common.cuh"

__device__ __forceinline__ void unpack8(uint4 p, const bf16*, float* f) { bf16x8_to_f32(p, f); }
__device__ __forceinline__ void unpack8(uint4 p, const f16*, float* f) {
    unsigned int w[4] = {p.x, p.y, p.z, p.w};
    for (int k = 0; k < 4; ++k) {
        f16 lo, hi;
        lo.bits = (unsigned short)(w[k] & 0xffffu);
        hi.bits = (unsigned short)(w[k] >> 16);
        f[2 * k] = to_f32(lo);
        f[2 * k + 1] = to_f32(hi);
    }
}

// 16-bit weights: 8 elements per 16-byte load.
template <typename W>
__device__ void gemv16_impl(const W* w, const float* x, float* y, int in, int out) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= out) return;  // whole warps leave together
    const W* wr = w + (size_t)row * in;
    float acc = 0.0f;
    if ((in & 7) == 0 && aligned16(w, x)) {
        for (int i = lane * 8; i < in; i += 32 * 8) {
            float f[8];
            unpack8(vec_load<uint4>(wr + i), wr, f);
            float4 x0 = vec_load<float4>(x + i);
            float4 x1 = vec_load<float4>(x + i + 4);
            acc += f[0] * x0.x + f[1] * x0.y + f[2] * x0.z + f[3] * x0.w;
            acc += f[4] * x1.x + f[5] * x1.y + f[6] * x1.z + f[7] * x1.w;
        }
    } else {
        for (int i = lane; i < in; i += 32) acc += to_f32(wr[i]) * x[i];
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}

extern "C" __global__ void phi3_gemv_bf16(const bf16* w, const float* x, float* y, int in,
                                          int out) {
    gemv16_impl(w, x, y, in, out);
}
extern "C" __global__ void phi3_gemv_f16(const f16* w, const float* x, float* y, int in, int out) {
    gemv16_impl(w, x, y, in, out);
}

// f32 weights: 4 elements per 16-byte load.
extern "C" __global__ void phi3_gemv_f32(const float* w, const float* x, float* y, int in,
                                         int out) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= out) return;
    const float* wr = w + (size_t)row * in;
    float acc = 0.0f;
    if ((in & 3) == 0 && aligned16(w, x)) {
        for (int i = lane * 4; i < in; i += 32 * 4) {
            float4 a = vec_load<float4>(wr + i);
            float4 b = vec_load<float4>(x + i);
            acc += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        }
    } else {
        for (int i = lane; i < in; i += 32) acc += wr[i] * x[i];
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}
