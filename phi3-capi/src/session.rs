//! Session handles: create, append, logits, truncate, fork, save/load, free, cancel.
//!
//! A `phi3_session` wraps the Rust `Session` in a mutex taken with `try_lock`, so a second
//! concurrent call gets PHI3_ERR_BUSY instead of undefined behaviour. The cancel token, the
//! length and the priority live outside the lock: `phi3_session_cancel`, `phi3_session_len` and
//! `phi3_session_priority` work while another thread is inside a call.

use std::ffi::c_char;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use phi3_core::{CancelToken, Error, ErrorKind, Result, Session, SessionOptions};

use crate::ffi::{
    arg_cstr, arg_out, arg_ref, arg_slice, arg_str, boundary, copy_out, guarded, init_options,
    read_options, token_ids, Options,
};
use crate::model::phi3_model;
use crate::status::phi3_status;

/// One conversation: tokens and KV cache on a model. Opaque. Used by one thread at a time (a
/// concurrent second call returns PHI3_ERR_BUSY); phi3_session_cancel works from any thread.
pub struct phi3_session {
    session: Mutex<Session>,
    cancel: CancelToken,
    len: AtomicUsize,
    /// The session's priority, published for `phi3_session_priority` (changed only by
    /// `phi3_session_set_priority`, under the lock).
    priority: AtomicI32,
}

impl phi3_session {
    pub(crate) fn new(session: Session) -> *mut phi3_session {
        let handle = phi3_session {
            cancel: session.cancel_token(),
            len: AtomicUsize::new(session.len()),
            priority: AtomicI32::new(session.priority()),
            session: Mutex::new(session),
        };
        Box::into_raw(Box::new(handle))
    }

    /// Run `f` on the session, or fail with Busy if another thread is inside a call.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Session) -> Result<T>) -> Result<T> {
        /// Publishes the session's length when the call ends, also when it unwinds (the
        /// boundary catches the panic; phi3_session_len must not report a stale length).
        struct PublishLen<'a> {
            guard: MutexGuard<'a, Session>,
            len: &'a AtomicUsize,
        }
        impl Drop for PublishLen<'_> {
            fn drop(&mut self) {
                self.len.store(self.guard.len(), Ordering::SeqCst);
            }
        }
        let mut locked = PublishLen { guard: self.lock()?, len: &self.len };
        f(&mut locked.guard)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Session>> {
        match self.session.try_lock() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::WouldBlock) => Err(Error::new(
                ErrorKind::Busy,
                "the session is in use by another call (one thread at a time)",
            )),
            // A panic inside an earlier call was caught at the boundary; session calls are
            // transactional, so its state is still consistent.
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
        }
    }
}

/// Options for a new session. Fill with phi3_session_options_init.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct phi3_session_options {
    /// sizeof(phi3_session_options), set by phi3_session_options_init.
    pub struct_size: u32,
    /// Most tokens the session may hold; 0 means the model's maximum.
    pub max_context: usize,
    /// Scheduling priority (default 0): when sessions of the model have more forward passes
    /// queued than one batch takes, higher priority runs first (then arrival order). Only the
    /// order of waiting work changes, never the results. A struct_size that ends before this
    /// field means 0.
    pub priority: i32,
}

impl Options for phi3_session_options {
    fn fields() -> Vec<(usize, usize)> {
        use std::mem::{offset_of, size_of};
        let field = |start: usize, len: usize| (start, start + len);
        vec![
            (0, size_of::<u32>()),
            field(offset_of!(Self, max_context), size_of::<usize>()),
            field(offset_of!(Self, priority), size_of::<i32>()),
        ]
    }

    fn defaults() -> Self {
        phi3_session_options {
            struct_size: std::mem::size_of::<Self>() as u32,
            max_context: 0,
            priority: 0,
        }
    }
}

/// Fill `*o` with the defaults (the model's max context, priority 0). NULL is ignored.
/// Thread-safe; cannot fail.
///
/// # Safety
/// `o` is NULL or points to a writable phi3_session_options.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_options_init(o: *mut phi3_session_options) {
    // SAFETY: forwarded contract.
    unsafe { init_options(o) }
}

/// Create an empty session on `m`; `*out` receives it (free with phi3_session_free). The session
/// holds a reference to the model; it takes KV memory from the model's pool only as tokens are
/// run, and gives it back when freed, truncated or reset. Thread-safe with respect to the model.
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL `m` or `out`, bad options).
///
/// # Safety
/// `m` is NULL or a live model; `o` NULL or valid; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_new(
    m: *mut phi3_model,
    o: *const phi3_session_options,
    out: *mut *mut phi3_session,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let m = unsafe { arg_ref(m, "model") }?;
        let o = unsafe { read_options(o, "options") }?;
        let out = arg_out(out, "out")?;
        let max_context = (o.max_context > 0).then_some(o.max_context);
        let session = m.model.session(SessionOptions { max_context, priority: o.priority })?;
        // SAFETY: out was checked by arg_out and is writable (contract).
        unsafe { out.write(phi3_session::new(session)) };
        Ok(())
    })
}

/// Free a session (and its reference to the model); its KV blocks go back to the model's pool
/// (those shared with forks stay with them). NULL is a no-op. Must not race with any other call
/// on the same session.
///
/// # Safety
/// `s` is NULL or a session from this library not yet freed.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_free(s: *mut phi3_session) {
    guarded((), || {
        if !s.is_null() {
            // SAFETY: s came from Box::into_raw here and is freed once (contract).
            drop(unsafe { Box::from_raw(s) });
        }
    })
}

/// Tokenize UTF-8 text and add it to the session (BOS first when the session is empty). The
/// model runs over it at the next call that needs logits (generate, logits, append_tokens).
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL, invalid UTF-8, empty result), PHI3_ERR_CONTEXT_FULL,
/// PHI3_ERR_UNSUPPORTED (model without tokenizer), PHI3_ERR_BUSY. The session is unchanged on
/// error.
///
/// # Safety
/// `s` NULL or live; `utf8` NULL or `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_append_text(
    s: *mut phi3_session,
    utf8: *const c_char,
    len: usize,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let s = unsafe { arg_ref(s, "session") }?;
        let text = unsafe { arg_str(utf8, len, "utf8") }?;
        s.with(|session| session.append_text(text))
    })
}

/// Append token ids and run the model over everything pending (the logits are then available
/// through phi3_session_logits).
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL, n = 0), PHI3_ERR_TOKEN_OUT_OF_RANGE (naming the
/// index), PHI3_ERR_CONTEXT_FULL, PHI3_ERR_OUT_OF_MEMORY (the model's KV memory is exhausted and
/// it was loaded without `kv_wait`), PHI3_ERR_CANCELLED (also while waiting for KV memory),
/// PHI3_ERR_BUSY. Unchanged on error.
///
/// # Safety
/// `s` NULL or live; `tokens` NULL or `n` readable ids.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_append_tokens(
    s: *mut phi3_session,
    tokens: *const i32,
    n: usize,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let s = unsafe { arg_ref(s, "session") }?;
        s.with(|session| {
            // SAFETY: forwarded contract.
            let ids = unsafe { tokens_that_fit(session, tokens, n) }?;
            session.append_tokens(ids).map(drop)
        })
    })
}

/// Append token ids, run the model over everything pending, and store only the greedy choice
/// after the last token in `*out_token`: the id phi3_session_generate picks with temperature 0
/// (the largest logit among the ids the tokenizer can emit, ties to the lowest id), or -1 when
/// no logit there is above -inf. For hosts running their own greedy loop: on CUDA the choice is
/// made on the device and one id is copied back instead of the logits (phi3_session_logits
/// afterwards runs the last token again).
///
/// Errors: those of phi3_session_append_tokens, and PHI3_ERR_INVALID_ARGUMENT for a NULL
/// `out_token`. Unchanged on error (`*out_token` too).
///
/// # Safety
/// `s` NULL or live; `tokens` NULL or `n` readable ids; `out_token` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_append_tokens_greedy(
    s: *mut phi3_session,
    tokens: *const i32,
    n: usize,
    out_token: *mut i32,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let s = unsafe { arg_ref(s, "session") }?;
        let out = arg_out(out_token, "out_token")?;
        let chosen = s.with(|session| {
            // SAFETY: forwarded contract.
            let ids = unsafe { tokens_that_fit(session, tokens, n) }?;
            session.append_tokens_greedy(ids)
        })?;
        // Ids are below the vocabulary size, which fits an i32 (the model checked it).
        let id = chosen.map_or(-1, |t| i32::try_from(t).unwrap_or(-1));
        // SAFETY: checked by arg_out; writable by the caller's contract.
        unsafe { out.write(id) };
        Ok(())
    })
}

/// `n` token ids at `tokens` that fit in `session`: the room is checked before the ids are read
/// or copied (a count of 2^40 is an error, not a multi-terabyte allocation), then each id's sign.
///
/// # Safety
/// `tokens` NULL or `n` readable ids.
unsafe fn tokens_that_fit<'a>(
    session: &Session,
    tokens: *const i32,
    n: usize,
) -> phi3_core::Result<&'a [u32]> {
    let room = session.max_context().saturating_sub(session.len());
    if n > room {
        return Err(Error::new(
            ErrorKind::ContextFull,
            format!("{n} tokens do not fit: the session has room for {room} more"),
        ));
    }
    // SAFETY: forwarded contract.
    token_ids(unsafe { arg_slice(tokens, n, "tokens") }?, "tokens")
}

/// Add a chat message ("system", "user" or "assistant") through the model's chat template.
/// The next phi3_session_generate adds the assistant prompt first.
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL, invalid UTF-8, a role the template rejects),
/// PHI3_ERR_CONTEXT_FULL, PHI3_ERR_UNSUPPORTED, PHI3_ERR_BUSY. Unchanged on error.
///
/// # Safety
/// `s` NULL or live; `role` and `content` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_append_message(
    s: *mut phi3_session,
    role: *const c_char,
    content: *const c_char,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let s = unsafe { arg_ref(s, "session") }?;
        let role = unsafe { arg_cstr(role, "role") }?;
        let content = unsafe { arg_cstr(content, "content") }?;
        s.with(|session| session.append_message(role, content))
    })
}

/// Copy the logits after the last token (`phi3_model_vocab_size` floats) into `out`, running the
/// model over pending tokens first. `*out_len` receives the needed count.
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL session, empty session), PHI3_ERR_BUFFER_TOO_SMALL,
/// PHI3_ERR_OUT_OF_MEMORY (KV memory, as for phi3_session_append_tokens), PHI3_ERR_CANCELLED,
/// PHI3_ERR_BUSY.
///
/// # Safety
/// `s` NULL or live; `out` NULL or room for `cap` floats; `out_len` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_logits(
    s: *mut phi3_session,
    out: *mut f32,
    cap: usize,
    out_len: *mut usize,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let s = unsafe { arg_ref(s, "session") }?;
        s.with(|session| {
            let logits = session.logits()?;
            // SAFETY: forwarded contract.
            unsafe { copy_out(logits, out, cap, out_len) }
        })
    })
}

/// Ask the call running on this session (generate, or a long append) to stop at its next
/// forward-pass boundary; it then returns PHI3_ERR_CANCELLED and the session stays usable.
/// Callable from any thread at any time; a cancel while nothing runs has no effect (each call
/// clears it on entry). NULL is a no-op.
///
/// # Safety
/// `s` is NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_cancel(s: *mut phi3_session) {
    guarded((), || {
        // SAFETY: forwarded contract.
        if let Ok(s) = unsafe { arg_ref(s, "session") } {
            s.cancel.cancel();
        }
    })
}

/// Number of tokens in the session (as of the last completed call when another thread is inside
/// one); 0 for NULL.
///
/// # Safety
/// `s` is NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_len(s: *const phi3_session) -> usize {
    // SAFETY: forwarded contract.
    guarded(0, || unsafe { arg_ref(s, "session") }.map_or(0, |s| s.len.load(Ordering::SeqCst)))
}

/// Copy the session's token ids into `out`; `*out_len` receives the count.
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT, PHI3_ERR_BUFFER_TOO_SMALL, PHI3_ERR_BUSY.
///
/// # Safety
/// `s` NULL or live; `out` NULL or room for `cap` ids; `out_len` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_tokens(
    s: *const phi3_session,
    out: *mut i32,
    cap: usize,
    out_len: *mut usize,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let s = unsafe { arg_ref(s, "session") }?;
        s.with(|session| {
            let ids: Vec<i32> = session.tokens().iter().map(|&t| t as i32).collect();
            // SAFETY: forwarded contract.
            unsafe { copy_out(&ids, out, cap, out_len) }
        })
    })
}

/// Keep the first `n_tokens` tokens (cheap; no data moves). Whole KV blocks past them go back to
/// the model's pool, which wakes passes of other sessions waiting for KV memory (`kv_wait`).
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL, `n_tokens` > length), PHI3_ERR_BUSY.
///
/// # Safety
/// `s` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_truncate(
    s: *mut phi3_session,
    n_tokens: usize,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contract.
        let s = unsafe { arg_ref(s, "session") }?;
        s.with(|session| session.truncate(n_tokens))
    })
}

/// Empty the session; its KV blocks go back to the model's pool (see phi3_session_truncate).
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL), PHI3_ERR_BUSY.
///
/// # Safety
/// `s` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_reset(s: *mut phi3_session) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contract.
        let s = unsafe { arg_ref(s, "session") }?;
        s.with(|session| {
            session.reset();
            Ok(())
        })
    })
}

/// An independent copy of the session (tokens, KV cache, priority, random state) in `*out`; free
/// both. Cheap: the two share the KV blocks (copy-on-write) until one of them writes into a shared
/// block, which it then copies (at most one block per pass, counted against the KV memory
/// budget), so a long prompt forked into many conversations is cached once. Later changes to
/// either do not affect the other.
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT, PHI3_ERR_OUT_OF_MEMORY (not raised today: the fork itself
/// allocates no KV memory), PHI3_ERR_BUSY.
///
/// # Safety
/// `s` NULL or live; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_fork(
    s: *const phi3_session,
    out: *mut *mut phi3_session,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let s = unsafe { arg_ref(s, "session") }?;
        let out = arg_out(out, "out")?;
        let fork = s.with(|session| session.fork())?;
        // SAFETY: out was checked by arg_out and is writable (contract).
        unsafe { out.write(phi3_session::new(fork)) };
        Ok(())
    })
}

/// Save the session to `path` (written beside it, then renamed: a failed save leaves an
/// existing file intact).
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT, PHI3_ERR_IO, PHI3_ERR_BUSY.
///
/// # Safety
/// `s` NULL or live; `path` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_save(
    s: *const phi3_session,
    path: *const c_char,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let s = unsafe { arg_ref(s, "session") }?;
        let path = unsafe { arg_cstr(path, "path") }?;
        s.with(|session| session.save(path))
    })
}

/// Load a session saved from the same model into `*out` (free with phi3_session_free).
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL, saved from a different model), PHI3_ERR_IO,
/// PHI3_ERR_MODEL_FORMAT (truncated or corrupted file), PHI3_ERR_UNSUPPORTED (newer version),
/// PHI3_ERR_OUT_OF_MEMORY (the model's KV memory budget cannot hold the saved cache). The loaded
/// session has priority 0.
///
/// # Safety
/// `m` NULL or live; `path` NULL or NUL-terminated; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_load(
    m: *mut phi3_model,
    path: *const c_char,
    out: *mut *mut phi3_session,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let m = unsafe { arg_ref(m, "model") }?;
        let path = unsafe { arg_cstr(path, "path") }?;
        let out = arg_out(out, "out")?;
        let session = Session::load(&m.model, path)?;
        // SAFETY: out was checked by arg_out and is writable (contract).
        unsafe { out.write(phi3_session::new(session)) };
        Ok(())
    })
}

/// Set the session's scheduling priority (see phi3_session_options.priority) for its later
/// forward passes. Like every call on a session it needs the session idle: while another thread
/// is inside a call on it this returns PHI3_ERR_BUSY.
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL `s`), PHI3_ERR_BUSY.
///
/// # Safety
/// `s` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_set_priority(
    s: *mut phi3_session,
    priority: i32,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contract.
        let s = unsafe { arg_ref(s, "session") }?;
        s.with(|session| {
            session.set_priority(priority);
            s.priority.store(priority, Ordering::SeqCst);
            Ok(())
        })
    })
}

/// The session's scheduling priority (0 unless set); 0 for NULL. Answers while another thread
/// is inside a call on the session. Thread-safe.
///
/// # Safety
/// `s` is NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_priority(s: *const phi3_session) -> i32 {
    // SAFETY: forwarded contract.
    guarded(0, || unsafe { arg_ref(s, "session") }.map_or(0, |s| s.priority.load(Ordering::SeqCst)))
}
