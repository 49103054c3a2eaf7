//! Image loading and BLIP preprocessing, matching transformers' `BlipImageProcessorPil`.
//!
//! transformers 5.x (PIL backend) turns an image file into `pixel_values` as follows, and so do we:
//!
//! 1. `convert_to_rgb`: composite anything with transparency over white, otherwise
//!    `convert("RGB")` ([`load_rgb8`], [`decode_rgb8`]).
//! 2. `PIL.Image.resize((width, height), resample)` on the 8-bit RGB image, bit-exact
//!    ([`resize`]).
//! 3. Rescale: `uint8 -> float64 * rescale_factor -> float32`.
//! 4. Normalise in float32: `(x - mean) / std` per channel.
//!
//! The result is channel-first `[3, height, width]` ([`pixel_values`]). JPEG files are decoded
//! with libjpeg-turbo's own C code, as Pillow decodes them, so they too give Pillow's pixels bit
//! for bit. The only inputs on which we knowingly differ from Pillow are 16-bit grayscale images
//! (Pillow clips them at 255; we scale them, see [`load::to_rgb8`]).

mod config;
mod jpeg;
mod lenient;
mod limits;
mod load;
mod resample;

pub use config::{PreprocessConfig, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};
pub use limits::{ImageError, LoadOptions, PILLOW_MAX_PIXELS};
pub use load::{decode_rgb8, load_rgb8, to_rgb8};
pub use resample::{resize, Resample};

use ::image::RgbImage;

/// The `pixel_values` of an RGB image: resize (if `cfg.do_resize`), center-crop (if
/// `cfg.crop_size`), rescale, normalise; channel-first, `3 * height * width` values (the
/// image's own size when it is neither resized nor cropped).
pub fn pixel_values(image: &RgbImage, cfg: &PreprocessConfig) -> Vec<f32> {
    let prepared = prepared(image, cfg);
    let image = prepared.as_ref();
    // The value only depends on the byte and the channel, so tabulate the 3 x 256 outcomes of
    // exactly the float operations transformers performs and look them up.
    let lut = value_table(cfg);
    let plane = image.width() as usize * image.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (((px, r), g), b) in image
        .as_raw()
        .chunks_exact(3)
        .zip(r.iter_mut())
        .zip(g.iter_mut())
        .zip(b.iter_mut())
    {
        *r = lut[0][usize::from(px[0])];
        *g = lut[1][usize::from(px[1])];
        *b = lut[2][usize::from(px[2])];
    }
    out
}

/// The resize and crop steps of [`pixel_values`] alone, done as soon as an image is decoded:
/// the model needs `cfg`'s size (384 px for BLIP, 224 for CLIP), and a batch of full-size
/// photos held until the model runs took gigabytes (24 images of 177 KB: 4.9 GB at batch 8).
/// [`pixel_values`] of the result is exactly that of the original: where that would not hold
/// (a config that resizes a shorter side past its crop, so a prepared image would be resized
/// again), the image is returned as it is.
pub fn resized_for_model(image: RgbImage, cfg: &PreprocessConfig) -> RgbImage {
    if !preparing_is_idempotent(cfg) {
        return image;
    }
    match prepared(&image, cfg) {
        std::borrow::Cow::Borrowed(_) => image,
        std::borrow::Cow::Owned(prepared) => prepared,
    }
}

/// Whether preparing a prepared image changes nothing: an exact resize (Pillow returns a copy
/// when the size is already right), or a shortest-edge resize to the crop's shorter side.
fn preparing_is_idempotent(cfg: &PreprocessConfig) -> bool {
    match (cfg.do_resize, cfg.shortest_edge, cfg.crop_size) {
        (true, Some(edge), Some((h, w))) => edge == h.min(w),
        (true, None, Some((h, w))) => (cfg.height, cfg.width) == (h, w),
        _ => true,
    }
}

/// `image` resized and cropped as `cfg` says, borrowed where neither changes it.
fn prepared<'a>(image: &'a RgbImage, cfg: &PreprocessConfig) -> std::borrow::Cow<'a, RgbImage> {
    use std::borrow::Cow;
    let mut out = Cow::Borrowed(image);
    if cfg.do_resize {
        let (height, width) = resize_target(image.dimensions(), cfg);
        if (width, height) != image.dimensions() {
            out = Cow::Owned(resize(image, width, height, cfg.resample));
        }
    }
    if let Some((height, width)) = cfg.crop_size {
        if (width, height) != out.dimensions() {
            out = Cow::Owned(center_crop(&out, height, width));
        }
    }
    out
}

/// `(height, width)` of the resize: the exact size, or transformers'
/// `get_resize_output_image_size` for a shortest edge (the longer side scaled in floating
/// point and truncated, as Python's `int(size * long / short)`).
fn resize_target((width, height): (u32, u32), cfg: &PreprocessConfig) -> (u32, u32) {
    let Some(edge) = cfg.shortest_edge else {
        return (cfg.height, cfg.width);
    };
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // Python divides the exact integer product by `short`, one rounding: so does this, for
    // every product below 2^53.
    let new_long = (f64::from(edge) * f64::from(long) / f64::from(short.max(1))) as u32;
    if width <= height {
        (new_long, edge)
    } else {
        (edge, new_long)
    }
}

/// transformers' `center_crop` on the 8-bit image: the central `height` x `width`, with the
/// offset rounded down, and zero (black) padding around an image smaller than the crop.
pub fn center_crop(image: &RgbImage, height: u32, width: u32) -> RgbImage {
    let (in_w, in_h) = (i64::from(image.width()), i64::from(image.height()));
    let (h, w) = (i64::from(height), i64::from(width));
    // Python's floor division, also for a negative difference.
    let top = (in_h - h).div_euclid(2);
    let left = (in_w - w).div_euclid(2);
    // Where the image is smaller than the crop, transformers pads it first by
    // ceil((new - old) / 2) before, then crops the padded image at the shifted offsets.
    let pad_top = (h.max(in_h) - in_h + 1) / 2;
    let pad_left = (w.max(in_w) - in_w + 1) / 2;
    let (top, left) = (top + pad_top, left + pad_left);
    RgbImage::from_fn(width, height, |x, y| {
        let (sy, sx) = (top + i64::from(y) - pad_top, left + i64::from(x) - pad_left);
        if (0..in_h).contains(&sy) && (0..in_w).contains(&sx) {
            *image.get_pixel(sx as u32, sy as u32)
        } else {
            ::image::Rgb([0, 0, 0])
        }
    })
}

/// `value_table(cfg)[c][v]` is what transformers makes of byte `v` in channel `c`.
fn value_table(cfg: &PreprocessConfig) -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, out) in table.iter_mut().enumerate() {
            *out = pixel_value(v as u8, c, cfg);
        }
    }
    lut
}

/// One sample through steps 3 and 4.
fn pixel_value(v: u8, channel: usize, cfg: &PreprocessConfig) -> f32 {
    // `image.astype(np.float64) * scale`, then `.astype(np.float32)`: one rounding, at the end.
    // Without rescaling, normalize() casts the uint8 image to float32 itself.
    let mut x = if cfg.do_rescale {
        (f64::from(v) * cfg.rescale_factor) as f32
    } else {
        f32::from(v)
    };
    if cfg.do_normalize {
        // float32 arithmetic with float32 mean/std; a true division, not a reciprocal multiply.
        x = (x - cfg.image_mean[channel]) / cfg.image_std[channel];
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_value_matches_numpy_float_steps() {
        let cfg = PreprocessConfig::default();
        // 255 / 255 = 1.0 exactly; (1 - 0.48145466f32) / 0.26862954f32 in f32.
        let expected = (1.0f32 - 0.481_454_66_f32) / 0.268_629_54_f32;
        assert_eq!(pixel_value(255, 0, &cfg), expected);
        // transformers' OPENAI_CLIP_MEAN/STD as written there, parsed to f32.
        let f = |s: &str| s.parse::<f32>().unwrap();
        assert_eq!(
            pixel_value(0, 2, &cfg),
            (0.0f32 - f("0.40821073")) / f("0.27577711")
        );
        // Rescale rounds once, after the f64 multiplication.
        let x = (3.0f64 / 255.0) as f32;
        assert_eq!(
            pixel_value(3, 1, &cfg),
            (x - f("0.4578275")) / f("0.26130258")
        );
        let raw = PreprocessConfig {
            do_rescale: false,
            do_normalize: false,
            ..PreprocessConfig::default()
        };
        assert_eq!(pixel_value(200, 0, &raw), 200.0);
    }

    #[test]
    fn shortest_edge_targets_truncate_the_longer_side_as_python_does() {
        let cfg = PreprocessConfig::clip_default();
        // int(224 * 640 / 480) = int(298.67) = 298; (height, width).
        assert_eq!(resize_target((640, 480), &cfg), (224, 298));
        assert_eq!(resize_target((480, 640), &cfg), (298, 224));
        assert_eq!(resize_target((1, 1000), &cfg), (224_000, 224));
        assert_eq!(resize_target((300, 300), &cfg), (224, 224));
    }

    #[test]
    fn center_crop_floors_the_offset_and_pads_small_images_with_black() {
        let img = RgbImage::from_fn(5, 4, |x, y| ::image::Rgb([x as u8, y as u8, 7]));
        // top = (4 - 3) // 2 = 0, left = (5 - 2) // 2 = 1.
        let crop = center_crop(&img, 3, 2);
        assert_eq!(crop.dimensions(), (2, 3));
        assert_eq!(crop.get_pixel(0, 0).0, [1, 0, 7]);
        assert_eq!(crop.get_pixel(1, 2).0, [2, 2, 7]);
        // Larger than the image: padded by ceil(diff / 2) before, the rest after.
        let padded = center_crop(&img, 7, 8);
        assert_eq!(padded.dimensions(), (8, 7));
        assert_eq!(padded.get_pixel(1, 1).0, [0, 0, 0]);
        assert_eq!(padded.get_pixel(2, 2).0, [0, 0, 7]);
        assert_eq!(padded.get_pixel(6, 5).0, [4, 3, 7]);
        assert_eq!(padded.get_pixel(7, 6).0, [0, 0, 0]);
    }

    #[test]
    fn prepared_images_prepare_to_themselves() {
        let img = RgbImage::from_fn(90, 60, |x, y| ::image::Rgb([x as u8, y as u8, 3]));
        let cfg = PreprocessConfig {
            shortest_edge: Some(32),
            crop_size: Some((30, 30)),
            ..PreprocessConfig::clip_default()
        };
        // 32 > 30: a prepared image would be resized again, so it is not prepared early.
        assert_eq!(resized_for_model(img.clone(), &cfg).dimensions(), (90, 60));
        let cfg = PreprocessConfig::clip_default();
        let early = resized_for_model(img.clone(), &cfg);
        assert_eq!(early.dimensions(), (224, 224));
        assert_eq!(pixel_values(&early, &cfg), pixel_values(&img, &cfg));
    }

    #[test]
    fn pixel_values_layout_is_chw() {
        let img = RgbImage::from_fn(3, 2, |x, y| ::image::Rgb([x as u8, y as u8, 100]));
        let cfg = PreprocessConfig {
            do_resize: false,
            do_rescale: false,
            do_normalize: false,
            ..PreprocessConfig::default()
        };
        let v = pixel_values(&img, &cfg);
        assert_eq!(v.len(), 18);
        assert_eq!(&v[..6], &[0.0, 1.0, 2.0, 0.0, 1.0, 2.0]); // R plane = x
        assert_eq!(&v[6..12], &[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]); // G plane = y
        assert!(v[12..].iter().all(|&b| b == 100.0));
        let resized = pixel_values(&img, &PreprocessConfig::default());
        assert_eq!(resized.len(), 3 * 384 * 384);
    }
}
