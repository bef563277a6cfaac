//! Element-wise ops: residual add, RMSNorm (HF `Phi3RMSNorm`), SwiGLU (HF `Phi3MLP`).

use rayon::prelude::*;

/// `acc += delta`, element-wise.
pub(super) fn add_in_place(acc: &mut [f32], delta: &[f32]) {
    acc.iter_mut().zip(delta).for_each(|(a, d)| *a += d);
}

/// Each row of `x` (`[rows, cols]`) normalised by its root mean square, times `weight`.
///
/// HF: `weight * (x * rsqrt(mean(x^2) + eps))` in f32. The mean is accumulated in f64, which
/// is at least as accurate as torch's pairwise f32 sum.
pub(super) fn rms_norm(x: &[f32], cols: usize, weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each(|(o, row)| {
        let sum_sq: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let variance = (sum_sq / cols as f64) as f32;
        let inv_rms = 1.0 / (variance + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = w * (v * inv_rms);
        }
    });
    out
}

/// `silu(gate) * up` for rows `[gate (ffn) | up (ffn)]` -> `[rows, ffn]`.
pub(super) fn swiglu(gate_up: &[f32], ffn: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; gate_up.len() / 2];
    out.par_chunks_mut(ffn).zip(gate_up.par_chunks(2 * ffn)).for_each(|(o, row)| {
        let (gate, up) = row.split_at(ffn);
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            // HF: up * silu(gate), silu(g) = g * sigmoid(g).
            *o = u * (g / (1.0 + (-g).exp()));
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let out = rms_norm(&[3.0, 3.0, -3.0, -3.0], 4, &[1.0, 2.0, 3.0, 4.0], 0.0);
        assert_eq!(out, vec![1.0, 2.0, -3.0, -4.0]);
    }

    #[test]
    fn swiglu_matches_definition() {
        let out = swiglu(&[0.0, 1.0, 5.0, 7.0], 2);
        let silu1 = 1.0 / (1.0 + (-1.0f32).exp());
        assert_eq!(out, vec![0.0, 7.0 * silu1]);
    }
}
