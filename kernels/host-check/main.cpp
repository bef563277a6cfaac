// Host run of the quantized kernels (kernels/gemv_quant.cu, kernels/dequant.cu) against a
// reference written from the layout description in phi3-core/src/loader/quant.rs (not from the
// kernels): int8 [out, in] + f32 row scales; int4 packed [out, in / 2] with column 2i in the low
// nibble of byte i, scales [out, in / group] (bf16 or f16) and zeros [out, in / group].
// Checks the GEMV (vector and scalar paths, rows that do not fill a warp's 4 or a block's 8) to
// 1e-5 of sum |x w|, and the bf16 dequantization of a block of rows bit for bit.
// Build and run: scripts/nvrtc-check (g++ -std=c++20 -pthread). Exit status 1 on any mismatch.
#include <cstdio>
#include <random>

#include "cuda_host.h"
#include "../gemv_quant.cu"
#include "../dequant.cu"

static int failures = 0;
static std::mt19937_64 rng(12345);

static float uniform(float lo, float hi) {
    return std::uniform_real_distribution<float>(lo, hi)(rng);
}
static int below(int n) { return (int)(rng() % (unsigned long long)n); }

static unsigned short bf16_bits(float f) {  // round to nearest even (finite values)
    unsigned int u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
static float bf16_value(unsigned short b) { return __uint_as_float((unsigned int)b << 16); }

static void expect(bool ok, const char* what, double got, double want) {
    if (!ok) {
        std::printf("FAIL %s: got %.9g, want %.9g\n", what, got, want);
        ++failures;
    }
}

static const int THREADS = 64, ROWS_PER_BLOCK = 8;  // ops.rs QGEMV_THREADS, QGEMV_ROWS_PER_BLOCK

static void check_gemv(const char* what, const std::vector<double>& want,
                       const std::vector<double>& mag, const std::vector<float>& y) {
    for (size_t r = 0; r < want.size(); ++r) {
        const double err = std::fabs(y[r] - want[r]) / (mag[r] + 1e-30);
        expect(err < 1e-5, what, y[r], want[r]);
    }
}

static void int4_case(int out, int in, int group, bool f16_scales, bool misaligned_x) {
    const int ng = in / group;
    std::vector<unsigned char> packed((size_t)out * in / 2), zeros((size_t)out * ng);
    std::vector<unsigned short> scales((size_t)out * ng);
    std::vector<float> sval((size_t)out * ng);
    for (auto& b : packed) b = (unsigned char)below(256);
    for (auto& z : zeros) z = (unsigned char)below(16);
    for (size_t i = 0; i < scales.size(); ++i) {
        if (f16_scales) {  // a normal f16: exponent 5..14, any mantissa
            scales[i] = (unsigned short)(((5 + below(10)) << 10) | below(1024));
            sval[i] = phi3_host_f16_to_f32(scales[i]);
        } else {
            scales[i] = bf16_bits(uniform(1e-3f, 2e-2f));
            sval[i] = bf16_value(scales[i]);
        }
    }
    std::vector<float> xbuf(in + 4);
    float* x = xbuf.data() + (misaligned_x ? 1 : 0);
    for (int c = 0; c < in; ++c) x[c] = uniform(-3.0f, 3.0f);
    // Reference from the layout.
    std::vector<double> want(out), mag(out);
    std::vector<float> deq((size_t)out * in);
    for (int r = 0; r < out; ++r) {
        for (int c = 0; c < in; ++c) {
            const unsigned char byte = packed[(size_t)r * in / 2 + c / 2];
            const int q = (c % 2 == 0) ? (byte & 15) : (byte >> 4);
            const size_t g = (size_t)r * ng + c / group;
            const float w = sval[g] * (float)(q - zeros[g]);  // exact in f32
            deq[(size_t)r * in + c] = w;
            want[r] += (double)x[c] * w;
            mag[r] += std::fabs((double)x[c] * w);
        }
    }
    std::vector<float> y(out, NAN);
    launch((out + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK, THREADS, [&] {
        if (f16_scales) {
            phi3_gemv_int4_f16(packed.data(), reinterpret_cast<const f16*>(scales.data()),
                               zeros.data(), x, y.data(), in, out, group);
        } else {
            phi3_gemv_int4_bf16(packed.data(), reinterpret_cast<const bf16*>(scales.data()),
                                zeros.data(), x, y.data(), in, out, group);
        }
    });
    char name[128];
    std::snprintf(name, sizeof name, "gemv int4 g%d %s [%d, %d]%s", group, f16_scales ? "f16" : "bf16",
                  out, in, misaligned_x ? " misaligned x" : "");
    check_gemv(name, want, mag, y);
    // Dequantize rows row0 .. row0 + rows to bf16.
    const int row0 = out > 3 ? 3 : 0, rows = out - row0;
    std::vector<unsigned short> wb((size_t)rows * in, 0xffff);
    const unsigned long long n = (unsigned long long)rows * in / 8;
    launch((unsigned int)((n + 255) / 256), 256, [&] {
        if (f16_scales) {
            phi3_dequant_int4_f16(packed.data(), reinterpret_cast<const f16*>(scales.data()),
                                  zeros.data(), reinterpret_cast<bf16*>(wb.data()), row0, rows, in,
                                  group);
        } else {
            phi3_dequant_int4_bf16(packed.data(), reinterpret_cast<const bf16*>(scales.data()),
                                   zeros.data(), reinterpret_cast<bf16*>(wb.data()), row0, rows, in,
                                   group);
        }
    });
    std::snprintf(name, sizeof name, "dequant int4 g%d %s [%d, %d]", group,
                  f16_scales ? "f16" : "bf16", out, in);
    for (size_t i = 0; i < wb.size(); ++i) {
        const unsigned short want_bits = bf16_bits(deq[(size_t)row0 * in + i]);
        expect(wb[i] == want_bits, name, bf16_value(wb[i]), bf16_value(want_bits));
    }
}

static void int8_case(int out, int in) {
    std::vector<signed char> q((size_t)out * in);
    std::vector<float> scales(out);
    for (auto& v : q) v = (signed char)(below(256) - 128);  // -128 included: any byte works
    for (auto& s : scales) s = uniform(1e-3f, 2e-2f);
    std::vector<float> x(in);
    for (auto& v : x) v = uniform(-3.0f, 3.0f);
    std::vector<double> want(out), mag(out);
    for (int r = 0; r < out; ++r) {
        for (int c = 0; c < in; ++c) {
            const double w = (double)scales[r] * q[(size_t)r * in + c];
            want[r] += x[c] * w;
            mag[r] += std::fabs(x[c] * w);
        }
    }
    std::vector<float> y(out, NAN);
    launch((out + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK, THREADS, [&] {
        phi3_gemv_int8(q.data(), scales.data(), x.data(), y.data(), in, out);
    });
    char name[128];
    std::snprintf(name, sizeof name, "gemv int8 [%d, %d]", out, in);
    check_gemv(name, want, mag, y);
    const int row0 = out > 2 ? 2 : 0, rows = out - row0;
    std::vector<unsigned short> wb((size_t)rows * in, 0xffff);
    const unsigned long long n = (unsigned long long)rows * in / (in % 8 == 0 ? 8 : 1);
    launch((unsigned int)((n + 255) / 256), 256, [&] {
        phi3_dequant_int8(q.data(), scales.data(), reinterpret_cast<bf16*>(wb.data()), row0, rows,
                          in);
    });
    std::snprintf(name, sizeof name, "dequant int8 [%d, %d]", out, in);
    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < in; ++c) {
            const float w = scales[row0 + r] * (float)q[(size_t)(row0 + r) * in + c];
            const unsigned short got = wb[(size_t)r * in + c];
            expect(got == bf16_bits(w), name, bf16_value(got), w);
        }
    }
}

int main() {
    for (int group : {32, 64, 128}) {
        for (bool f16 : {false, true}) {
            int4_case(13, 256, group, f16, false);
            int4_case(8, 1280, group, f16, false);
            int4_case(5, 128 * 3, group, f16, true);
        }
    }
    int4_case(1, 32, 32, false, false);
    int8_case(13, 160);
    int8_case(9, 2048);
    int8_case(7, 100);
    int8_case(1, 7);
    std::printf("kernels/host-check: %s (%d mismatches)\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
