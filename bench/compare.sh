#!/usr/bin/env bash
# Speed and memory of `caption` against transformers on the same machine, in
# the same run, on full-size random models built from the real configs.
#
#   bench/compare.sh [MODEL ...]        # default: blip-base
#   ROUNDS=3 VARIANTS="f32 bf16 q8_0 q4k" bench/compare.sh blip-base blip-large
#
# MODEL is one of blip-base, blip-large, blip2-opt-2.7b. Needs the Python
# environment of tools/requirements.txt (PYTHON=path/to/python, default
# python3) and about 2 GB of disk per BLIP model, 15 GB for BLIP-2; the models
# go to bench/models/ (git-ignored) and are built once. Prints a Markdown
# table of ratios; raw figures in bench/out/compare.json. Run it on a quiet
# machine: both sides are timed in alternating rounds, but other load still
# adds noise.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-3}
# Our side's precision options to time: any of f32 bf16 q8_0 q4k.
VARIANTS=${VARIANTS:-f32 q8_0 q4k}
# Which measurements: any of batch1 batch8 beam3 process first (process includes peak RSS;
# first is a model's first run, which writes our weight cache).
SCENARIOS=${SCENARIOS:-batch1 batch8 beam3 process first}
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(blip-base)

cargo build --release --locked --quiet
dirs=()
for m in "${models[@]}"; do
  [ -f "bench/models/$m/config.json" ] || "$PYTHON" tools/make_full_size_models.py --only "$m"
  dirs+=("bench/models/$m")
done
"$PYTHON" tools/bench_compare.py --binary target/release/caption --python "$PYTHON" \
  --rounds "$ROUNDS" --variants $VARIANTS --scenarios $SCENARIOS --models "${dirs[@]}"
