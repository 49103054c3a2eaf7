//! The built-in demo models (models/, trained by tools/make_demo_models.py on
//! a synthetic world of coloured shapes) against transformers on images the
//! training never saw (tests/fixtures/demo/eval/ and examples/): identical
//! captions and answers, greedy and 3 beams, and so the same exact-match rate
//! and VQA accuracy, printed. Through the binary, `--model demo` runs the
//! models built into it.

mod common;

use std::path::{Path, PathBuf};

use caption::generate::GenerationConfig;
use caption::image::LoadOptions;
use caption::resolve::hub::{self, ModelSource};
use caption::{CaptionRequest, Captioner, RuntimeOptions};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Reference {
    metrics: Metrics,
    images: Vec<ImageCase>,
}

#[derive(Debug, Deserialize)]
struct Metrics {
    eval: SetMetrics,
}

#[derive(Debug, Deserialize)]
struct SetMetrics {
    images: usize,
    questions: usize,
    demo_caption_exact_greedy: f64,
    demo_blip2_caption_exact_greedy: f64,
    demo_vqa_accuracy_greedy: f64,
    demo_blip2_vqa_accuracy_greedy: f64,
}

#[derive(Debug, Deserialize)]
struct ImageCase {
    set: String,
    image: String,
    caption: String,
    questions: Vec<Question>,
    outputs: Outputs,
}

#[derive(Debug, Deserialize)]
struct Question {
    question: String,
    answer: String,
}

#[derive(Debug, Deserialize)]
struct Outputs {
    demo: Decoded,
    #[serde(rename = "demo-vqa")]
    demo_vqa: Vec<Answered>,
    #[serde(rename = "demo-blip2")]
    demo_blip2: Blip2Outputs,
}

#[derive(Debug, Deserialize)]
struct Decoded {
    greedy: Output,
    beams3: Output,
}

#[derive(Debug, Deserialize)]
struct Answered {
    question: String,
    greedy: Output,
    beams3: Output,
}

#[derive(Debug, Deserialize)]
struct Blip2Outputs {
    caption: Decoded,
    questions: Vec<Answered>,
}

/// One decoded sequence: BLIP records all ids, BLIP-2 the new ones.
#[derive(Debug, Deserialize)]
struct Output {
    text: String,
    #[serde(default)]
    ids: Option<Vec<u32>>,
    #[serde(default)]
    new_ids: Option<Vec<u32>>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> Reference {
    serde_json::from_str(&common::reference_json("demo.json")).unwrap()
}

/// A demo model from its folder in the repository, as `--model models/NAME` loads it.
fn load(name: &str) -> Captioner {
    let files = hub::fetch(&ModelSource::Folder(root().join("models").join(name))).unwrap();
    let runtime = RuntimeOptions {
        device: common::device(),
        ..RuntimeOptions::default()
    };
    Captioner::load(&files, &runtime).unwrap()
}

fn image(path: &str) -> image::RgbImage {
    let options = LoadOptions {
        exif_rotate: false,
        ..LoadOptions::default()
    };
    caption::image::load_rgb8(&root().join(path), &options).unwrap()
}

/// Every image in one batch: greedy and 3-beam captions per image.
fn captions(model: &Captioner, images: &[image::RgbImage]) -> [Vec<caption::Caption>; 2] {
    [GenerationConfig::default(), common::beams3()].map(|generation| {
        let request = CaptionRequest {
            prompt: None,
            generation,
        };
        model
            .caption(images, &request)
            .unwrap()
            .into_iter()
            .map(|mut per_image| per_image.remove(0))
            .collect()
    })
}

/// Each image's own questions (they differ per image), greedy and 3 beams.
fn answers(
    model: &Captioner,
    case: &ImageCase,
    pixels: &image::RgbImage,
) -> [Vec<caption::Caption>; 2] {
    let questions: Vec<String> = case.questions.iter().map(|q| q.question.clone()).collect();
    [GenerationConfig::default(), common::beams3()].map(|generation| {
        model
            .answer_with_streams(std::slice::from_ref(pixels), &questions, &[0], &generation)
            .unwrap()
            .remove(0)
            .into_iter()
            .map(|mut answer| answer.answers.remove(0))
            .collect()
    })
}

fn check(what: &str, ours: &caption::Caption, expected: &Output, prompt_ids: &[u32]) {
    assert_eq!(ours.text, expected.text, "{what}");
    match (&expected.ids, &expected.new_ids) {
        (Some(ids), _) => assert_eq!(&ours.ids, ids, "{what}"),
        (None, Some(new_ids)) => assert_eq!(&ours.ids[prompt_ids.len()..], new_ids, "{what}"),
        (None, None) => panic!("{what}: no ids recorded"),
    }
}

/// Identical outputs for all three models on every recorded image, and so
/// the same scores against the ground truth; the scores are printed.
#[test]
fn demo_models_match_transformers_and_score_the_same() {
    let reference = reference();
    let pixels: Vec<_> = reference.images.iter().map(|c| image(&c.image)).collect();
    let demo = load("demo");
    let vqa = load("demo-vqa");
    let blip2 = load("demo-blip2");
    let blip2_caption_prompt = blip2.prompt_ids(None).unwrap();

    let [demo_greedy, demo_beams] = captions(&demo, &pixels);
    let [blip2_greedy, blip2_beams] = captions(&blip2, &pixels);
    let mut caption_hits = [0usize; 2];
    let mut answer_hits = [0usize; 2];
    let (mut eval_images, mut eval_questions) = (0, 0);
    for (i, case) in reference.images.iter().enumerate() {
        let what = |model: &str, mode: &str| format!("{model} {mode} {}", case.image);
        let outputs = &case.outputs;
        check(
            &what("demo", "greedy"),
            &demo_greedy[i],
            &outputs.demo.greedy,
            &[],
        );
        check(
            &what("demo", "beams3"),
            &demo_beams[i],
            &outputs.demo.beams3,
            &[],
        );
        let expected = &outputs.demo_blip2.caption;
        check(
            &what("demo-blip2", "greedy"),
            &blip2_greedy[i],
            &expected.greedy,
            &blip2_caption_prompt,
        );
        check(
            &what("demo-blip2", "beams3"),
            &blip2_beams[i],
            &expected.beams3,
            &blip2_caption_prompt,
        );

        let [vqa_greedy, vqa_beams] = answers(&vqa, case, &pixels[i]);
        let [b2_greedy, b2_beams] = answers(&blip2, case, &pixels[i]);
        for (j, question) in case.questions.iter().enumerate() {
            let q = &question.question;
            let recorded = &outputs.demo_vqa[j];
            assert_eq!(&recorded.question, q);
            check(
                &what("demo-vqa greedy", q),
                &vqa_greedy[j],
                &recorded.greedy,
                &[],
            );
            check(
                &what("demo-vqa beams3", q),
                &vqa_beams[j],
                &recorded.beams3,
                &[],
            );
            let recorded = &outputs.demo_blip2.questions[j];
            let prompt = blip2
                .prompt_ids(Some(&format!("Question: {q} Answer:")))
                .unwrap();
            check(
                &what("demo-blip2 greedy", q),
                &b2_greedy[j],
                &recorded.greedy,
                &prompt,
            );
            check(
                &what("demo-blip2 beams3", q),
                &b2_beams[j],
                &recorded.beams3,
                &prompt,
            );
        }

        if case.set == "eval" {
            eval_images += 1;
            caption_hits[0] += usize::from(demo_greedy[i].text == case.caption);
            caption_hits[1] += usize::from(blip2_greedy[i].text == case.caption);
            for (j, question) in case.questions.iter().enumerate() {
                eval_questions += 1;
                answer_hits[0] += usize::from(vqa_greedy[j].text == question.answer);
                answer_hits[1] += usize::from(b2_greedy[j].text == question.answer);
            }
        }
    }

    let metrics = &reference.metrics.eval;
    assert_eq!(
        (eval_images, eval_questions),
        (metrics.images, metrics.questions)
    );
    let rate = |hits: usize, n: usize| hits as f64 / n as f64;
    let ours = [
        (
            "demo caption exact match",
            rate(caption_hits[0], eval_images),
            metrics.demo_caption_exact_greedy,
        ),
        (
            "demo-blip2 caption exact match",
            rate(caption_hits[1], eval_images),
            metrics.demo_blip2_caption_exact_greedy,
        ),
        (
            "demo-vqa accuracy",
            rate(answer_hits[0], eval_questions),
            metrics.demo_vqa_accuracy_greedy,
        ),
        (
            "demo-blip2 VQA accuracy",
            rate(answer_hits[1], eval_questions),
            metrics.demo_blip2_vqa_accuracy_greedy,
        ),
    ];
    for (name, got, transformers) in ours {
        eprintln!(
            "{name} on {eval_images} fresh images: ours {got:.4}, transformers {transformers:.4}"
        );
        // transformers' figure is rounded to 4 places in the JSON.
        assert!(
            (got - transformers).abs() < 5e-5,
            "{name}: {got} vs {transformers}"
        );
    }
}

/// `--model demo` needs no download and no checkout: the binary writes its
/// built-in copy to the cache once, and prints what transformers printed.
#[test]
fn the_built_in_demo_captions_the_examples_offline() {
    let reference = reference();
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        common::caption_command(home.path())
            // The default, as a user runs it: with the weight cache.
            .env_remove("CAPTION_NO_WEIGHT_CACHE")
            .env("HF_HUB_OFFLINE", "1")
            .current_dir(root())
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["-m", "demo", "examples/"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut expected = String::new();
    let mut examples: Vec<&ImageCase> = reference
        .images
        .iter()
        .filter(|c| c.set == "examples")
        .collect();
    examples.sort_by(|a, b| a.image.cmp(&b.image));
    for case in &examples {
        expected += &format!("{}\t{}\n", case.image, case.outputs.demo.greedy.text);
    }
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
    let extracted: Vec<_> = std::fs::read_dir(home.path().join(".cache/caption/bundled"))
        .unwrap()
        .collect();
    assert_eq!(extracted.len(), 1);

    let case = examples[0];
    let question = &case.questions[0].question;
    for (model, recorded) in [
        ("demo-vqa", &case.outputs.demo_vqa[0].greedy),
        ("demo-blip2", &case.outputs.demo_blip2.questions[0].greedy),
    ] {
        let out = run(&["-m", model, "--ask", question, &case.image]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("{}\n", recorded.text)
        );
    }
    assert!(Path::new(&root().join(&case.image)).is_file());
}
