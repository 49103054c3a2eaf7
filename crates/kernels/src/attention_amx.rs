//! ViT self-attention in bf16 on AMX tiles ([`crate::gemm_amx`]'s
//! products), for `--dtype bf16` where the CPU has AMX.
//!
//! Before this, bf16 attention widened the fused projection to f32 for
//! [`crate::attention::fused_self_attention`] and rounded its output back: with the
//! linear layers on tiles, those f32 products, the widening and the
//! rounding were the vision encoder's largest remaining cost.

use half::bf16;

use crate::attention::{for_each_head, FusedQkv, QkvHead};
use crate::gemm_amx::{
    available, product_block, store_block, LeftRows, RightPanels, DEPTH_STEP, NR,
};

/// Values in a packed pair row: 32 columns × 2 depths.
const PAIR_ROW_ELEMENTS: usize = 2 * NR;

/// Whether heads of `head_dim` run on tiles here: bf16 products run on
/// tiles (AMX granted, and `CAPTION_BF16_KERNEL` names no vector kernel)
/// and the head is whole depth steps (BLIP's 64; BLIP-2's ViT-g, 88, is
/// not).
pub fn fits(head_dim: usize) -> bool {
    head_dim > 0
        && head_dim.is_multiple_of(DEPTH_STEP)
        && available()
        && crate::gemm_bf16::kernel() == crate::gemm_bf16::Bf16Kernel::Tiles
}

/// softmax(q kᵀ · scale) v for every head of a ViT's fused projection
/// `qkv [batch, tokens, 3 · d]` in bf16 (`BlipAttention`'s layout: q, k, v,
/// each `heads × head_dim` wide), both products on tiles, into `context
/// [batch, tokens, d]` in bf16. One task per (image, head), as
/// [`crate::attention::fused_self_attention`] does in f32. The scores are
/// f32 sums of exact products, softmaxed in f32; the probabilities are
/// rounded to bf16 for the second product, as torch's bf16 attention holds
/// them (it rounds the scores to bf16 too, which we don't); each output is
/// one f32 sum rounded once.
///
/// # Panics
/// If AMX does not run here or the heads are not whole depth steps (the
/// tiles themselves, whichever kernel the linear layers chose), or the
/// slices are shorter than `shape` says.
pub fn fused_self_attention(qkv: &[bf16], shape: FusedQkv, scale: f32, context: &mut [bf16]) {
    let head_dim = shape.head_dim;
    assert!(
        head_dim > 0 && head_dim.is_multiple_of(DEPTH_STEP) && available(),
        "AMX attention: heads of {head_dim} do not fit the tiles here"
    );
    let d = shape.d;
    for_each_head(qkv, shape, context, |head, out| {
        // SAFETY: AMX and the head's depth were checked above;
        // `for_each_head` hands each task its own head's columns of its
        // own image's rows of `context`.
        unsafe { attend_head(head, scale, out, d) }
    });
}

/// One head's attention into `out` (rows `ldo` apart).
///
/// # Safety
/// AMX must be granted and `head_dim` whole depth steps; `out` must hold
/// `tokens` rows of `head_dim`, `ldo` apart.
unsafe fn attend_head(head: &QkvHead<bf16>, scale: f32, out: *mut bf16, ldo: usize) {
    // SAFETY: the caller upholds this function's contract (see # Safety): the
    // products below read this head's rows and write its columns of `out`.
    unsafe {
        let (tokens, head_dim) = (head.tokens, head.head_dim);
        // The second product's depth is the keys, padded to whole steps with
        // zero probabilities against zero values.
        let keys_padded = tokens.next_multiple_of(DEPTH_STEP);
        let keys = pack_panels(head_dim, tokens, |key, depth| {
            head.rows[key * head.width + head.k + depth]
        });
        let mut scores = vec![0.0f32; tokens * keys_padded];
        let queries = LeftRows {
            a: &head.rows[head.q..],
            lda: head.width,
            k: head_dim,
        };
        let keys = RightPanels {
            bytes: as_bytes(&keys),
            k: head_dim,
            n: tokens,
        };
        product_block(
            queries,
            0..tokens,
            keys,
            0..tokens.div_ceil(NR),
            |sums, row, height, panel, columns| {
                for r in 0..height {
                    scores[(row + r) * keys_padded + panel * NR..][..columns]
                        .copy_from_slice(&sums.0[r * NR..][..columns]);
                }
            },
        );
        let mut probs = vec![bf16::ZERO; tokens * keys_padded];
        for (row, probs) in scores
            .chunks_exact_mut(keys_padded)
            .zip(probs.chunks_exact_mut(keys_padded))
        {
            crate::elementwise::scaled_softmax_in_place(&mut row[..tokens], scale);
            round_row(&row[..tokens], &mut probs[..tokens]);
        }
        let values = pack_panels_by_depth(keys_padded, head_dim, tokens, |key, column| {
            head.rows[key * head.width + head.v + column]
        });
        let probs = LeftRows {
            a: &probs,
            lda: keys_padded,
            k: keys_padded,
        };
        let values = RightPanels {
            bytes: as_bytes(&values),
            k: keys_padded,
            n: head_dim,
        };
        product_block(
            probs,
            0..tokens,
            values,
            0..head_dim.div_ceil(NR),
            |sums, row, height, panel, columns| {
                store_block(
                    sums,
                    height,
                    columns,
                    None,
                    out.add(row * ldo + panel * NR),
                    ldo,
                )
            },
        );
    }
}

/// `src` rounded to bf16 into `dst`, 16 lanes at a time as
/// `VCVTNEPS2BF16` rounds (to nearest, ties to even; a probability under
/// 2^-126 becomes 0). One at a time through `half`, this was a third of a
/// head's time.
fn round_row(src: &[f32], dst: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F/BW/VL come with every AMX CPU, and [`available`]
    // (which checks them) was true before any head ran.
    unsafe {
        round_row_avx512(src, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(*s);
    }
}

/// # Safety
/// The CPU must have AVX-512F/BW/VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn round_row_avx512(src: &[f32], dst: &mut [bf16]) {
    // SAFETY: the caller checked the CPU features; every load and store is masked
    // to `src`'s length, which `dst` was asserted to hold.
    unsafe {
        use std::arch::x86_64::*;
        assert!(dst.len() >= src.len());
        for (start, chunk) in (0..src.len()).step_by(16).zip(src.chunks(16)) {
            let mask = crate::blocks::lane_mask(chunk.len());
            let values = _mm512_maskz_loadu_ps(mask, chunk.as_ptr());
            let rounded = crate::bf16_panels::round_to_bf16(values);
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(start).cast(), mask, rounded);
        }
    }
}

/// A right operand `[k, n]` (`k` whole depth steps) in panels of pair
/// rows, from `value(column, depth)`, read column by column (keys, whose
/// values lie along a row of `qkv`).
fn pack_panels(k: usize, n: usize, value: impl Fn(usize, usize) -> bf16) -> Vec<bf16> {
    let pair_rows = k / 2;
    let mut packed = vec![bf16::ZERO; n.div_ceil(NR) * pair_rows * PAIR_ROW_ELEMENTS];
    for column in 0..n {
        let panel = &mut packed[(column / NR) * pair_rows * PAIR_ROW_ELEMENTS..]
            [..pair_rows * PAIR_ROW_ELEMENTS];
        for depth in 0..k {
            panel[(depth / 2) * PAIR_ROW_ELEMENTS + 2 * (column % NR) + depth % 2] =
                value(column, depth);
        }
    }
    packed
}

/// As [`pack_panels`], read depth by depth (values, one key's along a row
/// of `qkv`); depths from `filled` on are zero.
fn pack_panels_by_depth(
    k: usize,
    n: usize,
    filled: usize,
    value: impl Fn(usize, usize) -> bf16,
) -> Vec<bf16> {
    let pair_rows = k / 2;
    let mut packed = vec![bf16::ZERO; n.div_ceil(NR) * pair_rows * PAIR_ROW_ELEMENTS];
    for depth in 0..filled.min(k) {
        for column in 0..n {
            let panel = (column / NR) * pair_rows * PAIR_ROW_ELEMENTS;
            packed[panel + (depth / 2) * PAIR_ROW_ELEMENTS + 2 * (column % NR) + depth % 2] =
                value(depth, column);
        }
    }
    packed
}

fn as_bytes(values: &[bf16]) -> &[u8] {
    // SAFETY: bf16 is two plain bytes (`repr(transparent)` over u16), any
    // alignment suffices for u8, and the length is the same memory's.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::reference_self_attention;
    use crate::test_data::{random, relative_difference};

    /// Against the f32 reference on the same (bf16) values: the
    /// probabilities rounded to bf16 (2^-9 relative) and the output rounded
    /// once more bound the difference, well under 1% of the output's
    /// largest magnitude; a wrong key, head or padding is far over it.
    #[test]
    fn attention_matches_float32_on_the_same_values() {
        if !available() {
            eprintln!("skipped: no AMX tiles here");
            return;
        }
        for &(batch, tokens, heads, head_dim) in &[(1, 5, 2, 32), (2, 40, 3, 64), (1, 577, 2, 64)] {
            let shape = FusedQkv::new(batch, tokens, 3 * heads * head_dim, heads).unwrap();
            let qkv: Vec<bf16> = random(shape.input_len(), tokens as u64)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let scale = (head_dim as f32).powf(-0.5);
            let mut ours = vec![bf16::ZERO; shape.output_len()];
            fused_self_attention(&qkv, shape, scale, &mut ours);
            let ours: Vec<f32> = ours.iter().map(|x| x.to_f32()).collect();
            let widened: Vec<f32> = qkv.iter().map(|x| x.to_f32()).collect();
            let expected = reference_self_attention(&widened, shape, scale);
            let difference = relative_difference(&ours, &expected);
            assert!(
                difference < 1e-2,
                "{batch}x{tokens}, {heads} heads of {head_dim}: relative difference {difference}"
            );
        }
    }
}
