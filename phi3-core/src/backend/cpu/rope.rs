//! RoPE application on the CPU: rotate q and k of fused qkv rows and write k, v into the cache.
//!
//! HF `apply_rotary_pos_emb` with `rotate_half` (GPT-NeoX layout, not interleaved): for the first
//! `rotary_dim` dims of each head, with h = rotary_dim / 2,
//!   out[i]     = x[i] * cos[i] - x[i + h] * sin[i]
//!   out[i + h] = x[i + h] * cos[i] + x[i] * sin[i]
//! and dims past `rotary_dim` (partial rotary) pass through.

use super::{CpuKvBatch, CpuKvPool};
use crate::backend::AttnParams;
use crate::rope::RopeBatch;

/// Rotate the leading `2 * cos.len()` dims of `head` in place.
fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = cos.len();
    for i in 0..h {
        let (x1, x2) = (head[i], head[i + h]);
        head[i] = x1 * cos[i] + (-x2) * sin[i];
        head[i + h] = x2 * cos[i] + x1 * sin[i];
    }
}

/// Returns rotated q `[rows, n_heads * head_dim]`; writes rotated k and v into each sequence's
/// blocks (tables checked by the caller).
pub(super) fn rope_store_kv(
    qkv: &[f32],
    qkv_cols: usize,
    batch: &CpuKvBatch,
    rope: &RopeBatch,
    pool: &mut CpuKvPool,
    layer: usize,
    p: &AttnParams,
) -> Vec<f32> {
    let (hd, half) = (p.head_dim, rope.half);
    let q_dim = p.n_heads * hd;
    let kv_dim = p.n_kv_heads * hd;
    let rows = qkv.len() / qkv_cols;
    let mut q_out = Vec::with_capacity(rows * q_dim);
    let mut k = Vec::with_capacity(kv_dim);
    for (seq, table) in batch.seqs.iter().zip(&batch.tables) {
        for t in 0..seq.len {
            let row_idx = seq.row + t;
            let row = &qkv[row_idx * qkv_cols..(row_idx + 1) * qkv_cols];
            let cos = &rope.cos[row_idx * half..(row_idx + 1) * half];
            let sin = &rope.sin[row_idx * half..(row_idx + 1) * half];

            let start = q_out.len();
            q_out.extend_from_slice(&row[..q_dim]);
            for head in q_out[start..].chunks_exact_mut(hd) {
                rotate(head, cos, sin);
            }

            let pos = seq.pos0 + t;
            k.clear();
            k.extend_from_slice(&row[q_dim..q_dim + kv_dim]);
            for head in k.chunks_exact_mut(hd) {
                rotate(head, cos, sin);
            }
            pool.write_row(table, layer, false, pos, &k);
            pool.write_row(table, layer, true, pos, &row[q_dim + kv_dim..q_dim + 2 * kv_dim]);
        }
    }
    q_out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_quarter_turn_and_partial_passthrough() {
        // head_dim 6, rotary 4 (h = 2): dims 4, 5 pass through.
        let mut head = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        rotate(&mut head[..4], &[0.0, 1.0], &[1.0, 0.0]);
        assert_eq!(head, [-3.0, 2.0, 1.0, 4.0, 5.0, 6.0]);
    }
}
