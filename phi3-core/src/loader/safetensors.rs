//! safetensors files read with positional reads: header parsing and validation, the shard index,
//! tensor handles that read their bytes on demand.
//!
//! Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
//! then the data. The header is untrusted input: before anything is allocated from it, the header
//! length must fit the file, and every tensor's dtype x shape must not overflow, must equal its
//! byte range, and the ranges must tile the data section exactly (no overlap, no hole, nothing
//! past the end), as the `safetensors` crate requires. Sharded checkpoints are resolved through
//! `model.safetensors.index.json`, whose entries may only name files inside the model folder.
//!
//! Weights are read with `pread`, not memory-mapped: a file truncated or rewritten by another
//! process after loading started then gives an `Io` error naming the file, where a mapping would
//! kill the host with SIGBUS. The backends copy what they need (the CPU backend into its own
//! memory, the CUDA backend through a bounded staging buffer).
//!
//! Not here: which tensors a Phi-3 model needs and their shapes (`names.rs`, `mod.rs`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::paths::resolve_model_file;
use crate::error::{Error, ErrorKind, Result};

/// The largest JSON header accepted (the `safetensors` crate's limit too).
const MAX_HEADER_BYTES: u64 = 100 << 20;

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

/// One tensor of a checkpoint: where it lives and what it holds. Cheap to clone (shares the file).
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

/// Where a tensor's little-endian bytes are: a range of an open file, or a buffer in memory.
#[derive(Clone, Debug)]
enum TensorBytes {
    File { file: Arc<File>, offset: u64, len: usize },
    Owned(Arc<Vec<u8>>),
    Generated(Generated),
}

/// Deterministic random elements made when read (dummy weights), so a model of any size costs
/// no memory until a backend takes it. Element `i` is `center + half_width * u` with `u` in
/// [-1, 1) from the SplitMix64 output after `state0` has advanced `i + 1` times; SplitMix64's
/// state moves by a constant per draw, so any range of elements is generated without the ones
/// before it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Generated {
    /// The generator state before element 0.
    pub state0: u64,
    /// Middle of the value range.
    pub center: f32,
    /// Half the width of the value range.
    pub half_width: f32,
    /// Element type of the bytes.
    pub dtype: DType,
    /// Number of elements.
    pub numel: usize,
}

/// SplitMix64's state increment per draw (`sampler::splitmix64`).
const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl Generated {
    /// The state before element `i`.
    pub fn state_at(&self, i: usize) -> u64 {
        self.state0.wrapping_add((i as u64).wrapping_mul(SPLITMIX_GAMMA))
    }

    /// Elements `first..first + dst.len() / size` as little-endian bytes into `dst`, in
    /// parallel blocks (each block jumps to its own state).
    fn fill(&self, first: usize, dst: &mut [u8]) {
        use rayon::prelude::*;
        const BLOCK: usize = 1 << 16;
        let size = self.dtype.size();
        dst.par_chunks_mut(BLOCK * size).enumerate().for_each(|(b, out)| {
            let mut state = self.state_at(first + b * BLOCK);
            for e in out.chunks_exact_mut(size) {
                let bits = crate::sampler::splitmix64(&mut state);
                let u = ((bits >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                let x = self.center + self.half_width * u;
                match self.dtype {
                    DType::F32 => e.copy_from_slice(&x.to_le_bytes()),
                    DType::F16 => e.copy_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                    DType::BF16 => e.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                }
            }
        });
    }
}

impl TensorBytes {
    fn len(&self) -> usize {
        match self {
            TensorBytes::File { len, .. } => *len,
            TensorBytes::Owned(v) => v.len(),
            TensorBytes::Generated(g) => g.numel * g.dtype.size(),
        }
    }

    /// Bytes `offset..offset + dst.len()` into `dst`; `file` and `name` are for errors.
    fn read_at(&self, file_name: &str, name: &str, offset: usize, dst: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(dst.len()).filter(|&e| e <= self.len());
        let Some(end) = end else {
            return Err(Error::invalid_argument(format!(
                "{name}: bytes {offset}..+{} are outside the tensor's {} bytes",
                dst.len(),
                self.len()
            )));
        };
        match self {
            TensorBytes::Owned(v) => {
                dst.copy_from_slice(&v[offset..end]);
                Ok(())
            }
            TensorBytes::Generated(g) => {
                let size = g.dtype.size();
                if offset.is_multiple_of(size) && dst.len().is_multiple_of(size) {
                    g.fill(offset / size, dst);
                } else {
                    // Partial elements at the ends: make the whole ones around them.
                    let (first, last) = (offset / size, end.div_ceil(size));
                    let mut whole = vec![0u8; (last - first) * size];
                    g.fill(first, &mut whole);
                    let skip = offset - first * size;
                    dst.copy_from_slice(&whole[skip..skip + dst.len()]);
                }
                Ok(())
            }
            TensorBytes::File { file, offset: base, .. } => {
                let at = base + offset as u64;
                read_exact_at(file, dst, at).map_err(|e| {
                    let what = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        format!(
                            "file ends before byte {} (truncated after loading began?)",
                            at + dst.len() as u64
                        )
                    } else {
                        e.to_string()
                    };
                    Error::new(ErrorKind::Io, format!("{file_name}: {name}: {what}")).with_source(e)
                })
            }
        }
    }

    /// All bytes in a new buffer (`OutOfMemory` when it cannot be had).
    fn read_vec(&self, file_name: &str, name: &str) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(self.len()).map_err(|_| {
            Error::new(
                ErrorKind::OutOfMemory,
                format!("{name}: cannot allocate {} bytes", self.len()),
            )
        })?;
        bytes.resize(self.len(), 0);
        self.read_at(file_name, name, 0, &mut bytes)?;
        Ok(bytes)
    }
}

/// A tensor of any safetensors dtype (the integer parts of a quantized checkpoint: packed
/// weights, zero points, group indices), read whole and interpreted by its reader.
#[derive(Clone, Debug)]
pub struct RawTensor {
    /// State-dict name, e.g. "model.layers.0.mlp.down_proj.qweight".
    pub name: String,
    /// File name within the model folder, for error messages.
    pub file: String,
    /// The safetensors dtype name, e.g. "I32", "U8", "F16".
    pub dtype: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    data: TensorBytes,
}

impl RawTensor {
    /// A tensor held in memory (tests, converters). `bytes` are its little-endian elements.
    ///
    /// Errors: `InvalidArgument` for an unknown dtype or a byte count that does not match.
    pub fn from_bytes(name: &str, dtype: &str, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Self> {
        let size = dtype_size(dtype).ok_or_else(|| {
            Error::invalid_argument(format!("{name}: {dtype} is not a safetensors dtype"))
        })?;
        let n = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        if n.and_then(|n| n.checked_mul(size)) != Some(bytes.len() as u64) {
            return Err(Error::invalid_argument(format!(
                "{name}: {} bytes do not hold a {dtype} tensor of shape {shape:?}",
                bytes.len()
            )));
        }
        Ok(RawTensor {
            name: name.to_string(),
            file: "<memory>".to_string(),
            dtype: dtype.to_string(),
            shape,
            data: TensorBytes::Owned(Arc::new(bytes)),
        })
    }

    /// Size of the data in bytes.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// Bytes from `offset` into `dst` (errors as [`HostTensor::read_at`]).
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.data.read_at(&self.file, &self.name, offset, dst)
    }

    /// All bytes, in a new buffer (errors as [`HostTensor::read_vec`]).
    pub fn read_vec(&self) -> Result<Vec<u8>> {
        self.data.read_vec(&self.file, &self.name)
    }

    /// `ModelFormat` naming the tensor unless its dtype is `dtype` and its shape `shape`.
    pub fn expect(&self, dtype: &str, shape: &[usize]) -> Result<()> {
        if self.dtype != dtype || self.shape != shape {
            return Err(Error::model_format(format!(
                "{}: {}: {} {:?}, expected {dtype} {shape:?}",
                self.file, self.name, self.dtype, self.shape
            )));
        }
        Ok(())
    }
}

impl HostTensor {
    /// A tensor held in memory (dummy or converted weights); `bytes` are little-endian elements.
    ///
    /// Errors: `InvalidArgument` when `bytes.len()` is not the element count of `shape` times
    /// `dtype.size()`.
    pub fn from_bytes(name: &str, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Self> {
        let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if n.and_then(|n| n.checked_mul(dtype.size())) != Some(bytes.len()) {
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

    /// A tensor whose elements are generated when read (see [`Generated`]); holds no data.
    ///
    /// Errors: `InvalidArgument` when `shape` does not have `generated.numel` elements.
    pub fn generated(name: &str, shape: Vec<usize>, generated: Generated) -> Result<Self> {
        let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if n != Some(generated.numel)
            || generated.numel.checked_mul(generated.dtype.size()).is_none()
        {
            return Err(Error::invalid_argument(format!(
                "{name}: {} generated elements do not fill shape {shape:?}",
                generated.numel
            )));
        }
        Ok(HostTensor {
            name: name.to_string(),
            file: "<generated>".to_string(),
            dtype: generated.dtype,
            shape,
            data: TensorBytes::Generated(generated),
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the data in bytes (`numel() * dtype.size()`).
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// Fill `dst` with the tensor's bytes starting at byte `offset` (a staging buffer may take
    /// a tensor in pieces).
    ///
    /// Errors: `InvalidArgument` when `offset + dst.len()` exceeds [`byte_len`](Self::byte_len);
    /// `Io` when the file cannot be read, e.g. because it was truncated after it was opened.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.data.read_at(&self.file, &self.name, offset, dst)
    }

    /// All bytes, in a new buffer.
    ///
    /// Errors: as [`read_at`](Self::read_at), and `OutOfMemory` when the buffer cannot be had.
    pub fn read_vec(&self) -> Result<Vec<u8>> {
        self.data.read_vec(&self.file, &self.name)
    }

    /// Convert to f32 (for small tensors such as norm weights, and for tests). Reads every byte
    /// and allocates `4 * numel()` bytes.
    ///
    /// Errors: as [`read_vec`](Self::read_vec).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let bytes = self.read_vec()?;
        Ok(match self.dtype {
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
        })
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, dst: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, dst, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut dst: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !dst.is_empty() {
        match file.seek_read(dst, offset) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                dst = &mut dst[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One header entry as written in the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// A validated header entry: offsets are relative to the start of the data section.
#[derive(Clone, Debug)]
struct TensorInfo {
    dtype: String,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

/// Bytes per element of every safetensors dtype (so that headers of checkpoints with tensors we
/// do not use still validate), or None for a name the format does not define.
pub(crate) fn dtype_size(name: &str) -> Option<u64> {
    Some(match name {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Parse and validate a safetensors header: `json` is the header text, `data_len` the size of the
/// data section that follows it. Returns the tensors by name. Allocates nothing beyond the parsed
/// header itself.
///
/// Errors: `ModelFormat` naming the tensor for invalid JSON, an unknown dtype, a shape whose
/// element count or byte size overflows, a byte range that does not match dtype x shape, and
/// ranges that overlap, leave a hole or run past the end of the file.
fn parse_header(json: &[u8], data_len: u64) -> Result<BTreeMap<String, TensorInfo>> {
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| Error::model_format(format!("header is not a JSON object: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue; // free-form string map; nothing of ours depends on it
        }
        let bad = |what: String| Error::model_format(format!("tensor {name}: {what}"));
        let info: RawTensorInfo =
            serde_json::from_value(value).map_err(|e| bad(format!("invalid entry: {e}")))?;
        let size = dtype_size(&info.dtype)
            .ok_or_else(|| bad(format!("unknown dtype \"{}\"", info.dtype)))?;
        let bytes = info
            .shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .filter(|&b| usize::try_from(b).is_ok())
            .ok_or_else(|| bad(format!("shape {:?} of {} is too large", info.shape, info.dtype)))?;
        let (start, end) = info.data_offsets;
        if start > end || end > data_len {
            return Err(bad(format!(
                "data_offsets [{start}, {end}] outside the data section of {data_len} bytes"
            )));
        }
        if end - start != bytes {
            return Err(bad(format!(
                "data_offsets [{start}, {end}] hold {} bytes, but {} {:?} needs {bytes}",
                end - start,
                info.dtype,
                info.shape
            )));
        }
        let shape = info
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<usize>, _>>()
            .map_err(|_| bad(format!("shape {:?} does not fit this machine", info.shape)))?;
        tensors.insert(name, TensorInfo { dtype: info.dtype, shape, start, len: bytes as usize });
    }
    // The ranges must tile the data section: sorted by start, each begins where the last ended.
    let mut ranges: Vec<(u64, u64, &str)> =
        tensors.iter().map(|(n, t)| (t.start, t.start + t.len as u64, n.as_str())).collect();
    ranges.sort_unstable();
    let mut expected = 0u64;
    for (start, end, name) in ranges {
        if start != expected {
            let what = if start < expected {
                "overlaps the tensor before it"
            } else {
                "leaves a gap before it"
            };
            return Err(Error::model_format(format!("tensor {name}: data at byte {start} {what}")));
        }
        expected = end;
    }
    if expected != data_len {
        return Err(Error::model_format(format!(
            "the tensors cover {expected} bytes of a {data_len}-byte data section"
        )));
    }
    Ok(tensors)
}

/// One opened and validated safetensors file.
#[derive(Debug)]
struct TensorFile {
    name: String,
    file: Arc<File>,
    tensors: BTreeMap<String, TensorInfo>,
    data_start: u64,
}

impl TensorFile {
    fn open(dir: &Path, name: &str) -> Result<TensorFile> {
        let path = resolve_model_file(dir, name)?;
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let format_err = |what: String| Error::model_format(format!("{name}: {what}"));
        let mut len_bytes = [0u8; 8];
        if file_len < 8 {
            return Err(format_err(format!(
                "{file_len} bytes is too short for a safetensors file"
            )));
        }
        read_exact_at(&file, &mut len_bytes, 0).map_err(|e| Error::io(&path, e))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
            return Err(format_err(format!(
                "header length {header_len} exceeds the file ({file_len} bytes) or the {MAX_HEADER_BYTES}-byte limit"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        read_exact_at(&file, &mut header, 8).map_err(|e| Error::io(&path, e))?;
        let data_start = 8 + header_len;
        let tensors = parse_header(&header, file_len - data_start).map_err(|e| e.context(name))?;
        Ok(TensorFile { name: name.to_string(), file: Arc::new(file), tensors, data_start })
    }

    fn tensor(&self, name: &str) -> Option<Result<HostTensor>> {
        let info = self.tensors.get(name)?;
        let dtype = match info.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => {
                return Some(Err(Error::model_format(format!(
                    "{}: {name}: dtype {other} is not supported (expected BF16, F16 or F32)",
                    self.name
                ))))
            }
        };
        Some(Ok(HostTensor {
            name: name.to_string(),
            file: self.name.clone(),
            dtype,
            shape: info.shape.clone(),
            data: TensorBytes::File {
                file: Arc::clone(&self.file),
                offset: self.data_start + info.start,
                len: info.len,
            },
        }))
    }
}

/// model.safetensors.index.json
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// All tensors of a checkpoint, by name, from one file or a sharded set.
#[derive(Debug)]
pub struct Checkpoint {
    files: Vec<TensorFile>,
    /// Tensor name -> index into `files`.
    location: HashMap<String, usize>,
}

impl Checkpoint {
    /// Open `model.safetensors`, or the shards listed by `model.safetensors.index.json`, and
    /// validate each file's header; no tensor data is read.
    ///
    /// Errors: `Io` when neither file exists or a file cannot be opened or read; `ModelFormat`
    /// for an invalid safetensors header or index, a file that resolves outside the folder
    /// (`..`, an absolute path, a symlink), or an index mapping a tensor to a file that does not
    /// contain it.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        const INDEX: &str = "model.safetensors.index.json";
        if dir.join(INDEX).exists() {
            return Self::open_sharded(dir, &resolve_model_file(dir, INDEX)?);
        }
        if !dir.join("model.safetensors").exists() {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{}: no model.safetensors or model.safetensors.index.json in the model folder",
                    dir.display()
                ),
            ));
        }
        let file = TensorFile::open(dir, "model.safetensors")?;
        let location = file.tensors.keys().map(|name| (name.clone(), 0)).collect();
        Ok(Checkpoint { files: vec![file], location })
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Checkpoint> {
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let index: ShardIndex = serde_json::from_str(&text).map_err(|e| {
            Error::model_format(format!("model.safetensors.index.json: invalid index: {e}"))
        })?;
        let mut files: Vec<TensorFile> = Vec::new();
        let mut file_ids: HashMap<String, usize> = HashMap::new();
        let mut location = HashMap::new();
        for (tensor, file_name) in &index.weight_map {
            let id = match file_ids.get(file_name) {
                Some(&id) => id,
                None => {
                    let file = TensorFile::open(dir, file_name).map_err(|e| {
                        e.context(format!("model.safetensors.index.json: {tensor}"))
                    })?;
                    files.push(file);
                    file_ids.insert(file_name.clone(), files.len() - 1);
                    files.len() - 1
                }
            };
            if !files[id].tensors.contains_key(tensor) {
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

    /// The tensor called `name` whatever its dtype, if the checkpoint has it.
    pub fn get_raw(&self, name: &str) -> Option<RawTensor> {
        let &id = self.location.get(name)?;
        let file = &self.files[id];
        let info = file.tensors.get(name)?;
        Some(RawTensor {
            name: name.to_string(),
            file: file.name.clone(),
            dtype: info.dtype.clone(),
            shape: info.shape.clone(),
            data: TensorBytes::File {
                file: Arc::clone(&file.file),
                offset: file.data_start + info.start,
                len: info.len,
            },
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, dtype, shape, data_offsets) of one header entry.
    type Entry<'a> = (&'a str, &'a str, &'a [u64], (u64, u64));

    fn header(entries: &[Entry]) -> Vec<u8> {
        let map: serde_json::Map<String, serde_json::Value> = entries
            .iter()
            .map(|(name, dtype, shape, offsets)| {
                let v = serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offsets.0, offsets.1]});
                (name.to_string(), v)
            })
            .collect();
        serde_json::to_vec(&map).unwrap()
    }

    #[test]
    fn valid_headers_parse() {
        let h = header(&[("a", "BF16", &[2, 3], (0, 12)), ("b", "F32", &[1], (12, 16))]);
        let t = parse_header(&h, 16).unwrap();
        assert_eq!(t["a"].shape, vec![2, 3]);
        assert_eq!((t["b"].start, t["b"].len), (12, 4));
        let with_meta = br#"{"__metadata__": {"format": "pt"}, "x": {"dtype": "I8", "shape": [], "data_offsets": [0, 1]}}"#;
        assert_eq!(parse_header(with_meta, 1).unwrap()["x"].len, 1);
    }

    #[test]
    fn hostile_headers_are_rejected_with_the_tensor_named() {
        let cases: Vec<(Vec<u8>, u64, &str)> = vec![
            (header(&[("a", "BF16", &[2, 3], (0, 12))]), 8, "outside the data section"),
            (header(&[("a", "BF16", &[2, 3], (0, 10))]), 10, "needs 12"),
            (header(&[("a", "BF16", &[u64::MAX, 4], (0, 8))]), 8, "too large"),
            (header(&[("a", "F64", &[1 << 62], (0, 8))]), 8, "too large"),
            (header(&[("a", "Q4", &[1], (0, 1))]), 1, "unknown dtype"),
            (header(&[("a", "U8", &[4], (0, 4)), ("b", "U8", &[4], (2, 6))]), 6, "overlaps"),
            (header(&[("a", "U8", &[4], (0, 4)), ("b", "U8", &[4], (6, 10))]), 10, "gap"),
            (header(&[("a", "U8", &[4], (0, 4))]), 9, "cover 4 bytes"),
            (header(&[("a", "U8", &[4], (4, 0))]), 9, "outside"),
            (b"[1, 2]".to_vec(), 0, "not a JSON object"),
            (
                br#"{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}"#.to_vec(),
                1,
                "invalid entry",
            ),
        ];
        for (json, data_len, expected) in cases {
            let err = parse_header(&json, data_len).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ModelFormat);
            assert!(err.message().contains(expected), "{err} lacks {expected:?}");
        }
    }

    fn write_file(dir: &Path, name: &str, header_len: u64, rest: &[u8]) {
        let mut bytes = header_len.to_le_bytes().to_vec();
        bytes.extend_from_slice(rest);
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    #[test]
    fn header_length_bombs_fail_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        for claimed in [u64::MAX, 1 << 40, MAX_HEADER_BYTES + 1, 3] {
            write_file(dir.path(), "model.safetensors", claimed, b"{}");
            let err = Checkpoint::open(dir.path()).err().unwrap();
            assert_eq!(err.kind(), ErrorKind::ModelFormat, "{err}");
            assert!(err.message().contains("header length"), "{err}");
        }
        std::fs::write(dir.path().join("model.safetensors"), b"1234").unwrap();
        assert!(Checkpoint::open(dir.path()).err().unwrap().message().contains("too short"));
    }

    #[test]
    fn truncation_after_open_is_an_io_error_naming_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let h = header(&[("w", "F32", &[4], (0, 16))]);
        let mut rest = h.clone();
        rest.extend_from_slice(&[0u8; 16]);
        write_file(dir.path(), "model.safetensors", h.len() as u64, &rest);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let w = ckpt.get("w").unwrap().unwrap();
        assert_eq!(w.to_f32_vec().unwrap(), vec![0.0; 4]);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("model.safetensors"))
            .unwrap();
        file.set_len(8 + h.len() as u64 + 5).unwrap();
        let err = w.to_f32_vec().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        assert!(err.message().contains("model.safetensors: w: file ends before byte"), "{err}");
    }

    #[test]
    fn reads_in_pieces_stay_inside_the_tensor() {
        let t = HostTensor::from_bytes("x", DType::F16, vec![3], vec![1, 2, 3, 4, 5, 6]).unwrap();
        let mut part = [0u8; 2];
        t.read_at(4, &mut part).unwrap();
        assert_eq!(part, [5, 6]);
        assert_eq!(t.read_at(5, &mut part).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            t.read_at(usize::MAX, &mut part).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn to_f32_converts_each_dtype() {
        let bf = half::bf16::from_f32(1.5).to_le_bytes().to_vec();
        let t = HostTensor::from_bytes("x", DType::BF16, vec![1], bf).unwrap();
        assert_eq!(t.to_f32_vec().unwrap(), vec![1.5]);
        let f = (-2.25f32).to_le_bytes().to_vec();
        let t = HostTensor::from_bytes("x", DType::F32, vec![1], f).unwrap();
        assert_eq!(t.to_f32_vec().unwrap(), vec![-2.25]);
        assert!(HostTensor::from_bytes("x", DType::F32, vec![2], vec![0; 4]).is_err());
        assert!(HostTensor::from_bytes("x", DType::F32, vec![usize::MAX, 2], vec![]).is_err());
    }
}
