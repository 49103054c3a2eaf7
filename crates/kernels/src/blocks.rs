//! How the products split their work over the thread pool, and the shared
//! output pointer their tasks write through.

use rayon::prelude::*;

/// Cuts an `m`-row × `panels`-panel product into (row block, panel range)
/// tasks and runs `run` on each, over the thread pool when `parallel`.
/// Row blocks of at most `max_rows` (a multiple of `row_step`, the rows
/// of the caller's tile) are evened out
/// (577 rows by 240: 204, 204, 169, not 240, 240, 97) so tasks are of a
/// size; panels are grouped so every thread has work twice over (for
/// balance), cutting first along rows (each task then streams its own
/// slice of `a`).
pub(crate) fn for_each_block(
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
pub(crate) struct OutputPtr<T>(pub(crate) *mut T);
// SAFETY: tasks write disjoint elements (see `matmul` and its callers),
// so sharing the pointer between threads races on nothing.
unsafe impl<T> Send for OutputPtr<T> {}
// SAFETY: as for `Send`: no two tasks touch the same element.
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
    pub(crate) fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// The first `lanes` (at most 16) lanes of a register.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn lane_mask(lanes: usize) -> u16 {
    if lanes >= 16 {
        u16::MAX
    } else {
        ((1u32 << lanes) - 1) as u16
    }
}
