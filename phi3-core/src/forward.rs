//! THE forward pass of Phi3ForCausalLM, written once, generic over the backend.
//!
//! HF reference: `modeling_phi3.py` (`Phi3Model.forward`, `Phi3DecoderLayer.forward`):
//!   embed -> for each layer [RMSNorm -> qkv_proj -> RoPE q,k -> store k,v -> causal GQA
//!   attention -> o_proj -> residual add -> RMSNorm -> gate_up_proj -> silu(gate)*up ->
//!   down_proj -> residual add] -> RMSNorm -> lm_head.
//! Residual adds are fused into the following RMSNorm (`Backend::rms_norm`). Only the last row
//! of each sequence goes through the final norm and lm_head.
//!
//! A batch holds several sequences (the scheduler's, `scheduler.rs`), each appending tokens to
//! its own KV cache in a given LongRoPE regime (the regime of the sequence's final length, chosen
//! by the session, which recomputes a cache whose regime changes: see `kv_cache.rs`). Rows are
//! ordered so that sequences adding at most `GEMV_SPAN` tokens (decode steps) come first: see
//! `Backend::linear`, which computes them one row at a time.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::backend::{
    AttnParams, Backend, KvLayout, LinearRows, OutputKind, SeqOutput, SeqSpan, GEMV_SPAN,
    KV_BLOCK_TOKENS,
};
use crate::config::ModelConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::kv_cache::SeqKv;
use crate::kv_pool::KvPool;
use crate::loader::{LayerWeights, ModelWeights, TensorRole, WeightFormat, WeightSource};
use crate::model::{LoadProgress, ProgressFn};
use crate::rope::{Rope, RopeBatch, RopeRegime};
use crate::scheduler::Scheduler;

/// A backend with a model's weights on it, its KV pool and the scheduler that batches its
/// sessions' passes.
pub(crate) struct Engine<B: Backend> {
    pub(crate) backend: B,
    pub(crate) weights: ModelWeights<B::Weight>,
    pub(crate) rope: Rope,
    pub(crate) attn: AttnParams,
    /// Every session's KV blocks. Locked by a forward pass for its whole duration (only the
    /// scheduler's leader runs one) and briefly by forks, truncations and session drops.
    pool: Mutex<KvPool<B>>,
    pub(crate) scheduler: Scheduler,
    /// Most prompt tokens of one session per pass (`LoadOptions::prefill_chunk`), and the
    /// scheduler's prefill budget of a batched pass.
    pub(crate) prefill_chunk: usize,
    eps: f32,
    vocab_size: usize,
}

/// How a model's KV memory and forward passes are limited.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EngineLimits {
    /// Bytes the KV pool may grow to; `None`: the backend's default.
    pub(crate) kv_budget: Option<u64>,
    /// When the pool is exhausted, wait for blocks instead of failing.
    pub(crate) kv_wait: bool,
    /// Most prompt tokens of one session per pass, and most prefill tokens of a batched pass.
    pub(crate) prefill_chunk: usize,
}

/// One sequence's part of a forward: new tokens appended to its cache.
pub(crate) struct SeqInput<'a> {
    pub(crate) tokens: &'a [u32],
    /// Its blocks already cover the new positions (`KvPool::reserve`).
    pub(crate) kv: &'a mut SeqKv,
    /// Rope regime of every position of this sequence in this pass.
    pub(crate) regime: RopeRegime,
    /// What the pass hands back for it: logits, or only the greedy choice.
    pub(crate) output: OutputKind,
}

impl<B: Backend> Engine<B> {
    /// Upload `weights` to `backend`, reporting each tensor to `progress`: dense decoder
    /// projections are stored in `format` (embeddings, norms and a dense lm_head stay in their
    /// dtype), quantized sources as they are.
    pub(crate) fn new(
        backend: B,
        config: &ModelConfig,
        weights: &ModelWeights<WeightSource>,
        format: WeightFormat,
        progress: Option<&ProgressFn>,
        limits: EngineLimits,
    ) -> Result<Self> {
        let (mut tensors, mut bytes) = (0, 0u64);
        let _ = weights.try_map(|t| {
            tensors += 1;
            bytes += t.file_bytes();
            Ok(())
        });
        let mut report = Progress::new(tensors, bytes, progress);
        let weights = weights.try_map_with_role(|source, role| {
            let w = match (role, source) {
                (TensorRole::Projection, WeightSource::Dense(t)) => {
                    backend.upload_linear(t, format)?
                }
                // A quantized lm_head (GPTQ `lm_head: true`) is a matmul like the projections.
                (TensorRole::Projection | TensorRole::Output, WeightSource::Quantized(q)) => {
                    backend.upload_quantized(q.read()?)?
                }
                (_, WeightSource::Dense(t)) => backend.upload(t)?,
                (_, WeightSource::Quantized(q)) => {
                    return Err(Error::internal(format!(
                        "{}: only projections and lm_head are quantized",
                        q.name
                    )))
                }
            };
            report.tensor_done(source.name(), source.file_bytes());
            Ok(w)
        })?;
        Self::with_weights(backend, config, weights, limits)
    }

    /// An engine over weights already on `backend` (e.g. generated there), with an empty KV
    /// pool and passes limited by `limits`.
    pub(crate) fn with_weights(
        backend: B,
        config: &ModelConfig,
        weights: ModelWeights<B::Weight>,
        limits: EngineLimits,
    ) -> Result<Self> {
        let kv_layout = KvLayout {
            n_layers: config.num_hidden_layers,
            n_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        };
        let budget = match limits.kv_budget {
            Some(bytes) => Some(bytes),
            None => default_kv_budget(&backend, &kv_layout)?,
        };
        let pool = KvPool::new(&backend, &kv_layout, budget)?;
        Ok(Engine {
            pool: Mutex::new(pool),
            scheduler: Scheduler::new(limits.kv_wait),
            prefill_chunk: limits.prefill_chunk,
            backend,
            weights,
            rope: Rope::new(&config.rope),
            attn: AttnParams::from_config(config),
            eps: config.rms_norm_eps as f32,
            vocab_size: config.vocab_size,
        })
    }

    /// The KV pool, locked. A panic while it was held (caught by the scheduler) leaves its
    /// bookkeeping usable, so a poisoned lock is taken as it is.
    pub(crate) fn lock_pool(&self) -> MutexGuard<'_, KvPool<B>> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Run `seqs` (each non-empty, ids already range-checked, blocks reserved in `pool`) and
    /// return what each asks of its last position (`SeqInput::output`: the logits `[vocab]` or
    /// the greedy choice), in the order of `seqs`. Caches grow only when the whole pass
    /// succeeds; on error their lengths are unchanged.
    pub(crate) fn forward(
        &self,
        seqs: &mut [SeqInput<'_>],
        pool: &mut KvPool<B>,
    ) -> Result<Vec<SeqOutput>> {
        let be = &self.backend;
        // Decode steps first (stable, so the batch order is otherwise the scheduler's).
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].tokens.len() > GEMV_SPAN);
        let decode_rows: usize =
            seqs.iter().map(|s| s.tokens.len()).filter(|&n| n <= GEMV_SPAN).sum();
        let prefill_runs: Vec<usize> =
            order.iter().map(|&i| seqs[i].tokens.len()).filter(|&n| n > GEMV_SPAN).collect();
        let rows = LinearRows::new(decode_rows, prefill_runs);
        let mut spans = Vec::with_capacity(seqs.len());
        let mut tokens = Vec::new();
        let mut rope = RopeBatch::new(self.rope.half());
        for &i in &order {
            let seq = &mut seqs[i];
            let pos0 = seq.kv.len();
            let new_len = pos0 + seq.tokens.len();
            seq.kv.prepare(seq.regime)?;
            if seq.kv.blocks.len() < KvPool::<B>::blocks_for(new_len) {
                return Err(Error::internal("forward: KV blocks were not reserved"));
            }
            spans.push(SeqSpan { row: tokens.len(), len: seq.tokens.len(), pos0 });
            rope.push_positions(self.rope.tables(seq.regime), pos0..new_len);
            tokens.extend_from_slice(seq.tokens);
        }
        let tables: Vec<&[u32]> = order.iter().map(|&i| &seqs[i].kv.blocks[..]).collect();
        let batch = be.kv_batch(&spans, &tables)?;

        let w = &self.weights;
        let storage = &mut pool.storage;
        // The pass proper, from the embedding to lm_head: what a backend may capture once and
        // replay for later passes of the same shape (`Backend::run_pass`), so it reads every
        // per-pass input through `batch` (the one `run_pass` hands it).
        let mut pass = |batch: &B::KvBatch| -> Result<B::Act> {
            let ctx = LayerCtx { batch, rows: &rows, rope: &rope, attn: &self.attn, eps: self.eps };
            let mut residual = be.embed_pass(&w.embed_tokens, &tokens, batch)?; // [n, hidden]
            let mut mlp_out: Option<B::Act> = None; // [n, hidden], the last layer's MLP output
            for (layer, lw) in w.layers.iter().enumerate() {
                let out = decoder_layer(
                    be,
                    lw,
                    layer,
                    &mut residual,
                    mlp_out.as_ref(),
                    storage,
                    &ctx,
                    None,
                )?;
                mlp_out = Some(out);
            }
            let last_rows: Vec<usize> = spans.iter().map(|s| s.row + s.len - 1).collect();
            // A pass of decode steps only (one row per sequence) needs no gather: its rows are
            // the last rows already.
            let every_row = last_rows.len() == tokens.len()
                && last_rows.iter().enumerate().all(|(i, &r)| i == r);
            let (mut last, last_mlp) = if every_row {
                (residual, mlp_out)
            } else {
                let last_mlp = mlp_out.map(|m| be.gather_rows(&m, &last_rows)).transpose()?;
                (be.gather_rows(&residual, &last_rows)?, last_mlp)
            };
            let x = be.rms_norm(&mut last, last_mlp.as_ref(), &w.norm, self.eps)?;
            // One row per sequence: every row is a "decode row", as in a pass of one sequence.
            be.linear(&x, w.output_matrix(), &LinearRows::decode(spans.len())) // [n, vocab]
        };
        let kinds: Vec<OutputKind> = order.iter().map(|&i| seqs[i].output).collect();
        let outputs = be.run_pass(&batch, &tokens, &rope, &kinds, self.vocab_size, &mut pass)?;
        if outputs.len() != seqs.len() {
            return Err(Error::internal(format!(
                "a pass of {} sequences returned {} outputs",
                seqs.len(),
                outputs.len()
            )));
        }

        let mut out: Vec<Option<SeqOutput>> = vec![None; seqs.len()];
        for ((&i, span), output) in order.iter().zip(&spans).zip(outputs) {
            seqs[i].kv.set_len(span.pos0 + span.len);
            out[i] = Some(output);
        }
        // `order` is a permutation of the sequences, so every slot is filled.
        Ok(out.into_iter().flatten().collect())
    }
}

/// The inputs of a decoder layer's four projections, as [`decoder_layer`] shows them to its tap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProjInput {
    /// `input_layernorm(h)`, the input of qkv_proj: `[n, hidden]`.
    Qkv,
    /// The attention output, the input of o_proj: `[n, n_heads * head_dim]`.
    O,
    /// `post_attention_layernorm(h)`, the input of gate_up_proj: `[n, hidden]`.
    GateUp,
    /// `silu(gate) * up`, the input of down_proj: `[n, intermediate]`.
    Down,
}

/// What [`decoder_layer`] shows each projection's input to (calibration).
pub(crate) type ProjTap<'a, B> = dyn FnMut(ProjInput, &<B as Backend>::Act) -> Result<()> + 'a;

/// What every layer of one pass shares: the batch, its rotary tables and the model geometry.
pub(crate) struct LayerCtx<'a, B: Backend> {
    /// The sequences and their block tables.
    pub(crate) batch: &'a B::KvBatch,
    /// Which rows are decode steps and which prefill chunks (see `Backend::linear`).
    pub(crate) rows: &'a LinearRows,
    pub(crate) rope: &'a RopeBatch,
    pub(crate) attn: &'a AttnParams,
    pub(crate) eps: f32,
}

/// One Phi3DecoderLayer (HF `Phi3DecoderLayer.forward`). On entry the layer's input hidden state
/// is `residual + mlp_out` (the previous layer's MLP output, not yet added: the add is fused into
/// this layer's first RMSNorm); on return `residual` holds the hidden state after attention and
/// the result is this layer's MLP output, to be added by the next norm. `tap`, when given, sees
/// each projection's input before the projection runs (calibration); inference passes none, which
/// lets the backend fuse the activation into down_proj (`Backend::swiglu_linear`). The
/// sequences' keys and values of `layer` are written into `pool` through `ctx.batch`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decoder_layer<B: Backend>(
    be: &B,
    lw: &LayerWeights<B::Weight>,
    layer: usize,
    residual: &mut B::Act,    // [n, hidden]
    mlp_out: Option<&B::Act>, // [n, hidden]
    pool: &mut B::KvPool,
    ctx: &LayerCtx<'_, B>,
    mut tap: Option<&mut ProjTap<'_, B>>,
) -> Result<B::Act> {
    let fuse_down = tap.is_none();
    let mut show = |which: ProjInput, x: &B::Act| tap.as_mut().map_or(Ok(()), |t| t(which, x));
    let g = ctx.rows;
    let x = be.rms_norm(residual, mlp_out, &lw.input_layernorm, ctx.eps)?;
    show(ProjInput::Qkv, &x)?;
    let qkv = be.linear(&x, &lw.qkv_proj, g)?; // [n, q_dim + 2 kv_dim]
    let q = be.rope_store_kv(&qkv, ctx.batch, ctx.rope, pool, layer, ctx.attn)?;
    let attn = be.attention(&q, ctx.batch, pool, layer, ctx.attn)?; // [n, q_dim]
    show(ProjInput::O, &attn)?;
    let attn_out = be.linear(&attn, &lw.o_proj, g)?; // [n, hidden]
    let x = be.rms_norm(residual, Some(&attn_out), &lw.post_attention_layernorm, ctx.eps)?;
    show(ProjInput::GateUp, &x)?;
    let gate_up = be.linear(&x, &lw.gate_up_proj, g)?; // [n, 2 ffn]
    if fuse_down {
        return be.swiglu_linear(&gate_up, &lw.down_proj, g); // [n, hidden]
    }
    let act = be.swiglu(&gate_up)?; // [n, ffn]
    show(ProjInput::Down, &act)?;
    be.linear(&act, &lw.down_proj, g) // [n, hidden]
}

/// Counts uploaded tensors and bytes for a progress callback.
pub(crate) struct Progress<'a> {
    callback: Option<&'a ProgressFn>,
    state: LoadProgress,
}

impl<'a> Progress<'a> {
    /// A counter for `tensors` tensors of `bytes` bytes in all.
    pub(crate) fn new(tensors: usize, bytes: u64, callback: Option<&'a ProgressFn>) -> Self {
        Progress {
            callback,
            state: LoadProgress {
                tensors_done: 0,
                tensors_total: tensors,
                bytes_done: 0,
                bytes_total: bytes,
                tensor: String::new(),
            },
        }
    }

    /// Record that `name` (`bytes` bytes) is on the backend and tell the callback.
    pub(crate) fn tensor_done(&mut self, name: &str, bytes: u64) {
        self.state.tensors_done += 1;
        self.state.bytes_done += bytes;
        if let Some(cb) = self.callback {
            self.state.tensor = name.to_string();
            cb(&self.state);
        }
    }
}

/// The backend's KV budget when the host sets none. Below one block it is an `OutOfMemory` error
/// that says where the memory went, rather than the pool's "budget less than one block", which
/// names a budget the host never gave.
fn default_kv_budget<B: Backend>(backend: &B, layout: &KvLayout) -> Result<Option<u64>> {
    let budget = backend.default_kv_budget();
    let block = backend.kv_block_bytes(layout);
    match budget {
        Some(bytes) if bytes < block => Err(Error::new(
            ErrorKind::OutOfMemory,
            format!(
                "no device memory is left for the KV cache: the free memory after the weights, \
                 less the reserve kept for activations and headroom, is {bytes} bytes, less than \
                 one KV block ({block} bytes: {KV_BLOCK_TOKENS} tokens); set a KV memory budget \
                 explicitly (LoadOptions::kv_memory: kv_memory_bytes in C, kv_memory= in Python, \
                 --kv-memory) or use a device with more free memory"
            ),
        )),
        _ => Ok(budget),
    }
}
