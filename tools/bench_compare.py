"""Side-by-side speed and memory: the `caption` binary vs transformers, same
weights, same images, same machine, same run. Driven by bench/compare.sh.

    python tools/bench_compare.py --binary target/release/caption \
        --models bench/models/blip-base [...] --rounds 3 --threads 2

For each model, the scenarios alternate between the two sides, round by
round, so drift in the machine (thermal, other load) hits both alike:

  batch1     one image, greedy, exactly 20 new tokens: seconds per caption
  batch8     8 images in one batch, greedy, 20 new tokens: seconds per image
  beam3      one image, 3 beams, 20 new tokens: seconds per caption
  process    `caption photo.jpg` as a whole process (start-up, model load,
             one caption) vs the equivalent Python script: wall seconds.
             Ours with its weight cache in place, as every run but a
             model's first finds it
  first      the same for a model's first run, ours writing its weight
             cache (transformers has none: the same script as `process`)
  rss        peak resident memory of the `process` runs

Steady-state latency on our side is measured without instrumenting the
binary: one run captions K+1 copies of the image and another captions 1;
the difference over K is the per-caption time with the model loaded (the
Python side times processor + generate in a warm process). Every run asks
for exactly 20 new tokens (min = max), so random weights cannot make one
side stop early. Prints a table of ratios (ours / transformers: below 1 is
faster or smaller) and writes the raw figures as JSON.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "tests" / "fixtures" / "images" / "astronaut.jpg"
NEW_TOKENS = 20

# The Python side: a warm worker that loads the model once and times
# processor + generate, as a notebook user runs it.
WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from PIL import Image
from transformers import AutoConfig, AutoProcessor
from transformers import Blip2ForConditionalGeneration, BlipForConditionalGeneration
model_dir, image_path, scenario, repeats = sys.argv[1], sys.argv[3], sys.argv[4], int(sys.argv[5])
device, dtype = sys.argv[6], getattr(torch, sys.argv[7])
cls = Blip2ForConditionalGeneration if "Blip2" in AutoConfig.from_pretrained(model_dir).architectures[0] else BlipForConditionalGeneration
model = cls.from_pretrained(model_dir, dtype=dtype).to(device).eval()
processor = AutoProcessor.from_pretrained(model_dir)
image = Image.open(image_path)
batch = int(scenario[5:]) if scenario.startswith("batch") else 1
kwargs = dict(max_new_tokens=%d, min_new_tokens=%d, num_beams=3 if scenario == "beam3" else 1)
def once():
    inputs = processor(images=[image] * batch, return_tensors="pt").to(device, dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out
once()  # warm-up, as our side's subtraction removes its first caption
times = []
for _ in range(repeats):
    start = time.perf_counter()
    out = once()
    times.append((time.perf_counter() - start) / batch)
print(json.dumps({"seconds_per_image": min(times), "all": times, "shape": list(out.shape)}))
""" % (NEW_TOKENS, NEW_TOKENS)

# The whole-process Python equivalent of `caption photo.jpg`.
SCRIPT = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from PIL import Image
from transformers import AutoConfig, AutoProcessor
from transformers import Blip2ForConditionalGeneration, BlipForConditionalGeneration
model_dir = sys.argv[1]
cls = Blip2ForConditionalGeneration if "Blip2" in AutoConfig.from_pretrained(model_dir).architectures[0] else BlipForConditionalGeneration
model = cls.from_pretrained(model_dir).eval()
processor = AutoProcessor.from_pretrained(model_dir)
inputs = processor(images=Image.open(sys.argv[3]), return_tensors="pt")
with torch.inference_mode():
    out = model.generate(**inputs, max_new_tokens=%d, min_new_tokens=%d)
print(processor.batch_decode(out, skip_special_tokens=True)[0].strip())
""" % (NEW_TOKENS, NEW_TOKENS)


# Our weight cache goes to a folder of the benchmark's own, not the user's
# (a BLIP-2 cache is 15 GB); `first` empties it before each run.
CACHE = Path(tempfile.mkdtemp(prefix="caption-bench-cache-"))
OURS_ENV = {**os.environ, "XDG_CACHE_HOME": str(CACHE)}


def timed(cmd):
    """Wall seconds of one child process."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=OURS_ENV)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-2000:]}")
    return wall


def peak_rss(cmd):
    """Peak RSS (bytes) and wall seconds of one process, via GNU time (Python's
    RUSAGE_CHILDREN only keeps a running maximum over all children)."""
    time_bin = "/usr/bin/time"
    proc = subprocess.run([time_bin, "-f", "%M %e", *map(str, cmd)], capture_output=True, text=True,
                          env=OURS_ENV)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-2000:]}")
    kb, wall = proc.stderr.strip().splitlines()[-1].split()
    return int(kb) * 1024, float(wall)


# Our side's variants: the default float32 run and the reduced-precision options.
VARIANTS = {
    "f32": [],
    "f16": ["--dtype", "f16"],
    "bf16": ["--dtype", "bf16"],
    "q8_0": ["--quantize", "q8_0"],
    "q4k": ["--quantize", "q4k"],
}


def ours_cmd(binary, model, threads, scenario, copies, variant="f32", device="cpu"):
    cmd = [binary, "-q", "--no-exif-rotate", "-m", model, "--threads", str(threads), "--device", device,
           "--min-tokens", str(NEW_TOKENS), "--max-tokens", str(NEW_TOKENS), *VARIANTS[variant]]
    if scenario == "beam3":
        cmd += ["--beams", "3"]
    if scenario.startswith("batch"):
        cmd += ["--batch-size", scenario[5:]]
    return cmd + copies


def image_copies(folder: Path, n: int):
    """n hard links to the test image (distinct paths, same pixels)."""
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}{IMAGE.suffix}"
        if not p.exists():
            os.link(IMAGE, p)
        paths.append(str(p))
    return paths


def ours_per_image(binary, model, threads, scenario, k, folder, variant, device):
    batch = int(scenario[5:]) if scenario.startswith("batch") else 1
    small = image_copies(folder, batch)
    large = image_copies(folder, batch * (k + 1))
    t_small = min(timed(ours_cmd(binary, model, threads, scenario, small, variant, device)) for _ in range(2))
    t_large = timed(ours_cmd(binary, model, threads, scenario, large, variant, device))
    return (t_large - t_small) / (batch * k)


def theirs_per_image(python, model, threads, scenario, k, device, torch_dtype):
    proc = subprocess.run([python, "-c", WORKER, model, str(threads), str(IMAGE), scenario, str(k),
                           device, torch_dtype],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"transformers worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds_per_image"]


def machine():
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--scenarios", nargs="+", default=["batch1", "batch8", "beam3", "process", "first"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="captions per timing on each side")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--variants", nargs="+", default=["f32"], choices=sorted(VARIANTS),
                        help="our side's precision options, each timed against the same transformers run")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda[:N], for both sides (the process scenarios stay as they are)")
    parser.add_argument("--torch-dtype", default="float32",
                        help="transformers' weights and inputs: float32, float16 or bfloat16")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "compare.json"))
    args = parser.parse_args()

    import torch
    import transformers

    results = dict(machine=machine(), date=time.strftime("%Y-%m-%d"), threads=args.threads,
                   device=args.device, torch_dtype=args.torch_dtype,
                   transformers=transformers.__version__, torch=torch.__version__, new_tokens=NEW_TOKENS,
                   models={})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for model in args.models:
            name = Path(model).name
            names = ["transformers"] + [f"ours {v}" for v in args.variants]
            per = {s: {side: [] for side in names} for s in args.scenarios}
            if "process" in args.scenarios:
                per["rss"] = {side: [] for side in names}
            for round_ in range(args.rounds):
                for scenario in args.scenarios:
                    sides = names[1:] + names[:1] if round_ % 2 == 0 else names
                    for side in sides:
                        variant = side.split(" ", 1)[1] if side.startswith("ours") else None
                        if scenario in ("process", "first"):
                            if variant:
                                cmd = ours_cmd(args.binary, model, args.threads, "batch1", [str(IMAGE)], variant)
                                if scenario == "first":
                                    shutil.rmtree(CACHE / "caption" / "packed", ignore_errors=True)
                                else:
                                    # The cache as a model's first run leaves it.
                                    peak_rss(cmd)
                            else:
                                cmd = [args.python, "-c", SCRIPT, model, str(args.threads), str(IMAGE)]
                            rss, wall = peak_rss(cmd)
                            per[scenario][side].append(wall)
                            if scenario == "process":
                                per["rss"][side].append(rss)
                        elif variant:
                            per[scenario][side].append(ours_per_image(
                                args.binary, model, args.threads, scenario, args.repeats, folder, variant,
                                args.device))
                        else:
                            per[scenario][side].append(theirs_per_image(
                                args.python, model, args.threads, scenario, args.repeats, args.device,
                                args.torch_dtype))
                        last = per[scenario][side][-1]
                        print(f"{name} round {round_ + 1} {scenario} {side}: {last:.3f}", file=sys.stderr, flush=True)
            results["models"][name] = per

    shutil.rmtree(CACHE, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"# {results['machine']}; {args.threads} threads; transformers {results['transformers']}, "
          f"torch {results['torch']}; {results['date']}; median of {args.rounds} alternating rounds")
    variants = [f"ours {v}" for v in args.variants]
    print("| model | scenario | transformers | " + " | ".join(f"caption {v[5:]} (ratio)" for v in variants) + " |")
    print("|---|---|---|" + "---|" * len(variants))
    units = dict(batch1="s/caption", batch8="s/image", batch32="s/image", beam3="s/caption", process="s wall",
                 first="s wall, first run", rss="GB peak")
    for name, per in results["models"].items():
        for scenario, sides in per.items():
            scale = 1e9 if scenario == "rss" else 1
            theirs = statistics.median(sides["transformers"])
            cells = []
            for v in variants:
                ours = statistics.median(sides[v])
                cells.append(f"{ours / scale:.3f} ({ours / theirs:.2f}x)")
            print(f"| {name} | {scenario} ({units[scenario]}) | {theirs / scale:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
