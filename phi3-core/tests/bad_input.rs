//! Broken model folders and bad session input: each is a clear error of the right kind that
//! names what was wrong, never a panic, and a failed call leaves the session as it was.

use std::fs;
use std::path::{Path, PathBuf};

use phi3_core::{Device, ErrorKind, LoadOptions, Model, SessionOptions};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// A writable copy of a fixture model folder.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn cpu() -> LoadOptions {
    LoadOptions { device: Device::Cpu, ..Default::default() }
}

/// Load `dir` expecting an error of `kind` whose message contains every one of `needles`.
fn expect_err(dir: &Path, kind: ErrorKind, needles: &[&str]) {
    let err = Model::load(dir, &cpu()).expect_err("load should fail");
    assert_eq!(err.kind(), kind, "wrong kind for: {err}");
    for needle in needles {
        assert!(err.to_string().contains(needle), "message {err:?} should mention {needle:?}");
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(path, v.to_string()).unwrap();
}

#[test]
fn missing_folder_and_files() {
    expect_err(Path::new("/nonexistent/model"), ErrorKind::Io, &["/nonexistent/model"]);

    let dir = copy_fixture("mha-f32-tied");
    fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    expect_err(dir.path(), ErrorKind::Io, &["model.safetensors"]);

    let dir = copy_fixture("mha-f32-tied");
    fs::remove_file(dir.path().join("config.json")).unwrap();
    expect_err(dir.path(), ErrorKind::Io, &["config.json"]);
}

#[test]
fn malformed_config() {
    let dir = copy_fixture("mha-f32-tied");
    fs::write(dir.path().join("config.json"), "{\"model_type\": \"phi3\", ").unwrap();
    expect_err(dir.path(), ErrorKind::ModelFormat, &["config.json"]);

    let dir = copy_fixture("mha-f32-tied");
    edit_config(dir.path(), |v| v["hidden_size"] = "wide".into());
    expect_err(dir.path(), ErrorKind::ModelFormat, &["config.json", "hidden_size"]);

    let dir = copy_fixture("mha-f32-tied");
    edit_config(dir.path(), |v| v["num_key_value_heads"] = 3.into());
    expect_err(dir.path(), ErrorKind::ModelFormat, &["num_key_value_heads"]);

    let dir = copy_fixture("mha-f32-tied");
    fs::write(dir.path().join("generation_config.json"), "[1, 2").unwrap();
    expect_err(dir.path(), ErrorKind::ModelFormat, &["generation_config.json"]);
}

#[test]
fn unknown_model_type_and_rope_type() {
    let dir = copy_fixture("mha-f32-tied");
    edit_config(dir.path(), |v| v["model_type"] = "mistral".into());
    expect_err(dir.path(), ErrorKind::Unsupported, &["model_type", "mistral"]);

    let dir = copy_fixture("gqa-longrope-bf16");
    edit_config(dir.path(), |v| v["rope_scaling"]["type"] = "yarn".into());
    expect_err(dir.path(), ErrorKind::Unsupported, &["yarn"]);
}

#[test]
fn truncated_and_corrupted_safetensors() {
    let dir = copy_fixture("mha-f32-tied");
    let path = dir.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    expect_err(dir.path(), ErrorKind::ModelFormat, &["model.safetensors"]);

    // Header length claiming far more than the file holds.
    let mut corrupt = bytes.clone();
    corrupt[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    fs::write(&path, &corrupt).unwrap();
    expect_err(dir.path(), ErrorKind::ModelFormat, &["model.safetensors"]);

    // Garbage inside the JSON header.
    let mut corrupt = bytes.clone();
    corrupt[8..16].copy_from_slice(b"#!garbag");
    fs::write(&path, &corrupt).unwrap();
    expect_err(dir.path(), ErrorKind::ModelFormat, &["model.safetensors"]);

    fs::write(&path, b"abc").unwrap();
    expect_err(dir.path(), ErrorKind::ModelFormat, &["model.safetensors"]);
}

#[test]
fn model_file_truncated_after_loading_began() {
    // Headers are validated first; the weights are read afterwards, when the backend takes
    // them. A file cut short in between is an Io error naming the file and a tensor, not SIGBUS.
    let dir = copy_fixture("mha-f32-tied");
    let config = phi3_core::ModelConfig::from_dir(dir.path()).unwrap();
    let weights = phi3_core::loader::load(dir.path(), &config).unwrap();
    let file =
        fs::OpenOptions::new().write(true).open(dir.path().join("model.safetensors")).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len / 2).unwrap();
    let err = Model::from_parts(config, &weights, None, &cpu(), None).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(err.message().starts_with("model.safetensors: model."), "{err}");
    assert!(err.message().contains("file ends before byte"), "{err}");
}

#[test]
fn inconsistent_shard_index() {
    let read_index = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap()
    };
    let write_index = |dir: &Path, v: &serde_json::Value| {
        fs::write(dir.join("model.safetensors.index.json"), v.to_string()).unwrap()
    };
    let name = "model.layers.1.mlp.down_proj.weight";

    // A tensor mapped to the shard that does not hold it.
    let dir = copy_fixture("gqa-longrope-bf16");
    let mut index = read_index(dir.path());
    let file = index["weight_map"][name].as_str().unwrap().to_string();
    let other = if file.contains("00001") {
        "model-00002-of-00002.safetensors"
    } else {
        "model-00001-of-00002.safetensors"
    };
    index["weight_map"][name] = other.into();
    write_index(dir.path(), &index);
    expect_err(dir.path(), ErrorKind::ModelFormat, &[name, other]);

    // A shard that does not exist.
    let mut index = read_index(dir.path());
    index["weight_map"][name] = "model-00003-of-00002.safetensors".into();
    write_index(dir.path(), &index);
    expect_err(dir.path(), ErrorKind::Io, &["model-00003-of-00002.safetensors"]);

    // A shard outside the model folder.
    let mut index = read_index(dir.path());
    index["weight_map"][name] = "../model-00001-of-00002.safetensors".into();
    write_index(dir.path(), &index);
    expect_err(dir.path(), ErrorKind::ModelFormat, &["../model-00001-of-00002.safetensors"]);
    let absolute = dir.path().join("model-00001-of-00002.safetensors");
    index["weight_map"][name] = absolute.to_str().unwrap().into();
    write_index(dir.path(), &index);
    expect_err(dir.path(), ErrorKind::ModelFormat, &["plain file name"]);

    // A shard that is a symlink out of the folder (to a copy of a real shard, so only the
    // location is wrong).
    #[cfg(unix)]
    {
        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path().join(&file);
        fs::copy(dir.path().join(&file), &target).unwrap();
        fs::remove_file(dir.path().join(&file)).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(&file)).unwrap();
        let mut index = read_index(dir.path());
        index["weight_map"][name] = file.clone().into();
        write_index(dir.path(), &index);
        expect_err(dir.path(), ErrorKind::ModelFormat, &[&file, "outside the model folder"]);
        fs::remove_file(dir.path().join(&file)).unwrap();
        fs::copy(&target, dir.path().join(&file)).unwrap();
        assert!(Model::load(dir.path(), &cpu()).is_ok(), "the restored folder loads");
    }

    // A tensor missing from the index altogether.
    let mut index = read_index(dir.path());
    index["weight_map"].as_object_mut().unwrap().remove(name);
    write_index(dir.path(), &index);
    expect_err(dir.path(), ErrorKind::ModelFormat, &[name, "missing"]);

    fs::write(dir.path().join("model.safetensors.index.json"), "{\"weight_map\": 7}").unwrap();
    expect_err(dir.path(), ErrorKind::ModelFormat, &["model.safetensors.index.json"]);
}

/// Rewrite model.safetensors with `name` replaced by a tensor of `dtype` and `shape`.
fn replace_tensor(dir: &Path, name: &str, dtype: Dtype, shape: Vec<usize>) {
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let n: usize = shape.iter().product();
    let replacement = vec![0u8; n * dtype.bitsize() / 8];
    let mut views: Vec<(String, TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != name).collect();
    views.push((name.to_string(), TensorView::new(dtype, shape, &replacement).unwrap()));
    let out = safetensors::serialize(views, None).unwrap();
    fs::write(&path, out).unwrap();
}

#[test]
fn wrong_shape_dtype_and_missing_tensor() {
    let name = "model.layers.0.mlp.down_proj.weight";
    let dir = copy_fixture("mha-f32-tied");
    replace_tensor(dir.path(), name, Dtype::F32, vec![64, 7]);
    expect_err(dir.path(), ErrorKind::ModelFormat, &["model.safetensors", name, "[64, 7]"]);

    let dir = copy_fixture("mha-f32-tied");
    let config = phi3_core::ModelConfig::from_dir(dir.path()).unwrap();
    let shape = vec![config.hidden_size, config.intermediate_size];
    replace_tensor(dir.path(), name, Dtype::I64, shape);
    expect_err(dir.path(), ErrorKind::ModelFormat, &["model.safetensors", name, "I64"]);

    // Config asking for a tensor the file lacks (untied model without lm_head).
    let dir = copy_fixture("mha-f32-tied");
    edit_config(dir.path(), |v| v["tie_word_embeddings"] = false.into());
    expect_err(dir.path(), ErrorKind::ModelFormat, &["lm_head.weight", "missing"]);
}

#[test]
fn bad_tokens_leave_the_session_unchanged() {
    let model = Model::load(fixture("gqa-longrope-bf16"), &cpu()).unwrap();
    let vocab = model.config().vocab_size as u32;
    let mut s = model.session(SessionOptions::default()).unwrap();
    let logits = s.append_tokens(&[5, 6, 7]).unwrap();

    let err = s.append_tokens(&[8, 9, vocab, 10]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TokenOutOfRange);
    assert!(err.to_string().contains(&format!("tokens[2] = {vocab}")), "{err}");
    let err = s.append_tokens(&[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.tokens(), &[5, 6, 7]);
    assert_eq!(s.last_logits().unwrap(), &logits[..]);

    // The session still works and gives the same result as a fresh one.
    let after = s.append_tokens(&[8]).unwrap();
    let mut fresh = model.session(SessionOptions::default()).unwrap();
    assert_eq!(fresh.append_tokens(&[5, 6, 7, 8]).unwrap(), after);

    let err = s.truncate(10).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.len(), 4);
}

#[test]
fn context_limit_is_an_error_and_the_session_stays_usable() {
    let model = Model::load(fixture("mha-f32-tied"), &cpu()).unwrap();
    let mut s =
        model.session(SessionOptions { max_context: Some(6), ..Default::default() }).unwrap();
    s.append_tokens(&[3, 4, 5, 6]).unwrap();
    let err = s.append_tokens(&[7, 8, 9]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ContextFull);
    assert!(err.to_string().contains("max context of 6"), "{err}");
    assert_eq!(s.len(), 4);
    s.append_tokens(&[7, 8]).unwrap();
    assert_eq!(s.len(), 6);

    // The model's own limit caps every session.
    let max = model.config().max_position_embeddings;
    let mut s = model
        .session(SessionOptions { max_context: Some(max * 10), ..Default::default() })
        .unwrap();
    assert_eq!(s.max_context(), max);
    let err = s.append_tokens(&vec![3; max + 1]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ContextFull);
    assert!(s.is_empty());

    let err =
        model.session(SessionOptions { max_context: Some(0), ..Default::default() }).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn unavailable_device_and_missing_tokenizer() {
    let options = LoadOptions { device: "cuda:0".parse().unwrap(), ..Default::default() };
    let err = Model::load(fixture("mha-f32-tied"), &options).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("cuda:0"), "{err}");

    let err = "tpu".parse::<Device>().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);

    let model = Model::load(fixture("mha-f32-tied"), &cpu()).unwrap();
    let mut s = model.session(SessionOptions::default()).unwrap();
    let err = s.append_text("hello").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("tokenizer"), "{err}");
    assert!(s.is_empty());
}
