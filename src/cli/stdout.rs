//! Whether stdout was closed when `caption` started (`caption … >&-`).
//!
//! Rust's runtime reopens a closed stdout on /dev/null before `main` runs (so
//! that a file opened later cannot become descriptor 1); from then on every
//! write succeeds and every result would vanish with exit code 0. A function
//! in the ELF `.init_array` runs before the runtime does, while descriptor 1
//! can still be seen to be closed.

use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED_AT_START: AtomicBool = AtomicBool::new(false);

/// True when descriptor 1 was closed as the process started. Only Linux with
/// glibc can tell; elsewhere this is always false.
pub fn closed_at_start() -> bool {
    CLOSED_AT_START.load(Ordering::Relaxed)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[used]
#[link_section = ".init_array"]
static NOTE_CLOSED_STDOUT: extern "C" fn() = note_closed_stdout;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" fn note_closed_stdout() {
    // SAFETY: F_GETFD only reads descriptor 1's flags; no memory is involved.
    let flags = unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_GETFD) };
    CLOSED_AT_START.store(flags == -1, Ordering::Relaxed);
}
