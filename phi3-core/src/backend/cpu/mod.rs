//! The CPU reference backend: simple, f32 accumulation, multi-threaded with rayon.
//!
//! It is the oracle the CUDA backend is checked against, so clarity wins over speed where the two
//! conflict; the matmuls (where the time goes) are still blocked and threaded over all cores.
//! Weights are read from the safetensors files into memory once, in their file dtype (bf16, f16
//! or f32), or quantized while they are read (int8/int4 projections, `loader/quant.rs`), and
//! widened (dequantized) to f32 on the fly; activations and the KV cache are f32.
//!
//! Files: `matmul.rs` (linear), `attention.rs`, `norm.rs` (RMSNorm, SwiGLU), `rope.rs` (RoPE and
//! KV writes).

mod attention;
mod matmul;
mod norm;
mod rope;

use half::{bf16, f16};

use super::{AttnParams, Backend, KvLayout, SeqSpan};
use crate::error::{Error, ErrorKind, Result};
use crate::loader::quant::{QuantizedTensor, WeightFormat};
use crate::loader::{DType, HostTensor};
use crate::rope::RopeBatch;

/// KV caches grow in blocks of this many tokens, so appends rarely reallocate.
const KV_BLOCK_TOKENS: usize = 256;

/// The CPU backend. Threads come from rayon's global pool (all cores by default).
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

/// f32 activations, row-major `[rows, cols]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuAct {
    /// Number of rows: one per token.
    pub rows: usize,
    /// Width of every row.
    pub cols: usize,
    /// The values, `[rows, cols]`.
    pub data: Vec<f32>,
}

/// A weight in its file dtype, in memory owned by the backend.
#[derive(Clone, Debug)]
pub struct CpuWeight {
    /// `out_features` of a matrix, 1 for a vector.
    pub rows: usize,
    /// `in_features` of a matrix, the length of a vector.
    pub cols: usize,
    storage: WeightStorage,
}

#[derive(Clone, Debug)]
enum WeightStorage {
    OwnedBf16(Vec<bf16>),
    OwnedF16(Vec<f16>),
    OwnedF32(Vec<f32>),
    Quantized(QuantizedTensor),
}

/// A typed view of a weight's elements.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WeightView<'a> {
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    F32(&'a [f32]),
    Quant(&'a QuantizedTensor),
}

/// One sequence's KV cache: per layer, keys and values `[capacity, n_kv_heads, head_dim]`, f32.
#[derive(Clone, Debug)]
pub struct CpuKv {
    layout: KvLayout,
    capacity: usize,
    k: Vec<Vec<f32>>, // [n_layers][capacity * n_kv_heads * head_dim]
    v: Vec<Vec<f32>>, // [n_layers][capacity * n_kv_heads * head_dim]
}

impl CpuAct {
    fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        CpuAct { rows, cols, data }
    }

    /// Row `i`. Panics when `i >= rows`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

impl CpuWeight {
    pub(crate) fn view(&self) -> Result<WeightView<'_>> {
        match &self.storage {
            WeightStorage::OwnedBf16(v) => Ok(WeightView::Bf16(v)),
            WeightStorage::OwnedF16(v) => Ok(WeightView::F16(v)),
            WeightStorage::OwnedF32(v) => Ok(WeightView::F32(v)),
            WeightStorage::Quantized(q) => Ok(WeightView::Quant(q)),
        }
    }

    /// Bytes of memory the weight's elements (and scales) take.
    pub fn byte_len(&self) -> usize {
        match &self.storage {
            WeightStorage::OwnedBf16(v) => 2 * v.len(),
            WeightStorage::OwnedF16(v) => 2 * v.len(),
            WeightStorage::OwnedF32(v) => 4 * v.len(),
            WeightStorage::Quantized(q) => q.byte_len(),
        }
    }

    /// How the weight is stored: `Native` for a file dtype, else its quantized format.
    pub fn format(&self) -> WeightFormat {
        match &self.storage {
            WeightStorage::Quantized(q) => q.format(),
            _ => WeightFormat::Native,
        }
    }

    /// All elements widened to f32 (norm weights are small; used once per call).
    pub(crate) fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(match self.view()? {
            WeightView::Bf16(w) => w.iter().map(|x| x.to_f32()).collect(),
            WeightView::F16(w) => w.iter().map(|x| x.to_f32()).collect(),
            WeightView::F32(w) => w.to_vec(),
            WeightView::Quant(q) => q.dequantize(),
        })
    }
}

/// A tensor's elements read from its file straight into a typed buffer: one copy, no staging.
fn read_elements<T: bytemuck::Pod>(tensor: &HostTensor, zero: T) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(tensor.numel()).map_err(|_| {
        Error::new(
            ErrorKind::OutOfMemory,
            format!("{}: cannot allocate {} MiB", tensor.name, tensor.byte_len() >> 20),
        )
    })?;
    v.resize(tensor.numel(), zero);
    tensor.read_at(0, bytemuck::cast_slice_mut(&mut v))?;
    Ok(v)
}

// The files are little-endian, and so are the elements read into place above.
#[cfg(target_endian = "big")]
compile_error!(
    "the CPU backend reads little-endian weights in place: big-endian hosts are unsupported"
);

impl CpuKv {
    fn row_len(&self) -> usize {
        self.layout.row_len()
    }
}

/// Allocate a zeroed f32 buffer, reporting failure as OutOfMemory instead of aborting.
fn try_zeroed(len: usize, what: &str) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        Error::new(
            ErrorKind::OutOfMemory,
            format!("cannot allocate {} MiB for {what}", (len * 4) >> 20),
        )
    })?;
    v.resize(len, 0.0);
    Ok(v)
}

impl Backend for CpuBackend {
    type Act = CpuAct;
    type Weight = CpuWeight;
    type Kv = CpuKv;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, tensor: &HostTensor) -> Result<CpuWeight> {
        let (rows, cols) = match tensor.shape[..] {
            [n] => (1, n),
            [r, c] => (r, c),
            _ => {
                return Err(Error::internal(format!(
                    "{}: CPU backend takes vectors and matrices, got shape {:?}",
                    tensor.name, tensor.shape
                )))
            }
        };
        let storage = match tensor.dtype {
            DType::BF16 => WeightStorage::OwnedBf16(read_elements(tensor, bf16::ZERO)?),
            DType::F16 => WeightStorage::OwnedF16(read_elements(tensor, f16::ZERO)?),
            DType::F32 => WeightStorage::OwnedF32(read_elements(tensor, 0.0f32)?),
        };
        Ok(CpuWeight { rows, cols, storage })
    }

    fn upload_quantized(&self, q: QuantizedTensor) -> Result<CpuWeight> {
        Ok(CpuWeight { rows: q.rows, cols: q.cols, storage: WeightStorage::Quantized(q) })
    }

    fn alloc_kv(&self, layout: &KvLayout) -> Result<CpuKv> {
        Ok(CpuKv {
            layout: *layout,
            capacity: 0,
            k: vec![Vec::new(); layout.n_layers],
            v: vec![Vec::new(); layout.n_layers],
        })
    }

    fn reserve_kv(&self, kv: &mut CpuKv, tokens: usize) -> Result<()> {
        if tokens <= kv.capacity {
            return Ok(());
        }
        let capacity = tokens.div_ceil(KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS;
        let len = capacity.checked_mul(kv.row_len()).ok_or_else(|| {
            Error::new(ErrorKind::OutOfMemory, format!("KV cache of {tokens} tokens"))
        })?;
        // Grow every layer or none: on failure the cache keeps its old capacity.
        let mut grown_k = Vec::with_capacity(kv.layout.n_layers);
        let mut grown_v = Vec::with_capacity(kv.layout.n_layers);
        for layer in 0..kv.layout.n_layers {
            let mut k = try_zeroed(len, "the KV cache")?;
            let mut v = try_zeroed(len, "the KV cache")?;
            k[..kv.k[layer].len()].copy_from_slice(&kv.k[layer]);
            v[..kv.v[layer].len()].copy_from_slice(&kv.v[layer]);
            grown_k.push(k);
            grown_v.push(v);
        }
        kv.k = grown_k;
        kv.v = grown_v;
        kv.capacity = capacity;
        Ok(())
    }

    fn copy_kv(&self, src: &CpuKv, n_tokens: usize) -> Result<CpuKv> {
        let mut dst = self.alloc_kv(&src.layout)?;
        self.reserve_kv(&mut dst, n_tokens)?;
        let n = n_tokens * src.row_len();
        for layer in 0..src.layout.n_layers {
            dst.k[layer][..n].copy_from_slice(&src.k[layer][..n]);
            dst.v[layer][..n].copy_from_slice(&src.v[layer][..n]);
        }
        Ok(dst)
    }

    fn kv_to_host(&self, kv: &CpuKv, n_tokens: usize) -> Result<Vec<f32>> {
        let n = n_tokens * kv.row_len();
        let mut out = Vec::with_capacity(2 * n * kv.layout.n_layers);
        for layer in 0..kv.layout.n_layers {
            out.extend_from_slice(&kv.k[layer][..n]);
            out.extend_from_slice(&kv.v[layer][..n]);
        }
        Ok(out)
    }

    fn kv_from_host(&self, kv: &mut CpuKv, n_tokens: usize, data: &[f32]) -> Result<()> {
        let n = kv.layout.check_host_len(n_tokens, data.len())?;
        self.reserve_kv(kv, n_tokens)?;
        for (layer, chunk) in data.chunks_exact(2 * n.max(1)).enumerate().take(kv.layout.n_layers) {
            let (k, v) = chunk.split_at(n);
            kv.k[layer][..n].copy_from_slice(k);
            kv.v[layer][..n].copy_from_slice(v);
        }
        Ok(())
    }

    fn embed(&self, table: &CpuWeight, tokens: &[u32]) -> Result<CpuAct> {
        let cols = table.cols;
        let mut data = Vec::with_capacity(tokens.len() * cols);
        let view = table.view()?;
        for &t in tokens {
            let range = t as usize * cols..(t as usize + 1) * cols;
            match view {
                WeightView::Bf16(w) => data.extend(w[range].iter().map(|x| x.to_f32())),
                WeightView::F16(w) => data.extend(w[range].iter().map(|x| x.to_f32())),
                WeightView::F32(w) => data.extend_from_slice(&w[range]),
                WeightView::Quant(q) => {
                    let at = data.len();
                    data.resize(at + cols, 0.0);
                    q.dequantize_row(t as usize, &mut data[at..]);
                }
            }
        }
        Ok(CpuAct::new(tokens.len(), cols, data))
    }

    fn rms_norm(
        &self,
        residual: &mut CpuAct,
        delta: Option<&CpuAct>,
        weight: &CpuWeight,
        eps: f32,
    ) -> Result<CpuAct> {
        if let Some(delta) = delta {
            norm::add_in_place(&mut residual.data, &delta.data);
        }
        let data = norm::rms_norm(&residual.data, residual.cols, &weight.to_f32()?, eps);
        Ok(CpuAct::new(residual.rows, residual.cols, data))
    }

    fn linear(&self, x: &CpuAct, w: &CpuWeight) -> Result<CpuAct> {
        let data = matmul::linear(&x.data, x.rows, x.cols, w.view()?, w.rows)?;
        Ok(CpuAct::new(x.rows, w.rows, data))
    }

    fn rope_store_kv(
        &self,
        qkv: &CpuAct,
        seqs: &[SeqSpan],
        rope: &RopeBatch,
        kvs: &mut [&mut CpuKv],
        layer: usize,
        params: &AttnParams,
    ) -> Result<CpuAct> {
        let q = rope::rope_store_kv(&qkv.data, qkv.cols, seqs, rope, kvs, layer, params);
        Ok(CpuAct::new(qkv.rows, params.n_heads * params.head_dim, q))
    }

    fn attention(
        &self,
        q: &CpuAct,
        seqs: &[SeqSpan],
        kvs: &[&CpuKv],
        layer: usize,
        params: &AttnParams,
    ) -> Result<CpuAct> {
        let out = attention::attention(&q.data, q.rows, seqs, kvs, layer, params);
        Ok(CpuAct::new(q.rows, q.cols, out))
    }

    fn swiglu(&self, gate_up: &CpuAct) -> Result<CpuAct> {
        let ffn = gate_up.cols / 2;
        Ok(CpuAct::new(gate_up.rows, ffn, norm::swiglu(&gate_up.data, ffn)))
    }

    fn gather_rows(&self, x: &CpuAct, rows: &[usize]) -> Result<CpuAct> {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(x.row(r));
        }
        Ok(CpuAct::new(rows.len(), x.cols, data))
    }

    fn to_host(&self, x: &CpuAct) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }
}
