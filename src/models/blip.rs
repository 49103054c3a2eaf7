//! BLIP: Bootstrapping Language-Image Pre-training (Li et al., 2022, arXiv:2201.12086).
//!
//! Mirrors transformers 5's `modeling_blip.py` (`BlipVisionModel`,
//! `BlipForConditionalGeneration`) and `modeling_blip_text.py`
//! (`BlipTextLMHeadModel`). Struct fields and `vb` paths follow the checkpoint's
//! tensor names, so `text_decoder.bert.encoder.layer.3.crossattention.self.key`
//! is `text_decoder` → `bert` → `encoder.layer[3]` → `crossattention.self_.key`.
//!
//! Unlike candle-transformers' BLIP, the decoder keeps an explicit self-attention
//! cache and computes the cross-attention keys and values of the image once per
//! image instead of at every decoding step (about 16 GFLOP per step on
//! BLIP-base).

use anyhow::Context;
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::bert::{BertAttention, BertAttentionShape};
use crate::nn::{
    causal_mask, fused_qkv_attention, last_position, layer_norm, linear, linear_no_bias,
    residual_add, Activation, KvCache, LayerNorm, Linear, LinearOptions, TokenEmbedding,
};

// ---------------------------------------------------------------------------
// Configuration (config.json)
// ---------------------------------------------------------------------------

/// `BlipVisionConfig`; defaults are transformers' for keys a checkpoint omits.
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
    #[serde(default = "defaults::image_size")]
    pub image_size: usize,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::vision_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// BLIP's qkv projection always has a bias; BLIP-2's has one (its k part
    /// zero) only when `qkv_bias` is set.
    #[serde(default = "defaults::yes")]
    pub qkv_bias: bool,
    /// How linear weights are held in memory (`--quantize`, the pack
    /// cache); not read from config.json, set by the loader.
    #[serde(skip)]
    pub linear: LinearOptions,
}

impl VisionConfig {
    /// The shapes the encoder needs: whole heads, whole patches, a known activation.
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
        Activation::from_config_name(&self.hidden_act)?;
        Ok(())
    }
}

/// `BlipTextConfig`; defaults are transformers' for keys a checkpoint omits,
/// except `num_attention_heads` (see [`TextConfig::num_attention_heads`]).
#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    #[serde(default = "defaults::text_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::text_hidden_size")]
    pub hidden_size: usize,
    /// transformers overwrites this with the vision width (`BlipConfig.__post_init__`),
    /// so we do the same in [`BlipConfig::from_json`].
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    #[serde(default = "defaults::text_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default)]
    num_attention_heads: Option<usize>,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::text_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "defaults::bos_token_id")]
    pub bos_token_id: u32,
    #[serde(default = "defaults::pad_token_id")]
    pub pad_token_id: u32,
    #[serde(default = "defaults::sep_token_id")]
    pub sep_token_id: u32,
    /// How linear weights are held in memory (`--quantize`, the pack
    /// cache); not read from config.json, set by the loader.
    #[serde(skip)]
    pub linear: LinearOptions,
}

impl TextConfig {
    /// The text transformer's head count. Salesforce's original configs omit it,
    /// and transformers' default (8) is not what those checkpoints were trained
    /// with: every BLIP text model is BERT-shaped with 64-wide heads (12 heads at
    /// 768). [`BlipConfig::from_json`] fills the gap and reports it.
    pub fn num_attention_heads(&self) -> usize {
        self.num_attention_heads
            .unwrap_or(self.hidden_size / defaults::BERT_HEAD_DIM)
    }

    pub fn encoder_hidden_size(&self) -> usize {
        self.encoder_hidden_size.unwrap_or(self.hidden_size)
    }
}

/// `BlipConfig`: the top-level config.json of a BLIP checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct BlipConfig {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Notes on gaps in the file that we filled from the family's known values;
    /// the caller shows them to the user.
    #[serde(skip)]
    pub filled_gaps: Vec<String>,
}

impl BlipConfig {
    pub fn from_json(json: &str) -> anyhow::Result<Self> {
        let mut cfg: Self =
            serde_json::from_str(json).context("config.json is not a BLIP config")?;
        cfg.text_config.encoder_hidden_size = Some(cfg.vision_config.hidden_size);
        if cfg.text_config.num_attention_heads.is_none() {
            let heads = cfg.text_config.num_attention_heads();
            cfg.filled_gaps.push(format!(
                "config.json has no text_config.num_attention_heads; using {heads} \
                 (BLIP's BERT text model has 64-wide heads)"
            ));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.vision_config.validate()?;
        let t = &self.text_config;
        let heads = t.num_attention_heads();
        anyhow::ensure!(
            heads > 0 && t.hidden_size.is_multiple_of(heads),
            "text hidden_size {} is not a multiple of num_attention_heads {heads}",
            t.hidden_size
        );
        Activation::from_config_name(&t.hidden_act)?;
        Ok(())
    }
}

mod defaults {
    pub const BERT_HEAD_DIM: usize = 64;
    pub fn yes() -> bool {
        true
    }
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
    pub fn image_size() -> usize {
        384
    }
    pub fn patch_size() -> usize {
        16
    }
    pub fn hidden_act() -> String {
        "gelu".into()
    }
    pub fn vision_layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn text_vocab_size() -> usize {
        30524
    }
    pub fn text_hidden_size() -> usize {
        768
    }
    pub fn text_intermediate_size() -> usize {
        3072
    }
    pub fn max_position_embeddings() -> usize {
        512
    }
    pub fn text_layer_norm_eps() -> f64 {
        1e-12
    }
    pub fn bos_token_id() -> u32 {
        30522
    }
    pub fn pad_token_id() -> u32 {
        0
    }
    pub fn sep_token_id() -> u32 {
        102
    }
}

// ---------------------------------------------------------------------------
// Vision encoder (BlipVisionModel)
// ---------------------------------------------------------------------------

/// `BlipVisionEmbeddings`: a [CLS] embedding, non-overlapping patches, learned positions.
#[derive(Debug, Clone)]
struct VisionEmbeddings {
    class_embedding: Tensor,
    /// The patch convolution (stride = kernel = patch) as a matrix over
    /// flattened patches: `[hidden, 3 * patch * patch]`. Same arithmetic as the
    /// convolution, one GEMM instead of a conv kernel.
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    patch_size: usize,
}

impl VisionEmbeddings {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, p) = (cfg.hidden_size, cfg.patch_size);
        let num_positions = (cfg.image_size / p).pow(2) + 1;
        let conv_weight = vb.get((d, 3, p, p), "patch_embedding.weight")?;
        Ok(Self {
            class_embedding: vb.get((1, 1, d), "class_embedding")?,
            patch_weight: conv_weight.reshape((d, 3 * p * p))?,
            patch_bias: vb.get(d, "patch_embedding.bias")?,
            position_embedding: vb.get((1, num_positions, d), "position_embedding")?,
            patch_size: p,
        })
    }

    /// `pixel_values [batch, 3, H, W]` -> `[batch, 1 + patches, hidden]`.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        // [b, c, gh, p, gw, p] -> [b, gh, gw, c, p, p]: each row one patch, in the
        // order the conv weight is laid out (channel, row, column).
        let patches = pixel_values
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let patch_embeds = patches
            .broadcast_matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?;
        let d = self.class_embedding.dim(2)?;
        let class_embeds = self.class_embedding.expand((b, 1, d))?;
        let embeddings = Tensor::cat(&[&class_embeds, &patch_embeds], 1)?;
        embeddings.broadcast_add(&self.position_embedding)
    }
}

/// `BlipAttention`: fused qkv projection, bidirectional.
#[derive(Debug, Clone)]
struct VisionAttention {
    qkv: Linear,
    projection: Linear,
    num_heads: usize,
    scale: f64,
}

impl VisionAttention {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let head_dim = d / cfg.num_attention_heads;
        Ok(Self {
            qkv: if cfg.qkv_bias {
                linear(d, 3 * d, &cfg.linear, vb.pp("qkv"))?
            } else {
                linear_no_bias(d, 3 * d, &cfg.linear, vb.pp("qkv"))?
            },
            projection: linear(d, d, &cfg.linear, vb.pp("projection"))?,
            num_heads: cfg.num_attention_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(xs)?;
        let context = fused_qkv_attention(&qkv, self.num_heads, self.scale)?;
        self.projection.forward(&context)
    }
}

/// `BlipMLP`.
#[derive(Debug, Clone)]
struct VisionMlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl VisionMlp {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        Ok(Self {
            fc1: linear(
                cfg.hidden_size,
                cfg.intermediate_size,
                &cfg.linear,
                vb.pp("fc1"),
            )?,
            fc2: linear(
                cfg.intermediate_size,
                cfg.hidden_size,
                &cfg.linear,
                vb.pp("fc2"),
            )?,
            act: Activation::from_config_name(&cfg.hidden_act)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(xs)?)?)
    }
}

/// `BlipEncoderLayer`: pre-norm attention and MLP, each with a residual.
#[derive(Debug, Clone)]
struct VisionEncoderLayer {
    self_attn: VisionAttention,
    layer_norm1: LayerNorm,
    mlp: VisionMlp,
    layer_norm2: LayerNorm,
}

impl VisionEncoderLayer {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            self_attn: VisionAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: layer_norm(d, eps, vb.pp("layer_norm1"))?,
            mlp: VisionMlp::new(cfg, vb.pp("mlp"))?,
            layer_norm2: layer_norm(d, eps, vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let attended = residual_add(&self.self_attn.forward(&self.layer_norm1.forward(xs)?)?, xs)?;
        residual_add(
            &self.mlp.forward(&self.layer_norm2.forward(&attended)?)?,
            &attended,
        )
    }
}

/// `BlipVisionModel`: the ViT image encoder. Its `last_hidden_state` (after the
/// post layer norm) is what BLIP's text models cross-attend to.
#[derive(Debug, Clone)]
pub struct VisionModel {
    embeddings: VisionEmbeddings,
    layers: Vec<VisionEncoderLayer>,
    post_layernorm: LayerNorm,
    image_size: usize,
}

impl VisionModel {
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| VisionEncoderLayer::new(cfg, vb.pp("encoder.layers").pp(i)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: VisionEmbeddings::new(cfg, vb.pp("embeddings"))?,
            layers,
            post_layernorm: layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("post_layernorm"),
            )?,
            image_size: cfg.image_size,
        })
    }

    /// The square input size the position embeddings were trained for.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// `pixel_values [batch, 3, H, W]` -> `image_embeds [batch, 1 + patches, hidden]`.
    ///
    /// On the CPU, images go through one at a time: every row's arithmetic
    /// is its own either way, and one image's GEMMs (577 rows) already keep
    /// the cores busy. A batch of 8 at once ran at 1.34 s per image against
    /// 1.04 s alone (BLIP-base): its attention scores (128 MB a layer) and
    /// MLP activations (57 MB) are past glibc's 32 MB mmap threshold, so
    /// every one of them is fresh memory, page-faulted in and unmapped again.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let batch = pixel_values.dim(0)?;
        if batch > 1 && crate::nn::own_kernels(pixel_values.device()) {
            let per_image = (0..batch)
                .map(|i| self.forward_batch(&pixel_values.narrow(0, i, 1)?))
                .collect::<Result<Vec<_>>>()?;
            return Tensor::cat(&per_image, 0);
        }
        self.forward_batch(pixel_values)
    }

    fn forward_batch(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut hidden = self.embeddings.forward(pixel_values)?;
        for layer in &self.layers {
            hidden = layer.forward(&hidden)?;
        }
        self.post_layernorm.forward(&hidden)
    }
}

// ---------------------------------------------------------------------------
// Text decoder (BlipTextLMHeadModel)
// ---------------------------------------------------------------------------

/// `BlipTextEmbeddings`: word + learned absolute position, then LayerNorm.
#[derive(Debug, Clone)]
struct TextEmbeddings {
    word_embeddings: TokenEmbedding,
    position_embeddings: Embedding,
    layer_norm: LayerNorm,
}

impl TextEmbeddings {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            word_embeddings: TokenEmbedding::new(
                cfg.vocab_size,
                d,
                &cfg.linear,
                vb.pp("word_embeddings"),
            )?,
            position_embeddings: candle_nn::embedding(
                cfg.max_position_embeddings,
                d,
                vb.pp("position_embeddings"),
            )?,
            layer_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `input_ids [batch, seq]` at positions `past..past + seq`.
    fn forward(&self, input_ids: &Tensor, past: usize) -> Result<Tensor> {
        let seq = input_ids.dim(1)?;
        let positions = Tensor::arange(past as u32, (past + seq) as u32, input_ids.device())?;
        let embeds = self
            .word_embeddings
            .forward(input_ids)?
            .broadcast_add(&self.position_embeddings.forward(&positions)?)?;
        self.layer_norm.forward(&embeds)
    }
}

/// `BlipTextAttention` (a layer's `attention` or `crossattention`): a BERT
/// attention block with its projections under `self`; `kv_dim` is the width
/// keys and values are computed from (the text's, or the image's).
fn text_attention(cfg: &TextConfig, kv_dim: usize, vb: VarBuilder) -> Result<BertAttention> {
    let shape = BertAttentionShape {
        hidden_size: cfg.hidden_size,
        kv_dim,
        num_heads: cfg.num_attention_heads(),
        layer_norm_eps: cfg.layer_norm_eps,
    };
    BertAttention::new(shape, "self", &cfg.linear, vb)
}

/// `BlipTextLayer` of the decoder: causal self-attention, cross-attention to the
/// image, feed-forward (`intermediate` + `output`).
#[derive(Debug, Clone)]
struct TextLayer {
    attention: BertAttention,
    crossattention: BertAttention,
    intermediate: Linear,
    act: Activation,
    output_dense: Linear,
    output_layer_norm: LayerNorm,
}

impl TextLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            attention: text_attention(cfg, d, vb.pp("attention"))?,
            crossattention: text_attention(
                cfg,
                cfg.encoder_hidden_size(),
                vb.pp("crossattention"),
            )?,
            intermediate: linear(
                d,
                cfg.intermediate_size,
                &cfg.linear,
                vb.pp("intermediate.dense"),
            )?,
            act: Activation::from_config_name(&cfg.hidden_act)?,
            output_dense: linear(cfg.intermediate_size, d, &cfg.linear, vb.pp("output.dense"))?,
            output_layer_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
        })
    }

    fn forward(
        &self,
        hidden: &Tensor,
        self_cache: &mut KvCache,
        causal: Option<&Tensor>,
        image_kv: &(Tensor, Tensor),
        image_index: &[u32],
    ) -> Result<Tensor> {
        let (k, v) = self.attention.key_value(hidden)?;
        let (k, v) = self_cache.append(&k, &v)?;
        let hidden = self.attention.attend(hidden, &k, &v, causal)?;
        let hidden =
            self.crossattention
                .attend_shared(&hidden, &image_kv.0, &image_kv.1, image_index)?;
        let ff = self
            .output_dense
            .forward(&self.act.forward(&self.intermediate.forward(&hidden)?)?)?;
        self.output_layer_norm.forward(&residual_add(&ff, &hidden)?)
    }
}

/// `BlipTextLMPredictionHead`: transform (dense, activation, LayerNorm), then the
/// vocabulary projection, tied to the word embeddings when the checkpoint omits it.
#[derive(Debug, Clone)]
struct LmPredictionHead {
    transform_dense: Linear,
    transform_act: Activation,
    transform_layer_norm: LayerNorm,
    decoder: Linear,
}

impl LmPredictionHead {
    /// `decoder`: the output projection, built by [`Self::decoder`] or the
    /// one a pack-cached word-embedding table is read out of.
    fn new(cfg: &TextConfig, vb: VarBuilder, decoder: Linear) -> anyhow::Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            transform_dense: linear(d, d, &cfg.linear, vb.pp("transform.dense"))?,
            transform_act: Activation::from_config_name(&cfg.hidden_act)?,
            transform_layer_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("transform.LayerNorm"))?,
            decoder,
        })
    }

    /// The output projection: its own weight where the checkpoint has one,
    /// else tied to the word-embedding table (`word_embeddings`, read from
    /// `table_vb`).
    fn decoder(
        cfg: &TextConfig,
        vb: &VarBuilder,
        word_embeddings: &TokenEmbedding,
        table_vb: &VarBuilder,
    ) -> anyhow::Result<Linear> {
        let d = cfg.hidden_size;
        // Checkpoints saved by transformers 5 drop tied tensors: the decoder weight
        // is the word embedding matrix, and its bias lives at `predictions.bias`.
        let bias = || {
            if vb.contains_tensor("decoder.bias") {
                vb.get(cfg.vocab_size, "decoder.bias")
            } else {
                vb.get(cfg.vocab_size, "bias")
            }
        };
        if vb.contains_tensor("decoder.weight") {
            let read = || {
                Ok((
                    vb.get((cfg.vocab_size, d), "decoder.weight")?,
                    Some(bias()?),
                ))
            };
            return Ok(cfg
                .linear
                .layer(&vb.pp("decoder"), d, cfg.vocab_size, read)?);
        }
        Ok(word_embeddings.tied_head(&cfg.linear, table_vb, || Ok(Some(bias()?)))?)
    }

    fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let hidden = self
            .transform_act
            .forward(&self.transform_dense.forward(hidden)?)?;
        self.decoder
            .forward(&self.transform_layer_norm.forward(&hidden)?)
    }
}

/// `BlipTextLMHeadModel`: the captioning text decoder.
#[derive(Debug, Clone)]
pub struct TextDecoder {
    embeddings: TextEmbeddings,
    layers: Vec<TextLayer>,
    head: LmPredictionHead,
    max_position_embeddings: usize,
    device: Device,
}

impl TextDecoder {
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let bert = vb.pp("bert");
        let mut embeddings = TextEmbeddings::new(cfg, bert.pp("embeddings"))?;
        // The head before the layers: packing a tied table holds it twice
        // for a moment (94 MB for BLIP-base), which then costs peak memory
        // only while little else is loaded; the freed copy's memory goes to
        // the layers loaded next.
        let predictions = vb.pp("cls.predictions");
        let decoder = LmPredictionHead::decoder(
            cfg,
            &predictions,
            &embeddings.word_embeddings,
            &bert.pp("embeddings.word_embeddings"),
        )?;
        if !predictions.contains_tensor("decoder.weight") {
            // One copy of the table, shared with the (packed) head.
            embeddings.word_embeddings = embeddings.word_embeddings.tied_to(&decoder);
        }
        let head = LmPredictionHead::new(cfg, predictions, decoder)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| TextLayer::new(cfg, bert.pp("encoder.layer").pp(i)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            head,
            max_position_embeddings: cfg.max_position_embeddings,
            device: vb.device().clone(),
        })
    }

    /// Cross-attention keys and values for each layer, from the states the
    /// decoder reads (`[batch, tokens, encoder_hidden]`: the image for
    /// captioning, the encoded question for VQA): computed once, reused at
    /// every step.
    pub fn cross_key_values(&self, states: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        cross_key_values(&self.layers, states)
    }

    /// One decoding step: `input_ids [batch, seq]` continue the sequences held in
    /// `state`; returns the logits of the last position, `[batch, vocab]`, in
    /// the model's dtype.
    pub fn forward(&self, input_ids: &Tensor, state: &mut DecoderState) -> Result<Tensor> {
        let past = state.seq_len();
        let seq = input_ids.dim(1)?;
        if past + seq > self.max_position_embeddings {
            candle_core::bail!(
                "the text decoder has {} positions; the sequence would need {}",
                self.max_position_embeddings,
                past + seq
            );
        }
        let mut hidden = self.embeddings.forward(input_ids, past)?;
        let causal = (seq > 1)
            .then(|| causal_mask(seq, past, hidden.dtype(), hidden.device()))
            .transpose()?;
        let DecoderState {
            self_attention,
            image_kv,
            image_index,
        } = state;
        for ((layer, cache), image_kv) in self
            .layers
            .iter()
            .zip(self_attention.iter_mut())
            .zip(image_kv.iter())
        {
            hidden = layer.forward(&hidden, cache, causal.as_ref(), image_kv, image_index)?;
        }
        // Only the last position's logits are ever used in generation.
        let logits = self.head.forward(&last_position(&hidden)?)?;
        logits.squeeze(1)
    }

    pub fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }
}

/// Everything the decoder carries between steps for a batch of sequences.
#[derive(Debug, Clone)]
pub struct DecoderState {
    self_attention: Vec<KvCache>,
    /// Per layer, the cross-attention keys and values of each image (or
    /// question), computed once: `[images, heads, tokens, head_dim]`.
    image_kv: Vec<(Tensor, Tensor)>,
    /// Which image each sequence reads. Beams and finished sequences move
    /// rows around; the images' keys and values stay where they are.
    image_index: Vec<u32>,
}

impl DecoderState {
    pub fn new(image_kv: Vec<(Tensor, Tensor)>) -> Self {
        let images = image_kv.first().map_or(0, |(k, _)| k.dim(0).unwrap_or(0));
        Self {
            self_attention: vec![KvCache::default(); image_kv.len()],
            image_kv,
            image_index: (0..images as u32).collect(),
        }
    }

    pub fn seq_len(&self) -> usize {
        self.self_attention.first().map_or(0, KvCache::seq_len)
    }

    /// Keeps (and reorders) the batch rows named by `rows`: the text caches
    /// are gathered, the image each row reads is re-pointed.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        if rows.iter().any(|&r| r as usize >= self.image_index.len()) {
            candle_core::bail!(
                "select_rows: a row past the {} in the batch",
                self.image_index.len()
            );
        }
        if let Some(device) = self.image_kv.first().map(|(k, _)| k.device().clone()) {
            let rows = Tensor::new(rows, &device)?;
            for cache in &mut self.self_attention {
                cache.select_rows(&rows)?;
            }
        }
        self.image_index = rows.iter().map(|&r| self.image_index[r as usize]).collect();
        Ok(())
    }
}

fn cross_key_values(layers: &[TextLayer], states: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
    layers
        .iter()
        .map(|layer| layer.crossattention.key_value(states))
        .collect()
}

// ---------------------------------------------------------------------------
// Question encoder (BlipTextModel without pooler, as used by VQA)
// ---------------------------------------------------------------------------

/// `BlipTextModel(add_pooling_layer=False)` run as an encoder: bidirectional
/// self-attention over the question, cross-attention to the image.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    embeddings: TextEmbeddings,
    layers: Vec<TextLayer>,
    max_position_embeddings: usize,
}

impl TextEncoder {
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let embeddings = TextEmbeddings::new(cfg, vb.pp("embeddings"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| TextLayer::new(cfg, vb.pp("encoder.layer").pp(i)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            max_position_embeddings: cfg.max_position_embeddings,
        })
    }

    /// `input_ids [batch, seq]` (unpadded: every row a whole question of the
    /// same length) read against `image_embeds [batch, tokens, hidden]`;
    /// returns `[batch, seq, hidden]`.
    pub fn forward(&self, input_ids: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let seq = input_ids.dim(1)?;
        if seq > self.max_position_embeddings {
            candle_core::bail!(
                "the question is {seq} tokens; the text encoder has {} positions",
                self.max_position_embeddings
            );
        }
        let mut hidden = self.embeddings.forward(input_ids, 0)?;
        let rows: Vec<u32> = (0..input_ids.dim(0)? as u32).collect();
        for (layer, image_kv) in self
            .layers
            .iter()
            .zip(cross_key_values(&self.layers, image_embeds)?)
        {
            // No mask: bidirectional, and no padding to hide.
            hidden = layer.forward(&hidden, &mut KvCache::default(), None, &image_kv, &rows)?;
        }
        Ok(hidden)
    }

    pub fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }
}

// ---------------------------------------------------------------------------
// Visual question answering (BlipForQuestionAnswering)
// ---------------------------------------------------------------------------

/// `BlipForQuestionAnswering`: the image is encoded, the question read against
/// it by the text encoder, and the answer generated by a text decoder that
/// cross-attends to the encoded question.
#[derive(Debug, Clone)]
pub struct BlipForQuestionAnswering {
    pub vision_model: VisionModel,
    pub text_encoder: TextEncoder,
    pub text_decoder: TextDecoder,
    pub config: BlipConfig,
}

impl BlipForQuestionAnswering {
    pub fn new(config: BlipConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let text = &config.text_config;
        // The answer decoder cross-attends to the encoded question, which is
        // text-wide. transformers sizes those layers by encoder_hidden_size (the
        // vision width), which only works when the two widths agree. We size
        // them by what the decoder reads, which equals transformers wherever
        // transformers runs; a checkpoint with other widths fails to load with
        // the tensor named. (Whether Salesforce's ViT-L VQA checkpoint loads in
        // transformers could not be checked offline.)
        let decoder_config = TextConfig {
            encoder_hidden_size: Some(text.hidden_size),
            ..text.clone()
        };
        let vision_model = VisionModel::new(&config.vision_config, vb.pp("vision_model"))
            .context("loading vision_model")?;
        let text_encoder =
            TextEncoder::new(text, vb.pp("text_encoder")).context("loading text_encoder")?;
        let text_decoder = TextDecoder::new(&decoder_config, vb.pp("text_decoder"))
            .context("loading text_decoder")?;
        Ok(Self {
            vision_model,
            text_encoder,
            text_decoder,
            config,
        })
    }

    /// `[batch, seq, hidden]`: each row's question read against its image.
    pub fn question_embeds(&self, input_ids: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        self.text_encoder.forward(input_ids, image_embeds)
    }

    /// A fresh answer-decoding state for encoded questions.
    pub fn decoder_state(&self, question_embeds: &Tensor) -> Result<DecoderState> {
        Ok(DecoderState::new(
            self.text_decoder.cross_key_values(question_embeds)?,
        ))
    }
}

// ---------------------------------------------------------------------------
// The captioning model (BlipForConditionalGeneration)
// ---------------------------------------------------------------------------

/// `BlipForConditionalGeneration`: the image captioning model.
#[derive(Debug, Clone)]
pub struct BlipForConditionalGeneration {
    pub vision_model: VisionModel,
    pub text_decoder: TextDecoder,
    pub config: BlipConfig,
}

impl BlipForConditionalGeneration {
    pub fn new(config: BlipConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let vision_model = VisionModel::new(&config.vision_config, vb.pp("vision_model"))
            .context("loading vision_model")?;
        let text_decoder = TextDecoder::new(&config.text_config, vb.pp("text_decoder"))
            .context("loading text_decoder")?;
        Ok(Self {
            vision_model,
            text_decoder,
            config,
        })
    }

    /// `pixel_values [batch, 3, H, W]` -> `image_embeds [batch, tokens, hidden]`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision_model.forward(pixel_values)
    }

    /// A fresh decoding state for a batch of images, `image_embeds [batch, ..]`.
    pub fn decoder_state(&self, image_embeds: &Tensor) -> Result<DecoderState> {
        Ok(DecoderState::new(
            self.text_decoder.cross_key_values(image_embeds)?,
        ))
    }

    pub fn device(&self) -> &Device {
        self.text_decoder.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    const MINIMAL: &str = r#"{
        "text_config": {"hidden_size": 768, "vocab_size": 30524},
        "vision_config": {"hidden_size": 1024, "num_attention_heads": 16}
    }"#;

    #[test]
    fn missing_text_heads_are_filled_from_bert_head_width_and_reported() {
        let cfg = BlipConfig::from_json(MINIMAL).unwrap();
        assert_eq!(cfg.text_config.num_attention_heads(), 12);
        assert_eq!(cfg.filled_gaps.len(), 1);
        assert!(cfg.filled_gaps[0].contains("num_attention_heads"));
    }

    #[test]
    fn encoder_hidden_size_follows_the_vision_width() {
        let cfg = BlipConfig::from_json(MINIMAL).unwrap();
        assert_eq!(cfg.text_config.encoder_hidden_size(), 1024);
    }

    #[test]
    fn explicit_heads_are_kept() {
        let json = MINIMAL.replace(
            r#""hidden_size": 768,"#,
            r#""hidden_size": 768, "num_attention_heads": 8,"#,
        );
        let cfg = BlipConfig::from_json(&json).unwrap();
        assert_eq!(cfg.text_config.num_attention_heads(), 8);
        assert!(cfg.filled_gaps.is_empty());
    }

    #[test]
    fn inconsistent_sizes_are_rejected() {
        let json = MINIMAL.replace(
            r#""num_attention_heads": 16"#,
            r#""num_attention_heads": 7"#,
        );
        assert!(BlipConfig::from_json(&json).is_err());
    }

    #[test]
    fn causal_mask_lets_each_query_see_the_past_and_itself() {
        let mask = causal_mask(2, 3, DType::F32, &Device::Cpu).unwrap();
        let rows: Vec<Vec<f32>> = mask.to_vec2().unwrap();
        assert_eq!(rows[0], [0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(rows[1], [0.0; 5]);
    }
}
