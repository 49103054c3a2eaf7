//! The built-in `demo-llava` (models/demo-llava, trained by
//! tools/make_demo_llava.py on the shapes world) against transformers on
//! pictures the training never saw (tests/fixtures/demo/eval/, examples/
//! and the two photos): the same prompts, token ids and greedy answers, one
//! question at a time and in two-turn conversations, so the same accuracy,
//! printed. Through the binary, `-m demo-llava` runs the copy built into it.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use caption::captioner::chat::llava_messages;
use caption::generate::GenerationConfig;
use caption::image::LoadOptions;
use caption::resolve::hub::{self, ModelSource};
use caption::{Captioner, RuntimeOptions};
use serde::Deserialize;

/// The script's `max_new_tokens` (models/demo-llava/generation_config.json).
const MAX_NEW_TOKENS: usize = 24;

/// Ours and transformers' float32 logits differ by rounding, about 1e-5 on
/// logits of a few units here (tests/llava_parity.rs measures the tiny
/// random model); a greedy step whose top two logits were recorded closer
/// than this could go either way and is compared by text alone. The
/// reference's `min_margin` says how many such steps there are (none when
/// this file was written).
const CLEAR_MARGIN: f64 = 1e-3;

#[derive(Debug, Deserialize)]
struct Reference {
    metrics: BTreeMap<String, serde_json::Value>,
    images: Vec<ImageCase>,
}

#[derive(Debug, Deserialize)]
struct ImageCase {
    set: String,
    image: String,
    cases: Vec<Case>,
    conversations: Vec<Conversation>,
}

#[derive(Debug, Deserialize)]
struct Case {
    #[serde(rename = "type")]
    kind: String,
    question: String,
    prompt: String,
    input_ids: Vec<u32>,
    new_ids: Vec<u32>,
    text: String,
    min_margin: f64,
    /// The world's answer (the caption for the instruction); none for the photos.
    answer: Option<String>,
    correct: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Conversation {
    messages: Vec<serde_json::Value>,
    prompt: String,
    input_ids: Vec<u32>,
    new_ids: Vec<u32>,
    text: String,
    min_margin: f64,
    correct: bool,
}

impl Conversation {
    /// The user's text in message `index`.
    fn user_text(&self, index: usize) -> String {
        let content = self.messages[index]["content"].as_array().unwrap();
        content.last().unwrap()["text"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> Reference {
    serde_json::from_str(&common::reference_json("demo-llava.json")).unwrap()
}

/// As `--model models/demo-llava` loads it.
fn load() -> Captioner {
    let files = hub::fetch(&ModelSource::Folder(root().join("models/demo-llava"))).unwrap();
    let runtime = RuntimeOptions {
        device: common::device(),
        ..RuntimeOptions::default()
    };
    Captioner::load(&files, &runtime).unwrap()
}

fn image(path: &str) -> image::RgbImage {
    caption::image::load_rgb8(&root().join(path), &LoadOptions::default()).unwrap()
}

fn greedy() -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: Some(MAX_NEW_TOKENS),
        ..GenerationConfig::default()
    }
}

/// Whether a recorded answer is clear of float noise, so its ids must match.
fn clear(min_margin: f64) -> bool {
    min_margin >= CLEAR_MARGIN
}

/// Right answers and questions, per set and per kind of question.
#[derive(Default, Debug)]
struct Tally(BTreeMap<(String, String), (usize, usize)>);

impl Tally {
    fn add(&mut self, set: &str, kind: &str, right: bool) {
        let entry = self.0.entry((set.into(), kind.into())).or_default();
        entry.0 += usize::from(right);
        entry.1 += 1;
    }

    fn accuracy(&self, set: &str, kinds: impl Fn(&str) -> bool) -> f64 {
        let (right, all) = self
            .0
            .iter()
            .filter(|((s, k), _)| s == set && kinds(k))
            .fold((0, 0), |(r, a), (_, (rr, aa))| (r + rr, a + aa));
        right as f64 / all as f64
    }
}

fn recorded(reference: &Reference, set: &str, figure: &str) -> f64 {
    reference.metrics[set][figure].as_f64().unwrap()
}

/// Every recorded question and the caption instruction, one at a time:
/// the prompt the chat template renders, its ids with the image expanded,
/// and the greedy answer are transformers'; so the accuracy is too.
#[test]
fn answers_and_captions_are_transformers_and_as_accurate() {
    let reference = reference();
    let model = load();
    let prompter = model.prompter().unwrap();
    let mut tally = Tally::default();
    let mut unclear = 0;
    for entry in &reference.images {
        let pixels = model.pixel_values(&[image(&entry.image)]).unwrap();
        let features = model.image_embeds(&pixels).unwrap();
        for case in &entry.cases {
            let what = format!("{} {:?}", entry.image, case.question);
            let rendered = prompter
                .render(&llava_messages(&[], &case.question))
                .unwrap();
            assert_eq!(rendered, case.prompt, "{what}");
            let ids = prompter.question_ids(&case.question).unwrap();
            assert_eq!(ids, case.input_ids, "{what}");
            let answer = prompter
                .generate(&features, &ids, &[0], &greedy())
                .unwrap()
                .remove(0)
                .remove(0);
            assert_eq!(answer.text, case.text, "{what}");
            if clear(case.min_margin) {
                assert_eq!(answer.ids[ids.len()..], case.new_ids, "{what}");
            } else {
                unclear += 1;
            }
            if let Some(truth) = &case.answer {
                // Ours against the world's answer; the recorded `correct` is
                // transformers' verdict, the same while the texts agree.
                let right = &answer.text == truth;
                assert_eq!(Some(right), case.correct, "{what}");
                tally.add(&entry.set, &case.kind, right);
            }
        }
    }
    for set in ["eval", "examples"] {
        let caption = tally.accuracy(set, |k| k == "caption");
        let questions = tally.accuracy(set, |k| k != "caption");
        eprintln!(
            "demo-llava {set}: caption exact {:.1}%, questions right {:.1}%",
            caption * 100.0,
            questions * 100.0
        );
        assert!((caption - recorded(&reference, set, "caption_exact")).abs() < 1e-4);
        assert!((questions - recorded(&reference, set, "question_accuracy")).abs() < 1e-4);
    }
    eprintln!("answers compared by text alone (a recorded margin under {CLEAR_MARGIN}): {unclear}");
}

/// Two-turn conversations through `Captioner::conversation`, as `caption
/// chat` holds them: the first answer is the model's own (a recorded case),
/// and the second, asked with it in the history from the kept cache, is
/// transformers' answer to the whole rendered conversation.
#[test]
fn conversations_keep_the_cache_and_answer_as_transformers() {
    let reference = reference();
    let model = load();
    let (mut right, mut all) = (0, 0);
    for entry in reference.images.iter().filter(|e| e.set == "eval") {
        let picture = image(&entry.image);
        for recorded in &entry.conversations {
            let what = format!("{} {:?}", entry.image, recorded.prompt);
            let mut conversation = model.conversation(&picture).unwrap();
            let first = recorded.user_text(0);
            let reply = conversation.ask(&first, 0, &greedy()).unwrap();
            let own = entry.cases.iter().find(|c| c.question == first).unwrap();
            assert_eq!(reply.answers[0].text, own.text, "{what}");
            let cached = conversation.cached_positions();
            assert_eq!(cached, own.input_ids.len(), "{what}");
            let reply = conversation
                .ask(&recorded.user_text(2), 0, &greedy())
                .unwrap();
            let answer = &reply.answers[0];
            assert_eq!(answer.text, recorded.text, "{what}");
            if clear(recorded.min_margin) {
                let n = recorded.input_ids.len();
                assert_eq!(answer.ids[n..], recorded.new_ids, "{what}");
            }
            assert_eq!(conversation.cached_positions(), recorded.input_ids.len());
            right += usize::from(recorded.correct);
            all += 1;
        }
    }
    let accuracy = right as f64 / all as f64;
    eprintln!(
        "demo-llava eval: second answers right {:.1}%",
        accuracy * 100.0
    );
    assert!((accuracy - recorded(&reference, "eval", "two_turn_accuracy")).abs() < 1e-4);
}

fn run(home: &Path, args: &[&str], input: Option<&str>) -> Output {
    let mut child = common::caption_command(home)
        .env_remove("CAPTION_NO_WEIGHT_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .current_dir(root())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(input) = input {
        stdin.write_all(input.as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The README's commands: `--ask`, a caption, and a piped `caption chat`,
/// from the copy built into the binary, print what transformers answered.
#[test]
fn the_built_in_demo_llava_answers_offline() {
    let reference = reference();
    let entry = reference
        .images
        .iter()
        .find(|e| e.image == "examples/shapes_1.png")
        .unwrap();
    let case = |question: &str| entry.cases.iter().find(|c| c.question == question).unwrap();
    let home = tempfile::tempdir().unwrap();
    let question = "what color is the background?";
    let out = run(
        home.path(),
        &["-m", "demo-llava", "--ask", question, &entry.image],
        None,
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", case(question).text)
    );

    let instruction = &entry.cases[0];
    assert_eq!(instruction.kind, "caption");
    // One picture: the caption alone, as for every model.
    let out = run(home.path(), &["-m", "demo-llava", &entry.image], None);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", instruction.text)
    );

    // The recorded two-turn conversation that starts with a question.
    let conversation = &entry.conversations[0];
    let (first, second) = (conversation.user_text(0), conversation.user_text(2));
    let out = run(
        home.path(),
        &["chat", "-m", "demo-llava", &entry.image],
        Some(&format!("{first}\n{second}\n")),
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n{}\n", case(&first).text, conversation.text)
    );
}
