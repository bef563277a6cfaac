// kv_blocks.cu: whole-block copies inside the paged KV cache (copy-on-write of blocks shared by
// forked sequences).
//
// phi3_copy_kv_blocks: for each pair p, block pairs[2p + 1] becomes a copy of block pairs[2p].
//   slabs [n_slabs] u64, blocks_per_slab, block_len: the KV pool (layout in common.cuh);
//   pairs [n_pairs, 2] u32: (source, destination) block ids. The pairs of one launch run
//   concurrently, so no destination may be another pair's source or destination (the Rust side
//   launches dependent pairs one at a time).
// Blocks are copied as raw bits in 16-byte units: block_len is a multiple of 32 values (64 bytes)
// and slabs start at least 16-byte aligned (cuMemAlloc: 256 bytes; cuMemAllocAsync: at least 16),
// so every block starts 16-byte aligned.
// Launch: grid (n_pairs, chunks), block 256; the blocks of one pair share its block_len / 8 units
// in a stride loop. Rust launcher: ops.rs (copy_kv_blocks).
#include "common.cuh"

extern "C" __global__ void phi3_copy_kv_blocks(const unsigned long long* slabs,
                                               const unsigned int* pairs, int blocks_per_slab,
                                               int block_len) {
    const unsigned int src = pairs[2 * blockIdx.x], dst = pairs[2 * blockIdx.x + 1];
    const uint4* s = reinterpret_cast<const uint4*>(kv_block(slabs, blocks_per_slab, block_len, src));
    uint4* d = reinterpret_cast<uint4*>(kv_block(slabs, blocks_per_slab, block_len, dst));
    const int units = block_len / 8;
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < units; i += gridDim.y * blockDim.x) {
        vec_store(d + i, vec_load<uint4>(s + i));
    }
}
