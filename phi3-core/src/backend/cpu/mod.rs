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
mod gemm;
mod int4_dot;
mod matmul;
mod norm;
mod prefetch;
mod rope;
mod simd;
mod simd_exp;
#[cfg(test)]
mod simd_kinds;

use half::{bf16, f16};

use super::{AttnParams, Backend, KvLayout, LinearRows, SeqSpan, KV_BLOCK_TOKENS};
use crate::error::{Error, ErrorKind, Result};
use crate::loader::quant::{QuantizedTensor, WeightFormat};
use crate::loader::{DType, HostTensor};
use crate::rope::RopeBatch;

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

/// The KV pool: blocks allocated one at a time (growth never moves data), each
/// `[n_layers][keys, values][KV_BLOCK_TOKENS][n_kv_heads * head_dim]` f32.
#[derive(Clone, Debug)]
pub struct CpuKvPool {
    layout: KvLayout,
    blocks: Vec<Box<[f32]>>,
}

/// A forward pass's sequences and their block tables.
#[derive(Clone, Debug)]
pub struct CpuKvBatch {
    seqs: Vec<SeqSpan>,
    tables: Vec<Vec<u32>>,
}

impl CpuKvPool {
    /// Offset within a block of head `head`'s keys (`values == false`) or values of `layer` at
    /// the block's `slot`-th token. A head's tokens are next to each other: attention reads one
    /// head's keys token after token, and with whole token rows side by side each of its key
    /// rows sat on a page of its own (`row_len` × 4 bytes apart), so a decode step's attention
    /// missed the TLB on every key (docs/PERF.md, "CPU attention").
    fn offset(&self, layer: usize, values: bool, head: usize, slot: usize) -> usize {
        let KvLayout { n_kv_heads, head_dim, .. } = self.layout;
        (((2 * layer + usize::from(values)) * n_kv_heads + head) * KV_BLOCK_TOKENS + slot)
            * head_dim
    }

    /// Head `head`'s key (`values == false`) or value row of `layer` at position `pos` of the
    /// sequence stored in `table`.
    pub(crate) fn head_row(
        &self,
        table: &[u32],
        layer: usize,
        values: bool,
        head: usize,
        pos: usize,
    ) -> &[f32] {
        let at = self.offset(layer, values, head, pos % KV_BLOCK_TOKENS);
        &self.blocks[table[pos / KV_BLOCK_TOKENS] as usize][at..at + self.layout.head_dim]
    }

    /// Writes `row` (every head's keys, or values, of one token: `row_len` values) at
    /// position `pos`.
    fn write_row(&mut self, table: &[u32], layer: usize, values: bool, pos: usize, row: &[f32]) {
        let block = table[pos / KV_BLOCK_TOKENS] as usize;
        for (head, src) in row.chunks_exact(self.layout.head_dim).enumerate() {
            let at = self.offset(layer, values, head, pos % KV_BLOCK_TOKENS);
            self.blocks[block][at..at + src.len()].copy_from_slice(src);
        }
    }

    /// Check that `table` covers `n_tokens` tokens with ids of this pool (`Internal` otherwise:
    /// the tables come from `kv_pool.rs`, not from hosts).
    fn check_table(&self, table: &[u32], n_tokens: usize) -> Result<()> {
        if table.len() < n_tokens.div_ceil(KV_BLOCK_TOKENS)
            || table.iter().any(|&b| b as usize >= self.blocks.len())
        {
            return Err(Error::internal(format!(
                "block table {table:?} does not cover {n_tokens} tokens of a pool of {} blocks",
                self.blocks.len()
            )));
        }
        Ok(())
    }
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
    type KvPool = CpuKvPool;
    type KvBatch = CpuKvBatch;

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

    fn new_kv_pool(&self, layout: &KvLayout) -> Result<CpuKvPool> {
        Ok(CpuKvPool { layout: *layout, blocks: Vec::new() })
    }

    fn kv_block_bytes(&self, layout: &KvLayout) -> u64 {
        4 * layout.block_len() as u64
    }

    fn kv_pool_blocks(&self, pool: &CpuKvPool) -> usize {
        pool.blocks.len()
    }

    fn grow_kv_pool(
        &self,
        pool: &mut CpuKvPool,
        min_blocks: usize,
        max_blocks: usize,
    ) -> Result<usize> {
        let old = pool.blocks.len();
        if min_blocks > max_blocks {
            return Err(Error::internal(format!("grow_kv_pool: {min_blocks} > {max_blocks}")));
        }
        while pool.blocks.len() < min_blocks {
            match try_zeroed(pool.layout.block_len(), "a KV block") {
                Ok(block) => pool.blocks.push(block.into_boxed_slice()),
                Err(e) => {
                    pool.blocks.truncate(old);
                    return Err(e);
                }
            }
        }
        Ok(pool.blocks.len())
    }

    fn copy_kv_blocks(&self, pool: &mut CpuKvPool, pairs: &[(u32, u32)]) -> Result<()> {
        for &(src, dst) in pairs {
            let (src, dst) = (src as usize, dst as usize);
            if src.max(dst) >= pool.blocks.len() || src == dst {
                return Err(Error::internal(format!("copy_kv_blocks: bad pair ({src}, {dst})")));
            }
            let data = pool.blocks[src].clone();
            pool.blocks[dst].copy_from_slice(&data);
        }
        Ok(())
    }

    fn kv_to_host(&self, pool: &CpuKvPool, blocks: &[u32], n_tokens: usize) -> Result<Vec<f32>> {
        pool.check_table(blocks, n_tokens)?;
        let n = n_tokens * pool.layout.row_len();
        let mut out = Vec::with_capacity(2 * n * pool.layout.n_layers);
        for layer in 0..pool.layout.n_layers {
            for values in [false, true] {
                for pos in 0..n_tokens {
                    for head in 0..pool.layout.n_kv_heads {
                        out.extend_from_slice(pool.head_row(blocks, layer, values, head, pos));
                    }
                }
            }
        }
        Ok(out)
    }

    fn kv_from_host(
        &self,
        pool: &mut CpuKvPool,
        blocks: &[u32],
        n_tokens: usize,
        data: &[f32],
    ) -> Result<()> {
        let n = pool.layout.check_host_len(n_tokens, data.len())?;
        pool.check_table(blocks, n_tokens)?;
        let row = pool.layout.row_len();
        for (layer, chunk) in data.chunks_exact(2 * n.max(1)).enumerate().take(pool.layout.n_layers)
        {
            for (values, half) in [(false, &chunk[..n]), (true, &chunk[n..])] {
                for (pos, src) in half.chunks_exact(row).enumerate() {
                    pool.write_row(blocks, layer, values, pos, src);
                }
            }
        }
        Ok(())
    }

    fn kv_batch(&self, seqs: &[SeqSpan], blocks: &[&[u32]]) -> Result<CpuKvBatch> {
        if seqs.len() != blocks.len() {
            return Err(Error::internal("kv_batch: one block table per sequence"));
        }
        Ok(CpuKvBatch { seqs: seqs.to_vec(), tables: blocks.iter().map(|t| t.to_vec()).collect() })
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

    fn linear(&self, x: &CpuAct, w: &CpuWeight, rows: &LinearRows) -> Result<CpuAct> {
        if rows.total() != x.rows {
            return Err(Error::internal(format!(
                "linear: {} rows described for an input of {}",
                rows.total(),
                x.rows
            )));
        }
        // Prefill runs need no splitting: the tiled path's rows are independent.
        let data = matmul::linear(&x.data, x.rows, x.cols, w.view()?, w.rows, rows.decode_rows());
        Ok(CpuAct::new(x.rows, w.rows, data))
    }

    fn rope_store_kv(
        &self,
        qkv: &CpuAct,
        batch: &CpuKvBatch,
        rope: &RopeBatch,
        pool: &mut CpuKvPool,
        layer: usize,
        params: &AttnParams,
    ) -> Result<CpuAct> {
        for (seq, table) in batch.seqs.iter().zip(&batch.tables) {
            pool.check_table(table, seq.pos0 + seq.len)?;
        }
        let q = rope::rope_store_kv(&qkv.data, qkv.cols, batch, rope, pool, layer, params);
        Ok(CpuAct::new(qkv.rows, params.n_heads * params.head_dim, q))
    }

    fn attention(
        &self,
        q: &CpuAct,
        batch: &CpuKvBatch,
        pool: &CpuKvPool,
        layer: usize,
        params: &AttnParams,
    ) -> Result<CpuAct> {
        for (seq, table) in batch.seqs.iter().zip(&batch.tables) {
            pool.check_table(table, seq.pos0 + seq.len)?;
        }
        let out = attention::attention(&q.data, q.rows, batch, pool, layer, params);
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
