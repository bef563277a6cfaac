//! Checkpoint loading: a model folder -> [`ModelWeights`] of validated [`HostTensor`]s.
//!
//! Every expected tensor's name, shape and dtype is checked here, before any backend sees a byte,
//! and each error names the file and the tensor. Weights stay in their files, in their file dtype:
//! nothing is read, copied or converted here (the backends read each tensor when they take it).
//!
//! Also here: deterministic random ("dummy") weights of any shape, for benchmarks and the demo
//! model, so no files are needed.

pub mod hub_quant;
pub mod names;
pub mod paths;
pub mod quant;
pub mod quant_file;
pub mod safetensors;
pub mod source;

use std::path::Path;

pub use self::quant::{QuantizedTensor, WeightFormat};
pub use self::safetensors::{Checkpoint, DType, HostTensor, RawTensor};
pub use self::source::{QuantizedSource, StoredTensor, WeightSource};
use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// The tensors of one decoder layer, generic over where they live (host map or backend buffer).
#[derive(Clone, Debug)]
pub struct LayerWeights<W> {
    /// RMSNorm weight before attention, `[hidden]`.
    pub input_layernorm: W,
    /// Fused query, key and value projection, `[q_dim + 2 * kv_dim, hidden]`: q rows, then k,
    /// then v.
    pub qkv_proj: W,
    /// Attention output projection, `[hidden, q_dim]`.
    pub o_proj: W,
    /// RMSNorm weight before the MLP, `[hidden]`.
    pub post_attention_layernorm: W,
    /// Fused gate and up projection, `[2 * intermediate, hidden]`: gate rows first, then up.
    pub gate_up_proj: W,
    /// MLP output projection, `[hidden, intermediate]`.
    pub down_proj: W,
}

/// All tensors of a Phi3ForCausalLM.
#[derive(Clone, Debug)]
pub struct ModelWeights<W> {
    /// Token embeddings, `[vocab, hidden]`.
    pub embed_tokens: W,
    /// The decoder layers, `num_hidden_layers` of them, in order.
    pub layers: Vec<LayerWeights<W>>,
    /// Final RMSNorm weight, `[hidden]`.
    pub norm: W,
    /// Output projection to the logits, `[vocab, hidden]`; `None` when the embeddings are tied:
    /// the logits then use `embed_tokens`.
    pub lm_head: Option<W>,
}

/// What a tensor is for: decides whether a [`WeightFormat`] applies to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// The token embedding table (also the output matrix when tied).
    Embedding,
    /// An RMSNorm weight vector.
    Norm,
    /// A decoder layer's 2-D projection (qkv, o, gate_up, down): the tensors that are quantized.
    Projection,
    /// The untied `lm_head`.
    Output,
}

impl<W> ModelWeights<W> {
    /// Convert every tensor with `f` (e.g. upload to a backend), in load order, stopping at the first error.
    ///
    /// Errors: the first error `f` returns, unchanged.
    pub fn try_map<V>(&self, mut f: impl FnMut(&W) -> Result<V>) -> Result<ModelWeights<V>> {
        self.try_map_with_role(|w, _| f(w))
    }

    /// As [`try_map`](Self::try_map), also telling `f` what each tensor is for.
    ///
    /// Errors: the first error `f` returns, unchanged.
    pub fn try_map_with_role<V>(
        &self,
        mut f: impl FnMut(&W, TensorRole) -> Result<V>,
    ) -> Result<ModelWeights<V>> {
        use TensorRole::{Norm, Projection};
        let embed_tokens = f(&self.embed_tokens, TensorRole::Embedding)?;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    input_layernorm: f(&l.input_layernorm, Norm)?,
                    qkv_proj: f(&l.qkv_proj, Projection)?,
                    o_proj: f(&l.o_proj, Projection)?,
                    post_attention_layernorm: f(&l.post_attention_layernorm, Norm)?,
                    gate_up_proj: f(&l.gate_up_proj, Projection)?,
                    down_proj: f(&l.down_proj, Projection)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = f(&self.norm, Norm)?;
        let lm_head = self.lm_head.as_ref().map(|w| f(w, TensorRole::Output)).transpose()?;
        Ok(ModelWeights { embed_tokens, layers, norm, lm_head })
    }

    /// The matrix that produces the logits: `lm_head`, or the embeddings when tied.
    pub fn output_matrix(&self) -> &W {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}

/// How a checkpoint stores its decoder projections, from `quantization_config` in config.json.
#[derive(Clone, Debug, PartialEq)]
pub enum StoredQuantization {
    /// Dense (no `quantization_config`): quantized at load when asked.
    Dense,
    /// A phi3-rs quantized folder (`phi3 quantize`) in this format.
    Phi3Rs(WeightFormat),
    /// An AWQ or GPTQ int4 checkpoint from the Hugging Face hub.
    Hub(hub_quant::HubQuant),
}

impl StoredQuantization {
    /// Read `quantization_config` from `dir`/config.json.
    ///
    /// Errors: `Io`/`ModelFormat` for an unreadable or invalid config.json; `ModelFormat` or
    /// `Unsupported` for a `quantization_config` this build cannot read (naming the field).
    pub fn of_folder(dir: &Path) -> Result<StoredQuantization> {
        let Some(bytes) = paths::read_model_file(dir, "config.json")? else {
            return Ok(StoredQuantization::Dense);
        };
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::model_format(format!("config.json: invalid JSON: {e}")))?;
        let Some(entry) = json.get("quantization_config").filter(|v| !v.is_null()) else {
            return Ok(StoredQuantization::Dense);
        };
        if entry.get("quant_method").and_then(serde_json::Value::as_str)
            == Some(quant_file::QUANT_METHOD)
        {
            return Ok(StoredQuantization::Phi3Rs(quant_file::parse_config_entry(entry)?));
        }
        match hub_quant::from_config(&json)? {
            Some(scheme) => Ok(StoredQuantization::Hub(scheme)),
            None => Ok(StoredQuantization::Dense),
        }
    }

    /// The format the projections are read into: `Native` when dense.
    pub fn format(&self) -> WeightFormat {
        match self {
            StoredQuantization::Dense => WeightFormat::Native,
            StoredQuantization::Phi3Rs(format) => *format,
            StoredQuantization::Hub(scheme) => WeightFormat::Int4 { group: scheme.group() },
        }
    }
}

/// Open the dense safetensors of `dir` and check every tensor `config` needs: as [`load_sources`]
/// with [`StoredQuantization::Dense`], every tensor a [`HostTensor`].
///
/// Errors: as [`load_sources`].
pub fn load(dir: &Path, config: &ModelConfig) -> Result<ModelWeights<HostTensor>> {
    load_sources(dir, config, &StoredQuantization::Dense)?.try_map(|source| match source {
        WeightSource::Dense(t) => Ok(t.clone()),
        WeightSource::Quantized(q) => Err(Error::internal(format!("{}: not dense", q.name))),
    })
}

/// Open the safetensors of `dir` and check every tensor `config` needs. Cheap: only headers are
/// read; tensor data stays unread in the files. The decoder projections of a quantized
/// checkpoint (`stored`, see [`StoredQuantization::of_folder`]) are its quantized arrays.
///
/// Errors: `Io` when the folder has neither `model.safetensors` nor
/// `model.safetensors.index.json`, or a file cannot be opened or read; `ModelFormat` for an
/// invalid header or index, a file that resolves outside the folder, or a tensor that is missing, has
/// the wrong shape or an unsupported dtype (each message names the file and the tensor).
pub fn load_sources(
    dir: &Path,
    config: &ModelConfig,
    stored: &StoredQuantization,
) -> Result<ModelWeights<WeightSource>> {
    let checkpoint = std::sync::Arc::new(Checkpoint::open(dir)?);
    let missing = |name: &str| {
        Error::model_format(format!(
            "{}: tensor {name} is missing from the checkpoint",
            dir.display()
        ))
    };
    let take = |name: &str, shape: &[usize]| -> Result<HostTensor> {
        let tensor = checkpoint.get(name).ok_or_else(|| missing(name))??;
        if tensor.shape != shape {
            return Err(Error::model_format(format!(
                "{}: {name}: shape {:?}, expected {shape:?}",
                tensor.file, tensor.shape
            )));
        }
        Ok(tensor)
    };
    layout(config)?.try_map_with_role(|(name, shape), role| {
        let prefix = name.strip_suffix(".weight").unwrap_or(name);
        match (role, stored) {
            // `phi3 quantize --lm-head` stores lm_head like a projection.
            (TensorRole::Projection, StoredQuantization::Phi3Rs(format))
            | (TensorRole::Output, StoredQuantization::Phi3Rs(format))
                if role == TensorRole::Projection
                    || checkpoint.get_raw(&format!("{prefix}.qweight")).is_some() =>
            {
                let parts = quant_file::part_names(prefix, *format)
                    .iter()
                    .map(|part| checkpoint.get_raw(part).ok_or_else(|| missing(part)))
                    .collect::<Result<Vec<_>>>()?;
                let source = QuantizedSource::phi3rs(name, shape[0], shape[1], *format, parts)?;
                Ok(WeightSource::Quantized(source))
            }
            // AWQ/GPTQ: projections left out of quantization (`modules_to_not_convert`) and the
            // dense lm_head stay dense; GPTQModel's `lm_head: true` quantizes lm_head too.
            (TensorRole::Projection | TensorRole::Output, StoredQuantization::Hub(scheme))
                if hub_quant::is_quantized(&checkpoint, prefix) =>
            {
                let (rows, cols) = (shape[0], shape[1]);
                let scheme = *scheme;
                let source =
                    QuantizedSource::hub(name, rows, cols, checkpoint.clone(), scheme, prefix);
                Ok(WeightSource::Quantized(source))
            }
            _ => Ok(WeightSource::Dense(take(name, shape)?)),
        }
    })
}

/// Every tensor's (name, shape) arranged as a [`ModelWeights`], in load order: what a backend
/// that generates weights itself (CUDA dummy weights) fills.
pub fn layout(config: &ModelConfig) -> Result<ModelWeights<(String, Vec<usize>)>> {
    assemble(config, names::expected_tensors(config))
}

/// Arrange tensors given in the order of `names::expected_tensors` into a [`ModelWeights`].
fn assemble<T>(config: &ModelConfig, tensors: Vec<T>) -> Result<ModelWeights<T>> {
    let mut it = tensors.into_iter();
    let mut next = || it.next().ok_or_else(|| Error::internal("expected tensor list too short"));
    let embed_tokens = next()?;
    let layers = (0..config.num_hidden_layers)
        .map(|_| {
            Ok(LayerWeights {
                input_layernorm: next()?,
                qkv_proj: next()?,
                o_proj: next()?,
                post_attention_layernorm: next()?,
                gate_up_proj: next()?,
                down_proj: next()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let norm = next()?;
    let lm_head = if config.tie_word_embeddings { None } else { Some(next()?) };
    Ok(ModelWeights { embed_tokens, layers, norm, lm_head })
}

/// Deterministic random weights for `config` in `dtype`: uniform in ±`1 / sqrt(fan_in)` for
/// matrices, 1 ± 0.1 for norm weights, ±1 for embeddings. Same seed, same weights: one
/// SplitMix64 stream from `seed` over all tensors in load order.
///
/// Nothing is generated here: each tensor makes its elements when it is read
/// ([`safetensors::Generated`]), so a backend that quantizes while reading never holds more
/// than one tensor of them, whatever the model's size.
///
/// Errors: `InvalidArgument` when a tensor's size overflows.
pub fn dummy(config: &ModelConfig, dtype: DType, seed: u64) -> Result<ModelWeights<HostTensor>> {
    let mut elements_before = 0usize;
    let mut tensors = Vec::new();
    for (name, shape) in names::expected_tensors(config) {
        let numel: usize = shape.iter().product();
        let (center, half_width) = if shape.len() == 1 {
            (1.0, 0.1)
        } else if name == names::EMBED_TOKENS {
            (0.0, 1.0)
        } else {
            (0.0, 1.0 / (shape[1] as f32).sqrt())
        };
        let generated = safetensors::Generated { state0: 0, center, half_width, dtype, numel };
        let state0 = safetensors::Generated { state0: seed, ..generated }.state_at(elements_before);
        let generated = safetensors::Generated { state0, ..generated };
        tensors.push(HostTensor::generated(&name, shape, generated)?);
        elements_before = elements_before.wrapping_add(numel);
    }
    assemble(config, tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The weights `dummy` generates lazily are the sequential SplitMix64 stream over all
    /// tensors in load order (what it produced when it generated eagerly), read whole or in
    /// pieces that cut elements in two.
    #[test]
    fn dummy_weights_are_one_sequential_stream_read_in_any_pieces() {
        let config = crate::demo::demo_model(&Default::default()).unwrap().config().clone();
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let weights = dummy(&config, dtype, 7).unwrap();
            let mut state = 7u64;
            let _ = weights.try_map(|t| {
                let (center, half_width) = if t.shape.len() == 1 {
                    (1.0, 0.1)
                } else if t.name == names::EMBED_TOKENS {
                    (0.0, 1.0)
                } else {
                    (0.0, 1.0 / (t.shape[1] as f32).sqrt())
                };
                let mut expected = Vec::with_capacity(t.byte_len());
                for _ in 0..t.numel() {
                    let bits = crate::sampler::splitmix64(&mut state);
                    let u = ((bits >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                    let x = center + half_width * u;
                    match dtype {
                        DType::F32 => expected.extend_from_slice(&x.to_le_bytes()),
                        DType::F16 => {
                            expected.extend_from_slice(&half::f16::from_f32(x).to_le_bytes())
                        }
                        DType::BF16 => {
                            expected.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes())
                        }
                    }
                }
                assert_eq!(t.read_vec().unwrap(), expected, "{} {dtype:?}", t.name);
                let mut pieces = vec![0u8; t.byte_len()];
                let mut at = 0;
                for (i, len) in [3usize, 1, 70_001, 5].iter().cycle().enumerate() {
                    if at == pieces.len() || i > 10_000 {
                        break;
                    }
                    let len = (*len).min(pieces.len() - at);
                    t.read_at(at, &mut pieces[at..at + len]).unwrap();
                    at += len;
                }
                assert_eq!(&pieces[..at], &expected[..at], "{} in pieces", t.name);
                Ok(())
            });
        }
    }
}
