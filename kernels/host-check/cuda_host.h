// cuda_host.h: just enough of CUDA for a host C++ compiler to run kernels/gemv_quant.cu,
// kernels/dequant.cu, kernels/rope_kv.cu, kernels/attention.cu, kernels/attention_tc.cu,
// kernels/kv_blocks.cu, kernels/decode_gemm.cu, kernels/swiglu.cu, kernels/gemv.cu,
// kernels/rms_norm.cu and kernels/embed.cu unchanged
// (with PHI3_HOST_EMULATION, which swaps the PTX asm statements of common.cuh and the quantized
// kernels for plain C++). Each CUDA thread of a block is a fiber (ucontext) on the one host
// thread, run until it waits at a barrier, then the next: the 32 lanes of a warp meet at a barrier
// in __shfl_xor_sync, mma and ldmatrix, the threads of a block at one in __syncthreads; a barrier
// that can never complete aborts. `__shared__` variables are function statics (blocks run one at a
// time, so a static is the one block's shared memory). Used by kernels/host-check/main.cpp (run by
// scripts/nvrtc-check) and by emulated_driver.cpp (scripts/emulated-gpu-check).
// This checks indexing and arithmetic of the kernels on a machine without a GPU, and the alignment
// of their vector accesses (vec_load / vec_store, cp.async, ldmatrix: a misaligned one aborts, as
// it would fault on a GPU); it says nothing about speed, memory ordering beyond the barriers, or
// the PTX paths.
#pragma once
#define PHI3_HOST_EMULATION 1

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <utility>
#include <memory>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3h { unsigned int x = 1, y = 1, z = 1; };
inline dim3h threadIdx, blockIdx;  // of the running fiber (set at each switch)
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

// Atomics, fences and cache-hinted loads: fibers switch only at barriers, so plain memory
// operations are atomic and ordered here.
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    const unsigned int o = *p;
    *p = o + v;
    return o;
}
inline unsigned int atomicExch(unsigned int* p, unsigned int v) {
    const unsigned int o = *p;
    *p = v;
    return o;
}
inline void __threadfence() {}
template <typename T> inline T __ldcg(const T* p) { return *p; }
// The IEEE operations without contraction (the host compiler is run without -ffast-math and
// with -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

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
// f32 -> f16, round to nearest even (cvt.rn.f16.f32): overflow to inf, subnormals below 2^-14.
inline unsigned short phi3_host_f32_to_f16(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    const unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    const unsigned int a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00u;  // 65520 and above round to inf
    if (a < 0x38800000u) {                        // below 2^-14: multiples of 2^-24
        float v;
        std::memcpy(&v, &a, 4);
        return sign | (unsigned short)std::nearbyint(std::ldexp(v, 24));
    }
    const unsigned int r = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits
    return sign | (unsigned short)((r - (112u << 23)) >> 13);
}

// Fiber contexts. On x86-64, phi3_switch saves the callee-saved registers and the stack pointer of
// one fiber and loads another's (glibc's swapcontext also saves the signal mask, a system call at
// every switch, which made the check several times slower); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void phi3_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl phi3_switch
    .type phi3_switch, @function
phi3_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size phi3_switch, .-phi3_switch
)");
struct Phi3Context { void* sp = nullptr; };
// A context that starts `entry` (which must never return) on `stack`: six zero registers for
// phi3_switch to pop, then entry as its return address, at a stack pointer that is 8 mod 16 on
// entry, as after a call.
inline void phi3_context_start(Phi3Context& c, char* stack, size_t size, void (*entry)()) {
    void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15});
    *--sp = nullptr;                         // entry's own return address, never used
    *--sp = reinterpret_cast<void*>(entry);  // where phi3_switch returns
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    c.sp = sp;
}
inline void phi3_context_switch(Phi3Context& from, Phi3Context& to) { phi3_switch(&from.sp, to.sp); }
#else
struct Phi3Context { ucontext_t uc; };
inline void phi3_context_start(Phi3Context& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
inline void phi3_context_switch(Phi3Context& from, Phi3Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// A barrier of fibers: the last of `count` to arrive completes it; the others yield to the
// scheduler until it is complete.
struct Phi3Barrier {
    int count = 0, arrived = 0;
    unsigned long long generation = 0;
    void arrive_and_wait();
};

// A misaligned vector access faults on a GPU (a sticky error that ends the context) and passes
// silently on x86, so the emulated PTX accesses check their alignment and abort.
inline void phi3_host_require_aligned(const void* p, size_t bytes, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
        std::fprintf(stderr, "host-check: %s %p is not %zu-byte aligned\n", what, p, bytes);
        std::abort();
    }
}

// What the lanes of a warp exchange in one shuffle, mma or ldmatrix.
struct WarpSlots {
    float slot[32];                           // each lane's shuffled value
    unsigned int mma_a[32][4], mma_b[32][2];  // each lane's mma.m16n8k16 operands
    const unsigned short* rows[32];           // each lane's ldmatrix row address
    // The mma's operands as numbers, decoded once by the first lane past the barrier.
    bool mma_decoded;
    double mma_a_val[16][16], mma_b_val[16][8];
};

// The exchange of one warp: each lane writes its part, all meet at the barrier, each reads what it
// needs. Exchanges alternate between two sets of slots, so one barrier each is enough: a lane
// writes a set again only after the next exchange's barrier, which every lane reaches after
// reading that set.
struct WarpExchange {
    Phi3Barrier bar{32};
    WarpSlots sets[2];
};

// cp.async of 16 bytes: the copy is only recorded; cp.async.commit_group closes this thread's open
// group, and cp.async.wait_group n performs every committed group but the newest n (the PTX
// guarantee: a copy is complete after a wait that covers its group, and not visible to be relied
// on before). A kernel that reads shared memory before the matching wait reads the old contents.
struct Phi3HostCopy { void* dst; const void* src; };

// One CUDA thread: its context and stack, index, warp and cp.async groups.
struct Phi3Fiber {
    Phi3Context ctx;
    std::unique_ptr<char[]> stack;
    dim3h thread;
    WarpExchange* warp = nullptr;
    unsigned int exchanges = 0;  // of this lane's warp so far: which set of slots is next
    bool done = false;
    std::vector<Phi3HostCopy> open_copies;
    std::vector<std::vector<Phi3HostCopy>> copy_groups;
};
inline Phi3Fiber* phi3_fiber = nullptr;  // the running one
inline Phi3Context phi3_scheduler;
// Barrier arrivals and finished fibers so far: a round of the scheduler that adds none is a
// deadlock.
inline unsigned long long phi3_progress = 0;

inline void Phi3Barrier::arrive_and_wait() {
    ++phi3_progress;
    const unsigned long long gen = generation;
    if (++arrived == count) {
        arrived = 0;
        ++generation;
        return;
    }
    while (generation == gen) phi3_context_switch(phi3_fiber->ctx, phi3_scheduler);
}

// The running lane's set of slots for its next warp exchange.
inline WarpSlots& phi3_next_slots() {
    return phi3_fiber->warp->sets[phi3_fiber->exchanges++ & 1];
}
inline void phi3_warp_barrier() { phi3_fiber->warp->bar.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned int, float v, int o) {
    const int lane = threadIdx.x & 31;
    WarpSlots& x = phi3_next_slots();
    x.slot[lane] = v;
    phi3_warp_barrier();
    return x.slot[lane ^ o];
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
    WarpSlots& x = phi3_next_slots();
    for (int i = 0; i < 4; ++i) x.mma_a[lane][i] = a[i];
    for (int i = 0; i < 2; ++i) x.mma_b[lane][i] = b[i];
    x.mma_decoded = false;
    phi3_warp_barrier();
    if (!x.mma_decoded) {
        auto value = [f16](unsigned int reg, int half) {
            const unsigned short bits = (unsigned short)(half ? reg >> 16 : reg & 0xffffu);
            return f16 ? (double)phi3_host_f16_to_f32(bits) : (double)__uint_as_float((unsigned int)bits << 16);
        };
        for (int r = 0; r < 16; ++r)
            for (int k = 0; k < 16; ++k)
                x.mma_a_val[r][k] = value(x.mma_a[4 * (r & 7) + ((k & 7) >> 1)][(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
        for (int k = 0; k < 16; ++k)
            for (int n = 0; n < 8; ++n)
                x.mma_b_val[k][n] = value(x.mma_b[4 * n + ((k & 7) >> 1)][k >= 8 ? 1 : 0], k & 1);
        x.mma_decoded = true;
    }
    const int g = lane >> 2, t = lane & 3;
    float out[4];
    for (int e = 0; e < 4; ++e) {
        const int r = g + (e >= 2 ? 8 : 0), n = 2 * t + (e & 1);
        double sum = d[e];
        for (int k = 0; k < 16; ++k) sum += x.mma_a_val[r][k] * x.mma_b_val[k][n];
        out[e] = (float)sum;
    }
    for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (PTX ISA, "Warp-level matrix load
// instruction: ldmatrix"): lanes 8j .. 8j + 7 give the addresses of rows 0..7 of matrix j; lane l
// receives, in r[j], matrix j's row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (the first in the low
// half), or with trans column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1.
inline void phi3_host_ldmatrix_x4(bool trans, unsigned int* r, const unsigned short* row) {
    phi3_host_require_aligned(row, 16, "ldmatrix row address");
    const int lane = threadIdx.x & 31;
    WarpSlots& x = phi3_next_slots();
    x.rows[lane] = row;
    phi3_warp_barrier();
    const int q = lane >> 2, c = 2 * (lane & 3);
    for (int j = 0; j < 4; ++j) {
        const unsigned short* const* m = &x.rows[8 * j];
        const unsigned int lo = trans ? m[c][q] : m[q][c];
        const unsigned int hi = trans ? m[c + 1][q] : m[q][c + 1];
        r[j] = lo | (hi << 16);
    }
}

// cp.async (see Phi3HostCopy). Both addresses must be 16-byte aligned.
inline void phi3_host_copy16(void* dst, const void* src) {
    phi3_host_require_aligned(dst, 16, "cp.async shared address");
    phi3_host_require_aligned(src, 16, "cp.async global address");
    phi3_fiber->open_copies.push_back({dst, src});
}
inline void phi3_host_cp_async_commit() {
    phi3_fiber->copy_groups.push_back(std::move(phi3_fiber->open_copies));
    phi3_fiber->open_copies.clear();
}
inline void phi3_host_cp_async_wait(int n) {
    auto& groups = phi3_fiber->copy_groups;
    while ((int)groups.size() > n) {
        for (auto& c : groups.front()) std::memcpy(c.dst, c.src, 16);
        groups.erase(groups.begin());
    }
}

// The dynamic shared memory of the block being run (see launch), filled with 0xff bytes (bf16 and
// f32 NaN) before each block, so a read of what the block never wrote shows. It ends (rounded up
// to 16 bytes) at an inaccessible page, so an access past the launch's size faults.
inline unsigned char* phi3_host_dynamic_smem = nullptr;
inline unsigned char* phi3_host_smem_for(size_t smem) {
    static unsigned char* map = nullptr;
    static size_t map_len = 0, page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t body = (smem + 15) / 16 * 16, body_pages = (body + page - 1) / page * page;
    if (map_len != body_pages + page) {
        if (map) munmap(map, map_len);
        map_len = body_pages + page;
        void* m = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "host-check: no memory for %zu bytes of shared memory\n", smem);
            std::abort();
        }
        map = static_cast<unsigned char*>(m);
        mprotect(map + body_pages, page, PROT_NONE);
    }
    unsigned char* p = map + body_pages - body;
    std::memset(p, 0xff, body);
    return p;
}

// The barrier of the block being run.
inline Phi3Barrier* phi3_block_barrier = nullptr;
inline void __syncthreads() { phi3_block_barrier->arrive_and_wait(); }

// Draws each block's warp speeds (see launch); fixed seed, so a run is reproducible.
inline unsigned long long phi3_schedule_rng() {
    static unsigned long long x = 0x9e3779b97f4a7c15ull;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

// Bytes of each fiber's stack.
constexpr size_t PHI3_FIBER_STACK = 128 << 10;
inline const std::function<void()>* phi3_kernel = nullptr;
[[noreturn]] inline void phi3_fiber_main() {
    (*phi3_kernel)();
    ++phi3_progress;
    phi3_fiber->done = true;
    phi3_context_switch(phi3_fiber->ctx, phi3_scheduler);  // never resumed
    std::abort();
}

// Run `kernel` over grid (x, y, z) x block (1-D) with `smem` bytes of dynamic shared memory, one
// block at a time in a shuffled order, its threads as fibers taking turns at barriers.
inline void launch(dim3h grid, unsigned int block, size_t smem, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = dim3h{block, 1, 1};
    phi3_kernel = &kernel;
    std::vector<Phi3Fiber> fibers(block);
    for (auto& f : fibers) f.stack.reset(new char[PHI3_FIBER_STACK]);
    // Blocks run in a shuffled order (seeded), as a GPU gives no order: a kernel whose blocks
    // depend on one another's order (which of several is the last to finish) shows it.
    std::vector<dim3h> blocks;
    for (unsigned int bz = 0; bz < grid.z; ++bz)
        for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx) blocks.push_back(dim3h{bx, by, bz});
    for (size_t i = blocks.size(); i > 1; --i) {
        std::swap(blocks[i - 1], blocks[phi3_schedule_rng() % i]);
    }
    for (const dim3h& b : blocks) {
        const unsigned int bx = b.x, by = b.y, bz = b.z;
        {
            phi3_host_dynamic_smem = phi3_host_smem_for(smem);
            std::vector<std::unique_ptr<WarpExchange>> warps;
            for (unsigned int w = 0; w < (block + 31) / 32; ++w) warps.emplace_back(new WarpExchange);
            Phi3Barrier block_bar{(int)block};
            phi3_block_barrier = &block_bar;
            blockIdx = dim3h{bx, by, bz};
            for (unsigned int t = 0; t < block; ++t) {
                Phi3Fiber& f = fibers[t];
                f.thread = dim3h{t, 0, 0};
                f.warp = warps[t / 32].get();
                f.done = false;
                f.exchanges = 0;
                phi3_context_start(f.ctx, f.stack.get(), PHI3_FIBER_STACK, phi3_fiber_main);
            }
            // Warps run at different speeds: warp w only in the rounds that are multiples of
            // period[w] (1 to 3, drawn per block), so warps drift apart between block barriers and
            // a missing __syncthreads lets one read shared memory before another wrote it (or
            // overwrite it before another read it), as on a GPU.
            std::vector<unsigned> period(warps.size());
            for (auto& p : period) p = 1 + (unsigned)(phi3_schedule_rng() % 3);
            unsigned long long before = phi3_progress;
            for (unsigned long long round = 1, running = 1; running; ++round) {
                running = 0;
                for (auto& f : fibers) {
                    if (f.done) continue;
                    running = 1;
                    if (round % period[f.thread.x / 32] != 0) continue;
                    phi3_fiber = &f;
                    threadIdx = f.thread;
                    phi3_context_switch(phi3_scheduler, f.ctx);
                }
                if (round % 6 != 0) continue;  // every warp has had a turn since the last check
                if (running && phi3_progress == before) {
                    std::fprintf(stderr, "host-check: block (%u, %u, %u) waits at a barrier some of "
                                 "its threads never reach\n", bx, by, bz);
                    std::abort();
                }
                before = phi3_progress;
            }
            for (auto& f : fibers) {
                if (!f.open_copies.empty() || !f.copy_groups.empty()) {
                    std::fprintf(stderr, "host-check: a thread ended with cp.async copies pending\n");
                    std::abort();
                }
            }
        }
    }
}

inline void launch(dim3h grid, unsigned int block, const std::function<void()>& kernel) {
    launch(grid, block, 0, kernel);
}

inline void launch(unsigned int grid, unsigned int block, const std::function<void()>& kernel) {
    launch(dim3h{grid, 1, 1}, block, 0, kernel);
}
