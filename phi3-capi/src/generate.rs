//! `phi3_session_generate`: options, the token callback, the result.

use std::ffi::{c_char, c_void};
use std::ops::ControlFlow;
use std::ptr;

use phi3_core::{ErrorKind, FinishReason, GenerateOptions, GenerationResult};

use crate::ffi::{
    arg_cstr, arg_ref, arg_slice, boundary, init_options, read_options, struct_size, token_ids,
    Options,
};
use crate::session::phi3_session;
use crate::status::phi3_status;

/// Finish reason: a stop token (eos, `<|end|>`, or one of `stop_token_ids`).
pub const PHI3_FINISH_EOS: i32 = 0;
/// Finish reason: the text reached one of the stop strings (not delivered).
pub const PHI3_FINISH_STOP_STRING: i32 = 1;
/// Finish reason: `max_tokens` generated, or the context is full.
pub const PHI3_FINISH_LENGTH: i32 = 2;
/// Finish reason: the callback returned non-zero.
pub const PHI3_FINISH_CALLBACK: i32 = 3;
/// Finish reason: phi3_session_cancel (the call returns PHI3_ERR_CANCELLED).
pub const PHI3_FINISH_CANCELLED: i32 = 4;

/// Streaming callback. Called on the thread that called phi3_session_generate, once per generated
/// token with the UTF-8 text that token completed (`utf8` is not NUL-terminated and is valid only
/// during the call; `len` may be 0 while a character's bytes or a possible stop string are held
/// back), and once more with `token` = -1 to deliver held-back text at the end. Return 0 to go on,
/// non-zero to stop (phi3_session_generate then returns PHI3_OK with PHI3_FINISH_CALLBACK; the
/// final `token` = -1 call may still follow). It must not call into the same session (that
/// returns PHI3_ERR_BUSY), except phi3_session_cancel. It must return normally: leaving it by a
/// C++ exception or longjmp crosses Rust frames and is undefined behaviour (a Rust `extern "C"`
/// callback that panics aborts the process with Rust >= 1.81). A host whose callback can fail
/// catches the failure inside the callback, returns non-zero, and raises it again after
/// phi3_session_generate returns; the tokens generated until then stay in the session, which
/// stays usable (phi3.hpp and Phi3.cs do this).
pub type phi3_token_callback = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        utf8: *const c_char,
        len: usize,
        token: i32,
    ) -> i32,
>;

/// How to generate. Fill with phi3_generate_options_init, then change fields.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct phi3_generate_options {
    /// sizeof(phi3_generate_options), set by phi3_generate_options_init.
    pub struct_size: u32,
    /// Most tokens to generate (default 256).
    pub max_tokens: u32,
    /// 0 = greedy (default); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: u32,
    /// Nucleus sampling threshold; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely; 0 = off.
    pub min_p: f32,
    /// HF repetition penalty over the session's tokens; 1 = off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of each token generated so far; 0 = off.
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of each token generated so far; 0 = off.
    pub frequency_penalty: f32,
    /// Non-zero: use `seed` (same seed and input, same output); 0: a fresh random seed.
    pub has_seed: i32,
    /// The seed used when `has_seed` is non-zero.
    pub seed: u64,
    /// `n_stop` NUL-terminated UTF-8 stop strings (borrowed for the call); may be NULL if 0.
    pub stop: *const *const c_char,
    /// Number of stop strings, at most 4096.
    pub n_stop: usize,
    /// Token ids that end generation. NULL: the model's eos ids and `<|end|>`; non-NULL with
    /// `n_stop_token_ids` 0: none.
    pub stop_token_ids: *const i32,
    /// Number of stop token ids, at most 4096.
    pub n_stop_token_ids: usize,
}

impl Options for phi3_generate_options {
    fn fields() -> Vec<(usize, usize)> {
        use std::mem::{offset_of, size_of};
        let field = |start: usize, len: usize| (start, start + len);
        vec![
            (0, size_of::<u32>()),
            field(offset_of!(Self, max_tokens), size_of::<u32>()),
            field(offset_of!(Self, temperature), size_of::<f32>()),
            field(offset_of!(Self, top_k), size_of::<u32>()),
            field(offset_of!(Self, top_p), size_of::<f32>()),
            field(offset_of!(Self, min_p), size_of::<f32>()),
            field(offset_of!(Self, repetition_penalty), size_of::<f32>()),
            field(offset_of!(Self, presence_penalty), size_of::<f32>()),
            field(offset_of!(Self, frequency_penalty), size_of::<f32>()),
            field(offset_of!(Self, has_seed), size_of::<i32>()),
            field(offset_of!(Self, seed), size_of::<u64>()),
            field(offset_of!(Self, stop), size_of::<usize>()),
            field(offset_of!(Self, n_stop), size_of::<usize>()),
            field(offset_of!(Self, stop_token_ids), size_of::<usize>()),
            field(offset_of!(Self, n_stop_token_ids), size_of::<usize>()),
        ]
    }

    fn defaults() -> Self {
        let d = GenerateOptions::default();
        phi3_generate_options {
            struct_size: std::mem::size_of::<Self>() as u32,
            max_tokens: d.max_tokens as u32,
            temperature: d.temperature,
            top_k: d.top_k as u32,
            top_p: d.top_p,
            min_p: d.min_p,
            repetition_penalty: d.repetition_penalty,
            presence_penalty: d.presence_penalty,
            frequency_penalty: d.frequency_penalty,
            has_seed: 0,
            seed: 0,
            stop: ptr::null(),
            n_stop: 0,
            stop_token_ids: ptr::null(),
            n_stop_token_ids: 0,
        }
    }
}

/// What a generation did. Pass `struct_size` = sizeof(phi3_generate_result).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct phi3_generate_result {
    /// sizeof(phi3_generate_result), set by the caller.
    pub struct_size: u32,
    /// One of the PHI3_FINISH_* values.
    pub finish_reason: i32,
    /// Pending tokens prefilled by this call.
    pub prompt_tokens: usize,
    /// Tokens sampled (the stop token included); all are in the session.
    pub generated_tokens: usize,
    /// Seconds from the call to the first sampled token.
    pub time_to_first_token_s: f64,
    /// Prefill speed of this call.
    pub prefill_tokens_per_s: f64,
    /// Decode speed after the first token.
    pub decode_tokens_per_s: f64,
}

/// Fill `*o` with the defaults (greedy, 256 tokens, the model's stop tokens). NULL is ignored.
/// Thread-safe; cannot fail.
///
/// # Safety
/// `o` is NULL or points to a writable phi3_generate_options.
#[no_mangle]
pub unsafe extern "C" fn phi3_generate_options_init(o: *mut phi3_generate_options) {
    // SAFETY: forwarded contract.
    unsafe { init_options(o) }
}

/// Most stop strings, and most stop token ids, one call takes.
const MAX_STOP_ENTRIES: usize = 4096;

/// Rust options from C options.
///
/// # Safety
/// `o` NULL or valid; its arrays readable for their counts, strings NUL-terminated.
unsafe fn generate_options(o: *const phi3_generate_options) -> phi3_core::Result<GenerateOptions> {
    // SAFETY: forwarded contract.
    let o = unsafe { read_options(o, "options") }?;
    // Bounded before the arrays are read or copied, so a wild count is an error, not an
    // allocation of its size.
    for (name, n) in
        [("options->n_stop", o.n_stop), ("options->n_stop_token_ids", o.n_stop_token_ids)]
    {
        if n > MAX_STOP_ENTRIES {
            return Err(phi3_core::Error::new(
                ErrorKind::InvalidArgument,
                format!("{name} = {n} exceeds the limit of {MAX_STOP_ENTRIES}"),
            ));
        }
    }
    // SAFETY: forwarded contract.
    let stop_ptrs = unsafe { arg_slice(o.stop, o.n_stop, "options->stop") }?;
    let stop = stop_ptrs
        .iter()
        .enumerate()
        // SAFETY: each entry NULL or NUL-terminated (contract).
        .map(|(i, &p)| unsafe { arg_cstr(p, &format!("options->stop[{i}]")) }.map(str::to_string))
        .collect::<phi3_core::Result<Vec<_>>>()?;
    let stop_token_ids = if o.stop_token_ids.is_null() {
        None
    } else {
        // SAFETY: non-NULL, n readable (contract).
        let ids =
            unsafe { arg_slice(o.stop_token_ids, o.n_stop_token_ids, "options->stop_token_ids") }?;
        // A bad stop id is a bad option (INVALID_ARGUMENT), not a bad input token.
        let ids = token_ids(ids, "options->stop_token_ids")
            .map_err(|e| phi3_core::Error::new(ErrorKind::InvalidArgument, e.message()))?;
        Some(ids.to_vec())
    };
    Ok(GenerateOptions {
        max_tokens: o.max_tokens as usize,
        temperature: o.temperature,
        top_k: o.top_k as usize,
        top_p: o.top_p,
        min_p: o.min_p,
        repetition_penalty: o.repetition_penalty,
        presence_penalty: o.presence_penalty,
        frequency_penalty: o.frequency_penalty,
        logit_bias: Vec::new(),
        seed: (o.has_seed != 0).then_some(o.seed),
        stop,
        stop_token_ids,
        skip_special_tokens: true,
    })
}

fn finish_code(reason: FinishReason) -> i32 {
    match reason {
        FinishReason::Eos => PHI3_FINISH_EOS,
        FinishReason::StopString => PHI3_FINISH_STOP_STRING,
        FinishReason::Length => PHI3_FINISH_LENGTH,
        FinishReason::Callback => PHI3_FINISH_CALLBACK,
        FinishReason::Cancelled => PHI3_FINISH_CANCELLED,
    }
}

/// The caller's `struct_size` for the result struct (checked before any work), or None for NULL.
///
/// # Safety
/// `out` NULL or pointing to a phi3_generate_result-like struct starting with its u32 size.
unsafe fn result_size(out: *const phi3_generate_result) -> phi3_core::Result<Option<usize>> {
    if out.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL; the caller's struct starts with its u32 struct_size.
    unsafe { struct_size(out, "out") }.map(Some)
}

/// Write the first `size` bytes of `result` into the caller's struct (an older, smaller struct
/// gets the fields it knows).
///
/// # Safety
/// `out` points to at least `size` writable bytes, `size <= sizeof(phi3_generate_result)`.
unsafe fn write_result(out: *mut phi3_generate_result, size: usize, result: &phi3_generate_result) {
    let mut value = *result;
    value.struct_size = size as u32;
    // SAFETY: `size` bytes are writable in the caller's struct and readable in ours.
    unsafe {
        ptr::copy_nonoverlapping(
            (&value as *const phi3_generate_result).cast::<u8>(),
            out.cast::<u8>(),
            size,
        )
    };
}

/// Generate on the session until a stop token, a stop string, `max_tokens`, a full context, the
/// callback or phi3_session_cancel. Pending tokens (appended text or messages) are prefilled
/// first. `cb` may be NULL (no streaming). `*out` (optional) receives the result; set its
/// `struct_size` first.
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL session, empty session, bad options or
/// `out->struct_size`, checked before any work), PHI3_ERR_CANCELLED (tokens generated so far stay
/// in the session, which stays usable; `*out` is filled), PHI3_ERR_CONTEXT_FULL (a chat's
/// assistant prompt does not fit), PHI3_ERR_MODEL_FORMAT (the chat template fails to render),
/// PHI3_ERR_UNSUPPORTED (model without tokenizer), PHI3_ERR_OUT_OF_MEMORY (the model's KV memory
/// is exhausted and it was loaded without `kv_wait`; the tokens generated so far stay in the
/// session), PHI3_ERR_DEVICE, PHI3_ERR_BUSY.
///
/// # Safety
/// `s` NULL or live; `o` NULL or valid; `cb`, when called, gets `user_data` back unchanged;
/// `out` NULL or a writable phi3_generate_result with `struct_size` set.
#[no_mangle]
pub unsafe extern "C" fn phi3_session_generate(
    s: *mut phi3_session,
    o: *const phi3_generate_options,
    cb: phi3_token_callback,
    user_data: *mut c_void,
    out: *mut phi3_generate_result,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let s = unsafe { arg_ref(s, "session") }?;
        let options = unsafe { generate_options(o) }?;
        // SAFETY: forwarded contract.
        let out_size = unsafe { result_size(out) }?;
        let mut generated = 0usize;
        let outcome = s.with(|session| {
            session.generate(&options, |text, token| {
                generated += usize::from(token.is_some());
                let Some(cb) = cb else { return ControlFlow::Continue(()) };
                let token = token.map_or(-1, |t| t as i32);
                // SAFETY: the host's callback with its own user_data; text outlives the call.
                let stop = unsafe { cb(user_data, text.as_ptr().cast(), text.len(), token) };
                if stop != 0 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
        });
        let summary = match &outcome {
            Ok(r) => summarize(r),
            Err(e) if e.kind() == ErrorKind::Cancelled => phi3_generate_result {
                finish_reason: PHI3_FINISH_CANCELLED,
                generated_tokens: generated,
                ..empty_result()
            },
            Err(_) => empty_result(),
        };
        let filled =
            outcome.is_ok() || matches!(&outcome, Err(e) if e.kind() == ErrorKind::Cancelled);
        if let (true, Some(size)) = (filled, out_size) {
            // SAFETY: out is non-NULL with `size` checked bytes (result_size).
            unsafe { write_result(out, size, &summary) };
        }
        outcome.map(drop)
    })
}

impl Options for phi3_generate_result {
    fn fields() -> Vec<(usize, usize)> {
        use std::mem::{offset_of, size_of};
        let field = |start: usize, len: usize| (start, start + len);
        vec![
            (0, size_of::<u32>()),
            field(offset_of!(Self, finish_reason), size_of::<i32>()),
            field(offset_of!(Self, prompt_tokens), size_of::<usize>()),
            field(offset_of!(Self, generated_tokens), size_of::<usize>()),
            field(offset_of!(Self, time_to_first_token_s), size_of::<f64>()),
            field(offset_of!(Self, prefill_tokens_per_s), size_of::<f64>()),
            field(offset_of!(Self, decode_tokens_per_s), size_of::<f64>()),
        ]
    }

    fn defaults() -> Self {
        empty_result()
    }
}

fn empty_result() -> phi3_generate_result {
    phi3_generate_result {
        struct_size: std::mem::size_of::<phi3_generate_result>() as u32,
        finish_reason: PHI3_FINISH_LENGTH,
        prompt_tokens: 0,
        generated_tokens: 0,
        time_to_first_token_s: 0.0,
        prefill_tokens_per_s: 0.0,
        decode_tokens_per_s: 0.0,
    }
}

fn summarize(r: &GenerationResult) -> phi3_generate_result {
    phi3_generate_result {
        finish_reason: finish_code(r.finish_reason),
        prompt_tokens: r.stats.prompt_tokens,
        generated_tokens: r.stats.generated_tokens,
        time_to_first_token_s: r.stats.time_to_first_token.as_secs_f64(),
        prefill_tokens_per_s: r.stats.prefill_tokens_per_s,
        decode_tokens_per_s: r.stats.decode_tokens_per_s,
        ..empty_result()
    }
}
