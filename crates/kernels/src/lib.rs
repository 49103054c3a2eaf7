//! The CPU kernels of `caption`, and nothing of its models.
//!
//! Every SIMD, AMX and `asm!` routine of the project lives here, over plain
//! slices: packed matrix products in f32 ([`gemm_f32`]), bf16
//! ([`gemm_bf16`], on AMX tiles [`gemm_amx`]) and q8_0 ([`gemm_q8`]); the
//! ViT's fused self-attention ([`attention`], in bf16 on tiles
//! [`attention_amx`]); a decoding step's single-query attention and few-row
//! products ([`decode`]); and the element-wise softmax, GELU and bf16 adds
//! ([`elementwise`]). What the CPU can run is detected once ([`cpu`]);
//! each kernel module's `available()` says whether its fast path runs
//! here, and every fast path has a portable one beside it (or, for the
//! packed products, a caller that falls back to candle's operations).
//!
//! The weight layouts the products stream ([`packed`], [`panels`]) belong
//! to the kernels too: the weight cache saves and maps them as they are.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(clippy::missing_safety_doc)]

pub mod attention;
pub mod attention_amx;
pub mod bf16_panels;
mod blocks;
pub mod cpu;
pub mod decode;
pub mod elementwise;
pub mod gemm_amx;
pub mod gemm_bf16;
pub mod gemm_f32;
pub mod gemm_q8;
pub mod packed;
pub mod panels;

#[cfg(test)]
mod test_data;

pub use packed::{Packed, PackedLinear, PackedProduct, PanelLayout};
pub use panels::PanelFile;
