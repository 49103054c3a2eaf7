#!/usr/bin/env bash
# LLaVA-1.5-7b: time to first token and decoding rate, ours against
# transformers, on the same full-size random weights (bf16, 14 GB, built
# once into bench/models/llava-1.5-7b by tools/make_full_size_models.py),
# the same image and prompt, on this machine.
#
#   PYTHON=/path/to/python bench/llava.sh            # VARIANTS="bf16 q8_0 q4k" ROUNDS=2 NEW_TOKENS=16
#
# A 7B model is loaded by one side at a time (both would not fit in 24 GB),
# so the sides run one after the other, transformers first and last (its
# two figures bracket ours: drift in the machine shows as their spread).
# Prints JSON lines, then a Markdown table of ratios (ours / transformers'
# time to first token: below 1 is faster; our decode rate / theirs: above 1
# is faster). Raw figures in bench/out/llava.json (OUT=another.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-2}
NEW_TOKENS=${NEW_TOKENS:-16}
VARIANTS=${VARIANTS:-bf16 q8_0 q4k}
OUT=${OUT:-bench/out/llava.json}
MODEL=bench/models/llava-1.5-7b
[ -f "$MODEL/config.json" ] || "$PYTHON" tools/make_full_size_models.py --only llava-1.5-7b
mkdir -p "$(dirname "$OUT")"
cargo build --release --locked --quiet --bench llava
bench=$(ls -t target/release/deps/llava-* | grep -v '\.d$' | head -1)
common=(--rounds "$ROUNDS" --new-tokens "$NEW_TOKENS")
results=()
theirs() { "$PYTHON" tools/bench_llava.py "$MODEL" --dtype bf16 "${common[@]}"; }
results+=("{\"side\": \"transformers bf16\", \"run\": $(theirs)}")
for variant in $VARIANTS; do
  case $variant in
    bf16) flags=(--dtype bf16) ;;
    q8_0|q4k) flags=(--dtype bf16 --quantize "$variant") ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  # The weight cache off: every run packs or quantizes at load (load time is
  # reported, not compared).
  results+=("{\"side\": \"caption $variant\", \"run\": $(CAPTION_NO_WEIGHT_CACHE=1 "$bench" "$MODEL" "${flags[@]}" "${common[@]}")}")
done
results+=("{\"side\": \"transformers bf16 (again)\", \"run\": $(theirs)}")
printf '%s\n' "${results[@]}" | tee "$OUT"
"$PYTHON" - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
theirs = [r["run"] for r in rows if r["side"].startswith("transformers")]
t_ttft = statistics.median(t for run in theirs for t in run["ttft_s"])
t_rate = statistics.median(t for run in theirs for t in run["decode_tokens_per_s"])
print(f"\n| LLaVA-1.5-7b ({theirs[0]['prompt_tokens']}-token prompt) | time to first token (s) | decode (tokens/s) |")
print("|---|---|---|")
print(f"| transformers bf16 | {t_ttft:.2f} | {t_rate:.2f} |")
for r in rows:
    if r["side"].startswith("caption"):
        ttft = statistics.median(r["run"]["ttft_s"])
        rate = statistics.median(r["run"]["decode_tokens_per_s"])
        print(f"| {r['side']} | {ttft:.2f} ({ttft / t_ttft:.2f}x) | {rate:.2f} ({rate / t_rate:.2f}x) |")
PY
