//! Folders and scripts: a generated folder of a few hundred small images with
//! broken files among them, through the `caption` binary and the tiny model.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const GOOD: usize = 300;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The binary on the tiny model, pixels as stored.
fn caption(home: &Path) -> Command {
    let mut cmd = common::caption_command(home);
    cmd.arg("--no-exif-rotate")
        .arg("-m")
        .arg(fixtures().join("models/blip-tiny"));
    cmd
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// A JPEG whose header claims `w` x `h` pixels (a decompression bomb).
fn huge_jpeg(w: u16, h: u16) -> Vec<u8> {
    let mut jpg = std::fs::read(fixtures().join("images/astronaut.jpg")).unwrap();
    let sof = jpg.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
    jpg[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    jpg[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    jpg
}

/// `GOOD` small distinct images (some in a subfolder) and one of each kind
/// of broken file; returns the folder and the broken files' names.
fn make_folder(root: &Path) -> (PathBuf, Vec<&'static str>) {
    let dir = root.join("photos");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..GOOD {
        let n = i as u32;
        let image = image::RgbImage::from_fn(7, 5, |x, y| {
            image::Rgb([
                (i * 37 % 256) as u8,
                (x * 30 + n) as u8,
                (y * 50 + n * 7) as u8,
            ])
        });
        let name = if i % 10 == 0 {
            format!("sub/img{i:03}.png")
        } else {
            format!("img{i:03}.png")
        };
        image.save(dir.join(name)).unwrap();
    }
    let png = std::fs::read(dir.join("img001.png")).unwrap();
    let broken: Vec<(&str, Vec<u8>)> = vec![
        (
            "corrupt.jpg",
            (0..400u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ),
        ("truncated.png", png[..png.len() / 2].to_vec()),
        ("zero.png", vec![]),
        ("notes.jpg", b"shopping list: eggs, milk\n".to_vec()),
        ("bomb.jpg", huge_jpeg(60_000, 50_000)),
    ];
    let names = broken.iter().map(|(n, _)| *n).collect();
    for (name, bytes) in broken {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    std::fs::write(dir.join("README.md"), "not an image, not picked").unwrap();
    (dir, names)
}

fn jsonl(out: &Output) -> Vec<serde_json::Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// path -> caption (or error) of a jsonl run.
fn by_path(records: &[serde_json::Value]) -> BTreeMap<String, (Option<String>, Option<String>)> {
    let mut map = BTreeMap::new();
    for r in records {
        let path = r["path"].as_str().unwrap().to_string();
        let entry = (
            r["caption"].as_str().map(String::from),
            r["error"].as_str().map(String::from),
        );
        assert!(map.insert(path.clone(), entry).is_none(), "{path} twice");
    }
    map
}

#[test]
fn a_folder_is_captioned_once_per_image_and_bad_files_are_reported() {
    let home = tempfile::tempdir().unwrap();
    let (dir, broken) = make_folder(home.path());
    let run = |batch: &str| {
        caption(home.path())
            .args(["--recursive", "--format", "jsonl", "--batch-size", batch])
            .arg(&dir)
            .output()
            .unwrap()
    };
    let one = run("1");
    assert_eq!(one.status.code(), Some(1), "some images failed");
    let records = by_path(&jsonl(&one));
    assert_eq!(records.len(), GOOD + broken.len());
    let captioned = records.values().filter(|(c, _)| c.is_some()).count();
    assert_eq!(captioned, GOOD);
    for name in &broken {
        let shown = dir.join(name).display().to_string();
        let (caption, error) = &records[&shown];
        assert!(caption.is_none() && error.is_some(), "{name}");
        let err = stderr(&one);
        let lines: Vec<&str> = err.lines().filter(|l| l.contains(&shown)).collect();
        assert_eq!(lines.len(), 1, "{name}: {}", stderr(&one));
    }
    assert!(records[&dir.join("bomb.jpg").display().to_string()]
        .1
        .as_deref()
        .unwrap()
        .contains("too large"));
    assert!(records.keys().all(|p| !p.ends_with("README.md")));
    // Batching changes nothing.
    let eight = run("8");
    assert_eq!(stdout(&eight), stdout(&one));
    // Without --recursive the subfolder is not entered.
    let flat = caption(home.path())
        .args(["--format", "jsonl"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(jsonl(&flat).len(), GOOD - GOOD / 10 + broken.len());
}

#[test]
fn csv_and_json_parse_and_shards_partition_the_inputs() {
    let home = tempfile::tempdir().unwrap();
    let (dir, broken) = make_folder(home.path());
    let full = caption(home.path())
        .args(["-r", "--format", "jsonl"])
        .arg(&dir)
        .output()
        .unwrap();
    let full = by_path(&jsonl(&full));

    let csv_out = caption(home.path())
        .args(["-r", "--format", "csv"])
        .arg(&dir)
        .output()
        .unwrap();
    let mut reader = csv::Reader::from_reader(csv_out.stdout.as_slice());
    assert_eq!(reader.headers().unwrap(), vec!["path", "caption", "error"]);
    let mut rows = 0;
    for row in reader.records() {
        let row = row.unwrap();
        let (caption, error) = &full[&row[0]];
        assert_eq!(caption.as_deref().unwrap_or(""), &row[1]);
        assert_eq!(error.as_deref().unwrap_or(""), &row[2]);
        rows += 1;
    }
    assert_eq!(rows, GOOD + broken.len());

    let json_out = caption(home.path())
        .args(["-r", "--format", "json"])
        .arg(&dir)
        .output()
        .unwrap();
    let array: Vec<serde_json::Value> = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(by_path(&array), full);

    let mut seen = BTreeMap::new();
    for k in 1..=3 {
        let out = caption(home.path())
            .args(["-r", "--format", "jsonl", "--shard", &format!("{k}/3")])
            .arg(&dir)
            .output()
            .unwrap();
        let part = by_path(&jsonl(&out));
        assert!(
            part.len() > (GOOD + broken.len()) / 6,
            "shard {k} has {}",
            part.len()
        );
        for (path, result) in part {
            assert!(seen.insert(path, result).is_none(), "shards overlap");
        }
    }
    assert_eq!(seen, full);
}

#[test]
fn paths_can_come_from_stdin() {
    let home = tempfile::tempdir().unwrap();
    let (dir, _) = make_folder(home.path());
    let list = format!(
        "{}\n\n{}\r\n",
        dir.join("img001.png").display(),
        dir.join("sub").display()
    );
    let mut child = caption(home.path())
        .args(["--format", "jsonl", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(list.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(jsonl(&out).len(), 1 + GOOD / 10);
}

/// The sidecars in the folder. Once no run is going, there must be no
/// temporary file left either.
fn sidecars(dir: &Path) -> BTreeMap<PathBuf, String> {
    let found = sidecars_so_far(dir);
    for sub in [dir.to_path_buf(), dir.join("sub")] {
        for entry in std::fs::read_dir(sub).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().to_string();
            assert!(!name.ends_with(".tmp"), "a temporary file was left: {name}");
        }
    }
    found
}

/// The sidecars in the folder, while a run may be writing.
fn sidecars_so_far(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut found = BTreeMap::new();
    for sub in [dir.to_path_buf(), dir.join("sub")] {
        for entry in std::fs::read_dir(sub).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.ends_with(".txt") {
                found.insert(path.clone(), std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    found
}

#[test]
fn sidecars_are_whole_existing_ones_are_kept_and_an_interrupted_run_resumes() {
    let home = tempfile::tempdir().unwrap();
    let (dir, _) = make_folder(home.path());
    let full = caption(home.path())
        .args(["-r", "--format", "jsonl"])
        .arg(&dir)
        .output()
        .unwrap();
    let expected: BTreeMap<PathBuf, String> = by_path(&jsonl(&full))
        .into_iter()
        .filter_map(|(path, (caption, _))| {
            caption.map(|c| (Path::new(&path).with_extension("txt"), format!("sks {c}\n")))
        })
        .collect();
    assert_eq!(expected.len(), GOOD);

    // Interrupt a run part way: Ctrl-C lets the batch in hand finish.
    let child = caption(home.path())
        .args(["-r", "--sidecar", "--prefix", "sks ", "--format", "jsonl"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while sidecars_so_far(&dir).len() < 5 {
        assert!(std::time::Instant::now() < deadline, "no sidecars appeared");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let partial = sidecars(&dir);
    assert!(
        partial.len() < GOOD,
        "the run finished before it could be interrupted"
    );
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    // Every line printed is a whole record, every sidecar whole and right.
    let printed = jsonl(&out);
    assert!(printed.iter().all(|r| r["path"].is_string()));
    for (path, text) in &partial {
        assert_eq!(Some(text), expected.get(path), "{}", path.display());
    }

    // Resuming completes the rest, touching nothing already written.
    let resumed = caption(home.path())
        .args([
            "-r",
            "--sidecar",
            "--skip-existing",
            "--prefix",
            "sks ",
            "--format",
            "jsonl",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(
        resumed.status.code(),
        Some(1),
        "the broken files still fail"
    );
    let captioned = jsonl(&resumed)
        .iter()
        .filter(|r| r["caption"].is_string())
        .count();
    assert_eq!(captioned, GOOD - partial.len());
    assert_eq!(sidecars(&dir), expected);

    // Without --skip-existing or --overwrite, an existing sidecar is an error
    // for its image, and is left as it was.
    let again = caption(home.path())
        .args(["-r", "--sidecar", "--prefix", "other ", "--format", "jsonl"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    let refused = jsonl(&again)
        .iter()
        .filter(|r| {
            r["error"]
                .as_str()
                .is_some_and(|e| e.contains("already exists"))
        })
        .count();
    assert_eq!(refused, GOOD);
    assert_eq!(sidecars(&dir), expected);

    // --overwrite replaces them all (with a new prefix).
    let over = caption(home.path())
        .args(["-r", "--sidecar", "--overwrite", "--prefix", "zz "])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(over.status.code(), Some(1));
    let all = sidecars(&dir);
    assert_eq!(all.len(), GOOD);
    assert!(all.values().all(|t| t.starts_with("zz ")));

    // --existing append adds the new caption after the old text; the old
    // spellings are --existing skip and overwrite, and do not combine with it.
    let appended = caption(home.path())
        .args(["-r", "--sidecar", "--existing", "append", "--prefix", "yy "])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(
        appended.status.code(),
        Some(1),
        "the broken files still fail"
    );
    for (path, text) in sidecars(&dir) {
        // The old text without its line ending; the caption after its prefix.
        let old = all[&path].trim_end();
        let caption_text = old.strip_prefix("zz").unwrap().trim_start();
        assert_eq!(
            text,
            format!("{old}, yy {caption_text}\n"),
            "{}",
            path.display()
        );
    }
    let both = caption(home.path())
        .args(["--sidecar", "--existing", "append", "--overwrite"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
}

/// The issue's reproduction: a file name that is not UTF-8, named on the
/// command line, stopped the whole run with exit 2. Now it is captioned,
/// named on the command line, found in a folder, or missing; its path
/// shows U+FFFD in place of the bad bytes and, in jsonl, `path_bytes`
/// holds the name's bytes, so a program can still find the file.
#[cfg(unix)]
#[test]
fn file_names_that_are_not_utf8_are_captioned_and_named_by_their_bytes() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("photos");
    std::fs::create_dir(&dir).unwrap();
    let name = OsStr::from_bytes(b"caf\xe9.png");
    let photo = dir.join(name);
    std::fs::copy(fixtures().join("images/chelsea.png"), &photo).unwrap();
    let missing = dir.join(OsStr::from_bytes(b"gone\xff.png"));
    let out = caption(home.path())
        .args(["--format", "jsonl"])
        .arg(&photo)
        .arg(&dir)
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let records = jsonl(&out);
    assert_eq!(records.len(), 3, "{records:?}");
    let bytes = |record: &serde_json::Value| -> Vec<u8> {
        record["path_bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect()
    };
    // Problems found while gathering the inputs come first.
    let (errors, captions): (Vec<_>, Vec<_>) = records
        .iter()
        .partition(|record| record["error"].is_string());
    assert_eq!((errors.len(), captions.len()), (1, 2), "{records:?}");
    for record in &captions {
        assert!(record["caption"].is_string(), "{record}");
        assert_eq!(bytes(record), photo.as_os_str().as_bytes());
        assert!(record["path"]
            .as_str()
            .unwrap()
            .ends_with("caf\u{fffd}.png"));
    }
    assert_eq!(captions[0]["caption"], captions[1]["caption"]);
    assert_eq!(bytes(errors[0]), missing.as_os_str().as_bytes());
    // One line on stderr, for the missing one.
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("gone\u{fffd}.png"));
    // A UTF-8 name has no path_bytes.
    let plain = caption(home.path())
        .args(["--format", "jsonl"])
        .arg(fixtures().join("images/chelsea.png"))
        .output()
        .unwrap();
    assert!(jsonl(&plain)[0].get("path_bytes").is_none());
}

/// `--trim-repeats` cuts the random tiny BLIP's loop ("closek closek
/// closek") out of what it prints and what it writes to the sidecar, and
/// leaves the rest of the caption as it was.
#[test]
fn trim_repeats_cuts_a_loop_in_the_output_and_the_sidecar() {
    let home = tempfile::tempdir().unwrap();
    let photo = home.path().join("chelsea.png");
    std::fs::copy(fixtures().join("images/chelsea.png"), &photo).unwrap();
    let run = |extra: &[&str]| {
        let out = caption(home.path())
            .args(extra)
            .arg(&photo)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end()
            .to_string()
    };
    let looping = run(&[]);
    let trimmed = caption::output::repeats::trim_repeats(&looping).into_owned();
    assert_ne!(
        trimmed, looping,
        "the fixture's caption has a loop: {looping:?}"
    );
    assert_eq!(run(&["--trim-repeats", "--sidecar"]), trimmed);
    let sidecar = std::fs::read_to_string(home.path().join("chelsea.txt")).unwrap();
    assert_eq!(sidecar, format!("{trimmed}\n"));
}
