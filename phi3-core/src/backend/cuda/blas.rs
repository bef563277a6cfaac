//! cuBLAS: the prefill matmul `x @ w^T` with fp32 accumulation.
//!
//! Row-major `y[n, out] = x[n, in] @ w[out, in]^T` is, in cuBLAS's column-major terms,
//! `Y^T (out x n) = op_T(W: in x out) * X^T (in x n)`: cublasGemmEx(T, N, m = out, n = n,
//! k = in, A = w (lda = in), B = x (ldb = in), C = y (ldc = out)). A and B share a type: bf16 or
//! f16 (activations are rounded to the weight's type by a kernel first) or f32; C is f32;
//! compute type CUBLAS_COMPUTE_32F (fp32 accumulation; no TF32, since the handle keeps the
//! default math mode).

use std::ffi::c_void;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::cublas::result as blas_result;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::error::{blas, driver, guard};
use crate::error::{Error, Result};

/// Element type of the GEMM inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmType {
    Bf16,
    F16,
    F32,
}

/// One cuBLAS handle bound to the backend's stream. A mutex keeps calls from several host
/// threads from interleaving inside cuBLAS (they are serialised on the one stream anyway).
pub(crate) struct Blas {
    handle: Mutex<CudaBlas>,
}

fn int(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::internal(format!("GEMM {what} = {x} exceeds i32")))
}

impl Blas {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Blas> {
        let handle = guard("cuBLAS", || {
            CudaBlas::new(stream).map_err(|e| blas("create handle (is libcublas on the path?)", e))
        })?;
        Ok(Blas { handle: Mutex::new(handle) })
    }

    /// `y[rows, :] = x[rows, :] @ w[out, in]^T` for `y` `[_, out]`, `x` `[_, in]`: one
    /// prefill chunk of a batch (`rows`) or a whole input. `x` and `w` hold elements of `ty`
    /// (u16 bit patterns for bf16/f16, passed as raw slices), `y` is f32.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm<X, W>(
        &self,
        stream: &Arc<CudaStream>,
        ty: GemmType,
        x: &CudaSlice<X>,
        w: &CudaSlice<W>,
        y: &mut CudaSlice<f32>,
        rows: Range<usize>,
        k: usize,
        m: usize,
    ) -> Result<()> {
        self.gemm_cols(stream, ty, x, w, y, rows, (k, m), (m, 0))
    }

    /// `y[rows, col0 .. col0 + m] = x[rows, :] @ w[m, in]^T` where `y` is `[_, ldy]` row-major:
    /// the prefill of a block of rows of a quantized weight (`quant.rs`). `dims` = (k, m),
    /// `out` = (ldy, col0). In cuBLAS terms B starts at row `rows.start` of `x`, and C at
    /// column-major row `col0` of column `rows.start` of `Y^T`, with `ldc = ldy`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_cols<X, W>(
        &self,
        stream: &Arc<CudaStream>,
        ty: GemmType,
        x: &CudaSlice<X>,
        w: &CudaSlice<W>,
        y: &mut CudaSlice<f32>,
        rows: Range<usize>,
        dims: (usize, usize),
        out: (usize, usize),
    ) -> Result<()> {
        let ((k, m), (ldy, col0)) = (dims, out);
        let (row0, n) = (rows.start, rows.len());
        let y_needed = if n == 0 { 0 } else { (rows.end - 1) * ldy + col0 + m };
        if x.len() < rows.end * k || w.len() < m * k || y.len() < y_needed || col0 + m > ldy {
            return Err(Error::internal(format!(
                "GEMM buffers too small for rows {rows:?} of [_, {k}] x [{m}, {k}]^T into \
                 columns {col0}.. of [_, {ldy}]"
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let (n_, k_, m_, ldy_) = (int(n, "n")?, int(k, "k")?, int(m, "m")?, int(ldy, "ldy")?);
        let dt = match ty {
            GemmType::Bf16 => cudaDataType::CUDA_R_16BF,
            GemmType::F16 => cudaDataType::CUDA_R_16F,
            GemmType::F32 => cudaDataType::CUDA_R_32F,
        };
        let handle = self.handle.lock().map_err(|_| Error::internal("cuBLAS handle poisoned"))?;
        // cuBLAS runs in the context current on the calling thread, which for a session on
        // another host thread may be none (or another device's): make ours current first, as
        // cudarc does before its own driver calls.
        stream.context().bind_to_thread().map_err(|e| driver("GEMM: bind the CUDA context", e))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (xp, _x_sync) = x.device_ptr(stream);
        let (wp, _w_sync) = w.device_ptr(stream);
        let (yp, _y_sync) = y.device_ptr_mut(stream);
        let xp = xp + (row0 * k * std::mem::size_of::<X>()) as u64;
        let yp = yp + ((row0 * ldy + col0) * std::mem::size_of::<f32>()) as u64;
        let what = format!("GemmEx [{n}, {k}] x [{m}, {k}]^T ({ty:?})");
        // guard: cudarc panics when a cuBLAS symbol is missing from the loaded library.
        guard(&what, || {
            // SAFETY: the three pointers point into live device allocations of at least the sizes
            // checked above (B: rows row0 .. row0 + n of `x`; C: columns col0 .. col0 + m <= ldy
            // of each of those rows of `y`); alpha and
            // beta are host f32 values (the handle's default host pointer mode,
            // CUBLAS_COMPUTE_32F scalars are f32); the handle is bound to `stream`.
            unsafe {
                blas_result::gemm_ex(
                    *handle.handle(),
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    m_,
                    n_,
                    k_,
                    &alpha as *const f32 as *const c_void,
                    wp as *const c_void,
                    dt,
                    k_,
                    xp as *const c_void,
                    dt,
                    k_,
                    &beta as *const f32 as *const c_void,
                    yp as *mut c_void,
                    cudaDataType::CUDA_R_32F,
                    ldy_,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| blas(&what, e))
        })
    }
}
