//! Flags and streams a user or a script can get wrong: every bad value is one
//! line on stderr and exit code 2 before any model loads, never a panic, a
//! hang or an empty caption; sidecars get the modes files normally get; and
//! no result is lost without the exit code saying so. On the bundled demo
//! models (offline, about a second a run).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The demo model's caption of examples/shapes_1.png (README, "Try it offline").
const SHAPES_1_CAPTION: &str = "a small yellow square on a gray background";

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The binary as [`common::caption_command`] sets it up, run through
/// `sh -c script` with the binary as `$0`: for what `Command` cannot do
/// itself (a umask, a closed descriptor).
fn through_sh(home: &Path, script: &str) -> Command {
    let caption = common::caption_command(home);
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(script).arg(caption.get_program());
    for (key, value) in caption.get_envs() {
        match value {
            Some(value) => sh.env(key, value),
            None => sh.env_remove(key),
        };
    }
    sh
}

/// A usage error: exit code 2, one line on stderr that contains `names`,
/// nothing on stdout.
fn assert_usage_error(out: &Output, names: &str, what: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{what}: {err}");
    assert_eq!(err.lines().count(), 1, "{what}: {err}");
    assert!(err.contains(names), "{what}: {err}");
    assert!(out.stdout.is_empty(), "{what}");
}

/// Each of these panicked, hung, or printed empty or cut captions with exit
/// code 0. The model named does not exist, so an error that names the flag
/// shows the flag was checked before any model was looked for.
#[test]
fn bad_flag_values_are_one_line_usage_errors_before_any_model_loads() {
    let home = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--sidecar", "--sidecar-ext", "a/b"], "--sidecar-ext"),
        (&["--sidecar", "--sidecar-ext", ""], "--sidecar-ext"),
        (&["--sidecar", "--sidecar-ext", ".."], "--sidecar-ext"),
        (&["--threads", "20000"], "--threads"),
        (&["--threads", "100000"], "--threads"),
        (&["--max-tokens", "0"], "--max-tokens"),
        (
            &["--beams", "3", "--length-penalty", "nan"],
            "--length-penalty",
        ),
        (
            &["--beams", "3", "--length-penalty=-inf"],
            "--length-penalty",
        ),
        (&["--sample", "--temperature", "1e-45"], "--temperature"),
        (&["--repetition-penalty", "1e-45"], "--repetition-penalty"),
        (&["--beams", "100000"], "--beams"),
        (&["--beams", "3", "--num-return", "100000"], "--num-return"),
    ];
    for (flags, names) in cases {
        let out = common::caption_command(home.path())
            .args(["-m", "./no-such-model"])
            .args(*flags)
            .arg(example("shapes_1.png"))
            .output()
            .unwrap();
        assert_usage_error(&out, names, &format!("{flags:?}"));
    }
    // `caption chat` checks its flags the same way.
    let out = common::caption_command(home.path())
        .args(["chat", "-m", "./no-such-model", "--threads", "20000"])
        .arg(example("shapes_1.png"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_usage_error(&out, "--threads", "chat --threads 20000");
}

/// `--max-tokens 18446744073709551615` overflowed the length arithmetic
/// (empty captions in a release build, a panic in a debug one); any length
/// past the model's positions now means "as many as fit". The other integer
/// flags accept their extremes as transformers does (top-k, n-gram size and
/// minimum length beyond any caption are no-ops or hold EOS off to the limit).
#[test]
fn huge_integer_flags_cap_at_what_the_model_can_do() {
    let home = tempfile::tempdir().unwrap();
    let huge = u64::MAX.to_string();
    for flags in [
        vec!["--max-tokens", huge.as_str()],
        vec!["--max-tokens", "1000"],
        vec!["--no-repeat-ngram", huge.as_str()],
        vec!["--batch-size", "4294967295"],
        vec!["--beams", "64", "--num-return", "64", "--max-tokens", "3"],
    ] {
        let out = common::caption_command(home.path())
            .args(["-m", "demo"])
            .args(&flags)
            .arg(example("shapes_1.png"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{flags:?}: {}", stderr(&out));
        if flags[0] != "--beams" {
            assert_eq!(stdout(&out), format!("{SHAPES_1_CAPTION}\n"), "{flags:?}");
        }
    }
    for flags in [
        vec!["--min-tokens", huge.as_str()],
        vec!["--sample", "--top-k", huge.as_str()],
    ] {
        let out = common::caption_command(home.path())
            .args(["-m", "demo"])
            .args(&flags)
            .arg(example("shapes_1.png"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{flags:?}: {}", stderr(&out));
        assert!(!stdout(&out).trim().is_empty(), "{flags:?}");
    }
}

/// The mode of the file at `path`, permission bits only.
#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Sidecars were always 0600 (tempfile's default), and `--overwrite` made a
/// 0644 one 0600.
#[cfg(unix)]
#[test]
fn a_new_sidecar_gets_the_umask_mode_and_a_replaced_one_keeps_its_own() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("shapes.png");
    std::fs::copy(example("shapes_1.png"), &image).unwrap();
    let sidecar = dir.path().join("shapes.txt");
    let run = |umask: &str, overwrite: bool| {
        let script = format!("umask {umask} && exec \"$0\" \"$@\"");
        let mut cmd = through_sh(home.path(), &script);
        cmd.args(["-m", "demo", "--sidecar"]);
        if overwrite {
            cmd.arg("--overwrite");
        }
        let out = cmd.arg(&image).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    };
    run("027", false);
    assert_eq!(mode(&sidecar), 0o640);
    std::fs::set_permissions(&sidecar, std::fs::Permissions::from_mode(0o644)).unwrap();
    run("077", true);
    assert_eq!(mode(&sidecar), 0o644);
    assert_eq!(
        std::fs::read_to_string(&sidecar).unwrap(),
        format!("{SHAPES_1_CAPTION}\n")
    );
}

/// `caption … >&-` printed every caption into nothing, with exit code 0.
#[test]
fn a_closed_stdout_fails_the_run_in_one_line() {
    let home = tempfile::tempdir().unwrap();
    let out = through_sh(home.path(), "exec \"$0\" \"$@\" >&-")
        .args(["-m", "demo"])
        .arg(example("shapes_1.png"))
        .output()
        .unwrap();
    assert_usage_error(&out, "stdout", "stdout closed");
}

/// A write error on stdout other than a closed pipe ends the run, and the
/// one line says it was stdout.
#[cfg(target_os = "linux")]
#[test]
fn a_full_stdout_fails_the_run_naming_stdout() {
    let home = tempfile::tempdir().unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = common::caption_command(home.path())
        .args(["-m", "demo"])
        .arg(example("shapes_1.png"))
        .stdout(full)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("stdout"), "{err}");
}

/// With `RUST_BACKTRACE=1`, candle wrote a backtrace into the text of its
/// errors: a shape mismatch in a model folder took about 100 lines.
#[test]
fn rust_backtrace_leaves_errors_on_one_line() {
    let home = tempfile::tempdir().unwrap();
    let model = home.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    for entry in std::fs::read_dir(&demo).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    // The weights say 160: a shape mismatch, reported by candle.
    config["text_config"]["intermediate_size"] = 161.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let out = common::caption_command(home.path())
        .env("RUST_BACKTRACE", "1")
        .arg("-m")
        .arg(&model)
        .arg(example("shapes_1.png"))
        .output()
        .unwrap();
    assert_usage_error(&out, "shape", "shape mismatch under RUST_BACKTRACE=1");
}

/// Runs `caption chat` on shapes_1 with the demo BLIP-2 model, `input` on stdin.
fn chat(home: &Path, input: &[u8]) -> Output {
    let mut child = common::caption_command(home)
        .args(["chat", "-m", "demo-blip2"])
        .arg(example("shapes_1.png"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// A line of invalid UTF-8 ended the conversation with exit code 2; it is a
/// question that cannot be asked: an empty answer, a reason, exit code 1.
#[test]
fn chat_answers_an_invalid_utf8_line_with_an_empty_line_and_goes_on() {
    let home = tempfile::tempdir().unwrap();
    let first = "what color is the background?";
    let last = "what shape is it?";
    let clean = chat(home.path(), format!("{first}\n{last}\n").as_bytes());
    assert!(clean.status.success(), "{}", stderr(&clean));
    let answers: Vec<String> = stdout(&clean).lines().map(str::to_string).collect();
    assert_eq!(answers.len(), 2);

    let mut input = format!("{first}\n").into_bytes();
    input.extend_from_slice(b"what \xff is it?\n");
    input.extend_from_slice(format!("{last}\n").as_bytes());
    let out = chat(home.path(), &input);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines, [answers[0].as_str(), "", answers[1].as_str()]);
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("question 2") && err.contains("UTF-8"), "{err}");
}

/// A file name with a line break split its error into two lines on stderr;
/// names are written on one line there, as the text format writes them.
#[test]
fn an_error_about_a_name_with_a_line_break_is_one_line() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("bad\nname.png");
    std::fs::write(&corrupt, b"not a picture").unwrap();
    let missing = dir.path().join("gone\nname.png");
    for bad in [&corrupt, &missing] {
        let out = common::caption_command(home.path())
            .args(["-m", "demo"])
            .arg(bad)
            .arg(example("shapes_1.png"))
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("bad name.png") || err.contains("gone name.png"),
            "{err}"
        );
    }
    // A name in an error that ends the run is one line too.
    let out = common::caption_command(home.path())
        .args(["chat", "-m", "demo-blip2"])
        .arg(&missing)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_usage_error(&out, "gone name.png", "chat on a missing image");
}

/// `caption --version` says whether this build can run on a GPU.
#[test]
fn the_version_says_whether_the_build_has_cuda() {
    let home = tempfile::tempdir().unwrap();
    let out = common::caption_command(home.path())
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    let expected = if cfg!(feature = "cuda") {
        "(CPU and CUDA)"
    } else {
        "(CPU only: built without the cuda feature)"
    };
    assert!(version.trim_end().ends_with(expected), "{version}");
}
