//! `--labels`, `caption embed`, `caption search` and `--rerank` as scripts
//! use them, on the tiny CLIP fixture (tests/fixtures/models/clip-tiny,
//! whose transformers outputs tests/clip_parity.rs checks): stdout, stderr,
//! exit codes, the search index and the binary embedding files.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn clip_model() -> PathBuf {
    common::fixtures().join("models/clip-tiny")
}

fn image(name: &str) -> PathBuf {
    common::fixtures().join("images").join(name)
}

fn reference() -> Value {
    serde_json::from_str(&common::reference_json("clip-tiny.json")).unwrap()
}

/// The binary, pixels as stored (as transformers reads them).
fn caption(home: &Path) -> Command {
    common::caption_command(home)
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn jsonl(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The recorded zero-shot result of `image` for the label set `labels`
/// with the default template: labels best first.
fn recorded_labels(labels: &[&str], image: &str) -> Vec<String> {
    let reference = reference();
    let case = reference["zero_shot"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["labels"] == serde_json::json!(labels) && c["default_template"] == true)
        .unwrap();
    let result = case["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["image"] == image)
        .unwrap();
    result["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["label"].as_str().unwrap().to_string())
        .collect()
}

const LABELS: [&str; 6] = ["astronaut", "cat", "coffee", "rocket", "camera", "flower"];

/// Images whose pixels the pipeline and the processor agree on (the
/// pipeline drops an alpha channel that the processor composites).
const IMAGES: [&str; 4] = ["astronaut.jpg", "chelsea.png", "coffee.jpg", "rocket.jpg"];

#[test]
fn labels_print_the_best_label_as_transformers_ranks_them() {
    let home = tempfile::tempdir().unwrap();
    let out = caption(home.path())
        .args(["--no-exif-rotate", "--labels", &LABELS.join(",")])
        .arg("-m")
        .arg(clip_model())
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("{}\n", recorded_labels(&LABELS, "chelsea.png")[0])
    );
    // Several images: path<TAB>label, in input order.
    let mut cmd = caption(home.path());
    cmd.args(["--no-exif-rotate", "--labels", &LABELS.join(",")])
        .arg("-m")
        .arg(clip_model());
    for name in IMAGES {
        cmd.arg(image(name));
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let expected: String = IMAGES
        .iter()
        .map(|name| {
            format!(
                "{}\t{}\n",
                image(name).display(),
                recorded_labels(&LABELS, name)[0]
            )
        })
        .collect();
    assert_eq!(stdout(&out), expected);
}

#[test]
fn labels_in_jsonl_csv_and_from_a_file() {
    let home = tempfile::tempdir().unwrap();
    let list = home.path().join("labels.txt");
    std::fs::write(&list, format!("{}\n\n", LABELS.join("\n"))).unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = caption(home.path());
        cmd.arg("--no-exif-rotate")
            .arg("--labels")
            .arg(format!("@{}", list.display()))
            .args(extra)
            .arg("-m")
            .arg(clip_model())
            .arg(image("coffee.jpg"))
            .arg(image("rocket.jpg"));
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        out
    };
    let records = jsonl(&run(&["--format", "jsonl"]));
    assert_eq!(records.len(), 2);
    for (record, name) in records.iter().zip(["coffee.jpg", "rocket.jpg"]) {
        let labels: Vec<&str> = record["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["label"].as_str().unwrap())
            .collect();
        assert_eq!(labels, recorded_labels(&LABELS, name));
        let total: f64 = record["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["score"].as_f64().unwrap())
            .sum();
        assert!(
            (total - 1.0).abs() < 1e-5,
            "a softmax over the labels: {total}"
        );
    }
    let top = jsonl(&run(&["--format", "jsonl", "--top", "2"]));
    assert_eq!(top[0]["labels"].as_array().unwrap().len(), 2);
    assert_eq!(top[0]["labels"][0], records[0]["labels"][0]);
    // csv: a header, then one row per image and label.
    let csv = stdout(&run(&["--format", "csv", "--top", "3"]));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "path,label,score,error");
    assert_eq!(lines.len(), 1 + 2 * 3);
    let best = &recorded_labels(&LABELS, "rocket.jpg")[0];
    assert!(
        lines[4].starts_with(&format!("{},{best},", image("rocket.jpg").display())),
        "{csv}"
    );
}

#[test]
fn a_bad_image_among_labelled_ones_is_one_error_record_and_exit_1() {
    let home = tempfile::tempdir().unwrap();
    let broken = home.path().join("broken.jpg");
    std::fs::write(&broken, b"not a jpeg").unwrap();
    let out = caption(home.path())
        .args([
            "--no-exif-rotate",
            "--labels",
            "cat,dog",
            "--format",
            "jsonl",
        ])
        .arg("-m")
        .arg(clip_model())
        .arg(image("chelsea.png"))
        .arg(&broken)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let records = jsonl(&out);
    assert_eq!(records.len(), 2);
    assert!(records[0]["labels"].is_array());
    assert!(records[1]["error"].is_string());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("broken.jpg"), "{err}");
}

#[test]
fn clip_models_and_captioning_models_refuse_each_others_jobs() {
    let home = tempfile::tempdir().unwrap();
    let out = caption(home.path())
        .arg("-m")
        .arg(clip_model())
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("CLIP model"), "{}", stderr(&out));
    let out = caption(home.path())
        .arg("embed")
        .arg("-m")
        .arg(common::fixtures().join("models/blip-tiny"))
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not a CLIP model"),
        "{}",
        stderr(&out)
    );
    let out = caption(home.path())
        .args(["--labels", " , "])
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no labels"), "{}", stderr(&out));
}

#[test]
fn embed_writes_normalised_embeddings_as_jsonl_and_npy() {
    let home = tempfile::tempdir().unwrap();
    let out = caption(home.path())
        .args(["embed", "--no-exif-rotate", "-m"])
        .arg(clip_model())
        .arg(image("chelsea.png"))
        .arg(image("rocket.jpg"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let records = jsonl(&out);
    assert_eq!(records.len(), 2);
    let embedding: Vec<f32> = records[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(embedding.len(), 20, "projection_dim");
    let norm: f32 = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    assert_eq!(
        records[0]["path"],
        image("chelsea.png").display().to_string()
    );

    // The same numbers in a .npy file, paths beside it.
    let target = home.path().join("out.npy");
    let out = caption(home.path())
        .args(["embed", "--no-exif-rotate", "-m"])
        .arg(clip_model())
        .arg("-o")
        .arg(&target)
        .arg(image("chelsea.png"))
        .arg(home.path().join("missing.png"))
        .arg(image("rocket.jpg"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a missing file: {}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty());
    let bytes = std::fs::read(&target).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8_lossy(&bytes[10..10 + header_len]);
    assert!(header.contains("'shape': (2, 20)"), "{header}");
    let first: Vec<f32> = bytes[10 + header_len..10 + header_len + 80]
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    for (a, b) in first.iter().zip(&embedding) {
        // jsonl prints the shortest decimal that reads back to the same f32.
        assert_eq!(a, b);
    }
    let paths = std::fs::read_to_string(home.path().join("out.npy.paths")).unwrap();
    assert_eq!(
        paths,
        format!(
            "{}\n{}\n",
            serde_json::json!(image("chelsea.png").display().to_string()),
            serde_json::json!(image("rocket.jpg").display().to_string())
        )
    );

    let out = caption(home.path())
        .args([
            "embed",
            "--text",
            "a photo of a cat",
            "--text",
            "rocket",
            "-m",
        ])
        .arg(clip_model())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let records = jsonl(&out);
    assert_eq!(records[1]["text"], "rocket");
    assert_eq!(records[1]["embedding"].as_array().unwrap().len(), 20);
}

/// Copies the recorded search's images into a folder of their own.
fn search_folder(home: &Path) -> PathBuf {
    let folder = home.join("photos");
    std::fs::create_dir_all(&folder).unwrap();
    for name in reference()["images"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        std::fs::copy(image(name), folder.join(name)).unwrap();
    }
    folder
}

fn search(home: &Path, args: &[&str], folder: &Path) -> Output {
    caption(home)
        .args([
            "search",
            "--no-exif-rotate",
            "--format",
            "jsonl",
            "--top",
            "100",
        ])
        .args(args)
        .arg("-m")
        .arg(clip_model())
        .arg(folder)
        .output()
        .unwrap()
}

#[test]
fn search_ranks_as_transformers_and_reuses_its_index() {
    let home = tempfile::tempdir().unwrap();
    let folder = search_folder(home.path());
    let recorded = &reference()["search"][0];
    let query = recorded["query"].as_str().unwrap();
    let expected: Vec<String> = recorded["ranking"]
        .as_array()
        .unwrap()
        .iter()
        .map(|hit| {
            folder
                .join(hit["path"].as_str().unwrap())
                .display()
                .to_string()
        })
        .collect();
    let ranked = |out: &Output| -> Vec<String> {
        jsonl(out)
            .iter()
            .map(|r| r["path"].as_str().unwrap().to_string())
            .collect()
    };
    let first = search(home.path(), &[query], &folder);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(ranked(&first), expected);
    assert!(stderr(&first).contains(&format!("embedding {n} of {n}", n = expected.len())));
    let index_dir = home.path().join(".cache/caption/index");
    assert_eq!(std::fs::read_dir(&index_dir).unwrap().count(), 1);

    // Nothing new: every embedding comes from the index, same answer.
    let second = search(home.path(), &[query], &folder);
    assert!(second.status.success());
    assert!(
        !stderr(&second).contains("embedding"),
        "{}",
        stderr(&second)
    );
    assert_eq!(stdout(&second), stdout(&first));

    // A changed file is embedded again, and only it.
    let changed = folder.join("chelsea.png");
    std::fs::copy(image("coffee.jpg"), &changed).unwrap();
    let third = search(home.path(), &[query], &folder);
    assert!(stderr(&third).contains(&format!("embedding 1 of {}", expected.len())));
    assert_ne!(stdout(&third), stdout(&first), "the new pixels count");

    // --top keeps the best; text is path<TAB>score.
    let out = caption(home.path())
        .args(["search", "--no-exif-rotate", "--top", "2", query, "-m"])
        .arg(clip_model())
        .arg(&folder)
        .output()
        .unwrap();
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with(&format!("{}\t", ranked(&third)[0])));
}

#[test]
fn search_like_an_image_leaves_the_image_out() {
    let home = tempfile::tempdir().unwrap();
    let folder = search_folder(home.path());
    let recorded = reference()["search"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["like"].is_string())
        .unwrap()
        .clone();
    let like = folder.join(recorded["like"].as_str().unwrap());
    let out = search(
        home.path(),
        &["--no-index", "--like", like.to_str().unwrap()],
        &folder,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let expected: Vec<String> = recorded["ranking"]
        .as_array()
        .unwrap()
        .iter()
        .map(|hit| {
            folder
                .join(hit["path"].as_str().unwrap())
                .display()
                .to_string()
        })
        .filter(|path| Path::new(path) != like)
        .collect();
    let ranked: Vec<String> = jsonl(&out)
        .iter()
        .map(|r| r["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ranked, expected);
    assert!(
        !home.path().join(".cache/caption/index").exists(),
        "--no-index"
    );
}

#[test]
fn rerank_prints_the_candidate_clip_likes_best() {
    let home = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = caption(home.path())
            .args(["--no-exif-rotate", "--format", "jsonl", "--candidates", "4"])
            .arg(format!("--rerank={}", clip_model().display()))
            .args(extra)
            .arg("-m")
            .arg(common::fixtures().join("models/blip-tiny"))
            .arg(image("chelsea.png"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        jsonl(&out)
    };
    let all = run(&["--num-return", "4"]);
    assert_eq!(all.len(), 4);
    let scores: Vec<f64> = all
        .iter()
        .map(|r| r["clip_score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {scores:?}"
    );
    let ranks: Vec<u64> = all.iter().map(|r| r["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, [1, 2, 3, 4]);
    // The four are the 4 beams' captions, in CLIP's order.
    let beams = caption(home.path())
        .args([
            "--no-exif-rotate",
            "--format",
            "jsonl",
            "--beams",
            "4",
            "--num-return",
            "4",
            "-m",
        ])
        .arg(common::fixtures().join("models/blip-tiny"))
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    let mut beam_captions: Vec<String> = jsonl(&beams)
        .iter()
        .map(|r| r["caption"].to_string())
        .collect();
    let mut reranked: Vec<String> = all.iter().map(|r| r["caption"].to_string()).collect();
    beam_captions.sort();
    reranked.sort();
    assert_eq!(reranked, beam_captions);
    let best = run(&[]);
    assert_eq!(best.len(), 1);
    assert_eq!(best[0]["caption"], all[0]["caption"]);
    assert_eq!(best[0]["clip_score"], all[0]["clip_score"]);
    assert!(best[0].get("rank").is_none());
    let too_many = caption(home.path())
        .args(["--candidates", "2", "--num-return", "3"])
        .arg(format!("--rerank={}", clip_model().display()))
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    assert_eq!(too_many.status.code(), Some(2));
}
