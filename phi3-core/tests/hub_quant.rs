//! AWQ and GPTQ int4 checkpoints (tests/fixtures/quant, made by
//! tests/oracle/make_quant_fixtures.py from the reference libraries' formats) read by
//! `loader::hub_quant` must dequantize to the reference weights bit for bit.

use std::path::{Path, PathBuf};

use phi3_core::loader::hub_quant::{self, GptqFormat, HubQuant};
use phi3_core::loader::Checkpoint;
use phi3_core::ErrorKind;

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/quant").join(case)
}

fn scheme_of(dir: &Path) -> HubQuant {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    hub_quant::from_config(&json).unwrap().expect("fixture has a quantization_config")
}

/// Every `PREFIX.weight` of oracle.safetensors: (prefix, [out, in], f32 values).
fn references(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("oracle.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let prefix = name.strip_suffix(".weight").unwrap().to_string();
            (prefix, view.shape().to_vec(), values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn check_case(case: &str, expected: HubQuant) {
    let dir = case_dir(case);
    let scheme = scheme_of(&dir);
    assert_eq!(scheme, expected, "{case}");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let refs = references(&dir);
    assert!(!refs.is_empty());
    for (prefix, shape, want) in refs {
        assert!(hub_quant::is_quantized(&ckpt, &prefix));
        let t = hub_quant::read_projection(&ckpt, &scheme, &prefix, shape[0], shape[1])
            .unwrap_or_else(|e| panic!("{case}: {prefix}: {e}"));
        let got = t.dequantize();
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{case}: {prefix}[{}, {}]: {g} != reference {w}",
                k / shape[1],
                k % shape[1]
            );
        }
    }
}

#[test]
fn awq_gemm_matches_autoawq_dequantize_bit_for_bit() {
    check_case("awq-g32", HubQuant::Awq { group: 32 });
    check_case("awq-g64", HubQuant::Awq { group: 64 });
}

#[test]
fn gptq_v1_matches_reference_dequantize_bit_for_bit() {
    // Asymmetric, with zeros of 0 (stored as field 15 with a borrow): GPTQModel's v1 reading.
    check_case("gptq-v1-g32", HubQuant::Gptq { group: 32, format: GptqFormat::V1, lm_head: false });
    // Symmetric, desc_act with static_groups: a trivial g_idx, where AutoGPTQ agrees.
    check_case(
        "gptq-v1-g128-sym",
        HubQuant::Gptq { group: 128, format: GptqFormat::V1, lm_head: false },
    );
}

#[test]
fn gptq_v2_matches_gptqmodel_dequantize_bit_for_bit() {
    check_case("gptq-v2-g64", HubQuant::Gptq { group: 64, format: GptqFormat::V2, lm_head: false });
}

#[test]
fn wrong_scheme_or_shape_names_file_and_tensor() {
    let dir = case_dir("awq-g32");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let prefix = "model.layers.0.self_attn.qkv_proj";
    // The AWQ file read as GPTQ: qweight is [64, 6], GPTQ wants [8, 48].
    let gptq = HubQuant::Gptq { group: 32, format: GptqFormat::V1, lm_head: false };
    let e = hub_quant::read_projection(&ckpt, &gptq, prefix, 48, 64).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ModelFormat);
    let msg = e.message();
    assert!(msg.contains("model.safetensors") && msg.contains(&format!("{prefix}.qweight")), "{e}");
    // A projection the config says is wider than the file.
    let e = hub_quant::read_projection(&ckpt, &HubQuant::Awq { group: 32 }, prefix, 48, 128)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ModelFormat);
    assert!(e.message().contains(&format!("{prefix}.qweight")), "{e}");
    // A projection that is not there.
    let missing = "model.layers.1.self_attn.qkv_proj";
    assert!(!hub_quant::is_quantized(&ckpt, missing));
    let e = hub_quant::read_projection(&ckpt, &HubQuant::Awq { group: 32 }, missing, 48, 64)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ModelFormat);
    assert!(e.message().contains(missing), "{e}");
}

/// Whole AWQ / GPTQ checkpoints of the `mha-f32-tied` fixture (tests/oracle/make_quant_models.py)
/// load through `Model::load` and compute HF transformers' logits for the dequantized weights.
/// Tolerance as in tests/oracle.rs (1e-4 relative L2 per row: f32 summation-order noise is
/// ~1e-5 here; a wrong nibble, zero or scale moves the logits by far more).
#[test]
fn awq_and_gptq_models_match_transformers_on_their_dequantized_weights() {
    use phi3_core::{Device, LoadOptions, Model, SessionOptions, WeightFormat};
    for case in ["model-awq-g32", "model-gptq-v1-g32"] {
        let dir = case_dir(case);
        let options = LoadOptions { device: Device::Cpu, ..Default::default() };
        let model = Model::load(&dir, &options).unwrap();
        assert_eq!(model.weight_format(), WeightFormat::Int4 { group: 32 }, "{case}");
        let bytes = std::fs::read(dir.join("oracle.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tokens: Vec<u32> = st
            .tensor("tokens")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect();
        let logits = st.tensor("logits").unwrap();
        let vocab = logits.shape()[1];
        let logits: Vec<f32> = logits
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let mut session = model.session(SessionOptions::default()).unwrap();
        for (i, &t) in tokens.iter().enumerate() {
            // One token at a time (the GEMV path), then the whole prompt in one prefill.
            let ours = session.append_tokens(&[t]).unwrap();
            let hf = &logits[i * vocab..(i + 1) * vocab];
            let num: f64 = ours.iter().zip(hf).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let den: f64 = hf.iter().map(|b| (*b as f64).powi(2)).sum();
            assert!((num / den).sqrt() < 1e-4, "{case} row {i}: {:.2e}", (num / den).sqrt());
        }
        let prefill = model.session(SessionOptions::default()).unwrap().append_tokens(&tokens);
        let hf = &logits[(tokens.len() - 1) * vocab..];
        let num: f64 = prefill.unwrap().iter().zip(hf).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = hf.iter().map(|b| (*b as f64).powi(2)).sum();
        assert!((num / den).sqrt() < 1e-4, "{case} prefill: {:.2e}", (num / den).sqrt());
        // Asking for another format would quantize twice.
        let e = Model::load(&dir, &LoadOptions { weights: WeightFormat::Int8, ..options });
        assert_eq!(e.err().unwrap().kind(), ErrorKind::InvalidArgument);
    }
}
