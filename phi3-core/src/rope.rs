//! Rotary position tables (plain RoPE and LongRoPE), shared by all backends.
//!
//! HF reference: `modeling_rope_utils.py` (`_compute_default_rope_parameters`,
//! `_compute_longrope_parameters`, the longrope branch of `dynamic_rope_update`) and
//! `modeling_phi3.py` (`Phi3RotaryEmbedding.forward`, `apply_rotary_pos_emb`).
//!
//! Numerics follow HF's float32 path step by step, so that angles agree to the last bit where
//! possible: inv_freq = 1 / (factor_i * theta^(2i/d)) in f32; angle = f32(pos) * inv_freq (one f32
//! product, as HF's K=1 matmul); cos/sin of that f32 angle, times the attention factor in f32.
//!
//! Regime (LongRoPE only): a forward whose sequence is at most `original_max_position_embeddings`
//! tokens long uses the short factors, otherwise the long ones, for every position (HF:
//! `seq_len = max(position_ids) + 1 > original_max`). A session whose length crosses the threshold
//! recomputes its cache in the new regime (see `kv_cache.rs` for why re-rotating keys is not enough).
//!
//! Not here: applying the rotation (each backend's `rope_store_kv`).

use crate::config::{RopeConfig, RopeScaling};

/// Which LongRoPE factor set a sequence is rotated with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeRegime {
    /// Short factors (also the only regime of plain RoPE).
    Short,
    /// Long factors: the sequence is longer than `original_max_position_embeddings`.
    Long,
}

/// The frequencies of one regime.
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// Leading dimensions of each head that rotate; the rest pass through.
    pub rotary_dim: usize,
    inv_freq: Vec<f32>, // [rotary_dim / 2]
    attention_factor: f32,
}

/// Both regimes of a model and the rule that picks one.
#[derive(Clone, Debug)]
pub struct Rope {
    short: RopeTables,
    long: Option<RopeTables>,
    original_max: usize,
}

/// cos/sin for every token of a forward pass, computed once and used by every layer.
#[derive(Clone, Debug)]
pub struct RopeBatch {
    /// Half the rotary dimension: the number of distinct frequencies.
    pub half: usize,
    /// Cosines of every token's angles, `[n_tokens, half]`, attention factor included.
    pub cos: Vec<f32>,
    /// Sines of every token's angles, `[n_tokens, half]`, attention factor included.
    pub sin: Vec<f32>,
}

impl RopeTables {
    fn new(theta: f64, rotary_dim: usize, factors: Option<&[f64]>, attention_factor: f64) -> Self {
        let inv_freq = (0..rotary_dim / 2)
            .map(|i| {
                // torch: arange(0, dim, 2).float() / dim, then base ** that, both in f32.
                let exponent = (2 * i) as f32 / rotary_dim as f32;
                let base_pow = theta.powf(exponent as f64) as f32;
                let factor = factors.map_or(1.0, |f| f[i] as f32);
                1.0f32 / (factor * base_pow)
            })
            .collect();
        RopeTables { rotary_dim, inv_freq, attention_factor: attention_factor as f32 }
    }

    /// The inverse frequencies, `[rotary_dim / 2]` (HF's `inv_freq` buffer).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// HF's f32 rotation angle of frequency `i` at position `pos`.
    fn angle(&self, pos: usize, i: usize) -> f32 {
        pos as f32 * self.inv_freq[i]
    }

    /// Append cos and sin of `pos` (each `rotary_dim / 2` values, attention factor applied).
    pub fn push_cos_sin(&self, pos: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        for i in 0..self.inv_freq.len() {
            let angle = self.angle(pos, i) as f64;
            cos.push(angle.cos() as f32 * self.attention_factor);
            sin.push(angle.sin() as f32 * self.attention_factor);
        }
    }
}

impl Rope {
    /// Tables for a model's rope configuration.
    pub fn new(config: &RopeConfig) -> Rope {
        match &config.scaling {
            RopeScaling::None => Rope {
                short: RopeTables::new(config.theta, config.rotary_dim, None, 1.0),
                long: None,
                original_max: usize::MAX,
            },
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => Rope {
                short: RopeTables::new(
                    config.theta,
                    config.rotary_dim,
                    Some(short_factor),
                    *attention_factor,
                ),
                long: Some(RopeTables::new(
                    config.theta,
                    config.rotary_dim,
                    Some(long_factor),
                    *attention_factor,
                )),
                original_max: *original_max_position_embeddings,
            },
        }
    }

    /// The regime of a sequence holding `len` tokens (HF: max position + 1 > original max).
    pub fn regime_for_len(&self, len: usize) -> RopeRegime {
        if self.long.is_some() && len > self.original_max {
            RopeRegime::Long
        } else {
            RopeRegime::Short
        }
    }

    /// The tables of a regime.
    pub fn tables(&self, regime: RopeRegime) -> &RopeTables {
        match (regime, &self.long) {
            (RopeRegime::Long, Some(long)) => long,
            _ => &self.short,
        }
    }

    /// Half the rotary dimension.
    pub fn half(&self) -> usize {
        self.short.rotary_dim / 2
    }
}

impl RopeBatch {
    /// An empty batch for `half` frequencies.
    pub fn new(half: usize) -> Self {
        RopeBatch { half, cos: Vec::new(), sin: Vec::new() }
    }

    /// Append the rows of positions `positions` rotated with `tables`.
    pub fn push_positions(&mut self, tables: &RopeTables, positions: std::ops::Range<usize>) {
        for pos in positions {
            tables.push_cos_sin(pos, &mut self.cos, &mut self.sin);
        }
    }

    /// Number of rows (tokens).
    pub fn len(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// True when no rows were pushed.
    pub fn is_empty(&self) -> bool {
        self.cos.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn longrope() -> RopeConfig {
        RopeConfig {
            theta: 10_000.0,
            rotary_dim: 8,
            scaling: RopeScaling::LongRope {
                short_factor: vec![1.0, 1.1, 1.2, 1.3],
                long_factor: vec![1.0, 2.0, 4.0, 8.0],
                original_max_position_embeddings: 16,
                attention_factor: 1.2,
            },
        }
    }

    #[test]
    fn regime_switches_after_original_max() {
        let rope = Rope::new(&longrope());
        assert_eq!(rope.regime_for_len(16), RopeRegime::Short);
        assert_eq!(rope.regime_for_len(17), RopeRegime::Long);
        let plain = Rope::new(&RopeConfig { scaling: RopeScaling::None, ..longrope() });
        assert_eq!(plain.regime_for_len(1 << 30), RopeRegime::Short);
    }

    #[test]
    fn position_zero_is_identity_times_factor() {
        let rope = Rope::new(&longrope());
        let mut b = RopeBatch::new(rope.half());
        b.push_positions(rope.tables(RopeRegime::Long), 0..1);
        assert!(b.cos.iter().all(|&c| (c - 1.2).abs() < 1e-6));
        assert!(b.sin.iter().all(|&s| s == 0.0));
    }
}
