//! A model reference (`--model`) → the local files of that model: the
//! `models.toml` aliases ([`registry`]), the Hugging Face Hub and its cache
//! ([`hub`]), and the demo models built into the binary ([`bundled`]).

pub mod bundled;
pub mod hub;
pub mod registry;

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
