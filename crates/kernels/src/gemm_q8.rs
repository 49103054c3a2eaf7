//! q8_0 matrix products on AVX512-VNNI, register-blocked.
//!
//! `--quantize q8_0` stores a linear layer's weights in GGUF q8_0 blocks:
//! 32 consecutive weights of a row as 8-bit integers with one f16 scale.
//! GGML defines the product by quantizing each input row to the same
//! blocks and summing, block by block, the integer dot product times the
//! two blocks' scales (candle's `vec_dot_q8_0_q8_0`, one output at a time).
//! candle 0.11 runs that only where its repacked VNNI kernel does not
//! (widths not multiples of 256, columns not of 16); the repacked kernel
//! quantizes inputs in blocks of 256 instead (coarser: 0.87% error on a
//! Gaussian layer against 0.77%) and ran at 160-280 GOP/s on the ViT's
//! shapes on Emerald Rapids, no faster than our float32 kernel.
//!
//! Here the weights are packed once into panels of [`NR`] output columns,
//! block by block, and a tile of [`MR`] rows × [`NR`] columns accumulates
//! a block's 32 depths in 32-bit integers with VPDPBUSD (64 multiply-adds
//! per instruction, four times an f32 FMA's sixteen), then scales the
//! block's sums into float32 accumulators: 460-610 GOP/s on the same
//! shapes (`cargo bench -p caption-kernels --bench kernels`). The arithmetic is GGML's: the
//! input quantized exactly as candle's `BlockQ8_0::from_float` does, the
//! same integer sums per block, each scaled by the product of the two
//! blocks' scales; only the order in which the scaled block sums are added
//! differs (float32 rounding, as between any two BLAS libraries).
//!
//! VPDPBUSD multiplies unsigned bytes by signed ones. The input's bytes go
//! in as `q + 128` (1..=255), and the `128 · Σ weights` that adds to each
//! block's sum is taken back out by starting the block's integer sum at
//! `-128 · Σ weights`, computed at packing.

use std::sync::Arc;

use half::f16;
use rayon::prelude::*;

use crate::blocks::{for_each_block, OutputPtr};
use crate::packed::{Packed, PackedProduct, PanelLayout};
use crate::panels::{PanelFile, PanelRowType};

/// Weights per q8_0 block (and input values per quantized block).
pub const BLOCK: usize = 32;
/// Bytes of one q8_0 block as candle stores it: an f16 scale, 32 `i8`s.
const GGML_BLOCK_BYTES: usize = 2 + BLOCK;
/// Output columns per panel and tile: two 16-lane registers.
const NR: usize = 32;
/// Rows per tile: 6 rows × 2 registers of float sums and as many of integer
/// sums (24), the two packed registers and a broadcast input fit the 32.
const MR: usize = 6;
/// Depths a VPDPBUSD lane takes from each of its operands.
const QUAD: usize = 4;
/// Rows per task block: the block's quantized input rows (240 × 3072
/// bytes at the widest ViT-B layer) stay in L2 while the panels pass.
const MC: usize = 240;

/// Whether callers use this kernel for q8_0 weights: [`crate::gemm_f32`]'s
/// kernels are on (AVX-512, not turned off) and the CPU has AVX512-VNNI
/// and AVX512-BW. Otherwise q8_0 layers take candle's quantized matmul.
pub fn available() -> bool {
    crate::gemm_f32::available() && crate::cpu::features().avx512_vnni
}

/// One q8_0 block of a panel: 32 depths of [`NR`] output columns.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct PanelBlock {
    /// `quads[q][4 · c + j]`: column `c`'s weight at depth `4q + j` of the
    /// block, so each 64-byte half is one register of 16 columns × 4 depths.
    quads: [[i8; QUAD * NR]; BLOCK / QUAD],
    /// Each column's block scale (the f16 widened).
    scales: [f32; NR],
    /// Each column's `-128 · Σ weights` over the block.
    offsets: [i32; NR],
}

// SAFETY: integers and floats, 1280 bytes: no padding, any bits a valid value.
unsafe impl PanelRowType for PanelBlock {}

/// [`gemm_q8`](self)'s layout: panels of [`NR`] columns, each a run of
/// `k / 32` blocks; columns past `n` are zero.
pub struct Q8Panels;

impl PanelLayout for Q8Panels {
    type Row = PanelBlock;
    const NAME: &'static str = "PackedMatrixQ8";
    fn rows(k: usize, n: usize) -> usize {
        n.div_ceil(NR) * (k / BLOCK)
    }
    fn fits(k: usize, _n: usize) -> bool {
        k.is_multiple_of(BLOCK)
    }
}

/// The weight `[n, k]` of a linear layer in q8_0, in [`Q8Panels`].
pub type PackedMatrixQ8 = Packed<Q8Panels>;

/// f32 in and out: the input is quantized on the way in.
impl PackedProduct for Q8Panels {
    type Value = f32;
    fn available() -> bool {
        available()
    }
    fn product(b: &PackedMatrixQ8, x: &[f32], rows: usize, bias: Option<&[f32]>, c: &mut [f32]) {
        matmul(x, rows, b.k, b, bias, c, b.n, true)
    }
}

impl PackedMatrixQ8 {
    /// From candle's q8_0 data of a `[n, k]` weight (`QTensor::data`): row
    /// after row, `k / 32` blocks of an f16 scale and 32 `i8`s each.
    ///
    /// # Panics
    /// If `k` is not a multiple of 32 or `raw` is not `n · k / 32` blocks.
    pub fn from_ggml(raw: &[u8], n: usize, k: usize) -> Self {
        Self::from_ggml_in(raw, n, k, None)
    }

    /// [`Self::from_ggml`], packed into `file` where it has room.
    pub fn from_ggml_in(raw: &[u8], n: usize, k: usize, file: Option<&Arc<PanelFile>>) -> Self {
        assert!(
            k.is_multiple_of(BLOCK),
            "q8_0 pack: depth {k} is not whole blocks"
        );
        let per_row = k / BLOCK;
        assert_eq!(
            raw.len(),
            n * per_row * GGML_BLOCK_BYTES,
            "q8_0 pack: data is not {n} rows of {per_row} blocks"
        );
        let mut packed = Self::zeroed_in(k, n, file);
        packed
            .rows
            .as_mut_slice()
            .par_chunks_mut(per_row.max(1))
            .enumerate()
            .for_each(|(panel, out)| {
                for column in 0..NR.min(n - panel * NR) {
                    let row = &raw[(panel * NR + column) * per_row * GGML_BLOCK_BYTES..];
                    for (block, out) in out.iter_mut().enumerate() {
                        let source = &row[block * GGML_BLOCK_BYTES..][..GGML_BLOCK_BYTES];
                        pack_column(source, column, out);
                    }
                }
            });
        packed
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    fn blocks_per_panel(&self) -> usize {
        self.k / BLOCK
    }
}

/// One candle q8_0 block (`source`) into column `column` of a panel block.
fn pack_column(source: &[u8], column: usize, out: &mut PanelBlock) {
    let scale = f16::from_le_bytes([source[0], source[1]]);
    let mut sum = 0i32;
    for (depth, &byte) in source[2..].iter().enumerate() {
        let weight = byte as i8;
        out.quads[depth / QUAD][QUAD * column + depth % QUAD] = weight;
        sum += weight as i32;
    }
    out.scales[column] = scale.to_f32();
    out.offsets[column] = -128 * sum;
}

/// The input of a product quantized to q8_0 blocks, as candle's
/// `BlockQ8_0::from_float` does: per block, `d = max|x| / 127`, values
/// `round(x / d)` (half away from zero) as computed with `1 / d`, and the
/// scale `d` kept in f16. Values are stored `+ 128`, as VPDPBUSD's unsigned
/// operand, with the scales widened back to f32.
struct QuantizedInput {
    /// `rows × k` bytes.
    values: Vec<u8>,
    /// `rows × k / 32` scales.
    scales: Vec<f32>,
}

impl QuantizedInput {
    fn new(a: &[f32], m: usize, lda: usize, k: usize) -> Self {
        let blocks = k / BLOCK;
        let mut values = vec![0u8; m * k];
        let mut scales = vec![0f32; m * blocks];
        values
            .par_chunks_mut(k.max(1))
            .zip(scales.par_chunks_mut(blocks.max(1)))
            .enumerate()
            .with_min_len(16)
            .for_each(|(row, (values, scales))| {
                let source = &a[row * lda..][..k];
                for ((x, q), scale) in source
                    .chunks_exact(BLOCK)
                    .zip(values.chunks_exact_mut(BLOCK))
                    .zip(scales.iter_mut())
                {
                    *scale = quantize_block(x, q);
                }
            });
        Self { values, scales }
    }
}

/// One block of 32 input values into `q + 128` bytes; returns the scale.
fn quantize_block(x: &[f32], q: &mut [u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features().avx512bw_vl {
        // SAFETY: the CPU has AVX-512F/BW (checked); both slices hold 32.
        return unsafe { quantize_block_avx512(x, q) };
    }
    quantize_block_scalar(x, q)
}

fn quantize_block_scalar(x: &[f32], q: &mut [u8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((v * id).round() as i8 as i32 + 128) as u8;
    }
    f16::from_f32(d).to_f32()
}

/// # Safety
/// The CPU must have AVX-512F and BW; `x` and `q` must hold 32 values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(x: &[f32], q: &mut [u8]) -> f32 {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        use std::arch::x86_64::*;
        assert!(x.len() >= BLOCK && q.len() >= BLOCK);
        let halves = [
            _mm512_loadu_ps(x.as_ptr()),
            _mm512_loadu_ps(x.as_ptr().add(16)),
        ];
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(
            _mm512_abs_ps(halves[0]),
            _mm512_abs_ps(halves[1]),
        ));
        // NaN compares false in `max`, as `f32::max` ignores it: same amax.
        let amax = if amax.is_nan() { 0.0 } else { amax };
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        for (half, &values) in halves.iter().enumerate() {
            let y = _mm512_mul_ps(values, id);
            // round() is half away from zero: truncate, then step away from
            // zero where the dropped fraction is at least a half (`y - trunc`
            // is exact).
            let whole = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let fraction = _mm512_abs_ps(_mm512_sub_ps(y, whole));
            let step = _mm512_or_ps(_mm512_set1_ps(1.0), _mm512_and_ps(y, _mm512_set1_ps(-0.0)));
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(fraction, _mm512_set1_ps(0.5));
            let rounded = _mm512_mask_add_ps(whole, away, whole, step);
            // `as i8` saturates (and NaN becomes 0); the round trip through
            // i32 with a clamp does the same for every value this block holds.
            let clamped = _mm512_min_ps(
                _mm512_max_ps(rounded, _mm512_set1_ps(-128.0)),
                _mm512_set1_ps(127.0),
            );
            let ints = _mm512_cvttps_epi32(clamped);
            let ints = _mm512_mask_mov_epi32(
                ints,
                _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(y, y),
                _mm512_setzero_si512(),
            );
            let bytes = _mm512_cvtepi32_epi8(_mm512_add_epi32(ints, _mm512_set1_epi32(128)));
            _mm_storeu_si128(q.as_mut_ptr().add(16 * half) as *mut __m128i, bytes);
        }
        f16::from_f32(d).to_f32()
    }
}

/// `c[m, n] = quantized(a[m, k]) · b (+ bias)`, rows of `a` and `c` at
/// strides `lda` and `ldc`; `c`'s other columns are left alone. `parallel`
/// spreads the work over the thread pool.
///
/// # Panics
/// If the slices are too short for the shapes, or the CPU lacks the kernel
/// (check [`available`] first).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &PackedMatrixQ8,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
    parallel: bool,
) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        crate::cpu::features().avx512_vnni,
        "q8_0 matmul: the CPU has no AVX512-VNNI"
    );
    assert!(
        lda >= k && ldc >= n,
        "q8_0 matmul: strides shorter than rows"
    );
    assert!(a.len() >= (m - 1) * lda + k, "q8_0 matmul: `a` too short");
    assert!(c.len() >= (m - 1) * ldc + n, "q8_0 matmul: `c` too short");
    if let Some(bias) = bias {
        assert!(bias.len() >= n, "q8_0 matmul: bias too short");
    }
    let input = QuantizedInput::new(a, m, lda, k);
    let out = OutputPtr(c.as_mut_ptr());
    let run = |rows: std::ops::Range<usize>, panels: std::ops::Range<usize>| {
        // SAFETY: the CPU features were checked above, the bounds asserted,
        // and tasks write disjoint (row block, panel range) rectangles of `c`.
        unsafe { product_block(&input, k, rows, b, panels, bias, out, ldc) }
    };
    for_each_block(m, b.panels(), MC, crate::gemm_f32::MR, parallel, run);
}

/// [`matmul`] in plain scalar code over the same packed blocks, the input
/// quantized as the kernel quantizes it: each block's integer dot product
/// times both scales, summed in f64. The portable reference every CPU
/// runs, and the kernel's yardstick.
///
/// # Panics
/// If `k` is not whole blocks or the slices are too short.
#[allow(clippy::too_many_arguments)]
pub fn reference_matmul(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &PackedMatrixQ8,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
) {
    let (k, n) = (b.k, b.n);
    assert!(
        k.is_multiple_of(BLOCK),
        "q8_0: depth {k} is not whole blocks"
    );
    let per_panel = k / BLOCK;
    let blocks = b.rows.as_slice();
    let mut q = [0u8; BLOCK];
    for i in 0..m {
        let row = &a[i * lda..][..k];
        let quantized: Vec<([u8; BLOCK], f32)> = row
            .chunks_exact(BLOCK)
            .map(|x| {
                let scale = quantize_block_scalar(x, &mut q);
                (q, scale)
            })
            .collect();
        for j in 0..n {
            let (panel, column) = (j / NR, j % NR);
            let mut sum = bias.map_or(0.0, |bias| bias[j] as f64);
            for (block, (xq, x_scale)) in quantized.iter().enumerate() {
                let packed = &blocks[panel * per_panel + block];
                let dot: i32 = (0..BLOCK)
                    .map(|d| {
                        let w = packed.quads[d / QUAD][QUAD * column + d % QUAD] as i32;
                        (xq[d] as i32 - 128) * w
                    })
                    .sum();
                sum += dot as f64 * *x_scale as f64 * packed.scales[column] as f64;
            }
            c[i * ldc + j] = sum as f32;
        }
    }
}

/// Rows `rows` × panels `panels` of the product.
///
/// # Safety
/// AVX512-VNNI must be available; `a` must hold `rows` quantized rows of
/// `b.k()` depths and `c` the same rows of `b.n()` outputs, `ldc` apart,
/// which no other task writes; `bias`, when given, `b.n()` values.
#[allow(clippy::too_many_arguments)]
unsafe fn product_block(
    input: &QuantizedInput,
    k: usize,
    rows: std::ops::Range<usize>,
    b: &PackedMatrixQ8,
    panels: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    c: OutputPtr<f32>,
    ldc: usize,
) {
    // SAFETY: the caller upholds this function's contract (see # Safety), which is
    // what every tile below reads and writes within.
    unsafe {
        let blocks = b.blocks_per_panel();
        for panel in panels {
            let packed = b.rows.as_slice().as_ptr().add(panel * blocks);
            let bias = bias.map(|bias| bias.as_ptr().add(panel * NR));
            let mut row = rows.start;
            while row < rows.end {
                let height = MR.min(rows.end - row);
                let tile = Tile {
                    values: input.values.as_ptr().add(row * k),
                    k,
                    scales: input.scales.as_ptr().add(row * blocks),
                    blocks,
                    packed,
                    c: c.at(row * ldc + panel * NR),
                    ldc,
                    columns: NR.min(b.n - panel * NR),
                    bias,
                };
                run_tile(height, &tile);
                row += height;
            }
        }
    }
}

/// Where a tile reads and writes.
// Read only by the x86 tile kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Tile {
    /// The tile's first quantized input row; rows are `k` bytes apart.
    values: *const u8,
    k: usize,
    /// The first row's block scales; rows are `blocks` apart.
    scales: *const f32,
    blocks: usize,
    packed: *const PanelBlock,
    c: *mut f32,
    ldc: usize,
    /// Output columns that exist in this panel (the rest is padding).
    columns: usize,
    bias: Option<*const f32>,
}

/// The tile kernel for `height` rows, a compile-time constant inside so the
/// accumulators stay in registers.
///
/// # Safety
/// As [`tile_kernel`], and `height` at most [`MR`].
#[cfg(target_arch = "x86_64")]
unsafe fn run_tile(height: usize, tile: &Tile) {
    // SAFETY: the caller upholds `tile_kernel`'s contract for this height.
    unsafe {
        match height {
            6 => tile_kernel::<6>(tile),
            5 => tile_kernel::<5>(tile),
            4 => tile_kernel::<4>(tile),
            3 => tile_kernel::<3>(tile),
            2 => tile_kernel::<2>(tile),
            1 => tile_kernel::<1>(tile),
            _ => unreachable!("tile height {height}"),
        }
    }
}

/// Off x86 this is never called: the feature checks that guard it are
/// false there.
///
/// # Safety
/// None: it only panics (or does nothing).
#[cfg(not(target_arch = "x86_64"))]
unsafe fn run_tile(_height: usize, _tile: &Tile) {
    unreachable!("AVX-512 kernels on a non-x86 CPU")
}

/// # Safety
/// AVX512-VNNI (and BW) must be available; `tile` must point at `R`
/// quantized rows and their scales, `tile.blocks` packed blocks, `R` rows of
/// `c` (`ldc` apart) and, when set, 32 bias values, all valid for the accesses.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_kernel<const R: usize>(tile: &Tile) {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        use std::arch::x86_64::*;
        let mut low = [_mm512_setzero_ps(); R];
        let mut high = [_mm512_setzero_ps(); R];
        // A short tile has too few independent sums to hide VPDPBUSD's latency
        // (5 cycles, each depending on the last): its rows sum odd quads apart.
        let chains = if R <= 2 { 2 } else { 1 };
        for block in 0..tile.blocks {
            let packed = &*tile.packed.add(block);
            let offsets = packed.offsets.as_ptr() as *const __m512i;
            let zero = _mm512_setzero_si512();
            let mut sums_low = [[_mm512_load_si512(offsets); R], [zero; R]];
            let mut sums_high = [[_mm512_load_si512(offsets.add(1)); R], [zero; R]];
            for (quad, weights) in packed.quads.iter().enumerate() {
                let weights = weights.as_ptr() as *const __m512i;
                let b_low = _mm512_load_si512(weights);
                let b_high = _mm512_load_si512(weights.add(1));
                let chain = quad % chains;
                for r in 0..R {
                    let at = tile.values.add(r * tile.k + block * BLOCK + quad * QUAD);
                    let x = _mm512_set1_epi32((at as *const i32).read_unaligned());
                    sums_low[chain][r] = _mm512_dpbusd_epi32(sums_low[chain][r], x, b_low);
                    sums_high[chain][r] = _mm512_dpbusd_epi32(sums_high[chain][r], x, b_high);
                }
            }
            let [mut sums_low, odd_low] = sums_low;
            let [mut sums_high, odd_high] = sums_high;
            if chains == 2 {
                for r in 0..R {
                    sums_low[r] = _mm512_add_epi32(sums_low[r], odd_low[r]);
                    sums_high[r] = _mm512_add_epi32(sums_high[r], odd_high[r]);
                }
            }
            let scales_low = _mm512_load_ps(packed.scales.as_ptr());
            let scales_high = _mm512_load_ps(packed.scales.as_ptr().add(16));
            for r in 0..R {
                let scale = _mm512_set1_ps(*tile.scales.add(r * tile.blocks + block));
                low[r] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(sums_low[r]),
                    _mm512_mul_ps(scale, scales_low),
                    low[r],
                );
                high[r] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(sums_high[r]),
                    _mm512_mul_ps(scale, scales_high),
                    high[r],
                );
            }
        }
        let mask_low = crate::blocks::lane_mask(tile.columns);
        let mask_high = crate::blocks::lane_mask(tile.columns.saturating_sub(16));
        let (bias_low, bias_high) = match tile.bias {
            Some(bias) => (
                _mm512_maskz_loadu_ps(mask_low, bias),
                _mm512_maskz_loadu_ps(mask_high, bias.add(16)),
            ),
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        for r in 0..R {
            let out = tile.c.add(r * tile.ldc);
            _mm512_mask_storeu_ps(out, mask_low, _mm512_add_ps(low[r], bias_low));
            _mm512_mask_storeu_ps(out.add(16), mask_high, _mm512_add_ps(high[r], bias_high));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{random, relative_difference};
    use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// candle's q8_0 blocks of `values` (`rows` rows): its own quantizer.
    fn candle_blocks(values: &[f32], rows: usize) -> QTensor {
        let k = values.len() / rows;
        let tensor = Tensor::from_vec(values.to_vec(), (rows, k), &Device::Cpu).unwrap();
        QTensor::quantize(&tensor, GgmlDType::Q8_0).unwrap()
    }

    /// Blocks that exercise rounding: exact halves either side of zero
    /// (scale 1, so `x · id` is `x`), zeros, a lone NaN-free block of one
    /// value, tiny and huge magnitudes.
    fn rounding_blocks() -> Vec<f32> {
        let mut blocks = Vec::new();
        let mut halves: Vec<f32> = (0..31).map(|i| i as f32 * 4.0 - 60.5).collect();
        halves.push(127.0);
        blocks.extend(&halves);
        blocks.extend(halves.iter().map(|x| -x));
        blocks.extend([0.0f32; 32]);
        blocks.extend([3.0f32; 32]);
        blocks.extend(random(32, 9).iter().map(|x| x * 1e-30));
        blocks.extend(random(32, 10).iter().map(|x| x * 1e30));
        blocks.extend(random(32 * 20, 11));
        blocks
    }

    /// Both quantizers (vector and scalar) give candle's bytes and scales.
    #[test]
    fn input_quantization_is_candles() {
        let values = rounding_blocks();
        let blocks = values.len() / BLOCK;
        let raw = candle_blocks(&values, blocks).data().unwrap().into_owned();
        for (i, x) in values.chunks_exact(BLOCK).enumerate() {
            let candle = &raw[i * GGML_BLOCK_BYTES..][..GGML_BLOCK_BYTES];
            let want_scale = f16::from_le_bytes([candle[0], candle[1]]).to_f32();
            let want: Vec<u8> = candle[2..]
                .iter()
                .map(|&b| (b as i8 as i32 + 128) as u8)
                .collect();
            let mut scalar = [0u8; BLOCK];
            assert_eq!(
                quantize_block_scalar(x, &mut scalar),
                want_scale,
                "block {i}"
            );
            assert_eq!(scalar.as_slice(), want.as_slice(), "block {i}, scalar");
            let mut ours = [0u8; BLOCK];
            assert_eq!(quantize_block(x, &mut ours), want_scale, "block {i}");
            assert_eq!(ours.as_slice(), want.as_slice(), "block {i}");
        }
    }

    /// candle's definition of the q8_0 product (`vec_dot_q8_0_q8_0`, what
    /// its quantized matmul computes where its repacked kernels do not run):
    /// `a [m, k]` quantized row by row to q8_0, dotted with each weight row.
    fn candle_reference(a: &[f32], m: usize, k: usize, w: &[f32]) -> Vec<f32> {
        let quantize = |row: &[f32]| {
            let mut blocks = vec![BlockQ8_0::zeros(); k / BLOCK];
            BlockQ8_0::from_float(row, &mut blocks);
            blocks
        };
        let weights: Vec<_> = w.chunks_exact(k).map(quantize).collect();
        a.chunks_exact(k)
            .take(m)
            .flat_map(|row| {
                let row = quantize(row);
                weights
                    .iter()
                    .map(|weight| BlockQ8_0::vec_dot(k, weight, &row))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The product matches candle's q8_0 product at every edge: rows not a
    /// multiple of the tile (1, 5, 13, 577), columns not a multiple of the
    /// panel (1, 33, 100), one block of depth and many, strided rows in
    /// and out.
    #[test]
    fn matches_candles_q8_0_product_on_every_edge() {
        for (case, &(m, k, n)) in [
            (1, 32, 32),
            (5, 64, 33),
            (13, 768, 100),
            (577, 768, 96),
            (3, 3072, 1),
            (7, 256, 64),
        ]
        .iter()
        .enumerate()
        {
            let (lda, ldc) = (k + 3, n + 5);
            let a = random(m * lda, case as u64);
            let w = random(n * k, 100 + case as u64);
            let bias = random(n, 200 + case as u64);
            let blocks = candle_blocks(&w, n);
            let packed = PackedMatrixQ8::from_ggml(&blocks.data().unwrap(), n, k);
            let unstrided: Vec<f32> = a.chunks(lda).flat_map(|row| &row[..k]).copied().collect();
            let expected: Vec<f32> = candle_reference(&unstrided, m, k, &w)
                .chunks_exact(n)
                .flat_map(|row| row.iter().zip(&bias).map(|(x, b)| x + b))
                .collect();
            // The portable reference on every CPU (it reads the packing),
            // the VNNI kernel where it runs.
            let kernel = available().then_some("vnni");
            for path in std::iter::once("reference").chain(kernel) {
                let mut c = vec![f32::NAN; m * ldc];
                match path {
                    "vnni" => matmul(&a, m, lda, &packed, Some(&bias), &mut c, ldc, true),
                    _ => reference_matmul(&a, m, lda, &packed, Some(&bias), &mut c, ldc),
                }
                let ours: Vec<f32> = (0..m)
                    .flat_map(|i| c[i * ldc..i * ldc + n].to_vec())
                    .collect();
                let difference = relative_difference(&ours, &expected);
                assert!(
                    difference < 1e-5,
                    "{path}, m={m} k={k} n={n}: relative difference {difference}"
                );
                for i in 0..m {
                    assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|x| x.is_nan()));
                }
            }
        }
    }
}
