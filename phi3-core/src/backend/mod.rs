//! The `Backend` trait: the few fused operations a Phi-3 forward pass needs, in Phi-3 vocabulary.
//!
//! `forward.rs` is the only caller. A backend never sees HF names, the tokenizer, the sampler or
//! sessions, and does not re-check shapes the loader already checked. Every method returns
//! `Result` so that device errors (out of memory, a failed launch) are ordinary errors.
//!
//! Batches: every sequence-aware method takes a batch of sequences ([`SeqSpan`]s, each with its
//! own KV cache), so continuous batching fits without changing the trait; rows of an activation
//! are the tokens of all sequences, concatenated in span order.
//!
//! KV memory is paged: one pool per model holds fixed-size blocks ([`KV_BLOCK_TOKENS`] tokens of
//! every layer), and each sequence a table of block ids. The backend stores blocks and reads
//! them through the tables; which blocks a sequence owns, sharing and budgets are `kv_pool.rs`'s.
//!
//! Not here: the layer loop (`forward.rs`), RoPE tables (`rope.rs`), KV bookkeeping
//! (`kv_cache.rs`, `kv_pool.rs`).

pub mod cpu;
pub mod cuda;

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::loader::{HostTensor, QuantizedTensor, WeightFormat};
use crate::rope::RopeBatch;

/// Shape of one sequence's KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Decoder layers, each with its own keys and values.
    pub n_layers: usize,
    /// Key/value heads per layer.
    pub n_kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
}

impl KvLayout {
    /// Values per token of one layer's keys (and of its values): `n_kv_heads * head_dim`.
    pub fn row_len(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Values of one KV block: every layer's keys and values of [`KV_BLOCK_TOKENS`] tokens.
    pub fn block_len(&self) -> usize {
        2 * self.n_layers * KV_BLOCK_TOKENS * self.row_len()
    }

    /// Check that `len` values are `n_tokens` tokens in the [`Backend::kv_to_host`] layout, and
    /// return the values per layer half (`n_tokens * row_len()`). `Internal` otherwise: every
    /// backend's `kv_from_host` checks its input this one way.
    pub fn check_host_len(&self, n_tokens: usize, len: usize) -> Result<usize> {
        let n = n_tokens * self.row_len();
        if len != 2 * n * self.n_layers {
            return Err(Error::internal(format!(
                "KV data holds {len} values, expected {}",
                2 * n * self.n_layers
            )));
        }
        Ok(n)
    }
}

/// Tokens per KV block. Sequences own whole blocks of a model's pool, so memory follows their
/// lengths to within one block, and forks share blocks until one of them writes.
pub const KV_BLOCK_TOKENS: usize = 16;

/// Sequences that add at most this many tokens in a pass count as decode rows (see
/// [`Backend::linear`]).
pub const GEMV_SPAN: usize = 4;

/// How the rows of a [`Backend::linear`] input divide among a pass's sequences: first the rows of
/// every sequence that adds at most [`GEMV_SPAN`] tokens (decode steps, in any number), then one
/// run of rows per longer sequence (prefill chunks), in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinearRows {
    decode: usize,
    prefill: Vec<usize>,
}

impl LinearRows {
    /// `decode` leading decode rows, then runs of the given lengths.
    pub fn new(decode: usize, prefill: Vec<usize>) -> LinearRows {
        LinearRows { decode, prefill }
    }

    /// `n` rows, each a decode step of its own sequence (the lm_head of a pass: one row per
    /// sequence).
    pub fn decode(n: usize) -> LinearRows {
        LinearRows { decode: n, prefill: Vec::new() }
    }

    /// The `n` rows of a pass of one sequence.
    pub fn one_sequence(n: usize) -> LinearRows {
        if n <= GEMV_SPAN {
            LinearRows::decode(n)
        } else {
            LinearRows { decode: 0, prefill: vec![n] }
        }
    }

    /// The number of leading decode rows.
    pub fn decode_rows(&self) -> usize {
        self.decode
    }

    /// `(first row, rows)` of each prefill run, in order.
    pub fn prefill_runs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.prefill.iter().scan(self.decode, |row, &len| {
            let first = *row;
            *row += len;
            Some((first, len))
        })
    }

    /// Rows in all.
    pub fn total(&self) -> usize {
        self.decode + self.prefill.iter().sum::<usize>()
    }
}

/// One sequence of a batch: `len` rows starting at activation row `row`, at positions
/// `pos0..pos0 + len`. Its KV cache holds `pos0` tokens before the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqSpan {
    /// First activation row of this sequence.
    pub row: usize,
    /// Number of new tokens (rows); at least 1.
    pub len: usize,
    /// Position of the first new token: the number of tokens already cached.
    pub pos0: usize,
}

/// What a forward pass hands back for one of its sequences (see [`Backend::run_pass`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// The last position's logits, on the host.
    Logits,
    /// Only the greedy choice among the first `limit` ids of the last position's logits, by
    /// [`crate::sampler::greedy_choice`]'s rule (ties to the lowest id, NaN never chosen, none
    /// when nothing is above -inf): what a plain greedy decode step needs. CUDA computes it on
    /// the device and copies back one id instead of the vocabulary's logits (issue 7).
    Greedy {
        /// Ids at or past it are never chosen (the tokenizer cannot decode them).
        limit: usize,
    },
    /// Only the `count` largest logits among the first `limit` ids, by
    /// [`crate::sampler::top_candidates`]' rule: all a top-k draw needs
    /// ([`crate::sampler::sample_candidates`]). CUDA selects them on the device and copies back
    /// `count` (id, logit) pairs instead of the vocabulary's logits.
    Candidates {
        /// Ids at or past it are never taken.
        limit: usize,
        /// How many; at most [`crate::sampler::MAX_CANDIDATES`] (more is `Internal`).
        count: usize,
    },
}

/// One sequence's result of a forward pass, as its [`OutputKind`] asked.
#[derive(Clone, Debug, PartialEq)]
pub enum SeqOutput {
    /// `[vocab]` logits of the last position.
    Logits(Vec<f32>),
    /// The greedy choice; None when no logit in range is above -inf.
    Greedy(Option<u32>),
    /// `(id, logit)` in ascending id order: [`crate::sampler::top_candidates`].
    Candidates(Vec<(u32, f32)>),
}

impl SeqOutput {
    /// The output `kind` asks for, from one sequence's logits on the host (the CPU backend's
    /// way, and the rule every backend's [`OutputKind::Greedy`] and [`OutputKind::Candidates`]
    /// must follow).
    pub fn from_logits(kind: OutputKind, logits: &[f32]) -> SeqOutput {
        match kind {
            OutputKind::Logits => SeqOutput::Logits(logits.to_vec()),
            OutputKind::Greedy { limit } => {
                SeqOutput::Greedy(crate::sampler::greedy_choice(logits, limit))
            }
            OutputKind::Candidates { limit, count } => {
                SeqOutput::Candidates(crate::sampler::top_candidates(logits, limit, count))
            }
        }
    }
}

/// Attention geometry, fixed per model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; each serves `n_heads / n_kv_heads` query heads (GQA).
    pub n_kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Leading dimensions of each head that rotate.
    pub rotary_dim: usize,
    /// Multiplies q·k (HF: head_dim^-0.5).
    pub scale: f32,
    /// A query at position p sees keys at positions > p - window (HF `sliding_window`).
    pub sliding_window: Option<usize>,
}

impl AttnParams {
    /// The geometry of `config`'s attention (HF: scale `head_dim^-0.5`).
    pub fn from_config(config: &crate::config::ModelConfig) -> AttnParams {
        AttnParams {
            n_heads: config.num_attention_heads,
            n_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            rotary_dim: config.rope.rotary_dim,
            scale: (config.head_dim as f32).powf(-0.5),
            sliding_window: config.sliding_window,
        }
    }
}

/// A compute backend. Implementations: [`cpu::CpuBackend`] (the reference), CUDA (later).
///
/// Failures: `OutOfMemory` when host or device memory runs out, `Device` when a device fails,
/// `Internal` for inputs that break the caller's contract (e.g. the CPU backend's `upload` of a
/// tensor that is neither 1-D nor 2-D, or `kv_from_host` data of the wrong length).
pub trait Backend: Send + Sync + 'static {
    /// Activations: f32 rows (one per token) of a fixed width.
    type Act: Send + Sync;
    /// A weight tensor in its file dtype.
    type Weight: Send + Sync;
    /// The KV storage of all of a model's sequences: fixed-size blocks (see
    /// [`Backend::new_kv_pool`]).
    type KvPool: Send + Sync;
    /// A forward pass's sequences and block tables, as [`Backend::kv_batch`] prepares them.
    type KvBatch: Send + Sync;

    /// Human-readable device name, e.g. "cpu (16 threads)".
    fn name(&self) -> String;

    /// Make a weight usable by this backend (zero-copy where the backend can read the host map).
    fn upload(&self, tensor: &HostTensor) -> Result<Self::Weight>;

    /// Make a 2-D projection weight usable, stored in `format` (quantized while it is read).
    /// The default takes `Native` through [`Backend::upload`] and the quantized formats through
    /// [`loader::quant::quantize`](crate::loader::quant::quantize) and
    /// [`Backend::upload_quantized`].
    ///
    /// Errors: `Unsupported` for a format the backend cannot hold; those of `quantize`, `upload`
    /// and `upload_quantized`.
    fn upload_linear(&self, tensor: &HostTensor, format: WeightFormat) -> Result<Self::Weight> {
        match format {
            WeightFormat::Native => self.upload(tensor),
            _ => self.upload_quantized(crate::loader::quant::quantize(tensor, format)?),
        }
    }

    /// Make an already-quantized 2-D projection weight usable (quantized at load, or read from a
    /// quantized checkpoint; layouts in `loader/quant.rs`). The default refuses.
    ///
    /// Errors: `Unsupported` when the backend has no kernels for the format; `OutOfMemory`.
    fn upload_quantized(&self, q: QuantizedTensor) -> Result<Self::Weight> {
        Err(Error::unsupported(format!(
            "{}x{} {} weights are not yet supported on {}",
            q.rows,
            q.cols,
            q.format(),
            self.name()
        )))
    }

    /// An empty KV pool: the storage of every sequence's keys and values, in blocks of
    /// [`KV_BLOCK_TOKENS`] tokens (each block holds every layer's keys and values of its tokens).
    /// Block ids are handed out by `kv_pool.rs`; the backend only stores blocks.
    fn new_kv_pool(&self, layout: &KvLayout) -> Result<Self::KvPool>;

    /// Bytes of KV memory a pool may take when the host sets no budget, asked once after the
    /// weights are loaded: `None` for no limit but allocation failure (the CPU). CUDA: the
    /// device memory then free, less a reserve for activations and workspaces.
    fn default_kv_budget(&self) -> Option<u64> {
        None
    }

    /// Bytes one KV block takes on this backend (the default: bf16 storage).
    fn kv_block_bytes(&self, layout: &KvLayout) -> u64 {
        2 * layout.block_len() as u64
    }

    /// Blocks the pool holds (ids `0..n`).
    fn kv_pool_blocks(&self, pool: &Self::KvPool) -> usize;

    /// Grow the pool to at least `min_blocks` and at most `max_blocks` blocks (a backend may
    /// allocate several at once) and return the new count. Never shrinks. On failure
    /// (`OutOfMemory`) the pool is unchanged.
    fn grow_kv_pool(
        &self,
        pool: &mut Self::KvPool,
        min_blocks: usize,
        max_blocks: usize,
    ) -> Result<usize>;

    /// Copy whole blocks: for each `(src, dst)`, block `dst` becomes a copy of block `src`
    /// (copy-on-write of a block shared by forked sequences). Ids are below the pool's count.
    fn copy_kv_blocks(&self, pool: &mut Self::KvPool, pairs: &[(u32, u32)]) -> Result<()>;

    /// The first `n_tokens` tokens of the sequence stored in `blocks`, on the host: for each
    /// layer, its keys then its values, each `[n_tokens, n_kv_heads * head_dim]` f32 (the
    /// session file layout). `blocks` holds at least `n_tokens.div_ceil(KV_BLOCK_TOKENS)` ids.
    fn kv_to_host(&self, pool: &Self::KvPool, blocks: &[u32], n_tokens: usize) -> Result<Vec<f32>>;

    /// Fill the first `n_tokens` tokens of the sequence stored in `blocks` from data in the
    /// [`Backend::kv_to_host`] layout (`Internal` for data of the wrong length).
    fn kv_from_host(
        &self,
        pool: &mut Self::KvPool,
        blocks: &[u32],
        n_tokens: usize,
        data: &[f32],
    ) -> Result<()>;

    /// The batch's sequences and their block tables (`blocks[i]` covers positions
    /// `0..seqs[i].pos0 + seqs[i].len`) in the form the KV kernels read, built once per forward
    /// pass and used by every layer.
    fn kv_batch(&self, seqs: &[SeqSpan], blocks: &[&[u32]]) -> Result<Self::KvBatch>;

    /// Rows of the embedding table: `[tokens.len(), hidden]`. Ids were range-checked by the caller.
    fn embed(&self, table: &Self::Weight, tokens: &[u32]) -> Result<Self::Act>;

    /// [`Backend::embed`] of a forward pass's tokens, inside [`Backend::run_pass`]'s `pass`:
    /// `batch` is the one `run_pass` handed it (CUDA reads the ids staged with it when the pass
    /// is captured as a graph). The default is `embed`.
    fn embed_pass(
        &self,
        table: &Self::Weight,
        tokens: &[u32],
        batch: &Self::KvBatch,
    ) -> Result<Self::Act> {
        let _ = batch;
        self.embed(table, tokens)
    }

    /// One forward pass: `pass(batch)` computes its output rows, one per sequence, `out_cols`
    /// values each (the embedding through lm_head, reading the pass's tokens and rotary tables
    /// through the batch it is given: [`Backend::embed_pass`], [`Backend::rope_store_kv`]), and
    /// this returns what `outputs` (one per row) asks of each row: its logits on the host, or
    /// only its greedy choice or its largest logits ([`SeqOutput::from_logits`] is the rule).
    /// The default calls `pass` once with `batch` and works on the host. CUDA may instead
    /// capture `pass` as a graph (with `tokens` and `rope`, the pass's inputs, staged on the
    /// device) and replay it for later passes of the same shape without calling `pass` at all,
    /// and chooses greedy rows' tokens and candidates on the device; the results are the same.
    fn run_pass(
        &self,
        batch: &Self::KvBatch,
        tokens: &[u32],
        rope: &RopeBatch,
        outputs: &[OutputKind],
        out_cols: usize,
        pass: &mut dyn FnMut(&Self::KvBatch) -> Result<Self::Act>,
    ) -> Result<Vec<SeqOutput>> {
        let _ = (tokens, rope);
        let logits = self.to_host(&pass(batch)?)?;
        host_outputs(&logits, outputs, out_cols)
    }

    /// `residual += delta` (when given), then return `rms_norm(residual) * weight` (HF Phi3RMSNorm).
    fn rms_norm(
        &self,
        residual: &mut Self::Act,
        delta: Option<&Self::Act>,
        weight: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Act>;

    /// `x @ w^T`: `[n, in]` x `[out, in]` -> `[n, out]`, f32 accumulation.
    ///
    /// `rows` (whose total is `n`) says which rows are decode steps and where each prefill
    /// chunk's rows are. A backend computes a decode row the same way whatever else is in the
    /// batch, and a prefill chunk the same way whatever other chunks come with it, so that a
    /// sequence's results do not depend on which other sequences the scheduler batched it with
    /// (the CPU backend: a dot product per decode row, a GEMM whose rows are independent for the
    /// rest; CUDA: one decode GEMM whose per-row sums do not depend on the row count, and one
    /// cuBLAS call per chunk).
    fn linear(&self, x: &Self::Act, w: &Self::Weight, rows: &LinearRows) -> Result<Self::Act>;

    /// Split fused qkv rows, rotate q and k with `rope` (one row per token), write k and v of
    /// `layer` into each sequence's blocks at its positions, and return q:
    /// `[n, n_heads * head_dim]`. The blocks written are the sequence's own (the caller copied
    /// shared ones first).
    fn rope_store_kv(
        &self,
        qkv: &Self::Act,
        batch: &Self::KvBatch,
        rope: &RopeBatch,
        pool: &mut Self::KvPool,
        layer: usize,
        params: &AttnParams,
    ) -> Result<Self::Act>;

    /// Causal (optionally windowed) GQA attention of q over each sequence's cached keys and
    /// values of `layer`, positions `0..pos0 + len`, read through its block table:
    /// `[n, n_heads * head_dim]`.
    fn attention(
        &self,
        q: &Self::Act,
        batch: &Self::KvBatch,
        pool: &Self::KvPool,
        layer: usize,
        params: &AttnParams,
    ) -> Result<Self::Act>;

    /// `silu(gate) * up` of fused gate_up rows `[n, 2 * ffn]` -> `[n, ffn]`.
    fn swiglu(&self, gate_up: &Self::Act) -> Result<Self::Act>;

    /// `linear(&swiglu(gate_up), w, rows)`: the MLP's down_proj, which a backend may fuse with
    /// the activation (CUDA: decode rows compute silu(gate) * up while the decode GEMM stages
    /// them). The result must be what the two calls give; the default makes them.
    fn swiglu_linear(
        &self,
        gate_up: &Self::Act,
        w: &Self::Weight,
        rows: &LinearRows,
    ) -> Result<Self::Act> {
        self.linear(&self.swiglu(gate_up)?, w, rows)
    }

    /// The given rows of `x`, in order.
    fn gather_rows(&self, x: &Self::Act, rows: &[usize]) -> Result<Self::Act>;

    /// Copy activations to the host, row-major.
    fn to_host(&self, x: &Self::Act) -> Result<Vec<f32>>;
}

/// Each row's output from a pass's `[outputs.len(), out_cols]` logits on the host (`Internal`
/// when there are not that many values).
pub fn host_outputs(
    logits: &[f32],
    outputs: &[OutputKind],
    out_cols: usize,
) -> Result<Vec<SeqOutput>> {
    if out_cols == 0 || logits.len() != outputs.len() * out_cols {
        return Err(Error::internal(format!(
            "a pass returned {} logits for {} rows of {out_cols}",
            logits.len(),
            outputs.len()
        )));
    }
    Ok(outputs
        .iter()
        .zip(logits.chunks(out_cols))
        .map(|(&kind, row)| SeqOutput::from_logits(kind, row))
        .collect())
}

/// Where a model runs, as hosts spell it: "auto", "cpu", "cuda" or "cuda:N". Parsing
/// (`str::parse`) trims surrounding whitespace and fails with `InvalidArgument` on any other
/// string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// CUDA when a usable device exists, else the CPU.
    #[default]
    Auto,
    /// The CPU reference backend.
    Cpu,
    /// CUDA device `N` (`"cuda"` is device 0).
    Cuda(usize),
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Device> {
        match s.trim() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "device \"{other}\" is not one of \"auto\", \"cpu\", \"cuda\", \"cuda:N\""
                    ))
                }),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings() {
        assert_eq!("auto".parse::<Device>().unwrap(), Device::Auto);
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<Device>().unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
        }
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
    }

    #[test]
    fn host_outputs_follow_each_rows_kind() {
        let nan = f32::NAN;
        let logits = [
            1.0,
            3.0,
            3.0,
            9.0, // greedy below 3: the tie goes to id 1; 9.0 is past the limit
            nan,
            nan,
            -2.0,
            nan, // logits kept as they are
            f32::NEG_INFINITY,
            nan,
            f32::NEG_INFINITY,
            nan, // nothing to choose
        ];
        let kinds =
            [OutputKind::Greedy { limit: 3 }, OutputKind::Logits, OutputKind::Greedy { limit: 4 }];
        let out = host_outputs(&logits, &kinds, 4).unwrap();
        assert_eq!(out[0], SeqOutput::Greedy(Some(1)));
        let SeqOutput::Logits(kept) = &out[1] else { panic!("{:?}", out[1]) };
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(kept), bits(&logits[4..8]));
        assert_eq!(out[2], SeqOutput::Greedy(None));
        // A pass that returned the wrong number of values is an error, not a short answer.
        assert!(host_outputs(&logits[..8], &kinds, 4).is_err());
        assert!(host_outputs(&[], &[], 0).is_err());
    }
}
