#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, its driver and the CUDA
# toolkit (nvcc, cuBLAS, cuRAND, NVRTC), build with CUDA and prove it there.
#
#   bench/gpu.sh [FULL_SIZE_MODEL_DIR...]
#
# 1. builds `--features cuda` for this GPU's compute capability
#    (CUDA_COMPUTE_CAP, read from nvidia-smi unless set);
# 2. runs the parity tests on the GPU (CAPTION_TEST_DEVICE=cuda: the same
#    tests and tolerances as on the CPU, transformers' recorded outputs);
# 3. captions the demo folder on the GPU;
# 4. for each model folder given (full-size random weights from
#    tools/make_full_size_models.py, e.g. bench/models/blip-base and
#    bench/models/blip2-opt-2.7b), times captioning at batch 1, 8 and 32 in
#    f16, bf16 and f32 against transformers on the same GPU, when the Python
#    in $PYTHON (default python3) has torch with CUDA; prints the ratios.
#
# Output goes to stdout and bench/out/gpu-*.json; paste the tables into
# README.md's GPU section and bench/RESULTS.md, with the GPU's name.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null; then
    echo "gpu.sh: no nvidia-smi here: this needs a machine with an NVIDIA GPU and its driver" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)}
export CUDA_COMPUTE_CAP
echo "== build (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
cargo build --release --locked --features cuda
target/release/caption --version

echo "== parity on the GPU"
CAPTION_TEST_DEVICE=cuda cargo test --release --locked --features cuda \
    --test blip_parity --test vqa_parity --test blip2_parity \
    --test generation_parity --test reduced_precision --test demo

echo "== the demo folder on the GPU"
target/release/caption --device cuda -m demo examples/

if [ "$#" -eq 0 ]; then
    echo "== no model folders given: no throughput measured"
    exit 0
fi
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import torch, transformers, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: $PYTHON has no torch with CUDA (or no transformers): no comparison" >&2
    exit 1
fi
mkdir -p bench/out
for pair in f16:float16 bf16:bfloat16 f32:float32; do
    ours=${pair%%:*}
    theirs=${pair#*:}
    echo "== throughput, caption --dtype $ours vs transformers $theirs"
    "$PYTHON" tools/bench_compare.py --binary target/release/caption --python "$PYTHON" \
        --device cuda --torch-dtype "$theirs" --variants "$ours" \
        --scenarios batch1 batch8 batch32 --rounds 3 --repeats 3 \
        --models "$@" --out "bench/out/gpu-$ours.json"
done
