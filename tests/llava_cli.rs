//! LLaVA through the binary, on the tiny fixture of
//! tools/make_llava_fixtures.py: `--ask` through the chat template, a raw
//! `--prompt`, `caption chat` keeping the conversation, and the memory check
//! before loading.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use serde_json::Value;

fn model_dir() -> PathBuf {
    common::fixtures().join("models/llava-tiny")
}

fn image(name: &str) -> PathBuf {
    common::fixtures().join("images").join(name)
}

fn reference() -> Value {
    serde_json::from_str(&common::reference_json("llava-tiny.json")).unwrap()
}

/// Case `name`'s greedy answer (row 0), as transformers printed it, stripped.
fn greedy_text(reference: &Value, name: &str) -> String {
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap();
    case["greedy"]["text_stripped"][0]
        .as_str()
        .unwrap()
        .to_string()
}

/// The user's text of case `name`'s last message.
fn last_question(reference: &Value, name: &str) -> String {
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap();
    let content = case["messages"].as_array().unwrap().last().unwrap()["content"].clone();
    content
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "text")
        .unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string()
}

fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn ask_and_prompt_print_transformers_answers() {
    let reference = reference();
    let home = tempfile::tempdir().unwrap();
    let expected = greedy_text(&reference, "a_single_turn");
    let question = last_question(&reference, "a_single_turn");
    let line = one_record(home.path(), &["--ask", &question]);
    assert_eq!(line["answer"], expected, "{line}");
    let prompt = reference["cases"][0]["prompt"].as_str().unwrap();
    let line = one_record(home.path(), &["--prompt", prompt]);
    assert_eq!(line["caption"], expected, "{line}");
}

/// The jsonl record of chelsea.png with `args`, 12 new tokens at most.
fn one_record(home: &Path, args: &[&str]) -> Value {
    let out = common::caption_command(home)
        .args([
            "--format",
            "jsonl",
            "--no-exif-rotate",
            "--max-tokens",
            "12",
        ])
        .arg("-m")
        .arg(model_dir())
        .args(args)
        .arg(image("chelsea.png"))
        .output()
        .unwrap();
    serde_json::from_str(succeeded(&out).trim()).unwrap()
}

/// Runs `caption chat` with `input` on its stdin.
fn chat(home: &Path, input: &str) -> Output {
    let mut child = common::caption_command(home)
        .args(["chat", "--no-exif-rotate", "--max-tokens", "12", "-m"])
        .arg(model_dir())
        .arg(image("chelsea.png"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Two questions piped in: the first answered as case a, the second, with
/// the first exchange in the chat template's history, as case c.
#[test]
fn chat_answers_follow_the_conversation() {
    let reference = reference();
    let home = tempfile::tempdir().unwrap();
    let input = format!(
        "{}\n{}\n",
        last_question(&reference, "a_single_turn"),
        last_question(&reference, "c_multi_turn")
    );
    let out = chat(home.path(), &input);
    let expected = format!(
        "{}\n{}\n",
        greedy_text(&reference, "a_single_turn"),
        greedy_text(&reference, "c_multi_turn")
    );
    assert_eq!(succeeded(&out), expected);
}

/// A model that would not fit stops before loading, with one line naming
/// what it needs and how to go on; the override loads it anyway.
#[test]
fn a_model_too_big_for_the_memory_stops_before_loading() {
    let home = tempfile::tempdir().unwrap();
    let run = |vars: &[(&str, &str)]| {
        let mut cmd = common::caption_command(home.path());
        cmd.args(["--no-exif-rotate", "--max-tokens", "3", "-m"])
            .arg(model_dir())
            .args(["--ask", "what is it?"])
            .arg(image("chelsea.png"));
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = run(&[("CAPTION_MEMORY_LIMIT", "64K")]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("needs about") && stderr.contains("CAPTION_IGNORE_MEMORY"),
        "{stderr}"
    );
    let out = run(&[
        ("CAPTION_MEMORY_LIMIT", "64K"),
        ("CAPTION_IGNORE_MEMORY", "1"),
    ]);
    succeeded(&out);
}
