//! Element-wise kernels over rows and chunks, in parallel: softmax, the
//! exact GELU, the bf16 residual add; and the vectorisable `exp`/`erf`
//! they are built on.

use half::bf16;
use rayon::prelude::*;

/// Lanes of independent partial sums: enough for the compiler to fill a
/// vector register and hide the add latency.
const LANES: usize = 8;

/// Elements per parallel task of the element-wise kernels.
pub const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// softmax over rows of `width` values, into `out`. Rows of `width` in
/// parallel, with a vectorisable exp ([`exp_f32`]); candle's own kernel
/// calls libm's scalar `expf` per element, which was ~15 ms a layer of
/// ViT-B attention (12 x 577 x 577 scores) on this machine class.
pub fn softmax_rows(xs: &[f32], width: usize, out: &mut [f32]) {
    let width = width.max(1);
    out.par_chunks_mut(width)
        .zip(xs.par_chunks(width))
        .for_each(|(out, row)| softmax_row(row, out));
}

/// The exact (erf) GELU, `x/2 · (1 + erf(x/√2))`. Chunks in parallel, with a vectorisable erf ([`erf_f32`]);
/// candle evaluates its scalar erf one element at a time on one thread
/// (~13 ms for a ViT-B MLP's 577 x 3072).
pub fn gelu_erf(xs: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(xs.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(out, xs)| gelu_chunk(xs, out));
}

/// [`gelu_erf`] on bf16 values: computed in f32 and rounded once, as torch
/// does for bf16 (candle's bf16 GELU ran element by element: 20% of the
/// bf16 vision encoder's time).
pub fn gelu_erf_bf16(xs: &[bf16], out: &mut [bf16]) {
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(xs.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(out, xs)| {
            // Widened a stack buffer at a time: no allocation per chunk.
            let (mut wide, mut result) = ([0f32; 512], [0f32; 512]);
            for (out, xs) in out.chunks_mut(512).zip(xs.chunks(512)) {
                let (wide, result) = (&mut wide[..xs.len()], &mut result[..xs.len()]);
                for (w, x) in wide.iter_mut().zip(xs) {
                    *w = x.to_f32();
                }
                gelu_chunk(wide, result);
                for (o, r) in out.iter_mut().zip(result.iter()) {
                    *o = bf16::from_f32(*r);
                }
            }
        });
}

/// `xs + residual` in bf16: added in
/// f32 and rounded once (to nearest, ties to even, as torch rounds), chunks
/// in parallel: candle's bf16 add calls its conversion intrinsics out of
/// line, 8 values a call, ~10 ns an element, which was 32% of the vision
/// encoder's time once its products ran on AMX tiles.
pub fn add_bf16(xs: &[bf16], residual: &[bf16], out: &mut [bf16]) {
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(xs.par_chunks(ELEMENTWISE_CHUNK))
        .zip(residual.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((out, xs), residual)| {
            for ((o, x), r) in out.iter_mut().zip(xs).zip(residual) {
                *o = bf16::from_f32(x.to_f32() + r.to_f32());
            }
        });
}

fn softmax_row(row: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { softmax_row_avx2(row, out) };
    }
    softmax_row_body(row, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_row_avx2(row: &[f32], out: &mut [f32]) {
    softmax_row_body(row, out)
}

#[inline(always)]
fn softmax_row_body(row: &[f32], out: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // Every position masked: torch gives NaN (0/0); so do we.
        out.fill(f32::NAN);
        return;
    }
    for (o, &x) in out.iter_mut().zip(row) {
        *o = exp_f32(x - max);
    }
    let sum = sum_lanes(out);
    let inverse = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inverse;
    }
}

/// softmax(row · scale) in place: the fused attention's score rows.
pub fn scaled_softmax_in_place(row: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx512f {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { scaled_softmax_avx512(row, scale) };
    }
    scaled_softmax_body(row, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn scaled_softmax_avx512(row: &mut [f32], scale: f32) {
    scaled_softmax_body(row, scale)
}

#[inline(always)]
fn scaled_softmax_body(row: &mut [f32], scale: f32) {
    for x in row.iter_mut() {
        *x *= scale;
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(f32::NAN);
        return;
    }
    for x in row.iter_mut() {
        *x = exp_f32(*x - max);
    }
    let inverse = 1.0 / sum_lanes(row);
    for x in row.iter_mut() {
        *x *= inverse;
    }
}

fn gelu_chunk(xs: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { gelu_chunk_avx2(xs, out) };
    }
    gelu_chunk_body(xs, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_chunk_avx2(xs: &[f32], out: &mut [f32]) {
    gelu_chunk_body(xs, out)
}

#[inline(always)]
fn gelu_chunk_body(xs: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = 0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[inline(always)]
fn sum_lanes(xs: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            lanes[l] += chunk[l];
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// e^x for f32 in branch-free arithmetic the compiler can vectorise:
/// x = n·ln2 + r with |r| ≤ ln2/2, e^r by Cephes' degree-6 polynomial, 2^n
/// by building the exponent bits. Within 2 ulp of the exact value over the
/// range softmax feeds it (x ≤ 0); 0 below -87.3, where e^x leaves the
/// normal f32 range (and for -inf, a masked score).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(-87.3, 88.7);
    let n = (clamped * std::f32::consts::LOG2_E).round();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let scale = f32::from_bits(biased_exponent(n) << 23);
    if x < -87.3 {
        0.0
    } else {
        er * scale
    }
}

/// `n + 127` for a whole `n` in [-126, 128] (as `exp_f32` makes it), the
/// bits of `n as i32 + 127`: adding 2^23 + 127 leaves it, exactly, in the
/// low bits of the sum's mantissa. `as i32`'s conversion saturates and maps
/// NaN to 0, which LLVM does not vectorise: it ran lane by lane, five
/// scalar instructions each, most of the softmax's time (perf annotate).
/// For NaN (x was NaN) the bits differ, and the result is NaN either way.
#[inline(always)]
fn biased_exponent(n: f32) -> u32 {
    const MANTISSA_ONE: u32 = 0x4B00_0000; // 2^23
    (n + 8_388_735.0).to_bits().wrapping_sub(MANTISSA_ONE)
}

/// erf for f32, vectorisable: Abramowitz & Stegun 7.1.26 (absolute error
/// 1.5e-7 in exact arithmetic; 4.7e-7 measured in f32, from the
/// cancellation in 1 - poly·e^(-x²) near 0), odd in x. Made for GELU,
/// which adds it to 1: there it is a few ulp, and the output error is
/// below 1e-6 (tested against candle's f64-accurate erf).
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_f32(-a * a);
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The vector builds (AVX2, AVX-512) of softmax, the scaled softmax
    /// and GELU give the portable bodies' results bit for bit: the same
    /// operations in the same order, whatever the vector width. A masked
    /// row (all -inf) gives NaN, as torch's softmax does.
    #[test]
    fn vector_builds_equal_the_portable_bodies() {
        let width = 77;
        let mut xs = crate::test_data::random(5 * width, 14);
        xs[4 * width..].fill(f32::NEG_INFINITY);
        let mut ours = vec![0.0f32; xs.len()];
        softmax_rows(&xs, width, &mut ours);
        for (row, out) in xs.chunks(width).zip(ours.chunks(width)) {
            let mut portable = vec![0.0f32; width];
            softmax_row_body(row, &mut portable);
            assert_eq!(
                out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                portable.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            let mut scaled = row.to_vec();
            scaled_softmax_in_place(&mut scaled, 0.5);
            let mut portable = row.to_vec();
            scaled_softmax_body(&mut portable, 0.5);
            assert_eq!(
                scaled.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                portable.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
        assert!(ours[4 * width..].iter().all(|x| x.is_nan()));
        let xs: Vec<f32> = crate::test_data::random(3 * ELEMENTWISE_CHUNK + 5, 15)
            .iter()
            .map(|x| 3.0 * x)
            .collect();
        let mut ours = vec![0.0f32; xs.len()];
        gelu_erf(&xs, &mut ours);
        let mut portable = vec![0.0f32; xs.len()];
        gelu_chunk_body(&xs, &mut portable);
        assert_eq!(ours, portable);
    }

    /// The vectorisable exponent bits are `as i32`'s for every `n` that
    /// `exp_f32` can make (the clamp keeps it a whole number in [-126,
    /// 128] unless x is NaN), so `exp_f32` is bit for bit what it was.
    #[test]
    fn exp_is_unchanged_by_the_vectorisable_exponent() {
        for n in -126..=128 {
            assert_eq!(biased_exponent(n as f32), (n + 127) as u32, "n = {n}");
        }
        for x in [
            -1e30f32,
            -87.3,
            88.7,
            1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            let n = (x.clamp(-87.3, 88.7) * std::f32::consts::LOG2_E).round();
            assert!((-126.0..=128.0).contains(&n), "x = {x}: n = {n}");
        }
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn exp_and_erf_are_close_to_libm() {
        let mut worst_exp = 0.0f64;
        let mut worst_erf = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 87.0 * i as f32 / 200_000.0;
            let exact = (x as f64).exp();
            worst_exp = worst_exp.max(((exp_f32(x) as f64) - exact).abs() / exact);
            let y = -6.0 + 12.0 * i as f32 / 200_000.0;
            let exact = libm_erf(y as f64);
            worst_erf = worst_erf.max(((erf_f32(y) as f64) - exact).abs());
        }
        assert!(worst_exp < 2.5e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 6e-7, "erf absolute error {worst_erf}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    /// erf by its Taylor series / continued fraction is overkill here:
    /// candle's f64 erf is the yardstick.
    fn libm_erf(x: f64) -> f64 {
        let t = Tensor::new(&[x], &Device::Cpu).unwrap();
        // gelu_erf(x√2)/(x√2) = (1 + erf(x))/2
        let z = x * std::f64::consts::SQRT_2;
        if z == 0.0 {
            return 0.0;
        }
        let g: Vec<f64> = (t * std::f64::consts::SQRT_2)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1()
            .unwrap();
        2.0 * g[0] / z - 1.0
    }
}
