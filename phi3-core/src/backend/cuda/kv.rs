//! The paged KV cache on the device: the pool of blocks, its growth in slabs, block copies, the
//! host transfers of a sequence's blocks, and the per-pass batch descriptor the KV kernels read.
//!
//! Pool layout (kernels/common.cuh describes the same): a block holds [`KV_BLOCK_TOKENS`] tokens of
//! every layer, `[n_layers][keys, values][KV_BLOCK_TOKENS][n_kv_heads * head_dim]` bf16, so
//! `KvLayout::block_len()` values (2 bytes each). Blocks live in slabs, separate device
//! allocations of `blocks_per_slab` blocks (about [`KV_SLAB_BYTES`]); block `b` starts at
//! `slabs[b / blocks_per_slab] + (b % blocks_per_slab) * block_len`. Every slab but the last is
//! full. Growing adds slabs, so the pool grows to its budget without copying what it holds (a
//! short last slab, left by a budget that was not a multiple of a slab, is replaced by a larger
//! one and its blocks copied once). A small device array of slab addresses, uploaded again when a
//! slab is added, is how kernels find blocks; all work is on the backend's one stream, so kernels
//! queued before a growth read the old array and slabs it replaced are freed after them.
//!
//! Batch descriptor ([`CudaKvBatch`]), built once per forward pass in one upload: `u32`s
//! `row_pos [rows]` (each activation row's position in its sequence), `row_table [rows]` (where
//! the row's sequence's block table starts in `tables`), `row_split [rows]` (for a decode row at
//! position >= [`ATTN_SPLIT_KEYS`], its first slot in attention's split scratch; `PREFILL` for
//! the rows of a sequence that adds more than `GEMV_SPAN` rows; `NO_SPLIT` otherwise),
//! `tiles [n_tiles][2]` (the prefill rows in tiles of at most [`ATTN_PREFILL_ROWS`] consecutive
//! rows of one sequence: first row, rows), then `tables` (each sequence's block ids covering
//! `0..pos0 + len`, in position order). `rope_store_kv` and `attention` each take the whole batch
//! in one launch through it. The batch also keeps the pass's rotary tables on the device once the
//! first layer has uploaded them (`rope_on_device`), so the other layers copy nothing.
//!
//! Prefill rows (kernels/attention_tc.cu): attention of the `tiles` on tensor cores, where the
//! head size allows (the rest of the batch, or all of it, by kernels/attention.cu). A row's result
//! does not depend on its tile, so the tiling is free; tiles start at each sequence's first row.
//!
//! Split keys (flash-decoding, kernels/attention.cu and attention_tc.cu): a decode row (its
//! sequence adds at most `GEMV_SPAN` tokens) at position `pos` has its keys `0..=pos` cut into
//! `pos / ATTN_SPLIT_KEYS + 1` slices, each computed by its own block and merged by whichever of
//! them finishes last, so one long sequence spreads over many SMs. Prefill rows are many
//! already and stay whole. The split depends on the row's position only, never on the rest of
//! the batch.
//!
//! Host transfers (`kv_to_host`, `kv_from_host`) move whole blocks between the pool and a device
//! staging buffer (device-to-device copies), then one host copy per staging load, converting
//! bf16 <-> f32 on the host (round to nearest even, as the kernels store).
//!
//! Poisoning (checks): new slabs are filled with bf16 NaN like every other allocation.
//!
//! Not here: which blocks a sequence owns, sharing and budgets (`kv_pool.rs`), the kernels'
//! launch shapes (`ops.rs`), the default budget's arithmetic (`memory.rs`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaView, DevicePtr};
use half::bf16;

use super::error::DriverResultExt;
use super::CudaBackend;
use crate::backend::{KvLayout, SeqSpan, GEMV_SPAN, KV_BLOCK_TOKENS};
use crate::error::{Error, ErrorKind, Result};
use crate::rope::RopeBatch;

/// Bytes of one slab (at least one block).
pub const KV_SLAB_BYTES: usize = 64 << 20;
/// Bytes of the device staging buffer of the host transfers (at least one block).
const KV_STAGING_BYTES: usize = 64 << 20;

/// Every sequence's keys and values on the device: bf16 blocks of [`KV_BLOCK_TOKENS`] tokens of
/// every layer, in slabs of whole blocks (layout in `kernels/common.cuh`).
pub struct CudaKvPool {
    layout: KvLayout,
    /// Values of one block: `layout.block_len()`.
    block_len: usize,
    /// Blocks of every slab but the last, which may hold fewer.
    blocks_per_slab: usize,
    slabs: Vec<CudaSlice<u16>>, // [n_slabs][blocks in the slab * block_len], bf16 bit patterns
    /// Device addresses of `slabs`, in order; `None` while there are none.
    slab_addrs: Option<CudaSlice<u64>>, // [n_slabs]
    n_blocks: usize,
    /// Bytes held by `slabs`, counted in the backend's total.
    bytes: u64,
    counter: Arc<AtomicU64>,
}

impl Drop for CudaKvPool {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A forward pass's rows and block tables on the device, as the KV kernels read them: each row's
/// position and the start of its sequence's table, then the tables (one upload per pass).
pub struct CudaKvBatch {
    /// Activation rows: the sum of the spans' lengths.
    rows: usize,
    /// One more than the largest block id in the tables (0 when there are none); every use checks
    /// it against the pool, so a kernel never follows an id past the pool's slabs.
    blocks_needed: usize,
    /// Slots of attention's split scratch: the split decode rows' slices in all.
    split_slots: usize,
    /// The most slices of one row (1 when no row splits): the attention grid's z.
    most_splits: usize,
    /// Tiles of prefill rows (the prefill attention grid's x), and the rows they hold.
    prefill_tiles: usize,
    prefill_rows: usize,
    /// [3 * rows + 2 * prefill_tiles + ids]: row_pos, row_table, row_split [rows], tiles, tables
    buf: CudaSlice<u32>,
    /// The rotary tables of the pass on the device, uploaded by the first layer's
    /// `rope_store_kv` and reused by the others (every layer rotates with the same tables).
    rope: Mutex<Option<RopeUpload>>,
    /// Sequences of the batch.
    seqs: usize,
    /// For a batch staged for a CUDA graph (`graph.rs`): its rows' token ids already on the
    /// device (at least `rows` of them).
    staged_ids: Option<CudaSlice<u32>>,
}

/// A `RopeBatch` on the device, with the host values it was made from: a later call is served
/// from it only when its tables are equal, so the cache can never hand out stale angles.
pub(crate) struct RopeUpload {
    pub cos_host: Vec<f32>,
    pub sin_host: Vec<f32>,
    pub tables: Arc<RopeOnDevice>,
}

impl RopeUpload {
    /// `tables` on the device, remembered as holding `rope`'s values.
    pub(crate) fn new(rope: &RopeBatch, tables: RopeOnDevice) -> RopeUpload {
        RopeUpload {
            cos_host: rope.cos.clone(),
            sin_host: rope.sin.clone(),
            tables: Arc::new(tables),
        }
    }
}

/// Cosines and sines `[rows, half]` on the device.
pub(crate) struct RopeOnDevice {
    pub cos: CudaSlice<f32>,
    pub sin: CudaSlice<f32>,
}

/// Keys per slice of a split decode row (the kernels' split_keys): 4 key tiles of
/// attention_tc.cu (2 of attention.cu). The split depends on the position only, never on the
/// batch, so one size serves all batches: small enough that batch 1 at a 512-token context spreads
/// over 3 blocks per KV head (30 for Phi-3-medium) instead of 1, large enough that a block's KV
/// reads (128 KiB per KV head of Phi-3-medium) dwarf its fixed costs.
pub(crate) const ATTN_SPLIT_KEYS: usize = 256;
/// `row_split` of a row whose keys are not split (ATT_NO_SPLIT in kernels/common.cuh).
const NO_SPLIT: u32 = u32::MAX;
/// `row_split` of a prefill row (ATT_PREFILL in kernels/common.cuh): not split either, left to the
/// tensor-core kernel when it runs.
const PREFILL: u32 = u32::MAX - 1;
/// Most query rows of one prefill tile (AP_ROWS in attention_tc.cu).
pub(crate) const ATTN_PREFILL_ROWS: usize = 64;

/// The pool's geometry and the batch's arrays, as a kernel launch takes them.
pub(crate) struct KvArgs<'a> {
    pub slab_addrs: &'a CudaSlice<u64>, // [n_slabs]
    pub row_pos: CudaView<'a, u32>,     // [rows]
    pub row_table: CudaView<'a, u32>,   // [rows]
    pub row_split: CudaView<'a, u32>,   // [rows]
    pub tiles: CudaView<'a, u32>,       // [prefill tiles][2]
    pub tables: CudaView<'a, u32>,      // [ids]
    pub blocks_per_slab: usize,
    pub block_len: usize,
    pub layer: usize,
}

impl CudaKvPool {
    /// Blocks the pool holds.
    pub fn blocks(&self) -> usize {
        self.n_blocks
    }

    /// Bytes of device memory the pool holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// (slab, offset in values) of block `id`.
    fn locate(&self, id: u32) -> (usize, usize) {
        let id = id as usize;
        (id / self.blocks_per_slab, (id % self.blocks_per_slab) * self.block_len)
    }

    /// `Internal` unless `blocks` covers `n_tokens` tokens with ids of this pool.
    fn check_blocks(&self, blocks: &[u32], n_tokens: usize, what: &str) -> Result<()> {
        let need = n_tokens.div_ceil(KV_BLOCK_TOKENS);
        if blocks.len() < need {
            return Err(Error::internal(format!(
                "{what}: {} blocks for {n_tokens} tokens",
                blocks.len()
            )));
        }
        self.check_ids(&blocks[..need], what)
    }

    /// `Internal` unless every id is a block of this pool.
    fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        match ids.iter().find(|&&b| b as usize >= self.n_blocks) {
            Some(b) => {
                Err(Error::internal(format!("{what}: block {b} of a pool of {}", self.n_blocks)))
            }
            None => Ok(()),
        }
    }

    /// The launch arguments of `batch` over this pool at `layer`, after checking that the
    /// kernels' indexing stays inside the pool: `layer` exists, rows are `kv_dim` wide, and every
    /// block id of the batch is below the pool's count.
    pub(crate) fn args<'a>(
        &'a self,
        batch: &'a CudaKvBatch,
        layer: usize,
        kv_dim: usize,
        what: &str,
    ) -> Result<KvArgs<'a>> {
        if layer >= self.layout.n_layers || self.layout.row_len() != kv_dim {
            return Err(Error::internal(format!(
                "{what}: layer {layer}, KV row width {kv_dim}, but the pool has {} layers of \
                 width {}",
                self.layout.n_layers,
                self.layout.row_len()
            )));
        }
        if batch.blocks_needed > self.n_blocks {
            return Err(Error::internal(format!(
                "{what}: the batch names block {} of a pool of {}",
                batch.blocks_needed - 1,
                self.n_blocks
            )));
        }
        let slab_addrs = self
            .slab_addrs
            .as_ref()
            .ok_or_else(|| Error::internal(format!("{what}: the KV pool holds no blocks")))?;
        let (rows, tiles_end) = (batch.rows, 3 * batch.rows + 2 * batch.prefill_tiles);
        Ok(KvArgs {
            slab_addrs,
            row_pos: batch.buf.slice(0..rows),
            row_table: batch.buf.slice(rows..2 * rows),
            row_split: batch.buf.slice(2 * rows..3 * rows),
            tiles: batch.buf.slice(3 * rows..tiles_end),
            tables: batch.buf.slice(tiles_end..),
            blocks_per_slab: self.blocks_per_slab,
            block_len: self.block_len,
            layer,
        })
    }
}

impl CudaKvBatch {
    /// Activation rows of the batch.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// (scratch slots, most slices of one row) of the batch's split decode rows. The slots are
    /// [`split_capacity`] of the slices the rows take: the scratch's layout (and so a CUDA
    /// graph's key, `graph.rs`) then changes when the total passes a power of two, not whenever
    /// one row of a batch crosses a slice boundary.
    pub(crate) fn splits(&self) -> (usize, usize) {
        (split_capacity(self.split_slots), self.most_splits)
    }

    /// Tiles of prefill rows (0 when no sequence adds more than `GEMV_SPAN` rows).
    pub(crate) fn prefill_tiles(&self) -> usize {
        self.prefill_tiles
    }

    /// Rows of the prefill tiles.
    pub(crate) fn prefill_rows(&self) -> usize {
        self.prefill_rows
    }

    /// Whether every sequence adds exactly one row (a pass of decode steps).
    pub(crate) fn decode_only(&self) -> bool {
        self.seqs == self.rows && self.prefill_tiles == 0
    }

    /// The descriptor's words on the device.
    pub(crate) fn words(&self) -> &CudaSlice<u32> {
        &self.buf
    }

    /// Words of the descriptor.
    pub(crate) fn words_len(&self) -> usize {
        self.buf.len()
    }

    /// The token ids staged with the batch (graph.rs), if it is a staged one.
    pub(crate) fn staged_ids(&self) -> Option<&CudaSlice<u32>> {
        self.staged_ids.as_ref()
    }

    /// This batch reading its descriptor from `words` (a copy of its own, at least as long),
    /// with its rows' token `ids` and its rotary tables already on the device (`rope`).
    pub(crate) fn staged_copy(
        &self,
        words: CudaSlice<u32>,
        ids: CudaSlice<u32>,
        rope: RopeUpload,
    ) -> CudaKvBatch {
        CudaKvBatch {
            rows: self.rows,
            blocks_needed: self.blocks_needed,
            split_slots: self.split_slots,
            most_splits: self.most_splits,
            prefill_tiles: self.prefill_tiles,
            prefill_rows: self.prefill_rows,
            buf: words,
            rope: Mutex::new(Some(rope)),
            seqs: self.seqs,
            staged_ids: Some(ids),
        }
    }

    /// The buffers of a staged batch, back as an arena (`None` when the batch was not staged or
    /// its rotary tables are still shared).
    pub(super) fn into_arena(self) -> Option<super::graph::Arena> {
        let ids = self.staged_ids?;
        let rope = self.rope.into_inner().unwrap_or_else(|e| e.into_inner())?;
        let tables = Arc::try_unwrap(rope.tables).ok()?;
        Some(super::graph::Arena { words: self.buf, ids, cos: tables.cos, sin: tables.sin })
    }
}

impl CudaBackend {
    /// An empty pool of `layout`'s blocks.
    pub(super) fn new_pool(&self, layout: &KvLayout) -> Result<CudaKvPool> {
        let block_len = layout.block_len();
        if block_len == 0 {
            return Err(Error::internal(format!("KV pool of empty blocks: {layout:?}")));
        }
        let by_size = (KV_SLAB_BYTES / (2 * block_len)).max(1);
        let blocks_per_slab = match self.kv_slab_blocks.load(Ordering::Relaxed) {
            0 => by_size,
            n => n,
        };
        self.kv_epoch.fetch_add(1, Ordering::Relaxed); // a new pool: new slab tables (graph.rs)
        Ok(CudaKvPool {
            layout: *layout,
            block_len,
            blocks_per_slab,
            slabs: Vec::new(),
            slab_addrs: None,
            n_blocks: 0,
            bytes: 0,
            counter: self.kv_bytes.clone(),
        })
    }

    /// `Backend::grow_kv_pool`: whole slabs where `max_blocks` allows; on `OutOfMemory` retry
    /// with exactly `min_blocks`.
    pub(super) fn grow_pool(
        &self,
        pool: &mut CudaKvPool,
        min_blocks: usize,
        max_blocks: usize,
    ) -> Result<usize> {
        if min_blocks <= pool.n_blocks {
            return Ok(pool.n_blocks);
        }
        // Block ids are u32.
        let max_blocks = max_blocks.min(u32::MAX as usize);
        if min_blocks > max_blocks {
            return Err(Error::internal(format!(
                "grow_kv_pool: at least {min_blocks} blocks but at most {max_blocks}"
            )));
        }
        let bps = pool.blocks_per_slab;
        let target = min_blocks.div_ceil(bps).saturating_mul(bps).min(max_blocks);
        match self.grow_pool_to(pool, target) {
            Err(e) if e.kind() == ErrorKind::OutOfMemory && target > min_blocks => {
                self.grow_pool_to(pool, min_blocks)?
            }
            r => r?,
        }
        Ok(pool.n_blocks)
    }

    /// Grow `pool` to exactly `target` (> its count) blocks; unchanged on failure.
    fn grow_pool_to(&self, pool: &mut CudaKvPool, target: usize) -> Result<()> {
        let bl = pool.block_len;
        let stream = &self.dev.stream;
        let last = pool.slabs.last().map(|s| s.len() / bl);
        let (resize, sizes) = plan_growth(pool.n_blocks, last, pool.blocks_per_slab, target);
        // A short last slab is replaced by a fuller one holding a copy of its blocks.
        let mut new_last = None;
        if let (Some(want), Some(old)) = (resize, pool.slabs.last()) {
            let mut fresh = self.alloc_u16(want * bl, "the KV pool")?;
            let mut dst = fresh.slice_mut(0..old.len());
            stream.memcpy_dtod(old, &mut dst).ctx("KV slab copy")?;
            new_last = Some(fresh);
        }
        let mut added = Vec::with_capacity(sizes.len());
        for k in sizes {
            added.push(self.alloc_u16(k * bl, "the KV pool")?);
        }
        let count = pool.slabs.len();
        let mut addrs: Vec<u64> = Vec::with_capacity(count + added.len());
        for (i, s) in pool.slabs.iter().enumerate() {
            let s = if i + 1 == count { new_last.as_ref().unwrap_or(s) } else { s };
            addrs.push(s.device_ptr(stream).0);
        }
        addrs.extend(added.iter().map(|s| s.device_ptr(stream).0));
        let table = self.htod(&addrs, "the KV slab table")?;
        // Commit: nothing below fails.
        if let (Some(fresh), Some(last)) = (new_last, pool.slabs.last_mut()) {
            *last = fresh;
        }
        pool.slabs.extend(added);
        pool.slab_addrs = Some(table);
        // Graphs captured over the old slab table must not be replayed (graph.rs).
        self.kv_epoch.fetch_add(1, Ordering::Relaxed);
        pool.n_blocks = target;
        let bytes: u64 = pool.slabs.iter().map(|s| 2 * s.len() as u64).sum();
        pool.counter.fetch_add(bytes, Ordering::Relaxed);
        pool.counter.fetch_sub(pool.bytes, Ordering::Relaxed);
        pool.bytes = bytes;
        Ok(())
    }

    /// `Backend::copy_kv_blocks`: one launch when the pairs are independent (no destination is
    /// another pair's source or destination), else one per pair, in order.
    pub(super) fn copy_blocks(&self, pool: &mut CudaKvPool, pairs: &[(u32, u32)]) -> Result<()> {
        let pairs: Vec<(u32, u32)> = pairs.iter().copied().filter(|(s, d)| s != d).collect();
        if pairs.is_empty() {
            return Ok(());
        }
        let flat: Vec<u32> = pairs.iter().flat_map(|&(s, d)| [s, d]).collect();
        pool.check_ids(&flat, "copy_kv_blocks")?;
        let srcs: HashSet<u32> = pairs.iter().map(|p| p.0).collect();
        let mut dsts = HashSet::new();
        let independent = pairs.iter().all(|&(_, d)| dsts.insert(d) && !srcs.contains(&d));
        let buf = self.htod(&flat, "KV block pairs")?;
        let Some(addrs) = pool.slab_addrs.as_ref() else {
            return Err(Error::internal("copy_kv_blocks: the KV pool holds no blocks"));
        };
        let (bps, bl) = (pool.blocks_per_slab, pool.block_len);
        if independent {
            self.launch_copy_kv_blocks(addrs, &buf.slice(..), pairs.len(), bps, bl)
        } else {
            for i in 0..pairs.len() {
                self.launch_copy_kv_blocks(addrs, &buf.slice(2 * i..2 * i + 2), 1, bps, bl)?;
            }
            Ok(())
        }
    }

    /// Blocks per staging load of a host transfer, and the staging buffer.
    fn kv_staging(&self, pool: &CudaKvPool, n_blocks: usize) -> Result<(usize, CudaSlice<u16>)> {
        let per = (KV_STAGING_BYTES / (2 * pool.block_len)).clamp(1, n_blocks.max(1));
        Ok((per, self.alloc::<u16>(per * pool.block_len, "KV staging")?))
    }

    /// `Backend::kv_to_host`.
    pub(super) fn pool_to_host(
        &self,
        pool: &CudaKvPool,
        blocks: &[u32],
        n_tokens: usize,
    ) -> Result<Vec<f32>> {
        pool.check_blocks(blocks, n_tokens, "kv_to_host")?;
        let (row, layers, bl) = (pool.layout.row_len(), pool.layout.n_layers, pool.block_len);
        let half = n_tokens * row; // values of one layer's keys (or values)
        let mut out = vec![0.0f32; 2 * half * layers];
        if half == 0 {
            return Ok(out);
        }
        let used = &blocks[..n_tokens.div_ceil(KV_BLOCK_TOKENS)];
        let (per, mut staging) = self.kv_staging(pool, used.len())?;
        let mut host = vec![0u16; per * bl];
        for (g, group) in used.chunks(per).enumerate() {
            for (i, &id) in group.iter().enumerate() {
                let (slab, at) = pool.locate(id);
                let mut dst = staging.slice_mut(i * bl..(i + 1) * bl);
                self.dev
                    .stream
                    .memcpy_dtod(&pool.slabs[slab].slice(at..at + bl), &mut dst)
                    .ctx("KV block to staging")?;
            }
            let n = group.len() * bl;
            self.dev
                .stream
                .memcpy_dtoh(&staging.slice(0..n), &mut host[..n])
                .ctx("KV to the host")?;
            self.synchronize()?;
            for (i, block) in host[..n].chunks_exact(bl).enumerate() {
                block_to_host(block, row, n_tokens, g * per + i, &mut out);
            }
        }
        Ok(out)
    }

    /// `Backend::kv_from_host`: whole blocks, but only the first `n_tokens % 16` tokens of a
    /// partial last block (its other tokens keep what they held).
    pub(super) fn pool_from_host(
        &self,
        pool: &mut CudaKvPool,
        blocks: &[u32],
        n_tokens: usize,
        data: &[f32],
    ) -> Result<()> {
        let half = pool.layout.check_host_len(n_tokens, data.len())?;
        pool.check_blocks(blocks, n_tokens, "kv_from_host")?;
        if half == 0 {
            return Ok(());
        }
        let (row, bl) = (pool.layout.row_len(), pool.block_len);
        let used = &blocks[..n_tokens.div_ceil(KV_BLOCK_TOKENS)];
        let (per, mut staging) = self.kv_staging(pool, used.len())?;
        let mut host = vec![0u16; per * bl];
        let stream = &self.dev.stream;
        for (g, group) in used.chunks(per).enumerate() {
            let n = group.len() * bl;
            for (i, block) in host[..n].chunks_exact_mut(bl).enumerate() {
                host_to_block(data, row, n_tokens, g * per + i, block);
            }
            stream.memcpy_htod(&host[..n], &mut staging.slice_mut(0..n)).ctx("KV to the device")?;
            for (i, &id) in group.iter().enumerate() {
                let t0 = (g * per + i) * KV_BLOCK_TOKENS;
                let tokens = KV_BLOCK_TOKENS.min(n_tokens - t0);
                let (slab, at) = pool.locate(id);
                // Whole block, or each (layer, keys/values) part's first `tokens` rows.
                let (part_len, copy) = if tokens == KV_BLOCK_TOKENS {
                    (bl, bl)
                } else {
                    (KV_BLOCK_TOKENS * row, tokens * row)
                };
                for p in (0..bl).step_by(part_len) {
                    let src = staging.slice(i * bl + p..i * bl + p + copy);
                    let mut dst = pool.slabs[slab].slice_mut(at + p..at + p + copy);
                    stream.memcpy_dtod(&src, &mut dst).ctx("KV block from staging")?;
                }
            }
        }
        // (Reusing `host` is safe: a copy from pageable memory returns once the driver has
        // taken the data.) Wait, so that a failure is this call's.
        self.synchronize()
    }

    /// `Backend::kv_batch`: checks that the spans tile the rows in order and that each table
    /// covers its sequence, then uploads the descriptor (module docs) in one copy.
    pub(super) fn build_kv_batch(
        &self,
        seqs: &[SeqSpan],
        blocks: &[&[u32]],
    ) -> Result<CudaKvBatch> {
        let p = pack_batch(seqs, blocks)?;
        let buf = self.htod(&p.words, "the KV batch")?;
        Ok(CudaKvBatch {
            rows: p.rows,
            blocks_needed: p.blocks_needed,
            split_slots: p.split_slots,
            most_splits: p.most_splits,
            prefill_tiles: p.prefill_tiles,
            prefill_rows: p.prefill_rows,
            buf,
            rope: Mutex::new(None),
            seqs: seqs.len(),
            staged_ids: None,
        })
    }

    /// `rope`'s tables on the device: uploaded once per batch (a pass's 40 layers of
    /// Phi-3-medium rotate with the same tables, which would otherwise be 80 host copies in the
    /// stream per decode step), again only when a call brings different tables.
    pub(super) fn rope_on_device(
        &self,
        batch: &CudaKvBatch,
        rope: &RopeBatch,
    ) -> Result<Arc<RopeOnDevice>> {
        let mut cached = batch.rope.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(up) = cached.as_ref() {
            if up.cos_host == rope.cos && up.sin_host == rope.sin {
                return Ok(up.tables.clone());
            }
        }
        let tables = RopeOnDevice {
            cos: self.htod(&rope.cos, "rope cos")?,
            sin: self.htod(&rope.sin, "rope sin")?,
        };
        let upload = RopeUpload::new(rope, tables);
        let shared = upload.tables.clone();
        *cached = Some(upload);
        Ok(shared)
    }
}

/// Scratch slots for `slices` key slices in all: 0 for none, else the next power of two. The
/// kernels take the slot count only as the scratch's layout (each row's first slot is in the
/// batch descriptor), so any count of at least `slices` gives the same results.
pub(crate) fn split_capacity(slices: usize) -> usize {
    match slices {
        0 => 0,
        n => n.next_power_of_two(),
    }
}

/// The slabs that grow a pool of `n` blocks to `target` (> `n`) blocks in slabs of `bps`, whose
/// last slab holds `last` blocks: the new size of that slab when it is short (it is replaced by a
/// fuller copy), and the sizes of the slabs to add, in blocks. Only the last slab ends up short.
fn plan_growth(
    n: usize,
    last: Option<usize>,
    bps: usize,
    target: usize,
) -> (Option<usize>, Vec<usize>) {
    let mut n = n;
    let mut resize = None;
    if let Some(have) = last.filter(|&h| h < bps) {
        let want = bps.min(have + (target - n));
        resize = Some(want);
        n += want - have;
    }
    let mut sizes = Vec::new();
    while n < target {
        let k = bps.min(target - n);
        sizes.push(k);
        n += k;
    }
    (resize, sizes)
}

/// A batch descriptor on the host.
#[derive(Debug, PartialEq, Eq)]
struct PackedBatch {
    /// The descriptor's words (module docs).
    words: Vec<u32>,
    rows: usize,
    /// One more than the largest block id.
    blocks_needed: usize,
    split_slots: usize,
    most_splits: usize,
    prefill_tiles: usize,
    prefill_rows: usize,
}

/// The batch descriptor of `seqs`. `Internal` unless the spans tile the rows in order from 0 and
/// each table covers its span.
fn pack_batch(seqs: &[SeqSpan], blocks: &[&[u32]]) -> Result<PackedBatch> {
    if seqs.len() != blocks.len() {
        return Err(Error::internal(format!(
            "kv_batch: {} sequences, {} block tables",
            seqs.len(),
            blocks.len()
        )));
    }
    let rows: usize = seqs.iter().map(|s| s.len).sum();
    let mut row_pos = Vec::with_capacity(rows);
    let mut row_table = Vec::with_capacity(rows);
    let mut row_split = Vec::with_capacity(rows);
    let mut tiles = Vec::new();
    let mut tables = Vec::new();
    let (mut blocks_needed, mut split_slots, mut most_splits) = (0usize, 0usize, 1usize);
    let mut prefill_rows = 0;
    for (seq, table) in seqs.iter().zip(blocks) {
        if seq.row != row_pos.len() {
            return Err(Error::internal(format!(
                "kv_batch: span {seq:?} does not start at row {}",
                row_pos.len()
            )));
        }
        let end = seq.pos0 + seq.len;
        let need = end.div_ceil(KV_BLOCK_TOKENS);
        if table.len() < need || end > i32::MAX as usize {
            return Err(Error::internal(format!(
                "kv_batch: span {seq:?} with {} blocks",
                table.len()
            )));
        }
        if seq.len == 0 {
            continue;
        }
        let start = u32::try_from(tables.len())
            .map_err(|_| Error::internal("kv_batch: too many block ids"))?;
        row_pos.extend((seq.pos0..end).map(|p| p as u32));
        row_table.extend(std::iter::repeat_n(start, seq.len));
        if seq.len > GEMV_SPAN {
            row_split.extend(std::iter::repeat_n(PREFILL, seq.len));
            prefill_rows += seq.len;
            for first in (0..seq.len).step_by(ATTN_PREFILL_ROWS) {
                let first_row = u32::try_from(seq.row + first)
                    .map_err(|_| Error::internal("kv_batch: too many rows"))?;
                let n = ATTN_PREFILL_ROWS.min(seq.len - first);
                tiles.extend([first_row, n as u32]); // n <= ATTN_PREFILL_ROWS
            }
        } else {
            for pos in seq.pos0..end {
                if pos < ATTN_SPLIT_KEYS {
                    row_split.push(NO_SPLIT);
                    continue;
                }
                let slices = pos / ATTN_SPLIT_KEYS + 1;
                row_split.push(
                    u32::try_from(split_slots)
                        .map_err(|_| Error::internal("kv_batch: too many split slots"))?,
                );
                split_slots += slices;
                most_splits = most_splits.max(slices);
            }
        }
        tables.extend_from_slice(&table[..need]);
        let top = table[..need].iter().map(|&b| b as usize + 1).max().unwrap_or(0);
        blocks_needed = blocks_needed.max(top);
    }
    let prefill_tiles = tiles.len() / 2;
    let mut words = row_pos;
    words.extend(row_table);
    words.extend(row_split);
    words.extend(tiles);
    words.extend(tables);
    Ok(PackedBatch {
        words,
        rows,
        blocks_needed,
        split_slots,
        most_splits,
        prefill_tiles,
        prefill_rows,
    })
}

/// Token range (first, count) of a sequence's block `index` holding tokens below `n_tokens`.
fn block_tokens(index: usize, n_tokens: usize) -> (usize, usize) {
    let t0 = index * KV_BLOCK_TOKENS;
    (t0, KV_BLOCK_TOKENS.min(n_tokens - t0))
}

/// The tokens of `block` (the sequence's block `index`, an image in the pool layout) into `out`
/// in the host layout of `n_tokens` tokens of `row` values (per layer keys, then values).
fn block_to_host(block: &[u16], row: usize, n_tokens: usize, index: usize, out: &mut [f32]) {
    let (t0, tokens) = block_tokens(index, n_tokens);
    let half = n_tokens * row;
    // part = 2 * layer + (0: keys, 1: values) in both layouts.
    for (part, src) in block.chunks_exact(KV_BLOCK_TOKENS * row).enumerate() {
        let at = part * half + t0 * row;
        for (o, &b) in out[at..at + tokens * row].iter_mut().zip(src) {
            *o = bf16::from_bits(b).to_f32();
        }
    }
}

/// The inverse of [`block_to_host`]: the sequence's block `index` from host-layout `data`,
/// rounded to bf16 (nearest even, as the rope_kv kernel stores keys and values). Rows of tokens
/// at or past `n_tokens` are left as they are.
fn host_to_block(data: &[f32], row: usize, n_tokens: usize, index: usize, block: &mut [u16]) {
    let (t0, tokens) = block_tokens(index, n_tokens);
    let half = n_tokens * row;
    for (part, dst) in block.chunks_exact_mut(KV_BLOCK_TOKENS * row).enumerate() {
        let at = part * half + t0 * row;
        for (o, &x) in dst.iter_mut().zip(&data[at..at + tokens * row]) {
            *o = bf16::from_f32(x).to_bits();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels' block size (kernels/common.cuh) is the trait's.
    #[test]
    fn kernels_use_the_block_size_of_the_trait() {
        let define = format!("#define PHI3_KV_BLOCK_TOKENS {KV_BLOCK_TOKENS}\n");
        assert!(super::super::kernels::COMMON_HEADER.contains(&define));
    }

    /// Block images hold token t of layer l's keys (w = 0) or values (w = 1) at
    /// ((2 l + w) * 16 + t) * row (kernels/common.cuh), and the host layout holds it at
    /// (2 l + w) * n * row + t * row; a partial last block leaves its other rows alone.
    #[test]
    fn block_images_follow_the_layouts() {
        let (layers, row, n) = (3, 5, 37); // 3 blocks, the last with 5 tokens
                                           // Distinct values, each exact in bf16 (consecutive bit patterns from 1.0).
        let data: Vec<f32> = (0..2 * layers * n * row)
            .map(|i| bf16::from_bits(0x3f80 + i as u16).to_f32())
            .collect();
        let bl = KvLayout { n_layers: layers, n_kv_heads: 1, head_dim: row }.block_len();
        let mut back = vec![f32::NAN; data.len()];
        for index in 0..n.div_ceil(KV_BLOCK_TOKENS) {
            let mut block = vec![0xffffu16; bl];
            host_to_block(&data, row, n, index, &mut block);
            for l in 0..layers {
                for w in 0..2 {
                    for t in 0..KV_BLOCK_TOKENS {
                        for c in 0..row {
                            let got = block[((2 * l + w) * KV_BLOCK_TOKENS + t) * row + c];
                            let pos = index * KV_BLOCK_TOKENS + t;
                            if pos < n {
                                let want = data[(2 * l + w) * n * row + pos * row + c];
                                assert_eq!(bf16::from_bits(got).to_f32(), want);
                            } else {
                                assert_eq!(got, 0xffff, "token {pos} past the end was written");
                            }
                        }
                    }
                }
            }
            block_to_host(&block, row, n, index, &mut back);
        }
        assert_eq!(back, data);
    }

    /// A CUDA graph of a batch's decode passes stays valid while its rows step through slice
    /// boundaries one by one: the scratch slots change only at powers of two, and every row's
    /// slices stay inside them.
    #[test]
    fn split_scratch_grows_in_powers_of_two() {
        assert_eq!([0, 1, 2, 3, 4, 5, 9, 129].map(split_capacity), [0, 1, 2, 4, 4, 8, 16, 256]);
        let k = ATTN_SPLIT_KEYS;
        let table: Vec<u32> = (0..(40 * k as u32) / 16).collect();
        // 8 sequences at positions spread over a few slice boundaries, each stepping on.
        let (mut layouts, mut totals) = (std::collections::BTreeSet::new(), Vec::new());
        for step in 0..2 * k {
            let spans: Vec<SeqSpan> =
                (0..8).map(|i| SeqSpan { row: i, len: 1, pos0: 3 * k + i * 97 + step }).collect();
            let p = pack_batch(&spans, &[table.as_slice(); 8]).unwrap();
            let slots = split_capacity(p.split_slots);
            let row_split = &p.words[2 * p.rows..3 * p.rows];
            for (span, &first) in spans.iter().zip(row_split) {
                assert!(first as usize + span.pos0 / k < slots, "{span:?} past {slots} slots");
            }
            layouts.insert(slots);
            totals.push(p.split_slots);
        }
        // 8 rows of 4 to 8 slices each: 39 to 54 slices in all, changing 15 times (each row
        // crosses two boundaries but the first, which starts on one), and one scratch layout.
        totals.dedup();
        assert_eq!((totals.len(), totals[0], totals[totals.len() - 1]), (16, 39, 54));
        assert_eq!(layouts.into_iter().collect::<Vec<_>>(), [64]);
    }

    #[test]
    fn batch_descriptor_lists_rows_then_tables() {
        let spans = [
            SeqSpan { row: 0, len: 1, pos0: 20 },
            SeqSpan { row: 1, len: 3, pos0: 14 },
            SeqSpan { row: 4, len: 0, pos0: 5 },
        ];
        // Tables longer than needed are cut to the blocks the span reaches.
        let tables: [&[u32]; 3] = [&[7, 2, 9], &[4, 11], &[3]];
        let p = pack_batch(&spans, &tables).unwrap();
        assert_eq!((p.rows, p.blocks_needed, p.split_slots, p.most_splits), (4, 12, 0, 1));
        assert_eq!(p.prefill_tiles, 0);
        const NO: u32 = NO_SPLIT;
        #[rustfmt::skip]
        assert_eq!(p.words, [
            20, 14, 15, 16, // row_pos
            0, 2, 2, 2,     // row_table
            NO, NO, NO, NO, // row_split
            7, 2, 4, 11,    // tables
        ]);
        // Decode rows at positions >= ATTN_SPLIT_KEYS split into pos / k + 1 slices, each row
        // by its own position; prefill rows (a span of 5) never do: they are marked PREFILL and
        // listed in one tile.
        let k = ATTN_SPLIT_KEYS;
        let spans = [
            SeqSpan { row: 0, len: 1, pos0: 2 * k + 3 },
            SeqSpan { row: 1, len: 5, pos0: k },
            SeqSpan { row: 6, len: 2, pos0: k - 1 },
        ];
        let long: Vec<u32> = (0..(3 * k as u32 + 16) / 16).collect();
        let p = pack_batch(&spans, &[&long, &long, &long]).unwrap();
        assert_eq!(
            (p.split_slots, p.most_splits, p.prefill_tiles, p.prefill_rows),
            (3 + 2, 3, 1, 5)
        );
        const PF: u32 = PREFILL;
        assert_eq!(&p.words[16..26], [0, PF, PF, PF, PF, PF, NO, 3, 1, 5]);
        // A prefill span longer than a tile: tiles of ATTN_PREFILL_ROWS from its first row.
        let n = 2 * ATTN_PREFILL_ROWS + 3;
        let spans = [SeqSpan { row: 0, len: 2, pos0: 0 }, SeqSpan { row: 2, len: n, pos0: 7 }];
        let table: Vec<u32> = (0..(n as u32 + 7).div_ceil(16)).collect();
        let p = pack_batch(&spans, &[&[0], &table]).unwrap();
        let r = ATTN_PREFILL_ROWS as u32;
        assert_eq!(p.prefill_tiles, 3);
        let tiles_at = 3 * (n + 2);
        assert_eq!(&p.words[tiles_at..tiles_at + 6], [2, r, 2 + r, r, 2 + 2 * r, 3]);
        assert_eq!(p.words[tiles_at + 6..], [[0].as_slice(), &table].concat());
        let gap = [SeqSpan { row: 1, len: 1, pos0: 0 }];
        assert!(pack_batch(&gap, &[&[0]]).is_err());
        let short = [SeqSpan { row: 0, len: 2, pos0: 15 }];
        assert!(pack_batch(&short, &[&[0]]).is_err());
        assert!(pack_batch(&short, &[]).is_err());
    }

    #[test]
    fn growth_fills_the_short_slab_then_adds_whole_ones() {
        assert_eq!(plan_growth(0, None, 3, 4), (None, vec![3, 1]));
        assert_eq!(plan_growth(4, Some(1), 3, 6), (Some(3), vec![]));
        assert_eq!(plan_growth(4, Some(1), 3, 5), (Some(2), vec![]));
        assert_eq!(plan_growth(6, Some(3), 3, 10), (None, vec![3, 1]));
        assert_eq!(plan_growth(5, Some(2), 3, 13), (Some(3), vec![3, 3, 1]));
        assert_eq!(plan_growth(0, None, 1, 2), (None, vec![1, 1]));
    }
}
