//! `phi3.quantize(...)`: `phi3_core::quantize::quantize_folder` for Python hosts.

use std::path::PathBuf;

use phi3_core::quantize::{quantize_folder, QuantizeOptions};
use phi3_core::WeightFormat;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_py_err;
use crate::gil::run_detached;

/// quantize(model, out, weights="int4", awq=False, lm_head=False) -> dict
///
/// Write a copy of the Hugging Face model folder `model` into the new folder `out` with its
/// decoder projections stored as `weights` ("int8", "int4" = "int4-g128", "int4-g32",
/// "int4-g64"); `phi3.Model(out)` then loads them without quantizing again. Tensors are
/// processed one at a time (memory stays near one tensor); `out` appears only when complete.
/// `awq=True` (int4 only) first searches activation-aware scales on a built-in calibration
/// text. `lm_head=True` quantizes the (untied) lm_head too. Returns a summary: format, tensors, quantized, bytes_in, bytes_out, files, seconds.
///
/// Raises InvalidArgumentError (native or unknown weights, awq with int8, an existing `out`, an
/// already-quantized source, a group that does not divide a row), IoError, ModelFormatError,
/// UnsupportedError (as for loading). Releases the GIL.
#[pyfunction]
#[pyo3(signature = (model, out, weights = "int4", awq = false, lm_head = false))]
pub fn quantize<'py>(
    py: Python<'py>,
    model: PathBuf,
    out: PathBuf,
    weights: &str,
    awq: bool,
    lm_head: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let format: WeightFormat = weights.parse().map_err(|e| to_py_err(py, e))?;
    let options = QuantizeOptions { awq, lm_head, ..Default::default() };
    let report = run_detached(py, || quantize_folder(&model, &out, format, &options))?;
    let summary = PyDict::new(py);
    summary.set_item("format", report.format.to_string())?;
    summary.set_item("tensors", report.tensors)?;
    summary.set_item("quantized", report.quantized)?;
    summary.set_item("bytes_in", report.bytes_in)?;
    summary.set_item("bytes_out", report.bytes_out)?;
    summary.set_item("files", report.files)?;
    summary.set_item("seconds", report.seconds)?;
    Ok(summary)
}
