// dummy.cu: random ("dummy") weights generated on the device, for benchmarks at full model shapes
// with no files and no host copy.
//
// phi3_fill_dummy_<dtype>: out[i] = center + half_width * u(seed, tensor, i), u uniform in
//   [-1, 1) from a SplitMix64 hash of (seed, tensor index, element index); out [n] in the
//   weight's dtype. The same function is written in Rust (backend/cuda/upload.rs,
//   `dummy_value`), with the same roundings (no contraction to FMA), so checks can compare
//   bit for bit. Values differ from the CPU backend's dummy weights (loader::dummy draws one
//   sequential stream), which cannot be generated in parallel.
// phi3_fill_random_u8: out[i] = 8 bits of the same hash (r >> 56); the values of dummy int8 and
//   int4 weights (benchmarks only: every bit pattern is a valid int8 or pair of int4 levels).
// Launch: grid-stride loop, block 256. Rust launcher: ops.rs (fill_dummy).
#include "common.cuh"

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <typename W>
__device__ void fill_dummy_impl(W* out, unsigned long long n, unsigned long long seed,
                                unsigned long long tensor, float center, float half_width) {
    const unsigned long long key = splitmix64(seed ^ splitmix64(tensor));
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long r = splitmix64(key + i);
        const float u = (float)(r >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;  // exact
        // Rounded as the Rust twin rounds it (no FMA contraction), so the values match bit for
        // bit (kernels/host-check and gpu-check compare them).
        out[i] = from_f32<W>(__fadd_rn(center, __fmul_rn(half_width, u)));
    }
}

extern "C" __global__ void phi3_fill_dummy_bf16(bf16* out, unsigned long long n,
                                                unsigned long long seed,
                                                unsigned long long tensor, float center,
                                                float half_width) {
    fill_dummy_impl(out, n, seed, tensor, center, half_width);
}
extern "C" __global__ void phi3_fill_dummy_f16(f16* out, unsigned long long n,
                                               unsigned long long seed, unsigned long long tensor,
                                               float center, float half_width) {
    fill_dummy_impl(out, n, seed, tensor, center, half_width);
}
extern "C" __global__ void phi3_fill_dummy_f32(float* out, unsigned long long n,
                                               unsigned long long seed,
                                               unsigned long long tensor, float center,
                                               float half_width) {
    fill_dummy_impl(out, n, seed, tensor, center, half_width);
}
extern "C" __global__ void phi3_fill_random_u8(unsigned char* out, unsigned long long n,
                                               unsigned long long seed,
                                               unsigned long long tensor) {
    const unsigned long long key = splitmix64(seed ^ splitmix64(tensor));
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        out[i] = (unsigned char)(splitmix64(key + i) >> 56);
    }
}
