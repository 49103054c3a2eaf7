//! A loaded CLIP model: images and texts into one embedding space, for
//! zero-shot labels, search and reranking captions.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use super::{check_image_size, on_pool, open_pack_cache, read};
use crate::image::PreprocessConfig;
use crate::load::tokenizer::TextCodec;
use crate::load::weight_cache;
use crate::load::weights;
use crate::models::clip::{ClipConfig, ClipModel};
use crate::nn::LinearOptions;
use crate::resolve::hub::{self, ModelFiles, ModelSource};
use crate::resolve::registry::{Family, Registry};

use super::RuntimeOptions;

/// transformers' zero-shot-image-classification pipeline's
/// `hypothesis_template` default: what each label is put into.
pub const DEFAULT_LABEL_TEMPLATE: &str = "This is a photo of {}.";

/// A CLIP model ready to embed images and texts.
pub struct Embedder {
    model: ClipModel,
    codec: TextCodec,
    preprocess: PreprocessConfig,
    device: Device,
    dtype: DType,
    notes: Vec<String>,
    weight_cache: Option<weight_cache::Outcome>,
    identity: String,
    projection_dim: usize,
}

/// Texts encoded once for a whole run: the labels of `--labels`, say.
#[derive(Debug, Clone)]
pub struct TextSet {
    pub texts: Vec<String>,
    /// `[texts, projection_dim]`, L2-normalised, f32.
    embeds: Tensor,
}

impl TextSet {
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}

/// One label's score for one image.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LabelScore {
    pub label: String,
    /// The label's share of the softmax over all the labels.
    pub score: f32,
}

impl Embedder {
    /// Opens `model` as [`super::Captioner::open`] does: a folder, an alias
    /// or a Hub repository id.
    pub fn open(model: &str, runtime: &RuntimeOptions) -> Result<Self> {
        let registry = Registry::builtin();
        let (source, _) = crate::resolve::resolve_model(model, &registry)?;
        Self::open_source(&source, runtime)
    }

    /// [`Self::open`] for a model already resolved.
    pub fn open_source(source: &ModelSource, runtime: &RuntimeOptions) -> Result<Self> {
        Self::load(&hub::fetch(source)?, runtime)
    }

    /// Loads the CLIP model in `files`.
    pub fn load(files: &ModelFiles, runtime: &RuntimeOptions) -> Result<Self> {
        let config_text = read(&files.config)?;
        let config_json: serde_json::Value = serde_json::from_str(&config_text)
            .with_context(|| format!("parsing {}", files.config.display()))?;
        let family = super::family_of(&config_json);
        anyhow::ensure!(
            family == Some(Family::Clip),
            "{} is not a CLIP model ({}); labels, embeddings and search need one, \
             e.g. --model clip-vit-base-patch32",
            files.source,
            super::architectures_of(&config_json)
        );
        let mut config = ClipConfig::from_json(&config_text)
            .with_context(|| format!("reading {}", files.config.display()))?;
        anyhow::ensure!(
            runtime.quantization.is_none(),
            "--quantize is for the captioning models; a CLIP model runs in f32 or bf16 (--dtype)"
        );
        let dtype = super::model_dtype(runtime, &config_json);
        let pack_cache = open_pack_cache(files, runtime, dtype, &config_text)?;
        let linear = LinearOptions {
            quantization: None,
            weight_cache: pack_cache.clone(),
        };
        config.vision_config.linear = linear.clone();
        config.text_config.linear = linear;
        let preprocess = load_clip_preprocess_config(&files.image_processor)?;
        check_image_size(
            &preprocess,
            config.vision_config.image_size,
            &files.image_processor,
        )?;
        let codec = TextCodec::load(&files.tokenizer, files.tokenizer_config.as_deref())?
            .truncating_at(config.text_config.max_position_embeddings)?;
        let model = {
            let vb = weights::var_builder(&files.weights, dtype, &runtime.device)?;
            ClipModel::new(&config, vb)
                .with_context(|| format!("loading the weights of {}", files.source))?
        };
        let mut notes = vec![];
        let weight_cache = super::finish_pack_cache(pack_cache.as_deref(), &mut notes);
        Ok(Self {
            model,
            codec,
            preprocess,
            device: runtime.device.clone(),
            dtype,
            notes,
            weight_cache,
            identity: identity(files, dtype, &runtime.device),
            projection_dim: config.projection_dim,
        })
    }

    /// Names these exact weights run this way: the source, each weight
    /// file's path, size and modification time, the dtype and the device.
    /// Embeddings made under one identity are reused only under it.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The length of every embedding.
    pub fn projection_dim(&self) -> usize {
        self.projection_dim
    }

    /// See [`super::Captioner::check_weights`].
    pub fn check_weights(&self) -> Result<()> {
        crate::load::watched_map::check()
    }

    /// Things the user should know about how the model was loaded.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// What the weight cache did at load, when there was one.
    pub fn weight_cache(&self) -> Option<&weight_cache::Outcome> {
        self.weight_cache.as_ref()
    }

    pub fn preprocess_config(&self) -> &PreprocessConfig {
        &self.preprocess
    }

    /// `exp(logit_scale)`, what transformers multiplies cosines by.
    pub fn logit_scale(&self) -> f32 {
        self.model.logit_scale()
    }

    /// `[batch, 3, H, W]` pixel values of decoded RGB images.
    pub fn pixel_values(&self, images: &[image::RgbImage]) -> Result<Tensor> {
        super::pixel_values(images, &self.preprocess, &self.device, self.dtype)
    }

    /// `get_image_features` of `pixel_values`, `[batch, projection_dim]`,
    /// f32, not normalised (for parity tests).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        on_pool(|| {
            Ok(self
                .model
                .get_image_features(&pixel_values.to_dtype(self.dtype)?)?
                .to_dtype(DType::F32)?)
        })
    }

    /// The L2-normalised embedding of each image, `[batch, projection_dim]`.
    pub fn embed_images(&self, images: &[image::RgbImage]) -> Result<Tensor> {
        let pixel_values = self.pixel_values(images)?;
        l2_normalised(&self.image_features(&pixel_values)?)
    }

    /// The ids the model reads for `text`: `<|startoftext|> … <|endoftext|>`,
    /// cut to the text model's `max_position_embeddings` as transformers'
    /// `tokenizer(text, truncation=True)` cuts it.
    pub fn text_ids(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.codec.encode_with_special_tokens(text)?;
        anyhow::ensure!(!ids.is_empty(), "the text {text:?} tokenizes to nothing");
        Ok(ids)
    }

    /// `get_text_features` of each text, `[texts, projection_dim]`, f32, not
    /// normalised. Texts go through in groups, each padded after its end
    /// token (which the causal mask keeps from changing anything).
    pub fn text_features(&self, texts: &[String]) -> Result<Tensor> {
        let ids = texts
            .iter()
            .map(|text| self.text_ids(text))
            .collect::<Result<Vec<_>>>()?;
        on_pool(|| {
            let features = ids
                .chunks(TEXTS_PER_PASS)
                .map(|group| {
                    let longest = group.iter().map(Vec::len).max().unwrap_or(0);
                    let padded: Vec<Vec<u32>> = group
                        .iter()
                        .map(|ids| {
                            let mut row = ids.clone();
                            // Any id after the end token reads the same; the
                            // last of the row keeps the largest id where it was.
                            row.resize(longest, 0);
                            row
                        })
                        .collect();
                    let input_ids = Tensor::new(padded, &self.device)?;
                    Ok(self
                        .model
                        .get_text_features(&input_ids)?
                        .to_dtype(DType::F32)?)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&features, 0)?)
        })
    }

    /// The L2-normalised embedding of each text, `[texts, projection_dim]`.
    pub fn embed_texts(&self, texts: &[String]) -> Result<Tensor> {
        l2_normalised(&self.text_features(texts)?)
    }

    /// `labels` put through `template` (`{}` is the label) and encoded, once
    /// for a whole run.
    pub fn label_set(&self, labels: &[String], template: &str) -> Result<TextSet> {
        anyhow::ensure!(
            template.contains("{}"),
            "the label template {template:?} has no {{}} for the label"
        );
        anyhow::ensure!(!labels.is_empty(), "there are no labels");
        let sentences: Vec<String> = labels
            .iter()
            .map(|label| template.replacen("{}", label, 1))
            .collect();
        Ok(TextSet {
            texts: labels.to_vec(),
            embeds: self.embed_texts(&sentences)?,
        })
    }

    /// Each image's labels, best first: the softmax over the labels of
    /// `logits_per_image` (`exp(logit_scale)` times the cosine), as
    /// transformers' zero-shot-image-classification pipeline scores them.
    /// `image_embeds` are normalised ([`Self::embed_images`]).
    pub fn score_labels(
        &self,
        image_embeds: &Tensor,
        labels: &TextSet,
    ) -> Result<Vec<Vec<LabelScore>>> {
        let logits = (image_embeds.matmul(&labels.embeds.t()?)? * f64::from(self.logit_scale()))?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
        Ok(probs
            .into_iter()
            .map(|row| {
                let mut scores: Vec<LabelScore> = row
                    .into_iter()
                    .zip(&labels.texts)
                    .map(|(score, label)| LabelScore {
                        label: label.clone(),
                        score,
                    })
                    .collect();
                // Stable: equal scores keep the labels' order, as the
                // pipeline's `sorted(..., key=-score)` does.
                scores.sort_by(|a, b| b.score.total_cmp(&a.score));
                scores
            })
            .collect())
    }
}

/// A generated caption with its CLIP score.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredCaption {
    pub caption: super::Caption,
    /// The cosine similarity of the caption's and the image's embeddings.
    pub clip_score: f32,
}

impl Embedder {
    /// Each image's candidate captions, best first by their cosine
    /// similarity to the image (`image_embeds`, normalised, one row per
    /// image): the reranking LAION-COCO used (many BLIP candidates, CLIP
    /// keeps the best). All the candidates' texts are encoded together.
    pub fn rank_captions(
        &self,
        image_embeds: &Tensor,
        candidates: Vec<Vec<super::Caption>>,
    ) -> Result<Vec<Vec<ScoredCaption>>> {
        let texts: Vec<String> = candidates
            .iter()
            .flatten()
            .map(|caption| caption.text.clone())
            .collect();
        if texts.is_empty() {
            return Ok(candidates.iter().map(|_| vec![]).collect());
        }
        let text_embeds = self.embed_texts(&texts)?;
        let cosines = text_embeds.matmul(&image_embeds.t()?)?.to_vec2::<f32>()?;
        let mut row = 0;
        Ok(candidates
            .into_iter()
            .enumerate()
            .map(|(image, captions)| {
                let mut scored: Vec<ScoredCaption> = captions
                    .into_iter()
                    .map(|caption| {
                        let clip_score = cosines[row][image];
                        row += 1;
                        ScoredCaption {
                            caption,
                            clip_score,
                        }
                    })
                    .collect();
                // Stable: a tie keeps the caption model's order.
                scored.sort_by(|a, b| b.clip_score.total_cmp(&a.clip_score));
                scored
            })
            .collect())
    }
}

/// See [`Embedder::identity`].
fn identity(files: &ModelFiles, dtype: DType, device: &Device) -> String {
    let weights = match &files.weights {
        hub::WeightFiles::Safetensors(paths) => paths.clone(),
        hub::WeightFiles::PytorchBin(path) => vec![path.clone()],
    };
    let stamps: Vec<String> = std::iter::once(&files.config)
        .chain(&weights)
        .map(|path| {
            let stamp = std::fs::metadata(path)
                .and_then(|m| Ok((m.len(), m.modified()?)))
                .map(|(len, modified)| format!("{len}@{modified:?}"))
                .unwrap_or_default();
            format!("{}={stamp}", path.display())
        })
        .collect();
    format!(
        "{}|{dtype:?}|{}|{}",
        files.source,
        if device.is_cpu() { "cpu" } else { "gpu" },
        stamps.join("|")
    )
}

/// Texts encoded per pass of the text tower.
const TEXTS_PER_PASS: usize = 64;

/// Each row divided by its L2 norm, as transformers' `x / x.norm(p=2, dim=-1,
/// keepdim=True)`.
pub fn l2_normalised(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(xs.broadcast_div(&norm)?)
}

/// The image processor settings with `CLIPImageProcessor`'s class defaults.
fn load_clip_preprocess_config(path: &std::path::Path) -> Result<PreprocessConfig> {
    let text = read(path)?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let section = json.get("image_processor").unwrap_or(&json);
    PreprocessConfig::clip_from_json_str(&section.to_string())
        .with_context(|| format!("reading {}", path.display()))
}
