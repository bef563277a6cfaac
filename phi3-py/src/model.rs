//! `phi3.Model`: a loaded checkpoint (or the built-in demo model), its tokenizer, sessions, the
//! one-call `chat`, and `phi3.KvUsage` (its KV memory and batching counters).

use std::path::PathBuf;

use phi3_core::{
    Device, ErrorKind, KvUsage, LoadOptions, Model, SchedulerStats, SessionOptions, WeightFormat,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{self, GenArgs};
use crate::errors::to_py_err;
use crate::gil::{lock, run_detached};
use crate::session::PySession;
use crate::stream::PyTokenStream;
use crate::tokenizer::PyTokenizer;

/// A Phi-3 model on a device, loaded from a Hugging Face folder (config.json, *.safetensors,
/// tokenizer.json). Thread-safe: share one Model between threads, one Session per conversation.
///
/// Model(path, device="auto", weights="native", max_context=None, *, kv_memory=None,
/// kv_wait=False, prefill_chunk=None)
///
/// - device: "auto" (the CPU until the CUDA backend is verified on a GPU), "cpu", "cuda" or
///   "cuda:N".
/// - weights: "native" keeps the checkpoint's dtype; "int8" (per-row scales), "int4" (groups of
///   128 columns), "int4-g32", "int4-g64", "int4-g128" quantize the layer projections while
///   loading. A folder that is already quantized (`phi3 quantize`, AWQ, GPTQ) loads as stored
///   with "native" or its own format.
/// - max_context: upper bound on any session's tokens (default: the model's maximum).
/// - kv_memory: bytes of KV-cache memory all sessions of the model may use together (default:
///   the backend's: no limit but allocation failure on the CPU, the free device memory on CUDA).
///   A pass that needs more raises OutOfMemoryError and leaves its session unchanged.
/// - kv_wait: instead of raising, such a pass waits until sessions in other threads free blocks
///   (deleted, truncated, reset) or its session is cancelled. Only for programs that run
///   sessions in several threads: a single thread would wait forever.
/// - prefill_chunk: most prompt tokens of one session per forward pass, and most prefill tokens
///   of one batched pass (default 512, at most 65536). Larger chunks keep a GPU busier on long
///   prompts and take more activation memory; smaller ones let other sessions' decode steps in
///   more often.
///
/// Sessions used from several Python threads at once are batched: their forward passes run
/// together (the GIL is released meanwhile), with the same results as one at a time.
///
/// Raises IoError (missing folder or file), ModelFormatError (bad config, tensor name/shape/dtype,
/// tokenizer files), UnsupportedError (model or rope type, device, a quantization config it cannot read),
/// InvalidArgumentError (bad device or weights string, an int4 group that does not divide a
/// row, max_context <= 0, kv_memory <= 0 or less than one KV block, prefill_chunk <= 0 or above
/// 65536). Loading releases the GIL.
#[pyclass(name = "Model", module = "phi3", frozen)]
pub(crate) struct PyModel {
    pub(crate) model: Model,
    /// `model.tokenizer`, made once (None: the folder had no tokenizer.json).
    tokenizer: Option<Py<PyTokenizer>>,
}

impl PyModel {
    fn wrap(py: Python<'_>, model: Model) -> PyResult<Self> {
        let tokenizer = match model.tokenizer() {
            Ok(tok) => {
                Some(Py::new(py, PyTokenizer::new(tok.clone(), model.chat_template().clone()))?)
            }
            Err(_) => None,
        };
        Ok(PyModel { model, tokenizer })
    }
}

/// The load arguments, checked before anything is read.
struct LoadArgs<'a> {
    device: &'a str,
    weights: &'a str,
    max_context: Option<i64>,
    kv_memory: Option<i64>,
    kv_wait: bool,
    prefill_chunk: Option<i64>,
}

impl LoadArgs<'_> {
    fn check(self, py: Python<'_>) -> PyResult<LoadOptions> {
        let device: Device = self.device.parse().map_err(|e| to_py_err(py, e))?;
        let weights: WeightFormat = self.weights.parse().map_err(|e| to_py_err(py, e))?;
        let max_context = convert::positive(py, self.max_context, "max_context")?;
        let kv_memory = convert::positive(py, self.kv_memory, "kv_memory")?.map(|b| b as u64);
        let prefill_chunk = convert::positive(py, self.prefill_chunk, "prefill_chunk")?;
        Ok(LoadOptions {
            device,
            max_context,
            weights,
            kv_memory,
            kv_wait: self.kv_wait,
            prefill_chunk,
            ..Default::default()
        })
    }
}

#[pymethods]
impl PyModel {
    #[new]
    #[allow(clippy::too_many_arguments)] // the Python signature's keyword arguments
    #[pyo3(signature = (
        path, device = "auto", weights = "native", max_context = None, *, kv_memory = None,
        kv_wait = false, prefill_chunk = None
    ))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        device: &str,
        weights: &str,
        max_context: Option<i64>,
        kv_memory: Option<i64>,
        kv_wait: bool,
        prefill_chunk: Option<i64>,
    ) -> PyResult<Self> {
        let args = LoadArgs { device, weights, max_context, kv_memory, kv_wait, prefill_chunk };
        let options = args.check(py)?;
        let model = run_detached(py, || Model::load(&path, &options))?;
        Self::wrap(py, model)
    }

    /// The built-in demo model: a tiny Phi-3 (4 layers, 256 wide, LongRoPE) with random weights
    /// and a small English tokenizer. Loads in milliseconds from nothing on disk; it produces
    /// gibberish but exercises the whole pipeline (tests, examples). The arguments are those of
    /// `Model(...)`.
    #[staticmethod]
    #[pyo3(signature = (
        device = "auto", max_context = None, weights = "native", *, kv_memory = None,
        kv_wait = false, prefill_chunk = None
    ))]
    fn demo(
        py: Python<'_>,
        device: &str,
        max_context: Option<i64>,
        weights: &str,
        kv_memory: Option<i64>,
        kv_wait: bool,
        prefill_chunk: Option<i64>,
    ) -> PyResult<Self> {
        let args = LoadArgs { device, weights, max_context, kv_memory, kv_wait, prefill_chunk };
        let options = args.check(py)?;
        let model = run_detached(py, || phi3_core::demo::demo_model(&options))?;
        Self::wrap(py, model)
    }

    /// The model's tokenizer. Raises UnsupportedError when the model folder had no
    /// tokenizer.json.
    #[getter]
    fn tokenizer(&self, py: Python<'_>) -> PyResult<Py<PyTokenizer>> {
        match &self.tokenizer {
            Some(t) => Ok(t.clone_ref(py)),
            None => Err(to_py_err(
                py,
                self.model.tokenizer().err().unwrap_or_else(|| {
                    phi3_core::Error::new(ErrorKind::Unsupported, "this model has no tokenizer")
                }),
            )),
        }
    }

    /// Where the model runs, e.g. "cpu (16 threads)".
    #[getter]
    fn device(&self) -> String {
        self.model.device_name()
    }

    /// How the layer projections are stored: "native", "int8", "int4-g128", ...
    #[getter]
    fn weights(&self) -> String {
        self.model.weight_format().to_string()
    }

    /// Bytes of weights the model holds (quantized projections counted as stored).
    #[getter]
    fn weight_bytes(&self) -> u64 {
        self.model.weight_bytes()
    }

    /// The folder the model was loaded from (None for the demo model).
    #[getter]
    fn path(&self) -> Option<String> {
        self.model.path().map(|p| p.to_string_lossy().into_owned())
    }

    /// The most tokens any session of this model may hold.
    #[getter]
    fn max_context(&self) -> usize {
        self.model.max_context()
    }

    /// Most prompt tokens of one session per forward pass (the `prefill_chunk` it was loaded
    /// with, 512 by default).
    #[getter]
    fn prefill_chunk(&self) -> usize {
        self.model.prefill_chunk()
    }

    /// Rows of the embedding table: token ids are in [0, vocab_size); the logits have this length.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    /// A new, empty session (a conversation with its own KV cache). `max_context` caps its
    /// length (default and upper bound: the model's max_context). `priority` (default 0): when
    /// sessions in several threads have more work queued than one batch takes, higher priority
    /// runs first; results do not depend on it (see `Session.priority`).
    #[pyo3(signature = (max_context = None, *, priority = 0))]
    fn session(
        slf: &Bound<'_, Self>,
        max_context: Option<i64>,
        priority: i32,
    ) -> PyResult<PySession> {
        let py = slf.py();
        let max_context = convert::positive(py, max_context, "max_context")?;
        let session = slf
            .get()
            .model
            .session(SessionOptions { max_context, priority })
            .map_err(|e| to_py_err(py, e))?;
        Ok(PySession::new(slf.clone().unbind(), session))
    }

    /// How the model's KV memory is used (blocks in use, allocated, allowed) and how its
    /// scheduler has batched sessions' forward passes so far: a KvUsage snapshot. Waits (with
    /// the GIL released) for a forward pass running in another thread to finish.
    fn kv_usage(&self, py: Python<'_>) -> PyResult<PyKvUsage> {
        let model = &self.model;
        let (kv, sched) = run_detached(py, || Ok((model.kv_usage(), model.scheduler_stats())))?;
        Ok(PyKvUsage::new(kv, sched))
    }

    /// One chat turn in a new session: append each of the OpenAI-style `messages` (a list of
    /// {"role": "system"|"user"|"assistant", "content": str} dicts) through the model's chat
    /// template, then generate the assistant's reply. `**gen` takes the options of
    /// `Session.generate` (max_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
    /// seed, stop, on_token, ...).
    ///
    /// Returns a GenerationResult, or with `stream=True` an iterator of text chunks
    /// (a TokenStream, whose `.session` continues the conversation).
    #[pyo3(signature = (messages, stream = false, **gen))]
    fn chat(
        slf: &Bound<'_, Self>,
        messages: &Bound<'_, PyAny>,
        stream: bool,
        gen: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let func = if stream { "chat(stream=True)" } else { "chat" };
        let messages = convert::messages(py, messages)?;
        let call =
            GenArgs::from_kwargs(gen, func)?.check(py, slf.get().model.config().vocab_size)?;
        let session = Bound::new(py, Self::session(slf, None, 0)?)?;
        {
            let s = session.get();
            let mut guard = lock(py, &s.inner)?;
            let inner = &mut *guard;
            run_detached(py, || {
                messages.iter().try_for_each(|m| inner.append_message(&m.role, &m.content))
            })?;
        }
        if stream {
            let it = PyTokenStream::start(py, session.unbind(), call)?;
            Ok(Bound::new(py, it)?.into_any().unbind())
        } else {
            let result = session.get().run_generate(py, call)?;
            Ok(Bound::new(py, result)?.into_any().unbind())
        }
    }

    fn __repr__(&self) -> String {
        match self.model.path() {
            Some(p) => format!(
                "Model({:?}, device={:?})",
                p.display().to_string(),
                self.model.device_name()
            ),
            None => format!("Model.demo(device={:?})", self.model.device_name()),
        }
    }
}

/// A snapshot of a model's KV memory and batching scheduler (`model.kv_usage()`).
#[pyclass(name = "KvUsage", module = "phi3", frozen, get_all)]
pub(crate) struct PyKvUsage {
    /// Tokens per KV block.
    block_tokens: usize,
    /// Bytes of one block (every layer's keys and values of `block_tokens` tokens).
    block_bytes: u64,
    /// Blocks held by sessions (a block shared by forks counts once).
    blocks_in_use: usize,
    /// Blocks the backend has allocated (in use or free for reuse).
    blocks_allocated: usize,
    /// Most blocks `kv_memory` allows; None without a budget.
    max_blocks: Option<usize>,
    /// Forward passes the scheduler has run.
    steps: u64,
    /// Sequences over all passes (`sequences / steps` is the mean batch size).
    sequences: u64,
    /// Most sequences one pass batched.
    max_batch: usize,
}

impl PyKvUsage {
    fn new(kv: KvUsage, sched: SchedulerStats) -> Self {
        PyKvUsage {
            block_tokens: kv.block_tokens,
            block_bytes: kv.block_bytes,
            blocks_in_use: kv.blocks_in_use,
            blocks_allocated: kv.blocks_allocated,
            max_blocks: kv.max_blocks,
            steps: sched.steps,
            sequences: sched.sequences,
            max_batch: sched.max_batch,
        }
    }
}

#[pymethods]
impl PyKvUsage {
    /// The numbers as a dict.
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("block_tokens", self.block_tokens)?;
        d.set_item("block_bytes", self.block_bytes)?;
        d.set_item("blocks_in_use", self.blocks_in_use)?;
        d.set_item("blocks_allocated", self.blocks_allocated)?;
        d.set_item("max_blocks", self.max_blocks)?;
        d.set_item("steps", self.steps)?;
        d.set_item("sequences", self.sequences)?;
        d.set_item("max_batch", self.max_batch)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let max = self.max_blocks.map_or("None".to_string(), |n| n.to_string());
        format!(
            "KvUsage(block_tokens={}, block_bytes={}, blocks_in_use={}, blocks_allocated={}, \
             max_blocks={max}, steps={}, sequences={}, max_batch={})",
            self.block_tokens,
            self.block_bytes,
            self.blocks_in_use,
            self.blocks_allocated,
            self.steps,
            self.sequences,
            self.max_batch
        )
    }
}
