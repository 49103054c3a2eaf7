//! The `caption` binary as scripts use it: stdout, stderr and exit codes, on
//! the tiny fixture model, through a model folder and through an offline
//! Hugging Face cache.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_dir() -> PathBuf {
    fixtures().join("models/blip-tiny")
}

fn image(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

/// The caption transformers printed for `image` without a prompt.
fn reference_text(image: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/blip-tiny.json")).unwrap(),
    )
    .unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["image"] == image && c["prompt"].is_null())
        .unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The binary on the fixtures, pixels as stored (as transformers reads them).
fn caption(home: &Path) -> Command {
    let mut cmd = bare_caption(home);
    cmd.arg("--no-exif-rotate");
    cmd
}

/// The binary with a clean environment: no user cache, no network settings.
fn bare_caption(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_caption"));
    for var in [
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "XDG_CACHE_HOME",
        "CAPTION_MODEL",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", home);
    cmd
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

#[test]
fn one_image_prints_the_caption_alone() {
    let home = tempfile::tempdir().unwrap();
    let out = caption(home.path())
        .arg("-m")
        .arg(model_dir())
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}\n", reference_text("chelsea.png")));
}

#[test]
fn several_images_print_path_tab_caption_and_bad_files_fail_the_run() {
    let home = tempfile::tempdir().unwrap();
    let broken = home.path().join("broken.jpg");
    std::fs::write(&broken, b"this is not a picture").unwrap();
    let missing = home.path().join("missing.png");
    let out = caption(home.path())
        .arg("-m")
        .arg(model_dir())
        .args([
            image("chelsea.png"),
            broken.clone(),
            missing.clone(),
            image("rgba.png"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let expected = format!(
        "{}\t{}\n{}\t{}\n",
        image("chelsea.png").display(),
        reference_text("chelsea.png"),
        image("rgba.png").display(),
        reference_text("rgba.png")
    );
    assert_eq!(stdout(&out), expected);
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "one line per failed file: {err}");
    assert!(lines[0].contains(&broken.display().to_string()), "{err}");
    assert!(lines[1].contains(&missing.display().to_string()), "{err}");
}

#[test]
fn jsonl_has_one_record_per_image_with_errors_inline() {
    let home = tempfile::tempdir().unwrap();
    let empty = home.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let out = caption(home.path())
        .args(["--format", "jsonl", "--batch-size", "2", "-m"])
        .arg(model_dir())
        .args([image("palette.png"), empty.clone(), image("one_pixel.png")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let records: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3);
    assert_eq!(records[0]["caption"], reference_text("palette.png"));
    assert_eq!(records[1]["path"], empty.display().to_string());
    assert!(
        records[1]["error"].as_str().unwrap().contains("empty"),
        "{}",
        records[1]
    );
    assert!(records[1].get("caption").is_none());
    assert_eq!(records[2]["caption"], reference_text("one_pixel.png"));
}

/// Lays the fixture model out as huggingface_hub does in `$HF_HOME/hub`:
/// blobs, a snapshot per commit, and a ref naming the commit.
fn populate_hub_cache(hf_home: &Path, repo: &str, commit: &str) {
    let repo_dir = hf_home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let entry = entry.unwrap();
        let blob = repo_dir.join("blobs").join(entry.file_name());
        std::fs::copy(entry.path(), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(entry.file_name())).unwrap();
    }
}

#[test]
fn a_cached_hub_model_loads_offline_by_repo_id_and_by_commit() {
    let home = tempfile::tempdir().unwrap();
    let hf_home = home.path().join("hf");
    let commit = "3b7c1d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8";
    populate_hub_cache(&hf_home, "fixture-org/blip-tiny", commit);
    for spec in [
        "fixture-org/blip-tiny".to_string(),
        format!("fixture-org/blip-tiny@{commit}"),
    ] {
        let out = caption(home.path())
            .env("HF_HOME", &hf_home)
            .env("HF_HUB_OFFLINE", "1")
            .args(["-m", &spec])
            .arg(image("chelsea.png"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{spec}: {}", stderr(&out));
        assert_eq!(stdout(&out), format!("{}\n", reference_text("chelsea.png")));
    }
}

#[test]
fn an_uncached_model_offline_fails_with_one_clear_line() {
    let home = tempfile::tempdir().unwrap();
    let out = caption(home.path())
        .env("HF_HOME", home.path().join("empty-cache"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["-m", "fixture-org/not-downloaded"])
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("fixture-org/not-downloaded"), "{err}");
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("--model PATH"),
        "{err}"
    );
}

#[test]
fn models_lists_aliases_and_their_cache_state() {
    let home = tempfile::tempdir().unwrap();
    let out = bare_caption(home.path()).arg("models").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let base = text
        .lines()
        .find(|l| l.starts_with("blip-base\t"))
        .expect("blip-base listed");
    assert!(
        base.contains("Salesforce/blip-image-captioning-base") && base.ends_with("\tno"),
        "{base}"
    );
}

#[test]
fn usage_errors_exit_with_two() {
    let home = tempfile::tempdir().unwrap();
    let no_images = caption(home.path()).output().unwrap();
    assert_eq!(no_images.status.code(), Some(2));
    let bad_model = caption(home.path())
        .args(["-m", "not a model"])
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    assert_eq!(bad_model.status.code(), Some(2));
    assert!(
        stderr(&bad_model).contains("unknown model"),
        "{}",
        stderr(&bad_model)
    );
}

#[test]
fn a_closed_pipe_ends_the_run_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    let home = tempfile::tempdir().unwrap();
    let images: Vec<PathBuf> = (0..40).map(|_| image("one_pixel.png")).collect();
    let mut child = caption(home.path())
        .arg("-m")
        .arg(model_dir())
        .args(&images)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, then close our end like `head -1` does.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    let _ = stdout.read(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
}
