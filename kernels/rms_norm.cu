// rms_norm.cu: residual add fused with RMSNorm (HF Phi3RMSNorm).
//
// phi3_rms_norm: for each row r: residual[r] += delta[r] (when delta is not NULL), then
//   out[r] = weight * residual[r] / sqrt(mean(residual[r]^2) + eps).
// residual [rows, cols] f32 (updated in place), delta [rows, cols] f32 or NULL, weight [cols] f32
// (norm weights are widened to f32 at upload), out [rows, cols] f32.
// The mean of squares is accumulated in f32 per thread, then reduced across the block (the CPU
// reference accumulates in f64; the difference is ~1e-7 relative for cols <= 8192).
// Launch: grid (rows), block 256. Rust launcher: ops.rs (rms_norm).
#include "common.cuh"

extern "C" __global__ void phi3_rms_norm(float* residual, const float* delta, const float* weight,
                                         float* out, int cols, float eps) {
    __shared__ float scratch[32];
    float* x = residual + (size_t)blockIdx.x * cols;
    const float* d = delta ? delta + (size_t)blockIdx.x * cols : 0;
    float* y = out + (size_t)blockIdx.x * cols;
    float sum_sq = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = x[c];
        if (d) {
            v += d[c];
            x[c] = v;  // each element is written and re-read by the same thread
        }
        sum_sq += v * v;
    }
    sum_sq = block_sum(sum_sq, scratch);
    float inv_rms = 1.0f / sqrtf(sum_sq / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) y[c] = weight[c] * (x[c] * inv_rms);
}
