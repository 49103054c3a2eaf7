//! Pack-cache files mapped into memory, watched for what someone else can
//! do to them while a run uses them.
//!
//! A mapping reads the file itself: if another program truncates the file,
//! touching a page past its new end raises SIGBUS, which kills the process
//! (2 of 8 captions written, exit 135, before this); if it rewrites the
//! file in place, the weights change under the running model. We never do
//! either (packs are replaced by rename), but users and their tools can.
//!
//! So every mapping is registered here. A SIGBUS inside a registered
//! mapping is answered by mapping a page of zeros over the faulting page
//! (the instruction then goes on, reading zeros) and marking the mapping
//! faulted; any other SIGBUS gets the previous action (death, as before).
//! [`check`], called after each batch, turns a faulted mapping, or a file
//! whose size or modification time changed, into an error naming the file:
//! the batch in hand, computed from damaged weights, is thrown away and the
//! run ends with that error, its earlier output whole. Copying each pack
//! into memory instead would cost the load time the cache exists to save
//! (0.1 s mapped vs 0.5-0.7 s copied, BLIP-base); this costs one `fstat`
//! per pack per batch.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use anyhow::Result;

/// How many mappings the signal handler can know at once; a run maps one
/// pack per model, so more than enough. A mapping beyond it is still
/// checked for changes, just not rescued from SIGBUS.
const SLOTS: usize = 16;

/// One mapping's address range, as the signal handler reads it: plain
/// atomics (no lock may be taken in a signal handler). `end == 0`: free.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

static SLOTS_IN_USE: [Slot; SLOTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
        faulted: AtomicBool::new(false),
    }
}; SLOTS];

/// A registered mapping: what it was mapped from, and its slot.
struct Watch {
    map: Weak<memmap2::Mmap>,
    path: PathBuf,
    file: File,
    len: u64,
    modified: Option<SystemTime>,
    slot: Option<usize>,
}

static WATCHED: Mutex<Vec<Watch>> = Mutex::new(Vec::new());

fn watched() -> std::sync::MutexGuard<'static, Vec<Watch>> {
    WATCHED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Maps `file` (read-only) and watches the mapping until it is dropped.
pub fn map(file: File, path: &Path) -> std::io::Result<Arc<memmap2::Mmap>> {
    let meta = file.metadata()?;
    // SAFETY: the file is mapped read-only; a change to it under the
    // mapping (by another program: we never write a pack in place) is
    // what this module watches for, turning it into an error after the
    // batch rather than a crash or a silent change of answers.
    let map = Arc::new(unsafe { memmap2::MmapOptions::new().map(&file) }?);
    install_handler();
    let mut watched = watched();
    release_dropped(&mut watched);
    let slot = (!map.is_empty()).then(|| claim_slot(&map)).flatten();
    watched.push(Watch {
        map: Arc::downgrade(&map),
        path: path.to_path_buf(),
        file,
        len: meta.len(),
        modified: meta.modified().ok(),
        slot,
    });
    Ok(map)
}

/// Fails, naming the file, if a mapped pack still in use was cut short or
/// changed since it was mapped: whatever was computed from it since the
/// last check may be wrong.
pub fn check() -> Result<()> {
    let mut watched = watched();
    release_dropped(&mut watched);
    for watch in watched.iter() {
        let faulted = watch
            .slot
            .is_some_and(|slot| SLOTS_IN_USE[slot].faulted.load(Ordering::SeqCst));
        let meta = watch.file.metadata();
        let changed = match &meta {
            Ok(meta) => meta.len() != watch.len || meta.modified().ok() != watch.modified,
            Err(_) => true,
        };
        if faulted || changed {
            return Err(WeightsChanged {
                path: watch.path.clone(),
                how: if faulted { "cut short" } else { "changed" },
            }
            .into());
        }
    }
    Ok(())
}

/// What [`check`] fails with: the run's results since the last check may
/// be wrong, and its later ones would be (the CLI exits 1, not 2: the run
/// had started, and what it wrote before is whole).
#[derive(Debug, thiserror::Error)]
#[error(
    "the weight cache file {} was {how} by another program while this run used it; \
     the results of the batch in hand are not given, and a new run will rebuild the file",
    path.display()
)]
pub struct WeightsChanged {
    pub path: PathBuf,
    pub how: &'static str,
}

/// Forgets mappings that have been unmapped, freeing their slots.
fn release_dropped(watched: &mut Vec<Watch>) {
    watched.retain(|watch| {
        let alive = watch.map.strong_count() > 0;
        if !alive {
            if let Some(slot) = watch.slot {
                SLOTS_IN_USE[slot].end.store(0, Ordering::SeqCst);
                SLOTS_IN_USE[slot].start.store(0, Ordering::SeqCst);
            }
        }
        alive
    });
}

/// A free slot, filled with `map`'s range (called with [`WATCHED`] held,
/// so no two callers claim one slot).
fn claim_slot(map: &memmap2::Mmap) -> Option<usize> {
    let slot = SLOTS_IN_USE
        .iter()
        .position(|slot| slot.end.load(Ordering::SeqCst) == 0)?;
    let start = map.as_ptr() as usize;
    SLOTS_IN_USE[slot].faulted.store(false, Ordering::SeqCst);
    SLOTS_IN_USE[slot].start.store(start, Ordering::SeqCst);
    SLOTS_IN_USE[slot]
        .end
        .store(start + map.len(), Ordering::SeqCst);
    Some(slot)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod handler {
    use super::{Ordering, SLOTS_IN_USE};
    use std::sync::Once;

    /// The SIGBUS action before ours, restored for a fault that is not ours.
    static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::uninit();
    static PAGE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(4096);

    pub fn install() {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            if page > 0 {
                PAGE.store(page as usize, Ordering::SeqCst);
            }
            // SAFETY: a zeroed sigaction is a valid value to fill in; PREVIOUS
            // is written once, here, before the handler that reads it exists.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigbus as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut action.sa_mask);
                let previous = &raw mut PREVIOUS;
                libc::sigaction(libc::SIGBUS, &action, (*previous).as_mut_ptr());
            }
        });
    }

    /// Only async-signal-safe work: atomics, `mmap`, `sigaction`.
    extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo_t with SA_SIGINFO.
        let address = unsafe { (*info).si_addr() } as usize;
        let page = PAGE.load(Ordering::Relaxed);
        for slot in &SLOTS_IN_USE {
            let (start, end) = (
                slot.start.load(Ordering::SeqCst),
                slot.end.load(Ordering::SeqCst),
            );
            if start <= address && address < end {
                let at = address & !(page - 1);
                // SAFETY: `at` is a page inside a read-only mapping of ours
                // whose file no longer backs it; replacing that page with
                // zeros changes no memory Rust owns, only what the weights
                // read (and `check` then refuses the results).
                let zeros = unsafe {
                    libc::mmap(
                        at as *mut libc::c_void,
                        page,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if zeros != libc::MAP_FAILED {
                    slot.faulted.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
        // Not ours: put the previous action back; returning re-runs the
        // faulting instruction, which then meets it.
        // SAFETY: PREVIOUS was filled by `install` before this handler was set.
        unsafe {
            let previous = &raw const PREVIOUS;
            libc::sigaction(libc::SIGBUS, (*previous).as_ptr(), std::ptr::null_mut());
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn install_handler() {
    handler::install();
}

/// Elsewhere a truncated pack still ends the process with SIGBUS; changes
/// in place are still caught by [`check`].
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn install_handler() {}
