#!/usr/bin/env bash
# How fast the loader decodes and resizes photos, by decoder threads: a
# folder of N camera-sized JPEGs (2 to 12 megapixels, photo-like content:
# smooth gradients, shapes and sensor noise, quality 90) captioned with the
# built-in demo model, whose own work is a few milliseconds per image, so
# the run's rate is the loader's. Compare it with a model's batch rate
# (bench/compare.sh) to see whether that model ever waits on decoding.
#
#   bench/decode.sh                       # N=200, THREADS="1 2"
#   N=1000 THREADS="1 2 4 8" BATCH=8 bench/decode.sh
#
# The JPEGs go to bench/photos-N/ (git-ignored), made once with Pillow
# (PYTHON=path/to/python with tools/requirements.txt; default python3).
# BINARY=path/to/caption times that binary; without it, the release build
# is (re)built first. Prints images/s per thread count, best of ROUNDS.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
N=${N:-200}
THREADS=${THREADS:-1 2}
BATCH=${BATCH:-8}
ROUNDS=${ROUNDS:-2}
photos=bench/photos-$N

if [ -z "${BINARY:-}" ]; then
  cargo build --release --locked --quiet
  BINARY=target/release/caption
fi
if [ ! -f "$photos/done" ]; then
  mkdir -p "$photos"
  "$PYTHON" - "$photos" "$N" <<'PY'
import random, sys
import numpy as np
from PIL import Image, ImageDraw
out, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
np_rng = np.random.default_rng(0)
for i in range(n):
    mp = rng.uniform(2, 12)
    w = int((mp * 1e6 * 4 / 3) ** 0.5)
    h = int(w * 3 / 4)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        r = rng.randrange(20, max(21, w // 6))
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    noisy = np.asarray(img).astype(np.int16) + np_rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(f"{out}/{i:05d}.jpg", quality=90)
PY
  touch "$photos/done"
fi
megapixels=$("$PYTHON" -c "
import sys
from PIL import Image
import glob
s = [Image.open(p).size for p in glob.glob('$photos/*.jpg')]
print(f'{sum(w * h for w, h in s) / len(s) / 1e6:.1f}')")
echo "$N JPEGs, mean $megapixels MP, batch $BATCH, $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
echo "| decoder threads | images/s |"
echo "|---|---|"
for t in $THREADS; do
  best=0
  for _ in $(seq "$ROUNDS"); do
    start=$(date +%s.%N)
    "$BINARY" -m demo --quiet --batch-size "$BATCH" --decode-threads "$t" "$photos" > /dev/null
    end=$(date +%s.%N)
    rate=$(echo "$N / ($end - $start)" | bc -l)
    best=$(echo "if ($rate > $best) $rate else $best" | bc -l)
  done
  printf "| %s | %.2f |\n" "$t" "$best"
done
