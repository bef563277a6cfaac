//! Kernel launchers: one function per kernel that picks the grid and pushes the arguments in the
//! order of the kernel's signature (see each `kernels/*.cu` header). Shapes were validated by the
//! trait methods in `mod.rs`; launchers only convert sizes to the kernels' integer types.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::error::DriverResultExt;
use super::kv::{KvArgs, ATTN_SPLIT_KEYS};
use super::CudaBackend;
use crate::error::{Error, Result};

/// Threads per block of the row and grid-stride kernels.
const BLOCK: u32 = 256;
/// Most query heads one phi3_attention block computes (ATT_MAX_GROUP in attention.cu).
const ATT_MAX_GROUP: usize = 8;
/// Threads per block of phi3_attention (ATT_THREADS in attention.cu).
const ATT_THREADS: u32 = 128;
/// Threads per block of the tensor-core attention kernels (AP_THREADS in attention_tc.cu: 4 warps).
const ATTN_TC_THREADS: u32 = 128;
/// Dynamic shared memory of the tensor-core attention kernels (AP_SMEM_BYTES: two stages of keys
/// and values, 64 rows of 136 bf16 each). Above the 48 KiB default, so kernels.rs raises the
/// functions' limit.
pub(crate) const ATTN_TC_SMEM_BYTES: u32 = 2 * 2 * 64 * 136 * 2;
/// Largest head size the tensor-core attention kernels take (AP_HD_MAX); also a multiple of 16.
pub(crate) const ATTN_TC_MAX_HEAD_DIM: usize = 128;
/// Output rows per block of the GEMV kernels (one warp each).
const GEMV_ROWS_PER_BLOCK: usize = BLOCK as usize / 32;
/// Threads per block of the quantized GEMV kernels (gemv_quant.cu: 2 warps).
const QGEMV_THREADS: u32 = 64;
/// Output rows per block of the quantized GEMV kernels (2 warps x QROWS = 4 rows).
const QGEMV_ROWS_PER_BLOCK: usize = 8;
/// Most tokens of one quantized GEMV launch (QTOK in gemv_quant.cu).
pub(crate) const QGEMV_TOKENS: usize = 8;
/// Threads per block of phi3_decode_gemm (DG_WARPS = 4 warps in decode_gemm.cu).
const DECODE_GEMM_THREADS: u32 = 128;
/// Output rows per block of phi3_decode_gemm (DG_ROWS).
pub(crate) const DECODE_GEMM_ROWS: usize = 64;
/// Tokens per block of phi3_decode_gemm (DG_TOK): more take more blocks along z.
pub(crate) const DECODE_GEMM_TOKENS: usize = 64;
/// Threads per block of phi3_argmax_rows (ARGMAX_THREADS in argmax.cu).
const ARGMAX_THREADS: u32 = 1024;
/// Threads per block of phi3_top_candidates (TOPC_THREADS in top_candidates.cu).
const TOP_CANDIDATES_THREADS: u32 = 1024;

/// A per-row kernel input: an array on the device, or one value for every row (passed as a
/// kernel argument, so a pass whose rows all ask the same copies nothing to the device for it).
#[derive(Clone, Copy)]
pub(crate) enum PerRow<'a, T> {
    Device(&'a CudaSlice<i32>),
    Same(T),
}
/// Most blocks of threads that copy one KV block (phi3_copy_kv_blocks).
const KV_COPY_CHUNKS: usize = 64;

pub(crate) fn i32_of(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::internal(format!("{what} = {x} does not fit a kernel int")))
}

/// (blocks_per_slab, block_len, layer) of a KV launch as kernel ints.
fn kv_ints(kv: &KvArgs<'_>) -> Result<(i32, i32, i32)> {
    Ok((
        i32_of(kv.blocks_per_slab, "blocks per slab")?,
        i32_of(kv.block_len, "KV block length")?,
        i32_of(kv.layer, "layer")?,
    ))
}

/// Rows phi3_attention leaves to the tensor-core kernels: prefill rows (row_split ATT_PREFILL)
/// and the others (decode rows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SkipRows {
    pub prefill: bool,
    pub decode: bool,
}

/// The kernel of [`CudaBackend::launch_attention`]: phi3_attention (leaving some rows to the
/// tensor-core kernels), or phi3_attention_decode (`fast`: its one-term variant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowKernel {
    Scalar(SkipRows),
    TensorCores { fast: bool },
}

/// (n_heads, n_kv_heads, head_dim) as kernel ints.
fn head_ints(heads: (usize, usize, usize)) -> Result<(i32, i32, i32)> {
    Ok((i32_of(heads.0, "n_heads")?, i32_of(heads.1, "n_kv_heads")?, i32_of(heads.2, "head_dim")?))
}

/// The attention kernels' `window`: 0 for none; a window wider than any position is no window.
fn window_arg(window: Option<usize>) -> i32 {
    window.map_or(0, |w| w.min(i32::MAX as usize) as i32)
}

fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::internal(format!("{what} = {x} does not fit a grid size")))
}

/// One block per row.
fn per_row(rows: usize, threads: u32) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (u32_of(rows.max(1), "rows")?, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A grid-stride loop over `n` elements (at most 2^16 blocks; each thread loops).
fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// The dequantization kernels index 32-bit element counts and write `rows * k` elements.
fn check_dequant(w: &CudaSlice<u16>, rows: usize, k: usize) -> Result<()> {
    let n = rows * k;
    if w.len() < n || n >= 1 << 31 {
        return Err(Error::internal(format!(
            "dequantize {rows}x{k}: workspace of {} elements",
            w.len()
        )));
    }
    Ok(())
}

/// Launch `$f` with `$cfg` and the given arguments on the backend's stream.
macro_rules! launch {
    ($be:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let f = $be.kernels.get($name)?;
        $be.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut b = $be.dev.stream.launch_builder(f);
        $( b.arg($arg); )+
        // SAFETY: the arguments match the kernel's parameter list in type and order (see the
        // kernel's source), every buffer is a live allocation of the size the kernel indexes
        // (checked by the caller), and all work is ordered on the one stream.
        unsafe { b.launch($cfg) }.ctx($name).map(|_| ())
    }};
}

impl CudaBackend {
    pub(crate) fn launch_fill_f32(&self, x: &mut CudaSlice<f32>, value: f32) -> Result<()> {
        let n = x.len() as u64;
        let cfg = grid_stride(x.len());
        launch!(self, "phi3_fill_f32", cfg, x, &n, &value)
    }

    pub(crate) fn launch_fill_u16(&self, x: &mut CudaSlice<u16>, value: u16) -> Result<()> {
        let n = x.len() as u64;
        let cfg = grid_stride(x.len());
        launch!(self, "phi3_fill_u16", cfg, x, &n, &value)
    }

    /// `name` is phi3_embed_<dtype> or phi3_gather_rows_f32.
    pub(crate) fn launch_gather<T>(
        &self,
        name: &str,
        table: &CudaSlice<T>,
        ids: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        cols: usize,
    ) -> Result<()> {
        let cols = i32_of(cols, "cols")?;
        launch!(self, name, per_row(n, BLOCK)?, table, ids, out, &cols)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_rms_norm(
        &self,
        residual: &mut CudaSlice<f32>,
        delta: Option<&CudaSlice<f32>>,
        weight: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        let cols = i32_of(cols, "cols")?;
        let cfg = per_row(rows, BLOCK)?;
        match delta {
            Some(d) => launch!(self, "phi3_rms_norm", cfg, residual, d, weight, out, &cols, &eps),
            None => {
                let null = 0u64; // a NULL `const float*`
                launch!(self, "phi3_rms_norm", cfg, residual, &null, weight, out, &cols, &eps)
            }
        }
    }

    /// `chosen[r]` = the greedy choice among the first `limits[r]` ids of row `r` of `logits`
    /// (`[rows, cols]`), -1 for none (phi3_argmax_rows). `PerRow::Same` passes one limit for
    /// all rows as an argument, so nothing is copied to the device for it.
    pub(crate) fn launch_argmax_rows(
        &self,
        logits: &CudaSlice<f32>,
        limits: PerRow<'_, i32>,
        chosen: &mut CudaSlice<i32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let cfg = per_row(rows, ARGMAX_THREADS)?;
        let cols = i32_of(cols, "cols")?;
        match limits {
            PerRow::Device(limits) => {
                let none = 0i32;
                launch!(self, "phi3_argmax_rows", cfg, logits, limits, &none, &cols, chosen)
            }
            PerRow::Same(limit) => {
                let null = 0u64; // a NULL `const int*`
                launch!(self, "phi3_argmax_rows", cfg, logits, &null, &limit, &cols, chosen)
            }
        }
    }

    /// Row `r` of `out` (`[rows, 1 + 2 * stride]`): how many of the `wanted[2r + 1]` largest
    /// logits among the first `wanted[2r]` ids of row `r` of `logits` (`[rows, cols]`) were
    /// taken, their ids and their bits (phi3_top_candidates). `PerRow::Same((limit, count))`
    /// passes one request for all rows as arguments, so nothing is copied to the device for it.
    pub(crate) fn launch_top_candidates(
        &self,
        logits: &CudaSlice<f32>,
        wanted: PerRow<'_, (i32, i32)>,
        out: &mut CudaSlice<i32>,
        rows: usize,
        cols: usize,
        stride: usize,
    ) -> Result<()> {
        let cfg = per_row(rows, TOP_CANDIDATES_THREADS)?;
        let cols = i32_of(cols, "cols")?;
        let stride = i32_of(stride, "candidates per row")?;
        let name = "phi3_top_candidates";
        match wanted {
            PerRow::Device(wanted) => {
                let none = 0i32;
                launch!(self, name, cfg, logits, wanted, &none, &none, &cols, &stride, out)
            }
            PerRow::Same((limit, count)) => {
                let null = 0u64; // a NULL `const int*`
                launch!(self, name, cfg, logits, &null, &limit, &count, &cols, &stride, out)
            }
        }
    }

    /// `name` is phi3_gemv_<dtype>; y[out] = w[out, in] x[in].
    pub(crate) fn launch_gemv<W>(
        &self,
        name: &str,
        w: &CudaSlice<W>,
        x: &CudaView<'_, f32>,
        y: &mut CudaViewMut<'_, f32>,
        k: usize,
        m: usize,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (u32_of(m.div_ceil(GEMV_ROWS_PER_BLOCK), "gemv blocks")?, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (k, m) = (i32_of(k, "in")?, i32_of(m, "out")?);
        launch!(self, name, cfg, w, x, y, &k, &m)
    }

    /// `y[t, :] = w @ x[t, :]` for tokens `t < ntok` (phi3_decode_gemm_[swiglu_]<bf16|f16>,
    /// `name`): `x` `[ntok.., k]` f32 (for the swiglu kernels gate_up `[ntok.., 2 k]`), `y`
    /// `[ntok.., m]` f32. K slice `s` covers columns `s * k_per_split ..` (a multiple of 32); with
    /// `splits > 1` the slices' sums go to `part` (`[splits, ntok, m]`) and the last block of each
    /// tile adds them into `y`, counting arrivals in `tickets` (at least as many as the grid has
    /// tiles: `m / DECODE_GEMM_ROWS` by `ntok / DECODE_GEMM_TOKENS`, rounded up; zero before and
    /// after). With one slice `part` is not touched.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_decode_gemm(
        &self,
        name: &str,
        w: &CudaSlice<u16>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        part: &CudaSlice<f32>,
        tickets: &CudaSlice<u32>,
        ntok: usize,
        (k, m): (usize, usize),
        (splits, k_per_split): (usize, usize),
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (
                u32_of(m.div_ceil(DECODE_GEMM_ROWS), "decode GEMM row blocks")?,
                u32_of(splits, "decode GEMM splits")?,
                u32_of(ntok.div_ceil(DECODE_GEMM_TOKENS), "decode GEMM token blocks")?,
            ),
            block_dim: (DECODE_GEMM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (k, m) = (i32_of(k, "in")?, i32_of(m, "out")?);
        let (nt, kps) = (i32_of(ntok, "tokens")?, i32_of(k_per_split, "columns per split")?);
        launch!(self, name, cfg, w, x, y, part, tickets, &k, &m, &nt, &kps)
    }

    fn qgemv_config(m: usize) -> Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid_dim: (u32_of(m.div_ceil(QGEMV_ROWS_PER_BLOCK), "gemv blocks")?, 1, 1),
            block_dim: (QGEMV_THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// y[t, :] = scales * (q[out, in] x[t, :]) for `ntok` tokens: `name` is phi3_gemv_int8
    /// (one token) or phi3_gemv_int8_x8 (1..=QGEMV_TOKENS).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_gemv_int8(
        &self,
        name: &str,
        q: &CudaSlice<i8>,
        scales: &CudaSlice<f32>,
        x: &CudaView<'_, f32>,
        y: &mut CudaViewMut<'_, f32>,
        k: usize,
        m: usize,
        ntok: usize,
    ) -> Result<()> {
        let cfg = Self::qgemv_config(m)?;
        let (k, m, nt) = (i32_of(k, "in")?, i32_of(m, "out")?, i32_of(ntok, "tokens")?);
        launch!(self, name, cfg, q, scales, x, y, &k, &m, &nt)
    }

    /// `name` is phi3_gemv_int4_<bf16|f16> (the scales' dtype; one token) or the `_x8` kernel of
    /// that dtype (1..=QGEMV_TOKENS tokens).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_gemv_int4(
        &self,
        name: &str,
        packed: &CudaSlice<u8>,
        scales: &CudaSlice<u16>,
        zeros: &CudaSlice<u8>,
        x: &CudaView<'_, f32>,
        y: &mut CudaViewMut<'_, f32>,
        k: usize,
        m: usize,
        group: usize,
        ntok: usize,
    ) -> Result<()> {
        let cfg = Self::qgemv_config(m)?;
        let (k, m, g) = (i32_of(k, "in")?, i32_of(m, "out")?, i32_of(group, "group")?);
        let nt = i32_of(ntok, "tokens")?;
        launch!(self, name, cfg, packed, scales, zeros, x, y, &k, &m, &g, &nt)
    }

    /// Rows `row0 .. row0 + rows` of an int8 weight -> bf16 `w` `[rows, in]` (phi3_dequant_int8).
    pub(crate) fn launch_dequant_int8(
        &self,
        q: &CudaSlice<i8>,
        scales: &CudaSlice<f32>,
        w: &mut CudaSlice<u16>,
        row0: usize,
        rows: usize,
        k: usize,
    ) -> Result<()> {
        check_dequant(w, rows, k)?;
        let cfg = grid_stride(if k.is_multiple_of(8) { rows * k / 8 } else { rows * k });
        let (r0, r, k) = (i32_of(row0, "row")?, i32_of(rows, "rows")?, i32_of(k, "in")?);
        launch!(self, "phi3_dequant_int8", cfg, q, scales, w, &r0, &r, &k)
    }

    /// As [`launch_dequant_int8`](Self::launch_dequant_int8) for int4; `name` is
    /// phi3_dequant_int4_bf16 or phi3_dequant_int4_f16 (the scales' dtype).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_dequant_int4(
        &self,
        name: &str,
        packed: &CudaSlice<u8>,
        scales: &CudaSlice<u16>,
        zeros: &CudaSlice<u8>,
        w: &mut CudaSlice<u16>,
        row0: usize,
        rows: usize,
        k: usize,
        group: usize,
    ) -> Result<()> {
        check_dequant(w, rows, k)?;
        let cfg = grid_stride(rows * k / 8);
        let (r0, r, k) = (i32_of(row0, "row")?, i32_of(rows, "rows")?, i32_of(k, "in")?);
        let g = i32_of(group, "group")?;
        launch!(self, name, cfg, packed, scales, zeros, w, &r0, &r, &k, &g)
    }

    pub(crate) fn launch_fill_u8(&self, x: &mut CudaSlice<u8>, value: u8) -> Result<()> {
        let n = x.len() as u64;
        let cfg = grid_stride(x.len());
        launch!(self, "phi3_fill_u8", cfg, x, &n, &value)
    }

    /// Random bytes (phi3_fill_random_u8) into a buffer of 1-byte elements (u8 or i8).
    pub(crate) fn launch_fill_random_bytes<T: cudarc::driver::DeviceRepr>(
        &self,
        x: &mut CudaSlice<T>,
        seed: u64,
        tensor: u64,
    ) -> Result<()> {
        if std::mem::size_of::<T>() != 1 {
            return Err(Error::internal("phi3_fill_random_u8 fills 1-byte elements"));
        }
        let n = x.len() as u64;
        let cfg = grid_stride(x.len());
        launch!(self, "phi3_fill_random_u8", cfg, x, &n, &seed, &tensor)
    }

    /// `name` is phi3_f32_to_bf16 or phi3_f32_to_f16.
    pub(crate) fn launch_to_half(
        &self,
        name: &str,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<u16>,
        n: usize,
    ) -> Result<()> {
        let n64 = n as u64;
        launch!(self, name, grid_stride(n), x, y, &n64)
    }

    pub(crate) fn launch_swiglu(
        &self,
        gate_up: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        ffn: usize,
    ) -> Result<()> {
        let n = (rows * ffn) as u64;
        let ffn_i = i32_of(ffn, "ffn")?;
        launch!(self, "phi3_swiglu", grid_stride(rows * ffn), gate_up, out, &n, &ffn_i)
    }

    /// phi3_rope_store_kv over every row of a batch: grid (rows), block 256.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_rope_store_kv(
        &self,
        qkv: &CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        q_out: &mut CudaSlice<f32>,
        kv: &KvArgs<'_>,
        rows: usize,
        heads: (usize, usize, usize, usize), // (n_heads, n_kv_heads, head_dim, half)
    ) -> Result<()> {
        let (bps, bl, layer) = kv_ints(kv)?;
        let (nh, nkv) = (i32_of(heads.0, "n_heads")?, i32_of(heads.1, "n_kv_heads")?);
        let (hd, half) = (i32_of(heads.2, "head_dim")?, i32_of(heads.3, "rotary half")?);
        launch!(
            self,
            "phi3_rope_store_kv",
            per_row(rows, BLOCK)?,
            qkv,
            cos,
            sin,
            q_out,
            kv.slab_addrs,
            &kv.row_pos,
            &kv.row_table,
            &kv.tables,
            &bps,
            &bl,
            &layer,
            &nh,
            &nkv,
            &hd,
            &half
        )
    }

    /// The attention of a batch's rows by `kernel`: phi3_attention (grid (rows, n_kv_heads x the
    /// chunks of at most [`ATT_MAX_GROUP`] query heads that share a KV head, key slices), block
    /// 128), or the decode rows by phi3_attention_decode (grid (rows, n_kv_heads, key slices),
    /// block 128, [`ATTN_TC_SMEM_BYTES`] of dynamic shared memory; group of at most 16 query
    /// heads per KV head and head size as for prefill, checked by the caller).
    /// `splits` = (scratch slots, most slices of a row) of the batch (`CudaKvBatch::splits`);
    /// when there are slots, `split` holds the scratch (`[slots, n_heads, head_dim + 2]` f32) and
    /// the arrival counters (at least `rows` x the grid's y), by which the last slice of each
    /// split row and KV head merges them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_attention(
        &self,
        kernel: RowKernel,
        q: &CudaSlice<f32>,
        kv: &KvArgs<'_>,
        out: &mut CudaSlice<f32>,
        split: Option<(&mut CudaSlice<f32>, &CudaSlice<u32>)>,
        rows: usize,
        heads: (usize, usize, usize), // (n_heads, n_kv_heads, head_dim)
        scale: f32,
        window: Option<usize>,
        splits: (usize, usize),
    ) -> Result<()> {
        let (name, blocks_y, threads, smem) = match kernel {
            RowKernel::Scalar(_) => {
                let chunks = (heads.0 / heads.1.max(1)).div_ceil(ATT_MAX_GROUP);
                ("phi3_attention", heads.1 * chunks, ATT_THREADS, 0)
            }
            RowKernel::TensorCores { fast } => (
                if fast { "phi3_attention_decode_fast" } else { "phi3_attention_decode" },
                heads.1,
                ATTN_TC_THREADS,
                ATTN_TC_SMEM_BYTES,
            ),
        };
        let cfg = LaunchConfig {
            grid_dim: (
                u32_of(rows, "rows")?,
                u32_of(blocks_y, "heads")?,
                u32_of(splits.1.max(1), "key slices")?,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        let split_keys = i32_of(ATTN_SPLIT_KEYS, "keys per slice")?;
        let slots = i32_of(splits.0, "split slots")?;
        let (bps, bl, layer) = kv_ints(kv)?;
        let (nh, nkv, hd) = head_ints(heads)?;
        let window = window_arg(window);
        let null = 0u64; // no split rows: NULL pointers the kernel never reads
        macro_rules! attention_with {
            ($part:expr, $tickets:expr $(, $skip:expr)?) => {
                launch!(
                    self,
                    name,
                    cfg,
                    q,
                    kv.slab_addrs,
                    &kv.row_pos,
                    &kv.row_table,
                    &kv.row_split,
                    &kv.tables,
                    out,
                    $part,
                    $tickets,
                    &bps,
                    &bl,
                    &layer,
                    &nh,
                    &nkv,
                    &hd,
                    &scale,
                    &window,
                    &split_keys,
                    &slots
                    $(, $skip)?
                )
            };
        }
        match (kernel, split) {
            (RowKernel::Scalar(skip), split) => {
                let skip = i32::from(skip.prefill) | (i32::from(skip.decode) << 1);
                match split {
                    Some((part, tickets)) => attention_with!(part, tickets, &skip),
                    None => attention_with!(&null, &null, &skip),
                }
            }
            (RowKernel::TensorCores { .. }, Some((part, tickets))) => {
                attention_with!(part, tickets)
            }
            (RowKernel::TensorCores { .. }, None) => attention_with!(&null, &null),
        }
    }

    /// phi3_attention_prefill (or `_fast`) over the batch's prefill tiles: grid (tiles, n_heads),
    /// block 128, [`ATTN_TC_SMEM_BYTES`] of dynamic shared memory. The head size is a multiple
    /// of 16 up to [`ATTN_TC_MAX_HEAD_DIM`] (checked by the caller).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_attention_prefill(
        &self,
        fast: bool,
        q: &CudaSlice<f32>,
        kv: &KvArgs<'_>,
        out: &mut CudaSlice<f32>,
        tiles: usize,
        heads: (usize, usize, usize), // (n_heads, n_kv_heads, head_dim)
        scale: f32,
        window: Option<usize>,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (u32_of(tiles, "prefill tiles")?, u32_of(heads.0, "heads")?, 1),
            block_dim: (ATTN_TC_THREADS, 1, 1),
            shared_mem_bytes: ATTN_TC_SMEM_BYTES,
        };
        let (bps, bl, layer) = kv_ints(kv)?;
        let (nh, nkv, hd) = head_ints(heads)?;
        let window = window_arg(window);
        let name = if fast { "phi3_attention_prefill_fast" } else { "phi3_attention_prefill" };
        launch!(
            self,
            name,
            cfg,
            q,
            kv.slab_addrs,
            &kv.row_pos,
            &kv.row_table,
            &kv.tiles,
            &kv.tables,
            out,
            &bps,
            &bl,
            &layer,
            &nh,
            &nkv,
            &hd,
            &scale,
            &window
        )
    }

    /// phi3_copy_kv_blocks of `n_pairs` independent (source, destination) pairs:
    /// grid (n_pairs, chunks), block 256.
    pub(crate) fn launch_copy_kv_blocks(
        &self,
        slab_addrs: &CudaSlice<u64>,
        pairs: &CudaView<'_, u32>,
        n_pairs: usize,
        blocks_per_slab: usize,
        block_len: usize,
    ) -> Result<()> {
        // 16-byte units of a block, shared by up to KV_COPY_CHUNKS blocks of threads.
        let units = block_len / 8;
        let chunks = units.div_ceil(BLOCK as usize).clamp(1, KV_COPY_CHUNKS) as u32;
        let cfg = LaunchConfig {
            grid_dim: (u32_of(n_pairs, "block pairs")?, chunks, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let bps = i32_of(blocks_per_slab, "blocks per slab")?;
        let bl = i32_of(block_len, "block length")?;
        launch!(self, "phi3_copy_kv_blocks", cfg, slab_addrs, pairs, &bps, &bl)
    }

    /// `name` is phi3_fill_dummy_<dtype>.
    pub(crate) fn launch_fill_dummy<T>(
        &self,
        name: &str,
        out: &mut CudaSlice<T>,
        seed: u64,
        tensor: u64,
        center: f32,
        half_width: f32,
    ) -> Result<()> {
        let n = out.len() as u64;
        let cfg = grid_stride(out.len());
        launch!(self, name, cfg, out, &n, &seed, &tensor, &center, &half_width)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The launchers' constants are attention.cu's.
    #[test]
    fn attention_constants_match_the_kernel_source() {
        let source = include_str!("../../../../kernels/attention.cu");
        assert!(source.contains(&format!("#define ATT_THREADS {ATT_THREADS}\n")));
        assert!(source.contains(&format!("#define ATT_MAX_GROUP {ATT_MAX_GROUP}\n")));
    }

    /// The prefill launcher's and batch descriptor's constants are attention_tc.cu's.
    #[test]
    fn prefill_attention_constants_match_the_kernel_source() {
        let source = include_str!("../../../../kernels/attention_tc.cu");
        for define in [
            format!(
                "#define AP_THREADS (32 * AP_WARPS)\n#define AP_ROWS {}\n",
                super::super::kv::ATTN_PREFILL_ROWS
            ),
            format!("#define AP_HD_MAX {ATTN_TC_MAX_HEAD_DIM}\n"),
            format!("#define AP_SMEM_BYTES {ATTN_TC_SMEM_BYTES}\n"),
        ] {
            assert!(source.contains(&define), "attention_tc.cu lacks {define:?}");
        }
        assert_eq!(ATTN_TC_THREADS, 32 * 4, "AP_WARPS = 4");
        assert!(source.contains("#define AP_WARPS 4\n"));
    }
}
