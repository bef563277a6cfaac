//! `phi3_tokenize` / `phi3_detokenize` with the model's tokenizer.

use std::ffi::c_char;

use crate::ffi::{arg_ref, arg_slice, arg_str, boundary, copy_out, token_ids};
use crate::model::phi3_model;
use crate::status::phi3_status;

/// Token ids of UTF-8 text (with BOS when `add_special` is non-zero, as HF `tokenizer(text)`).
/// `*out_len` receives the count; call with `cap` 0 to query it. Thread-safe.
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL, invalid UTF-8), PHI3_ERR_BUFFER_TOO_SMALL,
/// PHI3_ERR_UNSUPPORTED (model without tokenizer).
///
/// # Safety
/// `m` NULL or live; `utf8` NULL or `len` readable bytes; `out` NULL or room for `cap` ids;
/// `out_len` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn phi3_tokenize(
    m: *const phi3_model,
    utf8: *const c_char,
    len: usize,
    add_special: i32,
    out: *mut i32,
    cap: usize,
    out_len: *mut usize,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let m = unsafe { arg_ref(m, "model") }?;
        let text = unsafe { arg_str(utf8, len, "utf8") }?;
        let ids: Vec<i32> = m
            .model
            .tokenizer()?
            .encode(text, add_special != 0)?
            .into_iter()
            .map(|t| t as i32)
            .collect();
        // SAFETY: forwarded contract.
        unsafe { copy_out(&ids, out, cap, out_len) }
    })
}

/// UTF-8 text of token ids (special tokens included), written to `out` without a terminating
/// NUL; `*out_len` receives the byte count; call with `cap` 0 to query it. Thread-safe.
///
/// Errors: PHI3_ERR_INVALID_ARGUMENT (NULL), PHI3_ERR_TOKEN_OUT_OF_RANGE (naming the index),
/// PHI3_ERR_BUFFER_TOO_SMALL, PHI3_ERR_UNSUPPORTED (model without tokenizer).
///
/// # Safety
/// `m` NULL or live; `tokens` NULL or `n` readable ids; `out` NULL or room for `cap` bytes;
/// `out_len` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn phi3_detokenize(
    m: *const phi3_model,
    tokens: *const i32,
    n: usize,
    out: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> phi3_status {
    boundary(|| {
        // SAFETY: forwarded contracts.
        let m = unsafe { arg_ref(m, "model") }?;
        let ids = token_ids(unsafe { arg_slice(tokens, n, "tokens") }?, "tokens")?;
        let text = m.model.tokenizer()?.decode(ids, false)?;
        // SAFETY: forwarded contract.
        unsafe { copy_out(text.as_bytes(), out.cast::<u8>(), cap, out_len) }
    })
}
