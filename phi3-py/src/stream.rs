//! `phi3.TokenStream`: `Session.stream()` as a Python iterator of text chunks.
//!
//! A worker thread owns the session's lock for the life of the generation and drives
//! phi3-core's `TokenStream`, sending each chunk through a channel; `__next__` waits on the
//! channel with the GIL released, waking every `POLL` to let Ctrl-C through (KeyboardInterrupt
//! cancels the generation, waits for the worker, and propagates). `close()`, leaving a `with`
//! block, or dropping the iterator cancels the generation and waits for the worker, so the
//! session is usable again as soon as they return.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use phi3_core::{CancelToken, Error, ErrorKind, FinishReason, GenerationResult};
use pyo3::prelude::*;

use crate::convert::GenCall;
use crate::errors::{new_err, to_py_err};
use crate::gil::{lock, POLL};
use crate::session::{PyGenerationResult, PySession};

/// Chunks the worker may run ahead of the consumer.
const AHEAD: usize = 64;

enum Msg {
    /// The prompt is prefilled; tokens follow.
    Started,
    /// Text completed by one step (possibly empty).
    Chunk(String),
    /// `on_token` raised: the generation ended there; raise this from `__next__`.
    Raised(PyErr),
    /// The generation ended (always the last message).
    Done(Result<GenerationResult, Error>),
}

/// The state the consumer side keeps.
struct Consumer {
    rx: Option<Receiver<Msg>>,
    raised: Option<PyErr>,
}

/// An iterator of text chunks from `Session.stream()` or `Model.chat(..., stream=True)`.
/// Joining the chunks gives the text `generate` would have returned. After it is exhausted,
/// `result` holds the GenerationResult. `close()` (or leaving a `with` block, or dropping it)
/// cancels the generation; the session keeps the tokens sampled so far and stays usable. An
/// exception raised by `on_token` ends the generation and is raised by `next()` after the chunk
/// of the token it was called for; `on_token` is not called again.
#[pyclass(name = "TokenStream", module = "phi3", frozen)]
pub(crate) struct PyTokenStream {
    session: Py<PySession>,
    consumer: Mutex<Consumer>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// Set by close/drop/Ctrl-C: the worker stops at its next step.
    closed: std::sync::Arc<AtomicBool>,
    cancel: CancelToken,
    result: Mutex<Option<Py<PyGenerationResult>>>,
    finish_reason: Mutex<Option<String>>,
}

/// The worker thread's body: `work`, with a panic turned into a final `InternalError`.
fn worker(
    session: Py<PySession>,
    call: GenCall,
    closed: std::sync::Arc<AtomicBool>,
    tx: SyncSender<Msg>,
) {
    let tx_panic = tx.clone();
    let run = std::panic::AssertUnwindSafe(|| work(session, call, closed, tx));
    if let Err(panic) = std::panic::catch_unwind(run) {
        let _ = tx_panic.send(Msg::Done(Err(crate::errors::panic_error(&*panic))));
    }
}

/// Lock the session, prefill, then step until the end, sending every chunk.
fn work(
    session: Py<PySession>,
    call: GenCall,
    closed: std::sync::Arc<AtomicBool>,
    tx: SyncSender<Msg>,
) {
    let s = session.get();
    let mut guard = match s.inner.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            let e = Error::new(
                ErrorKind::Busy,
                "the session is in use by another call (generate, stream or an on_token \
                 callback); a session serves one thread at a time",
            );
            let _ = tx.send(Msg::Done(Err(e)));
            return;
        }
    };
    let GenCall { options, on_token } = call;
    let mut stream = match guard.stream(&options) {
        Ok(st) => st,
        Err(e) => {
            let _ = tx.send(Msg::Done(Err(e)));
            return;
        }
    };
    let _ = tx.send(Msg::Started);
    // Set once on_token raised: it is not called again, and nothing more reaches the consumer
    // (the final chunk of held-back text included) before the exception.
    let mut raised = false;
    while let Some(item) = stream.next() {
        if closed.load(Ordering::SeqCst) {
            stream.stop(FinishReason::Cancelled);
            continue;
        }
        let chunk = match item {
            Ok(chunk) => chunk,
            Err(_) => continue, // into_result reports it
        };
        if raised {
            continue;
        }
        if let Some(f) = &on_token {
            let outcome = Python::attach(|py| {
                f.call1(py, (chunk.text.as_str(), chunk.token)).and_then(|v| v.is_truthy(py))
            });
            match outcome {
                Ok(false) => {}
                Ok(true) => stream.stop(FinishReason::Callback),
                Err(e) => {
                    stream.stop(FinishReason::Callback);
                    raised = true;
                    let _ = tx.send(Msg::Chunk(chunk.text));
                    let _ = tx.send(Msg::Raised(e));
                    continue;
                }
            }
        }
        if tx.send(Msg::Chunk(chunk.text)).is_err() {
            // The consumer is gone.
            stream.stop(FinishReason::Cancelled);
        }
    }
    let _ = tx.send(Msg::Done(stream.into_result()));
    drop(guard);
    // `session` (a Py) is released here without the GIL: PyO3 defers the decref.
}

impl PyTokenStream {
    /// Spawn the worker and wait (GIL released) until the prompt is prefilled, so errors before
    /// the first token (BusyError, an empty session, ...) raise here.
    pub(crate) fn start(py: Python<'_>, session: Py<PySession>, call: GenCall) -> PyResult<Self> {
        let (tx, rx) = mpsc::sync_channel(AHEAD);
        let closed = std::sync::Arc::new(AtomicBool::new(false));
        let cancel = session.get().cancel.clone();
        let worker = {
            let session = session.clone_ref(py);
            let closed = closed.clone();
            std::thread::Builder::new()
                .name("phi3-stream".into())
                .spawn(move || worker(session, call, closed, tx))
                .map_err(|e| {
                    new_err(py, ErrorKind::Internal, format!("cannot start the stream thread: {e}"))
                })?
        };
        let it = PyTokenStream {
            session,
            consumer: Mutex::new(Consumer { rx: Some(rx), raised: None }),
            worker: Mutex::new(Some(worker)),
            closed,
            cancel,
            result: Mutex::new(None),
            finish_reason: Mutex::new(None),
        };
        // The first message is Started, or Done(Err) when the generation could not start.
        match it.receive(py)? {
            Some(Msg::Started) => Ok(it),
            Some(Msg::Done(Err(e))) => {
                it.finish(py);
                Err(to_py_err(py, e))
            }
            _ => {
                it.finish(py);
                Err(new_err(py, ErrorKind::Internal, "the stream thread ended before starting"))
            }
        }
    }

    /// The next message (None once the channel is closed), waiting with the GIL released and
    /// letting Ctrl-C through: on KeyboardInterrupt the generation is cancelled, the worker
    /// joined, and the exception returned.
    fn receive(&self, py: Python<'_>) -> PyResult<Option<Msg>> {
        let mut consumer = lock(py, &self.consumer)?;
        loop {
            // A Receiver is Send but not Sync: move it into the detached closure and back.
            let Some(rx) = consumer.rx.take() else { return Ok(None) };
            let (rx, got) = py.detach(move || {
                let got = rx.recv_timeout(POLL);
                (rx, got)
            });
            consumer.rx = Some(rx);
            match got {
                Ok(msg) => {
                    // A Ctrl-C that arrived while waiting is handled here, not by whatever
                    // bytecode runs next, so the generation is cancelled with it.
                    if let Err(e) = py.check_signals() {
                        consumer.rx = None;
                        drop(consumer);
                        self.finish(py);
                        return Err(e);
                    }
                    return Ok(Some(msg));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    consumer.rx = None;
                    return Ok(None);
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        consumer.rx = None;
                        drop(consumer);
                        self.finish(py);
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Stop the worker (if still running) and wait for it, with the GIL released. Called on the
    /// worker itself (`close()` from `on_token`, or the iterator freed there by a garbage
    /// collection), it only tells the worker to stop: it ends, and frees the session, after
    /// `on_token` returns.
    fn finish(&self, py: Python<'_>) {
        let handle = self.worker.lock().ok().and_then(|mut w| w.take());
        let Some(handle) = handle else { return };
        self.closed.store(true, Ordering::SeqCst);
        if !handle.is_finished() {
            // Interrupts a prefill or forward pass in progress at its next boundary.
            self.cancel.cancel();
        }
        if let Ok(mut c) = self.consumer.try_lock() {
            // Dropping the receiver unblocks a worker waiting to send.
            c.rx = None;
        }
        if handle.thread().id() == std::thread::current().id() {
            return; // joining itself would fail (EDEADLK); the handle detaches the thread
        }
        py.detach(|| {
            let _ = handle.join();
        });
    }
}

#[pymethods]
impl PyTokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        loop {
            match self.receive(py)? {
                None => {
                    let raised = lock(py, &self.consumer)?.raised.take();
                    return match raised {
                        Some(e) => Err(e),
                        None => Ok(None),
                    };
                }
                Some(Msg::Started) => {}
                Some(Msg::Chunk(text)) if text.is_empty() => {}
                Some(Msg::Chunk(text)) => return Ok(Some(text)),
                Some(Msg::Raised(e)) => lock(py, &self.consumer)?.raised = Some(e),
                Some(Msg::Done(done)) => {
                    self.finish(py);
                    let raised = lock(py, &self.consumer)?.raised.take();
                    if let Some(e) = raised {
                        return Err(e);
                    }
                    match done {
                        Ok(r) => {
                            *self.finish_reason.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(r.finish_reason.as_str().to_string());
                            let r = Py::new(py, PyGenerationResult::new(py, r)?)?;
                            *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                            return Ok(None);
                        }
                        Err(e) if e.kind() == ErrorKind::Cancelled => {
                            *self.finish_reason.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some("cancelled".into());
                            return Err(to_py_err(py, e));
                        }
                        Err(e) => return Err(to_py_err(py, e)),
                    }
                }
            }
        }
    }

    /// Cancel the generation (if still running) and wait for it to stop; the session keeps the
    /// tokens sampled so far and is usable when this returns. Idempotent.
    fn close(&self, py: Python<'_>) {
        let running = self.worker.lock().map(|w| w.is_some()).unwrap_or(false);
        if running {
            self.finish(py);
            self.finish_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| "cancelled".into());
        }
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }

    /// The GenerationResult once the stream is exhausted (None before, or after close()).
    #[getter]
    fn result(&self, py: Python<'_>) -> Option<Py<PyGenerationResult>> {
        self.result.lock().ok().and_then(|r| r.as_ref().map(|r| r.clone_ref(py)))
    }

    /// Why generation ended ("eos", "stop_string", "length", "callback", "cancelled"), or None
    /// while it runs.
    #[getter]
    fn finish_reason(&self) -> Option<String> {
        self.finish_reason.lock().ok().and_then(|r| r.clone())
    }

    /// The session generating (for `Model.chat(..., stream=True)`: the conversation so far).
    #[getter]
    fn session(&self, py: Python<'_>) -> Py<PySession> {
        self.session.clone_ref(py)
    }
}

impl Drop for PyTokenStream {
    fn drop(&mut self) {
        let running = self.worker.get_mut().map(|w| w.is_some()).unwrap_or(false);
        if running {
            // Dropped by Python (the GIL is held): stop the worker and wait for it, so the
            // session is free as soon as the iterator is gone.
            Python::attach(|py| self.finish(py));
        }
    }
}
