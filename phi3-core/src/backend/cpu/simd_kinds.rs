//! Tests only: each SIMD kind pulp can run on this CPU, forced one at a time, so that a kernel's
//! every width is checked here and not only the one `Arch` dispatches to.

use pulp::{Simd, WithSimd};

/// One way to run a [`WithSimd`] operation.
#[derive(Clone, Copy, Debug)]
pub(super) enum SimdKind {
    /// pulp's one-lane fallback (x86 before AVX2): no fused multiply-adds.
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(pulp::x86::V3),
    #[cfg(target_arch = "x86_64")]
    Avx512(pulp::x86::V4),
    /// What the library runs: pulp's choice for this CPU.
    Dispatched(pulp::Arch),
}

impl SimdKind {
    /// Every kind this CPU has, with its name and whether its kernels fuse multiply-adds.
    pub(super) fn all() -> Vec<(&'static str, bool, SimdKind)> {
        let mut kinds = vec![("scalar", false, SimdKind::Scalar)];
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(simd) = pulp::x86::V3::try_new() {
                kinds.push(("avx2", true, SimdKind::Avx2(simd)));
            }
            if let Some(simd) = pulp::x86::V4::try_new() {
                kinds.push(("avx512", true, SimdKind::Avx512(simd)));
            }
        }
        let arch = pulp::Arch::new();
        let fused = !matches!(arch, pulp::Arch::Scalar);
        kinds.push(("dispatched", fused, SimdKind::Dispatched(arch)));
        kinds
    }

    pub(super) fn run<T: WithSimd>(self, op: T) -> T::Output {
        match self {
            SimdKind::Scalar => pulp::Scalar::new().vectorize(op),
            #[cfg(target_arch = "x86_64")]
            SimdKind::Avx2(simd) => Simd::vectorize(simd, op),
            #[cfg(target_arch = "x86_64")]
            SimdKind::Avx512(simd) => Simd::vectorize(simd, op),
            SimdKind::Dispatched(arch) => arch.dispatch(op),
        }
    }
}
