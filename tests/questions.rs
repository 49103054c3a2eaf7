//! `--ask @FILE`: the questions in a file, one per line, asked as if each
//! were given with its own `--ask`.

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;

fn ask(home: &Path, asks: &[&str]) -> Output {
    let mut cmd = common::caption_command(home);
    cmd.env("HF_HUB_OFFLINE", "1")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["-m", "demo-vqa", "--format", "jsonl"]);
    for value in asks {
        cmd.args(["--ask", value]);
    }
    cmd.args(["examples/shapes_1.png", "examples/shapes_2.png"])
        .output()
        .unwrap()
}

#[test]
fn a_question_file_asks_each_of_its_lines() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("questions.txt");
    fs::write(
        &file,
        "what color is the background?\n\n  how many shapes are there?  \r\n",
    )
    .unwrap();
    let from_file = ask(
        home.path(),
        &[
            &format!("@{}", file.display()),
            "what shape is on the left?",
        ],
    );
    let given = ask(
        home.path(),
        &[
            "what color is the background?",
            "how many shapes are there?",
            "what shape is on the left?",
        ],
    );
    assert!(
        from_file.status.success(),
        "{}",
        String::from_utf8_lossy(&from_file.stderr)
    );
    assert_eq!(from_file.stdout, given.stdout);
    assert_eq!(String::from_utf8_lossy(&given.stdout).lines().count(), 6);

    fs::write(&file, "\n  \n").unwrap();
    let empty = ask(home.path(), &[&format!("@{}", file.display())]);
    assert_eq!(empty.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&empty.stderr);
    assert!(stderr.contains("holds no questions"), "{stderr}");
    let missing = ask(home.path(), &["@no-such-file.txt"]);
    assert_eq!(missing.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("--ask @no-such-file.txt"), "{stderr}");
}
