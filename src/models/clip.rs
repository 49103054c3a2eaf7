//! CLIP: Learning Transferable Visual Models From Natural Language
//! Supervision (Radford et al., 2021, arXiv:2103.00020).
//!
//! Mirrors transformers 5's `modeling_clip.py` (`CLIPModel`: a
//! `CLIPVisionTransformer`, a `CLIPTextTransformer` and the two projections
//! into the shared embedding space). Struct fields and `vb` paths follow the
//! checkpoint's tensor names: `vision_model.encoder.layers.3.self_attn.q_proj`
//! is `vision_model` → `encoder.layers[3]` → `self_attn.q_proj`.
//!
//! Each attention block reads its `q_proj`, `k_proj` and `v_proj` into one
//! fused projection (the same sums, one matrix product instead of three),
//! the layout BLIP's ViT stores and our attention kernel reads.

use anyhow::Context;
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::nn::{
    causal_mask, fused_qkv_attention, layer_norm, linear, linear_no_bias, merge_heads,
    residual_add, scaled_dot_product_attention, split_heads, Activation, LayerNorm, Linear,
    LinearOptions, SdpaParams,
};

// ---------------------------------------------------------------------------
// Configuration (config.json)
// ---------------------------------------------------------------------------

/// `CLIPVisionConfig`; defaults are transformers' for keys a checkpoint omits.
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "defaults::vision_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::vision_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::vision_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::num_channels")]
    pub num_channels: usize,
    #[serde(default = "defaults::image_size")]
    pub image_size: usize,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// How linear weights are held in memory; set by the loader.
    #[serde(skip)]
    pub linear: LinearOptions,
}

/// `CLIPTextConfig`; defaults are transformers' for keys a checkpoint omits.
#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::text_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::text_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::text_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// An integer, or a list transformers cannot pool with unless it has
    /// one entry (see [`TextConfig::pooling`]).
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: serde_json::Value,
    /// How linear weights are held in memory; set by the loader.
    #[serde(skip)]
    pub linear: LinearOptions,
}

/// Where the text transformer reads the sentence's embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPooling {
    /// At the largest id of each row: configs written before transformers
    /// PR #24773 carry `eos_token_id: 2` (every openai checkpoint), and
    /// transformers keeps their behaviour, which relies on `<|endoftext|>`
    /// being the vocabulary's last id.
    LargestId,
    /// At the first position of this id (the end-of-text token).
    FirstEos(u32),
}

impl TextConfig {
    pub fn pooling(&self) -> anyhow::Result<TextPooling> {
        let id = match &self.eos_token_id {
            serde_json::Value::Array(ids) if ids.len() == 1 => ids[0].as_u64(),
            value => value.as_u64(),
        };
        let id = id.and_then(|id| u32::try_from(id).ok()).with_context(|| {
            format!(
                "text_config.eos_token_id {} is not one token id",
                self.eos_token_id
            )
        })?;
        Ok(if id == 2 {
            TextPooling::LargestId
        } else {
            TextPooling::FirstEos(id)
        })
    }
}

/// `CLIPConfig`: the top-level config.json of a CLIP checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: usize,
}

impl ClipConfig {
    /// Parses config.json as transformers does, including the
    /// `text_config_dict`/`vision_config_dict` of configs written by
    /// transformers 4.2x (openai's own): `CLIPConfig.__post_init__` builds a
    /// full sub-config from such a dict (class defaults for what it leaves
    /// out) and lets it replace the `text_config`/`vision_config` beside it.
    pub fn from_json(json: &str) -> anyhow::Result<Self> {
        let mut value: serde_json::Value =
            serde_json::from_str(json).context("config.json is not JSON")?;
        let object = value
            .as_object_mut()
            .context("config.json is not a JSON object")?;
        for section in ["text_config", "vision_config"] {
            if let Some(dict) = object.remove(&format!("{section}_dict")) {
                if !dict.is_null() {
                    object.insert(section.to_string(), dict);
                }
            }
            object
                .entry(section)
                .or_insert_with(|| serde_json::json!({}));
        }
        let config: Self =
            serde_json::from_value(value).context("config.json is not a CLIP config")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.vision_config.validate()?;
        let t = &self.text_config;
        anyhow::ensure!(
            t.num_attention_heads > 0 && t.hidden_size.is_multiple_of(t.num_attention_heads),
            "text hidden_size {} is not a multiple of num_attention_heads {}",
            t.hidden_size,
            t.num_attention_heads
        );
        anyhow::ensure!(
            t.max_position_embeddings >= 2,
            "text max_position_embeddings {} leaves no room for a start and an end token",
            t.max_position_embeddings
        );
        Activation::from_config_name(&t.hidden_act)?;
        t.pooling()?;
        Ok(())
    }
}

impl VisionConfig {
    /// Refuses shapes the vision tower cannot be built with, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "vision hidden_size {} is not a multiple of num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        anyhow::ensure!(
            self.patch_size > 0 && self.image_size.is_multiple_of(self.patch_size),
            "vision image_size {} is not a multiple of patch_size {}",
            self.image_size,
            self.patch_size
        );
        anyhow::ensure!(
            self.num_channels == 3,
            "vision num_channels is {}; only RGB (3) is supported",
            self.num_channels
        );
        Activation::from_config_name(&self.hidden_act)?;
        Ok(())
    }

    /// Patches per image, the class token not counted.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

mod defaults {
    pub fn vision_hidden_size() -> usize {
        768
    }
    pub fn vision_intermediate_size() -> usize {
        3072
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn vision_num_attention_heads() -> usize {
        12
    }
    pub fn num_channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        32
    }
    pub fn hidden_act() -> String {
        "quick_gelu".into()
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn text_hidden_size() -> usize {
        512
    }
    pub fn text_intermediate_size() -> usize {
        2048
    }
    pub fn text_num_attention_heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        77
    }
    pub fn eos_token_id() -> serde_json::Value {
        49407.into()
    }
    pub fn projection_dim() -> usize {
        512
    }
}

// ---------------------------------------------------------------------------
// The encoder both towers share (CLIPEncoder)
// ---------------------------------------------------------------------------

/// The shapes of one tower's encoder layers.
struct EncoderShape<'a> {
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    hidden_act: &'a str,
    layer_norm_eps: f64,
    linear: &'a LinearOptions,
}

impl<'a> EncoderShape<'a> {
    fn of_vision(cfg: &'a VisionConfig) -> Self {
        Self {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
            hidden_act: &cfg.hidden_act,
            layer_norm_eps: cfg.layer_norm_eps,
            linear: &cfg.linear,
        }
    }

    fn of_text(cfg: &'a TextConfig) -> Self {
        Self {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
            hidden_act: &cfg.hidden_act,
            layer_norm_eps: cfg.layer_norm_eps,
            linear: &cfg.linear,
        }
    }
}

/// `CLIPAttention`: q, k and v read into one fused projection.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    out_proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    fn new(shape: &EncoderShape, vb: VarBuilder) -> Result<Self> {
        let d = shape.hidden_size;
        // The fused layer's name is not in the checkpoint; it is the weight
        // cache's key for the packed [q; k; v] matrix.
        let qkv = shape.linear.layer(&vb.pp("qkv_proj"), d, 3 * d, || {
            let part = |name: &str| -> Result<(Tensor, Tensor)> {
                Ok((
                    vb.pp(name).get((d, d), "weight")?,
                    vb.pp(name).get(d, "bias")?,
                ))
            };
            let (q, k, v) = (part("q_proj")?, part("k_proj")?, part("v_proj")?);
            Ok((
                Tensor::cat(&[&q.0, &k.0, &v.0], 0)?,
                Some(Tensor::cat(&[&q.1, &k.1, &v.1], 0)?),
            ))
        })?;
        let head_dim = d / shape.num_attention_heads;
        Ok(Self {
            qkv,
            out_proj: linear(d, d, shape.linear, vb.pp("out_proj"))?,
            num_heads: shape.num_attention_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// Bidirectional (`mask` `None`: the vision tower) or masked (the
    /// text tower's causal mask) self-attention over `[batch, seq, hidden]`.
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let qkv = self.qkv.forward(xs)?;
        let context = match mask {
            None => fused_qkv_attention(&qkv, self.num_heads, self.scale)?,
            Some(mask) => {
                let d = qkv.dim(2)? / 3;
                let heads = |i: usize| split_heads(&qkv.narrow(2, i * d, d)?, self.num_heads);
                let params = SdpaParams {
                    mask: Some(mask),
                    ..SdpaParams::scaled(self.scale)
                };
                merge_heads(&scaled_dot_product_attention(
                    &heads(0)?,
                    &heads(1)?,
                    &heads(2)?,
                    &params,
                )?)?
            }
        };
        self.out_proj.forward(&context)
    }
}

/// `CLIPMLP`.
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(shape: &EncoderShape, vb: VarBuilder) -> anyhow::Result<Self> {
        let (d, i) = (shape.hidden_size, shape.intermediate_size);
        Ok(Self {
            fc1: linear(d, i, shape.linear, vb.pp("fc1"))?,
            fc2: linear(i, d, shape.linear, vb.pp("fc2"))?,
            act: Activation::from_config_name(shape.hidden_act)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(xs)?)?)
    }
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP, each with a residual.
#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    mlp: Mlp,
    layer_norm2: LayerNorm,
}

impl EncoderLayer {
    fn new(shape: &EncoderShape, vb: VarBuilder) -> anyhow::Result<Self> {
        let (d, eps) = (shape.hidden_size, shape.layer_norm_eps);
        Ok(Self {
            self_attn: Attention::new(shape, vb.pp("self_attn"))?,
            layer_norm1: layer_norm(d, eps, vb.pp("layer_norm1"))?,
            mlp: Mlp::new(shape, vb.pp("mlp"))?,
            layer_norm2: layer_norm(d, eps, vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let attended = residual_add(
            &self
                .self_attn
                .forward(&self.layer_norm1.forward(xs)?, mask)?,
            xs,
        )?;
        residual_add(
            &self.mlp.forward(&self.layer_norm2.forward(&attended)?)?,
            &attended,
        )
    }
}

/// `CLIPEncoder`.
#[derive(Debug, Clone)]
struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    fn new(shape: &EncoderShape, num_layers: usize, vb: VarBuilder) -> anyhow::Result<Self> {
        let layers = (0..num_layers)
            .map(|i| EncoderLayer::new(shape, vb.pp("layers").pp(i)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut hidden = xs.clone();
        for layer in &self.layers {
            hidden = layer.forward(&hidden, mask)?;
        }
        Ok(hidden)
    }

    /// transformers' `hidden_states[i]` for each `i` in `wanted` (0: the
    /// input; i: after layer i), running no layer past the last one wanted.
    fn hidden_states(&self, xs: &Tensor, wanted: &[usize]) -> Result<Vec<Tensor>> {
        let last = wanted.iter().copied().max().unwrap_or(0);
        if last > self.layers.len() {
            candle_core::bail!(
                "hidden state {last} asked of an encoder of {} layers",
                self.layers.len()
            );
        }
        let mut states = vec![xs.clone()];
        for layer in &self.layers[..last] {
            let next = layer.forward(states.last().expect("starts with the input"), None)?;
            states.push(next);
        }
        Ok(wanted.iter().map(|&i| states[i].clone()).collect())
    }
}

// ---------------------------------------------------------------------------
// Vision tower (CLIPVisionTransformer)
// ---------------------------------------------------------------------------

/// `CLIPVisionEmbeddings`: a class embedding, non-overlapping patches
/// (a convolution without bias), learned positions.
#[derive(Debug, Clone)]
struct VisionEmbeddings {
    class_embedding: Tensor,
    /// The patch convolution (stride = kernel = patch) as a matrix over
    /// flattened patches, `[hidden, 3 * patch * patch]`: one GEMM.
    patch_weight: Tensor,
    position_embedding: Tensor,
    patch_size: usize,
    image_size: usize,
}

impl VisionEmbeddings {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let num_positions = (cfg.image_size / p).pow(2) + 1;
        let conv_weight = vb.get((d, c, p, p), "patch_embedding.weight")?;
        Ok(Self {
            class_embedding: vb.get(d, "class_embedding")?.reshape((1, 1, d))?,
            patch_weight: conv_weight.reshape((d, c * p * p))?,
            position_embedding: vb
                .get((num_positions, d), "position_embedding.weight")?
                .unsqueeze(0)?,
            patch_size: p,
            image_size: cfg.image_size,
        })
    }

    /// `pixel_values [batch, 3, S, S]` -> `[batch, 1 + patches, hidden]`.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        if (h, w) != (self.image_size, self.image_size) {
            candle_core::bail!(
                "input image size ({h}*{w}) doesn't match model ({s}*{s})",
                s = self.image_size
            );
        }
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        // [b, c, gh, p, gw, p] -> [b, gh, gw, c, p, p]: each row one patch, in
        // the order the conv weight is laid out (channel, row, column).
        let patches = pixel_values
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let patch_embeds = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let d = self.class_embedding.dim(2)?;
        let class_embeds = self.class_embedding.expand((b, 1, d))?;
        Tensor::cat(&[&class_embeds, &patch_embeds], 1)?.broadcast_add(&self.position_embedding)
    }
}

/// `CLIPVisionTransformer`: the ViT; its pooled output is the class
/// token's state after `post_layernorm`.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    embeddings: VisionEmbeddings,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    tokens: usize,
}

impl VisionTransformer {
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let shape = EncoderShape::of_vision(cfg);
        let (d, eps) = (shape.hidden_size, shape.layer_norm_eps);
        Ok(Self {
            embeddings: VisionEmbeddings::new(cfg, vb.pp("embeddings"))?,
            // Sic: the checkpoint's name for the layer norm before the encoder.
            pre_layrnorm: layer_norm(d, eps, vb.pp("pre_layrnorm"))?,
            encoder: Encoder::new(&shape, cfg.num_hidden_layers, vb.pp("encoder"))?,
            post_layernorm: layer_norm(d, eps, vb.pp("post_layernorm"))?,
            tokens: (cfg.image_size / cfg.patch_size).pow(2) + 1,
        })
    }

    /// `pixel_values [batch, 3, S, S]` -> `pooler_output [batch, hidden]`.
    ///
    /// Images go through in groups of about [`ROWS_PER_PASS`] token rows:
    /// a ViT-B/32 image is only 50 rows, too few to keep the cores busy
    /// alone, while a whole batch of ViT-L/14 images (257 rows each) would
    /// hold hundreds of MB of activations per layer.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let batch = pixel_values.dim(0)?;
        let per_pass = (ROWS_PER_PASS / self.tokens).clamp(1, batch.max(1));
        let pooled = (0..batch)
            .step_by(per_pass)
            .map(|start| {
                let n = per_pass.min(batch - start);
                self.pooled(&pixel_values.narrow(0, start, n)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&pooled, 0)
    }

    /// The encoder's hidden states at `layers` (0: the embeddings after
    /// `pre_layrnorm`; i: after layer i), `[batch, 1 + patches, hidden]`
    /// each, as `output_hidden_states` gives them: what LLaVA reads.
    pub fn hidden_states(&self, pixel_values: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
        let hidden = self
            .pre_layrnorm
            .forward(&self.embeddings.forward(pixel_values)?)?;
        self.encoder.hidden_states(&hidden, layers)
    }

    pub fn num_layers(&self) -> usize {
        self.encoder.layers.len()
    }

    fn pooled(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let hidden = self
            .pre_layrnorm
            .forward(&self.embeddings.forward(pixel_values)?)?;
        let last_hidden_state = self.encoder.forward(&hidden, None)?;
        self.post_layernorm
            .forward(&last_hidden_state.i((.., 0, ..))?)
    }
}

/// Token rows per pass of the vision tower; see [`VisionTransformer::forward`].
const ROWS_PER_PASS: usize = 1024;

// ---------------------------------------------------------------------------
// Text tower (CLIPTextTransformer)
// ---------------------------------------------------------------------------

/// `CLIPTextTransformer`: a causal transformer read at the end-of-text token.
#[derive(Debug, Clone)]
pub struct TextTransformer {
    token_embedding: Embedding,
    position_embedding: Embedding,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    pooling: TextPooling,
    max_position_embeddings: usize,
}

impl TextTransformer {
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let shape = EncoderShape::of_text(cfg);
        let d = cfg.hidden_size;
        let embeddings = vb.pp("embeddings");
        Ok(Self {
            token_embedding: candle_nn::embedding(
                cfg.vocab_size,
                d,
                embeddings.pp("token_embedding"),
            )?,
            position_embedding: candle_nn::embedding(
                cfg.max_position_embeddings,
                d,
                embeddings.pp("position_embedding"),
            )?,
            encoder: Encoder::new(&shape, cfg.num_hidden_layers, vb.pp("encoder"))?,
            final_layer_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            pooling: cfg.pooling()?,
            max_position_embeddings: cfg.max_position_embeddings,
        })
    }

    pub fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    /// `input_ids [batch, seq]` -> `pooler_output [batch, hidden]`. Rows
    /// padded after their end token read the same as alone: the mask is
    /// causal, so nothing before the end looks at the padding.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, seq) = input_ids.dims2()?;
        if seq > self.max_position_embeddings {
            candle_core::bail!(
                "sequence length {seq} is past max_position_embeddings {}",
                self.max_position_embeddings
            );
        }
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let embeds = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq, 0, embeds.dtype(), device)?;
        let hidden = self.encoder.forward(&embeds, Some(&mask))?;
        let last_hidden_state = self.final_layer_norm.forward(&hidden)?;
        let rows = pooling_positions(&input_ids.to_vec2::<u32>()?, self.pooling);
        let rows = Tensor::new(rows, device)?;
        // Row i of the flattened [batch * seq, hidden] states is batch row
        // i / seq at position i % seq.
        let (b, t, d) = last_hidden_state.dims3()?;
        last_hidden_state
            .reshape((b * t, d))?
            .index_select(&rows, 0)
    }
}

/// The flattened index of each row's pooled position (see [`TextPooling`]);
/// a row without the end token is read at its first position, where
/// transformers' `argmax` over an all-false row lands too.
fn pooling_positions(ids: &[Vec<u32>], pooling: TextPooling) -> Vec<u32> {
    ids.iter()
        .enumerate()
        .map(|(row, ids)| {
            let position = match pooling {
                // The first of equal maxima, as torch.argmax.
                TextPooling::LargestId => {
                    ids.iter()
                        .enumerate()
                        .fold(
                            (0, 0),
                            |best, (i, &id)| if id > best.1 { (i, id) } else { best },
                        )
                        .0
                }
                TextPooling::FirstEos(eos) => ids.iter().position(|&id| id == eos).unwrap_or(0),
            };
            (row * ids.len() + position) as u32
        })
        .collect()
}

// ---------------------------------------------------------------------------
// CLIPModel
// ---------------------------------------------------------------------------

/// `CLIPModel`: both towers and their projections into the shared space.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub text_model: TextTransformer,
    pub vision_model: VisionTransformer,
    visual_projection: Linear,
    text_projection: Linear,
    logit_scale: f32,
    device: Device,
}

impl ClipModel {
    pub fn new(config: &ClipConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let (v, t, p) = (
            &config.vision_config,
            &config.text_config,
            config.projection_dim,
        );
        let logit_scale = vb
            .get((), "logit_scale")
            .or_else(|_| vb.get(1, "logit_scale")?.squeeze(0))?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        Ok(Self {
            text_model: TextTransformer::new(t, vb.pp("text_model"))?,
            vision_model: VisionTransformer::new(v, vb.pp("vision_model"))?,
            visual_projection: linear_no_bias(
                v.hidden_size,
                p,
                &v.linear,
                vb.pp("visual_projection"),
            )?,
            text_projection: linear_no_bias(t.hidden_size, p, &t.linear, vb.pp("text_projection"))?,
            logit_scale: logit_scale.exp(),
            device: vb.device().clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `exp(logit_scale)`: what cosine similarities are multiplied by to
    /// give `logits_per_image` (100 in the openai checkpoints).
    pub fn logit_scale(&self) -> f32 {
        self.logit_scale
    }

    /// `get_image_features`: `[batch, projection_dim]`, not normalised.
    pub fn get_image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.visual_projection
            .forward(&self.vision_model.forward(pixel_values)?)
    }

    /// `get_text_features`: `[batch, projection_dim]`, not normalised.
    pub fn get_text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.text_projection
            .forward(&self.text_model.forward(input_ids)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_reads_the_first_largest_id_or_the_first_eos() {
        let ids = vec![vec![9, 5, 12, 12, 3], vec![9, 4, 7, 1, 1]];
        assert_eq!(pooling_positions(&ids, TextPooling::LargestId), [2, 5]);
        assert_eq!(pooling_positions(&ids, TextPooling::FirstEos(1)), [0, 8]);
    }

    #[test]
    fn legacy_config_dicts_replace_the_sub_configs() {
        let config = ClipConfig::from_json(
            r#"{"text_config": {"hidden_size": 8, "eos_token_id": 2, "num_attention_heads": 2},
                "text_config_dict": {"hidden_size": 512, "num_attention_heads": 8},
                "vision_config_dict": {"patch_size": 32}, "projection_dim": 512}"#,
        )
        .unwrap();
        assert_eq!(config.text_config.hidden_size, 512);
        // The dict's class defaults win over the sub-config beside it.
        assert_eq!(
            config.text_config.pooling().unwrap(),
            TextPooling::FirstEos(49407)
        );
        assert_eq!(config.vision_config.image_size, 224);
        let bad = ClipConfig::from_json(r#"{"text_config": {"eos_token_id": [1, 2]}}"#);
        assert!(bad.unwrap_err().to_string().contains("eos_token_id"));
        assert!(ClipConfig::from_json(r#"{"vision_config": {"patch_size": 5}}"#).is_err());
    }
}
