// embed.cu: embedding gather and row gather.
//
// phi3_embed_<dtype>: out[r, :] = f32(table[tokens[r], :]). table [vocab, hidden] in the weight's
//   dtype, tokens [n] u32 (range-checked by the caller), out [n, hidden] f32.
// phi3_gather_rows_f32: out[r, :] = x[rows[r], :]. x [_, cols] f32, rows [n] u32, out [n, cols].
// Launch: grid (n), block 256; each block copies one row with a stride loop.
// Rust launcher: phi3-core/src/backend/cuda/ops.rs (embed, gather_rows).
#include "common.cuh"

template <typename W>
__device__ void embed_impl(const W* table, const unsigned int* tokens, float* out, int hidden) {
    const W* src = table + (size_t)tokens[blockIdx.x] * hidden;
    float* dst = out + (size_t)blockIdx.x * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = to_f32(src[c]);
}

extern "C" __global__ void phi3_embed_bf16(const bf16* table, const unsigned int* tokens,
                                           float* out, int hidden) {
    embed_impl(table, tokens, out, hidden);
}
extern "C" __global__ void phi3_embed_f16(const f16* table, const unsigned int* tokens,
                                          float* out, int hidden) {
    embed_impl(table, tokens, out, hidden);
}
extern "C" __global__ void phi3_embed_f32(const float* table, const unsigned int* tokens,
                                          float* out, int hidden) {
    embed_impl(table, tokens, out, hidden);
}

extern "C" __global__ void phi3_gather_rows_f32(const float* x, const unsigned int* rows,
                                                float* out, int cols) {
    embed_impl(x, rows, out, cols);
}
