//! bfloat16 matrix products on AMX tiles (`--dtype bf16` on Xeons from
//! Sapphire Rapids on).
//!
//! Intel's cores run `VDPBF16PS` at half the float32 FMA rate, so on them
//! [`crate::gemm_bf16`]'s vector kernels are no faster than float32. The
//! same CPUs have AMX: eight tile registers of 16 rows × 64 bytes, and
//! `TDPBF16PS`, which multiplies a 16 × 32 bf16 tile of `a` by a 32 × 16
//! tile of `b` into a 16 × 16 tile of f32 sums, 8192 multiply-adds in one
//! instruction. Measured in a register-only loop on one core of a 2-vCPU
//! Xeon VM (family 6, model 167): 1650 GFLOP/s, against about 160 for
//! float32 FMAs.
//!
//! The `b` tile's layout is the pair rows [`PackedMatrixBf16`] already
//! holds (row `p` of a tile: depths `2p`, `2p + 1` of 16 columns,
//! interleaved), so the packed weights, and the pack cache, serve both.
//! A block of 32 output rows × one 32-column panel keeps four sum tiles
//! (rows 0-15 and 16-31 × columns 0-15 and 16-31) while the depth runs 32
//! at a time: two tiles of `a`, straight from its rows, and the panel's two
//! halves. The sums are rounded to bf16 once, after the bias, as the vector
//! kernels do. A block of at most 16 rows (a decoding step) takes one tile
//! of `a` and prefetches the panel ahead: there the weights come from
//! memory, and the tile loads alone left a third of its bandwidth unused.
//!
//! Rust has no stable AMX intrinsics, so the tile instructions are inline
//! assembly. Linux gives a process the tile state only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, since 5.16): [`available`] asks
//! once, and is false where the kernel refuses and on other systems
//! (`CAPTION_BF16_KERNEL=dot|widened` makes bf16 layers take a vector
//! kernel all the same, see [`crate::gemm_bf16::kernel`]).

use half::bf16;

#[cfg(target_arch = "x86_64")]
use crate::bf16_panels::round_to_bf16;
use crate::bf16_panels::PackedMatrixBf16;
#[cfg(target_arch = "x86_64")]
use crate::blocks::lane_mask;
use crate::blocks::{for_each_block, OutputPtr};

/// Rows of a tile, and of `a` per tile load.
const TILE_ROWS: usize = 16;
/// Output rows per block: two tiles of `a`.
const BLOCK_ROWS: usize = 2 * TILE_ROWS;
/// Depths per step: one tile of `a` is 16 rows × 32 bf16 (64 bytes).
pub const DEPTH_STEP: usize = 32;
/// Columns of a panel (as [`crate::gemm_bf16`] packs them): two sum tiles.
pub(crate) const NR: usize = 32;
/// Bytes of a packed pair row: 32 columns × 2 depths × 2 bytes.
const PAIR_ROW_BYTES: usize = 2 * NR * 2;
/// How far ahead [`short_block_sums`] prefetches the panel: four depth
/// steps (BLIP-base bf16, 20 tokens at batch 1: 0.33-0.35 s with 2 or 4,
/// 0.34-0.35 s with 8, 0.38 s with 16, 0.41-0.44 s without).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 4 * TILE_ROWS * PAIR_ROW_BYTES;
/// Bytes of `a` a row block may take, so it stays in L2 while panels pass.
const BLOCK_BYTES: usize = 512 * 1024;

/// Whether bf16 products can run on AMX tiles here: [`crate::gemm_bf16`]'s
/// kernels can run (AVX-512 for the rounding), the CPU has AMX-TILE and
/// AMX-BF16, and the operating system granted this process the tile state.
pub fn available() -> bool {
    // What `gemm_bf16::available` asks (AVX-512 for the rounding), and AMX.
    crate::gemm_f32::available()
        && crate::cpu::features().avx512bw_vl
        && crate::cpu::features().amx_bf16
}

/// Whether the product with `b` can take this kernel: its depth is whole
/// steps of [`DEPTH_STEP`] (every BLIP and BLIP-2 layer's is: 768, 1024,
/// 1408, 2560, 3072, 4096, 6144, 10240). Others take the vector kernels.
pub fn fits(b: &PackedMatrixBf16) -> bool {
    b.k() > 0 && b.k().is_multiple_of(DEPTH_STEP)
}

/// `c[m, n] = bf16(a[m, k] · b + bias)`, all contiguous, over the thread
/// pool.
///
/// # Panics
/// If [`available`] or [`fits`] is false, or the slices are too short.
pub fn matmul(a: &[bf16], m: usize, b: &PackedMatrixBf16, bias: Option<&[f32]>, c: &mut [bf16]) {
    let (k, n) = (b.k(), b.n());
    if m == 0 || n == 0 {
        return;
    }
    assert!(available(), "AMX matmul: no AMX tiles on this CPU");
    assert!(fits(b), "AMX matmul: depth {k} is not whole tiles");
    assert!(
        a.len() >= m * k && c.len() >= m * n,
        "AMX matmul: slices too short"
    );
    if let Some(bias) = bias {
        assert!(bias.len() >= n, "AMX matmul: bias too short");
    }
    let max_rows = (BLOCK_BYTES / (2 * k))
        .clamp(BLOCK_ROWS, 256)
        .next_multiple_of(BLOCK_ROWS);
    let out = OutputPtr(c.as_mut_ptr());
    let left = LeftRows { a, lda: k, k };
    let right = RightPanels {
        bytes: b.panel_bytes(),
        k,
        n,
    };
    let run = |rows: std::ops::Range<usize>, panels: std::ops::Range<usize>| {
        let store = |sums: &Sums, row: usize, height: usize, panel: usize, columns: usize| {
            let bias = bias.map(|bias| &bias[panel * NR..][..columns]);
            // SAFETY: tasks write disjoint (rows, panels) rectangles of `c`,
            // whose bounds were asserted.
            unsafe { store_block(sums, height, columns, bias, out.at(row * n + panel * NR), n) }
        };
        // SAFETY: AMX was checked (and granted) above, the depth is whole
        // tiles, and the operands' bounds were asserted.
        unsafe { product_block(left, rows, right, panels, store) }
    };
    for_each_block(m, n.div_ceil(NR), max_rows, BLOCK_ROWS, true, run);
}

/// The tile configuration every block uses (palette 1): tiles 0-3 hold
/// sums, 4-5 rows of `a`, 6-7 halves of a panel; all 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn uniform() -> Self {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        for tile in 0..8 {
            bytes[16 + 2 * tile..][..2].copy_from_slice(&64u16.to_le_bytes());
            bytes[48 + tile] = TILE_ROWS as u8;
        }
        Self(bytes)
    }
}

/// A product's left operand: rows of `k` bf16 values, `lda` apart.
#[derive(Clone, Copy)]
pub(crate) struct LeftRows<'a> {
    pub a: &'a [bf16],
    pub lda: usize,
    pub k: usize,
}

/// A product's right operand, `[k, n]` in panels of [`NR`] columns, each
/// `k / 2` pair rows ([`PAIR_ROW_BYTES`] each).
#[derive(Clone, Copy)]
pub(crate) struct RightPanels<'a> {
    pub bytes: &'a [u8],
    pub k: usize,
    pub n: usize,
}

/// Rows `rows` × panels `panels` of a product, on this thread's tiles:
/// each block of up to 32 rows × one panel goes to `store(sums, first row,
/// height, panel, columns)`.
///
/// # Safety
/// AMX must be granted, `k` whole tiles of depth, `left` hold every row in
/// `rows` and `right` every panel in `panels`.
pub(crate) unsafe fn product_block(
    left: LeftRows,
    rows: std::ops::Range<usize>,
    right: RightPanels,
    panels: std::ops::Range<usize>,
    mut store: impl FnMut(&Sums, usize, usize, usize, usize),
) {
    // SAFETY: the caller upholds this function's contract (see # Safety): the
    // tiles are granted, and every block below reads rows of `left` in `rows`
    // (or the zero-padded copy) and panels of `right` in `panels`.
    unsafe {
        let (k, lda) = (left.k, left.lda);
        debug_assert!(k == right.k && k.is_multiple_of(DEPTH_STEP));
        let pair_rows = k / 2;
        // A last block of fewer than 32 rows is copied out with zero rows
        // after it, so tile loads never read past `a`.
        let tail_rows = (rows.end - rows.start) % BLOCK_ROWS;
        let tail = (tail_rows > 0).then(|| {
            let mut padded = vec![bf16::ZERO; BLOCK_ROWS * k];
            for (r, row) in padded.chunks_exact_mut(k).take(tail_rows).enumerate() {
                row.copy_from_slice(&left.a[(rows.end - tail_rows + r) * lda..][..k]);
            }
            padded
        });
        let mut sums = Sums([0.0; BLOCK_ROWS * NR]);
        let theirs = saved_tiles();
        configure_tiles(&TileConfig::uniform());
        for panel in panels {
            let packed = right.bytes[panel * pair_rows * PAIR_ROW_BYTES..]
                [..pair_rows * PAIR_ROW_BYTES]
                .as_ptr();
            let columns = NR.min(right.n - panel * NR);
            let mut row = rows.start;
            while row < rows.end {
                let height = BLOCK_ROWS.min(rows.end - row);
                let (rows_of_a, stride) = match &tail {
                    Some(padded) if height < BLOCK_ROWS => (padded.as_ptr(), k),
                    _ => (
                        left.a[row * lda..][..(BLOCK_ROWS - 1) * lda + k].as_ptr(),
                        lda,
                    ),
                };
                if height <= TILE_ROWS {
                    short_block_sums(rows_of_a, stride, k, packed, &mut sums);
                } else {
                    block_sums(rows_of_a, stride, k, packed, &mut sums);
                }
                store(&sums, row, height, panel, columns);
                row += height;
            }
        }
        restore_tiles(&theirs);
    }
}

/// A block's f32 sums, rows of 32 columns (128 bytes).
#[repr(C, align(64))]
pub(crate) struct Sums(pub [f32; BLOCK_ROWS * NR]);

/// # Safety
/// AMX must be granted to this process (see [`available`]).
#[cfg(target_arch = "x86_64")]
unsafe fn configure_tiles(config: &TileConfig) {
    // SAFETY: the caller checked AMX is granted; the configuration is 64 bytes, as
    // LDTILECFG reads.
    unsafe {
        std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    }
}

/// This thread's tile configuration as we found it (all zeros: none).
///
/// Other AMX code shares our threads: candle's q4k kernels (`--quantize
/// q4k`, prefill of 32 rows or more) load their configuration once per
/// thread and assume it stays. Releasing the tiles after our products left
/// their next `tilezero` without one, an illegal instruction (SIGILL,
/// LLaVA-1.5-7b with `--dtype bf16 --quantize q4k`); so each product puts
/// back what it found.
///
/// # Safety
/// AMX must be granted to this process (see [`available`]).
#[cfg(target_arch = "x86_64")]
unsafe fn saved_tiles() -> TileConfig {
    let mut config = TileConfig([0; 64]);
    // SAFETY: the caller checked AMX is granted; STTILECFG writes 64 bytes,
    // the size of `config` (zeros when no configuration is loaded).
    unsafe {
        std::arch::asm!("sttilecfg [{}]", in(reg) config.0.as_mut_ptr(), options(nostack));
    }
    config
}

/// Loads `saved` (from [`saved_tiles`]) again, or releases the tiles if
/// none was loaded.
///
/// # Safety
/// AMX must be granted to this process (see [`available`]).
#[cfg(target_arch = "x86_64")]
unsafe fn restore_tiles(saved: &TileConfig) {
    // SAFETY: the caller checked AMX is granted; a non-zero palette is a
    // configuration LDTILECFG accepted before, and TILERELEASE touches no memory.
    unsafe {
        if saved.0[0] == 0 {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        } else {
            configure_tiles(saved);
        }
    }
}

/// Sums of 32 rows of `a` (`k` long, `lda` apart) times a packed panel,
/// whole depth, into `sums`.
///
/// # Safety
/// AMX must be granted and the tiles configured ([`configure_tiles`]);
/// `a` must hold 32 rows of `k` values, `lda` apart, and `panel` `k / 2`
/// pair rows; `k` must be whole [`DEPTH_STEP`]s.
#[cfg(target_arch = "x86_64")]
unsafe fn block_sums(a: *const bf16, lda: usize, k: usize, panel: *const u8, sums: &mut Sums) {
    // SAFETY: the caller upholds this function's contract (see # Safety): every
    // tile load stays inside those rows, and the stores inside `sums`.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a} + {lda}*1]",
            "tileloadd tmm5, [{a_low} + {lda}*1]",
            "tileloadd tmm6, [{b} + {ldb}*1]",
            "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 64",
            "add {a_low}, 64",
            "add {b}, {b_step}",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c} + {ldc}*1 + 64], tmm1",
            "tilestored [{c_low} + {ldc}*1], tmm2",
            "tilestored [{c_low} + {ldc}*1 + 64], tmm3",
            a = inout(reg) a => _,
            a_low = inout(reg) a.add(TILE_ROWS * lda) => _,
            lda = in(reg) 2 * lda,
            b = inout(reg) panel => _,
            ldb = in(reg) PAIR_ROW_BYTES,
            b_step = in(reg) TILE_ROWS * PAIR_ROW_BYTES,
            steps = inout(reg) k / DEPTH_STEP => _,
            c = in(reg) sums.0.as_mut_ptr(),
            c_low = in(reg) sums.0.as_mut_ptr().add(TILE_ROWS * NR),
            ldc = in(reg) NR * 4,
            options(nostack),
        );
    }
}

/// [`block_sums`] for a block of at most 16 rows (a decoding step's): one
/// tile of `a`, two of sums, and the panel prefetched [`PREFETCH_AHEAD`]
/// bytes ahead, as the product reads weights from memory, not cache.
///
/// # Safety
/// As [`block_sums`], with 16 rows of `a`. The prefetches may reach past
/// the panel: prefetching never faults.
#[cfg(target_arch = "x86_64")]
unsafe fn short_block_sums(
    a: *const bf16,
    lda: usize,
    k: usize,
    panel: *const u8,
    sums: &mut Sums,
) {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "2:",
            "prefetcht0 [{b} + {ahead} + 0]",
            "prefetcht0 [{b} + {ahead} + 64]",
            "prefetcht0 [{b} + {ahead} + 128]",
            "prefetcht0 [{b} + {ahead} + 192]",
            "prefetcht0 [{b} + {ahead} + 256]",
            "prefetcht0 [{b} + {ahead} + 320]",
            "prefetcht0 [{b} + {ahead} + 384]",
            "prefetcht0 [{b} + {ahead} + 448]",
            "prefetcht0 [{b} + {ahead} + 512]",
            "prefetcht0 [{b} + {ahead} + 576]",
            "prefetcht0 [{b} + {ahead} + 640]",
            "prefetcht0 [{b} + {ahead} + 704]",
            "prefetcht0 [{b} + {ahead} + 768]",
            "prefetcht0 [{b} + {ahead} + 832]",
            "prefetcht0 [{b} + {ahead} + 896]",
            "prefetcht0 [{b} + {ahead} + 960]",
            "prefetcht0 [{b} + {ahead} + 1024]",
            "prefetcht0 [{b} + {ahead} + 1088]",
            "prefetcht0 [{b} + {ahead} + 1152]",
            "prefetcht0 [{b} + {ahead} + 1216]",
            "prefetcht0 [{b} + {ahead} + 1280]",
            "prefetcht0 [{b} + {ahead} + 1344]",
            "prefetcht0 [{b} + {ahead} + 1408]",
            "prefetcht0 [{b} + {ahead} + 1472]",
            "prefetcht0 [{b} + {ahead} + 1536]",
            "prefetcht0 [{b} + {ahead} + 1600]",
            "prefetcht0 [{b} + {ahead} + 1664]",
            "prefetcht0 [{b} + {ahead} + 1728]",
            "prefetcht0 [{b} + {ahead} + 1792]",
            "prefetcht0 [{b} + {ahead} + 1856]",
            "prefetcht0 [{b} + {ahead} + 1920]",
            "prefetcht0 [{b} + {ahead} + 1984]",
            "tileloadd tmm4, [{a} + {lda}*1]",
            "tileloadd tmm6, [{b} + {ldb}*1]",
            "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "add {a}, 64",
            "add {b}, {b_step}",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c} + {ldc}*1 + 64], tmm1",
            a = inout(reg) a => _,
            lda = in(reg) 2 * lda,
            b = inout(reg) panel => _,
            ldb = in(reg) PAIR_ROW_BYTES,
            b_step = in(reg) TILE_ROWS * PAIR_ROW_BYTES,
            ahead = const PREFETCH_AHEAD,
            steps = inout(reg) k / DEPTH_STEP => _,
            c = in(reg) sums.0.as_mut_ptr(),
            ldc = in(reg) NR * 4,
            options(nostack),
        );
    }
}

/// A block's sums plus the bias, rounded to bf16 once, into its `height`
/// rows × `columns` columns of `c` (rows `ldc` apart).
///
/// # Safety
/// The CPU must have AVX-512BW/VL; `c` must hold `height` rows of
/// `columns` outputs, `ldc` apart, written by no other task; `bias`, when
/// given, `columns` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn store_block(
    sums: &Sums,
    height: usize,
    columns: usize,
    bias: Option<&[f32]>,
    c: *mut bf16,
    ldc: usize,
) {
    // SAFETY: the caller upholds this function's contract (see # Safety).
    unsafe {
        use std::arch::x86_64::*;
        let mask_low = lane_mask(columns);
        let mask_high = lane_mask(columns.saturating_sub(16));
        let (bias_low, bias_high) = match bias {
            Some(bias) => (
                _mm512_maskz_loadu_ps(mask_low, bias.as_ptr()),
                _mm512_maskz_loadu_ps(mask_high, bias.as_ptr().add(16)),
            ),
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        for r in 0..height {
            let row = sums.0.as_ptr().add(r * NR);
            let low = _mm512_add_ps(_mm512_load_ps(row), bias_low);
            let high = _mm512_add_ps(_mm512_load_ps(row.add(16)), bias_high);
            let out = c.add(r * ldc) as *mut i16;
            let low = round_to_bf16(low);
            let high = round_to_bf16(high);
            _mm256_mask_storeu_epi16(out, mask_low, low);
            _mm256_mask_storeu_epi16(out.add(16), mask_high, high);
        }
    }
}

/// Off x86 this is never called: the feature checks that guard it are
/// false there.
///
/// # Safety
/// None: it only panics (or does nothing).
#[cfg(not(target_arch = "x86_64"))]
unsafe fn configure_tiles(_config: &TileConfig) {
    unreachable!("AMX on a non-x86 CPU")
}

/// Off x86 this is never called: the feature checks that guard it are
/// false there.
///
/// # Safety
/// None: it only panics (or does nothing).
#[cfg(not(target_arch = "x86_64"))]
unsafe fn saved_tiles() -> TileConfig {
    unreachable!("AMX on a non-x86 CPU")
}

/// Off x86 this is never called: the feature checks that guard it are
/// false there.
///
/// # Safety
/// None: it only panics (or does nothing).
#[cfg(not(target_arch = "x86_64"))]
unsafe fn restore_tiles(_saved: &TileConfig) {}

/// Off x86 this is never called: the feature checks that guard it are
/// false there.
///
/// # Safety
/// None: it only panics (or does nothing).
#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_sums(_a: *const bf16, _lda: usize, _k: usize, _panel: *const u8, _sums: &mut Sums) {
    unreachable!("AMX on a non-x86 CPU")
}

/// [`short_block_sums`] off x86: never called, as [`available`] is false.
///
/// # Safety
/// None needed: it only panics.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn short_block_sums(
    _a: *const bf16,
    _lda: usize,
    _k: usize,
    _panel: *const u8,
    _sums: &mut Sums,
) {
    unreachable!("AMX on a non-x86 CPU")
}

/// Off x86 this is never called: the feature checks that guard it are
/// false there.
///
/// # Safety
/// None: it only panics (or does nothing).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn store_block(
    _sums: &Sums,
    _height: usize,
    _columns: usize,
    _bias: Option<&[f32]>,
    _c: *mut bf16,
    _ldc: usize,
) {
    unreachable!("AMX on a non-x86 CPU")
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// One zero product of a row by a panel, on this thread.
    fn one_product() {
        let k = DEPTH_STEP;
        let a = vec![bf16::ZERO; k];
        let panel = vec![0u8; (k / 2) * PAIR_ROW_BYTES];
        let left = LeftRows { a: &a, lda: k, k };
        let right = RightPanels {
            bytes: &panel,
            k,
            n: NR,
        };
        // SAFETY: AMX is granted (checked by the caller), k is one tile deep,
        // `a` holds the one row and `panel` the one panel.
        unsafe { product_block(left, 0..1, right, 0..1, |_, _, _, _, _| {}) };
    }

    /// Another AMX user's configuration (candle's q4k kernels: 16-row sum
    /// tiles, 16 x 32-byte and 8 x 64-byte operands) is there again after our
    /// product, and a thread with none is left with none, so code that
    /// configured a thread once and relies on it (candle's) never finds it
    /// changed or released (a SIGILL before).
    #[test]
    fn a_product_leaves_the_threads_tile_configuration_as_it_found_it() {
        if !available() {
            return;
        }
        let mut theirs = TileConfig([0; 64]);
        theirs.0[0] = 1;
        for (tile, (bytes, rows)) in [(64u16, 16u8); 4]
            .into_iter()
            .chain([(32, 16); 2])
            .chain([(64, 8); 2])
            .enumerate()
        {
            theirs.0[16 + 2 * tile..][..2].copy_from_slice(&bytes.to_le_bytes());
            theirs.0[48 + tile] = rows;
        }
        // SAFETY: AMX is granted (available() above); the configuration is valid.
        unsafe { configure_tiles(&theirs) };
        one_product();
        // SAFETY: as above.
        assert_eq!(unsafe { saved_tiles() }.0, theirs.0);
        // SAFETY: as above.
        unsafe { restore_tiles(&TileConfig([0; 64])) };
        one_product();
        // SAFETY: as above.
        assert_eq!(unsafe { saved_tiles() }.0, [0; 64]);
    }
}
