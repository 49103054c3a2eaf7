//! OPT: Open Pre-trained Transformer language models (Zhang et al., 2022,
//! arXiv:2205.01068), the frozen language model of BLIP-2 OPT.
//!
//! Mirrors transformers 5's `modeling_opt.py` (`OPTForCausalLM`): learned
//! positions offset by 2, pre- (or post-) layernorm blocks, a ReLU MLP, a
//! final layer norm and an LM head tied to the token embeddings unless the
//! config unties them. Tensor paths follow the checkpoint:
//! `model.decoder.layers.3.self_attn.q_proj` is `model` → `decoder` →
//! `layers[3]` → `self_attn.q_proj`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::nn::{
    causal_mask, last_position, merge_heads, residual_add, scaled_dot_product_attention,
    split_heads, Activation, KvCache, LayerCaches, LayerNorm, Linear, LinearOptions, SdpaParams,
    TokenEmbedding,
};

/// `OPTConfig`; defaults are transformers' for keys a checkpoint omits.
#[derive(Debug, Clone, Deserialize)]
pub struct OptConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::ffn_dim")]
    pub ffn_dim: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::yes")]
    pub do_layer_norm_before: bool,
    /// Only checkpoints fine-tuned before transformers 4.20.1 set this.
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// Defaults to `hidden_size`; OPT-350m's 512 (with projections in and
    /// out) is the one checkpoint that differs.
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "defaults::activation_function")]
    pub activation_function: String,
    #[serde(default = "defaults::yes")]
    pub enable_bias: bool,
    #[serde(default = "defaults::yes")]
    pub layer_norm_elementwise_affine: bool,
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "defaults::bos_token_id")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "defaults::pad_token_id")]
    pub pad_token_id: Option<u32>,
    /// One id or several. BLIP-2's OPT configs set it to the id of "\n" (the
    /// conversion script's choice, after LAVIS), so answers stop at a newline.
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: Option<TokenIds>,
    /// How linear weights are held in memory (`--quantize`, the pack
    /// cache); not read from config.json, set by the loader.
    #[serde(skip)]
    pub linear: LinearOptions,
}

/// A config field that holds one token id or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

mod defaults {
    use super::TokenIds;

    pub fn vocab_size() -> usize {
        50272
    }
    pub fn hidden_size() -> usize {
        768
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn ffn_dim() -> usize {
        3072
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
    pub fn yes() -> bool {
        true
    }
    pub fn activation_function() -> String {
        "relu".into()
    }
    pub fn bos_token_id() -> Option<u32> {
        Some(2)
    }
    pub fn pad_token_id() -> Option<u32> {
        Some(1)
    }
    pub fn eos_token_id() -> Option<TokenIds> {
        Some(TokenIds::One(2))
    }
}

/// transformers' `OPTLearnedPositionalEmbedding` skips the first two rows of
/// its table (a fairseq left-over): position p reads row p + 2.
const POSITION_OFFSET: usize = 2;

/// `nn.LayerNorm(dim)` as OPT builds it: torch's default epsilon, and no
/// parameters when `layer_norm_elementwise_affine` is false.
fn opt_layer_norm(cfg: &OptConfig, vb: VarBuilder) -> Result<LayerNorm> {
    const TORCH_DEFAULT_EPS: f64 = 1e-5;
    let d = cfg.hidden_size;
    if cfg.layer_norm_elementwise_affine {
        crate::nn::layer_norm(d, TORCH_DEFAULT_EPS, vb)
    } else {
        let ones = Tensor::ones(d, vb.dtype(), vb.device())?;
        let zeros = Tensor::zeros(d, vb.dtype(), vb.device())?;
        Ok(LayerNorm::from_parts(ones, zeros, TORCH_DEFAULT_EPS))
    }
}

/// `nn.Linear(in, out, bias=enable_bias)`.
fn opt_linear(cfg: &OptConfig, in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    if cfg.enable_bias {
        crate::nn::linear(in_dim, out_dim, &cfg.linear, vb)
    } else {
        crate::nn::linear_no_bias(in_dim, out_dim, &cfg.linear, vb)
    }
}

/// `OPTAttention`: causal multi-head self-attention.
#[derive(Debug, Clone)]
struct OptAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    scaling: f64,
}

impl OptAttention {
    fn new(cfg: &OptConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: opt_linear(cfg, d, d, vb.pp("q_proj"))?,
            k_proj: opt_linear(cfg, d, d, vb.pp("k_proj"))?,
            v_proj: opt_linear(cfg, d, d, vb.pp("v_proj"))?,
            out_proj: opt_linear(cfg, d, d, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            scaling: ((d / cfg.num_attention_heads) as f64).powf(-0.5),
        })
    }

    fn forward(
        &self,
        hidden: &Tensor,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        // transformers scales the queries before the product (not the scores),
        // "to follow the original implementation"; the order changes rounding.
        let q = split_heads(
            &(self.q_proj.forward(hidden)? * self.scaling)?,
            self.num_heads,
        )?;
        let k = split_heads(&self.k_proj.forward(hidden)?, self.num_heads)?;
        let v = split_heads(&self.v_proj.forward(hidden)?, self.num_heads)?;
        let (k, v) = cache.append(&k, &v)?;
        let params = SdpaParams {
            mask,
            ..SdpaParams::scaled(1.0)
        };
        let context = scaled_dot_product_attention(&q, &k, &v, &params)?;
        self.out_proj.forward(&merge_heads(&context)?)
    }
}

/// `OPTDecoderLayer`.
#[derive(Debug, Clone)]
struct OptDecoderLayer {
    self_attn: OptAttention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    activation: Activation,
    do_layer_norm_before: bool,
}

impl OptDecoderLayer {
    fn new(cfg: &OptConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        Ok(Self {
            self_attn: OptAttention::new(cfg, vb.pp("self_attn"))?,
            self_attn_layer_norm: opt_layer_norm(cfg, vb.pp("self_attn_layer_norm"))?,
            fc1: opt_linear(cfg, cfg.hidden_size, cfg.ffn_dim, vb.pp("fc1"))?,
            fc2: opt_linear(cfg, cfg.ffn_dim, cfg.hidden_size, vb.pp("fc2"))?,
            final_layer_norm: opt_layer_norm(cfg, vb.pp("final_layer_norm"))?,
            activation: Activation::from_config_name(&cfg.activation_function)?,
            do_layer_norm_before: cfg.do_layer_norm_before,
        })
    }

    fn forward(
        &self,
        hidden: &Tensor,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        // Every OPT but 350m normalises before each block; 350m after.
        let pre = |norm: &LayerNorm, xs: &Tensor| -> Result<Tensor> {
            if self.do_layer_norm_before {
                norm.forward(xs)
            } else {
                Ok(xs.clone())
            }
        };
        let post = |norm: &LayerNorm, xs: Tensor| -> Result<Tensor> {
            if self.do_layer_norm_before {
                Ok(xs)
            } else {
                norm.forward(&xs)
            }
        };
        let attended =
            self.self_attn
                .forward(&pre(&self.self_attn_layer_norm, hidden)?, cache, mask)?;
        let hidden = post(&self.self_attn_layer_norm, residual_add(hidden, &attended)?)?;
        let ff = pre(&self.final_layer_norm, &hidden)?;
        let ff = self
            .fc2
            .forward(&self.activation.forward(&self.fc1.forward(&ff)?)?)?;
        post(&self.final_layer_norm, residual_add(&hidden, &ff)?)
    }
}

/// The self-attention keys and values of every layer, for a batch of sequences.
pub type OptCache = LayerCaches;

/// `OPTForCausalLM`: `model.decoder` and `lm_head`.
#[derive(Debug, Clone)]
pub struct OptForCausalLM {
    embed_tokens: TokenEmbedding,
    /// `[max_position_embeddings + 2, hidden]`.
    embed_positions: Tensor,
    layers: Vec<OptDecoderLayer>,
    final_layer_norm: Option<LayerNorm>,
    lm_head: Linear,
    max_position_embeddings: usize,
}

impl OptForCausalLM {
    pub fn new(cfg: &OptConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let d = cfg.hidden_size;
        anyhow::ensure!(
            cfg.num_attention_heads > 0 && d.is_multiple_of(cfg.num_attention_heads),
            "OPT hidden_size {d} is not a multiple of num_attention_heads {}",
            cfg.num_attention_heads
        );
        if let Some(proj) = cfg.word_embed_proj_dim {
            anyhow::ensure!(
                proj == d,
                "OPT word_embed_proj_dim {proj} differs from hidden_size {d} (the OPT-350m layout, \
                 with projections in and out): not supported"
            );
        }
        let decoder = vb.pp("model.decoder");
        let embed_tokens =
            TokenEmbedding::new(cfg.vocab_size, d, &cfg.linear, decoder.pp("embed_tokens"))?;
        let embed_positions = decoder.get(
            (cfg.max_position_embeddings + POSITION_OFFSET, d),
            "embed_positions.weight",
        )?;
        // transformers ties the head to the embeddings whenever the config says
        // so, ignoring any `lm_head.weight` in the file (they are equal in every
        // published checkpoint); an untied config must carry its own head.
        // The head before the layers: packing a tied table holds it twice for
        // a moment (515 MB for OPT-2.7b), which costs peak memory only while
        // little else is loaded.
        let (embed_tokens, lm_head) = if cfg.tie_word_embeddings {
            let lm_head =
                embed_tokens.tied_head(&cfg.linear, &decoder.pp("embed_tokens"), || Ok(None))?;
            // One copy of the table, shared with the (packed) head.
            (embed_tokens.tied_to(&lm_head), lm_head)
        } else {
            let lm_head = vb.pp("lm_head");
            let read = || Ok((lm_head.get((cfg.vocab_size, d), "weight")?, None));
            (
                embed_tokens,
                cfg.linear.layer(&lm_head, d, cfg.vocab_size, read)?,
            )
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| OptDecoderLayer::new(cfg, decoder.pp("layers").pp(i)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let final_layer_norm = (cfg.do_layer_norm_before && !cfg.remove_final_layer_norm)
            .then(|| opt_layer_norm(cfg, decoder.pp("final_layer_norm")))
            .transpose()?;
        Ok(Self {
            embed_tokens,
            embed_positions,
            layers,
            final_layer_norm,
            lm_head,
            max_position_embeddings: cfg.max_position_embeddings,
        })
    }

    /// An empty cache for a new batch of sequences.
    pub fn new_cache(&self) -> OptCache {
        LayerCaches::new(self.layers.len())
    }

    /// `input_ids [batch, seq]` -> `[batch, seq, hidden]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(input_ids)
    }

    /// Runs `inputs_embeds [batch, seq, hidden]` after the positions held in
    /// `cache` and returns the logits of the last position, `[batch, vocab]`.
    ///
    /// Sequences are never padded, so transformers' positions (the attention
    /// mask's cumulative sum minus one) are simply `past..past + seq`.
    pub fn forward_embeds(&self, inputs_embeds: &Tensor, cache: &mut OptCache) -> Result<Tensor> {
        let (_, seq, _) = inputs_embeds.dims3()?;
        let past = cache.seq_len();
        if past + seq > self.max_position_embeddings {
            candle_core::bail!(
                "the language model has {} positions; the sequence would need {}",
                self.max_position_embeddings,
                past + seq
            );
        }
        let positions = self
            .embed_positions
            .narrow(0, past + POSITION_OFFSET, seq)?;
        let mut hidden = inputs_embeds.broadcast_add(&positions)?;
        let mask = (seq > 1)
            .then(|| causal_mask(seq, past, hidden.dtype(), hidden.device()))
            .transpose()?;
        for (layer, layer_cache) in self.layers.iter().zip(cache.iter_mut()) {
            hidden = layer.forward(&hidden, layer_cache, mask.as_ref())?;
        }
        // Only the last position's logits are ever used in generation.
        let mut last = last_position(&hidden)?;
        if let Some(norm) = &self.final_layer_norm {
            last = norm.forward(&last)?;
        }
        self.lm_head.forward(&last)?.squeeze(1)
    }

    pub fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    pub fn dtype(&self) -> DType {
        self.embed_positions.dtype()
    }
}
