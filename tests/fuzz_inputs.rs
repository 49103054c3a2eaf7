//! Every input the fuzzers kept (fuzz/corpus/TARGET, minimised) and every
//! crash they found (fuzz/regressions/TARGET), run through the same entry
//! points as the fuzz targets (`caption::fuzzing`), on the stable
//! toolchain: what once crashed stays fixed, and the corpus, which covers
//! what the fuzzers reached, keeps running everywhere the tests run.
//! The fuzzing itself: fuzz/README.md.

use std::path::Path;

/// A fuzz target's name and its entry point.
type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 6] = [
    ("image", caption::fuzzing::image),
    ("checkpoint", caption::fuzzing::checkpoint),
    ("model_file", caption::fuzzing::model_file),
    ("models_toml", caption::fuzzing::models_toml),
    ("pack", caption::fuzzing::pack),
    ("search_index", caption::fuzzing::search_index),
];

fn replay(kind: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind);
    let mut count = 0;
    for (target, run) in TARGETS {
        let Ok(entries) = std::fs::read_dir(root.join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "md") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&bytes));
            assert!(outcome.is_ok(), "{target}: {} panicked", path.display());
            count += 1;
        }
    }
    count
}

#[test]
fn the_fuzzers_findings_stay_fixed() {
    replay("regressions");
}

#[test]
fn the_fuzz_corpus_runs_without_a_panic() {
    let count = replay("corpus");
    assert!(count > 0, "no corpus in fuzz/corpus");
}
