//! LLaVA (CLIP vision tower + Llama with grouped-query attention) against
//! transformers on the tiny random fixtures of tools/make_llava_fixtures.py:
//! `llava-tiny` (transformers 5's default save: `language_model.model.*`, a
//! bare `vision_tower.*`), `llava-tiny-legacy` (the same weights in the
//! llava-hf hub layout, `vision_tower.vision_model.*`, with an old-style
//! config and the processor's older files) and `llava-tiny-full` (the
//! `model.*` layout, `full` feature selection from two layers, linear rope
//! scaling, a tied head). For each case the reference holds the chat
//! template's text, the processor's ids, pixel values, image features,
//! the first greedy steps' logits, and greedy and 3-beam answers. Every
//! greedy step's top-1/top-2 margin is recorded (>= 0.234 here); the answers
//! survived +-1e-3 noise on the logits and a float64 rerun.

mod common;

use candle_core::{DType, Device, Tensor};
use caption::captioner::chat::llava_messages;
use caption::captioner::llava::LlavaDecoder;
use caption::generate::{Decoder, GenerationConfig, GenerationDefaults};
use caption::load::chat_template::{Content, Message};
use caption::{CaptionRequest, Captioner, Turn};
use common::{max_abs, max_abs_diff};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Reference {
    min_margin: f64,
    cases: Vec<Case>,
    bf16: Bf16,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    images: Vec<String>,
    messages: Vec<serde_json::Value>,
    prompt: String,
    input_ids: Vec<Vec<u32>>,
    pixel_values: Recorded,
    image_features: Recorded,
    greedy: Greedy,
    beams: Beams,
}

#[derive(Debug, Deserialize)]
struct Recorded {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Recorded {
    fn tensor(&self) -> Tensor {
        Tensor::from_vec(self.data.clone(), self.shape.as_slice(), &Device::Cpu).unwrap()
    }
}

#[derive(Debug, Deserialize)]
struct Greedy {
    new_ids: Vec<Vec<u32>>,
    text_stripped: Vec<String>,
    stopped_on_eos: Vec<bool>,
    /// `[step][row][vocab]`.
    logits_first_steps: Vec<Vec<Vec<f32>>>,
}

#[derive(Debug, Deserialize)]
struct Beams {
    /// `[row][returned]`.
    new_ids: Vec<Vec<Vec<u32>>>,
    sequences_scores: Vec<Vec<f32>>,
    text_stripped: Vec<Vec<String>>,
    stable: bool,
}

#[derive(Debug, Deserialize)]
struct Bf16 {
    case: String,
    first_logits: Vec<Vec<f32>>,
    max_abs_diff_to_f32: f64,
    greedy_new_ids: Vec<Vec<u32>>,
}

const MODELS: [(&str, &str); 3] = [
    ("llava-tiny", "llava-tiny.json"),
    ("llava-tiny-legacy", "llava-tiny.json"),
    ("llava-tiny-full", "llava-tiny-full.json"),
];

fn reference(file: &str) -> Reference {
    serde_json::from_str(&common::reference_json(file)).unwrap()
}

/// A message as transformers' processors take it, in our types.
fn message(json: &serde_json::Value) -> Message {
    let content = json["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|part| match part["type"].as_str().unwrap() {
            "image" => Content::Image,
            "text" => Content::Text {
                text: part["text"].as_str().unwrap().to_string(),
            },
            other => panic!("content type {other}"),
        })
        .collect();
    Message {
        role: json["role"].as_str().unwrap().to_string(),
        content,
    }
}

fn messages(case: &Case) -> Vec<Message> {
    case.messages.iter().map(message).collect()
}

fn greedy(max_new_tokens: usize) -> GenerationConfig {
    GenerationDefaults {
        max_new_tokens: Some(max_new_tokens),
        ..Default::default()
    }
    .resolve(0)
}

fn beams3(max_new_tokens: usize) -> GenerationConfig {
    GenerationDefaults {
        max_new_tokens: Some(max_new_tokens),
        num_beams: Some(3),
        num_return_sequences: Some(3),
        ..Default::default()
    }
    .resolve(0)
}

/// The image features of a case's pictures, from our own preprocessing.
fn features(model: &Captioner, case: &Case) -> Tensor {
    let images: Vec<_> = case.images.iter().map(|name| common::image(name)).collect();
    let pixel_values = model.pixel_values(&images).unwrap();
    model.image_embeds(&pixel_values).unwrap()
}

#[test]
fn recorded_decisions_are_clear_of_float_noise() {
    for (_, file) in MODELS {
        let reference = reference(file);
        assert!(reference.min_margin >= 0.2, "{}", reference.min_margin);
        assert!(reference.cases.len() >= 5);
        assert!(reference.cases.iter().all(|c| c.beams.stable));
        let stops: Vec<bool> = reference
            .cases
            .iter()
            .flat_map(|c| c.greedy.stopped_on_eos.clone())
            .collect();
        assert!(stops.contains(&true) && stops.contains(&false), "{file}");
    }
}

/// The chat template renders byte for byte what `apply_chat_template`
/// gives, and the ids are the processor's, `<image>` expanded.
#[test]
fn prompts_render_and_tokenize_as_the_processor_does() {
    for (name, file) in MODELS {
        let model = common::load(name);
        assert!(model.converses() && model.captions() && model.answers_questions());
        let prompter = model.prompter().unwrap();
        for case in reference(file).cases {
            let text = prompter.render(&messages(&case)).unwrap();
            assert_eq!(text, case.prompt, "{name} {}", case.name);
            assert_eq!(
                prompter.ids(&text).unwrap(),
                case.input_ids[0],
                "{name} {}",
                case.name
            );
        }
    }
}

/// Pixels, features and first-step logits in float32, each within a
/// tolerance far below what could change a decision: CLIP's preprocessing
/// is exact to f32 rounding of the normalisation (1e-5); features and
/// logits come out of different summation orders in every product (the
/// random weights have large gains: logits reach 60, features 12), so they
/// are compared relative to the largest value, at 1e-5 of it (measured: 3e-7
/// to 7e-7, a few float32 steps). The smallest recorded top-1/top-2 margin
/// is 0.23, over 500 times the tolerance.
#[test]
fn pixels_features_and_logits_match_transformers() {
    for (name, file) in MODELS {
        let model = common::load(name);
        let prompter = model.prompter().unwrap();
        for case in reference(file).cases {
            let what = format!("{name} {}", case.name);
            let images: Vec<_> = case.images.iter().map(|n| common::image(n)).collect();
            let pixel_values = model.pixel_values(&images).unwrap();
            let expected = case.pixel_values.tensor();
            assert!(
                max_abs_diff(&pixel_values, &expected) < 1e-5,
                "{what}: pixels"
            );

            let features = model.image_embeds(&expected).unwrap();
            let expected = case.image_features.tensor();
            let diff = max_abs_diff(&features, &expected);
            assert!(
                diff <= 1e-5 * max_abs(&expected),
                "{what}: features off by {diff}"
            );

            let ids = &case.input_ids[0];
            let rows = features.dim(0).unwrap();
            let lm = &prompter.model.language_model;
            let start = prompter.image_start(ids).unwrap();
            let mut decoder = LlavaDecoder::new(lm, lm.new_cache(), features, start, 0);
            let input = Tensor::new(vec![ids.clone(); rows], &Device::Cpu).unwrap();
            let logits = decoder.step(&input).unwrap();
            let expected =
                Tensor::new(case.greedy.logits_first_steps[0].clone(), &Device::Cpu).unwrap();
            let diff = max_abs_diff(&logits, &expected);
            assert!(
                diff <= 1e-5 * max_abs(&expected),
                "{what}: logits off by {diff}"
            );
        }
    }
}

/// Greedy and 3-beam answers: ids and text identical, beam scores within
/// 1e-4 (log-probabilities summed over 12 steps, each off by float32
/// rounding of logits near 35).
#[test]
fn greedy_and_beam_answers_are_transformers() {
    for (name, file) in MODELS {
        let model = common::load(name);
        let prompter = model.prompter().unwrap();
        for case in reference(file).cases {
            let what = format!("{name} {}", case.name);
            let features = features(&model, &case);
            let ids = &case.input_ids[0];
            let streams: Vec<u64> = (0..case.images.len() as u64).collect();
            let answers = prompter
                .generate(&features, ids, &streams, &greedy(12))
                .unwrap();
            for (row, answer) in answers.iter().enumerate() {
                assert_eq!(
                    answer[0].ids[ids.len()..],
                    case.greedy.new_ids[row],
                    "{what}"
                );
                assert_eq!(answer[0].text, case.greedy.text_stripped[row], "{what}");
            }
            let answers = prompter
                .generate(&features, ids, &streams, &beams3(12))
                .unwrap();
            for (row, answer) in answers.iter().enumerate() {
                for (k, sequence) in answer.iter().enumerate() {
                    assert_eq!(
                        sequence.ids[ids.len()..],
                        case.beams.new_ids[row][k],
                        "{what} beam {k}"
                    );
                    assert_eq!(
                        sequence.text, case.beams.text_stripped[row][k],
                        "{what} beam {k}"
                    );
                    let score = sequence.score.unwrap();
                    let expected = case.beams.sequences_scores[row][k];
                    assert!(
                        (score - expected).abs() < 1e-4,
                        "{what} beam {k}: {score} vs {expected}"
                    );
                }
            }
        }
    }
}

/// `--ask` and `--prompt` reach the same answers through the library's
/// batch entry points: the question through the chat template, a raw
/// prompt as it is.
#[test]
fn ask_and_raw_prompt_give_the_recorded_answer() {
    let reference = reference("llava-tiny.json");
    let case = &reference.cases[0];
    assert_eq!(case.messages.len(), 1);
    let Content::Text { text: question } = &message(&case.messages[0]).content[1] else {
        panic!("case a asks a question after the image");
    };
    let model = common::load("llava-tiny");
    let images: Vec<_> = case.images.iter().map(|n| common::image(n)).collect();
    let answers = model
        .answer_with_streams(&images, std::slice::from_ref(question), &[0], &greedy(12))
        .unwrap();
    assert_eq!(answers[0][0].answers[0].text, case.greedy.text_stripped[0]);
    let request = CaptionRequest {
        prompt: Some(case.prompt.clone()),
        generation: greedy(12),
    };
    let captions = model.caption(&images, &request).unwrap();
    assert_eq!(captions[0][0].text, case.greedy.text_stripped[0]);

    let no_image = CaptionRequest {
        prompt: Some("USER: hello ASSISTANT:".into()),
        generation: greedy(12),
    };
    let err = model.caption(&images, &no_image).unwrap_err().to_string();
    assert!(err.contains("<image>"), "{err}");
}

/// A conversation: the first question's answer is case a's; the second,
/// asked with it in the history, is case c's, whose prompt carries case a's
/// answer. The second turn reads only what its prompt adds: the cache kept
/// from the first holds the image and the first question.
#[test]
fn a_conversation_keeps_its_cache_and_gives_the_recorded_answers() {
    let reference = reference("llava-tiny.json");
    let first = &reference.cases[0];
    let second = reference
        .cases
        .iter()
        .find(|c| c.name.starts_with("c_"))
        .unwrap();
    let text_of = |m: &serde_json::Value| -> String {
        match message(m).content.last().unwrap() {
            Content::Text { text } => text.clone(),
            Content::Image => unreachable!(),
        }
    };
    let model = common::load("llava-tiny");
    let image = common::image(&first.images[0]);
    let mut conversation = model.conversation(&image).unwrap();
    let q1 = text_of(&first.messages[0]);
    let reply = conversation.ask(&q1, 0, &greedy(12)).unwrap();
    assert_eq!(reply.answers[0].text, first.greedy.text_stripped[0]);
    let after_first = conversation.cached_positions();
    assert_eq!(after_first, first.input_ids[0].len());

    // Case c's history is case a's exchange; its last message the new question.
    let q2 = text_of(second.messages.last().unwrap());
    let turns = [Turn {
        question: q1.clone(),
        answer: text_of(&second.messages[1]),
    }];
    let rendered = model
        .prompter()
        .unwrap()
        .render(&llava_messages(&turns, &q2))
        .unwrap();
    assert_eq!(rendered, second.prompt);
    let reply = conversation.ask(&q2, 0, &greedy(12)).unwrap();
    assert_eq!(reply.answers[0].text, second.greedy.text_stripped[0]);
    assert_eq!(conversation.cached_positions(), second.input_ids[0].len());
    assert_eq!(conversation.turns().len(), 2);
}

/// bf16: transformers' own bf16 logits differ from its f32 by up to
/// `max_abs_diff_to_f32` (0.24 on logits of 35); ours must be as close to
/// its bf16 as that, and give the same greedy answer.
#[test]
fn bf16_follows_transformers_bf16() {
    let reference = reference("llava-tiny.json");
    let case = reference
        .cases
        .iter()
        .find(|c| c.name == reference.bf16.case)
        .unwrap();
    let model = common::load_as("llava-tiny", Some(DType::BF16));
    let prompter = model.prompter().unwrap();
    let features = features(&model, case);
    let ids = &case.input_ids[0];
    let lm = &prompter.model.language_model;
    let start = prompter.image_start(ids).unwrap();
    let mut decoder = LlavaDecoder::new(lm, lm.new_cache(), features.clone(), start, 0);
    let logits = decoder
        .step(&Tensor::new(vec![ids.clone()], &Device::Cpu).unwrap())
        .unwrap();
    let expected = Tensor::new(reference.bf16.first_logits.clone(), &Device::Cpu).unwrap();
    let diff = max_abs_diff(&logits, &expected);
    assert!(
        diff <= reference.bf16.max_abs_diff_to_f32,
        "bf16 logits off by {diff}"
    );
    let answers = prompter
        .generate(&features, ids, &[0], &greedy(12))
        .unwrap();
    assert_eq!(
        answers[0][0].ids[ids.len()..],
        reference.bf16.greedy_new_ids[0]
    );
}
