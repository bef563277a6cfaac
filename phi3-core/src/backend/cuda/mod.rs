//! The CUDA backend: the [`Backend`] operations on an NVIDIA GPU (sm_80 and newer).
//!
//! Everything is reached through cudarc with dynamic loading: libcuda, libnvrtc and libcublas are
//! dlopen()ed when a CUDA device is requested (`context.rs`), so the crate builds and the CPU
//! backend runs on machines without CUDA. Kernels are CUDA C++ in `kernels/*.cu`, compiled by
//! NVRTC for the device at load time and cached on disk (`kernels.rs`).
//!
//! Numerics: activations (and the residual stream) are f32. `linear` (`linear.rs`) rounds the
//! activations to the weight's dtype (bf16/f16) and multiplies with f32 accumulation: the decode
//! rows of a pass (sequences adding at most `GEMV_SPAN` tokens, a solo decode step included) in one
//! launch of the tensor-core decode GEMM (`kernels/decode_gemm.cu`), whose summation order per row
//! does not depend on the number of rows, and each prefill chunk in its own cuBLAS call, so that a
//! sequence's results in a batch equal its solo run bit for bit (`phi3 gpu-check` tests exactly
//! that; it has not run on a GPU yet). f32 weights, and `in` not a
//! multiple of 32, take one f32 GEMV per decode row. The KV cache is a paged pool of bf16 blocks
//! (`kv.rs`; half the memory of f32: a 128k context of Phi-3-medium takes 25 GiB next to 28 GiB
//! of weights); attention reads it in f32, every sequence of a batch in one launch through its
//! block table.
//!
//! Quantized projections (int8, int4; `quant.rs`): decode rows run a GEMV that dequantizes in
//! registers, up to 8 rows per launch with each row's sums independent of the others (batch
//! invariant); prefill chunks dequantize blocks of weight rows to bf16 in a bounded workspace and
//! take the bf16 cuBLAS path, one call per chunk.
//!
//! Files: `context.rs` (device, stream), `error.rs` (error mapping, panic guard), `nvrtc.rs` and
//! `kernels.rs` (compile, cache, load), `memory.rs` (estimate, default KV budget), `upload.rs`
//! (staging, dummy weights), `graph.rs` (CUDA graphs of decode passes), `quant.rs` (quantized
//! weights and their `linear`), `kv.rs` (the KV
//! pool, its host transfers and the per-pass batch descriptor), `linear.rs` (the projections'
//! row kinds apart), `blas.rs` (cuBLAS GEMM), `ops.rs`
//! (kernel launchers); this file holds the activation and weight types and the trait methods,
//! which validate their inputs before launching.
//!
//! Attention runs on tensor cores (`kernels/attention_tc.cu`) when the head size is a multiple of
//! 16 up to 128: prefill rows (sequences adding more than `GEMV_SPAN` rows) in tiles of 64 query
//! rows, decode rows with the query heads of a KV head as the mma's rows, q and p split into two
//! bf16 terms each so that it keeps f32 accuracy ([`AttentionKernel`] picks the one-term variant
//! or the f32 kernel of `kernels/attention.cu` instead, for checks and benchmarks). A decode row's
//! keys split into slices of `ATTN_SPLIT_KEYS` past that many (flash-decoding; `kv.rs`), so one
//! long sequence uses many SMs.
//!
//! CUDA graphs (`graph.rs`): `Backend::run_pass` can capture a pass of decode steps once per shape
//! and replay it as one graph launch; off by default (`set_cuda_graphs`) until verified on a GPU.

mod blas;
mod context;
mod error;
mod graph;
pub mod kernels;
mod kv;
mod linear;
pub mod memory;
mod nvrtc;
mod ops;
mod outputs;
pub mod quant;
mod upload;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, DeviceRepr};
use half::bf16;

pub use self::context::device_count;
use self::context::DeviceContext;
use self::error::{guard, DriverResultExt};
pub use self::graph::GraphStats;
pub use self::kernels::KernelStatus;
pub use self::kv::{CudaKvBatch, CudaKvPool, KV_SLAB_BYTES};
use self::linear::DenseInput;
use self::ops::{RowKernel, SkipRows};
pub use self::upload::dummy_value;
use super::{AttnParams, Backend, KvLayout, LinearRows, OutputKind, SeqOutput, SeqSpan};
use crate::error::{Error, ErrorKind, Result};
use crate::loader::{DType, HostTensor, QuantizedTensor, WeightFormat};
use crate::rope::RopeBatch;

/// bf16 NaN: poisons fresh KV storage in checks.
const BF16_NAN: u16 = 0x7fc0;

/// Which kernels compute attention (kernels/attention_tc.cu, kernels/attention.cu). Shapes the
/// tensor-core kernels do not take (a head size not a multiple of 16 or above 128; for decode rows
/// also more than 16 query heads per KV head) always use [`AttentionKernel::Scalar`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Tensor cores for prefill and decode rows, q and p each split into two bf16 terms: f32
    /// accuracy (the default).
    TensorCores,
    /// Tensor cores, q and p rounded to bf16 once (FlashAttention-2's precision), half the tensor
    /// work.
    TensorCoresFast,
    /// The f32 kernel, one block per row and KV head (and key slice).
    Scalar,
}

/// The CUDA backend on one device. Create with [`CudaBackend::new`].
pub struct CudaBackend {
    dev: DeviceContext,
    blas: blas::Blas,
    kernels: kernels::Kernels,
    /// Bytes of weights held on the device.
    weight_bytes: AtomicU64,
    /// Bytes of KV storage held by all live pools (shared with each [`CudaKvPool`]).
    kv_bytes: Arc<AtomicU64>,
    /// Fill every new activation with NaN and new KV storage with bf16 NaN (checks only).
    poison: AtomicBool,
    /// Blocks per slab of pools created from now on; 0: about [`KV_SLAB_BYTES`] (checks set it).
    kv_slab_blocks: AtomicUsize,
    /// [`AttentionKernel`] as its index (checks and benchmarks set it).
    attention_kernel: AtomicU8,
    /// The estimate of the last [`CudaBackend::check_memory`]: its working memory is kept free
    /// by [`Backend::default_kv_budget`].
    memory_need: Mutex<Option<memory::MemoryEstimate>>,
    /// bf16 rows of a quantized weight for the prefill GEMM (`quant.rs`); grown on demand up to
    /// `quant::DEQUANT_WORKSPACE_BYTES`, shared by every weight and call.
    workspace: Mutex<Option<CudaSlice<u16>>>,
    /// Bytes held by `workspace`.
    workspace_bytes: AtomicU64,
    /// Arrival counters of the kernels whose last block per tile reduces the others' partials
    /// (`last_arrival` in kernels/common.cuh): zero when allocated and left zero by every
    /// launch, so one array serves all launches on the stream. Grown on demand.
    tickets: Mutex<Option<CudaSlice<u32>>>,
    /// Kernels launched and host-to-device copies made through `htod` so far (benchmarks
    /// report them per decode step: every one is a gap in the stream that a fused kernel or a
    /// CUDA graph would close).
    launches: AtomicU64,
    uploads: AtomicU64,
    /// CUDA graphs of decode passes (`graph.rs`): whether to use them, whether one is being
    /// captured now, the graphs and their input buffers, and the generations of the buffers
    /// their kernels read (bumped when a KV pool's slab table or the arrival counters are
    /// reallocated).
    use_graphs: AtomicBool,
    capturing: AtomicBool,
    graphs: Mutex<graph::Graphs>,
    kv_epoch: AtomicU64,
    tickets_epoch: AtomicU64,
}

/// f32 activations on the device, row-major `[rows, cols]`.
pub struct CudaAct {
    rows: usize,
    cols: usize,
    buf: CudaSlice<f32>, // [rows * cols] (at least 1 element)
}

/// A weight on the device.
pub struct CudaWeight {
    /// `out_features` of a matrix, 1 for a vector.
    rows: usize,
    /// `in_features` of a matrix, the length of a vector.
    cols: usize,
    data: WeightData,
}

/// Weight storage: matrices in their file dtype or quantized, vectors in f32.
enum WeightData {
    Bf16(CudaSlice<u16>), // [rows * cols], bf16 bit patterns
    F16(CudaSlice<u16>),  // [rows * cols], f16 bit patterns
    F32(CudaSlice<f32>),  // [rows * cols]
    Quant(quant::QuantWeight),
}

impl CudaAct {
    /// Number of rows (tokens).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Width of every row.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

impl CudaWeight {
    fn bytes(&self) -> u64 {
        match &self.data {
            WeightData::Bf16(b) | WeightData::F16(b) => 2 * b.len() as u64,
            WeightData::F32(b) => 4 * b.len() as u64,
            WeightData::Quant(q) => q.bytes(),
        }
    }

    /// How the weight is stored: `Native` for a file dtype, else its quantized format.
    pub fn format(&self) -> WeightFormat {
        match &self.data {
            WeightData::Quant(q) => q.format(),
            _ => WeightFormat::Native,
        }
    }

    fn f32_vector(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            WeightData::F32(b) if self.rows == 1 => Ok(b),
            _ => Err(Error::internal(format!("{what}: expected an f32 vector weight"))),
        }
    }
}

/// Device facts and memory use, for `phi3 info` and `phi3 bench`.
#[derive(Clone, Debug)]
pub struct CudaStats {
    /// e.g. "cuda:0 (NVIDIA H100 80GB HBM3, sm_90)".
    pub device: String,
    /// Free device memory in bytes, when the driver answered.
    pub free_memory: Option<u64>,
    /// Total device memory in bytes.
    pub total_memory: u64,
    /// Bytes of weights on the device.
    pub weight_bytes: u64,
    /// Bytes of KV storage held by all live KV pools (every block allocated, in use or free).
    pub kv_bytes: u64,
    /// Bytes of the dequantization workspace of quantized weights (0 until a prefill needs it).
    pub workspace_bytes: u64,
    /// How the kernels were obtained.
    pub kernels: KernelStatus,
    /// Kernels launched since the backend was created.
    pub kernel_launches: u64,
    /// Host-to-device copies of per-pass data (token ids, batch descriptors, rotary tables,
    /// row lists) since the backend was created; weight uploads are not counted.
    pub host_copies: u64,
    /// Decode passes run as CUDA graphs (kernels replayed by a graph are not in
    /// `kernel_launches`).
    pub graphs: GraphStats,
}

impl CudaBackend {
    /// Open CUDA device `ordinal` and load the kernels (compiled by NVRTC, or from the disk cache).
    ///
    /// Errors: `Unsupported` without a CUDA driver or NVRTC, or for a device older than sm_80;
    /// `Device` when the driver reports no such device or a kernel fails to compile or load.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        let dev = DeviceContext::open(ordinal)?;
        let kernels = kernels::Kernels::load(&dev.ctx, dev.arch).map_err(|e| {
            e.context(format!("cuda:{ordinal}: loading kernels for sm_{}", dev.arch))
        })?;
        let blas = blas::Blas::new(dev.stream.clone())?;
        Ok(CudaBackend {
            dev,
            blas,
            kernels,
            weight_bytes: AtomicU64::new(0),
            kv_bytes: Arc::new(AtomicU64::new(0)),
            poison: AtomicBool::new(false),
            kv_slab_blocks: AtomicUsize::new(0),
            attention_kernel: AtomicU8::new(0),
            memory_need: Mutex::new(None),
            workspace: Mutex::new(None),
            workspace_bytes: AtomicU64::new(0),
            tickets: Mutex::new(None),
            launches: AtomicU64::new(0),
            uploads: AtomicU64::new(0),
            use_graphs: AtomicBool::new(false),
            capturing: AtomicBool::new(false),
            graphs: Mutex::new(graph::Graphs::default()),
            kv_epoch: AtomicU64::new(0),
            tickets_epoch: AtomicU64::new(0),
        })
    }

    /// Device facts and current memory use.
    pub fn stats(&self) -> CudaStats {
        CudaStats {
            device: self.name(),
            free_memory: self.dev.memory_info().ok().map(|(free, _)| free),
            total_memory: self.dev.total_memory,
            weight_bytes: self.weight_bytes.load(Ordering::Relaxed),
            kv_bytes: self.kv_bytes.load(Ordering::Relaxed),
            workspace_bytes: self.workspace_bytes.load(Ordering::Relaxed),
            kernels: self.kernels.status.clone(),
            kernel_launches: self.launches.load(Ordering::Relaxed),
            host_copies: self.uploads.load(Ordering::Relaxed),
            graphs: self.graph_stats(),
        }
    }

    /// `OutOfMemory`, naming the numbers, when `need` exceeds the device's free memory. Also
    /// remembers `need`, whose working memory and dequantization workspace
    /// [`Backend::default_kv_budget`] then keeps free (see [`memory::kv_budget`]).
    pub fn check_memory(&self, need: &memory::MemoryEstimate) -> Result<()> {
        *self.memory_need.lock().unwrap_or_else(|e| e.into_inner()) = Some(*need);
        let (free, total) = self.dev.memory_info()?;
        memory::check(&self.name(), need, free, total)
    }

    /// Checks only: fill every activation and KV block allocated from now on with NaN, so a
    /// kernel that leaves part of its output unwritten shows up as NaN in the result.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// Checks only: KV pools created from now on put `blocks` blocks in each slab (0: the
    /// default, about [`KV_SLAB_BYTES`] a slab), so that a small pool spans several slabs.
    pub fn set_kv_slab_blocks(&self, blocks: usize) {
        self.kv_slab_blocks.store(blocks, Ordering::Relaxed);
    }

    /// Which kernels compute attention from now on (default [`AttentionKernel::TensorCores`]);
    /// checks and benchmarks compare them.
    pub fn set_attention_kernel(&self, kind: AttentionKernel) {
        self.attention_kernel.store(kind as u8, Ordering::Relaxed);
    }

    /// The kernels that compute attention now.
    pub fn attention_kernel(&self) -> AttentionKernel {
        match self.attention_kernel.load(Ordering::Relaxed) {
            0 => AttentionKernel::TensorCores,
            1 => AttentionKernel::TensorCoresFast,
            _ => AttentionKernel::Scalar,
        }
    }

    /// Activations `[rows, cols]` from host data (checks and tests).
    ///
    /// Errors: `Internal` when `data.len() != rows * cols`; device errors.
    pub fn act_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CudaAct> {
        if data.len() != rows * cols {
            return Err(Error::internal(format!(
                "{} values do not fill [{rows}, {cols}]",
                data.len()
            )));
        }
        let mut buf = self.alloc_f32(rows * cols, "activations")?;
        if !data.is_empty() {
            self.dev.stream.memcpy_htod(data, &mut buf).ctx("activations to the device")?;
        }
        Ok(CudaAct { rows, cols, buf })
    }

    /// A weight generated on the device (see `upload.rs`): `index` is the tensor's position in
    /// load order, so every tensor gets different values.
    pub fn dummy_weight(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        seed: u64,
        index: u64,
    ) -> Result<CudaWeight> {
        self.dummy_tensor(name, shape, dtype, seed, index)
    }

    /// A weight's elements widened to f32 on the host (checks and tests); quantized weights
    /// dequantized as `QuantizedTensor::dequantize` does.
    pub fn weight_to_host(&self, w: &CudaWeight) -> Result<Vec<f32>> {
        let out = match &w.data {
            WeightData::Quant(_) => match self.quantized_to_host(w)? {
                Some(q) => q.dequantize(),
                None => return Err(Error::internal("quantized weight without data")),
            },
            WeightData::F32(b) => self.dtoh(b)?,
            WeightData::Bf16(b) => {
                self.dtoh(b)?.into_iter().map(|x| bf16::from_bits(x).to_f32()).collect()
            }
            WeightData::F16(b) => {
                self.dtoh(b)?.into_iter().map(|x| half::f16::from_bits(x).to_f32()).collect()
            }
        };
        Ok(out)
    }

    /// `out` = the rows of `table` named by the first `out.rows` of `ids` (on the device).
    fn embed_ids(&self, table: &CudaWeight, ids: &CudaSlice<u32>, out: &mut CudaAct) -> Result<()> {
        let (n, cols) = (out.rows, table.cols);
        match &table.data {
            WeightData::Bf16(t) => {
                self.launch_gather("phi3_embed_bf16", t, ids, &mut out.buf, n, cols)
            }
            WeightData::F16(t) => {
                self.launch_gather("phi3_embed_f16", t, ids, &mut out.buf, n, cols)
            }
            WeightData::F32(t) => {
                self.launch_gather("phi3_embed_f32", t, ids, &mut out.buf, n, cols)
            }
            WeightData::Quant(_) => Err(Error::internal("embed: the embedding table is quantized")),
        }
    }

    fn add_weight_bytes(&self, w: &CudaWeight) {
        self.weight_bytes.fetch_add(w.bytes(), Ordering::Relaxed);
    }

    fn alloc<T: DeviceRepr>(&self, n: usize, what: &str) -> Result<CudaSlice<T>> {
        // SAFETY: uninitialised device memory; every kernel writes its whole output before
        // anything reads it, and KV positions past a cache's length are never read.
        let r = guard(what, || unsafe { self.dev.stream.alloc::<T>(n.max(1)) }.ctx(what));
        r.map_err(|e| {
            if e.kind() == ErrorKind::OutOfMemory {
                let free = self
                    .dev
                    .memory_info()
                    .map_or(String::new(), |(f, _)| format!(" ({} MiB free)", f >> 20));
                Error::new(
                    ErrorKind::OutOfMemory,
                    format!(
                        "{}: out of device memory allocating {} MiB for {what}{free}",
                        self.name(),
                        (n * std::mem::size_of::<T>()) >> 20
                    ),
                )
            } else {
                e
            }
        })
    }

    /// Run `f` with at least `n` arrival counters (see the `tickets` field), all zero.
    fn with_tickets<R>(&self, n: usize, f: impl FnOnce(&CudaSlice<u32>) -> Result<R>) -> Result<R> {
        let mut held = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        if held.as_ref().is_none_or(|t| t.len() < n) {
            self.refuse_in_capture("growing the arrival counters")?;
            self.tickets_epoch.fetch_add(1, Ordering::Relaxed);
            // Dropping the old array frees it in stream order, after the launches that use it.
            let len = n.next_power_of_two().max(1024);
            let fresh = self.dev.stream.alloc_zeros::<u32>(len).ctx("arrival counters")?;
            *held = Some(fresh);
        }
        match held.as_ref() {
            Some(tickets) => f(tickets),
            None => Err(Error::internal("arrival counters missing")),
        }
    }

    fn alloc_f32(&self, n: usize, what: &str) -> Result<CudaSlice<f32>> {
        let mut b = self.alloc::<f32>(n, what)?;
        if self.poison.load(Ordering::Relaxed) {
            self.launch_fill_f32(&mut b, f32::NAN)?;
        }
        Ok(b)
    }

    fn alloc_u16(&self, n: usize, what: &str) -> Result<CudaSlice<u16>> {
        let mut b = self.alloc::<u16>(n, what)?;
        if self.poison.load(Ordering::Relaxed) {
            self.launch_fill_u16(&mut b, BF16_NAN)?;
        }
        Ok(b)
    }

    fn act(&self, rows: usize, cols: usize, what: &str) -> Result<CudaAct> {
        Ok(CudaAct { rows, cols, buf: self.alloc_f32(rows * cols, what)? })
    }

    fn htod<T: DeviceRepr>(&self, data: &[T], what: &str) -> Result<CudaSlice<T>> {
        self.refuse_in_capture(what)?;
        let mut buf = self.alloc::<T>(data.len(), what)?;
        if !data.is_empty() {
            self.uploads.fetch_add(1, Ordering::Relaxed);
            self.dev.stream.memcpy_htod(data, &mut buf).ctx(what)?;
        }
        Ok(buf)
    }

    /// Copy a whole buffer to the host and wait for it (and for all earlier work).
    fn dtoh<T: DeviceRepr + Default + Clone>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.dtoh_prefix(buf, buf.len())
    }

    /// The first `n` values of `buf` on the host, once all earlier work is done.
    fn dtoh_prefix<T: DeviceRepr + Default + Clone>(
        &self,
        buf: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        if n > 0 {
            self.dev.stream.memcpy_dtoh(&buf.slice(0..n), &mut out).ctx("copy to the host")?;
        }
        self.synchronize()?;
        Ok(out)
    }

    /// Wait for all queued work; report errors recorded by cudarc where it could not return them
    /// (e.g. in a buffer's drop).
    pub fn synchronize(&self) -> Result<()> {
        self.dev.stream.synchronize().ctx("synchronize")?;
        self.dev.ctx.check_err().ctx("deferred error")
    }

    /// `x` rounded to `name`'s 16-bit type (phi3_f32_to_bf16 / phi3_f32_to_f16).
    fn to_half(&self, x: &CudaAct, name: &str) -> Result<CudaSlice<u16>> {
        let n = x.rows * x.cols;
        let mut y = self.alloc_u16(n, "GEMM input")?;
        self.launch_to_half(name, &x.buf, &mut y, n)?;
        Ok(y)
    }
}

/// Which attention kernels a pass launches: the row kernels (phi3_attention and/or
/// phi3_attention_decode, in that order), then phi3_attention_prefill when
/// `prefill_tensor_cores` is `Some(fast)`.
#[derive(Debug, PartialEq)]
struct AttnPlan {
    row_kernels: Vec<RowKernel>,
    prefill_tensor_cores: Option<bool>,
}

impl AttnPlan {
    /// The plan for `rows` rows of which `prefill_rows` are prefill rows. kernels/attention_tc.cu
    /// needs a head size that is a multiple of 16 up to 128, and for decode rows at most 16
    /// query heads per KV head; everything else, or `kind` Scalar, takes phi3_attention.
    fn new(kind: AttentionKernel, p: &AttnParams, rows: usize, prefill_rows: usize) -> AttnPlan {
        let fast = kind == AttentionKernel::TensorCoresFast;
        let tc_shape = kind != AttentionKernel::Scalar
            && p.head_dim.is_multiple_of(16)
            && p.head_dim <= ops::ATTN_TC_MAX_HEAD_DIM;
        let decode_rows = rows - prefill_rows;
        let tc_prefill = tc_shape && prefill_rows > 0;
        let tc_decode = tc_shape && decode_rows > 0 && p.n_heads / p.n_kv_heads.max(1) <= 16;
        let mut row_kernels = Vec::with_capacity(2);
        if (prefill_rows > 0 && !tc_prefill) || (decode_rows > 0 && !tc_decode) {
            row_kernels
                .push(RowKernel::Scalar(SkipRows { prefill: tc_prefill, decode: tc_decode }));
        }
        if tc_decode {
            row_kernels.push(RowKernel::TensorCores { fast });
        }
        AttnPlan { row_kernels, prefill_tensor_cores: tc_prefill.then_some(fast) }
    }
}

fn check_attn(p: &AttnParams) -> Result<()> {
    if p.head_dim > 256
        || p.n_kv_heads == 0
        || (p.n_heads / p.n_kv_heads) * p.n_kv_heads != p.n_heads
    {
        return Err(Error::unsupported(format!(
            "CUDA attention supports head_dim <= 256 and n_heads a multiple of n_kv_heads \
             (got head_dim {}, {} heads, {} kv heads)",
            p.head_dim, p.n_heads, p.n_kv_heads
        )));
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Act = CudaAct;
    type Weight = CudaWeight;
    type KvPool = CudaKvPool;
    type KvBatch = CudaKvBatch;

    fn name(&self) -> String {
        format!("cuda:{} ({}, sm_{})", self.dev.ordinal, self.dev.name, self.dev.arch)
    }

    fn upload(&self, tensor: &HostTensor) -> Result<CudaWeight> {
        self.upload_tensor(tensor)
    }

    fn upload_quantized(&self, q: QuantizedTensor) -> Result<CudaWeight> {
        self.upload_quantized_tensor(q)
    }

    fn new_kv_pool(&self, layout: &KvLayout) -> Result<CudaKvPool> {
        self.new_pool(layout)
    }

    /// The device memory free now less a reserve: 1 GiB of headroom plus the working memory
    /// and the not yet allocated dequantization workspace of the last
    /// [`check_memory`](CudaBackend::check_memory) estimate (activations of one prefill chunk,
    /// cuBLAS workspace, modules; 2 GiB when there was none). See [`memory::kv_budget`]. `None`
    /// (no limit but allocation failure) when the driver cannot say what is free.
    fn default_kv_budget(&self) -> Option<u64> {
        let (free, _) = self.dev.memory_info().ok()?;
        let need = *self.memory_need.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.workspace_bytes.load(Ordering::Relaxed);
        Some(memory::kv_budget(free, need.as_ref(), held))
    }

    fn kv_pool_blocks(&self, pool: &CudaKvPool) -> usize {
        pool.blocks()
    }

    fn grow_kv_pool(
        &self,
        pool: &mut CudaKvPool,
        min_blocks: usize,
        max_blocks: usize,
    ) -> Result<usize> {
        self.grow_pool(pool, min_blocks, max_blocks)
    }

    fn copy_kv_blocks(&self, pool: &mut CudaKvPool, pairs: &[(u32, u32)]) -> Result<()> {
        self.copy_blocks(pool, pairs)
    }

    fn kv_to_host(&self, pool: &CudaKvPool, blocks: &[u32], n_tokens: usize) -> Result<Vec<f32>> {
        self.pool_to_host(pool, blocks, n_tokens)
    }

    fn kv_from_host(
        &self,
        pool: &mut CudaKvPool,
        blocks: &[u32],
        n_tokens: usize,
        data: &[f32],
    ) -> Result<()> {
        self.pool_from_host(pool, blocks, n_tokens, data)
    }

    fn kv_batch(&self, seqs: &[SeqSpan], blocks: &[&[u32]]) -> Result<CudaKvBatch> {
        self.build_kv_batch(seqs, blocks)
    }

    fn embed(&self, table: &CudaWeight, tokens: &[u32]) -> Result<CudaAct> {
        let mut out = self.act(tokens.len(), table.cols, "embeddings")?;
        let n = tokens.len();
        if n == 0 {
            // No launch: a grid of max(1, n) blocks would read an id that is not there.
            return Ok(out);
        }
        let ids = self.htod(tokens, "token ids")?;
        self.embed_ids(table, &ids, &mut out)?;
        Ok(out)
    }

    fn embed_pass(
        &self,
        table: &CudaWeight,
        tokens: &[u32],
        batch: &CudaKvBatch,
    ) -> Result<CudaAct> {
        let Some(ids) = batch.staged_ids() else {
            return self.embed(table, tokens);
        };
        let rows = batch.rows();
        if rows != tokens.len() {
            return Err(Error::internal(format!(
                "embed_pass: {} tokens for a staged batch of {rows} rows",
                tokens.len()
            )));
        }
        let mut out = self.act(rows, table.cols, "embeddings")?;
        if rows > 0 {
            self.embed_ids(table, ids, &mut out)?;
        }
        Ok(out)
    }

    fn run_pass(
        &self,
        batch: &CudaKvBatch,
        tokens: &[u32],
        rope: &RopeBatch,
        outputs: &[OutputKind],
        out_cols: usize,
        pass: &mut dyn FnMut(&CudaKvBatch) -> Result<CudaAct>,
    ) -> Result<Vec<SeqOutput>> {
        self.run_pass_cuda(batch, tokens, rope, outputs, out_cols, pass)
    }

    fn rms_norm(
        &self,
        residual: &mut CudaAct,
        delta: Option<&CudaAct>,
        weight: &CudaWeight,
        eps: f32,
    ) -> Result<CudaAct> {
        let w = weight.f32_vector("rms_norm weight")?;
        if weight.cols != residual.cols
            || delta.is_some_and(|d| d.rows != residual.rows || d.cols != residual.cols)
        {
            return Err(Error::internal("rms_norm: shapes differ"));
        }
        let mut out = self.act(residual.rows, residual.cols, "rms_norm output")?;
        let (rows, cols) = (residual.rows, residual.cols);
        if rows == 0 {
            return Ok(out);
        }
        self.launch_rms_norm(
            &mut residual.buf,
            delta.map(|d| &d.buf),
            w,
            &mut out.buf,
            rows,
            cols,
            eps,
        )?;
        Ok(out)
    }

    /// Decode rows through the batch-invariant decode GEMM, prefill chunks through one cuBLAS
    /// call each (`linear.rs`); quantized weights in `quant.rs`.
    fn linear(&self, x: &CudaAct, w: &CudaWeight, rows: &LinearRows) -> Result<CudaAct> {
        if x.cols != w.cols || rows.total() != x.rows {
            return Err(Error::internal(format!(
                "linear: input [{}, {}] ({} rows described) vs weight [{}, {}]",
                x.rows,
                x.cols,
                rows.total(),
                w.rows,
                w.cols
            )));
        }
        let mut y = self.act(x.rows, w.rows, "linear output")?;
        if x.rows == 0 || w.rows == 0 {
            return Ok(y);
        }
        match &w.data {
            WeightData::Quant(q) => self.linear_quant(x, q, rows, &mut y)?,
            dense => self.linear_dense(DenseInput::Rows(x), dense, rows, &mut y)?,
        }
        Ok(y)
    }

    fn rope_store_kv(
        &self,
        qkv: &CudaAct,
        batch: &CudaKvBatch,
        rope: &RopeBatch,
        pool: &mut CudaKvPool,
        layer: usize,
        params: &AttnParams,
    ) -> Result<CudaAct> {
        check_attn(params)?;
        let (hd, half) = (params.head_dim, rope.half);
        let q_dim = params.n_heads * hd;
        let kv_dim = params.n_kv_heads * hd;
        if qkv.cols != q_dim + 2 * kv_dim
            || rope.len() != qkv.rows
            || batch.rows() != qkv.rows
            || 2 * half > hd
        {
            return Err(Error::internal(format!(
                "rope_store_kv: qkv [{}, {}], {} rope rows, {} batch rows, rotary half {half}, \
                 head_dim {hd}",
                qkv.rows,
                qkv.cols,
                rope.len(),
                batch.rows()
            )));
        }
        let mut q = self.act(qkv.rows, q_dim, "rotated q")?;
        if qkv.rows == 0 {
            return Ok(q);
        }
        let kv = pool.args(batch, layer, kv_dim, "rope_store_kv")?;
        let tables = self.rope_on_device(batch, rope)?;
        let (cos, sin) = (&tables.cos, &tables.sin);
        let heads = (params.n_heads, params.n_kv_heads, hd, half);
        self.launch_rope_store_kv(&qkv.buf, cos, sin, &mut q.buf, &kv, qkv.rows, heads)?;
        Ok(q)
    }

    fn attention(
        &self,
        q: &CudaAct,
        batch: &CudaKvBatch,
        pool: &CudaKvPool,
        layer: usize,
        params: &AttnParams,
    ) -> Result<CudaAct> {
        check_attn(params)?;
        let q_dim = params.n_heads * params.head_dim;
        if q.cols != q_dim || batch.rows() != q.rows {
            return Err(Error::internal(format!(
                "attention: q [{}, {}], {} batch rows, {q_dim} expected columns",
                q.rows,
                q.cols,
                batch.rows()
            )));
        }
        let mut out = self.act(q.rows, q_dim, "attention output")?;
        if q.rows == 0 {
            return Ok(out);
        }
        let kv = pool.args(batch, layer, params.n_kv_heads * params.head_dim, "attention")?;
        let (n_heads, head_dim) = (params.n_heads, params.head_dim);
        let heads = (n_heads, params.n_kv_heads, head_dim);
        let splits = batch.splits();
        // Split decode rows' slices (kernels/attention.cu): accumulators, then max and sum.
        let mut part = match splits.0 {
            0 => None,
            slots => Some(self.alloc::<f32>(slots * n_heads * (head_dim + 2), "attention slices")?),
        };
        let (scale, window) = (params.scale, params.sliding_window);
        let (rows, buf) = (q.rows, &mut out.buf);
        let plan = AttnPlan::new(self.attention_kernel(), params, rows, batch.prefill_rows());
        // With split rows, one arrival counter per row and block column of either row kernel
        // (at most n_heads of them).
        let counters = if part.is_some() { rows * n_heads } else { 0 };
        self.with_tickets(counters, |tickets| {
            for kernel in plan.row_kernels {
                let split = part.as_mut().map(|p| (p, tickets));
                self.launch_attention(
                    kernel, &q.buf, &kv, buf, split, rows, heads, scale, window, splits,
                )?;
            }
            Ok(())
        })?;
        if let Some(fast) = plan.prefill_tensor_cores {
            let tiles = batch.prefill_tiles();
            self.launch_attention_prefill(fast, &q.buf, &kv, buf, tiles, heads, scale, window)?;
        }
        Ok(out)
    }

    fn swiglu(&self, gate_up: &CudaAct) -> Result<CudaAct> {
        if gate_up.cols & 1 == 1 {
            return Err(Error::internal("swiglu: odd gate_up width"));
        }
        let ffn = gate_up.cols / 2;
        let mut out = self.act(gate_up.rows, ffn, "swiglu output")?;
        if gate_up.rows * ffn > 0 {
            self.launch_swiglu(&gate_up.buf, &mut out.buf, gate_up.rows, ffn)?;
        }
        Ok(out)
    }

    fn swiglu_linear(
        &self,
        gate_up: &CudaAct,
        w: &CudaWeight,
        rows: &LinearRows,
    ) -> Result<CudaAct> {
        // Only the 16-bit dense weights have a fused decode path.
        if !matches!(w.data, WeightData::Bf16(_) | WeightData::F16(_)) {
            return self.linear(&self.swiglu(gate_up)?, w, rows);
        }
        if gate_up.cols != 2 * w.cols || rows.total() != gate_up.rows {
            return Err(Error::internal(format!(
                "swiglu_linear: gate_up [{}, {}] ({} rows described) vs weight [{}, {}]",
                gate_up.rows,
                gate_up.cols,
                rows.total(),
                w.rows,
                w.cols
            )));
        }
        let mut y = self.act(gate_up.rows, w.rows, "linear output")?;
        if gate_up.rows > 0 && w.rows > 0 {
            self.linear_dense(DenseInput::SwiGlu(gate_up), &w.data, rows, &mut y)?;
        }
        Ok(y)
    }

    fn gather_rows(&self, x: &CudaAct, rows: &[usize]) -> Result<CudaAct> {
        if let Some(&r) = rows.iter().find(|&&r| r >= x.rows) {
            return Err(Error::internal(format!("gather_rows: row {r} of {}", x.rows)));
        }
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let ids = self.htod(&ids, "row ids")?;
        let mut out = self.act(rows.len(), x.cols, "gathered rows")?;
        if !rows.is_empty() {
            self.launch_gather(
                "phi3_gather_rows_f32",
                &x.buf,
                &ids,
                &mut out.buf,
                rows.len(),
                x.cols,
            )?;
        }
        Ok(out)
    }

    fn to_host(&self, x: &CudaAct) -> Result<Vec<f32>> {
        // Only the activation's values: its buffer holds at least one element.
        self.dtoh_prefix(&x.buf, x.rows * x.cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttnParams {
        AttnParams {
            n_heads,
            n_kv_heads,
            head_dim,
            rotary_dim: head_dim,
            scale: 1.0,
            sliding_window: None,
        }
    }

    /// Every row is taken by exactly one kernel: tensor cores where the shape allows, the f32
    /// kernel for the rest, and nothing is launched for rows that do not exist.
    #[test]
    fn attention_plan_gives_every_row_one_kernel() {
        use AttentionKernel::{Scalar, TensorCores, TensorCoresFast};
        let scalar = |prefill, decode| RowKernel::Scalar(SkipRows { prefill, decode });
        let tc = |fast| RowKernel::TensorCores { fast };
        let plan = |kernels: Vec<RowKernel>, prefill| AttnPlan {
            row_kernels: kernels,
            prefill_tensor_cores: prefill,
        };
        let medium = params(40, 10, 128);
        // Decode rows and prefill rows, both on tensor cores.
        assert_eq!(AttnPlan::new(TensorCores, &medium, 70, 64), plan(vec![tc(false)], Some(false)));
        assert_eq!(
            AttnPlan::new(TensorCoresFast, &medium, 70, 64),
            plan(vec![tc(true)], Some(true))
        );
        // Prefill rows only, decode rows only.
        assert_eq!(AttnPlan::new(TensorCores, &medium, 64, 64), plan(vec![], Some(false)));
        assert_eq!(AttnPlan::new(TensorCores, &medium, 6, 0), plan(vec![tc(false)], None));
        // The f32 kernel for everything when asked, or when the head size does not fit.
        let all_scalar = plan(vec![scalar(false, false)], None);
        assert_eq!(AttnPlan::new(Scalar, &medium, 70, 64), all_scalar);
        for hd in [40, 72, 136, 256] {
            assert_eq!(AttnPlan::new(TensorCores, &params(8, 2, hd), 70, 64), all_scalar, "{hd}");
        }
        // More than 16 query heads per KV head: decode rows on the f32 kernel, prefill on
        // tensor cores.
        let wide = params(32, 1, 64);
        assert_eq!(
            AttnPlan::new(TensorCores, &wide, 70, 64),
            plan(vec![scalar(true, false)], Some(false))
        );
        assert_eq!(AttnPlan::new(TensorCores, &wide, 64, 64), plan(vec![], Some(false)));
        // Group 16 and MHA still fit.
        assert_eq!(
            AttnPlan::new(TensorCores, &params(16, 1, 64), 3, 0),
            plan(vec![tc(false)], None)
        );
        assert_eq!(
            AttnPlan::new(TensorCores, &params(32, 32, 96), 3, 0),
            plan(vec![tc(false)], None)
        );
    }
}
