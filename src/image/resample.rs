//! Bit-exact reimplementation of Pillow's `Image.resize` for 8-bit RGB images.
//!
//! transformers' PIL backend resizes with `PIL.Image.resize((w, h), resample)` on the 8-bit RGB
//! image, so to feed BLIP the same `pixel_values` we must reproduce Pillow's integer arithmetic,
//! not merely "a bicubic filter". The algorithm (Pillow `libImaging/Resample.c`, unchanged in
//! substance since Pillow 4.x, pass order as of 13.0) is:
//!
//! * Separable: a horizontal pass, then a vertical pass, each only when that axis changes size
//!   (Pillow 13 swaps the order when the height shrinks by more than twice as many pixels as the
//!   width). The intermediate image is 8-bit, i.e. clipped and rounded between the passes.
//! * For every output index the filter is centred on `(i + 0.5) * scale` in input coordinates;
//!   when shrinking, the filter is stretched by the scale (support and argument), which turns it
//!   into a proper low-pass filter. Taps are evaluated in `f64`, then normalised to sum to 1.
//! * The normalised taps are converted to 22-bit fixed point, rounding half away from zero, and
//!   the convolution is done in `i32` with a rounding offset of one half, then clipped to 0..=255.
//!
//! NEAREST does not go through this code in Pillow at all: it is an affine "scale" transform with
//! a floating-point source coordinate that is advanced by repeated addition, reproduced in
//! [`resize_nearest`].
//!
//! The float expressions below are written in the same order as Pillow's so that every rounding
//! step happens identically (`f64::sin`/`cos` are the platform libm, as in Pillow's C).

use image::RgbImage;

/// Pillow's resampling filters, named as in `PIL.Image.Resampling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Resample {
    /// `Resampling.NEAREST` (0).
    Nearest,
    /// `Resampling.BILINEAR` (2), a triangle filter.
    Bilinear,
    /// `Resampling.BICUBIC` (3), Keys' cubic convolution with `a = -0.5`. BLIP's default.
    #[default]
    Bicubic,
    /// `Resampling.LANCZOS` (1), a 3-lobe windowed sinc.
    Lanczos,
    /// `Resampling.BOX` (4), an area average.
    Box,
    /// `Resampling.HAMMING` (5), a Hamming-windowed sinc with support 1.
    Hamming,
}

impl Resample {
    /// The filter for a `PIL.Image.Resampling` integer code, as found in `preprocessor_config.json`
    /// under `"resample"`. Returns `None` for codes Pillow does not have or that we do not support
    /// (Pillow 13's `MKS2013` = 6 and `MKS2021` = 7).
    pub fn from_pil_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => Resample::Nearest,
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            _ => return None,
        })
    }

    /// The `PIL.Image.Resampling` integer code of this filter.
    pub fn pil_code(self) -> u8 {
        match self {
            Resample::Nearest => 0,
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
            Resample::Box => 4,
            Resample::Hamming => 5,
        }
    }

    /// Half-width of the filter kernel at scale 1 (Pillow's `struct filter.support`).
    /// `Nearest` has no convolution kernel; it never reaches the convolution code.
    fn support(self) -> f64 {
        match self {
            Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
            Resample::Nearest => 0.0,
        }
    }

    /// The continuous kernel, evaluated exactly as Pillow does (same branches, same operation
    /// order, `f64` throughout).
    pub(crate) fn kernel(self, x: f64) -> f64 {
        match self {
            Resample::Box => box_kernel(x),
            Resample::Bilinear => bilinear_kernel(x),
            Resample::Hamming => hamming_kernel(x),
            Resample::Bicubic => bicubic_kernel(x),
            Resample::Lanczos => lanczos_kernel(x),
            Resample::Nearest => 0.0,
        }
    }
}

/// Half-open on the left, closed on the right: at a tie the pixel on the left of the centre
/// wins, which is what makes BOX with an integer ratio an exact block average.
fn box_kernel(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_kernel(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_kernel(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * std::f64::consts::PI;
    // Pillow writes the window constants as C `float` literals (0.54f, 0.46f), so they are the
    // nearest f32 values widened to f64, not the f64 values 0.54 and 0.46.
    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
}

/// Keys' cubic convolution kernel with `a = -0.5`, the "BICUBIC" of Pillow.
pub(crate) fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        // ((a + 2) x - (a + 3)) x^2 + 1; a + 2 and a + 3 are exact (1.5 and 2.5).
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos_kernel(x: f64) -> f64 {
    // Truncated (not tapered) at +-3, half-open like Pillow's.
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Fractional bits of the fixed-point taps: 32 bits minus 8 for the pixel value minus 2 bits of
/// headroom, because taps can be negative and partial sums can exceed 1.
pub(crate) const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Convert a normalised `f64` tap to fixed point the way Pillow does: add +-0.5 and truncate
/// towards zero, i.e. round half away from zero. It is written as `0.5 + w * 2^22` and a
/// truncating cast (rather than `f64::round`) because the addition itself rounds in floating
/// point, and we must round exactly where Pillow does.
pub(crate) fn to_fixed(w: f64) -> i32 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    if w < 0.0 {
        (-0.5 + scaled) as i32
    } else {
        (0.5 + scaled) as i32
    }
}

/// Undo the fixed-point scale with rounding (the accumulator starts at one half) and clip to a
/// byte. Pillow uses a lookup table indexed by `acc >> 22` (an arithmetic shift, i.e. floor);
/// clamping the shifted value is the same thing.
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Initial accumulator value: one half in fixed point, so the final shift rounds to nearest.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Filter taps for resampling one axis from `in_size` to `out_size` samples.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Taps {
    /// Row stride of `weights`: the most taps any output sample can have.
    pub ksize: usize,
    /// Per output sample: first input index and number of taps.
    pub bounds: Vec<(usize, usize)>,
    /// Per output sample, `ksize` taps (only the first `bounds[i].1` are used).
    pub weights: Vec<f64>,
}

impl Taps {
    /// Pillow's `precompute_coeffs` for the whole axis (`box = (0, in_size)`).
    pub(crate) fn new(in_size: u32, out_size: u32, filter: Resample) -> Self {
        // Pillow takes the box as C floats, so the input extent is an f32 before it is widened.
        let in0 = 0.0f32;
        let in1 = in_size as f32;
        let scale = f64::from(in1 - in0) / f64::from(out_size);
        // When shrinking, widen the kernel by the scale so it averages over the whole footprint
        // of the output sample (anti-aliasing); when enlarging, use it as is.
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;

        let out_len = out_size as usize;
        let mut bounds = Vec::with_capacity(out_len);
        let mut weights = vec![0.0f64; out_len * ksize];
        for (xx, k) in weights.chunks_exact_mut(ksize).enumerate() {
            let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
            // "Round the value": +0.5 then truncate towards zero, as C's (int) cast does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let count = (xmax - xmin).max(0) as usize;
            let mut ww = 0.0f64;
            for (x, tap) in k.iter_mut().take(count).enumerate() {
                // Same association as Pillow's `(x + xmin - center + 0.5) * ss`.
                let w = filter.kernel(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                *tap = w;
                ww += w;
            }
            if ww != 0.0 {
                for tap in k.iter_mut().take(count) {
                    *tap /= ww;
                }
            }
            bounds.push((xmin as usize, count));
        }
        Taps {
            ksize,
            bounds,
            weights,
        }
    }

    /// The taps in 22-bit fixed point (Pillow's `normalize_coeffs_8bpc`).
    pub(crate) fn fixed(&self) -> Vec<i32> {
        self.weights.iter().map(|&w| to_fixed(w)).collect()
    }
}

/// Resize an RGB image exactly as Pillow's `Image.resize((width, height), filter)` does on an
/// 8-bit `RGB` image. A zero `width` or `height` gives an empty image (Pillow raises instead).
pub fn resize(image: &RgbImage, width: u32, height: u32, filter: Resample) -> RgbImage {
    let (in_w, in_h) = image.dimensions();
    if width == 0 || height == 0 {
        return RgbImage::new(width, height);
    }
    // Pillow returns a copy when the size does not change, whatever the filter.
    if (in_w, in_h) == (width, height) {
        return image.clone();
    }
    if filter == Resample::Nearest {
        return resize_nearest(image, width, height);
    }

    let need_horizontal = width != in_w;
    let need_vertical = height != in_h;
    // Pillow 13 (`ImagingResampleInner`) runs the vertical pass first when the height loses
    // more than twice as many pixels as the width does, to make the second pass cheaper. The
    // order matters for the result because the intermediate image is rounded to 8 bits.
    let (dx, dy) = (
        i64::from(in_w) - i64::from(width),
        i64::from(in_h) - i64::from(height),
    );
    let horizontal_first = !(dy > 0 && dy > dx * 2);

    let src = image.as_raw().as_slice();
    let (w, h) = (width as usize, height as usize);
    let (in_w, in_h) = (in_w as usize, in_h as usize);
    let out = if horizontal_first {
        let mut vertical = Taps::new(in_h as u32, height, filter);
        if need_horizontal {
            // Only the input rows that some output row reads go through the horizontal pass.
            let first = vertical.bounds[0].0;
            let last = vertical
                .bounds
                .last()
                .map_or(first, |&(start, n)| start + n);
            for b in &mut vertical.bounds {
                b.0 -= first;
            }
            let horizontal = Taps::new(in_w as u32, width, filter);
            let rows = &src[first * in_w * 3..last * in_w * 3];
            let tmp = horizontal_pass(rows, in_w, &horizontal, w);
            if need_vertical {
                vertical_pass(&tmp, w, &vertical)
            } else {
                tmp
            }
        } else {
            vertical_pass(src, in_w, &vertical)
        }
    } else {
        // Only reached when the height shrinks, so there always is a vertical pass.
        let vertical = Taps::new(in_h as u32, height, filter);
        let tmp = vertical_pass(src, in_w, &vertical);
        if need_horizontal {
            horizontal_pass(&tmp, in_w, &Taps::new(in_w as u32, width, filter), w)
        } else {
            tmp
        }
    };
    debug_assert_eq!(out.len(), w * h * 3);
    RgbImage::from_raw(width, height, out).expect("buffer size matches dimensions")
}

/// Below this many multiply-adds a pass runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 22;

/// Fill `dst` (rows of `row_len` bytes) by calling `f(first_row, chunk)` on contiguous bands of
/// rows, on several threads when there is enough `work`. Every output byte is computed by the
/// same integer arithmetic whichever thread does it, so the result does not depend on this.
fn for_row_bands(dst: &mut [u8], row_len: usize, work: usize, f: impl Fn(usize, &mut [u8]) + Sync) {
    let rows = dst.len().checked_div(row_len).unwrap_or(0);
    let threads = if work < PARALLEL_WORK {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(rows)
    };
    if threads <= 1 {
        f(0, dst);
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (i, band) in dst.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            scope.spawn(move || f(i * per, band));
        }
    });
}

/// Horizontal convolution of every row of `src` (`in_w` RGB pixels per row) to `out_w` pixels.
fn horizontal_pass(src: &[u8], in_w: usize, taps: &Taps, out_w: usize) -> Vec<u8> {
    let rows = src.len() / (in_w * 3);
    let mut dst = vec![0u8; rows * out_w * 3];
    let fixed = taps.fixed();
    let ksize = taps.ksize;
    let work = rows * out_w * 3 * ksize;
    for_row_bands(&mut dst, out_w * 3, work, |first, band| {
        let src = &src[first * in_w * 3..];
        for (src_row, dst_row) in src
            .chunks_exact(in_w * 3)
            .zip(band.chunks_exact_mut(out_w * 3))
        {
            for (xx, out_px) in dst_row.chunks_exact_mut(3).enumerate() {
                let (xmin, count) = taps.bounds[xx];
                let k = &fixed[xx * ksize..xx * ksize + count];
                let window = &src_row[xmin * 3..(xmin + count) * 3];
                let (mut r, mut g, mut b) = (HALF, HALF, HALF);
                for (&w, px) in k.iter().zip(window.chunks_exact(3)) {
                    r += i32::from(px[0]) * w;
                    g += i32::from(px[1]) * w;
                    b += i32::from(px[2]) * w;
                }
                out_px[0] = clip8(r);
                out_px[1] = clip8(g);
                out_px[2] = clip8(b);
            }
        }
    });
    dst
}

/// Vertical convolution of `src` (rows of `width` RGB pixels) to `taps.bounds.len()` rows: each
/// output row is a weighted sum of consecutive input rows. Summing whole rows at a time keeps
/// the inner loop contiguous; integer addition makes the result identical to Pillow's
/// pixel-by-pixel order.
fn vertical_pass(src: &[u8], width: usize, taps: &Taps) -> Vec<u8> {
    let row_len = width * 3;
    let mut dst = vec![0u8; taps.bounds.len() * row_len];
    let fixed = taps.fixed();
    let ksize = taps.ksize;
    let work = dst.len() * ksize;
    for_row_bands(&mut dst, row_len, work, |first, band| {
        let mut acc = vec![0i32; row_len];
        for (i, dst_row) in band.chunks_exact_mut(row_len).enumerate() {
            let yy = first + i;
            let (ymin, count) = taps.bounds[yy];
            let k = &fixed[yy * ksize..yy * ksize + count];
            acc.fill(HALF);
            for (j, &w) in k.iter().enumerate() {
                let row = &src[(ymin + j) * row_len..(ymin + j + 1) * row_len];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += i32::from(v) * w;
                }
            }
            for (d, &a) in dst_row.iter_mut().zip(&acc) {
                *d = clip8(a);
            }
        }
    });
    dst
}

/// Pillow's C `COORD` macro: truncate towards zero, but anything negative maps to -1.
fn coord(v: f64) -> i64 {
    if v < 0.0 {
        -1
    } else {
        v as i64
    }
}

/// NEAREST as Pillow does it: `ImagingScaleAffine` with `a = [in/out, 0, 0, 0, in/out, 0]`.
/// The source coordinate starts at half a step and is advanced by repeated `f64` addition, so
/// rounding accumulates exactly as in Pillow; an index that falls outside the image leaves the
/// output pixel black (Pillow fills with 0), which repeated addition can in principle produce.
fn resize_nearest(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = image.dimensions();
    let step_x = f64::from(in_w as f32) / f64::from(width);
    let step_y = f64::from(in_h as f32) / f64::from(height);

    let mut xin = Vec::with_capacity(width as usize);
    let mut xo = 0.0 + step_x * 0.5;
    for _ in 0..width {
        let x = coord(xo);
        xin.push((0..i64::from(in_w)).contains(&x).then_some(x as usize));
        xo += step_x;
    }

    let src = image.as_raw();
    let row_len = in_w as usize * 3;
    let mut out = vec![0u8; width as usize * 3 * height as usize];
    let mut yo = 0.0 + step_y * 0.5;
    for dst_row in out.chunks_exact_mut(width as usize * 3) {
        let y = coord(yo);
        yo += step_y;
        if !(0..i64::from(in_h)).contains(&y) {
            continue;
        }
        let src_row = &src[y as usize * row_len..(y as usize + 1) * row_len];
        for (px, x) in dst_row.chunks_exact_mut(3).zip(&xin) {
            if let Some(x) = *x {
                px.copy_from_slice(&src_row[x * 3..x * 3 + 3]);
            }
        }
    }
    RgbImage::from_raw(width, height, out).expect("buffer size matches dimensions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_kernel_values() {
        // Keys' kernel with a = -0.5: 1 at 0, 0 at the integers, the classic quarter-point taps.
        assert_eq!(bicubic_kernel(0.0), 1.0);
        assert_eq!(bicubic_kernel(1.0), 0.0);
        assert_eq!(bicubic_kernel(-1.0), 0.0);
        assert_eq!(bicubic_kernel(2.0), 0.0);
        assert_eq!(bicubic_kernel(5.0), 0.0);
        // x = 0.5: (1.5 * 0.5 - 2.5) * 0.25 + 1 = 0.5625
        assert_eq!(bicubic_kernel(0.5), 0.5625);
        assert_eq!(bicubic_kernel(-0.5), 0.5625);
        // x = 1.5: ((1.5 - 5) * 1.5 + 8) * 1.5 - 4 = -0.125, times -0.5 ... = -0.0625
        assert_eq!(bicubic_kernel(1.5), -0.0625);
        // Partition of unity at any phase.
        for phase in [0.0, 0.1, 0.25, 0.5, 0.8] {
            let sum: f64 = (-2..=2).map(|i| bicubic_kernel(f64::from(i) + phase)).sum();
            assert!((sum - 1.0).abs() < 1e-12, "phase {phase}: {sum}");
        }
    }

    #[test]
    fn other_kernels() {
        assert_eq!(box_kernel(0.5), 1.0);
        assert_eq!(box_kernel(-0.5), 0.0);
        assert_eq!(bilinear_kernel(0.25), 0.75);
        assert_eq!(lanczos_kernel(0.0), 1.0);
        assert_eq!(lanczos_kernel(3.0), 0.0);
        assert!(lanczos_kernel(-3.0).abs() < 1e-15); // sin(-3 pi) is not exactly 0
        assert_eq!(hamming_kernel(0.0), 1.0);
        assert_eq!(hamming_kernel(1.0), 0.0);
        assert_eq!(
            Resample::from_pil_code(3).map(Resample::pil_code),
            Some(3),
            "code round trip"
        );
        for code in 0..6 {
            assert_eq!(
                i64::from(Resample::from_pil_code(code).unwrap().pil_code()),
                code
            );
        }
        assert_eq!(Resample::from_pil_code(6), None);
        assert_eq!(Resample::from_pil_code(-1), None);
    }

    #[test]
    fn fixed_point_rounds_half_away_from_zero() {
        let one = 1 << PRECISION_BITS;
        assert_eq!(to_fixed(1.0), one);
        assert_eq!(to_fixed(0.0), 0);
        assert_eq!(to_fixed(-0.0625), -(one / 16));
        // Exactly half a unit in the last place rounds away from zero on both sides.
        let half_ulp = 0.5 / f64::from(one);
        assert_eq!(to_fixed(half_ulp), 1);
        assert_eq!(to_fixed(-half_ulp), -1);
        assert_eq!(to_fixed(3.0 * half_ulp), 2);
        assert_eq!(to_fixed(-3.0 * half_ulp), -2);
        // Just below half rounds towards zero.
        assert_eq!(to_fixed(0.49 / f64::from(one)), 0);
        assert_eq!(to_fixed(-0.49 / f64::from(one)), 0);
    }

    #[test]
    fn taps_hand_computed_upscale_2x() {
        // 2 -> 4 bicubic: scale 0.5, support 2, ksize 5. Every window [c - 2.5, c + 2.5) is
        // clipped to the two input pixels (centres 0.5 and 1.5).
        let taps = Taps::new(2, 4, Resample::Bicubic);
        assert_eq!(taps.ksize, 5);
        assert_eq!(taps.bounds, vec![(0, 2), (0, 2), (0, 2), (0, 2)]);
        // Output 0, centre 0.25: distances 0.25 and 1.25.
        //   k(0.25) = (1.5 * 0.25 - 2.5) * 0.25^2 + 1 = 111/128
        //   k(1.25) = (((1.25 - 5) * 1.25 + 8) * 1.25 - 4) * -0.5 = -9/128
        // normalised by their sum 102/128: 111/102 and -9/102 (the edge tap overshoots 1).
        assert_eq!(taps.weights[0], 0.8671875 / 0.796875);
        assert_eq!(taps.weights[1], -0.0703125 / 0.796875);
        // 111/102 * 2^22 = 4564389.647 -> 4564390; -9/102 * 2^22 = -370085.647 -> -370086
        // (rounded away from zero, not towards +inf).
        let fixed = taps.fixed();
        assert_eq!(&fixed[..2], &[4564390, -370086]);
        // Output 1, centre 0.75: distances 0.25 and 0.75 -> 111/128 and 29/128, normalised
        // 111/140 and 29/140: 3325483.886 -> 3325484 and 868820.114 -> 868820.
        assert_eq!(&fixed[5..7], &[3325484, 868820]);
        // Mirror image at the other end.
        assert_eq!(&fixed[10..12], &[868820, 3325484]);
        assert_eq!(&fixed[15..17], &[-370086, 4564390]);
    }

    #[test]
    fn taps_downscale_widen_support() {
        // 10 -> 2 bicubic: scale 5, support 10, ksize 21; output 0 centred at 2.5 covers 0..10.
        let taps = Taps::new(10, 2, Resample::Bicubic);
        assert_eq!(taps.ksize, 21);
        assert_eq!(taps.bounds, vec![(0, 10), (0, 10)]);
        let sum: f64 = taps.weights[..10].iter().sum();
        assert!((sum - 1.0).abs() < 1e-12);
        // BOX with an integer ratio is an exact block mean.
        let b = Taps::new(6, 2, Resample::Box);
        assert_eq!(b.bounds, vec![(0, 3), (3, 3)]);
        assert!(b.weights[..3].iter().all(|&w| w == 1.0 / 3.0));
    }

    #[test]
    fn resize_constant_image_stays_constant() {
        let img = RgbImage::from_pixel(7, 5, image::Rgb([10, 200, 255]));
        for filter in [
            Resample::Nearest,
            Resample::Bilinear,
            Resample::Bicubic,
            Resample::Lanczos,
            Resample::Box,
            Resample::Hamming,
        ] {
            for (w, h) in [(1, 1), (3, 11), (40, 2), (7, 9)] {
                let out = resize(&img, w, h, filter);
                assert_eq!(out.dimensions(), (w, h));
                assert!(
                    out.pixels().all(|p| p.0 == [10, 200, 255]),
                    "{filter:?} {w}x{h}"
                );
            }
        }
    }

    #[test]
    fn resize_same_size_is_copy_and_zero_is_empty() {
        let img = RgbImage::from_fn(4, 3, |x, y| image::Rgb([x as u8 * 50, y as u8 * 80, 7]));
        assert_eq!(resize(&img, 4, 3, Resample::Lanczos), img);
        assert_eq!(resize(&img, 0, 3, Resample::Bicubic).dimensions(), (0, 3));
    }

    #[test]
    fn nearest_picks_centres() {
        let img = RgbImage::from_fn(4, 1, |x, _| image::Rgb([x as u8, 0, 0]));
        let out = resize(&img, 2, 1, Resample::Nearest);
        // Centres at 1.0 and 3.0 -> inputs 1 and 3.
        assert_eq!(out.get_pixel(0, 0).0[0], 1);
        assert_eq!(out.get_pixel(1, 0).0[0], 3);
        let up = resize(&img, 8, 1, Resample::Nearest);
        let xs: Vec<u8> = up.pixels().map(|p| p.0[0]).collect();
        assert_eq!(xs, vec![0, 0, 1, 1, 2, 2, 3, 3]);
    }
}
