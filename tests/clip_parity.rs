//! CLIP against transformers: the tiny random models of
//! tools/make_clip_fixtures.py (`clip-tiny`: openai's legacy
//! `eos_token_id: 2`, pooled at the largest id, quick_gelu, a 5x5 patch grid
//! and 12- and 11-wide heads; `clip-tiny-eos`: pooled at the first
//! `<|endoftext|>`, gelu, a 4x4 grid, a pickle checkpoint and openai's legacy
//! integer sizes in preprocessor_config.json), loaded as `--model DIR`
//! loads them. Pixels, token ids, label order and search rankings must be
//! identical; embeddings and scores agree within tolerances justified below.

mod common;

use std::collections::HashMap;

use candle_core::Tensor;
use caption::captioner::embed::l2_normalised;
use caption::resolve::hub::{self, ModelSource};
use caption::{Embedder, RuntimeOptions};
use serde::Deserialize;

const MODELS: [&str; 2] = ["clip-tiny", "clip-tiny-eos"];

/// The embeddings are sums over a few hundred products of f32 values of
/// order 1 (the fixtures raise the init to spread the outputs): torch and
/// our kernels add them in different orders, which moves the last bits. A
/// relative error of 1e-5 of the largest value is ~100 ulps of headroom; a
/// wrong weight, mask or pooling position is off by order 1.
const EMBED_RTOL: f64 = 1e-5;
/// Softmax probabilities and cosines are in [-1, 1]: absolute 1e-5, far
/// below the smallest gap between neighbours in any recorded ranking
/// (`min_gaps`, at least 1e-3), so a tolerance this size can never
/// excuse a different order.
const SCORE_ATOL: f64 = 1e-5;

#[derive(Debug, Deserialize)]
struct Reference {
    images: Vec<String>,
    texts: Vec<TextCase>,
    logit_scale: f64,
    zero_shot: Vec<ZeroShot>,
    search: Vec<Search>,
    min_gaps: MinGaps,
}

#[derive(Debug, Deserialize)]
struct TextCase {
    text: String,
    input_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct ZeroShot {
    labels: Vec<String>,
    hypothesis_template: String,
    results: Vec<ZeroShotResult>,
}

#[derive(Debug, Deserialize)]
struct ZeroShotResult {
    image: String,
    scores: Vec<Scored>,
    pipeline_pixels_equal_processor: bool,
}

#[derive(Debug, Deserialize)]
struct Scored {
    label: String,
    score: f64,
}

#[derive(Debug, Deserialize)]
struct Search {
    query: Option<String>,
    like: Option<String>,
    ranking: Vec<Hit>,
}

#[derive(Debug, Deserialize)]
struct Hit {
    path: String,
    score: f64,
}

#[derive(Debug, Deserialize)]
struct MinGaps {
    zero_shot: f64,
    search: f64,
}

struct Fixture {
    embedder: Embedder,
    reference: Reference,
    tensors: HashMap<String, Tensor>,
}

fn fixture(name: &str) -> Fixture {
    let folder = common::fixtures().join("models").join(name);
    let files = hub::fetch(&ModelSource::Folder(folder)).unwrap();
    let runtime = RuntimeOptions {
        device: common::device(),
        ..RuntimeOptions::default()
    };
    let reference: Reference =
        serde_json::from_str(&common::reference_json(&format!("{name}.json"))).unwrap();
    // The gaps the tolerance must stay below.
    assert!(reference.min_gaps.zero_shot > 20.0 * SCORE_ATOL);
    assert!(reference.min_gaps.search > 20.0 * SCORE_ATOL);
    Fixture {
        embedder: Embedder::load(&files, &runtime).unwrap(),
        reference,
        tensors: common::reference_tensors(&format!("{name}.safetensors")),
    }
}

fn relative_error(ours: &Tensor, theirs: &Tensor) -> f64 {
    let ours = ours.to_device(&candle_core::Device::Cpu).unwrap();
    common::max_abs_diff(&ours, theirs) / common::max_abs(theirs)
}

fn row(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn pixel_values_are_transformers_own() {
    for name in MODELS {
        let f = fixture(name);
        for image in &f.reference.images {
            let ours = f.embedder.pixel_values(&[common::image(image)]).unwrap();
            let theirs = &f.tensors[&format!("pixel_values.{image}")];
            assert_eq!(ours.dims(), theirs.dims(), "{name} {image}");
            // Bit for bit: the same resize, crop and float steps.
            assert_eq!(
                common::max_abs_diff(&ours.to_device(&candle_core::Device::Cpu).unwrap(), theirs),
                0.0,
                "{name} {image}"
            );
        }
    }
}

#[test]
fn image_embeddings_match() {
    for name in MODELS {
        let f = fixture(name);
        for image in &f.reference.images {
            let pixels = f.tensors[&format!("pixel_values.{image}")]
                .to_device(&common::device())
                .unwrap();
            let ours = f.embedder.image_features(&pixels).unwrap();
            let theirs = &f.tensors[&format!("image_embeds.{image}")];
            let err = relative_error(&ours, theirs);
            assert!(err < EMBED_RTOL, "{name} {image}: relative error {err:e}");
        }
    }
}

#[test]
fn text_ids_and_embeddings_match() {
    for name in MODELS {
        let f = fixture(name);
        for (i, case) in f.reference.texts.iter().enumerate() {
            let ids = f.embedder.text_ids(&case.text).unwrap();
            assert_eq!(ids, case.input_ids, "{name}: ids of {:?}", case.text);
            let ours = f
                .embedder
                .text_features(std::slice::from_ref(&case.text))
                .unwrap();
            let theirs = &f.tensors[&format!("text_embeds.{i}")];
            let err = relative_error(&ours, theirs);
            assert!(
                err < EMBED_RTOL,
                "{name} {:?}: relative error {err:e}",
                case.text
            );
        }
        // All of them at once: padded rows read as they do alone.
        let texts: Vec<String> = f.reference.texts.iter().map(|c| c.text.clone()).collect();
        let together = f.embedder.text_features(&texts).unwrap();
        for (i, text) in texts.iter().enumerate() {
            let theirs = &f.tensors[&format!("text_embeds.{i}")];
            let err = relative_error(&together.narrow(0, i, 1).unwrap(), theirs);
            assert!(err < EMBED_RTOL, "{name} batched {text:?}: {err:e}");
        }
        let scale = f64::from(f.embedder.logit_scale());
        assert!(
            (scale - f.reference.logit_scale).abs() < 1e-6 * scale,
            "{name}"
        );
    }
}

#[test]
fn zero_shot_labels_rank_and_score_as_the_pipeline() {
    for name in MODELS {
        let f = fixture(name);
        for case in &f.reference.zero_shot {
            let labels = f
                .embedder
                .label_set(&case.labels, &case.hypothesis_template)
                .unwrap();
            for result in &case.results {
                // The pipeline opens files with convert("RGB"), which drops an
                // alpha channel; the processor (and we) composite it over
                // white. Where they differ, the pipeline's own pixels go in,
                // so the model and scoring are still compared.
                let key = if result.pipeline_pixels_equal_processor {
                    format!("pixel_values.{}", result.image)
                } else {
                    format!("pipeline_pixel_values.{}", result.image)
                };
                let pixels = f.tensors[&key].to_device(&common::device()).unwrap();
                let embeds = l2_normalised(&f.embedder.image_features(&pixels).unwrap()).unwrap();
                let ours = &f.embedder.score_labels(&embeds, &labels).unwrap()[0];
                let order: Vec<&str> = ours.iter().map(|s| s.label.as_str()).collect();
                let expected: Vec<&str> = result.scores.iter().map(|s| s.label.as_str()).collect();
                assert_eq!(order, expected, "{name} {} {:?}", result.image, case.labels);
                for (o, t) in ours.iter().zip(&result.scores) {
                    let diff = (f64::from(o.score) - t.score).abs();
                    assert!(
                        diff < SCORE_ATOL,
                        "{name} {} {}: {diff:e}",
                        result.image,
                        t.label
                    );
                }
            }
        }
    }
}

#[test]
fn search_rankings_are_identical() {
    for name in MODELS {
        let f = fixture(name);
        let images: Vec<_> = f
            .reference
            .images
            .iter()
            .map(|n| common::image(n))
            .collect();
        let image_embeds = f.embedder.embed_images(&images).unwrap();
        for search in &f.reference.search {
            let query = match (&search.query, &search.like) {
                (Some(text), _) => f.embedder.embed_texts(std::slice::from_ref(text)).unwrap(),
                (None, Some(like)) => f.embedder.embed_images(&[common::image(like)]).unwrap(),
                (None, None) => panic!("a search without a query"),
            };
            let cosines = row(&image_embeds.matmul(&query.t().unwrap()).unwrap());
            let mut ranking: Vec<(f64, &str)> = cosines
                .into_iter()
                .zip(f.reference.images.iter().map(String::as_str))
                .collect();
            ranking.sort_by(|a, b| b.0.total_cmp(&a.0));
            let order: Vec<&str> = ranking.iter().map(|r| r.1).collect();
            let expected: Vec<&str> = search.ranking.iter().map(|h| h.path.as_str()).collect();
            assert_eq!(order, expected, "{name} {search:?}");
            for ((score, path), hit) in ranking.iter().zip(&search.ranking) {
                let diff = (score - hit.score).abs();
                assert!(diff < SCORE_ATOL, "{name} {path}: {diff:e}");
            }
        }
    }
}

/// bf16 weights and activations (`--dtype bf16`) keep 8 bits of mantissa:
/// each value is off by up to 0.4%, and a few layers of that leave an
/// embedding pointing within a few thousandths of a radian of the f32 one.
/// A cosine above 0.995 to transformers' f32 embedding holds for every
/// recorded image; a wrong layer in the bf16 path (a dtype mix-up, an
/// unconverted bias) falls far below it.
#[test]
fn bf16_embeddings_point_where_f32_ones_do() {
    for name in MODELS {
        let folder = common::fixtures().join("models").join(name);
        let files = hub::fetch(&ModelSource::Folder(folder)).unwrap();
        let runtime = RuntimeOptions {
            device: common::device(),
            dtype: Some(candle_core::DType::BF16),
            ..RuntimeOptions::default()
        };
        let embedder = Embedder::load(&files, &runtime).unwrap();
        let f = fixture(name);
        for image in &f.reference.images {
            let pixels = f.tensors[&format!("pixel_values.{image}")]
                .to_device(&common::device())
                .unwrap();
            let ours = row(&l2_normalised(&embedder.image_features(&pixels).unwrap()).unwrap());
            let theirs = row(&f.tensors[&format!("image_embeds.{image}")]);
            let norm = theirs.iter().map(|v| v * v).sum::<f64>().sqrt();
            let cosine: f64 = ours.iter().zip(&theirs).map(|(a, b)| a * b).sum::<f64>() / norm;
            assert!(cosine > 0.995, "{name} {image}: cosine {cosine}");
        }
    }
}
