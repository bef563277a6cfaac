//! Device memory needed by a model, estimated before anything is allocated, so that a model that
//! does not fit fails with the numbers instead of running out halfway through the upload.
//!
//! Weights: matrices in their dtype, vectors in f32 (see `upload.rs`); with a quantized
//! [`WeightFormat`], the decoder projections take `WeightFormat::stored_bytes` (values, scales and
//! zero points: exactly what `quant.rs` allocates) and the prefill path adds its dequantization
//! workspace ([`DEQUANT_WORKSPACE_BYTES`](super::quant::DEQUANT_WORKSPACE_BYTES) at most).
//! Working memory: the activations of one forward pass of a prefill chunk
//! (`LoadOptions::prefill_chunk` tokens, by default [`crate::PREFILL_CHUNK`]: residual, normed
//! input, qkv, q, attention output, gate_up, SwiGLU output, MLP output, plus their 16-bit GEMM
//! copies), doubled for the stream-ordered allocator's slack, plus a fixed allowance for cuBLAS's
//! workspace and the kernel modules. KV memory is the model's paged pool (bf16 blocks of
//! [`KV_BLOCK_TOKENS`] tokens, see `kv.rs`), which grows up to a budget: by default
//! [`kv_budget`], what is free once the weights are loaded less the working memory above and
//! [`KV_HEADROOM_BYTES`]. The estimate includes `kv_tokens` tokens of KV blocks when the caller
//! asks (0: none, the pool then takes what is left).

use crate::backend::KV_BLOCK_TOKENS;
use crate::config::ModelConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::loader::{DType, TensorRole, WeightFormat};

/// Fixed allowance for cuBLAS workspaces, modules and allocator granularity.
const FIXED_BYTES: u64 = 512 << 20;
/// Device memory the default KV budget leaves free beyond the working memory: allocator
/// fragmentation, batches wider than one prefill chunk, other users of the device.
pub const KV_HEADROOM_BYTES: u64 = 1 << 30;
/// Working memory assumed by [`kv_budget`] without an estimate (a Phi-3-medium prefill chunk
/// needs about 0.95 GiB).
const UNKNOWN_WORKING_BYTES: u64 = 2 << 30;

/// Bytes the device must have free to load a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Weight storage on the device.
    pub weights: u64,
    /// Activations and library workspaces of one prefill chunk.
    pub working: u64,
    /// The bf16 dequantization workspace of quantized projections (0 for native weights).
    pub workspace: u64,
    /// KV blocks for the requested number of tokens (0 when none was asked for).
    pub kv: u64,
}

impl MemoryEstimate {
    /// Everything: weights, working memory, workspace and KV cache.
    pub fn total(&self) -> u64 {
        self.weights + self.working + self.workspace + self.kv
    }
}

/// Device bytes of one weight of `shape` stored from `dtype`.
pub fn weight_bytes(shape: &[usize], dtype: DType) -> u64 {
    let n: u64 = shape.iter().map(|&d| d as u64).product();
    if shape.len() == 1 {
        4 * n
    } else {
        dtype.size() as u64 * n
    }
}

/// Device bytes of one tensor of `shape` stored from `dtype` when the projections are stored in
/// `format` (only [`TensorRole::Projection`] matrices are quantized).
pub fn tensor_bytes(shape: &[usize], dtype: DType, role: TensorRole, format: WeightFormat) -> u64 {
    match (role, shape) {
        (TensorRole::Projection, &[rows, cols]) if format.is_quantized() => {
            format.stored_bytes(rows, cols, dtype)
        }
        _ => weight_bytes(shape, dtype),
    }
}

/// Bytes of the KV blocks holding one sequence of `tokens` tokens: every layer's keys and values
/// in bf16, rounded up to whole blocks of [`KV_BLOCK_TOKENS`] tokens.
pub fn kv_bytes(config: &ModelConfig, tokens: usize) -> u64 {
    let capacity = tokens.div_ceil(KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS;
    2 * 2 * config.num_hidden_layers as u64 * capacity as u64 * config.kv_dim() as u64
}

/// The default KV budget (`Backend::default_kv_budget`), asked once the weights are loaded: the
/// device's `free` memory less [`KV_HEADROOM_BYTES`], `need`'s working memory (activations of a
/// prefill chunk, cuBLAS workspace, modules: not all allocated yet) and the part of its
/// dequantization workspace not yet allocated (`workspace_held` bytes are, and are no longer
/// free). Without an estimate the working memory is taken as 2 GiB. 0 when nothing is left.
pub fn kv_budget(free: u64, need: Option<&MemoryEstimate>, workspace_held: u64) -> u64 {
    let working = need
        .map_or(UNKNOWN_WORKING_BYTES, |n| n.working + n.workspace.saturating_sub(workspace_held));
    free.saturating_sub(KV_HEADROOM_BYTES + working)
}

/// The estimate for `config` whose tensors (shape, dtype) are `tensors`, native weights, no KV
/// cache, the default prefill chunk: [`estimate_for`] with every tensor stored as
/// `WeightFormat::Native`, `kv_tokens = 0` and [`crate::PREFILL_CHUNK`].
pub fn estimate<'a>(
    config: &ModelConfig,
    tensors: impl IntoIterator<Item = (&'a [usize], DType)>,
) -> MemoryEstimate {
    let tensors =
        tensors.into_iter().map(|(s, d)| (s, d, TensorRole::Embedding, WeightFormat::Native));
    estimate_for(config, tensors, 0, crate::PREFILL_CHUNK)
}

/// The estimate for `config` whose tensors are `tensors`, each given as (shape, file dtype, role,
/// the format it is stored in on the device: `Native`, or the projection's quantized format,
/// whether quantized at load or read from a quantized checkpoint), with room for KV blocks of
/// one sequence of `kv_tokens` tokens and the activations of passes of `prefill_chunk` tokens
/// (`LoadOptions::prefill_chunk`). The dequantization workspace is counted when any projection
/// is quantized.
pub fn estimate_for<'a>(
    config: &ModelConfig,
    tensors: impl IntoIterator<Item = (&'a [usize], DType, TensorRole, WeightFormat)>,
    kv_tokens: usize,
    prefill_chunk: usize,
) -> MemoryEstimate {
    let mut weights = 0;
    let mut workspace = 0;
    for (shape, dtype, role, format) in tensors {
        weights += tensor_bytes(shape, dtype, role, format);
        if let (TensorRole::Projection, &[rows, cols], true) = (role, shape, format.is_quantized())
        {
            let block = super::quant::workspace_rows(rows, cols) as u64 * cols as u64 * 2;
            workspace = workspace.max(block);
        }
    }
    let activations = activation_bytes(config, prefill_chunk);
    let logits = 4 * config.vocab_size as u64 * 4;
    MemoryEstimate {
        weights,
        working: 2 * activations + logits + FIXED_BYTES,
        workspace,
        kv: kv_bytes(config, kv_tokens),
    }
}

/// Bytes of the activations of one forward pass of `rows` rows, before the logits.
fn activation_bytes(config: &ModelConfig, rows: usize) -> u64 {
    let (h, q, kv, ffn) = (
        config.hidden_size as u64,
        config.q_dim() as u64,
        config.kv_dim() as u64,
        config.intermediate_size as u64,
    );
    let per_row_floats = 4 * h + (q + 2 * kv) + 2 * q + 3 * ffn;
    // 16-bit GEMM inputs: the normed input twice (qkv, gate_up), the attention output, SwiGLU's.
    let per_row_halves = 2 * h + q + ffn;
    rows as u64 * (4 * per_row_floats + 2 * per_row_halves)
}

/// Device memory of CUDA graphs of decode passes (`graph.rs`) of up to `rows` rows whose
/// sequences hold `kv_tokens` tokens in all: the graph pool (one pass's activations, logits and
/// split-attention scratch: every graph frees what it allocates, and graphs of one stream never
/// run at once) plus the buffers graphs read and write (the logits output, rounded up to a power
/// of two of rows, and the inputs). Not part of [`MemoryEstimate`]: graphs are off by default,
/// and this fits in the [`KV_HEADROOM_BYTES`] that the default KV budget leaves free (tested
/// for Phi-3-medium at 256 rows and a full H200).
pub fn graph_bytes(config: &ModelConfig, rows: usize, kv_tokens: usize) -> u64 {
    let logits = rows as u64 * config.vocab_size as u64 * 4;
    let output = rows.next_power_of_two() as u64 * config.vocab_size as u64 * 4;
    // Split-key attention: at most one slice per ATTN_SPLIT_KEYS keys of each row, plus one
    // per row; slots of a power of two (`kv::split_capacity`), each n_heads x (head_dim + 2).
    let slices = kv_tokens / super::kv::ATTN_SPLIT_KEYS + rows;
    let slot = config.num_attention_heads as u64 * (config.head_dim as u64 + 2) * 4;
    let scratch = super::kv::split_capacity(slices) as u64 * slot;
    // Batch descriptor (two copies of a generous bound), token ids, cos and sin.
    let inputs = 2 * 4 * (3 * rows as u64 + kv_tokens as u64 / KV_BLOCK_TOKENS as u64)
        + 4 * super::graph::MAX_GRAPH_ROWS as u64 * (1 + config.head_dim as u64);
    activation_bytes(config, rows) + logits + scratch + output + inputs
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// `OutOfMemory` naming the numbers when `need` exceeds `free`.
pub(crate) fn check(device: &str, need: &MemoryEstimate, free: u64, total: u64) -> Result<()> {
    if need.total() <= free {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::OutOfMemory,
        format!(
            "{device}: the model needs about {} of device memory ({} weights + {} working{}{}) \
             but only {} of {} is free",
            gib(need.total()),
            gib(need.weights),
            gib(need.working),
            if need.workspace > 0 {
                format!(" + {} dequantization workspace", gib(need.workspace))
            } else {
                String::new()
            },
            if need.kv > 0 { format!(" + {} KV cache", gib(need.kv)) } else { String::new() },
            gib(free),
            gib(total)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::quant::DEQUANT_WORKSPACE_BYTES;
    use super::*;

    fn medium() -> ModelConfig {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/configs/Phi-3-medium-128k-instruct.config.json"
        ))
        .unwrap();
        ModelConfig::from_json(&text).unwrap()
    }

    /// (shape, bf16, role) of every tensor of `c`, as model.rs passes them.
    fn tensors(c: &ModelConfig) -> Vec<(Vec<usize>, TensorRole)> {
        let mut out = Vec::new();
        let layout = crate::loader::layout(c).unwrap();
        let _ = layout.try_map_with_role(|(_, shape), role| {
            out.push((shape.clone(), role));
            Ok(())
        });
        out
    }

    const GIB: f64 = (1u64 << 30) as f64;

    /// The target: Phi-3-medium-128k in int4-g128 with a 16k-token context on a 12 GB
    /// card (12 GiB nominal, about 11.6 GiB usable once the CUDA context exists).
    #[test]
    fn phi3_medium_int4_with_16k_context_fits_12_gb() {
        let c = medium();
        let t = tensors(&c);
        let all = |f| t.iter().map(move |(s, r)| (s.as_slice(), DType::BF16, *r, f));
        let e =
            estimate_for(&c, all(WeightFormat::Int4 { group: 128 }), 16384, crate::PREFILL_CHUNK);
        let g = |b: u64| b as f64 / GIB;
        println!(
            "Phi-3-medium-128k int4-g128, 16k context: weights {:.3} GiB, working {:.3} GiB, \
             workspace {:.3} GiB, KV {:.3} GiB, total {:.3} GiB",
            g(e.weights),
            g(e.working),
            g(e.workspace),
            g(e.kv),
            g(e.total())
        );
        // Projections: 40 x (7680 + 5120 + 35840 + 5120 * 3.5) x 5120 = 13.63e9 weights at
        // 0.5 + 3 / 128 bytes; embeddings and lm_head stay bf16 (2 x 0.306 GiB).
        assert!((7.24..7.27).contains(&g(e.weights)), "{e:?}");
        assert_eq!(e.kv, 40 * 2 * 16384 * 1280 * 2); // 3.125 GiB
        assert_eq!(e.workspace, DEQUANT_WORKSPACE_BYTES as u64 - 8192); // 3276 rows of 5120
        assert!(g(e.total()) < 11.6, "{e:?}");
        // The same with int8 does not fit; native bf16 weights alone do not.
        let e8 = estimate_for(&c, all(WeightFormat::Int8), 16384, crate::PREFILL_CHUNK);
        assert!(g(e8.total()) > 16.0, "{e8:?}");
        let native = estimate_for(&c, all(WeightFormat::Native), 0, crate::PREFILL_CHUNK);
        assert_eq!(native.workspace, 0);
        assert_eq!(native, estimate(&c, t.iter().map(|(s, _)| (s.as_slice(), DType::BF16))));
    }

    #[test]
    fn quantized_projection_bytes_match_the_format() {
        let f = WeightFormat::Int4 { group: 32 };
        assert_eq!(
            tensor_bytes(&[64, 128], DType::BF16, TensorRole::Projection, f),
            64 * 64 + 3 * 64 * 4
        );
        assert_eq!(tensor_bytes(&[64, 128], DType::BF16, TensorRole::Output, f), 2 * 64 * 128);
        assert_eq!(tensor_bytes(&[128], DType::BF16, TensorRole::Norm, f), 4 * 128);
        let i8 = WeightFormat::Int8;
        assert_eq!(
            tensor_bytes(&[64, 128], DType::F32, TensorRole::Projection, i8),
            64 * 128 + 4 * 64
        );
        assert_eq!(kv_bytes(&medium(), 1), 40 * 2 * 16 * 1280 * 2);
        assert_eq!(kv_bytes(&medium(), 17), 40 * 2 * 32 * 1280 * 2);
        assert_eq!(kv_bytes(&medium(), 0), 0);
    }

    #[test]
    fn phi3_medium_fits_80_gb_but_not_24() {
        let c = medium();
        let names = crate::loader::names::expected_tensors(&c);
        let e = estimate(&c, names.iter().map(|(_, s)| (s.as_slice(), DType::BF16)));
        // 13.96 B parameters in bf16 (norms in f32 add ~0.4 MB).
        assert!((27.9e9..28.0e9).contains(&(e.weights as f64)), "{e:?}");
        assert!(e.working < 2 << 30, "{e:?}");
        assert!(check("cuda:0", &e, 80 << 30, 80 << 30).is_ok());
        let err = check("cuda:0", &e, 24 << 30, 24 << 30).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::OutOfMemory);
        assert!(err.to_string().contains("24.00 GiB"), "{err}");
    }

    #[test]
    fn kv_budget_keeps_the_working_memory_free() {
        let c = medium();
        let t = tensors(&c);
        let e = estimate_for(
            &c,
            t.iter().map(|(s, r)| (s.as_slice(), DType::BF16, *r, WeightFormat::Int8)),
            0,
            crate::PREFILL_CHUNK,
        );
        assert!(e.workspace > 0);
        let free = 40u64 << 30;
        let all = kv_budget(free, Some(&e), 0);
        assert_eq!(all, free - KV_HEADROOM_BYTES - e.working - e.workspace);
        // A workspace already allocated is no longer free, so it is not reserved again.
        assert_eq!(kv_budget(free, Some(&e), e.workspace), all + e.workspace);
        assert_eq!(kv_budget(free, None, 0), free - (3 << 30));
        assert_eq!(kv_budget(1 << 30, Some(&e), 0), 0);
        // The working memory of a Phi-3-medium chunk is below the no-estimate allowance.
        assert!(e.working < UNKNOWN_WORKING_BYTES, "{e:?}");
    }

    /// CUDA graphs of the largest decode batch, with a full H200's KV pool, fit in the headroom
    /// the default KV budget keeps free.
    #[test]
    fn cuda_graphs_fit_in_the_kv_headroom() {
        let c = medium();
        let kv_tokens = (141u64 << 30) / kv_bytes(&c, KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS as u64;
        let rows = super::super::graph::MAX_GRAPH_ROWS;
        let need = graph_bytes(&c, rows, kv_tokens as usize);
        assert!(need < KV_HEADROOM_BYTES / 2, "{} MiB", need >> 20);
        // Each part counted: more rows or more context need more.
        assert!(graph_bytes(&c, rows / 2, kv_tokens as usize) < need);
        assert!(graph_bytes(&c, rows, 1 << 20) > need);
    }

    #[test]
    fn working_memory_follows_the_prefill_chunk() {
        let c = medium();
        let t = tensors(&c);
        let at = |chunk| {
            let all = t.iter().map(|(s, r)| (s.as_slice(), DType::BF16, *r, WeightFormat::Native));
            estimate_for(&c, all, 0, chunk)
        };
        let (small, large) = (at(512), at(2048));
        assert_eq!(small.weights, large.weights);
        // Activations scale with the rows; logits and the fixed allowance do not.
        let rows_part = |e: MemoryEstimate| e.working - FIXED_BYTES - 4 * c.vocab_size as u64 * 4;
        assert_eq!(rows_part(large), 4 * rows_part(small));
        // 0.42 GiB of activations per 512 tokens of Phi-3-medium (allocator slack included):
        // a 2,048-token chunk needs about 2.2 GiB of working memory in all.
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        assert!((0.41..0.42).contains(&gib(rows_part(small))), "{small:?}");
        assert!((2.1..2.2).contains(&gib(large.working)), "{large:?}");
    }
}
