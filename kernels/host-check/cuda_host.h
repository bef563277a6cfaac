// cuda_host.h: just enough of CUDA for a host C++ compiler to run kernels/gemv_quant.cu,
// kernels/dequant.cu, kernels/rope_kv.cu, kernels/attention.cu, kernels/kv_blocks.cu and
// kernels/decode_gemm.cu unchanged
// (with PHI3_HOST_EMULATION, which swaps the PTX asm statements of common.cuh and the quantized
// kernels for plain C++). Each CUDA thread is a std::thread; the 32 lanes of a warp meet at a
// barrier in __shfl_xor_sync, the threads of a block at a barrier in __syncthreads, and
// `__shared__` variables are function statics (blocks run one at a time, so a static is the one
// block's shared memory). Used by kernels/host-check/main.cpp (run by scripts/nvrtc-check).
// This checks indexing and arithmetic of the kernels on a machine without a GPU; it says nothing
// about speed, memory ordering beyond the barriers, or the PTX paths.
#pragma once
#define PHI3_HOST_EMULATION 1

#include <barrier>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3h { unsigned int x = 1, y = 1, z = 1; };
inline thread_local dim3h threadIdx, blockIdx;
inline dim3h blockDim, gridDim;

struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    return uint4{x, y, z, w};
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }

// PRMT default mode: result byte n = byte (s >> 4n) & 7 of the 8 bytes {x, y}.
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    const unsigned long long b = (unsigned long long)x | ((unsigned long long)y << 32);
    unsigned int r = 0;
    for (int n = 0; n < 4; ++n) r |= (unsigned int)((b >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
    return r;
}

inline float phi3_host_f16_to_f32(unsigned short h) {
    const unsigned int s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
    float v = e == 0 ? std::ldexp((float)m, -24) : e == 31 ? (m ? NAN : INFINITY)
                                                            : std::ldexp((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
}
inline unsigned short phi3_host_f32_to_f16(float) { return 0x7e00; }  // unused by these kernels

// The shuffle exchange of one warp.
struct WarpExchange {
    std::barrier<> bar{32};
    float slot[32];
    unsigned int mma_a[32][4], mma_b[32][2];  // each lane's mma.m16n8k16 operands
};
inline thread_local WarpExchange* tl_warp = nullptr;

inline float __shfl_xor_sync(unsigned int, float v, int o) {
    const int lane = threadIdx.x & 31;
    tl_warp->slot[lane] = v;
    tl_warp->bar.arrive_and_wait();
    const float r = tl_warp->slot[lane ^ o];
    tl_warp->bar.arrive_and_wait();
    return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d (16 x 8) += a (16 x 16) * b (16 x 8), from
// the fragment layout of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point
// type"): lane = 4 * groupID + threadID_in_group; A register i (two elements, the lower column in
// the low half) holds row groupID (i = 0, 2) or groupID + 8 (i = 1, 3), columns
// 2 * threadID_in_group + {0, 1} (i = 0, 1) or + 8 (i = 2, 3); B register i holds column groupID,
// rows 2 * threadID_in_group + {0, 1} (+ 8 for i = 1); d[e] is row groupID (+ 8 for e >= 2),
// column 2 * threadID_in_group + (e & 1). Products are exact; the sum is taken in double.
inline void phi3_host_mma_16816(bool f16, float* d, const unsigned int* a, const unsigned int* b) {
    const int lane = threadIdx.x & 31;
    for (int i = 0; i < 4; ++i) tl_warp->mma_a[lane][i] = a[i];
    for (int i = 0; i < 2; ++i) tl_warp->mma_b[lane][i] = b[i];
    tl_warp->bar.arrive_and_wait();
    auto value = [f16](unsigned int reg, int half) {
        const unsigned short bits = (unsigned short)(half ? reg >> 16 : reg & 0xffffu);
        return f16 ? (double)phi3_host_f16_to_f32(bits) : (double)__uint_as_float((unsigned int)bits << 16);
    };
    auto a_at = [&](int r, int k) {
        const int reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        return value(tl_warp->mma_a[4 * (r & 7) + ((k & 7) >> 1)][reg], k & 1);
    };
    auto b_at = [&](int k, int n) {
        return value(tl_warp->mma_b[4 * n + ((k & 7) >> 1)][k >= 8 ? 1 : 0], k & 1);
    };
    const int g = lane >> 2, t = lane & 3;
    float out[4];
    for (int e = 0; e < 4; ++e) {
        const int r = g + (e >= 2 ? 8 : 0), n = 2 * t + (e & 1);
        double sum = d[e];
        for (int k = 0; k < 16; ++k) sum += a_at(r, k) * b_at(k, n);
        out[e] = (float)sum;
    }
    tl_warp->bar.arrive_and_wait();  // every lane has read the operands
    for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// The barrier of the block being run.
inline thread_local std::barrier<>* tl_block = nullptr;
inline void __syncthreads() { tl_block->arrive_and_wait(); }

// Run `kernel` over grid (x, y, z) x block (1-D), one block at a time, every thread of a block at
// once.
inline void launch(dim3h grid, unsigned int block, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = dim3h{block, 1, 1};
    for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by) {
        for (unsigned int bx = 0; bx < grid.x; ++bx) {
            std::vector<std::unique_ptr<WarpExchange>> warps;
            for (unsigned int w = 0; w < (block + 31) / 32; ++w) warps.emplace_back(new WarpExchange);
            std::barrier<> block_bar((std::ptrdiff_t)block);
            std::vector<std::thread> threads;
            for (unsigned int t = 0; t < block; ++t) {
                threads.emplace_back([&, bx, by, bz, t] {
                    blockIdx = dim3h{bx, by, bz};
                    threadIdx = dim3h{t, 0, 0};
                    tl_warp = warps[t / 32].get();
                    tl_block = &block_bar;
                    kernel();
                });
            }
            for (auto& th : threads) th.join();
        }
    }
}

inline void launch(unsigned int grid, unsigned int block, const std::function<void()>& kernel) {
    launch(dim3h{grid, 1, 1}, block, kernel);
}
