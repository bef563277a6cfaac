//! `linear`: `x @ w^T` with weights in their file dtype and f32 accumulation, on all cores.
//!
//! Two paths, both parallel over blocks of output features so each weight row is read once:
//! - few rows (decode): a dot product per (row, output) that widens bf16/f16 on the fly; it is
//!   bound by weight bandwidth, so it reads weights exactly once and keeps x in cache.
//! - many rows (prefill): each task widens a block of weight rows to f32 and multiplies it with
//!   all of x through `ndarray` (matrixmultiply's blocked, SIMD sgemm); bound by compute.
//!
//! Results are produced transposed (`[out, n]`, contiguous per task) and transposed at the end.

use half::bf16;
use half::slice::HalfFloatSliceExt;
use multiversion::multiversion;
use ndarray::{linalg::general_mat_mul, ArrayView2, ArrayViewMut2, ShapeBuilder};
use rayon::prelude::*;

use super::WeightView;
use crate::error::{Error, Result};

/// Up to this many rows use the dot-product path.
const GEMV_MAX_ROWS: usize = 4;
/// Output features per task on the dot-product path.
const GEMV_BLOCK: usize = 16;
/// Output features per task on the sgemm path (a block of widened weights stays in L2).
const GEMM_BLOCK: usize = 256;

/// `x`: `[n, k]` f32; `w`: `[m, k]`; returns `[n, m]`.
pub(super) fn linear(
    x: &[f32],
    n: usize,
    k: usize,
    w: WeightView<'_>,
    m: usize,
) -> Result<Vec<f32>> {
    let mut out_t = vec![0.0f32; m * n]; // [m, n]
    if n <= GEMV_MAX_ROWS {
        out_t.par_chunks_mut(GEMV_BLOCK * n).enumerate().for_each(|(block, out)| {
            let mut widened = Vec::new();
            for (jj, o) in out.chunks_mut(n).enumerate() {
                let j = block * GEMV_BLOCK + jj;
                for (i, o) in o.iter_mut().enumerate() {
                    let xi = &x[i * k..(i + 1) * k];
                    *o = match w {
                        WeightView::Bf16(w) => dot_bf16(xi, &w[j * k..(j + 1) * k]),
                        WeightView::F32(w) => dot_f32(xi, &w[j * k..(j + 1) * k]),
                        WeightView::F16(w) => {
                            if i == 0 {
                                widened.resize(k, 0.0);
                                w[j * k..(j + 1) * k].convert_to_f32_slice(&mut widened);
                            }
                            dot_f32(xi, &widened)
                        }
                    };
                }
            }
        });
    } else {
        out_t.par_chunks_mut(GEMM_BLOCK * n).enumerate().try_for_each(|(block, out)| {
            let rows = out.len() / n;
            let j0 = block * GEMM_BLOCK;
            let mut widened = vec![0.0f32; rows * k];
            let range = j0 * k..(j0 + rows) * k;
            let wb: &[f32] = match w {
                WeightView::Bf16(w) => {
                    w[range].convert_to_f32_slice(&mut widened);
                    &widened
                }
                WeightView::F16(w) => {
                    w[range].convert_to_f32_slice(&mut widened);
                    &widened
                }
                WeightView::F32(w) => &w[range],
            };
            let shape_err = |e: ndarray::ShapeError| Error::internal(format!("linear: {e}"));
            let a = ArrayView2::from_shape((rows, k), wb).map_err(shape_err)?;
            let b = ArrayView2::from_shape((k, n).strides((1, k)), x).map_err(shape_err)?;
            let mut c = ArrayViewMut2::from_shape((rows, n), out).map_err(shape_err)?;
            general_mat_mul(1.0, &a, &b, 0.0, &mut c);
            Ok::<(), Error>(())
        })?;
    }
    Ok(transpose(&out_t, m, n))
}

/// `[rows, cols]` -> `[cols, rows]`.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    if cols == 1 {
        return a.to_vec();
    }
    let mut t = vec![0.0f32; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
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
            let got = linear(&x, n, k, view, m).unwrap();
            for (g, r) in got.iter().zip(&want) {
                assert!((g - r).abs() <= 1e-4 * (1.0 + r.abs()), "n={n} k={k} m={m}: {g} vs {r}");
            }
        }
    }

    #[test]
    fn both_paths_match_reference_at_odd_sizes() {
        for (n, k, m) in
            [(1, 1, 1), (1, 37, 5), (3, 100, 33), (4, 17, 70), (5, 64, 65), (19, 129, 131)]
        {
            check(n, k, m);
        }
    }
}
