//! Status codes (`phi3_status`) and library identity. Codes are part of the ABI: never renumber
//! one; retire it with a `// reserved` comment.

use std::ffi::c_char;

use phi3_core::ErrorKind;

/// Result of every fallible call: `PHI3_OK` (0) or one of the `PHI3_ERR_*` codes. An integer
/// type, not an enum, so any value a host passes back is defined behaviour.
pub type phi3_status = i32;

/// Success.
pub const PHI3_OK: phi3_status = 0;
/// An argument was invalid: NULL where a pointer is required, bad UTF-8, a bad option value.
pub const PHI3_ERR_INVALID_ARGUMENT: phi3_status = 1;
/// A file could not be read or written.
pub const PHI3_ERR_IO: phi3_status = 2;
/// A model or session file is malformed (config, safetensors header, tensor shape or dtype).
pub const PHI3_ERR_MODEL_FORMAT: phi3_status = 3;
/// A token id is outside the model's vocabulary.
pub const PHI3_ERR_TOKEN_OUT_OF_RANGE: phi3_status = 4;
/// The session would grow past its maximum context.
pub const PHI3_ERR_CONTEXT_FULL: phi3_status = 5;
/// Memory could not be allocated.
pub const PHI3_ERR_OUT_OF_MEMORY: phi3_status = 6;
/// A compute device failed or is unavailable.
pub const PHI3_ERR_DEVICE: phi3_status = 7;
/// phi3_session_cancel stopped the call.
pub const PHI3_ERR_CANCELLED: phi3_status = 8;
/// Another call on the same session is in progress.
pub const PHI3_ERR_BUSY: phi3_status = 9;
/// An output buffer is too small; the needed size is in `*out_len`.
pub const PHI3_ERR_BUFFER_TOO_SMALL: phi3_status = 10;
/// A valid request this build or model does not support.
pub const PHI3_ERR_UNSUPPORTED: phi3_status = 11;
/// A bug in phi3-rs (for example a caught panic); the message says more.
pub const PHI3_ERR_INTERNAL: phi3_status = 12;

/// The version of the ABI: bumped on any incompatible change to the header (which states it as
/// `PHI3_ABI_VERSION` in its `after_includes` block; a test keeps the two equal).
pub(crate) const ABI_VERSION: u32 = 1;

/// The status code of an error kind (1:1; `ErrorKind::status_code` is the single source).
pub(crate) fn status_of(kind: ErrorKind) -> phi3_status {
    kind.status_code()
}

/// The ABI version of the loaded library (`PHI3_ABI_VERSION` of the header it was built with).
/// Thread-safe; cannot fail.
#[no_mangle]
pub extern "C" fn phi3_abi_version() -> u32 {
    ABI_VERSION
}

/// The library version, e.g. "0.1.0": a static NUL-terminated string, never freed.
/// Thread-safe; cannot fail.
#[no_mangle]
pub extern "C" fn phi3_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// A static name for a status code, e.g. "PHI3_ERR_IO"; "PHI3_ERR_UNKNOWN" for a value that is
/// not a code. Never NULL, never freed. Thread-safe.
#[no_mangle]
pub extern "C" fn phi3_status_str(status: phi3_status) -> *const c_char {
    let name: &'static str = match status {
        PHI3_OK => "PHI3_OK\0",
        PHI3_ERR_INVALID_ARGUMENT => "PHI3_ERR_INVALID_ARGUMENT\0",
        PHI3_ERR_IO => "PHI3_ERR_IO\0",
        PHI3_ERR_MODEL_FORMAT => "PHI3_ERR_MODEL_FORMAT\0",
        PHI3_ERR_TOKEN_OUT_OF_RANGE => "PHI3_ERR_TOKEN_OUT_OF_RANGE\0",
        PHI3_ERR_CONTEXT_FULL => "PHI3_ERR_CONTEXT_FULL\0",
        PHI3_ERR_OUT_OF_MEMORY => "PHI3_ERR_OUT_OF_MEMORY\0",
        PHI3_ERR_DEVICE => "PHI3_ERR_DEVICE\0",
        PHI3_ERR_CANCELLED => "PHI3_ERR_CANCELLED\0",
        PHI3_ERR_BUSY => "PHI3_ERR_BUSY\0",
        PHI3_ERR_BUFFER_TOO_SMALL => "PHI3_ERR_BUFFER_TOO_SMALL\0",
        PHI3_ERR_UNSUPPORTED => "PHI3_ERR_UNSUPPORTED\0",
        PHI3_ERR_INTERNAL => "PHI3_ERR_INTERNAL\0",
        _ => "PHI3_ERR_UNKNOWN\0",
    };
    name.as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_core_kinds() {
        assert_eq!(status_of(ErrorKind::InvalidArgument), PHI3_ERR_INVALID_ARGUMENT);
        assert_eq!(status_of(ErrorKind::Io), PHI3_ERR_IO);
        assert_eq!(status_of(ErrorKind::Busy), PHI3_ERR_BUSY);
        assert_eq!(status_of(ErrorKind::Internal), PHI3_ERR_INTERNAL);
        assert_eq!(status_of(ErrorKind::Cancelled), PHI3_ERR_CANCELLED);
        assert_eq!(status_of(ErrorKind::BufferTooSmall), PHI3_ERR_BUFFER_TOO_SMALL);
    }
}
