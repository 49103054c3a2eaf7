"""Write the committed test images into tests/fixtures/images/.

Real photos come from scikit-image's bundled data (public domain / CC0, see
tests/fixtures/images/SOURCES.md), downscaled so the repository stays small.
The rest are made here to cover the awkward inputs users really have:
grayscale, 16-bit, RGBA, palette with transparency, CMYK, 1x1 and very wide.
Deterministic: running it twice writes identical files.
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "images"


def downscale(array, width):
    image = Image.fromarray(array)
    height = round(image.height * width / image.width)
    return image.resize((width, height), Image.Resampling.LANCZOS)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    # Real photos.
    downscale(skdata.astronaut(), 256).save(OUT / "astronaut.jpg", quality=90)
    downscale(skdata.chelsea(), 226).save(OUT / "chelsea.png")
    downscale(skdata.coffee(), 240).save(OUT / "coffee.jpg", quality=90)
    downscale(skdata.rocket(), 171).save(OUT / "rocket.jpg", quality=90)
    downscale(skdata.camera(), 128).save(OUT / "camera_gray.png")  # mode L

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:48, 0:64]

    # RGBA with a full range of alpha values: exercises compositing onto white.
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[..., 0] = (xx * 4) % 256
    rgba[..., 1] = (yy * 5) % 256
    rgba[..., 2] = rng.integers(0, 256, (48, 64))
    rgba[..., 3] = ((xx + yy * 64) * 83) % 256
    Image.fromarray(rgba, "RGBA").save(OUT / "rgba.png")

    # Palette image with a transparent index (PIL: mode P + info["transparency"]).
    pal = downscale(skdata.coffee(), 60).quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    pal.info["transparency"] = 3
    pal.save(OUT / "palette.png", transparency=3)

    # 16-bit grayscale PNG.
    gray16 = ((xx * 1000 + yy * 300) % 65536).astype(np.uint16)
    Image.fromarray(gray16).save(OUT / "gray16.png")

    # CMYK JPEG.
    Image.fromarray(np.asarray(downscale(skdata.coffee(), 80))).convert("CMYK").save(OUT / "cmyk.jpg", quality=92)

    # Degenerate shapes.
    Image.new("RGB", (1, 1), (200, 30, 90)).save(OUT / "one_pixel.png")
    wide = np.zeros((9, 1200, 3), dtype=np.uint8)
    wide[..., 0] = np.linspace(0, 255, 1200).astype(np.uint8)[None, :]
    wide[..., 1] = 128
    wide[..., 2] = (np.arange(9) * 28).astype(np.uint8)[:, None]
    Image.fromarray(wide).save(OUT / "wide.png")

    # Files Pillow opens that a strict decoder refuses: an icon as Pillow
    # writes one (PNGs in RGB inside), and a PNG without its end chunk.
    small = Image.open(OUT / "chelsea.png").convert("RGB")
    small.thumbnail((48, 48))
    small.save(OUT / "pillow_rgb.ico")
    png = io.BytesIO()
    small.save(png, "PNG")
    assert png.getvalue().endswith(b"IEND\xaeB`\x82")
    (OUT / "no_end_chunk.png").write_bytes(png.getvalue()[:-12])


if __name__ == "__main__":
    main()
