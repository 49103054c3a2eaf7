//! Model families, one file each, with the pieces they share.
//!
//! Every struct mirrors a transformers module and walks the checkpoint with
//! `vb.pp(..)` using the checkpoint's own tensor names, so a tensor in our code
//! can be found in the safetensors file by the same path.

pub mod blip;
pub mod blip2;
pub mod opt;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// The activations transformers' `ACT2FN` maps config names to, for the names
/// BLIP and BLIP-2 checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU (torch's default).
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: x * sigmoid(1.702 x).
    QuickGelu,
    Relu,
}

impl Activation {
    pub fn from_config_name(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            other => anyhow::bail!("unsupported activation `{other}` in config.json"),
        })
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Relu => xs.relu(),
        }
    }
}

/// `nn.Linear` with a bias, loaded from `<prefix>.weight` and `<prefix>.bias`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<candle_nn::Linear> {
    candle_nn::linear(in_dim, out_dim, vb)
}

/// `nn.LayerNorm` with the checkpoint's epsilon.
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get(dim, "weight")?,
        bias: vb.get(dim, "bias")?,
        eps,
    })
}

/// `nn.LayerNorm` over the last axis. candle's fused kernel covers f32 and the
/// half types; float64 (used to check our arithmetic against torch's exactly)
/// takes the composed path.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn from_parts(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.dtype() != DType::F64 && xs.is_contiguous() {
            return candle_nn::ops::layer_norm(xs, &self.weight, &self.bias, self.eps as f32);
        }
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// The keys and values a self-attention layer has seen so far, grown by
/// concatenation along the sequence axis. `[batch, heads, seq, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    kv: Option<(Tensor, Tensor)>,
}

impl KvCache {
    /// Number of positions already cached: the position offset of the next token.
    pub fn seq_len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Appends this step's keys and values and returns everything cached so far.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.kv.take() {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Keeps the batch rows named by `rows` (in that order): beams that survive a
    /// step, or sequences still running.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        if let Some((k, v)) = self.kv.take() {
            self.kv = Some((k.index_select(rows, 0)?, v.index_select(rows, 0)?));
        }
        Ok(())
    }

    pub fn clear(&mut self) {
        self.kv = None;
    }
}

/// `[batch, seq, heads * head_dim]` -> `[batch, heads, seq, head_dim]`.
pub fn split_heads(xs: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, t, d) = xs.dims3()?;
    xs.reshape((b, t, num_heads, d / num_heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[batch, heads, seq, head_dim]` -> `[batch, seq, heads * head_dim]`.
pub fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = xs.dims4()?;
    xs.transpose(1, 2)?.reshape((b, t, h * hd))
}

/// softmax(q kᵀ · scale + mask) v over `[batch, heads, seq, head_dim]` tensors.
/// Half-precision scores are softmaxed in f32, where their exponentials fit.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    let probs = match scores.dtype() {
        DType::F16 | DType::BF16 => {
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                .to_dtype(scores.dtype())?
        }
        _ => candle_nn::ops::softmax_last_dim(&scores)?,
    };
    probs.matmul(v)
}

/// The additive causal mask for `new` queries placed after `past` cached
/// positions: `[new, past + new]`, 0 where a query may look, -inf where not.
pub fn causal_mask(
    new: usize,
    past: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let total = past + new;
    let mask: Vec<f32> = (0..new)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (new, total), device)?.to_dtype(dtype)
}

/// The last position of `[batch, seq, dim]`, as `[batch, 1, dim]`.
pub fn last_position(xs: &Tensor) -> Result<Tensor> {
    let t = xs.dim(D::Minus2)?;
    xs.narrow(D::Minus2, t - 1, 1)
}
