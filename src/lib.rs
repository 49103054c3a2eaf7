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
