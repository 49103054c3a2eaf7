//! The kernels as candle operations: each `CustomOp` checks the storage's
//! dtype and layout, hands the kernel plain slices and wraps its output.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape,
};
use caption_kernels::decode::{Element, SingleQuery};
use caption_kernels::{attention, attention_amx, decode, elementwise};
use caption_kernels::{PackedLinear, PackedProduct, PanelLayout};
use half::bf16;

/// `data`'s values under a contiguous `layout`.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: needs a contiguous input"),
    }
}

/// The element types a packed product reads and writes, as candle stores them.
pub(crate) trait StoredAs: Sized {
    fn values(storage: &CpuStorage) -> Option<&[Self]>;
    fn storage(values: Vec<Self>) -> CpuStorage;
}

impl StoredAs for f32 {
    fn values(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F32(values) => Some(values),
            _ => None,
        }
    }
    fn storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(values)
    }
}

impl StoredAs for bf16 {
    fn values(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::BF16(values) => Some(values),
            _ => None,
        }
    }
    fn storage(values: Vec<Self>) -> CpuStorage {
        CpuStorage::BF16(values)
    }
}

/// `nn.Linear` on a packed matrix, the bias inside: a candle op on `x
/// [rows, k]` (contiguous, on the CPU), giving `[rows, n]`.
pub(crate) struct PackedOp<'a, L: PanelLayout>(pub &'a PackedLinear<L>);

impl<L> CustomOp1 for PackedOp<'_, L>
where
    L: PackedProduct,
    L::Value: StoredAs + Default,
{
    fn name(&self) -> &'static str {
        L::NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let PackedLinear { weight, bias } = self.0;
        let (rows, width) = layout.shape().dims2()?;
        if width != weight.k() {
            candle_core::bail!(
                "{}: input width {width}, weights expect {}",
                L::NAME,
                weight.k()
            );
        }
        let Some(values) = L::Value::values(storage) else {
            candle_core::bail!("{}: input of dtype {:?}", L::NAME, storage.dtype());
        };
        let xs = contiguous(values, layout, L::NAME)?;
        let mut out = vec![L::Value::default(); rows * weight.n()];
        L::product(weight, xs, rows, bias.as_deref(), &mut out);
        Ok((L::Value::storage(out), Shape::from((rows, weight.n()))))
    }
}

/// The ViT's fused self-attention over `qkv [batch, tokens, 3 · d]`: in f32
/// on the AVX-512 kernel, or in bf16 on AMX tiles.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FusedSelfAttention {
    pub heads: usize,
    pub scale: f32,
}

impl CustomOp1 for FusedSelfAttention {
    fn name(&self) -> &'static str {
        "fused-self-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, tokens, width) = layout.shape().dims3()?;
        let Some(shape) = attention::FusedQkv::new(batch, tokens, width, self.heads) else {
            candle_core::bail!("fused attention: width {width} for {} heads", self.heads);
        };
        let out_shape = Shape::from((batch, tokens, shape.d));
        match storage {
            CpuStorage::F32(data) => {
                let qkv = contiguous(data, layout, "fused attention")?;
                let mut out = vec![0.0f32; shape.output_len()];
                attention::fused_self_attention(qkv, shape, self.scale, &mut out);
                Ok((CpuStorage::F32(out), out_shape))
            }
            CpuStorage::BF16(data) => {
                if !attention_amx::fits(shape.head_dim) {
                    candle_core::bail!(
                        "AMX attention: heads of {} do not fit the tiles here",
                        shape.head_dim
                    );
                }
                let qkv = contiguous(data, layout, "fused attention")?;
                let mut out = vec![bf16::ZERO; shape.output_len()];
                attention_amx::fused_self_attention(qkv, shape, self.scale, &mut out);
                Ok((CpuStorage::BF16(out), out_shape))
            }
            other => candle_core::bail!("fused attention: no kernel for {:?}", other.dtype()),
        }
    }
}

/// softmax(q kᵀ · scale) v for one query per (row, head), row `r` of `q`
/// reading keys and values row `kv_index[r]`.
pub(crate) struct SingleQueryAttention {
    pub kv_index: Vec<u32>,
    pub scale: f32,
    pub shape: SingleQuery,
}

impl SingleQueryAttention {
    fn run<T: Element>(
        &self,
        (q, q_layout): (&[T], &Layout),
        (k, k_layout): (&[T], &Layout),
        (v, v_layout): (&[T], &Layout),
    ) -> Result<Vec<T>> {
        let op = "single-query attention";
        Ok(decode::single_query_attention(
            contiguous(q, q_layout, op)?,
            contiguous(k, k_layout, op)?,
            contiguous(v, v_layout, op)?,
            &self.kv_index,
            self.shape,
            self.scale,
        ))
    }
}

impl CustomOp3 for SingleQueryAttention {
    fn name(&self) -> &'static str {
        "single-query-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = q_layout.shape().clone();
        let storage = match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.run((q, q_layout), (k, k_layout), (v, v_layout))?)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                CpuStorage::BF16(self.run((q, q_layout), (k, k_layout), (v, v_layout))?)
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                CpuStorage::F16(self.run((q, q_layout), (k, k_layout), (v, v_layout))?)
            }
            _ => candle_core::bail!("single-query attention: unsupported dtype {:?}", q.dtype()),
        };
        Ok((storage, shape))
    }
}

/// `x [rows, k] · weightᵀ` for a few rows, streaming the weights once.
pub(crate) struct SmallBatchLinear {
    pub rows: usize,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl SmallBatchLinear {
    fn run<T: Element>(
        &self,
        (x, x_layout): (&[T], &Layout),
        (w, w_layout): (&[T], &Layout),
    ) -> Result<Vec<T>> {
        let op = "small-batch linear";
        Ok(decode::small_batch_linear(
            contiguous(x, x_layout, op)?,
            contiguous(w, w_layout, op)?,
            self.rows,
            self.in_dim,
            self.out_dim,
        ))
    }
}

impl CustomOp2 for SmallBatchLinear {
    fn name(&self) -> &'static str {
        "small-batch-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.rows, self.out_dim));
        let storage = match (x, w) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(self.run((x, x_layout), (w, w_layout))?)
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                CpuStorage::BF16(self.run((x, x_layout), (w, w_layout))?)
            }
            (CpuStorage::F16(x), CpuStorage::F16(w)) => {
                CpuStorage::F16(self.run((x, x_layout), (w, w_layout))?)
            }
            _ => candle_core::bail!("small-batch linear: unsupported dtype {:?}", x.dtype()),
        };
        Ok((storage, shape))
    }
}

/// bf16 `xs + residual`, each sum rounded once.
pub(crate) struct Bf16Add;

impl CustomOp2 for Bf16Add {
    fn name(&self) -> &'static str {
        "bf16-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::BF16(xs), CpuStorage::BF16(residual)) = (xs, residual) else {
            candle_core::bail!("bf16 add: bf16 only");
        };
        let xs = contiguous(xs, xs_layout, "bf16 add")?;
        let residual = contiguous(residual, residual_layout, "bf16 add")?;
        let mut out = vec![bf16::ZERO; xs.len()];
        elementwise::add_bf16(xs, residual, &mut out);
        Ok((CpuStorage::BF16(out), xs_layout.shape().clone()))
    }
}

/// softmax over the last axis, f32.
pub(crate) struct RowSoftmax;

impl CustomOp1 for RowSoftmax {
    fn name(&self) -> &'static str {
        "row-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("row softmax: f32 only");
        };
        let xs = contiguous(data, layout, "row softmax")?;
        let width = layout.dims().last().copied().unwrap_or(1);
        let mut out = vec![0.0f32; xs.len()];
        elementwise::softmax_rows(xs, width, &mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// The exact GELU, f32 or bf16.
pub(crate) struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match storage {
            CpuStorage::F32(data) => {
                let xs = contiguous(data, layout, "gelu")?;
                let mut out = vec![0.0f32; xs.len()];
                elementwise::gelu_erf(xs, &mut out);
                Ok((CpuStorage::F32(out), layout.shape().clone()))
            }
            CpuStorage::BF16(data) => {
                let xs = contiguous(data, layout, "gelu")?;
                let mut out = vec![bf16::ZERO; xs.len()];
                elementwise::gelu_erf_bf16(xs, &mut out);
                Ok((CpuStorage::BF16(out), layout.shape().clone()))
            }
            _ => candle_core::bail!("gelu: f32 or bf16 only"),
        }
    }
}
