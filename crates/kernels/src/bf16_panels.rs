//! What the bf16 kernels ([`crate::gemm_bf16`]'s vector kernels and
//! [`crate::gemm_amx`]'s tiles) share: the packed layout of pairs of
//! depths, which is AMX's B-tile layout too, so one packed matrix (and one
//! weight-cache file) serves them all; and rounding sums to bf16.

use std::sync::Arc;

use half::bf16;
use rayon::prelude::*;

use crate::packed::{Packed, PanelLayout};
use crate::panels::{PanelFile, PanelRowType};

/// Output columns per panel: two 16-lane registers of f32 sums.
pub(crate) const NR: usize = 32;

/// Depths `2p` and `2p + 1` of a panel's 32 columns, interleaved
/// (`[column][parity]`), aligned for whole-register loads.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct PairRow(pub(crate) [bf16; 2 * NR]);

// SAFETY: sixty-four bf16s, 128 bytes: no padding, any bits a valid value.
unsafe impl PanelRowType for PairRow {}

/// The bf16 kernels' layout ([`crate::gemm_bf16`], [`crate::gemm_amx`]): panels of [`NR`] columns, each
/// `k.div_ceil(2)` pair rows deep (an odd depth padded with zeros).
pub struct Bf16Panels;

impl PanelLayout for Bf16Panels {
    type Row = PairRow;
    const NAME: &'static str = "PackedMatrixBf16";
    fn rows(k: usize, n: usize) -> usize {
        n.div_ceil(NR) * k.div_ceil(2)
    }
}

/// The right-hand side `[k, n]` of a bf16 product, in [`Bf16Panels`].
pub type PackedMatrixBf16 = Packed<Bf16Panels>;

impl PackedMatrixBf16 {
    /// From `bᵀ`, `n` rows of `k` values (an `nn.Linear` weight `[out, in]`).
    pub fn from_transposed(bt: &[bf16], n: usize, k: usize) -> Self {
        Self::from_transposed_in(bt, n, k, None)
    }

    /// [`Self::from_transposed`], packed into `file` where it has room.
    pub fn from_transposed_in(
        bt: &[bf16],
        n: usize,
        k: usize,
        file: Option<&Arc<PanelFile>>,
    ) -> Self {
        assert!(bt.len() >= n * k, "pack: `bᵀ` too short");
        let pairs = k.div_ceil(2);
        let mut packed = Self::zeroed_in(k, n, file);
        packed
            .rows
            .as_mut_slice()
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
        packed
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

/// f32 → bf16 as Intel defines `VCVTNEPS2BF16`, without the instruction:
/// to nearest, ties to even; NaNs made quiet; zeros and denormals to a zero
/// of their sign. Bit for bit the instruction on Intel's CPUs (tested).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn round_to_bf16(sums: std::arch::x86_64::__m512) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let bits = _mm512_castps_si512(sums);
    let magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
    // Adding 0x7fff plus the kept part's lowest bit carries into the kept
    // half exactly when the dropped half is over one half, or one half with
    // the kept part odd; a carry out of the largest finite value gives
    // infinity, as rounding should.
    let lowest_kept = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(lowest_kept, _mm512_set1_epi32(0x7fff));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
    let nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7f80_0000));
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40));
    let tiny = _mm512_cmplt_epi32_mask(magnitude, _mm512_set1_epi32(0x0080_0000));
    let signed_zero = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x8000));
    let result = _mm512_mask_blend_epi32(nan, rounded, quiet);
    let result = _mm512_mask_blend_epi32(tiny, result, signed_zero);
    _mm512_cvtepi32_epi16(result)
}
