//! Many large photos: memory stays that of one full-size image, whatever
//! the batch size, and `--max-pixels` refuses bigger ones per image.

mod common;

use std::path::{Path, PathBuf};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// A `width` x `height` PNG (a gradient: small on disk, full size decoded).
fn big_png(path: &Path, width: u32, height: u32) {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    image.save(path).unwrap();
}

/// The peak resident memory of `cmd`, in bytes, and its exit status.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
// The child is reaped by `wait4`, which std has no form of (its `wait`
// gives no resource usage).
#[allow(clippy::zombie_processes)]
fn peak_memory(mut cmd: std::process::Command) -> (u64, std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, filling the two values we own.
    let waited = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(waited, child.id() as i32);
    // ru_maxrss is in KiB on Linux.
    (
        usage.ru_maxrss as u64 * 1024,
        std::process::ExitStatus::from_raw(status),
    )
}

/// The reproduction: 24 photos of 177 KB took 1.0 GB at batch 1
/// and 4.9 GB at batch 8, every image of a batch held at full size until
/// the model ran. Now each is shrunk to the model's size as soon as it is
/// decoded: eight 12-megapixel images (36 MB each decoded) at batch 8 cost
/// at most a few such images more than one small image does.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn a_batch_of_big_images_holds_one_at_full_size() {
    const IMAGE_BYTES: u64 = 4000 * 3000 * 3;
    let home = tempfile::tempdir().unwrap();
    let folder = home.path().join("big");
    std::fs::create_dir(&folder).unwrap();
    big_png(&folder.join("0.png"), 4000, 3000);
    for i in 1..8 {
        std::fs::copy(folder.join("0.png"), folder.join(format!("{i}.png"))).unwrap();
    }
    let run = |input: &Path| {
        let mut cmd = common::caption_command(home.path());
        cmd.args(["-m", "demo", "--batch-size", "8"]).arg(input);
        peak_memory(cmd)
    };
    // The first run writes the bundled demo model out, which costs memory
    // of its own: measure the second.
    let small_image = examples().join("shapes_1.png");
    assert!(run(&small_image).1.success());
    let (small, status) = run(&small_image);
    assert!(status.success());
    let (big, status) = run(&folder);
    assert!(status.success());
    let extra = big.saturating_sub(small);
    eprintln!(
        "peak: {} MB for one small image, {} MB for 8 big ones",
        small >> 20,
        big >> 20
    );
    // Holding the batch at full size took 8 images more (288 MB); one being
    // decoded and converted takes about two.
    assert!(
        extra < 4 * IMAGE_BYTES,
        "{} MB more than for a small image",
        extra >> 20
    );
}

/// `--max-pixels` refuses a larger image as one failed input, before
/// decoding it; the rest are captioned and the exit code is 1.
#[test]
fn max_pixels_refuses_bigger_images_one_by_one() {
    let home = tempfile::tempdir().unwrap();
    let folder = home.path().join("images");
    std::fs::create_dir(&folder).unwrap();
    big_png(&folder.join("small.png"), 40, 25);
    big_png(&folder.join("large.png"), 40, 26);
    let out = common::caption_command(home.path())
        .args(["-m", "demo", "--format", "jsonl", "--max-pixels", "1000"])
        .arg(&folder)
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let records: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(records.len(), 2);
    for record in &records {
        let large = record["path"].as_str().unwrap().ends_with("large.png");
        assert_eq!(record["error"].is_string(), large, "{record}");
        assert_eq!(record["caption"].is_string(), !large, "{record}");
    }
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("large.png") && stderr.contains("more than the limit of 1000 pixels"),
        "{stderr}"
    );
}
