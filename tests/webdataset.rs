//! WebDataset shards as input: tar files in img2dataset's layout
//! (`KEY.png` + `KEY.json` + `KEY.txt`), captioned in place with the demo
//! model. Each member gets the caption its file gets outside the tar, its
//! key, shard and original caption ride along in jsonl, bad members and
//! damaged or compressed shards are per-input errors, and `--shard` hands
//! out whole tar files.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

fn run(home: &Path, args: &[&str]) -> Output {
    common::caption_command(home)
        .env("HF_HUB_OFFLINE", "1")
        .args(["-m", "demo", "--format", "jsonl"])
        .args(args)
        .output()
        .unwrap()
}

fn records(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A tar of `members` (name, bytes), written as img2dataset writes them.
fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut builder = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, bytes.as_slice())
            .unwrap();
    }
    builder.finish().unwrap();
}

/// Two shards of the demo pictures: shard-00000.tar has 8 samples (one
/// with a `.json` but no `.txt`, one whose "picture" is not one), and
/// shard-00001.tar 6 (one with no `.json` either). Returns the pictures
/// by member path ("shard-00000.tar/000003.png") as files outside.
fn shards(dir: &Path, pictures: &Path) -> BTreeMap<String, PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = fs::read_dir(root.join("tests/fixtures/demo/eval"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    fs::create_dir(pictures).unwrap();
    let mut outside = BTreeMap::new();
    let mut at = 0;
    for (shard, count) in [("shard-00000.tar", 8), ("shard-00001.tar", 6)] {
        let mut members = Vec::new();
        for i in 0..count {
            let key = format!("{:06}", at);
            let file = &files[at];
            at += 1;
            let bytes = if shard == "shard-00000.tar" && i == 5 {
                b"not a picture".to_vec()
            } else {
                fs::read(file).unwrap()
            };
            members.push((format!("{key}.png"), bytes.clone()));
            let bare = shard == "shard-00001.tar" && i == 2; // no .json, no .txt
            let json_only = shard == "shard-00000.tar" && i == 3;
            if !bare {
                let json = serde_json::json!({
                    "url": format!("https://example.com/{key}.png"),
                    "caption": format!("original caption {key}"),
                    "key": key,
                });
                members.push((format!("{key}.json"), json.to_string().into_bytes()));
            }
            if !bare && !json_only {
                members.push((
                    format!("{key}.txt"),
                    format!("a text caption {key}\n").into_bytes(),
                ));
            }
            let copy = pictures.join(format!("{key}.png"));
            fs::write(&copy, &bytes).unwrap();
            outside.insert(format!("{shard}/{key}.png"), copy);
        }
        write_tar(&dir.join(shard), &members);
    }
    outside
}

/// A working folder with `home/` and the shards in `shards/`; the
/// pictures outside the tars by member path.
fn setup() -> (
    tempfile::TempDir,
    PathBuf,
    PathBuf,
    BTreeMap<String, PathBuf>,
) {
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    fs::create_dir(&home).unwrap();
    let dir = work.path().join("shards");
    fs::create_dir(&dir).unwrap();
    let outside = shards(&dir, &work.path().join("pictures"));
    (work, home, dir, outside)
}

#[test]
fn tar_members_are_captioned_in_place_with_their_sample_fields() {
    let (_work, home, dir, outside) = setup();
    fs::write(dir.join("shard-00002.tar.gz"), b"\x1f\x8b compressed").unwrap();

    let out = run(&home, &[dir.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a bad member and a .tar.gz fail"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("shard-00002.tar.gz: compressed tar shards are not read"),
        "{stderr}"
    );
    let records = records(&out);
    let shown = |member: &str| format!("{}/{member}", dir.display());
    let by_path: BTreeMap<String, &Value> = records
        .iter()
        .map(|r| (r["path"].as_str().unwrap().to_string(), r))
        .collect();
    assert_eq!(by_path.len(), records.len(), "each image once");
    assert_eq!(
        records.len(),
        outside.len() + 1,
        "every member and the .tar.gz"
    );

    // The same pictures as files: the same captions.
    let files: Vec<&str> = outside.values().map(|p| p.to_str().unwrap()).collect();
    let mut args = vec![];
    args.extend(files.iter().copied());
    let plain = run(&home, &args);
    let plain: BTreeMap<String, Value> = records_of(&plain);
    for (member, file) in &outside {
        let record = by_path[&shown(member)];
        let expected = &plain[file.to_str().unwrap()];
        assert_eq!(record["caption"], expected["caption"], "{member}");
        assert_eq!(
            record.get("error").is_some(),
            expected.get("error").is_some(),
            "{member}"
        );
        let (shard, name) = member.split_once('/').unwrap();
        let key = name.trim_end_matches(".png");
        assert_eq!(record["key"], key, "{member}");
        assert_eq!(record["shard"], format!("{}/{shard}", dir.display()));
        let source = &record["source_caption"];
        match key {
            // No .txt: the .json's caption.
            "000003" => assert_eq!(source, &format!("original caption {key}")),
            // Neither.
            "000010" => {
                assert!(record.get("source_caption").is_none() && record.get("source").is_none())
            }
            _ => {
                assert_eq!(source, &format!("a text caption {key}"));
                assert_eq!(
                    record["source"]["url"],
                    format!("https://example.com/{key}.png")
                );
            }
        }
    }
    let bad = by_path[&shown("shard-00000.tar/000005.png")];
    assert!(bad["error"].as_str().unwrap().len() > 5, "{bad}");
}

fn records_of(out: &Output) -> BTreeMap<String, Value> {
    records(out)
        .into_iter()
        .map(|r| (r["path"].as_str().unwrap().to_string(), r))
        .collect()
}

/// `--shard K/N` over a folder of shards gives each job whole tar files,
/// and the jobs together are one run; a tar damaged part-way keeps the
/// members before the damage and reports the rest.
#[test]
fn shards_split_by_tar_file_and_a_damaged_tar_keeps_what_came_before() {
    let (_work, home, dir, _) = setup();
    let whole = records_of(&run(&home, &[dir.to_str().unwrap()]));

    let mut union = BTreeMap::new();
    let mut tars_seen = BTreeMap::new();
    for k in 1..=3 {
        let part = run(
            &home,
            &["--shard", &format!("{k}/3"), dir.to_str().unwrap()],
        );
        for (path, record) in records_of(&part) {
            let shard = record["shard"].as_str().unwrap().to_string();
            let previous = tars_seen.insert(shard.clone(), k);
            assert!(
                previous.is_none() || previous == Some(k),
                "{shard} split between jobs"
            );
            assert!(union.insert(path, record).is_none());
        }
    }
    assert_eq!(union, whole);

    // Cut the second shard in the middle of its fourth member's header.
    let tar = dir.join("shard-00001.tar");
    let bytes = fs::read(&tar).unwrap();
    let fourth = find_header(&bytes, 3);
    fs::write(&tar, &bytes[..fourth + 100]).unwrap();
    let out = run(&home, &[tar.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("shard-00001.tar: damaged tar file after"),
        "{stderr}"
    );
    let kept: Vec<String> = records(&out)
        .iter()
        .filter(|r| r.get("caption").is_some())
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    assert!(!kept.is_empty() && kept.len() < 6, "{kept:?}");
}

/// Offset of the header of the `n`-th member (from 0) of a tar whose
/// members are each one header block and their padded data.
fn find_header(bytes: &[u8], n: usize) -> usize {
    let mut at = 0;
    for _ in 0..n {
        let size_field = std::str::from_utf8(&bytes[at + 124..at + 136]).unwrap();
        let size = u64::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
            .unwrap();
        at += 512 + (size as usize).div_ceil(512) * 512;
    }
    at
}

/// `caption search` over tar shards: each member is embedded as itself (the
/// index keys it by its own name under the tar), so the second search, from
/// the index, ranks exactly as the first did.
#[test]
fn search_ranks_tar_members_and_indexes_each_one() {
    let (_work, home, dir, _) = setup();
    let search = || {
        let out = common::caption_command(&home)
            .env("HF_HUB_OFFLINE", "1")
            .args([
                "search",
                "-m",
                "demo-clip",
                "--top",
                "100",
                "--format",
                "jsonl",
            ])
            .arg("a red circle")
            .arg(&dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "the bad member fails");
        records(&out)
    };
    let first = search();
    let scores: Vec<f64> = first.iter().filter_map(|r| r["score"].as_f64()).collect();
    assert_eq!(scores.len(), 13, "{first:?}");
    let distinct: std::collections::BTreeSet<u64> = scores.iter().map(|s| s.to_bits()).collect();
    assert!(distinct.len() > 10, "members embedded as one: {scores:?}");
    assert_eq!(search(), first);
}

/// `--output-dir`: one whole file per shard, the same records as stdout; a
/// re-run skips the shards whose file is there; a damaged shard gets no
/// file (so the next run tries it again); plain images are refused.
#[test]
fn output_dir_writes_a_file_per_shard_and_a_rerun_skips_finished_ones() {
    let (work, home, dir, outside) = setup();
    let whole = records_of(&run(&home, &[dir.to_str().unwrap()]));
    let out_dir = work.path().join("captions");
    let out_arg = out_dir.to_str().unwrap();
    let first = run(&home, &["--output-dir", out_arg, dir.to_str().unwrap()]);
    assert_eq!(first.status.code(), Some(1), "the bad member fails");
    assert!(first.stdout.is_empty());
    let file = |name: &str| out_dir.join(name);
    let read = |name: &str| fs::read_to_string(file(name)).unwrap();
    let mut written = BTreeMap::new();
    for name in ["shard-00000.jsonl", "shard-00001.jsonl"] {
        common::jsonl_by_path(&read(name), &mut written);
    }
    let whole_lines: BTreeMap<String, String> = whole
        .iter()
        .map(|(path, record)| (path.clone(), record.to_string()))
        .collect();
    let written: BTreeMap<String, String> = written
        .into_iter()
        .map(|(path, line)| {
            (
                path,
                serde_json::from_str::<Value>(&line).unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(written, whole_lines);
    assert_eq!(
        fs::read_dir(&out_dir).unwrap().count(),
        2,
        "no temporary files left"
    );

    let kept = read("shard-00000.jsonl");
    let redo = read("shard-00001.jsonl");
    fs::remove_file(file("shard-00001.jsonl")).unwrap();
    let again = run(&home, &["--output-dir", out_arg, dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("skipped 1 shards whose output is already in"),
        "{stderr}"
    );
    assert!(
        again.status.success(),
        "the bad member's shard was not redone: {stderr}"
    );
    assert_eq!(read("shard-00001.jsonl"), redo);
    assert_eq!(read("shard-00000.jsonl"), kept);

    // A damaged shard: reported, no file.
    let tar = dir.join("shard-00001.tar");
    let bytes = fs::read(&tar).unwrap();
    fs::write(&tar, &bytes[..find_header(&bytes, 3) + 100]).unwrap();
    fs::remove_file(file("shard-00001.jsonl")).unwrap();
    let damaged = run(&home, &["--output-dir", out_arg, tar.to_str().unwrap()]);
    assert_eq!(damaged.status.code(), Some(1));
    assert!(!file("shard-00001.jsonl").exists());

    let sidecar = run(&home, &["--sidecar", dir.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&sidecar.stderr);
    assert!(stderr.contains("have no folder of their own"), "{stderr}");

    let plain = outside.values().next().unwrap();
    let refused = run(&home, &["--output-dir", out_arg, plain.to_str().unwrap()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("is not in a tar"), "{stderr}");
}

/// `--output-dir` in Parquet: a table per shard with the sample's key,
/// shard and original caption as columns, the rows of the jsonl records.
#[test]
fn output_dir_writes_a_parquet_table_per_shard() {
    let (work, home, dir, _) = setup();
    let whole = records_of(&run(&home, &[dir.to_str().unwrap()]));
    let out_dir = work.path().join("tables");
    let out = common::caption_command(&home)
        .env("HF_HUB_OFFLINE", "1")
        .args(["-m", "demo", "--format", "parquet", "--output-dir"])
        .args([&out_dir, &dir])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "the bad member fails");
    let mut rows = BTreeMap::new();
    for name in ["shard-00000.parquet", "shard-00001.parquet"] {
        for row in common::parquet_rows(&out_dir.join(name)) {
            let path = row["path"].as_str().unwrap().to_string();
            assert!(rows.insert(path, row).is_none());
        }
    }
    assert_eq!(rows.len(), whole.len());
    for (path, record) in &whole {
        let mut record = record.as_object().unwrap().clone();
        record.remove("source");
        assert_eq!(&record, &rows[path], "{path}");
    }
}
