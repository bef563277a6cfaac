//! Writes the committed seed corpora, `seeds/<target>/`, from scratch:
//!
//! ```text
//! cd fuzz && cargo run --example gen_seeds -- seeds
//! ```
//!
//! Each seed is small (the whole set stays well under 1 MB) and deterministic. Besides valid
//! inputs there are hand-made hostile ones: headers that claim terabytes, offsets that overlap or
//! overflow, shard names that leave the folder, template syntax inside chat messages, session
//! headers claiming 2^40 tokens. Session-file seeds carry [`FINGERPRINT_MARKER`] in place of the
//! demo model's fingerprint (the target substitutes it) and a checksum that is valid when written.

use std::path::Path;

use phi3_core::{GenerateOptions, Session, SessionOptions};
use phi3_fuzz::{
    demo_model, safetensors_bytes, scratch_dir, tiny_config_json, tiny_tensors, FINGERPRINT_MARKER,
};
use serde_json::json;

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| "seeds".into());
    let out = Path::new(&out);
    config_json(&out.join("config_json"));
    model_folder(&out.join("model_folder"));
    shard_index(&out.join("shard_index"));
    chat_text(&out.join("chat_text"));
    session_file(&out.join("session_file"));
}

fn config_json(dir: &Path) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    for entry in std::fs::read_dir(fixtures.join("configs")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        write(dir, &name, std::fs::read(&path).unwrap());
    }
    for model in ["gqa-longrope-bf16", "partial-rotary-f16", "sliding-window-f32"] {
        let mut text = std::fs::read(fixtures.join(model).join("config.json")).unwrap();
        text.push(0);
        text.extend(std::fs::read(fixtures.join(model).join("generation_config.json")).unwrap());
        write(dir, &format!("{model}+generation.json"), text);
    }
    write(dir, "demo.json", phi3_core::demo::demo_config_json());
    // Sizes at and past the limits, and products that overflow.
    let base = serde_json::from_str::<serde_json::Value>(&tiny_config_json()).unwrap();
    let variants = [
        ("context-1e9.json", json!({"max_position_embeddings": 1_000_000_000u64})),
        ("context-1e12.json", json!({"max_position_embeddings": 1_000_000_000_000u64})),
        (
            "max-dims.json",
            json!({"vocab_size": 1 << 20, "hidden_size": 1 << 20, "intermediate_size": 1 << 20,
                   "num_hidden_layers": 1 << 20, "num_attention_heads": 1 << 20,
                   "num_key_value_heads": 1 << 20, "head_dim": 1 << 20}),
        ),
        ("u64-max.json", json!({"hidden_size": u64::MAX, "num_attention_heads": 1})),
        ("negative.json", json!({"vocab_size": -1, "eos_token_id": [-1, 2]})),
        (
            "longrope.json",
            json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.0],
                   "long_factor": [1.0, 2.0]}, "original_max_position_embeddings": 8}),
        ),
        (
            "rope-parameters.json",
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e300,
                   "partial_rotary_factor": 0.5}}),
        ),
    ];
    for (name, patch) in variants {
        let mut config = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            config[k] = v.clone();
        }
        write(dir, name, config.to_string());
    }
    write(dir, "generation-many-eos.json", {
        let mut text = tiny_config_json().into_bytes();
        text.push(0);
        text.extend(br#"{"eos_token_id": [2, 3, 3, 4, 4294967295], "bos_token_id": -5}"#);
        text
    });
}

fn tiny_st(dtype: &str) -> Vec<(String, &str, Vec<usize>)> {
    tiny_tensors().into_iter().map(|(n, s)| (n, dtype, s)).collect()
}

/// A safetensors file with `header` (JSON text) and `data_len` zero bytes of data.
fn raw_safetensors(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + data_len, 0);
    out
}

fn model_folder(dir: &Path) {
    for dtype in ["BF16", "F16", "F32"] {
        write(dir, &format!("tiny-{dtype}.safetensors"), safetensors_bytes(&tiny_st(dtype)));
    }
    // Wrong dtype for one tensor, wrong shape for another, a missing tensor.
    let mut t = tiny_st("BF16");
    t[1].1 = "I8";
    t[2].2 = vec![8, 16];
    t.pop();
    write(dir, "wrong-dtype-shape-missing.safetensors", safetensors_bytes(&t));
    let name = "model.embed_tokens.weight";
    // A header length of 2^63; a header that claims terabytes of data; overlapping and
    // overflowing offsets; a shape whose product overflows.
    let mut huge_header = (1u64 << 63).to_le_bytes().to_vec();
    huge_header.extend_from_slice(b"{}");
    write(dir, "header-len-2^63.safetensors", huge_header);
    let terabytes = format!(
        r#"{{"{name}":{{"dtype":"BF16","shape":[1099511627776,8],"data_offsets":[0,17592186044416]}}}}"#
    );
    write(dir, "claims-16TiB.safetensors", raw_safetensors(&terabytes, 256));
    let overlap = format!(
        r#"{{"{name}":{{"dtype":"BF16","shape":[16,8],"data_offsets":[0,256]}},"model.norm.weight":{{"dtype":"BF16","shape":[8],"data_offsets":[240,256]}}}}"#
    );
    write(dir, "overlapping-offsets.safetensors", raw_safetensors(&overlap, 256));
    let wrap = format!(
        r#"{{"{name}":{{"dtype":"BF16","shape":[16,8],"data_offsets":[18446744073709551615,255]}}}}"#
    );
    write(dir, "offset-u64-max.safetensors", raw_safetensors(&wrap, 256));
    let product = format!(
        r#"{{"{name}":{{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}}}"#
    );
    write(dir, "shape-product-overflows.safetensors", raw_safetensors(&product, 0));
    let mut truncated = safetensors_bytes(&tiny_st("BF16"));
    truncated.truncate(truncated.len() - 100);
    write(dir, "truncated-data.safetensors", truncated);
}

fn shard_index(dir: &Path) {
    let names: Vec<String> = tiny_tensors().into_iter().map(|(n, _)| n).collect();
    let index = |shards: &dyn Fn(usize) -> String| {
        let map: serde_json::Map<String, serde_json::Value> =
            names.iter().enumerate().map(|(i, n)| (n.clone(), json!(shards(i)))).collect();
        json!({"metadata": {"total_size": 1456}, "weight_map": map}).to_string()
    };
    let good = |i: usize| format!("model-0000{}-of-00002.safetensors", 1 + usize::from(i >= 4));
    write(dir, "valid.json", index(&good));
    let escapes = [
        ("dotdot.json", "../outside.safetensors"),
        ("absolute.json", "/etc/passwd"),
        ("subdir.json", "sub/model-00002-of-00002.safetensors"),
        ("dot.json", "."),
        ("empty.json", ""),
        ("missing.json", "model-00003-of-00002.safetensors"),
        ("nul.json", "model-00002-of-00002.safetensors\u{0}"),
        ("backslash.json", "..\\outside.safetensors"),
    ];
    for (file, shard) in escapes {
        write(dir, file, index(&|i| if i >= 4 { shard.to_string() } else { good(i) }));
    }
    // Every tensor from the outside file, and tensors mapped to the wrong shard.
    write(dir, "all-outside.json", index(&|_| "../outside.safetensors".to_string()));
    write(dir, "wrong-shard.json", index(&|i| good(i + 4)));
    write(dir, "not-an-object.json", r#"{"weight_map": ["model-00001-of-00002.safetensors"]}"#);
}

fn chat_text(dir: &Path) {
    let seeds: [&[u8]; 12] = [
        b"Hello world, the river is green and the sea is blue.",
        b"caf\xc3\xa9 na\xc3\xafve \xf0\x9f\x98\x80 \xe2\x96\x81 spaces  and\ttabs\n",
        b"\xff\xfe not utf-8 \xc3",
        b"<s>hi</s><|user|>\nHello<|end|>\n<|assistant|>\n",
        b"\0user\x01{{ 7*7 }}\0assistant\x01{% for m in messages %}{{ m }}{% endfor %}",
        b"\0system\x01{{ raise_exception('x') }}\0user\x01{# comment #}{% raw %}",
        b"text\0tool\x01{{ messages[0]['content'] }}\0<|end|>\x01role with template syntax",
        b"\0user\x01\0assistant\x01\0system\x01",
        b"\0{{ bos_token }}\0{%- if true %}yes{% endif -%}\0{{ ''.join(['a']) | safe }}",
        b"    leading spaces\0user\x01   \n\n  ",
        b"\0user\x01<|assistant|>\n<|end|>\n<|endoftext|>",
        b"Hi\0user\x01\xe2\x96\x81\xe2\x96\x81\0assistant\x01\xf0\x9f\x8c\x8a\xf0\x9f\x8c\x8a",
    ];
    for (i, seed) in seeds.iter().enumerate() {
        write(dir, &format!("seed-{i:02}"), seed);
    }
}

fn session_file(dir: &Path) {
    let model = demo_model();
    let fingerprint: String = model.fingerprint().iter().map(|b| format!("{b:02x}")).collect();
    let marker = std::str::from_utf8(FINGERPRINT_MARKER).unwrap();
    let saved = |session: &Session, name: &str| {
        let path = scratch_dir().join("seed.phi3");
        session.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes[16..]).into_owned();
        assert!(text.contains(&fingerprint));
        let mut bytes = bytes;
        let at = bytes.windows(64).position(|w| w == fingerprint.as_bytes()).unwrap();
        bytes[at..at + 64].copy_from_slice(marker.as_bytes());
        write(dir, name, &bytes);
        bytes
    };
    let small = SessionOptions { max_context: Some(32), ..Default::default() };
    // Empty; two raw tokens (logits and KV); a chat message pending (no KV); a generated reply.
    let empty = model.session(small.clone()).unwrap();
    saved(&empty, "empty.phi3");
    let mut two = model.session(small.clone()).unwrap();
    two.append_tokens(&[1, 300]).unwrap();
    let two_bytes = saved(&two, "two-tokens.phi3");
    let mut chat = model.session(small.clone()).unwrap();
    chat.append_message("user", "{{ 7*7 }}").unwrap();
    saved(&chat, "chat-pending.phi3");
    let mut reply = model.session(small).unwrap();
    reply.append_message("user", "Hi").unwrap();
    let options = GenerateOptions { max_tokens: 2, seed: Some(1), ..Default::default() };
    reply.generate(&options, |_, _| std::ops::ControlFlow::Continue(())).unwrap();
    saved(&reply, "chat-reply.phi3");

    // Hand-made headers that claim huge sizes, each followed by a few bytes only.
    let header_len = u32::from_le_bytes(two_bytes[12..16].try_into().unwrap()) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&two_bytes[16..16 + header_len]).unwrap();
    let claims = [
        (
            "tokens-2^40.phi3",
            json!({"n_tokens": 1u64 << 40, "kv_tokens": 1u64 << 40,
            "max_context": 1u64 << 40}),
        ),
        ("kv-usize-max.phi3", json!({"kv_tokens": u64::MAX, "n_tokens": u64::MAX})),
        ("dims-overflow.phi3", json!({"n_layers": u64::MAX, "kv_dim": u64::MAX})),
        ("vocab-terabyte.phi3", json!({"vocab": 1u64 << 40, "has_logits": true})),
        ("kv-past-tokens.phi3", json!({"kv_tokens": 3})),
        ("long-rope-short-history.phi3", json!({"long_rope": true})),
        ("zero-rng.phi3", json!({"rng_state": [0, 0, 0, 0]})),
        ("pending-with-logits.phi3", json!({"kv_tokens": 1})),
    ];
    for (name, patch) in claims {
        let mut h = header.clone();
        for (k, v) in patch.as_object().unwrap() {
            h[k] = v.clone();
        }
        let text = h.to_string();
        let mut bytes = two_bytes[..12].to_vec();
        bytes.extend_from_slice(&(text.len() as u32).to_le_bytes());
        bytes.extend_from_slice(text.as_bytes());
        bytes.extend_from_slice(&two_bytes[16 + header_len..]);
        write(dir, name, &bytes);
    }
    // A header length of 4 GiB, and of 16 MiB + 1.
    for (name, len) in [("header-len-4GiB.phi3", u32::MAX), ("header-len-16MiB.phi3", 16 << 20)] {
        let mut bytes = two_bytes[..12].to_vec();
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&two_bytes[16..]);
        write(dir, name, &bytes);
    }
}
