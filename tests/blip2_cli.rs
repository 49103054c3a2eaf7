//! The `caption` binary with a BLIP-2 model, as scripts use it: captions,
//! `--ask` and `--prompt` on the tiny fixture (tools/make_blip2_fixtures.py),
//! through a model folder and an offline Hugging Face cache, and
//! `caption chat` fed through a pipe.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use caption::captioner::blip2::conversation_prompt;
use caption::Turn;
use serde_json::Value;

const TEMPLATE: &str = "Question: {} Answer:";
/// The fixture OPT's context: 64 positions, 5 taken by the query tokens.
const TEXT_POSITIONS: usize = 64 - 5;
/// transformers' default length, which nothing in the fixture overrides.
const REPLY_TOKENS: usize = 20;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn image(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// transformers' greedy text for (image, prompt) from the fixture reference.
fn reference_text(image: &str, prompt: Option<&str>) -> String {
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/blip2-opt-tiny.json")).unwrap(),
    )
    .unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["image"] == image && c["prompt"].as_str() == prompt)
        .unwrap_or_else(|| panic!("no case for {image} {prompt:?}"))["greedy"]["text"]
        .as_str()
        .unwrap()
        .to_string()
}

fn jsonl(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "{}", stderr(out));
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `caption --format jsonl --no-exif-rotate -m MODEL ARGS... IMAGES...`
fn run_jsonl(home: &Path, model: &Path, args: &[&str], images: &[&str]) -> Vec<Value> {
    let mut cmd = common::caption_command(home);
    cmd.args(["--format", "jsonl", "--no-exif-rotate", "-m"])
        .arg(model)
        .args(args);
    for name in images {
        cmd.arg(image(name));
    }
    jsonl(&cmd.output().unwrap())
}

#[test]
fn captions_questions_and_prompts_print_transformers_continuations() {
    let home = tempfile::tempdir().unwrap();
    let images = ["chelsea.png", "astronaut.jpg", "rgba.png"];
    for name in ["blip2-opt-tiny", "blip2-opt-tiny-legacy"] {
        let model = model_dir(name);
        let records = run_jsonl(home.path(), &model, &[], &images);
        for (record, image_name) in records.iter().zip(images) {
            assert_eq!(
                record["caption"],
                reference_text(image_name, None),
                "{name}"
            );
        }

        let question = "how many shapes are there?";
        let records = run_jsonl(home.path(), &model, &["--ask", question], &images);
        for (record, image_name) in records.iter().zip(images) {
            let prompt = format!("Question: {question} Answer:");
            assert_eq!(record["question"], question);
            assert_eq!(record["answer"], reference_text(image_name, Some(&prompt)));
        }

        let prompt =
            "Question: what is in the picture? Answer: a cat. Question: what color is it? Answer:";
        let records = run_jsonl(home.path(), &model, &["--prompt", prompt], &images);
        for (record, image_name) in records.iter().zip(images) {
            assert_eq!(record["caption"], reference_text(image_name, Some(prompt)));
        }
    }
}

/// The older, sharded checkpoint through the Hub cache, as a user's download
/// of Salesforce/blip2-opt-2.7b at its pre-image-token commit would load.
#[test]
fn a_sharded_checkpoint_loads_from_the_hub_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    let hf_home = home.path().join("hf");
    let commit = "51572668da0eb669e01a189dc22abe6088589a24";
    common::populate_hub_cache(
        &hf_home,
        "fixture-org/blip2-tiny",
        commit,
        &model_dir("blip2-opt-tiny-legacy"),
    );
    let out = common::caption_command(home.path())
        .env("HF_HOME", &hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "--no-exif-rotate",
            "-m",
            &format!("fixture-org/blip2-tiny@{commit}"),
        ])
        .args(["--ask", "what is in the picture?"])
        .arg(image("wide.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = reference_text(
        "wide.png",
        Some("Question: what is in the picture? Answer:"),
    );
    // One image, one question: the answer alone, on one line.
    assert_eq!(stdout(&out), format!("{expected}\n"));
}

/// Runs `caption chat` with `questions` written into its stdin, one per line.
fn chat(home: &Path, model: &Path, image_name: &str, input: &str) -> Output {
    let mut child = common::caption_command(home)
        .args(["chat", "--no-exif-rotate", "-m"])
        .arg(model)
        .arg(image(image_name))
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

/// Every answer in a piped conversation is what a one-shot `--prompt` gives
/// for the prompt the conversation had accumulated: earlier turns in the
/// authors' format, the oldest dropped (with a notice on stderr) once the
/// prompt and a 20-token reply no longer fit in the 59 text positions.
#[test]
fn piped_chat_answers_equal_one_shot_prompts_of_the_accumulated_turns() {
    let home = tempfile::tempdir().unwrap();
    let model = model_dir("blip2-opt-tiny");
    let tokens = common::load("blip2-opt-tiny");
    let questions = [
        "what is in the picture?",
        "what color is it?",
        "how many shapes are there?",
        "what color is it?",
    ];
    // A blank line is not a question; no trailing newline after the last one.
    let input = format!(
        "{}\n\n{}\n{}\n{}",
        questions[0], questions[1], questions[2], questions[3]
    );
    let out = chat(home.path(), &model, "astronaut.jpg", &input);
    assert!(out.status.success(), "{}", stderr(&out));
    let answers: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(answers.len(), questions.len(), "{answers:?}");

    let mut turns: Vec<Turn> = Vec::new();
    let mut forgotten = 0;
    for (question, answer) in questions.iter().zip(&answers) {
        let prompt = loop {
            let prompt = conversation_prompt(TEMPLATE, &turns, question);
            if tokens.prompt_ids(Some(&prompt)).unwrap().len() + REPLY_TOKENS <= TEXT_POSITIONS {
                break prompt;
            }
            turns.remove(0);
            forgotten += 1;
        };
        let one_shot = run_jsonl(
            home.path(),
            &model,
            &["--prompt", &prompt],
            &["astronaut.jpg"],
        );
        let expected = one_shot[0]["caption"].as_str().unwrap().to_string();
        // The chat writes one line per answer: a line break inside one is a space.
        assert_eq!(answer, &expected.replace(['\n', '\r'], " "), "{prompt}");
        turns.push(Turn {
            question: question.to_string(),
            answer: expected,
        });
    }
    assert!(forgotten > 0, "the fixture's short context should fill up");
    let notices = stderr(&out)
        .lines()
        .filter(|l| l.contains("forgot the oldest"))
        .count();
    assert!(notices > 0 && notices <= forgotten, "{}", stderr(&out));
}

#[test]
fn chat_reports_a_question_that_cannot_fit_and_goes_on() {
    let home = tempfile::tempdir().unwrap();
    let model = model_dir("blip2-opt-tiny");
    let long = "is it a red circle or a blue square ".repeat(6);
    let input = format!("{long}\nwhat is in the picture?\n");
    let out = chat(home.path(), &model, "chelsea.png", &input);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    // The failed question keeps its line (empty), so answers stay paired.
    let prompt = "Question: what is in the picture? Answer:";
    assert_eq!(
        lines,
        [
            "",
            reference_text("chelsea.png", Some(prompt))
                .replace(['\n', '\r'], " ")
                .as_str()
        ]
    );
    assert!(stderr(&out).contains("question 1: the question is too long"));
}

#[test]
fn chat_refuses_models_that_cannot_converse_and_unreadable_images() {
    let home = tempfile::tempdir().unwrap();
    let cases = [
        (
            model_dir("blip-tiny"),
            "chelsea.png",
            "cannot hold a conversation",
        ),
        (
            model_dir("blip2-opt-tiny"),
            "no-such-image.png",
            "no-such-image.png",
        ),
    ];
    for (model, image_name, what) in cases {
        let out = chat(home.path(), &model, image_name, "what is it?\n");
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(out.stdout.is_empty());
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(what), "{err}");
    }
    // An alias of another family is refused before anything is downloaded.
    let out = common::caption_command(home.path())
        .args(["chat", "-m", "blip-base"])
        .arg(image("chelsea.png"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("blip-base is a blip model"),
        "{}",
        stderr(&out)
    );
}
