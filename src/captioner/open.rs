//! Opening a model by name, with its own decoding defaults: the few lines a
//! program needs to caption pictures.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;

use super::{Caption, CaptionRequest, Captioner, RuntimeOptions};
use crate::generate::{GenerationConfig, GenerationDefaults};
use crate::image::LoadOptions;
use crate::resolve::hub;
use crate::resolve::registry::{Entry, Registry};

/// How [`Captioner::open`] loads a model.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Device, dtype, quantization and the weight cache.
    pub runtime: RuntimeOptions,
}

impl Captioner {
    /// Opens `model`: a local folder in the Hugging Face layout, an alias
    /// from models.toml (`blip-base`, or a bundled demo model such as
    /// `demo`), or a Hub repository id (`owner/name[@revision]`),
    /// downloading it into the Hugging Face cache if needed. The alias's
    /// question template and decoding defaults come with it.
    pub fn open(model: &str, options: &Options) -> Result<Self> {
        let registry = Registry::builtin();
        let (source, entry) = crate::resolve::resolve_model(model, &registry)?;
        Self::open_source(&source, entry, &options.runtime)
    }

    /// [`Self::open`] for a model already resolved (by
    /// [`crate::resolve::resolve_model`]).
    pub fn open_source(
        source: &hub::ModelSource,
        entry: Option<&Entry>,
        runtime: &RuntimeOptions,
    ) -> Result<Self> {
        let files = hub::fetch(source)?;
        let mut captioner = Captioner::load(&files, runtime)?;
        if let Some(entry) = entry {
            if let Some(template) = entry.question_template.as_deref() {
                captioner.set_question_template(template)?;
            }
            if let Some(instruction) = entry.instruction.as_deref() {
                captioner.set_instruction(instruction)?;
            }
            captioner.alias_generation = entry.generation.clone();
        }
        Ok(captioner)
    }

    /// The decoding settings for `overrides` (the CLI's flags; unset fields
    /// fall through) over the model's own defaults: the checkpoint's
    /// generation_config.json where the family's transformers code applies
    /// it, then the alias's models.toml entry, then transformers' defaults.
    pub fn generation(&self, overrides: &GenerationDefaults, seed: u64) -> GenerationConfig {
        overrides
            .clone()
            .or(&self.generation_defaults)
            .or(&self.alias_generation)
            .resolve(seed)
    }

    /// A request with the model's own decoding defaults and no prompt.
    pub fn default_request(&self) -> CaptionRequest {
        CaptionRequest {
            prompt: None,
            generation: self.generation(&GenerationDefaults::default(), DEFAULT_SEED),
        }
    }

    /// Captions image files with the model's own defaults: per image, in
    /// order, its captions, best first. Fails on the first file that cannot
    /// be read, naming it.
    pub fn caption_paths<P: AsRef<Path>>(
        &self,
        paths: impl IntoIterator<Item = P>,
    ) -> Result<Vec<Vec<Caption>>> {
        let images = paths
            .into_iter()
            .map(|path| {
                let path = path.as_ref();
                crate::image::load_rgb8(path, &LoadOptions::default())
                    .with_context(|| format!("{}", path.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        self.caption(&images, &self.default_request())
    }
}

/// The seed sampling uses unless told otherwise (the CLI's `--seed` default).
const DEFAULT_SEED: u64 = 0;

/// The device `--device` names: `cpu`, `cuda`, `cuda:N` or `auto` (CUDA
/// when this build has it and a GPU is there, else the CPU).
pub fn parse_device(spec: &str) -> Result<Device> {
    let cuda = |ordinal: usize| -> Result<Device> {
        if !cfg!(feature = "cuda") {
            bail!("this build has no CUDA support: rebuild with `--features cuda`, or use --device cpu");
        }
        Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if cfg!(feature = "cuda") {
            Device::cuda_if_available(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => bail!("unknown device `{other}`: expected cpu, cuda, cuda:N or auto"),
        },
    }
}
