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

/// BLIP's `pixel_values` for an RGB image: resize (if `cfg.do_resize`), rescale, normalise;
/// channel-first, `3 * height * width` values (the image's own size when not resizing).
pub fn pixel_values(image: &RgbImage, cfg: &PreprocessConfig) -> Vec<f32> {
    let resized;
    let image = if needs_resize(image, cfg) {
        resized = resize(image, cfg.width, cfg.height, cfg.resample);
        &resized
    } else {
        image
    };
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

/// The resize step of [`pixel_values`] alone, done as soon as an image is
/// decoded: the model needs `cfg`'s size (384 px for BLIP), and a batch of
/// full-size photos held until the model runs took gigabytes (24 images of
/// 177 KB: 4.9 GB at batch 8). [`pixel_values`] of the result is exactly
/// that of the original.
pub fn resized_for_model(image: RgbImage, cfg: &PreprocessConfig) -> RgbImage {
    if needs_resize(&image, cfg) {
        resize(&image, cfg.width, cfg.height, cfg.resample)
    } else {
        image
    }
}

fn needs_resize(image: &RgbImage, cfg: &PreprocessConfig) -> bool {
    cfg.do_resize && image.dimensions() != (cfg.width, cfg.height)
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
