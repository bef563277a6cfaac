//! Causal GQA attention over the KV cache (HF `eager_attention_forward`), on SIMD tiles.
//!
//! For each query row at position p and head h (KV head h / (n_heads / n_kv_heads)), over the
//! visible keys j (j <= p, and j > p - window with a sliding window):
//! - `s_j` = (q · k_j, one chain of fused multiply-adds over the head's dimensions in order,
//!   from zero) × scale;
//! - `m` = max_j s_j, `e_j` = exp(s_j − m) ([`simd_exp`](super::simd_exp)), `sum` = Σ_j e_j in
//!   the order of j, `w_j` = e_j / sum;
//! - `out[d]` = Σ_j w_j v_j[d], one chain of fused multiply-adds over j in order, from zero.
//!
//! Tiles and SIMD widths decide only which of these chains run side by side. So a row's output
//! does not depend on the rows batched or chunked with it, nor on whether it was decoded alone
//! (the batching tests hold solo and batched runs to the same bits), and it is the same bits on
//! AVX-512, AVX2 and NEON. pulp's one-lane fallback rounds each product instead (as gemm.rs).
//!
//! One task per (sequence, KV head, block of up to [`TASK_QUERIES`] queries: consecutive rows
//! times the KV head's query heads). The block's queries read each key and value row once,
//! together; with a task per row, every row read all its keys again, and at 2048 tokens that was
//! half of a prefill (docs/PERF.md, "CPU attention in blocks of rows"). A decode step is a block
//! of one row, and its KV heads spread over the cores. `head.rs` runs a task on SIMD tiles.

use rayon::prelude::*;

use super::{CpuKvBatch, CpuKvPool};
use crate::backend::AttnParams;
use head::{Head, Query};

mod head;

/// Queries a task takes at most: two vectors of 16 lanes, whose scores against a tile of keys
/// fill 16 of AVX-512's 32 registers.
const TASK_QUERIES: usize = 32;

/// One task: KV head `kv_head` of sequence `seq`, for its `rows` rows from batch row `row0`
/// (position `pos0`).
#[derive(Clone, Copy, Debug)]
struct Task {
    seq: usize,
    kv_head: usize,
    row0: usize,
    pos0: usize,
    rows: usize,
}

/// A task's buffers, kept by each thread between tasks.
#[derive(Default)]
struct Scratch<'a> {
    keys: Vec<&'a [f32]>,
    values: Vec<&'a [f32]>,
    scores: Vec<f32>,
    transposed: Vec<f32>,
}

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
    let q_dim = p.n_heads * p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let block_rows = (TASK_QUERIES / group).max(1);
    // A sequence's tasks: its blocks of rows in order, each with every KV head in order, from
    // `first_task[s]` on.
    let mut tasks = Vec::new();
    let mut first_task = Vec::with_capacity(batch.seqs.len());
    let mut row_seq = vec![None; rows];
    for (s, seq) in batch.seqs.iter().enumerate() {
        first_task.push(tasks.len());
        row_seq[seq.row..seq.row + seq.len].iter_mut().for_each(|r| *r = Some(s));
        for start in (0..seq.len).step_by(block_rows) {
            for kv_head in 0..p.n_kv_heads {
                let (row0, pos0) = (seq.row + start, seq.pos0 + start);
                let rows = block_rows.min(seq.len - start);
                tasks.push(Task { seq: s, kv_head, row0, pos0, rows });
            }
        }
    }
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(Scratch::default, |scratch, task| {
            run_task(task, q, batch, pool, layer, p, scratch)
        })
        .collect();
    // Each row gathers its heads' outputs from its block's tasks.
    let heads_len = group * p.head_dim;
    let mut out = vec![0.0f32; rows * q_dim];
    out.par_chunks_mut(q_dim).zip(&row_seq).enumerate().for_each(|(row, (out, s))| {
        let Some(s) = *s else { return };
        let within = row - batch.seqs[s].row;
        let block = first_task[s] + within / block_rows * p.n_kv_heads;
        let at = within % block_rows * heads_len;
        for (kv_head, out) in out.chunks_exact_mut(heads_len).enumerate() {
            out.copy_from_slice(&results[block + kv_head][at..at + heads_len]);
        }
    });
    out
}

/// One task's outputs: `[rows][group heads][head_dim]`.
fn run_task<'a>(
    task: &Task,
    q: &[f32],
    batch: &CpuKvBatch,
    pool: &'a CpuKvPool,
    layer: usize,
    p: &AttnParams,
    scratch: &mut Scratch<'a>,
) -> Vec<f32> {
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let q_dim = p.n_heads * hd;
    let table = &batch.tables[task.seq];
    let window_start = |pos: usize| p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
    // The keys some row of the block sees; indices below count from `key0`.
    let key0 = window_start(task.pos0);
    scratch.keys.clear();
    scratch.values.clear();
    for j in key0..task.pos0 + task.rows {
        scratch.keys.push(pool.head_row(table, layer, false, task.kv_head, j));
        scratch.values.push(pool.head_row(table, layer, true, task.kv_head, j));
    }
    let queries: Vec<Query<'_>> = (0..task.rows)
        .flat_map(|r| (0..group).map(move |g| (r, g)))
        .map(|(r, g)| {
            let pos = task.pos0 + r;
            let at = (task.row0 + r) * q_dim + (task.kv_head * group + g) * hd;
            Query { q: &q[at..at + hd], first: window_start(pos) - key0, last: pos - key0 }
        })
        .collect();
    let mut out = vec![0.0f32; queries.len() * hd];
    pulp::Arch::new().dispatch(Head {
        queries: &queries,
        keys: &scratch.keys,
        values: &scratch.values,
        scale: p.scale,
        scores: &mut scratch.scores,
        transposed: &mut scratch.transposed,
        out: &mut out,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{Backend, KvLayout, SeqSpan, KV_BLOCK_TOKENS};

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) / 700.0).collect()
    }

    /// A row's attention is the same bits whichever sequences share the pass, however its
    /// sequence is chunked, and whether it is decoded alone: what continuous batching and the
    /// prefill chunk rely on.
    #[test]
    fn rows_do_not_depend_on_the_batch_or_the_chunks() {
        let be = CpuBackend;
        for (n_heads, n_kv_heads, hd, window) in
            [(4, 2, 8, None), (6, 3, 20, Some(9)), (2, 2, 96, None)]
        {
            let layout = KvLayout { n_layers: 1, n_kv_heads, head_dim: hd };
            let mut pool = be.new_kv_pool(&layout).unwrap();
            be.grow_kv_pool(&mut pool, 12, 12).unwrap();
            // Three sequences of 60 cached tokens each, with unrelated block tables.
            let tables: Vec<Vec<u32>> =
                vec![vec![3, 0, 7, 1], vec![2, 9, 4, 11], vec![5, 6, 10, 8]];
            for (s, table) in tables.iter().enumerate() {
                let n = 4 * KV_BLOCK_TOKENS;
                be.kv_from_host(&mut pool, table, n, &values(2 * n * layout.row_len(), s)).unwrap();
            }
            let p = AttnParams {
                n_heads,
                n_kv_heads,
                head_dim: hd,
                rotary_dim: hd,
                scale: 0.3,
                sliding_window: window,
            };
            let q_dim = n_heads * hd;
            let q_at = |s: usize, pos: usize| values(q_dim, 1000 + 100 * s + pos);
            // Sequence s's rows for positions `positions`, each alone in a pass, through the
            // batch `spans` (seq, first position, rows) as one pass.
            let pass = |spans: &[(usize, usize, usize)]| -> Vec<Vec<f32>> {
                let mut seqs = Vec::new();
                let mut q = Vec::new();
                for &(s, pos0, len) in spans {
                    seqs.push(SeqSpan { row: q.len() / q_dim, len, pos0 });
                    (pos0..pos0 + len).for_each(|pos| q.extend(q_at(s, pos)));
                }
                let refs: Vec<&[u32]> = spans.iter().map(|&(s, ..)| &tables[s][..]).collect();
                let batch = be.kv_batch(&seqs, &refs).unwrap();
                let out = attention(&q, q.len() / q_dim, &batch, &pool, 0, &p);
                out.chunks_exact(q_dim).map(|r| r.to_vec()).collect()
            };
            let batched = pass(&[(0, 10, 4), (1, 33, 1), (2, 0, 45), (0, 50, 1)]);
            let mut alone = Vec::new();
            for &(s, pos0, len) in &[(0, 10, 4), (1, 33, 1), (2, 0, 45), (0, 50, 1)] {
                for pos in pos0..pos0 + len {
                    alone.extend(pass(&[(s, pos, 1)]));
                }
            }
            let chunked = [pass(&[(2, 0, 17)]), pass(&[(2, 17, 28)])].concat();
            let bits = |rows: &[Vec<f32>]| -> Vec<Vec<u32>> {
                rows.iter().map(|r| r.iter().map(|v| v.to_bits()).collect()).collect()
            };
            assert!(
                bits(&batched) == bits(&alone),
                "heads {n_heads}/{n_kv_heads}: batched vs alone"
            );
            assert!(
                bits(&batched[5..50]) == bits(&chunked),
                "heads {n_heads}/{n_kv_heads}: chunks"
            );
            assert!(batched.iter().flatten().all(|v| v.is_finite()));
        }
    }
}
