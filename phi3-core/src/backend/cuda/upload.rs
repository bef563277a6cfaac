//! Weights onto the device: from the checkpoint files through a bounded host staging buffer, or
//! generated on the device ("dummy" weights) with no host copy at all.
//!
//! Storage: matrices keep their file dtype (bf16, f16 or f32): bf16/f16 feed cuBLAS and the GEMV
//! kernels directly, f32 runs f32 GEMMs, so f32 checkpoints lose no precision in the weights.
//! Vectors (the RMSNorm weights, a few KiB each) are widened to f32 at upload, so the norm kernel
//! has one variant.
//!
//! Staging: a tensor is read with `HostTensor::read_at` in pieces of at most [`STAGING_BYTES`]
//! and each piece is copied to its place on the device, so host memory stays bounded however
//! large the tensor (no full host copy, no mmap of the file). The copy from pageable memory
//! returns once the driver has taken the bytes, so the buffer is reused at once.

use bytemuck::Pod;
use cudarc::driver::{CudaSlice, DeviceRepr};

use super::error::DriverResultExt;
use super::{CudaBackend, CudaWeight, WeightData};
use crate::error::{Error, Result};
use crate::loader::{DType, HostTensor};

/// Largest piece of a tensor held on the host at once.
pub(crate) const STAGING_BYTES: usize = 64 << 20;

/// The value the device dummy-weight kernel (`kernels/dummy.cu`) writes at element `i` of tensor
/// `tensor` for `seed`, before rounding to the weight's dtype: `center + half_width * u`, u in
/// [-1, 1). A Rust twin so checks can compare the device's values.
pub fn dummy_value(seed: u64, tensor: u64, i: u64, center: f32, half_width: f32) -> f32 {
    // The stateless form the kernel uses: the output of one step from state `z`.
    fn splitmix64(mut z: u64) -> u64 {
        crate::sampler::splitmix64(&mut z)
    }
    let key = splitmix64(seed ^ splitmix64(tensor));
    let r = splitmix64(key.wrapping_add(i));
    let u = (r >> 40) as f32 * (1.0 / 16_777_216.0) * 2.0 - 1.0;
    center + half_width * u
}

/// (center, half width) of the dummy values of a tensor, as `loader::dummy` draws them: norm
/// weights 1 ± 0.1, embeddings ±1, other matrices ±1/sqrt(in_features).
pub(crate) fn dummy_range(name: &str, shape: &[usize]) -> (f32, f32) {
    if shape.len() == 1 {
        (1.0, 0.1)
    } else if name == crate::loader::names::EMBED_TOKENS {
        (0.0, 1.0)
    } else {
        (0.0, 1.0 / (shape[1].max(1) as f32).sqrt())
    }
}

fn dims(name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [n] => Ok((1, n)),
        [r, c] => Ok((r, c)),
        _ => Err(Error::internal(format!(
            "{name}: CUDA backend takes vectors and matrices, got shape {shape:?}"
        ))),
    }
}

impl CudaBackend {
    /// Copy `t`'s elements (of type `T`, the file's) into `dst` piece by piece.
    fn copy_staged<T: Pod + DeviceRepr + Default>(
        &self,
        t: &HostTensor,
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        let size = std::mem::size_of::<T>();
        let numel = t.numel();
        let piece = (STAGING_BYTES / size).min(numel).max(1);
        let mut staging = vec![T::default(); piece];
        let mut start = 0;
        while start < numel {
            let n = piece.min(numel - start);
            t.read_at(start * size, bytemuck::cast_slice_mut(&mut staging[..n]))?;
            let mut view = dst.slice_mut(start..start + n);
            self.dev
                .stream
                .memcpy_htod(&staging[..n], &mut view)
                .ctx(&format!("{}: copy to the device", t.name))?;
            start += n;
        }
        Ok(())
    }

    /// Upload one checkpoint tensor (see the module docs for dtypes and staging).
    pub(crate) fn upload_tensor(&self, t: &HostTensor) -> Result<CudaWeight> {
        let (rows, cols) = dims(&t.name, &t.shape)?;
        let data = if t.shape.len() == 1 {
            let v = t.to_f32_vec()?;
            let mut buf = self.alloc_f32(v.len(), &t.name)?;
            self.dev.stream.memcpy_htod(&v, &mut buf).ctx(&t.name)?;
            WeightData::F32(buf)
        } else {
            match t.dtype {
                DType::BF16 | DType::F16 => {
                    let mut buf = self.alloc_u16(t.numel(), &t.name)?;
                    self.copy_staged::<u16>(t, &mut buf)?;
                    if t.dtype == DType::BF16 {
                        WeightData::Bf16(buf)
                    } else {
                        WeightData::F16(buf)
                    }
                }
                DType::F32 => {
                    let mut buf = self.alloc_f32(t.numel(), &t.name)?;
                    self.copy_staged::<f32>(t, &mut buf)?;
                    WeightData::F32(buf)
                }
            }
        };
        let w = CudaWeight { rows, cols, data };
        self.add_weight_bytes(&w);
        Ok(w)
    }

    /// A weight of `shape` filled on the device from (`seed`, `index`, element) in `dtype`
    /// (vectors in f32, like uploaded ones); see [`dummy_value`].
    pub(crate) fn dummy_tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        seed: u64,
        index: u64,
    ) -> Result<CudaWeight> {
        let (rows, cols) = dims(name, shape)?;
        let (center, half_width) = dummy_range(name, shape);
        let n = rows * cols;
        let data = if shape.len() == 1 || dtype == DType::F32 {
            let mut buf = self.alloc_f32(n, name)?;
            self.launch_fill_dummy(
                "phi3_fill_dummy_f32",
                &mut buf,
                seed,
                index,
                center,
                half_width,
            )?;
            WeightData::F32(buf)
        } else {
            let mut buf = self.alloc_u16(n, name)?;
            let bf16 = dtype == DType::BF16;
            let kernel = if bf16 { "phi3_fill_dummy_bf16" } else { "phi3_fill_dummy_f16" };
            self.launch_fill_dummy(kernel, &mut buf, seed, index, center, half_width)?;
            if bf16 {
                WeightData::Bf16(buf)
            } else {
                WeightData::F16(buf)
            }
        };
        let w = CudaWeight { rows, cols, data };
        self.add_weight_bytes(&w);
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values pinned bit for bit; kernels/host-check asserts the same bits from
    /// `phi3_fill_dummy_f32` (`dummy_case`), which ties the kernel to this twin.
    #[test]
    fn dummy_values_are_pinned() {
        let h = 1.0 / 77f32.sqrt();
        let cases = [
            (7, 5, 0, 0.0, h, 0xbd5c9c80u32),
            (7, 5, 2540, 0.0, h, 0xbdc169af),
            (1, 0, 100, 1.0, 0.1, 0x3f823301),
            (42, 3, 17, -0.5, 2.0, 0xbf82a7d2),
        ];
        for (seed, tensor, i, center, half_width, bits) in cases {
            let v = dummy_value(seed, tensor, i, center, half_width);
            assert_eq!(v.to_bits(), bits, "seed {seed} tensor {tensor} element {i}: {v}");
        }
    }
}
