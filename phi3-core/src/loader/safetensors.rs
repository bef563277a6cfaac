//! Memory-mapped safetensors files: header parsing, the shard index, typed tensor views.
//!
//! Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
//! then the data. The `safetensors` crate parses and validates the header (offsets contiguous and
//! in bounds, sizes equal to dtype x shape, no overflow); this file adds the file name to every
//! error and resolves sharded checkpoints through `model.safetensors.index.json`, whose entries
//! may only name plain files inside the model folder.
//!
//! Not here: which tensors a Phi-3 model needs and their shapes (`names.rs`, `mod.rs`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::Metadata;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Element type of a weight tensor. Only floating types a Phi-3 checkpoint uses are accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision, 4 bytes.
    F32,
    /// IEEE 754 half precision, 2 bytes.
    F16,
    /// bfloat16 (the upper half of an f32), 2 bytes.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The safetensors name, e.g. "BF16".
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

/// One tensor of a checkpoint: where it lives and what it holds. Cheap to clone (shares the map).
#[derive(Clone, Debug)]
pub struct HostTensor {
    /// HF state-dict name, e.g. "model.layers.0.self_attn.qkv_proj.weight".
    pub name: String,
    /// File name within the model folder, for error messages.
    pub file: String,
    /// Element type, as stored in the file.
    pub dtype: DType,
    /// Dimensions, outermost first (row-major); `nn.Linear` weights are `[out, in]`.
    pub shape: Vec<usize>,
    data: TensorBytes,
}

/// A byte range of a memory-mapped file (or an owned buffer for weights made in memory).
#[derive(Clone, Debug)]
enum TensorBytes {
    Mapped { map: Arc<Mmap>, range: Range<usize> },
    Owned(Arc<Vec<u8>>),
}

impl HostTensor {
    /// A tensor held in memory (dummy or converted weights); `bytes` are little-endian elements.
    ///
    /// Errors: `InvalidArgument` when `bytes.len()` is not the element count of `shape` times
    /// `dtype.size()`.
    pub fn from_bytes(name: &str, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n.checked_mul(dtype.size()) != Some(bytes.len()) {
            return Err(Error::invalid_argument(format!(
                "{name}: {} bytes do not hold a {} tensor of shape {shape:?}",
                bytes.len(),
                dtype.name()
            )));
        }
        Ok(HostTensor {
            name: name.to_string(),
            file: "<memory>".to_string(),
            dtype,
            shape,
            data: TensorBytes::Owned(Arc::new(bytes)),
        })
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            TensorBytes::Mapped { map, range } => &map[range.clone()],
            TensorBytes::Owned(v) => v,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Convert to f32 (for small tensors such as norm weights, and for tests). Reads every byte
    /// and allocates `4 * numel()` bytes.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let bytes = self.bytes();
        match self.dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

/// One opened, mapped and validated safetensors file.
struct MappedFile {
    name: String,
    map: Arc<Mmap>,
    metadata: Metadata,
    data_start: usize,
}

impl MappedFile {
    fn open(dir: &Path, name: &str) -> Result<MappedFile> {
        let path = dir.join(name);
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only and lives as long as any tensor that borrows it (Arc).
        // Another process truncating or rewriting the file while it is mapped is outside what we
        // can guard against (same contract as every mmap-based loader: llama.cpp, candle, HF).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| Error::model_format(format!("{name}: invalid safetensors file: {e}")))?;
        Ok(MappedFile {
            name: name.to_string(),
            map: Arc::new(map),
            metadata,
            data_start: 8 + header_len,
        })
    }

    fn tensor(&self, name: &str) -> Option<Result<HostTensor>> {
        let info = self.metadata.info(name)?;
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Some(Err(Error::model_format(format!(
                    "{}: {name}: dtype {other:?} is not supported (expected BF16, F16 or F32)",
                    self.name
                ))))
            }
        };
        let (start, end) = info.data_offsets;
        // read_metadata checked that the offsets lie inside the file's data section.
        let range = self.data_start + start..self.data_start + end;
        Some(Ok(HostTensor {
            name: name.to_string(),
            file: self.name.clone(),
            dtype,
            shape: info.shape.clone(),
            data: TensorBytes::Mapped { map: Arc::clone(&self.map), range },
        }))
    }
}

/// model.safetensors.index.json
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// All tensors of a checkpoint, by name, from one file or a sharded set.
pub struct Checkpoint {
    files: Vec<MappedFile>,
    /// Tensor name -> index into `files`.
    location: HashMap<String, usize>,
}

impl Checkpoint {
    /// Open `model.safetensors`, or the shards listed by `model.safetensors.index.json`. Maps
    /// each file and parses its header; no tensor data is read.
    ///
    /// Errors: `Io` when neither file exists or a file cannot be opened or mapped; `ModelFormat`
    /// for an invalid safetensors header or index, an index entry naming a file outside the
    /// folder, or one mapping a tensor to a file that does not contain it.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.is_file() {
            return Self::open_sharded(dir, &index_path);
        }
        let single = dir.join("model.safetensors");
        if !single.is_file() {
            return Err(Error::new(
                crate::ErrorKind::Io,
                format!(
                    "{}: no model.safetensors or model.safetensors.index.json in the model folder",
                    dir.display()
                ),
            ));
        }
        let file = MappedFile::open(dir, "model.safetensors")?;
        let location = file.metadata.tensors().into_keys().map(|name| (name, 0)).collect();
        Ok(Checkpoint { files: vec![file], location })
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Checkpoint> {
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let index: ShardIndex = serde_json::from_str(&text).map_err(|e| {
            Error::model_format(format!("model.safetensors.index.json: invalid index: {e}"))
        })?;
        let mut files: Vec<MappedFile> = Vec::new();
        let mut file_ids: HashMap<String, usize> = HashMap::new();
        let mut location = HashMap::new();
        for (tensor, file_name) in &index.weight_map {
            check_shard_name(file_name)
                .map_err(|e| e.context(format!("model.safetensors.index.json: {tensor}")))?;
            let id = match file_ids.get(file_name) {
                Some(&id) => id,
                None => {
                    files.push(MappedFile::open(dir, file_name)?);
                    file_ids.insert(file_name.clone(), files.len() - 1);
                    files.len() - 1
                }
            };
            if files[id].metadata.info(tensor).is_none() {
                return Err(Error::model_format(format!(
                    "model.safetensors.index.json: {tensor} is mapped to {file_name}, which does not contain it"
                )));
            }
            location.insert(tensor.clone(), id);
        }
        Ok(Checkpoint { files, location })
    }

    /// The tensor called `name`, if the checkpoint has it. The inner error is `ModelFormat` when
    /// its dtype is not BF16, F16 or F32.
    pub fn get(&self, name: &str) -> Option<Result<HostTensor>> {
        let &id = self.location.get(name)?;
        self.files[id].tensor(name)
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.location.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// File names that make up the checkpoint.
    pub fn file_names(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| PathBuf::from(&f.name)).collect()
    }
}

/// A shard named by the index must be a plain file name inside the model folder.
fn check_shard_name(name: &str) -> Result<()> {
    let path = Path::new(name);
    let plain = path.components().count() == 1
        && matches!(path.components().next(), Some(Component::Normal(_)));
    if !plain {
        return Err(Error::model_format(format!(
            "shard file \"{name}\" must be a plain file name inside the model folder"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_must_stay_inside_the_folder() {
        assert!(check_shard_name("model-00001-of-00002.safetensors").is_ok());
        for bad in ["../x.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""] {
            assert!(check_shard_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn to_f32_converts_each_dtype() {
        let bf = half::bf16::from_f32(1.5).to_le_bytes().to_vec();
        let t = HostTensor::from_bytes("x", DType::BF16, vec![1], bf).unwrap();
        assert_eq!(t.to_f32_vec(), vec![1.5]);
        let f = (-2.25f32).to_le_bytes().to_vec();
        let t = HostTensor::from_bytes("x", DType::F32, vec![1], f).unwrap();
        assert_eq!(t.to_f32_vec(), vec![-2.25]);
        assert!(HostTensor::from_bytes("x", DType::F32, vec![2], vec![0; 4]).is_err());
    }
}
