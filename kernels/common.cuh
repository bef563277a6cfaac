// common.cuh: helpers shared by every phi3 kernel (supplied to NVRTC as a header by
// phi3-core/src/backend/cuda/kernels.rs; the .cu files include it by name).
//
// Element types: bf16 and f16 are stored as their 16-bit patterns (struct bf16 / struct f16), so no
// CUDA header is needed under NVRTC. bf16 -> f32 is a shift; f32 -> bf16 rounds to nearest even
// (NaN stays NaN); f16 <-> f32 use the PTX cvt instructions. f32 weights are plain floats.
// PHI3_HOST_EMULATION (never under NVRTC): kernels/host-check compiles kernels with a host C++
// compiler and supplies the PTX-only pieces (cuda_host.h).
// Tensor cores (below): mma.m16n8k16, ldmatrix, cp.async and dynamic shared memory.
// Reductions: warp_sum / warp_max with shuffles, block_sum / block_max through 32 floats of shared
// memory (any blockDim.x that is a multiple of 32, up to 1024).
// Paged KV cache: kv_block / kv_row find a token's keys or values in the pool (layout below).
// swiglu_f32: the MLP activation; last_arrival: the last of several blocks reduces their partials.
#pragma once

// -inf without math.h (NVRTC compiles with no system headers).
#define PHI3_NEG_INF __int_as_float(0xff800000)

struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}
__device__ __forceinline__ float to_f32(f16 x) {
#ifdef PHI3_HOST_EMULATION  // kernels/host-check (a host compiler has no PTX)
    return phi3_host_f16_to_f32(x.bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#endif
}

__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    bf16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
        return b;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    b.bits = (unsigned short)(u >> 16);
    return b;
}
__device__ __forceinline__ f16 f32_to_f16(float f) {
    f16 h;
#ifdef PHI3_HOST_EMULATION
    h.bits = phi3_host_f32_to_f16(f);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
#endif
    return h;
}

// Conversion from f32 to any element type, for templated stores.
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return f32_to_bf16(x); }
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) { return f32_to_f16(x); }

// Vector loads and stores (8 or 16 bytes): the address must be aligned to the vector's size or
// the GPU faults, a sticky error that ends the context. The host check aborts on a misaligned one
// (x86 would accept it silently).
template <typename T> __device__ __forceinline__ T vec_load(const void* p) {
#ifdef PHI3_HOST_EMULATION
    phi3_host_require_aligned(p, sizeof(T), "vector load");
#endif
    return *reinterpret_cast<const T*>(p);
}
template <typename T> __device__ __forceinline__ void vec_store(void* p, const T& v) {
#ifdef PHI3_HOST_EMULATION
    phi3_host_require_aligned(p, sizeof(T), "vector store");
#endif
    *reinterpret_cast<T*>(p) = v;
}

// Whether both pointers are 16-byte aligned (16-byte vector loads need it).
__device__ __forceinline__ bool aligned16(const void* a, const void* b) {
    return ((reinterpret_cast<unsigned long long>(a) | reinterpret_cast<unsigned long long>(b)) &
            15ull) == 0;
}

// The 8 bf16 values of one 16-byte load, in memory order, as f32.
__device__ __forceinline__ void bf16x8_to_f32(uint4 p, float* f) {
    const unsigned int w[4] = {p.x, p.y, p.z, p.w};
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = __uint_as_float(w[k] << 16);
        f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum of `v` over the block, returned to every thread. `scratch`: 32 floats of shared memory.
// Every thread of the block must call it (it synchronises).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Maximum of `v` over the block, returned to every thread (see block_sum).
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : PHI3_NEG_INF;
    return warp_max(v);
}

// silu(g) * u (HF Phi3MLP: up * silu(gate)) with the accurate expf, each operation rounded on
// its own (no contraction into an fma), so phi3_swiglu and the decode GEMM's fused staging
// (decode_gemm.cu) compute the same f32 value.
__device__ __forceinline__ float swiglu_f32(float g, float u) {
    return __fmul_rn(u, __fdiv_rn(g, __fadd_rn(1.0f, expf(-g))));
}

// Serial reduction across blocks (split-K partial sums, split-key attention slices): the `n`
// blocks that write partial results of one output tile each call last_arrival once, after their
// writes, with the tile's counter (zero before the launch). It returns true in every thread of
// exactly one of them, the last to arrive, which then reads the others' partials through __ldcg
// (from L2, never a stale L1 line) and reduces them in a fixed order; it also sets the counter
// back to zero, so the next launch finds it so. Which block is last varies from run to run, so the
// reduction order must not depend on it. This replaces a second kernel launch that would only add
// up the partials. Every thread of the block must call it (it synchronises).
__device__ __forceinline__ bool last_arrival(unsigned int* counter, unsigned int n) {
    __shared__ int is_last;
    __threadfence();  // this thread's partials reach the whole device before the count does
    __syncthreads();
    if (threadIdx.x == 0) {
        is_last = atomicAdd(counter, 1u) == n - 1u;
        if (is_last) atomicExch(counter, 0u);
    }
    __syncthreads();
    const bool last = is_last != 0;
    if (last) __threadfence();
    return last;
}

// The paged KV cache (backend/cuda/mod.rs, CudaKvPool; block ids are kv_pool.rs's). A block holds
// PHI3_KV_BLOCK_TOKENS tokens of every layer: [n_layers][2: keys, values][PHI3_KV_BLOCK_TOKENS]
// [kv_dim] bf16, block_len = 2 * n_layers * PHI3_KV_BLOCK_TOKENS * kv_dim values. Blocks live in
// slabs (separate allocations) of blocks_per_slab blocks; slabs[s] is the device address of slab s,
// so block b starts at slabs[b / blocks_per_slab] + (b % blocks_per_slab) * block_len. A sequence's
// block table lists its blocks in position order: position p is token p % PHI3_KV_BLOCK_TOKENS of
// block table[p / PHI3_KV_BLOCK_TOKENS]. Must equal backend::KV_BLOCK_TOKENS (a test checks).
#define PHI3_KV_BLOCK_TOKENS 16

// row_split entries of the batch descriptor (kv.rs) other than a first split slot: a decode row
// whose keys are not split, and a prefill row (its sequence adds more than GEMV_SPAN rows; never
// split, and left to phi3_attention_prefill in attention_tc.cu when that kernel runs).
#define ATT_NO_SPLIT 0xffffffffu
#define ATT_PREFILL 0xfffffffeu

// The keys lo..hi that block `split` (blockIdx.z) of a decode or unsplit row at position `pos`
// takes: all of first..pos in split 0 for a row not split (slot0 ATT_NO_SPLIT or ATT_PREFILL),
// first = max(0, pos + 1 - window) when window > 0, else 0; for a split row (slot0 its first
// slot) slice `split` of split_keys positions, cut to first..pos (lo > hi: a slice wholly
// outside the window). False when the block has no slice: it leaves (before any barrier).
__device__ __forceinline__ bool att_block_keys(unsigned int slot0, int split, int pos, int window,
                                               int split_keys, int* lo, int* hi) {
    const int first = window > 0 ? max(0, pos + 1 - window) : 0;
    if (slot0 >= ATT_PREFILL) {
        *lo = first;
        *hi = pos;
        return split == 0;
    }
    const int s_lo = split * split_keys;
    *lo = max(first, s_lo);
    *hi = min(pos, s_lo + split_keys - 1);
    return s_lo <= pos;
}

// Split decode rows (see att_block_keys): the block that finishes a row's slices last (blocks
// (row, y, 0..n_s - 1) call last_arrival on tickets[row * gridDim.y + y]) merges them for the
// query heads h0..h0 + n_h - 1 (n_h <= 16) that its blocks computed:
// out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), M = max_s m_s, slices added in order
// (a row's slice count depends on its position only, so its result does not depend on its
// batch). `part` holds [split_slots][n_heads][head_dim] accumulators, then [split_slots][n_heads]
// (max, sum) pairs; an empty slice (-inf, 0) adds 0 * e^-inf = 0.
__device__ __forceinline__ void att_merge_slices(const float* part, float* out, unsigned int slot0,
                                                 int n_s, int row, int h0, int n_h, int n_heads,
                                                 int head_dim, int split_slots) {
    __shared__ float merge_m[16], merge_l[16];
    const float* ml = part + (size_t)split_slots * n_heads * head_dim;
    if ((int)threadIdx.x < n_h) {
        const int h = h0 + (int)threadIdx.x;
        float mx = PHI3_NEG_INF;
        for (int s = 0; s < n_s; ++s) {
            mx = fmaxf(mx, __ldcg(ml + 2 * ((size_t)(slot0 + s) * n_heads + h)));
        }
        float sum = 0.0f;
        for (int s = 0; s < n_s; ++s) {
            const size_t at = (size_t)(slot0 + s) * n_heads + h;
            sum += __ldcg(ml + 2 * at + 1) * expf(__ldcg(ml + 2 * at) - mx);
        }
        merge_m[threadIdx.x] = mx;
        merge_l[threadIdx.x] = sum;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n_h * head_dim; i += blockDim.x) {
        const int r = i / head_dim, d = i - r * head_dim, h = h0 + r;
        float acc = 0.0f;
        for (int s = 0; s < n_s; ++s) {
            const size_t at = (size_t)(slot0 + s) * n_heads + h;
            acc += __ldcg(part + at * head_dim + d) * expf(__ldcg(ml + 2 * at) - merge_m[r]);
        }
        out[(size_t)row * n_heads * head_dim + (size_t)h * head_dim + d] = acc / merge_l[r];
    }
}

__device__ __forceinline__ bf16* kv_block(const unsigned long long* slabs, int blocks_per_slab,
                                          int block_len, unsigned int b) {
    return reinterpret_cast<bf16*>(slabs[b / blocks_per_slab]) +
           (size_t)(b % blocks_per_slab) * block_len;
}

// The kv_dim values of token t (< PHI3_KV_BLOCK_TOKENS) of `block`: keys of `layer` when which = 0,
// values when which = 1.
__device__ __forceinline__ bf16* kv_row(bf16* block, int layer, int which, int t, int kv_dim) {
    return block + ((size_t)(2 * layer + which) * PHI3_KV_BLOCK_TOKENS + t) * kv_dim;
}

// Tensor cores and asynchronous copies (sm_80 and newer; every architecture the backend compiles
// for). Under PHI3_HOST_EMULATION (kernels/host-check) each is emulated from its PTX description in
// cuda_host.h.
//
// mma_16816<F16>: d (16 x 8, f32) += a (16 x 16, row-major fragment) * b (16 x 8, column fragment)
// in f16 (F16) or bf16, one mma.sync.aligned.m16n8k16 of the warp. Fragment layout (PTX ISA,
// "Matrix Fragments for mma.m16n8k16"): lane = 4 * g + t; a register i holds row g (i = 0, 2) or
// g + 8 (i = 1, 3), columns 2t, 2t + 1 (i = 0, 1) or 2t + 8, 2t + 9 (i = 2, 3), the lower column
// in the low half; b register i holds column g, rows 2t, 2t + 1 (+ 8 for i = 1); d[e] is row g
// (+ 8 for e >= 2), column 2t + (e & 1).
template <bool F16>
__device__ __forceinline__ void mma_16816(float* d, const unsigned int* a, const unsigned int* b) {
#ifdef PHI3_HOST_EMULATION
    phi3_host_mma_16816(F16, d, a, b);
#else
    if (F16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#endif
}

#ifndef PHI3_HOST_EMULATION
// The shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned int smem_u32(const void* p) {
    unsigned int a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
#endif

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: four 8 x 8 matrices of 16-bit values from
// shared memory; lane l gives the address of row l % 8 of matrix l / 8 (16 bytes, 16-byte
// aligned). r[j] of lane l holds matrix j's elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1);
// with TRANS, (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4) (the first in the low half).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(unsigned int* r, const unsigned short* row) {
#ifdef PHI3_HOST_EMULATION
    phi3_host_ldmatrix_x4(TRANS, r, row);
#else
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_u32(row)));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_u32(row)));
    }
#endif
}

// Two f32 as bf16 (round to nearest even) in one register, `lo` in the low half.
__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
#ifdef PHI3_HOST_EMULATION
    return (unsigned int)f32_to_bf16(lo).bits | ((unsigned int)f32_to_bf16(hi).bits << 16);
#else
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

// 16 bytes from global to shared memory without passing through registers (cp.async.cg); a group
// of them is committed with cp_async_commit, and cp_async_wait<n> waits until at most n groups of
// this thread are in flight. Other threads see the data after a __syncthreads that follows the
// wait.
__device__ __forceinline__ void cp_async16(void* smem, const void* global) {
#ifdef PHI3_HOST_EMULATION
    phi3_host_copy16(smem, global);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(smem)), "l"(global));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef PHI3_HOST_EMULATION
    phi3_host_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;");
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#ifdef PHI3_HOST_EMULATION
    phi3_host_cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
#endif
}

// Dynamic shared memory of `type` named `name` (the launch's shared_mem_bytes; above 48 KiB the
// function's MAX_DYNAMIC_SHARED_SIZE_BYTES must allow it, kernels.rs sets it).
#ifdef PHI3_HOST_EMULATION
#define PHI3_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(phi3_host_dynamic_smem)
#else
#define PHI3_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif
