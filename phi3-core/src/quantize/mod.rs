//! `phi3 quantize`: write a model folder whose decoder projections are stored quantized (the
//! layout of `loader/quant_file.rs`), so later loads read them as they are instead of
//! quantizing the bf16 weights at every start.
//!
//! Streaming, like quantizing at load: one tensor is read, quantized and written at a time, so
//! peak memory is about two copies of the largest quantized tensor plus an 8 MiB copy buffer.
//! The folder is written under a temporary name beside `out` and renamed into place only when
//! complete, so an interrupted run leaves no half-written model behind (the temporary folder is
//! removed on error).
//!
//! With [`QuantizeOptions::awq`] (int4 only), per-channel scales are searched first on a built-in
//! calibration text (`awq.rs`, layer by layer) and folded into the weights as they are written:
//! projections get `Q(W diag(s))`, the norm weights that feed them are divided by `s` and written
//! in F32 (so the fold adds no rounding of its own).

pub mod awq;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use self::awq::{AwqReport, LayerScales};

use crate::config::ModelConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::forward::Progress;
use crate::loader::TensorRole;
use crate::loader::{self, quant, quant_file, HostTensor, QuantizedTensor, StoredQuantization};
use crate::loader::{paths, WeightFormat};
use crate::model::{LoadProgress, ProgressFn};

/// Shards are cut before a tensor that would take them past this size (as HF does at 5 GB).
pub const DEFAULT_SHARD_BYTES: u64 = 4 << 30;
/// Files copied unchanged from the source folder when present (config.json is rewritten).
const COPIED_FILES: [&str; 8] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
];
/// Bytes copied per read of a dense tensor.
const COPY_CHUNK: usize = 8 << 20;

/// What [`quantize_folder`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizeReport {
    /// The format of the projections.
    pub format: WeightFormat,
    /// Tensors read from the source.
    pub tensors: usize,
    /// Of which quantized.
    pub quantized: usize,
    /// Bytes of tensor data read.
    pub bytes_in: u64,
    /// Bytes of tensor data written (all shards, headers excluded).
    pub bytes_out: u64,
    /// The safetensors files written.
    pub files: Vec<String>,
    /// Wall time.
    pub seconds: f64,
    /// The activation-aware scale search, when [`QuantizeOptions::awq`] asked for one.
    pub awq: Option<AwqReport>,
}

/// Options of [`quantize_folder`].
#[derive(Clone, Default)]
pub struct QuantizeOptions {
    /// Largest shard in bytes before a new one is started; `None` for
    /// [`DEFAULT_SHARD_BYTES`].
    pub shard_bytes: Option<u64>,
    /// Called after each tensor is written, and after each layer of the AWQ search (with
    /// `tensor` = "awq: layer i", counting layers, no bytes).
    pub progress: Option<ProgressFn>,
    /// Search activation-aware scales (module `awq`) and fold them in before quantizing; int4
    /// only.
    pub awq: bool,
    /// Most calibration tokens for the AWQ search; `None` for
    /// [`awq::DEFAULT_CALIBRATION_TOKENS`].
    pub calibration_tokens: Option<usize>,
    /// Quantize the untied `lm_head` too (round to nearest, in `format`; not AWQ-scaled). It is
    /// about 4% of Phi-3-medium's parameters but read whole for every token. Models with tied
    /// embeddings are refused: their output matrix is the embedding table, which stays dense.
    pub lm_head: bool,
}

/// One tensor of the output: its name, dtype, shape and where its bytes come from.
struct OutTensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    bytes: u64,
    /// The source tensor, and for a quantized one the index of this part.
    source: HostTensor,
    part: Option<usize>,
    /// AWQ scales to fold in before writing (or quantizing); the output is then F32 when dense.
    fold: Option<Fold>,
}

/// How AWQ scales change one tensor.
#[derive(Clone)]
enum Fold {
    /// A norm weight divided by the scales of the projection it feeds.
    Norm(Arc<Vec<f32>>),
    /// A projection's columns times its scales (`cols`); its last `div.len()` rows divided by
    /// the next projection's scales (v rows of qkv for o_proj, up rows of gate_up for down).
    Proj { cols: Arc<Vec<f32>>, div: Option<Arc<Vec<f32>>> },
}

impl Fold {
    /// The tensor's values with the fold applied, f32.
    fn apply(&self, t: &HostTensor) -> Result<Vec<f32>> {
        let mut v = t.to_f32_vec()?;
        match self {
            Fold::Norm(s) => v.iter_mut().zip(s.iter()).for_each(|(w, s)| *w /= s),
            Fold::Proj { cols, div } => {
                awq::fold_matrix(&mut v, cols, div.as_deref().map_or(&[], |d| &d[..]))
            }
        }
        Ok(v)
    }
}

/// Quantize the model folder `src` into a new folder `out` with projections in `format`.
///
/// Errors: `InvalidArgument` for a native `format`, a group that does not divide a projection's
/// width (naming it), an `out` that already exists, or a `src` that is already quantized;
/// the errors of [`crate::Model::load`] for an invalid source folder (`Io`, `ModelFormat`,
/// `Unsupported`); `Io` when writing fails (nothing is left at `out` then).
pub fn quantize_folder(
    src: &Path,
    out: &Path,
    format: WeightFormat,
    options: &QuantizeOptions,
) -> Result<QuantizeReport> {
    format.validate()?;
    if !format.is_quantized() {
        return Err(Error::invalid_argument("quantize: weights must be int8 or int4, not native"));
    }
    if options.awq && !matches!(format, WeightFormat::Int4 { .. }) {
        return Err(Error::invalid_argument(format!(
            "quantize: AWQ scales apply to int4 weights only, not {format}"
        )));
    }
    convert(src, out, format, options, false)
}

/// Write `src` to `out` with AWQ scales searched for int4 `group` folded in, but not quantized:
/// projections and norms in F32, the rest as they are. Without quantization the folded model
/// computes what the original does (up to f32 rounding), which is what this is for: checking the
/// fold. Options as [`quantize_folder`] (`awq` is implied).
///
/// Errors: as [`quantize_folder`] with int4 `group`.
pub fn write_awq_folded(
    src: &Path,
    out: &Path,
    group: usize,
    options: &QuantizeOptions,
) -> Result<QuantizeReport> {
    WeightFormat::Int4 { group }.validate()?;
    let options = QuantizeOptions { awq: true, ..options.clone() };
    convert(src, out, WeightFormat::Int4 { group }, &options, true)
}

/// [`quantize_folder`] after its argument checks; `fold_only` writes dense F32 projections.
fn convert(
    src: &Path,
    out: &Path,
    format: WeightFormat,
    options: &QuantizeOptions,
    fold_only: bool,
) -> Result<QuantizeReport> {
    let started = Instant::now();
    if out.exists() {
        return Err(Error::invalid_argument(format!(
            "{}: already exists; quantize writes a new folder",
            out.display()
        )));
    }
    let config = ModelConfig::from_dir(src)?;
    config.validate()?;
    if options.lm_head && config.tie_word_embeddings {
        return Err(Error::invalid_argument(format!(
            "{}: lm_head is tied to the embedding table, which stays dense; drop lm_head",
            src.display()
        )));
    }
    match StoredQuantization::of_folder(src)? {
        StoredQuantization::Dense => {}
        stored => {
            return Err(Error::invalid_argument(format!(
                "{}: already quantized ({}); quantize the original checkpoint",
                src.display(),
                stored.format()
            )))
        }
    }
    let weights = loader::load(src, &config)?;
    // Checks every projection against the format before the (long) search.
    let mut plan = plan(&weights, format, None, options.lm_head)?;
    let mut awq_report = None;
    if options.awq {
        let WeightFormat::Int4 { group } = format else {
            return Err(Error::internal("AWQ without int4"));
        };
        let max = options.calibration_tokens.unwrap_or(awq::DEFAULT_CALIBRATION_TOKENS);
        let tokens = awq::calibration_tokens(src, &config, max)?;
        let n_layers = weights.layers.len();
        let on_layer = |i: usize| {
            if let Some(cb) = &options.progress {
                cb(&LoadProgress {
                    tensors_done: i + 1,
                    tensors_total: n_layers,
                    bytes_done: 0,
                    bytes_total: 0,
                    tensor: format!("awq: layer {i}"),
                });
            }
        };
        let scales = awq::search(&config, &weights, group, &tokens, on_layer)?;
        let target = if fold_only { WeightFormat::Native } else { format };
        plan = self::plan(&weights, target, Some(&scales.layers), options.lm_head)?;
        awq_report = Some(AwqReport { tokens: scales.tokens, layers: scales.searches });
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .ok_or_else(|| Error::invalid_argument(format!("{}: not a folder name", out.display())))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let config_format = if fold_only { None } else { Some(format) };
    let written = write_folder(src, &tmp, &plan, format, config_format, options);
    let files = match written {
        Ok(files) => files,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, out).map_err(|e| {
        let _ = fs::remove_dir_all(&tmp);
        Error::io(out, e)
    })?;
    Ok(QuantizeReport {
        format: if fold_only { WeightFormat::Native } else { format },
        tensors: plan.iter().filter(|t| t.part.is_none_or(|p| p == 0)).count(),
        quantized: plan.iter().filter(|t| t.part == Some(0)).count(),
        bytes_in: weights_bytes(&weights),
        bytes_out: plan.iter().map(|t| t.bytes).sum(),
        files,
        seconds: started.elapsed().as_secs_f64(),
        awq: awq_report,
    })
}

/// Each tensor's AWQ fold, in load order (the order of `try_map`).
fn folds(
    weights: &loader::ModelWeights<HostTensor>,
    scales: &[LayerScales],
) -> Result<Vec<Option<Fold>>> {
    if scales.len() != weights.layers.len() {
        return Err(Error::internal("AWQ scales: one entry per layer expected"));
    }
    let mut out = vec![None]; // embed_tokens
    for s in scales {
        let arc = |v: &Vec<f32>| Arc::new(v.clone());
        let o = s.o.as_ref().map(arc);
        out.push(Some(Fold::Norm(arc(&s.qkv))));
        out.push(Some(Fold::Proj { cols: arc(&s.qkv), div: o.clone() }));
        out.push(o.map(|o| Fold::Proj { cols: o, div: None }));
        out.push(Some(Fold::Norm(arc(&s.gate_up))));
        out.push(Some(Fold::Proj { cols: arc(&s.gate_up), div: Some(arc(&s.down)) }));
        out.push(Some(Fold::Proj { cols: arc(&s.down), div: None }));
    }
    out.push(None); // norm
    if weights.lm_head.is_some() {
        out.push(None);
    }
    Ok(out)
}

fn weights_bytes(weights: &loader::ModelWeights<HostTensor>) -> u64 {
    let mut bytes = 0;
    let _ = weights.try_map(|t| {
        bytes += t.byte_len() as u64;
        Ok(())
    });
    bytes
}

/// Every output tensor in load order: dense tensors as they are, each projection as its parts.
/// With `scales`, each tensor carries its AWQ fold, and a `Native` format writes the folded
/// projections dense (F32).
fn plan(
    weights: &loader::ModelWeights<HostTensor>,
    format: WeightFormat,
    scales: Option<&[LayerScales]>,
    lm_head: bool,
) -> Result<Vec<OutTensor>> {
    let mut folds = match scales {
        Some(scales) => folds(weights, scales)?.into_iter(),
        None => Vec::new().into_iter(),
    };
    let mut out = Vec::new();
    weights.try_map_with_role(|t, role| {
        let fold = folds.next().flatten();
        let quantized = role == TensorRole::Projection || (lm_head && role == TensorRole::Output);
        if !quantized || !format.is_quantized() {
            let (dtype, bytes) = match fold {
                Some(_) => ("F32".to_string(), 4 * t.numel() as u64),
                None => (t.dtype.name().to_string(), t.byte_len() as u64),
            };
            let (name, shape, source) = (t.name.clone(), t.shape.clone(), t.clone());
            out.push(OutTensor { name, dtype, shape, bytes, source, part: None, fold });
            return Ok(());
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        if let WeightFormat::Int4 { group } = format {
            if !cols.is_multiple_of(group) {
                return Err(Error::invalid_argument(format!(
                    "{}: width {cols} is not a multiple of the int4 group {group}",
                    t.name
                )));
            }
        }
        let prefix = t.name.strip_suffix(".weight").unwrap_or(&t.name);
        let names = quant_file::part_names(prefix, format);
        let layouts = quant_file::part_layouts(rows, cols, format);
        for (i, (name, (dtype, shape))) in names.into_iter().zip(layouts).enumerate() {
            let elem = loader::safetensors::dtype_size(dtype)
                .ok_or_else(|| Error::internal(format!("{name}: unknown dtype {dtype}")))?;
            let bytes = shape.iter().product::<usize>() as u64 * elem;
            let (dtype, source) = (dtype.to_string(), t.clone());
            let fold = fold.clone();
            out.push(OutTensor { name, dtype, shape, bytes, source, part: Some(i), fold });
        }
        Ok(())
    })?;
    Ok(out)
}

/// Write the shards, the index, config.json and the copied files into `dir` (created here).
/// Returns the safetensors file names.
fn write_folder(
    src: &Path,
    dir: &Path,
    plan: &[OutTensor],
    format: WeightFormat,
    config_format: Option<WeightFormat>,
    options: &QuantizeOptions,
) -> Result<Vec<String>> {
    fs::create_dir(dir).map_err(|e| Error::io(dir, e))?;
    let limit = options.shard_bytes.unwrap_or(DEFAULT_SHARD_BYTES).max(1);
    let mut shards: Vec<Vec<&OutTensor>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in plan {
        let current = shards.last_mut().filter(|s| s.is_empty() || size + t.bytes <= limit);
        match current {
            Some(shard) => shard.push(t),
            None => {
                shards.push(vec![t]);
                size = 0;
            }
        }
        size += t.bytes;
    }
    let n = shards.len();
    let file_name = |i: usize| match n {
        1 => "model.safetensors".to_string(),
        _ => format!("model-{:05}-of-{n:05}.safetensors", i + 1),
    };
    let tensors = plan.iter().filter(|t| t.part.is_none_or(|p| p == 0)).count();
    let total: u64 = plan.iter().map(|t| t.source.byte_len() as u64).sum();
    let mut progress = Progress::new(tensors, total, options.progress.as_ref());
    let mut weight_map = BTreeMap::new();
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let path = dir.join(file_name(i));
        let file = File::create_new(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let io = |e| Error::io(&path, e);
        w.write_all(&header(shard)).map_err(io)?;
        for t in shard {
            weight_map.insert(t.name.clone(), file_name(i));
            match t.part {
                None => {
                    match &t.fold {
                        None => {
                            copy_tensor(&t.source, &mut w).map_err(|e| e.context(path.display()))?
                        }
                        Some(fold) => {
                            let v = fold.apply(&t.source)?;
                            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                            w.write_all(&bytes).map_err(io)?;
                        }
                    }
                    progress.tensor_done(&t.source.name, t.source.byte_len() as u64);
                }
                Some(p) => {
                    if p == 0 {
                        let q = match &t.fold {
                            None => quant::quantize(&t.source, format)?,
                            Some(fold) => {
                                let [rows, cols] = t.source.shape[..] else {
                                    return Err(Error::internal("projection is not a matrix"));
                                };
                                let v = fold.apply(&t.source)?;
                                let name = format!("{}: {}", t.source.file, t.source.name);
                                QuantizedTensor::from_f32(&name, &v, rows, cols, format)?
                            }
                        };
                        parts = quant_file::part_bytes(&q)?;
                    }
                    let bytes = parts.get(p).ok_or_else(|| Error::internal("part index"))?;
                    w.write_all(bytes).map_err(io)?;
                    if p + 1 == quant_file::part_names("", format).len() {
                        progress.tensor_done(&t.source.name, t.source.byte_len() as u64);
                    }
                }
            }
        }
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": plan.iter().map(|t| t.bytes).sum::<u64>() },
            "weight_map": weight_map,
        });
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    write_config(src, dir, config_format)?;
    for name in COPIED_FILES {
        if let Some(bytes) = paths::read_model_file(src, name)? {
            let path = dir.join(name);
            fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok((0..n).map(file_name).collect())
}

/// The safetensors header of `shard`: 8-byte length, JSON, padded with spaces to 8 bytes.
fn header(shard: &[&OutTensor]) -> Vec<u8> {
    let mut entries = serde_json::Map::new();
    entries.insert(
        "__metadata__".to_string(),
        serde_json::json!({ "format": "pt", "quantized_by": "phi3-rs" }),
    );
    let mut offset = 0u64;
    for t in shard {
        entries.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.dtype,
                "shape": t.shape,
                "data_offsets": [offset, offset + t.bytes],
            }),
        );
        offset += t.bytes;
    }
    let mut json = serde_json::Value::Object(entries).to_string().into_bytes();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

/// Copy a dense tensor's bytes in chunks of whole [`COPY_CHUNK`]s.
fn copy_tensor(t: &HostTensor, w: &mut impl Write) -> Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK.min(t.byte_len())];
    let mut at = 0;
    while at < t.byte_len() {
        let n = buf.len().min(t.byte_len() - at);
        t.read_at(at, &mut buf[..n])?;
        w.write_all(&buf[..n]).map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
        at += n;
    }
    Ok(())
}

/// config.json of `src` with `quantization_config` set for `format` (unchanged for `None`).
fn write_config(src: &Path, dir: &Path, format: Option<WeightFormat>) -> Result<()> {
    let bytes = paths::read_model_file(src, "config.json")?
        .ok_or_else(|| Error::new(ErrorKind::Io, format!("{}: no config.json", src.display())))?;
    let mut config: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::model_format(format!("config.json: invalid JSON: {e}")))?;
    let object = config
        .as_object_mut()
        .ok_or_else(|| Error::model_format("config.json: not a JSON object"))?;
    if let Some(format) = format {
        object.insert("quantization_config".to_string(), quant_file::config_entry(format));
    }
    write_json(&dir.join("config.json"), &config)
}

fn write_json(path: &PathBuf, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::internal(format!("{}: {e}", path.display())))?;
    fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}
