//! `phi3.Session` (one conversation: tokens + KV cache) and `phi3.GenerationResult`.
//!
//! The Rust `Session` is `Send` but not `Sync`, so it lives in a `Mutex`; every method takes it
//! with `try_lock`, and a second concurrent call gets `BusyError` instead of waiting (waiting
//! could deadlock an `on_token` callback that calls back into its own session). Model work runs
//! with the GIL released and Ctrl-C let through (`gil::run_cancellable`); `on_token` takes the
//! GIL only to call the host.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use phi3_core::{CancelToken, GenerationResult, GenerationStats, Session};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{self, GenArgs, GenCall};
use crate::gil::{lock, run_cancellable, run_detached, OnCall};
use crate::model::PyModel;
use crate::stream::PyTokenStream;

/// A conversation on a Model: its token history, KV cache and sampler state. Make one with
/// `model.session()`, `session.fork()` or `Session.load(model, path)`.
///
/// Text and messages are tokenized when appended; the model runs over them at the next call that
/// needs logits (`generate`, `stream`, `append_tokens`, `logits`). Every call is transactional:
/// on error the session holds what it held before. A session serves one thread at a time
/// (a concurrent call raises BusyError); `cancel()` may be called from any thread. Sessions of
/// one model used from different threads are batched (see `Model`).
#[pyclass(name = "Session", module = "phi3", frozen)]
pub(crate) struct PySession {
    model: Py<PyModel>,
    pub(crate) inner: Mutex<Session>,
    /// The session's own cancel flag, reachable while a call holds `inner`.
    pub(crate) cancel: CancelToken,
    /// The session's priority, readable while a call holds `inner` (written only under it).
    priority: AtomicI32,
}

impl PySession {
    pub(crate) fn new(model: Py<PyModel>, session: Session) -> Self {
        let cancel = session.cancel_token();
        let priority = AtomicI32::new(session.priority());
        PySession { model, inner: Mutex::new(session), cancel, priority }
    }

    fn vocab(&self) -> usize {
        self.model.get().model.config().vocab_size
    }

    /// `generate` with checked options: the engine runs on a helper thread (GIL released);
    /// `on_token` runs on this thread, with the GIL, once per token.
    pub(crate) fn run_generate(
        &self,
        py: Python<'_>,
        call: GenCall,
    ) -> PyResult<PyGenerationResult> {
        let GenCall { options, on_token } = call;
        let mut guard = lock(py, &self.inner)?;
        let session = &mut *guard;
        let mut call_host = |py: Python<'_>, text: &str, token: Option<u32>| match &on_token {
            Some(f) => f.call1(py, (text, token))?.is_truthy(py),
            None => Ok(false),
        };
        let on_call: Option<OnCall<'_>> = on_token.is_some().then_some(&mut call_host);
        let result = run_cancellable(py, &self.cancel, on_call, |host| {
            session.generate(&options, |text, token| {
                if host(text, token) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
        })?;
        drop(guard);
        PyGenerationResult::new(py, result)
    }
}

#[pymethods]
impl PySession {
    /// Append token ids and run the model over everything pending; returns the logits after the
    /// last token as a float32 numpy array of length `model.vocab_size`.
    ///
    /// Raises TokenOutOfRangeError naming the first bad id, ContextFullError past max_context,
    /// InvalidArgumentError for an empty list; the session is then unchanged.
    fn append_tokens(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let ids = convert::token_ids(py, ids, self.vocab(), "tokens")?;
        let mut guard = lock(py, &self.inner)?;
        let session = &mut *guard;
        let logits = run_cancellable(py, &self.cancel, None, |_| session.append_tokens(&ids))?;
        drop(guard);
        convert::numpy_f32(py, &logits)
    }

    /// Append token ids and run the model over everything pending; returns only the greedy
    /// choice after the last token (the id `generate` picks with temperature 0: the largest
    /// logit among the ids the tokenizer can emit, ties to the lowest id), or None when no logit
    /// there is above -inf. On CUDA the choice is made on the device and one id is copied back
    /// instead of the logits; a later `logits()` runs the last token again.
    ///
    /// Raises as append_tokens; the session is then unchanged.
    fn append_tokens_greedy(
        &self,
        py: Python<'_>,
        ids: &Bound<'_, PyAny>,
    ) -> PyResult<Option<u32>> {
        let ids = convert::token_ids(py, ids, self.vocab(), "tokens")?;
        let mut guard = lock(py, &self.inner)?;
        let session = &mut *guard;
        run_cancellable(py, &self.cancel, None, |_| session.append_tokens_greedy(&ids))
    }

    /// Tokenize `text` and append it (a BOS token first when the session is empty, as
    /// `tokenizer(text)` adds it). The model runs over it at the next generate/logits call.
    fn append_text(&self, py: Python<'_>, text: &str) -> PyResult<()> {
        let text = text.to_owned();
        let mut guard = lock(py, &self.inner)?;
        let session = &mut *guard;
        run_detached(py, || session.append_text(&text))
    }

    /// Append a chat message (role "system", "user" or "assistant") through the model's chat
    /// template, so the tokens equal `apply_chat_template` of all messages so far. The next
    /// generate adds the assistant prompt after a non-assistant message.
    fn append_message(&self, py: Python<'_>, role: &str, content: &str) -> PyResult<()> {
        let (role, content) = (role.to_owned(), content.to_owned());
        let mut guard = lock(py, &self.inner)?;
        let session = &mut *guard;
        run_detached(py, || session.append_message(&role, &content))
    }

    /// The logits after the last token (float32 numpy array), running the model over pending
    /// tokens first. Raises InvalidArgumentError on an empty session.
    fn logits(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let mut guard = lock(py, &self.inner)?;
        let session = &mut *guard;
        let logits =
            run_cancellable(py, &self.cancel, None, |_| session.logits().map(<[f32]>::to_vec))?;
        drop(guard);
        convert::numpy_f32(py, &logits)
    }

    /// Generate a reply from the current history; returns a GenerationResult.
    ///
    /// Stops at a stop token (eos, `<|end|>`, or `stop_token_ids`), a `stop` string (not
    /// included in the text), `max_tokens`, a full context, `on_token` returning True, or
    /// `cancel()`. `on_token(text, token)` is called on this thread for each sampled token
    /// with the text it completed (possibly ""), and once more with token None for held-back
    /// text; the texts add up to `result.text`. The model runs with the GIL released.
    /// An exception raised by `on_token`, and Ctrl-C (KeyboardInterrupt), end the generation
    /// and propagate; `cancel()` raises CancelledError. Either way the tokens sampled so far
    /// stay in the session and it stays usable.
    ///
    /// temperature=0 is greedy; `seed` makes sampling reproducible. Arguments are checked
    /// before any work (InvalidArgumentError names the bad one; wrong types raise TypeError).
    #[pyo3(signature = (
        max_tokens = 256, *, temperature = 0.0, top_k = 0, top_p = 1.0, min_p = 0.0,
        repetition_penalty = 1.0, seed = None, stop = None, on_token = None,
        presence_penalty = 0.0, frequency_penalty = 0.0, stop_token_ids = None,
        logit_bias = None, skip_special_tokens = true
    ))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        max_tokens: i64,
        temperature: f64,
        top_k: i64,
        top_p: f64,
        min_p: f64,
        repetition_penalty: f64,
        seed: Option<Bound<'py, PyAny>>,
        stop: Option<Bound<'py, PyAny>>,
        on_token: Option<Bound<'py, PyAny>>,
        presence_penalty: f64,
        frequency_penalty: f64,
        stop_token_ids: Option<Bound<'py, PyAny>>,
        logit_bias: Option<Bound<'py, PyAny>>,
        skip_special_tokens: bool,
    ) -> PyResult<PyGenerationResult> {
        let args = GenArgs {
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
            stop,
            on_token,
            presence_penalty,
            frequency_penalty,
            stop_token_ids,
            logit_bias,
            skip_special_tokens,
        };
        let call = args.check(py, self.vocab())?;
        self.run_generate(py, call)
    }

    /// Generate as an iterator of text chunks (a TokenStream); takes the same arguments as
    /// `generate`. The prompt is prefilled before this returns; a worker thread then decodes
    /// while `next()` waits with the GIL released. The chunks add up to the text `generate`
    /// would return; `on_token`, if given, runs on the worker thread. An exception raised by
    /// `on_token` ends the generation: `next()` returns the chunk of that token, then raises it.
    /// Closing or dropping the iterator (or Ctrl-C while it waits) cancels the generation; the
    /// session keeps the tokens sampled so far and stays usable. Until then the session is busy
    /// (BusyError), also when the consumer raised while a reference to the iterator lives on
    /// (e.g. in a traceback): `with session.stream(...) as it:` closes it in every case.
    #[pyo3(signature = (
        max_tokens = 256, *, temperature = 0.0, top_k = 0, top_p = 1.0, min_p = 0.0,
        repetition_penalty = 1.0, seed = None, stop = None, on_token = None,
        presence_penalty = 0.0, frequency_penalty = 0.0, stop_token_ids = None,
        logit_bias = None, skip_special_tokens = true
    ))]
    #[allow(clippy::too_many_arguments)]
    fn stream<'py>(
        slf: &Bound<'py, Self>,
        max_tokens: i64,
        temperature: f64,
        top_k: i64,
        top_p: f64,
        min_p: f64,
        repetition_penalty: f64,
        seed: Option<Bound<'py, PyAny>>,
        stop: Option<Bound<'py, PyAny>>,
        on_token: Option<Bound<'py, PyAny>>,
        presence_penalty: f64,
        frequency_penalty: f64,
        stop_token_ids: Option<Bound<'py, PyAny>>,
        logit_bias: Option<Bound<'py, PyAny>>,
        skip_special_tokens: bool,
    ) -> PyResult<PyTokenStream> {
        let py = slf.py();
        let args = GenArgs {
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
            stop,
            on_token,
            presence_penalty,
            frequency_penalty,
            stop_token_ids,
            logit_bias,
            skip_special_tokens,
        };
        let call = args.check(py, slf.get().vocab())?;
        PyTokenStream::start(py, slf.clone().unbind(), call)
    }

    /// Ask the running generate/stream/prefill of this session to stop, from any thread; it
    /// raises CancelledError at the next forward-pass boundary. The session stays usable.
    fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The token history (a new list each time).
    #[getter]
    fn tokens(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        Ok(lock(py, &self.inner)?.tokens().to_vec())
    }

    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(lock(py, &self.inner)?.len())
    }

    /// The most tokens this session may hold.
    #[getter]
    fn max_context(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(lock(py, &self.inner)?.max_context())
    }

    /// Scheduling priority (default 0, or `model.session(priority=...)`): when sessions in
    /// several threads have more forward passes queued than one batch takes, higher priority
    /// runs first. Only the order of waiting work changes, never the results. Reading works
    /// any time; setting raises BusyError while another call on the session runs.
    #[getter]
    fn priority(&self) -> i32 {
        self.priority.load(Ordering::SeqCst)
    }

    #[setter]
    fn set_priority(&self, py: Python<'_>, priority: i32) -> PyResult<()> {
        let mut session = lock(py, &self.inner)?;
        session.set_priority(priority);
        self.priority.store(priority, Ordering::SeqCst);
        Ok(())
    }

    /// The Model this session runs on.
    #[getter]
    fn model(&self, py: Python<'_>) -> Py<PyModel> {
        self.model.clone_ref(py)
    }

    /// An independent copy (tokens, KV cache, sampler state, priority); later changes to either
    /// do not affect the other. Cheap: the two share the KV cache's blocks until one of them
    /// writes into a shared block, which it then copies (copy-on-write).
    fn fork(&self, py: Python<'_>) -> PyResult<PySession> {
        let guard = lock(py, &self.inner)?;
        let session = &*guard;
        let copy = run_detached(py, || session.fork())?;
        Ok(PySession::new(self.model.clone_ref(py), copy))
    }

    /// Keep the first `n_tokens` tokens (a rewind); whole KV blocks past them go back to the
    /// model. Raises InvalidArgumentError when n_tokens is negative or larger than the session.
    fn truncate(&self, py: Python<'_>, n_tokens: i64) -> PyResult<()> {
        let n = convert::count(py, n_tokens, "n_tokens")?;
        let mut guard = lock(py, &self.inner)?;
        let session = &mut *guard;
        // Detached: giving blocks back takes the model's KV pool, which a forward pass in
        // another thread holds until it ends.
        run_detached(py, || session.truncate(n))
    }

    /// Forget every token; the KV blocks go back to the model.
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        let mut guard = lock(py, &self.inner)?;
        let session = &mut *guard;
        run_detached(py, || {
            session.reset();
            Ok(())
        })
    }

    /// Write the session (tokens, KV cache, logits, sampler state, chat messages) to `path`
    /// (str or os.PathLike), atomically. Raises IoError when it cannot be written.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let guard = lock(py, &self.inner)?;
        let session = &*guard;
        run_detached(py, || session.save(&path))
    }

    /// Read a session saved by `save` from the same model; it continues exactly as the original
    /// would have. Raises IoError (unreadable file), ModelFormatError (corrupt or truncated),
    /// InvalidArgumentError (saved from another model), UnsupportedError (another format version).
    #[staticmethod]
    fn load(py: Python<'_>, model: &Bound<'_, PyModel>, path: PathBuf) -> PyResult<PySession> {
        let m = &model.get().model;
        let session = run_detached(py, || Session::load(m, &path))?;
        Ok(PySession::new(model.clone().unbind(), session))
    }

    fn __repr__(&self) -> String {
        match self.inner.try_lock() {
            Ok(s) => format!(
                "Session(len={}, max_context={}, priority={})",
                s.len(),
                s.max_context(),
                s.priority()
            ),
            Err(_) => "Session(busy)".to_string(),
        }
    }
}

/// Token counts and speeds of one generation.
#[pyclass(name = "GenerationStats", module = "phi3", frozen, get_all)]
pub(crate) struct PyGenerationStats {
    /// Tokens that were pending (appended text or messages, the assistant prompt) and prefilled.
    prompt_tokens: usize,
    /// Tokens sampled, the stop token included.
    generated_tokens: usize,
    /// Seconds from the call to the first sampled token (includes the prefill).
    time_to_first_token: f64,
    /// Prompt tokens per second of prefill (0 when none).
    prefill_tokens_per_s: f64,
    /// Decode steps after the first token, per second.
    decode_tokens_per_s: f64,
}

#[pymethods]
impl PyGenerationStats {
    /// The stats as a dict.
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("prompt_tokens", self.prompt_tokens)?;
        d.set_item("generated_tokens", self.generated_tokens)?;
        d.set_item("time_to_first_token", self.time_to_first_token)?;
        d.set_item("prefill_tokens_per_s", self.prefill_tokens_per_s)?;
        d.set_item("decode_tokens_per_s", self.decode_tokens_per_s)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "GenerationStats(prompt_tokens={}, generated_tokens={}, time_to_first_token={:.4}, \
             prefill_tokens_per_s={:.1}, decode_tokens_per_s={:.1})",
            self.prompt_tokens,
            self.generated_tokens,
            self.time_to_first_token,
            self.prefill_tokens_per_s,
            self.decode_tokens_per_s
        )
    }
}

impl From<&GenerationStats> for PyGenerationStats {
    fn from(s: &GenerationStats) -> Self {
        PyGenerationStats {
            prompt_tokens: s.prompt_tokens,
            generated_tokens: s.generated_tokens,
            time_to_first_token: s.time_to_first_token.as_secs_f64(),
            prefill_tokens_per_s: s.prefill_tokens_per_s,
            decode_tokens_per_s: s.decode_tokens_per_s,
        }
    }
}

/// What a generation produced: `text` (without stop strings and, by default, special tokens),
/// `tokens` (sampled ids, the stop token included; all are in the session), `finish_reason`
/// ("eos", "stop_string", "length", "callback" or "cancelled") and `stats`.
#[pyclass(name = "GenerationResult", module = "phi3", frozen, get_all)]
pub(crate) struct PyGenerationResult {
    /// The generated text.
    text: String,
    /// The sampled token ids, the stop token included.
    tokens: Vec<u32>,
    /// Why generation ended: "eos", "stop_string", "length", "callback" or "cancelled".
    finish_reason: String,
    /// Token counts and speeds.
    stats: Py<PyGenerationStats>,
}

impl PyGenerationResult {
    pub(crate) fn new(py: Python<'_>, r: GenerationResult) -> PyResult<Self> {
        Ok(PyGenerationResult {
            stats: Py::new(py, PyGenerationStats::from(&r.stats))?,
            finish_reason: r.finish_reason.as_str().to_string(),
            tokens: r.tokens,
            text: r.text,
        })
    }
}

#[pymethods]
impl PyGenerationResult {
    fn __repr__(&self) -> String {
        format!(
            "GenerationResult(text={:?}, tokens=[{} ids], finish_reason={:?})",
            self.text,
            self.tokens.len(),
            self.finish_reason
        )
    }
}
