//! The ViT's self-attention from its fused `qkv` projection, in float32 on
//! [`crate::gemm_f32`]'s kernel.
//!
//! softmax(q kᵀ · scale) v for every head of a layer, from the fused
//! projection `[batch, tokens, 3 · heads · head_dim]` (laid out `[3,
//! heads, head_dim]` per token, as `BlipAttention` reshapes it), to the
//! merged context `[batch, tokens, heads · head_dim]`. No mask. One task per
//! (image, head): the keys and values are packed, the scores computed,
//! softmaxed row by row and multiplied out, without the permuted copies of
//! q, k and v and the 12 × 577 × 577 score tensor a general path makes.

use rayon::prelude::*;

use crate::blocks::OutputPtr;
use crate::gemm_f32::{matmul, PackedMatrix};

/// The shape of a ViT's fused projection `qkv [batch, tokens, 3 · d]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedQkv {
    pub heads: usize,
    pub batch: usize,
    pub tokens: usize,
    pub d: usize,
    pub head_dim: usize,
}

impl FusedQkv {
    /// The shape of `qkv [batch, tokens, width]` split into `heads`;
    /// `None` unless `width` is three whole sets of heads.
    pub fn new(batch: usize, tokens: usize, width: usize, heads: usize) -> Option<Self> {
        let d = width / 3;
        if !width.is_multiple_of(3) || heads == 0 || !d.is_multiple_of(heads) {
            return None;
        }
        Some(Self {
            heads,
            batch,
            tokens,
            d,
            head_dim: d / heads,
        })
    }

    /// Values in the projection `[batch, tokens, 3 · d]`.
    pub fn input_len(&self) -> usize {
        self.batch * self.tokens * 3 * self.d
    }

    /// Values in the context `[batch, tokens, d]`.
    pub fn output_len(&self) -> usize {
        self.batch * self.tokens * self.d
    }
}

/// One (image, head) of a fused projection: the image's `tokens` rows of
/// `qkv`, each `width` (3 · d) long, and the columns where the head's
/// queries, keys and values start.
pub(crate) struct QkvHead<'a, T> {
    pub rows: &'a [T],
    pub tokens: usize,
    pub width: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub head_dim: usize,
}

/// Runs `attend(head, out)` for every (image, head) of `qkv [batch, tokens,
/// 3 · d]`, one task each over the thread pool; `out` points at the head's
/// first value in `context [batch, tokens, d]` (its rows `d` apart), which
/// only that task writes.
///
/// # Panics
/// If `qkv` or `context` is shorter than `shape` says.
pub(crate) fn for_each_head<T: Copy + Send + Sync>(
    qkv: &[T],
    shape: FusedQkv,
    context: &mut [T],
    attend: impl Fn(&QkvHead<T>, *mut T) + Sync,
) {
    let FusedQkv {
        heads,
        batch,
        tokens,
        d,
        head_dim,
    } = shape;
    let width = 3 * d;
    assert!(qkv.len() >= shape.input_len() && context.len() >= shape.output_len());
    let context = OutputPtr(context.as_mut_ptr());
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (image, head) = (task / heads, task % heads);
        let head = QkvHead {
            rows: &qkv[image * tokens * width..][..tokens * width],
            tokens,
            width,
            q: head * head_dim,
            k: d + head * head_dim,
            v: 2 * d + head * head_dim,
            head_dim,
        };
        attend(&head, context.at(image * tokens * d + head.q));
    });
}

/// The float32 attention of every head of `qkv` into `context`.
///
/// # Panics
/// If [`crate::gemm_f32::available`] is false, or the slices are shorter
/// than `shape` says.
pub fn fused_self_attention(qkv: &[f32], shape: FusedQkv, scale: f32, context: &mut [f32]) {
    let FusedQkv {
        tokens,
        d,
        head_dim,
        ..
    } = shape;
    for_each_head(qkv, shape, context, |head, out| {
        let q = &head.rows[head.q..];
        let k = &head.rows[head.k..];
        let v = &head.rows[head.v..];
        let keys = PackedMatrix::from_transposed_serial(k, tokens, head_dim, head.width);
        let mut scores = vec![0.0f32; tokens * tokens];
        matmul(
            q,
            tokens,
            head.width,
            &keys,
            None,
            &mut scores,
            tokens,
            false,
        );
        for row in scores.chunks_mut(tokens) {
            crate::elementwise::scaled_softmax_in_place(row, scale);
        }
        let values = PackedMatrix::from_rows_serial(v, tokens, head_dim, head.width);
        // SAFETY: `for_each_head` hands each task its own head's columns of
        // its own image's rows of `context`, which holds them all.
        let out = unsafe { std::slice::from_raw_parts_mut(out, (tokens - 1) * d + head_dim) };
        matmul(&scores, tokens, tokens, &values, None, out, d, false);
    });
}

/// The same attention in plain loops, in f64: the yardstick the fused
/// kernels are tested against.
pub fn reference_self_attention(qkv: &[f32], shape: FusedQkv, scale: f32) -> Vec<f32> {
    let FusedQkv {
        heads,
        batch,
        tokens,
        d,
        head_dim,
    } = shape;
    let width = 3 * d;
    let mut context = vec![0.0f32; shape.output_len()];
    for image in 0..batch {
        let rows = &qkv[image * tokens * width..][..tokens * width];
        for head in 0..heads {
            let column = |token: usize, part: usize, i: usize| {
                rows[token * width + part * d + head * head_dim + i] as f64
            };
            for query in 0..tokens {
                let scores: Vec<f64> = (0..tokens)
                    .map(|key| {
                        let dot: f64 = (0..head_dim)
                            .map(|i| column(query, 0, i) * column(key, 1, i))
                            .sum();
                        dot * scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for i in 0..head_dim {
                    let value: f64 = (0..tokens)
                        .map(|key| weights[key] * column(key, 2, i))
                        .sum();
                    context[(image * tokens + query) * d + head * head_dim + i] =
                        (value / total) as f32;
                }
            }
        }
    }
    context
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{random, relative_difference};

    #[test]
    fn fused_attention_matches_the_reference() {
        if !crate::gemm_f32::available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        // Two images, 3 heads of 20, 37 tokens (no dimension a tile multiple).
        let (batch, tokens, heads, head_dim) = (2, 37, 3, 20);
        let shape = FusedQkv::new(batch, tokens, 3 * heads * head_dim, heads).unwrap();
        let qkv = random(shape.input_len(), 7);
        let scale = (head_dim as f32).powf(-0.5);
        let mut ours = vec![0.0f32; shape.output_len()];
        fused_self_attention(&qkv, shape, scale, &mut ours);
        let expected = reference_self_attention(&qkv, shape, scale);
        let difference = relative_difference(&ours, &expected);
        assert!(difference < 1e-5, "relative difference {difference}");
    }

    #[test]
    fn the_shape_needs_whole_heads() {
        assert!(FusedQkv::new(1, 4, 3 * 60, 3).is_some());
        assert!(FusedQkv::new(1, 4, 3 * 60 + 1, 3).is_none());
        assert!(FusedQkv::new(1, 4, 3 * 61, 3).is_none());
        assert!(FusedQkv::new(1, 4, 3 * 60, 0).is_none());
    }
}
