//! The `caption` binary in a clean environment, as every CLI test runs it.

use std::path::Path;
use std::process::Command;

/// Variables [`caption_command`] removes: user configuration that would change
/// what the binary does or prints, so that the tests see the same thing on a
/// developer's machine as in CI.
///
/// - `CAPTION_MODEL`, `CAPTION_CHAT_MODEL`: the default models (clap `env =`
///   in src/cli.rs); `CAPTION_NO_WEIGHT_CACHE` (src/cli.rs) is removed too,
///   then set, see [`caption_command`].
/// - `CAPTION_MEMORY_LIMIT`, `CAPTION_IGNORE_MEMORY` (src/load/memory.rs):
///   the memory check before loading.
/// - `HF_HOME`, `HF_HUB_CACHE`, `XDG_CACHE_HOME`: where the Hub cache and our
///   own cache (bundled demo models, packed weights) live (src/hub.rs,
///   src/bundled.rs); without them both follow `HOME`, the test's own folder.
/// - `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN` (src/hub.rs, hf-hub) and the
///   proxy variables ureq reads (`ALL_PROXY`, `HTTPS_PROXY`, `HTTP_PROXY`,
///   `NO_PROXY`, and their lower-case forms): how the Hub and `http://` images
///   are reached. No test goes online; the URL tests' server is on loopback,
///   and a proxy in the caller's environment must not come between.
/// - `CANDLE_DEQUANTIZE_ALL`, `CANDLE_DEQUANTIZE_ALL_F16`: candle runs
///   quantized layers dequantized, other numbers than `--quantize` gives.
/// - `NO_COLOR`, `CLICOLOR`, `CLICOLOR_FORCE` (clap's colours: `CLICOLOR_FORCE`
///   puts escape codes into its usage errors even on a pipe) and `COLUMNS`
///   (the width clap wraps help to).
/// - `RUST_LIB_BACKTRACE`; `RUST_BACKTRACE` is set to 0: a panic's message
///   alone, whatever the caller's shell sets.
///
/// Deliberately left alone, because they are the test harness's choices and
/// must reach the binary: the kernel choice (`CAPTION_KERNELS=portable`, with
/// which CI runs the whole suite once, `CAPTION_BF16_KERNEL`, and candle's
/// `MISTRALRS_FORCE_AVX2`/`MISTRALRS_FORCE_AVXVNNI`), and the resources a run
/// may use (`RAYON_NUM_THREADS`, `CANDLE_NUM_THREADS`, `CANDLE_CPU_MASK`,
/// `CANDLE_CPU_AFFINITY`, `TOKENIZERS_PARALLELISM`, `TMPDIR`). That is also
/// why this is a list to remove and not `env_clear()`, which would drop
/// them and everything else a harness relies on (`PATH`, coverage and
/// sanitizer settings, library paths).
pub const CLEARED_VARS: &[&str] = &[
    "CAPTION_MODEL",
    "CAPTION_CHAT_MODEL",
    "CAPTION_NO_WEIGHT_CACHE",
    "CAPTION_WEIGHT_CACHE_LIMIT",
    "CAPTION_MEMORY_LIMIT",
    "CAPTION_IGNORE_MEMORY",
    "HF_HOME",
    "HF_HUB_CACHE",
    "XDG_CACHE_HOME",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "ALL_PROXY",
    "all_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "CANDLE_DEQUANTIZE_ALL",
    "CANDLE_DEQUANTIZE_ALL_F16",
    "NO_COLOR",
    "CLICOLOR",
    "CLICOLOR_FORCE",
    "COLUMNS",
    "RUST_LIB_BACKTRACE",
];

/// Variables the harness chooses, which [`caption_command`] passes through
/// untouched (see [`CLEARED_VARS`]).
pub const KEPT_VARS: &[&str] = &["CAPTION_KERNELS", "CAPTION_BF16_KERNEL"];

/// The `caption` binary with a clean environment ([`CLEARED_VARS`] removed),
/// `HOME` set to `home` (so the Hub cache is `home/.cache/huggingface` and
/// ours `home/.cache/caption`), `RUST_BACKTRACE=0`, and the weight cache off
/// (`CAPTION_NO_WEIGHT_CACHE=1`: its first-run note would add a line to
/// stderr; tests/cli.rs tests it on its own, and a test that wants it on
/// removes the variable again).
///
/// No arguments: callers add theirs (`--no-exif-rotate`, `-m`, ...). A test
/// may still set or remove variables on the returned command (an offline
/// `HF_HOME`, say); those win, being set later.
pub fn caption_command(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_caption"));
    for var in CLEARED_VARS {
        cmd.env_remove(var);
    }
    cmd.env("HOME", home)
        .env("RUST_BACKTRACE", "0")
        .env("CAPTION_NO_WEIGHT_CACHE", "1");
    cmd
}
