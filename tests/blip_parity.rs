//! Parity with transformers on the tiny random BLIP fixtures.
//!
//! tools/make_fixtures.py built the models with transformers 5.23 (save_pretrained)
//! and recorded, per image and prompt: the processor's pixel_values, the vision
//! encoder's image_embeds, the logits of the first generated token, and the
//! greedy ids and text. The models load here through `hub::fetch` on a folder,
//! the path `caption --model DIR` takes.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use caption::generate::GenerationConfig;
use caption::resolve::hub::{self, ModelSource};
use caption::{CaptionRequest, Captioner, RuntimeOptions};
use common::max_abs_diff;
use common::{image, load};
use serde::Deserialize;

type Reference = common::Reference<Case>;

#[derive(Debug, Deserialize)]
struct Case {
    key: String,
    image: String,
    prompt: Option<String>,
    ids: Vec<u32>,
    text: String,
    legacy_text: String,
    min_margin: f64,
}

fn reference() -> (Reference, HashMap<String, Tensor>) {
    let json = common::reference_json("blip-tiny.json");
    let tensors = common::reference_tensors("blip-tiny.safetensors");
    (serde_json::from_str(&json).unwrap(), tensors)
}

fn request(case: &Case) -> CaptionRequest {
    CaptionRequest {
        prompt: case.prompt.clone(),
        generation: GenerationConfig::default(),
    }
}

#[test]
fn recorded_decisions_are_clear_of_float_noise() {
    let (reference, _) = reference();
    // The fixture script only accepts seeds whose every greedy step has a
    // top-1/top-2 logit margin of at least 0.01, ~100x the logit error measured
    // below; if the fixtures are regenerated with less, these tests prove less.
    assert!(
        reference.min_margin >= 0.01,
        "min margin {}",
        reference.min_margin
    );
    assert!(reference.cases.iter().all(|c| c.min_margin >= 0.01));
}

/// The arithmetic itself: run in float64 on both sides, transformers' pixel_values
/// in, image_embeds and first-step logits must agree to float64 rounding.
#[test]
fn float64_image_embeds_and_first_logits_match_transformers_exactly() {
    let (reference, tensors) = reference();
    let files = hub::fetch(&ModelSource::Folder(
        common::fixtures().join("models/blip-tiny"),
    ))
    .unwrap();
    let runtime = RuntimeOptions {
        device: common::device(),
        dtype: Some(DType::F64),
        quantization: None,
        pack_cache: None,
        ..RuntimeOptions::default()
    };
    let captioner = Captioner::load(&files, &runtime).unwrap();
    for case in &reference.cases {
        let pixel_values = tensors[&format!("{}.pixel_values", case.key)]
            .unsqueeze(0)
            .unwrap();
        let embeds = captioner.image_embeds(&pixel_values).unwrap();
        let expected = tensors[&format!("{}.image_embeds_f64", case.key)]
            .unsqueeze(0)
            .unwrap();
        let diff = max_abs_diff(&embeds, &expected);
        assert!(
            diff < 1e-9,
            "{} {:?}: f64 image_embeds differ by {diff}",
            case.image,
            case.prompt
        );

        let logits = captioner
            .first_step_logits(&expected, case.prompt.as_deref())
            .unwrap();
        let expected = tensors[&format!("{}.first_logits_f64", case.key)]
            .unsqueeze(0)
            .unwrap();
        let diff = max_abs_diff(&logits.to_dtype(DType::F64).unwrap(), &expected);
        assert!(
            diff < 1e-9,
            "{} {:?}: f64 logits differ by {diff}",
            case.image,
            case.prompt
        );
    }
}

/// The default f32 path: our rounding error must be no worse than torch's own.
/// Both are measured against the float64 values, so the bound is the torch f32
/// error of each case (up to ~1e-2 on these deliberately ill-conditioned random
/// models, ~1e-5 on most), doubled, plus a floor of 1e-5 relative.
#[test]
fn float32_image_embeds_and_first_logits_are_as_accurate_as_transformers() {
    let (reference, tensors) = reference();
    let captioner = load("blip-tiny");
    let f64_of = |key: &str| {
        tensors[key]
            .to_dtype(DType::F32)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    };
    for case in &reference.cases {
        let pixel_values = tensors[&format!("{}.pixel_values", case.key)]
            .unsqueeze(0)
            .unwrap();
        let exact_embeds = f64_of(&format!("{}.image_embeds_f64", case.key));
        let torch_embeds = tensors[&format!("{}.image_embeds", case.key)]
            .unsqueeze(0)
            .unwrap();
        let ours = captioner.image_embeds(&pixel_values).unwrap();
        let bound = 2.0 * max_abs_diff(&torch_embeds, &exact_embeds) + 1e-5;
        let diff = max_abs_diff(&ours, &exact_embeds);
        assert!(
            diff <= bound,
            "{} {:?}: f32 image_embeds off by {diff} (bound {bound})",
            case.image,
            case.prompt
        );

        let exact_logits = f64_of(&format!("{}.first_logits_f64", case.key));
        let torch_logits = tensors[&format!("{}.first_logits", case.key)]
            .unsqueeze(0)
            .unwrap();
        let ours = captioner
            .first_step_logits(&torch_embeds, case.prompt.as_deref())
            .unwrap();
        let scale: f32 = exact_logits
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let scale = scale as f64;
        let bound = 2.0 * max_abs_diff(&torch_logits, &exact_logits) + 1e-5 * scale;
        let diff = max_abs_diff(&ours, &exact_logits);
        assert!(
            diff <= bound,
            "{} {:?}: f32 logits off by {diff} (bound {bound})",
            case.image,
            case.prompt
        );
    }
}

/// Generation from transformers' own image_embeds: every case, ids and text.
#[test]
fn greedy_decoding_matches_transformers_from_the_same_image_embeds() {
    let (reference, tensors) = reference();
    let captioner = load("blip-tiny");
    for case in &reference.cases {
        let embeds = tensors[&format!("{}.image_embeds", case.key)]
            .unsqueeze(0)
            .unwrap();
        let captions = captioner
            .caption_embeds(&embeds, &[0], &request(case))
            .unwrap();
        assert_eq!(
            captions[0][0].ids, case.ids,
            "{} {:?}",
            case.image, case.prompt
        );
        assert_eq!(
            captions[0][0].text, case.text,
            "{} {:?}",
            case.image, case.prompt
        );
    }
}

/// The whole pipeline from the image file: decode, preprocess, encode, decode
/// text, for every image, JPEGs included: they decode to Pillow's pixels
/// exactly (libjpeg-turbo's own decoder), which matters because these random
/// tiny models are far more sensitive to a level's difference than a trained one.
#[test]
fn greedy_captions_from_image_files_match_transformers_ids_and_text() {
    let (reference, _) = reference();
    let captioner = load("blip-tiny");
    assert!(reference.cases.iter().any(|c| c.image.ends_with(".jpg")));
    for case in &reference.cases {
        let captions = captioner
            .caption(&[image(&case.image)], &request(case))
            .unwrap();
        assert_eq!(
            captions[0][0].ids, case.ids,
            "{} {:?}",
            case.image, case.prompt
        );
        assert_eq!(
            captions[0][0].text, case.text,
            "{} {:?}",
            case.image, case.prompt
        );
    }
}

#[test]
fn pixel_values_match_the_transformers_processor() {
    let (reference, tensors) = reference();
    let captioner = load("blip-tiny");
    for case in reference.cases.iter().filter(|c| c.prompt.is_none()) {
        let ours = captioner.pixel_values(&[image(&case.image)]).unwrap();
        let expected = tensors[&format!("{}.pixel_values", case.key)]
            .unsqueeze(0)
            .unwrap();
        // Lossless sources and JPEGs alike (we decode JPEG with libjpeg-turbo,
        // as Pillow does): the same pixels, resized and normalised bit for bit.
        let diff = max_abs_diff(&ours, &expected);
        assert_eq!(diff, 0.0, "{}", case.image);
    }
}

/// Batching must not change anything: rows never interact.
#[test]
fn a_batch_gives_the_same_captions_as_one_image_at_a_time() {
    let (reference, _) = reference();
    let captioner = load("blip-tiny");
    for prompt in [None, Some("a picture of".to_string())] {
        let cases: Vec<&Case> = reference
            .cases
            .iter()
            .filter(|c| c.prompt == prompt)
            .collect();
        let images: Vec<_> = cases.iter().map(|c| image(&c.image)).collect();
        let batch = captioner.caption(&images, &request(cases[0])).unwrap();
        for (caption, case) in batch.iter().zip(&cases) {
            assert_eq!(
                caption[0].ids, case.ids,
                "{} {:?} in a batch",
                case.image, case.prompt
            );
        }
    }
}

/// The same weights as sharded safetensors and as an old pytorch_model.bin (with
/// the tied LM head stored, the scalar `size` preprocessor form, and
/// transformers' decode clean-up switched on).
#[test]
fn sharded_and_pytorch_bin_checkpoints_give_the_same_captions() {
    let (reference, _) = reference();
    let sharded = load("blip-tiny-sharded");
    let legacy = load("blip-tiny-bin");
    for case in &reference.cases {
        let image = image(&case.image);
        let a = sharded
            .caption(std::slice::from_ref(&image), &request(case))
            .unwrap();
        assert_eq!(a[0][0].ids, case.ids);
        assert_eq!(a[0][0].text, case.text);
        let b = legacy.caption(&[image], &request(case)).unwrap();
        assert_eq!(b[0][0].ids, case.ids);
        assert_eq!(b[0][0].text, case.legacy_text);
    }
}

#[test]
fn max_tokens_bounds_the_new_tokens() {
    let (reference, _) = reference();
    let captioner = load("blip-tiny");
    let case = reference
        .cases
        .iter()
        .find(|c| c.prompt.is_some() && c.ids.len() > 8)
        .unwrap();
    let request = CaptionRequest {
        prompt: case.prompt.clone(),
        generation: GenerationConfig {
            max_new_tokens: Some(3),
            ..GenerationConfig::default()
        },
    };
    let captions = captioner.caption(&[image(&case.image)], &request).unwrap();
    let prompt_len = captioner.prompt_ids(case.prompt.as_deref()).unwrap().len();
    assert_eq!(captions[0][0].ids.len(), prompt_len + 3);
    // Greedy decoding is a prefix of the longer run.
    assert_eq!(captions[0][0].ids[..], case.ids[..prompt_len + 3]);
}
