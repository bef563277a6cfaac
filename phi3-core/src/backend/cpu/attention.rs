//! Causal GQA attention over the KV cache (HF `eager_attention_forward`).
//!
//! For each query row at position p and head h (KV head h / (n_heads / n_kv_heads)):
//! scores_j = (q · k_j) * scale for visible j (j <= p, and j > p - window with a sliding
//! window), softmax in f32 with the max subtracted, out = Σ p_j v_j. Rows run in parallel.

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
    out.par_chunks_mut(q_dim).enumerate().for_each(|(row, out_row)| {
        let seq = &seqs[row_seq[row]];
        let table = &batch.tables[row_seq[row]];
        let pos = seq.pos0 + (row - seq.row);
        let first = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let mut scores = vec![0.0f32; pos + 1 - first];
        for h in 0..p.n_heads {
            let qh = &q[row * q_dim + h * hd..row * q_dim + (h + 1) * hd];
            let kv_off = (h / group) * hd;
            let mut max = f32::NEG_INFINITY;
            for (j, s) in (first..=pos).zip(scores.iter_mut()) {
                let k = &pool.row(table, layer, false, j)[kv_off..kv_off + hd];
                *s = dot(qh, k) * p.scale;
                max = max.max(*s);
            }
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let oh = &mut out_row[h * hd..(h + 1) * hd];
            for (j, &s) in (first..=pos).zip(scores.iter()) {
                let w = s / sum;
                let v = &pool.row(table, layer, true, j)[kv_off..kv_off + hd];
                oh.iter_mut().zip(v).for_each(|(o, &v)| *o += w * v);
            }
        }
    });
    out
}

/// Dot product with 8 independent accumulators (lets the compiler vectorise).
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
