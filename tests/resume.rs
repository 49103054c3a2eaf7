//! `--resume FILE` survives being killed: runs of the binary are SIGKILLed
//! after a random number of records (from a fixed seed), or early, and the
//! same command run again each time; the finished file must hold every image exactly once, with
//! the records a single uninterrupted run prints, a broken picture's error
//! included.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

/// A small deterministic generator (SplitMix64), so the kill times are the
/// same on every run of the test.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn command(home: &Path, images: &Path, out: &Path) -> std::process::Command {
    let mut cmd = common::caption_command(home);
    cmd.env("HF_HUB_OFFLINE", "1")
        .args(["-m", "demo", "--batch-size", "2", "--resume"])
        .arg(out)
        .arg(images);
    cmd
}

fn finish(home: &Path, images: &Path, out: &Path) -> Output {
    command(home, images, out).output().unwrap()
}

/// A folder of the demo pictures four times over (176, so that a run takes
/// long enough to be killed in the middle) and one file that is not a
/// picture.
fn folder(at: &Path) -> usize {
    let mut n = common::demo_picture_folder(at);
    let pictures: Vec<_> = fs::read_dir(at)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for copy in 1..4 {
        for picture in &pictures {
            let name = picture.file_name().unwrap().to_str().unwrap();
            fs::copy(picture, at.join(format!("{copy}-{name}"))).unwrap();
            n += 1;
        }
    }
    fs::write(at.join("99-broken.png"), b"not a picture").unwrap();
    n + 1
}

/// How many records `out` holds (0 before it exists).
fn lines(out: &Path) -> usize {
    fs::read_to_string(out).map_or(0, |text| text.lines().count())
}

fn read(out: &Path) -> BTreeMap<String, String> {
    let mut records = BTreeMap::new();
    common::jsonl_by_path(&fs::read_to_string(out).unwrap(), &mut records);
    records
}

#[test]
fn killed_runs_resumed_leave_every_image_once() {
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    fs::create_dir(&home).unwrap();
    let images = work.path().join("images");
    let n = folder(&images);

    let single = common::caption_command(&home)
        .env("HF_HUB_OFFLINE", "1")
        .args(["-m", "demo", "--batch-size", "2", "--format", "jsonl"])
        .arg(&images)
        .output()
        .unwrap();
    assert_eq!(single.status.code(), Some(1), "the broken picture fails");
    let mut expected = BTreeMap::new();
    common::jsonl_by_path(&String::from_utf8(single.stdout).unwrap(), &mut expected);
    assert_eq!(expected.len(), n);

    let out = work.path().join("captions.jsonl");
    let mut rng = SplitMix(7);
    // Kills after which the file had grown but was not finished: the
    // interesting ones. Every third run is killed early instead (while the
    // model loads, or in its first batches).
    let mut in_the_middle = 0;
    for round in 0..60 {
        let before = lines(&out);
        if before >= n {
            break;
        }
        let mut child = command(&home, &images, &out)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if round % 3 == 2 {
            std::thread::sleep(Duration::from_millis(rng.next() % 40));
        } else {
            // Killed once it has written a random number of records more,
            // whatever the machine's speed.
            let target = before + 1 + (rng.next() % 25) as usize;
            while lines(&out) < target && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        let killed = child.try_wait().unwrap().is_none();
        if killed {
            child.kill().unwrap(); // SIGKILL: no handler runs
        }
        let output = child.wait_with_output().unwrap();
        assert!(
            output.stdout.is_empty(),
            "--resume writes to its file alone"
        );
        let after = lines(&out);
        if killed && after > before && after < n {
            in_the_middle += 1;
        }
    }
    eprintln!("runs killed in the middle of writing: {in_the_middle}");
    assert!(
        in_the_middle >= 5,
        "only {in_the_middle} runs were killed in the middle of writing"
    );

    let last = finish(&home, &images, &out);
    let stderr = String::from_utf8_lossy(&last.stderr);
    assert!(stderr.contains("already done"), "{stderr}");
    // The broken picture is tried again by every run, and fails again.
    assert_eq!(last.status.code(), Some(1), "{stderr}");
    assert_eq!(read(&out), expected);

    // Once more: nothing left to do, nothing loaded, the file unchanged
    // but for the error, tried again and written again.
    let before = fs::read_to_string(&out).unwrap();
    let again = finish(&home, &images, &out);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(read(&out), expected);
    assert_eq!(fs::read_to_string(&out).unwrap().len(), before.len());
}

/// A torn last line (what a kill in the middle of a write leaves) is cut
/// off with the image before it, and both are written again, once.
#[test]
fn a_torn_last_line_is_redone_not_duplicated() {
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    fs::create_dir(&home).unwrap();
    let images = work.path().join("images");
    common::demo_picture_folder(&images);
    let out = work.path().join("captions.jsonl");
    let first = finish(&home, &images, &out);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let expected = read(&out);
    let text = fs::read_to_string(&out).unwrap();
    // Keep 10 whole lines and half of the 11th.
    let ends: Vec<usize> = text.match_indices('\n').map(|(i, _)| i + 1).collect();
    let torn = ends[9] + (ends[10] - ends[9]) / 2;
    fs::write(&out, &text[..torn]).unwrap();

    let resumed = finish(&home, &images, &out);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(
        stderr.contains("9 images already done") && stderr.contains("unfinished last line"),
        "{stderr}"
    );
    assert_eq!(read(&out), expected);

    // Not a file of records: refused, left as it was.
    let notes = work.path().join("notes.txt");
    fs::write(&notes, "shopping list\n").unwrap();
    let refused = command(&home, &images, &notes).output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("line 1 is not a jsonl record"), "{stderr}");
    assert_eq!(fs::read_to_string(&notes).unwrap(), "shopping list\n");
}
