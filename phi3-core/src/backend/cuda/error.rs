//! CUDA, NVRTC and cuBLAS failures as phi3-core [`Error`]s, and the panic guard around cudarc.
//!
//! Kinds: allocation failures are `OutOfMemory`; every other driver, cuBLAS or NVRTC failure is
//! `Device`. cudarc panics in a few places instead of returning an error (a shared library or one
//! of its symbols missing at run time, a compile log that cannot be read); [`guard`] turns such a
//! panic into a `Device` error so that no panic leaves the CUDA layer.

use std::panic::{catch_unwind, AssertUnwindSafe};

use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::cublasStatus_t;
use cudarc::driver::sys::CUresult;
use cudarc::driver::DriverError;
use cudarc::nvrtc::result::NvrtcError;

use crate::error::{Error, ErrorKind, Result};

/// A driver error while doing `what`.
pub(crate) fn driver(what: &str, e: DriverError) -> Error {
    let kind = match e.0 {
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => ErrorKind::OutOfMemory,
        _ => ErrorKind::Device,
    };
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Error::new(kind, format!("CUDA: {what}: {:?} ({text})", e.0)).with_source(e)
}

/// A cuBLAS error while doing `what`.
pub(crate) fn blas(what: &str, e: CublasError) -> Error {
    let kind = match e.0 {
        cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED => ErrorKind::OutOfMemory,
        _ => ErrorKind::Device,
    };
    Error::new(kind, format!("cuBLAS: {what}: {:?}", e.0)).with_source(e)
}

/// An NVRTC error while doing `what`.
pub(crate) fn nvrtc(what: &str, e: NvrtcError) -> Error {
    Error::new(ErrorKind::Device, format!("NVRTC: {what}: {:?}", e.0)).with_source(e)
}

/// Run `f`, turning a panic inside cudarc into a `Device` error that names `what`.
pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(Error::new(ErrorKind::Device, format!("CUDA: {what}: {msg}")))
        }
    }
}

/// Helper: `Result<T, DriverError>` -> `Result<T>` naming `what`.
pub(crate) trait DriverResultExt<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T> DriverResultExt<T> for std::result::Result<T, DriverError> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| driver(what, e))
    }
}
