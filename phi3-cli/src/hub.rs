//! `--model` resolution: a local folder, or a Hugging Face repo id found in the local HF cache or
//! downloaded into it.
//!
//! The cache layout is huggingface_hub's (`file_download.py`): `<root>/models--<org>--<name>/`
//! holds `refs/main` (a commit hash) and `snapshots/<hash>/` (the files, usually symlinks into
//! `blobs/`). [`find_in_cache`] reads that layout and nothing else, so it is tested offline on a
//! temporary folder. Downloads go through the `hf-hub` crate (feature `download`) into the same
//! cache, so a model fetched once is found offline afterwards, also by Python tools.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// What a command needs from a model folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// config.json, the tokenizer and the weights.
    Everything,
    /// config.json (and the tokenizer when there is one): the weights are replaced by random ones.
    ConfigOnly,
}

/// The folder that `--model SPEC` names: an existing folder as is, else a repo id from the cache,
/// else (with the `download` feature, unless `HF_HUB_OFFLINE` is set) downloaded.
pub fn resolve_model(spec: &str, need: Need) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if let Err(why) = check_repo_id(spec) {
        if path.exists() {
            bail!("{spec}: not a model folder (not a directory)");
        }
        log::debug!("{spec}: not a Hugging Face repo id: {why}");
        bail!("{spec}: no such model folder");
    }
    let root = cache_root()?;
    if let Some(dir) = find_in_cache(&root, spec, need)? {
        log::info!("{spec}: found in the Hugging Face cache at {}", dir.display());
        return Ok(dir);
    }
    if offline() {
        bail!(
            "{spec}: no such folder, and not in the Hugging Face cache at {} (HF_HUB_OFFLINE is set, so nothing is downloaded)",
            root.display()
        );
    }
    download(spec, &root, need)
}

/// The hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_root() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Ok(dir);
    }
    if let Some(home) = var("HF_HOME") {
        return Ok(home.join("hub"));
    }
    match var("HOME") {
        Some(home) => Ok(home.join(".cache").join("huggingface").join("hub")),
        None => bail!("cannot locate the Hugging Face cache: set HF_HUB_CACHE or HF_HOME"),
    }
}

/// Whether `HF_HUB_OFFLINE` forbids network access (any value but "", "0", "false", "no", "off").
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false" | "no" | "off")
        })
        .unwrap_or(false)
}

/// Check that `id` is a Hugging Face model id of the form `org/name` (the Hub's rules: letters,
/// digits, `-`, `_`, `.`; no `--` or `..`; neither part starts or ends with `-` or `.`; at most
/// 96 characters). Returns why not.
pub fn check_repo_id(id: &str) -> std::result::Result<(), String> {
    if id.len() > 96 {
        return Err("longer than 96 characters".into());
    }
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() != 2 {
        return Err("expected the form org/name".into());
    }
    for part in parts {
        if part.is_empty() {
            return Err("expected the form org/name".into());
        }
        if let Some(c) = part.chars().find(|&c| !(c.is_ascii_alphanumeric() || "-_.".contains(c))) {
            return Err(format!("character {c:?} is not allowed"));
        }
        if part.contains("--") || part.contains("..") {
            return Err("\"--\" and \"..\" are not allowed".into());
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return Err("a part may not start or end with '-' or '.'".into());
        }
    }
    Ok(())
}

/// The snapshot folder of `repo_id` in the hub cache at `root`, if the cache holds a usable one:
/// `refs/main` names a commit whose `snapshots/<commit>/` folder has config.json (and, for
/// [`Need::Everything`], model.safetensors or model.safetensors.index.json).
/// `Ok(None)`: not cached (no repo folder, no ref, missing snapshot or files).
/// `Err`: `repo_id` is not a valid id, or `refs/main` is not a commit hash.
pub fn find_in_cache(root: &Path, repo_id: &str, need: Need) -> Result<Option<PathBuf>> {
    if let Err(why) = check_repo_id(repo_id) {
        bail!("\"{repo_id}\" is not a Hugging Face repo id: {why}");
    }
    let repo_dir = root.join(format!("models--{}", repo_id.replace('/', "--")));
    let ref_path = repo_dir.join("refs").join("main");
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(text) => text.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("{}: {e}", ref_path.display()),
    };
    if commit.is_empty() || !commit.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("{}: \"{commit}\" is not a commit hash", ref_path.display());
    }
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.join("config.json").is_file() {
        log::debug!("{}: no config.json in the cached snapshot", snapshot.display());
        return Ok(None);
    }
    let has_weights = ["model.safetensors", "model.safetensors.index.json"]
        .iter()
        .any(|f| snapshot.join(f).is_file());
    if need == Need::Everything && !has_weights {
        log::debug!("{}: the cached snapshot has no weights", snapshot.display());
        return Ok(None);
    }
    Ok(Some(snapshot))
}

/// Files of a repo that loading a model reads.
#[cfg_attr(not(feature = "download"), allow(dead_code))]
fn wanted(file: &str, need: Need) -> bool {
    const ALWAYS: [&str; 5] = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ];
    if ALWAYS.contains(&file) {
        return true;
    }
    need == Need::Everything
        && !file.contains('/')
        && (file == "model.safetensors.index.json" || file.ends_with(".safetensors"))
}

#[cfg(feature = "download")]
fn download(repo_id: &str, root: &Path, need: Need) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::Cache;
    use std::io::IsTerminal;

    let endpoint =
        std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string());
    let fail = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "{repo_id}: no such folder, not in the Hugging Face cache at {}, and downloading it from {endpoint} failed: {}",
            root.display(),
            one_line(&e.to_string())
        )
    };
    let api = ApiBuilder::from_cache(Cache::new(root.to_path_buf()))
        .with_endpoint(endpoint.clone())
        .with_progress(std::io::stderr().is_terminal())
        .build()
        .map_err(|e| fail(&e))?;
    let repo = api.model(repo_id.to_string());
    let info = repo.info().map_err(|e| fail(&e))?;
    let files: Vec<&str> =
        info.siblings.iter().map(|s| s.rfilename.as_str()).filter(|f| wanted(f, need)).collect();
    if !files.contains(&"config.json") {
        bail!("{repo_id}: the repository has no config.json, so it is not a model phi3 can load");
    }
    log::info!("{repo_id}: downloading {} files into {}", files.len(), root.display());
    let mut dir = None;
    for file in files {
        let path = repo.get(file).map_err(|e| fail(&format!("{file}: {e}")))?;
        if file == "config.json" {
            dir = path.parent().map(Path::to_path_buf);
        }
    }
    dir.ok_or_else(|| anyhow::anyhow!("{repo_id}: config.json was downloaded to no folder"))
}

#[cfg(not(feature = "download"))]
fn download(repo_id: &str, root: &Path, _need: Need) -> Result<PathBuf> {
    bail!(
        "{repo_id}: no such folder, and not in the Hugging Face cache at {} (this phi3 was built without the `download` feature)",
        root.display()
    )
}

/// Collapse a possibly multi-line message onto one line.
#[cfg_attr(not(feature = "download"), allow(dead_code))]
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

    /// A cache holding `org/name` at commit HASH, with `files` in its snapshot.
    fn cache_with(files: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("models--org--name");
        fs::create_dir_all(repo.join("refs")).unwrap();
        fs::write(repo.join("refs/main"), format!("{HASH}\n")).unwrap();
        let snap = repo.join("snapshots").join(HASH);
        fs::create_dir_all(&snap).unwrap();
        for f in files {
            fs::write(snap.join(f), "{}").unwrap();
        }
        root
    }

    #[test]
    fn finds_a_complete_snapshot() {
        let root = cache_with(&["config.json", "model.safetensors", "tokenizer.json"]);
        let dir = find_in_cache(root.path(), "org/name", Need::Everything).unwrap().unwrap();
        assert_eq!(dir, root.path().join("models--org--name/snapshots").join(HASH));
    }

    #[test]
    fn sharded_weights_count_and_config_only_needs_no_weights() {
        let root = cache_with(&["config.json", "model.safetensors.index.json"]);
        assert!(find_in_cache(root.path(), "org/name", Need::Everything).unwrap().is_some());
        let root = cache_with(&["config.json"]);
        assert!(find_in_cache(root.path(), "org/name", Need::Everything).unwrap().is_none());
        assert!(find_in_cache(root.path(), "org/name", Need::ConfigOnly).unwrap().is_some());
    }

    #[test]
    fn absent_repo_ref_or_snapshot_is_not_cached() {
        let root = cache_with(&["config.json", "model.safetensors"]);
        assert!(find_in_cache(root.path(), "org/other", Need::Everything).unwrap().is_none());
        // refs/main names a commit whose snapshot folder is missing.
        let repo = root.path().join("models--org--name");
        fs::write(repo.join("refs/main"), "fedcba9876543210fedcba9876543210fedcba98").unwrap();
        assert!(find_in_cache(root.path(), "org/name", Need::Everything).unwrap().is_none());
        // No refs/main at all.
        fs::remove_file(repo.join("refs/main")).unwrap();
        assert!(find_in_cache(root.path(), "org/name", Need::Everything).unwrap().is_none());
    }

    #[test]
    fn a_bad_ref_is_an_error_naming_the_file() {
        let root = cache_with(&["config.json"]);
        fs::write(root.path().join("models--org--name/refs/main"), "../../etc").unwrap();
        let e = find_in_cache(root.path(), "org/name", Need::ConfigOnly).unwrap_err();
        assert!(e.to_string().contains("refs/main"), "{e}");
    }

    #[test]
    fn bad_ids_are_rejected() {
        let root = cache_with(&["config.json"]);
        for bad in [
            "name",
            "org/",
            "/name",
            "a/b/c",
            "org/na me",
            "org/..",
            "org/a--b",
            "-org/x",
            "org/x.",
        ] {
            let e = find_in_cache(root.path(), bad, Need::ConfigOnly).unwrap_err();
            assert!(e.to_string().contains("not a Hugging Face repo id"), "{bad}: {e}");
        }
        for good in ["microsoft/Phi-3-medium-128k-instruct", "a_b/c.d-e", "org/name"] {
            assert_eq!(check_repo_id(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn an_existing_folder_wins_and_a_missing_path_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().to_str().unwrap();
        assert_eq!(resolve_model(spec, Need::Everything).unwrap(), dir.path());
        let missing = dir.path().join("no/such/model");
        let e = resolve_model(missing.to_str().unwrap(), Need::Everything).unwrap_err();
        assert!(e.to_string().contains(missing.to_str().unwrap()), "{e}");
    }

    #[test]
    fn wanted_files() {
        assert!(wanted("config.json", Need::ConfigOnly));
        assert!(wanted("tokenizer.json", Need::ConfigOnly));
        assert!(!wanted("model-00001-of-00002.safetensors", Need::ConfigOnly));
        assert!(wanted("model-00001-of-00002.safetensors", Need::Everything));
        assert!(wanted("model.safetensors.index.json", Need::Everything));
        assert!(!wanted("onnx/model.safetensors", Need::Everything));
        assert!(!wanted("pytorch_model.bin", Need::Everything));
    }
}
