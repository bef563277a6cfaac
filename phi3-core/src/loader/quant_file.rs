//! The phi3-rs quantized model folder: what `phi3 quantize` writes and the loader reads back
//! without quantizing again.
//!
//! A Hugging Face folder whose `config.json` carries
//! `"quantization_config": {"quant_method": "phi3-rs", "weights": "<format>", "version": 1}`
//! (`<format>` as [`WeightFormat`]'s `Display`: "int8", "int4-g32", "int4-g64", "int4-g128").
//! Every tensor but the decoder projections is copied unchanged. Each projection
//! `<prefix>.weight` (`[rows, cols]`, e.g. `model.layers.0.mlp.down_proj.weight`) is replaced by
//! the arrays of [`QuantizedTensor`] in the layouts of `quant.rs`, under these names:
//!
//! | format | `<prefix>.qweight`    | `<prefix>.scales`        | `<prefix>.qzeros`      |
//! |--------|-----------------------|--------------------------|------------------------|
//! | int8   | I8 `[rows, cols]`     | F32 `[rows]`             | (none)                 |
//! | int4   | U8 `[rows, cols / 2]` | BF16 `[rows, cols / g]`  | U8 `[rows, cols / g]`  |
//!
//! The names deliberately differ in dtype from AWQ/GPTQ (whose `qweight` is I32), and the
//! `quant_method` tells them apart before any tensor is read. Transformers refuses the folder
//! (unknown `quant_method`), which is right: it cannot run these layouts.

use half::bf16;
use serde_json::Value;

use super::quant::{Int4Scales, QuantData, QuantizedTensor, WeightFormat};
use super::RawTensor;
use crate::error::{Error, Result};

/// `quantization_config.quant_method` of a phi3-rs quantized folder.
pub const QUANT_METHOD: &str = "phi3-rs";
/// `quantization_config.version` this code writes and reads.
pub const VERSION: u64 = 1;

/// The `quantization_config` object written into config.json for `format`.
pub fn config_entry(format: WeightFormat) -> Value {
    serde_json::json!({
        "quant_method": QUANT_METHOD,
        "weights": format.to_string(),
        "version": VERSION,
    })
}

/// The weight format of a `quantization_config` whose `quant_method` is "phi3-rs".
///
/// Errors: `ModelFormat` for a missing or unparsable `weights` or `version`; `Unsupported` for a
/// version other than [`VERSION`] (a newer writer).
pub fn parse_config_entry(entry: &Value) -> Result<WeightFormat> {
    let bad = |what: &str| Error::model_format(format!("config.json: quantization_config: {what}"));
    let version = entry.get("version").and_then(Value::as_u64).ok_or_else(|| {
        bad("\"version\" is missing or not an integer (phi3-rs quantized folders have 1)")
    })?;
    if version != VERSION {
        return Err(Error::unsupported(format!(
            "config.json: phi3-rs quantized folder version {version}; this build reads version \
             {VERSION}"
        )));
    }
    let weights = entry
        .get("weights")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("\"weights\" is missing or not a string"))?;
    match weights.parse::<WeightFormat>() {
        Ok(format) if format.is_quantized() => Ok(format),
        _ => Err(bad(&format!("\"weights\": \"{weights}\" is not int8 or int4-g32/64/128"))),
    }
}

/// The names of a projection's arrays: qweight, scales and (int4) qzeros.
pub fn part_names(prefix: &str, format: WeightFormat) -> Vec<String> {
    let mut names = vec![format!("{prefix}.qweight"), format!("{prefix}.scales")];
    if matches!(format, WeightFormat::Int4 { .. }) {
        names.push(format!("{prefix}.qzeros"));
    }
    names
}

/// The (dtype, shape) each of [`part_names`] must have for a `[rows, cols]` projection.
pub fn part_layouts(
    rows: usize,
    cols: usize,
    format: WeightFormat,
) -> Vec<(&'static str, Vec<usize>)> {
    match format {
        WeightFormat::Native => Vec::new(),
        WeightFormat::Int8 => vec![("I8", vec![rows, cols]), ("F32", vec![rows])],
        WeightFormat::Int4 { group } => vec![
            ("U8", vec![rows, cols / 2]),
            ("BF16", vec![rows, cols / group]),
            ("U8", vec![rows, cols / group]),
        ],
    }
}

/// A quantized tensor's arrays as little-endian bytes, in the order of [`part_names`].
///
/// Errors: `Unsupported` for int4 with f16 scales (read from an AWQ/GPTQ checkpoint): this
/// format stores bf16 scales, and rounding f16 to bf16 would change the weights.
pub fn part_bytes(q: &QuantizedTensor) -> Result<Vec<Vec<u8>>> {
    Ok(match &q.data {
        QuantData::Int8 { values, scales } => vec![
            values.iter().map(|&v| v as u8).collect(),
            scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
        ],
        QuantData::Int4 { packed, scales: Int4Scales::Bf16(scales), zeros, .. } => vec![
            packed.clone(),
            scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            zeros.clone(),
        ],
        QuantData::Int4 { scales: Int4Scales::F16(_), .. } => {
            return Err(Error::unsupported(
                "int4 weights with f16 scales (from an AWQ/GPTQ checkpoint) cannot be written \
                 as a phi3-rs quantized folder, which stores bf16 scales",
            ))
        }
    })
}

/// Check `parts` (as named by [`part_names`]) against [`part_layouts`]: errors name the file and
/// the tensor (`ModelFormat`). Reads headers only.
pub fn check_parts(
    parts: &[RawTensor],
    rows: usize,
    cols: usize,
    format: WeightFormat,
) -> Result<()> {
    for (part, (dtype, shape)) in parts.iter().zip(part_layouts(rows, cols, format)) {
        part.expect(dtype, &shape)?;
    }
    Ok(())
}

/// Read a projection's arrays (checked by [`check_parts`]) into a [`QuantizedTensor`].
///
/// Errors: `Io` when a file cannot be read; `OutOfMemory`; `ModelFormat` naming the tensor for
/// an int4 zero point above 15 or a non-finite scale (a corrupt file, which would otherwise
/// compute garbage silently).
pub fn read_parts(
    parts: &[RawTensor],
    rows: usize,
    cols: usize,
    format: WeightFormat,
) -> Result<QuantizedTensor> {
    check_parts(parts, rows, cols, format)?;
    let bad = |part: &RawTensor, what: String| {
        Error::model_format(format!("{}: {}: {what}", part.file, part.name))
    };
    let data = match format {
        WeightFormat::Native => return Err(Error::internal("read_parts of a native tensor")),
        WeightFormat::Int8 => {
            let values = parts[0].read_vec()?.into_iter().map(|b| b as i8).collect::<Vec<i8>>();
            if let Some(i) = values.iter().position(|&v| v == i8::MIN) {
                return Err(bad(&parts[0], format!("element {i} is -128 (int8 uses -127..=127)")));
            }
            let scales: Vec<f32> = parts[1]
                .read_vec()?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
                return Err(bad(&parts[1], format!("scale {i} is {}", scales[i])));
            }
            QuantData::Int8 { values, scales }
        }
        WeightFormat::Int4 { group } => {
            let packed = parts[0].read_vec()?;
            let scales: Vec<bf16> = parts[1]
                .read_vec()?
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                .collect();
            if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
                return Err(bad(&parts[1], format!("scale {i} is {}", scales[i])));
            }
            let zeros = parts[2].read_vec()?;
            if let Some(i) = zeros.iter().position(|&z| z > 15) {
                return Err(bad(&parts[2], format!("zero point {i} is {} (> 15)", zeros[i])));
            }
            QuantData::Int4 { group, packed, scales: Int4Scales::Bf16(scales), zeros }
        }
    };
    Ok(QuantizedTensor { rows, cols, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_parts(q: &QuantizedTensor, prefix: &str) -> Vec<RawTensor> {
        let names = part_names(prefix, q.format());
        let layouts = part_layouts(q.rows, q.cols, q.format());
        names
            .iter()
            .zip(layouts)
            .zip(part_bytes(q).unwrap())
            .map(|((name, (dtype, shape)), bytes)| {
                RawTensor::from_bytes(name, dtype, shape, bytes).unwrap()
            })
            .collect()
    }

    #[test]
    fn parts_round_trip_every_format() {
        let w: Vec<f32> = (0..6 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
        for format in ["int8", "int4-g32", "int4-g64"] {
            let format: WeightFormat = format.parse().unwrap();
            let q = QuantizedTensor::from_f32("w", &w, 6, 64, format).unwrap();
            let parts = raw_parts(&q, "p");
            assert_eq!(read_parts(&parts, 6, 64, format).unwrap(), q, "{format}");
            assert_eq!(parse_config_entry(&config_entry(format)).unwrap(), format);
        }
    }

    #[test]
    fn corrupt_parts_are_refused_naming_the_tensor() {
        let w = vec![0.25f32; 2 * 32];
        let format = WeightFormat::Int4 { group: 32 };
        let q = QuantizedTensor::from_f32("w", &w, 2, 32, format).unwrap();
        let mut parts = raw_parts(&q, "p");
        parts[2] = RawTensor::from_bytes("p.qzeros", "U8", vec![2, 1], vec![3, 16]).unwrap();
        let e = read_parts(&parts, 2, 32, format).unwrap_err();
        assert!(e.to_string().contains("p.qzeros") && e.to_string().contains("16"), "{e}");
        // Wrong shape for the format.
        let e = read_parts(&parts, 2, 64, format).unwrap_err();
        assert!(e.to_string().contains("p.qweight"), "{e}");
        let e = parse_config_entry(&serde_json::json!({"weights": "int4", "version": 2}));
        assert_eq!(e.unwrap_err().kind(), crate::ErrorKind::Unsupported);
        let e = parse_config_entry(&serde_json::json!({"weights": "native", "version": 1}));
        assert_eq!(e.unwrap_err().kind(), crate::ErrorKind::ModelFormat);
    }
}
