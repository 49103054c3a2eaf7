//! Model families, one file each, with the pieces they share.
//!
//! Every struct mirrors a transformers module and walks the checkpoint with
//! `vb.pp(..)` using the checkpoint's own tensor names, so a tensor in our code
//! can be found in the safetensors file by the same path.

pub mod attention_amx;
pub mod blip;
pub mod blip2;
pub mod gemm;
pub mod gemm_amx;
pub mod gemm_bf16;
pub mod gemm_q8;
pub mod kernels;
pub mod opt;
pub mod pack_cache;
mod panels;

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Result, Storage, Tensor, D};
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
            Self::Gelu => kernels::gelu_erf(xs),
            Self::GeluTanh => xs.gelu(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Relu => xs.relu(),
        }
    }
}

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
/// and the pack cache their packed form comes from and goes to. Not part
/// of config.json: the model's configs carry it from
/// [`crate::Captioner::load`] to every layer.
#[derive(Debug, Clone, Default)]
pub struct LinearOptions {
    pub quantization: Option<Quantization>,
    pub pack_cache: Option<std::sync::Arc<pack_cache::PackCache>>,
}

impl LinearOptions {
    /// The layer whose weight is `<vb prefix>.weight`, `[out_dim, in_dim]`:
    /// from the pack cache when it holds it, else built from `read`'s
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
            .pack_cache
            .as_ref()
            .and_then(|cache| cache.linear(&name, out_dim, in_dim, vb.dtype()))
        {
            return Ok(layer);
        }
        let (weight, bias) = read()?;
        let home = self
            .pack_cache
            .as_ref()
            .and_then(|cache| cache.panel_file());
        let layer = Linear::with_format_in(weight, bias, self.quantization, home)?;
        self.remember(&name, &layer);
        Ok(layer)
    }

    /// Offers a layer built without the cache to it, under `name`.
    pub fn remember(&self, name: &str, layer: &Linear) {
        if let Some(cache) = &self.pack_cache {
            cache.remember(name, layer);
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

/// `nn.Linear`: `x · weightᵀ + bias` over the last axis, `weight [out, in]`.
/// A few rows (a decoding step) in half precision go to
/// [`kernels::small_batch_linear`]; the rest to candle's matmul, or to its
/// quantized matmul when the weights are quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    Dense(Tensor),
    /// Float32 weights packed for [`gemm`]'s AVX-512 kernel (the bias
    /// travels inside), on CPUs that have it.
    Packed(std::sync::Arc<gemm::PackedLinear>),
    /// bfloat16 weights packed for [`gemm_bf16`]'s kernels.
    PackedBf16(std::sync::Arc<gemm_bf16::PackedLinearBf16>),
    /// Activations are f32 on the way in (candle's quantized kernels read
    /// f32) and converted back to the model's dtype on the way out.
    Quantized(QMatMul),
    /// q8_0 weights packed for [`gemm_q8`]'s kernel (the bias travels
    /// inside); f32 activations, as for `Quantized`.
    PackedQ8(std::sync::Arc<gemm_q8::PackedLinearQ8>),
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
    /// Float32 weights that stay dense are packed for [`gemm`] where the CPU
    /// runs it (the packed copy replaces the tensor: no memory is added).
    pub fn with_format(
        weight: Tensor,
        bias: Option<Tensor>,
        format: Option<Quantization>,
    ) -> Result<Self> {
        Self::with_format_in(weight, bias, format, None)
    }

    /// [`Self::with_format`], packing into `file` (the pack cache's file in
    /// the making) where it has room.
    pub(crate) fn with_format_in(
        weight: Tensor,
        bias: Option<Tensor>,
        format: Option<Quantization>,
        file: Option<&std::sync::Arc<panels::PanelFile>>,
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

    /// Float32 weights packed for [`gemm`], bfloat16 ones for [`gemm_bf16`]
    /// (the caller checked the CPU runs them).
    fn packed(self, file: Option<&std::sync::Arc<panels::PanelFile>>) -> Result<Self> {
        let LinearWeight::Dense(weight) = &self.weight else {
            return Ok(self);
        };
        let (n, k) = weight.dims2()?;
        // The bias joins the f32 sums, before any rounding to the output type.
        let bias = match &self.bias {
            Some(bias) => Some(bias.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let weight = match weight.dtype() {
            DType::BF16 => {
                LinearWeight::PackedBf16(std::sync::Arc::new(gemm_bf16::PackedLinearBf16 {
                    weight: with_values(weight, |values| {
                        gemm_bf16::PackedMatrixBf16::from_transposed_in(values, n, k, file)
                    })?,
                    bias,
                }))
            }
            _ => LinearWeight::Packed(std::sync::Arc::new(gemm::PackedLinear {
                weight: with_values(weight, |values| {
                    gemm::PackedMatrix::from_transposed_in(values, n, k, k, file)
                })?,
                bias,
            })),
        };
        Ok(Self { weight, bias: None })
    }

    /// q8_0 blocks repacked for [`gemm_q8`]'s kernel (the caller checked
    /// the CPU runs it), the bias moved inside.
    fn packed_q8(self, file: Option<&std::sync::Arc<panels::PanelFile>>) -> Result<Self> {
        let LinearWeight::Quantized(QMatMul::QTensor(blocks)) = &self.weight else {
            return Ok(self);
        };
        let (n, k) = blocks.shape().dims2()?;
        let bias = match &self.bias {
            Some(bias) => Some(bias.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let weight = gemm_q8::PackedMatrixQ8::from_ggml_in(&blocks.data()?, n, k, file);
        Ok(Self {
            weight: LinearWeight::PackedQ8(std::sync::Arc::new(gemm_q8::PackedLinearQ8 {
                weight,
                bias,
            })),
            bias: None,
        })
    }

    /// Whether the weights are packed for [`gemm`]'s kernel.
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
            LinearWeight::Dense(weight) if kernels::small_batch_linear_fits(&flat, weight) => {
                kernels::small_batch_linear(&flat, weight, self.bias.as_ref())?
            }
            LinearWeight::Dense(weight) => {
                add_bias(flat.matmul(&weight.t()?)?, self.bias.as_ref())?
            }
            LinearWeight::Packed(op) => flat.contiguous()?.apply_op1_no_bwd(op.as_ref())?,
            LinearWeight::PackedBf16(op) => flat.contiguous()?.apply_op1_no_bwd(op.as_ref())?,
            LinearWeight::Quantized(weight) => {
                let product = weight
                    .forward(&flat.to_dtype(DType::F32)?)?
                    .to_dtype(xs.dtype())?;
                add_bias(product, self.bias.as_ref())?
            }
            LinearWeight::PackedQ8(op) => flat
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1_no_bwd(op.as_ref())?
                .to_dtype(xs.dtype())?,
        };
        let out_dim = product.dim(1)?;
        let mut out_dims = lead.to_vec();
        out_dims.push(out_dim);
        product.reshape(out_dims)
    }
}

/// `nn.Embedding`: rows of a `[vocab, hidden]` table by token id. When the
/// table is also an output projection's weight (tied word embeddings) and
/// that projection is packed, the rows are read out of the packed copy, so
/// the table is not held twice (OPT-2.7b's is 515 MB in float32).
#[derive(Debug, Clone)]
pub enum TokenEmbedding {
    Dense(candle_nn::Embedding),
    Packed(std::sync::Arc<gemm::PackedLinear>),
    PackedBf16(std::sync::Arc<gemm_bf16::PackedLinearBf16>),
}

impl TokenEmbedding {
    /// The table at `<vb prefix>.weight`, `[vocab, hidden]`; read out of the
    /// packed output projection tied to it when the pack cache holds that
    /// (the models save a tied head under its table's name).
    pub fn new(
        vocab: usize,
        hidden: usize,
        options: &LinearOptions,
        vb: VarBuilder,
    ) -> Result<Self> {
        let name = format!("{}.weight", vb.prefix());
        match &options.pack_cache {
            Some(cache) if cache.holds_packed(&name) => {
                let head = cache.linear(&name, vocab, hidden, vb.dtype());
                if let Some(table) = head.as_ref().and_then(Self::read_out_of) {
                    return Ok(table);
                }
            }
            _ => {}
        }
        Ok(Self::Dense(candle_nn::embedding(vocab, hidden, vb)?))
    }

    /// The table, read out of `head`'s weight when that is packed.
    fn read_out_of(head: &Linear) -> Option<Self> {
        match &head.weight {
            LinearWeight::Packed(packed) => Some(Self::Packed(packed.clone())),
            LinearWeight::PackedBf16(packed) => Some(Self::PackedBf16(packed.clone())),
            LinearWeight::Dense(_) | LinearWeight::Quantized(_) | LinearWeight::PackedQ8(_) => None,
        }
    }

    /// The output projection tied to this table (at `table_vb`), with the
    /// bias `bias` gives: built from the table as [`LinearOptions::layer`]
    /// builds layers, so the pack cache keeps it under the table's name; or,
    /// for a table that came out of the cache, the packed head (bias
    /// included) it is read out of.
    pub fn tied_head(
        &self,
        options: &LinearOptions,
        table_vb: &VarBuilder,
        bias: impl FnOnce() -> Result<Option<Tensor>>,
    ) -> Result<Linear> {
        let weight = match self {
            Self::Dense(embedding) => {
                let table = embedding.embeddings();
                let (vocab, hidden) = table.dims2()?;
                return options.layer(table_vb, hidden, vocab, || Ok((table.clone(), bias()?)));
            }
            Self::Packed(packed) => LinearWeight::Packed(packed.clone()),
            Self::PackedBf16(packed) => LinearWeight::PackedBf16(packed.clone()),
        };
        Ok(Linear { weight, bias: None })
    }

    /// This table, read from now on out of `head`'s packed weight when the
    /// head (from [`Self::tied_head`]) is packed; unchanged otherwise.
    pub fn tied_to(self, head: &Linear) -> Self {
        Self::read_out_of(head).unwrap_or(self)
    }

    pub fn device(&self) -> Device {
        match self {
            Self::Dense(embedding) => embedding.embeddings().device().clone(),
            Self::Packed(_) | Self::PackedBf16(_) => Device::Cpu,
        }
    }

    /// `ids [..]` -> `[.., hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(embedding) => embedding.forward(ids),
            Self::Packed(head) => {
                let weight = &head.weight;
                gather_columns(ids, weight.n(), weight.k(), |id, row| {
                    weight.copy_column(id, row)
                })
            }
            Self::PackedBf16(head) => {
                let weight = &head.weight;
                gather_columns(ids, weight.n(), weight.k(), |id, row| {
                    weight.copy_column(id, row)
                })
            }
        }
    }
}

/// `ids [..]` -> `[.., hidden]`, row by row from `copy_column(id, row)`.
fn gather_columns<T: candle_core::WithDType>(
    ids: &Tensor,
    vocab: usize,
    hidden: usize,
    copy_column: impl Fn(usize, &mut [T]),
) -> Result<Tensor> {
    let flat = ids.flatten_all()?.to_vec1::<u32>()?;
    let mut out = vec![T::zero(); flat.len() * hidden];
    for (&id, row) in flat.iter().zip(out.chunks_mut(hidden)) {
        if id as usize >= vocab {
            candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
        }
        copy_column(id as usize, row);
    }
    let mut dims = ids.dims().to_vec();
    dims.push(hidden);
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// `f` on a CPU tensor's values, straight from its buffer (no copy of a
/// contiguous one).
fn with_values<T: candle_core::WithDType, R>(
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

/// Whether a dense weight is packed: float32 for [`gemm`], bfloat16 for
/// [`gemm_bf16`], on a CPU that runs the kernel.
fn packable(weight: &Tensor) -> bool {
    weight.device().is_cpu()
        && match weight.dtype() {
            DType::F32 => gemm::available(),
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
/// A decoding step (one query, no mask) goes to the single-query kernel.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    if mask.is_none() && q.dim(2)? == 1 {
        let rows: Vec<u32> = (0..q.dim(0)? as u32).collect();
        return kernels::single_query_attention(q, k, v, &rows, scale);
    }
    general_attention(q, k, v, scale, mask)
}

/// [`scaled_dot_product_attention`] with candle's general operations.
/// Half-precision scores are softmaxed in f32, where their exponentials fit.
pub fn general_attention(
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
            kernels::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(scores.dtype())?
        }
        _ => kernels::softmax_last_dim(&scores)?,
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

#[cfg(test)]
mod tests {
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
}
