// Host run of kernels against references written from the layout descriptions, not from the
// kernels:
// - quantized (kernels/gemv_quant.cu, kernels/dequant.cu; layouts in phi3-core/src/loader/quant.rs):
//   int8 [out, in] + f32 row scales; int4 packed [out, in / 2] with column 2i in the low nibble of
//   byte i, scales [out, in / group] (bf16 or f16) and zeros [out, in / group]. Checks the GEMV
//   (vector and scalar paths, rows that do not fill a warp's 4 or a block's 8, 1 to 8 tokens) to
//   1e-5 of sum |x w|, each token of a multi-token (_x8) launch against that token launched alone
//   by the one-token kernel bit for bit, and the bf16 dequantization of a block of rows bit for
//   bit.
// - paged KV cache (kernels/rope_kv.cu, kernels/attention.cu, kernels/kv_blocks.cu; layout in
//   kernels/common.cuh): a batch of sequences of different lengths (positions not multiples of
//   16, several 128-key tiles), GQA and MHA, partial rotary, sliding windows narrower than the
//   context, whose blocks are scattered in a shuffled order over several slabs (the last one
//   short). rope_store_kv: rotated q to 1e-5, stored k and v to one bf16 rounding, every other
//   value of the pool unchanged bit for bit. attention against a double-precision softmax over
//   each sequence's keys gathered through its table, to 1e-5 of sum p |v|; positions no row may
//   see hold NaN, so a read outside the window or past the row's position shows; groups of query
//   heads per KV head below, at and above one block's ATT_MAX_GROUP. copy_kv_blocks:
//   destinations equal their sources bit for bit, nothing else changes.
// - decode GEMM (kernels/decode_gemm.cu; mma.m16n8k16 emulated from the PTX fragment layout in
//   cuda_host.h): y [ntok, out] = x [ntok, in] @ w [out, in]^T in bf16 and f16, with token counts
//   that do not fill an 8-token tile or that span two 64-token slices, rows that do not fill a
//   block's 64, chunks shorter than 128 columns and K split into slices that the last block of
//   each tile adds (its counters left zero), and the swiglu variant reading gate_up; to 1e-5 of
//   sum |x w| against a double reference, and each token's row equal bit for bit to a launch with
//   that token alone (the batch invariance the kernel exists for).
// - the GEMV (kernels/gemv.cu: f32 weights, odd widths; both load paths), RMSNorm with and without
//   the residual add (kernels/rms_norm.cu), the embedding from every table dtype and row gathers
//   (kernels/embed.cu), the greedy choice per row (kernels/argmax.cu), a top-k step's candidates
//   per row (kernels/top_candidates.cu).
// - conversions to bf16/f16 against exact rounding and the fills (kernels/convert.cu); dummy
//   weights (kernels/dummy.cu) against values pinned in the Rust twin's unit test
//   (backend/cuda/upload.rs).
// - tensor-core prefill attention (kernels/attention_tc.cu; mma, ldmatrix and cp.async
//   emulated in cuda_host.h) on the same paged batches, for head sizes that are multiples of 16 up
//   to 128: the prefill rows (sequences of more than 4 rows) against the double-precision softmax
//   within a bound derived from the bf16 rounding of q and p (2^-16 relative in two terms, 2^-8 in
//   one), the other rows untouched; the same rows in two other tilings bit for bit (chunking and
//   batching invariance); phi3_attention with skip_prefill leaving the prefill rows alone and the
//   others bit for bit as before.
// Warps run at different speeds and blocks in a shuffled order in the emulation (cuda_host.h),
// so a missing barrier or a dependence on which block finishes last shows; a misaligned vector
// access aborts the run.
// Build and run: scripts/nvrtc-check (g++ -std=c++20 -pthread). Exit status 1 on any mismatch.
#include <cstdio>
#include <random>

#include "cuda_host.h"
#include "../gemv_quant.cu"
#include "../dequant.cu"
#include "../rope_kv.cu"
#include "../attention.cu"
#include "../attention_tc.cu"
#include "../kv_blocks.cu"
#include "../decode_gemm.cu"
#include "../swiglu.cu"
#include "../gemv.cu"
#include "../rms_norm.cu"
#include "../embed.cu"
#include "../convert.cu"
#include "../dummy.cu"
#include "../argmax.cu"
#include "../top_candidates.cu"

#include <algorithm>

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

// Bit equality of each token's row of a multi-token GEMV `y` [ntok, out] with `run(t)`, the same
// GEMV launched for token t alone (batch invariance).
static void check_tokens_alone(const char* what, int ntok, int out, const std::vector<float>& y,
                               const std::function<std::vector<float>(int)>& run) {
    if (ntok == 1) return;
    for (int t : {0, ntok / 2, ntok - 1}) {
        const std::vector<float> alone = run(t);
        for (int r = 0; r < out; ++r) {
            const float got = y[(size_t)t * out + r];
            expect(std::memcmp(&got, &alone[r], 4) == 0, what, got, alone[r]);
        }
    }
}

static void int4_case(int out, int in, int group, bool f16_scales, bool misaligned_x, int ntok) {
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
    std::vector<float> xbuf((size_t)ntok * in + 4);
    float* x = xbuf.data() + (misaligned_x ? 1 : 0);
    for (size_t c = 0; c < (size_t)ntok * in; ++c) x[c] = uniform(-3.0f, 3.0f);
    // Reference from the layout.
    std::vector<double> want((size_t)ntok * out), mag((size_t)ntok * out);
    std::vector<float> deq((size_t)out * in);
    for (int r = 0; r < out; ++r) {
        for (int c = 0; c < in; ++c) {
            const unsigned char byte = packed[(size_t)r * in / 2 + c / 2];
            const int q = (c % 2 == 0) ? (byte & 15) : (byte >> 4);
            const size_t g = (size_t)r * ng + c / group;
            const float w = sval[g] * (float)(q - zeros[g]);  // exact in f32
            deq[(size_t)r * in + c] = w;
            for (int t = 0; t < ntok; ++t) {
                want[(size_t)t * out + r] += (double)x[(size_t)t * in + c] * w;
                mag[(size_t)t * out + r] += std::fabs((double)x[(size_t)t * in + c] * w);
            }
        }
    }
    auto run = [&](const float* xs, int nt) {
        std::vector<float> y((size_t)nt * out, NAN);
        launch((out + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK, THREADS, [&] {
            // One token: the plain kernel, as the launcher picks it; more: the _x8 kernel.
            const auto* sc = scales.data();
            if (f16_scales) {
                auto* k = nt == 1 ? phi3_gemv_int4_f16 : phi3_gemv_int4_f16_x8;
                k(packed.data(), reinterpret_cast<const f16*>(sc), zeros.data(), xs, y.data(), in,
                  out, group, nt);
            } else {
                auto* k = nt == 1 ? phi3_gemv_int4_bf16 : phi3_gemv_int4_bf16_x8;
                k(packed.data(), reinterpret_cast<const bf16*>(sc), zeros.data(), xs, y.data(), in,
                  out, group, nt);
            }
        });
        return y;
    };
    const std::vector<float> y = run(x, ntok);
    char name[128];
    std::snprintf(name, sizeof name, "gemv int4 g%d %s [%d, %d] x %d tokens%s", group,
                  f16_scales ? "f16" : "bf16", out, in, ntok, misaligned_x ? " misaligned x" : "");
    check_gemv(name, want, mag, y);
    check_tokens_alone(name, ntok, out, y, [&](int t) { return run(x + (size_t)t * in, 1); });
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

static void int8_case(int out, int in, int ntok) {
    std::vector<signed char> q((size_t)out * in);
    std::vector<float> scales(out);
    for (auto& v : q) v = (signed char)(below(256) - 128);  // -128 included: any byte works
    for (auto& s : scales) s = uniform(1e-3f, 2e-2f);
    std::vector<float> x((size_t)ntok * in);
    for (auto& v : x) v = uniform(-3.0f, 3.0f);
    std::vector<double> want((size_t)ntok * out), mag((size_t)ntok * out);
    for (int t = 0; t < ntok; ++t) {
        for (int r = 0; r < out; ++r) {
            for (int c = 0; c < in; ++c) {
                const double w = (double)scales[r] * q[(size_t)r * in + c];
                want[(size_t)t * out + r] += x[(size_t)t * in + c] * w;
                mag[(size_t)t * out + r] += std::fabs(x[(size_t)t * in + c] * w);
            }
        }
    }
    auto run = [&](const float* xs, int nt) {
        std::vector<float> y((size_t)nt * out, NAN);
        launch((out + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK, THREADS, [&] {
            auto* k = nt == 1 ? phi3_gemv_int8 : phi3_gemv_int8_x8;
            k(q.data(), scales.data(), xs, y.data(), in, out, nt);
        });
        return y;
    };
    const std::vector<float> y = run(x.data(), ntok);
    char name[128];
    std::snprintf(name, sizeof name, "gemv int8 [%d, %d] x %d tokens", out, in, ntok);
    check_gemv(name, want, mag, y);
    check_tokens_alone(name, ntok, out, y, [&](int t) { return run(x.data() + (size_t)t * in, 1); });
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

// ---- Paged KV cache ----------------------------------------------------------------------------

static const int KV_TOKENS = 16;   // backend::KV_BLOCK_TOKENS
static const int ROPE_THREADS = 256, ATT_BLOCK = 128;  // ops.rs BLOCK, ATT_THREADS
static const unsigned short BF16_NAN = 0x7fc0;

// A pool of blocks [n_layers][k, v][16][kv_dim] bf16, in slabs of `per_slab` blocks (the last
// slab holds the remainder), as backend/cuda/mod.rs lays it out.
struct Pool {
    int n_layers, kv_dim, per_slab, n_blocks;
    std::vector<std::vector<unsigned short>> slabs;
    std::vector<unsigned long long> addrs;  // slabs[s].data(), what the kernels read

    Pool(int layers, int kv, int per, int n) : n_layers(layers), kv_dim(kv), per_slab(per), n_blocks(n) {
        for (int b = 0; b < n; b += per) {
            slabs.emplace_back((size_t)std::min(per, n - b) * block_len());
        }
        for (auto& s : slabs) addrs.push_back((unsigned long long)(uintptr_t)s.data());
    }
    int block_len() const { return 2 * n_layers * KV_TOKENS * kv_dim; }
    // Value c of token t of block b, keys (which = 0) or values (1) of `layer`.
    unsigned short& at(unsigned b, int layer, int which, int t, int c) {
        size_t in_block = (((size_t)layer * 2 + which) * KV_TOKENS + t) * kv_dim + c;
        return slabs[b / per_slab][(size_t)(b % per_slab) * block_len() + in_block];
    }
    std::vector<unsigned short> image() const {
        std::vector<unsigned short> all;
        for (auto& s : slabs) all.insert(all.end(), s.begin(), s.end());
        return all;
    }
};

struct PagedCase {
    int n_heads, n_kv_heads, head_dim, half, window, layer;
    std::vector<std::pair<int, int>> seqs;  // (pos0, len)
    int split_keys = 0;  // > 0: decode rows (sequences of <= 4 rows) at positions >= it split
};

static const int GEMV_SPAN = 4;  // backend::GEMV_SPAN: longer sequences are prefill rows

// The prefill rows of a case's batch in tiles of consecutive rows of one sequence, as
// [(first row, rows)...]: AP_ROWS rows each (kv.rs's tiling), except that with 0 < first < len a
// sequence's first tile holds `first` rows, which moves every later row to another tile, warp
// and lane.
static std::vector<unsigned> prefill_tiles(const PagedCase& c, int first) {
    std::vector<unsigned> tiles;
    int row = 0;
    for (auto [p0, len] : c.seqs) {
        for (int at = 0; len > GEMV_SPAN && at < len;) {
            int n = std::min(AP_ROWS, len - at);
            if (at == 0 && first > 0) n = std::min(n, first);
            tiles.push_back((unsigned)(row + at));
            tiles.push_back((unsigned)n);
            at += n;
        }
        row += len;
    }
    return tiles;
}

// A tensor-core attention result `got` [rows, n_heads * head_dim] against the reference (want,
// mag = sum p |v|, s1 = largest scale * sum |q k| of the row's keys) on the rows `mine` says are
// this kernel's; the others must still be NaN. Error bound: q rounded with relative error eps
// (2^-16 in two bf16 terms, 2^-8 in one) moves each score by at most delta = (eps + 2^-20) s1
// (2^-20: f32 accumulation), which moves the output by at most (e^(2 delta) - 1) mag; p rounded
// the same way moves it by eps mag; 1e-5 mag for the rest of the f32 arithmetic, as
// phi3_attention. Prints the largest error seen, relative to mag.
static void check_tc_rows(const char* name, const PagedCase& c, const std::vector<float>& got,
                          const std::vector<char>& mine, bool split, const std::vector<double>& want,
                          const std::vector<double>& mag, const std::vector<double>& s1) {
    const int hd = c.head_dim, q_dim = c.n_heads * hd, rows = (int)mine.size();
    const double eps = std::ldexp(1.0, split ? -16 : -8);
    double worst = 0;
    for (int r = 0; r < rows; ++r) {
        for (int h = 0; h < c.n_heads; ++h) {
            const double delta = (eps + std::ldexp(1.0, -20)) * s1[(size_t)r * c.n_heads + h];
            for (int d = 0; d < hd; ++d) {
                const size_t i = (size_t)r * q_dim + h * hd + d;
                if (!mine[r]) {
                    expect(std::isnan(got[i]), name, got[i], NAN);  // not its row
                    continue;
                }
                const double tol = mag[i] * (std::expm1(2 * delta) + eps + 1e-5) + 1e-30;
                expect(std::fabs(got[i] - want[i]) <= tol, name, got[i], want[i]);
                worst = std::max(worst, std::fabs(got[i] - want[i]) / (mag[i] + 1e-30));
            }
        }
    }
    std::printf("  %s: largest |error| / sum p|v| = %.2e\n", name, worst);
}

// phi3_attention_prefill (q and p split in two bf16 terms) and _fast (one) on a case's prefill
// rows (check_tc_rows); then the same rows in two other tilings must come out bit for bit the same
// (chunking and batching invariance).
static void prefill_checks(const PagedCase& c, const char* tag, const Pool& pool,
                           const std::vector<float>& q, const std::vector<unsigned>& row_pos,
                           const std::vector<unsigned>& row_table,
                           const std::vector<unsigned>& tables, const std::vector<char>& prefill_row,
                           const std::vector<double>& want, const std::vector<double>& mag,
                           const std::vector<double>& s1, float scale) {
    const int hd = c.head_dim, q_dim = c.n_heads * hd, rows = (int)row_pos.size();
    auto run = [&](bool split, const std::vector<unsigned>& tiles) {
        std::vector<float> o((size_t)rows * q_dim, NAN);
        auto kernel = split ? phi3_attention_prefill : phi3_attention_prefill_fast;
        launch(dim3h{(unsigned)tiles.size() / 2, (unsigned)c.n_heads, 1}, AP_THREADS, AP_SMEM_BYTES, [&] {
            kernel(q.data(), pool.addrs.data(), row_pos.data(), row_table.data(), tiles.data(),
                   tables.data(), o.data(), pool.per_slab, pool.block_len(), c.layer, c.n_heads,
                   c.n_kv_heads, hd, scale, c.window);
        });
        return o;
    };
    char name[256];
    for (bool split : {true, false}) {
        const char* kernel = split ? "attention_prefill" : "attention_prefill_fast";
        const std::vector<float> got = run(split, prefill_tiles(c, 0));
        std::snprintf(name, sizeof name, "%s %s", kernel, tag);
        check_tc_rows(name, c, got, prefill_row, split, want, mag, s1);
        for (int first : {1, 37}) {
            const std::vector<float> other = run(split, prefill_tiles(c, first));
            size_t differ = 0;
            for (int r = 0; r < rows; ++r) {
                for (int e = 0; prefill_row[r] && e < q_dim; ++e) {
                    const size_t i = (size_t)r * q_dim + e;
                    differ += __float_as_uint(other[i]) != __float_as_uint(got[i]);
                }
            }
            std::snprintf(name, sizeof name, "%s same bits with a first tile of %d rows %s", kernel,
                          first, tag);
            expect(differ == 0, name, (double)differ, 0.0);
        }
    }
}

static void paged_case(const PagedCase& c) {
    const int hd = c.head_dim, q_dim = c.n_heads * hd, kv_dim = c.n_kv_heads * hd;
    const int cols = q_dim + 2 * kv_dim, n_layers = 2;
    char tag[160];
    int off = std::snprintf(tag, sizeof tag, "h%d/kv%d hd%d half%d win%d layer%d seqs", c.n_heads,
                            c.n_kv_heads, hd, c.half, c.window, c.layer);
    for (auto [p0, len] : c.seqs) off += std::snprintf(tag + off, sizeof tag - off, " %d+%d", p0, len);

    // Block tables: a shuffled permutation of the pool's ids, 3 spare blocks, 3 blocks a slab.
    int needed = 0;
    for (auto [p0, len] : c.seqs) needed += (p0 + len + KV_TOKENS - 1) / KV_TOKENS;
    const int n_blocks = needed + 3;
    Pool pool(n_layers, kv_dim, 3, n_blocks);
    std::vector<unsigned> ids(n_blocks);
    for (int i = 0; i < n_blocks; ++i) ids[i] = (unsigned)i;
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<std::vector<unsigned>> table(c.seqs.size());
    int next = 0;
    for (size_t s = 0; s < c.seqs.size(); ++s) {
        const int n = (c.seqs[s].first + c.seqs[s].second + KV_TOKENS - 1) / KV_TOKENS;
        for (int i = 0; i < n; ++i) table[s].push_back(ids[next++]);
    }
    const std::vector<unsigned> spare(ids.begin() + next, ids.end());

    // Contents: random bf16 everywhere; NaN at the positions about to be written (every layer)
    // and below the first key any row of the sequence may see (never read).
    for (auto& slab : pool.slabs) for (auto& v : slab) v = bf16_bits(uniform(-1.0f, 1.0f));
    for (size_t s = 0; s < c.seqs.size(); ++s) {
        auto [p0, len] = c.seqs[s];
        const int unseen = c.window > 0 ? std::max(0, p0 + 1 - c.window) : 0;
        for (int p = 0; p < p0 + len; ++p) {
            if (p >= unseen && p < p0) continue;
            for (int l = 0; l < n_layers; ++l)
                for (int w = 0; w < 2; ++w)
                    for (int e = 0; e < kv_dim; ++e)
                        pool.at(table[s][p / KV_TOKENS], l, w, p % KV_TOKENS, e) = BF16_NAN;
        }
    }
    const std::vector<unsigned short> before = pool.image();

    // The batch: rows of all sequences, in order.
    std::vector<unsigned> row_pos, row_table, tables, row_seq;
    for (size_t s = 0; s < c.seqs.size(); ++s) {
        auto [p0, len] = c.seqs[s];
        for (int r = 0; r < len; ++r) {
            row_pos.push_back((unsigned)(p0 + r));
            row_table.push_back((unsigned)tables.size());
            row_seq.push_back((unsigned)s);
        }
        tables.insert(tables.end(), table[s].begin(), table[s].end());
    }
    const int rows = (int)row_pos.size();
    std::vector<float> qkv((size_t)rows * cols), cs((size_t)rows * c.half), sn((size_t)rows * c.half);
    for (auto& v : qkv) v = uniform(-1.0f, 1.0f);
    for (int r = 0; r < rows; ++r) {
        for (int j = 0; j < c.half; ++j) {
            const double angle = row_pos[r] * std::pow(10000.0, -2.0 * j / (2 * c.half));
            cs[(size_t)r * c.half + j] = (float)(1.1 * std::cos(angle));
            sn[(size_t)r * c.half + j] = (float)(1.1 * std::sin(angle));
        }
    }

    // rope_store_kv.
    std::vector<float> q((size_t)rows * q_dim, NAN);
    launch(rows, ROPE_THREADS, [&] {
        phi3_rope_store_kv(qkv.data(), cs.data(), sn.data(), q.data(), pool.addrs.data(),
                           row_pos.data(), row_table.data(), tables.data(), pool.per_slab,
                           pool.block_len(), c.layer, c.n_heads, c.n_kv_heads, hd, c.half);
    });
    // Reference: rotate_half on each head of q and k; v unchanged.
    auto rotated = [&](int r, int e) -> double {  // element e < q_dim + kv_dim of row r
        const float* x = &qkv[(size_t)r * cols];
        const int d = e % hd, base = e - d;
        const float* co = &cs[(size_t)r * c.half];
        const float* si = &sn[(size_t)r * c.half];
        if (d < c.half) return (double)x[e] * co[d] - (double)x[base + d + c.half] * si[d];
        if (d < 2 * c.half) {
            const int j = d - c.half;
            return (double)x[e] * co[j] + (double)x[base + j] * si[j];
        }
        return x[e];
    };
    char name[256];
    std::snprintf(name, sizeof name, "rope q %s", tag);
    for (int r = 0; r < rows; ++r) {
        for (int e = 0; e < q_dim; ++e) {
            const double want = rotated(r, e), got = q[(size_t)r * q_dim + e];
            expect(std::fabs(got - want) <= 1e-5 * (1.0 + std::fabs(want)), name, got, want);
        }
    }
    // The pool: k and v of each row at its position, one bf16 rounding off; all else unchanged.
    std::vector<char> written(before.size(), 0);
    std::vector<unsigned short> after = pool.image();
    auto flat = [&](unsigned b, int l, int w, int t, int e) {
        return (size_t)b * pool.block_len() + (((size_t)l * 2 + w) * KV_TOKENS + t) * kv_dim + e;
    };  // slabs are concatenated in order, so block b starts at b * block_len in the image
    std::snprintf(name, sizeof name, "rope k,v store %s", tag);
    for (int r = 0; r < rows; ++r) {
        const unsigned p = row_pos[r], b = table[row_seq[r]][p / KV_TOKENS];
        for (int e = 0; e < 2 * kv_dim; ++e) {
            const int w = e < kv_dim ? 0 : 1, ch = e % kv_dim;
            const double want = w == 0 ? rotated(r, q_dim + e) : qkv[(size_t)r * cols + q_dim + e];
            const size_t i = flat(b, c.layer, w, p % KV_TOKENS, ch);
            written[i] = 1;
            const double got = bf16_value(after[i]);
            expect(std::fabs(got - want) <= std::ldexp(std::fabs(want), -8) + 1e-30, name, got, want);
        }
    }
    std::snprintf(name, sizeof name, "rope_store_kv leaves the rest %s", tag);
    for (size_t i = 0; i < before.size(); ++i) {
        if (!written[i] && after[i] != before[i]) {
            expect(false, name, bf16_value(after[i]), bf16_value(before[i]));
            break;
        }
    }

    // attention over the pool as it now is, decode rows split as kv.rs's pack_batch does.
    std::vector<unsigned> row_split(rows, ATT_NO_SPLIT);
    unsigned slots = 0, most_splits = 1;
    for (int r = 0; r < rows; ++r) {
        const int len = c.seqs[row_seq[r]].second, pos = (int)row_pos[r];
        if (len > GEMV_SPAN) row_split[r] = ATT_PREFILL;  // whole, as kv.rs marks them
        if (c.split_keys > 0 && len <= GEMV_SPAN && pos >= c.split_keys) {
            row_split[r] = slots;
            slots += (unsigned)(pos / c.split_keys + 1);
            most_splits = std::max(most_splits, (unsigned)(pos / c.split_keys + 1));
        }
    }
    const int split_keys = c.split_keys > 0 ? c.split_keys : 1 << 30;
    std::vector<float> part((size_t)slots * c.n_heads * (hd + 2) + 1, NAN);
    const float scale = (float)(1.0 / std::sqrt((double)hd));
    std::vector<float> out((size_t)rows * q_dim, NAN);
    const unsigned chunks = (unsigned)(c.n_heads / c.n_kv_heads + ATT_MAX_GROUP - 1) / ATT_MAX_GROUP;
    // Arrival counters of the split rows' slices (one per row and blockIdx.y of either row
    // kernel): every launch must leave them zero for the next.
    std::vector<unsigned int> tickets((size_t)rows * c.n_kv_heads * chunks + 1, 0u);
    auto tickets_left_zero = [&](const char* what) {
        size_t left = 0;
        for (unsigned int v : tickets) left += v != 0;
        std::snprintf(name, sizeof name, "%s tickets left zero %s", what, tag);
        expect(left == 0, name, (double)left, 0.0);
    };
    auto run_attention = [&](std::vector<float>& o, int skip) {
        launch(dim3h{(unsigned)rows, (unsigned)c.n_kv_heads * chunks, most_splits}, ATT_BLOCK, [&] {
            phi3_attention(q.data(), pool.addrs.data(), row_pos.data(), row_table.data(),
                           row_split.data(), tables.data(), o.data(), part.data(), tickets.data(),
                           pool.per_slab, pool.block_len(), c.layer, c.n_heads, c.n_kv_heads, hd,
                           scale, c.window, split_keys, (int)slots, skip);
        });
        tickets_left_zero("attention");
    };
    run_attention(out, 0);
    // phi3_attention with `skip` (bit 0: prefill rows, bit 1: decode rows): the rows marked in
    // `skipped` left alone (NaN), the others bit for bit as without it.
    auto check_skip = [&](int skip, const std::vector<char>& skipped, const char* what) {
        std::vector<float> rest((size_t)rows * q_dim, NAN);
        std::fill(part.begin(), part.end(), NAN);
        run_attention(rest, skip);
        size_t differ = 0;
        for (int r = 0; r < rows; ++r) {
            for (int e = 0; e < q_dim; ++e) {
                const size_t i = (size_t)r * q_dim + e;
                differ += skipped[r] ? !std::isnan(rest[i])
                                     : __float_as_uint(rest[i]) != __float_as_uint(out[i]);
            }
        }
        std::snprintf(name, sizeof name, "attention skip %s rows %s", what, tag);
        expect(differ == 0, name, (double)differ, 0.0);
    };
    // Reference per (row, head): a double-precision softmax over the row's keys gathered through
    // its table; want[d], mag[d] = sum p |v[d]|, and s1 = the largest scale * sum_d |q_d k_d| over
    // the row's keys (bounds the score error of q rounded to bf16).
    const int group = c.n_heads / c.n_kv_heads;
    std::vector<double> ref_want((size_t)rows * q_dim), ref_mag((size_t)rows * q_dim);
    std::vector<double> ref_s1((size_t)rows * c.n_heads);
    for (int r = 0; r < rows; ++r) {
        const int pos = (int)row_pos[r], s = (int)row_seq[r];
        const int first = c.window > 0 ? std::max(0, pos + 1 - c.window) : 0;
        for (int h = 0; h < c.n_heads; ++h) {
            const int kvh = h / group;
            std::vector<double> sc;
            double mx = -INFINITY, s1 = 0;
            for (int j = first; j <= pos; ++j) {
                const unsigned b = table[s][j / KV_TOKENS];
                double dot = 0, abs_dot = 0;
                for (int d = 0; d < hd; ++d) {
                    const double term = (double)q[(size_t)r * q_dim + h * hd + d] *
                                        bf16_value(pool.at(b, c.layer, 0, j % KV_TOKENS, kvh * hd + d));
                    dot += term;
                    abs_dot += std::fabs(term);
                }
                sc.push_back(dot * scale);
                mx = std::max(mx, sc.back());
                s1 = std::max(s1, abs_dot * scale);
            }
            ref_s1[(size_t)r * c.n_heads + h] = s1;
            double sum = 0;
            for (auto& v : sc) sum += (v = std::exp(v - mx));
            for (int d = 0; d < hd; ++d) {
                double want = 0, mag = 0;
                for (int j = first; j <= pos; ++j) {
                    const unsigned b = table[s][j / KV_TOKENS];
                    const double v = bf16_value(pool.at(b, c.layer, 1, j % KV_TOKENS, kvh * hd + d));
                    want += sc[j - first] / sum * v;
                    mag += sc[j - first] / sum * std::fabs(v);
                }
                ref_want[(size_t)r * q_dim + h * hd + d] = want;
                ref_mag[(size_t)r * q_dim + h * hd + d] = mag;
            }
        }
    }
    std::snprintf(name, sizeof name, "attention %s%s", tag, slots ? " (split)" : "");
    for (size_t i = 0; i < out.size(); ++i) {
        expect(std::fabs(out[i] - ref_want[i]) <= 1e-5 * (ref_mag[i] + 1e-30), name, out[i], ref_want[i]);
    }

    // The tensor-core prefill kernels on the prefill rows (sequences adding more than 4 rows, as
    // kv.rs marks them), where the head size allows.
    std::vector<char> prefill_row(rows, 0);
    for (int r = 0; r < rows; ++r) prefill_row[r] = c.seqs[row_seq[r]].second > GEMV_SPAN;
    if (hd % 16 == 0 && hd <= AP_HD_MAX &&
        std::find(prefill_row.begin(), prefill_row.end(), 1) != prefill_row.end()) {
        prefill_checks(c, tag, pool, q, row_pos, row_table, tables, prefill_row, ref_want,
                       ref_mag, ref_s1, scale);
        check_skip(1, prefill_row, "prefill");
    }

    // The tensor-core decode kernels on the other rows (split ones merged by their last slice),
    // where the head size and a group of at most 16 heads allow; then
    // phi3_attention leaving those rows alone.
    std::vector<char> decode_row(rows);
    for (int r = 0; r < rows; ++r) decode_row[r] = !prefill_row[r];
    if (hd % 16 == 0 && hd <= AP_HD_MAX && c.n_heads / c.n_kv_heads <= 16 &&
        std::find(decode_row.begin(), decode_row.end(), 1) != decode_row.end()) {
        for (bool split : {true, false}) {
            std::vector<float> got((size_t)rows * q_dim, NAN);
            std::fill(part.begin(), part.end(), NAN);
            auto kernel = split ? phi3_attention_decode : phi3_attention_decode_fast;
            launch(dim3h{(unsigned)rows, (unsigned)c.n_kv_heads, most_splits}, AP_THREADS,
                   AP_SMEM_BYTES, [&] {
                kernel(q.data(), pool.addrs.data(), row_pos.data(), row_table.data(),
                       row_split.data(), tables.data(), got.data(), part.data(), tickets.data(),
                       pool.per_slab, pool.block_len(), c.layer, c.n_heads, c.n_kv_heads, hd,
                       scale, c.window, split_keys, (int)slots);
            });
            tickets_left_zero("attention_decode");
            std::snprintf(name, sizeof name, "%s %s%s",
                          split ? "attention_decode" : "attention_decode_fast", tag,
                          slots ? " (split)" : "");
            check_tc_rows(name, c, got, decode_row, split, ref_want, ref_mag, ref_s1);
        }
        check_skip(2, decode_row, "decode");
    }

    // copy_kv_blocks: three used blocks (different slabs as the shuffle falls) to the spares.
    std::vector<unsigned> pairs;
    for (int i = 0; i < 3; ++i) {
        pairs.push_back(tables[(size_t)below((int)tables.size())]);
        pairs.push_back(spare[i]);
    }
    const std::vector<unsigned short> pre_copy = pool.image();
    launch(dim3h{3, 2, 1}, 256, [&] {
        phi3_copy_kv_blocks(pool.addrs.data(), pairs.data(), pool.per_slab, pool.block_len());
    });
    const std::vector<unsigned short> post = pool.image();
    std::vector<unsigned short> want_img = pre_copy;
    for (int i = 0; i < 3; ++i) {
        std::copy_n(pre_copy.begin() + (size_t)pairs[2 * i] * pool.block_len(), pool.block_len(),
                    want_img.begin() + (size_t)pairs[2 * i + 1] * pool.block_len());
    }
    std::snprintf(name, sizeof name, "copy_kv_blocks %s", tag);
    size_t differ = 0;
    for (size_t i = 0; i < post.size(); ++i) differ += post[i] != want_img[i];
    expect(differ == 0, name, (double)differ, 0.0);
}

static const int DG_BLOCK = 32 * DG_WARPS;  // ops.rs DECODE_GEMM_THREADS

// y [ntok, out] by phi3_decode_gemm_<type> (with swiglu: phi3_decode_gemm_swiglu_<type>, x being
// gate_up [ntok, 2 * in]) over `splits` K slices (the launcher's grid), the last block of each
// tile adding the slices. The tickets must be left zero for the next launch.
static std::vector<float> run_decode_gemm(bool f16, bool swiglu,
                                          const std::vector<unsigned short>& w, const float* x,
                                          int in, int out, int ntok, int splits) {
    const int k_per_split = ((in / 32 + splits - 1) / splits) * 32;
    std::vector<float> part((size_t)splits * ntok * out, NAN), y((size_t)ntok * out, NAN);
    const dim3h grid{(unsigned)((out + DG_ROWS - 1) / DG_ROWS), (unsigned)splits,
                     (unsigned)((ntok + DG_TOK - 1) / DG_TOK)};
    std::vector<unsigned int> tickets(grid.x * grid.z, 0u);
    launch(grid, DG_BLOCK, [&] {
        auto* kernel = swiglu ? (f16 ? phi3_decode_gemm_swiglu_f16 : phi3_decode_gemm_swiglu_bf16)
                              : (f16 ? phi3_decode_gemm_f16 : phi3_decode_gemm_bf16);
        kernel(w.data(), x, y.data(), part.data(), tickets.data(), in, out, ntok, k_per_split);
    });
    size_t left = 0;
    for (unsigned int v : tickets) left += v != 0;
    expect(left == 0, "decode gemm tickets left zero", (double)left, 0.0);
    return y;
}

static unsigned short half_bits(bool f16, float lo, float hi) {
    if (f16) {  // a normal f16 of magnitude 2^-4 .. 2^1, either sign
        return (unsigned short)((below(2) << 15) | ((11 + below(5)) << 10) | below(1024));
    }
    return bf16_bits(uniform(lo, hi));
}

// x is f32, rounded by the kernel as it stages it: for bf16 any f32 (the reference rounds with
// bf16_bits), for f16 values that f16 holds exactly (the device rounds with the PTX cvt, which
// the emulation only stands in for). With swiglu the kernel reads gate_up [ntok, 2 * in] and
// multiplies silu(gate) * up (f32, as phi3_swiglu), rounded the same way.
static void decode_gemm_case(int out, int in, int ntok, int splits, bool f16, bool swiglu = false) {
    const int x_cols = swiglu ? 2 * in : in;
    std::vector<unsigned short> w((size_t)out * in);
    std::vector<float> x((size_t)ntok * x_cols);
    for (auto& v : w) v = half_bits(f16, -1.0f, 1.0f);
    for (auto& v : x) v = f16 ? phi3_host_f16_to_f32(half_bits(true, 0, 0)) : uniform(-3.0f, 3.0f);
    auto val = [f16](unsigned short b) {
        return f16 ? (double)phi3_host_f16_to_f32(b) : (double)bf16_value(b);
    };
    auto xval = [&](int t, int c) {
        const float* row = x.data() + (size_t)t * x_cols;
        const float v = swiglu ? row[in + c] * (row[c] / (1.0f + std::exp(-row[c]))) : row[c];
        return f16 ? (double)phi3_host_f16_to_f32(phi3_host_f32_to_f16(v))
                   : (double)bf16_value(bf16_bits(v));
    };
    const std::vector<float> y = run_decode_gemm(f16, swiglu, w, x.data(), in, out, ntok, splits);
    char name[128];
    std::snprintf(name, sizeof name, "decode gemm%s %s [%d, %d] x %d tokens, %d splits",
                  swiglu ? " swiglu" : "", f16 ? "f16" : "bf16", out, in, ntok, splits);
    for (int t = 0; t < ntok; ++t) {
        for (int o = 0; o < out; ++o) {
            double want = 0, mag = 0;
            for (int c = 0; c < in; ++c) {
                const double p = val(w[(size_t)o * in + c]) * xval(t, c);
                want += p;
                mag += std::fabs(p);
            }
            const float got = y[(size_t)t * out + o];
            expect(std::fabs(got - want) <= 1e-5 * mag + 1e-30, name, got, want);
        }
    }
    if (swiglu) {  // fused staging = phi3_swiglu, then the plain kernel, bit for bit
        std::vector<float> act((size_t)ntok * in, NAN);
        launch(3, 64, [&] {
            phi3_swiglu(x.data(), act.data(), (unsigned long long)ntok * in, in);
        });
        const std::vector<float> apart =
            run_decode_gemm(f16, false, w, act.data(), in, out, ntok, splits);
        size_t differ = 0;
        for (size_t i = 0; i < y.size(); ++i) differ += std::memcmp(&y[i], &apart[i], 4) != 0;
        expect(differ == 0, name, (double)differ, 0.0);
    }
    // A few tokens alone: the first, the last, and the first of a second token slice.
    for (int t : {0, ntok - 1, ntok > DG_TOK ? DG_TOK : ntok / 2}) {
        const std::vector<float> solo = run_decode_gemm(
            f16, swiglu, w, x.data() + (size_t)t * x_cols, in, out, 1, splits);
        for (int o = 0; o < out; ++o) {
            const float got = y[(size_t)t * out + o];
            expect(std::memcmp(&solo[o], &got, 4) == 0, name, got, solo[o]);
        }
    }
}

// phi3_gemv_<type> (the decode rows of f32 weights and of `in` not a multiple of 32): y = W x to
// 1e-5 of sum |w x| against a double reference, on the 16-byte path (`in` a multiple of 8, or of
// 4 for f32) and the scalar one, with rows that do not fill a block's 8 warps.
static void gemv_case(int dtype, int out, int in) {  // dtype: 0 bf16, 1 f16, 2 f32
    std::vector<unsigned short> w16((size_t)out * in);
    std::vector<float> w32((size_t)out * in), x(in), y(out, NAN);
    for (size_t i = 0; i < w32.size(); ++i) {
        if (dtype == 2) {
            w32[i] = uniform(-1.0f, 1.0f);
        } else {
            w16[i] = half_bits(dtype == 1, -1.0f, 1.0f);
            w32[i] = dtype == 1 ? phi3_host_f16_to_f32(w16[i]) : bf16_value(w16[i]);
        }
    }
    for (auto& v : x) v = uniform(-2.0f, 2.0f);
    const auto* wb = reinterpret_cast<const bf16*>(w16.data());
    const auto* wh = reinterpret_cast<const f16*>(w16.data());
    launch((unsigned)((out + 7) / 8), 256, [&] {
        if (dtype == 0) phi3_gemv_bf16(wb, x.data(), y.data(), in, out);
        if (dtype == 1) phi3_gemv_f16(wh, x.data(), y.data(), in, out);
        if (dtype == 2) phi3_gemv_f32(w32.data(), x.data(), y.data(), in, out);
    });
    const char* type = dtype == 0 ? "bf16" : dtype == 1 ? "f16" : "f32";
    char name[96];
    std::snprintf(name, sizeof name, "gemv %s [%d, %d]", type, out, in);
    for (int o = 0; o < out; ++o) {
        double want = 0, mag = 0;
        for (int c = 0; c < in; ++c) {
            const double p = (double)w32[(size_t)o * in + c] * x[c];
            want += p;
            mag += std::fabs(p);
        }
        expect(std::fabs(y[o] - want) <= 1e-5 * mag + 1e-30, name, y[o], want);
    }
}

// phi3_rms_norm: residual += delta (when given), out = weight * residual / rms, per row, to 1e-5
// relative; the residual updated exactly (one f32 add per element).
static void rms_norm_case(int rows, int cols, bool with_delta) {
    std::vector<float> res((size_t)rows * cols), delta((size_t)rows * cols), w(cols);
    std::vector<float> out((size_t)rows * cols, NAN);
    for (auto& v : res) v = uniform(-2.0f, 2.0f);
    for (auto& v : delta) v = uniform(-1.0f, 1.0f);
    for (auto& v : w) v = uniform(0.5f, 1.5f);
    const std::vector<float> before = res;
    const float eps = 1e-5f;
    launch((unsigned)rows, 256, [&] {
        const float* d = with_delta ? delta.data() : nullptr;
        phi3_rms_norm(res.data(), d, w.data(), out.data(), cols, eps);
    });
    char name[96];
    const char* tag = with_delta ? " + delta" : "";
    std::snprintf(name, sizeof name, "rms_norm [%d, %d]%s", rows, cols, tag);
    for (int r = 0; r < rows; ++r) {
        double ss = 0;
        for (int c = 0; c < cols; ++c) {
            const size_t i = (size_t)r * cols + c;
            const float v = with_delta ? before[i] + delta[i] : before[i];
            expect(__float_as_uint(res[i]) == __float_as_uint(v), name, res[i], v);
            ss += (double)v * v;
        }
        const double inv = 1.0 / std::sqrt(ss / cols + eps);
        for (int c = 0; c < cols; ++c) {
            const size_t i = (size_t)r * cols + c;
            const double want = w[c] * (double)res[i] * inv;
            expect(std::fabs(out[i] - want) <= 1e-5 * std::fabs(want) + 1e-6, name, out[i], want);
        }
    }
}

// phi3_argmax_rows: each row's lowest id below its limit holding the largest number, -1 when
// none is above -inf; the rule of sampler::greedy_choice, checked against a scan written from it.
// Rows: random logits with a planted tie (the lower id wins), NaN everywhere but one id, all -inf,
// the maximum at or past the limit (not chosen), limit 0, a limit past cols, -0.0 tied with 0.0
// as the maximum, and one row of Phi-3's vocabulary width.
static void argmax_case() {
    const int cols = 32064, rows = 9;
    const float inf = __uint_as_float(0x7f800000u);
    std::vector<float> x((size_t)rows * cols);
    for (auto& v : x) v = uniform(-8.0f, 8.0f);
    std::vector<int> limits(rows, 32011);
    auto row = [&](int r) { return x.data() + (size_t)r * cols; };
    row(0)[700] = 20.0f, row(0)[90] = 20.0f;                          // tie: 90
    for (int c = 0; c < cols; ++c) row(1)[c] = NAN;
    row(1)[31999] = -3.0f;                                            // only number: 31999
    for (int c = 0; c < cols; ++c) row(2)[c] = -inf;                  // none: -1
    row(3)[32011] = 50.0f, row(3)[40] = 9.0f;                         // past the limit: 40
    limits[4] = 0;                                                    // none: -1
    limits[5] = 1 << 30;                                              // clamped to cols
    row(5)[cols - 1] = 30.0f;
    for (int c = 0; c < 100; ++c) row(6)[c] = -1.0f;                  // -0.0 and 0.0 tie: 17
    limits[6] = 100;
    row(6)[17] = -0.0f, row(6)[60] = 0.0f;
    row(7)[5] = inf, row(7)[6] = inf;                                 // +inf is a number: 5
    limits[8] = 1;                                                    // one id: 0
    std::vector<int> out(rows, -2);
    launch((unsigned)rows, ARGMAX_THREADS, [&] {
        phi3_argmax_rows(x.data(), limits.data(), 0, cols, out.data());
    });
    for (int r = 0; r < rows; ++r) {
        const int limit = std::min(limits[r], cols);
        int want = -1;
        for (int c = 0; c < limit; ++c) {
            const float v = row(r)[c];
            if (v == v && v > -inf && (want < 0 || v > row(r)[want])) want = c;
        }
        char name[64];
        std::snprintf(name, sizeof name, "argmax row %d", r);
        expect(out[r] == want, name, out[r], want);
    }
    const int planted[rows] = {90, 31999, -1, 40, -1, cols - 1, 17, 5, 0};
    for (int r = 0; r < rows; ++r) expect(out[r] == planted[r], "argmax planted", out[r], planted[r]);
    // No limits array: every row takes the one limit passed (here 32011, as most rows above).
    std::vector<int> same(rows, -2);
    launch((unsigned)rows, ARGMAX_THREADS, [&] {
        phi3_argmax_rows(x.data(), nullptr, 32011, cols, same.data());
    });
    for (int r = 0; r < rows; ++r) {
        int want = -1;
        for (int c = 0; c < 32011; ++c) {
            const float v = row(r)[c];
            if (v == v && v > -inf && (want < 0 || v > row(r)[want])) want = c;
        }
        expect(same[r] == want, "argmax one limit", same[r], want);
    }
}

// phi3_top_candidates: each row's min(count, stride) largest logits below its limit that are
// above -inf, by f32 total order then the lower id (sampler::top_candidates), against a full sort.
// Rows: Phi-3's width at random; few distinct values (the count-th falls inside a tie: the id
// bytes decide); fewer ids above -inf than asked; NaN, +inf, -0.0 next to 0.0; count 0; limit 0;
// count past the stride; a limit past cols; one value everywhere (every id byte needed); exactly
// as many live ids as asked.
static void top_candidates_case() {
    const int cols = 32064, rows = 10, stride = 120;
    const float inf = __uint_as_float(0x7f800000u);
    std::vector<float> x((size_t)rows * cols);
    for (auto& v : x) v = uniform(-12.0f, 12.0f);
    auto row = [&](int r) { return x.data() + (size_t)r * cols; };
    std::vector<int> wanted(2 * rows);
    for (int r = 0; r < rows; ++r) wanted[2 * r] = 32011, wanted[2 * r + 1] = 114;
    for (int c = 0; c < cols; ++c) row(1)[c] = (float)(int)uniform(-3.0f, 3.0f);
    for (int c = 0; c < cols; ++c) row(2)[c] = c % 641 == 0 ? uniform(-1.0f, 1.0f) : -inf;
    for (int c = 0; c < 400; ++c) row(3)[c] = c % 3 == 0 ? NAN : -1.0f;
    wanted[6] = 400, wanted[7] = 10;
    row(3)[7] = inf, row(3)[8] = -0.0f, row(3)[9] = 0.0f, row(3)[300] = -0.0f, row(3)[11] = 5.0f;
    wanted[9] = 0;
    wanted[10] = 0;
    wanted[13] = 1000;
    wanted[14] = 1 << 30;
    row(7)[cols - 1] = 99.0f;
    for (int c = 0; c < cols; ++c) row(8)[c] = 0.25f;
    for (int c = 0; c < cols; ++c) row(9)[c] = c < 5000 && c % 50 == 7 ? uniform(-1.0f, 1.0f) : -inf;
    wanted[19] = 100;  // ids 7, 57, ..., 4957: exactly 100 above -inf
    const int words = 1 + 2 * stride;
    std::vector<int> out((size_t)rows * words, -7);
    launch((unsigned)rows, TOPC_THREADS, [&] {
        phi3_top_candidates(x.data(), wanted.data(), 0, 0, cols, stride, out.data());
    });
    auto key = [](float v) { return candidate_key(v); };
    for (int r = 0; r < rows; ++r) {
        const int limit = std::min(wanted[2 * r], cols), count = std::min(wanted[2 * r + 1], stride);
        std::vector<std::pair<unsigned, int>> live;  // (key, id)
        for (int c = 0; c < std::max(limit, 0); ++c) {
            if (key(row(r)[c]) != 0u) live.push_back({key(row(r)[c]), c});
        }
        std::sort(live.begin(), live.end(), [](auto a, auto b) {
            return a.first != b.first ? a.first > b.first : a.second < b.second;
        });
        const size_t n = count <= 0 ? 0 : std::min(live.size(), (size_t)count);
        std::vector<int> want;
        for (size_t i = 0; i < n; ++i) want.push_back(live[i].second);
        std::sort(want.begin(), want.end());
        const int* o = out.data() + (size_t)r * words;
        char name[64];
        std::snprintf(name, sizeof name, "top candidates row %d: n", r);
        expect(o[0] == (int)n, name, o[0], (double)n);
        if (o[0] != (int)n) continue;
        std::vector<std::pair<int, unsigned>> got;  // (id, bits)
        for (size_t i = 0; i < n; ++i) got.push_back({o[1 + i], (unsigned)o[1 + stride + i]});
        std::sort(got.begin(), got.end());
        std::snprintf(name, sizeof name, "top candidates row %d", r);
        for (size_t i = 0; i < n; ++i) {
            expect(got[i].first == want[i], name, got[i].first, want[i]);
            const unsigned bits = __float_as_uint(row(r)[want[i]]);
            expect(got[i].second == bits, name, got[i].second, bits);
        }
    }
    // The planted rows' answers, written out.
    const int* o3 = out.data() + 3 * (size_t)words;
    std::vector<int> ids3(o3 + 1, o3 + 1 + std::max(o3[0], 0));
    std::sort(ids3.begin(), ids3.end());
    // +inf, 5.0, 0.0, the two -0.0 (300 above every -1.0), then the lowest -1.0 ids.
    const std::vector<int> planted3 = {1, 2, 4, 5, 7, 8, 9, 10, 11, 300};
    expect(ids3 == planted3, "top candidates planted row 3", ids3.empty() ? -1 : ids3[0], 1);
    const int* o8 = out.data() + 8 * (size_t)words;
    expect(o8[0] == 114 && *std::max_element(o8 + 1, o8 + 115) == 113,
           "top candidates: one value everywhere takes ids 0..113", o8[0], 114);
    // No requests array: every row takes the one request passed, (32011, 114), which rows 0, 1,
    // 2 and 8 asked above: the same ids (in any order) and count.
    std::vector<int> same((size_t)rows * words, -7);
    launch((unsigned)rows, TOPC_THREADS, [&] {
        phi3_top_candidates(x.data(), nullptr, 32011, 114, cols, stride, same.data());
    });
    for (int r : {0, 1, 2, 8}) {
        const int* a = out.data() + (size_t)r * words;
        const int* b = same.data() + (size_t)r * words;
        std::vector<int> ia(a + 1, a + 1 + std::max(a[0], 0)), ib(b + 1, b + 1 + std::max(b[0], 0));
        std::sort(ia.begin(), ia.end());
        std::sort(ib.begin(), ib.end());
        expect(a[0] == b[0] && ia == ib, "top candidates: one request for all rows", b[0], a[0]);
    }
}

// phi3_embed_bf16 and phi3_gather_rows_f32: rows copied (widened) exactly, in the order given,
// repeats included.
static void gather_case() {
    const int vocab = 37, hidden = 300;
    std::vector<unsigned short> table((size_t)vocab * hidden);
    for (auto& v : table) v = bf16_bits(uniform(-1.0f, 1.0f));
    const std::vector<unsigned> ids = {5, 0, 36, 5, 17};
    const int n = (int)ids.size();
    std::vector<float> out((size_t)n * hidden, NAN), again((size_t)n * hidden, NAN);
    launch((unsigned)n, 256, [&] {
        const auto* t = reinterpret_cast<const bf16*>(table.data());
        phi3_embed_bf16(t, ids.data(), out.data(), hidden);
    });
    const std::vector<unsigned> rows = {4, 4, 0, 2, 1};
    launch((unsigned)n, 256, [&] {
        phi3_gather_rows_f32(out.data(), rows.data(), again.data(), hidden);
    });
    size_t differ = 0;
    for (int r = 0; r < n; ++r) {
        for (int c = 0; c < hidden; ++c) {
            const float want = bf16_value(table[(size_t)ids[r] * hidden + c]);
            differ += __float_as_uint(out[(size_t)r * hidden + c]) != __float_as_uint(want);
            const float moved = out[(size_t)rows[r] * hidden + c];
            differ += __float_as_uint(again[(size_t)r * hidden + c]) != __float_as_uint(moved);
        }
    }
    expect(differ == 0, "embed bf16 and gather_rows", (double)differ, 0.0);
}

// phi3_host_f32_to_f16 (the emulation's stand-in for cvt.rn.f16.f32): every finite f16 comes
// back unchanged, and the midpoint of two neighbours rounds to the one with an even mantissa.
static void f16_rounding_case() {
    for (unsigned b = 0; b < 0x7c00u; ++b) {
        const float v = phi3_host_f16_to_f32((unsigned short)b);
        expect(phi3_host_f32_to_f16(v) == b, "f32 -> f16 round trip", b, phi3_host_f32_to_f16(v));
        expect(phi3_host_f32_to_f16(-v) == (b | 0x8000u), "f32 -> f16 sign", b, 0);
        if (b + 1 < 0x7c00u) {
            const float mid = (float)(((double)v + phi3_host_f16_to_f32((unsigned short)(b + 1))) / 2);
            const unsigned even = (b & 1u) ? b + 1 : b;
            expect(phi3_host_f32_to_f16(mid) == even, "f32 -> f16 ties to even", mid, even);
        }
    }
    expect(phi3_host_f32_to_f16(65520.0f) == 0x7c00u, "f32 -> f16 overflow", 65520.0, 0x7c00);
    expect(phi3_host_f32_to_f16(65519.0f) == 0x7bffu, "f32 -> f16 largest", 65519.0, 0x7bff);
}

// phi3_embed_f16 / phi3_embed_f32: the same row copy from the other table dtypes.
static void embed_dtypes_case() {
    const int vocab = 11, hidden = 37;
    const std::vector<unsigned> ids = {10, 0, 3, 3};
    const int n = (int)ids.size();
    std::vector<float> table32((size_t)vocab * hidden);
    std::vector<unsigned short> table16((size_t)vocab * hidden);
    for (size_t i = 0; i < table32.size(); ++i) {
        table32[i] = uniform(-2.0f, 2.0f);
        table16[i] = phi3_host_f32_to_f16(table32[i]);
    }
    std::vector<float> out32((size_t)n * hidden, NAN), out16((size_t)n * hidden, NAN);
    launch((unsigned)n, 256, [&] { phi3_embed_f32(table32.data(), ids.data(), out32.data(), hidden); });
    launch((unsigned)n, 256, [&] {
        const auto* t = reinterpret_cast<const f16*>(table16.data());
        phi3_embed_f16(t, ids.data(), out16.data(), hidden);
    });
    size_t differ = 0;
    for (int r = 0; r < n; ++r) {
        for (int c = 0; c < hidden; ++c) {
            const size_t src = (size_t)ids[r] * hidden + c, dst = (size_t)r * hidden + c;
            differ += __float_as_uint(out32[dst]) != __float_as_uint(table32[src]);
            const float want16 = phi3_host_f16_to_f32(table16[src]);
            differ += __float_as_uint(out16[dst]) != __float_as_uint(want16);
        }
    }
    expect(differ == 0, "embed f16 and f32", (double)differ, 0.0);
}

// The bf16 a float rounds to (nearest, ties to even; NaN stays NaN), from exact arithmetic:
// an independent reference for f32_to_bf16's bit trick.
static unsigned short bf16_reference(float f) {
    const unsigned u = __float_as_uint(f);
    if (std::isnan(f)) return 0x7fc0;
    if (std::isinf(f)) return (unsigned short)(u >> 16);
    const unsigned short lo = (unsigned short)(u >> 16);  // truncated: toward zero
    const double below = std::fabs((double)bf16_value(lo));
    const double above = (lo & 0x7fffu) == 0x7f7fu
                             ? std::ldexp(1.0, 128)  // past the largest finite bf16: infinity
                             : std::fabs((double)bf16_value((unsigned short)(lo + 1)));
    const double x = std::fabs((double)f);
    if (x - below < above - x) return lo;
    if (x - below > above - x) return (unsigned short)(lo + 1);
    return (lo & 1u) ? (unsigned short)(lo + 1) : lo;
}

// phi3_f32_to_bf16 / phi3_f32_to_f16 (the activations cuBLAS reads) over special values,
// halfway cases and random floats, with fewer threads than values (the grid-stride loop), and the
// fills that poison buffers.
static void convert_case() {
    std::vector<float> x = {0.0f, -0.0f, 1.0f, -1.0f, INFINITY, -INFINITY, NAN, -NAN,
                            3.3895314e38f, 3.3961775e38f, 3.4028235e38f, 1e-45f, -1e-40f,
                            65504.0f, 65520.0f, 6e-8f, 1.00390625f, 1.01171875f, -1.00390625f};
    for (int i = 0; i < 3000; ++i) {
        x.push_back(__uint_as_float((unsigned)rng()));  // any bits: every exponent, NaNs too
        x.push_back(uniform(-100.0f, 100.0f));
    }
    const unsigned long long n = x.size();
    std::vector<unsigned short> b(n, 0xdead), h(n, 0xdead);
    launch(7, 256, [&] { phi3_f32_to_bf16(x.data(), reinterpret_cast<bf16*>(b.data()), n); });
    launch(5, 256, [&] { phi3_f32_to_f16(x.data(), reinterpret_cast<f16*>(h.data()), n); });
    size_t bad_bf16 = 0, bad_f16 = 0;
    for (size_t i = 0; i < n; ++i) {
        const unsigned short want = bf16_reference(x[i]);
        const bool both_nan = std::isnan(x[i]) && (b[i] & 0x7fffu) > 0x7f80u;
        bad_bf16 += b[i] != want && !both_nan;
        bad_f16 += h[i] != phi3_host_f32_to_f16(x[i]);
    }
    expect(bad_bf16 == 0, "f32 -> bf16 kernel vs exact rounding", (double)bad_bf16, 0.0);
    expect(bad_f16 == 0, "f32 -> f16 kernel", (double)bad_f16, 0.0);
    std::vector<float> f(1000, 0.0f);
    std::vector<unsigned short> u16(1001, 0);
    std::vector<unsigned char> u8(999, 0);
    launch(3, 256, [&] { phi3_fill_f32(f.data(), f.size(), NAN); });
    launch(2, 256, [&] { phi3_fill_u16(u16.data(), u16.size(), 0x7fc0); });
    launch(1, 256, [&] { phi3_fill_u8(u8.data(), u8.size(), 8); });
    size_t unfilled = std::count_if(f.begin(), f.end(), [](float v) { return !std::isnan(v); });
    unfilled += std::count_if(u16.begin(), u16.end(), [](unsigned short v) { return v != 0x7fc0; });
    unfilled += std::count_if(u8.begin(), u8.end(), [](unsigned char v) { return v != 8; });
    expect(unfilled == 0, "fill f32/u16/u8", (double)unfilled, 0.0);
}

// phi3_fill_dummy_*: the values backend/cuda/upload.rs's `dummy_value` gives, bit for bit (the
// same four values are pinned in its unit test), and the 16-bit kernels their rounding.
static void dummy_case() {
    const float h = 1.0f / std::sqrt(77.0f);
    struct Pinned { unsigned long long seed, tensor, i; float center, half; unsigned bits; };
    const Pinned pinned[] = {{7, 5, 0, 0.0f, h, 0xbd5c9c80u}, {7, 5, 2540, 0.0f, h, 0xbdc169afu},
                             {1, 0, 100, 1.0f, 0.1f, 0x3f823301u},
                             {42, 3, 17, -0.5f, 2.0f, 0xbf82a7d2u}};
    for (const Pinned& p : pinned) {
        const unsigned long long n = p.i + 1;
        std::vector<float> f(n, NAN);
        std::vector<unsigned short> b(n, 0), e(n, 0);
        launch(4, 256, [&] { phi3_fill_dummy_f32(f.data(), n, p.seed, p.tensor, p.center, p.half); });
        launch(3, 256, [&] {
            phi3_fill_dummy_bf16(reinterpret_cast<bf16*>(b.data()), n, p.seed, p.tensor, p.center, p.half);
        });
        launch(2, 256, [&] {
            phi3_fill_dummy_f16(reinterpret_cast<f16*>(e.data()), n, p.seed, p.tensor, p.center, p.half);
        });
        expect(__float_as_uint(f[p.i]) == p.bits, "dummy f32 vs the Rust twin", f[p.i],
               __uint_as_float(p.bits));
        size_t bad = 0;
        for (unsigned long long i = 0; i < n; ++i) {
            bad += !(f[i] >= p.center - p.half && f[i] < p.center + p.half);
            bad += b[i] != bf16_reference(f[i]);
            bad += e[i] != phi3_host_f32_to_f16(f[i]);
        }
        expect(bad == 0, "dummy values in range, 16-bit kernels round them", (double)bad, 0.0);
    }
    std::vector<unsigned char> r(5000, 0);
    launch(3, 256, [&] { phi3_fill_random_u8(r.data(), r.size(), 9, 4); });
    std::vector<int> seen(256, 0);
    for (unsigned char v : r) seen[v]++;
    const int empty = (int)std::count(seen.begin(), seen.end(), 0);
    expect(empty == 0, "random u8 covers every byte value", empty, 0);
}

int main() {
    f16_rounding_case();
    for (int group : {32, 64, 128}) {
        for (bool f16 : {false, true}) {
            int4_case(13, 256, group, f16, false, 1);
            int4_case(8, 1280, group, f16, false, 8);
            int4_case(5, 128 * 3, group, f16, true, 3);
        }
    }
    int4_case(1, 32, 32, false, false, 5);
    int8_case(13, 160, 1);
    int8_case(9, 2048, 8);
    int8_case(7, 100, 3);  // in % 16 != 0: the scalar path
    int8_case(1, 7, 2);
    paged_case({4, 2, 40, 16, 0, 1, {{0, 5}, {37, 1}, {150, 3}, {18, 2}}});
    paged_case({3, 3, 160, 80, 20, 0, {{5, 7}, {140, 1}, {33, 4}}});
    paged_case({8, 1, 64, 32, 140, 1, {{200, 2}, {7, 1}, {16, 16}}});
    paged_case({20, 2, 32, 16, 0, 1, {{9, 3}, {130, 1}}});  // group 10: two blocks per KV head
    paged_case({4, 2, 36, 12, 0, 1, {{0, 5}, {140, 2}}});   // head_dim not a multiple of 8: scalar keys
    // Split keys: decode rows past split_keys in slices (several tiles, one tile, a partial last
    // slice), prefill rows of the same batch unsplit, and a window that leaves early slices empty.
    paged_case({8, 2, 32, 16, 0, 1, {{300, 1}, {37, 6}, {520, 2}, {100, 1}}, 256});
    paged_case({4, 4, 40, 16, 0, 0, {{700, 1}, {5, 1}}, 128});
    paged_case({4, 1, 64, 32, 150, 1, {{600, 1}, {130, 3}}, 128});
    // Tensor-core prefill (head_dim a multiple of 16 up to 128): query tiles of 64 rows and key
    // tiles of 64 keys that do not line up, several of each, next to decode rows; GQA group 4 as
    // Phi-3-medium, MHA, group 10; windows that start mid-tile and skip whole key tiles.
    paged_case({8, 2, 128, 64, 0, 1, {{0, 150}, {3, 1}, {70, 90}}});
    paged_case({6, 2, 96, 48, 100, 0, {{130, 70}, {0, 5}, {200, 2}}, 128});
    paged_case({2, 2, 80, 80, 0, 1, {{17, 40}}});
    paged_case({10, 1, 16, 8, 30, 1, {{5, 70}}});
    // Tensor-core decode: a group of 16 (all the mma's rows), MHA (one row), split slices of 128
    // and 256 keys over several 64-key tiles, next to prefill rows.
    paged_case({16, 1, 64, 32, 0, 1, {{300, 1}, {40, 4}, {9, 6}}, 128});
    paged_case({4, 4, 128, 64, 0, 0, {{700, 1}, {64, 2}}, 256});
    decode_gemm_case(200, 256, 70, 2, false);  // two token slices, 4 row blocks (the last partial)
    decode_gemm_case(64, 96, 1, 1, false);     // one token, one chunk shorter than DG_KC
    decode_gemm_case(130, 416, 9, 3, false);   // slices of 160 columns: chunks of 128 and 32
    decode_gemm_case(48, 160, 17, 1, true);    // f16
    decode_gemm_case(64, 512, 40, 1, false);   // four chunks: x restaged while warps drift
    decode_gemm_case(130, 640, 3, 5, false);   // five slices over 3 row blocks, any arrival order
    // down_proj of a decode step: silu(gate) * up taken while staging.
    decode_gemm_case(96, 320, 5, 2, false, true);
    decode_gemm_case(40, 256, 66, 1, true, true);
    // The GEMV of f32 weights and odd widths, RMSNorm, the embedding and row gathers.
    for (int dtype : {0, 1, 2}) {
        gemv_case(dtype, 13, 264);  // 16-byte path
        gemv_case(dtype, 9, 100);   // scalar for 16-bit (100 % 8 != 0), 16-byte for f32
        gemv_case(dtype, 3, 7);     // scalar
    }
    argmax_case();
    top_candidates_case();
    rms_norm_case(3, 300, true);
    rms_norm_case(2, 5120, false);
    gather_case();
    embed_dtypes_case();
    convert_case();
    dummy_case();
    std::printf("kernels/host-check: %s (%d mismatches)\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
