//! Models from the command line's point of view: opening one with its
//! load notes shown, and `caption models`.

use std::io::Write;

use anyhow::Result;

use super::outcome::RunStatus;
use caption::resolve::hub;
use caption::resolve::registry::{Entry, Registry};
use caption::{Captioner, RuntimeOptions};

/// Fetches and loads a model, applies its alias's settings, and shows the
/// notes about how it was loaded (unless `quiet`).
pub fn open_model(
    source: &hub::ModelSource,
    entry: Option<&Entry>,
    runtime: &RuntimeOptions,
    quiet: bool,
) -> Result<Captioner> {
    let captioner = Captioner::open_source(source, entry, runtime)?;
    if !quiet {
        for note in captioner.notes() {
            eprintln!("caption: note: {source}: {note}");
        }
    }
    Ok(captioner)
}

/// The CLIP model `model` names, fetched and loaded, its notes on stderr;
/// refused by its alias when that is for another job.
pub fn open_embedder(
    model: &str,
    registry: &Registry,
    runtime: &RuntimeOptions,
    quiet: bool,
) -> Result<caption::Embedder> {
    let (source, entry) = caption::resolve_model(model, registry)?;
    if let Some(entry) = entry.filter(|e| e.task != caption::resolve::registry::Task::Embed) {
        anyhow::bail!(
            "{model} is a {} model, not a CLIP model: labels, embeddings, search and --rerank \
             need one, e.g. clip-vit-base-patch32 (see `caption models`)",
            entry.family
        );
    }
    let embedder = caption::Embedder::open_source(&source, runtime)?;
    if !quiet {
        for note in embedder.notes() {
            eprintln!("caption: note: {source}: {note}");
        }
    }
    Ok(embedder)
}

/// `caption models`: the aliases, and which are in the local cache.
pub fn list_models(registry: &Registry) -> Result<RunStatus> {
    let cache = hub::hub_cache_dir().ok();
    let mut out = std::io::stdout().lock();
    writeln!(out, "alias\tfamily\ttask\trepo\trevision\tcached")?;
    for (name, entry) in &registry.entries {
        let (repo, revision, cached) = match &entry.bundled {
            Some(bundle) => ("(bundled)", bundle.as_str(), "built in"),
            None => {
                let cached = cache
                    .as_deref()
                    .and_then(|dir| hub::cached_snapshot(dir, &entry.hub_model()))
                    .is_some_and(|snapshot| snapshot.join("config.json").is_file());
                let cached = if cached { "yes" } else { "no" };
                (entry.repo.as_str(), entry.revision.as_str(), cached)
            }
        };
        writeln!(
            out,
            "{name}\t{}\t{}\t{repo}\t{revision}\t{cached}",
            entry.family, entry.task,
        )?;
    }
    Ok(RunStatus::AllGood)
}
