//! Llama (Touvron et al., 2023, arXiv:2302.13971, and its successors), the
//! language model of LLaVA.
//!
//! Mirrors transformers 5's `modeling_llama.py` (`LlamaForCausalLM`): token
//! embeddings, pre-norm blocks of grouped-query self-attention with rotary
//! positions and a SwiGLU MLP, RMSNorm, an LM head. Tensor paths follow the
//! checkpoint: `model.layers.3.self_attn.q_proj` is `model` → `layers[3]` →
//! `self_attn.q_proj`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::opt::TokenIds;
use crate::nn::{
    causal_mask, last_position, merge_heads, residual_add, rms_norm, scaled_dot_product_attention,
    split_heads, Activation, KvCache, LayerCaches, Linear, LinearOptions, RmsNorm, RopeScaling,
    RotaryEmbedding, SdpaParams, TokenEmbedding,
};

/// `LlamaConfig`; defaults are transformers' for keys a checkpoint omits
/// (those of Llama-2-7b, whose shapes llava-1.5-7b's Vicuna has).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Grouped-query attention: this many key/value heads, each shared by
    /// `num_attention_heads / num_key_value_heads` query heads; absent: one
    /// per query head.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Absent: `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "defaults::bos_token_id")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// transformers 5's form: `{"rope_type": ..., "rope_theta": ..., ...}`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// The form of checkpoints written before transformers 5.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// How linear weights are held in memory (`--quantize`, the pack
    /// cache); not read from config.json, set by the loader.
    #[serde(skip)]
    pub linear: LinearOptions,
}

mod defaults {
    use super::TokenIds;

    pub fn vocab_size() -> usize {
        32000
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        11008
    }
    pub fn num_hidden_layers() -> usize {
        32
    }
    pub fn num_attention_heads() -> usize {
        32
    }
    pub fn hidden_act() -> String {
        "silu".into()
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn bos_token_id() -> Option<u32> {
        Some(1)
    }
    pub fn eos_token_id() -> Option<TokenIds> {
        Some(TokenIds::One(2))
    }
}

/// transformers' default `rope_theta`.
const DEFAULT_ROPE_THETA: f64 = 10000.0;

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Refuses shapes the layers cannot be built with, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        let heads = self.num_attention_heads;
        anyhow::ensure!(heads > 0, "Llama num_attention_heads must be at least 1");
        anyhow::ensure!(
            self.head_dim.is_some() || self.hidden_size.is_multiple_of(heads),
            "Llama hidden_size {} is not a multiple of num_attention_heads {heads}",
            self.hidden_size
        );
        let kv = self.num_kv_heads();
        anyhow::ensure!(
            kv > 0 && heads.is_multiple_of(kv),
            "Llama num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        );
        anyhow::ensure!(
            self.head_dim() > 0 && self.head_dim().is_multiple_of(2),
            "Llama head_dim {} must be even for rotary positions",
            self.head_dim()
        );
        anyhow::ensure!(
            self.max_position_embeddings > 0,
            "Llama max_position_embeddings must be at least 1"
        );
        self.rope()?;
        Activation::from_config_name(&self.hidden_act)?;
        Ok(())
    }

    /// `rope_theta` and the scaling, from either form of the config.
    pub fn rope(&self) -> anyhow::Result<(f64, RopeScaling)> {
        let (theta, params) = match &self.rope_parameters {
            Some(params) => (
                params.get("rope_theta").and_then(serde_json::Value::as_f64),
                Some(params),
            ),
            None => (self.rope_theta, self.rope_scaling.as_ref()),
        };
        let theta = theta.unwrap_or(DEFAULT_ROPE_THETA);
        anyhow::ensure!(
            theta.is_finite() && theta > 1.0,
            "Llama rope_theta {theta} must be a number above 1"
        );
        let Some(params) = params.filter(|p| !p.is_null()) else {
            return Ok((theta, RopeScaling::None));
        };
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("default");
        let number = |key: &str| -> anyhow::Result<f64> {
            let value = params
                .get(key)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| anyhow::anyhow!("rope scaling `{kind}` needs a number `{key}`"))?;
            anyhow::ensure!(
                value.is_finite() && value > 0.0,
                "rope scaling `{kind}`: `{key}` {value} must be positive"
            );
            Ok(value)
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: number("factor")?,
            },
            "llama3" => {
                let scaling = RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: number("low_freq_factor")?,
                    high_freq_factor: number("high_freq_factor")?,
                    original_max_position_embeddings: number("original_max_position_embeddings")?,
                };
                if let RopeScaling::Llama3 {
                    low_freq_factor,
                    high_freq_factor,
                    ..
                } = scaling
                {
                    anyhow::ensure!(
                        high_freq_factor > low_freq_factor,
                        "rope scaling `llama3`: high_freq_factor must be above low_freq_factor"
                    );
                }
                scaling
            }
            other => anyhow::bail!(
                "rope scaling `{other}` is not supported (default, linear and llama3 are)"
            ),
        };
        Ok((theta, scaling))
    }
}

/// `nn.Linear(in, out, bias)`.
fn llama_linear(
    cfg: &LlamaConfig,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Linear> {
    if bias {
        crate::nn::linear(in_dim, out_dim, &cfg.linear, vb)
    } else {
        crate::nn::linear_no_bias(in_dim, out_dim, &cfg.linear, vb)
    }
}

/// `LlamaAttention`: causal self-attention, rotary positions on queries and
/// keys, `num_key_value_heads` key/value heads shared by groups of query
/// heads. The cache holds the key/value heads only.
#[derive(Debug, Clone)]
struct LlamaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl LlamaAttention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: llama_linear(cfg, d, heads * hd, bias, vb.pp("q_proj"))?,
            k_proj: llama_linear(cfg, d, kv * hd, bias, vb.pp("k_proj"))?,
            v_proj: llama_linear(cfg, d, kv * hd, bias, vb.pp("v_proj"))?,
            o_proj: llama_linear(cfg, heads * hd, d, bias, vb.pp("o_proj"))?,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        hidden: &Tensor,
        rotary: &RotaryEmbedding,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let offset = cache.seq_len();
        let q = split_heads(&self.q_proj.forward(hidden)?, self.num_heads)?;
        let k = split_heads(&self.k_proj.forward(hidden)?, self.num_kv_heads)?;
        let v = split_heads(&self.v_proj.forward(hidden)?, self.num_kv_heads)?;
        let q = rotary.apply(&q, offset)?;
        let k = rotary.apply(&k, offset)?;
        let (k, v) = cache.append(&k, &v)?;
        let groups = self.num_heads / self.num_kv_heads;
        let (k, v) = (repeat_kv(&k, groups)?, repeat_kv(&v, groups)?);
        let params = SdpaParams {
            mask,
            ..SdpaParams::scaled((self.head_dim as f64).powf(-0.5))
        };
        let context = scaled_dot_product_attention(&q, &k, &v, &params)?;
        self.o_proj.forward(&merge_heads(&context)?)
    }
}

/// transformers' `repeat_kv`: `[b, kv_heads, t, d]` -> `[b, kv_heads ·
/// groups, t, d]`, key/value head j serving query heads j·groups ..
/// (j+1)·groups.
fn repeat_kv(xs: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(xs.clone());
    }
    let (b, kv, t, d) = xs.dims4()?;
    xs.unsqueeze(2)?
        .expand((b, kv, groups, t, d))?
        .reshape((b, kv * groups, t, d))
}

/// `LlamaMLP`: `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone)]
struct LlamaMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl LlamaMlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let (d, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: llama_linear(cfg, d, i, bias, vb.pp("gate_proj"))?,
            up_proj: llama_linear(cfg, d, i, bias, vb.pp("up_proj"))?,
            down_proj: llama_linear(cfg, i, d, bias, vb.pp("down_proj"))?,
            act: Activation::from_config_name(&cfg.hidden_act)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = self.act.forward(&self.gate_proj.forward(xs)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
    }
}

/// `LlamaDecoderLayer`: pre-norm attention and MLP, each added back.
#[derive(Debug, Clone)]
struct LlamaDecoderLayer {
    self_attn: LlamaAttention,
    mlp: LlamaMlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl LlamaDecoderLayer {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            self_attn: LlamaAttention::new(cfg, vb.pp("self_attn"))?,
            mlp: LlamaMlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: rms_norm(d, eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: rms_norm(d, eps, vb.pp("post_attention_layernorm"))?,
        })
    }

    fn forward(
        &self,
        hidden: &Tensor,
        rotary: &RotaryEmbedding,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let attended =
            self.self_attn
                .forward(&self.input_layernorm.forward(hidden)?, rotary, cache, mask)?;
        let hidden = residual_add(hidden, &attended)?;
        let ff = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&hidden)?)?;
        residual_add(&hidden, &ff)
    }
}

/// The self-attention keys and values of every layer, for a batch of sequences.
pub type LlamaCache = LayerCaches;

/// `LlamaForCausalLM`: `model` (embeddings, layers, final norm) and `lm_head`.
#[derive(Debug, Clone)]
pub struct LlamaForCausalLM {
    embed_tokens: TokenEmbedding,
    layers: Vec<LlamaDecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    max_position_embeddings: usize,
    dtype: DType,
}

impl LlamaForCausalLM {
    /// `model` is the VarBuilder of the decoder (`model.*` in a
    /// `LlamaForCausalLM` checkpoint), `lm_head` that of the head.
    pub fn new(cfg: &LlamaConfig, model: VarBuilder, lm_head: VarBuilder) -> anyhow::Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let embed_tokens =
            TokenEmbedding::new(cfg.vocab_size, d, &cfg.linear, model.pp("embed_tokens"))?;
        // A tied head is read from the table (transformers ignores any
        // `lm_head.weight` then); an untied one from its own tensor.
        let (embed_tokens, lm_head) = if cfg.tie_word_embeddings {
            let head =
                embed_tokens.tied_head(&cfg.linear, &model.pp("embed_tokens"), || Ok(None))?;
            (embed_tokens.tied_to(&head), head)
        } else {
            let read = || Ok((lm_head.get((cfg.vocab_size, d), "weight")?, None));
            let head = cfg.linear.layer(&lm_head, d, cfg.vocab_size, read)?;
            (embed_tokens, head)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LlamaDecoderLayer::new(cfg, model.pp("layers").pp(i)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (theta, scaling) = cfg.rope()?;
        let rotary = RotaryEmbedding::new(
            cfg.head_dim(),
            theta,
            &scaling,
            cfg.max_position_embeddings,
            model.dtype(),
            model.device(),
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: rms_norm(d, cfg.rms_norm_eps, model.pp("norm"))?,
            lm_head,
            rotary,
            max_position_embeddings: cfg.max_position_embeddings,
            dtype: model.dtype(),
        })
    }

    /// An empty cache for a new batch of sequences.
    pub fn new_cache(&self) -> LlamaCache {
        LayerCaches::new(self.layers.len())
    }

    /// `input_ids [batch, seq]` -> `[batch, seq, hidden]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(input_ids)
    }

    /// Runs `inputs_embeds [batch, seq, hidden]` after the positions held in
    /// `cache` and returns the logits of the last position, `[batch, vocab]`.
    /// Sequences are never padded, so positions are `past..past + seq`.
    pub fn forward_embeds(&self, inputs_embeds: &Tensor, cache: &mut LlamaCache) -> Result<Tensor> {
        let (_, seq, _) = inputs_embeds.dims3()?;
        let past = cache.seq_len();
        if past + seq > self.max_position_embeddings {
            candle_core::bail!(
                "the language model has {} positions; the sequence would need {}",
                self.max_position_embeddings,
                past + seq
            );
        }
        let mut hidden = inputs_embeds.clone();
        let mask = (seq > 1)
            .then(|| causal_mask(seq, past, hidden.dtype(), hidden.device()))
            .transpose()?;
        for (layer, layer_cache) in self.layers.iter().zip(cache.iter_mut()) {
            hidden = layer.forward(&hidden, &self.rotary, layer_cache, mask.as_ref())?;
        }
        // Only the last position's logits are ever used in generation.
        let last = self.norm.forward(&last_position(&hidden)?)?;
        self.lm_head.forward(&last)?.squeeze(1)
    }

    pub fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> LlamaConfig {
        serde_json::from_str(json).unwrap()
    }

    /// The same rotary settings read from transformers 5's `rope_parameters`
    /// and from the older `rope_theta` / `rope_scaling`.
    #[test]
    fn rope_reads_both_config_forms() {
        let new = config(
            r#"{"rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}}"#,
        );
        let old = config(
            r#"{"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}"#,
        );
        assert_eq!(
            new.rope().unwrap(),
            (500000.0, RopeScaling::Linear { factor: 2.0 })
        );
        assert_eq!(old.rope().unwrap(), new.rope().unwrap());
        assert_eq!(config("{}").rope().unwrap(), (10000.0, RopeScaling::None));
        let null = config(r#"{"rope_scaling": null}"#);
        assert_eq!(null.rope().unwrap(), (10000.0, RopeScaling::None));
    }

    #[test]
    fn unsupported_rope_and_shapes_are_named() {
        let yarn = config(r#"{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#);
        let err = yarn.validate().unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");
        let no_factor = config(r#"{"rope_scaling": {"rope_type": "linear"}}"#);
        assert!(no_factor.rope().unwrap_err().to_string().contains("factor"));
        let gqa = config(r#"{"num_attention_heads": 32, "num_key_value_heads": 5}"#);
        let err = gqa.validate().unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads 5"), "{err}");
        let odd = config(r#"{"hidden_size": 36, "num_attention_heads": 4}"#);
        assert!(odd.validate().unwrap_err().to_string().contains("even"));
    }
}
