// emulated_cublas.cpp: the part of cuBLAS (libcublas.so.13) that backend/cuda calls, for the
// emulated driver (emulated_driver.cpp; scripts/emulated-gpu-check): handles bound to a stream and
// cublasGemmEx over bf16, f16 and f32 with f32 output. The product is issued on the handle's
// stream like a kernel (so a capture records it), summed in double; every operand range must lie
// inside one live device allocation. As cuBLAS, C is not read when beta is 0.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "emulated_driver.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {
constexpr int SUCCESS = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15;
constexpr int R_32F = 0, R_16F = 2, R_16BF = 14;
constexpr int OP_N = 0, OP_T = 1;

struct Handle { void* stream = nullptr; };

int element_size(int type) { return type == R_32F ? 4 : (type == R_16F || type == R_16BF) ? 2 : 0; }

double load(const void* base, int type, size_t i) {
    if (type == R_32F) {
        float v;
        std::memcpy(&v, static_cast<const char*>(base) + 4 * i, 4);
        return v;
    }
    const char* p = static_cast<const char*>(base) + 2 * i;
    if (type == R_16F) {
        _Float16 h;
        std::memcpy(&h, p, 2);
        return (double)h;
    }
    unsigned short bits;
    std::memcpy(&bits, p, 2);
    const unsigned int u = (unsigned int)bits << 16;
    float v;
    std::memcpy(&v, &u, 4);
    return v;
}
}  // namespace

EXPORT int cublasCreate_v2(void** handle) {
    *handle = new Handle;
    return SUCCESS;
}
EXPORT int cublasDestroy_v2(void* handle) {
    delete static_cast<Handle*>(handle);
    return SUCCESS;
}
EXPORT int cublasSetStream_v2(void* handle, void* stream) {
    static_cast<Handle*>(handle)->stream = stream;
    return SUCCESS;
}

// Column-major C [m x n] = alpha op(A) [m x k] op(B) [k x n] + beta C.
EXPORT int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha,
                        const void* a, int atype, int lda, const void* b, int btype, int ldb,
                        const void* beta, void* c, int ctype, int ldc, int compute, int) {
    if (compute != 68 && compute != 77) return NOT_SUPPORTED;  // CUBLAS_COMPUTE_32F(_FAST_TF32)
    if (ctype != R_32F || element_size(atype) == 0 || element_size(btype) == 0) return NOT_SUPPORTED;
    if (m < 0 || n < 0 || k < 0 || (transa != OP_N && transa != OP_T) || (transb != OP_N && transb != OP_T))
        return INVALID_VALUE;
    const int a_rows = transa == OP_N ? m : k, a_cols = transa == OP_N ? k : m;
    const int b_rows = transb == OP_N ? k : n, b_cols = transb == OP_N ? n : k;
    if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1))
        return INVALID_VALUE;
    if (m == 0 || n == 0) return SUCCESS;
    float al, be;
    std::memcpy(&al, alpha, 4);  // host pointer mode (cudarc's default)
    std::memcpy(&be, beta, 4);
    const std::string what = "cublasGemmEx m=" + std::to_string(m) + " n=" + std::to_string(n) +
                             " k=" + std::to_string(k);
    if (k > 0) {
        phi3_emulated_check(a, ((size_t)(a_cols - 1) * lda + a_rows) * element_size(atype), (what + " A").c_str());
        phi3_emulated_check(b, ((size_t)(b_cols - 1) * ldb + b_rows) * element_size(btype), (what + " B").c_str());
    }
    phi3_emulated_check(c, ((size_t)(n - 1) * ldc + m) * 4, (what + " C").c_str());
    phi3_emulated_issue(static_cast<Handle*>(handle)->stream, what.c_str(), [=] {
        // op(A) by rows and op(B) by columns, as floats (every input type converts exactly), so
        // each output is a dot product of two contiguous vectors.
        std::vector<float> ar((size_t)m * k), bc((size_t)n * k);
        for (int i = 0; i < m; ++i)
            for (int l = 0; l < k; ++l)
                ar[(size_t)i * k + l] = (float)load(a, atype, transa == OP_N ? (size_t)l * lda + i : (size_t)i * lda + l);
        for (int j = 0; j < n; ++j)
            for (int l = 0; l < k; ++l)
                bc[(size_t)j * k + l] = (float)load(b, btype, transb == OP_N ? (size_t)j * ldb + l : (size_t)l * ldb + j);
        float* out = static_cast<float*>(c);
        for (int j = 0; j < n; ++j) {
            const float* bj = &bc[(size_t)j * k];
            for (int i = 0; i < m; ++i) {
                const float* ai = &ar[(size_t)i * k];
                double sum = 0;
                for (int l = 0; l < k; ++l) sum += (double)ai[l] * bj[l];
                float& y = out[(size_t)j * ldc + i];
                y = be == 0.0f ? (float)(al * sum) : (float)(al * sum + (double)be * y);
            }
        }
    });
    return SUCCESS;
}
