// swiglu.cu: the Phi-3 MLP activation (HF Phi3MLP): out = up * silu(gate).
//
// phi3_swiglu: gate_up [rows, 2 * ffn] f32 (gate columns first, then up) -> out [rows, ffn] f32.
// silu(g) = g / (1 + exp(-g)) with the accurate expf (swiglu_f32 of common.cuh, which the decode
// GEMM's fused staging shares).
// Launch: grid-stride over rows * ffn elements, block 256. Rust launcher: ops.rs (swiglu).
#include "common.cuh"

extern "C" __global__ void phi3_swiglu(const float* gate_up, float* out, unsigned long long n,
                                       int ffn) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long r = i / ffn, c = i % ffn;
        out[i] = swiglu_f32(gate_up[r * 2 * ffn + c], gate_up[r * 2 * ffn + ffn + c]);
    }
}
