//! Rotary position embeddings (Su et al., 2021, arXiv:2104.09864) as
//! transformers' Llama applies them: the two halves of each head rotated
//! together (`rotate_half`), not interleaved pairs.

use candle_core::{DType, Device, Result, Tensor};

/// How the inverse frequencies are derived from `rope_theta`: transformers'
/// `rope_type`s that Llama checkpoints use and that do not depend on the
/// sequence length.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `default`: θ^(-2i/d).
    None,
    /// `linear`: every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// `llama3`: long wavelengths divided by `factor`, short ones kept, the
    /// band between interpolated (Llama 3.1's long-context scheme).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The cosines and sines of every position up to a maximum, computed once.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[max_positions, head_dim / 2]` each, in the model's dtype.
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq = inverse_frequencies(head_dim, theta, scaling);
        let half = inv_freq.len();
        // As transformers: the angle `position · inv_freq` in f32, its cosine
        // and sine in f32, rounded to the model's dtype at the end.
        let angles: Vec<f32> = (0..max_positions)
            .flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f))
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?,
        })
    }

    /// Rotates `xs [batch, heads, seq, head_dim]`, whose positions start at
    /// `offset`.
    pub fn apply(&self, xs: &Tensor, offset: usize) -> Result<Tensor> {
        let seq = xs.dim(2)?;
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        candle_nn::rotary_emb::rope(&xs.contiguous()?, &cos, &sin)
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }
}

/// transformers' `inv_freq`, in f32 arithmetic as torch computes it.
fn inverse_frequencies(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let base = theta as f32;
    let default = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32));
    match *scaling {
        RopeScaling::None => default.collect(),
        RopeScaling::Linear { factor } => default.map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_context,
        } => {
            let (factor, low, high) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let old_context = old_context as f32;
            let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
            default
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (old_context / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotation keeps each (x_i, x_{i + d/2}) pair's length and turns it
    /// by position · inv_freq_i: check against the formula directly.
    #[test]
    fn rotates_each_half_pair_by_its_angle() {
        let (d, offset) = (8, 3);
        let rope =
            RotaryEmbedding::new(d, 10000.0, &RopeScaling::None, 16, DType::F32, &Device::Cpu)
                .unwrap();
        let xs: Vec<f32> = (0..2 * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let t = Tensor::from_vec(xs.clone(), (1, 1, 2, d), &Device::Cpu).unwrap();
        let out: Vec<f32> = rope
            .apply(&t, offset)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let inv = inverse_frequencies(d, 10000.0, &RopeScaling::None);
        for pos in 0..2 {
            for i in 0..d / 2 {
                let angle = (offset + pos) as f32 * inv[i];
                let (x1, x2) = (xs[pos * d + i], xs[pos * d + i + d / 2]);
                let want1 = x1 * angle.cos() - x2 * angle.sin();
                let want2 = x2 * angle.cos() + x1 * angle.sin();
                assert!((out[pos * d + i] - want1).abs() < 1e-6);
                assert!((out[pos * d + i + d / 2] - want2).abs() < 1e-6);
            }
        }
    }

    /// Llama 3.1's published numbers: factor 8, bands 1 and 4 over 8192
    /// positions leave the highest frequency alone and divide the lowest by 8.
    #[test]
    fn llama3_scaling_keeps_short_and_stretches_long_wavelengths() {
        let llama3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = inverse_frequencies(128, 500000.0, &RopeScaling::None);
        let scaled = inverse_frequencies(128, 500000.0, &llama3);
        assert_eq!(scaled[0], plain[0]);
        assert_eq!(scaled[63], plain[63] / 8.0);
        let linear = inverse_frequencies(128, 500000.0, &RopeScaling::Linear { factor: 2.0 });
        assert_eq!(linear[5], plain[5] / 2.0);
    }
}
