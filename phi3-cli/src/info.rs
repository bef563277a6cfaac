//! `phi3 info`: a model's configuration, size and memory needs.

use std::process::ExitCode;

use anyhow::Result;
use phi3_core::config::RopeScaling;
use phi3_core::{Model, ModelConfig};

use crate::cli::InfoArgs;
use crate::load::load_model;

/// Bytes per element of the KV cache on the CPU backend (f32).
#[cfg(test)]
const KV_ELEMENT_BYTES: u64 = 4;

pub fn run(args: &InfoArgs) -> Result<ExitCode> {
    let loaded = load_model(&args.model, None)?;
    let model = &loaded.model;
    let c = model.config();
    let context = args.context.unwrap_or(model.max_context() as u64);

    let mut rows: Vec<(&str, String)> = vec![
        ("model", loaded.name.clone()),
        ("model type", "phi3 (Phi3ForCausalLM)".into()),
        ("layers", c.num_hidden_layers.to_string()),
        ("hidden size", c.hidden_size.to_string()),
        ("intermediate size", c.intermediate_size.to_string()),
        ("attention heads", c.num_attention_heads.to_string()),
        ("kv heads", c.num_key_value_heads.to_string()),
        ("head dim", c.head_dim.to_string()),
        ("vocab", vocab_summary(model)),
        ("rope", rope_summary(c)),
        ("positions", positions_summary(c)),
        ("sliding window", c.sliding_window.map_or("none".into(), |w| format!("{w} tokens"))),
        ("tied embeddings", if c.tie_word_embeddings { "yes" } else { "no" }.into()),
        ("bos id", c.bos_token_id.map_or("none".into(), |id| id.to_string())),
        ("eos ids", id_list(&c.eos_token_ids)),
        ("stop ids", id_list(&model.default_stop_ids())),
        ("parameters", format!("{} ({})", si(c.parameter_count() as f64), c.parameter_count())),
    ];
    let stats = model.device_stats();
    let kv_per_token = stats.kv_bytes_per_token;
    rows.push(("weights", weights_summary(model)));
    rows.push(("device", stats.device.clone()));
    rows.push(("weights on device", binary(stats.weight_bytes as f64)));
    rows.push((
        "kv cache / token",
        format!("{} ({})", binary(kv_per_token as f64), stats.kv_dtype),
    ));
    rows.push((
        "kv cache",
        format!("{} for {context} tokens", binary(kv_per_token as f64 * context as f64)),
    ));
    if let Some(cuda) = &stats.cuda {
        let free = cuda.free_memory.map_or("?".into(), |f| binary(f as f64));
        rows.push((
            "device memory",
            format!("{free} free of {}", binary(cuda.total_memory as f64)),
        ));
        rows.push(("kv cache in use", binary(cuda.kv_bytes as f64)));
        rows.push(("kernels", cuda.kernels.to_string()));
    }

    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in rows {
        println!("{key:<width$}  {value}");
    }
    Ok(ExitCode::SUCCESS)
}

/// KV-cache bytes per token on the CPU backend (f32); the model's `device_stats` gives the
/// figure for the backend in use (bf16 on CUDA).
#[cfg(test)]
fn kv_bytes_per_token(c: &ModelConfig) -> u64 {
    c.num_hidden_layers as u64
        * 2
        * c.num_key_value_heads as u64
        * c.head_dim as u64
        * KV_ELEMENT_BYTES
}

fn vocab_summary(model: &Model) -> String {
    let vocab = model.config().vocab_size;
    match model.tokenizer() {
        Ok(t) if t.vocab_size() < vocab => {
            format!("{vocab} (tokenizer: {}, the rest is padding)", t.vocab_size())
        }
        Ok(_) => vocab.to_string(),
        Err(_) => format!("{vocab} (no tokenizer)"),
    }
}

fn rope_summary(c: &ModelConfig) -> String {
    let r = &c.rope;
    let base = format!("theta {}, rotary dim {} of {}", r.theta, r.rotary_dim, c.head_dim);
    match &r.scaling {
        RopeScaling::None => format!("default ({base})"),
        RopeScaling::LongRope { short_factor, long_factor, attention_factor, .. } => format!(
            "longrope ({base}, short factors {}, long factors {}, attention factor {attention_factor:.4})",
            range(short_factor),
            range(long_factor)
        ),
    }
}

fn positions_summary(c: &ModelConfig) -> String {
    match &c.rope.scaling {
        RopeScaling::LongRope { original_max_position_embeddings, .. } => format!(
            "max {}, original {original_max_position_embeddings}",
            c.max_position_embeddings
        ),
        RopeScaling::None => format!("max {}", c.max_position_embeddings),
    }
}

/// "n in [min, max]" of a factor list.
fn range(factors: &[f64]) -> String {
    let min = factors.iter().copied().fold(f64::INFINITY, f64::min);
    let max = factors.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} in [{min:.4}, {max:.4}]", factors.len())
}

fn id_list(ids: &[u32]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// Bytes of the weights the model uses, in their stored types, e.g. "27.9 GiB (... bytes, BF16)".
fn weights_summary(model: &Model) -> String {
    let bytes = model.weight_bytes();
    let dtypes: Vec<&str> = model.weight_dtypes().iter().map(|d| d.name()).collect();
    let format = model.weight_format();
    let stored = if format.is_quantized() {
        format!("projections {format}, the rest {}", dtypes.join("+"))
    } else {
        dtypes.join("+")
    };
    format!("{} ({bytes} bytes, {stored})", binary(bytes as f64))
}

/// A count with an SI suffix, e.g. "13.96 B" (parameters).
fn si(x: f64) -> String {
    for (div, unit) in [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")] {
        if x >= div {
            return format!("{:.2} {unit}", x / div);
        }
    }
    format!("{x}")
}

/// Bytes with a binary suffix, e.g. "52.0 GiB".
pub fn binary(bytes: f64) -> String {
    let mut x = bytes;
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
        if x < 1024.0 || unit == "TiB" {
            return if unit == "B" { format!("{x} B") } else { format!("{x:.1} {unit}") };
        }
        x /= 1024.0;
    }
    unreachable!("the loop returns at TiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(binary(512.0), "512 B");
        assert_eq!(binary(1536.0), "1.5 KiB");
        assert_eq!(binary(52.0 * (1u64 << 30) as f64), "52.0 GiB");
        assert_eq!(si(13_960_238_080.0), "13.96 B");
        assert_eq!(si(999.0), "999");
    }

    #[test]
    fn kv_estimate_of_phi3_medium() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/configs/Phi-3-medium-128k-instruct.config.json"
        ))
        .unwrap();
        let c = ModelConfig::from_json(&text).unwrap();
        // 40 layers x (K, V) x 10 kv heads x 128 dims x 4 bytes.
        assert_eq!(kv_bytes_per_token(&c), 40 * 2 * 10 * 128 * 4);
    }
}
