//! Activations, softmax and residual adds, on our element-wise kernels
//! where they run and candle's operations elsewhere.

use candle_core::{DType, Module, Result, Tensor};

use super::ops::{Bf16Add, GeluErf, RowSoftmax};

/// The activations transformers' `ACT2FN` maps config names to, for the names
/// BLIP, BLIP-2, CLIP and Llama checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU (torch's default).
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: x * sigmoid(1.702 x).
    QuickGelu,
    Relu,
    /// `silu` (Llama's MLP gate): x * sigmoid(x).
    Silu,
}

impl Activation {
    pub fn from_config_name(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => anyhow::bail!("unsupported activation `{other}` in config.json"),
        })
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => gelu_erf(xs),
            Self::GeluTanh => xs.gelu(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
        }
    }
}

/// softmax over the last axis. For contiguous f32 on the CPU: rows in
/// parallel, with a vectorisable exp; candle's own kernel calls libm's
/// scalar `expf` per element, which was ~15 ms a layer of ViT-B attention
/// (12 x 577 x 577 scores) on this machine class. Other dtypes and devices
/// go to candle.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if !(super::own_kernels(xs.device()) && xs.dtype() == DType::F32) {
        return candle_nn::ops::softmax_last_dim(xs);
    }
    xs.contiguous()?.apply_op1_no_bwd(&RowSoftmax)
}

/// The exact (erf) GELU, `x/2 · (1 + erf(x/√2))`. For contiguous f32 or
/// bf16 on the CPU: chunks in parallel, with a vectorisable erf; candle
/// evaluates its scalar erf one element at a time on one thread (~13 ms for
/// a ViT-B MLP's 577 x 3072). Other dtypes go to candle.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if !(super::own_kernels(xs.device()) && matches!(xs.dtype(), DType::F32 | DType::BF16)) {
        return xs.gelu_erf();
    }
    xs.contiguous()?.apply_op1_no_bwd(&GeluErf)
}

/// `xs + residual`, two tensors of one shape. bf16 on the CPU is added in
/// f32 and rounded once (to nearest, ties to even, as torch rounds), chunks
/// in parallel: candle's bf16 add calls its conversion intrinsics out of
/// line, 8 values a call, ~10 ns an element, which was 32% of the vision
/// encoder's time once its products ran on AMX tiles. Other dtypes go to
/// candle.
pub fn residual_add(xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let fast = super::own_kernels(xs.device())
        && xs.dtype() == DType::BF16
        && residual.dtype() == DType::BF16
        && xs.dims() == residual.dims();
    if !fast {
        return xs + residual;
    }
    xs.contiguous()?
        .apply_op2_no_bwd(&residual.contiguous()?, &Bf16Add)
}

#[cfg(test)]
mod tests {
    use super::super::test_data::{max_abs_diff, random};
    use super::*;
    use candle_core::Device;
    use half::bf16;

    /// bf16 sums: each the f32 sum of the two values rounded once, to
    /// nearest, ties to even (as torch adds bf16 tensors), across chunk
    /// edges; other dtypes as candle adds them.
    #[test]
    fn residual_add_rounds_each_sum_once() {
        let len = 3 * caption_kernels::elementwise::ELEMENTWISE_CHUNK + 5;
        let xs = random(&[len], 31).to_dtype(DType::BF16).unwrap();
        let residual = (random(&[len], 32) * 1e-3)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let ours: Vec<bf16> = residual_add(&xs, &residual).unwrap().to_vec1().unwrap();
        let (x, r): (Vec<bf16>, Vec<bf16>) = (xs.to_vec1().unwrap(), residual.to_vec1().unwrap());
        for i in 0..len {
            let expected = bf16::from_f32(x[i].to_f32() + r[i].to_f32());
            assert_eq!(ours[i].to_bits(), expected.to_bits(), "at {i}");
        }
        let wide = (random(&[7], 33), random(&[7], 34));
        let sum = residual_add(&wide.0, &wide.1).unwrap();
        let expected = (&wide.0 + &wide.1).unwrap();
        assert_eq!(
            sum.to_vec1::<f32>().unwrap(),
            expected.to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn softmax_and_gelu_match_candle() {
        let x = random(&[3, 5, 77], 14);
        let masked = Tensor::cat(
            &[
                &x,
                &Tensor::full(f32::NEG_INFINITY, (3, 5, 4), &Device::Cpu).unwrap(),
            ],
            2,
        )
        .unwrap();
        let ours = softmax_last_dim(&masked).unwrap();
        let reference = candle_nn::ops::softmax_last_dim(&masked).unwrap();
        assert!(max_abs_diff(&ours, &reference) < 1e-7);
        assert_eq!(
            ours.narrow(2, 77, 4)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let wide = (random(&[4, 1000], 15) * 3.0).unwrap();
        let diff = max_abs_diff(&gelu_erf(&wide).unwrap(), &wide.gelu_erf().unwrap());
        assert!(diff < 1e-6, "gelu max |difference| {diff}");
        // bf16: the f32 result rounded once, so within one bf16 step of
        // candle's (which rounds its own f32 erf).
        let narrow = wide.to_dtype(DType::BF16).unwrap();
        let ours = gelu_erf(&narrow).unwrap().to_dtype(DType::F32).unwrap();
        let reference = narrow.gelu_erf().unwrap().to_dtype(DType::F32).unwrap();
        let step = (reference.abs().unwrap() / 128.0).unwrap();
        let excess = (ours - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .ge(&(step + 1e-6).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            excess, 0.0,
            "bf16 gelu: {excess} values off by more than one step"
        );
    }
}
