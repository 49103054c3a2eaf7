"""CLIP embedding throughput: `caption embed` vs transformers, same weights,
same images, same machine, same run. Driven by bench/clip.sh.

    python tools/bench_clip.py --binary target/release/caption \
        --models bench/models/clip-vit-base-patch32 bench/models/clip-vit-large-patch14 \
        [--variants f32 bf16] [--rounds 3] [--threads N] [--k 32 clip-vit-large-patch14=16] [--texts 256]

For each model and variant (f32, bf16: ours `--dtype`, transformers'
`dtype=`), the two sides alternate round by round, so drift in the machine
(thermal, other load) hits both alike:

  images   images/s at batch 32, model load excluded on both sides. Ours:
           `caption embed --batch-size 32 -o out.npy FOLDER` over a folder
           of 2K images minus the same over K, divided by K; the 2K folder
           holds the K images twice (hard links), so the difference is the
           same K images that transformers is timed on. Theirs: one process
           loads CLIPModel and CLIPImageProcessorPil, embeds one batch to
           warm up, then times image open + processor + get_image_features
           + L2 normalisation over the K images in batches of 32 (batches of
           K when K < 32; ours then runs one batch of K and one of 2K).
  texts    texts/s, the same way: `caption embed --text ...` over 2N texts
           minus N texts (N short sentences, the 2N run has them twice), vs
           tokenizer + get_text_features + normalisation in batches of 64
           (ours encodes 64 texts per pass, each group padded to its longest;
           transformers is given padding=True per batch of 64, the same;
           its warm-up is one whole pass, since the padded lengths differ
           from batch to batch). `--texts 0` skips it.

Both sides run the first K images once before round 1 (ours: writes the
weight cache, to a temporary folder of the benchmark's own via HOME and
XDG_CACHE_HOME; page cache warm for both). The images are copies of the
photos in tests/fixtures/images, cropped, flipped and resized to a long side
of about --image-side pixels (JPEG and PNG as their sources), so decoding is
part of both sides' figures as it is of a real run.

The embeddings of both sides are compared image by image (and text by
text): in f32 every cosine must exceed 0.999, or the run says so and exits 1
(after writing its results). Random weights make every image embed to a
similar vector, so the cosines are also given after subtracting
transformers' mean embedding ("centred"), which only agrees when the
image-specific part does; the largest cosine between two different images
shows how much the raw check can tell apart.

Prints a Markdown table: each cell is our throughput and, in parentheses,
ours / transformers' from the same run: ABOVE 1 IS FASTER (the reverse of
bench_compare.py's time ratios). Raw figures go to bench/out/clip.json.
"""

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_IMAGES = ROOT / "tests" / "fixtures" / "images"
# The photographs among the test images (the others are made-up edge cases);
# examples/photos holds copies of two of them.
PHOTOS = ["astronaut.jpg", "camera_gray.png", "chelsea.png", "coffee.jpg", "rocket.jpg"]
BATCH = 32
TEXTS_PER_PASS = 64  # ours: TEXTS_PER_PASS in src/captioner/embed.rs
DTYPES = {"f32": "float32", "bf16": "bfloat16"}

# The transformers side: one warm process per model, variant and round.
WORKER = r"""
import json, sys, time
a = json.loads(sys.argv[1])
import numpy as np
import torch
torch.set_num_threads(a["threads"])
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel
dtype = getattr(torch, a["dtype"])
start = time.perf_counter()
model = CLIPModel.from_pretrained(a["model"], dtype=dtype).eval()
processor = CLIPImageProcessorPil.from_pretrained(a["model"])
tokenizer = AutoTokenizer.from_pretrained(a["model"])
load = time.perf_counter() - start

def features(out):
    # transformers 5 returns the model output with the projection in pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output

def images(paths):
    rows = []
    for i in range(0, len(paths), a["batch"]):
        batch = [Image.open(p) for p in paths[i:i + a["batch"]]]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(dtype)
        with torch.inference_mode():
            x = features(model.get_image_features(pixel_values=pixel_values))
            x = x / x.norm(p=2, dim=-1, keepdim=True)
        rows.append(x.float())
    return torch.cat(rows)

def texts(texts):
    rows = []
    for i in range(0, len(texts), a["text_batch"]):
        inputs = tokenizer(texts[i:i + a["text_batch"]], padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            x = features(model.get_text_features(**inputs))
            x = x / x.norm(p=2, dim=-1, keepdim=True)
        rows.append(x.float())
    return torch.cat(rows)

result = {"load_s": load}
paths = a["images"]
images(paths[:a["batch"]])  # warm-up, as our side's subtraction removes its fixed costs
start = time.perf_counter()
x = images(paths)
result["images_s"] = time.perf_counter() - start
np.save(a["image_out"], x.numpy())
if a["texts"]:
    # Warm-up: one whole pass, as the batches' padded lengths differ (oneDNN
    # prepares its bf16 kernels per shape) and our side's 2N run repeats them too.
    texts(a["texts"])
    start = time.perf_counter()
    x = texts(a["texts"])
    result["texts_s"] = time.perf_counter() - start
    np.save(a["text_out"], x.numpy())
print(json.dumps(result))
"""


def machine():
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                key, value = (s.strip() for s in line.split(":", 1))
                info.setdefault(key, value)
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    features = [name for flag, name in [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
                                        ("avx512_vnni", "AVX512-VNNI"), ("amx_bf16", "AMX-BF16")] if flag in flags]
    cpu = info.get("model name", platform.processor() or "unknown CPU")
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']} model {info.get('model', '?')})"
    return f"{cpu}, {os.cpu_count()} CPUs, {', '.join(features) or 'no AVX2'}, {platform.system()}"


def make_images(folder: Path, k: int, side: int):
    """k different photos (crops, flips and sizes of the fixture photos), named
    so that a folder listing sorts them in order; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(k * 1000 + side)
    paths = []
    for i in range(k):
        name = PHOTOS[i % len(PHOTOS)]
        with Image.open(FIXTURE_IMAGES / name) as source:
            im = source.copy()
        w, h = im.size
        # A crop of 70-100% of each side, so no two copies have the same pixels.
        cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            im = ImageOps.mirror(im)
        long_side = int(side * rng.uniform(0.75, 1.25))
        scale = long_side / max(cw, ch)
        im = im.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.LANCZOS)
        suffix = Path(name).suffix
        path = folder / f"img{i:04d}{suffix}"
        if suffix == ".jpg":
            im.save(path, quality=90)
        else:
            im.save(path)
        paths.append(path)
    return paths


def doubled(folder: Path, paths):
    """A folder holding each of paths twice (hard links), in the same order."""
    folder.mkdir(parents=True, exist_ok=True)
    for copy in range(2):
        for i, p in enumerate(paths):
            link = folder / f"img{copy * len(paths) + i:04d}{p.suffix}"
            if not link.exists():
                os.link(p, link)
    return folder


def make_texts(n: int):
    """n short captions, all different, deterministic."""
    colours = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey"]
    things = ["cat", "dog", "car", "bicycle", "cup of coffee", "rocket", "astronaut", "house", "tree",
              "bird", "boat", "horse", "camera", "flower", "train", "chair"]
    places = ["on a table", "in the street", "at night", "near the sea", "in a field", "on the moon",
              "in a kitchen", "under the rain"]
    templates = ["a photo of a {c} {t} {p}", "a {c} {t} {p}", "a blurry picture of a {c} {t} {p}",
                 "there is a {c} {t} {p}"]
    out = []
    rng = random.Random(n)
    seen = set()
    while len(out) < n:
        text = rng.choice(templates).format(c=rng.choice(colours), t=rng.choice(things), p=rng.choice(places))
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


class Runner:
    def __init__(self, args, tmp: Path):
        self.args = args
        self.tmp = tmp
        home = tmp / "home"
        home.mkdir()
        # Our weight cache and anything else that would go to ~ stay in tmp.
        self.env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(tmp / "cache")}
        self.env.pop("CAPTION_NO_WEIGHT_CACHE", None)
        self.env.pop("CAPTION_CLIP_MODEL", None)
        self.prefix = []
        cpus = sorted(os.sched_getaffinity(0))
        if args.pin and args.threads < len(cpus):
            # Both sides on the same cores: ours may decode on threads of its own.
            self.prefix = ["taskset", "-c", ",".join(map(str, cpus[:args.threads]))]

    def run(self, cmd, what):
        start = time.perf_counter()
        proc = subprocess.run(self.prefix + [str(c) for c in cmd], capture_output=True, text=True, env=self.env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{what} failed ({proc.returncode}): {' '.join(map(str, cmd))[:500]}\n"
                             f"{proc.stderr[-3000:]}")
        return wall, proc.stdout

    def ours_base(self, model, variant):
        return [self.args.binary, "embed", "-q", "--no-exif-rotate", "-m", model, "--threads", self.args.threads,
                "--device", "cpu", "--dtype", variant]

    def ours_images(self, model, variant, folder, out):
        cmd = self.ours_base(model, variant) + ["--batch-size", BATCH, "-o", out, folder]
        return self.run(cmd, "caption embed")[0]

    def ours_texts(self, model, variant, texts):
        cmd = self.ours_base(model, variant)
        for t in texts:
            cmd += ["--text", t]
        wall, stdout = self.run(cmd, "caption embed --text")
        rows = [json.loads(line) for line in stdout.splitlines() if line.strip()]
        assert [r["text"] for r in rows] == texts, "caption embed --text: texts out of order"
        return wall, np.array([r["embedding"] for r in rows], dtype=np.float32)

    def theirs(self, model, variant, paths, texts, image_out, text_out):
        job = dict(model=str(model), dtype=DTYPES[variant], threads=self.args.threads, batch=BATCH,
                   text_batch=TEXTS_PER_PASS, images=[str(p) for p in paths], texts=texts,
                   image_out=str(image_out), text_out=str(text_out))
        _, stdout = self.run([self.args.python, "-c", WORKER, json.dumps(job)], "transformers worker")
        return json.loads(stdout.strip().splitlines()[-1])


def fmt(x, digits):
    return "n/a (2K run not slower than K)" if x is None else f"{x:.{digits}f}"


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def agreement(ours, theirs, reference):
    """Per-row cosines of ours vs theirs, raw and with reference's mean row
    subtracted from both, and the largest cosine between two different rows
    of reference."""
    mean = reference.mean(axis=0, keepdims=True)
    normed = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    gram = normed @ normed.T
    np.fill_diagonal(gram, -1.0)
    raw = cosines(ours, theirs)
    centred = cosines(ours - mean, theirs - mean)
    return dict(min_cosine=float(raw.min()), mean_cosine=float(raw.mean()),
                min_centred_cosine=float(centred.min()), max_cosine_between_different=float(gram.max()))


def parse_k(tokens, names):
    """'--k 32 clip-vit-large-patch14=16': a default and per-model values; the
    default default is 16 for a ViT-L (vision width >= 1024), else 32."""
    default, per = None, {}
    for token in tokens or []:
        if "=" in token:
            name, value = token.split("=", 1)
            per[name] = int(value)
        else:
            default = int(token)
    ks = {}
    for name, model in names.items():
        if name in per:
            ks[name] = per[name]
        elif default is not None:
            ks[name] = default
        else:
            width = json.loads((Path(model) / "config.json").read_text())["vision_config"]["hidden_size"]
            ks[name] = 16 if width >= 1024 else 32
    return ks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", required=True)
    parser.add_argument("--python", default=sys.executable, help="the Python with torch and transformers")
    parser.add_argument("--models", nargs="+", required=True, help="CLIP model folders")
    parser.add_argument("--variants", nargs="+", default=["f32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--k", nargs="*", metavar="[MODEL=]K",
                        help="images per timing: K for every model and/or MODEL=K (folder name); "
                             "default 16 for ViT-L, 32 otherwise")
    parser.add_argument("--texts", type=int, default=256, help="texts per timing; 0: no text timing")
    parser.add_argument("--image-side", type=int, default=640, help="about this long side, in pixels")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="with --threads below the CPU count, do not pin both sides to the same CPUs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "clip.json"))
    args = parser.parse_args()
    args.binary = str(Path(args.binary).resolve())
    names = {Path(m).name: str(Path(m).resolve()) for m in args.models}
    ks = parse_k(args.k, names)
    texts = make_texts(args.texts) if args.texts else []

    import torch
    import transformers

    results = dict(machine=machine(), date=time.strftime("%Y-%m-%d"), threads=args.threads, rounds=args.rounds,
                   batch=BATCH, texts=args.texts, image_side=args.image_side, k=ks,
                   transformers=transformers.__version__, torch=torch.__version__,
                   binary=args.binary, models={})
    failed = []
    tmp = Path(tempfile.mkdtemp(prefix="caption-bench-clip-"))
    try:
        runner = Runner(args, tmp)
        image_sets = {}
        for name, model in names.items():
            k = ks[name]
            if k not in image_sets:
                paths = make_images(tmp / f"images-{k}", k, args.image_side)
                image_sets[k] = (paths, tmp / f"images-{k}", doubled(tmp / f"images-{k}-twice", paths))
            paths, folder_k, folder_2k = image_sets[k]
            per = {v: {"ours": {}, "theirs": {}} for v in args.variants}
            embeddings = {}
            for v in args.variants:
                # Warm-up: our weight cache for this model and dtype, the page cache for both.
                runner.ours_images(model, v, folder_k, tmp / "warm.npy")
                if texts:
                    runner.ours_texts(model, v, texts[:TEXTS_PER_PASS])
            for round_ in range(args.rounds):
                for v in args.variants:
                    sides = ["ours", "theirs"] if round_ % 2 == 0 else ["theirs", "ours"]
                    for side in sides:
                        rec = per[v][side]
                        if side == "ours":
                            out_k = tmp / f"ours-{name}-{v}-k.npy"
                            t_k = runner.ours_images(model, v, folder_k, out_k)
                            out_2k = tmp / f"ours-{name}-{v}-2k.npy"
                            t_2k = runner.ours_images(model, v, folder_2k, out_2k)
                            assert np.load(out_2k).shape[0] == 2 * k, f"{out_2k}: not {2 * k} embeddings"
                            rec.setdefault("images_k_s", []).append(t_k)
                            rec.setdefault("images_2k_s", []).append(t_2k)
                            rec.setdefault("images_per_s", []).append(k / (t_2k - t_k) if t_2k > t_k else None)
                            listed = [json.loads(line) for line in Path(str(out_k) + ".paths").read_text().splitlines()]
                            order = [Path(p).name for p in listed]
                            assert order == [p.name for p in paths], f"unexpected order of embeddings: {order[:4]}"
                            embeddings[("ours", v, "images")] = np.load(out_k)
                            if texts:
                                t_n, emb = runner.ours_texts(model, v, texts)
                                t_2n, _ = runner.ours_texts(model, v, texts + texts)
                                rec.setdefault("texts_n_s", []).append(t_n)
                                rec.setdefault("texts_2n_s", []).append(t_2n)
                                n = len(texts)
                                rec.setdefault("texts_per_s", []).append(n / (t_2n - t_n) if t_2n > t_n else None)
                                embeddings[("ours", v, "texts")] = emb
                        else:
                            image_out, text_out = tmp / f"theirs-{name}-{v}-images.npy", tmp / f"theirs-{name}-{v}-texts.npy"
                            r = runner.theirs(model, v, paths, texts, image_out, text_out)
                            rec.setdefault("load_s", []).append(r["load_s"])
                            rec.setdefault("images_s", []).append(r["images_s"])
                            rec.setdefault("images_per_s", []).append(k / r["images_s"])
                            embeddings[("theirs", v, "images")] = np.load(image_out)
                            if texts:
                                rec.setdefault("texts_s", []).append(r["texts_s"])
                                rec.setdefault("texts_per_s", []).append(len(texts) / r["texts_s"])
                                embeddings[("theirs", v, "texts")] = np.load(text_out)
                        msg = f"images/s {fmt(rec['images_per_s'][-1], 3)}"
                        if texts:
                            msg += f", texts/s {fmt(rec['texts_per_s'][-1], 2)}"
                        print(f"{name} {v} round {round_ + 1} {side}: {msg}", file=sys.stderr, flush=True)
            # Do both sides compute the same thing?
            check = {}
            for kind in ["images"] + (["texts"] if texts else []):
                ref_v = "f32" if "f32" in args.variants else args.variants[0]
                reference = embeddings[("theirs", ref_v, kind)]
                for v in args.variants:
                    ours, theirs = embeddings[("ours", v, kind)], embeddings[("theirs", v, kind)]
                    check[f"{kind} {v}: caption vs transformers"] = agreement(ours, theirs, reference)
                    if v != ref_v:
                        check[f"{kind} {v}: caption vs transformers {ref_v}"] = agreement(
                            ours, embeddings[("theirs", ref_v, kind)], reference)
                        check[f"{kind} {v}: transformers vs transformers {ref_v}"] = agreement(
                            theirs, embeddings[("theirs", ref_v, kind)], reference)
            for key, c in check.items():
                print(f"{name} agreement, {key}: min cosine {c['min_cosine']:.6f}, centred "
                      f"{c['min_centred_cosine']:.6f} (different images/texts up to {c['max_cosine_between_different']:.6f})",
                      file=sys.stderr)
                if key.endswith("f32: caption vs transformers") and not (c["min_cosine"] > 0.999 and
                                                                          c["min_centred_cosine"] > 0.999):
                    failed.append(f"{name} {key}: min cosine {c['min_cosine']:.6f}, centred {c['min_centred_cosine']:.6f}")
            results["models"][name] = dict(k=k, per=per, agreement=check)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")

    print(f"# {results['machine']}; {args.threads} threads each side; transformers {results['transformers']}, "
          f"torch {results['torch']}; {results['date']}; median of {args.rounds} alternating rounds; "
          f"batch {BATCH}, load excluded; ratio = caption / transformers throughput, above 1 is faster")
    text_cols = " texts/s transformers | texts/s caption (ratio) |" if texts else ""
    print(f"| model | dtype | images/s transformers | images/s caption (ratio) |{text_cols} min cosine (images) |")
    print("|---|---|---|---|" + ("---|---|" if texts else "") + "---|")

    def med(xs):
        xs = [x for x in xs if x is not None]  # None: a difference lost in the noise
        return statistics.median(xs) if xs else float("nan")

    def cell(ours, theirs, digits):
        o, t = med(ours), med(theirs)
        return "n/a" if o != o else f"{o:.{digits}f} ({o / t:.2f}x)"

    for name, r in results["models"].items():
        for v in args.variants:
            ours, theirs = r["per"][v]["ours"], r["per"][v]["theirs"]
            cells = [f"{med(theirs['images_per_s']):.2f}", cell(ours["images_per_s"], theirs["images_per_s"], 2)]
            if texts:
                cells += [f"{med(theirs['texts_per_s']):.1f}", cell(ours["texts_per_s"], theirs["texts_per_s"], 1)]
            cos = r["agreement"][f"images {v}: caption vs transformers"]["min_cosine"]
            cells.append(f"{cos:.5f}")
            print(f"| {name} (K={r['k']}) | {v} | " + " | ".join(cells) + " |")
    for name, r in results["models"].items():
        if "f32" in args.variants:
            for v in args.variants:
                if v == "f32":
                    continue
                ours, theirs = r["per"][v]["ours"], r["per"]["f32"]["theirs"]
                line = f"{name}: caption {v} / transformers f32: images {med(ours['images_per_s']) / med(theirs['images_per_s']):.2f}x"
                if texts:
                    line += f", texts {med(ours['texts_per_s']) / med(theirs['texts_per_s']):.2f}x"
                print(line)
    if failed:
        print("\nThe two sides DISAGREE in f32 (cosine <= 0.999): not the same computation:\n  " + "\n  ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
