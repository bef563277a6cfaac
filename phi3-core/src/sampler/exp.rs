//! `exp` of every `x_i - max` for the sampler's softmax, in f64, vectorised.
//!
//! libm's `exp` is a call per element with branches for special cases, so a softmax over Phi-3's
//! 32k logits spent about 145 µs in it (docs/PERF.md). This one is straight-line code that the
//! compiler turns into SIMD: Cody-Waite range reduction, a degree-13 Taylor polynomial, and the
//! power of two built from its bits. Its domain is the softmax's: arguments <= 0, where it is
//! within one ulp of libm's (a unit test measures it); -inf and everything below -745.2 give 0,
//! as libm's. No fused multiply-adds are asked for, so every CPU gives the same bits.

use multiversion::multiversion;

/// `out[i] = exp(x[i] - max)`, the difference taken in f32 (as torch does) and the exponential
/// in f64. `max` must be at least every `x[i]`, and no `x[i]` NaN; -inf gives exactly 0.
#[multiversion(targets("x86_64+avx512f+avx512dq+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn exp_shifted(x: &[f32], max: f32, out: &mut [f64]) {
    // Blocks of removed ids (-inf: most of them after top-k) are skipped; the others run as SIMD.
    const BLOCK: usize = 16;
    for (o, v) in out.chunks_mut(BLOCK).zip(x.chunks(BLOCK)) {
        if v.iter().all(|&v| v == f32::NEG_INFINITY) {
            o.fill(0.0);
        } else {
            for (o, &v) in o.iter_mut().zip(v) {
                *o = exp_nonpositive(f64::from(v - max));
            }
        }
    }
}

/// e^x for x <= 0 (NaN is not expected; it gives 0).
#[inline(always)]
pub(super) fn exp_nonpositive(x: f64) -> f64 {
    // Below about -745.13 the result rounds to 0; clamping keeps the exponent arithmetic in range.
    let x = x.max(-746.0);
    // k = round(x / ln 2): adding 1.5 * 2^52 leaves the rounded integer in the low mantissa bits.
    const SHIFTER: f64 = 6_755_399_441_055_744.0;
    let shifted = x * std::f64::consts::LOG2_E + SHIFTER;
    let k_float = shifted - SHIFTER;
    let k = (shifted.to_bits() as i64).wrapping_sub(SHIFTER.to_bits() as i64);
    // r = x - k ln 2 in two parts (fdlibm's split: k * LN2_HI is exact for |k| < 2^11).
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    let r = (x - k_float * LN2_HI) - k_float * LN2_LO;
    // e^r = 1 + r + r^2 (1/2! + r/3! + ... + r^11/13!) for |r| <= ln2 / 2: the first term left
    // out, r^14 / 14!, is below 2^-60 of the result.
    const C: [f64; 12] = [
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5_040.0,
        1.0 / 40_320.0,
        1.0 / 362_880.0,
        1.0 / 3_628_800.0,
        1.0 / 39_916_800.0,
        1.0 / 479_001_600.0,
        1.0 / 6_227_020_800.0,
    ];
    let mut tail = C[11];
    for &c in C[..11].iter().rev() {
        tail = tail * r + c;
    }
    let e_r = 1.0 + (r + r * r * tail);
    // 2^k as two factors, so that k down to -1076 (a subnormal result) stays representable; each
    // product by a power of two is exact until the last, which rounds once.
    let half = k >> 1;
    let pow2 = |e: i64| f64::from_bits(((e + 1023) as u64) << 52);
    e_r * pow2(half) * pow2(k - half)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::Rng;

    /// Distance in ulps between two non-negative finite doubles.
    fn ulps(a: f64, b: f64) -> u64 {
        a.to_bits().abs_diff(b.to_bits())
    }

    /// Within one ulp of libm over the whole domain: random points at every scale, the ends of
    /// the reduction interval, the subnormal range and the points where the result becomes 0.
    #[test]
    fn within_one_ulp_of_libm() {
        let mut rng = Rng::seeded(7);
        let mut xs: Vec<f64> =
            vec![0.0, -0.0, -1e-300, -f64::MIN_POSITIVE, -745.0, -745.13, -745.2];
        xs.extend((0..200_000).map(|_| -rng.next_f64() * 750.0));
        xs.extend((0..200_000).map(|_| -rng.next_f64() * 30.0));
        xs.extend((0..200_000).map(|_| -rng.next_f64() * 1e-3));
        // Both sides of every half-integer multiple of ln 2, where k changes.
        for k in 0..1080 {
            let edge = -(k as f64 + 0.5) * std::f64::consts::LN_2;
            xs.extend([
                edge,
                f64::from_bits(edge.to_bits() + 1),
                f64::from_bits(edge.to_bits() - 1),
            ]);
        }
        let mut worst = (0, 0.0);
        for &x in &xs {
            let d = ulps(exp_nonpositive(x), x.exp());
            if d > worst.0 {
                worst = (d, x);
            }
        }
        assert!(worst.0 <= 1, "{} ulps from libm at x = {:e}", worst.0, worst.1);
        assert_eq!(exp_nonpositive(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-1000.0), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    /// The vectorised loop is the scalar function on f32 differences.
    #[test]
    fn shifted_is_the_scalar_function() {
        let mut rng = Rng::seeded(3);
        let x: Vec<f32> =
            (0..1001)
                .map(|i| {
                    if i % 97 == 0 {
                        f32::NEG_INFINITY
                    } else {
                        rng.next_f64() as f32 * 40.0 - 30.0
                    }
                })
                .collect();
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut out = vec![f64::NAN; x.len()];
        exp_shifted(&x, max, &mut out);
        for (&o, &v) in out.iter().zip(&x) {
            assert_eq!(o.to_bits(), exp_nonpositive(f64::from(v - max)).to_bits());
        }
        assert!(out.iter().step_by(97).all(|&o| o == 0.0));
    }
}
