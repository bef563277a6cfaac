//! CUDA graphs for decode passes (issue 7: "the whole step captured once as a CUDA graph and
//! replayed"): `Backend::run_pass` of a pass whose sequences each add one token captures the
//! pass's ~320 kernel launches once and replays them as one graph launch in later passes of the
//! same shape, so the GPU runs the step without waiting for the host between kernels.
//!
//! A graph bakes in every kernel argument: device addresses, grid sizes and scalars. So:
//! - the pass's inputs (batch descriptor, token ids, rotary tables) live in the [`Arena`],
//!   buffers whose addresses stay fixed; before each capture or replay they are copied there
//!   (stream-ordered, so after the previous pass's kernels), and a staged batch
//!   (`CudaKvBatch::staged_copy`) hands the pass views of them: `embed_pass` reads its ids there
//!   and `rope_store_kv` its tables, neither copying anything while the stream is captured;
//! - everything else a pass's kernels take that can change between passes of the same rows is
//!   in the [`GraphKey`]: the attention grid and split scratch (which grow with the context),
//!   the generation of the KV pool's slab table, of the arrival counters and of the arena (each
//!   bumped when reallocated), the attention kernel choice and poisoning. A pass whose key has
//!   no graph yet is captured; at most [`MAX_GRAPHS`] graphs are kept, the oldest dropped first;
//! - activations are allocated inside the capture (stream-ordered allocations become the graph's
//!   own memory, at the same addresses on every replay) and freed there, but for the logits,
//!   which the graph keeps ([`CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH`] frees them at
//!   the next launch) and the host reads after each launch.
//!
//! While a capture runs, anything that would copy from the host or grow a persistent buffer
//! (`htod`, `with_tickets`, the dequantization workspace) fails instead, which ends the capture;
//! the pass then runs as usual and the failure is kept in the stats. Graphs are off by default (`CudaBackend::set_cuda_graphs`) until
//! `phi3 gpu-check` has compared replayed passes with eager ones on a GPU.
//!
//! [`CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH`]: sys::CUgraphInstantiate_flags

use std::sync::atomic::Ordering;

use cudarc::driver::{sys, CudaGraph, CudaSlice};

use super::error::DriverResultExt;
use super::kv::{RopeOnDevice, RopeUpload};
use super::{CudaAct, CudaBackend, CudaKvBatch};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::rope::RopeBatch;

/// Most rows of a pass run as a graph (the scheduler's `MAX_BATCH_SEQS`).
pub(super) const MAX_GRAPH_ROWS: usize = 256;
/// Most graphs kept at once.
pub(super) const MAX_GRAPHS: usize = 8;

/// What a captured pass's kernels take besides the contents of the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct GraphKey {
    pub rows: usize,
    /// The attention grid's z and the split scratch slots (`CudaKvBatch::splits`).
    pub splits: (usize, usize),
    pub kv_epoch: u64,
    pub tickets_epoch: u64,
    pub arena_epoch: u64,
    pub attention: u8,
    pub poison: bool,
}

/// Device buffers at fixed addresses for the inputs of graph-run passes.
pub(super) struct Arena {
    pub words: CudaSlice<u32>,
    pub ids: CudaSlice<u32>,
    pub cos: CudaSlice<f32>,
    pub sin: CudaSlice<f32>,
}

/// A captured pass and the logits it writes.
struct Captured {
    key: GraphKey,
    graph: OwnedGraph,
    logits: CudaAct,
}

/// A graph moved between threads: cudarc's `CudaGraph` holds raw driver handles and so is not
/// `Send`.
struct OwnedGraph(CudaGraph);

// SAFETY: CUDA graph handles may be used from any thread as long as calls on one graph are
// serialised (CUDA driver API, "Graph object thread safety"); every `OwnedGraph` lives in
// `Graphs`, which is only reached through the backend's mutex, so no two threads touch one at
// once.
unsafe impl Send for OwnedGraph {}

/// The backend's graphs (behind one mutex: a graph must not be launched from two threads at
/// once).
#[derive(Default)]
pub(super) struct Graphs {
    /// `None` before the first graph-run pass and while one holds it.
    arena: Option<Arena>,
    arena_epoch: u64,
    cache: Vec<Captured>,
    stats: GraphStats,
}

/// How passes ran, for benchmarks and checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Passes captured as a graph (then launched).
    pub captures: u64,
    /// Passes run by launching a graph captured before.
    pub replays: u64,
    /// Passes that could have been graphs but ran as usual because the capture failed.
    pub fallbacks: u64,
    /// The last capture failure.
    pub last_failure: Option<String>,
}

impl CudaBackend {
    /// Whether `run_pass` captures and replays decode passes as CUDA graphs from now on (off
    /// by default until verified on a GPU; `phi3 gpu-check` compares both).
    pub fn set_cuda_graphs(&self, on: bool) {
        self.use_graphs.store(on, Ordering::Relaxed);
    }

    /// How passes ran as graphs so far.
    pub fn graph_stats(&self) -> GraphStats {
        self.graphs.lock().unwrap_or_else(|e| e.into_inner()).stats.clone()
    }

    /// `Internal` while a pass is being captured: `what` would copy from the host or allocate
    /// outside the stream, which a graph cannot replay. The capture then ends and the pass runs
    /// as usual.
    pub(super) fn refuse_in_capture(&self, what: &str) -> Result<()> {
        if self.capturing.load(Ordering::Relaxed) {
            return Err(Error::internal(format!("{what} while a CUDA graph is captured")));
        }
        Ok(())
    }

    /// `Backend::run_pass` on CUDA: as a graph when graphs are on and every sequence adds one
    /// token, else `pass(batch)` once.
    pub(super) fn run_pass_cuda(
        &self,
        batch: &CudaKvBatch,
        tokens: &[u32],
        rope: &RopeBatch,
        pass: &mut dyn FnMut(&CudaKvBatch) -> Result<CudaAct>,
    ) -> Result<Vec<f32>> {
        let eligible = self.use_graphs.load(Ordering::Relaxed)
            && batch.decode_only()
            && tokens.len() == batch.rows()
            && (1..=MAX_GRAPH_ROWS).contains(&batch.rows());
        // One pass at a time holds the graphs; a second one (another model thread on this
        // backend) runs as usual.
        let held = if eligible { self.graphs.try_lock().ok() } else { None };
        let Some(mut graphs) = held else {
            return self.to_host(&pass(batch)?);
        };
        let arena = match graphs.arena.take() {
            Some(a) if arena_fits(&a, batch, tokens, rope) => a,
            _ => {
                graphs.cache.clear(); // their arena is gone
                graphs.arena_epoch += 1;
                self.new_arena(batch, rope)?
            }
        };
        let staged = self.stage(batch, tokens, rope, arena)?;
        let key = GraphKey {
            rows: batch.rows(),
            splits: batch.splits(),
            kv_epoch: self.kv_epoch.load(Ordering::Relaxed),
            tickets_epoch: self.tickets_epoch.load(Ordering::Relaxed),
            arena_epoch: graphs.arena_epoch,
            attention: self.attention_kernel.load(Ordering::Relaxed),
            poison: self.poison.load(Ordering::Relaxed),
        };
        let result = match graphs.cache.iter().position(|c| c.key == key) {
            Some(i) => {
                graphs.stats.replays += 1;
                self.replay(&graphs.cache[i])
            }
            None => match self.capture(&staged, key, pass) {
                Ok(captured) => {
                    graphs.stats.captures += 1;
                    if graphs.cache.len() == MAX_GRAPHS {
                        graphs.cache.remove(0);
                    }
                    graphs.cache.push(captured);
                    let last = graphs.cache.len() - 1;
                    self.replay(&graphs.cache[last])
                }
                Err(e) => {
                    graphs.stats.fallbacks += 1;
                    graphs.stats.last_failure = Some(e.to_string());
                    log::warn!("CUDA graph capture failed, running the pass as usual: {e}");
                    self.to_host(&pass(batch)?)
                }
            },
        };
        graphs.arena = staged.into_arena();
        result
    }

    /// An arena large enough for this pass (with room to grow: twice its needs).
    fn new_arena(&self, batch: &CudaKvBatch, rope: &RopeBatch) -> Result<Arena> {
        let words = 2 * batch.words_len();
        Ok(Arena {
            words: self.alloc::<u32>(words, "graph inputs: batch")?,
            ids: self.alloc::<u32>(MAX_GRAPH_ROWS, "graph inputs: token ids")?,
            cos: self.alloc::<f32>(MAX_GRAPH_ROWS * rope.half.max(1), "graph inputs: cos")?,
            sin: self.alloc::<f32>(MAX_GRAPH_ROWS * rope.half.max(1), "graph inputs: sin")?,
        })
    }

    /// The pass's inputs copied into `arena` (in stream order) and a batch that reads them there.
    fn stage(
        &self,
        batch: &CudaKvBatch,
        tokens: &[u32],
        rope: &RopeBatch,
        mut arena: Arena,
    ) -> Result<CudaKvBatch> {
        let stream = &self.dev.stream;
        let n = batch.words_len();
        stream
            .memcpy_dtod(batch.words(), &mut arena.words.slice_mut(0..n))
            .ctx("graph inputs: batch")?;
        stream
            .memcpy_htod(tokens, &mut arena.ids.slice_mut(0..tokens.len()))
            .ctx("graph inputs: token ids")?;
        let t = rope.cos.len();
        stream.memcpy_htod(&rope.cos, &mut arena.cos.slice_mut(0..t)).ctx("graph cos")?;
        stream.memcpy_htod(&rope.sin, &mut arena.sin.slice_mut(0..t)).ctx("graph sin")?;
        let rope_dev = RopeUpload::new(rope, RopeOnDevice { cos: arena.cos, sin: arena.sin });
        Ok(batch.staged_copy(arena.words, arena.ids, rope_dev))
    }

    /// `pass` captured as a graph (nothing runs yet).
    fn capture(
        &self,
        staged: &CudaKvBatch,
        key: GraphKey,
        pass: &mut dyn FnMut(&CudaKvBatch) -> Result<CudaAct>,
    ) -> Result<Captured> {
        let stream = &self.dev.stream;
        // Thread-local: other threads' CUDA calls (a session saved meanwhile) are not affected.
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        stream.begin_capture(mode).ctx("begin graph capture")?;
        let mut guard = CaptureGuard { be: self, ended: false };
        self.capturing.store(true, Ordering::Relaxed);
        let logits = pass(staged);
        let graph = guard.end();
        let logits = logits?;
        match graph.ctx("end graph capture")? {
            Some(graph) => Ok(Captured { key, graph: OwnedGraph(graph), logits }),
            None => Err(Error::internal("graph capture recorded nothing")),
        }
    }

    /// Launch `c` and read its logits.
    fn replay(&self, c: &Captured) -> Result<Vec<f32>> {
        c.graph.0.launch().ctx("graph launch")?;
        self.to_host(&c.logits)
    }
}

/// Ends a capture however `pass` left it (an error, or a panic unwinding through `capture`), so
/// the stream takes ordinary work again and `htod` is no longer refused.
struct CaptureGuard<'a> {
    be: &'a CudaBackend,
    ended: bool,
}

impl CaptureGuard<'_> {
    fn end(&mut self) -> std::result::Result<Option<CudaGraph>, cudarc::driver::DriverError> {
        self.ended = true;
        self.be.capturing.store(false, Ordering::Relaxed);
        let flags = sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        self.be.dev.stream.end_capture(flags)
    }
}

impl Drop for CaptureGuard<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.end();
        }
    }
}

/// Whether `arena` holds this pass's inputs.
fn arena_fits(arena: &Arena, batch: &CudaKvBatch, tokens: &[u32], rope: &RopeBatch) -> bool {
    arena.words.len() >= batch.words_len()
        && arena.ids.len() >= tokens.len()
        && arena.cos.len() >= rope.cos.len()
        && arena.sin.len() >= rope.sin.len()
}
