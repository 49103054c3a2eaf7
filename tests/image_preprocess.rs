//! Parity of `caption::image` with Pillow 13 + transformers 5.23 (`BlipImageProcessorPil`).
//!
//! The references in tests/fixtures/preprocess/ are written by
//! `tools/make_preprocess_fixtures.py`; see its docstring for what each file is.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use caption::image::{
    decode_rgb8, load_rgb8, pixel_values, resize, ImageError, LoadOptions, PreprocessConfig,
    Resample,
};
use image::RgbImage;
use serde_json::Value;

/// Records the largest single allocation, so the "huge header" tests can show that nothing
/// image-sized was allocated. Other tests in this binary never allocate more than a few MB.
struct PeakAlloc;
static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: PeakAlloc = PeakAlloc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("preprocess/manifest.json"))
        .expect("run tools/make_preprocess_fixtures.py");
    serde_json::from_str(&text).unwrap()
}

fn images(manifest: &Value) -> &Vec<Value> {
    manifest["images"].as_array().unwrap()
}

/// A reference PNG, which the generator always writes as 8-bit RGB.
fn reference_png(name: &str) -> RgbImage {
    let path = fixtures().join("preprocess").join(name);
    match image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
        image::DynamicImage::ImageRgb8(img) => img,
        other => panic!("{name}: expected 8-bit RGB, got {:?}", other.color()),
    }
}

fn no_rotate() -> LoadOptions {
    LoadOptions {
        exif_rotate: false,
        ..LoadOptions::default()
    }
}

/// The source image file of a manifest entry.
fn source(entry: &Value) -> (PathBuf, &str) {
    let rel = entry["source"].as_str().unwrap();
    (fixtures().join(rel), rel)
}

/// Whether we must give Pillow's pixels exactly: every lossless format, and JPEG, which we decode
/// with Pillow's own decoder (libjpeg-turbo). Only lossy WebP goes through a different decoder
/// than Pillow's (image-webp instead of libwebp) and gets a tolerance.
fn must_be_exact(entry: &Value) -> bool {
    entry["lossy"] != true || entry["format"] == "JPEG"
}

/// What kind of JPEG a manifest entry is, e.g. "RGB 2x2,1x1,1x1 progressive", to check that the
/// fixtures cover the kinds users have.
fn jpeg_kind(entry: &Value, path: &Path) -> String {
    let sampling: Vec<String> = entry["jpeg_sampling"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| format!("{}x{}", f[0], f[1]))
        .collect();
    // SOF2 (progressive Huffman); inside entropy-coded data FF is only followed by 00 or RST.
    let bytes = std::fs::read(path).unwrap();
    let progressive = bytes.windows(2).any(|w| w == [0xFF, 0xC2]);
    format!(
        "{} {}{}",
        entry["pil_mode"].as_str().unwrap(),
        sampling.join(","),
        if progressive { " progressive" } else { "" }
    )
}

/// The JPEG kinds the decoding tests must see: grayscale, 4:4:4, 4:2:2 and 4:2:0 YCbCr (4:2:0
/// baseline and progressive), and Adobe CMYK.
const JPEG_KINDS: [&str; 6] = [
    "L 1x1",
    "RGB 1x1,1x1,1x1",
    "RGB 2x1,1x1,1x1",
    "RGB 2x2,1x1,1x1",
    "RGB 2x2,1x1,1x1 progressive",
    "CMYK 1x1,1x1,1x1,1x1",
];

/// The RGB we are expected to produce from the source file: Pillow's, except where the manifest
/// records a deliberate deviation.
fn expected_rgb(entry: &Value) -> RgbImage {
    match entry.get("deviation") {
        Some(dev) => reference_png(dev["rgb"].as_str().unwrap()),
        None => reference_png(entry["rgb"].as_str().unwrap()),
    }
}

/// The key of the recorded pixel values we must match, if the entry has any.
fn pixel_values_key(entry: &Value) -> Option<&str> {
    let key = entry.get("pixel_values_key")?.as_str().unwrap();
    Some(match entry.get("deviation") {
        Some(dev) => dev["pixel_values_key"].as_str().unwrap(),
        None => key,
    })
}

/// Minimal safetensors reader: u64 header length, JSON header, little-endian data.
fn read_safetensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = HashMap::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(info["dtype"], "F32", "{name}");
        let shape = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let off = info["data_offsets"].as_array().unwrap();
        let (a, b) = (
            off[0].as_u64().unwrap() as usize,
            off[1].as_u64().unwrap() as usize,
        );
        let values = data[a..b]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        out.insert(name.clone(), (shape, values));
    }
    out
}

/// The processor the references were made with: BLIP's defaults at 40x40, written as a
/// preprocessor_config.json would be so the parser is exercised too.
fn config_40(manifest: &Value) -> PreprocessConfig {
    let p = &manifest["processor"];
    let json = serde_json::json!({
        "do_normalize": true,
        "do_resize": true,
        "image_mean": p["image_mean"],
        "image_std": p["image_std"],
        "image_processor_type": "BlipImageProcessor",
        "resample": p["resample"],
        "rescale_factor": p["rescale_factor"],
        "size": p["size"],
    });
    let cfg = PreprocessConfig::from_json_str(&json.to_string()).unwrap();
    assert_eq!((cfg.width, cfg.height), (40, 40));
    cfg
}

/// Per-sample comparison of two 8-bit images.
struct ByteDiff {
    total: usize,
    differing: usize,
    over_one: usize,
    max: u8,
    abs_sum: u64,
}

fn byte_diff(ours: &RgbImage, theirs: &RgbImage) -> ByteDiff {
    assert_eq!(ours.dimensions(), theirs.dimensions());
    let mut d = ByteDiff {
        total: 0,
        differing: 0,
        over_one: 0,
        max: 0,
        abs_sum: 0,
    };
    for (&a, &b) in ours.as_raw().iter().zip(theirs.as_raw()) {
        let diff = a.abs_diff(b);
        d.total += 1;
        d.differing += usize::from(diff > 0);
        d.over_one += usize::from(diff > 1);
        d.max = d.max.max(diff);
        d.abs_sum += u64::from(diff);
    }
    d
}

// ---------------------------------------------------------------------------------------------
// (a) The resampler alone: Pillow's own RGB in, Pillow's resize out, byte for byte.

#[test]
fn resize_bicubic_is_bit_exact() {
    let manifest = manifest();
    let mut checked = 0;
    for entry in images(&manifest) {
        let src = reference_png(entry["rgb"].as_str().unwrap());
        for (size, file) in entry["resized"].as_object().unwrap() {
            let (w, h) = size.split_once('x').unwrap();
            let (w, h): (u32, u32) = (w.parse().unwrap(), h.parse().unwrap());
            let theirs = reference_png(file.as_str().unwrap());
            let ours = resize(&src, w, h, Resample::Bicubic);
            let d = byte_diff(&ours, &theirs);
            assert_eq!(
                d.differing, 0,
                "{file}: {} of {} samples differ (max {})",
                d.differing, d.total, d.max
            );
            checked += 1;
        }
    }
    // Every committed image (tests/fixtures/images), at both sizes.
    let committed = images(&manifest)
        .iter()
        .filter(|e| e["source"].as_str().unwrap().starts_with("images/"))
        .count();
    assert!(committed >= 11);
    assert_eq!(checked, 2 * committed);
}

#[test]
fn resize_all_filters_are_bit_exact() {
    let manifest = manifest();
    let cases = manifest["filters"].as_array().unwrap();
    assert!(cases.len() >= 6 * 3);
    let mut vertical_first = 0;
    for case in cases {
        let src = reference_png(case["source"].as_str().unwrap());
        let filter = Resample::from_pil_code(case["pil_code"].as_i64().unwrap()).unwrap();
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        // Pillow 13 runs the vertical pass first when the height loses more than twice as many
        // pixels as the width; make sure the fixtures exercise that order too.
        let (dx, dy) = (
            i64::from(src.width()) - i64::from(w),
            i64::from(src.height()) - i64::from(h),
        );
        vertical_first += usize::from(dy > 0 && dy > 2 * dx && w != src.width());
        let file = case["file"].as_str().unwrap();
        let theirs = reference_png(file);
        let ours = resize(&src, w, h, filter);
        let d = byte_diff(&ours, &theirs);
        assert_eq!(
            d.differing, 0,
            "{file} ({filter:?}): {} of {} samples differ (max {})",
            d.differing, d.total, d.max
        );
    }
    assert!(
        vertical_first >= 6 * 4,
        "{vertical_first} vertical-first cases"
    );
}

// ---------------------------------------------------------------------------------------------
// (b) Decoding + convert_to_rgb.

/// Lossless formats (PNG, GIF, BMP, TGA, TIFF, QOI, ICO, PPM, lossless WebP) must decode to
/// Pillow 13's pixels exactly, and so must JPEG: we decode it with libjpeg-turbo's own C code
/// (vendored by mozjpeg-sys), the library Pillow decodes with, at Pillow's settings (accurate
/// integer IDCT, fancy chroma upsampling), and convert CMYK with Pillow's formula. Measured on
/// every JPEG fixture (grayscale, 4:4:4, 4:2:2, 4:2:0 baseline and progressive, Adobe CMYK):
/// 0 samples differ. (zune-jpeg, which the `image` crate uses and we used before, rounds its
/// IDCT, colour conversion and two-pass chroma upsampling differently: 14-22% of the samples of
/// the 4:2:0 files were off, by up to 4 levels, and about 1% of the others.)
///
/// Only lossy WebP is decoded by different code than Pillow's (image-webp 0.2.4 instead of
/// libwebp 1.6). It is 4:2:0 and gets the limits that a different 4:2:0 decoder was measured to
/// need (zune-jpeg on the JPEGs above); measured it is bit-exact on the fixture.
struct LossyLimits {
    differing: f64,
    over_one: f64,
    max: u8,
    mean: f64,
}
const LOSSY_WEBP: LossyLimits = LossyLimits {
    differing: 0.25,
    over_one: 0.10,
    max: 4,
    mean: 0.35,
};

#[test]
fn decode_matches_pillow_convert_to_rgb() {
    let manifest = manifest();
    let mut failures = Vec::new();
    let mut jpeg_kinds = Vec::new();
    for entry in images(&manifest) {
        let (path, file) = source(entry);
        if entry["format"] == "JPEG" {
            jpeg_kinds.push(jpeg_kind(entry, &path));
        }
        let ours = load_rgb8(&path, &no_rotate()).unwrap_or_else(|e| panic!("{file}: {e}"));
        let theirs = expected_rgb(entry);
        let d = byte_diff(&ours, &theirs);
        let frac = d.differing as f64 / d.total as f64;
        let frac_over_one = d.over_one as f64 / d.total as f64;
        let mean = d.abs_sum as f64 / d.total as f64;
        let summary = format!(
            "{file}: {} of {} samples differ ({:.3}%), {} ({:.3}%) by more than 1, max {}, mean {mean:.3}",
            d.differing,
            d.total,
            100.0 * frac,
            d.over_one,
            100.0 * frac_over_one,
            d.max
        );
        eprintln!("{summary}");
        let ok = if must_be_exact(entry) {
            d.differing == 0
        } else {
            assert_eq!(entry["format"], "WEBP", "{file}");
            let limits = &LOSSY_WEBP;
            frac <= limits.differing
                && frac_over_one <= limits.over_one
                && d.max <= limits.max
                && mean <= limits.mean
        };
        if !ok {
            failures.push(summary);
        }
        // From memory gives the same pixels (TGA has no signature, so only from a named file).
        if entry["format"] != "TGA" {
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(decode_rgb8(&bytes, &no_rotate()).unwrap(), ours, "{file}");
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    for kind in JPEG_KINDS {
        assert!(
            jpeg_kinds.iter().any(|k| k == kind),
            "no {kind} JPEG among the fixtures ({jpeg_kinds:?})"
        );
    }
}

#[test]
fn sixteen_bit_gray_deviation_is_real() {
    // Pillow clips I;16 at 255 in convert("RGB"); we scale. Make sure the recorded deviation
    // is what it claims: Pillow's picture is nearly all white, ours is not.
    let manifest = manifest();
    let entry = images(&manifest)
        .iter()
        .find(|e| e["pil_mode"] == "I;16")
        .expect("a 16-bit grayscale fixture");
    let pillow = reference_png(entry["rgb"].as_str().unwrap());
    let ours = load_rgb8(&source(entry).0, &no_rotate()).unwrap();
    let white = |img: &RgbImage| img.as_raw().iter().filter(|&&v| v == 255).count();
    assert!(white(&pillow) * 10 > pillow.as_raw().len() * 9);
    assert!(white(&ours) * 10 < ours.as_raw().len());
}

// ---------------------------------------------------------------------------------------------
// (c) End to end: file -> pixel_values at 40x40, against BlipImageProcessorPil.

/// With Pillow's RGB decoded exactly, the values are transformers' bit for bit, JPEGs included.
/// Lossy WebP may have this fraction of its values more than one 8-bit level ((1/255)/std, about
/// 0.015 after normalising) off: what a different 4:2:0 decoder (zune-jpeg, on the 4:2:0 JPEGs)
/// was measured to need at 40x40. Measured, the WebP fixture is bit-equal.
const VALUES_MAX_OFF_LOSSY_WEBP: f64 = 0.02;

fn reference_values() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let manifest = manifest();
    read_safetensors(
        &fixtures()
            .join("preprocess")
            .join(manifest["pixel_values"].as_str().unwrap()),
    )
}

#[test]
fn pixel_values_match_transformers() {
    let manifest = manifest();
    let cfg = config_40(&manifest);
    let reference = reference_values();
    let mut checked = 0;
    let mut jpegs = 0;
    for entry in images(&manifest) {
        let Some(key) = pixel_values_key(entry) else {
            continue;
        };
        jpegs += usize::from(entry["format"] == "JPEG");
        let (path, file) = source(entry);
        let (shape, theirs) = &reference[key];
        assert_eq!(shape, &vec![3, 40, 40], "{key}");
        let rgb = load_rgb8(&path, &no_rotate()).unwrap();
        let ours = pixel_values(&rgb, &cfg);
        assert_eq!(ours.len(), theirs.len());
        let plane = 40 * 40;
        let mut bit_different = 0;
        let mut off = 0;
        let mut worst = 0f32;
        for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
            let level = (1.0 / 255.0) / cfg.image_std[i / plane] + 1e-6;
            bit_different += usize::from(a.to_bits() != b.to_bits());
            off += usize::from((a - b).abs() > level);
            worst = worst.max((a - b).abs());
        }
        eprintln!(
            "{file}: {bit_different} of {} values not bit-equal, {off} more than one level off, max |diff| {worst}",
            ours.len()
        );
        if must_be_exact(entry) {
            assert_eq!(
                bit_different, 0,
                "{file}: not bit-equal (max |diff| {worst})"
            );
        } else {
            assert_eq!(entry["format"], "WEBP", "{file}");
            assert!(
                off as f64 <= VALUES_MAX_OFF_LOSSY_WEBP * ours.len() as f64 && worst < 0.05,
                "{file}: {off} of {} values more than one 8-bit level off (max {worst})",
                ours.len()
            );
        }
        checked += 1;
    }
    // Every JPEG fixture has recorded values (the committed photos and the made variants).
    assert!(jpegs >= 8, "only {jpegs} JPEGs have reference pixel values");
    assert!(
        checked >= 11,
        "only {checked} images have reference pixel values"
    );
}

#[test]
fn pixel_values_from_pillow_rgb_are_bit_exact() {
    // Feeding Pillow's own convert_to_rgb result through resize + rescale + normalise must
    // reproduce transformers' numbers exactly for every image, JPEGs included: this is the
    // whole pipeline minus the decoder.
    let manifest = manifest();
    let cfg = config_40(&manifest);
    let reference = reference_values();
    for entry in images(&manifest) {
        let Some(key) = entry.get("pixel_values_key").and_then(Value::as_str) else {
            continue;
        };
        let rgb = reference_png(entry["rgb"].as_str().unwrap());
        let ours = pixel_values(&rgb, &cfg);
        let (_, theirs) = &reference[key];
        let bad = ours
            .iter()
            .zip(theirs)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(bad, 0, "{}: {bad} values not bit-equal", entry["source"]);
    }
}

// ---------------------------------------------------------------------------------------------
// (d) Files users really have that are not images, and awkward shapes.

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A PNG whose header claims `width` x `height` 8-bit RGB, with a token IDAT.
fn huge_png(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut png, b"IHDR", &ihdr);
    png_chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    png_chunk(&mut png, b"IEND", &[]);
    png
}

/// A BMP header (BITMAPINFOHEADER, 24 bpp) claiming `width` x `height`, with no pixel data.
fn huge_bmp(width: i32, height: i32) -> Vec<u8> {
    let mut bmp = b"BM".to_vec();
    bmp.extend_from_slice(&54u32.to_le_bytes()); // file size (as written)
    bmp.extend_from_slice(&0u32.to_le_bytes()); // reserved
    bmp.extend_from_slice(&54u32.to_le_bytes()); // pixel data offset
    bmp.extend_from_slice(&40u32.to_le_bytes()); // header size
    bmp.extend_from_slice(&width.to_le_bytes());
    bmp.extend_from_slice(&height.to_le_bytes());
    bmp.extend_from_slice(&1u16.to_le_bytes()); // planes
    bmp.extend_from_slice(&24u16.to_le_bytes()); // bits per pixel
    bmp.extend_from_slice(&[0; 24]); // compression, sizes, resolution, colours
    bmp
}

/// Where the SOF0 (baseline frame header) marker of a JPEG is, found by walking the segments.
fn sof0_offset(jpg: &[u8]) -> usize {
    let mut i = 2;
    while jpg[i + 1] != 0xC0 {
        i += 2 + usize::from(u16::from_be_bytes([jpg[i + 2], jpg[i + 3]]));
    }
    i
}

/// A real JPEG (a fixture) with the dimensions in its SOF0 header patched to `width` x `height`.
fn huge_jpeg(width: u16, height: u16) -> Vec<u8> {
    let mut jpg = std::fs::read(fixtures().join("images/astronaut.jpg")).unwrap();
    let i = sof0_offset(&jpg);
    // FF C0, length (2), precision (1), height (2), width (2).
    jpg[i + 5..i + 7].copy_from_slice(&height.to_be_bytes());
    jpg[i + 7..i + 9].copy_from_slice(&width.to_be_bytes());
    jpg
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn assert_fast<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{what} took {:?}",
        start.elapsed()
    );
    out
}

#[test]
fn broken_files_give_the_right_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let opts = LoadOptions::default();
    let images = fixtures().join("images");

    let missing = load_rgb8(&dir.join("missing.jpg"), &opts).unwrap_err();
    assert!(matches!(missing, ImageError::Io(_)), "{missing:?}");

    let empty = write(dir, "empty.png", b"");
    assert!(matches!(load_rgb8(&empty, &opts), Err(ImageError::Empty)));
    assert!(matches!(decode_rgb8(b"", &opts), Err(ImageError::Empty)));

    let text = write(
        dir,
        "notes.jpg",
        b"these are my holiday notes, not a photo\n",
    );
    let err = load_rgb8(&text, &opts).unwrap_err();
    assert!(matches!(err, ImageError::Unsupported(_)), "{err:?}");

    for (name, source) in [("half.jpg", "astronaut.jpg"), ("half.png", "chelsea.png")] {
        let full = std::fs::read(images.join(source)).unwrap();
        let path = write(dir, name, &full[..full.len() / 2]);
        let err = assert_fast(name, || load_rgb8(&path, &opts)).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt(_)), "{name}: {err:?}");
    }

    // Headers claiming far more pixels than the limit: refused from the header alone.
    let cases: [(&str, Vec<u8>, (u32, u32)); 3] = [
        ("huge.png", huge_png(100_000, 100_000), (100_000, 100_000)),
        ("huge.bmp", huge_bmp(30_000, 30_000), (30_000, 30_000)),
        ("huge.jpg", huge_jpeg(60_000, 50_000), (60_000, 50_000)),
    ];
    for (name, bytes, dims) in cases {
        let path = write(dir, name, &bytes);
        let err = assert_fast(name, || load_rgb8(&path, &opts)).unwrap_err();
        match err {
            ImageError::TooLarge {
                width,
                height,
                limit,
            } => {
                assert_eq!((width, height), dims, "{name}");
                assert_eq!(limit, 178_956_970);
            }
            other => panic!("{name}: expected TooLarge, got {other:?}"),
        }
        assert!(
            LARGEST_ALLOC.load(Ordering::Relaxed) < 256 << 20,
            "{name}: an allocation of {} bytes happened",
            LARGEST_ALLOC.load(Ordering::Relaxed)
        );
    }
    // The limit is configurable, and inclusive.
    let small = LoadOptions {
        max_pixels: 256 * 256 - 1,
        ..LoadOptions::default()
    };
    let err = load_rgb8(&images.join("astronaut.jpg"), &small).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::TooLarge {
                width: 256,
                height: 256,
                ..
            }
        ),
        "{err:?}"
    );
    let exact = LoadOptions {
        max_pixels: 256 * 256,
        ..LoadOptions::default()
    };
    assert!(load_rgb8(&images.join("astronaut.jpg"), &exact).is_ok());

    // Messages are one short line and never contain the path.
    for err in [
        load_rgb8(&empty, &opts).unwrap_err(),
        load_rgb8(&text, &opts).unwrap_err(),
        load_rgb8(&write(dir, "huge2.png", &huge_png(100_000, 100_000)), &opts).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(
            !msg.contains('\n') && !msg.contains(dir.to_str().unwrap()),
            "{msg}"
        );
        assert!(msg.len() < 200, "{msg}");
    }
}

#[test]
fn broken_jpegs_give_the_right_error() {
    // libjpeg's fatal errors must come back as errors (not exit() or a panic), with its message
    // on one line, and the decoder must keep working afterwards.
    let opts = LoadOptions::default();
    let good = std::fs::read(fixtures().join("images/rocket.jpg")).unwrap();
    let expected = decode_rgb8(&good, &opts).unwrap();
    let sof = sof0_offset(&good);
    let patched = |offset: usize, value: u8| {
        let mut jpg = good.clone();
        jpg[offset] = value;
        jpg
    };
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        // (what, bytes, unsupported rather than corrupt)
        ("only a signature", good[..3].to_vec(), false),
        ("no image", vec![0xFF, 0xD8, 0xFF, 0xD9], false),
        ("ends in the headers", good[..sof + 6].to_vec(), false),
        (
            "ends after the scan data, without EOI",
            good[..good.len() - 2].to_vec(),
            false,
        ),
        ("a bad marker length", patched(sof + 3, 1), false),
        ("0 components", patched(sof + 9, 0), false),
        ("lossless (SOF3)", patched(sof + 1, 0xC3), true),
        ("12-bit samples", patched(sof + 4, 12), true),
    ];
    for (what, bytes, unsupported) in cases {
        let err = assert_fast(what, || decode_rgb8(&bytes, &opts)).unwrap_err();
        let right_kind = if unsupported {
            matches!(err, ImageError::Unsupported(_))
        } else {
            matches!(err, ImageError::Corrupt(_))
        };
        assert!(right_kind, "{what}: {err:?}");
        let msg = err.to_string();
        assert!(!msg.contains('\n') && msg.len() < 200, "{what}: {msg}");
    }
    // Damaged entropy-coded data decodes to something, as in Pillow (libjpeg only warns).
    let mut damaged = good.clone();
    let n = damaged.len();
    damaged[n - 200..n - 100].fill(0x55);
    let img = decode_rgb8(&damaged, &opts).unwrap();
    assert_eq!(img.dimensions(), expected.dimensions());
    assert_ne!(img, expected);
    // And after all that, a good file still decodes the same.
    assert_eq!(decode_rgb8(&good, &opts).unwrap(), expected);
}

/// `jpg` with an APP1 EXIF segment saying `orientation` inserted after SOI.
fn jpeg_with_orientation(jpg: &[u8], orientation: u8) -> Vec<u8> {
    // Little-endian TIFF header, one IFD entry: tag 0x0112 (Orientation), SHORT, count 1.
    let tiff: Vec<u8> = [
        &b"II\x2a\x00\x08\x00\x00\x00"[..],
        &[0x01, 0x00],
        &[
            0x12,
            0x01,
            0x03,
            0x00,
            0x01,
            0x00,
            0x00,
            0x00,
            orientation,
            0x00,
            0x00,
            0x00,
        ],
        &[0x00, 0x00, 0x00, 0x00],
    ]
    .concat();
    let payload = [&b"Exif\0\0"[..], &tiff].concat();
    let len = u16::try_from(payload.len() + 2).unwrap().to_be_bytes();
    [&jpg[..2], &[0xFF, 0xE1], &len, &payload, &jpg[2..]].concat()
}

#[test]
fn jpeg_exif_orientation_is_applied_on_request() {
    let path = fixtures().join("preprocess/sources/x_422.jpg");
    let plain = std::fs::read(&path).unwrap();
    let stored = decode_rgb8(&plain, &LoadOptions::default()).unwrap();
    assert_eq!(stored.dimensions(), (79, 63));
    // The same pixels as Pillow without the EXIF segment.
    assert_eq!(load_rgb8(&path, &no_rotate()).unwrap(), stored);
    let tmp = tempfile::tempdir().unwrap();
    for (orientation, expected) in [
        (1, stored.clone()),
        (3, image::imageops::rotate180(&stored)),
        (6, image::imageops::rotate90(&stored)),
        (8, image::imageops::rotate270(&stored)),
        (2, image::imageops::flip_horizontal(&stored)),
    ] {
        let jpg = jpeg_with_orientation(&plain, orientation);
        let rotated = decode_rgb8(&jpg, &LoadOptions::default()).unwrap();
        assert_eq!(rotated, expected, "orientation {orientation}");
        let file = write(tmp.path(), "oriented.jpg", &jpg);
        assert_eq!(load_rgb8(&file, &LoadOptions::default()).unwrap(), expected);
        // Without rotation, the stored pixels.
        assert_eq!(decode_rgb8(&jpg, &no_rotate()).unwrap(), stored);
    }
    // A malformed EXIF block means no rotation, not an error.
    let mut bad = jpeg_with_orientation(&plain, 6);
    bad[12] = b'X'; // the TIFF byte-order mark ("II")
    assert_eq!(decode_rgb8(&bad, &LoadOptions::default()).unwrap(), stored);
}

#[test]
fn degenerate_shapes_preprocess() {
    let cfg = PreprocessConfig::default();
    for (w, h) in [(1, 1), (1, 2), (2, 1), (5000, 1), (1, 5000), (3000, 2)] {
        let img = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 9])
        });
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let decoded = decode_rgb8(&png, &LoadOptions::default()).unwrap();
        assert_eq!(decoded, img);
        let values = pixel_values(&decoded, &cfg);
        assert_eq!(values.len(), 3 * 384 * 384, "{w}x{h}");
        assert!(values.iter().all(|v| v.is_finite()), "{w}x{h}");
        for filter in [Resample::Nearest, Resample::Box, Resample::Lanczos] {
            assert_eq!(resize(&img, 7, 3, filter).dimensions(), (7, 3));
        }
    }
}

#[test]
fn exif_orientation_is_applied_on_request() {
    // A 3x2 PNG with an eXIf chunk saying "rotate 90 degrees clockwise" (orientation 6).
    let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8 * 100, y as u8 * 200, 0]));
    let mut plain = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut plain),
        image::ImageFormat::Png,
    )
    .unwrap();
    // Big-endian TIFF header, one IFD entry: tag 0x0112 (Orientation), SHORT, count 1, value 6.
    let exif: Vec<u8> = [
        &b"MM\x00\x2a\x00\x00\x00\x08"[..],
        &[0x00, 0x01],
        &[
            0x01, 0x12, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x06, 0x00, 0x00,
        ],
        &[0x00, 0x00, 0x00, 0x00],
    ]
    .concat();
    // Insert eXIf right after IHDR (8-byte signature + 25-byte IHDR chunk).
    let mut png = plain[..33].to_vec();
    png_chunk(&mut png, b"eXIf", &exif);
    png.extend_from_slice(&plain[33..]);

    let rotated = decode_rgb8(&png, &LoadOptions::default()).unwrap();
    assert_eq!(rotated.dimensions(), (2, 3));
    // Rotating clockwise puts the bottom-left source pixel at the top-left.
    assert_eq!(rotated.get_pixel(0, 0), img.get_pixel(0, 1));
    assert_eq!(rotated.get_pixel(1, 0), img.get_pixel(0, 0));
    let as_stored = decode_rgb8(&png, &no_rotate()).unwrap();
    assert_eq!(as_stored, img);
}

#[test]
fn exif_orientation_matches_pillow_exif_transpose() {
    // All eight EXIF orientations, against PIL.ImageOps.exif_transpose (which transformers'
    // load_image applies to files it opens).
    let manifest = manifest();
    let cases = manifest["exif_orientation"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let path = fixtures().join(case["source"].as_str().unwrap());
        let expected = reference_png(case["transposed"].as_str().unwrap());
        let ours = load_rgb8(&path, &LoadOptions::default()).unwrap();
        assert_eq!(ours, expected, "orientation {}", case["orientation"]);
        // And without rotation the stored 7x5 pixels come back as they are.
        assert_eq!(load_rgb8(&path, &no_rotate()).unwrap().dimensions(), (7, 5));
    }
}
