//! `caption`: caption images and answer questions about them with BLIP and
//! BLIP-2, run natively with candle.
//!
//! The pipeline, one module per stage: [`registry`] and [`hub`] turn a model
//! reference into local files, [`weights`] and [`models`] load them,
//! [`image`] decodes and preprocesses pictures exactly as transformers does,
//! [`generate`] runs the decoding loop, [`output`] writes the results.
//! [`Captioner`] ties them together; the `caption` binary is a thin CLI over it.

pub mod bundled;
pub mod captioner;
pub mod chat;
pub mod cli;
pub mod fetch;
pub mod generate;
pub mod hub;
pub mod image;
pub mod inputs;
pub mod models;
pub mod output;
pub mod registry;
pub mod sidecar;
pub mod tokenizer;
pub mod weights;

pub use captioner::blip2::{Conversation, Reply, Turn};
pub use captioner::{Answer, Caption, CaptionRequest, Captioner, RuntimeOptions};

use std::path::Path;

use anyhow::{bail, Result};

use hub::{HubModel, ModelSource};
use registry::{Entry, Registry};

/// Tells the allocator to keep freed memory for reuse. Every tensor op
/// allocates its output; glibc maps blocks past its mmap threshold (at most
/// 32 MB) fresh from the kernel and hands freed heap tops back, so the same
/// few hundred MB per encoder layer were page-faulted in again for every
/// image: 2.25 M page faults for 10 BLIP-base images, 0.27 M with this;
/// vision encoder at batch 8: 1.08 -> 0.92 s per image. The price: memory
/// freed during a run is not returned to the system until it ends (the
/// peak is unchanged). Call once, before the model loads.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other
    // threads allocate.
    unsafe {
        // The largest threshold glibc accepts (HEAP_MAX_SIZE / 2 = 32 MB on
        // 64-bit); blocks below it come from the heap and are reused.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Resolves `--model`: an existing local folder, else an alias from the
/// registry, else a Hub repository id (`owner/name[@revision]`).
pub fn resolve_model<'r>(
    spec: &str,
    registry: &'r Registry,
) -> Result<(ModelSource, Option<&'r Entry>)> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok((ModelSource::Folder(path.to_path_buf()), None));
    }
    if let Some(entry) = registry.get(spec) {
        return Ok((entry.source()?, Some(entry)));
    }
    if path.exists() {
        bail!("--model {spec} is a file; give the folder that holds config.json and the weights");
    }
    if spec.starts_with(['.', '/', '~']) {
        bail!("model folder {spec} does not exist");
    }
    if let Some(model) = HubModel::parse(spec) {
        return Ok((ModelSource::Hub(model), None));
    }
    bail!(
        "unknown model `{spec}`: not a folder, not an alias ({}), not a Hub id like owner/name",
        registry.names().collect::<Vec<_>>().join(", ")
    )
}
