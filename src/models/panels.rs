//! Where packed weight panels live.
//!
//! A model's packed weights are written once, at load, and only read after.
//! They live in memory mapped for them alone, not taken from the heap: there,
//! each packed copy and the loaded tensor it replaces interleave, and the
//! freed tensors left holes the allocator kept (measured, BLIP-base: 46 MB
//! more peak memory at load than the weights themselves). When the pack
//! cache ([`super::pack_cache`]) holds them, they are the cache file's own
//! read-only mapping: the page cache's pages, used in place, with nothing
//! zeroed, copied or packed. Small per-head packs use the heap.

use std::sync::Arc;

/// Row types a panel store can hold.
///
/// # Safety
/// Implementors are plain numbers: no padding, every bit pattern (all
/// zeros included) a valid value, and an alignment that divides a page.
pub(super) unsafe trait PanelRowType: Copy + Send + Sync + 'static {}

pub(super) enum Panels<R> {
    Heap(Vec<R>),
    Mapped {
        map: memmap2::MmapMut,
        len: usize,
    },
    /// `len` rows at byte `offset` of a pack-cache file's mapping.
    Cached {
        file: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
}

impl<R: PanelRowType> Panels<R> {
    /// `len` zeroed rows in a mapping of their own (on the heap when there
    /// is nothing to map, or no mapping to be had).
    pub(super) fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<R>();
        match (bytes > 0).then(|| memmap2::MmapMut::map_anon(bytes)) {
            Some(Ok(map)) => {
                // Huge pages where the kernel offers them: a model's weights
                // are gigabytes, and faulting them in 4 KB at a time was most
                // of OPT-2.7b's load. A hint only; refusal changes nothing.
                #[cfg(target_os = "linux")]
                let _ = map.advise(memmap2::Advice::HugePage);
                Self::Mapped { map, len }
            }
            // SAFETY: all-zero bytes are a valid R (the trait's contract).
            _ => Self::Heap(vec![unsafe { std::mem::zeroed() }; len]),
        }
    }

    /// `len` rows at byte `offset` of `file`, recorded there as `bytes`
    /// long; `None` unless that is exactly `len` rows, lying whole and
    /// aligned inside the file.
    pub(super) fn cached(
        file: Arc<memmap2::Mmap>,
        offset: usize,
        bytes: usize,
        len: usize,
    ) -> Option<Self> {
        (len.checked_mul(std::mem::size_of::<R>())? == bytes).then_some(())?;
        let aligned = (file.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<R>());
        (aligned && offset.checked_add(bytes)? <= file.len()).then_some(Self::Cached {
            file,
            offset,
            len,
        })
    }

    pub(super) fn as_slice(&self) -> &[R] {
        match self {
            Self::Heap(rows) => rows,
            // SAFETY: the map is page-aligned, holds `len` rows' bytes, and
            // any bit pattern is a valid R.
            Self::Mapped { map, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr() as *const R, *len)
            },
            // SAFETY: `cached` checked the rows lie aligned inside the map;
            // the file is only ever replaced by rename, never written in place.
            Self::Cached { file, offset, len } => unsafe {
                std::slice::from_raw_parts(file.as_ptr().add(*offset) as *const R, *len)
            },
        }
    }

    /// The rows to pack into: only freshly made stores are written.
    pub(super) fn as_mut_slice(&mut self) -> &mut [R] {
        match self {
            Self::Heap(rows) => rows,
            // SAFETY: as in `as_slice`, and `&mut self` makes it unique.
            Self::Mapped { map, len } => unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr() as *mut R, *len)
            },
            Self::Cached { .. } => unreachable!("panels mapped from the pack cache are read-only"),
        }
    }

    /// The rows' bytes, as the pack cache writes them.
    pub(super) fn as_bytes(&self) -> &[u8] {
        let rows = self.as_slice();
        // SAFETY: R has no padding (the trait's contract): every byte is initialised.
        unsafe {
            std::slice::from_raw_parts(rows.as_ptr().cast::<u8>(), std::mem::size_of_val(rows))
        }
    }
}

impl<R: PanelRowType> Clone for Panels<R> {
    fn clone(&self) -> Self {
        let mut rows = Self::zeroed(self.as_slice().len());
        rows.as_mut_slice().copy_from_slice(self.as_slice());
        rows
    }
}
