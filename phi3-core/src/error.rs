//! The one error type of phi3-core.
//!
//! Every fallible function returns [`Result`]. An [`Error`] carries an [`ErrorKind`] that maps 1:1
//! onto the C status codes (`PHI3_ERR_*`, see [`ErrorKind::status_code`]), a message that names the
//! object that was wrong (file, tensor, field, token id), and optionally the underlying cause.
//! Status codes are part of the stable C ABI: never renumber one; retire it with a `// reserved`
//! comment instead.

use std::fmt;

/// What went wrong, in the categories a host can act on. Maps 1:1 onto `phi3_status`.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An argument was invalid (empty input, bad option value, NULL pointer in the C API).
    InvalidArgument,
    /// A file could not be read or written.
    Io,
    /// A model folder or file is malformed: config, safetensors header, index, tensor name/shape/dtype.
    ModelFormat,
    /// A token id is outside the model's vocabulary.
    TokenOutOfRange,
    /// The session would grow past its maximum context.
    ContextFull,
    /// Host or device memory could not be allocated.
    OutOfMemory,
    /// A compute device failed or is unavailable.
    Device,
    /// The operation was cancelled by the host.
    Cancelled,
    /// The session is in use by another call.
    Busy,
    /// An output buffer is too small.
    BufferTooSmall,
    /// A valid request that this build or model does not support (e.g. an unknown rope type).
    Unsupported,
    /// A bug in phi3-rs (a caught panic, a broken invariant).
    Internal,
}

impl ErrorKind {
    /// The C status code (`PHI3_ERR_*`) for this kind. `PHI3_OK` is 0 and never an error.
    pub fn status_code(self) -> i32 {
        match self {
            ErrorKind::InvalidArgument => 1,
            ErrorKind::Io => 2,
            ErrorKind::ModelFormat => 3,
            ErrorKind::TokenOutOfRange => 4,
            ErrorKind::ContextFull => 5,
            ErrorKind::OutOfMemory => 6,
            ErrorKind::Device => 7,
            ErrorKind::Cancelled => 8,
            ErrorKind::Busy => 9,
            ErrorKind::BufferTooSmall => 10,
            ErrorKind::Unsupported => 11,
            ErrorKind::Internal => 12,
        }
    }

    /// A short stable name, e.g. `"MODEL_FORMAT"` (the C constant without its `PHI3_ERR_` prefix).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "INVALID_ARGUMENT",
            ErrorKind::Io => "IO",
            ErrorKind::ModelFormat => "MODEL_FORMAT",
            ErrorKind::TokenOutOfRange => "TOKEN_OUT_OF_RANGE",
            ErrorKind::ContextFull => "CONTEXT_FULL",
            ErrorKind::OutOfMemory => "OUT_OF_MEMORY",
            ErrorKind::Device => "DEVICE",
            ErrorKind::Cancelled => "CANCELLED",
            ErrorKind::Busy => "BUSY",
            ErrorKind::BufferTooSmall => "BUFFER_TOO_SMALL",
            ErrorKind::Unsupported => "UNSUPPORTED",
            ErrorKind::Internal => "INTERNAL",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error from phi3-core: a kind, a message naming what was wrong, and an optional cause.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with phi3-core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    /// Attach the underlying cause (shown by `source()`; its text is usually already in the message).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, naming the object that was wrong.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefix the message with context, e.g. a file name: `"config.json: " + message`.
    pub fn context(mut self, prefix: impl fmt::Display) -> Self {
        self.message = format!("{prefix}: {}", self.message);
        self
    }

    pub(crate) fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    pub(crate) fn model_format(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ModelFormat, message)
    }

    pub(crate) fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// An I/O error on `path`, e.g. "model/config.json: No such file or directory".
    pub(crate) fn io(path: &std::path::Path, err: std::io::Error) -> Self {
        let kind = if err.kind() == std::io::ErrorKind::OutOfMemory {
            ErrorKind::OutOfMemory
        } else {
            ErrorKind::Io
        };
        Self::new(kind, format!("{}: {err}", path.display())).with_source(err)
    }

    /// A token id outside `[0, vocab)`, naming its index in the input.
    pub(crate) fn token_out_of_range(index: usize, token: i64, vocab: usize) -> Self {
        Self::new(
            ErrorKind::TokenOutOfRange,
            format!("tokens[{index}] = {token} out of range [0, {vocab})"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_distinct_and_nonzero() {
        let kinds = [
            ErrorKind::InvalidArgument,
            ErrorKind::Io,
            ErrorKind::ModelFormat,
            ErrorKind::TokenOutOfRange,
            ErrorKind::ContextFull,
            ErrorKind::OutOfMemory,
            ErrorKind::Device,
            ErrorKind::Cancelled,
            ErrorKind::Busy,
            ErrorKind::BufferTooSmall,
            ErrorKind::Unsupported,
            ErrorKind::Internal,
        ];
        let mut codes: Vec<i32> = kinds.iter().map(|k| k.status_code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes, (1..=12).collect::<Vec<_>>());
    }

    #[test]
    fn context_prefixes_message() {
        let e = Error::model_format("bad shape").context("model.safetensors");
        assert_eq!(e.to_string(), "model.safetensors: bad shape");
        assert_eq!(e.kind(), ErrorKind::ModelFormat);
    }
}
