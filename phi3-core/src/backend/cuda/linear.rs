//! `linear` on CUDA with the rows of a pass apart by kind (see [`Backend::linear`]): the decode
//! rows through one phi3_decode_gemm launch, whose per-row sums do not depend on how many rows
//! there are, and each prefill chunk through its own cuBLAS call, so that cuBLAS (which picks its
//! algorithm by the row count) sees the shape of the chunk's solo run. A sequence's results then
//! do not depend on which other sequences were batched with it.
//!
//! The MLP's down_proj ([`Backend::swiglu_linear`]) hands the decode GEMM the gate_up rows
//! themselves: the swiglu variant computes silu(gate) * up as it stages them, so a decode step
//! runs no activation kernel. Prefill chunks take phi3_swiglu's output to cuBLAS.
//!
//! Decode rows the decode GEMM does not take (`in` not a multiple of 32, f32 weights) run one
//! GEMV per row: slower, and as batch-invariant. Quantized weights: `quant.rs`.
//!
//! [`Backend::linear`]: crate::backend::Backend::linear
//! [`Backend::swiglu_linear`]: crate::backend::Backend::swiglu_linear

use cudarc::driver::CudaSlice;

use super::blas::GemmType;
use super::ops::{DECODE_GEMM_ROWS, DECODE_GEMM_TOKENS};
use super::{CudaAct, CudaBackend, WeightData};
use crate::backend::{Backend, LinearRows};
use crate::error::{Error, Result};

/// Fewest columns per K slice of the decode GEMM (two of its 128-column chunks): shorter slices
/// would cost more in partial sums than they gain in parallelism.
const MIN_SPLIT_COLS: usize = 256;

/// What a dense projection multiplies.
#[derive(Clone, Copy)]
pub(super) enum DenseInput<'a> {
    /// Activations `[n, in]`.
    Rows(&'a CudaAct),
    /// silu(gate) * up of gate_up rows `[n, 2 in]` (down_proj of the MLP).
    SwiGlu(&'a CudaAct),
}

impl CudaBackend {
    /// `y = x @ w^T` for a 16-bit or f32 weight, `x` given by `input` (the caller checked the
    /// shapes).
    pub(super) fn linear_dense(
        &self,
        input: DenseInput<'_>,
        w: &WeightData,
        rows: &LinearRows,
        y: &mut CudaAct,
    ) -> Result<()> {
        let (src, swiglu) = match input {
            DenseInput::Rows(x) => (x, false),
            DenseInput::SwiGlu(g) => (g, true),
        };
        let k = if swiglu { src.cols / 2 } else { src.cols };
        let m = y.cols;
        let stream = &self.dev.stream;
        let decode = rows.decode_rows();
        let dense16 = matches!(w, WeightData::Bf16(_) | WeightData::F16(_));
        let decode_gemm = dense16 && decode > 0 && k > 0 && k.is_multiple_of(32);
        // The activation rows, for the paths that do not take gate_up (GEMV rows, prefill
        // chunks): silu(gate) * up of every row, computed only when one of them runs. Where none
        // does, `x` is never read.
        let needs_rows = rows.total() > decode || (decode > 0 && !decode_gemm);
        let owned = if swiglu && needs_rows { Some(self.swiglu(src)?) } else { None };
        let x = owned.as_ref().unwrap_or(src);
        match w {
            WeightData::Bf16(wb) | WeightData::F16(wb) => {
                let bf16 = matches!(w, WeightData::Bf16(_));
                let (ty, convert, gemv) = if bf16 {
                    (GemmType::Bf16, "phi3_f32_to_bf16", "phi3_gemv_bf16")
                } else {
                    (GemmType::F16, "phi3_f32_to_f16", "phi3_gemv_f16")
                };
                // The decode GEMM rounds the f32 rows itself as it stages them; cuBLAS takes
                // them converted first.
                if decode_gemm {
                    let gemm = match (swiglu, bf16) {
                        (false, true) => "phi3_decode_gemm_bf16",
                        (false, false) => "phi3_decode_gemm_f16",
                        (true, true) => "phi3_decode_gemm_swiglu_bf16",
                        (true, false) => "phi3_decode_gemm_swiglu_f16",
                    };
                    self.decode_gemm(gemm, wb, &src.buf, &mut y.buf, decode, k, m)?;
                } else {
                    for r in 0..decode {
                        self.gemv_row(gemv, wb, x, y, r)?;
                    }
                }
                if rows.prefill_runs().next().is_some() {
                    let xh = self.to_half(x, convert)?;
                    for (row0, len) in rows.prefill_runs() {
                        self.blas.gemm(stream, ty, &xh, wb, &mut y.buf, row0..row0 + len, k, m)?;
                    }
                }
            }
            WeightData::F32(wb) => {
                for r in 0..decode {
                    self.gemv_row("phi3_gemv_f32", wb, x, y, r)?;
                }
                for (row0, len) in rows.prefill_runs() {
                    let run = row0..row0 + len;
                    self.blas.gemm(stream, GemmType::F32, &x.buf, wb, &mut y.buf, run, k, m)?;
                }
            }
            WeightData::Quant(_) => {
                return Err(Error::internal("linear_dense: a quantized weight"))
            }
        }
        Ok(())
    }

    /// Rows `0..ntok` of `y` `[_, m]` = rows `0..ntok` of `x` `[_, k]` (f32, rounded to the
    /// weight's type by the kernel; for the swiglu kernels gate_up `[_, 2 k]`) @ `w^T`, by the
    /// decode GEMM `name`, its K slices added by the last block of each tile when there are
    /// several.
    #[allow(clippy::too_many_arguments)]
    fn decode_gemm(
        &self,
        name: &str,
        w: &CudaSlice<u16>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        ntok: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        let split = decode_splits(k, m, self.dev.sm_count);
        let tiles = m.div_ceil(DECODE_GEMM_ROWS) * ntok.div_ceil(DECODE_GEMM_TOKENS);
        self.with_tickets(tiles, |tickets| {
            if split.0 == 1 {
                // One slice: `part` is not touched (x stands in for it).
                return self.launch_decode_gemm(name, w, x, y, x, tickets, ntok, (k, m), split);
            }
            let part = self.alloc::<f32>(split.0 * ntok * m, "decode GEMM partial sums")?;
            self.launch_decode_gemm(name, w, x, y, &part, tickets, ntok, (k, m), split)
        })
    }

    /// Row `r` of `y` = `w` @ row `r` of `x`, by the GEMV kernel `name`.
    fn gemv_row<W>(
        &self,
        name: &str,
        w: &CudaSlice<W>,
        x: &CudaAct,
        y: &mut CudaAct,
        r: usize,
    ) -> Result<()> {
        let (k, m) = (x.cols, y.cols);
        let xv = x.buf.slice(r * k..(r + 1) * k);
        let mut yv = y.buf.slice_mut(r * m..(r + 1) * m);
        self.launch_gemv(name, w, &xv, &mut yv, k, m)
    }
}

/// (K slices, columns per slice) of the decode GEMM for a weight `[m, k]` (`k` a positive
/// multiple of 32) on a device with `sm_count` SMs: enough slices for about two blocks per SM,
/// each a multiple of 32 columns and at least [`MIN_SPLIT_COLS`] long. It depends on the weight
/// and the device only, never on the number of rows, so each row's summation order is fixed.
pub(super) fn decode_splits(k: usize, m: usize, sm_count: usize) -> (usize, usize) {
    let row_blocks = m.div_ceil(DECODE_GEMM_ROWS).max(1);
    let wanted = (2 * sm_count).div_ceil(row_blocks);
    let splits = wanted.clamp(1, (k / MIN_SPLIT_COLS).max(1));
    let per = (k / 32).div_ceil(splits).max(1) * 32;
    (k.div_ceil(per), per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_splits_cover_k_in_whole_32_column_steps() {
        // Phi-3-medium's projections and lm_head on an H100 (132 SMs), and small shapes.
        for (k, m) in [(5120, 7680), (5120, 5120), (5120, 35840), (17920, 5120), (5120, 32064)] {
            for sms in [1, 108, 132] {
                let (splits, per) = decode_splits(k, m, sms);
                assert!(per.is_multiple_of(32) && per >= MIN_SPLIT_COLS.min(k), "{k} {m} {sms}");
                assert!(
                    splits * per >= k && (splits - 1) * per < k,
                    "{k} {m} {sms}: {splits}x{per}"
                );
            }
        }
        assert_eq!(decode_splits(5120, 5120, 132), (4, 1280)); // 80 row blocks: 320 blocks
        assert_eq!(decode_splits(5120, 35840, 132), (1, 5120)); // 560 row blocks already
        assert_eq!(decode_splits(32, 16, 132), (1, 32));
        assert_eq!(decode_splits(96, 64, 132), (1, 96));
    }
}
