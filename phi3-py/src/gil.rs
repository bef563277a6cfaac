//! Running engine work with the GIL released: the one place where phi3-py detaches from Python.
//!
//! - `run_detached`: short work (tokenizing, loading, saving, forking): detach, run, map the
//!   error (a panic becomes `InternalError`).
//! - `run_cancellable`: work that runs the model (prefill, decode). It runs on a scoped helper
//!   thread while the calling thread waits detached, waking every `POLL` to run
//!   `check_signals()`: on the main thread a Ctrl-C then cancels the work through the session's
//!   `CancelToken` (at the next forward-pass boundary, prefill chunks included) and the
//!   KeyboardInterrupt is raised once the engine has returned, so the session is consistent and
//!   usable. The engine side may ask the calling thread to call the host (`on_token`): the
//!   request crosses a rendezvous channel, and the caller runs the callback with the GIL, so
//!   callbacks run on the thread that called `generate`.
//! - `lock`: a session's state, or `BusyError` instead of waiting.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use phi3_core::{CancelToken, ErrorKind};
use pyo3::prelude::*;

use crate::errors::{new_err, panic_error, to_py_err};

/// How often a waiting caller wakes to check for Ctrl-C.
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// Run short engine work with the GIL released, so other Python threads run meanwhile. A panic
/// becomes `InternalError` with the panic's text, a core error the exception of its kind.
/// `f` must not touch Python objects.
pub(crate) fn run_detached<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> phi3_core::Result<T> + Send,
    T: Send,
{
    match py.detach(|| catch_unwind(AssertUnwindSafe(f))) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(to_py_err(py, e)),
        Err(panic) => Err(to_py_err(py, panic_error(&*panic))),
    }
}

/// The engine side's way to reach the host: `host(text, token)` runs the caller's `on_call` on
/// the calling thread and returns true when generation should stop (the host asked, raised, or
/// Ctrl-C arrived). Without an `on_call` it returns false at once.
pub(crate) type Host<'h> = &'h mut (dyn FnMut(&str, Option<u32>) -> bool + Send);

/// The caller side's handler of a host call: `Ok(true)` stops the generation.
pub(crate) type OnCall<'a> = &'a mut dyn FnMut(Python<'_>, &str, Option<u32>) -> PyResult<bool>;

/// Run model work `f` (which gets a [`Host`]) on a helper thread while this thread waits with
/// the GIL released, letting Ctrl-C through as described in the module docs. An exception from
/// `on_call` or a KeyboardInterrupt is raised after `f` returns, in place of its result.
pub(crate) fn run_cancellable<T, F>(
    py: Python<'_>,
    cancel: &CancelToken,
    mut on_call: Option<OnCall<'_>>,
    f: F,
) -> PyResult<T>
where
    F: FnOnce(Host<'_>) -> phi3_core::Result<T> + Send,
    T: Send,
{
    let calls_host = on_call.is_some();
    let (call_tx, call_rx) = mpsc::sync_channel::<(String, Option<u32>)>(0);
    let (reply_tx, reply_rx) = mpsc::sync_channel::<bool>(0);
    let mut raised: Option<PyErr> = None;
    let outcome = std::thread::scope(|scope| {
        let engine =
            std::thread::Builder::new().name("phi3-engine".into()).spawn_scoped(scope, move || {
                let mut host = move |text: &str, token: Option<u32>| -> bool {
                    if !calls_host {
                        return false;
                    }
                    if call_tx.send((text.to_owned(), token)).is_err() {
                        return true;
                    }
                    reply_rx.recv().unwrap_or(true)
                };
                // `host` (and with it the sender) is dropped when this returns, which tells
                // the waiting caller that the engine is done.
                catch_unwind(AssertUnwindSafe(|| f(&mut host)))
            });
        let engine = match engine {
            Ok(handle) => handle,
            Err(e) => {
                let msg = format!("cannot start an engine thread: {e}");
                return Err(new_err(py, ErrorKind::Internal, msg));
            }
        };
        // A Receiver is Send but not Sync: it moves into each detached wait and back.
        let mut rx = call_rx;
        loop {
            let (back, got) = py.detach(move || {
                let got = rx.recv_timeout(POLL);
                (rx, got)
            });
            rx = back;
            match got {
                Ok((text, token)) => {
                    let mut stop = raised.is_some();
                    if let (false, Some(on_call)) = (stop, on_call.as_mut()) {
                        match on_call(py, &text, token) {
                            Ok(s) => stop = s,
                            Err(e) => {
                                raised = Some(e);
                                stop = true;
                            }
                        }
                    }
                    if !stop {
                        if let Err(e) = py.check_signals() {
                            raised = Some(e);
                            stop = true;
                        }
                    }
                    let _ = reply_tx.send(stop);
                }
                Err(RecvTimeoutError::Timeout) => match &raised {
                    // Repeated, because the engine clears the token when a call starts; a
                    // cancel that landed just before that would be lost.
                    Some(_) => cancel.cancel(),
                    None => {
                        if let Err(e) = py.check_signals() {
                            raised = Some(e);
                            cancel.cancel();
                        }
                    }
                },
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        Ok(py.detach(move || engine.join()))
    })?;
    if let Some(e) = raised {
        return Err(e);
    }
    match outcome {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(e))) => Err(to_py_err(py, e)),
        Ok(Err(panic)) | Err(panic) => Err(to_py_err(py, panic_error(&*panic))),
    }
}

/// Lock a session's state without waiting: a second concurrent call gets `BusyError` (a
/// session serves one thread at a time; waiting could deadlock an `on_token` callback that
/// calls back into its own session).
pub(crate) fn lock<'a, T>(py: Python<'_>, m: &'a Mutex<T>) -> PyResult<MutexGuard<'a, T>> {
    match m.try_lock() {
        Ok(guard) => Ok(guard),
        // A panic is caught before it unwinds through a guard; take the data anyway.
        Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(TryLockError::WouldBlock) => Err(new_err(
            py,
            ErrorKind::Busy,
            "the session is in use by another call (generate, stream or an on_token \
             callback); a session serves one thread at a time",
        )),
    }
}
