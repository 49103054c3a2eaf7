//! BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
//! Encoders and Large Language Models (Li et al., 2023, arXiv:2301.12597).
//!
//! Mirrors transformers 5's `modeling_blip_2.py` (`Blip2VisionModel`,
//! `Blip2QFormerModel`, `Blip2ForConditionalGeneration`) with an OPT language
//! model (`opt.rs`). The pipeline: the EVA ViT encodes the image; learned
//! query tokens read it through the Q-Former's cross-attention; the
//! `language_projection` maps the queries into the language model's embedding
//! space, where they stand in front of the prompt's token embeddings.
//!
//! As in transformers (`_keep_in_fp32_modules`), the query tokens and the
//! Q-Former always run in f32, whatever the dtype of the rest.

use anyhow::Context;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::bert::{BertAttention, BertAttentionShape};
use super::blip::{self, VisionModel};
use super::opt::{OptConfig, OptForCausalLM};
use crate::nn::{layer_norm, linear, residual_add, Activation, LayerNorm, Linear, LinearOptions};

// ---------------------------------------------------------------------------
// Configuration (config.json)
// ---------------------------------------------------------------------------

/// `Blip2VisionConfig`; defaults are transformers' (the ViT-g of blip2-opt-2.7b).
#[derive(Debug, Clone, Deserialize)]
pub struct Blip2VisionConfig {
    #[serde(default = "defaults::vision_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::vision_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::vision_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::vision_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::image_size")]
    pub image_size: usize,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::gelu")]
    pub hidden_act: String,
    #[serde(default = "defaults::vision_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "defaults::yes")]
    pub qkv_bias: bool,
    /// How linear weights are held in memory (`--quantize`, the pack
    /// cache); not read from config.json, set by the loader.
    #[serde(skip)]
    pub linear: LinearOptions,
}

impl Blip2VisionConfig {
    /// The same encoder as BLIP's ViT, module for module (`Blip2EncoderLayer`
    /// is "copied from" `BlipEncoderLayer`), with BLIP-2's optional qkv bias.
    fn as_blip(&self) -> blip::VisionConfig {
        blip::VisionConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            image_size: self.image_size,
            patch_size: self.patch_size,
            hidden_act: self.hidden_act.clone(),
            layer_norm_eps: self.layer_norm_eps,
            qkv_bias: self.qkv_bias,
            linear: self.linear.clone(),
        }
    }
}

/// `Blip2QFormerConfig`; defaults are transformers'.
#[derive(Debug, Clone, Deserialize)]
pub struct QFormerConfig {
    #[serde(default = "defaults::qformer_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::qformer_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::qformer_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::qformer_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::gelu")]
    pub hidden_act: String,
    #[serde(default = "defaults::qformer_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Every this-many layers (from layer 0) cross-attends to the image.
    #[serde(default = "defaults::cross_attention_frequency")]
    pub cross_attention_frequency: usize,
    /// How linear weights are held in memory (`--quantize`, the pack
    /// cache); not read from config.json, set by the loader.
    #[serde(skip)]
    pub linear: LinearOptions,
}

/// `Blip2Config`: the top-level config.json of a BLIP-2 checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct Blip2Config {
    pub vision_config: Blip2VisionConfig,
    pub qformer_config: QFormerConfig,
    pub text_config: OptConfig,
    #[serde(default = "defaults::num_query_tokens")]
    pub num_query_tokens: usize,
    /// The `<image>` placeholder id of checkpoints converted after transformers
    /// moved the queries into the token sequence; absent in older ones, which
    /// prepend the queries instead. Both put the same embeddings in the same
    /// positions, so the id is only used to check the tokenizer.
    #[serde(default)]
    pub image_token_index: Option<u32>,
}

impl Blip2Config {
    pub fn from_json(json: &str) -> anyhow::Result<Self> {
        let raw: serde_json::Value =
            serde_json::from_str(json).context("config.json is not JSON")?;
        let language_model = raw
            .pointer("/text_config/model_type")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("opt");
        anyhow::ensure!(
            language_model == "opt",
            "this BLIP-2 checkpoint's language model is {language_model}; only OPT is supported"
        );
        let cfg: Self =
            serde_json::from_value(raw).context("config.json is not a BLIP-2 config")?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.vision_config.as_blip().validate()?;
        let q = &self.qformer_config;
        anyhow::ensure!(
            q.num_attention_heads > 0 && q.hidden_size.is_multiple_of(q.num_attention_heads),
            "Q-Former hidden_size {} is not a multiple of num_attention_heads {}",
            q.hidden_size,
            q.num_attention_heads
        );
        anyhow::ensure!(
            q.cross_attention_frequency > 0,
            "Q-Former cross_attention_frequency must be at least 1"
        );
        anyhow::ensure!(
            self.num_query_tokens > 0,
            "num_query_tokens must be at least 1"
        );
        anyhow::ensure!(
            self.num_query_tokens < self.text_config.max_position_embeddings,
            "{} query tokens leave no room in the language model's {} positions",
            self.num_query_tokens,
            self.text_config.max_position_embeddings
        );
        Ok(())
    }
}

mod defaults {
    pub fn yes() -> bool {
        true
    }
    pub fn gelu() -> String {
        "gelu".into()
    }
    pub fn vision_hidden_size() -> usize {
        1408
    }
    pub fn vision_intermediate_size() -> usize {
        6144
    }
    pub fn vision_num_hidden_layers() -> usize {
        39
    }
    pub fn vision_num_attention_heads() -> usize {
        16
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        14
    }
    pub fn vision_layer_norm_eps() -> f64 {
        1e-6
    }
    pub fn qformer_hidden_size() -> usize {
        768
    }
    pub fn qformer_num_attention_heads() -> usize {
        12
    }
    pub fn qformer_num_hidden_layers() -> usize {
        12
    }
    pub fn qformer_intermediate_size() -> usize {
        3072
    }
    pub fn qformer_layer_norm_eps() -> f64 {
        1e-12
    }
    pub fn cross_attention_frequency() -> usize {
        2
    }
    pub fn num_query_tokens() -> usize {
        32
    }
}

// ---------------------------------------------------------------------------
// Q-Former (Blip2QFormerModel)
// ---------------------------------------------------------------------------

/// `Blip2QFormerAttention`: a BERT attention block with its projections
/// under `attention`, never masked (the queries see each other and every
/// image token); `kv_dim` is the width keys and values are read from (the
/// Q-Former's own, or the vision width).
fn qformer_attention(cfg: &QFormerConfig, kv_dim: usize, vb: VarBuilder) -> Result<BertAttention> {
    let shape = BertAttentionShape {
        hidden_size: cfg.hidden_size,
        kv_dim,
        num_heads: cfg.num_attention_heads,
        layer_norm_eps: cfg.layer_norm_eps,
    };
    BertAttention::new(shape, "attention", &cfg.linear, vb)
}

/// `Blip2QFormerLayer` as run on the query tokens alone (no text input): self-
/// attention, cross-attention on every `cross_attention_frequency`-th layer,
/// then the query feed-forward (`intermediate_query`, `output_query`).
#[derive(Debug, Clone)]
struct QFormerLayer {
    attention: BertAttention,
    crossattention: Option<BertAttention>,
    intermediate_query: Linear,
    act: Activation,
    output_query_dense: Linear,
    output_query_layer_norm: LayerNorm,
}

impl QFormerLayer {
    fn new(
        cfg: &QFormerConfig,
        index: usize,
        vision_width: usize,
        vb: VarBuilder,
    ) -> anyhow::Result<Self> {
        let d = cfg.hidden_size;
        let crossattention = index
            .is_multiple_of(cfg.cross_attention_frequency)
            .then(|| qformer_attention(cfg, vision_width, vb.pp("crossattention")))
            .transpose()?;
        Ok(Self {
            attention: qformer_attention(cfg, d, vb.pp("attention"))?,
            crossattention,
            intermediate_query: linear(
                d,
                cfg.intermediate_size,
                &cfg.linear,
                vb.pp("intermediate_query.dense"),
            )?,
            act: Activation::from_config_name(&cfg.hidden_act)?,
            output_query_dense: linear(
                cfg.intermediate_size,
                d,
                &cfg.linear,
                vb.pp("output_query.dense"),
            )?,
            output_query_layer_norm: layer_norm(
                d,
                cfg.layer_norm_eps,
                vb.pp("output_query.LayerNorm"),
            )?,
        })
    }

    fn forward(&self, queries: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let mut hidden = self.attention.forward(queries, queries)?;
        if let Some(cross) = &self.crossattention {
            hidden = cross.forward(&hidden, image_embeds)?;
        }
        let ff = self.output_query_dense.forward(
            &self
                .act
                .forward(&self.intermediate_query.forward(&hidden)?)?,
        )?;
        self.output_query_layer_norm
            .forward(&residual_add(&ff, &hidden)?)
    }
}

/// `Blip2QFormerModel`: LayerNorm over the query embeddings, then the layers.
#[derive(Debug, Clone)]
pub struct QFormerModel {
    layernorm: LayerNorm,
    layers: Vec<QFormerLayer>,
}

impl QFormerModel {
    pub fn new(cfg: &QFormerConfig, vision_width: usize, vb: VarBuilder) -> anyhow::Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| QFormerLayer::new(cfg, i, vision_width, vb.pp("encoder.layer").pp(i)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            layernorm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layernorm"))?,
            layers,
        })
    }

    /// `query_embeds [batch, queries, hidden]` reading `image_embeds [batch,
    /// tokens, vision_hidden]` -> `last_hidden_state [batch, queries, hidden]`.
    pub fn forward(&self, query_embeds: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let mut hidden = self.layernorm.forward(query_embeds)?;
        for layer in &self.layers {
            hidden = layer.forward(&hidden, image_embeds)?;
        }
        Ok(hidden)
    }
}

// ---------------------------------------------------------------------------
// The whole model (Blip2ForConditionalGeneration)
// ---------------------------------------------------------------------------

/// `Blip2ForConditionalGeneration` with an OPT language model.
#[derive(Debug, Clone)]
pub struct Blip2ForConditionalGeneration {
    pub vision_model: VisionModel,
    /// `[1, num_query_tokens, qformer_hidden]`, in the Q-Former's dtype.
    query_tokens: Tensor,
    qformer: QFormerModel,
    language_projection: Linear,
    pub language_model: OptForCausalLM,
    pub config: Blip2Config,
}

impl Blip2ForConditionalGeneration {
    pub fn new(config: Blip2Config, vb: VarBuilder) -> anyhow::Result<Self> {
        let q = &config.qformer_config;
        let vision_width = config.vision_config.hidden_size;
        // transformers keeps these two in f32 when the model is loaded in f16
        // (`_keep_in_fp32_modules`; f16's range is too narrow for them), and
        // in the model's dtype otherwise, bf16 included.
        let qformer_dtype = match vb.dtype() {
            DType::F16 => DType::F32,
            dtype => dtype,
        };
        let qformer_vb = vb.clone().set_dtype(qformer_dtype);
        let query_tokens =
            qformer_vb.get((1, config.num_query_tokens, q.hidden_size), "query_tokens")?;
        let qformer = QFormerModel::new(q, vision_width, qformer_vb.pp("qformer"))?;
        Ok(Self {
            vision_model: VisionModel::new(&config.vision_config.as_blip(), vb.pp("vision_model"))?,
            query_tokens,
            qformer,
            language_projection: linear(
                q.hidden_size,
                config.text_config.hidden_size,
                &q.linear,
                vb.pp("language_projection"),
            )?,
            language_model: OptForCausalLM::new(&config.text_config, vb.pp("language_model"))?,
            config,
        })
    }

    /// `pixel_values [batch, 3, H, W]` -> `image_embeds [batch, 1 + patches, vision_hidden]`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision_model.forward(pixel_values)
    }

    /// The Q-Former's `last_hidden_state` for `image_embeds`, in the
    /// Q-Former's dtype (f32 for an f16 model, the model's dtype otherwise).
    pub fn query_output(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let batch = image_embeds.dim(0)?;
        let (_, n, d) = self.query_tokens.dims3()?;
        let queries = self.query_tokens.expand((batch, n, d))?.contiguous()?;
        self.qformer
            .forward(&queries, &image_embeds.to_dtype(self.query_tokens.dtype())?)
    }

    /// The projected queries, `[batch, num_query_tokens, text_hidden]` in the
    /// language model's dtype: what stands in front of the prompt.
    pub fn language_model_inputs(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let query_output = self
            .query_output(image_embeds)?
            .to_dtype(image_embeds.dtype())?;
        self.language_projection.forward(&query_output)
    }

    /// Room in the language model for the prompt and the new tokens, after
    /// the query tokens.
    pub fn max_text_positions(&self) -> usize {
        self.language_model.max_position_embeddings() - self.config.num_query_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_config() -> String {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/models/blip2-opt-tiny/config.json"
        );
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn the_fixture_config_reads_with_the_newline_as_eos() {
        let config = Blip2Config::from_json(&fixture_config()).unwrap();
        assert_eq!(config.num_query_tokens, 5);
        assert_eq!(config.qformer_config.cross_attention_frequency, 2);
        let text = &config.text_config;
        assert_eq!((text.bos_token_id, text.pad_token_id), (Some(2), Some(1)));
        assert_eq!(text.eos_token_id.as_ref().unwrap().to_vec().len(), 1);
        assert!(config.vision_config.as_blip().qkv_bias);
    }

    #[test]
    fn a_language_model_other_than_opt_is_named_in_the_error() {
        let mut raw: serde_json::Value = serde_json::from_str(&fixture_config()).unwrap();
        raw["text_config"]["model_type"] = "t5".into();
        let err = Blip2Config::from_json(&raw.to_string()).unwrap_err();
        assert!(err.to_string().contains("language model is t5"), "{err}");
    }

    #[test]
    fn eos_may_be_one_id_or_several() {
        let mut raw: serde_json::Value = serde_json::from_str(&fixture_config()).unwrap();
        raw["text_config"]["eos_token_id"] = serde_json::json!([2, 50118]);
        let config = Blip2Config::from_json(&raw.to_string()).unwrap();
        let eos = config.text_config.eos_token_id.unwrap().to_vec();
        assert_eq!(eos, [2, 50118]);
    }
}
