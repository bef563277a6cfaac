//! Helpers shared by the fuzz targets in `fuzz_targets/` and the seed generator in `examples/`:
//! a scratch folder per process, the demo model built once, and the tiny model every
//! model-folder target loads (its config.json and a writer for valid safetensors files).
//!
//! Not here: any property a target checks (each target states its own).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use phi3_core::{demo, Device, LoadOptions, Model};
use serde_json::{json, Value};

/// A folder for this process's scratch files: `$TMPDIR/phi3-fuzz-<pid>`, created on first use
/// and emptied of nothing (targets overwrite their files on every input). scripts/fuzz points
/// TMPDIR at a folder it removes afterwards.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("phi3-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the fuzz scratch folder");
        dir
    })
}

/// A fresh, empty sub-folder of [`scratch_dir`] named `name` (removed and re-created).
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = scratch_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a fuzz model folder");
    dir
}

/// Load options every target uses: the CPU backend.
pub fn cpu() -> LoadOptions {
    LoadOptions { device: Device::Cpu, ..Default::default() }
}

/// The built-in demo model (tokenizer, chat template, random weights), built once per process.
pub fn demo_model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| demo::demo_model(&cpu()).expect("the demo model builds"))
}

/// Session-file seeds carry this in place of the model fingerprint (64 characters, like the
/// lowercase hex of a real one, but never equal to one); `session_file` substitutes the demo
/// model's fingerprint, so the seeds stay valid when the demo model's weights change.
pub const FINGERPRINT_MARKER: &[u8; 64] =
    b"FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF";

/// The tiny model of the model-folder targets: 1 layer, hidden 8, 2 query heads sharing 1 KV
/// head (head_dim 4), vocab 16, tied embeddings. Its safetensors are about 1.5 KB in bf16.
pub fn tiny_config_json() -> String {
    json!({
        "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_act": "silu",
        "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2
    })
    .to_string()
}

/// The tensors of [`tiny_config_json`]'s model: (name, shape), in a fixed order.
pub fn tiny_tensors() -> Vec<(String, Vec<usize>)> {
    let p = "model.layers.0";
    vec![
        ("model.embed_tokens.weight".into(), vec![16, 8]),
        (format!("{p}.input_layernorm.weight"), vec![8]),
        (format!("{p}.self_attn.qkv_proj.weight"), vec![16, 8]),
        (format!("{p}.self_attn.o_proj.weight"), vec![8, 8]),
        (format!("{p}.post_attention_layernorm.weight"), vec![8]),
        (format!("{p}.mlp.gate_up_proj.weight"), vec![32, 8]),
        (format!("{p}.mlp.down_proj.weight"), vec![8, 16]),
        ("model.norm.weight".into(), vec![8]),
    ]
}

/// A safetensors file holding `tensors` (name, dtype name, shape) with small deterministic
/// values; `dtype` is "BF16", "F16" or "F32" (other names get 1-byte elements).
pub fn safetensors_bytes(tensors: &[(String, &str, Vec<usize>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut data = Vec::new();
    for (name, dtype, shape) in tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for i in 0..n {
            let x = 0.5 + 0.01 * (i % 17) as f32;
            match *dtype {
                "F32" => data.extend_from_slice(&x.to_le_bytes()),
                "F16" | "BF16" => {
                    // bf16: the upper half of the f32; f16 seeds reuse the bits (any value does).
                    data.extend_from_slice(&((x.to_bits() >> 16) as u16).to_le_bytes())
                }
                _ => data.push(i as u8),
            }
        }
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut header = Value::Object(header).to_string().into_bytes();
    // safetensors pads the header with spaces to a multiple of 8.
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    out
}
