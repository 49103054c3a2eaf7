//! `--format parquet`: the table holds what jsonl holds, row for row
//! (captions, answers, labels, errors), read back with the `parquet`
//! crate's row reader.

mod common;

use std::fs;
use std::path::Path;

use serde_json::{Map, Value};

/// Runs the binary with `args`, stdout into `out`; the exit code.
fn run(home: &Path, args: &[&str], out: &Path) -> Option<i32> {
    let output = common::caption_command(home)
        .env("HF_HUB_OFFLINE", "1")
        .args(args)
        .output()
        .unwrap();
    fs::write(out, &output.stdout).unwrap();
    output.status.code()
}

/// jsonl records with the fields a Parquet row has (all but `source` and
/// `path_bytes`).
fn jsonl(out: &Path) -> Vec<Map<String, Value>> {
    fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|line| {
            let mut record: Map<String, Value> = serde_json::from_str(line).unwrap();
            record.remove("source");
            record
        })
        .collect()
}

/// Floats go through f32 in Parquet: compare numbers as f32.
fn same(parquet: &[Map<String, Value>], jsonl: &[Map<String, Value>]) {
    assert_eq!(parquet.len(), jsonl.len());
    for (p, j) in parquet.iter().zip(jsonl) {
        assert_eq!(p.len(), j.len(), "{p:?} vs {j:?}");
        for (key, value) in j {
            match (value, &p[key]) {
                (Value::Number(a), Value::Number(b)) if key != "rank" => {
                    assert_eq!(
                        a.as_f64().unwrap() as f32,
                        b.as_f64().unwrap() as f32,
                        "{key}"
                    )
                }
                (a, b) => assert_eq!(a, b, "{key}"),
            }
        }
    }
}

#[test]
fn parquet_rows_are_the_jsonl_records() {
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    fs::create_dir(&home).unwrap();
    let images = work.path().join("images");
    common::demo_picture_folder(&images);
    fs::write(images.join("99-broken.png"), b"not a picture").unwrap();
    let folder = images.to_str().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    for args in [
        vec!["-m", "demo", "--beams", "3", "--num-return", "2", folder],
        vec![
            "-m",
            "demo-vqa",
            "--ask",
            "what color is the background?",
            "--ask",
            "how many shapes are there?",
            folder,
        ],
        vec![
            "-m",
            "demo-clip",
            "--labels",
            "circle,square,triangle",
            folder,
        ],
    ] {
        let with = |format: &'static str| {
            let mut all = vec!["--format", format];
            all.extend(args.iter().copied());
            all
        };
        assert_eq!(run(&home, &with("jsonl"), &a), Some(1), "{args:?}");
        assert_eq!(run(&home, &with("parquet"), &b), Some(1), "{args:?}");
        let rows = common::parquet_rows(&b);
        same(&rows, &jsonl(&a));
        assert!(rows.iter().any(|r| r.contains_key("error")));
    }
}

#[test]
fn embeddings_are_not_written_as_parquet() {
    let home = tempfile::tempdir().unwrap();
    let out = common::caption_command(home.path())
        .args([
            "embed",
            "-m",
            "demo-clip",
            "--format",
            "parquet",
            "examples/shapes_1.png",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--format parquet holds captions"),
        "{stderr}"
    );
}
