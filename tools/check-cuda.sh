#!/usr/bin/env bash
# Build the CUDA variant (`cargo build --release --features cuda`) on a
# machine with no GPU, no driver and no system CUDA toolkit.
#
#   tools/check-cuda.sh
#
# What a pass proves:
#   - candle-kernels' build script ran NVIDIA's nvcc (CUDA 13.4) on every
#     kernel the cuda feature brings: the PTX kernels candle loads at run
#     time and the statically compiled ones (libmoe.a: MoE, mmvq/mmq GGUF),
#     for CUDA_COMPUTE_CAP only; and ptxas assembles every PTX kernel for
#     that architecture (what the driver's JIT does at run time);
#   - cudarc took its CUDA version (13.4) from that nvcc, and candle and our
#     crate compiled against those bindings, with our warnings denied;
#   - the binary linked (release profile, thin LTO) against the real CUDA
#     13.4 libraries (cuBLAS, cuRAND, cudart; cuBLASLt and NVRTC are on the
#     link line too, and dropped as unused) and a stub libcuda (below);
#   - it loads with every symbol bound (LD_BIND_NOW) and runs: `--device
#     auto` captions with the bundled demo model on the CPU, and `--device
#     cuda` fails with an error (the stub's CUDA_ERROR_STUB_LIBRARY), not a
#     crash.
# What it does not prove: that a kernel loads, runs or gives right answers on
# a GPU, that the PTX suits a given driver, or anything for another
# architecture than CUDA_COMPUTE_CAP. That needs a machine with a GPU.
#
# The toolkit comes from NVIDIA's wheels on PyPI, pinned below, in a venv in
# the cache (CAPTION_CUDA_CACHE, default ~/.cache/caption-ci/cuda): the
# CUDA 13 wheels share one tree, nvidia/cu13/{bin,include,lib,nvvm}, a
# toolkit layout nvcc finds its way in (its nvcc.profile). The CUDA 12
# nvcc wheel has no nvcc, only ptxas. Two things the wheels lack are made
# here: the unversioned libX.so links the linker looks for (a wheel ships
# only libX.so.N, the name programs load), and libcuda.so.
#
# libcuda.so is the driver's: no wheel ships it, and Debian's (libcuda1)
# is in non-free, which this machine's apt does not list, and is a 535
# driver (CUDA 12.2) anyway. A toolkit ships a link-time stub of it,
# lib/stubs/libcuda.so; so does this script, in the same place: a shared
# library, soname libcuda.so.1, that defines every function the 13.4 cuda.h
# declares (its legacy names too), each returning CUDA_ERROR_STUB_LIBRARY
# (34). The linker only checks names, so a symbol cudarc needs and cuda.h
# lacks still fails the link; the binary records libcuda.so.1, which a real
# driver provides at run time. The stub is loaded only by the smoke run
# below, from a folder of its own.
#
# CUDA_COMPUTE_CAP (default 80: Ampere, A100, the lowest architecture on
# which candle compiles every kernel, bf16 WMMA included; 90 and above get
# arch-specific sm_90a-style code) picks the one architecture nvcc compiles
# for; the count of kernels, and so the time, is the same for any.
#
# Time on 2 cores, with other jobs running: cold, 20.5-26 minutes (the
# wheels ~20 s; ptxas ~20 s; candle-kernels' nvcc ~16 min, mostly the mmq GGUF kernels,
# which the rest of the build waits for; the LTO link ~3.5 min). With the
# cache warm: a second in the same clone, 2.5 minutes in a fresh one (our
# two crates and the link). Everything is kept in $CAPTION_CUDA_CACHE
# (2.6 GB: venv 1.2, target 1.4), outside the clone.
set -euo pipefail

# Keep these in step: cudarc 0.19 knows CUDA up to 13.4 (`nvcc --version`
# must say one it knows), and the versions are those of PyPI's
# cuda-toolkit==13.4.3 meta-package.
WHEELS=(
    nvidia-cuda-nvcc==13.4.92
    nvidia-nvvm==13.4.92
    nvidia-cuda-crt==13.4.92
    nvidia-cuda-runtime==13.4.92
    nvidia-cuda-cccl==13.3.4.3.1
    nvidia-cuda-nvrtc==13.4.92
    nvidia-cublas==13.8.0.4
    nvidia-curand==10.4.4.72
)
CUDA_VERSION=13.4

die() { echo "check-cuda: error: $*" >&2; exit 1; }
note() { echo "check-cuda: $*" >&2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$repo/Cargo.toml" ]] || die "no Cargo.toml in $repo"
cache="${CAPTION_CUDA_CACHE:-$HOME/.cache/caption-ci/cuda}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
venv="$cache/venv"

# --- the toolkit (skipped when the venv holds exactly these wheels) ----------
stamp="$venv/caption-wheels"
if [[ ! -f $stamp || "$(cat "$stamp")" != "${WHEELS[*]}" ]]; then
    note "installing ${WHEELS[*]} into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    # --no-deps: the list above is the whole toolkit, every version pinned.
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps \
        --only-binary=:all: "${WHEELS[@]}" || die "pip install failed"

    tk="$("$venv/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
    [[ -x $tk/bin/nvcc ]] || die "no nvcc in $tk/bin"
    # The link names: libcublas.so -> libcublas.so.13, and so on.
    for lib in "$tk"/lib/lib*.so.*; do
        base="${lib%%.so.*}.so"
        [[ -e $base ]] || ln -s "$(basename "$lib")" "$base"
    done
    # The link-time stub of libcuda.so (see the header): every CUresult
    # function of cuda.h, with __CUDA_API_VERSION_INTERNAL so that the
    # unversioned legacy names are declared beside the _v2.._vN ones.
    mkdir -p "$tk/lib/stubs"
    echo '#include <cuda.h>' |
        gcc -E -P -D__CUDA_API_VERSION_INTERNAL -I"$tk/include" -x c - |
        tr '\n' ' ' | grep -oE 'CUresult +cu[A-Za-z0-9_]+ *\(' |
        sed -E 's/^CUresult +//; s/ *\($//' | sort -u > "$tk/lib/stubs/libcuda.symbols"
    (($(wc -l < "$tk/lib/stubs/libcuda.symbols") > 400)) || die "found too few functions in cuda.h"
    {
        echo '/* Link-time stub of the CUDA driver library, generated by tools/check-cuda.sh. */'
        echo '/* Never to be loaded in place of a driver: every function fails. */'
        sed -E 's/.*/int &(void) { return 34; \/* CUDA_ERROR_STUB_LIBRARY *\/ }/' "$tk/lib/stubs/libcuda.symbols"
    } > "$tk/lib/stubs/libcuda.c"
    gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$tk/lib/stubs/libcuda.so" "$tk/lib/stubs/libcuda.c"
    echo "${WHEELS[*]}" > "$stamp"
fi
tk="$("$venv/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"

# --- the environment ---------------------------------------------------------
# cudarc reads `nvcc --version` from PATH and links from CUDA_HOME's lib and
# lib/stubs; cudaforge (candle-kernels' build script) takes NVCC. The other
# toolkit variables cudarc reads would add their own library folders: unset.
unset CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB CUDARC_CUDA_VERSION NVCC_CCBIN
export PATH="$tk/bin:$PATH"
export NVCC="$tk/bin/nvcc"
export CUDA_HOME="$tk"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
# cudaforge runs nvcc on half the cores unless told otherwise.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
export CARGO_TARGET_DIR="$cache/target"
export RUSTFLAGS="-D warnings"

nvcc_version="$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
[[ $nvcc_version == "$CUDA_VERSION" ]] || die "nvcc is CUDA '$nvcc_version', expected $CUDA_VERSION"
note "nvcc $nvcc_version ($tk), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, artifacts in $CARGO_TARGET_DIR"

# --- the build ---------------------------------------------------------------
cd "$repo"
cmd=(cargo build --release --locked --features cuda)
note "${cmd[*]}"
"${cmd[@]}" || die "cargo build --features cuda failed (errors above)"
bin="$CARGO_TARGET_DIR/release/caption"

# --- the PTX kernels ---------------------------------------------------------
# candle loads these as PTX and the driver compiles them at run time, so the
# build never assembled them: ptxas does it here, for the architecture in
# their .target line (~20 s; skipped while none has changed since).
out="$(ls -dt "$CARGO_TARGET_DIR"/release/build/candle-kernels-*/out | head -n 1)"
ptx=("$out"/*.ptx)
[[ -f ${ptx[0]} ]] || die "no PTX kernels in $out"
ptx_arch() { sed -n 's/^\.target[[:space:]]*\(sm_[0-9a-z]*\).*/\1/p' "$1" | head -n 1; }
ok="$out/ptxas-ok"
if [[ ! -f $ok || -n "$(find "${ptx[@]}" -newer "$ok")" ]]; then
    rm -f "$ok"
    for f in "${ptx[@]}"; do
        arch="$(ptx_arch "$f")"
        [[ -n $arch ]] || die "no .target in $f"
        ptxas -arch="$arch" -o /dev/null "$f" || die "ptxas -arch=$arch rejects $f"
    done
    touch "$ok"
fi
note "${#ptx[@]} PTX kernels assemble for $(ptx_arch "${ptx[0]}")"

# --- the binary --------------------------------------------------------------
# The libraries it records are loaded by soname (the linker drops those
# nothing calls: --as-needed); no rpath into this cache.
needed="$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
[[ " $needed" == *" libcuda.so.1 "* ]] || die "$bin does not link libcuda.so.1 (it needs: $needed)"
note "$bin needs: $needed"
! readelf -d "$bin" | grep -qE 'R(UN)?PATH' || die "$bin has an rpath: $(readelf -d "$bin" | grep -E 'R(UN)?PATH')"

# Smoke run: the wheels' libraries and the stub (as libcuda.so.1, in a
# folder of its own), every symbol bound at load.
smoke="$cache/smoke"
rm -rf "$smoke" && mkdir -p "$smoke/lib"
ln -s "$tk/lib/stubs/libcuda.so" "$smoke/lib/libcuda.so.1"
run() {
    LD_LIBRARY_PATH="$tk/lib:$smoke/lib" LD_BIND_NOW=1 XDG_CACHE_HOME="$smoke/cache" \
        "$bin" --no-weight-cache "$@"
}
run --version >/dev/null || die "the cuda build does not start"
out="$(run --model demo --device auto examples/shapes_1.png)" || die "--device auto failed"
[[ -n $out ]] || die "--device auto printed no caption"
if err="$(run --model demo --device cuda examples/shapes_1.png 2>&1)"; then
    die "--device cuda succeeded against the stub libcuda: $err"
fi
grep -q 'opening CUDA device 0' <<<"$err" || die "--device cuda failed, but not by saying so: $err"
note "cargo build --features cuda: ok (CUDA $nvcc_version, sm_$CUDA_COMPUTE_CAP; binary loads, --device auto ran on the CPU)"
