//! Weight quantization at load time: int8 with one scale per output row, int4 in groups along a
//! row with a bf16 scale and a zero point per group. Input may be any file dtype (bf16, f16, f32).
//!
//! Quantization is streaming: a tensor is read from its file a few MiB of whole rows at a time
//! (`HostTensor::read_at`), each row is widened to f32 and quantized, and only the quantized
//! result is kept, so the extra host memory during a load is about one quantized tensor plus an
//! 8 MiB read buffer, never the model.
//!
//! # Schemes and layouts (a `phi3 quantize` file format and the CUDA kernels will read these)
//!
//! A weight is `[rows, cols]` = `[out_features, in_features]`, row-major, as in the checkpoint.
//!
//! **int8** ([`QuantData::Int8`]): symmetric, per output row. `scale[r] = max_c |w[r,c]| / 127`
//! (f32), `q[r,c] = round_half_away(w[r,c] / scale[r])` in `[-127, 127]` (-128 is never used, so
//! negation is exact), and `w ≈ scale[r] * q[r,c]`. Element error `|w - w'| <= scale[r] / 2`.
//! The scale is f32, not bf16: it costs 4 bytes per row of thousands of bytes (0.1% at 3072
//! columns) and a bf16 scale would add a relative error of up to 2^-9 to every element of the
//! row, i.e. as much as the int8 rounding itself at the row's largest elements.
//!
//! **int4** ([`QuantData::Int4`]): asymmetric, group-wise along the row, groups of `G` = 32, 64
//! or 128 consecutive columns (`cols % G == 0`). Per group: `lo = min(0, min w)`,
//! `hi = max(0, max w)`, `scale = bf16 rounded *up* from (hi - lo) / 15`,
//! `zero = round(-lo / scale)` in `0..=15`, `q = clamp(round(w / scale) + zero, 0, 15)`, and
//! `w ≈ scale * (q - zero)`. Rounding the scale up keeps the 16 levels spanning `[lo, hi]`, so the
//! element error is `|w - w'| <= scale / 2` with the stored (bf16) scale.
//! Why asymmetric: a group's weights are often lopsided (an outlier on one side); a zero point
//! spends all 16 levels on `[lo, hi]` where a symmetric scheme spends half of them on a side that
//! holds nothing, so the step (and the error) is up to 2x smaller. It costs one byte per group
//! and nothing in the dot product: `Σ x·w = Σ_g scale_g · (Σ x·q - zero_g · Σ_g x)`, and the group
//! sums of `x` are computed once per activation row, not per weight row. It is also the form of
//! AWQ/GPTQ checkpoints (`(q - zero) * scale`), which a later change will load into this layout.
//! - `packed`: `[rows, cols / 2]` bytes. Byte `i` of a row holds column `2i` in its **low** nibble
//!   (bits 0..=3) and column `2i + 1` in its **high** nibble (bits 4..=7), each an unsigned `q`.
//! - `scales`: `[rows, cols / G]` bf16, row-major (group `g` of row `r` at `r * cols / G + g`).
//! - `zeros`: `[rows, cols / G]` u8, same order, each in `0..=15` (one byte each, not packed).
//!
//! Special values: a row (int8) or group (int4) whose largest magnitude is below
//! [`TINY`] is stored as zeros with scale 0 (error at most `TINY`; such weights are numerically
//! absent). NaN or infinite weights are an error naming the tensor, row and column (a scale
//! computed from them would destroy the whole row), as is a group range that overflows f32.
//!
//! Not here: choosing which tensors to quantize (`forward.rs`: the 2-D projections only), the
//! matmul kernels (`backend/cpu/matmul.rs`).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use half::{bf16, f16};
use rayon::prelude::*;

use super::{DType, HostTensor};
use crate::error::{Error, ErrorKind, Result};

/// Group sizes int4 accepts.
pub const INT4_GROUPS: [usize; 3] = [32, 64, 128];
/// The int4 group size of `"int4"`.
pub const DEFAULT_INT4_GROUP: usize = 128;
/// Rows or groups whose largest magnitude is below this are stored as exact zeros.
pub const TINY: f32 = 1e-30;
/// Bytes of whole rows read from the file per step.
const READ_CHUNK_BYTES: usize = 8 << 20;

/// How the projection weights (qkv, o, gate_up, down) are stored by the backend. Embeddings,
/// norms and lm_head always stay in their file dtype.
///
/// Parsing (`str::parse`): "native", "int8", "int4" (group 128), "int4-g32", "int4-g64",
/// "int4-g128"; surrounding whitespace is ignored; anything else is `InvalidArgument`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// The checkpoint's dtype (bf16, f16 or f32), unchanged.
    #[default]
    Native,
    /// int8, one f32 scale per output row.
    Int8,
    /// int4, one bf16 scale and zero point per `group` consecutive input columns.
    Int4 {
        /// Columns per group: 32, 64 or 128.
        group: usize,
    },
}

impl WeightFormat {
    /// `InvalidArgument` unless the format is usable (an int4 group of 32, 64 or 128).
    pub fn validate(self) -> Result<()> {
        match self {
            WeightFormat::Int4 { group } if !INT4_GROUPS.contains(&group) => {
                Err(Error::invalid_argument(format!(
                    "int4 group size {group} is not one of {INT4_GROUPS:?}"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Whether weights are quantized (anything but [`WeightFormat::Native`]).
    pub fn is_quantized(self) -> bool {
        self != WeightFormat::Native
    }

    /// Bytes a `[rows, cols]` weight takes in this format (`dtype` is its file dtype, kept by
    /// `Native`): values, scales and zero points.
    pub fn stored_bytes(self, rows: usize, cols: usize, dtype: DType) -> u64 {
        let (r, c) = (rows as u64, cols as u64);
        match self {
            WeightFormat::Native => r * c * dtype.size() as u64,
            WeightFormat::Int8 => r * c + 4 * r,
            WeightFormat::Int4 { group } => r * c / 2 + 3 * r * (c / group.max(1) as u64),
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightFormat::Native => f.write_str("native"),
            WeightFormat::Int8 => f.write_str("int8"),
            WeightFormat::Int4 { group } => write!(f, "int4-g{group}"),
        }
    }
}

impl FromStr for WeightFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<WeightFormat> {
        let format = match s.trim() {
            "native" => WeightFormat::Native,
            "int8" => WeightFormat::Int8,
            "int4" => WeightFormat::Int4 { group: DEFAULT_INT4_GROUP },
            other => match other.strip_prefix("int4-g").and_then(|g| g.parse::<usize>().ok()) {
                Some(group) if INT4_GROUPS.contains(&group) => WeightFormat::Int4 { group },
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "weights \"{other}\" is not one of \"native\", \"int8\", \"int4\", \
                         \"int4-g32\", \"int4-g64\", \"int4-g128\""
                    )))
                }
            },
        };
        Ok(format)
    }
}

/// A quantized `[rows, cols]` weight (see the module docs for the layouts).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedTensor {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Values, scales and zero points.
    pub data: QuantData,
}

/// The storage of a [`QuantizedTensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum QuantData {
    /// Symmetric int8 per output row.
    Int8 {
        /// `[rows, cols]`, each in `-127..=127`.
        values: Vec<i8>,
        /// `[rows]`, f32: `w = scale * q`.
        scales: Vec<f32>,
    },
    /// Asymmetric int4 per group of `group` columns.
    Int4 {
        /// Columns per group (32, 64 or 128).
        group: usize,
        /// `[rows, cols / 2]`: column `2i` in the low nibble of byte `i`, `2i + 1` in the high.
        packed: Vec<u8>,
        /// `[rows, cols / group]`: `w = scale * (q - zero)`. bf16 when quantized here, f16 when
        /// read from an AWQ/GPTQ checkpoint (kept exact rather than rounded to bf16).
        scales: Int4Scales,
        /// `[rows, cols / group]`, each in `0..=15`.
        zeros: Vec<u8>,
    },
}

/// The per-group scales of an int4 weight, in the dtype they were made in.
#[derive(Clone, Debug, PartialEq)]
pub enum Int4Scales {
    /// Quantized by phi3-rs (rounded up to bf16, see the module docs).
    Bf16(Vec<bf16>),
    /// Read from an AWQ or GPTQ checkpoint, whose scales are f16.
    F16(Vec<f16>),
}

impl Int4Scales {
    /// Number of scales.
    pub fn len(&self) -> usize {
        match self {
            Int4Scales::Bf16(v) => v.len(),
            Int4Scales::F16(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Scale `i` widened to f32 (exact for both dtypes). Panics when `i >= len()`.
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Int4Scales::Bf16(v) => v[i].to_f32(),
            Int4Scales::F16(v) => v[i].to_f32(),
        }
    }

    /// Scales `range` widened to f32 into `out` (same length). Panics when out of range.
    pub fn widen_into(&self, range: std::ops::Range<usize>, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            Int4Scales::Bf16(v) => v[range].convert_to_f32_slice(out),
            Int4Scales::F16(v) => v[range].convert_to_f32_slice(out),
        }
    }

    /// Name of the dtype: "bf16" or "f16".
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Int4Scales::Bf16(_) => "bf16",
            Int4Scales::F16(_) => "f16",
        }
    }
}

/// Where quantization of one row failed (column of a non-finite value, or of an overflow).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowError {
    /// The offending column.
    pub col: usize,
    /// The value there (NaN, ±inf, or a finite value whose group range overflows).
    pub value: f32,
}

impl QuantizedTensor {
    /// Quantize an in-memory `[rows, cols]` f32 matrix (tests, tools). `name` is used in errors.
    ///
    /// Errors: `InvalidArgument` for `Native`, a bad group, `cols` not a multiple of the group
    /// (or odd for int4), or `data.len() != rows * cols`; `ModelFormat` for a non-finite value.
    pub fn from_f32(
        name: &str,
        data: &[f32],
        rows: usize,
        cols: usize,
        format: WeightFormat,
    ) -> Result<QuantizedTensor> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(Error::invalid_argument(format!(
                "{name}: {} values do not make a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        let mut out = QuantizedTensor::alloc(name, rows, cols, format)?;
        out.quantize_rows(name, 0, data)?;
        Ok(out)
    }

    /// Bytes held: values, scales and zero points.
    pub fn byte_len(&self) -> usize {
        match &self.data {
            QuantData::Int8 { values, scales } => values.len() + 4 * scales.len(),
            QuantData::Int4 { packed, scales, zeros, .. } => {
                packed.len() + 2 * scales.len() + zeros.len()
            }
        }
    }

    /// The format this tensor is stored in.
    pub fn format(&self) -> WeightFormat {
        match &self.data {
            QuantData::Int8 { .. } => WeightFormat::Int8,
            QuantData::Int4 { group, .. } => WeightFormat::Int4 { group: *group },
        }
    }

    /// Write row `r`, dequantized, into `out` (`cols` long). Panics when `r >= rows`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.dequantize_columns(r, 0..self.cols, out);
    }

    /// Write columns `range` of row `r`, dequantized, into `out` (`range.len()` long). For int4
    /// the range starts and ends on group boundaries. Panics when `r >= rows` or the range is
    /// out of bounds.
    pub fn dequantize_columns(&self, r: usize, range: Range<usize>, out: &mut [f32]) {
        let c = self.cols;
        match &self.data {
            QuantData::Int8 { values, scales } => {
                let s = scales[r];
                for (o, &q) in out.iter_mut().zip(&values[r * c + range.start..r * c + range.end]) {
                    *o = s * q as f32;
                }
            }
            QuantData::Int4 { group, packed, scales, zeros } => {
                debug_assert!(
                    range.start.is_multiple_of(*group) && range.end.is_multiple_of(*group)
                );
                let ng = c / group;
                let bytes = &packed[(r * c + range.start) / 2..(r * c + range.end) / 2];
                let first = r * ng + range.start / group;
                for (g, (out, bytes)) in
                    out.chunks_exact_mut(*group).zip(bytes.chunks_exact(group / 2)).enumerate()
                {
                    let s = scales.get(first + g);
                    let z = zeros[first + g] as f32;
                    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
                        pair[0] = s * ((b & 15) as f32 - z);
                        pair[1] = s * ((b >> 4) as f32 - z);
                    }
                }
            }
        }
    }

    /// All rows dequantized, `[rows, cols]` f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }

    /// An all-zero tensor of the right sizes, after checking the format against `cols`.
    fn alloc(name: &str, rows: usize, cols: usize, format: WeightFormat) -> Result<Self> {
        let bytes = format.stored_bytes(rows, cols, DType::F32);
        let oom = || {
            Error::new(
                ErrorKind::OutOfMemory,
                format!("{name}: cannot allocate {} MiB for {format} weights", bytes >> 20),
            )
        };
        let data = match format {
            WeightFormat::Native => {
                return Err(Error::invalid_argument(format!(
                    "{name}: \"native\" is not a quantized format"
                )))
            }
            WeightFormat::Int8 => {
                QuantData::Int8 { values: zeroed(rows * cols, oom)?, scales: zeroed(rows, oom)? }
            }
            WeightFormat::Int4 { group } => {
                format.validate().map_err(|e| Error::invalid_argument(format!("{name}: {e}")))?;
                if !cols.is_multiple_of(group) {
                    return Err(Error::invalid_argument(format!(
                        "{name}: int4 group size {group} does not divide the row width {cols} \
                         (try another of {INT4_GROUPS:?}, or int8)"
                    )));
                }
                let ng = rows * (cols / group);
                QuantData::Int4 {
                    group,
                    packed: zeroed(rows * cols / 2, oom)?,
                    scales: Int4Scales::Bf16(zeroed(ng, oom)?),
                    zeros: zeroed(ng, oom)?,
                }
            }
        };
        Ok(QuantizedTensor { rows, cols, data })
    }

    /// Quantize the whole rows in `src` (`[n, cols]` f32) into rows `r0..r0 + n`, in parallel.
    fn quantize_rows(&mut self, name: &str, r0: usize, src: &[f32]) -> Result<()> {
        let cols = self.cols;
        if cols == 0 {
            return Ok(());
        }
        let n = src.len() / cols;
        let fail = |r: usize, e: RowError| row_error(name, r0 + r, e);
        let rows = src.par_chunks_exact(cols);
        match &mut self.data {
            QuantData::Int8 { values, scales } => rows
                .zip(values[r0 * cols..(r0 + n) * cols].par_chunks_exact_mut(cols))
                .zip(&mut scales[r0..r0 + n])
                .enumerate()
                .try_for_each(|(r, ((w, q), s))| {
                    *s = quantize_row_int8(w, q).map_err(|e| fail(r, e))?;
                    Ok(())
                }),
            QuantData::Int4 { scales: Int4Scales::F16(_), .. } => {
                Err(Error::internal(format!("{name}: int4 with f16 scales is read, not quantized")))
            }
            QuantData::Int4 { group, packed, scales: Int4Scales::Bf16(scales), zeros } => {
                let (g, ng) = (*group, cols / *group);
                rows.zip(packed[r0 * cols / 2..(r0 + n) * cols / 2].par_chunks_exact_mut(cols / 2))
                    .zip(scales[r0 * ng..(r0 + n) * ng].par_chunks_exact_mut(ng))
                    .zip(zeros[r0 * ng..(r0 + n) * ng].par_chunks_exact_mut(ng))
                    .enumerate()
                    .try_for_each(|(r, (((w, p), s), z))| {
                        quantize_row_int4(w, g, p, s, z).map_err(|e| fail(r, e))
                    })
            }
        }
    }
}

fn row_error(name: &str, row: usize, e: RowError) -> Error {
    let what = if e.value.is_finite() {
        format!("{} makes a group range that overflows f32", e.value)
    } else {
        format!("is {}", e.value)
    };
    Error::model_format(format!(
        "{name}: element [{row}, {}] {what}: cannot quantize a non-finite weight",
        e.col
    ))
}

fn zeroed<T: Clone + Default>(n: usize, oom: impl Fn() -> Error) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| oom())?;
    v.resize(n, T::default());
    Ok(v)
}

/// Quantize a 2-D `tensor` into `format`, reading it from its file a chunk of rows at a time.
///
/// Errors: `InvalidArgument` (naming the tensor) for `Native`, a tensor that is not 2-D, an int4
/// group that is not 32/64/128 or does not divide the row width; `ModelFormat` for a NaN or
/// infinite weight (naming row and column); `Io` when the file cannot be read; `OutOfMemory`.
pub fn quantize(tensor: &HostTensor, format: WeightFormat) -> Result<QuantizedTensor> {
    let name = format!("{}: {}", tensor.file, tensor.name);
    let [rows, cols] = tensor.shape[..] else {
        return Err(Error::invalid_argument(format!(
            "{name}: only matrices are quantized, got shape {:?}",
            tensor.shape
        )));
    };
    let mut out = QuantizedTensor::alloc(&name, rows, cols, format)?;
    let row_bytes = cols * tensor.dtype.size();
    if row_bytes == 0 || rows == 0 {
        return Ok(out);
    }
    let chunk_rows = (READ_CHUNK_BYTES / row_bytes).clamp(1, rows);
    let mut bytes = vec![0u8; chunk_rows * row_bytes];
    let mut widened = vec![0.0f32; chunk_rows * cols];
    let mut r0 = 0;
    while r0 < rows {
        let n = chunk_rows.min(rows - r0);
        let (bytes, widened) = (&mut bytes[..n * row_bytes], &mut widened[..n * cols]);
        tensor.read_at(r0 * row_bytes, bytes)?;
        widen(tensor.dtype, bytes, widened);
        out.quantize_rows(&name, r0, widened)?;
        r0 += n;
    }
    Ok(out)
}

/// Little-endian `bytes` of `dtype` elements -> f32.
fn widen(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
    }
}

/// The first non-finite element of `w`.
fn check_finite(w: &[f32]) -> std::result::Result<(), RowError> {
    match w.iter().position(|v| !v.is_finite()) {
        Some(col) => Err(RowError { col, value: w[col] }),
        None => Ok(()),
    }
}

/// Quantize one row to int8 (`q.len() == w.len()`); returns the row's scale.
///
/// Errors: the first NaN or infinite element.
pub fn quantize_row_int8(w: &[f32], q: &mut [i8]) -> std::result::Result<f32, RowError> {
    check_finite(w)?;
    let amax = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if amax < TINY {
        q.fill(0);
        return Ok(0.0);
    }
    let mut scale = amax / 127.0;
    if (scale * 127.0).is_infinite() {
        // amax within an ulp of f32::MAX: keep the largest dequantized value finite.
        scale = f32::from_bits(scale.to_bits() - 1);
    }
    for (q, &v) in q.iter_mut().zip(w) {
        *q = (v / scale).round().clamp(-127.0, 127.0) as i8;
    }
    Ok(scale)
}

/// The smallest bf16 >= `x` (x finite and positive).
fn bf16_round_up(x: f32) -> bf16 {
    let b = bf16::from_f32(x);
    if b.to_f32() >= x {
        b
    } else {
        bf16::from_bits(b.to_bits() + 1)
    }
}

/// Quantize one row to int4 groups of `group` (see the module docs): `packed` is `w.len() / 2`
/// bytes, `scales` and `zeros` `w.len() / group` each. `w.len()` must be a multiple of `group`,
/// which must be even.
///
/// Errors: the first NaN or infinite element, or the first element of a group whose 16 levels
/// would not fit f32 (a range `max(0, max) - min(0, min)` within about 1% of `f32::MAX`).
pub fn quantize_row_int4(
    w: &[f32],
    group: usize,
    packed: &mut [u8],
    scales: &mut [bf16],
    zeros: &mut [u8],
) -> std::result::Result<(), RowError> {
    check_finite(w)?;
    let groups = w.chunks_exact(group).zip(packed.chunks_exact_mut(group / 2));
    for (g, (wg, pg)) in groups.enumerate() {
        let lo = wg.iter().fold(0.0f32, |m, &v| m.min(v));
        let hi = wg.iter().fold(0.0f32, |m, &v| m.max(v));
        if hi.max(-lo) < TINY {
            pg.fill(0);
            scales[g] = bf16::ZERO;
            zeros[g] = 0;
            continue;
        }
        let scale = bf16_round_up((hi - lo) / 15.0);
        if !(scale.to_f32() * 15.0).is_finite() {
            return Err(RowError { col: g * group, value: wg[0] });
        }
        let s = scale.to_f32();
        let zero = (-lo / s).round().clamp(0.0, 15.0);
        let level = |v: f32| ((v / s).round() + zero).clamp(0.0, 15.0) as u8;
        for (b, pair) in pg.iter_mut().zip(wg.chunks_exact(2)) {
            *b = level(pair[0]) | (level(pair[1]) << 4);
        }
        scales[g] = scale;
        zeros[g] = zero as u8;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_strings_round_trip() {
        for s in ["native", "int8", "int4-g32", "int4-g64", "int4-g128"] {
            assert_eq!(s.parse::<WeightFormat>().unwrap().to_string(), s);
        }
        assert_eq!(" int4 ".parse::<WeightFormat>().unwrap(), WeightFormat::Int4 { group: 128 });
        for bad in ["", "int4-g16", "int4-g", "int3", "INT8", "int4-g256"] {
            let e = bad.parse::<WeightFormat>().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
        assert!(WeightFormat::Int4 { group: 48 }.validate().is_err());
    }

    #[test]
    fn nibble_order_is_low_first() {
        // Group 32: columns 0..32 = levels 0, 1, ..., 15, 0, 1, ... with lo = 0 -> zero 0.
        let w: Vec<f32> = (0..32).map(|i| (i % 16) as f32).collect();
        let t =
            QuantizedTensor::from_f32("t", &w, 1, 32, WeightFormat::Int4 { group: 32 }).unwrap();
        let QuantData::Int4 { packed, scales, zeros, .. } = &t.data else { panic!() };
        assert_eq!(scales.get(0), 1.0);
        assert_eq!(zeros[0], 0);
        assert_eq!(packed[0], 0x10); // column 0 (level 0) low, column 1 (level 1) high
        assert_eq!(packed[1], 0x32);
        assert_eq!(t.dequantize(), w);
    }

    #[test]
    fn stored_bytes_match_allocation() {
        for format in [WeightFormat::Int8, WeightFormat::Int4 { group: 32 }] {
            let t = QuantizedTensor::from_f32("t", &[0.5; 6 * 64], 6, 64, format).unwrap();
            assert_eq!(t.byte_len() as u64, format.stored_bytes(6, 64, DType::BF16));
        }
    }
}
