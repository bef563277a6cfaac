//! The int4 decode dot product on integers: activations as 15-bit fixed point per weight group,
//! nibbles times activations summed in `i32`.
//!
//! The f32 kernel (`matmul::dot_int4`) converts every nibble to a float and multiplies it, so on
//! a desktop CPU int4 decode is bound by that arithmetic, not by the bytes read (docs/PERF.md).
//! Here each group of activations is scaled to `i16` in `-32767..=32767`, and the inner loop is
//! 16-bit products summed in pairs into 32-bit lanes, which LLVM emits as `vpmaddwd` /
//! `vpdpwssd` on x86 (checked in the disassembly of the AVX-512 build; other targets get what
//! the vectoriser makes of the same loop). The integer sums are exact; the
//! only new error is the activations' rounding, at most half a step of `max |x| / 32767` in
//! their group: 15 bits against the 8 of the bf16 values the model was trained with.
//!
//! On x86 with AVX2 or AVX-512 the products are written out as `pmaddwd` (`x86.rs`, same bits,
//! 1.6-1.9x on AVX-512, 1.4-1.5x on AVX2). Elsewhere the portable loop below runs; its shape
//! (bytes widened into two `i16` arrays, then pairs multiplied) is what lets the compiler find
//! multiply-adds at all; small rewrites of it (subtracting the zero point from the nibbles first, 16-byte steps) made
//! it emit 32-bit multiplies or scalar code, 1.8-4x slower (docs/PERF.md).

use multiversion::multiversion;

use super::prefetch;

#[cfg(target_arch = "x86_64")]
mod x86;

/// Weights per inner-loop step: 32 bytes of nibbles, two `i16` arrays of 32 each.
const CHUNK: usize = 32;
/// 32-bit accumulators: one per pair of adjacent columns in a chunk.
const LANES: usize = CHUNK / 2;
/// Largest magnitude of a quantized activation.
const STEPS: f32 = 32767.0;

/// One row of activations prepared for [`dot`] against weights with groups of `group` columns.
pub(super) struct Int16Activations {
    /// The even columns, then the odd ones (`[k]`), each `round(x / scale)` of its group.
    values: Vec<i16>,
    /// `[k / group]`: the step of each group (`max |x| / 32767`, 0 for an all-zero group).
    scales: Vec<f32>,
    /// `[k / group]`: the sum of each group's values, for the zero point's term.
    sums: Vec<i32>,
}

impl Int16Activations {
    /// Whether [`dot`] handles groups of `group` columns (64 and 128; 32 goes the f32 way).
    pub(super) fn supports(group: usize) -> bool {
        group.is_multiple_of(2 * CHUNK)
    }

    /// `x` (`[k]`, `k` a multiple of `group`) as fixed point; None when a value is not finite
    /// (NaN or infinity must reach the output as the f32 kernel gives them).
    pub(super) fn new(x: &[f32], group: usize) -> Option<Int16Activations> {
        let k = x.len();
        let half = k / 2;
        let mut values = vec![0i16; k];
        let mut scales = Vec::with_capacity(k / group);
        let mut sums = Vec::with_capacity(k / group);
        for (g, xg) in x.chunks_exact(group).enumerate() {
            let max = xg.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if !max.is_finite() || xg.iter().any(|v| v.is_nan()) {
                return None;
            }
            let scale = max / STEPS;
            let inverse = if max > 0.0 { STEPS / max } else { 0.0 };
            scales.push(scale);
            let base = g * group / 2;
            for (i, pair) in xg.chunks_exact(2).enumerate() {
                // |x| * (32767 / max) <= 32767 up to rounding; the clamp keeps that in range.
                let q = |v: f32| (v * inverse).round().clamp(-STEPS, STEPS) as i16;
                values[base + i] = q(pair[0]);
                values[half + base + i] = q(pair[1]);
            }
            let span = base..base + group / 2;
            let sum = |v: &[i16]| v[span.clone()].iter().map(|&q| i32::from(q)).sum::<i32>();
            sums.push(sum(&values[..half]) + sum(&values[half..]));
        }
        Some(Int16Activations { values, scales, sums })
    }
}

/// One row of an int4 weight (`bytes`: column `2i` in the low nibble of byte `i`; the row's
/// group `scales` and `zeros`) against prepared activations: Σ scale · (q - zero) · x.
pub(super) fn dot(
    x: &Int16Activations,
    bytes: &[u8],
    scales: &[f32],
    zeros: &[u8],
    group: usize,
) -> f32 {
    let row = Row { x, bytes, scales, zeros, group };
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = x86::dot(row) {
        return v;
    }
    dot_portable(row)
}

/// [`dot`]'s arguments, as every kernel takes them.
#[derive(Clone, Copy)]
struct Row<'a> {
    x: &'a Int16Activations,
    bytes: &'a [u8],
    scales: &'a [f32],
    zeros: &'a [u8],
    group: usize,
}

/// [`dot`] by the portable kernel.
fn dot_portable(row: Row<'_>) -> f32 {
    let Row { x, bytes, scales, zeros, group } = row;
    let (even, odd) = x.values.split_at(x.values.len() / 2);
    dot_groups(even, odd, bytes, scales, zeros, &x.scales, &x.sums, group)
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512vnni",
    "x86_64+avx512f+avx512bw+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
// Lane-indexed loops over several arrays at once are the shape the vectoriser maps to pmaddwd.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn dot_groups(
    even: &[i16],
    odd: &[i16],
    bytes: &[u8],
    scales: &[f32],
    zeros: &[u8],
    x_scales: &[f32],
    x_sums: &[i32],
    group: usize,
) -> f32 {
    let half = group / 2;
    let mut acc = [0.0f32; LANES];
    let mut zero_term = 0.0f32;
    let groups = even.chunks_exact(half).zip(odd.chunks_exact(half)).zip(bytes.chunks_exact(half));
    let per_group = scales.iter().zip(zeros).zip(x_scales).zip(x_sums);
    for (((e, o), b), (((&s, &z), &x_s), &x_sum)) in groups.zip(per_group) {
        prefetch::ahead(b);
        let mut part = [0i32; LANES];
        for ((e, o), b) in
            e.chunks_exact(CHUNK).zip(o.chunks_exact(CHUNK)).zip(b.chunks_exact(CHUNK))
        {
            let mut lo = [0i16; CHUNK];
            let mut hi = [0i16; CHUNK];
            for l in 0..CHUNK {
                lo[l] = i16::from(b[l] & 15);
                hi[l] = i16::from(b[l] >> 4);
            }
            for l in 0..LANES {
                let (a, c) = (2 * l, 2 * l + 1);
                part[l] += i32::from(lo[a]) * i32::from(e[a]) + i32::from(lo[c]) * i32::from(e[c]);
                part[l] += i32::from(hi[a]) * i32::from(o[a]) + i32::from(hi[c]) * i32::from(o[c]);
            }
        }
        // `part` converts exactly (|part| <= 15 * 32767 * group / 16 < 2^24 for group <= 128);
        // `z * x_sum` is exact in i32 and rounds once. The zero point's term is kept apart, as
        // the f32 kernel does: subtracting it from each lane here made this loop 20% slower.
        let step = s * x_s;
        for l in 0..LANES {
            acc[l] += step * part[l] as f32;
        }
        zero_term += step * (i32::from(z) * x_sum) as f32;
    }
    acc.iter().sum::<f32>() - zero_term
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::Rng;

    /// Random int4 weights for `rows` rows of `k` columns: packed bytes, scales, zero points.
    fn weights(rng: &mut Rng, k: usize, group: usize) -> (Vec<u8>, Vec<f32>, Vec<u8>) {
        let bytes = (0..k / 2).map(|_| rng.next_u64() as u8).collect();
        let scales = (0..k / group).map(|_| rng.next_f64() as f32 * 0.02).collect();
        let zeros = (0..k / group).map(|_| (rng.next_u64() % 16) as u8).collect();
        (bytes, scales, zeros)
    }

    /// Σ scale · (q - zero) · x in f64 for activations `x`.
    fn reference(x: &[f64], bytes: &[u8], scales: &[f32], zeros: &[u8], group: usize) -> f64 {
        (0..x.len())
            .map(|c| {
                let nibble = if c % 2 == 0 { bytes[c / 2] & 15 } else { bytes[c / 2] >> 4 };
                let g = c / group;
                f64::from(scales[g]) * (f64::from(nibble) - f64::from(zeros[g])) * x[c]
            })
            .sum()
    }

    /// The integer kernel is exact on the activations it was given: against an f64 sum over the
    /// dequantized fixed-point activations, only the f32 accumulation of group results differs.
    /// Against the f32 activations, the error stays within the rounding bound (half a step per
    /// activation, times the weights' magnitudes).
    #[test]
    fn exact_on_fixed_point_and_within_the_rounding_bound() {
        let mut rng = Rng::seeded(21);
        for (k, group) in [(128, 64), (256, 128), (640, 64), (5120, 128)] {
            let x: Vec<f32> = (0..k)
                .map(|i| {
                    let v = rng.next_f64() as f32 * 4.0 - 2.0;
                    // Groups of very different sizes, an all-zero stretch, an outlier.
                    if i < 64 {
                        0.0
                    } else if i % 200 == 7 {
                        v * 300.0
                    } else {
                        v * (1 + i / 128) as f32
                    }
                })
                .collect();
            let (bytes, scales, zeros) = weights(&mut rng, k, group);
            let a = Int16Activations::new(&x, group).unwrap();
            let got = f64::from(dot(&a, &bytes, &scales, &zeros, group));

            let fixed: Vec<f64> = (0..k)
                .map(|c| {
                    let v = if c % 2 == 0 { a.values[c / 2] } else { a.values[k / 2 + c / 2] };
                    f64::from(v) * f64::from(a.scales[c / group])
                })
                .collect();
            let exact = reference(&fixed, &bytes, &scales, &zeros, group);
            let magnitude: f64 =
                (0..k).map(|c| f64::from(scales[c / group]) * 15.0 * fixed[c].abs()).sum();
            assert!((got - exact).abs() <= 1e-6 * magnitude, "k {k}: {got} vs {exact}");

            let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            let want = reference(&x64, &bytes, &scales, &zeros, group);
            let rounding: f64 = (0..k)
                .map(|c| f64::from(scales[c / group]) * 15.0 * f64::from(a.scales[c / group]) / 2.0)
                .sum();
            assert!((got - want).abs() <= rounding + 1e-6 * magnitude, "k {k}: {got} vs {want}");
        }
    }

    /// The x86 kernels give the portable kernel's bits: random rows, and the extremes (every
    /// nibble 15 against activations at ±32767, zero points 0 and 15, all-zero groups), for both
    /// group sizes. Swapping the even and odd activations, or a lane's order, fails it.
    #[test]
    fn every_kernel_gives_the_same_bits() {
        let mut rng = Rng::seeded(77);
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut checked = 0;
        for (k, group) in [(128, 64), (128, 128), (3072, 128), (3072, 64), (8192, 128)] {
            for case in 0..12 {
                let x: Vec<f32> = (0..k)
                    .map(|i| match case {
                        0 => 1.0,
                        1 => -1.0,
                        2 if i < group => 0.0,
                        _ => (rng.next_f64() as f32 - 0.5) * (1 + i % 7) as f32,
                    })
                    .collect();
                let (mut bytes, scales, mut zeros) = weights(&mut rng, k, group);
                if case < 2 {
                    bytes.iter_mut().for_each(|b| *b = 0xff);
                    zeros
                        .iter_mut()
                        .enumerate()
                        .for_each(|(g, z)| *z = if g % 2 == 0 { 0 } else { 15 });
                }
                let a = Int16Activations::new(&x, group).unwrap();
                let row = Row { x: &a, bytes: &bytes, scales: &scales, zeros: &zeros, group };
                let want = dot_portable(row);
                #[cfg(target_arch = "x86_64")]
                for (name, got) in x86::each_available(row) {
                    assert_eq!(got.to_bits(), want.to_bits(), "{name}, k {k}, case {case}");
                    checked += 1;
                }
                assert_eq!(dot(&a, &bytes, &scales, &zeros, group).to_bits(), want.to_bits());
            }
        }
        // Any x86 machine this runs on in practice has AVX2: the check must not pass by
        // comparing nothing.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            assert!(checked >= 60, "only {checked} comparisons ran");
        }
        let _ = checked;
    }

    /// Every activation within half a step of its fixed-point value; the extremes of each group
    /// at ±32767; NaN and infinity refused (the caller keeps them on the f32 path).
    #[test]
    fn activations_round_to_the_nearest_step() {
        let mut rng = Rng::seeded(4);
        let x: Vec<f32> = (0..256).map(|_| rng.next_f64() as f32 * 10.0 - 5.0).collect();
        let a = Int16Activations::new(&x, 128).unwrap();
        for (c, &v) in x.iter().enumerate() {
            let q = if c % 2 == 0 { a.values[c / 2] } else { a.values[128 + c / 2] };
            let step = a.scales[c / 128];
            assert!((f32::from(q) * step - v).abs() <= 0.5 * step * 1.0001, "column {c}");
        }
        for g in 0..2 {
            let max = x[g * 128..(g + 1) * 128].iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(a.scales[g], max / 32767.0);
        }
        assert!(a.values.iter().any(|&q| q.abs() == 32767));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut y = x.clone();
            y[77] = bad;
            assert!(Int16Activations::new(&y, 128).is_none());
        }
        assert!(Int16Activations::supports(64) && Int16Activations::supports(128));
        assert!(!Int16Activations::supports(32));
    }
}
