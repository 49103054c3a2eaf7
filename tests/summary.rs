//! `--limit N` takes the first N images, and `--summary FILE` says what a
//! run did: images done, failed, skipped as done, left by the limit.

mod common;

use std::fs;
use std::path::Path;

use serde_json::Value;

fn run(home: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = common::caption_command(home)
        .env("HF_HUB_OFFLINE", "1")
        .args(["-m", "demo"])
        .args(args)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap())
}

fn figures(file: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(file).unwrap()).unwrap()
}

#[test]
fn limit_takes_the_first_images_and_the_summary_counts_them() {
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    fs::create_dir(&home).unwrap();
    let images = work.path().join("images");
    let n = common::demo_picture_folder(&images);
    fs::write(images.join("00-broken.png"), b"not a picture").unwrap();
    let folder = images.to_str().unwrap();
    let summary = work.path().join("summary.json");
    let summary_arg = summary.to_str().unwrap();

    let (code, all) = run(&home, &["--format", "jsonl", folder]);
    assert_eq!(code, Some(1));
    let (code, first) = run(
        &home,
        &[
            "--format",
            "jsonl",
            "--limit",
            "4",
            "--summary",
            summary_arg,
            folder,
        ],
    );
    assert_eq!(code, Some(1), "the broken file sorts first");
    let expected: Vec<&str> = all.lines().take(4).collect();
    assert_eq!(first.lines().collect::<Vec<_>>(), expected);
    let f = figures(&summary);
    assert_eq!(
        (&f["images"], &f["done"], &f["failed"], &f["not_reached"]),
        (
            &Value::from(4),
            &Value::from(3),
            &Value::from(1),
            &Value::from(n + 1 - 4)
        )
    );
    assert_eq!(f["interrupted"], false);
    assert!(f["wall_s"].as_f64().unwrap() > 0.0);

    // Resumed: the done ones are skipped, and counted as such.
    let out = work.path().join("out.jsonl");
    let resume = ["--resume", out.to_str().unwrap(), "--summary", summary_arg];
    let mut args = resume.to_vec();
    args.extend(["--limit", "10", folder]);
    run(&home, &args);
    let mut args = resume.to_vec();
    args.push(folder);
    run(&home, &args);
    let f = figures(&summary);
    assert_eq!(f["skipped"], 9, "the 9 images done without error: {f}");
    assert_eq!(f["images"], n + 1 - 9);
    assert_eq!(f["not_reached"], 0);
}
