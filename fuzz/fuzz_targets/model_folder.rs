//! A model folder with a fixed tiny config.json and fuzzed `model.safetensors` bytes ->
//! `Model::load` on the CPU.
//!
//! Exercises the safetensors header and validation layer: header lengths, JSON, dtypes, shapes
//! whose products overflow, huge or overlapping offsets, data sections shorter than claimed.
//! Must never panic, abort or allocate more than the file holds; errors are fine. A model that
//! loads must also run: one forward pass over three tokens.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use phi3_core::{Model, SessionOptions};
use phi3_fuzz::{cpu, fresh_dir, tiny_config_json};

fuzz_target!(|data: &[u8]| {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = fresh_dir("model_folder");
        std::fs::write(dir.join("config.json"), tiny_config_json()).unwrap();
        dir
    });
    std::fs::write(dir.join("model.safetensors"), data).unwrap();
    let Ok(model) = Model::load(dir, &cpu()) else {
        return;
    };
    let mut session = model.session(SessionOptions::default()).unwrap();
    let logits = session.append_tokens(&[1, 5, 15]).expect("a loaded model runs");
    assert_eq!(logits.len(), model.config().vocab_size);
});
