//! A matrix packed into a kernel's panels: one shape for every kernel.
//!
//! Each product kernel streams the right-hand side `[k, n]` of `x · b` in
//! its own layout: columns in panels of 32, each panel a run of rows whose
//! type the kernel defines (32 f32s for [`crate::gemm_f32`], pairs of bf16
//! depths for [`crate::gemm_bf16`], q8_0 blocks for [`crate::gemm_q8`]).
//! [`Packed`] holds any of them with its shape; the layout says how many
//! rows a `[k, n]` matrix takes, so the weight cache can save the rows'
//! bytes and map them back in place ([`Packed::from_cache`]).

use std::sync::Arc;

use crate::panels::{PanelFile, PanelRowType, Panels};

/// A kernel's panel layout.
pub trait PanelLayout: 'static {
    /// One row of a panel, as the kernel loads it.
    type Row: PanelRowType;
    /// The layout's name in `Debug` output.
    const NAME: &'static str;
    /// Rows a `[k, n]` matrix takes, every panel included.
    fn rows(k: usize, n: usize) -> usize;
    /// Whether a `[k, n]` matrix can be held in this layout at all.
    fn fits(_k: usize, _n: usize) -> bool {
        true
    }
}

/// A layout whose kernel multiplies by it: `c [rows, n] = x [rows, k] · b
/// (+ bias)`, `x` and `c` contiguous, over the thread pool. The one shape of
/// product every packed kernel offers.
pub trait PackedProduct: PanelLayout + Sized {
    /// What `x` and `c` hold.
    type Value: Copy + Send + Sync + 'static;
    /// Whether this kernel runs on this CPU.
    fn available() -> bool;
    /// The product.
    ///
    /// # Panics
    /// If the kernel does not run here ([`Self::available`]) or the slices
    /// are shorter than the shapes say.
    fn product(
        b: &Packed<Self>,
        x: &[Self::Value],
        rows: usize,
        bias: Option<&[f32]>,
        c: &mut [Self::Value],
    );
}

/// The right-hand side `[k, n]` of a product, in `L`'s panels.
pub struct Packed<L: PanelLayout> {
    pub(crate) k: usize,
    pub(crate) n: usize,
    pub(crate) rows: Panels<L::Row>,
}

impl<L: PanelLayout> Packed<L> {
    /// Depth: the input width of the linear layer it came from.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns: the output width.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `len` zeroed rows of a `[k, n]` matrix, in `file` where it has room.
    pub(crate) fn zeroed_in(k: usize, n: usize, file: Option<&Arc<PanelFile>>) -> Self {
        Self {
            k,
            n,
            rows: Panels::zeroed_in(L::rows(k, n), file),
        }
    }

    /// Where the panels lie in `file`, when they were packed into it.
    pub fn range_in(&self, file: &Arc<PanelFile>) -> Option<[u64; 2]> {
        self.rows.range_in(file)
    }

    /// The packed rows' bytes, as the weight cache saves them.
    pub fn panel_bytes(&self) -> &[u8] {
        self.rows.as_bytes()
    }

    /// A `[k, n]` matrix packed earlier, read in place from the weight
    /// cache's mapping: `bytes` at `offset` (`None` unless they are exactly
    /// the layout's rows for that shape, lying whole and aligned in `file`).
    pub fn from_cache(
        file: Arc<memmap2::Mmap>,
        offset: usize,
        bytes: usize,
        k: usize,
        n: usize,
    ) -> Option<Self> {
        if !L::fits(k, n) {
            return None;
        }
        let rows = Panels::cached(file, offset, bytes, L::rows(k, n))?;
        Some(Self { k, n, rows })
    }
}

impl<L: PanelLayout> Clone for Packed<L> {
    fn clone(&self) -> Self {
        Self {
            k: self.k,
            n: self.n,
            rows: self.rows.clone(),
        }
    }
}

impl<L: PanelLayout> std::fmt::Debug for Packed<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}(k={}, n={})", L::NAME, self.k, self.n)
    }
}

/// A packed matrix and the bias its products add (in f32, before the
/// output is rounded to its type): an `nn.Linear` as the kernels run it.
pub struct PackedLinear<L: PanelLayout> {
    pub weight: Packed<L>,
    pub bias: Option<Vec<f32>>,
}

impl<L: PanelLayout> std::fmt::Debug for PackedLinear<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedLinear({:?}, bias {})",
            self.weight,
            self.bias.is_some()
        )
    }
}
