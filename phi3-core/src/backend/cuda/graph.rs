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
//!   no graph yet is captured. The split scratch is sized in powers of two
//!   (`kv::split_capacity`), so rows stepping over slice boundaries do not change the key at
//!   every step of a batch;
//! - activations are allocated inside the capture (stream-ordered allocations become the graph's
//!   own memory, at the same addresses on every replay) and freed there; the logits too, once
//!   the pass has copied them into the output buffer beside the arena and `phi3_argmax_rows`
//!   has left each row's greedy choice beside them (with the rows' limits staged like the
//!   inputs), where the host reads what each row asked for after each launch (`outputs.rs`:
//!   one id for a greedy row; a top-k row's candidates are selected there by a kernel launched
//!   after the graph, outside it). So a cached graph holds no memory between launches, and CUDA
//!   may back all graphs of the stream (which never run at once) with the same physical memory: the
//!   graph pool holds about one pass's activations (`memory::graph_bytes`), whatever the number
//!   of graphs. [`GraphStats`] reports what the pool holds; it is trimmed when graphs are
//!   dropped;
//! - graphs are kept most recently used first, at most [`MAX_GRAPHS`]: a batch whose size
//!   changes back and forth finds its graphs again.
//!
//! While a capture runs, anything that would copy from the host or grow a persistent buffer
//! (`htod`, `with_tickets`, the dequantization workspace) fails instead, which ends the capture;
//! the pass then runs as usual and the failure is kept in the stats. Graphs are off by default
//! (`CudaBackend::set_cuda_graphs`) until `phi3 gpu-check` has compared replayed passes with
//! eager ones on a GPU.

use std::sync::atomic::Ordering;

use cudarc::driver::{sys, CudaGraph, CudaSlice};

use super::error::DriverResultExt;
use super::kv::{RopeOnDevice, RopeUpload};
use super::ops::PerRow;
use super::outputs::argmax_limits;
use super::{CudaAct, CudaBackend, CudaKvBatch};
use crate::backend::{OutputKind, SeqOutput};
use crate::error::{Error, Result};
use crate::rope::RopeBatch;

/// Most rows of a pass run as a graph (the scheduler's `MAX_BATCH_SEQS`).
pub(crate) const MAX_GRAPH_ROWS: usize = 256;
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

/// A graph moved between threads: cudarc's `CudaGraph` holds raw driver handles and so is not
/// `Send`.
struct OwnedGraph(CudaGraph);

// SAFETY: CUDA graph handles may be used from any thread as long as calls on one graph are
// serialised (CUDA driver API, "Graph object thread safety"); every `OwnedGraph` lives in
// `Graphs`, which is only reached through the backend's mutex, so no two threads touch one at
// once.
unsafe impl Send for OwnedGraph {}

/// Values by key, most recently used last, at most `cap` of them.
struct Recent<K, V> {
    entries: Vec<(K, V)>,
    cap: usize,
}

impl<K: PartialEq, V> Recent<K, V> {
    fn new(cap: usize) -> Self {
        Recent { entries: Vec::new(), cap: cap.max(1) }
    }

    /// The value of `key`, now the most recently used.
    fn get(&mut self, key: &K) -> Option<&V> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        let entry = self.entries.remove(i);
        self.entries.push(entry);
        self.entries.last().map(|(_, v)| v)
    }

    /// Add `value` as the most recently used, first dropping the least recently used when full;
    /// returns the value added.
    fn insert(&mut self, key: K, value: V) -> &V {
        if self.entries.len() == self.cap {
            self.entries.remove(0);
        }
        self.entries.push((key, value));
        &self.entries[self.entries.len() - 1].1
    }

    fn clear(&mut self) {
        self.entries.clear();
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A graph-run pass's greedy choices: `phi3_argmax_rows` runs at the end of the graph over its
/// logits with each row's limit (staged before every launch, as the arena's inputs) and leaves
/// the ids in `chosen`, so only they come back for greedy rows. [`MAX_GRAPH_ROWS`] each.
struct GreedyBuffers {
    limits: CudaSlice<i32>,
    chosen: CudaSlice<i32>,
}

/// The backend's graphs (behind one mutex: a graph must not be launched from two threads at
/// once).
pub(super) struct Graphs {
    /// `None` before the first graph-run pass and while one holds it.
    arena: Option<Arena>,
    /// Where graph-run passes leave their logits (`[rows, out_cols]` at the start), at least
    /// `rows` rows of them, rounded up to a power of two.
    output: Option<CudaSlice<f32>>,
    /// Where graph-run passes choose greedy rows' tokens (beside `output`, replaced with it).
    greedy: Option<GreedyBuffers>,
    arena_epoch: u64,
    cache: Recent<GraphKey, OwnedGraph>,
    stats: GraphStats,
}

impl Default for Graphs {
    fn default() -> Self {
        Graphs {
            arena: None,
            output: None,
            greedy: None,
            arena_epoch: 0,
            cache: Recent::new(MAX_GRAPHS),
            stats: GraphStats::default(),
        }
    }
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
    /// Graphs kept now.
    pub cached: usize,
    /// Device memory the driver holds for graphs now (`CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT`);
    /// `None` when the driver does not say.
    pub pool_reserved: Option<u64>,
    /// The most graph memory in use at once so far (`CU_GRAPH_MEM_ATTR_USED_MEM_HIGH`).
    pub pool_used_high: Option<u64>,
}

impl CudaBackend {
    /// Whether `run_pass` captures and replays decode passes as CUDA graphs from now on (off
    /// by default until verified on a GPU; `phi3 gpu-check` compares both). Turning them off
    /// drops the graphs and their buffers and returns the graph pool's memory to the device.
    pub fn set_cuda_graphs(&self, on: bool) {
        self.use_graphs.store(on, Ordering::Relaxed);
        if !on {
            let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
            graphs.arena = None;
            graphs.output = None;
            graphs.greedy = None;
            self.drop_graphs(&mut graphs);
        }
    }

    /// How passes ran as graphs so far, and the graph pool's memory.
    pub fn graph_stats(&self) -> GraphStats {
        let mut stats = {
            let graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
            let mut stats = graphs.stats.clone();
            stats.cached = graphs.cache.entries.len();
            stats
        };
        use sys::CUgraphMem_attribute as Attr;
        stats.pool_reserved = self.graph_mem(Attr::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT);
        stats.pool_used_high = self.graph_mem(Attr::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH);
        stats
    }

    /// One of the device's graph memory attributes (bytes).
    fn graph_mem(&self, attr: sys::CUgraphMem_attribute) -> Option<u64> {
        self.dev.ctx.bind_to_thread().ok()?;
        let mut value: u64 = 0;
        // SAFETY: the attributes asked for are all `cuuint64_t` (CUDA driver API,
        // cuDeviceGetGraphMemAttribute), so `value` is the size the driver writes; the device
        // handle comes from the live context.
        let r = unsafe {
            sys::cuDeviceGetGraphMemAttribute(
                self.dev.ctx.cu_device(),
                attr,
                (&mut value as *mut u64).cast(),
            )
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(value)
    }

    /// Drop every cached graph and give the graph pool's unused memory back to the device.
    fn drop_graphs(&self, graphs: &mut Graphs) {
        if graphs.cache.is_empty() {
            return;
        }
        graphs.cache.clear();
        // Stream order: no graph of ours is still running when the pool is trimmed.
        if self.dev.stream.synchronize().is_ok() && self.dev.ctx.bind_to_thread().is_ok() {
            // SAFETY: a device-wide call on the live context's device; it frees only graph
            // memory no executing or scheduled graph uses (cuDeviceGraphMemTrim).
            let _ = unsafe { sys::cuDeviceGraphMemTrim(self.dev.ctx.cu_device()) };
        }
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
    /// token, else `pass(batch)` once. The pass returns `[rows, out_cols]`; `outputs` says what
    /// each row hands back (`outputs.rs`).
    pub(super) fn run_pass_cuda(
        &self,
        batch: &CudaKvBatch,
        tokens: &[u32],
        rope: &RopeBatch,
        outputs: &[OutputKind],
        out_cols: usize,
        pass: &mut dyn FnMut(&CudaKvBatch) -> Result<CudaAct>,
    ) -> Result<Vec<SeqOutput>> {
        let eligible = self.use_graphs.load(Ordering::Relaxed)
            && batch.decode_only()
            && tokens.len() == batch.rows()
            && (1..=MAX_GRAPH_ROWS).contains(&batch.rows())
            && outputs.len() == batch.rows()
            && out_cols > 0;
        // One pass at a time holds the graphs; a second one (another model thread on this
        // backend) runs as usual.
        let held = if eligible { self.graphs.try_lock().ok() } else { None };
        let Some(mut graphs) = held else {
            return self.eager_pass(batch, outputs, out_cols, pass);
        };
        let out_len = batch.rows() * out_cols;
        let buffers = match (graphs.arena.take(), graphs.output.take(), graphs.greedy.take()) {
            (Some(a), Some(o), Some(g))
                if arena_fits(&a, batch, tokens, rope) && o.len() >= out_len =>
            {
                (a, o, g)
            }
            _ => {
                self.drop_graphs(&mut graphs); // their buffers are gone
                graphs.arena_epoch += 1;
                let rows = batch.rows().next_power_of_two();
                let output = self.alloc::<f32>(rows * out_cols, "graph outputs: logits")?;
                let greedy = GreedyBuffers {
                    limits: self.alloc::<i32>(MAX_GRAPH_ROWS, "graph inputs: greedy limits")?,
                    chosen: self.alloc::<i32>(MAX_GRAPH_ROWS, "graph outputs: greedy choices")?,
                };
                (self.new_arena(batch, rope)?, output, greedy)
            }
        };
        let (arena, mut output, mut greedy) = buffers;
        let staged = self.stage(batch, tokens, rope, arena)?;
        let limits = argmax_limits(outputs, out_cols);
        self.dev
            .stream
            .memcpy_htod(&limits, &mut greedy.limits.slice_mut(0..limits.len()))
            .ctx("graph inputs: greedy limits")?;
        let key = GraphKey {
            rows: batch.rows(),
            splits: batch.splits(),
            kv_epoch: self.kv_epoch.load(Ordering::Relaxed),
            tickets_epoch: self.tickets_epoch.load(Ordering::Relaxed),
            arena_epoch: graphs.arena_epoch,
            attention: self.attention_kernel.load(Ordering::Relaxed),
            poison: self.poison.load(Ordering::Relaxed),
        };
        // Ok(true): a graph ran; Ok(false): the capture failed and the pass runs as usual.
        let launched = match graphs.cache.get(&key) {
            Some(graph) => {
                let r = graph.0.launch().ctx("graph launch");
                graphs.stats.replays += 1;
                r.map(|()| true)
            }
            None => match self.capture(&staged, &mut output, &mut greedy, out_cols, pass) {
                Ok(graph) => {
                    graphs.stats.captures += 1;
                    graphs.cache.insert(key, graph).0.launch().ctx("graph launch").map(|()| true)
                }
                Err(e) => {
                    graphs.stats.fallbacks += 1;
                    graphs.stats.last_failure = Some(e.to_string());
                    log::warn!("CUDA graph capture failed, running the pass as usual: {e}");
                    Ok(false)
                }
            },
        };
        graphs.arena = staged.into_arena();
        let result = match launched {
            Ok(true) => self.collect_outputs(&output, Some(&greedy.chosen), outputs, out_cols),
            Ok(false) => self.eager_pass(batch, outputs, out_cols, pass),
            Err(e) => Err(e),
        };
        graphs.output = Some(output);
        graphs.greedy = Some(greedy);
        result
    }

    /// `pass(batch)` run as usual, and its rows' outputs.
    fn eager_pass(
        &self,
        batch: &CudaKvBatch,
        outputs: &[OutputKind],
        out_cols: usize,
        pass: &mut dyn FnMut(&CudaKvBatch) -> Result<CudaAct>,
    ) -> Result<Vec<SeqOutput>> {
        let logits = pass(batch)?;
        if logits.rows != outputs.len() || logits.cols != out_cols {
            return Err(Error::internal(format!(
                "a pass returned [{}, {}] for {} rows of {out_cols}",
                logits.rows,
                logits.cols,
                outputs.len()
            )));
        }
        self.pass_outputs(&logits.buf, outputs, out_cols)
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

    /// `pass` captured as a graph that ends by copying its logits (`[rows, out_cols]`) into
    /// `output` and choosing each row's greedy token into `greedy.chosen` (nothing runs yet).
    fn capture(
        &self,
        staged: &CudaKvBatch,
        output: &mut CudaSlice<f32>,
        greedy: &mut GreedyBuffers,
        out_cols: usize,
        pass: &mut dyn FnMut(&CudaKvBatch) -> Result<CudaAct>,
    ) -> Result<OwnedGraph> {
        let rows = staged.rows();
        let out_len = rows * out_cols;
        let stream = &self.dev.stream;
        // Thread-local: only this thread's unsafe calls end the capture; other threads' calls that
        // do not touch this stream (a memory query) go on. Work on the stream from another thread
        // (a session save reading KV) cannot come meanwhile: it takes the KV pool lock, which the
        // scheduler's leader holds for the whole pass.
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        stream.begin_capture(mode).ctx("begin graph capture")?;
        let mut guard = CaptureGuard { be: self, ended: false };
        self.capturing.store(true, Ordering::Relaxed);
        // The logits are freed inside the graph once copied (the drop at the end of the
        // closure), so the graph keeps no allocation between launches.
        let copied = pass(staged).and_then(|logits| {
            if logits.rows * logits.cols != out_len || output.len() < out_len {
                return Err(Error::internal(format!(
                    "graph pass: logits [{}, {}] for {out_len} values ({} held)",
                    logits.rows,
                    logits.cols,
                    output.len()
                )));
            }
            stream
                .memcpy_dtod(&logits.buf.slice(0..out_len), &mut output.slice_mut(0..out_len))
                .ctx("graph outputs: logits")?;
            let GreedyBuffers { limits, chosen } = greedy;
            self.launch_argmax_rows(output, PerRow::Device(limits), chosen, rows, out_cols)
        });
        let graph = guard.end();
        copied?;
        match graph.ctx("end graph capture")? {
            Some(graph) => Ok(OwnedGraph(graph)),
            None => Err(Error::internal("graph capture recorded nothing")),
        }
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
        // The graph frees every allocation it makes before it ends; should one ever escape, it
        // is freed at the next launch instead of failing that launch.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_keeps_the_most_recently_used() {
        let mut r = Recent::new(3);
        for k in 1..=3 {
            assert_eq!(*r.insert(k, 10 * k), 10 * k);
        }
        assert_eq!(r.get(&1), Some(&10)); // 1 is now the most recent: 2 goes first
        r.insert(4, 40);
        assert_eq!(r.get(&2), None);
        for (k, v) in [(3, 30), (1, 10), (4, 40)] {
            assert_eq!(r.get(&k), Some(&v));
        }
        r.insert(5, 50); // 3 was used least recently
        assert_eq!(r.get(&3), None);
        assert_eq!(r.entries.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 4, 5]);
        r.clear();
        assert!(r.is_empty() && r.get(&5).is_none());
    }
}
