//! `linear`: `x @ w^T` with weights in their file dtype or quantized (int8/int4, layouts in
//! `loader/quant.rs`), and f32 accumulation, on all cores.
//!
//! Two paths, both parallel over blocks of output features so each weight row is read once. The
//! caller says which rows take which (`gemv_rows`, see `Backend::linear`), and each path computes
//! a row the same way whatever other rows it is given, so a sequence's results do not depend on
//! its batch (a test below checks this bit for bit):
//! - decode rows: a dot product per (row, output) that widens bf16/f16 or dequantizes
//!   int8/int4 on the fly; it is bound by weight bandwidth, so it reads weights exactly once and
//!   keeps x in cache. int8: `scale_r * Σ x·q`. int4 with groups of 64 or 128: x as 15-bit
//!   fixed point per group and integer products (`int4_dot.rs`, `pmaddwd` written out on
//!   AVX-512 and AVX2; docs/PERF.md). Other int4 (groups of 32, or x not finite):
//!   `Σ_g scale_g * (Σ x·q - zero_g * Σ_g x)`, with x split once per call into its even and odd
//!   columns (the low and high nibbles) and its group sums, so the inner loop is contiguous and
//!   vectorises. bf16 and int8 take four weight rows per pass over x (`dot_bf16_x4`,
//!   `dot_i8_x4`, the same bits as four one-row calls): x is loaded once for the four, and four
//!   chains of adds are in flight. The bf16, int8 and int4 kernels ask for their weights a few
//!   kilobytes ahead (`prefetch.rs`): on a Xeon that made the int4 and int8 GEMVs about twice as
//!   fast (docs/PERF.md).
//! - prefill rows: `gemm.rs`, register tiles of weight rows against vectors of tokens, with the
//!   weights widened (or dequantized) to f32 a block of rows at a time; bound by compute. Each
//!   output is one fused multiply-add chain over k, the same bits on AVX-512, AVX2 and NEON.
//!
//! Results are produced transposed (`[out, n]`, contiguous per task) and transposed at the end.

use half::bf16;
use half::slice::HalfFloatSliceExt;
use multiversion::multiversion;
use rayon::prelude::*;

use super::gemm;
use super::int4_dot::{self, Int16Activations};
use super::prefetch;
use super::WeightView;
use crate::loader::quant::{QuantData, QuantizedTensor};

/// Output features per task on the dot-product path.
const GEMV_BLOCK: usize = 16;

/// `x`: `[n, k]` f32; `w`: `[m, k]`; returns `[n, m]`. Rows `0..gemv_rows` take the
/// dot-product path, the others the tiled (`gemm.rs`) path.
pub(super) fn linear(
    x: &[f32],
    n: usize,
    k: usize,
    w: WeightView<'_>,
    m: usize,
    gemv_rows: usize,
) -> Vec<f32> {
    let gemv_rows = gemv_rows.min(n);
    if gemv_rows == 0 || gemv_rows == n {
        return linear_one_path(x, n, k, w, m, gemv_rows == n);
    }
    let mut out = linear_one_path(&x[..gemv_rows * k], gemv_rows, k, w, m, true);
    out.extend(linear_one_path(&x[gemv_rows * k..], n - gemv_rows, k, w, m, false));
    out
}

/// [`linear`] with every row on one path.
fn linear_one_path(
    x: &[f32],
    n: usize,
    k: usize,
    w: WeightView<'_>,
    m: usize,
    gemv: bool,
) -> Vec<f32> {
    let mut out_t = vec![0.0f32; m * n]; // [m, n]
    if out_t.is_empty() {
        return out_t; // no rows or no outputs (the blocks below would be zero-sized chunks)
    }
    if let (WeightView::Quant(q), true) = (w, gemv) {
        gemv_quant(x, n, k, q, &mut out_t);
    } else if let (WeightView::Bf16(w), true) = (w, gemv) {
        out_t.par_chunks_mut(GEMV_BLOCK * n).enumerate().for_each(|(block, out)| {
            let j0 = block * GEMV_BLOCK;
            let row = |jj: usize| &w[(j0 + jj) * k..(j0 + jj + 1) * k];
            four_rows_at_a_time(x, n, k, out, row, dot_bf16_x4, dot_bf16);
        });
    } else if gemv {
        out_t.par_chunks_mut(GEMV_BLOCK * n).enumerate().for_each(|(block, out)| {
            let mut widened = Vec::new();
            for (jj, o) in out.chunks_mut(n).enumerate() {
                let j = block * GEMV_BLOCK + jj;
                for (i, o) in o.iter_mut().enumerate() {
                    let xi = &x[i * k..(i + 1) * k];
                    *o = match w {
                        WeightView::F32(w) => dot_f32(xi, &w[j * k..(j + 1) * k]),
                        WeightView::F16(w) => {
                            if i == 0 {
                                widened.resize(k, 0.0);
                                w[j * k..(j + 1) * k].convert_to_f32_slice(&mut widened);
                            }
                            dot_f32(xi, &widened)
                        }
                        WeightView::Bf16(_) | WeightView::Quant(_) => {
                            unreachable!("bf16 and quantized weights have their own paths")
                        }
                    };
                }
            }
        });
    } else {
        gemm::multiply(x, n, k, w, &mut out_t);
    }
    transpose(&out_t, m, n)
}

/// A block of decode rows (`out`: `[rows, n]`; `row(jj)` is the block's weight row `jj`)
/// through a four-row kernel, four rows at a time: each chunk of x is loaded once for the four,
/// and four chains of adds are in flight (one row's single chain bound int8 decode by the adds'
/// latency, docs/PERF.md). The rows left over take the one-row kernel, whose bits are the same.
#[inline(always)]
fn four_rows_at_a_time<'w, T: 'w>(
    x: &[f32],
    n: usize,
    k: usize,
    out: &mut [f32],
    row: impl Fn(usize) -> &'w [T],
    four: impl Fn(&[f32], [&'w [T]; 4]) -> [f32; 4],
    one: impl Fn(&[f32], &'w [T]) -> f32,
) {
    let rows = out.len() / n;
    let mut jj = 0;
    while jj + 4 <= rows {
        for (i, xi) in x.chunks_exact(k).enumerate() {
            let got = four(xi, [row(jj), row(jj + 1), row(jj + 2), row(jj + 3)]);
            for (r, v) in got.into_iter().enumerate() {
                out[(jj + r) * n + i] = v;
            }
        }
        jj += 4;
    }
    for jj in jj..rows {
        for (i, xi) in x.chunks_exact(k).enumerate() {
            out[jj * n + i] = one(xi, row(jj));
        }
    }
}

/// The decode path for quantized weights: `out_t` `[m, n]` = `w @ x^T`.
fn gemv_quant(x: &[f32], n: usize, k: usize, w: &QuantizedTensor, out_t: &mut [f32]) {
    match &w.data {
        QuantData::Int8 { values, scales } => {
            out_t.par_chunks_mut(GEMV_BLOCK * n).enumerate().for_each(|(block, out)| {
                let j0 = block * GEMV_BLOCK;
                let row = |jj: usize| &values[(j0 + jj) * k..(j0 + jj + 1) * k];
                four_rows_at_a_time(x, n, k, out, row, dot_i8_x4, dot_i8);
                // Each sum times its row's scale: the product the one-row loop took.
                for (o, &scale) in out.chunks_mut(n).zip(&scales[j0..]) {
                    o.iter_mut().for_each(|v| *v *= scale);
                }
            });
        }
        QuantData::Int4 { group, packed, scales, zeros } => {
            let (group, ng) = (*group, k / *group);
            // Per row of x: as fixed point for the integer kernel where it applies (groups of
            // 64 and 128, finite values), else its even columns, then its odd columns ([k]),
            // and its group sums for the f32 kernel.
            let prepared: Vec<Int4Activations> = x
                .chunks_exact(k)
                .map(|xi| {
                    let fixed = Int16Activations::supports(group)
                        .then(|| Int16Activations::new(xi, group))
                        .flatten();
                    fixed.map(Int4Activations::Fixed).unwrap_or_else(|| {
                        let (even, odd): (Vec<f32>, Vec<f32>) =
                            xi.chunks_exact(2).map(|p| (p[0], p[1])).unzip();
                        let sums = xi.chunks_exact(group).map(|g| g.iter().sum()).collect();
                        Int4Activations::Float([even, odd].concat(), sums)
                    })
                })
                .collect();
            out_t.par_chunks_mut(GEMV_BLOCK * n).enumerate().for_each(|(block, out)| {
                // The block's scales widened once, in one call: a few dozen values per row
                // against k / 2 bytes (one call per row cost 3% of an int4 decode step).
                let j0 = block * GEMV_BLOCK;
                let mut block_scales = vec![0.0f32; out.len() / n * ng];
                scales.widen_into(j0 * ng..j0 * ng + block_scales.len(), &mut block_scales);
                // ng.max(1): no panic for a zero-width tensor (there is then nothing to scale).
                let per_row = block_scales.chunks(ng.max(1));
                for ((jj, o), s) in out.chunks_mut(n).enumerate().zip(per_row) {
                    let j = j0 + jj;
                    let bytes = &packed[j * k / 2..(j + 1) * k / 2];
                    let z = &zeros[j * ng..(j + 1) * ng];
                    for (o, xi) in o.iter_mut().zip(&prepared) {
                        *o = match xi {
                            Int4Activations::Fixed(a) => int4_dot::dot(a, bytes, s, z, group),
                            Int4Activations::Float(eo, sums) => {
                                let (even, odd) = eo.split_at(k / 2);
                                dot_int4(even, odd, bytes, s, z, sums, group)
                            }
                        };
                    }
                }
            });
        }
    }
}

/// One row of activations as an int4 kernel takes it.
enum Int4Activations {
    /// Fixed point for the integer kernel.
    Fixed(Int16Activations),
    /// Even columns then odd ones (`[k]`), and the group sums, for [`dot_int4`].
    Float(Vec<f32>, Vec<f32>),
}

/// `[rows, cols]` -> `[cols, rows]`, in strips of 16 output rows on all cores: each input row
/// gives a strip one 64-byte read and 16 sequential write streams (element by element, the
/// transpose of a prefill's MLP output took 6% of the prefill).
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const STRIP: usize = 16;
    if cols <= 1 || rows <= 1 {
        return a.to_vec(); // the same order in memory (or empty)
    }
    let mut t = vec![0.0f32; a.len()];
    t.par_chunks_mut(STRIP * rows).enumerate().for_each(|(s, strip)| {
        let (c0, width) = (s * STRIP, strip.len() / rows);
        for (r, src) in a.chunks_exact(cols).enumerate() {
            for (cc, &v) in src[c0..c0 + width].iter().enumerate() {
                strip[cc * rows + r] = v;
            }
        }
    });
    t
}

/// Σ x_i w_i with 16 independent f32 accumulators, compiled for the best SIMD the CPU has.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (cx, cw) = (x.chunks_exact(16), w.chunks_exact(16));
    let tail: f32 = cx.remainder().iter().zip(cw.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in cx.zip(cw) {
        for l in 0..16 {
            acc[l] += a[l] * b[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ x_i w_i for bf16 weights: bf16 -> f32 is a 16-bit shift, done in the loop.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn dot_bf16(x: &[f32], w: &[bf16]) -> f32 {
    let widen = |b: bf16| f32::from_bits((b.to_bits() as u32) << 16);
    let mut acc = [0.0f32; 16];
    let (cx, cw) = (x.chunks_exact(16), w.chunks_exact(16));
    let tail: f32 = cx.remainder().iter().zip(cw.remainder()).map(|(a, &b)| a * widen(b)).sum();
    for (a, b) in cx.zip(cw) {
        for l in 0..16 {
            acc[l] += a[l] * widen(b[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// [`dot_bf16`] of `x` with four weight rows at once: the same bits as four `dot_bf16`s.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn dot_bf16_x4(x: &[f32], w: [&[bf16]; 4]) -> [f32; 4] {
    dot_x4(x, w, |b| f32::from_bits((b.to_bits() as u32) << 16))
}

/// Σ x_i q_i for int8 weights (the caller multiplies by the row's scale).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn dot_i8(x: &[f32], q: &[i8]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (cx, cq) = (x.chunks_exact(16), q.chunks_exact(16));
    let tail: f32 = cx.remainder().iter().zip(cq.remainder()).map(|(a, &b)| a * b as f32).sum();
    for (a, b) in cx.zip(cq) {
        for l in 0..16 {
            acc[l] += a[l] * b[l] as f32;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// [`dot_i8`] of `x` with four weight rows at once: the same bits as four `dot_i8`s.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn dot_i8_x4(x: &[f32], q: [&[i8]; 4]) -> [f32; 4] {
    dot_x4(x, q, f32::from)
}

/// `x` against four adjacent weight rows, each widened by `widen`, inlined into the caller's
/// target. Each chunk of x is loaded once for the four rows, four chains of adds are in flight,
/// and each row's products are added in the order of the one-row kernels (`dot_bf16`,
/// `dot_i8`: 16 lanes, then their sum, then the tail), so the bits are theirs.
#[inline(always)]
fn dot_x4<T: Copy>(x: &[f32], w: [&[T]; 4], widen: impl Fn(T) -> f32) -> [f32; 4] {
    // Elements per 64-byte line of weights: each row asks for one line per line it reads.
    let per_line = (64 / size_of::<T>()).max(16);
    let mut acc = [[0.0f32; 16]; 4];
    let full = x.len() / 16 * 16;
    for c in (0..full).step_by(16) {
        if c % per_line == 0 {
            // Each row's line a few kilobytes ahead (prefetch.rs).
            w.iter().for_each(|w| prefetch::ahead_in_rows(w, c, 4));
        }
        let a = &x[c..c + 16];
        for (acc, w) in acc.iter_mut().zip(&w) {
            let b = &w[c..c + 16];
            for l in 0..16 {
                acc[l] += a[l] * widen(b[l]);
            }
        }
    }
    let mut out = [0.0f32; 4];
    for ((o, acc), w) in out.iter_mut().zip(&acc).zip(&w) {
        let tail: f32 = x[full..].iter().zip(&w[full..]).map(|(a, &b)| a * widen(b)).sum();
        *o = acc.iter().sum::<f32>() + tail;
    }
    out
}

/// One row of an int4 weight against one row of x: `even`/`odd` are x's even and odd columns
/// (paired with the low and high nibbles of `bytes`), `sums` x's group sums; `scales`, `zeros`
/// the row's groups. `group / 2` is a multiple of 16 (groups are 32, 64 or 128).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn dot_int4(
    even: &[f32],
    odd: &[f32],
    bytes: &[u8],
    scales: &[f32],
    zeros: &[u8],
    sums: &[f32],
    group: usize,
) -> f32 {
    let half = group / 2;
    let mut acc = [0.0f32; 16];
    let mut zero_term = 0.0f32;
    let groups = even.chunks_exact(half).zip(odd.chunks_exact(half)).zip(bytes.chunks_exact(half));
    for (((e, o), b), ((s, &z), &sum)) in groups.zip(scales.iter().zip(zeros).zip(sums)) {
        prefetch::ahead(b);
        let mut part = [0.0f32; 16];
        for ((e, o), b) in e.chunks_exact(16).zip(o.chunks_exact(16)).zip(b.chunks_exact(16)) {
            for l in 0..16 {
                part[l] += e[l] * (b[l] & 15) as f32 + o[l] * (b[l] >> 4) as f32;
            }
        }
        for l in 0..16 {
            acc[l] += s * part[l];
        }
        zero_term += s * z as f32 * sum;
    }
    acc.iter().sum::<f32>() - zero_term
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// Naive f64 reference.
    fn reference(x: &[f32], n: usize, k: usize, w: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; n * m];
        for i in 0..n {
            for j in 0..m {
                out[i * m + j] =
                    (0..k).map(|l| x[i * k + l] as f64 * w[j * k + l] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    fn check(n: usize, k: usize, m: usize) {
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let w32: Vec<f32> = (0..m * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 64.0).collect();
        // Values are exact in bf16 and f16, so every dtype must give the same answer.
        let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        let want = reference(&x, n, k, &w32, m);
        for view in [WeightView::F32(&w32), WeightView::Bf16(&wb), WeightView::F16(&wh)] {
            let got = linear(&x, n, k, view, m, old_rule(n));
            for (g, r) in got.iter().zip(&want) {
                assert!((g - r).abs() <= 1e-4 * (1.0 + r.abs()), "n={n} k={k} m={m}: {g} vs {r}");
            }
        }
    }

    #[test]
    fn quantized_paths_match_dequantized_reference() {
        use crate::loader::quant::WeightFormat;
        for (n, k, m) in [(1, 128, 33), (2, 256, 17), (4, 64, 40), (5, 128, 300), (9, 384, 7)] {
            let x: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let w: Vec<f32> = (0..m * k).map(|i| ((i * 53 % 97) as f32 - 40.0) / 64.0).collect();
            for format in [
                WeightFormat::Int8,
                WeightFormat::Int4 { group: 32 },
                WeightFormat::Int4 { group: 64 },
                WeightFormat::Int4 { group: 128 },
            ] {
                if let WeightFormat::Int4 { group } = format {
                    if k % group != 0 {
                        continue;
                    }
                }
                let q = QuantizedTensor::from_f32("w", &w, m, k, format).unwrap();
                let deq = q.dequantize();
                let want = reference(&x, n, k, &deq, m);
                let got = linear(&x, n, k, WeightView::Quant(&q), m, old_rule(n));
                // f32 sums of k terms of size |x||w| (int4: the zero-point term cancels
                // terms up to 15 steps large, so allow for the magnitude of Σ|x|·max|w|).
                let mag = x.iter().map(|v| v.abs()).sum::<f32>() / n as f32;
                for (e, (g, r)) in got.iter().zip(&want).enumerate() {
                    let (i, j) = (e / m, e % m);
                    // The integer int4 kernel (groups of 64, 128) on the decode path also
                    // rounds each activation to within half a step of max |x| / 32767 in its
                    // group: at most Σ |w| · step / 2 (int4_dot.rs).
                    let rounding = match format {
                        WeightFormat::Int4 { group } if old_rule(n) == n && group >= 64 => (0..k)
                            .map(|c| {
                                let xs = &x[i * k + c / group * group..][..group];
                                let max = xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                                deq[j * k + c].abs() * max / 32767.0 / 2.0
                            })
                            .sum(),
                        _ => 0.0,
                    };
                    let bound = 1e-5 * (1.0 + mag) + rounding;
                    assert!((g - r).abs() <= bound, "{format} n={n}: {g} vs {r}");
                }
            }
        }
    }

    /// Both paths on small inputs, as the one-sequence forward pass chooses them.
    fn old_rule(n: usize) -> usize {
        if n <= crate::backend::GEMV_SPAN {
            n
        } else {
            0
        }
    }

    /// Continuous batching's premise: a row's result is the same bits whichever other rows share
    /// the call, on either path, for every weight kind.
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        use crate::loader::quant::WeightFormat;
        let (n, k, m) = (11, 256, 70);
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let w: Vec<f32> = (0..m * k).map(|i| ((i * 53 % 97) as f32 - 40.0) / 64.0).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let q8 = QuantizedTensor::from_f32("w", &w, m, k, WeightFormat::Int8).unwrap();
        let q4 = |group| QuantizedTensor::from_f32("w", &w, m, k, WeightFormat::Int4 { group });
        let (q4_32, q4_128) = (q4(32).unwrap(), q4(128).unwrap());
        let views = [
            WeightView::F32(&w),
            WeightView::Bf16(&wb),
            WeightView::Quant(&q8),
            WeightView::Quant(&q4_32),
            WeightView::Quant(&q4_128),
        ];
        for view in views {
            for gemv_rows in [0, 1, 4, 7, n] {
                let all = linear(&x, n, k, view, m, gemv_rows);
                for i in 0..n {
                    let alone =
                        linear(&x[i * k..(i + 1) * k], 1, k, view, m, usize::from(i < gemv_rows));
                    assert_eq!(
                        &all[i * m..(i + 1) * m],
                        &alone[..],
                        "row {i}, gemv_rows {gemv_rows}"
                    );
                }
            }
        }
    }

    /// The four-row dot products are the one-row ones four times, bit for bit (bf16 and int8),
    /// including a tail shorter than a vector.
    #[test]
    fn four_row_dot_products_are_the_one_row_ones_bit_for_bit() {
        for k in [1, 15, 16, 17, 100, 512, 515] {
            let x: Vec<f32> = (0..k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let value = |r: usize, i: usize| ((i * 53 + r * 11) % 97) as f32;
            let w: Vec<Vec<bf16>> = (0..4)
                .map(|r| (0..k).map(|i| bf16::from_f32(value(r, i) / 9.0 - 5.0)).collect())
                .collect();
            let q: Vec<Vec<i8>> = (0..4)
                .map(|r| (0..k).map(|i| (value(r, i) * 2.6 - 127.0) as i8).collect())
                .collect();
            let got_bf16 = dot_bf16_x4(&x, [&w[0], &w[1], &w[2], &w[3]]);
            let got_i8 = dot_i8_x4(&x, [&q[0], &q[1], &q[2], &q[3]]);
            for r in 0..4 {
                let want = dot_bf16(&x, &w[r]);
                assert_eq!(got_bf16[r].to_bits(), want.to_bits(), "bf16 k {k} row {r}");
                let want = dot_i8(&x, &q[r]);
                assert_eq!(got_i8[r].to_bits(), want.to_bits(), "int8 k {k} row {r}");
            }
        }
    }

    #[test]
    fn both_paths_match_reference_at_odd_sizes() {
        // Empty shapes too: nothing to compute, and nothing may panic.
        for (n, k, m) in [
            (1, 1, 1),
            (1, 37, 5),
            (3, 100, 33),
            (4, 17, 70),
            (5, 64, 65),
            (19, 129, 131),
            (0, 5, 3),
            (6, 5, 0),
            (6, 0, 3),
        ] {
            check(n, k, m);
        }
    }
}
