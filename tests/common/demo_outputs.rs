//! The demo models' recorded outputs (`demo.json`: every greedy caption and
//! answer transformers gave in float32 on the 44 recorded images) and ours
//! under a given runtime, for the tests that compare precisions and kernels.

use std::path::PathBuf;

use caption::generate::GenerationConfig;
use caption::image::LoadOptions;
use caption::resolve::hub::{self, ModelSource};
use caption::{CaptionRequest, Captioner, RuntimeOptions};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub images: Vec<ImageCase>,
    pub low_margin_cases: Vec<LowMargin>,
}

/// A recorded output whose float32 top-1/top-2 logit gap is small.
#[derive(Debug, Deserialize)]
pub struct LowMargin {
    pub image: String,
    pub model: String,
    pub prompt: String,
    pub min_margin: f64,
}

#[derive(Debug, Deserialize)]
pub struct ImageCase {
    pub image: String,
    pub questions: Vec<Question>,
    pub outputs: Outputs,
}

#[derive(Debug, Deserialize)]
pub struct Question {
    pub question: String,
}

#[derive(Debug, Deserialize)]
pub struct Outputs {
    pub demo: Decoded,
    #[serde(rename = "demo-vqa")]
    pub demo_vqa: Vec<Decoded>,
    #[serde(rename = "demo-blip2")]
    pub demo_blip2: Blip2Outputs,
}

#[derive(Debug, Deserialize)]
pub struct Blip2Outputs {
    pub caption: Decoded,
    pub questions: Vec<Decoded>,
}

#[derive(Debug, Deserialize)]
pub struct Decoded {
    pub greedy: Output,
}

#[derive(Debug, Deserialize)]
pub struct Output {
    pub text: String,
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn load(name: &str, runtime: &RuntimeOptions) -> Captioner {
    let files = hub::fetch(&ModelSource::Folder(root().join("models").join(name))).unwrap();
    Captioner::load(&files, runtime).unwrap()
}

/// One greedy output, ours and transformers' float32.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub model: &'static str,
    pub image: String,
    /// `None` for a caption.
    pub question: Option<String>,
    pub ours: String,
    pub float32: String,
}

pub type Outcomes = Vec<Outcome>;

pub fn reference() -> Reference {
    serde_json::from_str(&super::reference_json("demo.json")).unwrap()
}

/// Every greedy caption and answer of the three demo models under `runtime`.
pub fn outcomes(runtime: &RuntimeOptions) -> Outcomes {
    let reference = reference();
    let options = LoadOptions {
        exif_rotate: false,
        ..LoadOptions::default()
    };
    let pixels: Vec<_> = reference
        .images
        .iter()
        .map(|c| caption::image::load_rgb8(&root().join(&c.image), &options).unwrap())
        .collect();
    let greedy = GenerationConfig::default();
    let request = CaptionRequest {
        prompt: None,
        generation: greedy.clone(),
    };
    let mut out = Vec::new();
    for name in ["demo", "demo-blip2"] {
        let model = load(name, runtime);
        let captions = model.caption(&pixels, &request).unwrap();
        for (case, mut ours) in reference.images.iter().zip(captions) {
            out.push(Outcome {
                model: name,
                image: case.image.clone(),
                question: None,
                ours: ours.remove(0).text,
                float32: match name {
                    "demo" => &case.outputs.demo.greedy.text,
                    _ => &case.outputs.demo_blip2.caption.greedy.text,
                }
                .clone(),
            });
        }
    }
    for name in ["demo-vqa", "demo-blip2"] {
        let model = load(name, runtime);
        for (case, pixels) in reference.images.iter().zip(&pixels) {
            let questions: Vec<String> =
                case.questions.iter().map(|q| q.question.clone()).collect();
            let answers = model
                .answer_with_streams(std::slice::from_ref(pixels), &questions, &[0], &greedy)
                .unwrap()
                .remove(0);
            for (j, mut answer) in answers.into_iter().enumerate() {
                let recorded = match name {
                    "demo-vqa" => &case.outputs.demo_vqa[j],
                    _ => &case.outputs.demo_blip2.questions[j],
                };
                out.push(Outcome {
                    model: name,
                    image: case.image.clone(),
                    question: Some(answer.question.clone()),
                    ours: answer.answers.remove(0).text,
                    float32: recorded.greedy.text.clone(),
                });
            }
        }
    }
    out
}

pub fn disagreements(outcomes: &Outcomes) -> Vec<&Outcome> {
    outcomes.iter().filter(|o| o.ours != o.float32).collect()
}

/// Whether the fixture lists this output as decided by a small margin.
pub fn is_low_margin(outcome: &Outcome, reference: &Reference) -> bool {
    reference.low_margin_cases.iter().any(|case| {
        case.model == outcome.model
            && case.image == outcome.image
            && case.min_margin < 0.05
            && outcome
                .question
                .as_ref()
                .is_some_and(|q| case.prompt.contains(q.as_str()))
    })
}
