//! The hot CPU kernels on the vision encoder's shapes, ours against
//! candle's general operations, in GFLOP/s:
//!
//!     cargo bench -p caption-kernels --bench kernels [-- ROUNDS]
//!
//! A working tool, like `stages`: no criterion, only the clock.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Module;
use candle_core::{DType, Device, Tensor, D};
use caption_kernels::attention::{fused_self_attention, FusedQkv};
use caption_kernels::bf16_panels::PackedMatrixBf16;
use caption_kernels::elementwise::scaled_softmax_in_place;
use caption_kernels::gemm_amx;
use caption_kernels::gemm_bf16::{self, Bf16Kernel};
use caption_kernels::gemm_f32::{self as gemm, PackedMatrix};
use caption_kernels::gemm_q8::{self, PackedMatrixQ8};
use half::bf16;

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map_or(Ok(5), |r| r.parse())?;
    if !gemm::available() {
        println!("no AVX-512 on this CPU: our kernels are not used here");
        return Ok(());
    }
    let device = Device::Cpu;
    // ViT-B/16 at 384 px: 577 tokens; qkv, projection, fc1, fc2. Then a
    // decoding step's few rows.
    for (m, k, n) in [
        (577, 768, 2304),
        (577, 768, 768),
        (577, 768, 3072),
        (577, 3072, 768),
        (1, 768, 3072),
        (3, 768, 3072),
        (8, 768, 3072),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &device)?;
        let w = Tensor::randn(0f32, 0.02, (n, k), &device)?;
        let flops = 2.0 * (m * k * n) as f64;
        let candle = best_of(rounds, || {
            x.matmul(&w.t()?)?;
            Ok(())
        })?;
        let weights: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let pack = best_of(rounds, || {
            PackedMatrix::from_transposed(&weights, n, k, k);
            Ok(())
        })?;
        let packed = PackedMatrix::from_transposed(&weights, n, k, k);
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut out = vec![0f32; m * n];
        let ours = best_of(rounds, || {
            gemm::matmul(&xs, m, k, &packed, None, &mut out, n, true);
            Ok(())
        })?;
        println!(
            "linear {m:>4}x{k:>4}x{n:>4}  candle {:>6.1}  ours {:>6.1} GFLOP/s  (packing {:.1} GB/s)",
            flops / candle / 1e9,
            flops / ours / 1e9,
            (weights.len() * 4) as f64 / pack / 1e9
        );
        if gemm_bf16::available() {
            let (x16, w16) = (x.to_dtype(DType::BF16)?, w.to_dtype(DType::BF16)?);
            let candle = best_of(rounds, || {
                x16.matmul(&w16.t()?)?;
                Ok(())
            })?;
            let packed = PackedMatrixBf16::from_transposed(&w16.flatten_all()?.to_vec1()?, n, k);
            let xs: Vec<bf16> = x16.flatten_all()?.to_vec1()?;
            let mut out = vec![bf16::ZERO; m * n];
            // Each of our kernels this CPU can run, whichever it would use.
            let mut ours = |kernel| {
                best_of(rounds, || {
                    gemm_bf16::matmul_with(kernel, &xs, m, &packed, None, &mut out);
                    Ok(())
                })
            };
            let dot = ours(Bf16Kernel::DotProduct)?;
            let widened = ours(Bf16Kernel::Widened)?;
            let tiles = if gemm_amx::available() {
                format!(", tiles {:>6.1}", flops / ours(Bf16Kernel::Tiles)? / 1e9)
            } else {
                String::new()
            };
            println!(
                "  bf16 {m:>4}x{k:>4}x{n:>4}  candle {:>6.1}  ours: dot {:>6.1}, widened {:>6.1}{tiles} GFLOP/s (this CPU: {:?})",
                flops / candle / 1e9,
                flops / dot / 1e9,
                flops / widened / 1e9,
                gemm_bf16::kernel(),
            );
        }
        if gemm_q8::available() {
            // Both kernels on the same blocks, quantized once.
            let blocks = QTensor::quantize(&w, GgmlDType::Q8_0)?;
            let packed = PackedMatrixQ8::from_ggml(&blocks.data()?, n, k);
            let qmatmul = QMatMul::from_qtensor(blocks)?;
            let candle = best_of(rounds, || {
                qmatmul.forward(&x)?;
                Ok(())
            })?;
            let ours = best_of(rounds, || {
                gemm_q8::matmul(&xs, m, k, &packed, None, &mut out, n, true);
                Ok(())
            })?;
            let serial = best_of(rounds, || {
                gemm_q8::matmul(&xs, m, k, &packed, None, &mut out, n, false);
                Ok(())
            })?;
            println!(
                "  q8_0 {m:>4}x{k:>4}x{n:>4}  candle {:>6.1}  ours {:>6.1} GOP/s (serial {:>6.1})",
                flops / candle / 1e9,
                flops / ours / 1e9,
                flops / serial / 1e9,
            );
        }
    }
    let (tokens, heads, head_dim) = (577, 12, 64);
    let d = heads * head_dim;
    let qkv = Tensor::randn(0f32, 1.0, (1, tokens, 3 * d), &device)?;
    let flops = 4.0 * (heads * tokens * tokens * head_dim) as f64;
    let scale = (head_dim as f64).powf(-0.5);
    let general = best_of(rounds, || {
        let split = qkv
            .reshape((1, tokens, 3, heads, head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let part = |i: usize| split.get(i)?.contiguous();
        // softmax(q kᵀ · scale) v in candle's general operations.
        let scores = (part(0)?.matmul(&part(1)?.t()?)? * scale)?;
        let exp = scores
            .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
            .exp()?;
        let probs = exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?;
        let context = probs.matmul(&part(2)?)?;
        context
            .transpose(1, 2)?
            .reshape((1, tokens, d))?
            .contiguous()?;
        Ok(())
    })?;
    let shape = FusedQkv::new(1, tokens, 3 * d, heads).expect("whole heads");
    let values: Vec<f32> = qkv.flatten_all()?.to_vec1()?;
    let mut context = vec![0f32; shape.output_len()];
    let fused = best_of(rounds, || {
        fused_self_attention(&values, shape, scale as f32, &mut context);
        Ok(())
    })?;
    let mut scores: Vec<f32> = Tensor::randn(0f32, 1.0, (tokens, tokens), &device)?
        .flatten_all()?
        .to_vec1()?;
    let softmax = best_of(rounds, || {
        for row in scores.chunks_mut(tokens) {
            scaled_softmax_in_place(row, 0.125);
        }
        Ok(())
    })?;
    println!(
        "softmax 577 rows x 577: {:.2} ns/element",
        softmax * 1e9 / (tokens * tokens) as f64
    );
    println!(
        "attention 12 heads x 577 tokens  general {:>6.1}  fused {:>6.1} GFLOP/s",
        flops / general / 1e9,
        flops / fused / 1e9
    );
    Ok(())
}

/// Best time of `rounds` runs, in seconds (a kernel's speed, not the noise).
fn best_of(rounds: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}
