//! The prefill path of `linear`: `out_t[j][i] = Σ_c w[j][c] · x[i][c]` for all weight rows `j`
//! against many tokens `i`, on register tiles, through `pulp`'s safe SIMD and runtime dispatch.
//!
//! Every output is one chain of fused multiply-adds over the columns in order, starting from 0.
//! Tiles, SIMD widths and blocks only decide which chains run side by side, never how one is
//! summed, so an output does not depend on the other tokens of the call (continuous batching
//! relies on it) and is the same bits on AVX-512, AVX2 and NEON. pulp's one-lane fallback (x86
//! without AVX2) rounds each product instead: a fused multiply-add is a libm call there.
//!
//! The tokens are vectorised, the weights broadcast. A register tile holds `NJ` weight rows
//! against `NR` vectors of tokens (6 × 4 × 16 on AVX-512). x is copied once per call into tiles
//! of consecutive tokens (`[tile][column][token]`), so a column's tokens are one vector load.
//! Each task widens (or dequantizes) its block of weight rows into chunks of `CHUNK` columns
//! (`[chunk][row][column]`); for each chunk, every token tile in turn passes over the block's
//! rows, with the tile's chunk of x in L1 and the rows' chunk in L2. The sums live in the
//! output between chunks.
//!
//! Measured on the development VM (Xeon with AVX-512, 2 cores): `linear` on 3072 × 3072 bf16
//! weights against 512 tokens at 199 GFLOP/s, against 121 with matrixmultiply's sgemm before
//! (docs/PERF.md, "CPU prefill").

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use super::simd::{fuses, load, mul_add, store};
use super::WeightView;

/// Weight rows per task: a multiple of every tile height below.
const BLOCK_ROWS: usize = 96;
/// Columns per chunk: a multiple of every int4 group size (32, 64, 128), so a chunk of a
/// quantized row dequantizes whole groups; a token tile's chunk (`CHUNK` × 64 × 4 bytes with
/// AVX-512) stays in L1 while the block's rows pass over it.
const CHUNK: usize = 128;

/// `out_t` (`[m, n]`, zeroed) = `w x^T`, where `x` is `[n, k]` and `w` `[m, k]`.
pub(super) fn multiply(x: &[f32], n: usize, k: usize, w: WeightView<'_>, out_t: &mut [f32]) {
    debug_assert_eq!(x.len(), n * k);
    if n == 0 || out_t.is_empty() || k == 0 {
        return; // nothing to sum: the zeroed output is the answer
    }
    pulp::Arch::new().dispatch(Multiply { x, n, k, w, out_t });
}

struct Multiply<'a> {
    x: &'a [f32],
    n: usize,
    k: usize,
    w: WeightView<'a>,
    out_t: &'a mut [f32],
}

impl WithSimd for Multiply<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        // Tile heights and widths that keep the accumulators, the token vectors and one
        // broadcast in registers: 24 of 32 zmm, 12 of 16 ymm, 16 of 32 NEON q registers.
        match S::F32_LANES {
            16 => self.run::<S, 6, 4>(simd),
            8 => self.run::<S, 6, 2>(simd),
            _ => self.run::<S, 4, 4>(simd),
        }
    }
}

impl Multiply<'_> {
    #[inline(always)]
    fn run<S: Simd, const NJ: usize, const NR: usize>(self, simd: S) {
        let Multiply { x, n, k, w, out_t } = self;
        // Fresh buffers each call: keeping them per thread measured no faster (within 2%),
        // and would hold tens of megabytes per calling thread between calls.
        let tokens = TokenTiles::new(x, n, k, NR * S::F32_LANES);
        out_t.par_chunks_mut(BLOCK_ROWS * n).enumerate().for_each(|(block, out)| {
            // Rayon's closure is not compiled for the SIMD target: enter it again.
            simd.vectorize(Block::<S, NJ, NR> {
                simd,
                tokens: &tokens,
                rows: block * BLOCK_ROWS..block * BLOCK_ROWS + out.len() / n,
                w,
                out,
            })
        });
    }
}

/// x copied into tiles of `width` consecutive tokens: `[tile][column][token]`, `padded`
/// columns a tile. Tokens past `n` and columns past `k` are zeros.
struct TokenTiles {
    data: Vec<f32>,
    n: usize,
    k: usize,
    padded: usize,
    width: usize,
}

impl TokenTiles {
    fn new(x: &[f32], n: usize, k: usize, width: usize) -> Self {
        let padded = k.div_ceil(CHUNK) * CHUNK;
        let mut data = vec![0.0f32; n.div_ceil(width) * padded * width];
        data.par_chunks_mut(padded * width).enumerate().for_each(|(t, tile)| {
            let first = t * width;
            let count = (n - first).min(width);
            for (c, column) in tile.chunks_exact_mut(width).take(k).enumerate() {
                for (l, v) in column.iter_mut().take(count).enumerate() {
                    *v = x[(first + l) * k + c];
                }
            }
        });
        TokenTiles { data, n, k, padded, width }
    }

    fn tiles(&self) -> usize {
        self.n.div_ceil(self.width)
    }

    /// Chunk `chunk` of tile `t`: `[CHUNK columns][width tokens]`.
    fn chunk(&self, t: usize, chunk: usize) -> &[f32] {
        let at = (t * self.padded + chunk * CHUNK) * self.width;
        &self.data[at..at + CHUNK * self.width]
    }
}

/// One task: weight rows `rows` against every token; `out` is their `[rows, n]` block.
struct Block<'a, S, const NJ: usize, const NR: usize> {
    simd: S,
    tokens: &'a TokenTiles,
    rows: Range<usize>,
    w: WeightView<'a>,
    out: &'a mut [f32],
}

impl<S: Simd, const NJ: usize, const NR: usize> WithSimd for Block<'_, S, NJ, NR> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S2: Simd>(self, _: S2) {
        // `vectorize` entered S's target features; the kernels below are inlined into it.
        let Block { simd, tokens, rows, w, out } = self;
        let (n, k, width) = (tokens.n, tokens.k, tokens.width);
        let lanes = S::F32_LANES;
        let groups = rows.len().div_ceil(NJ);
        // The block's rows widened once, `[chunk][row][CHUNK columns]`, reading each row from
        // start to end so the weights stream from memory in order (a chunk of every row in
        // turn, 256 bytes here and there, ran a third slower). Columns past k, and the rows
        // that pad the last group (their outputs are computed and dropped), are zeros, so every
        // chunk is whole and the kernel's indices are constants.
        let rows_padded = groups * NJ;
        let chunks = tokens.padded / CHUNK;
        let mut weights = vec![0.0f32; chunks * rows_padded * CHUNK];
        for (jj, r) in rows.clone().enumerate() {
            for chunk in 0..chunks {
                let c0 = chunk * CHUNK;
                let kc = CHUNK.min(k - c0);
                let at = (chunk * rows_padded + jj) * CHUNK;
                widen(w, r, k, c0..c0 + kc, &mut weights[at..at + kc]);
            }
        }
        for (chunk, weights) in weights.chunks_exact(rows_padded * CHUNK).enumerate() {
            for t in 0..tokens.tiles() {
                let x = tokens.chunk(t, chunk);
                let first = t * width;
                let count = (n - first).min(width);
                for (g, w) in weights.chunks_exact(NJ * CHUNK).enumerate() {
                    let j0 = g * NJ;
                    let live = (rows.len() - j0).min(NJ);
                    let acc = Accumulators {
                        out: &mut *out,
                        n,
                        j0,
                        live,
                        first,
                        count,
                        fresh: chunk == 0,
                    };
                    match count.div_ceil(lanes) {
                        v if v >= NR => tile::<S, NJ, NR>(simd, w, x, width, acc),
                        3 => tile::<S, NJ, 3>(simd, w, x, width, acc),
                        2 => tile::<S, NJ, 2>(simd, w, x, width, acc),
                        _ => tile::<S, NJ, 1>(simd, w, x, width, acc),
                    }
                }
            }
        }
    }
}

/// Columns `cols` of weight row `j` (of `k` columns) as f32 into `dst`; inlined into the SIMD
/// target, where the bf16 shift vectorises.
#[inline(always)]
fn widen(w: WeightView<'_>, j: usize, k: usize, cols: Range<usize>, dst: &mut [f32]) {
    let at = j * k + cols.start..j * k + cols.end;
    match w {
        WeightView::Bf16(w) => {
            for (d, b) in dst.iter_mut().zip(&w[at]) {
                *d = f32::from_bits(u32::from(b.to_bits()) << 16);
            }
        }
        WeightView::F16(w) => w[at].convert_to_f32_slice(dst),
        WeightView::F32(w) => dst.copy_from_slice(&w[at]),
        WeightView::Quant(q) => q.dequantize_columns(j, cols, dst),
    }
}

/// Where a tile's running sums live between chunks: rows `j0..j0 + live` of the block's
/// output, tokens `first..first + count`.
struct Accumulators<'a> {
    out: &'a mut [f32],
    n: usize,
    j0: usize,
    live: usize,
    first: usize,
    count: usize,
    /// The first chunk: the sums start at zero, and `out` is not read. Reading the zeroed
    /// output first mapped the kernel's shared zero page, and the write after it then cost a
    /// copy-on-write fault with a TLB flush on every core (an eighth of a prefill in `perf`).
    fresh: bool,
}

impl Accumulators<'_> {
    fn row(&mut self, jj: usize) -> &mut [f32] {
        let start = (self.j0 + jj) * self.n + self.first;
        &mut self.out[start..start + self.count]
    }
}

/// `NJ` weight rows (`w`: `[row][CHUNK columns]`) against `NR` vectors of tokens (`x`:
/// `[CHUNK columns][width tokens]`), continuing the sums in `acc`.
// Index loops on purpose: see the comment on `sums`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn tile<S: Simd, const NJ: usize, const NR: usize>(
    simd: S,
    w: &[f32],
    x: &[f32],
    width: usize,
    mut acc: Accumulators<'_>,
) {
    let lanes = S::F32_LANES;
    let fused = fuses::<S>();
    // Every access to `sums` is indexed with constant bounds so that LLVM keeps them in
    // registers (iterating over them by reference spilled every sum on every column).
    let mut sums = [[simd.splat_f32s(0.0); NR]; NJ];
    for jj in 0..NJ {
        if jj < acc.live && !acc.fresh {
            sums[jj] = load_row::<S, NR>(simd, acc.row(jj));
        }
    }
    // Rows as arrays of CHUNK columns: the column index below needs no bounds checks, whose
    // exits made LLVM keep half the sums in memory too.
    let (rows, _) = w.as_chunks::<CHUNK>();
    let rows: [&[f32; CHUNK]; NJ] = core::array::from_fn(|jj| &rows[jj]);
    for (c, column) in x.chunks_exact(width).take(CHUNK).enumerate() {
        let (column, _) = S::as_simd_f32s(&column[..NR * lanes]);
        for jj in 0..NJ {
            let b = simd.splat_f32s(rows[jj][c]);
            for r in 0..NR {
                sums[jj][r] = mul_add(simd, fused, column[r], b, sums[jj][r]);
            }
        }
    }
    for jj in 0..NJ {
        if jj < acc.live {
            store_row::<S, NR>(simd, sums[jj], acc.row(jj));
        }
    }
}

/// The first `NR` vectors of `out` (zeros past its end).
#[allow(clippy::needless_range_loop)] // constant bounds, as in `tile`
#[inline(always)]
fn load_row<S: Simd, const NR: usize>(simd: S, out: &[f32]) -> [S::f32s; NR] {
    let mut row = [simd.splat_f32s(0.0); NR];
    for r in 0..NR {
        row[r] = load(simd, out.get(r * S::F32_LANES..).unwrap_or_default());
    }
    row
}

/// `row` into `out`, as far as `out` goes.
#[allow(clippy::needless_range_loop)] // constant bounds, as in `tile`
#[inline(always)]
fn store_row<S: Simd, const NR: usize>(simd: S, row: [S::f32s; NR], out: &mut [f32]) {
    for r in 0..NR {
        if let Some(dst) = out.get_mut(r * S::F32_LANES..) {
            store(simd, row[r], dst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::simd_kinds::SimdKind;
    use crate::loader::quant::{QuantizedTensor, WeightFormat};
    use half::{bf16, f16};

    /// Each output as the module promises it: one chain of multiply-adds over the columns in
    /// order, from zero, with the weights widened to f32; fused, or (the one-lane fallback) with
    /// each product rounded.
    fn chain(x: &[f32], n: usize, k: usize, w: &[f32], m: usize, fused: bool) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for j in 0..m {
            for i in 0..n {
                let (wr, xr) = (&w[j * k..(j + 1) * k], &x[i * k..(i + 1) * k]);
                out[j * n + i] = wr.iter().zip(xr).fold(0.0f32, |s, (a, b)| {
                    if fused {
                        a.mul_add(*b, s)
                    } else {
                        a * b + s
                    }
                });
            }
        }
        out
    }

    /// `multiply` on every SIMD kind this CPU has (and the one-lane fallback): its name,
    /// whether it fuses, its output.
    fn each_kernel(
        x: &[f32],
        n: usize,
        k: usize,
        w: WeightView<'_>,
        m: usize,
    ) -> Vec<(&'static str, bool, Vec<f32>)> {
        let kinds = SimdKind::all().into_iter();
        let run = |(name, fuses, kind): (&'static str, bool, SimdKind)| {
            let mut out = vec![0.0f32; m * n];
            kind.run(Multiply { x, n, k, w, out_t: &mut out });
            (name, fuses, out)
        };
        kinds.map(run).collect()
    }

    fn values(len: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) * scale).collect()
    }

    /// Every kernel gives the chain's bits at odd sizes (partial token tiles, row groups and
    /// column chunks), for every weight kind.
    #[test]
    fn every_kernel_gives_the_chains_bits() {
        for (n, k, m) in
            [(1, 1, 1), (5, 7, 3), (17, 128, 13), (64, 129, 7), (65, 300, 97), (130, 256, 241)]
        {
            let x = values(n * k, 1, 1.0 / 997.0);
            let w32 = values(m * k, 2, 1.0 / 4096.0);
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            let mut views = vec![
                ("f32", WeightView::F32(&w32), w32.clone()),
                ("bf16", WeightView::Bf16(&wb), wb.iter().map(|v| v.to_f32()).collect()),
                ("f16", WeightView::F16(&wh), wh.iter().map(|v| v.to_f32()).collect()),
            ];
            let quantized: Vec<QuantizedTensor> =
                [WeightFormat::Int8, WeightFormat::Int4 { group: 32 }]
                    .into_iter()
                    .filter(|f| !matches!(f, WeightFormat::Int4 { group } if k % group != 0))
                    .map(|f| QuantizedTensor::from_f32("w", &w32, m, k, f).unwrap())
                    .collect();
            for q in &quantized {
                views.push(("quantized", WeightView::Quant(q), q.dequantize()));
            }
            for (kind, view, widened) in views {
                let fused = chain(&x, n, k, &widened, m, true);
                let rounded = chain(&x, n, k, &widened, m, false);
                for (kernel, fuses, got) in each_kernel(&x, n, k, view, m) {
                    let want = if fuses { &fused } else { &rounded };
                    for (e, (g, r)) in got.iter().zip(want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            r.to_bits(),
                            "{kernel} {kind} n={n} k={k} m={m} output {e}: {g} vs {r}"
                        );
                    }
                }
            }
        }
    }

    /// A chain that meets infinities and NaN keeps them to its own output.
    #[test]
    fn non_finite_values_stay_in_their_outputs() {
        let (n, k, m) = (20, 130, 9);
        let mut x = values(n * k, 3, 1.0 / 997.0);
        x[3 * k + 5] = f32::INFINITY;
        x[7 * k + 129] = f32::NAN;
        let w = values(m * k, 4, 1.0 / 4096.0);
        for (kernel, fuses, got) in each_kernel(&x, n, k, WeightView::F32(&w), m) {
            let want = chain(&x, n, k, &w, m, fuses);
            for j in 0..m {
                for i in 0..n {
                    let (g, r) = (got[j * n + i], want[j * n + i]);
                    assert_eq!(g.is_finite(), i != 3 && i != 7, "{kernel} token {i} row {j}: {g}");
                    assert!(
                        g.to_bits() == r.to_bits() || (g.is_nan() && r.is_nan()),
                        "{kernel}: {g} vs {r}"
                    );
                }
            }
        }
    }
}
