//! Quantized projection weights (int8, int4 with bf16 or f16 scales) on the device, and `linear`
//! over them. Layouts are those of `loader/quant.rs`, copied unchanged (no repacking), so a
//! weight read back from the device is bit-identical to the host's [`QuantizedTensor`].
//!
//! `linear` takes two paths, split at the same row count as the bf16 weights (one row: GEMV):
//! - decode (one row): `kernels/gemv_quant.cu` reads each weight byte once and dequantizes in
//!   registers (f32 activations, f32 accumulation); bound by the bytes of values, scales and
//!   zero points.
//! - prefill (more rows): `kernels/dequant.cu` expands a block of weight rows to bf16 in a device
//!   workspace shared by all weights of the backend, then cuBLAS multiplies it with the bf16-rounded
//!   activations (the bf16 GEMM of the native path, with the output written as a column block of
//!   `y`). The workspace holds at most [`DEQUANT_WORKSPACE_BYTES`] (whole rows; a weight larger
//!   than that is done in blocks of rows), grows on demand up to that bound, and is reused by every
//!   call: all work is ordered on the backend's one stream, so a block's GEMM has read the
//!   workspace before the next dequantization overwrites it.
//!   Numerics: each dequantized weight is rounded to bf16 once (scale * q is exact in f32), so
//!   the prefill path carries bf16 rounding of both operands, like the native bf16 path.
//!
//! Not here: choosing which tensors are quantized (`forward.rs`), quantizing (`loader/quant.rs`),
//! the memory estimate (`memory.rs`, which counts the workspace).

use std::sync::atomic::Ordering;

use cudarc::driver::CudaSlice;
use half::{bf16, f16};

use super::error::DriverResultExt;
use super::ops::QGEMV_TOKENS;
use super::upload::STAGING_BYTES;
use super::{blas, CudaAct, CudaBackend, CudaWeight, WeightData};
use crate::backend::LinearRows;
use crate::error::{Error, Result};
use crate::loader::quant::{Int4Scales, QuantData, QuantizedTensor, INT4_GROUPS};
use crate::loader::WeightFormat;

/// Upper bound on the bf16 dequantization workspace of the prefill path, in bytes.
pub const DEQUANT_WORKSPACE_BYTES: usize = 32 << 20;

/// dtype of int4 group scales on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScaleType {
    Bf16,
    F16,
}

/// A quantized `[rows, cols]` weight on the device (rows and cols are the [`CudaWeight`]'s).
pub(crate) enum QuantWeight {
    Int8 {
        values: CudaSlice<i8>,  // [rows * cols], -127..=127 (any i8 works)
        scales: CudaSlice<f32>, // [rows]
    },
    Int4 {
        group: usize,
        packed: CudaSlice<u8>, // [rows * cols / 2], column 2i in the low nibble of byte i
        scales: CudaSlice<u16>, // [rows * cols / group], bf16 or f16 bit patterns
        scale_type: ScaleType,
        zeros: CudaSlice<u8>, // [rows * cols / group], 0..=15
    },
}

impl QuantWeight {
    /// Device bytes held (equals `WeightFormat::stored_bytes` of the format).
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            QuantWeight::Int8 { values, scales } => values.len() as u64 + 4 * scales.len() as u64,
            QuantWeight::Int4 { packed, scales, zeros, .. } => {
                packed.len() as u64 + 2 * scales.len() as u64 + zeros.len() as u64
            }
        }
    }

    pub(crate) fn format(&self) -> WeightFormat {
        match self {
            QuantWeight::Int8 { .. } => WeightFormat::Int8,
            QuantWeight::Int4 { group, .. } => WeightFormat::Int4 { group: *group },
        }
    }
}

/// Rows of a `[rows, cols]` weight dequantized per block on the prefill path: as many whole rows
/// as fit in [`DEQUANT_WORKSPACE_BYTES`] of bf16, at least one, at most `rows`.
pub fn workspace_rows(rows: usize, cols: usize) -> usize {
    (DEQUANT_WORKSPACE_BYTES / (2 * cols.max(1))).clamp(1, rows.max(1))
}

/// Check that `q`'s buffers have the sizes its shape and format imply (the kernels index them
/// with rows and cols, so a mismatch would read out of bounds).
pub(crate) fn check_layout(q: &QuantizedTensor) -> Result<()> {
    let (r, c) = (q.rows, q.cols);
    let bad = |what: &str| {
        Err(Error::internal(format!(
            "{r}x{c} {} weight: {what} do not match the shape",
            q.format()
        )))
    };
    if i32::try_from(r).is_err() || i32::try_from(c).is_err() {
        return Err(Error::unsupported(format!(
            "{r}x{c} {} weight: dimensions beyond 2^31 are not supported on CUDA",
            q.format()
        )));
    }
    match &q.data {
        QuantData::Int8 { values, scales } => {
            if values.len() != r * c || scales.len() != r {
                return bad("value or scale counts");
            }
        }
        QuantData::Int4 { group, packed, scales, zeros } => {
            let g = *group;
            if !INT4_GROUPS.contains(&g) || !c.is_multiple_of(g) {
                return bad(&format!("group {g} and the row width"));
            }
            let ng = r * (c / g);
            if packed.len() != r * c / 2 || scales.len() != ng || zeros.len() != ng {
                return bad("packed, scale or zero-point counts");
            }
        }
    }
    Ok(())
}

impl CudaBackend {
    /// Copy `data` into `dst` in pieces of at most `STAGING_BYTES` (each copy returns once the
    /// driver has taken the bytes).
    fn htod_pieces<T: cudarc::driver::DeviceRepr>(
        &self,
        data: &[T],
        dst: &mut CudaSlice<T>,
        what: &str,
    ) -> Result<()> {
        let piece = (STAGING_BYTES / std::mem::size_of::<T>().max(1)).max(1);
        for (i, chunk) in data.chunks(piece).enumerate() {
            let start = i * piece;
            let mut view = dst.slice_mut(start..start + chunk.len());
            self.dev.stream.memcpy_htod(chunk, &mut view).ctx(what)?;
        }
        Ok(())
    }

    fn upload_parts<T: cudarc::driver::DeviceRepr>(
        &self,
        data: &[T],
        what: &str,
    ) -> Result<CudaSlice<T>> {
        let mut buf = self.alloc::<T>(data.len(), what)?;
        self.htod_pieces(data, &mut buf, what)?;
        Ok(buf)
    }

    /// The device copy of an already-quantized weight (see `Backend::upload_quantized`).
    pub(crate) fn upload_quantized_tensor(&self, q: QuantizedTensor) -> Result<CudaWeight> {
        check_layout(&q)?;
        let what = format!("{}x{} {} weight", q.rows, q.cols, q.format());
        let data = match &q.data {
            QuantData::Int8 { values, scales } => QuantWeight::Int8 {
                values: self.upload_parts(values, &what)?,
                scales: self.upload_parts(scales, &what)?,
            },
            QuantData::Int4 { group, packed, scales, zeros } => {
                let (bits, scale_type): (Vec<u16>, _) = match scales {
                    Int4Scales::Bf16(s) => {
                        (s.iter().map(|v| v.to_bits()).collect(), ScaleType::Bf16)
                    }
                    Int4Scales::F16(s) => (s.iter().map(|v| v.to_bits()).collect(), ScaleType::F16),
                };
                QuantWeight::Int4 {
                    group: *group,
                    packed: self.upload_parts(packed, &what)?,
                    scales: self.upload_parts(&bits, &what)?,
                    scale_type,
                    zeros: self.upload_parts(zeros, &what)?,
                }
            }
        };
        let w = CudaWeight { rows: q.rows, cols: q.cols, data: WeightData::Quant(data) };
        self.add_weight_bytes(&w);
        Ok(w)
    }

    /// A quantized weight with random values generated on the device, for benchmarks at full
    /// model shapes: uniformly random bytes as values (every byte is a valid int8, or two int4
    /// levels), per-row (int8) or per-group (int4, bf16 scales) scales of 1/sqrt(cols) scaled
    /// to the format's range ±25%, int4 zero points 8. Elements are then about ±1/sqrt(cols),
    /// like the native dummy weights; the speed of the kernels does not depend on the values.
    ///
    /// Errors: `InvalidArgument` for `Native` or an int4 group that does not divide `cols`;
    /// `OutOfMemory`; device errors.
    pub fn dummy_quantized_weight(
        &self,
        rows: usize,
        cols: usize,
        format: WeightFormat,
        seed: u64,
        index: u64,
    ) -> Result<CudaWeight> {
        let what = format!("dummy {rows}x{cols} {format} weight");
        let unit = 1.0 / (cols.max(1) as f32).sqrt();
        // Distinct streams per part of the tensor.
        let (i_values, i_scales) = (index << 2, (index << 2) | 1);
        let data = match format {
            WeightFormat::Native => {
                return Err(Error::invalid_argument(format!("{what}: not a quantized format")))
            }
            WeightFormat::Int8 => {
                let mut values = self.alloc::<i8>(rows * cols, &what)?;
                self.launch_fill_random_bytes(&mut values, seed, i_values)?;
                let mut scales = self.alloc::<f32>(rows, &what)?;
                let s = unit / 127.0;
                self.launch_fill_dummy(
                    "phi3_fill_dummy_f32",
                    &mut scales,
                    seed,
                    i_scales,
                    s,
                    s / 4.0,
                )?;
                QuantWeight::Int8 { values, scales }
            }
            WeightFormat::Int4 { group } => {
                format.validate()?;
                if !cols.is_multiple_of(group) {
                    return Err(Error::invalid_argument(format!(
                        "{what}: group {group} does not divide {cols}"
                    )));
                }
                let ng = rows * (cols / group);
                let mut packed = self.alloc::<u8>(rows * cols / 2, &what)?;
                self.launch_fill_random_bytes(&mut packed, seed, i_values)?;
                let mut scales = self.alloc::<u16>(ng, &what)?;
                let s = 2.0 * unit / 15.0;
                self.launch_fill_dummy(
                    "phi3_fill_dummy_bf16",
                    &mut scales,
                    seed,
                    i_scales,
                    s,
                    s / 4.0,
                )?;
                let mut zeros = self.alloc::<u8>(ng, &what)?;
                self.launch_fill_u8(&mut zeros, 8)?;
                QuantWeight::Int4 { group, packed, scales, scale_type: ScaleType::Bf16, zeros }
            }
        };
        let w = CudaWeight { rows, cols, data: WeightData::Quant(data) };
        self.add_weight_bytes(&w);
        Ok(w)
    }

    /// The quantized tensor held on the device, copied back (checks and tests); `None` for a
    /// weight that is not quantized.
    pub fn quantized_to_host(&self, w: &CudaWeight) -> Result<Option<QuantizedTensor>> {
        let WeightData::Quant(q) = &w.data else { return Ok(None) };
        let data = match q {
            QuantWeight::Int8 { values, scales } => {
                QuantData::Int8 { values: self.dtoh(values)?, scales: self.dtoh(scales)? }
            }
            QuantWeight::Int4 { group, packed, scales, scale_type, zeros } => {
                let bits = self.dtoh(scales)?;
                let scales = match scale_type {
                    ScaleType::Bf16 => {
                        Int4Scales::Bf16(bits.into_iter().map(bf16::from_bits).collect())
                    }
                    ScaleType::F16 => {
                        Int4Scales::F16(bits.into_iter().map(f16::from_bits).collect())
                    }
                };
                QuantData::Int4 {
                    group: *group,
                    packed: self.dtoh(packed)?,
                    scales,
                    zeros: self.dtoh(zeros)?,
                }
            }
        };
        Ok(Some(QuantizedTensor { rows: w.rows, cols: w.cols, data }))
    }

    /// `y[n, m] = x[n, k] @ w^T` for a quantized `w` `[m, k]` (shapes checked by `linear`).
    /// Decode rows take the dequantizing GEMV, up to `QGEMV_TOKENS` per launch (the weight is
    /// read once per launch, and each row is computed as in a solo run whatever its launch
    /// holds); prefill chunks take the dequantize-then-cuBLAS path, one cuBLAS call per chunk.
    pub(crate) fn linear_quant(
        &self,
        x: &CudaAct,
        w: &QuantWeight,
        rows: &LinearRows,
        y: &mut CudaAct,
    ) -> Result<()> {
        let (k, m) = (x.cols, y.cols);
        let decode = rows.decode_rows();
        for r0 in (0..decode).step_by(QGEMV_TOKENS) {
            let nt = QGEMV_TOKENS.min(decode - r0);
            let xv = x.buf.slice(r0 * k..(r0 + nt) * k);
            let mut yv = y.buf.slice_mut(r0 * m..(r0 + nt) * m);
            // One token: the kernel with a third of the registers (gemv_quant.cu); both sum a
            // token the same way.
            let one = nt == 1;
            match w {
                QuantWeight::Int8 { values, scales } => {
                    let name = if one { "phi3_gemv_int8" } else { "phi3_gemv_int8_x8" };
                    self.launch_gemv_int8(name, values, scales, &xv, &mut yv, k, m, nt)?
                }
                QuantWeight::Int4 { group, packed, scales, scale_type, zeros } => {
                    let name = match (scale_type, one) {
                        (ScaleType::Bf16, true) => "phi3_gemv_int4_bf16",
                        (ScaleType::F16, true) => "phi3_gemv_int4_f16",
                        (ScaleType::Bf16, false) => "phi3_gemv_int4_bf16_x8",
                        (ScaleType::F16, false) => "phi3_gemv_int4_f16_x8",
                    };
                    self.launch_gemv_int4(
                        name, packed, scales, zeros, &xv, &mut yv, k, m, *group, nt,
                    )?
                }
            }
        }
        let runs: Vec<(usize, usize)> = rows.prefill_runs().collect();
        if runs.is_empty() {
            return Ok(());
        }
        let xh = self.to_half(x, "phi3_f32_to_bf16")?;
        let block = workspace_rows(m, k);
        let mut guard = self
            .workspace
            .lock()
            .map_err(|_| Error::internal("dequantization workspace poisoned"))?;
        if guard.as_ref().is_none_or(|ws| ws.len() < block * k) {
            // A buffer allocated inside a CUDA graph capture would belong to the graph.
            self.refuse_in_capture("growing the dequantization workspace")?;
            // Drop the old buffer first, so the two never coexist.
            *guard = None;
            let ws = self.alloc::<u16>(block * k, "the dequantization workspace")?;
            self.workspace_bytes.store(2 * ws.len() as u64, Ordering::Relaxed);
            *guard = Some(ws);
        }
        let ws = guard.as_mut().ok_or_else(|| Error::internal("no dequantization workspace"))?;
        let mut row0 = 0;
        while row0 < m {
            let w_rows = block.min(m - row0);
            match w {
                QuantWeight::Int8 { values, scales } => {
                    self.launch_dequant_int8(values, scales, ws, row0, w_rows, k)?
                }
                QuantWeight::Int4 { group, packed, scales, scale_type, zeros } => {
                    let name = match scale_type {
                        ScaleType::Bf16 => "phi3_dequant_int4_bf16",
                        ScaleType::F16 => "phi3_dequant_int4_f16",
                    };
                    self.launch_dequant_int4(
                        name, packed, scales, zeros, ws, row0, w_rows, k, *group,
                    )?
                }
            }
            for &(first, len) in &runs {
                self.blas.gemm_cols(
                    &self.dev.stream,
                    blas::GemmType::Bf16,
                    &xh,
                    ws,
                    &mut y.buf,
                    first..first + len,
                    (k, w_rows),
                    (m, row0),
                )?;
            }
            row0 += w_rows;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Host twins of the kernels' bit tricks (`kernels/gemv_quant.cu`): the same shifts, masks,
    //! magic constants and correction formulas, in the same order, checked against the exact
    //! dequantized dot products. They prove the arithmetic, not the CUDA code (gpu-check does).
    use super::*;

    fn nib15(t: u32) -> f32 {
        f32::from_bits((t & 0x0007_8000) | 0x3f80_0000)
    }
    fn nib19(t: u32) -> f32 {
        f32::from_bits((t & 0x0078_0000) | 0x3f80_0000)
    }

    /// `int4_chunk_dot` of gemv_quant.cu: 32 columns in 16 bytes, x[32], and x's sums over the
    /// chunk's even (`xe`) and odd (`xo`) columns.
    fn int4_chunk_dot(bytes: &[u8], x: &[f32], xe: f32, xo: f32) -> f32 {
        let (mut a15, mut a19) = (0.0f32, 0.0f32);
        for j in 0..4 {
            let w = u32::from_le_bytes([
                bytes[4 * j],
                bytes[4 * j + 1],
                bytes[4 * j + 2],
                bytes[4 * j + 3],
            ]);
            let x8 = &x[8 * j..8 * j + 8];
            for (b, t) in [w << 15, w << 7, w >> 1, w >> 9].into_iter().enumerate() {
                a15 = x8[2 * b].mul_add(nib15(t), a15);
                a19 = x8[2 * b + 1].mul_add(nib19(t), a19);
            }
        }
        256.0f32.mul_add(a15 - xe, 16.0 * (a19 - xo))
    }

    /// `int8_at` of gemv_quant.cu: byte `b` of `wx` (= w ^ 0x80808080) as PRMT 0x7440|b places
    /// it under the exponent of 2^23.
    fn int8_at(wx: u32, b: u32) -> f32 {
        let byte = (wx >> (8 * b)) & 0xff;
        f32::from_bits(0x4b00_0000 | byte) - 8_388_736.0
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            crate::sampler::splitmix64(&mut self.0)
        }
        fn f(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    #[test]
    fn int8_magic_is_exact_for_every_byte() {
        for q in i8::MIN..=i8::MAX {
            let w = u32::from_le_bytes([q as u8, 0, q as u8, 0x7f]);
            let wx = w ^ 0x8080_8080;
            assert_eq!(int8_at(wx, 0), q as f32);
            assert_eq!(int8_at(wx, 2), q as f32);
            assert_eq!(int8_at(wx, 1), 0.0);
            assert_eq!(int8_at(wx, 3), 127.0);
        }
    }

    #[test]
    fn int4_nibble_floats_are_exact() {
        for q in 0..16u32 {
            // Byte 0 = (hi << 4) | lo with lo = q, hi = 15 - q; byte 3 the same.
            let byte = q | ((15 - q) << 4);
            let w = byte | (byte << 24);
            assert_eq!(nib15(w << 15), 1.0 + q as f32 / 256.0);
            assert_eq!(nib19(w << 15), 1.0 + (15 - q) as f32 / 16.0);
            assert_eq!(nib15(w >> 9), 1.0 + q as f32 / 256.0);
            assert_eq!(nib19(w >> 9), 1.0 + (15 - q) as f32 / 16.0);
        }
    }

    /// The whole int4 GEMV arithmetic of one row (scales, zero points, chunks, groups) against
    /// the dequantized f64 dot product: the relative error stays far below gpu-check's 1e-4.
    #[test]
    fn int4_gemv_arithmetic_matches_dequantized_reference() {
        let mut rng = Rng(7);
        for group in INT4_GROUPS {
            for cols in [group, 3 * group, 5120] {
                let w: Vec<f32> = (0..4 * cols).map(|_| rng.f() * 0.05).collect();
                let x: Vec<f32> = (0..cols).map(|_| rng.f() * 3.0).collect();
                let q = QuantizedTensor::from_f32("w", &w, 4, cols, WeightFormat::Int4 { group })
                    .unwrap();
                let QuantData::Int4 { packed, scales, zeros, .. } = &q.data else { panic!() };
                let deq = q.dequantize();
                let ng = cols / group;
                for r in 0..4 {
                    let mut acc = 0.0f32;
                    for c in 0..cols / 32 {
                        let g = c / (group / 32);
                        let xs = &x[32 * c..32 * c + 32];
                        let (xe, xo): (f32, f32) = (0..8).fold((0.0, 0.0), |(e, o), i| {
                            (e + (xs[4 * i] + xs[4 * i + 2]), o + (xs[4 * i + 1] + xs[4 * i + 3]))
                        });
                        let bytes = &packed[r * cols / 2 + 16 * c..r * cols / 2 + 16 * c + 16];
                        let dot = int4_chunk_dot(bytes, xs, xe, xo)
                            - zeros[r * ng + g] as f32 * (xe + xo);
                        acc = scales.get(r * ng + g).mul_add(dot, acc);
                    }
                    let want: f64 = (0..cols).map(|c| x[c] as f64 * deq[r * cols + c] as f64).sum();
                    let mag: f64 =
                        (0..cols).map(|c| (x[c] as f64 * deq[r * cols + c] as f64).abs()).sum();
                    let err = (acc as f64 - want).abs() / mag;
                    assert!(
                        err < 1e-5,
                        "group {group} cols {cols} row {r}: {acc} vs {want} ({err:e})"
                    );
                }
            }
        }
    }

    #[test]
    fn int8_gemv_arithmetic_matches_dequantized_reference() {
        let mut rng = Rng(11);
        let cols = 1024;
        let w: Vec<f32> = (0..cols).map(|_| rng.f()).collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.f() * 3.0).collect();
        let q = QuantizedTensor::from_f32("w", &w, 1, cols, WeightFormat::Int8).unwrap();
        let QuantData::Int8 { values, scales } = &q.data else { panic!() };
        let mut acc = 0.0f32;
        for c in 0..cols / 16 {
            let mut a = 0.0f32;
            for j in 0..4 {
                let at = 16 * c + 4 * j;
                let bytes: Vec<u8> = values[at..at + 4].iter().map(|&v| v as u8).collect();
                let wx = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) ^ 0x8080_8080;
                for b in 0..4 {
                    a = x[at + b as usize].mul_add(int8_at(wx, b), a);
                }
            }
            acc += a;
        }
        let got = scales[0] * acc;
        let deq = q.dequantize();
        let want: f64 = (0..cols).map(|c| x[c] as f64 * deq[c] as f64).sum();
        let mag: f64 = (0..cols).map(|c| (x[c] as f64 * deq[c] as f64).abs()).sum();
        assert!(((got as f64 - want) / mag).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn workspace_blocks_stay_bounded_and_cover_the_weight() {
        // Phi-3-medium projections: qkv, o, gate_up, down; a row wider than the workspace.
        for (rows, cols) in [(7680, 5120), (5120, 5120), (35840, 5120), (5120, 17920), (3, 1 << 25)]
        {
            let block = workspace_rows(rows, cols);
            assert!(block >= 1 && block <= rows);
            assert!(block == 1 || 2 * block * cols <= DEQUANT_WORKSPACE_BYTES, "{rows}x{cols}");
            // Blocks of `block` rows cover all rows.
            assert!(block * rows.div_ceil(block) >= rows);
        }
        assert_eq!(workspace_rows(7680, 5120), 3276);
        assert_eq!(workspace_rows(5120, 17920), 936);
        assert_eq!(workspace_rows(10, 64), 10);
        assert_eq!(workspace_rows(0, 64), 1);
    }

    #[test]
    fn layout_check_rejects_mismatched_buffers() {
        let mut q =
            QuantizedTensor::from_f32("w", &[0.5; 2 * 64], 2, 64, WeightFormat::Int4 { group: 32 })
                .unwrap();
        assert!(check_layout(&q).is_ok());
        if let QuantData::Int4 { zeros, .. } = &mut q.data {
            zeros.pop();
        }
        assert!(check_layout(&q).is_err());
        let mut q =
            QuantizedTensor::from_f32("w", &[0.5; 3 * 7], 3, 7, WeightFormat::Int8).unwrap();
        assert!(check_layout(&q).is_ok());
        q.rows = 4;
        assert!(check_layout(&q).is_err());
    }
}
