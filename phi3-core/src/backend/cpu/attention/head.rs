//! One task's attention: its queries (consecutive rows × the query heads of one KV head)
//! against the keys and values they see, on SIMD tiles (the arithmetic is in `attention.rs`).
//! - Scores: the queries are vectorised (q transposed once to `[dimension][query]`) and each key
//!   element broadcast, on tiles of up to two query vectors by `NK` keys.
//! - Softmax: vectorised over the queries, down each query's column of scores.
//! - Weighted sum: the head's dimensions are vectorised and each weight broadcast, on tiles of
//!   `NQ` queries by `DV` vectors of dimensions, over blocks of [`KEY_BLOCK`] keys.
//!
//! Keys a query must not see (the causal edge inside a block, the window's edge) get a score of
//! -inf, so their `e_j` is exactly 0 and adds nothing to the sum, and the weighted sum skips
//! them: a NaN or infinity there cannot reach the query.

use std::ops::Range;

use pulp::{Simd, WithSimd};

use crate::backend::cpu::simd::{fuses, load, mul_add, store};
use crate::backend::cpu::simd_exp::exp;

/// Keys per pass of the weighted sum: their value rows (48 KiB at 96 dimensions) stay in L2
/// while each tile of queries passes over them.
const KEY_BLOCK: usize = 128;

/// One query vector of a task, and the keys it sees: `first..=last`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Query<'a> {
    pub(super) q: &'a [f32],
    pub(super) first: usize,
    pub(super) last: usize,
}

/// A task's queries against its keys and values; `out` is `[query][head_dim]`.
pub(super) struct Head<'a, 'b> {
    pub(super) queries: &'b [Query<'a>],
    pub(super) keys: &'b [&'a [f32]],
    pub(super) values: &'b [&'a [f32]],
    pub(super) scale: f32,
    pub(super) scores: &'b mut Vec<f32>,
    pub(super) transposed: &'b mut Vec<f32>,
    pub(super) out: &'b mut [f32],
}

impl WithSimd for Head<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Head { queries, keys, values, scale, scores, transposed, out } = self;
        let (nq, nk) = (queries.len(), keys.len());
        let hd = out.len() / nq.max(1);
        if nq == 0 || nk == 0 || hd == 0 {
            return;
        }
        let lanes = S::F32_LANES;
        let fused = fuses::<S>();
        let nv = nq.div_ceil(lanes);
        let stride = nv * lanes;
        // q transposed, `[dimension][stride]`: lanes past the queries hold zeros.
        transposed.clear();
        transposed.resize(hd * stride, 0.0);
        for (i, query) in queries.iter().enumerate() {
            for (d, &v) in query.q.iter().enumerate() {
                transposed[d * stride + i] = v;
            }
        }
        let bounds = Bounds::<S>::new(queries, nk, stride);
        scores.clear();
        scores.resize(nk * stride, 0.0);
        let pass = Scores {
            qt: S::as_simd_f32s(transposed).0,
            nv,
            keys,
            hd,
            scale,
            bounds: &bounds,
            fused,
        };
        let scores_v = S::as_mut_simd_f32s(scores).0;
        // Tiles of 2 query vectors × NK keys: 16 sums of 32 zmm registers, 10 of 16 ymm, 16 of
        // 32 NEON q registers.
        match lanes {
            16 => pass.run::<8>(simd, scores_v),
            8 => pass.run::<5>(simd, scores_v),
            4 => pass.run::<8>(simd, scores_v),
            _ => pass.run::<4>(simd, scores_v),
        }
        softmax(simd, fused, scores_v, nv);
        let sum = WeightedSum { queries, values, weights: scores, stride, hd, fused };
        // Tiles of NQ queries × DV vectors of dimensions: DV divides the head's vectors, and the
        // sums fill at most 24 registers (12 with AVX2's 16).
        let vectors = hd.div_ceil(lanes);
        let dv = [8, 6, 4, 3, 2, 1].into_iter().find(|dv| vectors % dv == 0).unwrap_or(1);
        match (lanes == 8, dv) {
            (false, 8) => sum.run::<S, 8, 3>(simd, out),
            (false, 6) => sum.run::<S, 6, 4>(simd, out),
            (false, 4) => sum.run::<S, 4, 6>(simd, out),
            (false, 3) => sum.run::<S, 3, 8>(simd, out),
            (false, 2) => sum.run::<S, 2, 8>(simd, out),
            (false, _) => sum.run::<S, 1, 8>(simd, out),
            (true, 8) => sum.run::<S, 8, 1>(simd, out),
            (true, 6) => sum.run::<S, 6, 2>(simd, out),
            (true, 4) => sum.run::<S, 4, 3>(simd, out),
            (true, 3) => sum.run::<S, 3, 4>(simd, out),
            (true, 2) => sum.run::<S, 2, 6>(simd, out),
            (true, _) => sum.run::<S, 1, 8>(simd, out),
        }
    }
}

/// Which keys each lane of the query vectors sees.
/// Lanes past the queries see every key.
struct Bounds<S: Simd> {
    first: Vec<S::i32s>,
    last: Vec<S::i32s>,
    /// Keys every query sees: no mask needed there.
    seen_by_all: Range<usize>,
}

impl<S: Simd> Bounds<S> {
    fn new(queries: &[Query<'_>], nk: usize, stride: usize) -> Self {
        let lane =
            |i: usize, f: fn(&Query<'_>) -> usize, pad: usize| queries.get(i).map_or(pad, f) as i32;
        let first: Vec<i32> = (0..stride).map(|i| lane(i, |q| q.first, 0)).collect();
        let last: Vec<i32> = (0..stride).map(|i| lane(i, |q| q.last, nk - 1)).collect();
        let from = queries.iter().map(|q| q.first).max().unwrap_or(0);
        let to = queries.iter().map(|q| q.last + 1).min().unwrap_or(0);
        Bounds {
            first: S::as_simd_i32s(&first).0.to_vec(),
            last: S::as_simd_i32s(&last).0.to_vec(),
            seen_by_all: from..to.max(from),
        }
    }
}

/// The scores pass: `scores[j][v]` (`[key][query vector]`) = q · k_j × scale, or -inf where
/// the lane's query does not see key j.
struct Scores<'a, 'b, S: Simd> {
    qt: &'b [S::f32s],
    nv: usize,
    keys: &'b [&'a [f32]],
    hd: usize,
    scale: f32,
    bounds: &'b Bounds<S>,
    fused: bool,
}

impl<S: Simd> Scores<'_, '_, S> {
    #[inline(always)]
    fn run<const NK: usize>(&self, simd: S, scores: &mut [S::f32s]) {
        let zeros = vec![0.0f32; self.hd];
        for k0 in (0..self.keys.len()).step_by(NK) {
            // Past the last key, a row of zeros: its scores are computed and dropped.
            let tile: [&[f32]; NK] = core::array::from_fn(|kk| {
                self.keys.get(k0 + kk).map_or(&zeros[..], |k| &k[..self.hd])
            });
            let mut v = 0;
            while v < self.nv {
                if self.nv - v >= 2 {
                    self.tile::<2, NK>(simd, &tile, k0, v, scores);
                    v += 2;
                } else {
                    self.tile::<1, NK>(simd, &tile, k0, v, scores);
                    v += 1;
                }
            }
        }
    }

    /// Query vectors `v0..v0 + QV` against the keys of `tile` (keys `k0..`).
    // Index loops with constant bounds keep the sums in registers (as in gemm.rs).
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    fn tile<const QV: usize, const NK: usize>(
        &self,
        simd: S,
        tile: &[&[f32]; NK],
        k0: usize,
        v0: usize,
        scores: &mut [S::f32s],
    ) {
        let mut sums = [[simd.splat_f32s(0.0); NK]; QV];
        for (d, qd) in self.qt.chunks_exact(self.nv).take(self.hd).enumerate() {
            let mut qv = [simd.splat_f32s(0.0); QV];
            qv.copy_from_slice(&qd[v0..v0 + QV]);
            for kk in 0..NK {
                let b = simd.splat_f32s(tile[kk][d]);
                for x in 0..QV {
                    sums[x][kk] = mul_add(simd, self.fused, qv[x], b, sums[x][kk]);
                }
            }
        }
        let scale = simd.splat_f32s(self.scale);
        let hidden = simd.splat_f32s(f32::NEG_INFINITY);
        for kk in 0..NK {
            let j = k0 + kk;
            if j >= self.keys.len() {
                break;
            }
            for x in 0..QV {
                let v = v0 + x;
                let mut s = simd.mul_f32s(sums[x][kk], scale);
                if !self.bounds.seen_by_all.contains(&j) {
                    let jv = simd.splat_i32s(j as i32);
                    let seen = simd.and_m32s(
                        simd.less_than_or_equal_i32s(self.bounds.first[v], jv),
                        simd.less_than_or_equal_i32s(jv, self.bounds.last[v]),
                    );
                    s = simd.select_f32s(seen, s, hidden);
                }
                scores[j * self.nv + v] = s;
            }
        }
    }
}

/// Each lane's scores down the keys (`scores`: `[key][nv]`) into softmax weights.
#[inline(always)]
fn softmax<S: Simd>(simd: S, fused: bool, scores: &mut [S::f32s], nv: usize) {
    let len = scores.len();
    for v in 0..nv {
        let column = || (v..len).step_by(nv);
        let mut max = simd.splat_f32s(f32::NEG_INFINITY);
        for j in column() {
            max = simd.max_f32s(max, scores[j]);
        }
        let mut sum = simd.splat_f32s(0.0);
        for j in column() {
            let e = exp(simd, fused, simd.sub_f32s(scores[j], max));
            scores[j] = e;
            sum = simd.add_f32s(sum, e);
        }
        for j in column() {
            scores[j] = simd.div_f32s(scores[j], sum);
        }
    }
}

/// Where a tile of the weighted sum sits: its first query and dimension, and the keys each of
/// its queries sees.
struct Tile<const NQ: usize> {
    q0: usize,
    d0: usize,
    first: [usize; NQ],
    last: [usize; NQ],
}

/// The weighted sum of the value rows: `out[i]` = Σ_j weights[j][i] · values[j] over the keys
/// query `i` sees.
struct WeightedSum<'a, 'b> {
    queries: &'b [Query<'a>],
    values: &'b [&'a [f32]],
    /// `[key][stride]`.
    weights: &'b [f32],
    stride: usize,
    hd: usize,
    fused: bool,
}

impl WeightedSum<'_, '_> {
    #[inline(always)]
    fn run<S: Simd, const DV: usize, const NQ: usize>(&self, simd: S, out: &mut [f32]) {
        let (nq, nk, lanes) = (self.queries.len(), self.values.len(), S::F32_LANES);
        for kb in (0..nk).step_by(KEY_BLOCK) {
            let block = kb..(kb + KEY_BLOCK).min(nk);
            for d0 in (0..self.hd).step_by(DV * lanes) {
                let mut q0 = 0;
                while q0 < nq {
                    // Whole tiles, then the queries left one at a time (a decode step's one to
                    // four), so no lane's work is thrown away.
                    if nq - q0 >= NQ {
                        self.tile::<S, DV, NQ>(simd, q0, d0, block.clone(), out);
                        q0 += NQ;
                    } else {
                        self.tile::<S, DV, 1>(simd, q0, d0, block.clone(), out);
                        q0 += 1;
                    }
                }
            }
        }
    }

    /// Queries `q0..q0 + NQ`, dimensions from `d0` (`DV` vectors), over the keys of `block`:
    /// continues the sums in `out`.
    #[allow(clippy::needless_range_loop)] // constant bounds, as in `Scores::tile`
    #[inline(always)]
    fn tile<S: Simd, const DV: usize, const NQ: usize>(
        &self,
        simd: S,
        q0: usize,
        d0: usize,
        block: Range<usize>,
        out: &mut [f32],
    ) {
        let lanes = S::F32_LANES;
        let first: [usize; NQ] = core::array::from_fn(|x| self.queries[q0 + x].first);
        let last: [usize; NQ] = core::array::from_fn(|x| self.queries[q0 + x].last);
        let lo = block.start.max(first.into_iter().min().unwrap_or(0));
        let hi = block.end.min(last.into_iter().max().unwrap_or(0) + 1);
        if lo >= hi {
            return;
        }
        // Keys every query of the tile sees, within lo..hi.
        let all_from = first.into_iter().max().unwrap_or(0).clamp(lo, hi);
        let all_to = (last.into_iter().min().unwrap_or(0) + 1).clamp(all_from, hi);
        let dims = |x: usize, dv: usize| {
            let at = (q0 + x) * self.hd + d0 + dv * lanes;
            at..(q0 + x + 1) * self.hd
        };
        let mut sums = [[simd.splat_f32s(0.0); DV]; NQ];
        for x in 0..NQ {
            for dv in 0..DV {
                sums[x][dv] = load(simd, &out[dims(x, dv)]);
            }
        }
        // Closures are not compiled for the SIMD target (an `fmadd` became a call): a method.
        let tile = Tile { q0, d0, first, last };
        self.span::<S, DV, NQ, true>(simd, &tile, lo..all_from, &mut sums);
        self.span::<S, DV, NQ, false>(simd, &tile, all_from..all_to, &mut sums);
        self.span::<S, DV, NQ, true>(simd, &tile, all_to..hi, &mut sums);
        for x in 0..NQ {
            for dv in 0..DV {
                store(simd, sums[x][dv], &mut out[dims(x, dv)]);
            }
        }
    }

    /// The tile's sums over `keys`; with `CHECK`, each key only for the queries that see it.
    #[allow(clippy::needless_range_loop)] // constant bounds, as in `Scores::tile`
    #[inline(always)]
    fn span<S: Simd, const DV: usize, const NQ: usize, const CHECK: bool>(
        &self,
        simd: S,
        tile: &Tile<NQ>,
        keys: Range<usize>,
        sums: &mut [[S::f32s; DV]; NQ],
    ) {
        let lanes = S::F32_LANES;
        for j in keys {
            let row = &self.values[j][tile.d0..];
            let mut v = [simd.splat_f32s(0.0); DV];
            for dv in 0..DV {
                v[dv] = load(simd, &row[dv * lanes..]);
            }
            let weights = &self.weights[j * self.stride + tile.q0..][..NQ];
            for x in 0..NQ {
                if CHECK && (j < tile.first[x] || j > tile.last[x]) {
                    continue;
                }
                let w = simd.splat_f32s(weights[x]);
                for dv in 0..DV {
                    sums[x][dv] = mul_add(simd, self.fused, w, v[dv], sums[x][dv]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::simd_exp;
    use crate::backend::cpu::simd_kinds::SimdKind;

    fn values(len: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) * scale).collect()
    }

    /// A task's inputs as `run_task` builds them: `rows` rows of `group` query heads from
    /// position `pos0`, with an optional window.
    struct Case {
        hd: usize,
        group: usize,
        rows: usize,
        pos0: usize,
        window: Option<usize>,
        q: Vec<f32>,
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    }

    impl Case {
        fn new(hd: usize, group: usize, rows: usize, pos0: usize, window: Option<usize>) -> Self {
            let nk = pos0 + rows - Self::window_start(window, pos0);
            let keys = (0..nk).map(|j| values(hd, 10 + j, 1.0 / 300.0)).collect();
            let vals = (0..nk).map(|j| values(hd, 5000 + j, 1.0 / 700.0)).collect();
            let q = values(rows * group * hd, 3, 1.0 / 250.0);
            Case { hd, group, rows, pos0, window, q, keys, values: vals }
        }

        fn window_start(window: Option<usize>, pos: usize) -> usize {
            window.map_or(0, |w| (pos + 1).saturating_sub(w))
        }

        fn queries(&self) -> Vec<Query<'_>> {
            let key0 = Self::window_start(self.window, self.pos0);
            (0..self.rows * self.group)
                .map(|i| {
                    let pos = self.pos0 + i / self.group;
                    Query {
                        q: &self.q[i * self.hd..(i + 1) * self.hd],
                        first: Self::window_start(self.window, pos) - key0,
                        last: pos - key0,
                    }
                })
                .collect()
        }

        /// The module's arithmetic, one query and one chain at a time.
        fn reference(&self, fused: bool) -> Vec<f32> {
            let madd = |a: f32, b: f32, c: f32| if fused { a.mul_add(b, c) } else { a * b + c };
            let exp = |x: f32| {
                let simd = pulp::Scalar::new();
                simd_exp::exp(simd, fused, x)
            };
            let scale = 0.37f32;
            let mut out = Vec::new();
            for query in self.queries() {
                let seen = query.first..=query.last;
                let scores: Vec<f32> = seen
                    .clone()
                    .map(|j| {
                        let dot = query.q.iter().zip(&self.keys[j]);
                        dot.fold(0.0f32, |s, (a, b)| madd(*a, *b, s)) * scale
                    })
                    .collect();
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let e: Vec<f32> = scores.iter().map(|&s| exp(s - max)).collect();
                let sum = e.iter().fold(0.0f32, |s, &v| s + v);
                for d in 0..self.hd {
                    let terms = seen.clone().zip(&e);
                    out.push(terms.fold(0.0f32, |s, (j, &e)| madd(e / sum, self.values[j][d], s)));
                }
            }
            out
        }

        /// The task on every SIMD kind this CPU has (and the one-lane fallback): its name,
        /// whether it fuses, its output.
        fn each_kernel(&self) -> Vec<(&'static str, bool, Vec<f32>)> {
            let queries = self.queries();
            let keys: Vec<&[f32]> = self.keys.iter().map(|k| &k[..]).collect();
            let vals: Vec<&[f32]> = self.values.iter().map(|v| &v[..]).collect();
            let run = |(name, fuses, kind): (&'static str, bool, SimdKind)| {
                let (mut scores, mut transposed) = (Vec::new(), Vec::new());
                let mut out = vec![0.0f32; queries.len() * self.hd];
                kind.run(Head {
                    queries: &queries,
                    keys: &keys,
                    values: &vals,
                    scale: 0.37,
                    scores: &mut scores,
                    transposed: &mut transposed,
                    out: &mut out,
                });
                (name, fuses, out)
            };
            SimdKind::all().into_iter().map(run).collect()
        }
    }

    /// Every kernel gives the reference's bits: whole and partial tiles of queries, keys and
    /// dimensions, GQA groups, a decode row past a key block, windows.
    #[test]
    fn every_kernel_gives_the_chains_bits() {
        for (hd, group, rows, pos0, window) in [
            (96, 1, 32, 40, None),
            (128, 4, 8, 0, None),
            (5, 3, 5, 20, Some(7)),
            (24, 1, 1, 300, None),
            (16, 2, 3, 9, Some(1)),
            (40, 5, 6, 130, Some(64)),
            (96, 1, 17, 0, None),
        ] {
            let case = Case::new(hd, group, rows, pos0, window);
            let (fused, rounded) = (case.reference(true), case.reference(false));
            for (kernel, fuses, got) in case.each_kernel() {
                let want = if fuses { &fused } else { &rounded };
                assert_eq!(got.len(), want.len());
                for (e, (g, r)) in got.iter().zip(want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        r.to_bits(),
                        "{kernel} hd={hd} group={group} rows={rows} pos0={pos0} \
                         window={window:?} output {e}: {g} vs {r}"
                    );
                }
            }
        }
    }

    /// The reference is attention: each output is a convex combination of the values it sees
    /// (checked in f64 against a plain softmax).
    #[test]
    fn the_reference_is_softmax_attention() {
        let case = Case::new(24, 2, 4, 10, Some(6));
        let got = case.reference(true);
        for (i, query) in case.queries().iter().enumerate() {
            let seen: Vec<usize> = (query.first..=query.last).collect();
            let s: Vec<f64> = seen
                .iter()
                .map(|&j| {
                    let dot: f64 =
                        query.q.iter().zip(&case.keys[j]).map(|(a, b)| (a * b) as f64).sum();
                    dot * 0.37
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|v| (v - max).exp()).sum();
            for d in 0..case.hd {
                let want: f64 = seen
                    .iter()
                    .zip(&s)
                    .map(|(&j, v)| (v - max).exp() / sum * case.values[j][d] as f64)
                    .sum();
                let g = got[i * case.hd + d] as f64;
                assert!((g - want).abs() < 1e-6, "query {i} dim {d}: {g} vs {want}");
            }
        }
    }

    /// Keys a query does not see cannot reach it, even when they are not finite: a row early
    /// in a block next to a later row's NaN key and infinite value.
    #[test]
    fn unseen_keys_do_not_reach_a_query() {
        let mut case = Case::new(32, 2, 6, 4, Some(3));
        // Key 7 (position 7) is seen by the rows at positions 7..=9 only.
        case.keys[7] = vec![f32::NAN; 32];
        case.values[7] = vec![f32::INFINITY; 32];
        for (kernel, _, got) in case.each_kernel() {
            for (i, query) in case.queries().iter().enumerate() {
                let sees = (query.first..=query.last).contains(&7);
                let out = &got[i * 32..(i + 1) * 32];
                assert_eq!(out.iter().all(|v| v.is_finite()), !sees, "{kernel} query {i}");
                assert_eq!(out.iter().all(|v| v.is_nan()), sees, "{kernel} query {i}");
            }
        }
    }
}
