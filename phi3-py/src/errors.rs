//! The exception hierarchy (`phi3.Phi3Error` and one subclass per `phi3_core::ErrorKind`) and
//! the mapping of core errors onto it.
//!
//! The classes are made with Python's `type()` at import time rather than `create_exception!`
//! because some have two bases: `InvalidArgumentError` and `TokenOutOfRangeError` are also
//! `ValueError`s, `IoError` an `OSError` and `OutOfMemoryError` a `MemoryError`, so idiomatic
//! `except` clauses work. Each class carries `kind` (the C constant's name without `PHI3_ERR_`)
//! and `status_code` (the C status code).

use phi3_core::{Error, ErrorKind};
use pyo3::exceptions::{PyException, PyMemoryError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use pyo3::PyTypeInfo;

/// Extra standard base of a kind's class, besides `Phi3Error`.
#[derive(Clone, Copy)]
enum Std {
    None,
    Value,
    Os,
    Memory,
}

/// (kind, class name, extra base, docstring) for every kind, in status-code order.
const KINDS: [(ErrorKind, &str, Std, &str); 12] = [
    (ErrorKind::InvalidArgument, "InvalidArgumentError", Std::Value,
     "An argument was invalid (bad option value, empty input, malformed message). Also a ValueError."),
    (ErrorKind::Io, "IoError", Std::Os,
     "A file could not be read or written. Also an OSError."),
    (ErrorKind::ModelFormat, "ModelFormatError", Std::None,
     "A model folder or file is malformed: config, safetensors header, tensor name/shape/dtype, session file."),
    (ErrorKind::TokenOutOfRange, "TokenOutOfRangeError", Std::Value,
     "A token id is outside the model's or tokenizer's vocabulary. Also a ValueError."),
    (ErrorKind::ContextFull, "ContextFullError", Std::None,
     "The session would grow past its maximum context."),
    (ErrorKind::OutOfMemory, "OutOfMemoryError", Std::Memory,
     "Host or device memory could not be allocated. Also a MemoryError."),
    (ErrorKind::Device, "DeviceError", Std::None,
     "A compute device failed or is unavailable."),
    (ErrorKind::Cancelled, "CancelledError", Std::None,
     "The operation was cancelled with Session.cancel(); the session stays usable."),
    (ErrorKind::Busy, "BusyError", Std::None,
     "The session is in use by another call (a session serves one thread at a time)."),
    (ErrorKind::BufferTooSmall, "BufferTooSmallError", Std::None,
     "An output buffer is too small (C API only; listed for completeness)."),
    (ErrorKind::Unsupported, "UnsupportedError", Std::None,
     "A valid request that this build or model does not support (e.g. a CUDA device, no tokenizer)."),
    (ErrorKind::Internal, "InternalError", Std::None,
     "A bug in phi3-rs (a caught panic, a broken invariant)."),
];

struct Classes {
    base: Py<PyType>,
    kinds: Vec<(ErrorKind, Py<PyType>)>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn make_class(
    py: Python<'_>,
    name: &str,
    bases: Bound<'_, PyTuple>,
    doc: &str,
    kind: Option<ErrorKind>,
) -> PyResult<Py<PyType>> {
    let dict = PyDict::new(py);
    dict.set_item("__module__", "phi3")?;
    dict.set_item("__doc__", doc)?;
    dict.set_item("kind", kind.map(|k| k.name()))?;
    dict.set_item("status_code", kind.map(|k| k.status_code()))?;
    let class = PyType::type_object(py).call1((name, bases, dict))?;
    Ok(class.cast_into::<PyType>()?.unbind())
}

fn classes(py: Python<'_>) -> PyResult<&'static Classes> {
    CLASSES.get_or_try_init(py, || {
        let base = make_class(
            py,
            "Phi3Error",
            PyTuple::new(py, [PyException::type_object(py)])?,
            "Base class of every error raised by phi3. Subclasses name the kind of error; the \
             message names what was wrong (file, tensor, field, token id).",
            None,
        )?;
        let mut kinds = Vec::with_capacity(KINDS.len());
        for (kind, name, extra, doc) in KINDS {
            let b = base.bind(py).clone();
            let bases = match extra {
                Std::None => PyTuple::new(py, [b])?,
                Std::Value => PyTuple::new(py, [b, PyValueError::type_object(py)])?,
                Std::Os => PyTuple::new(py, [b, PyOSError::type_object(py)])?,
                Std::Memory => PyTuple::new(py, [b, PyMemoryError::type_object(py)])?,
            };
            kinds.push((kind, make_class(py, name, bases, doc, Some(kind))?));
        }
        Ok(Classes { base, kinds })
    })
}

/// Add `Phi3Error` and its subclasses to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let c = classes(py)?;
    m.add("Phi3Error", c.base.bind(py))?;
    for ((_, name, _, _), (_, class)) in KINDS.iter().zip(&c.kinds) {
        m.add(*name, class.bind(py))?;
    }
    Ok(())
}

/// A Python exception of `kind`'s class with `message`.
pub(crate) fn new_err(py: Python<'_>, kind: ErrorKind, message: impl Into<String>) -> PyErr {
    let message = message.into();
    match classes(py) {
        Ok(c) => {
            let class = c.kinds.iter().find(|(k, _)| *k == kind).map_or(&c.base, |(_, t)| t);
            PyErr::from_type(class.bind(py).clone(), message)
        }
        Err(e) => e,
    }
}

/// A phi3-core error as the Python exception of its kind.
pub(crate) fn to_py_err(py: Python<'_>, e: Error) -> PyErr {
    new_err(py, e.kind(), e.message())
}

/// `InvalidArgumentError(message)`.
pub(crate) fn invalid_argument(py: Python<'_>, message: impl Into<String>) -> PyErr {
    new_err(py, ErrorKind::InvalidArgument, message)
}

/// A caught panic as an `Internal` error carrying the panic's text.
pub(crate) fn panic_error(panic: &(dyn std::any::Any + Send)) -> Error {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    Error::new(ErrorKind::Internal, format!("internal error (panic): {text}"))
}
