"""Record what Pillow and transformers make of the committed test images.

Run from anywhere with the reference environment (Pillow 13.0, transformers 5.23, numpy,
safetensors):

    /opt/ref/bin/python tools/make_preprocess_fixtures.py

For every image in tests/fixtures/images/ it writes into tests/fixtures/preprocess/:

* ``<stem>.rgb.png``: transformers' ``convert_to_rgb`` of the file opened with Pillow (alpha
  composited over white, otherwise ``convert("RGB")``), stored losslessly;
* ``<stem>.bicubic_<w>x<h>.png``: ``PIL.Image.resize((w, h), BICUBIC)`` of that RGB image, for
  384x384 (BLIP's input size) and 61x97 (odd, non-square, shrinking one axis and growing or
  shrinking the other);
* one ``pixel_values_40.safetensors`` with, per image stem, the float32 [3, 40, 40] that
  ``BlipImageProcessorPil(size={"height": 40, "width": 40})`` returns for ``Image.open(file)``,
  exactly as a user would call it.

A few extra resizes exercise the other Pillow filters (``filters/``), and ``manifest.json``
lists everything with the versions used. Known deviations of the Rust side are recorded here
too, with the reference they are checked against instead (see ``DEVIATIONS``).

Deterministic: running it twice writes identical files.
"""

import json
from pathlib import Path

import numpy as np
import PIL
import transformers
from PIL import Image
from safetensors.numpy import save_file
from transformers import BlipImageProcessorPil
from transformers.image_transforms import convert_to_rgb

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "fixtures" / "images"
OUT = ROOT / "tests" / "fixtures" / "preprocess"

RESIZES = [(384, 384), (61, 97)]  # (width, height), as PIL takes them
PIXEL_SIZE = 40
EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

# Filters other than BICUBIC, on one photo (shrinking) and one synthetic image (growing).
FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
FILTER_CASES = [("chelsea", (61, 97)), ("chelsea", (100, 37)), ("rgba", (131, 77)), ("wide", (173, 20))]


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


def save_png(array_or_image, path):
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    assert image.mode == "RGB", (path, image.mode)
    image.save(path, optimize=True)
    return path.name


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "filters").mkdir(exist_ok=True)
    for old in list(OUT.glob("*.png")) + list((OUT / "filters").glob("*.png")):
        old.unlink()

    processor = BlipImageProcessorPil(size={"height": PIXEL_SIZE, "width": PIXEL_SIZE})
    tensors = {}
    entries = []
    rgb_images = {}
    for path in sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in EXTENSIONS):
        stem = path.stem
        with Image.open(path) as image:
            image.load()
            rgb = convert_to_rgb(image, return_numpy=True)
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            pixel_values = processor(image, return_tensors="np")["pixel_values"][0]
            assert pixel_values.dtype == np.float32 and pixel_values.shape == (3, PIXEL_SIZE, PIXEL_SIZE)
            tensors[stem] = np.ascontiguousarray(pixel_values)
            entry = {
                "file": path.name,
                "format": image.format,
                "pil_mode": image.mode,
                "width": image.width,
                "height": image.height,
                "has_transparency": "A" in image.getbands() or image.info.get("transparency") is not None,
                "rgb": save_png(rgb, OUT / f"{stem}.rgb.png"),
                "resized": {},
                "pixel_values_key": stem,
            }
            if image.format == "JPEG":
                # (component id, h, v, table) per component; chroma subsampling is where the
                # Rust JPEG decoder (zune-jpeg) differs most from libjpeg-turbo.
                sampling = [[h, v] for _, h, v, _ in image.layer]
                entry["jpeg_sampling"] = sampling
                entry["jpeg_chroma_subsampled"] = len({tuple(f) for f in sampling}) > 1
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
        for width, height in RESIZES:
            resized = pil_rgb.resize((width, height), Image.Resampling.BICUBIC)
            entry["resized"][f"{width}x{height}"] = save_png(resized, OUT / f"{stem}.bicubic_{width}x{height}.png")
        entries.append(entry)

    filter_cases = []
    for stem, (width, height) in FILTER_CASES:
        for name, code in FILTERS.items():
            resized = rgb_images[stem].resize((width, height), code)
            filter_cases.append(
                {
                    "source": f"{stem}.rgb.png",
                    "filter": name,
                    "pil_code": int(code),
                    "width": width,
                    "height": height,
                    "file": "filters/" + save_png(resized, OUT / "filters" / f"{stem}.{name}_{width}x{height}.png"),
                }
            )

    save_file(tensors, str(OUT / f"pixel_values_{PIXEL_SIZE}.safetensors"))
    (OUT / f"pixel_values_{PIXEL_SIZE}.safetensors").chmod(0o644)
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
        "pixel_values": f"pixel_values_{PIXEL_SIZE}.safetensors",
        "images": entries,
        "filters": filter_cases,
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(entries)} images, {len(filter_cases)} filter cases, {total / 1e6:.2f} MB into {OUT}")


if __name__ == "__main__":
    main()
