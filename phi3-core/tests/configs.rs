//! The published configs of the Phi-3 family parse into the shapes the forward pass expects.
//! (Factor values in these fixtures are approximations; fields and list lengths are as published.)

use std::path::Path;

use phi3_core::config::{ModelConfig, RopeScaling};

fn config(name: &str) -> ModelConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/configs")
        .join(format!("{name}.config.json"));
    ModelConfig::from_json(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn longrope(c: &ModelConfig) -> (usize, f64) {
    match &c.rope.scaling {
        RopeScaling::LongRope { original_max_position_embeddings, attention_factor, .. } => {
            (*original_max_position_embeddings, *attention_factor)
        }
        RopeScaling::None => panic!("expected longrope"),
    }
}

#[test]
fn phi3_medium_128k() {
    let c = config("Phi-3-medium-128k-instruct");
    assert_eq!((c.hidden_size, c.num_hidden_layers, c.num_attention_heads), (5120, 40, 40));
    assert_eq!((c.num_key_value_heads, c.head_dim, c.intermediate_size), (10, 128, 17920));
    assert_eq!((c.vocab_size, c.rope.rotary_dim), (32064, 128));
    let (orig, factor) = longrope(&c);
    assert_eq!(orig, 4096);
    let expected = (1.0 + (131072.0f64 / 4096.0).ln() / 4096f64.ln()).sqrt();
    assert!((factor - expected).abs() < 1e-12);
    // 14B parameters: 13.96e9 as published.
    let params = c.parameter_count() as f64;
    assert!((params / 1e9 - 13.96).abs() < 0.01, "{params}");
}

#[test]
fn phi3_mini_variants() {
    let c = config("Phi-3-mini-4k-instruct");
    assert_eq!(c.rope.scaling, RopeScaling::None);
    assert_eq!(c.sliding_window, Some(2047));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (32, 32, 96));
    for name in ["Phi-3-mini-128k-instruct", "Phi-3.5-mini-instruct"] {
        let c = config(name);
        assert_eq!(longrope(&c).0, 4096, "{name}");
        assert_eq!(c.rope.rotary_dim, 96, "{name}");
    }
    let params = config("Phi-3-mini-4k-instruct").parameter_count() as f64;
    assert!((params / 1e9 - 3.82).abs() < 0.01, "{params}");
}

#[test]
fn phi4_family() {
    let c = config("Phi-4");
    assert_eq!((c.vocab_size, c.rope.theta), (100352, 250000.0));
    assert_eq!(c.rope.scaling, RopeScaling::None);
    assert_eq!(c.eos_token_ids, vec![100265]);

    let c = config("Phi-4-mini-instruct");
    assert!(c.tie_word_embeddings);
    assert_eq!((c.vocab_size, c.head_dim, c.rope.rotary_dim), (200064, 128, 96));
    assert_eq!(longrope(&c).0, 4096);
}
