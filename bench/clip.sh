#!/usr/bin/env bash
# CLIP embedding throughput of `caption embed` against transformers on the
# same machine, in the same run, on full-size random models built from the
# real configs.
#
#   bench/clip.sh [MODEL ...]        # default: clip-vit-base-patch32
#   ROUNDS=3 VARIANTS="f32 bf16" K="32 clip-vit-large-patch14=16" bench/clip.sh clip-vit-base-patch32 clip-vit-large-patch14
#
# MODEL is clip-vit-base-patch32 (~0.6 GB of disk) or clip-vit-large-patch14
# (~1.7 GB); they go to bench/models/ (git-ignored) and are built once. Needs
# the Python environment of tools/requirements.txt (PYTHON=path/to/python,
# default python3). BINARY=path/to/caption times that binary; without it,
# the release build is (re)built first. K: images per timing (a number for
# every model and/or MODEL=K; default 16 for ViT-L/14, 32 for B/32); TEXTS:
# texts per timing (0: images only); THREADS: each side's (default: all
# CPUs). Prints a Markdown table of ratios (our throughput / transformers':
# above 1 is faster); raw figures in bench/out/clip.json (OUT=another.json).
# Exits 1 if the two sides' f32 embeddings disagree. Run it on a quiet
# machine: both sides are timed in alternating rounds, but other load still
# adds noise.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-3}
VARIANTS=${VARIANTS:-f32 bf16}
TEXTS=${TEXTS:-256}
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(clip-vit-base-patch32)

if [ -z "${BINARY:-}" ]; then
  cargo build --release --locked --quiet
  BINARY=target/release/caption
fi
dirs=()
for m in "${models[@]}"; do
  [ -f "bench/models/$m/config.json" ] || "$PYTHON" tools/make_full_size_models.py --only "$m"
  dirs+=("bench/models/$m")
done
extra=()
[ -n "${K:-}" ] && extra+=(--k $K)
[ -n "${THREADS:-}" ] && extra+=(--threads "$THREADS")
[ -n "${OUT:-}" ] && extra+=(--out "$OUT")
"$PYTHON" tools/bench_clip.py --binary "$BINARY" --python "$PYTHON" --rounds "$ROUNDS" \
  --variants $VARIANTS --texts "$TEXTS" --models "${dirs[@]}" ${extra[@]+"${extra[@]}"}
