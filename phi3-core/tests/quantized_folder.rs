//! `phi3 quantize` folders (`quantize::quantize_folder`, `loader/quant_file.rs`): written from a
//! fixture, they load without quantizing again and compute exactly what quantizing at load
//! computes; bad requests and corrupt folders are refused naming what is wrong.

use std::fs;
use std::path::{Path, PathBuf};

use phi3_core::quantize::{quantize_folder, QuantizeOptions};
use phi3_core::{Device, ErrorKind, LoadOptions, Model, SessionOptions, WeightFormat};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn load(dir: &Path, weights: WeightFormat) -> phi3_core::Result<Model> {
    Model::load(dir, &LoadOptions { device: Device::Cpu, weights, ..Default::default() })
}

/// Logits after each of a few tokens, one at a time, then a 5-token prefill.
fn logits(model: &Model) -> Vec<Vec<f32>> {
    let mut s = model.session(SessionOptions::default()).unwrap();
    let mut out: Vec<Vec<f32>> = (1..6).map(|t| s.append_tokens(&[t]).unwrap()).collect();
    let mut s = model.session(SessionOptions::default()).unwrap();
    out.push(s.append_tokens(&[7, 3, 9, 4, 1]).unwrap());
    out
}

#[test]
fn quantized_folders_load_as_they_were_quantized() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["mha-f32-tied", "partial-rotary-f16", "sliding-window-f32"] {
        let src = fixtures_dir().join(name);
        for format in [WeightFormat::Int8, WeightFormat::Int4 { group: 32 }] {
            // A shard limit smaller than one projection: every tensor gets its own file.
            for shard_bytes in [None, Some(1)] {
                let out = tmp.path().join(format!("{name}-{format}-{shard_bytes:?}"));
                let options = QuantizeOptions { shard_bytes, ..Default::default() };
                let report = quantize_folder(&src, &out, format, &options).unwrap();
                let sharded = out.join("model.safetensors.index.json").is_file();
                assert_eq!(sharded, shard_bytes.is_some(), "{name} {format}");
                assert_eq!(report.files.len() > 1, sharded);
                assert!(report.bytes_out < report.bytes_in, "{name} {format}: {report:?}");
                // Loaded as stored, with "native" (the default) or the same format named.
                let at_load = load(&src, format).unwrap();
                for asked in [WeightFormat::Native, format] {
                    let stored = load(&out, asked).unwrap();
                    assert_eq!(stored.weight_format(), format);
                    assert_eq!(stored.weight_bytes(), at_load.weight_bytes());
                    assert_eq!(logits(&stored), logits(&at_load), "{name} {format}");
                }
                // Another format would quantize twice: refused, naming both.
                let other = if format == WeightFormat::Int8 {
                    WeightFormat::Int4 { group: 32 }
                } else {
                    WeightFormat::Int8
                };
                let e = load(&out, other).err().unwrap();
                assert_eq!(e.kind(), ErrorKind::InvalidArgument);
                assert!(e.to_string().contains(&format.to_string()), "{e}");
            }
        }
    }
}

#[test]
fn tokenizer_and_generation_config_are_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("mha-f32-tied");
    let out = tmp.path().join("q");
    quantize_folder(&src, &out, WeightFormat::Int8, &QuantizeOptions::default()).unwrap();
    for file in ["generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        if src.join(file).is_file() {
            assert_eq!(fs::read(src.join(file)).unwrap(), fs::read(out.join(file)).unwrap());
        }
    }
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["quant_method"], "phi3-rs");
    assert_eq!(config["quantization_config"]["weights"], "int8");
    assert_eq!(config["hidden_size"], 64);
}

#[test]
fn bad_requests_are_refused_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = |n: &str| fixtures_dir().join(n);
    let out = tmp.path().join("q");
    let opts = QuantizeOptions::default();
    let int4 = WeightFormat::Int4 { group: 32 };
    // down_proj of gqa-longrope-bf16 is 112 wide: no group divides it.
    let e = quantize_folder(&fixture("gqa-longrope-bf16"), &out, int4, &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("mlp.down_proj.weight"), "{e}");
    let e = quantize_folder(&fixture("mha-f32-tied"), &out, WeightFormat::Native, &opts);
    assert_eq!(e.unwrap_err().kind(), ErrorKind::InvalidArgument);
    let e = quantize_folder(&tmp.path().join("nope"), &out, int4, &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing written");
    // An existing output folder is not overwritten; an already-quantized source is refused.
    quantize_folder(&fixture("mha-f32-tied"), &out, int4, &opts).unwrap();
    let e = quantize_folder(&fixture("mha-f32-tied"), &out, int4, &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("already exists"), "{e}");
    let e = quantize_folder(&out, &tmp.path().join("q2"), int4, &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("already quantized"), "{e}");
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1, "only the first output");
}

/// The byte range of tensor `name` in a single-file safetensors.
fn tensor_range(file: &Path, name: &str) -> std::ops::Range<usize> {
    let bytes = fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offsets = &header[name]["data_offsets"];
    let (a, b) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
    8 + n + a as usize..8 + n + b as usize
}

#[test]
fn corrupt_quantized_folders_are_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("mha-f32-tied");
    let int4 = WeightFormat::Int4 { group: 32 };
    let out = tmp.path().join("q");
    quantize_folder(&src, &out, int4, &QuantizeOptions::default()).unwrap();
    let file = out.join("model.safetensors");
    let original = fs::read(&file).unwrap();
    // A zero point of 16 (only 0..=15 are levels).
    let zeros = "model.layers.1.mlp.down_proj.qzeros";
    let mut bytes = original.clone();
    bytes[tensor_range(&file, zeros).start] = 16;
    fs::write(&file, &bytes).unwrap();
    let e = load(&out, WeightFormat::Native).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::ModelFormat);
    assert!(e.to_string().contains(zeros), "{e}");
    // A NaN scale.
    let scales = "model.layers.0.self_attn.qkv_proj.scales";
    let mut bytes = original.clone();
    let at = tensor_range(&file, scales).start;
    bytes[at..at + 2].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    fs::write(&file, &bytes).unwrap();
    let e = load(&out, WeightFormat::Native).err().unwrap();
    assert!(e.to_string().contains(scales) && e.to_string().contains("NaN"), "{e}");
    // A config naming a newer version of the format.
    fs::write(&file, &original).unwrap();
    let config_path = out.join("config.json");
    let config = fs::read_to_string(&config_path).unwrap();
    fs::write(&config_path, config.replace("\"version\": 1", "\"version\": 2")).unwrap();
    let e = load(&out, WeightFormat::Native).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    // An unknown quantization method.
    fs::write(&config_path, config.replace("\"phi3-rs\"", "\"bitsandbytes\"")).unwrap();
    let e = load(&out, WeightFormat::Native).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("bitsandbytes"), "{e}");
}

#[test]
fn lm_head_is_quantized_on_request_and_refused_when_tied() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures_dir().join("partial-rotary-f16");
    let format = WeightFormat::Int8;
    let plain = tmp.path().join("plain");
    let with_head = tmp.path().join("head");
    let options = QuantizeOptions { lm_head: true, ..Default::default() };
    let a = quantize_folder(&src, &plain, format, &QuantizeOptions::default()).unwrap();
    let b = quantize_folder(&src, &with_head, format, &options).unwrap();
    assert_eq!(b.quantized, a.quantized + 1);
    assert!(b.bytes_out < a.bytes_out);
    let checkpoint = phi3_core::loader::Checkpoint::open(&with_head).unwrap();
    assert!(checkpoint.get_raw("lm_head.qweight").is_some());
    assert!(checkpoint.get_raw("lm_head.weight").is_none());
    let (plain, head) = (load(&plain, format).unwrap(), load(&with_head, format).unwrap());
    assert!(head.weight_bytes() < plain.weight_bytes());
    // Close to the dense-lm_head model (int8 rounding of one more matrix), but not equal.
    let (x, y) = (logits(&plain), logits(&head));
    for (x, y) in x.iter().zip(&y) {
        let num: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
        let rel = (num / den).sqrt();
        assert!(rel > 0.0 && rel < 0.02, "relative L2 {rel}");
    }
    let tied = fixtures_dir().join("mha-f32-tied");
    let e = quantize_folder(&tied, &tmp.path().join("t"), format, &options).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("tied"), "{e}");
}
