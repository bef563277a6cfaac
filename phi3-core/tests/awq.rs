//! AWQ scale search of `phi3 quantize --awq` (`quantize/awq.rs`) on the HF fixtures:
//! - the fold is exact: the scaled model without quantization computes the original's logits
//!   (relative 1e-5), so any change after quantizing comes from the quantizer alone;
//! - the search never does worse than round-to-nearest on its own objective (α = 0 is in the
//!   grid);
//! - end to end, KL and top-1 agreement against native on the held text for RTN and AWQ are
//!   printed (`cargo test --release -p phi3-core --test awq -- --nocapture`). These fixtures have
//!   random weights without the activation outliers AWQ exploits, so no gain is asserted;
//! - `--awq` is refused for int8 and native weights;
//! - with GQA (the demo model written to a folder) o_proj is left unscaled and the fold of the
//!   other three projections is still exact.

use std::path::{Path, PathBuf};

use phi3_core::eval::{self, EvalOptions, HELD_TEXT};
use phi3_core::loader::Checkpoint;
use phi3_core::quantize::{self, QuantizeOptions, QuantizeReport};
use phi3_core::{Device, ErrorKind, LoadOptions, Model, WeightFormat};

const G32: WeightFormat = WeightFormat::Int4 { group: 32 };

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn load(dir: &Path) -> Model {
    let options = LoadOptions { device: Device::Cpu, ..Default::default() };
    Model::load(dir, &options).unwrap()
}

fn awq() -> QuantizeOptions {
    QuantizeOptions { awq: true, ..Default::default() }
}

/// Every position's logits of `tokens`, one token at a time (the fixtures' 64-token context).
fn logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut session = model.session(Default::default()).unwrap();
    tokens.iter().flat_map(|&t| session.append_tokens(&[t]).unwrap()).collect()
}

fn assert_searches_beat_rtn(report: &QuantizeReport) {
    let awq = report.awq.as_ref().expect("an AWQ report");
    assert!(awq.tokens > 0);
    for (i, layer) in awq.layers.iter().enumerate() {
        let searches = [Some(layer.qkv), layer.o, Some(layer.gate_up), Some(layer.down)];
        for s in searches.into_iter().flatten() {
            assert!(s.error.is_finite() && s.rtn_error.is_finite(), "layer {i}: {s:?}");
            assert!(s.error <= s.rtn_error, "layer {i}: {s:?}");
            assert!((0.0..1.0).contains(&s.alpha), "layer {i}: {s:?}");
        }
    }
}

#[test]
fn folding_without_quantizing_keeps_the_model() {
    for name in ["mha-f32-tied", "partial-rotary-f16"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("folded");
        let report = quantize::write_awq_folded(&fixture(name), &out, 32, &awq()).unwrap();
        assert_searches_beat_rtn(&report);
        let awq = report.awq.as_ref().unwrap();
        // The fold must change something, or this test proves nothing.
        let scaled = awq.layers.iter().any(|l| {
            [Some(l.qkv), l.o, Some(l.gate_up), Some(l.down)]
                .iter()
                .flatten()
                .any(|s| s.alpha > 0.0)
        });
        assert!(scaled, "{name}: every search chose α = 0");
        let checkpoint = Checkpoint::open(&out).unwrap();
        let norm = checkpoint.get("model.layers.0.input_layernorm.weight").unwrap().unwrap();
        assert_eq!(norm.dtype.name(), "F32", "{name}: folded norms are written in F32");

        let tokens: Vec<u32> = HELD_TEXT.bytes().take(48).map(u32::from).collect();
        let (a, b) = (logits(&load(&fixture(name)), &tokens), logits(&load(&out), &tokens));
        let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        println!("{name}: folded vs original: max |Δlogit| {diff:.3e} (max |logit| {scale:.3})");
        assert!(diff <= 1e-5 * scale, "{name}: max |Δ| {diff} vs max |logit| {scale}");
    }
}

#[test]
fn awq_against_rtn_on_the_held_text() {
    let name = "mha-f32-tied";
    let tmp = tempfile::tempdir().unwrap();
    let (rtn_dir, awq_dir) = (tmp.path().join("rtn"), tmp.path().join("awq"));
    let src = fixture(name);
    let rtn = quantize::quantize_folder(&src, &rtn_dir, G32, &Default::default()).unwrap();
    assert!(rtn.awq.is_none());
    let report = quantize::quantize_folder(&src, &awq_dir, G32, &awq()).unwrap();
    assert_searches_beat_rtn(&report);
    for (i, l) in report.awq.as_ref().unwrap().layers.iter().enumerate() {
        println!("{name} layer {i}: {l:?}");
    }

    let native = load(&src);
    let tokens: Vec<u32> = HELD_TEXT.bytes().take(256).map(u32::from).collect();
    let options = EvalOptions::default();
    let rtn = eval::compare(&native, &load(&rtn_dir), &tokens, &options).unwrap();
    let awq = eval::compare(&native, &load(&awq_dir), &tokens, &options).unwrap();
    for (label, c) in [("rtn", &rtn), ("awq", &awq)] {
        println!(
            "{name} int4-g32 {label}: top-1 {:.1}%, mean KL {:.4}, ppl ratio {:.3}",
            100.0 * c.top1_agreement(),
            c.mean_kl(),
            c.perplexity_ratio()
        );
        assert!(c.mean_kl().is_finite() && c.reference.tokens == 252, "{label}: {c:?}");
    }
}

#[test]
fn awq_is_refused_outside_int4() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("mha-f32-tied");
    for format in [WeightFormat::Int8, WeightFormat::Native] {
        let e = quantize::quantize_folder(&src, &tmp.path().join("x"), format, &awq()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{format}: {e}");
    }
    let e = quantize::quantize_folder(&src, &tmp.path().join("x"), WeightFormat::Int8, &awq())
        .unwrap_err();
    assert!(e.to_string().contains("int4"), "{e}");
    // A group that does not divide down_proj (112 wide) is refused before any search runs.
    let e = quantize::quantize_folder(
        &fixture("gqa-longrope-bf16"),
        &tmp.path().join("y"),
        G32,
        &awq(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(!tmp.path().join("x").exists() && !tmp.path().join("y").exists());
}

#[test]
fn calibration_text_is_not_the_held_text() {
    let calib = quantize::awq::CALIBRATION_TEXT;
    assert!(calib.len() > 3000);
    let first: String = HELD_TEXT.chars().take(80).collect();
    assert!(!calib.contains(&first));
    let config = phi3_core::ModelConfig::from_dir(&fixture("mha-f32-tied")).unwrap();
    let ids = quantize::awq::calibration_tokens(&fixture("mha-f32-tied"), &config, 512).unwrap();
    assert_eq!(ids.len(), 512);
    assert_eq!(ids[..3], [u32::from(b'A'), u32::from(b' '), u32::from(b'w')]);
    let e = quantize::awq::calibration_tokens(&fixture("mha-f32-tied"), &config, 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

/// The demo model (GQA: 8 query heads, 4 KV heads; rows divisible by 32) as a folder on disk:
/// its config, tokenizer and bf16 dummy weights.
fn demo_folder(dir: &Path) {
    use phi3_core::loader::{self, DType};
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), phi3_core::demo::demo_config_json()).unwrap();
    let (tokenizer, tokenizer_config) = phi3_core::demo::demo_tokenizer_files();
    std::fs::write(dir.join("tokenizer.json"), tokenizer).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config).unwrap();
    let config = phi3_core::ModelConfig::from_dir(dir).unwrap();
    let weights = loader::dummy(&config, DType::BF16, phi3_core::demo::DEMO_SEED).unwrap();
    let mut tensors = Vec::new();
    weights
        .try_map(|t| {
            tensors.push((t.name.clone(), t.shape.clone(), t.read_vec()?));
            Ok(())
        })
        .unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::BF16,
                shape.clone(),
                bytes,
            );
            (name.clone(), view.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn gqa_leaves_o_proj_unscaled_and_still_folds_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("demo");
    demo_folder(&src);
    let out = tmp.path().join("folded");
    let report = quantize::write_awq_folded(&src, &out, 32, &awq()).unwrap();
    assert_searches_beat_rtn(&report);
    let search = report.awq.as_ref().unwrap();
    // With GQA the v rows of qkv_proj do not line up with o_proj's inputs: no o_proj scales.
    assert!(search.layers.iter().all(|l| l.o.is_none()), "o_proj scaled under GQA");
    assert!(search.layers.iter().any(|l| l.qkv.alpha > 0.0 || l.down.alpha > 0.0));
    let tokens: Vec<u32> = (1..40).collect();
    let (a, b) = (logits(&load(&src), &tokens), logits(&load(&out), &tokens));
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    println!("demo (GQA): folded vs original: max |Δlogit| {diff:.3e} (max |logit| {scale:.3})");
    assert!(diff <= 1e-5 * scale, "max |Δ| {diff} vs max |logit| {scale}");
    // And the quantized folder loads and runs.
    let q = tmp.path().join("q");
    quantize::quantize_folder(&src, &q, G32, &awq()).unwrap();
    assert_eq!(load(&q).weight_format(), G32);
}
