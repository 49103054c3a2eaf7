//! LLaVA: Visual Instruction Tuning (Liu et al., 2023, arXiv:2304.08485;
//! LLaVA-1.5: arXiv:2310.03744).
//!
//! Mirrors transformers 5's `modeling_llava.py` (`LlavaForConditionalGeneration`):
//! a CLIP vision tower read at `vision_feature_layer` (the class token
//! dropped under the `default` strategy), a two-layer projector
//! (`multi_modal_projector`: linear, GELU, linear) into the language model's
//! embedding space, and a Llama language model (`llama.rs`) whose `<image>`
//! placeholder embeddings are replaced by the projected image features.
//!
//! Checkpoints name their tensors in more than one layout (see [`layout`]);
//! every one transformers 5 reads is read.

use anyhow::Context;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::clip::{self, VisionTransformer};
use super::llama::{LlamaConfig, LlamaForCausalLM};
use crate::nn::{linear, linear_no_bias, Activation, Linear};

/// `vision_feature_layer`: one layer, or several whose features are
/// concatenated.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum FeatureLayers {
    One(i64),
    Many(Vec<i64>),
}

impl FeatureLayers {
    fn as_slice(&self) -> &[i64] {
        match self {
            Self::One(layer) => std::slice::from_ref(layer),
            Self::Many(layers) => layers,
        }
    }
}

/// `LlavaConfig`: the top-level config.json of a LLaVA checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct LlavaConfig {
    pub vision_config: clip::VisionConfig,
    pub text_config: LlamaConfig,
    #[serde(default = "defaults::image_token_index", alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "defaults::image_seq_length")]
    pub image_seq_length: usize,
    #[serde(default = "defaults::gelu")]
    pub projector_hidden_act: String,
    #[serde(default = "defaults::strategy")]
    pub vision_feature_select_strategy: String,
    #[serde(default = "defaults::feature_layer")]
    pub vision_feature_layer: FeatureLayers,
    #[serde(default = "defaults::yes")]
    pub multimodal_projector_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

mod defaults {
    pub fn image_token_index() -> u32 {
        32000
    }
    pub fn image_seq_length() -> usize {
        576
    }
    pub fn gelu() -> String {
        "gelu".into()
    }
    pub fn strategy() -> String {
        "default".into()
    }
    pub fn feature_layer() -> super::FeatureLayers {
        super::FeatureLayers::One(-2)
    }
    pub fn yes() -> bool {
        true
    }
}

impl LlavaConfig {
    /// Parses config.json as transformers does: a missing `vision_config`
    /// is llava-1.5's CLIP ViT-L/14-336 (`LlavaConfig.sub_configs_defaults`),
    /// and a tied head in `text_config` ties the whole model's.
    pub fn from_json(json: &str) -> anyhow::Result<Self> {
        let mut raw: serde_json::Value =
            serde_json::from_str(json).context("config.json is not JSON")?;
        let object = raw
            .as_object_mut()
            .context("config.json is not a JSON object")?;
        for (section, expected) in [
            ("vision_config", "clip_vision_model"),
            ("text_config", "llama"),
        ] {
            let kind = object
                .get(section)
                .and_then(|c| c.get("model_type"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or(expected);
            anyhow::ensure!(
                kind == expected,
                "this LLaVA checkpoint's {} is {kind}; only {expected} is supported",
                if section == "text_config" {
                    "language model"
                } else {
                    "vision tower"
                }
            );
        }
        object.entry("vision_config").or_insert_with(|| {
            serde_json::json!({
                "intermediate_size": 4096, "hidden_size": 1024, "patch_size": 14,
                "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16,
            })
        });
        object
            .entry("text_config")
            .or_insert_with(|| serde_json::json!({}));
        let mut config: Self =
            serde_json::from_value(raw).context("config.json is not a LLaVA config")?;
        config.tie_word_embeddings |= config.text_config.tie_word_embeddings;
        config.text_config.tie_word_embeddings = config.tie_word_embeddings;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.vision_config.validate()?;
        self.text_config.validate()?;
        Activation::from_config_name(&self.projector_hidden_act)?;
        anyhow::ensure!(
            matches!(
                self.vision_feature_select_strategy.as_str(),
                "default" | "full"
            ),
            "vision_feature_select_strategy {:?} is neither \"default\" nor \"full\"",
            self.vision_feature_select_strategy
        );
        self.feature_layers()?;
        anyhow::ensure!(
            (self.image_token_index as usize) < self.text_config.vocab_size,
            "image_token_index {} is outside the language model's vocabulary of {}",
            self.image_token_index,
            self.text_config.vocab_size
        );
        anyhow::ensure!(
            self.image_features() < self.text_config.max_position_embeddings,
            "{} image features leave no room in the language model's {} positions",
            self.image_features(),
            self.text_config.max_position_embeddings
        );
        Ok(())
    }

    /// `vision_feature_layer` as indices into the vision tower's hidden
    /// states (0: embeddings, i: after layer i), negatives counted from the end.
    pub fn feature_layers(&self) -> anyhow::Result<Vec<usize>> {
        let states = self.vision_config.num_hidden_layers as i64 + 1;
        let layers = self.vision_feature_layer.as_slice();
        anyhow::ensure!(!layers.is_empty(), "vision_feature_layer is an empty list");
        layers
            .iter()
            .map(|&layer| {
                let index = if layer < 0 { states + layer } else { layer };
                anyhow::ensure!(
                    (0..states).contains(&index),
                    "vision_feature_layer {layer} is outside the vision tower's {states} hidden states"
                );
                Ok(index as usize)
            })
            .collect()
    }

    /// Image features per image: the patches, and the class token under
    /// the `full` strategy. The processor expands `<image>` to this many.
    pub fn image_features(&self) -> usize {
        let patches = self.vision_config.num_patches();
        match self.vision_feature_select_strategy.as_str() {
            "full" => patches + 1,
            _ => patches,
        }
    }
}

/// `LlavaMultiModalProjector`.
#[derive(Debug, Clone)]
struct MultiModalProjector {
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
}

impl MultiModalProjector {
    fn new(config: &LlavaConfig, layers: usize, vb: VarBuilder) -> anyhow::Result<Self> {
        let input = config.vision_config.hidden_size * layers;
        let text = config.text_config.hidden_size;
        let options = &config.text_config.linear;
        let make = |i: usize, o: usize, vb: VarBuilder| -> Result<Linear> {
            if config.multimodal_projector_bias {
                linear(i, o, options, vb)
            } else {
                linear_no_bias(i, o, options, vb)
            }
        };
        Ok(Self {
            linear_1: make(input, text, vb.pp("linear_1"))?,
            act: Activation::from_config_name(&config.projector_hidden_act)?,
            linear_2: make(text, text, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(xs)?)?)
    }
}

/// The first of `prefixes` under which the checkpoint holds `marker`.
fn part<'a>(vb: &VarBuilder, prefixes: &[&'a str], marker: &str) -> anyhow::Result<&'a str> {
    prefixes
        .iter()
        .copied()
        .find(|prefix| vb.contains_tensor(&format!("{prefix}.{marker}")))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the checkpoint has no {marker} under any of {}",
                prefixes.join(", ")
            )
        })
}

/// Where this checkpoint keeps the vision tower, the projector, the
/// language model and its head. The names transformers 5 loads into,
/// `model.*`; the llava-hf checkpoints' (and what transformers 5 saves by
/// default): `language_model.model.*`, `language_model.lm_head`,
/// `multi_modal_projector.*`, the tower as `vision_tower.vision_model.*`
/// (or `vision_tower.*`, which transformers 5 writes for a CLIP tower it
/// built itself).
fn layout(vb: &VarBuilder) -> anyhow::Result<[&'static str; 4]> {
    let vision_tower = part(
        vb,
        &[
            "model.vision_tower.vision_model",
            "model.vision_tower",
            "vision_tower.vision_model",
            "vision_tower",
        ],
        "embeddings.class_embedding",
    )?;
    let projector = part(
        vb,
        &["model.multi_modal_projector", "multi_modal_projector"],
        "linear_1.weight",
    )?;
    let language_model = part(
        vb,
        &["model.language_model", "language_model.model"],
        "embed_tokens.weight",
    )?;
    let lm_head = if language_model == "model.language_model" {
        "lm_head"
    } else {
        "language_model.lm_head"
    };
    Ok([vision_tower, projector, language_model, lm_head])
}

/// `LlavaForConditionalGeneration`.
#[derive(Debug, Clone)]
pub struct LlavaForConditionalGeneration {
    vision_tower: VisionTransformer,
    multi_modal_projector: MultiModalProjector,
    pub language_model: LlamaForCausalLM,
    feature_layers: Vec<usize>,
    pub config: LlavaConfig,
}

impl LlavaForConditionalGeneration {
    pub fn new(config: LlavaConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let [vision_tower, projector, language_model, lm_head] = layout(&vb)?;
        let feature_layers = config.feature_layers()?;
        Ok(Self {
            vision_tower: VisionTransformer::new(&config.vision_config, vb.pp(vision_tower))?,
            multi_modal_projector: MultiModalProjector::new(
                &config,
                feature_layers.len(),
                vb.pp(projector),
            )?,
            language_model: LlamaForCausalLM::new(
                &config.text_config,
                vb.pp(language_model),
                vb.pp(lm_head),
            )?,
            feature_layers,
            config,
        })
    }

    /// `pixel_values [batch, 3, S, S]` -> the projected image features
    /// `[batch, image_features, text_hidden]` (`get_image_features`).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let states = self
            .vision_tower
            .hidden_states(pixel_values, &self.feature_layers)?;
        let skip = match self.config.vision_feature_select_strategy.as_str() {
            "default" => 1,
            _ => 0,
        };
        let selected = states
            .iter()
            .map(|s| {
                let tokens = s.dim(1)?;
                s.narrow(1, skip, tokens - skip)
            })
            .collect::<Result<Vec<_>>>()?;
        let selected = Tensor::cat(&selected, 2)?;
        self.multi_modal_projector.forward(&selected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_layers_count_from_the_end_and_are_checked() {
        let json = r#"{"vision_config": {"num_hidden_layers": 24, "image_size": 336, "patch_size": 14}, "text_config": {"vocab_size": 32064}}"#;
        let config = LlavaConfig::from_json(json).unwrap();
        assert_eq!(config.feature_layers().unwrap(), [23]);
        assert_eq!(config.image_features(), 576);
        let many = r#"{"vision_config": {"num_hidden_layers": 24, "image_size": 336, "patch_size": 14}, "text_config": {"vocab_size": 32064},
            "vision_feature_layer": [-1, 0, 5], "vision_feature_select_strategy": "full"}"#;
        let config = LlavaConfig::from_json(many).unwrap();
        assert_eq!(config.feature_layers().unwrap(), [24, 0, 5]);
        assert_eq!(config.image_features(), 577);
        let outside = r#"{"vision_config": {"num_hidden_layers": 24, "image_size": 336, "patch_size": 14}, "text_config": {"vocab_size": 32064},
            "vision_feature_layer": -26}"#;
        let err = LlavaConfig::from_json(outside).unwrap_err().to_string();
        assert!(err.contains("-26"), "{err}");
    }

    #[test]
    fn other_language_models_and_towers_are_named() {
        let mistral = r#"{"text_config": {"model_type": "mistral"}}"#;
        let err = LlavaConfig::from_json(mistral).unwrap_err().to_string();
        assert!(err.contains("language model is mistral"), "{err}");
        let siglip = r#"{"vision_config": {"model_type": "siglip_vision_model"}}"#;
        let err = LlavaConfig::from_json(siglip).unwrap_err().to_string();
        assert!(err.contains("vision tower is siglip_vision_model"), "{err}");
    }

    #[test]
    fn a_tied_text_config_ties_the_model() {
        let json = r#"{"text_config": {"vocab_size": 32064, "tie_word_embeddings": true}}"#;
        assert!(LlavaConfig::from_json(json).unwrap().tie_word_embeddings);
    }
}
