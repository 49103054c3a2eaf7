//! `models.toml`: the aliases `--model` accepts, each pinned to a repository
//! and commit, with the family that runs it and the task it does.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::resolve::hub::HubModel;

/// The registry shipped inside the binary.
pub const BUILTIN: &str = include_str!("../../models.toml");

/// The model code that runs a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `BlipForConditionalGeneration`: captions.
    Blip,
    /// `BlipForQuestionAnswering`: answers questions about an image.
    #[serde(rename = "blip-vqa")]
    BlipVqa,
    /// `Blip2ForConditionalGeneration` with an OPT language model: captions,
    /// answers questions through a prompt template, converses.
    #[serde(rename = "blip2-opt")]
    Blip2Opt,
    /// `CLIPModel`: image and text embeddings in one space (labels, search,
    /// reranking); no text generation.
    Clip,
    /// `LlavaForConditionalGeneration`: a CLIP vision tower and a Llama
    /// language model; captions by instruction, answers, converses through
    /// its chat template.
    Llava,
}

impl Family {
    /// Whether transformers' `generate()` for this family applies the
    /// checkpoint's generation_config.json. BLIP's does not: its `generate`
    /// hands over to the text decoder, whose generation config is built from
    /// the text config, so the top-level file never reaches it (checked on
    /// transformers 5.23 with a max_length there: ignored).
    pub fn applies_generation_config(self) -> bool {
        match self {
            // Both hand over to their text decoder's own generation config.
            Self::Blip | Self::BlipVqa => false,
            // Also hands over, to the language model built from text_config.
            Self::Blip2Opt => false,
            // Generates nothing.
            Self::Clip => false,
            // A GenerationMixin itself: the top-level file is its config.
            Self::Llava => true,
        }
    }

    /// The family of a checkpoint from its config.json `architectures`.
    pub fn from_architectures(architectures: &[String]) -> Option<Self> {
        architectures.iter().find_map(|a| match a.as_str() {
            "BlipForConditionalGeneration" => Some(Self::Blip),
            "BlipForQuestionAnswering" => Some(Self::BlipVqa),
            "Blip2ForConditionalGeneration" => Some(Self::Blip2Opt),
            "CLIPModel" => Some(Self::Clip),
            "LlavaForConditionalGeneration" => Some(Self::Llava),
            _ => None,
        })
    }
}

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Caption,
    Vqa,
    /// Captions, answers `--ask` questions and holds a conversation (`caption chat`).
    Chat,
    /// Embeds images and texts: `--labels`, `caption embed`, `caption search`, `--rerank`.
    Embed,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Blip => "blip",
            Self::BlipVqa => "blip-vqa",
            Self::Blip2Opt => "blip2-opt",
            Self::Clip => "clip",
            Self::Llava => "llava",
        })
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Caption => "caption",
            Self::Vqa => "vqa",
            Self::Chat => "chat",
            Self::Embed => "embed",
        })
    }
}

/// One alias.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The Hub repository (`owner/name`); empty for a bundled model.
    #[serde(default)]
    pub repo: String,
    #[serde(default)]
    pub revision: String,
    /// A model built into the binary (the folder of this name under
    /// `models/`), instead of `repo` and `revision`.
    #[serde(default)]
    pub bundled: Option<String>,
    pub family: Family,
    pub task: Task,
    #[serde(default)]
    pub description: String,
    /// Why `revision` is a branch rather than a commit, for an alias whose
    /// commit could not be confirmed; absent for a pinned alias.
    #[serde(default)]
    pub unpinned: Option<String>,
    /// Decoding defaults for this alias (`[alias.generation]`, transformers'
    /// field names), below the flags and the checkpoint's generation_config.json.
    #[serde(default)]
    pub generation: crate::generate::GenerationDefaults,
    /// How `--ask` turns a question into a prompt for a model that continues
    /// text (BLIP-2): `{}` stands for the question.
    #[serde(default)]
    pub question_template: Option<String>,
    /// What a model that follows instructions (LLaVA) is asked when it
    /// captions without `--prompt`.
    #[serde(default)]
    pub instruction: Option<String>,
}

impl Entry {
    /// Where the model's files come from: the Hub, or the binary itself.
    pub fn source(&self) -> Result<crate::resolve::hub::ModelSource> {
        Ok(match &self.bundled {
            Some(bundle) => {
                crate::resolve::hub::ModelSource::Folder(crate::resolve::bundled::folder(bundle)?)
            }
            None => crate::resolve::hub::ModelSource::Hub(self.hub_model()),
        })
    }

    pub fn hub_model(&self) -> HubModel {
        HubModel {
            repo: self.repo.clone(),
            revision: self.revision.clone(),
        }
    }
}

/// All aliases, sorted by name.
#[derive(Debug, Clone)]
pub struct Registry {
    pub entries: BTreeMap<String, Entry>,
}

impl Registry {
    pub fn parse(toml_text: &str) -> Result<Self> {
        let entries: BTreeMap<String, Entry> =
            toml::from_str(toml_text).context("models.toml is not a valid model registry")?;
        for (name, entry) in &entries {
            if let Some(bundle) = &entry.bundled {
                anyhow::ensure!(
                    entry.repo.is_empty() && entry.revision.is_empty(),
                    "models.toml: `{name}` is bundled and cannot also name a repo or revision"
                );
                anyhow::ensure!(
                    crate::resolve::bundled::get(bundle).is_some(),
                    "models.toml: `{name}` names bundled model `{bundle}`, which this build lacks"
                );
            } else {
                anyhow::ensure!(
                    HubModel::parse(&entry.repo).is_some(),
                    "models.toml: `{name}` has repo `{}`, expected owner/name",
                    entry.repo
                );
                anyhow::ensure!(
                    !entry.revision.is_empty(),
                    "models.toml: `{name}` needs a revision"
                );
            }
            if let Some(template) = &entry.question_template {
                anyhow::ensure!(
                    template.contains("{}"),
                    "models.toml: `{name}` has question_template {template:?} with no {{}} for the question"
                );
            }
        }
        Ok(Self { entries })
    }

    pub fn builtin() -> Self {
        Self::parse(BUILTIN).expect("the built-in models.toml is checked by a unit test")
    }

    pub fn get(&self, alias: &str) -> Option<&Entry> {
        self.entries.get(alias)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_parses_and_pins_full_commits() {
        let registry = Registry::parse(BUILTIN).unwrap();
        assert!(registry.get("blip-base").is_some());
        assert_eq!(registry.get("blip-vqa-base").unwrap().task, Task::Vqa);
        assert_eq!(
            registry.get("blip-vqa-large").unwrap().family,
            Family::BlipVqa
        );
        for (name, entry) in &registry.entries {
            if entry.bundled.is_some() {
                continue;
            }
            if entry.unpinned.is_some() {
                // An honest branch name, never a made-up hash.
                assert_eq!(entry.revision, "main", "{name}");
                continue;
            }
            assert_eq!(
                entry.revision.len(),
                40,
                "{name} must pin a full commit hash"
            );
            assert!(
                entry.revision.chars().all(|c| c.is_ascii_hexdigit()),
                "{name}"
            );
        }
    }

    #[test]
    fn unknown_family_is_rejected_when_loading() {
        let err = Registry::parse(
            "[x]\nrepo = \"a/b\"\nrevision = \"main\"\nfamily = \"llama\"\ntask = \"caption\"\n",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("llama"), "{err:#}");
    }

    #[test]
    fn an_alias_may_carry_decoding_defaults() {
        let registry = Registry::parse(
            "[x]\nrepo = \"a/b\"\nrevision = \"main\"\nfamily = \"blip\"\ntask = \"caption\"\n\
             [x.generation]\nnum_beams = 3\nmax_new_tokens = 30\nearly_stopping = \"never\"\n",
        )
        .unwrap();
        let defaults = &registry.get("x").unwrap().generation;
        assert_eq!(defaults.num_beams, Some(3));
        assert_eq!(defaults.max_new_tokens, Some(30));
        let config = defaults.resolve(0);
        assert_eq!(config.early_stopping, crate::generate::EarlyStopping::Never);
    }

    #[test]
    fn blip2_aliases_converse_and_carry_their_question_template() {
        let registry = Registry::builtin();
        for name in ["blip2-opt-2.7b", "blip2-opt-6.7b"] {
            let entry = registry.get(name).unwrap();
            assert_eq!(entry.family, Family::Blip2Opt, "{name}");
            assert_eq!(entry.task, Task::Chat, "{name}");
            assert_eq!(
                entry.question_template.as_deref(),
                Some("Question: {} Answer:")
            );
        }
    }

    #[test]
    fn a_question_template_without_a_slot_is_rejected() {
        let err = Registry::parse(
            "[x]\nrepo = \"a/b\"\nrevision = \"main\"\nfamily = \"blip2-opt\"\ntask = \"chat\"\n\
             question_template = \"Question: Answer:\"\n",
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("no {} for the question"),
            "{err:#}"
        );
    }

    #[test]
    fn a_bundled_alias_must_name_a_bundle_of_this_build_and_nothing_else() {
        let missing = Registry::parse(
            "[x]\nbundled = \"no-such-bundle\"\nfamily = \"blip\"\ntask = \"caption\"\n",
        )
        .unwrap_err();
        assert!(
            format!("{missing:#}").contains("which this build lacks"),
            "{missing:#}"
        );
        let both = Registry::parse(
            "[x]\nbundled = \"demo\"\nrepo = \"a/b\"\nfamily = \"blip\"\ntask = \"caption\"\n",
        )
        .unwrap_err();
        assert!(
            format!("{both:#}").contains("cannot also name a repo"),
            "{both:#}"
        );
    }
}
