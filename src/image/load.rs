//! Decoding an image file into 8-bit RGB the way transformers' PIL backend sees it.
//!
//! transformers opens the file with Pillow and calls `convert_to_rgb`: images with an alpha band
//! (or a PNG/GIF transparency entry) are alpha-composited over opaque white with Pillow's integer
//! arithmetic, everything else goes through `image.convert("RGB")`. We decode JPEG with
//! libjpeg-turbo's C code, as Pillow does, and get its pixels bit for bit (see `jpeg.rs`); every
//! other format with the `image` crate, reproducing Pillow's conversion per pixel format; see
//! [`to_rgb8`] for the details and the one deliberate deviation (16-bit grayscale).

use std::io::{BufRead, BufReader, Cursor, Seek};
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use super::limits::{check_dimensions, ImageError, LoadOptions};
use crate::load::regular_file;

const SUPPORTED: &str = "JPEG, PNG, WebP, GIF, BMP, TIFF, PNM, TGA, ICO, QOI, HDR";

/// Open, decode and convert an image file to 8-bit RGB (see the module docs).
///
/// The format is recognised from the file's first bytes, not from its name; the extension is
/// only used for TGA, the one supported format without a signature. Only regular files are
/// opened: a named pipe, a socket or a device is refused ("not a regular file") without being
/// waited on (see [`crate::load::regular_file`]).
pub fn load_rgb8(path: &Path, opts: &LoadOptions) -> Result<RgbImage, ImageError> {
    let (file, meta) = regular_file::open(path).map_err(ImageError::Io)?;
    if meta.len() == 0 {
        return Err(ImageError::Empty);
    }
    let is_tga = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("tga"));
    decode_reader(BufReader::new(file), None, is_tga, opts)
}

/// Like [`load_rgb8`], from the bytes of an image file held in memory.
pub fn decode_rgb8(bytes: &[u8], opts: &LoadOptions) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    decode_reader(Cursor::new(bytes), Some(bytes), false, opts)
}

/// `whole`: the complete file when the caller already holds it in memory.
fn decode_reader<R: BufRead + Seek>(
    reader: R,
    whole: Option<&[u8]>,
    is_tga: bool,
    opts: &LoadOptions,
) -> Result<RgbImage, ImageError> {
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(ImageError::Io)?;
    match reader.format() {
        // Decoded from memory: libjpeg (Pillow's decoder, bit for bit; see
        // `jpeg.rs`), and PNGs without an end chunk or inside an icon, which
        // Pillow reads and the `image` crate needs help with (`lenient.rs`).
        Some(format @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Ico)) => {
            let bytes = match whole {
                Some(bytes) => std::borrow::Cow::Borrowed(bytes),
                None => {
                    let mut buf = Vec::new();
                    reader
                        .into_inner()
                        .read_to_end(&mut buf)
                        .map_err(ImageError::Io)?;
                    std::borrow::Cow::Owned(buf)
                }
            };
            return match format {
                ImageFormat::Jpeg => super::jpeg::decode(&bytes, opts),
                ImageFormat::Png => decode_png(&bytes, opts),
                _ => match super::lenient::largest_png_icon(&bytes)? {
                    Some(png) => decode_png(png, opts),
                    None => decode_with(
                        ImageReader::with_format(Cursor::new(&bytes[..]), format),
                        opts,
                    ),
                },
            };
        }
        Some(_) => {}
        // TGA files have no magic number; trust the extension for them only.
        None if is_tga => reader.set_format(ImageFormat::Tga),
        None => {
            return Err(ImageError::Unsupported(format!(
                "not a recognised image format (supported: {SUPPORTED})"
            )))
        }
    }
    decode_with(reader, opts)
}

/// A PNG, or one whose end chunk is missing (as Pillow reads it).
fn decode_png(bytes: &[u8], opts: &LoadOptions) -> Result<RgbImage, ImageError> {
    let png = |bytes| {
        decode_with(
            ImageReader::with_format(Cursor::new(bytes), ImageFormat::Png),
            opts,
        )
    };
    match png(bytes) {
        Err(ImageError::Corrupt(reason)) => match super::lenient::with_end_chunk(bytes) {
            Some(ended) => png(&ended),
            None => Err(ImageError::Corrupt(reason)),
        },
        decoded => decoded,
    }
}

fn decode_with<R: BufRead + Seek>(
    reader: ImageReader<R>,
    opts: &LoadOptions,
) -> Result<RgbImage, ImageError> {
    // Opening the decoder reads only the header; nothing image-sized is allocated yet.
    let mut decoder = reader.into_decoder().map_err(from_image_error)?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, opts)?;
    // A malformed EXIF block should not make a good picture unreadable (Pillow's exif_transpose
    // is just as forgiving), so orientation errors mean "no transform".
    let orientation = if opts.exif_rotate {
        decoder
            .orientation()
            .unwrap_or(image::metadata::Orientation::NoTransforms)
    } else {
        image::metadata::Orientation::NoTransforms
    };
    let mut image = DynamicImage::from_decoder(decoder).map_err(from_image_error)?;
    image.apply_orientation(orientation);
    Ok(to_rgb8(image))
}

/// Map the `image` crate's error to ours. Reads in decoders come from a file we opened or from
/// memory, so an unexpected end of input means a truncated file, not an I/O failure.
fn from_image_error(err: image::ImageError) -> ImageError {
    use image::ImageError as E;
    match err {
        E::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::Corrupt("file ends too early".into())
        }
        E::IoError(e) => ImageError::Io(e),
        E::Unsupported(e) => ImageError::Unsupported(format!("unsupported image: {e}")),
        E::Decoding(e) => ImageError::Corrupt(e.to_string()),
        // Limits are only hit by decoders' own internal allocations (we check the pixel count
        // ourselves); parameter/encoding errors cannot happen while decoding a valid stream.
        e @ (E::Limits(_) | E::Parameter(_) | E::Encoding(_)) => ImageError::Corrupt(e.to_string()),
    }
}

/// Pillow's `PIL.Image.alpha_composite(dst, src)` for one channel, in its integer arithmetic
/// (`libImaging/AlphaComposite.c`): 7 extra bits of precision and `(x + (x >> 8)) >> 8` as a
/// rounded division by 255. Returns (colour, alpha).
pub(crate) fn alpha_composite(dst: u8, dst_a: u8, src: u8, src_a: u8) -> (u8, u8) {
    const BITS: u32 = 7;
    fn div255(x: u32) -> u32 {
        ((x >> 8) + x) >> 8
    }
    if src_a == 0 {
        return (dst, dst_a);
    }
    let (dst, dst_a, src, src_a) = (
        u32::from(dst),
        u32::from(dst_a),
        u32::from(src),
        u32::from(src_a),
    );
    let blend = dst_a * (255 - src_a);
    let out_a255 = src_a * 255 + blend;
    let coef1 = src_a * 255 * 255 * (1 << BITS) / out_a255;
    let coef2 = 255 * (1 << BITS) - coef1;
    let c = div255(src * coef1 + dst * coef2 + (0x80 << BITS)) >> BITS;
    let a = div255(out_a255 + 0x80);
    (c as u8, a as u8)
}

/// One channel of an image with alpha composited over opaque white, as transformers'
/// `convert_to_rgb` does: `alpha_composite(white, image.convert("RGBA")).convert("RGB")`.
#[inline]
pub(crate) fn over_white(c: u8, a: u8) -> u8 {
    alpha_composite(255, 255, c, a).0
}

/// 16-bit to 8-bit by taking the high byte, which is what Pillow does when it reads 16-bit
/// RGB(A) and gray+alpha PNGs (raw modes `RGB;16B`, `RGBA;16B`, `LA;16B`).
#[inline]
fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

/// 16-bit to 8-bit with rounding, `round(v / 257)`. Used for 16-bit grayscale, see [`to_rgb8`].
#[inline]
pub(crate) fn scale16_round(v: u16) -> u8 {
    ((u32::from(v) + 128) / 257) as u8
}

/// Convert a decoded image to 8-bit RGB the way transformers' PIL backend does.
///
/// * RGB: unchanged. Gray: replicated (`convert("RGB")` of `L`).
/// * Anything with alpha (RGBA, gray+alpha, and palette/gray/RGB PNGs with a `tRNS` chunk, which
///   the `image` crate expands to an alpha channel just as Pillow's `convert("RGBA")` does):
///   composited over white with [`alpha_composite`].
/// * 16-bit RGB, RGBA and gray+alpha: the high byte of each sample, as Pillow reads them.
/// * 16-bit grayscale: **deliberate deviation.** Pillow 13 opens it as mode `I;16` and
///   `convert("RGB")` *clips* at 255 (every value above 255 becomes white), which turns almost
///   any real 16-bit picture into a white page. We scale with rounding, `round(v / 257)`.
/// * Float (HDR) images: the `image` crate's clamped conversion (Pillow cannot open these).
pub fn to_rgb8(image: DynamicImage) -> RgbImage {
    use DynamicImage as D;
    let (w, h) = (image.width(), image.height());
    let gray = |f: &dyn Fn(usize) -> u8, n: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(n * 3);
        for i in 0..n {
            let v = f(i);
            out.extend_from_slice(&[v, v, v]);
        }
        out
    };
    let n = w as usize * h as usize;
    let raw = match image {
        D::ImageRgb8(img) => return img,
        D::ImageLuma8(img) => {
            let s = img.as_raw();
            gray(&|i| s[i], n)
        }
        D::ImageLumaA8(img) => {
            let s = img.as_raw();
            gray(&|i| over_white(s[2 * i], s[2 * i + 1]), n)
        }
        D::ImageRgba8(img) => composite_rgba(img.as_raw(), |v| v),
        D::ImageLuma16(img) => {
            let s = img.as_raw();
            gray(&|i| scale16_round(s[i]), n)
        }
        D::ImageLumaA16(img) => {
            let s = img.as_raw();
            gray(
                &|i| over_white(high_byte(s[2 * i]), high_byte(s[2 * i + 1])),
                n,
            )
        }
        D::ImageRgb16(img) => img.as_raw().iter().map(|&v| high_byte(v)).collect(),
        D::ImageRgba16(img) => composite_rgba(img.as_raw(), high_byte),
        other if other.color().has_alpha() => composite_rgba(other.to_rgba8().as_raw(), |v| v),
        other => return other.to_rgb8(),
    };
    RgbImage::from_raw(w, h, raw).expect("buffer size matches dimensions")
}

fn composite_rgba<T: Copy>(samples: &[T], to8: impl Fn(T) -> u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(samples.len() / 4 * 3);
    for px in samples.chunks_exact(4) {
        let a = to8(px[3]);
        for &c in &px[..3] {
            out.push(over_white(to8(c), a));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::PILLOW_MAX_PIXELS;

    #[test]
    fn alpha_composite_over_white_hand_cases() {
        // Transparent -> the background, opaque -> the source.
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(0, 255), 0);
        assert_eq!(over_white(77, 255), 77);
        // Black at alpha 128 over white: coef1 = 128 * 128 = 16384, coef2 = 127 * 128 = 16256;
        // (255 * 16256 + 16384) = 4161664; div255 -> (16256 + 4161664) >> 8 = 16320; >> 7 = 127.
        assert_eq!(over_white(0, 128), 127);
        // 100 at alpha 1: (100 * 128 + 255 * 32512 + 16384) = 8319744 -> 254.
        assert_eq!(over_white(100, 1), 254);
        // General form: alpha of the result over an opaque background stays opaque.
        assert_eq!(alpha_composite(10, 255, 200, 100).1, 255);
        // Half-transparent over half-transparent: a = 128 + 128 * 127 / 255 = 191.75 -> 192.
        assert_eq!(alpha_composite(0, 128, 0, 128).1, 192);
    }

    #[test]
    fn alpha_composite_over_white_is_rounded_blend() {
        // With an opaque white background Pillow's fixed-point formula equals the exactly
        // rounded blend round((c * a + 255 * (255 - a)) / 255), for every input.
        for a in 0..=255u32 {
            for c in 0..=255u32 {
                let num = c * a + 255 * (255 - a);
                let expected = (2 * num + 255) / 510; // round half up; ties cannot occur
                assert_eq!(
                    u32::from(over_white(c as u8, a as u8)),
                    expected,
                    "c={c} a={a}"
                );
            }
        }
    }

    #[test]
    fn sixteen_bit_reductions() {
        assert_eq!(high_byte(0x12ff), 0x12);
        assert_eq!(scale16_round(0), 0);
        assert_eq!(scale16_round(128), 0);
        assert_eq!(scale16_round(129), 1);
        assert_eq!(scale16_round(65535), 255);
        assert_eq!(scale16_round(257 * 100), 100);
    }

    #[test]
    fn conversions() {
        let la = DynamicImage::ImageLumaA8(
            image::GrayAlphaImage::from_raw(2, 1, vec![0, 0, 50, 255]).unwrap(),
        );
        assert_eq!(to_rgb8(la).into_raw(), vec![255, 255, 255, 50, 50, 50]);
        let l16 = DynamicImage::ImageLuma16(
            image::ImageBuffer::from_raw(2, 1, vec![1000u16, 65535]).unwrap(),
        );
        assert_eq!(to_rgb8(l16).into_raw(), vec![4, 4, 4, 255, 255, 255]);
        let rgb16 = DynamicImage::ImageRgb16(
            image::ImageBuffer::from_raw(1, 1, vec![0x01ffu16, 0x8000, 0xff00]).unwrap(),
        );
        assert_eq!(to_rgb8(rgb16).into_raw(), vec![1, 0x80, 0xff]);
    }

    #[test]
    fn error_messages_are_one_line_without_path() {
        let e = ImageError::TooLarge {
            width: 100000,
            height: 100000,
            limit: PILLOW_MAX_PIXELS,
        };
        assert_eq!(
            e.to_string(),
            "image is too large: 100000x100000 is more than the limit of 178956970 pixels"
        );
        assert_eq!(ImageError::Empty.to_string(), "file is empty");
    }

    /// A named pipe nobody writes to used to block the open for ever (and with
    /// it the whole batch): it is refused from its metadata instead.
    #[cfg(unix)]
    #[test]
    fn a_named_pipe_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.png");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(load_rgb8(&fifo, &LoadOptions::default()).map(|_| ()));
        });
        // The blocked thread, if any, dies with the test process.
        let result = result
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("loading a named pipe blocked");
        let err = result.unwrap_err().to_string();
        assert_eq!(err, "cannot read file: not a regular file");
    }
}
