//! Where a weight comes from: a dense tensor of the checkpoint (quantized at upload when asked),
//! or a projection the checkpoint already stores quantized (a phi3-rs quantized folder, or an
//! AWQ/GPTQ checkpoint), read into a [`QuantizedTensor`] when the backend takes it.

use std::sync::Arc;

use super::hub_quant::{self, HubQuant};
use super::quant::{QuantizedTensor, WeightFormat};
use super::{quant_file, Checkpoint, HostTensor, RawTensor};
use crate::error::Result;

/// One tensor of a model, before a backend has it.
#[derive(Clone, Debug)]
pub enum WeightSource {
    /// A dense tensor in its file dtype (bf16, f16 or f32).
    Dense(HostTensor),
    /// A decoder projection stored quantized in the checkpoint.
    Quantized(QuantizedSource),
}

/// A decoder projection stored quantized in the checkpoint; nothing is read until
/// [`QuantizedSource::read`].
#[derive(Clone, Debug)]
pub struct QuantizedSource {
    /// The projection's dense name, e.g. "model.layers.0.mlp.down_proj.weight".
    pub name: String,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The format it is read into.
    pub format: WeightFormat,
    /// The checkpoint arrays it is made of (shapes and dtypes already checked).
    pub parts: Vec<RawTensor>,
    layout: StoredLayout,
}

/// How the arrays of a [`QuantizedSource`] are laid out.
#[derive(Clone, Debug)]
enum StoredLayout {
    /// phi3-rs' own layout (`quant_file.rs`): read as is.
    Phi3Rs,
    /// An AWQ or GPTQ checkpoint: converted while read (`hub_quant.rs`).
    Hub { checkpoint: Arc<Checkpoint>, scheme: HubQuant, prefix: String },
}

/// A tensor of a checkpoint as stored, for fingerprints: dense or one array of a quantized one.
#[derive(Clone, Copy, Debug)]
pub enum StoredTensor<'a> {
    /// A dense tensor.
    Dense(&'a HostTensor),
    /// One array of a quantized projection.
    Part(&'a RawTensor),
}

impl StoredTensor<'_> {
    /// Its name in the checkpoint.
    pub fn name(&self) -> &str {
        match self {
            StoredTensor::Dense(t) => &t.name,
            StoredTensor::Part(t) => &t.name,
        }
    }

    /// Its safetensors dtype name.
    pub fn dtype_name(&self) -> &str {
        match self {
            StoredTensor::Dense(t) => t.dtype.name(),
            StoredTensor::Part(t) => &t.dtype,
        }
    }

    /// Its shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            StoredTensor::Dense(t) => &t.shape,
            StoredTensor::Part(t) => &t.shape,
        }
    }

    /// Bytes in the file.
    pub fn byte_len(&self) -> usize {
        match self {
            StoredTensor::Dense(t) => t.byte_len(),
            StoredTensor::Part(t) => t.byte_len(),
        }
    }

    /// Bytes from `offset` into `dst` (errors as [`HostTensor::read_at`]).
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        match self {
            StoredTensor::Dense(t) => t.read_at(offset, dst),
            StoredTensor::Part(t) => t.read_at(offset, dst),
        }
    }
}

impl QuantizedSource {
    /// A projection of a phi3-rs quantized folder; `parts` as named by
    /// [`quant_file::part_names`].
    ///
    /// Errors: `ModelFormat` naming the file and tensor when a part's dtype or shape is wrong.
    pub fn phi3rs(
        name: &str,
        rows: usize,
        cols: usize,
        format: WeightFormat,
        parts: Vec<RawTensor>,
    ) -> Result<QuantizedSource> {
        quant_file::check_parts(&parts, rows, cols, format)?;
        let name = name.to_string();
        Ok(QuantizedSource { name, rows, cols, format, parts, layout: StoredLayout::Phi3Rs })
    }

    /// A projection of an AWQ/GPTQ checkpoint, read with `scheme` from the arrays `prefix.*`
    /// (checked when read: conversion needs all of them anyway).
    pub fn hub(
        name: &str,
        rows: usize,
        cols: usize,
        checkpoint: Arc<Checkpoint>,
        scheme: HubQuant,
        prefix: &str,
    ) -> QuantizedSource {
        let parts = ["qweight", "qzeros", "scales", "g_idx"]
            .iter()
            .filter_map(|part| checkpoint.get_raw(&format!("{prefix}.{part}")))
            .collect();
        QuantizedSource {
            name: name.to_string(),
            rows,
            cols,
            format: WeightFormat::Int4 { group: scheme.group() },
            parts,
            layout: StoredLayout::Hub { checkpoint, scheme, prefix: prefix.to_string() },
        }
    }

    /// Read (and for AWQ/GPTQ, convert) the arrays into our layout.
    ///
    /// Errors: `Io`, `OutOfMemory`, and `ModelFormat`/`Unsupported` naming the tensor for
    /// arrays that do not hold a valid quantized weight.
    pub fn read(&self) -> Result<QuantizedTensor> {
        match &self.layout {
            StoredLayout::Phi3Rs => {
                quant_file::read_parts(&self.parts, self.rows, self.cols, self.format)
            }
            StoredLayout::Hub { checkpoint, scheme, prefix } => {
                hub_quant::read_projection(checkpoint, scheme, prefix, self.rows, self.cols)
            }
        }
    }

    /// Bytes of the arrays in the files.
    pub fn file_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.byte_len() as u64).sum()
    }
}

impl WeightSource {
    /// The tensor's (dense) name.
    pub fn name(&self) -> &str {
        match self {
            WeightSource::Dense(t) => &t.name,
            WeightSource::Quantized(q) => &q.name,
        }
    }

    /// The logical shape, `[rows, cols]` for a quantized projection.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            WeightSource::Dense(t) => t.shape.clone(),
            WeightSource::Quantized(q) => vec![q.rows, q.cols],
        }
    }

    /// Bytes read from the files to load it.
    pub fn file_bytes(&self) -> u64 {
        match self {
            WeightSource::Dense(t) => t.byte_len() as u64,
            WeightSource::Quantized(q) => q.file_bytes(),
        }
    }

    /// The tensors it is stored as, for fingerprints.
    pub fn stored(&self) -> Vec<StoredTensor<'_>> {
        match self {
            WeightSource::Dense(t) => vec![StoredTensor::Dense(t)],
            WeightSource::Quantized(q) => q.parts.iter().map(StoredTensor::Part).collect(),
        }
    }
}
