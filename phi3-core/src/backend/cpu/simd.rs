//! Small SIMD pieces the CPU kernels share (`gemm.rs`, `attention/head.rs`, `simd_exp.rs`), all
//! inlined into the caller's SIMD target.

use pulp::Simd;

/// Whether kernels on `S` fuse their multiply-adds. pulp's one-lane fallback runs where there is
/// no SIMD with FMA: on x86 before AVX2 (Haswell, 2013), where a fused multiply-add is a libm
/// call (gemm.rs ran at 0.8 GFLOP/s with them). There each product is rounded before it is
/// added (LLVM vectorises that for SSE), and results differ from the FMA targets' in the last
/// bits.
#[inline(always)]
pub(super) fn fuses<S: Simd>() -> bool {
    S::F32_LANES > 1
}

/// `a · b + c`, fused, or (`fused == false`) with the product rounded first.
#[inline(always)]
pub(super) fn mul_add<S: Simd>(
    simd: S,
    fused: bool,
    a: S::f32s,
    b: S::f32s,
    c: S::f32s,
) -> S::f32s {
    if fused {
        simd.mul_add_f32s(a, b, c)
    } else {
        simd.add_f32s(simd.mul_f32s(a, b), c)
    }
}

/// The vector at the start of `src` (zeros past its end).
#[inline(always)]
pub(super) fn load<S: Simd>(simd: S, src: &[f32]) -> S::f32s {
    match S::as_simd_f32s(src).0.first() {
        Some(&v) => v,
        None => simd.partial_load_f32s(src),
    }
}

/// `v` into the start of `dst`, as far as it goes.
#[inline(always)]
pub(super) fn store<S: Simd>(simd: S, v: S::f32s, dst: &mut [f32]) {
    match S::as_mut_simd_f32s(dst).0.first_mut() {
        Some(slot) => *slot = v,
        None => simd.partial_store_f32s(dst, v),
    }
}
