//! Attention: the one entry point models call for each shape of it, which
//! picks the kernel (our fused and single-query kernels on the CPU,
//! candle's general operations elsewhere), and the KV cache.

use candle_core::{DType, Result, Tensor, D};
use caption_kernels::decode::SingleQuery;
use caption_kernels::{attention_amx, gemm_bf16, gemm_f32};

use super::activation::softmax_last_dim;
use super::ops::{FusedSelfAttention, SingleQueryAttention};

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

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if let Some((k, v)) = self.kv.take() {
            let keep = len.min(k.dim(2)?);
            if keep > 0 {
                self.kv = Some((k.narrow(2, 0, keep)?, v.narrow(2, 0, keep)?));
            }
        }
        Ok(())
    }

    pub fn clear(&mut self) {
        self.kv = None;
    }
}

/// The self-attention keys and values of every layer of a decoder, for a
/// batch of sequences.
#[derive(Debug, Clone)]
pub struct LayerCaches {
    layers: Vec<KvCache>,
}

impl LayerCaches {
    /// Empty caches for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![KvCache::default(); layers],
        }
    }

    /// Positions already seen: where the next token sits.
    pub fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::seq_len)
    }

    /// Keeps (and reorders) the batch rows named by `rows`.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for cache in &mut self.layers {
            cache.select_rows(rows)?;
        }
        Ok(())
    }

    /// Forgets every position from `len` on (a conversation whose next
    /// prompt shares only the first `len` tokens with what was read).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for cache in &mut self.layers {
            cache.truncate(len)?;
        }
        Ok(())
    }

    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, KvCache> {
        self.layers.iter_mut()
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

/// What an attention call needs besides `q`, `k` and `v`.
#[derive(Debug, Clone, Copy)]
pub struct SdpaParams<'a> {
    /// What `q kᵀ` is multiplied by (transformers divides by √head_dim).
    pub scale: f64,
    /// Added to the scores, broadcast over batch and heads: a causal or
    /// padding mask (0 where a query may look, -inf where not).
    pub mask: Option<&'a Tensor>,
    /// Row `r` of `q` reads row `kv_rows[r]` of `k` and `v`, so the beams of
    /// one image share its cross-attention keys and values instead of
    /// copying them; `None`: row `r` reads row `r`.
    pub kv_rows: Option<&'a [u32]>,
}

impl SdpaParams<'_> {
    /// Unmasked, each row its own keys.
    pub fn scaled(scale: f64) -> Self {
        Self {
            scale,
            mask: None,
            kv_rows: None,
        }
    }
}

/// softmax(q kᵀ · scale + mask) v over `q [rows, heads, queries,
/// head_dim]` and `k`, `v [kv_rows, heads, keys, head_dim]`: the attention
/// every model calls. A decoding step (one query, no mask) goes to the
/// single-query kernel on the CPU; the rest to candle's operations.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    params: &SdpaParams,
) -> Result<Tensor> {
    let SdpaParams {
        scale,
        mask,
        kv_rows,
    } = *params;
    let identity: Vec<u32>;
    let rows = match kv_rows {
        Some(rows) => rows,
        None => {
            identity = (0..q.dim(0)? as u32).collect();
            &identity
        }
    };
    match mask {
        None if q.dim(2)? == 1 => single_query_attention(q, k, v, rows, scale),
        None => reference_attention(q, k, v, rows, scale),
        Some(mask) => {
            let (k, v) = gather_rows(k, v, rows)?;
            general_attention(q, &k, &v, scale, Some(mask))
        }
    }
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
            softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(scores.dtype())?
        }
        _ => softmax_last_dim(&scores)?,
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

/// softmax(q kᵀ · scale) v for every head of a ViT's fused projection `qkv
/// [batch, tokens, 3 · heads · head_dim]` (laid out `[3, heads, head_dim]`
/// per token, as `BlipAttention` reshapes it), no mask: the merged context
/// `[batch, tokens, heads · head_dim]`.
pub fn fused_qkv_attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, t, width) = qkv.dims3()?;
    let head_dim = width / 3 / heads.max(1);
    if super::own_kernels(qkv.device())
        && qkv.dtype() == DType::BF16
        && attention_amx::fits(head_dim)
    {
        // bf16 on AMX tiles, in place of widening to f32 for the kernel
        // below and rounding back (BLIP-base vision at batch 1 on a
        // 2-vCPU AMX Xeon: 0.20 s to 0.18 s).
        let op = FusedSelfAttention {
            heads,
            scale: scale as f32,
        };
        return qkv.contiguous()?.apply_op1_no_bwd(&op);
    }
    let fused_kernel = super::own_kernels(qkv.device())
        && match qkv.dtype() {
            DType::F32 => gemm_f32::available(),
            // bf16 projections widened to f32 for the same kernel: candle's
            // bf16 matmul is slower than the widening, and the attention is
            // then computed more exactly than bf16 would.
            DType::BF16 => gemm_bf16::available(),
            _ => false,
        };
    if fused_kernel {
        let op = FusedSelfAttention {
            heads,
            scale: scale as f32,
        };
        return qkv
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(&op)?
            .to_dtype(qkv.dtype());
    }
    // [b, t, 3, heads, hd] -> [3, b, heads, t, hd], as transformers permutes.
    let qkv = qkv
        .reshape((b, t, 3, heads, head_dim))?
        .permute((2, 0, 3, 1, 4))?;
    let q = qkv.get(0)?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let context = scaled_dot_product_attention(&q, &k, &v, &SdpaParams::scaled(scale))?;
    merge_heads(&context)
}

/// softmax(q kᵀ · scale) v for one query per (row, head).
///
/// `q [rows, heads, 1, head_dim]`; `k`, `v [kv_rows, heads, keys, head_dim]`;
/// row `r` of `q` reads keys and values row `kv_index[r]`. Returns `[rows,
/// heads, 1, head_dim]` in `q`'s dtype. No mask: a single new query may look
/// at every cached position. The CPU kernel covers f32 and the half types
/// (computing in f32); float64 and other devices take the general path.
pub fn single_query_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv_index: &[u32],
    scale: f64,
) -> Result<Tensor> {
    let (rows, heads, one, head_dim) = q.dims4()?;
    let (kv_rows, k_heads, keys, k_dim) = k.dims4()?;
    if one != 1 || k_heads != heads || k_dim != head_dim || v.dims() != k.dims() {
        candle_core::bail!(
            "single-query attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if kv_index.len() != rows || kv_index.iter().any(|&i| i as usize >= kv_rows) {
        candle_core::bail!(
            "single-query attention: kv_index does not map {rows} rows into {kv_rows}"
        );
    }
    let fast = super::own_kernels(q.device())
        && matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && q.dtype() == k.dtype()
        && k.dtype() == v.dtype()
        && keys > 0;
    if !fast {
        return reference_attention(q, k, v, kv_index, scale);
    }
    let op = SingleQueryAttention {
        kv_index: kv_index.to_vec(),
        scale: scale as f32,
        shape: SingleQuery {
            heads,
            keys,
            head_dim,
        },
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

/// The same product with candle's general operations (and the gather made
/// explicit): float64, GPUs, and the tests' yardstick for the kernel.
pub fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv_index: &[u32],
    scale: f64,
) -> Result<Tensor> {
    let (k, v) = gather_rows(k, v, kv_index)?;
    general_attention(q, &k, &v, scale, None)
}

/// Rows `rows` of `k` and `v`, in that order (themselves when that is
/// every row in order).
fn gather_rows(k: &Tensor, v: &Tensor, rows: &[u32]) -> Result<(Tensor, Tensor)> {
    let identity =
        rows.len() == k.dim(0)? && rows.iter().enumerate().all(|(i, &r)| i == r as usize);
    if identity {
        return Ok((k.clone(), v.clone()));
    }
    let index = Tensor::new(rows, k.device())?;
    Ok((k.index_select(&index, 0)?, v.index_select(&index, 0)?))
}

#[cfg(test)]
mod tests {
    use super::super::test_data::{max_abs_diff, random};
    use super::*;

    #[test]
    fn matches_the_general_path_with_shared_rows() {
        // 5 rows (beams) reading 2 images' keys, odd sizes to exercise the tails.
        let q = random(&[5, 3, 1, 20], 1);
        let k = random(&[2, 3, 37, 20], 2);
        let v = random(&[2, 3, 37, 20], 3);
        let index = [1, 0, 0, 1, 1];
        let ours = single_query_attention(&q, &k, &v, &index, 0.3).unwrap();
        let reference = reference_attention(&q, &k, &v, &index, 0.3).unwrap();
        assert_eq!(ours.dims(), &[5, 3, 1, 20]);
        let diff = max_abs_diff(&ours, &reference);
        assert!(diff < 1e-5, "max |difference| {diff}");
    }

    #[test]
    fn half_types_compute_in_f32() {
        let q = random(&[2, 2, 1, 64], 4);
        let k = random(&[2, 2, 9, 64], 5);
        let v = random(&[2, 2, 9, 64], 6);
        let reference = reference_attention(&q, &k, &v, &[0, 1], 0.125).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let [q, k, v] = [&q, &k, &v].map(|t| t.to_dtype(dtype).unwrap());
            let ours = single_query_attention(&q, &k, &v, &[0, 1], 0.125)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            // The inputs' rounding to the half type dominates the difference.
            let diff = max_abs_diff(&ours, &reference);
            assert!(diff < 0.05, "{dtype:?}: max |difference| {diff}");
        }
    }

    #[test]
    fn rejects_an_index_past_the_keys() {
        let q = random(&[2, 1, 1, 8], 7);
        let k = random(&[1, 1, 4, 8], 8);
        assert!(single_query_attention(&q, &k, &k, &[0, 1], 1.0).is_err());
    }
}
