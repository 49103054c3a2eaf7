//! The built-in `demo-clip` (models/demo-clip, trained by
//! tools/make_demo_clip.py on the shapes world) against transformers on
//! pictures the training never saw (tests/fixtures/demo/eval/, examples/
//! and the two photos): the same zero-shot labels and search rankings, so
//! the same accuracy, printed. Through the binary, `-m demo-clip` runs the
//! copy built into it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use caption::image::LoadOptions;
use caption::resolve::hub::{self, ModelSource};
use caption::{Embedder, RuntimeOptions};
use serde::Deserialize;

/// A trained model's logits are `logit_scale` (here about 30) times a
/// cosine; our cosines agree with transformers' to about 1e-6, so logits
/// to a few 1e-5. Orders are compared where the recorded neighbours are at
/// least 1e-3 apart in logits (1e-4 in cosine for search); the few closer
/// calls (`close_calls` in the JSON: 1 label set, 2 searches) are compared
/// by score alone.
const LOGIT_GAP: f64 = 1e-3;
const COSINE_GAP: f64 = 1e-4;
const SCORE_ATOL: f64 = 1e-4;

#[derive(Debug, Deserialize)]
struct Reference {
    zero_shot: ZeroShotSets,
    search: Searches,
    images: Vec<ImageCase>,
    metrics: BTreeMap<String, BTreeMap<String, Metric>>,
}

#[derive(Debug, Deserialize)]
struct ZeroShotSets {
    hypothesis_template: String,
    label_sets: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct ImageCase {
    set: String,
    image: String,
    zero_shot: BTreeMap<String, ZeroShot>,
}

#[derive(Debug, Deserialize)]
struct ZeroShot {
    results: Vec<Scored>,
    min_logit_gap: f64,
    correct: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Scored {
    label: String,
    score: f64,
}

#[derive(Debug, Deserialize)]
struct Searches {
    queries: Vec<String>,
    sets: BTreeMap<String, BTreeMap<String, Search>>,
}

#[derive(Debug, Deserialize)]
struct Search {
    ranking: Vec<Hit>,
    min_gap: f64,
}

#[derive(Debug, Deserialize)]
struct Hit {
    path: String,
    score: f64,
}

#[derive(Debug, Deserialize)]
struct Metric {
    #[serde(default)]
    accuracy: Option<f64>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn reference() -> Reference {
    serde_json::from_str(&common::reference_json("demo-clip.json")).unwrap()
}

fn embedder() -> Embedder {
    let files = hub::fetch(&ModelSource::Folder(root().join("models/demo-clip"))).unwrap();
    let runtime = RuntimeOptions {
        device: common::device(),
        ..RuntimeOptions::default()
    };
    Embedder::load(&files, &runtime).unwrap()
}

/// As the pipeline opens a file: EXIF orientation applied, RGB.
fn load(path: &str) -> image::RgbImage {
    caption::image::load_rgb8(&root().join(path), &LoadOptions::default()).unwrap()
}

#[test]
fn zero_shot_labels_are_transformers_and_as_accurate() {
    let reference = reference();
    let embedder = embedder();
    let images: Vec<_> = reference
        .images
        .iter()
        .map(|case| load(&case.image))
        .collect();
    let embeds = embedder.embed_images(&images).unwrap();
    for (set, labels) in &reference.zero_shot.label_sets {
        let labels = embedder
            .label_set(labels, &reference.zero_shot.hypothesis_template)
            .unwrap();
        let ours = embedder.score_labels(&embeds, &labels).unwrap();
        let (mut right, mut counted) = (0, 0);
        for (case, ours) in reference.images.iter().zip(&ours) {
            let theirs = &case.zero_shot[set];
            if theirs.min_logit_gap >= LOGIT_GAP {
                let order: Vec<&str> = ours.iter().map(|s| s.label.as_str()).collect();
                let expected: Vec<&str> = theirs.results.iter().map(|s| s.label.as_str()).collect();
                assert_eq!(order, expected, "{set} {}", case.image);
            }
            for t in &theirs.results {
                let o = ours.iter().find(|o| o.label == t.label).unwrap();
                let diff = (f64::from(o.score) - t.score).abs();
                assert!(
                    diff < SCORE_ATOL,
                    "{set} {} {}: {diff:e}",
                    case.image,
                    t.label
                );
            }
            if case.set == "eval" && theirs.correct.is_some() {
                counted += 1;
                // Right by transformers' judgement of the same top label.
                if ours[0].label == theirs.results[0].label && theirs.correct == Some(true) {
                    right += 1;
                }
            }
        }
        if let Some(accuracy) = reference.metrics["eval"]
            .get(&format!("zero_shot_{set}"))
            .and_then(|m| m.accuracy)
        {
            let ours = f64::from(right) / f64::from(counted.max(1));
            println!("demo-clip zero-shot `{set}` on the eval set: {right}/{counted} right ({ours:.4}; transformers {accuracy})");
            assert!(
                (ours - accuracy).abs() < 1e-3,
                "{set}: {ours} vs {accuracy}"
            );
        }
    }
}

#[test]
fn search_rankings_are_transformers() {
    let reference = reference();
    let embedder = embedder();
    let queries = embedder.embed_texts(&reference.search.queries).unwrap();
    for (set, searches) in &reference.search.sets {
        for (query, search) in searches {
            let q = reference
                .search
                .queries
                .iter()
                .position(|x| x == query)
                .unwrap();
            let paths: Vec<&str> = search.ranking.iter().map(|h| h.path.as_str()).collect();
            let images: Vec<_> = paths.iter().map(|p| load(p)).collect();
            let embeds = embedder.embed_images(&images).unwrap();
            let cosines: Vec<f32> = embeds
                .matmul(&queries.narrow(0, q, 1).unwrap().t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (hit, cosine) in search.ranking.iter().zip(&cosines) {
                let diff = (f64::from(*cosine) - hit.score).abs();
                assert!(diff < SCORE_ATOL, "{set} {query:?} {}: {diff:e}", hit.path);
            }
            if search.min_gap >= COSINE_GAP {
                // The recorded ranking is best first: ours must be too.
                assert!(
                    cosines.windows(2).all(|w| w[0] > w[1]),
                    "{set} {query:?}: {cosines:?}"
                );
            }
        }
    }
}

/// What the README shows, through the binary and its built-in copy.
#[test]
fn the_readme_commands_give_transformers_answers() {
    let reference = reference();
    let home = tempfile::tempdir().unwrap();
    let labels = run_in_root(
        home.path(),
        &[
            "-m",
            "demo-clip",
            "--labels",
            "red circle,blue square,green triangle",
            "examples/",
        ],
    );
    let expected: String = reference
        .images
        .iter()
        .filter(|case| case.set == "examples")
        .map(|case| {
            format!(
                "{}\t{}\n",
                case.image, case.zero_shot["readme"].results[0].label
            )
        })
        .collect();
    assert_eq!(labels, expected);

    let search = run_in_root(
        home.path(),
        &[
            "search",
            "-m",
            "demo-clip",
            "--top",
            "3",
            "a blue triangle",
            "examples/",
        ],
    );
    let ranked: Vec<String> = search
        .lines()
        .map(|line| line.split('\t').next().unwrap().to_string())
        .collect();
    let recorded: Vec<&str> = reference.search.sets["examples"]["a blue triangle"]
        .ranking
        .iter()
        .take(3)
        .map(|h| h.path.as_str())
        .collect();
    assert_eq!(ranked, recorded);
}

/// Runs the binary from the repository root with `home` as its home and
/// returns its stdout, failing the test (with its stderr) if it fails.
fn run_in_root(home: &std::path::Path, args: &[&str]) -> String {
    let out = common::caption_command(home)
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
