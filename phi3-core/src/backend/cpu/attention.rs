//! Causal GQA attention over the KV cache (HF `eager_attention_forward`).
//!
//! For each query row at position p and head h (KV head h / (n_heads / n_kv_heads)):
//! scores_j = (q · k_j) * scale for visible j (j <= p, and j > p - window with a sliding
//! window), softmax in f32 with the max subtracted, out = Σ p_j v_j.
//!
//! One task per (row, KV head), run in parallel: the query heads that share a KV head read each
//! key and value row once, together. A decode step (one row) thus spreads over all cores; with
//! one task per row it ran on one core while the KV reads, which grow with the context, came to
//! dominate the step (docs/PERF.md). Each head's arithmetic is the same, in the same order,
//! whatever the split, so the results do not depend on it.

use multiversion::multiversion;
use rayon::prelude::*;

use super::{CpuKvBatch, CpuKvPool};
use crate::backend::AttnParams;

/// `q`: `[rows, n_heads * head_dim]`; returns the same shape. Keys and values are read through
/// each sequence's block table (checked by the caller).
pub(super) fn attention(
    q: &[f32],
    rows: usize,
    batch: &CpuKvBatch,
    pool: &CpuKvPool,
    layer: usize,
    p: &AttnParams,
) -> Vec<f32> {
    let seqs = &batch.seqs;
    let hd = p.head_dim;
    let q_dim = p.n_heads * hd;
    let group = p.n_heads / p.n_kv_heads;
    // Which sequence each row belongs to.
    let mut row_seq = vec![0usize; rows];
    for (s, seq) in seqs.iter().enumerate() {
        row_seq[seq.row..seq.row + seq.len].iter_mut().for_each(|r| *r = s);
    }
    let mut out = vec![0.0f32; rows * q_dim];
    // Task `t`: row t / n_kv_heads, KV head t % n_kv_heads, whose query heads' outputs are the
    // `group * hd` values at t * group * hd. `scores` (`[group, visible]`) is reused by a thread.
    let scratch = || (Vec::new(), Vec::new(), Vec::new());
    let tasks = out.par_chunks_mut(group * hd).enumerate();
    tasks.for_each_init(scratch, |(scores, rows_k, rows_v), (task, out)| {
        let (row, kv_head) = (task / p.n_kv_heads, task % p.n_kv_heads);
        let seq = &seqs[row_seq[row]];
        let table = &batch.tables[row_seq[row]];
        let pos = seq.pos0 + (row - seq.row);
        let first = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let visible = pos + 1 - first;
        debug_assert!(visible > 0);
        let kv_off = kv_head * hd;
        let q_heads = &q[row * q_dim + kv_off * group..row * q_dim + (kv_off + hd) * group];
        // This task's key and value rows, gathered once: the loops below then run inside one
        // vectorised call each rather than a call per row and head.
        rows_k.clear();
        rows_v.clear();
        for j in first..=pos {
            rows_k.push(&pool.row(table, layer, false, j)[kv_off..kv_off + hd]);
            rows_v.push(&pool.row(table, layer, true, j)[kv_off..kv_off + hd]);
        }
        scores.clear();
        scores.resize(group * visible, 0.0);
        head_scores(q_heads, rows_k, p.scale, scores);
        weighted_values(scores, rows_v, out);
    });
    out
}

/// `scores` (`[heads, keys.len()]`) = each of the `heads` query heads in `q_heads` (`[heads,
/// hd]`) dotted with every key, times `scale`, then its softmax: the max subtracted, `exp`, and
/// divided by the sum, each step in the order of the keys.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn head_scores(q_heads: &[f32], keys: &[&[f32]], scale: f32, scores: &mut [f32]) {
    let hd = keys.first().map_or(1, |k| k.len()).max(1);
    for (qh, s) in q_heads.chunks_exact(hd).zip(scores.chunks_exact_mut(keys.len().max(1))) {
        for (s, k) in s.iter_mut().zip(keys) {
            *s = dot(qh, k) * scale;
        }
        let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0f32;
        for v in s.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        s.iter_mut().for_each(|v| *v /= sum);
    }
}

/// `out` (`[heads, hd]`) += Σ_j `weights[h, j]` * `values[j]` for each head, in the order of j.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn weighted_values(weights: &[f32], values: &[&[f32]], out: &mut [f32]) {
    let hd = values.first().map_or(1, |v| v.len()).max(1);
    for (oh, w) in out.chunks_exact_mut(hd).zip(weights.chunks_exact(values.len().max(1))) {
        for (&w, v) in w.iter().zip(values) {
            oh.iter_mut().zip(*v).for_each(|(o, &v)| *o += w * v);
        }
    }
}

/// Dot product with 8 independent accumulators (lets the compiler vectorise; the same bits on
/// every target, as the lanes do not depend on the vector width).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}
