//! A decoding step's kernels: attention from one new query, and linear
//! layers over a few rows.
//!
//! A decoding step attends from one new query per sequence and head. Written
//! as `q kᵀ`, softmax, `p v`, candle runs each of the two products as one
//! small GEMM call per (sequence, head), each a separate dispatch to the
//! thread pool: 2 × 8 × 12 calls per layer for 8 BLIP captions, where the
//! arithmetic is tiny. Measured on BLIP-base, batch 8: ~73% of a decoding
//! step went to those calls. [`single_query_attention`] does the whole thing
//! in one pass per (sequence, head), one dispatch per call, and reads each
//! sequence's keys and values through a row index, so beams of one image
//! share the image's cross-attention keys and values instead of copying them.

use half::{bf16, f16};
use rayon::prelude::*;

/// The shape of a single-query attention: `q [rows, heads, 1, head_dim]`,
/// `k` and `v [kv_rows, heads, keys, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SingleQuery {
    pub heads: usize,
    pub keys: usize,
    pub head_dim: usize,
}

/// softmax(q kᵀ · scale) v for one query per (row, head), row `r` of `q`
/// reading keys and values row `kv_index[r]`; contiguous slices in the
/// shapes [`SingleQuery`] names. One task per (row, head): scores,
/// softmax, weighted sum of values, computed in f32.
///
/// # Panics
/// If an index points past `k` and `v`, or the slices are too short.
pub fn single_query_attention<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    kv_index: &[u32],
    shape: SingleQuery,
    scale: f32,
) -> Vec<T> {
    let SingleQuery {
        heads,
        keys,
        head_dim: d,
    } = shape;
    assert!(
        q.len() >= kv_index.len() * heads * d,
        "single-query attention: q too short"
    );
    let mut out = vec![T::from_f32(0.0); kv_index.len() * heads * d];
    out.par_chunks_mut(d)
        .zip(q.par_chunks(d))
        .enumerate()
        .for_each(|(task, (out, q))| {
            let (row, head) = (task / heads, task % heads);
            let start = (kv_index[row] as usize * heads + head) * keys * d;
            let k = &k[start..start + keys * d];
            let v = &v[start..start + keys * d];
            attend_one(q, k, v, scale, out);
        });
    out
}

/// The element types the kernel reads, widened to f32 for arithmetic.
pub trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

/// The half types convert through the `half` crate's own (vectorisable) conversions.
macro_rules! half_element {
    ($t:ty) => {
        impl Element for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[inline(always)]
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
            }
        }
    };
}
half_element!(bf16);
half_element!(f16);

/// Picks the widest vector unit the CPU has at run time (the binary is built
/// for baseline x86-64).
fn attend_one<T: Element>(q: &[T], k: &[T], v: &[T], scale: f32, out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { attend_one_avx2(q, k, v, scale, out) };
    }
    attend_one_body(q, k, v, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn attend_one_avx2<T: Element>(q: &[T], k: &[T], v: &[T], scale: f32, out: &mut [T]) {
    attend_one_body(q, k, v, scale, out)
}

/// Lanes of independent partial sums: enough for the compiler to fill a
/// vector register and hide the add latency.
const LANES: usize = 8;

#[inline(always)]
fn attend_one_body<T: Element>(q: &[T], k: &[T], v: &[T], scale: f32, out: &mut [T]) {
    let d = q.len();
    // Plain loops, not `map(..).collect()`: the collect's fold was compiled
    // out of line, for baseline x86-64, so the scores (the bulk of the
    // work) ran on SSE2 with scalar bf16 widening: 26% of a bf16 decoding
    // step, 9% in this function proper.
    let mut q_wide = vec![0.0f32; d];
    for (w, x) in q_wide.iter_mut().zip(q) {
        *w = x.to_f32();
    }
    let mut scores = vec![0.0f32; k.len() / d.max(1)];
    for (score, key) in scores.iter_mut().zip(k.chunks_exact(d)) {
        *score = dot(&q_wide, key) * scale;
    }
    // softmax, normalised before the weighted sum as torch's softmax-then-matmul does.
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in &mut scores {
        *s = (*s - max).exp();
        sum += *s;
    }
    let mut acc = vec![0.0f32; d];
    for (p, value) in scores.iter().zip(v.chunks_exact(d)) {
        let p = p / sum;
        for (a, x) in acc.iter_mut().zip(value) {
            *a += p * x.to_f32();
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = T::from_f32(a);
    }
}

#[inline(always)]
fn dot<T: Element>(q: &[f32], key: &[T]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut q_chunks = q.chunks_exact(LANES);
    let mut k_chunks = key.chunks_exact(LANES);
    for (qc, kc) in (&mut q_chunks).zip(&mut k_chunks) {
        for l in 0..LANES {
            lanes[l] += qc[l] * kc[l].to_f32();
        }
    }
    let tail: f32 = q_chunks
        .remainder()
        .iter()
        .zip(k_chunks.remainder())
        .map(|(a, b)| a * b.to_f32())
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// Most rows [`small_batch_linear`] takes: up to here the weights dominate
/// the cost and reading them once wins; beyond, candle's GEMM (which packs
/// the weights into tiles first) is faster.
pub const SMALL_BATCH_ROWS: usize = 16;

/// `x [rows, in] · weightᵀ [in, out] (+ bias)` for a few rows: a decoding
/// step in half precision. Each thread streams its share of the weight rows
/// once, widening them to f32, and takes the dot product of each with every
/// input row, which stay in cache; so a bf16 model decodes at half the
/// memory traffic of f32 instead of slower. `weight [out, in]` as stored by
/// torch, `x [rows, k]` of the same type, both contiguous; `[rows, n]` out.
///
/// # Panics
/// If the slices are shorter than the shapes say.
pub fn small_batch_linear<T: Element>(x: &[T], w: &[T], rows: usize, k: usize, n: usize) -> Vec<T> {
    assert!(
        x.len() >= rows * k && w.len() >= n * k,
        "small-batch linear: slices too short"
    );
    let x: Vec<f32> = x[..rows * k].iter().map(|v| v.to_f32()).collect();
    // Computed output-major (one task owns a run of outputs for all rows),
    // transposed into [rows, out] at the end.
    let mut by_output = vec![0.0f32; n * rows];
    by_output
        .par_chunks_mut(OUTPUTS_PER_TASK * rows)
        .zip(w.par_chunks(OUTPUTS_PER_TASK * k))
        .for_each(|(out, w)| dot_rows(&x, w, k, out));
    let mut out = vec![T::from_f32(0.0); rows * n];
    for (j, per_row) in by_output.chunks_exact(rows).enumerate() {
        for (i, &v) in per_row.iter().enumerate() {
            out[i * n + j] = T::from_f32(v);
        }
    }
    out
}

/// Weight rows per task: big enough that scheduling is noise, small enough
/// that two threads share the work evenly.
const OUTPUTS_PER_TASK: usize = 64;

/// For each weight row in `w` (`k` wide), its dot product with every row of
/// `x`, written to `out[weight_row * rows + x_row]`.
fn dot_rows<T: Element>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx2_fma {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { dot_rows_avx2(x, w, k, out) };
    }
    dot_rows_body(x, w, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_rows_avx2<T: Element>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
    dot_rows_body(x, w, k, out)
}

#[inline(always)]
fn dot_rows_body<T: Element>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
    let rows = x.len() / k;
    let mut widened = vec![0.0f32; k];
    for (w_row, out) in w.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
        for (dst, src) in widened.iter_mut().zip(w_row) {
            *dst = src.to_f32();
        }
        for (o, x_row) in out.iter_mut().zip(x.chunks_exact(k)) {
            *o = dot(x_row, &widened);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{random, relative_difference};

    /// Five rows (beams) reading two images' keys, odd sizes for the
    /// tails: the dispatched kernel equals the portable body bit for bit
    /// (the same operations in the same order, whatever the vector width)
    /// and an f64 reference to 1e-5.
    #[test]
    fn single_query_attention_matches_its_portable_body_and_the_reference() {
        let shape = SingleQuery {
            heads: 3,
            keys: 37,
            head_dim: 20,
        };
        let (heads, keys, d) = (shape.heads, shape.keys, shape.head_dim);
        let index = [1u32, 0, 0, 1, 1];
        let q = random(index.len() * heads * d, 1);
        let k = random(2 * heads * keys * d, 2);
        let v = random(2 * heads * keys * d, 3);
        let ours = single_query_attention(&q, &k, &v, &index, shape, 0.3);
        let mut portable = vec![0.0f32; ours.len()];
        let mut reference = vec![0.0f32; ours.len()];
        for (task, (out, q)) in portable.chunks_mut(d).zip(q.chunks(d)).enumerate() {
            let (row, head) = (task / heads, task % heads);
            let start = (index[row] as usize * heads + head) * keys * d;
            let (k, v) = (&k[start..][..keys * d], &v[start..][..keys * d]);
            attend_one_body(q, k, v, 0.3, out);
            let scores: Vec<f64> = k
                .chunks(d)
                .map(|key| 0.3 * q.iter().zip(key).map(|(a, b)| (a * b) as f64).sum::<f64>())
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for (i, r) in reference[task * d..][..d].iter_mut().enumerate() {
                let value: f64 = (0..keys).map(|j| weights[j] * v[j * d + i] as f64).sum();
                *r = (value / total) as f32;
            }
        }
        assert_eq!(ours, portable);
        let difference = relative_difference(&ours, &reference);
        assert!(difference < 1e-5, "relative difference {difference}");
    }

    /// 200 outputs: three full tasks of 64 and a partial one.
    #[test]
    fn small_batch_linear_matches_its_portable_body_and_the_reference() {
        let (k, n) = (77, 200);
        for rows in [1, 3, 8] {
            let x = random(rows * k, 9);
            let w = random(n * k, 10);
            let ours = small_batch_linear(&x, &w, rows, k, n);
            let mut by_output = vec![0.0f32; n * rows];
            dot_rows_body(&x, &w, k, &mut by_output);
            let portable: Vec<f32> = (0..rows * n)
                .map(|i| by_output[(i % n) * rows + i / n])
                .collect();
            assert_eq!(ours, portable, "{rows} rows");
            let reference: Vec<f32> = (0..rows * n)
                .map(|i| {
                    let (row, column) = (i / n, i % n);
                    (0..k)
                        .map(|d| (x[row * k + d] * w[column * k + d]) as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            let difference = relative_difference(&ours, &reference);
            assert!(
                difference < 1e-5,
                "{rows} rows: relative difference {difference}"
            );
        }
    }
}
