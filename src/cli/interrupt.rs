//! Ctrl-C, from the first moment of a run to its last.
//!
//! Until images are being captioned (resolving and loading the model,
//! reading the `-` list, a chat's questions) the first Ctrl-C ends the
//! process at once with exit code 130, first deleting the weight cache's
//! file in the making: loading cannot be stopped half way and resumed, and
//! nothing has been printed that could be left half written. Once images
//! are being captioned ([`stop_after_batch`]) the first Ctrl-C asks the run
//! to stop after the batch in hand (so every line and sidecar written is
//! whole), and a second one ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by [`stop_after_batch`]: Ctrl-C now asks, rather than ends.
static CAPTIONING: AtomicBool = AtomicBool::new(false);
/// Set by the first Ctrl-C while captioning.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Handles Ctrl-C from now on; called once, before anything else is done.
pub fn install() {
    if let Err(err) = ctrlc::set_handler(on_ctrl_c) {
        // Without the handler Ctrl-C still stops the run, only less gently.
        eprintln!("caption: warning: cannot handle Ctrl-C: {err}");
    }
}

/// From now on the first Ctrl-C only asks the run to stop after the batch
/// in hand, by setting the flag returned.
pub fn stop_after_batch() -> &'static AtomicBool {
    CAPTIONING.store(true, Ordering::SeqCst);
    &STOP_REQUESTED
}

fn on_ctrl_c() {
    let asks = CAPTIONING.load(Ordering::SeqCst) && !STOP_REQUESTED.swap(true, Ordering::SeqCst);
    if asks {
        eprintln!("caption: stopping after the current batch (Ctrl-C again to stop now)");
        return;
    }
    // A process that exits runs no destructors: the weight cache's
    // temporary file (as large as the model) would stay behind.
    caption::load::weight_cache::remove_temp_files();
    std::process::exit(130);
}
