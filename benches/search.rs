//! How long `caption search` takes over a folder whose images are all in
//! the embedding index:
//!
//!     cargo bench --bench search -- bench/models/clip-vit-base-patch32 [N [ROUNDS]]
//!
//! Makes N files (default 100,000) in a temporary folder, writes an index
//! holding a random unit embedding for each (keyed as the CLI keys them,
//! under the model's identity, so no image is embedded), then times the
//! whole command `caption search "a red car at night" FOLDER` ROUNDS times
//! (default 5) after one warm-up run (which writes the weight cache): the
//! folder walk, a stat per file, reading the index, loading the model,
//! encoding the query, scoring and sorting. Prints the times and their
//! median. With `SEARCH_BENCH_HOME=DIR` the folder and the index stay in
//! DIR (as `$HOME`), to profile a run by hand.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use caption::batch::index::{EmbeddingIndex, FileKey};
use caption::{Embedder, RuntimeOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let model = args.first().map(Path::new).ok_or_else(|| {
        anyhow::anyhow!("usage: cargo bench --bench search -- MODEL_DIR [N [ROUNDS]]")
    })?;
    let n: usize = args.get(1).map_or(Ok(100_000), |a| a.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(5), |a| a.parse())?;
    let model = std::path::absolute(model)?;

    // SEARCH_BENCH_HOME keeps the folder and index there (to profile a
    // run by hand); by default they go to a temporary folder.
    let temp = tempfile::tempdir()?;
    let home =
        std::env::var_os("SEARCH_BENCH_HOME").map_or_else(|| temp.path().to_path_buf(), Into::into);
    let home = home.as_path();
    let folder = home.join("photos");
    std::fs::create_dir_all(&folder)?;
    let embedder = Embedder::open(
        model.to_str().unwrap_or_default(),
        &RuntimeOptions::default(),
    )?;
    let dim = embedder.projection_dim();
    let (mut index, _) =
        EmbeddingIndex::open(&home.join(".cache/caption/index"), embedder.identity(), dim);
    let started = Instant::now();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = move || {
        // xorshift64*: uniform enough for unit vectors pointing anywhere.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    for i in 0..n {
        let path = folder.join(format!("img_{i:06}.jpg"));
        std::fs::write(&path, [0u8])?;
        let mut embedding: Vec<f32> = (0..dim).map(|_| random()).collect();
        let norm = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
        embedding.iter_mut().for_each(|v| *v /= norm);
        index.insert(FileKey::of(&path)?, &embedding);
    }
    index.save()?;
    drop(embedder);
    eprintln!(
        "{n} files and their index ({} MB) in {:.1} s",
        std::fs::metadata(index.path())?.len() / 1_000_000,
        started.elapsed().as_secs_f64()
    );

    let run = || -> anyhow::Result<f64> {
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_caption"))
            .env("HOME", home)
            .env_remove("XDG_CACHE_HOME")
            .args(["search", "a red car at night", "-m"])
            .arg(&model)
            .arg(&folder)
            .output()?;
        let seconds = started.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "caption search failed: {stderr}");
        anyhow::ensure!(
            !stderr.contains("embedding"),
            "images were embedded: the index was not used ({stderr})"
        );
        anyhow::ensure!(String::from_utf8_lossy(&out.stdout).lines().count() == 20.min(n));
        Ok(seconds)
    };
    run()?; // writes the weight cache
    let mut times = (0..rounds)
        .map(|_| run())
        .collect::<anyhow::Result<Vec<_>>>()?;
    times.sort_by(f64::total_cmp);
    println!(
        "caption search over {n} indexed images ({}): median {:.3} s (runs: {})",
        model.display(),
        times[times.len() / 2],
        times
            .iter()
            .map(|t| format!("{t:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
