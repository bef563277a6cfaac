//! `e^x` on a SIMD vector, for the softmax of attention: the same bits on every lane width.
//!
//! libm's `expf` runs one value at a time; the softmax needs one `exp` per score, as many as a
//! score's multiply-adds over a head divided by the head's width, and at one call per score it
//! would take longer than those. This is Cephes' `expf` (range reduction by ln 2 in two parts,
//! a degree-7 polynomial), built from additions, multiplications, fused multiply-adds and bit
//! operations, each of them exact per lane on AVX-512, AVX2 and NEON. So a lane's result does
//! not depend on the vector it sits in. Within 2 ulp of the true value (tested below).

use pulp::Simd;

use super::simd::mul_add;

/// Below this, `e^x` is under the smallest normal f32 and the result is 0.
const LOWEST: f32 = -87.336_55;
/// Above this the result is +inf: `2^n` would overflow at n = 128, and the softmax only asks
/// for `e^x` at x ≤ 0 (e^88 is 1.65e38; f32 ends at 3.4e38).
const HIGHEST: f32 = 88.0;
/// 1.5 · 2^23: adding it to |v| < 2^22 rounds v to an integer, held in the low mantissa bits.
const ROUNDER: f32 = 12_582_912.0;
/// ln 2 in two parts; the first has few enough bits that `n · LN2_HI` is exact for |n| ≤ 128.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' minimax coefficients of (e^r - 1 - r) / r² on [-ln2/2, ln2/2], highest degree first.
const POLY: [f32; 6] =
    [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// `e^x` for each lane. NaN stays NaN, -inf and anything below [`LOWEST`] give 0.
#[inline(always)]
pub(super) fn exp<S: Simd>(simd: S, fused: bool, x: S::f32s) -> S::f32s {
    let splat = |v: f32| simd.splat_f32s(v);
    let clamped = simd.min_f32s(simd.max_f32s(x, splat(LOWEST)), splat(HIGHEST));
    // e^x = 2^n · e^r with n = round(x / ln 2) and |r| ≤ ln 2 / 2.
    let shifted = mul_add(simd, fused, clamped, splat(std::f32::consts::LOG2_E), splat(ROUNDER));
    let n = simd.sub_f32s(shifted, splat(ROUNDER));
    let r = mul_add(simd, fused, n, splat(-LN2_HI), clamped);
    let r = mul_add(simd, fused, n, splat(-LN2_LO), r);
    let mut p = splat(POLY[0]);
    for &c in &POLY[1..] {
        p = mul_add(simd, fused, p, r, splat(c));
    }
    let e_r = simd.add_f32s(mul_add(simd, fused, p, simd.mul_f32s(r, r), r), splat(1.0));
    // 2^n from n's bits in `shifted`: shifted up into the exponent field, plus 1.0's bits.
    let bits = simd.transmute_u32s_f32s(shifted);
    let exponent = simd.wrapping_dyn_shl_u32s(bits, simd.splat_u32s(23));
    let two_n =
        simd.transmute_f32s_u32s(simd.add_u32s(exponent, simd.splat_u32s(1.0f32.to_bits())));
    let e = simd.mul_f32s(e_r, two_n);
    let e = simd.select_f32s(simd.less_than_f32s(x, splat(LOWEST)), splat(0.0), e);
    let e = simd.select_f32s(simd.greater_than_f32s(x, splat(HIGHEST)), splat(f32::INFINITY), e);
    // x != x only for NaN, which max/min above may have replaced (x86 keeps the second operand).
    simd.select_f32s(simd.equal_f32s(x, x), e, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::simd_kinds::SimdKind;
    use pulp::WithSimd;

    /// `exp` over `xs` with the given SIMD kind.
    struct Run<'a> {
        xs: &'a [f32],
        fused: bool,
    }

    impl WithSimd for Run<'_> {
        type Output = Vec<f32>;

        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) -> Vec<f32> {
            let mut out = self.xs.to_vec();
            for chunk in out.chunks_mut(S::F32_LANES) {
                let e = exp(simd, self.fused, simd.partial_load_f32s(chunk));
                simd.partial_store_f32s(chunk, e);
            }
            out
        }
    }

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    fn inputs() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..200_000).map(|i| -100.0 + i as f32 * 0.000_95).collect();
        xs.extend([
            0.0, -0.0, 1e-30, -1e-30, LOWEST, HIGHEST, 87.9, 88.1, 89.0, -87.3, -88.0, -200.0,
        ]);
        xs
    }

    #[test]
    fn close_to_the_true_value() {
        for fused in [true, false] {
            let got = pulp::Scalar::new().vectorize(Run { xs: &inputs(), fused });
            for (&x, &e) in inputs().iter().zip(&got) {
                let want = (x as f64).exp();
                if x < LOWEST {
                    assert_eq!(e.to_bits(), 0, "exp({x})");
                } else if x > HIGHEST {
                    assert_eq!(e, f32::INFINITY, "exp({x})");
                } else {
                    assert!(
                        ulps(e, want as f32) <= 2,
                        "fused {fused}: exp({x}) = {e}, want {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn special_values() {
        let xs = [f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 0.0];
        let got = pulp::Arch::new().dispatch(Run { xs: &xs, fused: true });
        assert_eq!(got[0].to_bits(), 0);
        assert_eq!(got[1], f32::INFINITY);
        assert!(got[2].is_nan());
        assert_eq!(got[3], 1.0);
    }

    #[test]
    fn every_width_gives_the_same_bits() {
        let xs = inputs();
        for (kind, fuses, simd) in SimdKind::all() {
            let want = pulp::Scalar::new().vectorize(Run { xs: &xs, fused: fuses });
            let got = simd.run(Run { xs: &xs, fused: fuses });
            for (x, (g, w)) in xs.iter().zip(got.iter().zip(&want)) {
                assert_eq!(g.to_bits(), w.to_bits(), "{kind}: exp({x}) = {g}, one lane: {w}");
            }
        }
    }
}
