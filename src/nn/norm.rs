//! `nn.LayerNorm`.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

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

/// `LlamaRMSNorm`: `weight · (x / √(mean(x²) + eps))`, the statistic taken
/// in f32 and the normalised value rounded back to the input's dtype before
/// the weight multiplies it, in that order, as transformers does (the order
/// matters in bf16).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

/// `LlamaRMSNorm(dim, eps)` read from `vb` (`weight`).
pub fn rms_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: vb.get(dim, "weight")?,
        eps,
    })
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // candle's fused kernel rounds once at the end, which is the same
        // thing in f32; the half types take the composed path for parity.
        if xs.dtype() == DType::F32 && xs.is_contiguous() {
            return candle_nn::ops::rms_norm(xs, &self.weight, self.eps as f32);
        }
        let wide = xs.to_dtype(DType::F32)?;
        let mean_square = wide.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = wide
            .broadcast_div(&(mean_square + self.eps)?.sqrt()?)?
            .to_dtype(xs.dtype())?;
        normed.broadcast_mul(&self.weight)
    }
}
