//! Already-quantized int4 checkpoints from the Hugging Face hub (AutoAWQ "GEMM" and GPTQ), read
//! into phi3-rs's own int4 layout ([`QuantData::Int4`], see `quant.rs`) without changing a
//! single dequantized value.
//!
//! [`from_config`] reads the `quantization_config` of `config.json` into a [`HubQuant`] (or
//! refuses what cannot be read exactly); [`read_projection`] converts one quantized `nn.Linear`
//! (`{prefix}.qweight`, `.qzeros`, `.scales`, GPTQ's `.g_idx`) into a [`QuantizedTensor`].
//!
//! # The formats (all little-endian int32 words holding eight 4-bit fields; field `k` is bits
//! `4k..4k+3`). `W` is the `[out, in]` weight, `G` the group size, `g = in / G`.
//!
//! **AutoAWQ GEMM** (`casper-hansen/AutoAWQ`, `awq/modules/linear/gemm.py`
//! `WQLinear_GEMM.from_linear`; unpacking `awq/utils/packing_utils.py` `unpack_awq`,
//! `reverse_awq_order`, `dequantize_gemm`):
//! - `qweight` I32 `[in, out / 8]`: word `(i, c)` field `k` holds `q[out = 8c + ORDER[k], in = i]`
//!   with `ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`, so output `8c + j` sits in field
//!   `REVERSE[j]`, `REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]`.
//! - `qzeros` I32 `[g, out / 8]`: the zero of (group, output) in the same interleaved order.
//! - `scales` F16 `[g, out]`.
//! - `W[o, i] = (q - zero) * scale` of group `i / G`. No offset on the zeros.
//!
//! **GPTQ** (`AutoGPTQ/AutoGPTQ`, `auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py`
//! `QuantLinear.pack` / `forward`; `ModelCloud/GPTQModel`, `gptqmodel/nn_modules/qlinear/__init__.py`
//! `PackableQuantLinear.pack_block` / `dequantize_weight`):
//! - `qweight` I32 `[in / 8, out]`: word `(r, o)` field `k` holds `q[o, in = 8r + k]` (packed
//!   along the input dimension, in order). So the four bytes of word `(r, o)` are exactly bytes
//!   `4r..4r + 4` of our packed row `o` (column `2i` low nibble, `2i + 1` high).
//! - `qzeros` I32 `[g, out / 8]`: word `(group, c)` field `k` holds the zero of output `8c + k`.
//! - `scales` F16 `[g, out]`; `g_idx` I32 `[in]`, the group of each input column.
//! - `W[o, i] = scale[g_idx[i], o] * (q - zero[g_idx[i], o])`.
//! - `checkpoint_format` (or `format`) `"gptq"` (v1) stores `zero - 1`; `"gptq_v2"` stores the
//!   zero itself. GPTQModel (`gptqmodel/utils/model.py`, `convert_gptq_v1_to_v2_format_module`)
//!   reads v1 by adding `0x11111111` to each whole int32 word, with carries between fields, and
//!   writes v1 by subtracting it (`convert_gptq_v2_to_v1_format_module`), with borrows. We do
//!   the same (`wrapping_add`), so a zero of 0 (stored as field 15 plus a borrow from the next
//!   field) comes back as 0 and its neighbour unchanged: the exact inverse of GPTQModel's export.
//!   AutoGPTQ's own reader instead adds 1 per field (`(field & 15) + 1`, zeros in 1..=16); the
//!   two readers agree whenever no field is 15, which includes every `sym: true` checkpoint (all
//!   zeros 8, stored 7). A v1 field of 15 only arises from a zero of 0, which AutoGPTQ's packer
//!   cannot write intact (it ORs the unmasked `0xFFFFFFFF` into the word), so GPTQModel's reading
//!   is the only one that reproduces a meaningful weight.
//!
//! Both reference libraries multiply in f16 (`scales` is f16); `(q - zero)` is an integer in
//! `-15..=15`, so the f32 product `scale * (q - zero)` is exact and the references' f16 result
//! is its rounding. [`QuantizedTensor::dequantize`] gives exactly that f32 product, since the f16
//! scales are kept as they are ([`Int4Scales::F16`]). BF16 scales, should a checkpoint have
//! them, are kept as [`Int4Scales::Bf16`], equally exact.
//!
//! # What stays dense
//! In these checkpoints only the decoder layers' `nn.Linear` projections are quantized
//! (`qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`); `embed_tokens`, the RMSNorm weights and
//! `lm_head` stay as ordinary f16 `.weight` tensors (AutoAWQ never quantizes `lm_head`; GPTQModel
//! does only with `"lm_head": true`, reported as `HubQuant::Gptq { lm_head: true, .. }`). AutoAWQ's
//! `modules_to_not_convert` and GPTQModel's `dynamic` `-:` exclusions leave further projections
//! dense: [`is_quantized`] tells, per projection, which kind of tensor the checkpoint holds.
//!
//! Streaming: `qweight` is read a few MiB of file rows at a time and scattered into the packed
//! result, so a conversion holds the result, one read buffer, and the (small) scales and zeros.
//!
//! Not here: choosing per tensor between this and a dense `.weight` (the loader), the matmul.

use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::Value;

use super::quant::{Int4Scales, QuantData, QuantizedTensor, INT4_GROUPS};
use super::{Checkpoint, RawTensor};
use crate::error::{Error, ErrorKind, Result};

/// AutoAWQ GEMM: output `8c + j` of a word is in 4-bit field `AWQ_FIELD_OF[j]`.
const AWQ_FIELD_OF: [u32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];
/// GPTQ v1 stores `zero - 1` in each field; GPTQModel undoes it by adding this to the word.
const GPTQ_V1_ZERO_OFFSET: u32 = 0x1111_1111;
/// Bytes of `qweight` read from the file per step.
const READ_CHUNK_BYTES: usize = 4 << 20;

/// How GPTQ stores its zero points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GptqFormat {
    /// `checkpoint_format: "gptq"`: each stored zero is `zero - 1` (AutoGPTQ, optimum, and
    /// GPTQModel's default export).
    V1,
    /// `checkpoint_format: "gptq_v2"`: zeros stored as they are (GPTQModel).
    V2,
}

/// An int4 hub quantization scheme phi3-rs reads exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HubQuant {
    /// AutoAWQ, `version` (or `format`) `"gemm"`, `zero_point: true`, 4 bits.
    Awq {
        /// Input columns per group: 32, 64 or 128.
        group: usize,
    },
    /// GPTQ (AutoGPTQ / optimum / GPTQModel), 4 bits, int32 packing.
    Gptq {
        /// Input columns per group: 32, 64 or 128.
        group: usize,
        /// Whether stored zeros are offset by one.
        format: GptqFormat,
        /// `"lm_head": true` (GPTQModel): `lm_head` is quantized too (`lm_head.qweight`, ...).
        lm_head: bool,
    },
}

impl HubQuant {
    /// Input columns per group.
    pub fn group(&self) -> usize {
        match *self {
            HubQuant::Awq { group } | HubQuant::Gptq { group, .. } => group,
        }
    }

    /// "AWQ" or "GPTQ", for messages.
    pub fn method_name(&self) -> &'static str {
        match self {
            HubQuant::Awq { .. } => "AWQ",
            HubQuant::Gptq { .. } => "GPTQ",
        }
    }
}

/// Read the `quantization_config` object of a parsed `config.json`.
///
/// Returns `Ok(None)` when there is no `quantization_config` (or it is `null`). Field names and
/// defaults follow transformers' `AwqConfig` / `GPTQConfig` and GPTQModel's `QuantizeConfig`:
/// the method is `quant_method` (or GPTQModel's `method`); AWQ's layout is `version` (or
/// `format`), default `"gemm"`; GPTQ's is `checkpoint_format` (or `format`), default `"gptq"`;
/// `group_size` defaults to 128 and AWQ's `bits` to 4. Ignored because they do not change the
/// stored layout: `sym` (symmetric GPTQ still stores its zeros, all 8), `desc_act` (act-order
/// shows up as a permuted `g_idx`, which [`read_projection`] checks per tensor; with
/// `static_groups` it stays trivial), `static_groups`, `true_sequential`, `damp_percent` and
/// `act_group_aware` (how the weights were chosen, not how they are stored).
///
/// Errors: `Unsupported`, naming the field and value, for a method other than `"awq"` or
/// `"gptq"`, `bits` other than 4, `group_size` -1 or not 32/64/128, an AWQ layout other than
/// GEMM (`"gemv"` and `"gemv_fast"` store `[out, ...]` rows, GEMV_FAST also interleaves rows and
/// stores `-scale * zero` as f16 instead of integer zeros; `"marlin"` permutes tiles and has no
/// zeros; `backend: "llm-awq"` means GEMV_FAST packing), AWQ `zero_point: false`, a GPTQ format
/// other than `"gptq"` / `"gptq_v2"` (e.g. `"marlin"`, `"bitblas"`, `is_marlin_format: true`), a
/// `pack_dtype` other than `"int32"`, or GPTQModel `dynamic` per-module overrides (other than
/// `-:` exclusions). `ModelFormat` when `quantization_config` or one of these fields has the
/// wrong JSON type, or the method is missing.
pub fn from_config(config_json: &Value) -> Result<Option<HubQuant>> {
    let qc = match config_json.get("quantization_config") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(Error::model_format(format!(
                "config.json: quantization_config is {}, expected an object",
                json_kind(other)
            )))
        }
    };
    let field = |name: &str| qc.get(name).filter(|v| !v.is_null());
    let string = |name: &str| -> Result<Option<String>> {
        match field(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.to_ascii_lowercase())),
            Some(v) => Err(bad_type(name, v, "a string")),
        }
    };
    let integer = |name: &str| -> Result<Option<i64>> {
        match field(name) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| bad_type(name, v, "an integer")),
        }
    };
    let boolean = |name: &str| -> Result<Option<bool>> {
        match field(name) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| bad_type(name, v, "a boolean")),
        }
    };

    let method = match (string("quant_method")?, string("method")?) {
        (Some(m), _) | (None, Some(m)) => m,
        (None, None) => {
            return Err(Error::model_format("config.json: quantization_config has no quant_method"))
        }
    };
    let unsupported = |what: String| Err(Error::unsupported(format!("config.json: {what}")));
    let awq = match method.as_str() {
        "awq" => true,
        "gptq" => false,
        other => {
            return unsupported(format!(
                "quantization_config.quant_method = \"{other}\": only \"awq\" (GEMM) and \
                 \"gptq\" int4 checkpoints can be read"
            ))
        }
    };

    let bits = match integer("bits")? {
        Some(b) => b,
        None if awq => 4,
        None => return Err(Error::model_format("config.json: quantization_config has no bits")),
    };
    if bits != 4 {
        return unsupported(format!(
            "quantization_config.bits = {bits}: only 4-bit {} checkpoints can be read",
            method.to_ascii_uppercase()
        ));
    }
    let group = integer("group_size")?.unwrap_or(128);
    let group = match usize::try_from(group) {
        Ok(g) if INT4_GROUPS.contains(&g) => g,
        _ => {
            return unsupported(format!(
                "quantization_config.group_size = {group}: only groups of {INT4_GROUPS:?} \
                 input columns can be read (-1, one group per row, is not supported)"
            ))
        }
    };
    if let Some(p) = string("pack_dtype")? {
        if p != "int32" && p != "torch.int32" {
            return unsupported(format!(
                "quantization_config.pack_dtype = \"{p}\": only int32 packing can be read"
            ));
        }
    }

    if awq {
        let layout = match (string("version")?, string("format")?) {
            (Some(v), _) | (None, Some(v)) => v,
            (None, None) => "gemm".to_string(),
        };
        if layout != "gemm" {
            let why = match layout.as_str() {
                "gemv" => "GEMV stores qweight as [out, in / 8] rows with padded zeros and scales",
                "gemv_fast" | "llm-awq" => {
                    "GEMV_FAST interleaves rows into int16 words and stores -scale * zero as f16 \
                     instead of integer zeros"
                }
                "marlin" => "Marlin permutes 16x16 tiles and is symmetric, without qzeros",
                _ => "only the GEMM layout can be read",
            };
            return unsupported(format!("quantization_config.version = \"{layout}\": {why}"));
        }
        if string("backend")?.as_deref() == Some("llm-awq") {
            return unsupported(
                "quantization_config.backend = \"llm-awq\": llm-awq checkpoints use the \
                 GEMV_FAST packing; only AutoAWQ GEMM can be read"
                    .to_string(),
            );
        }
        if boolean("zero_point")? == Some(false) {
            return unsupported(
                "quantization_config.zero_point = false: only AWQ with zero points (GEMM) can \
                 be read"
                    .to_string(),
            );
        }
        return Ok(Some(HubQuant::Awq { group }));
    }

    if boolean("is_marlin_format")? == Some(true) {
        return unsupported(
            "quantization_config.is_marlin_format = true: Marlin-repacked GPTQ cannot be read"
                .to_string(),
        );
    }
    let format = match (string("checkpoint_format")?, string("format")?) {
        (Some(f), _) | (None, Some(f)) => f,
        (None, None) => "gptq".to_string(),
    };
    let format = match format.as_str() {
        "gptq" => GptqFormat::V1,
        "gptq_v2" => GptqFormat::V2,
        other => {
            return unsupported(format!(
                "quantization_config.checkpoint_format = \"{other}\": only \"gptq\" and \
                 \"gptq_v2\" can be read"
            ))
        }
    };
    match field("dynamic") {
        None => {}
        Some(Value::Object(rules)) => {
            if let Some(rule) = rules.keys().find(|k| !k.starts_with("-:")) {
                return unsupported(format!(
                    "quantization_config.dynamic has the per-module override \"{rule}\": only \
                     one bits/group_size for every module (and \"-:\" exclusions) can be read"
                ));
            }
        }
        Some(v) => return Err(bad_type("dynamic", v, "an object")),
    }
    let lm_head = boolean("lm_head")?.unwrap_or(false);
    // Type-check the flags we deliberately ignore, so a malformed config is still caught.
    for name in ["desc_act", "sym", "static_groups", "true_sequential"] {
        boolean(name)?;
    }
    Ok(Some(HubQuant::Gptq { group, format, lm_head }))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn bad_type(name: &str, v: &Value, expected: &str) -> Error {
    Error::model_format(format!(
        "config.json: quantization_config.{name} is {} ({v}), expected {expected}",
        json_kind(v)
    ))
}

/// Whether the checkpoint holds the projection `prefix` (e.g.
/// `"model.layers.0.self_attn.qkv_proj"`) quantized, i.e. has `{prefix}.qweight`; if not, it is
/// an ordinary `{prefix}.weight`.
pub fn is_quantized(ckpt: &Checkpoint, prefix: &str) -> bool {
    ckpt.get_raw(&format!("{prefix}.qweight")).is_some()
}

/// Read the quantized projection `prefix` (e.g. `"model.layers.0.self_attn.qkv_proj"`) of a
/// `scheme` checkpoint, `[rows, cols]` = `[out_features, in_features]`, into phi3-rs's int4
/// layout with the checkpoint's own scales (see the module docs for the formats).
///
/// Cost: one pass over `qweight`, read 4 MiB at a time (about 0.25 s for a 17920x5120
/// projection on two cores); holds the result (`rows * cols / 2` bytes plus 3 bytes per group),
/// one read buffer and the file's scales and zeros.
///
/// Errors: `ModelFormat`, naming the file and tensor, when `.qweight`, `.qzeros` or `.scales` is
/// missing or has the wrong dtype or shape, or `.g_idx` the wrong dtype, shape or an
/// out-of-range value; `Unsupported` when `.g_idx` is not the trivial `i / group` (act-order
/// without static groups: the input columns are permuted) or `rows` is not a multiple of 8 or
/// `cols` of the group; `Io` when a file cannot be read; `OutOfMemory`.
pub fn read_projection(
    ckpt: &Checkpoint,
    scheme: &HubQuant,
    prefix: &str,
    rows: usize,
    cols: usize,
) -> Result<QuantizedTensor> {
    read_projection_from(&|name: &str| ckpt.get_raw(name), scheme, prefix, rows, cols)
}

/// [`read_projection`] over any tensor source (a checkpoint, or in-memory tensors in tests).
fn read_projection_from(
    get: &dyn Fn(&str) -> Option<RawTensor>,
    scheme: &HubQuant,
    prefix: &str,
    rows: usize,
    cols: usize,
) -> Result<QuantizedTensor> {
    let group = scheme.group();
    if !INT4_GROUPS.contains(&group) {
        return Err(Error::invalid_argument(format!(
            "{prefix}: group size {group} is not one of {INT4_GROUPS:?}"
        )));
    }
    if rows == 0 || !rows.is_multiple_of(8) || cols == 0 || !cols.is_multiple_of(group) {
        return Err(Error::unsupported(format!(
            "{prefix}: a [{rows}, {cols}] weight cannot be stored as {} int4 with groups of \
             {group} (out_features must be a positive multiple of 8, in_features of {group})",
            scheme.method_name()
        )));
    }
    let fetch = |suffix: &str| {
        get(&format!("{prefix}.{suffix}")).ok_or_else(|| {
            Error::model_format(format!(
                "{prefix}.{suffix} is missing from the {} checkpoint",
                scheme.method_name()
            ))
        })
    };
    let ng = cols / group;
    let qweight = fetch("qweight")?;
    let qzeros = fetch("qzeros")?;
    let scales = fetch("scales")?;
    let qweight_shape = match scheme {
        HubQuant::Awq { .. } => [cols, rows / 8],
        HubQuant::Gptq { .. } => [cols / 8, rows],
    };
    qweight.expect("I32", &qweight_shape)?;
    qzeros.expect("I32", &[ng, rows / 8])?;
    if scales.dtype != "BF16" {
        scales.expect("F16", &[ng, rows])?;
    } else {
        scales.expect("BF16", &[ng, rows])?;
    }
    if let HubQuant::Gptq { .. } = scheme {
        if let Some(g_idx) = get(&format!("{prefix}.g_idx")) {
            check_trivial_g_idx(&g_idx, group, cols)?;
        }
    }

    let zeros = convert_zeros(&qzeros, scheme, rows, ng)?;
    let scales = convert_scales(&scales, rows, ng)?;
    let packed = convert_qweight(&qweight, scheme, rows, cols)?;
    Ok(QuantizedTensor { rows, cols, data: QuantData::Int4 { group, packed, scales, zeros } })
}

/// `Unsupported` unless `g_idx[i] == i / group` for every input column.
fn check_trivial_g_idx(g_idx: &RawTensor, group: usize, cols: usize) -> Result<()> {
    let size = match g_idx.dtype.as_str() {
        "I32" => 4,
        "I64" => 8,
        _ => 0,
    };
    if size == 0 || g_idx.shape != [cols] {
        return Err(Error::model_format(format!(
            "{}: {}: {} {:?}, expected I32 [{cols}]",
            g_idx.file, g_idx.name, g_idx.dtype, g_idx.shape
        )));
    }
    let bytes = g_idx.read_vec()?;
    for (i, b) in bytes.chunks_exact(size).enumerate() {
        let v = match b {
            [a, b, c, d] => i32::from_le_bytes([*a, *b, *c, *d]) as i64,
            _ => i64::from_le_bytes(b.try_into().unwrap_or([0xff; 8])),
        };
        if v != (i / group) as i64 {
            let why = if (0..(cols / group) as i64).contains(&v) {
                ErrorKind::Unsupported
            } else {
                ErrorKind::ModelFormat
            };
            return Err(Error::new(
                why,
                format!(
                    "{}: {}: g_idx[{i}] = {v}, expected {}: act-order (desc_act without \
                     static_groups) permutes the input columns among the groups, which the int4 \
                     layout of phi3-rs cannot hold",
                    g_idx.file,
                    g_idx.name,
                    i / group
                ),
            ));
        }
    }
    Ok(())
}

fn word(bytes: &[u8], index: usize) -> u32 {
    let b = &bytes[4 * index..4 * index + 4];
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// A vector of `n` zeros, or `OutOfMemory` naming `what`.
fn alloc<T: Clone + Default>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::new(
            ErrorKind::OutOfMemory,
            format!("{what}: cannot allocate {} bytes", n * std::mem::size_of::<T>()),
        )
    })?;
    v.resize(n, T::default());
    Ok(v)
}

/// `qzeros` `[ng, rows / 8]` -> our zeros `[rows, ng]`, each `0..=15`.
fn convert_zeros(qzeros: &RawTensor, scheme: &HubQuant, rows: usize, ng: usize) -> Result<Vec<u8>> {
    let bytes = qzeros.read_vec()?;
    let mut zeros = alloc::<u8>(rows * ng, &qzeros.name)?;
    let words_per_group = rows / 8;
    for g in 0..ng {
        for c in 0..words_per_group {
            let mut w = word(&bytes, g * words_per_group + c);
            if let HubQuant::Gptq { format: GptqFormat::V1, .. } = scheme {
                w = w.wrapping_add(GPTQ_V1_ZERO_OFFSET);
            }
            for j in 0..8 {
                let field = match scheme {
                    HubQuant::Awq { .. } => AWQ_FIELD_OF[j],
                    HubQuant::Gptq { .. } => j as u32,
                };
                zeros[(8 * c + j) * ng + g] = ((w >> (4 * field)) & 15) as u8;
            }
        }
    }
    Ok(zeros)
}

/// `scales` `[ng, rows]` (F16 or BF16) -> our scales `[rows, ng]`, same dtype, bits unchanged.
fn convert_scales(scales: &RawTensor, rows: usize, ng: usize) -> Result<Int4Scales> {
    let bytes = scales.read_vec()?;
    let mut bits = alloc::<u16>(rows * ng, &scales.name)?;
    for g in 0..ng {
        for o in 0..rows {
            let i = 2 * (g * rows + o);
            bits[o * ng + g] = u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        }
    }
    Ok(if scales.dtype == "BF16" {
        Int4Scales::Bf16(bits.into_iter().map(bf16::from_bits).collect())
    } else {
        Int4Scales::F16(bits.into_iter().map(f16::from_bits).collect())
    })
}

/// `qweight` -> our packed `[rows, cols / 2]`, reading the file a chunk of rows at a time.
fn convert_qweight(
    qweight: &RawTensor,
    scheme: &HubQuant,
    rows: usize,
    cols: usize,
) -> Result<Vec<u8>> {
    let row_bytes = cols / 2;
    let mut packed = alloc::<u8>(rows * row_bytes, &qweight.name)?;
    // File rows: AWQ one input column each (`rows / 8` words), GPTQ eight (`rows` words).
    let (file_rows, file_row_bytes, step) = match scheme {
        HubQuant::Awq { .. } => (cols, rows / 2, 2), // whole output bytes need pairs of columns
        HubQuant::Gptq { .. } => (cols / 8, rows * 4, 1),
    };
    let chunk_rows = (READ_CHUNK_BYTES / file_row_bytes).max(step) / step * step;
    let mut buf = alloc::<u8>(chunk_rows.min(file_rows) * file_row_bytes, &qweight.name)?;
    let mut r0 = 0;
    while r0 < file_rows {
        let n = chunk_rows.min(file_rows - r0);
        let bytes = &mut buf[..n * file_row_bytes];
        qweight.read_at(r0 * file_row_bytes, bytes)?;
        let bytes = &*bytes;
        // Each task takes 8 output rows, so the words it reads are adjacent (AWQ: one word
        // holds all 8; GPTQ: 8 consecutive words) and each is read once.
        match scheme {
            HubQuant::Awq { .. } => {
                // File rows r0..r0 + n are input columns r0..r0 + n: bytes r0/2..(r0 + n)/2 of
                // every output row.
                let words_per_row = rows / 8;
                packed.par_chunks_exact_mut(8 * row_bytes).enumerate().for_each(|(c, block)| {
                    for p in 0..n / 2 {
                        let lo = word(bytes, 2 * p * words_per_row + c);
                        let hi = word(bytes, (2 * p + 1) * words_per_row + c);
                        for (j, &field) in AWQ_FIELD_OF.iter().enumerate() {
                            let (l, h) = ((lo >> (4 * field)) & 15, (hi >> (4 * field)) & 15);
                            block[j * row_bytes + r0 / 2 + p] = (l | (h << 4)) as u8;
                        }
                    }
                });
            }
            HubQuant::Gptq { .. } => {
                // Word (r, o) is, byte for byte, bytes 4r..4r + 4 of output row o.
                packed.par_chunks_exact_mut(8 * row_bytes).enumerate().for_each(|(t, block)| {
                    for r in 0..n {
                        let at = 4 * (r * rows + 8 * t);
                        let words = &bytes[at..at + 32];
                        for (j, w) in words.chunks_exact(4).enumerate() {
                            let d = j * row_bytes + 4 * (r0 + r);
                            block[d..d + 4].copy_from_slice(w);
                        }
                    }
                });
            }
        }
        r0 += n;
    }
    Ok(packed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(q: Value) -> Value {
        json!({ "model_type": "phi3", "quantization_config": q })
    }

    fn kind_of(q: Value) -> ErrorKind {
        from_config(&cfg(q)).unwrap_err().kind()
    }

    #[test]
    fn config_without_quantization_is_none() {
        assert_eq!(from_config(&json!({ "model_type": "phi3" })).unwrap(), None);
        assert_eq!(from_config(&cfg(Value::Null)).unwrap(), None);
    }

    #[test]
    fn config_reads_autoawq_and_gptq() {
        // What AutoAWQ's AwqConfig.to_transformers_dict writes.
        let awq = json!({ "quant_method": "awq", "zero_point": true, "group_size": 128,
                          "bits": 4, "version": "gemm", "modules_to_not_convert": null });
        assert_eq!(from_config(&cfg(awq)).unwrap(), Some(HubQuant::Awq { group: 128 }));
        let awq = json!({ "quant_method": "awq", "group_size": 64, "version": "GEMM" });
        assert_eq!(from_config(&cfg(awq)).unwrap(), Some(HubQuant::Awq { group: 64 }));
        // AutoGPTQ / optimum.
        let gptq = json!({ "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": true,
                           "static_groups": false, "sym": true, "true_sequential": true,
                           "damp_percent": 0.01 });
        assert_eq!(
            from_config(&cfg(gptq)).unwrap(),
            Some(HubQuant::Gptq { group: 32, format: GptqFormat::V1, lm_head: false })
        );
        // GPTQModel.
        let gptq = json!({ "method": "gptq", "bits": 4, "group_size": 128, "format": "gptq_v2",
                           "lm_head": true, "pack_dtype": "int32", "dynamic": { "-:.*down": {} },
                           "meta": { "quantizer": ["gptqmodel:2.0"] } });
        assert_eq!(
            from_config(&cfg(gptq)).unwrap(),
            Some(HubQuant::Gptq { group: 128, format: GptqFormat::V2, lm_head: true })
        );
        let gptq = json!({ "quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq" });
        assert_eq!(from_config(&cfg(gptq)).unwrap().map(|q| q.group()), Some(128));
    }

    #[test]
    fn config_refuses_what_cannot_be_read_exactly() {
        let cases = [
            (json!({ "quant_method": "gptq", "bits": 8, "group_size": 128 }), "bits = 8"),
            (json!({ "quant_method": "awq", "bits": 3 }), "bits = 3"),
            (json!({ "quant_method": "gptq", "bits": 4, "group_size": -1 }), "group_size = -1"),
            (json!({ "quant_method": "awq", "group_size": 16 }), "group_size = 16"),
            (json!({ "quant_method": "awq", "version": "gemv" }), "version = \"gemv\""),
            (json!({ "quant_method": "awq", "version": "gemv_fast" }), "\"gemv_fast\""),
            (json!({ "quant_method": "awq", "format": "marlin" }), "\"marlin\""),
            (json!({ "quant_method": "awq", "backend": "llm-awq" }), "backend = \"llm-awq\""),
            (json!({ "quant_method": "awq", "zero_point": false }), "zero_point = false"),
            (json!({ "quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin" }), "marlin"),
            (json!({ "quant_method": "gptq", "bits": 4, "is_marlin_format": true }), "marlin"),
            (json!({ "quant_method": "gptq", "bits": 4, "pack_dtype": "int16" }), "pack_dtype"),
            (
                json!({ "quant_method": "gptq", "bits": 4, "dynamic": { "+:.*down": { "bits": 8 } } }),
                "dynamic",
            ),
            (json!({ "quant_method": "bitsandbytes" }), "\"bitsandbytes\""),
            (json!({ "quant_method": "fp8" }), "quant_method = \"fp8\""),
        ];
        for (q, needle) in cases {
            let e = from_config(&cfg(q.clone())).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{q}");
            assert!(e.message().contains(needle), "{q}: {}", e.message());
        }
    }

    #[test]
    fn config_malformed_is_model_format() {
        assert_eq!(kind_of(json!("awq")), ErrorKind::ModelFormat);
        assert_eq!(kind_of(json!({ "bits": 4 })), ErrorKind::ModelFormat);
        assert_eq!(kind_of(json!({ "quant_method": 4 })), ErrorKind::ModelFormat);
        assert_eq!(kind_of(json!({ "quant_method": "gptq" })), ErrorKind::ModelFormat);
        assert_eq!(kind_of(json!({ "quant_method": "gptq", "bits": "4" })), ErrorKind::ModelFormat);
        let e = from_config(&cfg(json!({ "quant_method": "awq", "group_size": 1.5 }))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        assert!(e.message().contains("group_size"), "{}", e.message());
        let e = from_config(&cfg(json!({ "quant_method": "gptq", "bits": 4, "desc_act": "yes" })))
            .unwrap_err();
        assert!(e.message().contains("desc_act"), "{}", e.message());
    }

    // ---- read_projection on in-memory tensors -------------------------------------------

    /// A random int4 weight: levels `[rows, cols]`, zeros and f16 scales `[rows, cols / group]`.
    struct Plain {
        rows: usize,
        cols: usize,
        group: usize,
        q: Vec<u8>,
        zeros: Vec<u8>,
        scales: Vec<f16>,
    }

    impl Plain {
        fn random(rows: usize, cols: usize, group: usize, seed: u64) -> Plain {
            let mut s = seed;
            let mut next = move || crate::sampler::splitmix64(&mut s);
            let ng = cols / group;
            let q = (0..rows * cols).map(|_| (next() % 16) as u8).collect();
            let zeros = (0..rows * ng).map(|_| (next() % 16) as u8).collect();
            let scales =
                (0..rows * ng).map(|_| f16::from_f32((next() % 1000) as f32 / 4096.0)).collect();
            Plain { rows, cols, group, q, zeros, scales }
        }

        fn expected(&self) -> Vec<f32> {
            let ng = self.cols / self.group;
            (0..self.rows * self.cols)
                .map(|k| {
                    let (o, i) = (k / self.cols, k % self.cols);
                    let g = o * ng + i / self.group;
                    self.scales[g].to_f32() * (self.q[k] as f32 - self.zeros[g] as f32)
                })
                .collect()
        }

        /// Pack as GPTQ: qweight [in/8, out], qzeros [ng, out/8] (v1: minus 0x11111111 per word).
        fn gptq(&self, v1: bool) -> Vec<(String, RawTensor)> {
            let (r, c, ng) = (self.rows, self.cols, self.cols / self.group);
            let mut qweight = vec![0u32; c / 8 * r];
            for o in 0..r {
                for i in 0..c {
                    qweight[(i / 8) * r + o] |= (self.q[o * c + i] as u32) << (4 * (i % 8));
                }
            }
            let mut qzeros = vec![0u32; ng * r / 8];
            for o in 0..r {
                for g in 0..ng {
                    qzeros[g * r / 8 + o / 8] |= (self.zeros[o * ng + g] as u32) << (4 * (o % 8));
                }
            }
            if v1 {
                qzeros.iter_mut().for_each(|w| *w = w.wrapping_sub(GPTQ_V1_ZERO_OFFSET));
            }
            let g_idx: Vec<u32> = (0..c).map(|i| (i / self.group) as u32).collect();
            vec![
                tensor("p.qweight", "I32", vec![c / 8, r], &qweight),
                tensor("p.qzeros", "I32", vec![ng, r / 8], &qzeros),
                self.scales_tensor(),
                tensor("p.g_idx", "I32", vec![c], &g_idx),
            ]
        }

        /// Pack as AutoAWQ GEMM: qweight [in, out/8], qzeros [ng, out/8], interleaved.
        fn awq(&self) -> Vec<(String, RawTensor)> {
            const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
            let (r, c, ng) = (self.rows, self.cols, self.cols / self.group);
            let mut qweight = vec![0u32; c * r / 8];
            let mut qzeros = vec![0u32; ng * r / 8];
            for w in 0..r / 8 {
                for (k, &j) in ORDER.iter().enumerate() {
                    let o = 8 * w + j;
                    for i in 0..c {
                        qweight[i * r / 8 + w] |= (self.q[o * c + i] as u32) << (4 * k);
                    }
                    for g in 0..ng {
                        qzeros[g * r / 8 + w] |= (self.zeros[o * ng + g] as u32) << (4 * k);
                    }
                }
            }
            vec![
                tensor("p.qweight", "I32", vec![c, r / 8], &qweight),
                tensor("p.qzeros", "I32", vec![ng, r / 8], &qzeros),
                self.scales_tensor(),
            ]
        }

        fn scales_tensor(&self) -> (String, RawTensor) {
            let (r, ng) = (self.rows, self.cols / self.group);
            let mut t = vec![0u16; ng * r];
            for o in 0..r {
                for g in 0..ng {
                    t[g * r + o] = self.scales[o * ng + g].to_bits();
                }
            }
            let bytes = t.iter().flat_map(|v| v.to_le_bytes()).collect();
            let raw = RawTensor::from_bytes("p.scales", "F16", vec![ng, r], bytes).unwrap();
            ("p.scales".to_string(), raw)
        }
    }

    fn tensor(name: &str, dtype: &str, shape: Vec<usize>, words: &[u32]) -> (String, RawTensor) {
        let bytes = words.iter().flat_map(|v| v.to_le_bytes()).collect();
        (name.to_string(), RawTensor::from_bytes(name, dtype, shape, bytes).unwrap())
    }

    fn read(
        tensors: &[(String, RawTensor)],
        scheme: HubQuant,
        rows: usize,
        cols: usize,
    ) -> Result<QuantizedTensor> {
        let get = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone());
        read_projection_from(&get, &scheme, "p", rows, cols)
    }

    fn gptq(group: usize, format: GptqFormat) -> HubQuant {
        HubQuant::Gptq { group, format, lm_head: false }
    }

    #[test]
    fn round_trips_every_layout_exactly() {
        for (rows, cols, group, seed) in [(16, 64, 32, 1), (24, 128, 64, 2), (8, 256, 128, 3)] {
            let plain = Plain::random(rows, cols, group, seed);
            let want = plain.expected();
            let awq = read(&plain.awq(), HubQuant::Awq { group }, rows, cols).unwrap();
            assert_eq!(awq.dequantize(), want, "awq {rows}x{cols}/{group}");
            for (v1, format) in [(true, GptqFormat::V1), (false, GptqFormat::V2)] {
                let t = read(&plain.gptq(v1), gptq(group, format), rows, cols).unwrap();
                assert_eq!(t.dequantize(), want, "gptq {format:?} {rows}x{cols}/{group}");
                let QuantData::Int4 { zeros, scales, .. } = &t.data else { panic!() };
                assert_eq!(zeros, &plain.zeros);
                assert_eq!(scales, &Int4Scales::F16(plain.scales.clone()));
            }
        }
    }

    #[test]
    fn gptq_v1_zero_of_zero_wraps_like_gptqmodel() {
        // Zeros 0 and 15 next to each other: v1 stores field 15 and borrows from the next field.
        let mut plain = Plain::random(8, 32, 32, 9);
        plain.zeros = vec![0, 15, 0, 0, 15, 15, 0, 1];
        let files = plain.gptq(true);
        let t = read(&files, gptq(32, GptqFormat::V1), 8, 32).unwrap();
        let QuantData::Int4 { zeros, .. } = &t.data else { panic!() };
        assert_eq!(zeros, &plain.zeros);
        assert_eq!(t.dequantize(), plain.expected());
    }

    #[test]
    fn wrong_shapes_and_dtypes_name_the_tensor() {
        let plain = Plain::random(16, 64, 32, 4);
        let files = plain.awq();
        // Read as GPTQ: qweight has the AWQ shape [64, 2], GPTQ expects [8, 16].
        let e = read(&files, gptq(32, GptqFormat::V2), 16, 64).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        assert!(e.message().contains("p.qweight") && e.message().contains("[8, 16]"), "{e}");
        // Wrong group: qzeros [2, 2] where group 64 needs [1, 2].
        let e = read(&files, HubQuant::Awq { group: 64 }, 16, 64).unwrap_err();
        assert!(e.message().contains("p.qzeros"), "{e}");
        // Scales stored as f32.
        let mut bad = files.clone();
        bad[2].1 = RawTensor::from_bytes("p.scales", "F32", vec![2, 16], vec![0; 128]).unwrap();
        let e = read(&bad, HubQuant::Awq { group: 32 }, 16, 64).unwrap_err();
        assert!(e.message().contains("p.scales") && e.message().contains("F32"), "{e}");
        // Missing qzeros.
        let e = read(&files[..1], HubQuant::Awq { group: 32 }, 16, 64).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
        assert!(e.message().contains("p.qzeros is missing"), "{e}");
        // Out features not a multiple of 8.
        let e = read(&files, HubQuant::Awq { group: 32 }, 12, 64).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn act_order_g_idx_is_refused() {
        let plain = Plain::random(16, 64, 32, 5);
        let mut files = plain.gptq(false);
        // Columns 0 and 32 swapped between the two groups, as desc_act without static_groups does.
        let mut g_idx: Vec<u32> = (0..64).map(|i| i / 32).collect();
        g_idx.swap(0, 32);
        files[3] = tensor("p.g_idx", "I32", vec![64], &g_idx);
        let e = read(&files, gptq(32, GptqFormat::V2), 16, 64).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("p.g_idx") && e.message().contains("g_idx[0] = 1"), "{e}");
        // Without g_idx the grouping is the trivial one.
        files.truncate(3);
        assert_eq!(
            read(&files, gptq(32, GptqFormat::V2), 16, 64).unwrap().dequantize(),
            plain.expected()
        );
        // An I64 trivial g_idx is accepted; a group index out of range is malformed.
        let trivial: Vec<u8> = (0..64u64).flat_map(|i| (i / 32).to_le_bytes()).collect();
        let t = RawTensor::from_bytes("p.g_idx", "I64", vec![64], trivial).unwrap();
        files.push(("p.g_idx".into(), t));
        assert!(read(&files, gptq(32, GptqFormat::V2), 16, 64).is_ok());
        files[3] = tensor("p.g_idx", "I32", vec![64], &[7; 64]);
        let e = read(&files, gptq(32, GptqFormat::V2), 16, 64).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
    }
}
