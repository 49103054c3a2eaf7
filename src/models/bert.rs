//! The BERT attention block that BLIP's text transformer
//! (`BlipTextAttention`, modeling_blip_text.py) and BLIP-2's Q-Former
//! (`Blip2QFormerAttention`, modeling_blip_2.py) both inherit from BERT:
//! query, key and value projections, scaled dot-product attention, then
//! the output block (dense, residual, LayerNorm). The two differ only in
//! where the checkpoint keeps the projections (`self.` against
//! `attention.`), which [`BertAttention::new`] is given.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{
    layer_norm, linear, merge_heads, residual_add, scaled_dot_product_attention, split_heads,
    LayerNorm, Linear, LinearOptions, SdpaParams,
};

/// The sizes of one attention block.
#[derive(Debug, Clone, Copy)]
pub struct BertAttentionShape {
    /// The width of the hidden states queries come from (and the output's).
    pub hidden_size: usize,
    /// The width keys and values are computed from: the hidden width for
    /// self-attention, the image's for cross-attention.
    pub kv_dim: usize,
    pub num_heads: usize,
    pub layer_norm_eps: f64,
}

/// `BertAttention`: `<projections>.{query,key,value}` and
/// `output.{dense,LayerNorm}`.
#[derive(Debug, Clone)]
pub struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output_dense: Linear,
    output_layer_norm: LayerNorm,
    num_heads: usize,
    scale: f64,
}

impl BertAttention {
    /// The block under `vb`, its projections under `vb.pp(projections)`
    /// (`"self"` in BLIP's text model, `"attention"` in the Q-Former).
    pub fn new(
        shape: BertAttentionShape,
        projections: &str,
        options: &LinearOptions,
        vb: VarBuilder,
    ) -> Result<Self> {
        let BertAttentionShape {
            hidden_size: d,
            kv_dim,
            num_heads,
            layer_norm_eps,
        } = shape;
        let qkv_vb = vb.pp(projections);
        Ok(Self {
            query: linear(d, d, options, qkv_vb.pp("query"))?,
            key: linear(kv_dim, d, options, qkv_vb.pp("key"))?,
            value: linear(kv_dim, d, options, qkv_vb.pp("value"))?,
            output_dense: linear(d, d, options, vb.pp("output.dense"))?,
            output_layer_norm: layer_norm(d, layer_norm_eps, vb.pp("output.LayerNorm"))?,
            num_heads,
            // transformers divides the scores by √head_size.
            scale: 1.0 / ((d / num_heads) as f64).sqrt(),
        })
    }

    /// Keys and values of `states`, split into heads.
    pub fn key_value(&self, states: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            split_heads(&self.key.forward(states)?, self.num_heads)?,
            split_heads(&self.value.forward(states)?, self.num_heads)?,
        ))
    }

    /// Attends from `hidden` to `states` (to `hidden` itself for
    /// self-attention), unmasked.
    pub fn forward(&self, hidden: &Tensor, states: &Tensor) -> Result<Tensor> {
        let (k, v) = self.key_value(states)?;
        self.attend(hidden, &k, &v, None)
    }

    /// Attends from `hidden` to `(k, v)` and applies the output block.
    pub fn attend(
        &self,
        hidden: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let q = split_heads(&self.query.forward(hidden)?, self.num_heads)?;
        let params = SdpaParams {
            mask,
            ..SdpaParams::scaled(self.scale)
        };
        let context = scaled_dot_product_attention(&q, k, v, &params)?;
        self.output(&context, hidden)
    }

    /// Cross-attention: row `r` of `hidden` reads row `kv_index[r]` of `(k,
    /// v)`, so the beams of one image share its keys and values.
    pub fn attend_shared(
        &self,
        hidden: &Tensor,
        k: &Tensor,
        v: &Tensor,
        kv_index: &[u32],
    ) -> Result<Tensor> {
        let q = split_heads(&self.query.forward(hidden)?, self.num_heads)?;
        let params = SdpaParams {
            kv_rows: Some(kv_index),
            ..SdpaParams::scaled(self.scale)
        };
        let context = scaled_dot_product_attention(&q, k, v, &params)?;
        self.output(&context, hidden)
    }

    /// `BertSelfOutput`: dense, residual, LayerNorm.
    fn output(&self, context: &Tensor, hidden: &Tensor) -> Result<Tensor> {
        let projected = self.output_dense.forward(&merge_heads(context)?)?;
        self.output_layer_norm
            .forward(&residual_add(&projected, hidden)?)
    }
}
