//! The layers model files are built from: [`Linear`] over every weight
//! format, [`TokenEmbedding`], [`LayerNorm`], [`RmsNorm`], [`Activation`],
//! [`RotaryEmbedding`], and attention:
//! one entry point, [`scaled_dot_product_attention`] (with
//! [`fused_qkv_attention`], the same attention read from a ViT's fused
//! projection), and its [`KvCache`].
//!
//! This is the only place that knows which kernels the CPU runs: each layer
//! asks `caption_kernels` at load or at `forward` whether a fast path
//! exists here and otherwise uses candle's operations (the path on GPUs and
//! on CPUs without AVX-512). Model files name no CPU feature.

mod activation;
mod attention;
mod embedding;
mod linear;
mod norm;
mod ops;
mod rotary;
#[cfg(test)]
mod test_data;

pub use activation::{gelu_erf, residual_add, softmax_last_dim, Activation};
pub use attention::{
    causal_mask, fused_qkv_attention, last_position, merge_heads, scaled_dot_product_attention,
    split_heads, KvCache, LayerCaches, SdpaParams,
};
pub use embedding::TokenEmbedding;
pub use linear::{
    linear, linear_no_bias, packing_settings, small_batch_linear, Linear, LinearOptions,
    QuantFormat, Quantization,
};
pub use norm::{layer_norm, rms_norm, LayerNorm, RmsNorm};
pub use rotary::{RopeScaling, RotaryEmbedding};

/// Whether this CPU runs our packed float32 kernels (AVX-512, not turned
/// off with `CAPTION_KERNELS=portable`): the fast path the parity tests
/// compare with the portable one.
pub fn packed_kernels_available() -> bool {
    caption_kernels::gemm_f32::available()
}

/// Whether operations on `device` run our own CPU kernels (packed
/// products, fused attention, the element-wise operations). Never off the
/// CPU; nor on it under `CAPTION_KERNELS=generic`, where every operation
/// is candle's, as on a GPU: the parity tests run that way in CI, so the
/// code a GPU runs is proven against transformers here.
pub fn own_kernels(device: &candle_core::Device) -> bool {
    device.is_cpu() && !caption_kernels::cpu::generic()
}

/// From now on, layers built in this process take candle's portable
/// operations, as on a CPU without AVX-512.
pub fn use_portable_kernels() {
    caption_kernels::cpu::use_portable_kernels()
}
