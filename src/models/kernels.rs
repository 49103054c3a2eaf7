//! CPU kernels for the shapes candle's general operations handle slowly.
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

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};
use half::{bf16, f16};
use rayon::prelude::*;

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
    let fast = matches!(q.device(), Device::Cpu)
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
        keys,
        head_dim,
        heads,
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
    let identity =
        kv_index.len() == k.dim(0)? && kv_index.iter().enumerate().all(|(i, &r)| i == r as usize);
    let (k, v) = if identity {
        (k.clone(), v.clone())
    } else {
        let index = Tensor::new(kv_index, k.device())?;
        (k.index_select(&index, 0)?, v.index_select(&index, 0)?)
    };
    super::general_attention(q, &k, &v, scale, None)
}

struct SingleQueryAttention {
    kv_index: Vec<u32>,
    scale: f32,
    keys: usize,
    head_dim: usize,
    heads: usize,
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
                CpuStorage::F32(self.run(
                    slice(q, q_layout)?,
                    slice(k, k_layout)?,
                    slice(v, v_layout)?,
                ))
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                CpuStorage::BF16(self.run(
                    slice(q, q_layout)?,
                    slice(k, k_layout)?,
                    slice(v, v_layout)?,
                ))
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                CpuStorage::F16(self.run(
                    slice(q, q_layout)?,
                    slice(k, k_layout)?,
                    slice(v, v_layout)?,
                ))
            }
            _ => candle_core::bail!("single-query attention: unsupported dtype {:?}", q.dtype()),
        };
        Ok((storage, shape))
    }
}

fn slice<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("single-query attention needs contiguous inputs"),
    }
}

impl SingleQueryAttention {
    /// One task per (row, head): scores, softmax, weighted sum of values.
    fn run<T: Element>(&self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let (keys, d, heads) = (self.keys, self.head_dim, self.heads);
        let mut out = vec![T::from_f32(0.0); q.len()];
        out.par_chunks_mut(d)
            .zip(q.par_chunks(d))
            .enumerate()
            .for_each(|(task, (out, q))| {
                let (row, head) = (task / heads, task % heads);
                let start = (self.kv_index[row] as usize * heads + head) * keys * d;
                let k = &k[start..start + keys * d];
                let v = &v[start..start + keys * d];
                attend_one(q, k, v, self.scale, out);
            });
        out
    }
}

/// The element types the kernel reads, widened to f32 for arithmetic.
trait Element: Copy + Send + Sync {
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
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { attend_one_avx2(q, k, v, scale, out) };
    }
    attend_one_body(q, k, v, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_one_avx2<T: Element>(q: &[T], k: &[T], v: &[T], scale: f32, out: &mut [T]) {
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
/// torch; `x` and `bias` of the same dtype (f32 works too: the tests'
/// yardstick).
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
    match bias {
        Some(bias) => product.broadcast_add(bias),
        None => Ok(product),
    }
}

/// Whether [`small_batch_linear`] is the faster way for this product: for
/// the half types, whose products candle 0.11 widens to f32 one call at a
/// time (a bf16 BLIP-base vocabulary projection took 66 ms for one row, this
/// kernel 30 ms). For f32, candle's own matrix-vector product streams the
/// weights faster (31 vs 17-19 GB/s here, both threads busy), and at 8 rows
/// the two are level.
pub fn small_batch_linear_fits(x: &Tensor, weight: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu)
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && x.dtype() == weight.dtype()
        && x.rank() == 2
        && x.dim(0).is_ok_and(|rows| rows <= SMALL_BATCH_ROWS)
}

struct SmallBatchLinear {
    rows: usize,
    in_dim: usize,
    out_dim: usize,
}

impl candle_core::CustomOp2 for SmallBatchLinear {
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
                CpuStorage::F32(self.run(slice(x, x_layout)?, slice(w, w_layout)?))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                CpuStorage::BF16(self.run(slice(x, x_layout)?, slice(w, w_layout)?))
            }
            (CpuStorage::F16(x), CpuStorage::F16(w)) => {
                CpuStorage::F16(self.run(slice(x, x_layout)?, slice(w, w_layout)?))
            }
            _ => candle_core::bail!("small-batch linear: unsupported dtype {:?}", x.dtype()),
        };
        Ok((storage, shape))
    }
}

/// Weight rows per task: big enough that scheduling is noise, small enough
/// that two threads share the work evenly.
const OUTPUTS_PER_TASK: usize = 64;

impl SmallBatchLinear {
    fn run<T: Element>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let (rows, k, n) = (self.rows, self.in_dim, self.out_dim);
        let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
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
}

/// For each weight row in `w` (`k` wide), its dot product with every row of
/// `x`, written to `out[weight_row * rows + x_row]`.
fn dot_rows<T: Element>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { dot_rows_avx2(x, w, k, out) };
    }
    dot_rows_body(x, w, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_rows_avx2<T: Element>(x: &[f32], w: &[T], k: usize, out: &mut [f32]) {
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

/// softmax over the last axis. For contiguous f32 on the CPU: rows in
/// parallel, with a vectorisable exp ([`exp_f32`]); candle's own kernel
/// calls libm's scalar `expf` per element, which was ~15 ms a layer of
/// ViT-B attention (12 x 577 x 577 scores) on this machine class. Other
/// dtypes and devices go to candle.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if !(matches!(xs.device(), Device::Cpu) && xs.dtype() == DType::F32) {
        return candle_nn::ops::softmax_last_dim(xs);
    }
    xs.contiguous()?.apply_op1_no_bwd(&RowSoftmax)
}

/// The exact (erf) GELU, `x/2 · (1 + erf(x/√2))`. For contiguous f32 on
/// the CPU: chunks in parallel, with a vectorisable erf ([`erf_f32`]);
/// candle evaluates its scalar erf one element at a time on one thread
/// (~13 ms for a ViT-B MLP's 577 x 3072). Other dtypes go to candle.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if !(matches!(xs.device(), Device::Cpu) && matches!(xs.dtype(), DType::F32 | DType::BF16)) {
        return xs.gelu_erf();
    }
    xs.contiguous()?.apply_op1_no_bwd(&GeluErf)
}

/// `xs + residual`, two tensors of one shape. bf16 on the CPU is added in
/// f32 and rounded once (to nearest, ties to even, as torch rounds), chunks
/// in parallel: candle's bf16 add calls its conversion intrinsics out of
/// line, 8 values a call, ~10 ns an element, which was 32% of the vision
/// encoder's time once its products ran on AMX tiles. Other dtypes go to
/// candle.
pub fn residual_add(xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let fast = matches!(xs.device(), Device::Cpu)
        && xs.dtype() == DType::BF16
        && residual.dtype() == DType::BF16
        && xs.dims() == residual.dims();
    if !fast {
        return xs + residual;
    }
    xs.contiguous()?
        .apply_op2_no_bwd(&residual.contiguous()?, &Bf16Add)
}

struct Bf16Add;

impl candle_core::CustomOp2 for Bf16Add {
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
        let (xs, residual) = (slice(xs, xs_layout)?, slice(residual, residual_layout)?);
        let mut out = vec![bf16::ZERO; xs.len()];
        out.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(xs.par_chunks(ELEMENTWISE_CHUNK))
            .zip(residual.par_chunks(ELEMENTWISE_CHUNK))
            .for_each(|((out, xs), residual)| {
                for ((o, x), r) in out.iter_mut().zip(xs).zip(residual) {
                    *o = bf16::from_f32(x.to_f32() + r.to_f32());
                }
            });
        Ok((CpuStorage::BF16(out), xs_layout.shape().clone()))
    }
}

struct RowSoftmax;

impl candle_core::CustomOp1 for RowSoftmax {
    fn name(&self) -> &'static str {
        "row-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("row softmax: f32 only");
        };
        let xs = slice(data, layout)?;
        let width = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0.0f32; xs.len()];
        out.par_chunks_mut(width)
            .zip(xs.par_chunks(width))
            .for_each(|(out, row)| softmax_row(row, out));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

struct GeluErf;

/// Elements per parallel task of the element-wise kernels.
const ELEMENTWISE_CHUNK: usize = 1 << 14;

impl candle_core::CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match storage {
            CpuStorage::F32(data) => {
                let xs = slice(data, layout)?;
                let mut out = vec![0.0f32; xs.len()];
                out.par_chunks_mut(ELEMENTWISE_CHUNK)
                    .zip(xs.par_chunks(ELEMENTWISE_CHUNK))
                    .for_each(|(out, xs)| gelu_chunk(xs, out));
                Ok((CpuStorage::F32(out), layout.shape().clone()))
            }
            // Computed in f32 and rounded once, as torch does for bf16
            // (candle's bf16 GELU ran element by element: 20% of the bf16
            // vision encoder's time).
            CpuStorage::BF16(data) => {
                let xs = slice(data, layout)?;
                let mut out = vec![half::bf16::ZERO; xs.len()];
                out.par_chunks_mut(ELEMENTWISE_CHUNK)
                    .zip(xs.par_chunks(ELEMENTWISE_CHUNK))
                    .for_each(|(out, xs)| {
                        // Widened a stack buffer at a time: no allocation per chunk.
                        let (mut wide, mut result) = ([0f32; 512], [0f32; 512]);
                        for (out, xs) in out.chunks_mut(512).zip(xs.chunks(512)) {
                            let (wide, result) = (&mut wide[..xs.len()], &mut result[..xs.len()]);
                            for (w, x) in wide.iter_mut().zip(xs) {
                                *w = x.to_f32();
                            }
                            gelu_chunk(wide, result);
                            for (o, r) in out.iter_mut().zip(result.iter()) {
                                *o = half::bf16::from_f32(*r);
                            }
                        }
                    });
                Ok((CpuStorage::BF16(out), layout.shape().clone()))
            }
            _ => candle_core::bail!("gelu: f32 or bf16 only"),
        }
    }
}

fn softmax_row(row: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { softmax_row_avx2(row, out) };
    }
    softmax_row_body(row, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &[f32], out: &mut [f32]) {
    softmax_row_body(row, out)
}

#[inline(always)]
fn softmax_row_body(row: &[f32], out: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // Every position masked: torch gives NaN (0/0); so do we.
        out.fill(f32::NAN);
        return;
    }
    for (o, &x) in out.iter_mut().zip(row) {
        *o = exp_f32(x - max);
    }
    let sum = sum_lanes(out);
    let inverse = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inverse;
    }
}

/// softmax(row · scale) in place: the fused attention's score rows.
pub fn scaled_softmax_in_place(row: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { scaled_softmax_avx512(row, scale) };
    }
    scaled_softmax_body(row, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scaled_softmax_avx512(row: &mut [f32], scale: f32) {
    scaled_softmax_body(row, scale)
}

#[inline(always)]
fn scaled_softmax_body(row: &mut [f32], scale: f32) {
    for x in row.iter_mut() {
        *x *= scale;
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(f32::NAN);
        return;
    }
    for x in row.iter_mut() {
        *x = exp_f32(*x - max);
    }
    let inverse = 1.0 / sum_lanes(row);
    for x in row.iter_mut() {
        *x *= inverse;
    }
}

fn gelu_chunk(xs: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { gelu_chunk_avx2(xs, out) };
    }
    gelu_chunk_body(xs, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_chunk_avx2(xs: &[f32], out: &mut [f32]) {
    gelu_chunk_body(xs, out)
}

#[inline(always)]
fn gelu_chunk_body(xs: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = 0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[inline(always)]
fn sum_lanes(xs: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            lanes[l] += chunk[l];
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// e^x for f32 in branch-free arithmetic the compiler can vectorise:
/// x = n·ln2 + r with |r| ≤ ln2/2, e^r by Cephes' degree-6 polynomial, 2^n
/// by building the exponent bits. Within 2 ulp of the exact value over the
/// range softmax feeds it (x ≤ 0); 0 below -87.3, where e^x leaves the
/// normal f32 range (and for -inf, a masked score).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(-87.3, 88.7);
    let n = (clamped * std::f32::consts::LOG2_E).round();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let scale = f32::from_bits(biased_exponent(n) << 23);
    if x < -87.3 {
        0.0
    } else {
        er * scale
    }
}

/// `n + 127` for a whole `n` in [-126, 128] (as `exp_f32` makes it), the
/// bits of `n as i32 + 127`: adding 2^23 + 127 leaves it, exactly, in the
/// low bits of the sum's mantissa. `as i32`'s conversion saturates and maps
/// NaN to 0, which LLVM does not vectorise: it ran lane by lane, five
/// scalar instructions each, most of the softmax's time (perf annotate).
/// For NaN (x was NaN) the bits differ, and the result is NaN either way.
#[inline(always)]
fn biased_exponent(n: f32) -> u32 {
    const MANTISSA_ONE: u32 = 0x4B00_0000; // 2^23
    (n + 8_388_735.0).to_bits().wrapping_sub(MANTISSA_ONE)
}

/// erf for f32, vectorisable: Abramowitz & Stegun 7.1.26 (absolute error
/// 1.5e-7 in exact arithmetic; 4.7e-7 measured in f32, from the
/// cancellation in 1 - poly·e^(-x²) near 0), odd in x. Made for GELU,
/// which adds it to 1: there it is a few ulp, and the output error is
/// below 1e-6 (tested against candle's f64-accurate erf).
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_f32(-a * a);
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        // A small deterministic generator: the test needs varied values, not torch's.
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// bf16 sums: each the f32 sum of the two values rounded once, to
    /// nearest, ties to even (as torch adds bf16 tensors), across chunk
    /// edges; other dtypes as candle adds them.
    #[test]
    fn residual_add_rounds_each_sum_once() {
        let len = 3 * ELEMENTWISE_CHUNK + 5;
        let xs = random(&[len], 31).to_dtype(DType::BF16).unwrap();
        let residual = (random(&[len], 32) * 1e-3)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let ours: Vec<bf16> = residual_add(&xs, &residual).unwrap().to_vec1().unwrap();
        let (x, r): (Vec<bf16>, Vec<bf16>) = (xs.to_vec1().unwrap(), residual.to_vec1().unwrap());
        for i in 0..len {
            let expected = bf16::from_f32(x[i].to_f32() + r[i].to_f32());
            assert_eq!(ours[i].to_bits(), expected.to_bits(), "at {i}");
        }
        let wide = (random(&[7], 33), random(&[7], 34));
        let sum = residual_add(&wide.0, &wide.1).unwrap();
        let expected = (&wide.0 + &wide.1).unwrap();
        assert_eq!(
            sum.to_vec1::<f32>().unwrap(),
            expected.to_vec1::<f32>().unwrap()
        );
    }

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

    /// The vectorisable exponent bits are `as i32`'s for every `n` that
    /// `exp_f32` can make (the clamp keeps it a whole number in [-126,
    /// 128] unless x is NaN), so `exp_f32` is bit for bit what it was.
    #[test]
    fn exp_is_unchanged_by_the_vectorisable_exponent() {
        for n in -126..=128 {
            assert_eq!(biased_exponent(n as f32), (n + 127) as u32, "n = {n}");
        }
        for x in [
            -1e30f32,
            -87.3,
            88.7,
            1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            let n = (x.clamp(-87.3, 88.7) * std::f32::consts::LOG2_E).round();
            assert!((-126.0..=128.0).contains(&n), "x = {x}: n = {n}");
        }
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn exp_and_erf_are_close_to_libm() {
        let mut worst_exp = 0.0f64;
        let mut worst_erf = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 87.0 * i as f32 / 200_000.0;
            let exact = (x as f64).exp();
            worst_exp = worst_exp.max(((exp_f32(x) as f64) - exact).abs() / exact);
            let y = -6.0 + 12.0 * i as f32 / 200_000.0;
            let exact = libm_erf(y as f64);
            worst_erf = worst_erf.max(((erf_f32(y) as f64) - exact).abs());
        }
        assert!(worst_exp < 2.5e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 6e-7, "erf absolute error {worst_erf}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    /// erf by its Taylor series / continued fraction is overkill here:
    /// candle's f64 erf is the yardstick.
    fn libm_erf(x: f64) -> f64 {
        let t = Tensor::new(&[x], &Device::Cpu).unwrap();
        // gelu_erf(x√2)/(x√2) = (1 + erf(x))/2
        let z = x * std::f64::consts::SQRT_2;
        if z == 0.0 {
            return 0.0;
        }
        let g: Vec<f64> = (t * std::f64::consts::SQRT_2)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1()
            .unwrap();
        2.0 * g[0] / z - 1.0
    }

    #[test]
    fn softmax_and_gelu_match_candle() {
        let x = random(&[3, 5, 77], 14);
        let masked = Tensor::cat(
            &[
                &x,
                &Tensor::full(f32::NEG_INFINITY, (3, 5, 4), &Device::Cpu).unwrap(),
            ],
            2,
        )
        .unwrap();
        let ours = softmax_last_dim(&masked).unwrap();
        let reference = candle_nn::ops::softmax_last_dim(&masked).unwrap();
        assert!(max_abs_diff(&ours, &reference) < 1e-7);
        assert_eq!(
            ours.narrow(2, 77, 4)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let wide = (random(&[4, 1000], 15) * 3.0).unwrap();
        let diff = max_abs_diff(&gelu_erf(&wide).unwrap(), &wide.gelu_erf().unwrap());
        assert!(diff < 1e-6, "gelu max |difference| {diff}");
        // bf16: the f32 result rounded once, so within one bf16 step of
        // candle's (which rounds its own f32 erf).
        let narrow = wide.to_dtype(DType::BF16).unwrap();
        let ours = gelu_erf(&narrow).unwrap().to_dtype(DType::F32).unwrap();
        let reference = narrow.gelu_erf().unwrap().to_dtype(DType::F32).unwrap();
        let step = (reference.abs().unwrap() / 128.0).unwrap();
        let excess = (ours - &reference)
            .unwrap()
            .abs()
            .unwrap()
            .ge(&(step + 1e-6).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            excess, 0.0,
            "bf16 gelu: {excess} values off by more than one step"
        );
    }

    #[test]
    fn rejects_an_index_past_the_keys() {
        let q = random(&[2, 1, 1, 8], 7);
        let k = random(&[1, 1, 4, 8], 8);
        assert!(single_query_attention(&q, &k, &k, &[0, 1], 1.0).is_err());
    }
}
