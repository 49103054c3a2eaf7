//! bfloat16 matrix products on AVX512-BF16 (`--dtype bf16`).
//!
//! candle multiplies bf16 matrices by widening them to f32 inside its GEMM,
//! which made `--dtype bf16` about half as fast as float32 on our kernel.
//! CPUs with AVX512-BF16 (Zen 4 and later, Cooper Lake, Sapphire Rapids)
//! have `VDPBF16PS`: 16 lanes, each adding two bf16 products to an f32 sum,
//! twice the work of a float32 FMA per instruction. The weights are packed
//! once at load, as in [`super::gemm`], but in pairs of depths: a packed row
//! holds depths `2p` and `2p + 1` of 32 output columns (64 bf16, two
//! registers), and each row of `a` gives its two values at those depths as
//! one broadcast 32-bit word.
//!
//! Sums are f32 over the whole depth (no slicing: the output is rounded to
//! bf16 once, after the bias), so results differ from candle's bf16 path by
//! where the rounding of partial sums falls, as between two BLAS libraries.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use half::bf16;
use rayon::prelude::*;

use super::gemm::{for_each_block, lane_mask, linear_input, OutputPtr, MR};
use super::panels::{PanelFile, PanelRowType, Panels};

/// Output columns per panel: two 16-lane registers of f32 sums.
const NR: usize = 32;
/// Bytes of `a` a row block may take, so it stays in L2 while panels pass.
const BLOCK_BYTES: usize = 512 * 1024;

/// Whether bf16 linear layers use this kernel: [`super::gemm::available`]
/// (AVX-512F, not turned off) and the CPU has AVX512-BF16.
pub fn available() -> bool {
    super::gemm::available() && cpu_supported()
}

fn cpu_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Depths `2p` and `2p + 1` of a panel's 32 columns, interleaved
/// (`[column][parity]`), aligned for whole-register loads.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct PairRow([bf16; 2 * NR]);

// SAFETY: thirty-two bf16s, 64 bytes: no padding, any bits a valid value.
unsafe impl PanelRowType for PairRow {}

/// The right-hand side `[k, n]` of a product, in panels of [`NR`] columns,
/// each `k.div_ceil(2)` pair rows deep (an odd depth padded with zeros).
pub struct PackedMatrixBf16 {
    k: usize,
    n: usize,
    rows: Panels<PairRow>,
}

impl std::fmt::Debug for PackedMatrixBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedMatrixBf16(k={}, n={})", self.k, self.n)
    }
}

impl PackedMatrixBf16 {
    /// From `bᵀ`, `n` rows of `k` values (an `nn.Linear` weight `[out, in]`).
    pub fn from_transposed(bt: &[bf16], n: usize, k: usize) -> Self {
        Self::from_transposed_in(bt, n, k, None)
    }

    /// [`Self::from_transposed`], packed into `file` where it has room.
    pub(crate) fn from_transposed_in(
        bt: &[bf16],
        n: usize,
        k: usize,
        file: Option<&std::sync::Arc<PanelFile>>,
    ) -> Self {
        assert!(bt.len() >= n * k, "pack: `bᵀ` too short");
        let pairs = k.div_ceil(2);
        let mut rows = Panels::<PairRow>::zeroed_in(n.div_ceil(NR) * pairs, file);
        rows.as_mut_slice()
            .par_chunks_mut(pairs.max(1))
            .enumerate()
            .for_each(|(panel, panel_rows)| {
                let first = panel * NR;
                for column in 0..NR.min(n - first) {
                    let source = &bt[(first + column) * k..][..k];
                    for (depth, &value) in source.iter().enumerate() {
                        panel_rows[depth / 2].0[2 * column + depth % 2] = value;
                    }
                }
            });
        Self { k, n, rows }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Where the panels lie in `file`, when they were packed into it.
    pub(super) fn range_in(&self, file: &std::sync::Arc<PanelFile>) -> Option<[u64; 2]> {
        self.rows.range_in(file)
    }

    /// The packed rows' bytes, as the pack cache saves them.
    pub(super) fn panel_bytes(&self) -> &[u8] {
        self.rows.as_bytes()
    }

    /// A `[k, n]` matrix packed earlier, read in place from the pack cache's
    /// mapping: `bytes` at `offset` (`None` unless they are whole panels).
    pub(super) fn from_cache(
        file: std::sync::Arc<memmap2::Mmap>,
        offset: usize,
        bytes: usize,
        k: usize,
        n: usize,
    ) -> Option<Self> {
        let rows = Panels::cached(file, offset, bytes, n.div_ceil(NR) * k.div_ceil(2))?;
        Some(Self { k, n, rows })
    }

    /// Column `j` of `b` (a vocabulary entry of a tied output projection).
    pub fn copy_column(&self, j: usize, out: &mut [bf16]) {
        let pairs = self.k.div_ceil(2);
        let panel = &self.rows.as_slice()[(j / NR) * pairs..][..pairs];
        for (depth, value) in out[..self.k].iter_mut().enumerate() {
            *value = panel[depth / 2].0[2 * (j % NR) + depth % 2];
        }
    }
}

/// `c[m, n] = bf16(a[m, k] · b + bias)`, all contiguous (`a` rows `k` long,
/// `c` rows `n` long), over the thread pool.
///
/// # Panics
/// If the slices are too short, or the CPU lacks AVX512-BF16.
pub fn matmul(a: &[bf16], m: usize, b: &PackedMatrixBf16, bias: Option<&[f32]>, c: &mut [bf16]) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(cpu_supported(), "bf16 matmul: the CPU has no AVX512-BF16");
    assert!(
        a.len() >= m * k && c.len() >= m * n,
        "bf16 matmul: slices too short"
    );
    if let Some(bias) = bias {
        assert!(bias.len() >= n, "bf16 matmul: bias too short");
    }
    let max_rows = (BLOCK_BYTES / (2 * k.max(1)))
        .clamp(MR, 240)
        .next_multiple_of(MR);
    let out = OutputPtr(c.as_mut_ptr());
    let run = |rows: std::ops::Range<usize>, panels: std::ops::Range<usize>| {
        for panel in panels {
            let packed = &b.rows.as_slice()[panel * k.div_ceil(2)..][..k.div_ceil(2)];
            let columns = NR.min(n - panel * NR);
            let bias = bias.map(|bias| &bias[panel * NR..][..columns]);
            let mut row = rows.start;
            while row < rows.end {
                let height = MR.min(rows.end - row);
                let tile = Tile {
                    a: &a[row * k..][..height * k],
                    k,
                    packed,
                    c: out.at(row * n + panel * NR),
                    ldc: n,
                    columns,
                    bias,
                };
                // SAFETY: AVX512-BF16 was checked above; each task writes its
                // own (rows, panels) rectangle of `c`, whose bounds were asserted.
                unsafe { run_tile(height, &tile) };
                row += height;
            }
        }
    };
    for_each_block(m, n.div_ceil(NR), max_rows, true, run);
}

struct Tile<'a> {
    /// The tile's rows of `a`, each `k` long.
    a: &'a [bf16],
    k: usize,
    packed: &'a [PairRow],
    c: *mut bf16,
    ldc: usize,
    /// Output columns that exist in this panel (the rest is padding).
    columns: usize,
    bias: Option<&'a [f32]>,
}

#[cfg(target_arch = "x86_64")]
unsafe fn run_tile(height: usize, tile: &Tile) {
    match height {
        12 => tile_kernel::<12>(tile),
        11 => tile_kernel::<11>(tile),
        10 => tile_kernel::<10>(tile),
        9 => tile_kernel::<9>(tile),
        8 => tile_kernel::<8>(tile),
        7 => tile_kernel::<7>(tile),
        6 => tile_kernel::<6>(tile),
        5 => tile_kernel::<5>(tile),
        4 => tile_kernel::<4>(tile),
        3 => tile_kernel::<3>(tile),
        2 => tile_kernel::<2>(tile),
        1 => tile_kernel::<1>(tile),
        _ => unreachable!("tile height {height}"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn run_tile(_height: usize, _tile: &Tile) {
    unreachable!("AVX512-BF16 kernels on a non-x86 CPU")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tile_kernel<const R: usize>(tile: &Tile) {
    use std::arch::x86_64::*;
    let k = tile.k;
    let a = tile.a.as_ptr();
    let mut low = [_mm512_setzero_ps(); R];
    let mut high = [_mm512_setzero_ps(); R];
    // One pair row of the panel against one 32-bit word (two depths) of
    // each row of `a`, the word given by `$word(r)`.
    macro_rules! pair_step {
        ($pair:expr, $word:expr) => {{
            let packed = tile.packed.as_ptr().add($pair) as *const __m512bh;
            let (b_low, b_high) = (packed.read(), packed.add(1).read());
            for r in 0..R {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32($word(r) as i32));
                low[r] = _mm512_dpbf16_ps(low[r], x, b_low);
                high[r] = _mm512_dpbf16_ps(high[r], x, b_high);
            }
        }};
    }
    for pair in 0..k / 2 {
        // Depths 2p and 2p + 1 of a row, as one little-endian word.
        pair_step!(pair, |r: usize| (a.add(r * k + 2 * pair) as *const u32)
            .read_unaligned());
    }
    if k % 2 == 1 {
        // The last depth alone: its partner is zero here as in the packing
        // (not the next row's first value, which could be an infinity).
        pair_step!(k / 2, |r: usize| u32::from(
            (*a.add(r * k + k - 1)).to_bits()
        ));
    }
    let mask_low = lane_mask(tile.columns);
    let mask_high = lane_mask(tile.columns.saturating_sub(16));
    let (bias_low, bias_high) = match tile.bias {
        Some(bias) => (
            _mm512_maskz_loadu_ps(mask_low, bias.as_ptr()),
            _mm512_maskz_loadu_ps(mask_high, bias.as_ptr().add(16)),
        ),
        None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
    };
    for r in 0..R {
        let out = tile.c.add(r * tile.ldc) as *mut u16;
        let v_low: __m256i =
            std::mem::transmute(_mm512_cvtneps_pbh(_mm512_add_ps(low[r], bias_low)));
        let v_high: __m256i =
            std::mem::transmute(_mm512_cvtneps_pbh(_mm512_add_ps(high[r], bias_high)));
        _mm256_mask_storeu_epi16(out as *mut i16, mask_low as __mmask16, v_low);
        _mm256_mask_storeu_epi16(out.add(16) as *mut i16, mask_high as __mmask16, v_high);
    }
}

/// `nn.Linear` on packed bf16 weights, as a candle op on `x [rows, in]`
/// (contiguous bf16 on the CPU): `[rows, out]` in bf16.
#[derive(Debug)]
pub struct PackedLinearBf16 {
    pub weight: PackedMatrixBf16,
    pub bias: Option<Vec<f32>>,
}

impl CustomOp1 for PackedLinearBf16 {
    fn name(&self) -> &'static str {
        "packed-linear-bf16"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::BF16(data) = storage else {
            candle_core::bail!("packed bf16 linear: bf16 input only");
        };
        let (k, n) = (self.weight.k, self.weight.n);
        let (xs, rows) = linear_input(data, layout, k)?;
        let mut out = vec![bf16::ZERO; rows * n];
        matmul(xs, rows, &self.weight, self.bias.as_deref(), &mut out);
        Ok((CpuStorage::BF16(out), Shape::from((rows, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<bf16> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                bf16::from_f32(((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect()
    }

    /// Every edge: odd depths, partial panels, partial tiles, one row.
    #[test]
    fn matches_a_float64_product_rounded_once() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 7, 33),
            (5, 64, 32),
            (13, 129, 70),
            (25, 768, 96),
        ] {
            let a = random(m * k, 1);
            let bt = random(n * k, 2);
            let bias: Vec<f32> = random(n, 3).iter().map(|v| v.to_f32()).collect();
            let packed = PackedMatrixBf16::from_transposed(&bt, n, k);
            let mut ours = vec![bf16::ZERO; m * n];
            matmul(&a, m, &packed, Some(&bias), &mut ours);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|d| a[i * k + d].to_f64() * bt[j * k + d].to_f64())
                        .sum::<f64>()
                        + bias[j] as f64;
                    let got = ours[i * n + j].to_f64();
                    // One bf16 rounding (2^-8 relative) plus f32 sums.
                    let tolerance = exact.abs() / 128.0 + 1e-4 * (k as f64).sqrt();
                    assert!(
                        (got - exact).abs() <= tolerance,
                        "{m}x{k}x{n} at ({i}, {j}): {got} vs {exact}"
                    );
                }
            }
            let mut column = vec![bf16::ZERO; k];
            packed.copy_column(n - 1, &mut column);
            assert_eq!(column, bt[(n - 1) * k..n * k]);
        }
    }
}
