//! Where packed weight panels live.
//!
//! A model's packed weights are written once, at load, and only read after.
//! They live in memory mapped for them alone, not taken from the heap: there,
//! each packed copy and the loaded tensor it replaces interleave, and the
//! freed tensors left holes the allocator kept (measured, BLIP-base: 46 MB
//! more peak memory at load than the weights themselves). When the pack
//! cache ([`super::pack_cache`]) holds them, they are the cache file's own
//! read-only mapping: the page cache's pages, used in place, with nothing
//! zeroed, copied or packed. Small per-head packs use the heap. On the run
//! that writes the cache, layers are packed straight into the file being
//! written ([`PanelFile`]): its page-cache pages are the panels' memory, so
//! the cache costs no copy and no second gigabyte-scale allocation.

use std::sync::{Arc, Mutex};

/// Row types a panel store can hold.
///
/// # Safety
/// Implementors are plain numbers: no padding, every bit pattern (all
/// zeros included) a valid value, and an alignment that divides a page.
pub unsafe trait PanelRowType: Copy + Send + Sync + 'static {}

pub enum Panels<R> {
    Heap(Vec<R>),
    Mapped {
        map: memmap2::MmapMut,
        len: usize,
    },
    /// `len` rows packed into a [`PanelFile`] at byte `offset`, through a
    /// writable shared mapping of that range.
    InFile {
        map: memmap2::MmapMut,
        len: usize,
        file: Arc<PanelFile>,
        offset: u64,
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
    pub(crate) fn zeroed(len: usize) -> Self {
        Self::zeroed_in(len, None)
    }

    /// [`Self::zeroed`], in `file` where it has room for them.
    pub(crate) fn zeroed_in(len: usize, file: Option<&Arc<PanelFile>>) -> Self {
        let bytes = len * std::mem::size_of::<R>();
        if let Some((map, offset)) = file.and_then(|file| file.allocate(bytes)) {
            return Self::InFile {
                map,
                len,
                file: file.expect("allocated in it").clone(),
                offset,
            };
        }
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
    pub(crate) fn cached(
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

    pub(crate) fn as_slice(&self) -> &[R] {
        match self {
            Self::Heap(rows) => rows,
            // SAFETY: the map is page-aligned, holds `len` rows' bytes, and
            // any bit pattern is a valid R.
            Self::Mapped { map, len } | Self::InFile { map, len, .. } => unsafe {
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
    pub(crate) fn as_mut_slice(&mut self) -> &mut [R] {
        match self {
            Self::Heap(rows) => rows,
            // SAFETY: as in `as_slice`, and `&mut self` makes it unique.
            Self::Mapped { map, len } | Self::InFile { map, len, .. } => unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr() as *mut R, *len)
            },
            Self::Cached { .. } => unreachable!("panels mapped from the pack cache are read-only"),
        }
    }

    /// Where the rows lie in `file`, when they were packed into it.
    pub(crate) fn range_in(&self, file: &Arc<PanelFile>) -> Option<[u64; 2]> {
        match self {
            Self::InFile {
                file: home,
                offset,
                map,
                ..
            } if Arc::ptr_eq(home, file) => Some([*offset, offset + map.len() as u64]),
            _ => None,
        }
    }

    /// The rows' bytes, as the pack cache writes them.
    pub(crate) fn as_bytes(&self) -> &[u8] {
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

/// A file that packed panels are written into as they are made: the pack
/// cache's file in the making. Ranges are reserved on disk before they are
/// mapped (a write fault on a full disk would kill the process), at 2 MiB
/// offsets when they are that large, so the file comes back as huge pages.
pub struct PanelFile {
    file: std::fs::File,
    /// The end of the last range handed out or appended.
    end: Mutex<u64>,
    /// May `bytes` more be reserved? (The pack cache keeps the disk's last
    /// few percent free.)
    room: Box<dyn Fn(u64) -> bool + Send + Sync>,
}

const PAGE: u64 = 4096;
const HUGE_PAGE: u64 = 2 << 20;

impl PanelFile {
    pub fn new(file: std::fs::File, room: Box<dyn Fn(u64) -> bool + Send + Sync>) -> Self {
        Self {
            file,
            end: Mutex::new(0),
            room,
        }
    }

    /// The next offset for `bytes` that is a multiple of `align`; the end
    /// moves past them.
    fn claim(&self, bytes: u64, align: u64) -> u64 {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        let offset = end.next_multiple_of(align);
        *end = offset + bytes;
        offset
    }

    /// A zeroed, writable mapping of `bytes` new bytes of the file, and
    /// their offset; `None` when the disk cannot take them (the caller
    /// packs into memory instead and the cache copies them at the end).
    fn allocate(&self, bytes: usize) -> Option<(memmap2::MmapMut, u64)> {
        if bytes == 0 || !cfg!(all(target_os = "linux", target_env = "gnu")) {
            return None;
        }
        if !(self.room)(bytes as u64) {
            return None;
        }
        let offset = self.claim(bytes as u64, PAGE);
        // Reserved up to the next 2 MiB boundary: the page cache then fills
        // whole 2 MiB blocks as huge folios (it cannot reach past the end
        // of the file), which later runs map as huge pages. [`Self::trim`]
        // cuts the excess at the end.
        let end = (offset + bytes as u64).next_multiple_of(HUGE_PAGE);
        self.reserve(offset, end - offset).ok()?;
        // SAFETY: the range was just claimed by us alone and is never
        // written through any other path; the file is our temporary file,
        // which nothing else writes or truncates.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(bytes)
                .map_mut(&self.file)
        }
        .ok()?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Some((map, offset))
    }

    /// Disk blocks for `[offset, offset + bytes)`, allocated now.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn reserve(&self, offset: u64, bytes: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on a file descriptor we own.
        match unsafe { libc::posix_fallocate(self.file.as_raw_fd(), offset as i64, bytes as i64) } {
            0 => Ok(()),
            err => Err(std::io::Error::from_raw_os_error(err)),
        }
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    fn reserve(&self, _offset: u64, _bytes: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// Writes `bytes` after everything so far (page-aligned when `aligned`);
    /// their range.
    pub fn append(&self, bytes: &[u8], aligned: bool) -> std::io::Result<[u64; 2]> {
        use std::io::{Seek, SeekFrom, Write};
        let offset = self.claim(bytes.len() as u64, if aligned { PAGE } else { 1 });
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(bytes)?;
        Ok([offset, offset + bytes.len() as u64])
    }

    /// Cuts the file to what was handed out and appended: reserving rounds up.
    pub fn trim(&self) -> std::io::Result<()> {
        self.file.set_len(self.bytes_so_far())
    }

    /// Puts the file's bytes and size on disk. The panels packed through
    /// its mappings are included: on Linux those are the file's own
    /// page-cache pages, which a write through a shared mapping marks dirty.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }

    /// Bytes the file holds so far.
    pub fn bytes_so_far(&self) -> u64 {
        *self.end.lock().unwrap_or_else(|p| p.into_inner())
    }
}
