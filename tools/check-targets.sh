#!/usr/bin/env bash
# Type-check the crate for aarch64-unknown-linux-gnu on an x86_64 Debian 12
# (bookworm) machine, without rustup downloading anything.
#
#   tools/check-targets.sh [--clippy] [PACKAGE...] [-- CARGO_ARGS...]
#
#   PACKAGE...    passed as -p PACKAGE (default: --workspace)
#   --clippy      cargo clippy ... -- -D warnings instead of cargo check
#   -- ARGS       extra cargo arguments, e.g. `-- --all-targets`
#
# rustup cannot fetch the aarch64 standard library here, and a std is tied to
# the exact rustc that built it, so the check runs on Debian's own toolchain:
# rustc-web/cargo-web (bookworm-security, 1.96 at the time of writing) with
# the arm64 build of the same std (libstd-rust-web-dev:arm64, a Multi-Arch:
# same package, so dpkg keeps its version equal to the amd64 one). Build
# scripts compile C even under `cargo check` (mozjpeg-sys, onig_sys), hence
# the cross gcc. Installing is idempotent: when everything is there, no apt
# command runs at all.
#
# rustc-web installs /usr/bin/rustc and /usr/bin/cargo: the rustup toolchain
# stays the default only while ~/.cargo/bin comes before /usr/bin in PATH.
# This script calls the Debian tools by absolute path either way.
#
# Artifacts go to target/check-targets (override: CHECK_TARGETS_DIR), apart
# from the rustup toolchain's: a different rustc rebuilds everything anyway.
set -euo pipefail

TARGET=aarch64-unknown-linux-gnu
PACKAGES=(rustc-web cargo-web rust-web-clippy libstd-rust-web-dev:arm64
          gcc-aarch64-linux-gnu libc6-dev-arm64-cross)

die() { echo "check-targets: error: $*" >&2; exit 1; }
note() { echo "check-targets: $*" >&2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$repo/Cargo.toml" ]] || repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -f "$repo/Cargo.toml" ]] || die "no Cargo.toml above ${BASH_SOURCE[0]}"

mode=check
packages=()
extra=()
while (($#)); do
    case "$1" in
        --clippy) mode=clippy ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) die "unknown option $1 (cargo options go after --)" ;;
        *) packages+=(-p "$1") ;;
    esac
    shift
done
((${#packages[@]})) || packages=(--workspace)

# --- install (skipped when everything is already installed) -----------------
installed() {
    local p status
    for p in "$@"; do
        status="$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" || return 1
        [[ "$status" == installed ]] || return 1
    done
}

if ! installed "${PACKAGES[@]}"; then
    command -v apt-get >/dev/null || die "needs Debian's apt-get; install by hand: ${PACKAGES[*]}"
    sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "not root and no sudo: install ${PACKAGES[*]} (after dpkg --add-architecture arm64)"
        sudo=(sudo)
    fi
    . /etc/os-release 2>/dev/null || true
    [[ "${VERSION_CODENAME:-}" == bookworm ]] ||
        note "warning: written for Debian bookworm, this is ${PRETTY_NAME:-unknown}; trying anyway"
    note "installing ${PACKAGES[*]}"
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        "${sudo[@]}" dpkg --add-architecture arm64
    fi
    apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600)
    "${apt[@]}" update >/dev/null || die "apt-get update failed"
    "${apt[@]}" install -y --no-install-recommends "${PACKAGES[@]}" ||
        die "apt-get install failed. If the cause is a version clash between libstd-rust-web-dev (amd64) and libstd-rust-web-dev:arm64, the archive has published a new rustc-web for one architecture before the other: compare 'apt-cache policy libstd-rust-web-dev libstd-rust-web-dev:arm64' and retry later"
fi

# --- the toolchain ----------------------------------------------------------
RUSTC=/usr/bin/rustc
CARGO=/usr/bin/cargo
[[ -x $RUSTC && -x $CARGO ]] || die "$RUSTC or $CARGO missing although rustc-web/cargo-web are installed"
command -v aarch64-linux-gnu-gcc >/dev/null || die "aarch64-linux-gnu-gcc missing (gcc-aarch64-linux-gnu)"

# Debian's tools first, so cargo finds its own cargo-clippy/clippy-driver and
# not rustup's proxies; RUSTUP_TOOLCHAIN means nothing to them.
export PATH="/usr/bin:$PATH"
unset RUSTUP_TOOLCHAIN
export RUSTC RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_DIR="${CHECK_TARGETS_DIR:-$repo/target/check-targets}"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# Not needed to check, but it is part of the units' fingerprints: keep it
# constant so that runs reuse each other's artifacts (and `cargo build` links).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc

# The std must be the one this rustc built: say so plainly if it is not.
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
echo 'pub fn probe() -> String { std::env::args().collect() }' > "$probe/probe.rs"
if ! "$RUSTC" --target "$TARGET" --crate-type lib --emit metadata \
        --out-dir "$probe" "$probe/probe.rs" 2>"$probe/err"; then
    cat "$probe/err" >&2
    die "$($RUSTC -V) cannot use the $TARGET std in $($RUSTC --print sysroot)/lib/rustlib/$TARGET: libstd-rust-web-dev:arm64 must be the same version as rustc-web"
fi
note "$($RUSTC -V), $($CARGO -V), target $TARGET, artifacts in $CARGO_TARGET_DIR"

# --- the check ---------------------------------------------------------------
# The project's dev profile optimises dependencies at -O3 for its tests; a
# type check generates no code from them, but their proc macros, build
# scripts and C (compiled for real) would pay for it: build them at -O0.
cd "$repo"
cmd=("$CARGO" "$mode" --locked --target "$TARGET" "${packages[@]}"
     --config 'profile.dev.package."*".opt-level=0' "${extra[@]}")
[[ $mode == clippy ]] && cmd+=(-- -D warnings)
note "${cmd[*]}"
if ! "${cmd[@]}"; then
    die "cargo $mode for $TARGET failed (errors above)"
fi
note "cargo $mode for $TARGET: ok"
