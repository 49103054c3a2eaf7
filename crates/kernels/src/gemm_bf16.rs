//! bfloat16 matrix products on AVX-512 (`--dtype bf16`).
//!
//! candle multiplies bf16 matrices by widening them to f32 inside its GEMM,
//! which made `--dtype bf16` about half as fast as float32 on our kernel.
//! CPUs with AVX512-BF16 (Zen 4 and later, Cooper Lake, Sapphire Rapids)
//! have `VDPBF16PS`: 16 lanes, each adding two bf16 products to an f32 sum,
//! twice the work of a float32 FMA per instruction. The weights are packed
//! once at load, as in [`crate::gemm_f32`], but in pairs of depths: a packed row
//! holds depths `2p` and `2p + 1` of 32 output columns (64 bf16, two
//! registers), and each row of `a` gives its two values at those depths as
//! one broadcast 32-bit word.
//!
//! Sums are f32 over the whole depth (no slicing: the output is rounded to
//! bf16 once, after the bias), so results differ from candle's bf16 path by
//! where the rounding of partial sums falls, as between two BLAS libraries.
//!
//! Intel's cores run `VDPBF16PS` at half the rate of a float32 FMA and at
//! twice its latency (measured on Emerald Rapids: 162 against 330 GFLOP/s
//! on two cores, counting both products; 8.3 against 4 cycles), so there
//! the instruction is slower than widening: [`Bf16Kernel::Widened`] shifts
//! each packed bf16 into an f32 (one integer instruction per 16 weights;
//! `a` is widened once per product) and adds the two products of a pair
//! with two FMAs, odd depth first, as Intel defines `VDPBF16PS` (each step
//! an exact product added with one rounding): the same sums, bit for bit,
//! but for denormal inputs, which the instruction reads as zero. Its output
//! is rounded to bf16 in software, as `VCVTNEPS2BF16` defines it (equal to
//! the instruction on every tested bit pattern), so it needs no
//! AVX512-BF16 at all: AVX-512 CPUs without it (Skylake-SP, Cascade Lake,
//! Ice Lake) use it rather than candle's bf16 path.
//!
//! Where the CPU has AMX (Sapphire Rapids and later Xeons) and the
//! operating system grants it, [`Bf16Kernel::Tiles`] runs the same packed
//! weights on tile registers instead ([`crate::gemm_amx`]): 1000-1500
//! GFLOP/s on the ViT's shapes against ~320 for the widened kernel.

use half::bf16;

#[cfg(target_arch = "x86_64")]
use crate::bf16_panels::round_to_bf16;
use crate::bf16_panels::{Bf16Panels, PackedMatrixBf16};
use crate::bf16_panels::{PairRow, NR};
#[cfg(target_arch = "x86_64")]
use crate::blocks::lane_mask;
use crate::blocks::{for_each_block, OutputPtr};
use crate::gemm_f32::MR;
use crate::packed::PackedProduct;

/// Bytes of `a` a row block may take, so it stays in L2 while panels pass.
const BLOCK_BYTES: usize = 512 * 1024;

/// Whether bf16 linear layers use these kernels: [`crate::gemm_f32::available`]
/// (AVX-512F, not turned off) and the CPU has AVX-512BW and VL, as every
/// AVX-512 server CPU does. [`Bf16Kernel::Widened`] needs nothing more, so
/// CPUs without AVX512-BF16 (Skylake-SP, Cascade Lake, Ice Lake) use it.
pub fn available() -> bool {
    crate::gemm_f32::available() && crate::cpu::features().avx512bw_vl
}

/// How a tile multiplies a pair of depths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `VDPBF16PS`: both products of a pair in one instruction. Faster on
    /// AMD's cores (Zen 4: vision encoder 0.52 s against 0.70 s in f32).
    DotProduct,
    /// bf16 widened to f32 and summed with FMAs: faster on Intel's, where
    /// `VDPBF16PS` runs at half the FMA rate.
    Widened,
    /// AMX tiles ([`crate::gemm_amx`]), where the CPU has them and the
    /// operating system grants them; products whose depth is not whole
    /// tiles take [`vector_kernel`].
    Tiles,
}

/// The kernel bf16 products use on this CPU: [`Bf16Kernel::Tiles`] where
/// AMX runs, else [`vector_kernel`]; `CAPTION_BF16_KERNEL=dot` or
/// `=widened` chooses a vector kernel where it can run (for comparing them
/// on one machine).
pub fn kernel() -> Bf16Kernel {
    static CHOICE: std::sync::OnceLock<Bf16Kernel> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        let named = std::env::var("CAPTION_BF16_KERNEL");
        let vector_named = matches!(named.as_deref(), Ok("dot" | "widened"));
        if !vector_named && crate::gemm_amx::available() {
            return Bf16Kernel::Tiles;
        }
        vector_kernel()
    })
}

/// The vector kernel for this CPU: [`Bf16Kernel::Widened`] on Intel's and
/// on any without AVX512-BF16, [`Bf16Kernel::DotProduct`] elsewhere, unless
/// `CAPTION_BF16_KERNEL` names one this CPU can run.
pub fn vector_kernel() -> Bf16Kernel {
    if !crate::cpu::features().avx512_bf16 {
        return Bf16Kernel::Widened;
    }
    match std::env::var("CAPTION_BF16_KERNEL").as_deref() {
        Ok("dot") => Bf16Kernel::DotProduct,
        Ok("widened") => Bf16Kernel::Widened,
        _ if crate::cpu::features().intel => Bf16Kernel::Widened,
        _ => Bf16Kernel::DotProduct,
    }
}

/// `c[m, n] = bf16(a[m, k] · b + bias)`, all contiguous (`a` rows `k` long,
/// `c` rows `n` long), over the thread pool, with this CPU's [`kernel`].
///
/// # Panics
/// If the slices are too short, or the CPU lacks AVX-512BW/VL.
pub fn matmul(a: &[bf16], m: usize, b: &PackedMatrixBf16, bias: Option<&[f32]>, c: &mut [bf16]) {
    matmul_with(kernel(), a, m, b, bias, c)
}

/// bf16 in and out, with this CPU's [`kernel`].
impl PackedProduct for Bf16Panels {
    type Value = bf16;
    fn available() -> bool {
        available()
    }
    fn product(
        b: &PackedMatrixBf16,
        x: &[bf16],
        rows: usize,
        bias: Option<&[f32]>,
        c: &mut [bf16],
    ) {
        matmul(x, rows, b, bias, c)
    }
}

/// [`matmul`] with the kernel given.
///
/// # Panics
/// As [`matmul`], for [`Bf16Kernel::DotProduct`] on a CPU without
/// AVX512-BF16, and for [`Bf16Kernel::Tiles`] where AMX does not run.
pub fn matmul_with(
    kernel: Bf16Kernel,
    a: &[bf16],
    m: usize,
    b: &PackedMatrixBf16,
    bias: Option<&[f32]>,
    c: &mut [bf16],
) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    let kernel = match kernel {
        Bf16Kernel::Tiles if crate::gemm_amx::fits(b) => {
            return crate::gemm_amx::matmul(a, m, b, bias, c);
        }
        Bf16Kernel::Tiles => {
            assert!(crate::gemm_amx::available(), "bf16 matmul: no AMX tiles");
            vector_kernel()
        }
        vector => vector,
    };
    assert!(
        crate::cpu::features().avx512bw_vl,
        "bf16 matmul: the CPU has no AVX-512BW/VL"
    );
    assert!(
        kernel == Bf16Kernel::Widened || crate::cpu::features().avx512_bf16,
        "bf16 matmul: the CPU has no AVX512-BF16"
    );
    assert!(
        a.len() >= m * k && c.len() >= m * n,
        "bf16 matmul: slices too short"
    );
    if let Some(bias) = bias {
        assert!(bias.len() >= n, "bf16 matmul: bias too short");
    }
    // Widened once here, not per tile: every panel reads the same rows.
    let widened: Vec<f32>;
    let (rows_of_a, value_bytes) = match kernel {
        Bf16Kernel::DotProduct => (TileRows::Bf16(a), 2),
        Bf16Kernel::Widened => {
            widened = a[..m * k].iter().map(|v| v.to_f32()).collect();
            (TileRows::Widened(&widened), 4)
        }
        Bf16Kernel::Tiles => unreachable!("tiles chosen above"),
    };
    let max_rows = (BLOCK_BYTES / (value_bytes * k.max(1)))
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
                    a: rows_of_a.tile(row * k, height * k),
                    k,
                    packed,
                    c: out.at(row * n + panel * NR),
                    ldc: n,
                    columns,
                    bias,
                };
                // SAFETY: the kernel's CPU features were checked above; each
                // task writes its own (rows, panels) rectangle of `c`, whose
                // bounds were asserted.
                unsafe { run_tile(height, &tile) };
                row += height;
            }
        }
    };
    for_each_block(m, n.div_ceil(NR), max_rows, MR, true, run);
}

/// [`matmul`] in plain scalar code over the same packed pair rows: each
/// output the f64 sum of its exact products and the bias, rounded to bf16
/// once. The portable reference every CPU runs, and the kernels' yardstick.
///
/// # Panics
/// If the slices are too short for the shapes.
pub fn reference_matmul(
    a: &[bf16],
    m: usize,
    b: &PackedMatrixBf16,
    bias: Option<&[f32]>,
    c: &mut [bf16],
) {
    let (k, n) = (b.k, b.n);
    let pairs = k.div_ceil(2);
    let rows = b.rows.as_slice();
    for i in 0..m {
        let a_row = &a[i * k..][..k];
        for j in 0..n {
            let panel = &rows[(j / NR) * pairs..][..pairs];
            let sum: f64 = a_row
                .iter()
                .enumerate()
                .map(|(d, x)| x.to_f64() * panel[d / 2].0[2 * (j % NR) + d % 2].to_f64())
                .sum();
            let sum = sum + bias.map_or(0.0, |bias| bias[j] as f64);
            c[i * n + j] = bf16::from_f64(sum);
        }
    }
}

/// The rows of `a` a kernel reads: bf16 as given, or widened to f32.
#[derive(Clone, Copy)]
enum TileRows<'a> {
    Bf16(&'a [bf16]),
    Widened(&'a [f32]),
}

impl<'a> TileRows<'a> {
    fn tile(self, start: usize, len: usize) -> Self {
        match self {
            Self::Bf16(a) => Self::Bf16(&a[start..][..len]),
            Self::Widened(a) => Self::Widened(&a[start..][..len]),
        }
    }
}

// Read only by the x86 tile kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Tile<'a> {
    /// The tile's rows of `a`, each `k` long.
    a: TileRows<'a>,
    k: usize,
    packed: &'a [PairRow],
    c: *mut bf16,
    ldc: usize,
    /// Output columns that exist in this panel (the rest is padding).
    columns: usize,
    bias: Option<&'a [f32]>,
}

/// # Safety
/// The CPU must have the chosen kernel's features (AVX512-BF16 for bf16
/// rows of `a`, AVX-512BW/VL for widened ones); `tile` must point at `height`
/// (at most [`MR`]) rows of `a` and of `c`, all valid for the accesses, and
/// `c`'s rows must be written by no other task.
#[cfg(target_arch = "x86_64")]
unsafe fn run_tile(height: usize, tile: &Tile) {
    // SAFETY: the caller upholds the tile kernels' contract (see # Safety).
    unsafe {
        macro_rules! dispatch {
        ($($rows:literal)*) => {
            match (height, tile.a) {
                $(
                    ($rows, TileRows::Bf16(a)) => dot_product_tile::<$rows>(tile, a),
                    ($rows, TileRows::Widened(a)) => widened_tile::<$rows>(tile, a),
                )*
                _ => unreachable!("tile height {height}"),
            }
        };
    }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
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
/// The CPU must have AVX512-BF16; `a` must hold `R` rows of `tile.k`
/// values, `tile.packed` the panel's `tile.k.div_ceil(2)` pair rows, and
/// `tile.c` `R` rows of `tile.columns` outputs, `tile.ldc` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn dot_product_tile<const R: usize>(tile: &Tile, a: &[bf16]) {
    // SAFETY: the caller upholds this function's contract (see # Safety); every
    // pointer below stays inside those rows.
    unsafe {
        use std::arch::x86_64::*;
        let k = tile.k;
        let a = a.as_ptr();
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
        store_tile::<R, true>(tile, &low, &high);
    }
}

/// # Safety
/// The CPU must have AVX-512BW/VL; as [`dot_product_tile`] otherwise, with
/// `a` widened to f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widened_tile<const R: usize>(tile: &Tile, a: &[f32]) {
    // SAFETY: the caller upholds this function's contract (see # Safety); every
    // pointer below stays inside those rows.
    unsafe {
        use std::arch::x86_64::*;
        let k = tile.k;
        let a = a.as_ptr();
        let mut low = [_mm512_setzero_ps(); R];
        let mut high = [_mm512_setzero_ps(); R];
        // A packed register holds 16 columns' (even, odd) pairs, one per
        // 32-bit lane, even depth in the low half: shifted up, the even bf16 is
        // an f32; masked, the odd one is.
        let odd_half = _mm512_set1_epi32(0xffff_0000_u32 as i32);
        let even = |raw: __m512i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(raw));
        let odd = |raw: __m512i| _mm512_castsi512_ps(_mm512_and_si512(raw, odd_half));
        for pair in 0..k / 2 {
            let packed = tile.packed.as_ptr().add(pair) as *const __m512i;
            let (raw_low, raw_high) = (packed.read(), packed.add(1).read());
            let (low_even, low_odd) = (even(raw_low), odd(raw_low));
            let (high_even, high_odd) = (even(raw_high), odd(raw_high));
            for r in 0..R {
                let row = a.add(r * k + 2 * pair);
                let (x_even, x_odd) = (_mm512_set1_ps(*row), _mm512_set1_ps(*row.add(1)));
                // Odd depth first, as `VDPBF16PS` adds them.
                low[r] = _mm512_fmadd_ps(x_odd, low_odd, low[r]);
                high[r] = _mm512_fmadd_ps(x_odd, high_odd, high[r]);
                low[r] = _mm512_fmadd_ps(x_even, low_even, low[r]);
                high[r] = _mm512_fmadd_ps(x_even, high_even, high[r]);
            }
        }
        if k % 2 == 1 {
            // The last depth alone (its packed partner is zero, and the value
            // after it in `a` is the next row's).
            let packed = tile.packed.as_ptr().add(k / 2) as *const __m512i;
            let (low_even, high_even) = (even(packed.read()), even(packed.add(1).read()));
            for r in 0..R {
                let x_even = _mm512_set1_ps(*a.add(r * k + k - 1));
                low[r] = _mm512_fmadd_ps(x_even, low_even, low[r]);
                high[r] = _mm512_fmadd_ps(x_even, high_even, high[r]);
            }
        }
        store_tile::<R, false>(tile, &low, &high);
    }
}

/// A tile's sums plus the bias, rounded to bf16 once, into `c`: by
/// `VCVTNEPS2BF16` when `BY_INSTRUCTION` (the CPU must have AVX512-BF16),
/// else by [`round_to_bf16`].
///
/// # Safety
/// The CPU must have AVX-512BW/VL (and AVX512-BF16 when `BY_INSTRUCTION`);
/// `tile.c` must hold `R` rows of `tile.columns` outputs, `tile.ldc` apart,
/// and `tile.bias`, when set, `tile.columns` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn store_tile<const R: usize, const BY_INSTRUCTION: bool>(
    tile: &Tile,
    low: &[std::arch::x86_64::__m512; R],
    high: &[std::arch::x86_64::__m512; R],
) {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        use std::arch::x86_64::*;
        let mask_low = lane_mask(tile.columns);
        let mask_high = lane_mask(tile.columns.saturating_sub(16));
        let (bias_low, bias_high) = match tile.bias {
            Some(bias) => (
                _mm512_maskz_loadu_ps(mask_low, bias.as_ptr()),
                _mm512_maskz_loadu_ps(mask_high, bias.as_ptr().add(16)),
            ),
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        let round = |sums: __m512| {
            if BY_INSTRUCTION {
                round_by_instruction(sums)
            } else {
                round_to_bf16(sums)
            }
        };
        for r in 0..R {
            let out = tile.c.add(r * tile.ldc) as *mut u16;
            let v_low = round(_mm512_add_ps(low[r], bias_low));
            let v_high = round(_mm512_add_ps(high[r], bias_high));
            _mm256_mask_storeu_epi16(out as *mut i16, mask_low as __mmask16, v_low);
            _mm256_mask_storeu_epi16(out.add(16) as *mut i16, mask_high as __mmask16, v_high);
        }
    }
}

/// # Safety
/// The CPU must have AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn round_by_instruction(sums: std::arch::x86_64::__m512) -> std::arch::x86_64::__m256i {
    // SAFETY: the caller checked the CPU has AVX512-BF16; the transmute is between
    // two 256-bit vector types.
    unsafe { std::mem::transmute(std::arch::x86_64::_mm512_cvtneps_pbh(sums)) }
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

    /// The kernels this CPU can run.
    fn kernels_here() -> Vec<Bf16Kernel> {
        let mut kernels = vec![Bf16Kernel::Widened];
        if crate::cpu::features().avx512_bf16 {
            kernels.push(Bf16Kernel::DotProduct);
        }
        if crate::gemm_amx::available() {
            kernels.push(Bf16Kernel::Tiles);
        }
        kernels
    }

    /// Every edge: odd depths, partial panels, partial tiles, one row.
    #[test]
    fn matches_a_float64_product_rounded_once() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 7, 33),
            (5, 64, 32),
            (13, 129, 70),
            (25, 768, 96),
            // Whole tiles of depth (AMX): full and partial row blocks and
            // panels, several blocks per task.
            (1, 32, 1),
            (33, 96, 70),
            (577, 128, 96),
        ] {
            let a = random(m * k, 1);
            let bt = random(n * k, 2);
            let bias: Vec<f32> = random(n, 3).iter().map(|v| v.to_f32()).collect();
            let packed = PackedMatrixBf16::from_transposed(&bt, n, k);
            // The portable reference on every CPU (it reads the packing),
            // each kernel this CPU runs.
            let kernels = if available() { kernels_here() } else { vec![] };
            let paths = std::iter::once(None).chain(kernels.into_iter().map(Some));
            for kernel in paths {
                let mut ours = vec![bf16::ZERO; m * n];
                match kernel {
                    Some(kernel) => matmul_with(kernel, &a, m, &packed, Some(&bias), &mut ours),
                    None => reference_matmul(&a, m, &packed, Some(&bias), &mut ours),
                }
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
                            "{kernel:?} {m}x{k}x{n} at ({i}, {j}): {got} vs {exact}"
                        );
                    }
                }
            }
            let mut column = vec![bf16::ZERO; k];
            packed.copy_column(n - 1, &mut column);
            assert_eq!(column, bt[(n - 1) * k..n * k]);
        }
    }

    /// `VDPBF16PS` as Intel defines it: per lane, the odd depth's product
    /// added to the sum, then the even one's, each with one f32 rounding
    /// (a bf16 product is exact in f32); the bias added; rounded to bf16.
    fn pairs_as_intel_defines(
        a: &[bf16],
        bt: &[bf16],
        bias: &[f32],
        m: usize,
        k: usize,
    ) -> Vec<bf16> {
        pairs_summed(a, bt, bias, m, k, true)
    }

    /// Each product added to an f32 sum with one rounding, depth by depth,
    /// but within a pair the odd depth first when `odd_first` (as
    /// `VDPBF16PS`), else the even one (as AMX's `TDPBF16PS`); the bias
    /// added; rounded to bf16.
    fn pairs_summed(
        a: &[bf16],
        bt: &[bf16],
        bias: &[f32],
        m: usize,
        k: usize,
        odd_first: bool,
    ) -> Vec<bf16> {
        let n = bias.len();
        let mut c = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                let (row, column) = (&a[i * k..][..k], &bt[j * k..][..k]);
                let mut sum = 0.0f32;
                for pair in (0..k).step_by(2) {
                    let order = if odd_first {
                        [pair + 1, pair]
                    } else {
                        [pair, pair + 1]
                    };
                    for depth in order.into_iter().filter(|&depth| depth < k) {
                        sum = row[depth].to_f32().mul_add(column[depth].to_f32(), sum);
                    }
                }
                c.push(bf16::from_f32(sum + bias[j]));
            }
        }
        c
    }

    /// `a [m, k]`, `bᵀ [n, k]` and a bias `[n]`.
    type Operands = (Vec<bf16>, Vec<bf16>, Vec<f32>);

    /// `first`, then random operands of each `(m, k, n)` from `seed` on.
    fn with_random_cases(
        first: (usize, usize, Operands),
        shapes: &[(usize, usize, usize)],
        seed: u64,
    ) -> Vec<(usize, usize, Operands)> {
        let random_case = |&(m, k, n): &(usize, usize, usize)| {
            let bias: Vec<f32> = random(n, seed + 2).iter().map(|v| v.to_f32()).collect();
            (m, k, (random(m * k, seed), random(n * k, seed + 1), bias))
        };
        std::iter::once(first)
            .chain(shapes.iter().map(random_case))
            .collect()
    }

    /// Outputs of `kernel` on the operands whose bits differ from `expected`.
    fn bits_differing(
        kernel: Bf16Kernel,
        m: usize,
        k: usize,
        (a, bt, bias): (&[bf16], &[bf16], &[f32]),
        expected: &[bf16],
    ) -> usize {
        let n = bias.len();
        let packed = PackedMatrixBf16::from_transposed(bt, n, k);
        let mut ours = vec![bf16::ZERO; m * n];
        matmul_with(kernel, a, m, &packed, Some(bias), &mut ours);
        ours.iter()
            .zip(expected)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count()
    }

    /// The widened kernel is exactly that definition, on any CPU; so is
    /// `VDPBF16PS` on Intel's (on AMD's it may round differently, within
    /// the tolerance of the test above).
    #[test]
    fn widened_pairs_add_as_vdpbf16ps_on_intel() {
        if !available() {
            eprintln!("skipped: no AVX-512BW/VL on this CPU");
            return;
        }
        let kernels: Vec<_> = kernels_here()
            .into_iter()
            .filter(|&kernel| {
                kernel == Bf16Kernel::Widened
                    || (kernel == Bf16Kernel::DotProduct && crate::cpu::features().intel)
            })
            .collect();
        // Random sums rarely show the order once rounded to bf16, so one
        // case shows it: products 1, 0, -1, 2^-25 sum to 0 odd-first
        // ((0 + 1) + 2^-25 rounds to 1) and to 2^-25 even-first.
        let ordered = |values: [f32; 4]| values.map(bf16::from_f32).to_vec();
        let order_case = (
            ordered([1.0, 0.0, 1.0, 1.0]),
            ordered([1.0, 0.0, -1.0, 2f32.powi(-25)]),
            vec![0.0f32],
        );
        assert_eq!(
            pairs_as_intel_defines(&order_case.0, &order_case.1, &order_case.2, 1, 4),
            [bf16::ZERO]
        );
        let cases = with_random_cases(
            (1, 4, order_case),
            &[(1, 1, 1), (2, 9, 40), (13, 129, 70), (30, 768, 64)],
            4,
        );
        for (m, k, (a, bt, bias)) in cases {
            let expected = pairs_as_intel_defines(&a, &bt, &bias, m, k);
            for &kernel in &kernels {
                assert_eq!(
                    bits_differing(kernel, m, k, (&a, &bt, &bias), &expected),
                    0,
                    "{kernel:?} {m}x{k}x{}",
                    bias.len()
                );
            }
        }
    }

    /// AMX adds a pair's even depth first (unlike `VDPBF16PS`), one
    /// rounding per product, as Intel's pseudo-code for `TDPBF16PS` has it:
    /// bit for bit, on products whose depth is whole tiles.
    #[test]
    fn tiles_add_the_even_depth_of_a_pair_first() {
        if !crate::gemm_amx::available() {
            eprintln!("skipped: no AMX tiles here");
            return;
        }
        // Products 1, 0, -1, 2^-25 (then zeros) sum to 2^-25 even-first,
        // to 0 odd-first.
        let mut order_case = (vec![bf16::ZERO; 32], vec![bf16::ZERO; 32], vec![0.0f32]);
        for (depth, (x, y)) in [(1.0, 1.0), (0.0, 0.0), (1.0, -1.0), (1.0, 2f32.powi(-25))]
            .into_iter()
            .enumerate()
        {
            order_case.0[depth] = bf16::from_f32(x);
            order_case.1[depth] = bf16::from_f32(y);
        }
        let even_first = pairs_summed(&order_case.0, &order_case.1, &[0.0], 1, 32, false);
        assert_eq!(even_first, [bf16::from_f32(2f32.powi(-25))]);
        let cases = with_random_cases(
            (1, 32, order_case),
            &[(1, 32, 1), (30, 768, 64), (40, 64, 33)],
            7,
        );
        for (m, k, (a, bt, bias)) in cases {
            let expected = pairs_summed(&a, &bt, &bias, m, k, false);
            let differing = bits_differing(Bf16Kernel::Tiles, m, k, (&a, &bt, &bias), &expected);
            assert_eq!(differing, 0, "tiles {m}x{k}x{}", bias.len());
        }
    }

    /// f32 bit patterns that cover every class: all exponents, with
    /// mantissas at and around each rounding boundary, plus a spread.
    #[cfg(target_arch = "x86_64")]
    fn awkward_floats() -> Vec<u32> {
        let mut bits = Vec::new();
        for sign in [0u32, 0x8000_0000] {
            for exponent in 0..=255u32 {
                for mantissa in [
                    0, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1_0000, 0x1_7fff, 0x1_8000, 0x1_8001,
                    0x40_0000, 0x7f_7fff, 0x7f_8000, 0x7f_ffff,
                ] {
                    bits.push(sign | exponent << 23 | mantissa);
                }
            }
        }
        let mut state = 12345u64;
        for _ in 0..100_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            bits.push((state >> 32) as u32);
        }
        bits
    }

    /// `bits` rounded to bf16 sixteen lanes at a time by `round`.
    #[cfg(target_arch = "x86_64")]
    fn round_lanes(
        bits: &[u32],
        round: unsafe fn(std::arch::x86_64::__m512) -> std::arch::x86_64::__m256i,
    ) -> Vec<u16> {
        use std::arch::x86_64::*;
        let mut out = Vec::with_capacity(bits.len());
        for chunk in bits.chunks(16) {
            let mut lanes = [0u32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: the callers checked the CPU features `round` needs;
            // 16 lanes in, 16 out.
            let rounded: [u16; 16] = unsafe {
                std::mem::transmute(round(_mm512_castsi512_ps(_mm512_loadu_si512(
                    lanes.as_ptr().cast(),
                ))))
            };
            out.extend_from_slice(&rounded[..chunk.len()]);
        }
        out
    }

    /// The software rounding is `half`'s (to nearest, ties to even, NaNs
    /// quiet) for normal numbers, infinities and NaNs, flushes denormals
    /// to a signed zero, and on Intel's CPUs with the instruction equals
    /// `VCVTNEPS2BF16` on every pattern.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn software_rounding_is_vcvtneps2bf16() {
        if !available() {
            eprintln!("skipped: no AVX-512BW/VL on this CPU");
            return;
        }
        let bits = awkward_floats();
        let ours = round_lanes(&bits, round_to_bf16);
        for (&b, &r) in bits.iter().zip(&ours) {
            let expected = if b & 0x7f80_0000 == 0 {
                ((b >> 16) & 0x8000) as u16
            } else {
                bf16::from_f32(f32::from_bits(b)).to_bits()
            };
            assert_eq!(r, expected, "{b:#010x}");
        }
        if crate::cpu::features().intel && crate::cpu::features().avx512_bf16 {
            let hardware = round_lanes(&bits, round_by_instruction);
            for ((b, h), r) in bits.iter().zip(hardware).zip(&ours) {
                assert_eq!(h, *r, "{b:#010x}");
            }
        }
    }
}
