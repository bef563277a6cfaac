//! A sharded model folder: fixed tiny config.json and two valid shards, plus a fuzzed
//! `model.safetensors.index.json` -> `Model::load` on the CPU.
//!
//! Exercises the index: invalid JSON, shard names with `..`, absolute paths, sub-folders, empty
//! or odd names, tensors mapped to the wrong shard or to a file that does not exist. The folder
//! also holds `outside.safetensors` one level up (a valid single-file checkpoint) and a
//! sub-folder `sub/` with a copy of shard 2, so an index entry that escapes the folder would
//! load: the target fails if a model loads through any shard name that is not a plain file name.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use phi3_core::{Model, SessionOptions};
use phi3_fuzz::{cpu, fresh_dir, safetensors_bytes, tiny_config_json, tiny_tensors};

/// The folder layout, written once per process.
fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = fresh_dir("shard_index");
        let dir = root.join("model");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("config.json"), tiny_config_json()).unwrap();
        let tensors: Vec<(String, &str, Vec<usize>)> =
            tiny_tensors().into_iter().map(|(n, s)| (n, "BF16", s)).collect();
        let (first, second) = tensors.split_at(4);
        let shard2 = safetensors_bytes(second);
        std::fs::write(dir.join("model-00001-of-00002.safetensors"), safetensors_bytes(first))
            .unwrap();
        std::fs::write(dir.join("model-00002-of-00002.safetensors"), &shard2).unwrap();
        std::fs::write(dir.join("sub/model-00002-of-00002.safetensors"), &shard2).unwrap();
        std::fs::write(root.join("outside.safetensors"), safetensors_bytes(&tensors)).unwrap();
        dir
    })
}

/// Whether `name` is a plain file name (no separators, not `.`/`..`, not empty).
fn plain(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

fuzz_target!(|data: &[u8]| {
    let dir = model_dir();
    std::fs::write(dir.join("model.safetensors.index.json"), data).unwrap();
    let Ok(model) = Model::load(dir, &cpu()) else {
        return;
    };
    // The model loaded: every shard the index names must be a plain file inside the folder.
    let index: serde_json::Value = serde_json::from_slice(data).expect("a loaded index is JSON");
    if let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) {
        for (tensor, file) in map {
            let file = file.as_str().unwrap_or_default();
            assert!(plain(file), "{tensor} loaded from shard {file:?} outside the folder");
        }
    }
    let mut session = model.session(SessionOptions::default()).unwrap();
    session.append_tokens(&[1, 5, 15]).expect("a loaded model runs");
});
