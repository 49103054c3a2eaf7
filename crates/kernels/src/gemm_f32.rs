//! Float32 matrix products on AVX-512, for the CPUs that have it.
//!
//! candle's CPU matmul (the gemm crate) runs its AVX2 kernel on stable Rust:
//! 8 lanes per FMA. The Zen 5 cores this tool is measured on execute AVX-512
//! FMAs at full width, twice the AVX2 rate (measured: 238 against 118
//! GFLOP/s per core in a register-only loop), and the gemm crate's own
//! AVX-512 path (its `x86-v4` feature) gained only 15% on the vision encoder
//! while slowing few-row products 1.5-2.7x. So the linear layers' weights
//! are packed once, at load, into the layout our kernel streams, and the
//! ViT's attention runs on the same kernel head by head.
//!
//! The kernel is the classic register-blocked one: a tile of [`MR`] rows ×
//! [`NR`] columns of the output lives in 24 of the 32 vector registers while
//! the depth runs; each depth step loads two 16-lane rows of the packed
//! matrix and broadcasts one value of each row of `a`. Depth comes in slices
//! of [`KC`] and rows in blocks of [`MC`], sized so what a tile re-reads
//! stays in L2. Measured (`cargo bench -p caption-kernels --bench kernels`, 2 threads, 577
//! rows, the ViT-B shapes): 337-422 GFLOP/s against candle's 175-210 on
//! Zen 5; on Zen 4, whose AVX-512 runs on 256-bit units, 123-199 against
//! 94-186 (the packing and blocking, not the width), level with oneDNN.
//! bf16 weights have their own kernel, [`super::gemm_bf16`].
//!
//! Summation order differs from candle's (and torch's) only in how partial
//! sums are grouped, which moves results by float32 rounding, as any two
//! BLAS libraries differ.

use std::sync::Arc;

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::blocks::lane_mask;
use crate::blocks::{for_each_block, OutputPtr};
use crate::packed::{Packed, PackedProduct, PanelLayout};
use crate::panels::{PanelFile, PanelRowType, Panels};

/// Output columns per tile and per packed panel: two 16-lane registers.
pub const NR: usize = 32;
/// Rows per tile: 12 rows × 2 registers = 24 accumulators, leaving room for
/// the two packed rows and the broadcast value.
pub(super) const MR: usize = 12;
/// Depth per pass: a tile runs the whole depth of the ViT-B products (768)
/// in one go, so its output is written once, never read back. Measured on
/// one core, 577 × 768 × 3072: 147 GFLOP/s with 256 (partial sums stored
/// and reloaded from beyond the cache; the same with prefetching), 207
/// with 768. The panel's slice (768 × 32 floats, 96 KB) streams from L2.
const KC: usize = 768;
/// Rows per block: the block's depth slice of `a` (240 × 768 floats,
/// 720 KB) and a panel's slice share the 2 MB L2 while the panels pass.
const MC: usize = 240;

/// Whether callers use these kernels: the CPU has AVX-512F, and
/// [`crate::cpu::portable`] is off. Callers fall back to candle's
/// operations otherwise (the path every CPU without AVX-512 takes).
pub fn available() -> bool {
    !crate::cpu::portable() && crate::cpu::features().avx512f
}

/// One depth step of a panel: 32 consecutive output columns, aligned for
/// whole-register loads.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct PanelRow([f32; NR]);

// SAFETY: thirty-two f32s, 128 bytes: no padding, any bits a valid value.
unsafe impl PanelRowType for PanelRow {}

/// [`gemm_f32`](self)'s layout: panels of [`NR`] columns, each stored
/// depth-major (`panel[depth][column]`) and padded with zero columns.
pub struct F32Panels;

impl PanelLayout for F32Panels {
    type Row = PanelRow;
    const NAME: &'static str = "PackedMatrix";
    fn rows(k: usize, n: usize) -> usize {
        n.div_ceil(NR) * k
    }
}

/// The right-hand side of a float32 product, `[k, n]`, in [`F32Panels`].
pub type PackedMatrix = Packed<F32Panels>;

impl PackedProduct for F32Panels {
    type Value = f32;
    fn available() -> bool {
        available()
    }
    fn product(b: &PackedMatrix, x: &[f32], rows: usize, bias: Option<&[f32]>, c: &mut [f32]) {
        matmul(x, rows, b.k, b, bias, c, b.n, true)
    }
}

impl PackedMatrix {
    /// From `bᵀ`: `n` rows of `k` values, row `j` starting at `j * stride`
    /// (an `nn.Linear` weight `[out, in]`). Panels are packed in parallel:
    /// a weight matrix is megabytes.
    pub fn from_transposed(bt: &[f32], n: usize, k: usize, stride: usize) -> Self {
        Self::from_transposed_in(bt, n, k, stride, None)
    }

    /// [`Self::from_transposed`], packed into `file` where it has room.
    pub fn from_transposed_in(
        bt: &[f32],
        n: usize,
        k: usize,
        stride: usize,
        file: Option<&Arc<PanelFile>>,
    ) -> Self {
        assert!(
            n == 0 || bt.len() >= (n - 1) * stride + k,
            "pack: `bᵀ` too short"
        );
        let mut packed = Self::zeroed_in(k, n, file);
        packed
            .rows
            .as_mut_slice()
            .par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(panel, out)| {
                for (chunk, out) in out.chunks_mut(GATHER).enumerate() {
                    let block = gather_rows(bt, n, stride, panel, chunk * GATHER, out.len());
                    out.copy_from_slice(&block[..out.len()]);
                }
            });
        packed
    }

    /// [`Self::from_transposed`] on the calling thread (attention keys, one
    /// head at a time inside a parallel loop).
    pub(crate) fn from_transposed_serial(bt: &[f32], n: usize, k: usize, stride: usize) -> Self {
        let mut rows = Vec::with_capacity(n.div_ceil(NR) * k);
        for panel in 0..n.div_ceil(NR) {
            for first_depth in (0..k).step_by(GATHER) {
                let count = GATHER.min(k - first_depth);
                let block = gather_rows(bt, n, stride, panel, first_depth, count);
                rows.extend_from_slice(&block[..count]);
            }
        }
        Self {
            k,
            n,
            rows: Panels::Heap(rows),
        }
    }

    /// From `b` itself: `k` rows of `n` values, row `d` starting at
    /// `d * stride` (attention values).
    pub(crate) fn from_rows_serial(b: &[f32], k: usize, n: usize, stride: usize) -> Self {
        let mut packed = Self::zeroed(k, n);
        for (panel, rows) in packed.rows.as_mut_slice().chunks_mut(k.max(1)).enumerate() {
            let first = panel * NR;
            let width = NR.min(n - first);
            for (depth, row) in rows.iter_mut().enumerate() {
                let start = depth * stride + first;
                row.0[..width].copy_from_slice(&b[start..start + width]);
            }
        }
        packed
    }

    fn zeroed(k: usize, n: usize) -> Self {
        Self {
            k,
            n,
            rows: Panels::Heap(vec![PanelRow([0.0; NR]); n.div_ceil(NR) * k]),
        }
    }

    /// Column `j` of `b` (row `j` of `bᵀ`: a vocabulary entry of an output
    /// projection tied to the word embeddings) into `out[..k]`.
    pub fn copy_column(&self, j: usize, out: &mut [f32]) {
        let panel = &self.rows.as_slice()[(j / NR) * self.k..][..self.k];
        for (value, row) in out.iter_mut().zip(panel) {
            *value = row.0[j % NR];
        }
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

/// Depths per gather: one cache line of each source row.
const GATHER: usize = 16;

/// Depths `first_depth..+count` (at most [`GATHER`]) of panel `panel`
/// from `bᵀ`: values from each of the panel's rows of `bᵀ`, zero past the
/// last. Each source row gives one cache line, read whole, and the block of
/// output rows is written whole; going value by value instead, the 32
/// source rows of a 3072-wide matrix (12 KB apart, one L1 set) evicted each
/// other at every depth.
#[inline(always)]
fn gather_rows(
    bt: &[f32],
    n: usize,
    stride: usize,
    panel: usize,
    first_depth: usize,
    count: usize,
) -> [PanelRow; GATHER] {
    let mut block = [PanelRow([0.0; NR]); GATHER];
    let first = panel * NR;
    for column in 0..NR.min(n - first) {
        let source = &bt[(first + column) * stride + first_depth..][..count];
        for (row, &value) in block.iter_mut().zip(source) {
            row.0[column] = value;
        }
    }
    block
}

/// `c[m, n] = a[m, k] · b (+ bias)`, rows of `a` and `c` at strides `lda`
/// and `ldc`; `c`'s other columns are left alone. `parallel` spreads the
/// work over the thread pool; inside an already-parallel loop, pass false.
///
/// # Panics
/// If the slices are too short for the shapes, or the CPU lacks AVX-512
/// (check [`available`] first).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &PackedMatrix,
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
        crate::cpu::features().avx512f,
        "matmul: the CPU has no AVX-512"
    );
    assert!(lda >= k && ldc >= n, "matmul: strides shorter than rows");
    assert!(a.len() >= (m - 1) * lda + k, "matmul: `a` too short");
    assert!(c.len() >= (m - 1) * ldc + n, "matmul: `c` too short");
    if let Some(bias) = bias {
        assert!(bias.len() >= n, "matmul: bias too short");
    }
    let out = OutputPtr(c.as_mut_ptr());
    let run = |rows: std::ops::Range<usize>, panels: std::ops::Range<usize>| {
        // SAFETY: AVX-512 was checked above, the bounds were asserted, and
        // tasks write disjoint (row block, panel range) rectangles of `c`.
        unsafe { product_block(a, lda, rows, b, panels, bias, out, ldc) }
    };
    for_each_block(m, b.panels(), MC, MR, parallel, run);
}

/// [`matmul`] in plain scalar code over the same packed panels, summed in
/// f64: the portable reference every CPU runs, and the yardstick the
/// AVX-512 kernel is tested against.
///
/// # Panics
/// If the slices are too short for the shapes.
#[allow(clippy::too_many_arguments)]
pub fn reference_matmul(
    a: &[f32],
    m: usize,
    lda: usize,
    b: &PackedMatrix,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
) {
    let (k, n) = (b.k, b.n);
    let rows = b.rows.as_slice();
    for i in 0..m {
        let a_row = &a[i * lda..][..k];
        for j in 0..n {
            let panel = &rows[(j / NR) * k..][..k];
            let sum: f64 = a_row
                .iter()
                .zip(panel)
                .map(|(&x, row)| x as f64 * row.0[j % NR] as f64)
                .sum();
            c[i * ldc + j] = (sum + bias.map_or(0.0, |bias| bias[j] as f64)) as f32;
        }
    }
}

/// Rows `rows` × panels `panels` of the product, depth slice by depth slice.
///
/// # Safety
/// AVX-512F must be available; `a` must hold `rows` rows of `b.k()` values,
/// `lda` apart, and `c` the same rows of `b.n()` outputs, `ldc` apart, which
/// no other task writes; `bias`, when given, `b.n()` values.
#[allow(clippy::too_many_arguments)]
unsafe fn product_block(
    a: &[f32],
    lda: usize,
    rows: std::ops::Range<usize>,
    b: &PackedMatrix,
    panels: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    c: OutputPtr<f32>,
    ldc: usize,
) {
    // SAFETY: the caller upholds this function's contract (see # Safety), which is
    // what every tile below reads and writes within.
    unsafe {
        let (k, n) = (b.k, b.n);
        let mut start = 0;
        while start < k {
            let depth = KC.min(k - start);
            let slice = Slice {
                first: start == 0,
                last: start + depth == k,
                depth,
            };
            for panel in panels.clone() {
                let columns = NR.min(n - panel * NR);
                let packed = b.rows.as_slice().as_ptr().add(panel * k + start);
                let bias = bias.map(|bias| bias.as_ptr().add(panel * NR));
                let mut row = rows.start;
                while row < rows.end {
                    let height = MR.min(rows.end - row);
                    let tile = Tile {
                        a: a.as_ptr().add(row * lda + start),
                        lda,
                        packed,
                        c: c.at(row * ldc + panel * NR),
                        ldc,
                        columns,
                        bias,
                    };
                    run_tile(height, &tile, slice);
                    row += height;
                }
            }
            start += depth;
        }
    }
}

/// Where a tile reads and writes.
// Read only by the x86 tile kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Tile {
    a: *const f32,
    lda: usize,
    packed: *const PanelRow,
    c: *mut f32,
    ldc: usize,
    /// Output columns that exist in this panel (the rest is padding).
    columns: usize,
    bias: Option<*const f32>,
}

/// Which depth slice a tile is on: the first writes `c`, later ones add to
/// it, the last adds the bias (after the whole sum, as `x·wᵀ + b`).
// Read only by the x86 tile kernels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy)]
struct Slice {
    first: bool,
    last: bool,
    depth: usize,
}

/// The tile kernel for `height` rows, a compile-time constant inside so the
/// accumulators stay in registers.
///
/// # Safety
/// As [`tile_kernel`], and `height` at most [`MR`].
#[cfg(target_arch = "x86_64")]
unsafe fn run_tile(height: usize, tile: &Tile, slice: Slice) {
    // SAFETY: the caller upholds `tile_kernel`'s contract for this height.
    unsafe {
        match height {
            12 => tile_kernel::<12>(tile, slice),
            11 => tile_kernel::<11>(tile, slice),
            10 => tile_kernel::<10>(tile, slice),
            9 => tile_kernel::<9>(tile, slice),
            8 => tile_kernel::<8>(tile, slice),
            7 => tile_kernel::<7>(tile, slice),
            6 => tile_kernel::<6>(tile, slice),
            5 => tile_kernel::<5>(tile, slice),
            4 => tile_kernel::<4>(tile, slice),
            3 => tile_kernel::<3>(tile, slice),
            2 => tile_kernel::<2>(tile, slice),
            1 => tile_kernel::<1>(tile, slice),
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
unsafe fn run_tile(_height: usize, _tile: &Tile, _slice: Slice) {
    unreachable!("AVX-512 kernels on a non-x86 CPU")
}

/// # Safety
/// AVX-512F must be available; `tile` must point at `R` rows of `a` and
/// of `c` (`lda`, `ldc` apart), `slice.depth` packed rows, and (when set) 32
/// bias values, all valid for the accesses below.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_kernel<const R: usize>(tile: &Tile, slice: Slice) {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        use std::arch::x86_64::*;
        if !slice.first {
            // The partial sums this tile adds to were written a whole pass
            // over the panels ago and are likely out of cache: fetch them
            // while the depth loop runs rather than stall on them after it.
            for r in 0..R {
                let out = tile.c.add(r * tile.ldc) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(out);
                _mm_prefetch::<_MM_HINT_T0>(out.add(64));
            }
        }
        let mut low = [_mm512_setzero_ps(); R];
        let mut high = [_mm512_setzero_ps(); R];
        for depth in 0..slice.depth {
            let packed = tile.packed.add(depth) as *const f32;
            let b_low = _mm512_load_ps(packed);
            let b_high = _mm512_load_ps(packed.add(16));
            for r in 0..R {
                let x = _mm512_set1_ps(*tile.a.add(r * tile.lda + depth));
                low[r] = _mm512_fmadd_ps(x, b_low, low[r]);
                high[r] = _mm512_fmadd_ps(x, b_high, high[r]);
            }
        }
        let mask_low = lane_mask(tile.columns);
        let mask_high = lane_mask(tile.columns.saturating_sub(16));
        let (bias_low, bias_high) = match (slice.last, tile.bias) {
            (true, Some(bias)) => (
                _mm512_maskz_loadu_ps(mask_low, bias),
                _mm512_maskz_loadu_ps(mask_high, bias.add(16)),
            ),
            _ => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        for r in 0..R {
            let out = tile.c.add(r * tile.ldc);
            let (mut v_low, mut v_high) = (low[r], high[r]);
            if !slice.first {
                v_low = _mm512_add_ps(_mm512_maskz_loadu_ps(mask_low, out), v_low);
                v_high = _mm512_add_ps(_mm512_maskz_loadu_ps(mask_high, out.add(16)), v_high);
            }
            if slice.last && tile.bias.is_some() {
                v_low = _mm512_add_ps(v_low, bias_low);
                v_high = _mm512_add_ps(v_high, bias_high);
            }
            _mm512_mask_storeu_ps(out, mask_low, v_low);
            _mm512_mask_storeu_ps(out.add(16), mask_high, v_high);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{random, relative_difference};
    use candle_core::{Device, Tensor};

    /// Every edge: rows not a multiple of the tile (1, 5, 13, 577), columns
    /// not a multiple of the panel (1, 33, 100), depth across several
    /// slices and not a multiple of one (300, 700), strided rows in and out.
    #[test]
    fn matches_candle_matmul_on_every_edge() {
        for (case, &(m, k, n)) in [
            (1, 64, 32),
            (5, 300, 33),
            (13, 700, 100),
            (577, 768, 96),
            (3, 17, 1),
            (24, 1, 64),
        ]
        .iter()
        .enumerate()
        {
            let (lda, ldc) = (k + 3, n + 5);
            let a = random(m * lda, case as u64);
            let w = random(n * k, 100 + case as u64);
            let bias = random(n, 200 + case as u64);
            let packed = PackedMatrix::from_transposed(&w, n, k, k);

            let a_t = Tensor::from_vec(a.clone(), (m, lda), &Device::Cpu)
                .unwrap()
                .narrow(1, 0, k)
                .unwrap();
            let w_t = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
            let b_t = Tensor::from_vec(bias.clone(), n, &Device::Cpu).unwrap();
            let expected: Vec<f32> = a_t
                .matmul(&w_t.t().unwrap())
                .unwrap()
                .broadcast_add(&b_t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            // The portable reference on every CPU (it reads the packing),
            // the AVX-512 kernel where it runs.
            let kernel = available().then_some("avx512");
            for path in std::iter::once("reference").chain(kernel) {
                let mut c = vec![f32::NAN; m * ldc];
                match path {
                    "avx512" => matmul(&a, m, lda, &packed, Some(&bias), &mut c, ldc, true),
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
                // The columns past n in each row are not written.
                for i in 0..m {
                    assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|x| x.is_nan()));
                }
            }
        }
    }
}
