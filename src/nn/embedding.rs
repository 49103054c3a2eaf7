//! `nn.Embedding`, which can read its rows out of a tied output
//! projection's packed weight.

use std::sync::Arc;

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use caption_kernels::bf16_panels::Bf16Panels;
use caption_kernels::gemm_f32::F32Panels;
use caption_kernels::PackedLinear;

use super::linear::{Linear, LinearOptions, LinearWeight};

/// `nn.Embedding`: rows of a `[vocab, hidden]` table by token id. When the
/// table is also an output projection's weight (tied word embeddings) and
/// that projection is packed, the rows are read out of the packed copy, so
/// the table is not held twice (OPT-2.7b's is 515 MB in float32).
#[derive(Debug, Clone)]
pub enum TokenEmbedding {
    Dense(candle_nn::Embedding),
    Packed(Arc<PackedLinear<F32Panels>>),
    PackedBf16(Arc<PackedLinear<Bf16Panels>>),
}

impl TokenEmbedding {
    /// The table at `<vb prefix>.weight`, `[vocab, hidden]`; read out of the
    /// packed output projection tied to it when the pack cache holds that
    /// (models save a tied head under its table's name).
    pub fn new(
        vocab: usize,
        hidden: usize,
        options: &LinearOptions,
        vb: VarBuilder,
    ) -> Result<Self> {
        let name = format!("{}.weight", vb.prefix());
        match &options.weight_cache {
            Some(cache) if cache.holds_packed(&name) => {
                let head = cache
                    .layer(&name, vocab, hidden, vb.dtype())
                    .map(Linear::from_cached);
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
