//! `Model`: a loaded checkpoint on a backend, shared by any number of sessions and threads.
//!
//! `Model` is an `Arc` around the config, the tokenizer, the chat template and the engine
//! (backend + weights), so it is cheap to clone and `Send + Sync`. The backend is chosen at load
//! time and matched once per forward pass ([`AnyEngine`]), so the layer loop is monomorphised.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{self, CudaBackend, CudaStats};
use crate::backend::Backend;
pub use crate::backend::Device;
use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::ModelConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::forward::{Engine, EngineLimits};
use crate::kv_cache::SeqKv;
pub use crate::kv_pool::KvUsage;
use crate::loader::{
    self, DType, HostTensor, ModelWeights, StoredQuantization, TensorRole, WeightFormat,
    WeightSource,
};
use crate::rope::RopeRegime;
use crate::scheduler::{Job, JobOutput, SchedulerStats};
use crate::session::{Session, SessionOptions, PREFILL_CHUNK};
use crate::tokenizer::Tokenizer;

/// How to load a model.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Where to run: "auto" (the CPU until the CUDA backend is verified on a GPU; then CUDA when
    /// available), "cpu", "cuda", "cuda:N".
    pub device: Device,
    /// Upper bound on any session's context, in tokens (default: the model's
    /// `max_position_embeddings`). Sessions may ask for less, never more.
    pub max_context: Option<usize>,
    /// Ignore the checkpoint's weights and use deterministic random ones (benchmarks). On CUDA
    /// they are generated on the device (no files, no host copy) and differ from the CPU's.
    pub dummy_weights: Option<DummyWeights>,
    /// Called after each weight tensor reaches the backend (from the loading thread).
    pub progress: Option<ProgressFn>,
    /// How the decoder projections (qkv, o, gate_up, down) are stored: `Native` (the file dtype,
    /// the default), `Int8` or `Int4 { group }`, quantized tensor by tensor while they are read.
    /// Embeddings, norms and lm_head keep their file dtype. Both backends run them (CUDA:
    /// `backend/cuda/quant.rs`); with `dummy_weights` on CUDA the quantized projections are
    /// generated on the device.
    pub weights: WeightFormat,
    /// Bytes of KV-cache memory all sessions together may use (the pool of KV blocks). `None`:
    /// on the CPU no limit but allocation failure; on CUDA the device memory free after the
    /// weights are loaded, less a reserve for activations.
    pub kv_memory: Option<u64>,
    /// When a session's forward pass needs KV blocks the budget cannot supply: `false` (the
    /// default) fails it with `OutOfMemory`; `true` makes it wait until other sessions free
    /// blocks (dropped, truncated or reset), or until it is cancelled. Waiting needs another
    /// thread to free blocks: a single-threaded host should keep the error.
    pub kv_wait: bool,
    /// Most prompt tokens of one session in one forward pass (a longer prompt runs in chunks of
    /// this many, each a cancellation point), and most prefill tokens of one batched pass of
    /// several sessions. `None`: [`PREFILL_CHUNK`] (512). Larger chunks keep a GPU busier on
    /// long prompts and take more activation memory (CUDA counts it in the memory check:
    /// about 0.42 GiB per 512 tokens of Phi-3-medium); smaller ones let other sessions' decode
    /// steps in more often. The logits may differ in the last bits between chunk sizes (the
    /// GEMMs take other shapes), never between runs with the same one. From 1 to
    /// [`MAX_PREFILL_CHUNK`].
    pub prefill_chunk: Option<usize>,
}

/// Largest [`LoadOptions::prefill_chunk`].
pub const MAX_PREFILL_CHUNK: usize = 65_536;

/// A load progress callback (see [`LoadOptions::progress`]).
pub type ProgressFn = Arc<dyn Fn(&LoadProgress) + Send + Sync>;

/// How far a load has come: reported after each tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadProgress {
    /// Tensors on the backend so far.
    pub tensors_done: usize,
    /// Tensors in the model.
    pub tensors_total: usize,
    /// Bytes (in the file dtype) on the backend so far.
    pub bytes_done: u64,
    /// Bytes of all tensors.
    pub bytes_total: u64,
    /// Name of the tensor just finished.
    pub tensor: String,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("device", &self.device)
            .field("max_context", &self.max_context)
            .field("dummy_weights", &self.dummy_weights)
            .field("progress", &self.progress.as_ref().map(|_| "<callback>"))
            .field("weights", &self.weights)
            .field("kv_memory", &self.kv_memory)
            .field("kv_wait", &self.kv_wait)
            .field("prefill_chunk", &self.prefill_chunk)
            .finish()
    }
}

/// What a model's backend holds, for reports (`phi3 info`, `phi3 bench`).
#[derive(Clone, Debug)]
pub struct DeviceStats {
    /// The backend's device name, e.g. "cpu (16 threads)" or "cuda:0 (NVIDIA H100 ..., sm_90)".
    pub device: String,
    /// Bytes of weights the backend holds.
    pub weight_bytes: u64,
    /// Bytes per token of one session's KV cache (f32 on the CPU, bf16 on CUDA).
    pub kv_bytes_per_token: u64,
    /// Element type of the KV cache, e.g. "f32".
    pub kv_dtype: &'static str,
    /// CUDA only: memory, KV use and kernel compile/cache status.
    pub cuda: Option<CudaStats>,
}

/// Random weights instead of the checkpoint's: only config.json (and the tokenizer) are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DummyWeights {
    /// Element type of every weight tensor.
    pub dtype: DType,
    /// Seed of the generator; the same seed and config give the same weights.
    pub seed: u64,
}

/// A model on a backend. Cheap to clone; share it across threads.
#[derive(Clone)]
pub struct Model {
    inner: Arc<ModelInner>,
}

struct ModelInner {
    config: ModelConfig,
    tokenizer: Option<Tokenizer>,
    chat_template: ChatTemplate,
    engine: AnyEngine,
    path: Option<PathBuf>,
    max_context: usize,
    /// Identifies the config and weights, so a saved session only loads into the same model.
    fingerprint: [u8; 32],
    /// Bytes of all weight tensors in their dtype (tied embeddings counted once).
    weight_bytes: u64,
    /// The distinct dtypes of the weight tensors, in a fixed order.
    weight_dtypes: Vec<DType>,
    /// How the decoder projections are stored.
    weight_format: WeightFormat,
}

/// The engine on whichever backend was chosen at load time.
// One per model, built once and never moved in a hot path: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum AnyEngine {
    Cpu(Engine<CpuBackend>),
    Cuda(Box<Engine<CudaBackend>>),
}

/// Whether "auto" tries CUDA first. Off until the CUDA backend has passed `scripts/gpu-check`
/// on a GPU: it was written and compiled without one, and "auto" is every front end's default,
/// so an unverified device path must be asked for by name ("cuda"), never picked silently.
const AUTO_SELECTS_CUDA: bool = false;

/// What a model's weights add up to, computed while they are taken.
struct WeightSummary {
    /// See [`Model::fingerprint`].
    fingerprint: [u8; 32],
    /// See [`Model::weight_bytes`].
    bytes: u64,
    /// See [`Model::weight_dtypes`].
    dtypes: Vec<DType>,
    /// The format the projections are in.
    format: WeightFormat,
}

/// The backend chosen for a load, before weights exist.
enum Target {
    Cpu,
    Cuda(Box<CudaBackend>),
}

impl Target {
    /// Resolve `device`: "auto" tries CUDA device 0 and falls back to the CPU, saying why.
    fn choose(device: Device, weights: WeightFormat) -> Result<Target> {
        weights.validate()?;
        match device {
            Device::Cpu => Ok(Target::Cpu),
            Device::Cuda(n) => Ok(Target::Cuda(Box::new(CudaBackend::new(n)?))),
            Device::Auto if !AUTO_SELECTS_CUDA => {
                log::info!(
                    "device \"auto\": using the CPU (the CUDA backend has not yet passed \
                     scripts/gpu-check on hardware; ask for \"cuda\" to use it)"
                );
                Ok(Target::Cpu)
            }
            Device::Auto => match CudaBackend::new(0) {
                Ok(be) => {
                    log::info!("device \"auto\": using {}", be.name());
                    Ok(Target::Cuda(Box::new(be)))
                }
                Err(e) if cuda::device_count() > 0 => {
                    log::warn!("device \"auto\": CUDA device unusable ({e}); using the CPU");
                    Ok(Target::Cpu)
                }
                Err(e) => {
                    log::info!("device \"auto\": using the CPU ({e})");
                    Ok(Target::Cpu)
                }
            },
        }
    }
}

/// `$body` with `$e` bound to the model's engine, whichever backend it is on.
macro_rules! on_engine {
    ($model:expr, $e:ident => $body:expr) => {
        match &$model.inner.engine {
            AnyEngine::Cpu($e) => $body,
            AnyEngine::Cuda($e) => {
                let $e = &**$e;
                $body
            }
        }
    };
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.inner.path)
            .field("device", &self.device_name())
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Load a Hugging Face model folder: config.json (+ generation_config.json), the safetensors
    /// (single or sharded; every header validated before any tensor is read), tokenizer.json and
    /// tokenizer_config.json when present. The CPU backend then reads every weight into its own
    /// memory once (disk speed; the files are not used afterwards); with `dummy_weights`, every
    /// weight is generated in memory instead.
    ///
    /// Errors: `Io` (missing folder or files), `ModelFormat` (config, header, index, tensor
    /// name/shape/dtype, tokenizer files, chat template), `Unsupported` (model type, rope type,
    /// device), `InvalidArgument` (`max_context = Some(0)`).
    pub fn load(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Model> {
        let dir = path.as_ref();
        if !dir.is_dir() {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{}: not a model folder (no such directory)", dir.display()),
            ));
        }
        let config = ModelConfig::from_dir(dir)?;
        config.validate()?;
        check_options(options)?;
        let tokenizer = if dir.join("tokenizer.json").is_file() {
            Some(Tokenizer::from_dir(dir)?)
        } else {
            log::info!("{}: no tokenizer.json; text input is unavailable", dir.display());
            None
        };
        let path = Some(dir.to_path_buf());
        let stored = match options.dummy_weights {
            Some(_) => StoredQuantization::Dense,
            None => StoredQuantization::of_folder(dir)?,
        };
        let format = resolve_format(dir, options.weights, stored.format())?;
        let (weights, target) =
            match (options.dummy_weights, Target::choose(options.device, format)?) {
                (Some(d), Target::Cuda(be)) => {
                    return Self::dummy_on_device(config, *be, d, tokenizer, options, path)
                }
                (Some(d), target) => (dense(&loader::dummy(&config, d.dtype, d.seed)?)?, target),
                (None, target) => (loader::load_sources(dir, &config, &stored)?, target),
            };
        Self::build(config, &weights, target, format, tokenizer, options, path)
    }

    /// A model from a config and weights already in memory (the demo model, tests, benchmarks).
    /// `weights` must have the shapes `config` implies ([`loader::load`] and [`loader::dummy`]
    /// guarantee it); they are not re-checked here.
    ///
    /// Errors: `ModelFormat` when `config` fails [`ModelConfig::validate`] or the tokenizer's chat
    /// template does not compile, `Unsupported` for a CUDA device, `InvalidArgument` for
    /// `max_context = Some(0)`, and the backend's errors while taking the weights.
    pub fn from_parts(
        config: ModelConfig,
        weights: &ModelWeights<HostTensor>,
        tokenizer: Option<Tokenizer>,
        options: &LoadOptions,
        path: Option<PathBuf>,
    ) -> Result<Model> {
        config.validate()?;
        check_options(options)?;
        let target = Target::choose(options.device, options.weights)?;
        Self::build(config, &dense(weights)?, target, options.weights, tokenizer, options, path)
    }

    /// A model whose host `weights` go to `target` (CUDA: after the memory estimate passes), the
    /// projections stored in `format` (already validated against a quantized checkpoint).
    fn build(
        config: ModelConfig,
        weights: &ModelWeights<WeightSource>,
        target: Target,
        format: WeightFormat,
        tokenizer: Option<Tokenizer>,
        options: &LoadOptions,
        path: Option<PathBuf>,
    ) -> Result<Model> {
        let progress = options.progress.as_ref();
        // A checkpoint that stores quantized projections keeps the ones it left dense (AWQ's
        // `modules_to_not_convert`) dense: they were excluded on purpose.
        let mut stored_quantized = false;
        let _ = weights.try_map(|t| {
            stored_quantized |= matches!(t, WeightSource::Quantized(_));
            Ok(())
        });
        let at_load = if stored_quantized { WeightFormat::Native } else { format };
        let limits = options.limits();
        let engine = match target {
            Target::Cpu => AnyEngine::Cpu(Engine::new(
                CpuBackend, &config, weights, at_load, progress, limits,
            )?),
            Target::Cuda(be) => {
                // (shape, dtype, role, device format) of every tensor: a projection quantized at
                // load takes `at_load`, one read quantized keeps its checkpoint's format.
                let mut tensors = Vec::new();
                let _ = weights.try_map_with_role(|t, role| {
                    let (dtype, stored) = match t {
                        WeightSource::Dense(t) => (t.dtype, at_load),
                        WeightSource::Quantized(q) => (DType::BF16, q.format),
                    };
                    tensors.push((t.shape(), dtype, role, stored));
                    Ok(())
                });
                be.check_memory(&cuda::memory::estimate_for(
                    &config,
                    tensors.iter().map(|(s, d, r, f)| (s.as_slice(), *d, *r, *f)),
                    0,
                    limits.prefill_chunk,
                ))?;
                AnyEngine::Cuda(Box::new(Engine::new(
                    *be, &config, weights, at_load, progress, limits,
                )?))
            }
        };
        let fingerprint = fingerprint(&config, weights, format)?;
        let mut weight_bytes = 0u64;
        let mut weight_dtypes = Vec::new();
        let _ = weights.try_map_with_role(|t, role| {
            weight_bytes += match (role, t) {
                (TensorRole::Projection, WeightSource::Dense(t)) if t.shape.len() == 2 => {
                    at_load.stored_bytes(t.shape[0], t.shape[1], t.dtype)
                }
                (_, WeightSource::Dense(t)) => t.byte_len() as u64,
                (_, WeightSource::Quantized(q)) => {
                    q.format.stored_bytes(q.rows, q.cols, DType::BF16)
                }
            };
            if let WeightSource::Dense(t) = t {
                if !weight_dtypes.contains(&t.dtype) {
                    weight_dtypes.push(t.dtype);
                }
            }
            Ok(())
        });
        weight_dtypes.sort_by_key(|d| d.name());
        let sums =
            WeightSummary { fingerprint, bytes: weight_bytes, dtypes: weight_dtypes, format };
        Self::finish(config, engine, tokenizer, options, path, sums)
    }

    /// Random weights generated on a CUDA device (no host copy); see `backend/cuda/upload.rs`.
    fn dummy_on_device(
        config: ModelConfig,
        be: CudaBackend,
        d: DummyWeights,
        tokenizer: Option<Tokenizer>,
        options: &LoadOptions,
        path: Option<PathBuf>,
    ) -> Result<Model> {
        let format = options.weights;
        let layout = loader::layout(&config)?;
        let mut shapes = Vec::new();
        let _ = layout.try_map_with_role(|(_, shape), role| {
            shapes.push((shape.clone(), role));
            Ok(())
        });
        let tensors = shapes.iter().map(|(s, r)| (s.as_slice(), d.dtype, *r, format));
        let chunk = options.limits().prefill_chunk;
        be.check_memory(&cuda::memory::estimate_for(&config, tensors, 0, chunk))?;
        let bytes_of = |s: &[usize], role| cuda::memory::tensor_bytes(s, d.dtype, role, format);
        let total: u64 = shapes.iter().map(|(s, r)| bytes_of(s, *r)).sum();
        let progress = options.progress.as_ref();
        let mut report = crate::forward::Progress::new(shapes.len(), total, progress);
        let mut index = 0u64;
        let weights = layout.try_map_with_role(|(name, shape), role| {
            let w = match (role, &shape[..]) {
                (TensorRole::Projection, &[rows, cols]) if format.is_quantized() => {
                    be.dummy_quantized_weight(rows, cols, format, d.seed, index)?
                }
                _ => be.dummy_weight(name, shape, d.dtype, d.seed, index)?,
            };
            index += 1;
            report.tensor_done(name, bytes_of(shape, role));
            Ok(w)
        })?;
        be.synchronize()?;
        let weight_bytes = total;
        let fingerprint = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            h.update(config_header(&config));
            h.update(format!("device dummy weights: seed {} dtype {}", d.seed, d.dtype.name()));
            if format.is_quantized() {
                h.update(format!(" projections {format}"));
            }
            h.finalize().into()
        };
        let limits = options.limits();
        let engine = AnyEngine::Cuda(Box::new(Engine::with_weights(be, &config, weights, limits)?));
        let sums =
            WeightSummary { fingerprint, bytes: weight_bytes, dtypes: vec![d.dtype], format };
        Self::finish(config, engine, tokenizer, options, path, sums)
    }

    /// The model around a ready engine.
    fn finish(
        config: ModelConfig,
        engine: AnyEngine,
        tokenizer: Option<Tokenizer>,
        options: &LoadOptions,
        path: Option<PathBuf>,
        sums: WeightSummary,
    ) -> Result<Model> {
        let WeightSummary { fingerprint, bytes: weight_bytes, dtypes: weight_dtypes, format } =
            sums;
        let chat_template = match &tokenizer {
            Some(t) => ChatTemplate::from_tokenizer(t)?,
            None => ChatTemplate::phi3_default(),
        };
        let max_context = match options.max_context {
            Some(n) => n.min(config.max_position_embeddings),
            None => config.max_position_embeddings,
        };
        Ok(Model {
            inner: Arc::new(ModelInner {
                config,
                tokenizer,
                chat_template,
                engine,
                path,
                max_context,
                fingerprint,
                weight_bytes,
                weight_dtypes,
                weight_format: format,
            }),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.inner.config
    }

    /// The tokenizer. Errors with `Unsupported` when the model folder had no tokenizer.json.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.inner.tokenizer.as_ref().ok_or_else(|| {
            Error::unsupported("this model has no tokenizer (tokenizer.json was not in its folder)")
        })
    }

    /// The chat template: the model's own, or the built-in Phi-3 format.
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.inner.chat_template
    }

    /// Token ids of a conversation, equal to transformers'
    /// `apply_chat_template(messages, add_generation_prompt, tokenize=True)`.
    ///
    /// Errors: `Unsupported` without a tokenizer, and those of [`ChatTemplate::render`]
    /// (`InvalidArgument` when the template rejects the messages, `ModelFormat` when it fails).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let tok = self.tokenizer()?;
        let text = self.inner.chat_template.render(
            messages,
            add_generation_prompt,
            tok.bos_token().unwrap_or(""),
            tok.eos_token().unwrap_or(""),
        )?;
        tok.encode(&text, false)
    }

    /// The folder the model was loaded from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// Where the model runs, e.g. "cpu (16 threads)".
    pub fn device_name(&self) -> String {
        match &self.inner.engine {
            AnyEngine::Cpu(e) => e.backend.name(),
            AnyEngine::Cuda(e) => e.backend.name(),
        }
    }

    /// What the backend holds: device, weight and KV memory, and on CUDA the kernel status.
    pub fn device_stats(&self) -> DeviceStats {
        let c = &self.inner.config;
        let kv_elements = 2 * c.num_hidden_layers as u64 * c.kv_dim() as u64;
        match &self.inner.engine {
            AnyEngine::Cpu(e) => DeviceStats {
                device: e.backend.name(),
                weight_bytes: self.inner.weight_bytes,
                kv_bytes_per_token: 4 * kv_elements,
                kv_dtype: "f32",
                cuda: None,
            },
            AnyEngine::Cuda(e) => {
                let stats = e.backend.stats();
                DeviceStats {
                    device: stats.device.clone(),
                    weight_bytes: stats.weight_bytes,
                    kv_bytes_per_token: 2 * kv_elements,
                    kv_dtype: "bf16",
                    cuda: Some(stats),
                }
            }
        }
    }

    /// On CUDA, whether decode passes (every sequence adding one token) run as CUDA graphs from
    /// now on: captured once per shape and replayed. Off by default until verified on a GPU
    /// (`phi3 gpu-check` compares both ways; `DeviceStats::cuda` counts captures and replays
    /// and reports the graph pool's memory). Turning them off drops the graphs and gives their
    /// memory back. Returns `false`, and does nothing, on the CPU.
    pub fn set_cuda_graphs(&self, on: bool) -> bool {
        match &self.inner.engine {
            AnyEngine::Cpu(_) => false,
            AnyEngine::Cuda(e) => {
                e.backend.set_cuda_graphs(on);
                true
            }
        }
    }

    /// A hash of the config and of every tensor's name, dtype, shape and sampled bytes: equal
    /// for the same model, different for different weights (used by session files).
    pub fn fingerprint(&self) -> [u8; 32] {
        self.inner.fingerprint
    }

    /// Bytes of all weight tensors in their storage dtype (what a backend must hold).
    pub fn weight_bytes(&self) -> u64 {
        self.inner.weight_bytes
    }

    /// The distinct dtypes of the weight tensors (e.g. `[BF16]`).
    pub fn weight_dtypes(&self) -> &[DType] {
        &self.inner.weight_dtypes
    }

    /// How the decoder projections are stored ([`LoadOptions::weights`]).
    pub fn weight_format(&self) -> WeightFormat {
        self.inner.weight_format
    }

    /// The most tokens any session of this model may hold.
    pub fn max_context(&self) -> usize {
        self.inner.max_context
    }

    /// Most prompt tokens of one session per forward pass ([`LoadOptions::prefill_chunk`]).
    pub fn prefill_chunk(&self) -> usize {
        on_engine!(self, e => e.prefill_chunk)
    }

    /// Token ids the model may emit: ids at or past the tokenizer's size (padding rows of the
    /// embedding, e.g. 32011..32064 for Phi-3) cannot be decoded and are never produced.
    pub fn emittable_vocab(&self) -> usize {
        let vocab = self.inner.config.vocab_size;
        self.inner.tokenizer.as_ref().map_or(vocab, |t| t.vocab_size().min(vocab))
    }

    /// Tokens that end a generation by default: the config's eos ids (config.json and
    /// generation_config.json), the tokenizer's eos token and `<|end|>` when it has them.
    pub fn default_stop_ids(&self) -> Vec<u32> {
        let mut ids = self.inner.config.eos_token_ids.clone();
        if let Some(tok) = &self.inner.tokenizer {
            ids.extend(tok.eos_token_id());
            ids.extend(tok.token_to_id("<|end|>"));
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// A new, empty session. Cheap: KV memory is allocated as the session grows.
    ///
    /// Errors: `InvalidArgument` for `max_context = Some(0)` (a larger one is capped at
    /// [`Model::max_context`]).
    pub fn session(&self, options: SessionOptions) -> Result<Session> {
        Session::new(self.clone(), options)
    }

    /// Check that every id is a row of the embedding table, naming the first that is not.
    pub(crate) fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.inner.config.vocab_size;
        match tokens.iter().position(|&t| t as usize >= vocab) {
            Some(i) => Err(Error::token_out_of_range(i, tokens[i] as i64, vocab)),
            None => Ok(()),
        }
    }

    /// The LongRoPE regime of a sequence of `len` tokens.
    pub(crate) fn regime_for_len(&self, len: usize) -> RopeRegime {
        on_engine!(self, e => e.rope.regime_for_len(len))
    }

    /// Run `job` (its tokens appended to its cache in one forward pass) through the model's
    /// scheduler, batched with other sessions' passes. The output holds the cache (grown, or as
    /// it was on error) and what the job asked of its last position.
    pub(crate) fn run_job(&self, job: Job) -> JobOutput {
        on_engine!(self, e => e.scheduler.run(e, job))
    }

    pub(crate) fn kv_to_host(&self, kv: &SeqKv) -> Result<Vec<f32>> {
        on_engine!(self, e => {
            let pool = e.lock_pool();
            e.backend.kv_to_host(&pool.storage, &kv.blocks, kv.len())
        })
    }

    /// A cache holding `n_tokens` tokens computed in `regime`, from `kv_to_host` data.
    /// Errors: `OutOfMemory` when the KV budget cannot hold them; `Internal` for data of the
    /// wrong length.
    pub(crate) fn kv_from_host(
        &self,
        n_tokens: usize,
        regime: RopeRegime,
        data: &[f32],
    ) -> Result<SeqKv> {
        on_engine!(self, e => {
            let mut pool = e.lock_pool();
            let mut kv = SeqKv::new();
            pool.reserve(&e.backend, &mut kv, n_tokens)?;
            if let Err(err) = e.backend.kv_from_host(&mut pool.storage, &kv.blocks, n_tokens, data)
            {
                pool.truncate(&mut kv, 0);
                return Err(err);
            }
            Ok(SeqKv::from_parts(std::mem::take(&mut kv.blocks), n_tokens, regime))
        })
    }

    /// A fork of `kv`: the same blocks, shared until either side writes into one.
    pub(crate) fn fork_kv(&self, kv: &SeqKv) -> SeqKv {
        on_engine!(self, e => {
            e.lock_pool().share(kv)
        })
    }

    /// Keep the first `len` tokens of `kv`, giving whole blocks past them back to the pool.
    pub(crate) fn truncate_kv(&self, kv: &mut SeqKv, len: usize) {
        let blocks = kv.blocks.len();
        on_engine!(self, e => {
            e.lock_pool().truncate(kv, len);
            if kv.blocks.len() < blocks {
                e.scheduler.kv_freed();
            }
        })
    }

    /// A session is being dropped: the scheduler stops expecting its next pass.
    pub(crate) fn session_ended(&self, session: u64) {
        on_engine!(self, e => e.scheduler.session_ended(session))
    }

    /// Mark a session as generating for the duration of the returned guard (the scheduler waits
    /// briefly for generating sessions so that their steps share passes).
    pub(crate) fn generation_guard(&self) -> GenerationGuard {
        on_engine!(self, e => e.scheduler.generation_started());
        GenerationGuard { model: self.clone() }
    }

    /// How the KV pool is used: blocks in use (shared blocks once), allocated, and the budget.
    pub fn kv_usage(&self) -> KvUsage {
        on_engine!(self, e => {
            e.lock_pool().usage()
        })
    }

    /// Forward passes the scheduler has run and how many sequences they batched.
    pub fn scheduler_stats(&self) -> SchedulerStats {
        on_engine!(self, e => e.scheduler.stats())
    }
}

/// While alive, its session counts as generating (see [`Model::generation_guard`]).
pub(crate) struct GenerationGuard {
    model: Model,
}

impl Drop for GenerationGuard {
    fn drop(&mut self) {
        on_engine!(self.model, e => e.scheduler.generation_ended());
    }
}

/// SHA-256 over the config's shape-defining fields, the weight format when quantized (a
/// quantized model computes different logits, so its sessions are not the native model's) and,
/// per tensor, its name, dtype, shape and up to 3 x 4 KiB of its bytes (start, middle, end):
/// cheap even for 28 GB of weights.
fn fingerprint(
    config: &ModelConfig,
    weights: &ModelWeights<WeightSource>,
    format: WeightFormat,
) -> Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    const SAMPLE: usize = 4096;
    let mut h = Sha256::new();
    h.update(config_header(config));
    if format.is_quantized() {
        h.update(format!("weights {format}"));
    }
    let _ = weights.try_map(|source| {
        for t in source.stored() {
            h.update(format!("{}:{}:{:?}", t.name(), t.dtype_name(), t.shape()));
            let len = t.byte_len();
            let mut sample = [0u8; SAMPLE];
            for start in [0, len / 2, len.saturating_sub(SAMPLE)] {
                let part = &mut sample[..SAMPLE.min(len - start)];
                t.read_at(start, part)?;
                h.update(&*part);
            }
        }
        Ok(())
    })?;
    Ok(h.finalize().into())
}

/// Host tensors as dense weight sources (cheap: tensors share their bytes).
fn dense(weights: &ModelWeights<HostTensor>) -> Result<ModelWeights<WeightSource>> {
    weights.try_map(|t| Ok(WeightSource::Dense(t.clone())))
}

/// The format projections end up in: what was asked, or what the checkpoint stores. A quantized
/// checkpoint is not quantized again into another format (that would compound the rounding).
///
/// Errors: `InvalidArgument` naming both formats when they conflict.
fn resolve_format(dir: &Path, asked: WeightFormat, stored: WeightFormat) -> Result<WeightFormat> {
    match (asked, stored) {
        (asked, WeightFormat::Native) => Ok(asked),
        (WeightFormat::Native, stored) => Ok(stored),
        (asked, stored) if asked == stored => Ok(stored),
        (asked, stored) => Err(Error::invalid_argument(format!(
            "{}: the checkpoint is already quantized ({stored}); weights \"{asked}\" would \
             quantize it again (ask for \"native\" or \"{stored}\", or quantize the original \
             checkpoint)",
            dir.display()
        ))),
    }
}

impl LoadOptions {
    /// The engine's limits: KV pool and prefill chunk.
    fn limits(&self) -> EngineLimits {
        EngineLimits {
            kv_budget: self.kv_memory,
            kv_wait: self.kv_wait,
            prefill_chunk: self.prefill_chunk.unwrap_or(PREFILL_CHUNK),
        }
    }
}

/// The options checked before anything is read: `max_context` and `prefill_chunk`.
fn check_options(options: &LoadOptions) -> Result<()> {
    if options.max_context == Some(0) {
        return Err(Error::invalid_argument("max_context must be > 0"));
    }
    match options.prefill_chunk {
        Some(n) if !(1..=MAX_PREFILL_CHUNK).contains(&n) => Err(Error::invalid_argument(format!(
            "prefill_chunk {n} is not between 1 and {MAX_PREFILL_CHUNK} tokens"
        ))),
        _ => Ok(()),
    }
}

/// The config's shape-defining fields as text (the first part of every fingerprint).
fn config_header(config: &ModelConfig) -> String {
    format!(
        "phi3 v{} vocab={} hidden={} inter={} layers={} heads={} kv={} hd={} rope={:?} eps={} window={:?} tied={}",
        1,
        config.vocab_size,
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.rope,
        config.rms_norm_eps,
        config.sliding_window,
        config.tie_word_embeddings
    )
}
