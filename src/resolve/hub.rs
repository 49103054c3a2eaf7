//! A model reference → the local files of that model.
//!
//! Three sources, tried in this order: a local folder in the Hugging Face
//! layout; the Hugging Face cache (the only source when `HF_HUB_OFFLINE` is set);
//! the Hub itself, through hf-hub, which downloads into that same cache.
//! hf-hub 0.5 ignores `HF_HUB_OFFLINE`, `HF_HUB_CACHE` and `HF_TOKEN`, and its
//! `Cache::get` only finds branch names, never a pinned commit, so the cache
//! lookup and the offline rule live here.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A model on the Hub at a revision (branch, tag or full commit hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    pub repo: String,
    pub revision: String,
}

impl HubModel {
    /// `owner/name` or `owner/name@revision`.
    pub fn parse(spec: &str) -> Option<Self> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, rev),
            Some(_) => return None,
            None => (spec, "main"),
        };
        let (owner, name) = repo.split_once('/')?;
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (valid(owner) && valid(name)).then(|| Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

impl fmt::Display for HubModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// Where a model's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Folder(PathBuf),
    Hub(HubModel),
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Folder(dir) => write!(f, "{}", dir.display()),
            Self::Hub(model) => write!(f, "{model}"),
        }
    }
}

/// How the weights are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// One or more safetensors files (shards listed by the index).
    Safetensors(Vec<PathBuf>),
    /// A PyTorch pickle, read without executing code.
    PytorchBin(PathBuf),
}

/// The files of one model, all on local disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub source: ModelSource,
    pub config: PathBuf,
    pub weights: WeightFiles,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    /// `preprocessor_config.json`, or transformers 5's `processor_config.json`.
    pub image_processor: PathBuf,
    pub generation_config: Option<PathBuf>,
    /// `chat_template.jinja`, else `chat_template.json` (LLaVA's prompts).
    pub chat_template: Option<PathBuf>,
    /// transformers 5's `processor_config.json`, which may hold the chat template.
    pub processor_config: Option<PathBuf>,
}

/// Something that can hand out a model's files by name.
trait FileSource {
    /// The local path of `name`, fetching it if this source can; `None` when the
    /// model has no such file.
    fn get(&self, name: &str) -> Result<Option<PathBuf>>;
}

struct Folder<'a>(&'a Path);

impl FileSource for Folder<'_> {
    fn get(&self, name: &str) -> Result<Option<PathBuf>> {
        let path = self.0.join(name);
        Ok(path.is_file().then_some(path))
    }
}

/// The hf-hub API, for a user who is online. Files already in the cache are
/// not fetched again.
struct Online {
    repo: hf_hub::api::sync::ApiRepo,
    listing: BTreeSet<String>,
    snapshot: Option<PathBuf>,
    model: HubModel,
}

impl FileSource for Online {
    fn get(&self, name: &str) -> Result<Option<PathBuf>> {
        if let Some(path) = self.snapshot.as_ref().map(|s| s.join(name)) {
            if path.is_file() {
                return Ok(Some(path));
            }
        }
        if !self.listing.contains(name) {
            return Ok(None);
        }
        let path = self
            .repo
            .get(name)
            .with_context(|| format!("downloading {name} of {}", self.model))?;
        Ok(Some(path))
    }
}

/// Resolves `source` to local files: fetched (online), found in the cache
/// (offline), or read from the folder.
pub fn fetch(source: &ModelSource) -> Result<ModelFiles> {
    match source {
        ModelSource::Folder(dir) => {
            anyhow::ensure!(
                dir.is_dir(),
                "model folder {} does not exist",
                dir.display()
            );
            collect(source, &Folder(dir))
        }
        ModelSource::Hub(model) => {
            let cache = hub_cache_dir()?;
            let snapshot = cached_snapshot(&cache, model);
            if is_offline() {
                let Some(snapshot) = snapshot else {
                    bail!(
                        "model {model} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set: \
                         run once online to download it, or pass --model PATH to a local model folder",
                        cache.display()
                    );
                };
                return collect(source, &Folder(&snapshot)).with_context(|| {
                    format!(
                        "the cached copy of {model} in {} is incomplete; run once online",
                        snapshot.display()
                    )
                });
            }
            let online = connect(model, cache, snapshot)?;
            collect(source, &online)
        }
    }
}

fn connect(model: &HubModel, cache: PathBuf, snapshot: Option<PathBuf>) -> Result<Online> {
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache))
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder
        .build()
        .context("setting up the Hugging Face Hub client")?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        model.repo.clone(),
        hf_hub::RepoType::Model,
        model.revision.clone(),
    ));
    let info = repo.info().with_context(|| {
        format!(
            "cannot reach the Hugging Face Hub for {model} (set HF_HUB_OFFLINE=1 to use the cache only, \
             or pass --model PATH to a local model folder)"
        )
    })?;
    Ok(Online {
        listing: info.siblings.into_iter().map(|s| s.rfilename).collect(),
        repo,
        snapshot,
        model: model.clone(),
    })
}

fn collect(source: &ModelSource, files: &dyn FileSource) -> Result<ModelFiles> {
    let required = |name: &str| -> Result<PathBuf> {
        files
            .get(name)?
            .with_context(|| format!("{source} has no {name}"))
    };
    let image_processor = match files.get("preprocessor_config.json")? {
        Some(path) => path,
        None => files.get("processor_config.json")?.with_context(|| {
            format!("{source} has no preprocessor_config.json (or processor_config.json)")
        })?,
    };
    Ok(ModelFiles {
        source: source.clone(),
        config: required("config.json")?,
        weights: weights(source, files)?,
        tokenizer: required("tokenizer.json")?,
        tokenizer_config: files.get("tokenizer_config.json")?,
        image_processor,
        generation_config: files.get("generation_config.json")?,
        chat_template: match files.get("chat_template.jinja")? {
            Some(path) => Some(path),
            None => files.get("chat_template.json")?,
        },
        processor_config: files.get("processor_config.json")?,
    })
}

/// `model.safetensors`, else the shards named by `model.safetensors.index.json`,
/// else `pytorch_model.bin`.
fn weights(source: &ModelSource, files: &dyn FileSource) -> Result<WeightFiles> {
    if let Some(path) = files.get("model.safetensors")? {
        return Ok(WeightFiles::Safetensors(vec![path]));
    }
    if let Some(index) = files.get("model.safetensors.index.json")? {
        let shards = shard_names(&index)?;
        let paths = shards
            .iter()
            .map(|name| {
                files.get(name)?.with_context(|| {
                    format!(
                        "{source}: shard {name} listed in {} is missing",
                        index.display()
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(WeightFiles::Safetensors(paths));
    }
    if let Some(path) = files.get("pytorch_model.bin")? {
        return Ok(WeightFiles::PytorchBin(path));
    }
    bail!("{source} has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")
}

/// The distinct shard files of a safetensors index, in a stable order.
fn shard_names(index: &Path) -> Result<BTreeSet<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::HashMap<String, String>,
    }
    let text =
        std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let index_json: Index =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    Ok(index_json.weight_map.into_values().collect())
}

/// `HF_HUB_OFFLINE` as huggingface_hub reads it.
pub fn is_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "on" | "yes" | "true"
            )
        })
        .unwrap_or(false)
}

/// The hub cache folder, as huggingface_hub finds it: `HF_HUB_CACHE`, else
/// `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Result<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Ok(dir);
    }
    if let Some(home) = var("HF_HOME") {
        return Ok(home.join("hub"));
    }
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        return Ok(xdg.join("huggingface").join("hub"));
    }
    match var("HOME") {
        Some(home) => Ok(home.join(".cache").join("huggingface").join("hub")),
        None => bail!("cannot locate the Hugging Face cache: set HF_HOME (or HOME)"),
    }
}

/// The snapshot folder of `model` in the cache, if its revision is there:
/// `models--owner--name/snapshots/<commit>`, where a branch or tag is first
/// looked up in `refs/`.
pub fn cached_snapshot(cache: &Path, model: &HubModel) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", model.repo.replace('/', "--")));
    let commit = if is_commit_hash(&model.revision) {
        model.revision.clone()
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(&model.revision))
            .ok()?
            .trim()
            .to_string()
    };
    let snapshot = repo_dir.join("snapshots").join(commit);
    snapshot.is_dir().then_some(snapshot)
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_ids_with_and_without_revision() {
        let m = HubModel::parse("Salesforce/blip-image-captioning-large").unwrap();
        assert_eq!(
            (m.repo.as_str(), m.revision.as_str()),
            ("Salesforce/blip-image-captioning-large", "main")
        );
        let m = HubModel::parse("a/b@v1.0").unwrap();
        assert_eq!((m.repo.as_str(), m.revision.as_str()), ("a/b", "v1.0"));
        assert!(HubModel::parse("blip-base").is_none());
        assert!(HubModel::parse("a/b@").is_none());
        assert!(HubModel::parse("a/b/c").is_none());
        assert!(HubModel::parse("/abs/path").is_none());
    }

    #[test]
    fn finds_snapshots_by_branch_and_by_commit() {
        let cache = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = cache.path().join("models--o--n");
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), format!("{commit}\n")).unwrap();
        let by_branch = HubModel::parse("o/n").unwrap();
        let by_commit = HubModel::parse(&format!("o/n@{commit}")).unwrap();
        let missing = HubModel::parse("o/n@dev").unwrap();
        assert!(cached_snapshot(cache.path(), &by_branch)
            .unwrap()
            .ends_with(commit));
        assert!(cached_snapshot(cache.path(), &by_commit)
            .unwrap()
            .ends_with(commit));
        assert!(cached_snapshot(cache.path(), &missing).is_none());
    }
}
