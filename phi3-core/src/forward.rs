//! THE forward pass of Phi3ForCausalLM, written once, generic over the backend.
//!
//! HF reference: `modeling_phi3.py` (`Phi3Model.forward`, `Phi3DecoderLayer.forward`):
//!   embed -> for each layer [RMSNorm -> qkv_proj -> RoPE q,k -> store k,v -> causal GQA
//!   attention -> o_proj -> residual add -> RMSNorm -> gate_up_proj -> silu(gate)*up ->
//!   down_proj -> residual add] -> RMSNorm -> lm_head.
//! Residual adds are fused into the following RMSNorm (`Backend::rms_norm`). Only the last row
//! of each sequence goes through the final norm and lm_head.
//!
//! A batch holds several sequences, each appending tokens to its own KV cache in a given
//! LongRoPE regime (the regime of the sequence's final length, chosen by the session, which
//! recomputes a cache whose regime changes: see `kv_cache.rs`).

use crate::backend::{AttnParams, Backend, KvLayout, SeqSpan};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::loader::{LayerWeights, ModelWeights, TensorRole, WeightFormat, WeightSource};
use crate::model::{LoadProgress, ProgressFn};
use crate::rope::{Rope, RopeBatch, RopeRegime};

/// A backend with a model's weights on it.
pub(crate) struct Engine<B: Backend> {
    pub(crate) backend: B,
    pub(crate) weights: ModelWeights<B::Weight>,
    pub(crate) rope: Rope,
    pub(crate) attn: AttnParams,
    pub(crate) kv_layout: KvLayout,
    eps: f32,
    vocab_size: usize,
}

/// One sequence's part of a forward: new tokens appended to its cache.
pub(crate) struct SeqInput<'a, B: Backend> {
    pub(crate) tokens: &'a [u32],
    pub(crate) kv: &'a mut KvCache<B>,
    /// Rope regime of every position of this sequence in this pass.
    pub(crate) regime: RopeRegime,
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
        Ok(Self::with_weights(backend, config, weights))
    }

    /// An engine over weights already on `backend` (e.g. generated there).
    pub(crate) fn with_weights(
        backend: B,
        config: &ModelConfig,
        weights: ModelWeights<B::Weight>,
    ) -> Self {
        Engine {
            backend,
            weights,
            rope: Rope::new(&config.rope),
            attn: AttnParams::from_config(config),
            kv_layout: KvLayout {
                n_layers: config.num_hidden_layers,
                n_kv_heads: config.num_key_value_heads,
                head_dim: config.head_dim,
            },
            eps: config.rms_norm_eps as f32,
            vocab_size: config.vocab_size,
        }
    }

    /// A new, empty KV cache for one sequence.
    pub(crate) fn new_kv(&self) -> Result<KvCache<B>> {
        KvCache::new(&self.backend, &self.kv_layout)
    }

    /// Run `seqs` (each non-empty, ids already range-checked) and return each sequence's
    /// last-position logits `[vocab]`. Caches grow only when the whole pass succeeds; on error
    /// their lengths are unchanged.
    pub(crate) fn forward(&self, seqs: &mut [SeqInput<'_, B>]) -> Result<Vec<Vec<f32>>> {
        let be = &self.backend;
        let mut spans = Vec::with_capacity(seqs.len());
        let mut tokens = Vec::new();
        let mut rope = RopeBatch::new(self.rope.half());
        for seq in seqs.iter_mut() {
            let pos0 = seq.kv.len();
            let new_len = pos0 + seq.tokens.len();
            let regime = seq.regime;
            seq.kv.prepare(regime)?;
            be.reserve_kv(&mut seq.kv.storage, new_len)?;
            spans.push(SeqSpan { row: tokens.len(), len: seq.tokens.len(), pos0 });
            rope.push_positions(self.rope.tables(regime), pos0..new_len);
            tokens.extend_from_slice(seq.tokens);
        }

        let w = &self.weights;
        let ctx = LayerCtx { spans: &spans, rope: &rope, attn: &self.attn, eps: self.eps };
        let mut residual = be.embed(&w.embed_tokens, &tokens)?; // [n, hidden]
        let mut mlp_out: Option<B::Act> = None; // [n, hidden], previous layer's MLP output
        for (layer, lw) in w.layers.iter().enumerate() {
            let mut kvs: Vec<&mut B::Kv> = seqs.iter_mut().map(|s| &mut s.kv.storage).collect();
            let out = decoder_layer(
                be,
                lw,
                layer,
                &mut residual,
                mlp_out.as_ref(),
                &mut kvs,
                &ctx,
                &mut |_, _| Ok(()),
            )?;
            mlp_out = Some(out);
        }

        let last_rows: Vec<usize> = spans.iter().map(|s| s.row + s.len - 1).collect();
        let mut last = be.gather_rows(&residual, &last_rows)?;
        let last_mlp = mlp_out.map(|m| be.gather_rows(&m, &last_rows)).transpose()?;
        let x = be.rms_norm(&mut last, last_mlp.as_ref(), &w.norm, self.eps)?;
        let logits = be.to_host(&be.linear(&x, w.output_matrix())?)?; // [n_seqs, vocab]

        for (seq, span) in seqs.iter_mut().zip(&spans) {
            seq.kv.set_len(span.pos0 + span.len);
        }
        Ok(logits.chunks(self.vocab_size).map(<[f32]>::to_vec).collect())
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

/// What every layer of one pass shares: the batch, its rotary tables and the model geometry.
pub(crate) struct LayerCtx<'a> {
    pub(crate) spans: &'a [SeqSpan],
    pub(crate) rope: &'a RopeBatch,
    pub(crate) attn: &'a AttnParams,
    pub(crate) eps: f32,
}

/// One Phi3DecoderLayer (HF `Phi3DecoderLayer.forward`). On entry the layer's input hidden state
/// is `residual + mlp_out` (the previous layer's MLP output, not yet added: the add is fused into
/// this layer's first RMSNorm); on return `residual` holds the hidden state after attention and
/// the result is this layer's MLP output, to be added by the next norm. `tap` sees each
/// projection's input before the projection runs (calibration; a no-op for inference). `kvs`
/// holds one cache per span of `ctx`, written at `layer`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decoder_layer<B: Backend>(
    be: &B,
    lw: &LayerWeights<B::Weight>,
    layer: usize,
    residual: &mut B::Act,    // [n, hidden]
    mlp_out: Option<&B::Act>, // [n, hidden]
    kvs: &mut [&mut B::Kv],
    ctx: &LayerCtx<'_>,
    tap: &mut dyn FnMut(ProjInput, &B::Act) -> Result<()>,
) -> Result<B::Act> {
    let x = be.rms_norm(residual, mlp_out, &lw.input_layernorm, ctx.eps)?;
    tap(ProjInput::Qkv, &x)?;
    let qkv = be.linear(&x, &lw.qkv_proj)?; // [n, q_dim + 2 kv_dim]
    let q = be.rope_store_kv(&qkv, ctx.spans, ctx.rope, kvs, layer, ctx.attn)?;
    let kvs: Vec<&B::Kv> = kvs.iter().map(|kv| &**kv).collect();
    let attn = be.attention(&q, ctx.spans, &kvs, layer, ctx.attn)?; // [n, q_dim]
    tap(ProjInput::O, &attn)?;
    let attn_out = be.linear(&attn, &lw.o_proj)?; // [n, hidden]
    let x = be.rms_norm(residual, Some(&attn_out), &lw.post_attention_layernorm, ctx.eps)?;
    tap(ProjInput::GateUp, &x)?;
    let gate_up = be.linear(&x, &lw.gate_up_proj)?; // [n, 2 ffn]
    let act = be.swiglu(&gate_up)?; // [n, ffn]
    tap(ProjInput::Down, &act)?;
    be.linear(&act, &lw.down_proj) // [n, hidden]
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
