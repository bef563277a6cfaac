//! Device memory needed by a model, estimated before anything is allocated, so that a model that
//! does not fit fails with the numbers instead of running out halfway through the upload.
//!
//! Weights: matrices in their dtype, vectors in f32 (see `upload.rs`). Working memory: the
//! activations of one forward pass of [`crate::PREFILL_CHUNK`] tokens (residual, normed input,
//! qkv, q, attention output, gate_up, SwiGLU output, MLP output, plus their 16-bit GEMM copies),
//! doubled for the stream-ordered allocator's slack, plus a fixed allowance for cuBLAS's
//! workspace and the kernel modules. KV caches are not included: they grow per session, and a
//! growth that does not fit is an `OutOfMemory` error of that session.

use crate::config::ModelConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::loader::DType;

/// Fixed allowance for cuBLAS workspaces, modules and allocator granularity.
const FIXED_BYTES: u64 = 512 << 20;

/// Bytes the device must have free to load a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Weight storage on the device.
    pub weights: u64,
    /// Activations and library workspaces of one prefill chunk.
    pub working: u64,
}

impl MemoryEstimate {
    /// Weights plus working memory.
    pub fn total(&self) -> u64 {
        self.weights + self.working
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

/// The estimate for `config` whose tensors (shape, dtype) are `tensors`.
pub fn estimate<'a>(
    config: &ModelConfig,
    tensors: impl IntoIterator<Item = (&'a [usize], DType)>,
) -> MemoryEstimate {
    let weights = tensors.into_iter().map(|(s, d)| weight_bytes(s, d)).sum();
    let (h, q, kv, ffn) = (
        config.hidden_size as u64,
        config.q_dim() as u64,
        config.kv_dim() as u64,
        config.intermediate_size as u64,
    );
    let per_row_floats = 4 * h + (q + 2 * kv) + 2 * q + 3 * ffn;
    // 16-bit GEMM inputs: the normed input twice (qkv, gate_up), the attention output, SwiGLU's.
    let per_row_halves = 2 * h + q + ffn;
    let rows = crate::PREFILL_CHUNK as u64;
    let activations = rows * (4 * per_row_floats + 2 * per_row_halves);
    let logits = 4 * config.vocab_size as u64 * 4;
    MemoryEstimate { weights, working: 2 * activations + logits + FIXED_BYTES }
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
            "{device}: the model needs about {} of device memory ({} weights + {} working) but \
             only {} of {} is free",
            gib(need.total()),
            gib(need.weights),
            gib(need.working),
            gib(free),
            gib(total)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi3_medium_fits_80_gb_but_not_24() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/configs/Phi-3-medium-128k-instruct.config.json"
        ))
        .unwrap();
        let c = ModelConfig::from_json(&text).unwrap();
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
}
