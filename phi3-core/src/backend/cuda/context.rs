//! Opening a CUDA device: driver lookup, device checks, the context and the one stream.
//!
//! The driver library (libcuda.so.1) is dlopen()ed here, on the first request for a CUDA device,
//! never before. Errors: `Unsupported` when there is no driver library or the device is older than
//! sm_80; `Device` when the driver reports no device, a bad ordinal, or fails to initialise.
//!
//! One stream per backend carries all work, in order; sessions on several host threads share it
//! (the stream serialises their kernels; each thread's results are read back with a synchronising
//! copy). With a single stream cudarc's per-buffer event tracking buys nothing, so it is turned off
//! before the first allocation.

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaStream};

use super::error::{guard, DriverResultExt};
use crate::error::{Error, ErrorKind, Result};

/// The oldest architecture the kernels are written for (bf16 loads, cp.async-era GPUs).
pub(crate) const MIN_ARCH: u32 = 80;

/// An open device.
pub(crate) struct DeviceContext {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub(crate) name: String,
    /// Compute capability as major * 10 + minor, e.g. 90.
    pub(crate) arch: u32,
    /// Total device memory in bytes.
    pub(crate) total_memory: u64,
    /// Streaming multiprocessors (sizes the decode GEMM's K split).
    pub(crate) sm_count: usize,
}

/// Whether the CUDA driver library can be loaded at all.
pub(crate) fn driver_present() -> bool {
    // SAFETY: only dlopen()s candidate library names; no symbol is called.
    guard("probe libcuda", || Ok(unsafe { sys::is_culib_present() })).unwrap_or(false)
}

/// Number of CUDA devices (0 when there is no driver or it fails to initialise).
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    guard("cuDeviceGetCount", || {
        cudarc::driver::result::init().ctx("cuInit")?;
        CudaContext::device_count().ctx("cuDeviceGetCount")
    })
    .map_or(0, |n| n.max(0) as usize)
}

impl DeviceContext {
    /// Open CUDA device `ordinal`.
    pub(crate) fn open(ordinal: usize) -> Result<DeviceContext> {
        let label = format!("cuda:{ordinal}");
        if !driver_present() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "device \"{label}\": no CUDA driver found (libcuda.so could not be loaded); \
                     install an NVIDIA driver or use device \"cpu\""
                ),
            ));
        }
        guard(&label, || {
            cudarc::driver::result::init()
                .map_err(|e| super::error::driver(&format!("{label}: cuInit"), e))?;
            let count = CudaContext::device_count().ctx("cuDeviceGetCount")?.max(0) as usize;
            if count == 0 {
                return Err(Error::new(
                    ErrorKind::Device,
                    format!("device \"{label}\": the CUDA driver reports no device"),
                ));
            }
            if ordinal >= count {
                return Err(Error::new(
                    ErrorKind::Device,
                    format!("device \"{label}\": only {count} CUDA device(s) present"),
                ));
            }
            let ctx = CudaContext::new(ordinal).ctx(&format!("{label}: create context"))?;
            let (major, minor) = ctx.compute_capability().ctx("compute capability")?;
            let arch = (major * 10 + minor) as u32;
            let name = ctx.name().ctx("device name")?;
            if arch < MIN_ARCH {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "device \"{label}\" ({name}) has compute capability {major}.{minor}; \
                         the CUDA backend needs 8.0 (Ampere) or newer"
                    ),
                ));
            }
            let total_memory = ctx.total_mem().ctx("total memory")? as u64;
            let sm_count = ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .ctx("multiprocessor count")?
                .max(1) as usize;
            // SAFETY: no buffer exists yet, and all work goes to the one stream below, so no
            // cross-stream synchronisation is needed (see the module docs).
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.new_stream().ctx("create stream")?;
            Ok(DeviceContext { ctx, stream, ordinal, name, arch, total_memory, sm_count })
        })
    }

    /// (free, total) device memory in bytes.
    pub(crate) fn memory_info(&self) -> Result<(u64, u64)> {
        let (free, total) = guard("cuMemGetInfo", || self.ctx.mem_get_info().ctx("cuMemGetInfo"))?;
        Ok((free as u64, total as u64))
    }
}
