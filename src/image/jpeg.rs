//! JPEG decoding that gives the same pixels as Pillow, bit for bit.
//!
//! Pillow decodes JPEG with libjpeg-turbo (3.2 in Pillow 13's wheels) at its default settings:
//! the accurate integer IDCT (`JDCT_ISLOW`), "fancy" (triangle-filter) chroma upsampling, no
//! DCT scaling. Rust decoders round differently (zune-jpeg, which the `image` crate uses, is 1-4
//! levels off on 14-22% of the samples of an ordinary 4:2:0 photo), so we run libjpeg-turbo's
//! own C decoder, as vendored by the `mozjpeg-sys` crate (mozjpeg 4 is libjpeg-turbo with a
//! different encoder; its decoder, colour conversion and upsampling are libjpeg-turbo's), built
//! without SIMD (libjpeg-turbo's SIMD code is bit-exact with its C code by design).
//!
//! What Pillow asks libjpeg for, and so do we: 1-component files as grayscale (then
//! `convert("RGB")` replicates the value), 3-component files as RGB (libjpeg converts YCbCr, or
//! passes Adobe/RGB-tagged files through), 4-component files as CMYK (libjpeg converts YCCK to
//! CMYK); Pillow then assumes Adobe's inverted CMYK (raw mode `CMYK;I`) and converts to RGB with
//! its own integer formula ([`cmyk_inverted_to_rgb`]). Arithmetic-coded files are supported, as
//! in libjpeg-turbo's default build.
//!
//! Errors: libjpeg reports fatal errors through `error_exit`, whose default calls `exit()`. Ours
//! unwinds instead (`resume_unwind`, which skips the panic hook, so nothing is printed) through
//! the C frames (compiled with `-fexceptions` by mozjpeg-sys's `unwinding` feature) to a
//! `catch_unwind` around every libjpeg call, and the decompressor is then destroyed as after a
//! `longjmp`. This needs the default `panic = "unwind"`. libjpeg's warnings are ignored, as
//! Pillow ignores them (corrupt entropy data decodes to *something*), except "premature end of
//! JPEG file": the data ran out, which Pillow reports as a truncated file, and so do we.

use std::os::raw::c_int;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use image::metadata::Orientation;
use image::{DynamicImage, RgbImage};
use mozjpeg_sys as ffi;

use super::limits::{check_dimensions, ImageError, LoadOptions};

/// Decode a whole JPEG file held in memory to 8-bit RGB, as Pillow's `convert("RGB")` would
/// (rotated per its EXIF orientation if `opts.exif_rotate`).
pub(crate) fn decode(bytes: &[u8], opts: &LoadOptions) -> Result<RgbImage, ImageError> {
    let mut decompressor = Decompressor::new();
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `decompressor` was created by `jpeg_create_decompress` and is used by this
        // thread only; `bytes` outlives it (the source manager only reads from it).
        unsafe { decode_unwinding(&mut decompressor.cinfo, bytes, opts) }
    }));
    drop(decompressor);
    match result {
        Ok(decoded) => decoded,
        Err(payload) => match payload.downcast::<LibjpegError>() {
            Ok(err) => Err(err.into_image_error()),
            // Not ours (a bug on the Rust side): keep unwinding.
            Err(other) => resume_unwind(other),
        },
    }
}

/// A fatal libjpeg error, carried by the unwinding started in [`error_exit`].
struct LibjpegError {
    code: c_int,
    /// The first integer parameter of the message (e.g. the precision in `JERR_BAD_PRECISION`).
    param: c_int,
    message: String,
}

impl LibjpegError {
    fn into_image_error(self) -> ImageError {
        let unsupported = match self.code {
            // 12- and 16-bit samples (Pillow refuses them too); any other precision is garbage.
            ffi::JERR_BAD_PRECISION => matches!(self.param, 12 | 16),
            // Lossless and hierarchical JPEG.
            ffi::JERR_SOF_UNSUPPORTED | ffi::JERR_NOT_COMPILED | ffi::JERR_ARITH_NOTIMPL => true,
            _ => false,
        };
        if unsupported {
            ImageError::Unsupported(format!("unsupported JPEG: {}", self.message))
        } else {
            ImageError::Corrupt(self.message)
        }
    }
}

/// libjpeg's formatted message for the error or warning it is reporting.
///
/// # Safety
/// `cinfo.err` must point to a live error manager set up by `jpeg_std_error`.
unsafe fn current_error(cinfo: &mut ffi::jpeg_common_struct) -> LibjpegError {
    let err = &*cinfo.err;
    // `msg_parm` is a C union whose integer view is `int i[8]`.
    let (code, param) = (err.msg_code, err.msg_parm._bindgen_data_[0] as c_int);
    let mut buffer = [0u8; 80]; // JMSG_LENGTH_MAX
    if let Some(format_message) = err.format_message {
        // The binding declares the buffer as `&[u8; 80]`, but libjpeg writes into it.
        let format_message: unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, *mut u8) =
            std::mem::transmute(format_message);
        format_message(cinfo, buffer.as_mut_ptr());
    }
    let len = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    let mut message = String::from_utf8_lossy(&buffer[..len]).into_owned();
    if message.is_empty() {
        message = format!("libjpeg error {code}");
    }
    LibjpegError {
        code,
        param,
        message,
    }
}

extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    // SAFETY: libjpeg calls this with the struct whose `err` we installed.
    let err = unsafe { current_error(cinfo) };
    resume_unwind(Box::new(err))
}

extern "C-unwind" fn emit_message(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
    if level >= 0 {
        return; // trace messages
    }
    // SAFETY: as in `error_exit`.
    let err = unsafe { &mut *cinfo.err };
    if err.msg_code == ffi::JWRN_JPEG_EOF {
        error_exit(cinfo);
    }
    err.num_warnings += 1;
}

/// A libjpeg decompressor and its error manager, destroyed on drop. Both are boxed: libjpeg
/// keeps pointers to them.
struct Decompressor {
    cinfo: Box<ffi::jpeg_decompress_struct>,
    _err: Box<ffi::jpeg_error_mgr>,
}

impl Decompressor {
    fn new() -> Self {
        // SAFETY: both structs are plain C data for which all-zeroes is a valid starting state;
        // `jpeg_std_error` fills in the error manager and `jpeg_create_decompress` the rest. It
        // can only fail on a library/struct version mismatch or out of memory, which would call
        // our `error_exit`; it is outside `catch_unwind`, so such a bug would panic.
        unsafe {
            let mut err: Box<ffi::jpeg_error_mgr> = Box::new(std::mem::zeroed());
            ffi::jpeg_std_error(&mut err);
            err.error_exit = Some(error_exit);
            err.emit_message = Some(emit_message);
            let mut cinfo: Box<ffi::jpeg_decompress_struct> = Box::new(std::mem::zeroed());
            cinfo.common.err = &mut *err;
            ffi::jpeg_create_decompress(&mut *cinfo);
            Decompressor { cinfo, _err: err }
        }
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: created by `jpeg_create_decompress`; destroying is valid in any state,
        // including after an error unwound out of the middle of a call.
        unsafe { ffi::jpeg_destroy_decompress(&mut self.cinfo) }
    }
}

/// The marker code of APP1, where EXIF lives.
const APP1: u8 = 0xE1;

/// Everything that calls into libjpeg; libjpeg errors unwind out of it (see the module docs).
unsafe fn decode_unwinding(
    cinfo: &mut ffi::jpeg_decompress_struct,
    bytes: &[u8],
    opts: &LoadOptions,
) -> Result<RgbImage, ImageError> {
    ffi::jpeg_mem_src(cinfo, bytes.as_ptr(), bytes.len() as _);
    // Keep APP1 segments for the EXIF orientation.
    ffi::jpeg_save_markers(cinfo, c_int::from(APP1), 0xFFFF);
    // Reads up to the first scan; nothing image-sized is allocated yet.
    ffi::jpeg_read_header(cinfo, 1);
    let (width, height) = (cinfo.image_width, cinfo.image_height);
    check_dimensions(width, height, opts)?;
    if jpeg_is_truncated(bytes) {
        return Err(ImageError::Corrupt(
            "JPEG data ends before its end-of-image marker (truncated file)".into(),
        ));
    }
    let components = cinfo.num_components;
    cinfo.out_color_space = match components {
        1 => ffi::JCS_GRAYSCALE,
        3 => ffi::JCS_RGB,
        4 => ffi::JCS_CMYK,
        n => {
            return Err(ImageError::Unsupported(format!(
                "unsupported JPEG: {n} colour components"
            )))
        }
    };
    // libjpeg's defaults, which are what Pillow decodes with; set explicitly because the parity
    // depends on them.
    cinfo.dct_method = ffi::J_DCT_METHOD::JDCT_ISLOW;
    cinfo.do_fancy_upsampling = 1;
    cinfo.do_block_smoothing = 1;
    cinfo.scale_num = 1;
    cinfo.scale_denom = 1;
    let orientation = if opts.exif_rotate {
        exif_orientation(cinfo)
    } else {
        Orientation::NoTransforms
    };

    ffi::jpeg_start_decompress(cinfo);
    let (w, h) = (cinfo.output_width as usize, cinfo.output_height as usize);
    let channels = cinfo.output_components as usize;
    assert_eq!(
        (w, h, channels),
        (width as usize, height as usize, components as usize)
    );
    // Decode into a buffer large enough for the RGB result and convert in place.
    let stride = w * channels;
    let mut data = vec![0u8; w * h * channels.max(3)];
    let base = data.as_mut_ptr();
    let mut rows: Vec<*mut u8> = (0..h).map(|row| base.add(row * stride)).collect();
    while (cinfo.output_scanline as usize) < h {
        let y = cinfo.output_scanline as usize;
        // libjpeg writes at most `h - y` rows, each `stride` bytes, inside `data`.
        let read = ffi::jpeg_read_scanlines(cinfo, rows.as_mut_ptr().add(y), (h - y) as _);
        if read == 0 {
            // Cannot happen with an in-memory source (it never suspends); do not spin.
            return Err(ImageError::Corrupt("JPEG decoder made no progress".into()));
        }
    }
    ffi::jpeg_finish_decompress(cinfo);
    drop(rows);

    match channels {
        1 => gray_to_rgb_in_place(&mut data, w * h),
        4 => {
            cmyk_inverted_to_rgb_in_place(&mut data, w * h);
            data.shrink_to_fit();
        }
        _ => {}
    }
    let rgb = RgbImage::from_raw(width, height, data).expect("buffer size matches dimensions");
    if orientation == Orientation::NoTransforms {
        return Ok(rgb);
    }
    let mut image = DynamicImage::ImageRgb8(rgb);
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

/// The EXIF orientation from the APP1 segments that `jpeg_save_markers` kept. Like Pillow, the
/// payloads of all `Exif` APP1 segments are joined (the IFD is in the first). A missing or
/// malformed EXIF block means "no transform", as in Pillow's `exif_transpose`.
unsafe fn exif_orientation(cinfo: &ffi::jpeg_decompress_struct) -> Orientation {
    const EXIF: &[u8] = b"Exif\0\0";
    let mut exif = Vec::new();
    let mut marker = cinfo.marker_list;
    while let Some(m) = marker.as_ref() {
        if m.marker == APP1 && !m.data.is_null() {
            let data = std::slice::from_raw_parts(m.data, m.data_length as usize);
            if let Some(payload) = data.strip_prefix(EXIF) {
                exif.extend_from_slice(payload);
            }
        }
        marker = m.next;
    }
    Orientation::from_exif_chunk(&exif).unwrap_or(Orientation::NoTransforms)
}

/// Pillow's `convert("RGB")` of an `L` image: the value three times. `data` holds `n` gray
/// samples followed by room for the rest of `3 * n` bytes.
fn gray_to_rgb_in_place(data: &mut [u8], n: usize) {
    // Backwards, so that no gray sample is overwritten before it is read (3i >= i).
    for i in (0..n).rev() {
        let v = data[i];
        data[3 * i..3 * i + 3].fill(v);
    }
}

/// `a * b / 255` rounded to nearest, as Pillow's `MULDIV255` macro computes it.
#[inline]
fn muldiv255(a: u32, b: u32) -> u32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

/// What Pillow makes of one pixel of libjpeg's CMYK output: it reads JPEG CMYK as Adobe's
/// inverted CMYK (raw mode `CMYK;I`: every sample `255 - v`), then `convert("RGB")` computes
/// `255 - k' - c' * (255 - k') / 255` per channel with `MULDIV255` (libImaging/Convert.c,
/// `cmyk2rgb`), where `c' = 255 - c`, `k' = 255 - k` are the un-inverted values.
#[inline]
fn cmyk_inverted_to_rgb(cmyk: [u8; 4]) -> [u8; 3] {
    let nk = u32::from(cmyk[3]); // 255 - k' = k
    let channel = |c: u8| (nk - muldiv255(255 - u32::from(c), nk)) as u8;
    [channel(cmyk[0]), channel(cmyk[1]), channel(cmyk[2])]
}

/// [`cmyk_inverted_to_rgb`] over `n` 4-byte pixels, leaving `3 * n` RGB bytes in `data`.
fn cmyk_inverted_to_rgb_in_place(data: &mut Vec<u8>, n: usize) {
    // Forwards: pixel i is read from 4i.. before 3i..3i+3 is written, and later pixels start
    // at 4j >= 4i + 4 > 3i + 2.
    for i in 0..n {
        let px = [
            data[4 * i],
            data[4 * i + 1],
            data[4 * i + 2],
            data[4 * i + 3],
        ];
        data[3 * i..3 * i + 3].copy_from_slice(&cmyk_inverted_to_rgb(px));
    }
    data.truncate(3 * n);
}

/// Pillow refuses a JPEG that stops half way ("image file is truncated"); a half-grey photo
/// would get a confidently wrong caption, so we refuse it too. libjpeg notices when the data
/// runs out (a warning that [`emit_message`] turns into an error), but only once it gets there,
/// after the image buffer is allocated and much of the work done; this check runs first, on the
/// bytes alone.
///
/// A complete JPEG has an EOI marker (FF D9) after its first scan. We walk the marker segments
/// up to the first SOS (start of scan) by their lengths, so that embedded EXIF thumbnails (which
/// have their own EOI) are skipped, and then look for FF D9 in the rest: inside entropy-coded
/// data every FF byte is followed by 00 or a restart marker, so FF D9 there is the real EOI.
/// Anything we cannot follow is left to the decoder (returns false).
fn jpeg_is_truncated(data: &[u8]) -> bool {
    let mut i = 2; // after SOI
    loop {
        // Markers may be preceded by any number of FF fill bytes.
        while i < data.len() && data[i] == 0xFF && data.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (data.get(i), data.get(i + 1)) else {
            // Ran out of data (or lost sync) before the first scan.
            return i >= data.len().saturating_sub(1);
        };
        match marker {
            0xD9 => return false,         // EOI before any scan: let the decoder judge it
            0x01 | 0xD0..=0xD7 => i += 2, // stand-alone markers without a length
            _ => {
                let Some(len) = data.get(i + 2..i + 4) else {
                    return true;
                };
                let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                if marker == 0xDA {
                    let scan = data.get(i + 2 + len..).unwrap_or(&[]);
                    return !scan.windows(2).any(|w| w == [0xFF, 0xD9]);
                }
                i += 2 + len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_truncation_detection() {
        // SOI, APP1 whose payload contains FF D9 (like an EXIF thumbnail), SOS, data, EOI.
        let head = [
            0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x06, 0xFF, 0xD9, 0x00, 0x00, 0xFF, 0xDA, 0x00, 0x04,
            0x01, 0x02,
        ];
        let body = [0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56];
        let full = [&head[..], &body, &[0xFF, 0xD9]].concat();
        assert!(!jpeg_is_truncated(&full));
        assert!(jpeg_is_truncated(&[&head[..], &body].concat()));
        assert!(jpeg_is_truncated(&head[..8])); // ends inside the headers
                                                // An EOI before any scan, and garbage: left to the decoder.
        assert!(!jpeg_is_truncated(&[0xFF, 0xD8, 0xFF, 0xD9]));
    }

    #[test]
    fn cmyk_conversion_hand_cases() {
        // libjpeg's CMYK output is Adobe-inverted: 255 everywhere is "no ink" -> white.
        assert_eq!(cmyk_inverted_to_rgb([255, 255, 255, 255]), [255, 255, 255]);
        // Full black ink (k' = 255, stored 0) -> black whatever the colours.
        assert_eq!(cmyk_inverted_to_rgb([255, 0, 128, 0]), [0, 0, 0]);
        // Full cyan only: c' = 255 (stored 0) -> no red.
        assert_eq!(cmyk_inverted_to_rgb([0, 255, 255, 255]), [0, 255, 255]);
        // k' = 55 (stored 200), c' = 100 (stored 155): 200 - round(100 * 200 / 255) = 200 - 78.
        assert_eq!(cmyk_inverted_to_rgb([155, 255, 55, 200])[0], 122);
    }

    #[test]
    fn in_place_conversions() {
        let mut gray = vec![1, 2, 3, 0, 0, 0, 0, 0, 0];
        gray_to_rgb_in_place(&mut gray, 3);
        assert_eq!(gray, [1, 1, 1, 2, 2, 2, 3, 3, 3]);
        let mut cmyk = vec![255, 255, 255, 255, 0, 255, 255, 255];
        cmyk_inverted_to_rgb_in_place(&mut cmyk, 2);
        assert_eq!(cmyk, [255, 255, 255, 0, 255, 255]);
    }

    #[test]
    fn errors_are_returned_not_raised() {
        // Garbage after a JPEG signature: a libjpeg error, unwound and caught.
        let opts = LoadOptions::default();
        let err = decode(&[0xFF, 0xD8, 0xFF, 0x00, 0x00], &opts).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt(_)), "{err:?}");
        // And the library is still usable afterwards, on this thread.
        let err = decode(&[0xFF, 0xD8, 0xFF, 0xD9], &opts).unwrap_err();
        assert!(
            err.to_string().contains("no image"),
            "{err}: libjpeg's message"
        );
    }
}
