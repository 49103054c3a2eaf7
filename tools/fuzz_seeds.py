#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets (fuzz/README.md): small,
valid files of every kind each target reads, so that libFuzzer starts from
the real formats instead of discovering them.

    python tools/fuzz_seeds.py OUT_DIR [PACK_FILE ...]

OUT_DIR gets one folder per target (image, checkpoint, model_file,
models_toml, pack). PACK_FILEs are weight-cache files written by caption
(e.g. for tests/fixtures/models/blip-tiny at f32 and bf16): a few of their
layers are cut out into small packs. Needs Pillow, torch, safetensors and
tokenizers (the benchmark venv has them). The seeds are not committed; the
minimised corpus grown from them is (fuzz/corpus/).
"""

import io
import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def write(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def image_seeds(out: Path) -> None:
    from PIL import Image

    base = Image.new("RGB", (13, 9))
    for x in range(13):
        for y in range(9):
            base.putpixel((x, y), (x * 19, y * 28, (x * y) % 256))
    modes = {
        "RGB": base,
        "RGBA": base.convert("RGBA"),
        "L": base.convert("L"),
        "P": base.convert("P"),
        "1": base.convert("1"),
        "LA": base.convert("LA"),
        "I;16": base.convert("I").point(lambda v: v * 200).convert("I;16"),
        "CMYK": base.convert("CMYK"),
    }
    formats = {
        "png": ["RGB", "RGBA", "L", "P", "1", "LA", "I;16"],
        "jpeg": ["RGB", "L", "CMYK"],
        "gif": ["P", "L"],
        "bmp": ["RGB", "P", "L", "1"],
        "tiff": ["RGB", "RGBA", "L", "CMYK", "I;16"],
        "webp": ["RGB", "RGBA"],
        "ico": ["RGBA"],
        "ppm": ["RGB", "L"],
        "tga": ["RGB", "RGBA", "L", "P"],
        "qoi": ["RGB", "RGBA"],
    }
    folder = out / "image"
    for fmt, names in formats.items():
        for mode in names:
            buf = io.BytesIO()
            try:
                modes[mode].save(buf, format=fmt.upper())
            except (OSError, KeyError, ValueError):
                continue
            write(folder, f"{fmt}-{mode.replace(';', '')}.{fmt}", buf.getvalue())
    # A JPEG whose EXIF says "rotate", progressive and arithmetic-coded ones.
    exif = Image.Exif()
    exif[0x0112] = 6
    for name, kwargs in {
        "rotated": {"exif": exif.tobytes()},
        "progressive": {"progressive": True},
        "subsampled": {"subsampling": 2, "quality": 50},
    }.items():
        buf = io.BytesIO()
        base.save(buf, format="JPEG", **kwargs)
        write(folder, f"jpeg-{name}.jpeg", buf.getvalue())
    # An animated GIF and a radiance HDR written by hand (Pillow writes no HDR).
    buf = io.BytesIO()
    base.save(buf, format="GIF", save_all=True, append_images=[modes["L"]], duration=10)
    write(folder, "gif-animated.gif", buf.getvalue())
    hdr = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 2 +X 3\n" + bytes(
        [128, 64, 32, 129] * 6
    )
    write(folder, "radiance.hdr", hdr)
    for path in sorted((FIXTURES / "images").glob("*")):
        if path.suffix != ".md" and path.stat().st_size <= 16 * 1024:
            write(folder, "fixture-" + path.name, path.read_bytes())


def checkpoint_seeds(out: Path) -> None:
    import torch
    from safetensors.torch import save

    folder = out / "checkpoint"
    torch.manual_seed(0)
    tensors = {
        "w": torch.randn(3, 4),
        "b": torch.randn(4).to(torch.float16),
        "e": torch.randn(2, 2).to(torch.bfloat16),
        "ids": torch.arange(3, dtype=torch.int64),
        "s": torch.tensor(1.5, dtype=torch.float64),
    }
    # Prefix byte 0: safetensors; 1: pytorch_model.bin (fuzzing::checkpoint).
    write(folder, "safetensors", b"\x00" + save(tensors, metadata={"format": "pt"}))
    write(folder, "safetensors-empty", b"\x00" + save({}))
    for name, state in {
        "bin": tensors,
        # A transposed (column-major) tensor and a view into a larger storage.
        "bin-views": {"t": torch.randn(4, 3).t(), "v": torch.randn(10)[2:6]},
    }.items():
        buf = io.BytesIO()
        torch.save(state, buf)
        write(folder, name, b"\x01" + buf.getvalue())
    buf = io.BytesIO()
    torch.save(tensors, buf, _use_new_zipfile_serialization=True)
    write(folder, "bin-new", b"\x01" + buf.getvalue())


def model_file_seeds(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, normalizers

    folder = out / "model_file"
    models_dir = FIXTURES / "models"
    # Prefix byte: 0 config.json, 1 image processor, 2 generation_config.json,
    # 3 tokenizer.json (fuzzing::model_file).
    for model in sorted(models_dir.iterdir()):
        for prefix, names in [
            (0, ["config.json"]),
            (1, ["preprocessor_config.json", "processor_config.json"]),
            (2, ["generation_config.json"]),
            (3, ["tokenizer.json"]),
        ]:
            for name in names:
                path = model / name
                if path.exists():
                    write(folder, f"{model.name}-{name}", bytes([prefix]) + path.read_bytes())
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3, "photo": 4, "##s": 5, "of": 6}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    bpe = Tokenizer(
        models.BPE({"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġa": 4}, [("a", "b"), ("Ġ", "a")])
    )
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0), ("b", -2.0)], 0))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    for name, tok in {"wordpiece": wordpiece, "bpe": bpe, "unigram": unigram}.items():
        write(folder, f"tokenizer-{name}.json", b"\x03" + tok.to_str().encode())


def models_toml_seeds(out: Path) -> None:
    folder = out / "models_toml"
    write(folder, "builtin.toml", (ROOT / "models.toml").read_bytes())
    write(
        folder,
        "user.toml",
        b'[mine]\nrepo = "me/blip"\nrevision = "0123abcd"\nquestion_template = "Q: {} A:"\n'
        b"[mine.generation]\nnum_beams = 3\nmax_new_tokens = 20\nlength_penalty = 1.5\n"
        b'[demo]\nbundled = "demo"\n',
    )


ALIGN = 4096


def cut_pack(source: bytes, wanted: int) -> bytes:
    """A pack of the first `wanted` layers of each kind in `source`."""
    offset, length = struct.unpack("<QQ", source[-24:-8])
    header = json.loads(source[offset : offset + length])
    kept, seen = [], {}
    for entry in header["entries"]:
        if seen.get(entry["kind"], 0) < wanted:
            seen[entry["kind"]] = seen.get(entry["kind"], 0) + 1
            kept.append(entry)
    return build_pack(
        [
            (entry, source[slice(*entry["panels"])],
             source[slice(*entry["bias"])] if entry["bias"] else None)
            for entry in kept
        ]
    )


def build_pack(layers) -> bytes:
    data = bytearray(b"CAPTPACK" + struct.pack("<I", 2))
    entries = []
    for entry, panels, bias in layers:
        entry = dict(entry)
        data.extend(bytes(-len(data) % ALIGN))
        entry["panels"] = [len(data), len(data) + len(panels)]
        data.extend(panels)
        if bias is not None:
            data.extend(bytes(-len(data) % ALIGN))
            entry["bias"] = [len(data), len(data) + len(bias)]
            data.extend(bias)
        entries.append(entry)
    header = json.dumps({"identity": "fuzz", "entries": entries}).encode()
    header_at = len(data)
    data.extend(header)
    data.extend(struct.pack("<QQ", header_at, len(header)) + b"CAPTPACK")
    return bytes(data)


def pack_seeds(out: Path, packs) -> None:
    folder = out / "pack"
    for i, path in enumerate(packs):
        write(folder, f"cut-{i}.pack", cut_pack(Path(path).read_bytes(), 1))
    # candle's quantized blocks (the weight cache's --quantize kinds), one
    # [2, 256] layer each: q8_0 is 34-byte blocks of 32, q4k 144-byte blocks of 256.
    for kind, size in [("q8_0", 2 * 8 * 34), ("q4k", 2 * 144)]:
        entry = {"name": f"l.{kind}.weight", "kind": kind, "n": 2, "k": 256, "xxh3": 0}
        panels = bytes((i * 7) % 251 for i in range(size))
        bias = struct.pack("<2f", 0.5, -0.5)
        write(folder, f"{kind}.pack", build_pack([(entry, panels, bias)]))


def main() -> None:
    out = Path(sys.argv[1])
    image_seeds(out)
    checkpoint_seeds(out)
    model_file_seeds(out)
    models_toml_seeds(out)
    pack_seeds(out, sys.argv[2:])


if __name__ == "__main__":
    main()
