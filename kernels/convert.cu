// convert.cu: element-type conversion of activations, and filling buffers.
//
// phi3_f32_to_bf16 / phi3_f32_to_f16: y[i] = round(x[i]), x [n] f32 -> y [n] 16-bit (the
//   activations fed to cuBLAS for bf16/f16 weights; round to nearest even).
// phi3_fill_f32 / phi3_fill_u16 / phi3_fill_u8: x[i] = value (poisoning fresh buffers with NaN in
//   checks; constant zero points of dummy int4 weights).
// Launch: grid-stride loops, block 256. Rust launchers: ops.rs (to_half, fill).
#include "common.cuh"

#define GRID_STRIDE(i, n)                                                                     \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;   \
         i < (n); i += (unsigned long long)gridDim.x * blockDim.x)

extern "C" __global__ void phi3_f32_to_bf16(const float* x, bf16* y, unsigned long long n) {
    GRID_STRIDE(i, n) y[i] = f32_to_bf16(x[i]);
}
extern "C" __global__ void phi3_f32_to_f16(const float* x, f16* y, unsigned long long n) {
    GRID_STRIDE(i, n) y[i] = f32_to_f16(x[i]);
}
extern "C" __global__ void phi3_fill_f32(float* x, unsigned long long n, float value) {
    GRID_STRIDE(i, n) x[i] = value;
}
extern "C" __global__ void phi3_fill_u16(unsigned short* x, unsigned long long n,
                                         unsigned short value) {
    GRID_STRIDE(i, n) x[i] = value;
}
extern "C" __global__ void phi3_fill_u8(unsigned char* x, unsigned long long n,
                                        unsigned char value) {
    GRID_STRIDE(i, n) x[i] = value;
}
