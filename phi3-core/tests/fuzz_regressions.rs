//! Regression tests for what the fuzz targets (`fuzz/`, `scripts/fuzz`) and the allocation-bomb
//! review found: each input is inlined (minimised), and each test failed before its fix.

use phi3_core::config::MAX_PARAMETERS;
use phi3_core::{ErrorKind, ModelConfig};

/// fuzz target `config_json`: every dimension at its limit (2^20) is valid one by one, but the
/// parameter count (2^80) overflowed u64 in `parameter_count()` (a panic in debug builds, a
/// wrapped count in release); such a config is now rejected by `validate()`.
#[test]
fn config_whose_parameter_count_overflows_is_rejected() {
    let text = br#"{"model_type":"phi3","vocab_size":1048576,"hidden_size":1048576,
        "intermediate_size":1048576,"num_hidden_layers":1048576,"num_attention_heads":1048576,
        "num_key_value_heads":1048576,"head_dim":1048576,"max_position_embeddings":32}"#;
    let e = ModelConfig::from_json(std::str::from_utf8(text).unwrap()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ModelFormat);
    assert!(e.message().contains("parameters"), "{e}");

    // Just past the limit in the other direction: valid dimensions, 2^41 parameters.
    let text = r#"{"model_type":"phi3","vocab_size":1048576,"hidden_size":1048576,
        "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":1,
        "max_position_embeddings":32}"#;
    let e = ModelConfig::from_json(text).unwrap_err();
    assert!(e.message().contains(&MAX_PARAMETERS.to_string()), "{e}");
}

/// `parameter_count()` on a config built by hand (fields are public) saturates instead of
/// overflowing.
#[test]
fn parameter_count_saturates() {
    let text = r#"{"model_type":"phi3","vocab_size":16,"hidden_size":8,"intermediate_size":16,
        "num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":32}"#;
    let mut c = ModelConfig::from_json(text).unwrap();
    assert_eq!(c.parameter_count(), 16 * 8 * 2 + 8 * 24 + 8 * 8 + 8 * 32 + 8 * 16 + 16 + 8);
    c.num_hidden_layers = usize::MAX;
    assert_eq!(c.parameter_count(), u64::MAX);
    assert!(c.validate().is_err());
}

/// fuzz target `config_json` (property: a failed merge leaves the config unchanged): a
/// generation_config.json whose eos list has a valid id before a negative one added the valid id
/// and then failed, and a bad pad id after a good bos id left the bos id set.
#[test]
fn failed_generation_config_merge_changes_nothing() {
    let text = r#"{"model_type":"phi3","vocab_size":16,"hidden_size":8,"intermediate_size":16,
        "num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":32,
        "eos_token_id":2}"#;
    let mut c = ModelConfig::from_json(text).unwrap();
    let before = c.clone();
    let e = c.merge_generation_config(r#"{"eos_token_id":[5,-1]}"#).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ModelFormat);
    assert_eq!(c, before);
    c.merge_generation_config(r#"{"bos_token_id":1,"pad_token_id":-3}"#).unwrap_err();
    assert_eq!(c, before);
    c.merge_generation_config(r#"{"eos_token_id":[5,2],"bos_token_id":1}"#).unwrap();
    assert_eq!((c.eos_token_ids.clone(), c.bos_token_id), (vec![2, 5], Some(1)));
}

/// Allocation bomb (review, measured): the `tokenizers` crate needs about 200 bytes per input
/// byte (8 MiB of text: 1.6 GB peak, 35 s), and `append_text` / `append_message` tokenized the
/// whole text before finding that it cannot fit the context. Now a text that certainly cannot fit
/// is `ContextFull` before tokenizing, and `Tokenizer::encode` refuses more than
/// `MAX_ENCODE_BYTES`. 64 MiB of text would have needed about 13 GB; here each call returns in
/// well under a second.
#[test]
fn many_megabytes_of_text_fail_before_tokenizing() {
    use phi3_core::tokenizer::MAX_ENCODE_BYTES;
    use phi3_core::{demo, Device, LoadOptions, SessionOptions};
    let model =
        demo::demo_model(&LoadOptions { device: Device::Cpu, ..Default::default() }).unwrap();
    let text = "the river ".repeat(64 << 17); // 80 MiB
    let start = std::time::Instant::now();
    let mut session = model.session(SessionOptions::default()).unwrap();
    let e = session.append_text(&text).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ContextFull, "{e}");
    let e = session.append_message("user", &text).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ContextFull, "{e}");
    assert!(session.is_empty());
    let e = model.tokenizer().unwrap().encode(&text, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.message().contains(&MAX_ENCODE_BYTES.to_string()), "{e}");
    assert!(start.elapsed() < std::time::Duration::from_secs(10), "{:?}", start.elapsed());

    // Whitespace is not counted (an rstrip special token swallows any amount of it), so a text
    // of mostly spaces is still tokenized and accepted when its tokens fit.
    let mut session =
        model.session(SessionOptions { max_context: Some(8), ..Default::default() }).unwrap();
    session.append_text(&format!("<|end|>{}", " ".repeat(100_000))).unwrap();
    assert!(session.len() <= 8);
    // Text that fits is unaffected.
    let mut session =
        model.session(SessionOptions { max_context: Some(8), ..Default::default() }).unwrap();
    session.append_message("user", "Hello").unwrap();
}
