//! config.json (+ generation_config.json) text -> `ModelConfig`.
//!
//! Input: the config.json text, optionally followed by a NUL byte and the text of a
//! generation_config.json (bytes that are not UTF-8 are replaced, as a lossy reader would).
//! Must never panic; errors are fine. On success it checks that `validate()` accepts what
//! `from_json` returned, that merging the generation config keeps it valid (and leaves it
//! unchanged on error), and that every size derived from the config (parameter count, tensor
//! shapes and their byte sizes, RoPE tables) is computed without overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phi3_core::loader::names;
use phi3_core::rope::Rope;
use phi3_core::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let (config_part, generation_part) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let text = String::from_utf8_lossy(config_part);
    let Ok(mut config) = ModelConfig::from_json(&text) else {
        return;
    };
    config.validate().expect("from_json returned a config that validate() rejects");
    if let Some(generation) = generation_part {
        let before = config.clone();
        let generation = String::from_utf8_lossy(generation);
        if config.merge_generation_config(&generation).is_err() {
            assert_eq!(config, before, "a failed merge changed the config");
        }
        config.validate().expect("merging generation_config.json broke validate()");
    }
    let _ = config.parameter_count();
    let _ = (config.q_dim(), config.kv_dim());
    for (_name, shape) in names::expected_tensors(&config) {
        let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let bytes = elements.and_then(|n| n.checked_mul(4));
        assert!(bytes.is_some(), "tensor shape {shape:?} overflows usize bytes");
    }
    // RoPE tables hold one entry per frequency; building them must stay cheap for any
    // valid config.
    let _ = Rope::new(&config.rope);
});
