//! What a decoder accepts before it allocates anything, and how it says
//! no: the options every decoder reads and the errors they all return.

/// How [`super::load_rgb8`] and [`super::decode_rgb8`] treat a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Rotate/flip according to the EXIF orientation tag, as `PIL.ImageOps.exif_transpose`
    /// (which transformers' `load_image` applies) and every photo viewer do.
    pub exif_rotate: bool,
    /// Refuse images with more pixels than this, before allocating them.
    pub max_pixels: u64,
}

/// Pillow's `Image.MAX_IMAGE_PIXELS` (89,478,485, about 0.25 GiB of RGBA) times two: above this
/// Pillow raises `DecompressionBombError` instead of merely warning.
pub const PILLOW_MAX_PIXELS: u64 = 2 * 89_478_485;

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            exif_rotate: true,
            max_pixels: PILLOW_MAX_PIXELS,
        }
    }
}

/// Why an image file could not be turned into pixels. The messages are short, one line, and do
/// not name the file: callers prefix the path.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be opened or read.
    #[error("cannot read file: {0}")]
    Io(#[source] std::io::Error),
    /// The file has no bytes at all.
    #[error("file is empty")]
    Empty,
    /// Not an image format we can decode (unrecognised content, or a format/feature the decoder
    /// does not support).
    #[error("{0}")]
    Unsupported(String),
    /// The format was recognised but the data is invalid or ends early.
    #[error("corrupt or truncated image: {0}")]
    Corrupt(String),
    /// The header announces more pixels than [`LoadOptions::max_pixels`].
    #[error("image is too large: {width}x{height} is more than the limit of {limit} pixels")]
    TooLarge { width: u32, height: u32, limit: u64 },
}

/// Refuses, from the header's dimensions alone, an image with no pixels or with
/// more than the limit (before anything image-sized is allocated).
pub(super) fn check_dimensions(
    width: u32,
    height: u32,
    opts: &LoadOptions,
) -> Result<(), ImageError> {
    if u64::from(width) * u64::from(height) > opts.max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            limit: opts.max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt(format!(
            "{width}x{height} image has no pixels"
        )));
    }
    Ok(())
}
