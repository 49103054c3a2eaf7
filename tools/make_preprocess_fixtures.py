"""Record what Pillow and transformers make of the test images.

Run from anywhere with the reference environment (Pillow 13.0, transformers 5.23, numpy,
safetensors):

    /opt/ref/bin/python tools/make_preprocess_fixtures.py

Sources: every committed image in tests/fixtures/images/, plus small files made here in
tests/fixtures/preprocess/sources/ to cover the pixel formats users have that the committed
images do not (gray+alpha, 16-bit RGB(A), tRNS transparency, 1- and 4-bit PNG, GIF, BMP, TGA,
TIFF, QOI, ICO, PPM, WebP, grayscale / 4:4:4 / 4:2:2 / progressive JPEG). For each source it
writes into tests/fixtures/preprocess/:

* ``<stem>.rgb.png``: transformers' ``convert_to_rgb`` of the file opened with Pillow (alpha
  composited over white, otherwise ``convert("RGB")``), stored losslessly;
* for the committed images, ``<stem>.bicubic_<w>x<h>.png``: ``PIL.Image.resize((w, h),
  BICUBIC)`` of that RGB image, for 384x384 (BLIP's input size) and 61x97;
* one ``pixel_values_40.safetensors`` with, per stem, the float32 [3, 40, 40] that
  ``BlipImageProcessorPil(size={"height": 40, "width": 40})`` returns for ``Image.open(file)``,
  exactly as a user would call it (committed images and lossy extras).

``sources/exif/`` has a PNG per EXIF orientation with Pillow's ``exif_transpose`` of it.
``filters/`` holds resizes with every Pillow filter, including shapes for which Pillow 13 runs the
vertical pass first, and ``manifest.json`` lists everything with the versions used. Known
deviations of the Rust side are recorded too, with the reference they are checked against
instead (see ``DEVIATIONS``).

Deterministic: running it twice writes identical files.
"""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL
import transformers
from PIL import Image, ImageOps
from safetensors.numpy import save_file
from transformers import BlipImageProcessorPil
from transformers.image_transforms import convert_to_rgb

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
IMAGES = FIXTURES / "images"
OUT = FIXTURES / "preprocess"
SOURCES = OUT / "sources"
EXIF = SOURCES / "exif"

RESIZES = [(384, 384), (61, 97)]  # (width, height), as PIL takes them
PIXEL_SIZE = 40
EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".tga", ".qoi", ".ico", ".ppm"}

# Every Pillow filter on a few shapes: shrinking and growing, and cases where Pillow 13 runs the
# vertical pass first (height losing more than twice as many pixels as the width). "noise" is a
# small random image made here: with no smooth areas, any rounding difference shows.
FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
FILTER_CASES = [
    ("chelsea", (61, 97)),
    ("chelsea", (300, 37)),  # vertical first, then the width grows
    ("rocket", (150, 20)),  # vertical first
    ("rgba", (131, 77)),
    ("wide", (173, 20)),
    ("noise", (500, 3)),
    ("noise", (44, 5)),
    ("noise", (30, 2)),
    ("noise", (2, 40)),
    ("noise", (1, 1)),
    ("noise", (37, 29)),
]


def rounded16(image):
    """What the Rust side does with 16-bit grayscale: round(v / 257), replicated to RGB.

    Pillow 13 opens such files as mode I;16 and convert("RGB") clips at 255, so any real
    16-bit picture becomes nearly all white. We deliberately scale instead.
    """
    a = np.asarray(image).astype(np.uint32)
    v = ((a + 128) // 257).astype(np.uint8)
    return np.repeat(v[..., None], 3, axis=-1)


DEVIATIONS = {
    # stem: (mode that triggers it, function giving the RGB the Rust side must produce, reason)
    "gray16": ("I;16", rounded16, "Pillow clips I;16 at 255 in convert('RGB'); we scale round(v/257)"),
}


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(array, color_type):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB/RGBA/LA)."""
    height, width = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b"")


def make_sources():
    """Small files in the formats the committed images do not cover."""
    EXIF.mkdir(parents=True, exist_ok=True)
    for old in [p for p in SOURCES.rglob("*") if p.is_file()]:
        old.unlink()
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:24, 0:32]
    rgb = np.stack([xx * 8, yy * 10, rng.integers(0, 256, (24, 32))], -1).astype(np.uint8)
    alpha = ((xx * 7 + yy * 13) * 5 % 256).astype(np.uint8)
    rgba = np.concatenate([rgb, alpha[..., None]], -1)
    gray = ((xx * 5 + yy * 3) % 256).astype(np.uint8)
    photo = np.asarray(Image.open(IMAGES / "chelsea.png").convert("RGB"))[40:104, 60:140]

    Image.fromarray(np.stack([gray, alpha], -1), "LA").save(SOURCES / "x_la.png")
    wide16 = (rgba.astype(np.uint16) * 257 + rng.integers(0, 257, rgba.shape)).astype(np.uint16)
    (SOURCES / "x_rgba16.png").write_bytes(png16(wide16, 6))
    (SOURCES / "x_rgb16.png").write_bytes(png16(wide16[..., :3], 2))
    (SOURCES / "x_la16.png").write_bytes(png16(wide16[..., [0, 3]], 4))
    Image.fromarray(rgb).save(SOURCES / "x_rgb_trns.png", transparency=tuple(int(v) for v in rgb[3, 5]))
    Image.fromarray(gray).save(SOURCES / "x_gray_trns.png", transparency=int(gray[2, 2]))
    Image.fromarray(gray).convert("1").save(SOURCES / "x_bilevel.png")
    Image.fromarray((gray // 17).astype(np.uint8) * 17).convert("L").save(SOURCES / "x_gray4.png", bits=4)
    pal = Image.fromarray(rgb).quantize(colors=8, method=Image.Quantize.MEDIANCUT)
    pal.save(SOURCES / "x_palette_alpha.png", transparency=bytes([0, 60, 128, 200, 255, 255, 30, 255]))
    pal.save(SOURCES / "x_trans.gif", transparency=2)
    Image.fromarray(rgb).save(SOURCES / "x_bmp24.bmp")
    Image.fromarray(rgba).save(SOURCES / "x_tga.tga")
    Image.fromarray(rgba).save(SOURCES / "x_qoi.qoi")
    Image.fromarray(rgba).save(SOURCES / "x_tiff.tiff", compression="tiff_lzw")
    Image.fromarray(rgba).save(SOURCES / "x_ico.ico", sizes=[(32, 24)])
    Image.fromarray(rgb).save(SOURCES / "x_ppm.ppm")
    Image.fromarray(rgba).save(SOURCES / "x_lossless.webp", lossless=True)
    Image.fromarray(photo).save(SOURCES / "x_lossy.webp", quality=80)
    Image.fromarray(photo).convert("L").save(SOURCES / "x_gray.jpg", quality=90)
    Image.fromarray(photo).save(SOURCES / "x_444.jpg", quality=90, subsampling=0)
    Image.fromarray(photo).save(SOURCES / "x_progressive.jpg", quality=85, progressive=True)
    # 4:2:2, as many cameras write, at an odd size so that partial MCUs and the chroma
    # upsampling's edge columns are exercised.
    Image.fromarray(photo[:63, :79]).save(SOURCES / "x_422.jpg", quality=90, subsampling=1)


def make_exif_cases():
    """A small asymmetric PNG with each EXIF orientation, and Pillow's exif_transpose of it
    (what transformers' load_image does), so the Rust side can check all eight transforms."""
    pixels = (np.arange(5 * 7 * 3, dtype=np.uint32).reshape(5, 7, 3) * 2).astype(np.uint8)
    cases = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = EXIF / f"orientation_{orientation}.png"
        Image.fromarray(pixels).save(path, exif=exif)
        with Image.open(path) as image:
            transposed = ImageOps.exif_transpose(image).convert("RGB")
        cases.append(
            {
                "source": path.relative_to(FIXTURES).as_posix(),
                "orientation": orientation,
                "transposed": save_png(transposed, EXIF / f"orientation_{orientation}.transposed.png"),
            }
        )
    return cases


def save_png(array_or_image, path):
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    assert image.mode == "RGB", (path, image.mode)
    image.save(path, optimize=True)
    return path.relative_to(OUT).as_posix()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "filters").mkdir(exist_ok=True)
    for old in list(OUT.glob("*.png")) + list((OUT / "filters").glob("*.png")):
        old.unlink()
    make_sources()
    exif_cases = make_exif_cases()

    processor = BlipImageProcessorPil(size={"height": PIXEL_SIZE, "width": PIXEL_SIZE})
    tensors = {}
    entries = []
    rgb_images = {}
    committed = sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in EXTENSIONS)
    made = sorted(p for p in SOURCES.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    for path in committed + made:
        stem = path.stem
        assert stem not in rgb_images, f"duplicate stem {stem}"
        with Image.open(path) as image:
            image.load()
            rgb = convert_to_rgb(image, return_numpy=True)
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            lossy = image.format == "JPEG" or (image.format == "WEBP" and "lossy" in stem)
            entry = {
                "source": path.relative_to(FIXTURES).as_posix(),
                "format": image.format,
                "pil_mode": image.mode,
                "width": image.width,
                "height": image.height,
                "has_transparency": "A" in image.getbands() or image.info.get("transparency") is not None,
                "rgb": save_png(rgb, OUT / f"{stem}.rgb.png"),
                "resized": {},
                # Lossy formats. The Rust side decodes JPEG with libjpeg-turbo like Pillow and must
                # match exactly; lossy WebP goes through image-webp instead of libwebp and is
                # compared with a tolerance.
                "lossy": lossy,
            }
            # End-to-end pixel values for the committed images and the lossy extras; for the
            # lossless extras the exact RGB comparison already pins everything down, since
            # resize + rescale + normalise of that RGB is checked bit for bit on the others.
            if path.parent == IMAGES or lossy:
                pixel_values = processor(image, return_tensors="np")["pixel_values"][0]
                assert pixel_values.dtype == np.float32 and pixel_values.shape == (3, PIXEL_SIZE, PIXEL_SIZE)
                tensors[stem] = np.ascontiguousarray(pixel_values)
                entry["pixel_values_key"] = stem
            if image.format == "JPEG":
                # (component id, h, v, table) per component, so the tests can check which
                # subsamplings the JPEG fixtures cover.
                sampling = [[h, v] for _, h, v, _ in image.layer]
                entry["jpeg_sampling"] = sampling
                entry["chroma_subsampled"] = len({tuple(f) for f in sampling}) > 1
            if image.format == "WEBP" and entry["lossy"]:
                entry["chroma_subsampled"] = True  # lossy WebP is always 4:2:0
            if stem in DEVIATIONS:
                mode, ours, reason = DEVIATIONS[stem]
                assert image.mode == mode, (stem, image.mode)
                ours_rgb = ours(image)
                key = f"{stem}__rust"
                tensors[key] = np.ascontiguousarray(
                    processor(Image.fromarray(ours_rgb), return_tensors="np")["pixel_values"][0]
                )
                entry["deviation"] = {
                    "reason": reason,
                    "rgb": save_png(ours_rgb, OUT / f"{stem}.rust_rgb.png"),
                    "pixel_values_key": key,
                }
        pil_rgb = Image.fromarray(rgb)
        rgb_images[stem] = pil_rgb
        if path.parent == IMAGES:
            for width, height in RESIZES:
                resized = pil_rgb.resize((width, height), Image.Resampling.BICUBIC)
                entry["resized"][f"{width}x{height}"] = save_png(
                    resized, OUT / f"{stem}.bicubic_{width}x{height}.png"
                )
        entries.append(entry)

    noise = np.random.default_rng(2024).integers(0, 256, (67, 45, 3), dtype=np.uint8)
    sources = {stem: f"{stem}.rgb.png" for stem in rgb_images}
    sources["noise"] = save_png(noise, OUT / "filters" / "noise.rgb.png")
    rgb_images["noise"] = Image.fromarray(noise)

    filter_cases = []
    for stem, (width, height) in FILTER_CASES:
        for name, code in FILTERS.items():
            resized = rgb_images[stem].resize((width, height), code)
            filter_cases.append(
                {
                    "source": sources[stem],
                    "filter": name,
                    "pil_code": int(code),
                    "width": width,
                    "height": height,
                    "file": save_png(resized, OUT / "filters" / f"{stem}.{name}_{width}x{height}.png"),
                }
            )

    tensors_path = OUT / f"pixel_values_{PIXEL_SIZE}.safetensors"
    save_file(tensors, str(tensors_path))
    tensors_path.chmod(0o644)
    manifest = {
        "generator": "tools/make_preprocess_fixtures.py",
        "versions": {"Pillow": PIL.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "processor": {
            "class": "BlipImageProcessorPil",
            "size": {"height": PIXEL_SIZE, "width": PIXEL_SIZE},
            "resample": int(processor.resample),
            "rescale_factor": processor.rescale_factor,
            "image_mean": list(processor.image_mean),
            "image_std": list(processor.image_std),
        },
        "pixel_values": tensors_path.name,
        "images": entries,
        "filters": filter_cases,
        "exif_orientation": exif_cases,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(entries)} images, {len(filter_cases)} filter cases, {total / 1e6:.2f} MB into {OUT}")


if __name__ == "__main__":
    main()
