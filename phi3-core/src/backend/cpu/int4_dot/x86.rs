//! [`super::dot`] with the multiply-adds written out (`pmaddwd`) for AVX-512 and AVX2, through
//! `pulp`'s safe intrinsics and runtime dispatch.
//!
//! The portable kernel leaves `pmaddwd` to the vectoriser, which pairs the products only half
//! the way: LLVM proves the nibbles non-negative, turns their sign extension into a zero
//! extension, and then no longer matches the pattern, so it multiplies even and odd lanes apart
//! (shifts, masks and two multiply-adds where one does). Written out, an AVX-512 core does the
//! same sums in about half the instructions: 1.6-1.9x on one matrix held in cache, and int4
//! decode on two cores then streams weights as fast as int8 does (docs/PERF.md).
//!
//! Each lane holds what the portable kernel's lane of the same index holds (`part[l]`: the
//! products of columns `2l` and `2l + 1` of each 32-byte chunk, exact integers), and the f32
//! steps are the same operations in the same order (no fused multiply-add), so every kernel
//! gives the same bits; a test checks it.

use core::arch::x86_64::{__m128i, __m256, __m256i, __m512, __m512i};

use pulp::x86::{V3, V4};
use pulp::{as_arrays, cast, NullaryFnOnce};

use super::Row;
use crate::backend::cpu::prefetch;

/// The kernel for this CPU, when one of these fits it (None: the portable one).
pub(super) fn dot(row: Row<'_>) -> Option<f32> {
    if let Some(simd) = V4::try_new() {
        Some(simd.vectorize(Avx512 { simd, row }))
    } else {
        V3::try_new().map(|simd| simd.vectorize(Avx2 { simd, row }))
    }
}

impl<'a> Row<'a> {
    /// Per group: the activations' even and odd columns, the weight bytes, the product of the
    /// two scales, and the zero point's integer term (`zero * Σ x`).
    #[inline(always)]
    fn groups(self) -> impl Iterator<Item = (&'a [i16], &'a [i16], &'a [u8], f32, i32)> {
        let half = self.group / 2;
        let (even, odd) = self.x.values.split_at(self.x.values.len() / 2);
        let columns =
            even.chunks_exact(half).zip(odd.chunks_exact(half)).zip(self.bytes.chunks_exact(half));
        let per_group = self.scales.iter().zip(self.zeros).zip(&self.x.scales).zip(&self.x.sums);
        columns.zip(per_group).map(|(((e, o), b), (((&s, &z), &x_s), &x_sum))| {
            (e, o, b, s * x_s, i32::from(z) * x_sum)
        })
    }
}

// The kernels are structs run by `vectorize` rather than closures: rustc did not inline a
// closure's body into pulp's target-feature function, and every intrinsic became a call (10x
// slower than the portable kernel).

/// 32 bytes of weights (64 columns) per step into 16 lanes of 32 bits.
struct Avx512<'a> {
    simd: V4,
    row: Row<'a>,
}

impl NullaryFnOnce for Avx512<'_> {
    type Output = f32;

    #[inline(always)]
    fn call(self) -> f32 {
        let (f, bw) = (self.simd.avx512f, self.simd.avx512bw);
        let low_nibble = f._mm512_set1_epi16(15);
        let mut acc: __m512 = f._mm512_setzero_ps();
        let mut zero_term = 0.0f32;
        for (e, o, b, step, zero) in self.row.groups() {
            prefetch::ahead(b);
            let mut part: __m512i = f._mm512_setzero_si512();
            let (b, _) = as_arrays::<32, u8>(b);
            let (e, _) = as_arrays::<32, i16>(e);
            let (o, _) = as_arrays::<32, i16>(o);
            for ((b, e), o) in b.iter().zip(e).zip(o) {
                // Each byte in a 16-bit lane: its low nibble pairs with the even column's
                // activation, its high nibble with the odd one's.
                let w = bw._mm512_cvtepu8_epi16(cast::<[u8; 32], __m256i>(*b));
                let lo = f._mm512_and_si512(w, low_nibble);
                let hi = bw._mm512_srli_epi16::<4>(w);
                let even = bw._mm512_madd_epi16(lo, cast::<[i16; 32], __m512i>(*e));
                let odd = bw._mm512_madd_epi16(hi, cast::<[i16; 32], __m512i>(*o));
                part = f._mm512_add_epi32(part, f._mm512_add_epi32(even, odd));
            }
            let scaled = f._mm512_mul_ps(f._mm512_set1_ps(step), f._mm512_cvtepi32_ps(part));
            acc = f._mm512_add_ps(acc, scaled);
            zero_term += step * zero as f32;
        }
        cast::<__m512, [f32; 16]>(acc).iter().sum::<f32>() - zero_term
    }
}

/// 16 bytes per step: the first half of each 32-byte chunk feeds lanes 0-7, the second 8-15.
struct Avx2<'a> {
    simd: V3,
    row: Row<'a>,
}

impl NullaryFnOnce for Avx2<'_> {
    type Output = f32;

    #[inline(always)]
    fn call(self) -> f32 {
        let (avx, avx2) = (self.simd.avx, self.simd.avx2);
        let low_nibble = avx._mm256_set1_epi16(15);
        let mut acc: [__m256; 2] = [avx._mm256_setzero_ps(); 2];
        let mut zero_term = 0.0f32;
        for (e, o, b, step, zero) in self.row.groups() {
            prefetch::ahead(b);
            let mut part: [__m256i; 2] = [avx._mm256_setzero_si256(); 2];
            let (b, _) = as_arrays::<16, u8>(b);
            let (e, _) = as_arrays::<16, i16>(e);
            let (o, _) = as_arrays::<16, i16>(o);
            for (i, ((b, e), o)) in b.iter().zip(e).zip(o).enumerate() {
                let w = avx2._mm256_cvtepu8_epi16(cast::<[u8; 16], __m128i>(*b));
                let lo = avx2._mm256_and_si256(w, low_nibble);
                let hi = avx2._mm256_srli_epi16::<4>(w);
                let even = avx2._mm256_madd_epi16(lo, cast::<[i16; 16], __m256i>(*e));
                let odd = avx2._mm256_madd_epi16(hi, cast::<[i16; 16], __m256i>(*o));
                let p = &mut part[i % 2];
                *p = avx2._mm256_add_epi32(*p, avx2._mm256_add_epi32(even, odd));
            }
            let step_lanes = avx._mm256_set1_ps(step);
            for (a, p) in acc.iter_mut().zip(part) {
                *a =
                    avx._mm256_add_ps(*a, avx._mm256_mul_ps(step_lanes, avx._mm256_cvtepi32_ps(p)));
            }
            zero_term += step * zero as f32;
        }
        cast::<[__m256; 2], [f32; 16]>(acc).iter().sum::<f32>() - zero_term
    }
}

/// Each kernel this CPU has, forced, for the tests: AVX-512, then AVX2.
#[cfg(test)]
pub(super) fn each_available(row: Row<'_>) -> Vec<(&'static str, f32)> {
    let mut out = Vec::new();
    if let Some(simd) = V4::try_new() {
        out.push(("avx512", simd.vectorize(Avx512 { simd, row })));
    }
    if let Some(simd) = V3::try_new() {
        out.push(("avx2", simd.vectorize(Avx2 { simd, row })));
    }
    out
}
