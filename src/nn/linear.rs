//! `nn.Linear` over every weight format: dense tensors, weights packed for
//! our kernels (f32, bf16, q8_0) and candle's quantized blocks. The layer
//! chooses its kernel once, at load, from what the CPU runs; models only
//! call [`linear`] and `forward`.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Module, Result, Storage, Tensor};
use candle_nn::VarBuilder;
use caption_kernels::bf16_panels::{Bf16Panels, PackedMatrixBf16};
use caption_kernels::gemm_f32::{F32Panels, PackedMatrix};
use caption_kernels::gemm_q8::{PackedMatrixQ8, Q8Panels};
use caption_kernels::{decode, gemm_bf16, gemm_f32, gemm_q8, PackedLinear, PanelFile};

use super::ops::{PackedOp, SmallBatchLinear};
use crate::load::weight_cache::{PackedLayer, WeightCache};

/// `nn.Linear` with a bias, loaded from `<prefix>.weight` and `<prefix>.bias`.
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    options: &LinearOptions,
    vb: VarBuilder,
) -> Result<Linear> {
    options.layer(&vb, in_dim, out_dim, || {
        Ok((
            vb.get((out_dim, in_dim), "weight")?,
            Some(vb.get(out_dim, "bias")?),
        ))
    })
}

/// `nn.Linear(bias=False)`.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    options: &LinearOptions,
    vb: VarBuilder,
) -> Result<Linear> {
    options.layer(&vb, in_dim, out_dim, || {
        Ok((vb.get((out_dim, in_dim), "weight")?, None))
    })
}

/// How linear layers hold their weights: quantized or not (`--quantize`),
/// and the weight cache their packed form comes from and goes to. Not part
/// of config.json: the model's configs carry it from the loader to every
/// layer.
#[derive(Debug, Clone, Default)]
pub struct LinearOptions {
    pub quantization: Option<Quantization>,
    pub weight_cache: Option<Arc<WeightCache>>,
}

impl LinearOptions {
    /// The layer whose weight is `<vb prefix>.weight`, `[out_dim, in_dim]`:
    /// from the weight cache when it holds it, else built from `read`'s
    /// weight and bias (see [`Linear::with_format`]) and offered to it.
    pub fn layer(
        &self,
        vb: &VarBuilder,
        in_dim: usize,
        out_dim: usize,
        read: impl FnOnce() -> Result<(Tensor, Option<Tensor>)>,
    ) -> Result<Linear> {
        let name = format!("{}.weight", vb.prefix());
        if let Some(layer) = self
            .weight_cache
            .as_ref()
            .and_then(|cache| cache.layer(&name, out_dim, in_dim, vb.dtype()))
        {
            return Ok(Linear::from_cached(layer));
        }
        let (weight, bias) = read()?;
        let home = self
            .weight_cache
            .as_ref()
            .and_then(|cache| cache.panel_file());
        let layer = Linear::with_format_in(weight, bias, self.quantization, home)?;
        self.remember(&name, &layer);
        Ok(layer)
    }

    /// Offers a layer built without the cache to it, under `name`.
    pub fn remember(&self, name: &str, layer: &Linear) {
        if let (Some(cache), Some(packed)) = (&self.weight_cache, layer.packed_layer()) {
            cache.remember(name, packed);
        }
    }
}

/// Linear-layer weights quantized at load time, in one of candle's GGUF
/// block formats (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantization {
    pub format: QuantFormat,
    /// Quantize only layers whose input width is a multiple of 256, where
    /// candle has fast (AVX512-VNNI / AVX2) kernels; elsewhere candle's q8_0
    /// runs ~5x slower than f32 (measured: ViT-g's 1408-wide layers), so
    /// those layers stay f32. Where our q8_0 kernel runs ([`gemm_q8`]) it
    /// takes any whole number of blocks, and q8_0 ignores this rule. `false`
    /// quantizes every layer the block size divides (the tests use it on
    /// the small demo models to see q8_0's effect).
    pub only_fast_widths: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// 8-bit weights in blocks of 32 with an f16 scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit k-quants in super-blocks of 256 (4.5 bits per weight).
    Q4K,
}

impl std::str::FromStr for QuantFormat {
    type Err = String;

    /// The names `--quantize` takes: `q8_0`, `q4k`.
    fn from_str(name: &str) -> std::result::Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(Self::Q8_0),
            "q4k" | "q4_k" => Ok(Self::Q4K),
            other => Err(format!(
                "unknown quantization `{other}`: expected q8_0 or q4k"
            )),
        }
    }
}

impl Quantization {
    /// `format` as `--quantize` applies it: only layers of the widths
    /// candle's fast kernels take (see [`Self::only_fast_widths`]).
    pub fn of(format: QuantFormat) -> Self {
        Self {
            format,
            only_fast_widths: true,
        }
    }
}

impl QuantFormat {
    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }
}

/// Input widths that candle's fast quantized kernels need (and q4_K's block).
const FAST_QUANT_WIDTH: usize = 256;

/// What decides how layers are packed on this machine, for `dtype` and
/// `quantization`: the weight cache keeps one file per distinct answer.
/// `None` when no layer would be packed or quantized (nothing to cache).
pub fn packing_settings(dtype: DType, quantization: Option<Quantization>) -> Option<String> {
    let kernels = (gemm_f32::available(), gemm_bf16::available());
    if kernels == (false, false) && quantization.is_none() {
        return None;
    }
    let mut settings = format!(
        "dtype {dtype:?}, quantization {quantization:?}, kernels f32 {} bf16 {}",
        kernels.0, kernels.1
    );
    // q8_0 layers are saved as our kernel's panels where it runs, as
    // candle's blocks elsewhere (only q8_0 caches are told apart by this).
    if quantization.is_some_and(|q| q.format == QuantFormat::Q8_0) {
        settings.push_str(&format!(" q8_0 {}", gemm_q8::available()));
    }
    Some(settings)
}

/// `nn.Linear`: `x · weightᵀ + bias` over the last axis, `weight [out, in]`.
/// A few rows (a decoding step) in half precision go to
/// [`decode::small_batch_linear`]; the rest to our packed kernels where
/// the weights were packed, or candle's (quantized) matmul.
#[derive(Debug, Clone)]
pub struct Linear {
    pub(super) weight: LinearWeight,
    pub(super) bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub(super) enum LinearWeight {
    Dense(Tensor),
    /// Float32 weights packed for [`gemm_f32`]'s AVX-512 kernel (the bias
    /// travels inside), on CPUs that have it.
    Packed(Arc<PackedLinear<F32Panels>>),
    /// bfloat16 weights packed for [`gemm_bf16`]'s kernels.
    PackedBf16(Arc<PackedLinear<Bf16Panels>>),
    /// Activations are f32 on the way in (candle's quantized kernels read
    /// f32) and converted back to the model's dtype on the way out.
    Quantized(QMatMul),
    /// q8_0 weights packed for [`gemm_q8`]'s kernel (the bias travels
    /// inside); f32 activations, as for `Quantized`.
    PackedQ8(Arc<PackedLinear<Q8Panels>>),
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Dense(weight),
            bias,
        }
    }

    /// `weight [out, in]`, quantized when `format` asks and the width allows
    /// (see [`Quantization::only_fast_widths`]); the bias stays as it is.
    /// Float32 weights that stay dense are packed for [`gemm_f32`] where the
    /// CPU runs it (the packed copy replaces the tensor: no memory is added).
    pub fn with_format(
        weight: Tensor,
        bias: Option<Tensor>,
        format: Option<Quantization>,
    ) -> Result<Self> {
        Self::with_format_in(weight, bias, format, None)
    }

    /// [`Self::with_format`], packing into `file` (the weight cache's file
    /// in the making) where it has room.
    fn with_format_in(
        weight: Tensor,
        bias: Option<Tensor>,
        format: Option<Quantization>,
        file: Option<&Arc<PanelFile>>,
    ) -> Result<Self> {
        let layer = Self::unpacked(weight, bias, format)?;
        match &layer.weight {
            LinearWeight::Dense(weight) if packable(weight) => layer.packed(file),
            LinearWeight::Quantized(QMatMul::QTensor(blocks))
                if blocks.dtype() == GgmlDType::Q8_0 && gemm_q8::available() =>
            {
                layer.packed_q8(file)
            }
            _ => Ok(layer),
        }
    }

    /// A layer the weight cache held.
    pub(super) fn from_cached(layer: PackedLayer) -> Self {
        let (weight, bias) = match layer {
            PackedLayer::F32(packed) => (LinearWeight::Packed(packed), None),
            PackedLayer::Bf16(packed) => (LinearWeight::PackedBf16(packed), None),
            PackedLayer::Q8(packed) => (LinearWeight::PackedQ8(packed), None),
            PackedLayer::Blocks { weight, bias } => {
                (LinearWeight::Quantized(QMatMul::QTensor(weight)), bias)
            }
        };
        Self { weight, bias }
    }

    /// What the weight cache saves of this layer: its packed or quantized
    /// weight (`None` for a dense one).
    fn packed_layer(&self) -> Option<PackedLayer> {
        Some(match &self.weight {
            LinearWeight::Packed(packed) => PackedLayer::F32(packed.clone()),
            LinearWeight::PackedBf16(packed) => PackedLayer::Bf16(packed.clone()),
            LinearWeight::PackedQ8(packed) => PackedLayer::Q8(packed.clone()),
            LinearWeight::Quantized(QMatMul::QTensor(weight)) => PackedLayer::Blocks {
                weight: weight.clone(),
                bias: self.bias.clone(),
            },
            LinearWeight::Dense(_) | LinearWeight::Quantized(_) => return None,
        })
    }

    /// `weight [out, in]` as it is, quantized when `format` asks; never packed.
    fn unpacked(
        weight: Tensor,
        bias: Option<Tensor>,
        format: Option<Quantization>,
    ) -> Result<Self> {
        let Some(quantization) = format else {
            return Ok(Self::new(weight, bias));
        };
        let in_dim = weight.dim(1)?;
        let ggml = quantization.format.ggml();
        let ours = quantization.format == QuantFormat::Q8_0 && gemm_q8::available();
        let block = if quantization.only_fast_widths && !ours {
            FAST_QUANT_WIDTH
        } else {
            ggml.block_size()
        };
        if in_dim % block != 0 || !weight.device().is_cpu() {
            return Ok(Self::new(weight, bias));
        }
        let quantized = quantize_rows(&weight.to_dtype(DType::F32)?, ggml)?;
        Ok(Self {
            weight: LinearWeight::Quantized(QMatMul::from_qtensor(quantized)?),
            bias,
        })
    }

    /// Float32 weights packed for [`gemm_f32`], bfloat16 ones for
    /// [`gemm_bf16`] (the caller checked the CPU runs them).
    fn packed(self, file: Option<&Arc<PanelFile>>) -> Result<Self> {
        let LinearWeight::Dense(weight) = &self.weight else {
            return Ok(self);
        };
        let (n, k) = weight.dims2()?;
        // The bias joins the f32 sums, before any rounding to the output type.
        let bias = f32_values(self.bias.as_ref())?;
        let weight = match weight.dtype() {
            DType::BF16 => LinearWeight::PackedBf16(Arc::new(PackedLinear {
                weight: with_values(weight, |values| {
                    PackedMatrixBf16::from_transposed_in(values, n, k, file)
                })?,
                bias,
            })),
            _ => LinearWeight::Packed(Arc::new(PackedLinear {
                weight: with_values(weight, |values| {
                    PackedMatrix::from_transposed_in(values, n, k, k, file)
                })?,
                bias,
            })),
        };
        Ok(Self { weight, bias: None })
    }

    /// q8_0 blocks repacked for [`gemm_q8`]'s kernel (the caller checked
    /// the CPU runs it), the bias moved inside.
    fn packed_q8(self, file: Option<&Arc<PanelFile>>) -> Result<Self> {
        let LinearWeight::Quantized(QMatMul::QTensor(blocks)) = &self.weight else {
            return Ok(self);
        };
        let (n, k) = blocks.shape().dims2()?;
        let bias = f32_values(self.bias.as_ref())?;
        let weight = PackedMatrixQ8::from_ggml_in(&blocks.data()?, n, k, file);
        Ok(Self {
            weight: LinearWeight::PackedQ8(Arc::new(PackedLinear { weight, bias })),
            bias: None,
        })
    }

    /// Whether the weights are packed for one of our float kernels.
    pub fn is_packed(&self) -> bool {
        matches!(
            self.weight,
            LinearWeight::Packed(_) | LinearWeight::PackedBf16(_)
        )
    }

    /// Whether the weights are held quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(
            self.weight,
            LinearWeight::Quantized(_) | LinearWeight::PackedQ8(_)
        )
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let (in_dim, lead) = match dims.split_last() {
            Some((&in_dim, lead)) => (in_dim, lead),
            None => candle_core::bail!("linear: a scalar input"),
        };
        let rows: usize = lead.iter().product();
        let flat = xs.reshape((rows, in_dim))?;
        let product = match &self.weight {
            LinearWeight::Dense(weight) if small_batch_linear_fits(&flat, weight) => {
                small_batch_linear(&flat, weight, self.bias.as_ref())?
            }
            LinearWeight::Dense(weight) => {
                add_bias(flat.matmul(&weight.t()?)?, self.bias.as_ref())?
            }
            LinearWeight::Packed(op) => flat.contiguous()?.apply_op1_no_bwd(&PackedOp(op))?,
            LinearWeight::PackedBf16(op) => flat.contiguous()?.apply_op1_no_bwd(&PackedOp(op))?,
            LinearWeight::Quantized(weight) => {
                let product = weight
                    .forward(&flat.to_dtype(DType::F32)?)?
                    .to_dtype(xs.dtype())?;
                add_bias(product, self.bias.as_ref())?
            }
            LinearWeight::PackedQ8(op) => flat
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1_no_bwd(&PackedOp(op))?
                .to_dtype(xs.dtype())?,
        };
        let out_dim = product.dim(1)?;
        let mut out_dims = lead.to_vec();
        out_dims.push(out_dim);
        product.reshape(out_dims)
    }
}

/// `x [rows, in] · weightᵀ (+ bias)` for a few rows, streaming the weights
/// once ([`decode::small_batch_linear`]); `x`, `weight` and `bias` of one
/// dtype (f32 works too: the tests' yardstick).
pub fn small_batch_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, in_dim) = x.dims2()?;
    let (out_dim, w_in) = weight.dims2()?;
    if w_in != in_dim {
        candle_core::bail!("linear: input width {in_dim}, weight {:?}", weight.dims());
    }
    let op = SmallBatchLinear {
        rows,
        in_dim,
        out_dim,
    };
    let weight = weight.contiguous()?;
    let product = x.contiguous()?.apply_op2_no_bwd(&weight, &op)?;
    add_bias(product, bias)
}

/// Whether [`small_batch_linear`] is the faster way for this product: for
/// the half types, whose products candle 0.11 widens to f32 one call at a
/// time (a bf16 BLIP-base vocabulary projection took 66 ms for one row, this
/// kernel 30 ms). For f32, candle's own matrix-vector product streams the
/// weights faster (31 vs 17-19 GB/s here, both threads busy), and at 8 rows
/// the two are level.
fn small_batch_linear_fits(x: &Tensor, weight: &Tensor) -> bool {
    super::own_kernels(x.device())
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && x.dtype() == weight.dtype()
        && x.rank() == 2
        && x.dim(0).is_ok_and(|rows| rows <= decode::SMALL_BATCH_ROWS)
}

/// A bias as the f32 values our kernels add.
fn f32_values(bias: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    bias.map(|bias| bias.to_dtype(DType::F32)?.to_vec1::<f32>())
        .transpose()
}

/// `f` on a CPU tensor's values, straight from its buffer (no copy of a
/// contiguous one).
pub(super) fn with_values<T: candle_core::WithDType, R>(
    tensor: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let tensor = tensor.contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        candle_core::bail!("packing a linear layer: not contiguous on the CPU");
    };
    Ok(f(&cpu.as_slice::<T>()?[start..end]))
}

/// Whether a dense weight is packed: float32 for [`gemm_f32`], bfloat16
/// for [`gemm_bf16`], on a CPU that runs the kernel.
fn packable(weight: &Tensor) -> bool {
    super::own_kernels(weight.device())
        && match weight.dtype() {
            DType::F32 => gemm_f32::available(),
            DType::BF16 => gemm_bf16::available(),
            _ => false,
        }
}

/// `QTensor::quantize` on slices of rows in parallel. It runs on one thread
/// and the k-quants search is slow (BLIP-base to q4_K: 6.7 s); the blocks
/// run along each row, so the slices' block data concatenated is the whole
/// matrix's.
fn quantize_rows(weight: &Tensor, ggml: GgmlDType) -> Result<QTensor> {
    use rayon::prelude::*;
    let (rows, cols) = weight.dims2()?;
    let values = weight.flatten_all()?.to_vec1::<f32>()?;
    let slices = (rayon::current_num_threads() * 4).clamp(1, rows);
    let per_slice = rows.div_ceil(slices);
    let pieces = values
        .par_chunks(per_slice * cols)
        .map(|chunk| {
            // Each slice its own tensor, not a narrowed view: candle 0.11's
            // quantize reads a view's whole storage, ignoring its offset.
            let slice = Tensor::from_slice(chunk, (chunk.len() / cols, cols), weight.device())?;
            QTensor::quantize(&slice, ggml)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut data = Vec::new();
    for piece in &pieces {
        data.extend_from_slice(&piece.data()?);
    }
    let storage = QStorage::from_data(Cow::Owned(data), weight.device(), ggml)?;
    QTensor::new(storage, (rows, cols))
}

fn add_bias(product: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(bias) => product.broadcast_add(bias),
        None => Ok(product),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_data::{max_abs_diff, random};
    use super::*;
    use candle_core::Device;

    /// Relative error (L2 norm of the difference over the norm of the
    /// float32 output) of quantized linear layers on a 512-wide layer with
    /// Gaussian weights and inputs, activations quantized too as candle's
    /// kernels do. Measured: q8_0 0.77% (0.87% on candle's kernel, which
    /// quantizes inputs in blocks of 256), q4_K 7.4% (README states them);
    /// the bounds leave room for the unseeded random draw.
    #[test]
    fn quantized_linear_error_is_bounded() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.02, (384, 512), &device).unwrap();
        let bias = Tensor::randn(0f32, 0.02, 384, &device).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 10, 512), &device).unwrap();
        let dense = Linear::new(weight.clone(), Some(bias.clone()));
        let exact = dense.forward(&x).unwrap();
        let norm = |t: &Tensor| -> f32 {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        for (format, bound) in [(QuantFormat::Q8_0, 0.015), (QuantFormat::Q4K, 0.1)] {
            let quantization = Quantization {
                format,
                only_fast_widths: true,
            };
            let layer = Linear::with_format(weight.clone(), Some(bias.clone()), Some(quantization))
                .unwrap();
            assert!(layer.is_quantized());
            let ours = layer.forward(&x).unwrap();
            assert_eq!(ours.dims(), exact.dims());
            let relative = norm(&(&ours - &exact).unwrap()) / norm(&exact);
            eprintln!("{format:?}: relative error {relative:.5}");
            assert!(relative < bound, "{format:?}: relative error {relative}");
        }
        // 100 wide: not a multiple of 256, so left dense under the CLI rule.
        let narrow = Tensor::randn(0f32, 0.02, (8, 100), &device).unwrap();
        let quantization = Quantization {
            format: QuantFormat::Q8_0,
            only_fast_widths: true,
        };
        assert!(!Linear::with_format(narrow, None, Some(quantization))
            .unwrap()
            .is_quantized());
        // 96 wide (as ViT-g's 1408): whole q8_0 blocks, which our q8_0
        // kernel runs at any width, candle's fast kernels only at 256s.
        let blocks_only = Tensor::randn(0f32, 0.02, (8, 96), &device).unwrap();
        assert_eq!(
            Linear::with_format(blocks_only, None, Some(quantization))
                .unwrap()
                .is_quantized(),
            gemm_q8::available()
        );
    }

    #[test]
    fn small_batch_linear_matches_matmul() {
        for rows in [1, 3, 8] {
            // 200 outputs: three full tasks of 64 and a partial one.
            let x = random(&[rows, 77], 9);
            let w = random(&[200, 77], 10);
            let b = random(&[200], 11);
            let ours = small_batch_linear(&x, &w, Some(&b)).unwrap();
            let reference = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let diff = max_abs_diff(&ours, &reference);
            assert!(diff < 1e-4, "{rows} rows: max |difference| {diff}");
        }
        let x = random(&[2, 64], 12).to_dtype(DType::BF16).unwrap();
        let w = random(&[10, 64], 13).to_dtype(DType::BF16).unwrap();
        let ours = small_batch_linear(&x, &w, None).unwrap();
        let reference = x
            .to_dtype(DType::F32)
            .unwrap()
            .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap();
        let diff = max_abs_diff(&ours.to_dtype(DType::F32).unwrap(), &reference);
        // Only the output's rounding to bf16 differs (|values| < ~40).
        assert!(diff < 0.3, "bf16: max |difference| {diff}");
    }
}

/// The weight cache gives back layers that compute what they computed.
#[cfg(test)]
mod cache_tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use candle_core::{DType, Device, Module, Tensor};

    use super::*;
    use crate::load::weight_cache::{Outcome, Source, WeightCache};

    /// How a layer is held (the cache file's kinds).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kind {
        F32,
        Bf16,
        /// candle's q8_0 blocks, where our q8_0 kernel does not run.
        Q8_0,
        Q4K,
        /// q8_0 packed for our kernel.
        Q8_0Panels,
    }

    /// A 40 x 512 layer with a bias, held as `kind` would hold it.
    fn layer(kind: Kind) -> (Linear, DType) {
        let weight = Tensor::randn(0f32, 1.0, (40, 512), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 40, &Device::Cpu).unwrap();
        let quantized = |format| {
            Some(Quantization {
                format,
                only_fast_widths: true,
            })
        };
        let (dtype, format) = match kind {
            Kind::F32 => (DType::F32, None),
            Kind::Bf16 => (DType::BF16, None),
            Kind::Q8_0 | Kind::Q8_0Panels => (DType::F32, quantized(QuantFormat::Q8_0)),
            Kind::Q4K => (DType::F32, quantized(QuantFormat::Q4K)),
        };
        let weight = weight.to_dtype(dtype).unwrap();
        let bias = bias.to_dtype(dtype).unwrap();
        let layer = match kind {
            // candle's blocks, as a CPU without our q8_0 kernel holds them.
            Kind::Q8_0 => Linear::unpacked(weight, Some(bias), format),
            _ => Linear::with_format(weight, Some(bias), format),
        };
        (layer.unwrap(), dtype)
    }

    fn cache(dir: &Path, weights: &[PathBuf], settings: &str) -> WeightCache {
        let source = Source {
            label: "test-model",
            weights,
            config_json: "{}",
            settings,
        };
        WeightCache::open(dir, &source).unwrap()
    }

    /// `original` and `loaded` give bit-identical outputs on random inputs
    /// `k` wide.
    fn assert_same_products(
        original: &Linear,
        loaded: &Linear,
        k: usize,
        dtype: DType,
        what: &str,
    ) {
        let x = Tensor::randn(0f32, 1.0, (3, k), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let want = original.forward(&x).unwrap().to_dtype(DType::F32).unwrap();
        let got = loaded.forward(&x).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(
            want.to_vec2::<f32>().unwrap(),
            got.to_vec2::<f32>().unwrap(),
            "{what}"
        );
    }

    /// Every kind of layer comes back from the file computing bit for bit
    /// what it computed before it was saved.
    #[test]
    fn every_kind_of_layer_round_trips_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let weights = [dir.path().join("model.safetensors")];
        std::fs::write(&weights[0], b"weights").unwrap();
        let kinds = [
            Kind::F32,
            Kind::Bf16,
            Kind::Q8_0,
            Kind::Q4K,
            Kind::Q8_0Panels,
        ];
        for kind in kinds {
            let runs = match kind {
                Kind::F32 => gemm_f32::available(),
                Kind::Bf16 => gemm_bf16::available(),
                Kind::Q8_0Panels => gemm_q8::available(),
                Kind::Q8_0 | Kind::Q4K => true,
            };
            if !runs {
                continue;
            }
            let settings = format!("{kind:?}");
            let (original, dtype) = layer(kind);
            let saving = Arc::new(cache(dir.path(), &weights, &settings));
            assert!(saving.layer("layer.weight", 40, 512, dtype).is_none());
            let options = LinearOptions {
                quantization: None,
                weight_cache: Some(saving.clone()),
            };
            options.remember("layer.weight", &original);
            let Outcome::Written { path, .. } = saving.finish().unwrap() else {
                panic!("{kind:?}: not written");
            };
            let loading = cache(dir.path(), &weights, &settings);
            let loaded =
                Linear::from_cached(loading.layer("layer.weight", 40, 512, dtype).unwrap());
            assert_eq!(loading.finish().unwrap(), Outcome::Used(path), "{kind:?}");
            assert_eq!(
                loading.holds_packed("layer.weight"),
                matches!(kind, Kind::F32 | Kind::Bf16)
            );
            // Another shape under the same name is not this layer.
            assert!(loading.layer("layer.weight", 512, 40, dtype).is_none());
            assert_same_products(&original, &loaded, 512, dtype, &format!("{kind:?}"));
            assert_eq!(
                matches!(loaded.weight, LinearWeight::PackedQ8(_)),
                kind == Kind::Q8_0Panels,
                "{kind:?}"
            );
        }
    }

    /// On a miss, layers are packed straight into the file being written
    /// (no copy at the end), which comes back whole and exact; a layer
    /// past 2 MiB exercises the rounded-up reservation and the final trim.
    #[test]
    fn layers_packed_on_a_miss_live_in_the_file_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let weights = [dir.path().join("model.safetensors")];
        std::fs::write(&weights[0], b"weights").unwrap();
        let q8_0 = Some(Quantization {
            format: QuantFormat::Q8_0,
            only_fast_widths: true,
        });
        for (dtype, quantization, runs) in [
            (DType::F32, None, gemm_f32::available()),
            (DType::BF16, None, gemm_bf16::available()),
            (DType::F32, q8_0, gemm_q8::available()),
        ] {
            if !runs || !cfg!(all(target_os = "linux", target_env = "gnu")) {
                continue;
            }
            let settings = format!("{dtype:?} {quantization:?}");
            let saving = Arc::new(cache(dir.path(), &weights, &settings));
            let options = LinearOptions {
                quantization,
                weight_cache: Some(saving.clone()),
            };
            let vb = candle_nn::VarBuilder::zeros(dtype, &Device::Cpu);
            let shapes = [("small", 40, 512), ("big", 1100, 768)];
            let mut built = Vec::new();
            for (name, n, k) in shapes {
                let weight = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
                let bias = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
                let read = || Ok((weight.to_dtype(dtype)?, Some(bias.to_dtype(dtype)?)));
                built.push(options.layer(&vb.pp(name), k, n, read).unwrap());
            }
            {
                let ranges = saving.packed_ranges();
                assert_eq!(ranges.len(), 2);
                for (name, range) in ranges {
                    let [start, end] = range.expect(&name);
                    assert!(start % 4096 == 0 && start < end, "{name}");
                }
            }
            let Outcome::Written { path, bytes, .. } = saving.finish().unwrap() else {
                panic!("{dtype:?}: not written");
            };
            assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes);
            let loading = cache(dir.path(), &weights, &settings);
            for ((name, n, k), original) in shapes.into_iter().zip(&built) {
                let loaded = Linear::from_cached(
                    loading
                        .layer(&format!("{name}.weight"), n, k, dtype)
                        .unwrap(),
                );
                assert_same_products(original, &loaded, k, dtype, &format!("{dtype:?} {name}"));
            }
            assert_eq!(loading.finish().unwrap(), Outcome::Used(path));
        }
    }
}
