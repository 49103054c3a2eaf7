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
//! stays in L2. Measured (`cargo bench --bench kernels`, 2 threads, 577
//! rows, the ViT-B shapes): 337-422 GFLOP/s against candle's 175-210 on
//! Zen 5; on Zen 4, whose AVX-512 runs on 256-bit units, 123-199 against
//! 94-186 (the packing and blocking, not the width), level with oneDNN.
//! bf16 weights have their own kernel, [`super::gemm_bf16`].
//!
//! Summation order differs from candle's (and torch's) only in how partial
//! sums are grouped, which moves results by float32 rounding, as any two
//! BLAS libraries differ.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

use super::panels::{PanelFile, PanelRowType, Panels};

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

/// Whether models use these kernels: the CPU has AVX-512F, and neither
/// [`use_portable_kernels`] nor `CAPTION_KERNELS=portable` in the
/// environment turned them off. Callers fall back to candle's operations
/// otherwise (the path every CPU without AVX-512 takes).
pub fn available() -> bool {
    static FROM_ENVIRONMENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let portable = FORCE_PORTABLE.load(std::sync::atomic::Ordering::Relaxed)
        || *FROM_ENVIRONMENT
            .get_or_init(|| std::env::var("CAPTION_KERNELS").is_ok_and(|v| v == "portable"));
    !portable && cpu_supported()
}

/// From now on, models loaded in this process take candle's portable
/// operations, as on a CPU without AVX-512 (layers already packed keep
/// working). For tests of that path, and for comparing the two.
pub fn use_portable_kernels() {
    FORCE_PORTABLE.store(true, std::sync::atomic::Ordering::Relaxed);
}

static FORCE_PORTABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn cpu_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One depth step of a panel: 32 consecutive output columns, aligned for
/// whole-register loads.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct PanelRow([f32; NR]);

/// The right-hand side of a product, `[k, n]`, rearranged into panels of
/// [`NR`] columns, each stored depth-major (`panel[depth][column]`) and
/// padded with zero columns to a whole panel.
pub struct PackedMatrix {
    k: usize,
    n: usize,
    rows: Panels<PanelRow>,
}

// SAFETY: sixteen f32s, 64 bytes: no padding, any bits a valid value.
unsafe impl PanelRowType for PanelRow {}

impl Clone for PackedMatrix {
    fn clone(&self) -> Self {
        Self {
            k: self.k,
            n: self.n,
            rows: self.rows.clone(),
        }
    }
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedMatrix(k={}, n={})", self.k, self.n)
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
    pub(crate) fn from_transposed_in(
        bt: &[f32],
        n: usize,
        k: usize,
        stride: usize,
        file: Option<&std::sync::Arc<PanelFile>>,
    ) -> Self {
        assert!(
            n == 0 || bt.len() >= (n - 1) * stride + k,
            "pack: `bᵀ` too short"
        );
        let mut rows = Panels::zeroed_in(n.div_ceil(NR) * k, file);
        rows.as_mut_slice()
            .par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(panel, out)| {
                for (chunk, out) in out.chunks_mut(GATHER).enumerate() {
                    let block = gather_rows(bt, n, stride, panel, chunk * GATHER, out.len());
                    out.copy_from_slice(&block[..out.len()]);
                }
            });
        Self { k, n, rows }
    }

    /// [`Self::from_transposed`] on the calling thread (attention keys, one
    /// head at a time inside a parallel loop).
    fn from_transposed_serial(bt: &[f32], n: usize, k: usize, stride: usize) -> Self {
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
    fn from_rows_serial(b: &[f32], k: usize, n: usize, stride: usize) -> Self {
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

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
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
        let rows = Panels::cached(file, offset, bytes, n.div_ceil(NR) * k)?;
        Some(Self { k, n, rows })
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
    assert!(cpu_supported(), "matmul: the CPU has no AVX-512");
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

/// Cuts an `m`-row × `panels`-panel product into (row block, panel range)
/// tasks and runs `run` on each, over the thread pool when `parallel`.
/// Row blocks of at most `max_rows` (a multiple of `row_step`, the rows
/// of the caller's tile) are evened out
/// (577 rows by 240: 204, 204, 169, not 240, 240, 97) so tasks are of a
/// size; panels are grouped so every thread has work twice over (for
/// balance), cutting first along rows (each task then streams its own
/// slice of `a`).
pub(super) fn for_each_block(
    m: usize,
    panels: usize,
    max_rows: usize,
    row_step: usize,
    parallel: bool,
    run: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    let row_blocks = m.div_ceil(max_rows);
    let block_rows = m.div_ceil(row_blocks).next_multiple_of(row_step);
    let row_blocks = m.div_ceil(block_rows);
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let panel_groups = (2 * threads).div_ceil(row_blocks).clamp(1, panels);
    let per_group = panels.div_ceil(panel_groups);
    let panel_groups = panels.div_ceil(per_group);
    let tasks = row_blocks * panel_groups;
    let task = |t: usize| {
        let (block, group) = (t / panel_groups, t % panel_groups);
        let rows = block * block_rows..((block + 1) * block_rows).min(m);
        let cols = group * per_group..((group + 1) * per_group).min(panels);
        run(rows, cols)
    };
    if tasks == 1 || !parallel {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// An output's base pointer, shared by tasks that write disjoint parts of it.
pub(super) struct OutputPtr<T>(pub(super) *mut T);
// SAFETY: tasks write disjoint elements (see `matmul` and its callers).
unsafe impl<T> Send for OutputPtr<T> {}
unsafe impl<T> Sync for OutputPtr<T> {}

impl<T> Clone for OutputPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for OutputPtr<T> {}

impl<T> OutputPtr<T> {
    /// A method, not a field access, so closures capture the whole
    /// (`Send`) wrapper rather than the bare pointer inside it.
    pub(super) fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// Rows `rows` × panels `panels` of the product, depth slice by depth slice.
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

/// Where a tile reads and writes.
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
#[derive(Clone, Copy)]
struct Slice {
    first: bool,
    last: bool,
    depth: usize,
}

/// The tile kernel for `height` rows, a compile-time constant inside so the
/// accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
unsafe fn run_tile(height: usize, tile: &Tile, slice: Slice) {
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

#[cfg(not(target_arch = "x86_64"))]
unsafe fn run_tile(_height: usize, _tile: &Tile, _slice: Slice) {
    unreachable!("AVX-512 kernels on a non-x86 CPU")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_kernel<const R: usize>(tile: &Tile, slice: Slice) {
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

/// The first `lanes` (at most 16) lanes of a register.
#[inline(always)]
pub(super) fn lane_mask(lanes: usize) -> u16 {
    if lanes >= 16 {
        u16::MAX
    } else {
        ((1u32 << lanes) - 1) as u16
    }
}

/// `nn.Linear` on packed weights, as a candle op on `x [rows, in]`
/// (contiguous f32 on the CPU): `[rows, out]`.
#[derive(Debug, Clone)]
pub struct PackedLinear {
    pub weight: PackedMatrix,
    pub bias: Option<Vec<f32>>,
}

impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (k, n) = (self.weight.k, self.weight.n);
        linear_forward(storage, layout, k, n, |xs, rows, out| {
            matmul(
                xs,
                rows,
                k,
                &self.weight,
                self.bias.as_deref(),
                out,
                n,
                true,
            )
        })
    }
}

/// A float32 linear layer's candle op: `product(x, rows, out)` writes
/// `x [rows, k]` times the weights into `out [rows, n]`.
pub(super) fn linear_forward(
    storage: &CpuStorage,
    layout: &Layout,
    k: usize,
    n: usize,
    product: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<(CpuStorage, Shape)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("packed linear: f32 input only");
    };
    let (xs, rows) = linear_input(data, layout, k)?;
    let mut out = vec![0.0f32; rows * n];
    product(xs, rows, &mut out);
    Ok((CpuStorage::F32(out), Shape::from((rows, n))))
}

/// A linear layer's input `[rows, k]`: its contiguous values and `rows`.
pub(super) fn linear_input<'a, T>(
    data: &'a [T],
    layout: &Layout,
    k: usize,
) -> Result<(&'a [T], usize)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("packed linear: needs a contiguous input");
    };
    let (rows, width) = layout.shape().dims2()?;
    if width != k {
        candle_core::bail!("packed linear: input width {width}, weights expect {k}");
    }
    Ok((&data[start..end], rows))
}

/// softmax(q kᵀ · scale) v for every head of a ViT layer, from the fused
/// `qkv` projection `[batch, tokens, 3 · heads · head_dim]` (laid out
/// `[3, heads, head_dim]` per token, as `BlipAttention` reshapes it), to
/// the merged context `[batch, tokens, heads · head_dim]`. No mask. One task
/// per (image, head): the keys and values are packed, the scores computed,
/// softmaxed row by row and multiplied out, without the permuted copies of
/// q, k and v and the 12 × 577 × 577 score tensor the general path makes.
#[derive(Debug, Clone, Copy)]
pub struct FusedSelfAttention {
    pub heads: usize,
    pub scale: f32,
}

/// The shape of a ViT's fused projection `qkv [batch, tokens, 3 · d]`.
#[derive(Clone, Copy)]
pub(super) struct FusedQkv {
    pub heads: usize,
    pub batch: usize,
    pub tokens: usize,
    pub d: usize,
    pub head_dim: usize,
}

/// `data`'s contiguous `qkv` under `layout`, and its shape for `heads`.
pub(super) fn fused_qkv<'a, T>(
    data: &'a [T],
    layout: &Layout,
    heads: usize,
) -> Result<(&'a [T], FusedQkv)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused attention: needs a contiguous input");
    };
    let (batch, tokens, width) = layout.shape().dims3()?;
    let d = width / 3;
    if width % 3 != 0 || heads == 0 || d % heads != 0 {
        candle_core::bail!("fused attention: width {width} for {heads} heads");
    }
    let shape = FusedQkv {
        heads,
        batch,
        tokens,
        d,
        head_dim: d / heads,
    };
    Ok((&data[start..end], shape))
}

/// One (image, head) of a fused projection: the image's `tokens` rows of
/// `qkv`, each `width` (3 · d) long, and the columns where the head's
/// queries, keys and values start.
pub(super) struct QkvHead<'a, T> {
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
pub(super) fn for_each_head<T: Copy + Send + Sync>(
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
    assert!(qkv.len() >= batch * tokens * width && context.len() >= batch * tokens * d);
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

impl CustomOp1 for FusedSelfAttention {
    fn name(&self) -> &'static str {
        "fused-self-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("fused attention: f32 only");
        };
        let (qkv, shape) = fused_qkv(data, layout, self.heads)?;
        let FusedQkv {
            batch,
            tokens,
            d,
            head_dim,
            ..
        } = shape;
        let mut out = vec![0.0f32; batch * tokens * d];
        for_each_head(qkv, shape, &mut out, |head, out| {
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
                super::kernels::scaled_softmax_in_place(row, self.scale);
            }
            let values = PackedMatrix::from_rows_serial(v, tokens, head_dim, head.width);
            // SAFETY: `for_each_head` hands each task its own head's
            // columns of its own image's rows of `out`.
            let out = unsafe { std::slice::from_raw_parts_mut(out, (tokens - 1) * d + head_dim) };
            matmul(&scores, tokens, tokens, &values, None, out, d, false);
        });
        Ok((CpuStorage::F32(out), Shape::from((batch, tokens, d))))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// `len` values in [-1, 1), the same for the same seed.
    pub(in crate::models) fn random(len: usize, seed: u64) -> Vec<f32> {
        // A small LCG: reproducible, and no dependency for test data.
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Largest difference from candle's matmul, relative to the largest
    /// magnitude of its output.
    pub(in crate::models) fn relative_difference(ours: &[f32], reference: &[f32]) -> f32 {
        let scale = reference.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let worst = ours
            .iter()
            .zip(reference)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        worst / scale
    }

    /// Every edge: rows not a multiple of the tile (1, 5, 13, 577), columns
    /// not a multiple of the panel (1, 33, 100), depth across several
    /// slices and not a multiple of one (300, 700), strided rows in and out.
    #[test]
    fn matches_candle_matmul_on_every_edge() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
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
            let mut c = vec![f32::NAN; m * ldc];
            matmul(&a, m, lda, &packed, Some(&bias), &mut c, ldc, true);

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
            let ours: Vec<f32> = (0..m)
                .flat_map(|i| c[i * ldc..i * ldc + n].to_vec())
                .collect();
            let difference = relative_difference(&ours, &expected);
            assert!(
                difference < 1e-5,
                "m={m} k={k} n={n}: relative difference {difference}"
            );
            // The columns past n in each row are not written.
            for i in 0..m {
                assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|x| x.is_nan()));
            }
        }
    }

    #[test]
    fn fused_attention_matches_the_general_path() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        // Two images, 3 heads of 20, 37 tokens (no dimension a tile multiple).
        let (batch, tokens, heads, head_dim) = (2, 37, 3, 20);
        let d = heads * head_dim;
        let qkv = Tensor::from_vec(
            random(batch * tokens * 3 * d, 7),
            (batch, tokens, 3 * d),
            &Device::Cpu,
        )
        .unwrap();
        let scale = (head_dim as f32).powf(-0.5);
        let ours = qkv
            .apply_op1_no_bwd(&FusedSelfAttention { heads, scale })
            .unwrap();
        let split = qkv
            .reshape((batch, tokens, 3, heads, head_dim))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap();
        let part = |i: usize| split.get(i).unwrap().contiguous().unwrap();
        let context =
            crate::models::general_attention(&part(0), &part(1), &part(2), scale as f64, None)
                .unwrap();
        let expected = crate::models::merge_heads(&context).unwrap();
        let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let difference = relative_difference(&flat(&ours), &flat(&expected));
        assert!(difference < 1e-5, "relative difference {difference}");
    }
}
