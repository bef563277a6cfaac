//! Which files of a model folder may be read: the folder is untrusted input, so a file it names
//! (the shard index, or a symlink placed in the folder) must resolve to a regular file inside it.
//!
//! One exception keeps Hugging Face hub caches loadable: a snapshot folder
//! (`models--org--name/snapshots/<revision>/`) holds symlinks into the repository's `blobs/`
//! folder, so for a folder whose parent is named `snapshots`, targets in `../../blobs/` are
//! inside too. Nothing else outside the folder is reachable, through `..`, absolute paths or
//! symlinks.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// The canonical path of `name` inside the model folder `dir`, checked to be a regular file that
/// does not escape the folder.
///
/// Errors: `ModelFormat` when `name` is not a plain file name, resolves outside the folder or is
/// not a regular file (a FIFO or device would block or never end); `Io` when it does not exist
/// or cannot be resolved.
pub fn resolve_model_file(dir: &Path, name: &str) -> Result<PathBuf> {
    check_plain_name(name)?;
    let canonical_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let joined = dir.join(name);
    let target = joined.canonicalize().map_err(|e| Error::io(&joined, e))?;
    let inside = target.starts_with(&canonical_dir)
        || hub_blobs_dir(&canonical_dir).is_some_and(|blobs| target.starts_with(blobs));
    if !inside {
        return Err(Error::model_format(format!(
            "{}: resolves to {}, outside the model folder",
            joined.display(),
            target.display()
        )));
    }
    let meta = std::fs::metadata(&target).map_err(|e| Error::io(&target, e))?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::ModelFormat,
            format!("{}: not a regular file", joined.display()),
        ));
    }
    Ok(target)
}

/// The bytes of the model-folder file `name`, or `None` when there is no such entry; an entry
/// that exists must pass [`resolve_model_file`] (so a FIFO, a device or a symlink out of the
/// folder is an error, not a hang or a read of some other file).
///
/// Errors: as [`resolve_model_file`], and `Io` when the file cannot be read.
pub fn read_model_file(dir: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let joined = dir.join(name);
    match std::fs::symlink_metadata(&joined) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&joined, e)),
        Ok(_) => {}
    }
    let path = resolve_model_file(dir, name)?;
    std::fs::read(&path).map(Some).map_err(|e| Error::io(&joined, e))
}

/// A file name as the model folder may give it: one normal component, no separators, no `..`.
pub(crate) fn check_plain_name(name: &str) -> Result<()> {
    let path = Path::new(name);
    let plain = path.components().count() == 1
        && matches!(path.components().next(), Some(Component::Normal(_)))
        && !name.contains(['/', '\\']);
    if !plain {
        return Err(Error::model_format(format!(
            "file \"{name}\" must be a plain file name inside the model folder"
        )));
    }
    Ok(())
}

/// `<repo>/blobs` when `canonical_dir` is a hub snapshot, `<repo>/snapshots/<revision>`.
fn hub_blobs_dir(canonical_dir: &Path) -> Option<PathBuf> {
    let snapshots = canonical_dir.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    Some(snapshots.parent()?.join("blobs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_plain() {
        assert!(check_plain_name("model-00001-of-00002.safetensors").is_ok());
        for bad in ["../x.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ".", "", "a\\b"] {
            assert!(check_plain_name(bad).is_err(), "{bad}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_may_not_escape_but_hub_blobs_are_inside() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("secret.safetensors");
        std::fs::write(&outside, b"x").unwrap();
        let model = root.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("real.safetensors"), b"x").unwrap();
        symlink(&outside, model.join("escape.safetensors")).unwrap();
        symlink(model.join("real.safetensors"), model.join("alias.safetensors")).unwrap();
        assert!(resolve_model_file(&model, "real.safetensors").is_ok());
        assert!(resolve_model_file(&model, "alias.safetensors").is_ok());
        let err = resolve_model_file(&model, "escape.safetensors").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ModelFormat);
        assert!(err.message().contains("outside the model folder"), "{err}");
        assert_eq!(resolve_model_file(&model, "missing").unwrap_err().kind(), ErrorKind::Io);
        std::fs::create_dir(model.join("sub")).unwrap();
        assert!(resolve_model_file(&model, "sub").unwrap_err().message().contains("regular file"));
        assert_eq!(read_model_file(&model, "alias.safetensors").unwrap().unwrap(), b"x");
        assert!(read_model_file(&model, "absent.json").unwrap().is_none());
        assert!(read_model_file(&model, "escape.safetensors").is_err());

        // The hub cache layout: snapshots/<rev>/f -> ../../blobs/<hash>.
        let repo = root.path().join("models--org--name");
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        std::fs::write(repo.join("blobs/0123"), b"x").unwrap();
        symlink("../../blobs/0123", repo.join("snapshots/abc/model.safetensors")).unwrap();
        assert!(resolve_model_file(&repo.join("snapshots/abc"), "model.safetensors").is_ok());
    }
}
