//! The CPU backend against HF transformers: fixtures from `tests/oracle/make_fixtures.py`.
//!
//! Each fixture folder holds a tiny random Phi3ForCausalLM (config.json + safetensors) and
//! `oracle.safetensors`: `tokens` [L], `logits` [L, vocab] where row i is the last-position
//! logits of HF's full no-cache forward of tokens[..=i] (float32, eager attention), and a
//! greedy continuation computed by repeated full forwards.
//!
//! Tolerance: both sides compute in f32 from the same (rounded) weights; they differ only in
//! summation order (torch's blocked GEMM vs our blocked/SIMD sums, pairwise vs f64 RMS means).
//! Each f32 sum of k terms carries a relative error of about sqrt(k) * 2^-24 ≈ 1e-6 for k ≈ 128,
//! and a few layers compound that to ~1e-5 at most; we assert a relative L2 error per logits row
//! below 1e-4, ten times that estimate and far below the 1e-2-level error of a real mistake
//! (a wrong rope regime, factor or mask shows up as > 1e-2 — see `wrong_regime_is_detected`).

use std::path::{Path, PathBuf};

use phi3_core::{sampler, Device, LoadOptions, Model, Session, SessionOptions};

const MAX_REL_L2: f64 = 1e-4;

struct Oracle {
    name: String,
    tokens: Vec<u32>,
    vocab: usize,
    logits: Vec<f32>, // [L, vocab]
    greedy_prompt: Vec<u32>,
    greedy_tokens: Vec<u32>,
    original_max: Option<usize>,
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn model_names() -> Vec<&'static str> {
    vec!["gqa-longrope-bf16", "mha-f32-tied", "partial-rotary-f16", "sliding-window-f32"]
}

fn load(name: &str) -> (Model, Oracle) {
    let dir = fixtures_dir().join(name);
    let options = LoadOptions { device: Device::Cpu, ..Default::default() };
    let model = Model::load(&dir, &options).unwrap_or_else(|e| panic!("{name}: {e}"));
    let bytes = std::fs::read(dir.join("oracle.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ints = |key: &str| -> Vec<u32> {
        st.tensor(key)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect()
    };
    let logits_view = st.tensor("logits").unwrap();
    let vocab = logits_view.shape()[1];
    let logits = logits_view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let original_max = match &model.config().rope.scaling {
        phi3_core::config::RopeScaling::LongRope { original_max_position_embeddings, .. } => {
            Some(*original_max_position_embeddings)
        }
        phi3_core::config::RopeScaling::None => None,
    };
    let oracle = Oracle {
        name: name.to_string(),
        tokens: ints("tokens"),
        vocab,
        logits,
        greedy_prompt: ints("greedy_prompt"),
        greedy_tokens: ints("greedy_tokens"),
        original_max,
    };
    assert_eq!(model.config().vocab_size, vocab, "{name}: vocab");
    (model, oracle)
}

impl Oracle {
    fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.vocab..(i + 1) * self.vocab]
    }

    /// Assert our logits after `len` tokens match HF's full forward of tokens[..len].
    fn check(&self, got: &[f32], len: usize, how: &str) -> f64 {
        let want = self.row(len - 1);
        assert_eq!(got.len(), want.len());
        let err = rel_l2(got, want);
        assert!(
            err < MAX_REL_L2,
            "{} ({how}): logits after {len} tokens differ from HF: relative L2 {err:.3e}",
            self.name
        );
        err
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn session(model: &Model) -> Session {
    model.session(SessionOptions::default()).unwrap()
}

#[test]
fn token_by_token_decoding_matches_full_forward() {
    for name in model_names() {
        let (model, oracle) = load(name);
        let mut s = session(&model);
        let mut worst: f64 = 0.0;
        for (i, &t) in oracle.tokens.iter().enumerate() {
            let logits = s.append_tokens(&[t]).unwrap();
            worst = worst.max(oracle.check(&logits, i + 1, "one token at a time"));
        }
        if let Some(orig) = oracle.original_max {
            assert!(
                oracle.tokens.len() > orig,
                "{name}: fixture must cross the LongRoPE threshold"
            );
            assert!(s.kv_state().1, "{name}: cache should be in the long regime");
        }
        println!("{name}: worst relative L2 over {} steps: {worst:.2e}", oracle.tokens.len());
    }
}

#[test]
fn prefill_of_every_prefix_matches() {
    for name in model_names() {
        let (model, oracle) = load(name);
        for len in 1..=oracle.tokens.len() {
            let mut s = session(&model);
            let logits = s.append_tokens(&oracle.tokens[..len]).unwrap();
            oracle.check(&logits, len, "one prefill");
        }
    }
}

#[test]
fn chunked_appends_across_the_threshold_match() {
    for name in model_names() {
        let (model, oracle) = load(name);
        let n = oracle.tokens.len();
        let mut s = session(&model);
        // Chunk boundaries chosen to straddle original_max (16) with multi-token chunks.
        let mut start = 0;
        for end in [5, 14, 19, 20, 31, n] {
            let end = end.min(n);
            if end <= start {
                continue;
            }
            let logits = s.append_tokens(&oracle.tokens[start..end]).unwrap();
            oracle.check(&logits, end, "chunked");
            start = end;
        }
    }
}

#[test]
fn truncate_back_below_threshold_recomputes_in_short_regime() {
    for name in ["gqa-longrope-bf16", "partial-rotary-f16"] {
        let (model, oracle) = load(name);
        let mut s = session(&model);
        s.append_tokens(&oracle.tokens).unwrap();
        assert!(s.kv_state().1);
        // Back to 10 tokens (short regime), then forward one at a time across again.
        s.truncate(10).unwrap();
        for len in 11..=oracle.tokens.len() {
            let logits = s.append_tokens(&oracle.tokens[len - 1..len]).unwrap();
            oracle.check(&logits, len, "after truncate");
        }
    }
}

#[test]
fn fork_continues_independently() {
    let (model, oracle) = load("gqa-longrope-bf16");
    let mut a = session(&model);
    a.append_tokens(&oracle.tokens[..12]).unwrap();
    let mut b = a.fork().unwrap();
    // Diverge `a`, then check `b` still continues the original sequence exactly.
    a.append_tokens(&[3, 4, 5, 6, 7, 8, 9]).unwrap();
    let logits = b.append_tokens(&oracle.tokens[12..30]).unwrap();
    oracle.check(&logits, 30, "fork");
    assert_eq!(b.tokens(), &oracle.tokens[..30]);
    assert_eq!(a.len(), 19);
}

#[test]
fn greedy_continuation_matches_exactly() {
    for name in model_names() {
        let (model, oracle) = load(name);
        let mut s = session(&model);
        let mut logits = s.append_tokens(&oracle.greedy_prompt).unwrap();
        let mut produced = Vec::new();
        for _ in 0..oracle.greedy_tokens.len() {
            let next = sampler::greedy(&logits, model.emittable_vocab()).unwrap();
            produced.push(next);
            logits = s.append_tokens(&[next]).unwrap();
        }
        assert_eq!(produced, oracle.greedy_tokens, "{name}: greedy continuation");
    }
}

#[test]
fn wrong_regime_is_detected() {
    // Guard against a tolerance too loose to see a real mistake: rows after the threshold must
    // differ from the rows HF computes with short factors by far more than MAX_REL_L2.
    let (_, oracle) = load("gqa-longrope-bf16");
    let dir = fixtures_dir().join("gqa-longrope-bf16");
    let bytes = std::fs::read(dir.join("oracle.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // logits_full_forward row 15 comes from a forward of all 40 tokens: long regime at position 15.
    let full: Vec<f32> = st
        .tensor("logits_full_forward")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let long_row15 = &full[15 * oracle.vocab..16 * oracle.vocab];
    let err = rel_l2(long_row15, oracle.row(15));
    assert!(err > 100.0 * MAX_REL_L2, "regimes indistinguishable: {err:.2e}");
}

#[test]
fn rope_tables_equal_hf_buffers_bit_for_bit() {
    use phi3_core::rope::{Rope, RopeRegime};
    for (name, keys) in [
        (
            "gqa-longrope-bf16",
            vec![
                ("rope_inv_freq_short", RopeRegime::Short),
                ("rope_inv_freq_long", RopeRegime::Long),
            ],
        ),
        (
            "partial-rotary-f16",
            vec![
                ("rope_inv_freq_short", RopeRegime::Short),
                ("rope_inv_freq_long", RopeRegime::Long),
            ],
        ),
        ("mha-f32-tied", vec![("rope_inv_freq", RopeRegime::Short)]),
        ("sliding-window-f32", vec![("rope_inv_freq", RopeRegime::Short)]),
    ] {
        let (model, _) = load(name);
        let rope = Rope::new(&model.config().rope);
        let bytes = std::fs::read(fixtures_dir().join(name).join("oracle.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (key, regime) in keys {
            let want: Vec<f32> = st
                .tensor(key)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(rope.tables(regime).inv_freq(), &want[..], "{name}: {key}");
        }
    }
}
