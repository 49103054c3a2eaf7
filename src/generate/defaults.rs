//! Where decoding settings come from when a flag does not say: the model's
//! `generation_config.json` (where transformers applies it), the alias's table
//! in models.toml, then transformers' own defaults.

use anyhow::{Context, Result};
use serde::Deserialize;

use super::{EarlyStopping, GenerationConfig};

/// Decoding settings that may each be unset, in transformers' vocabulary, so
/// one struct reads `generation_config.json`, a `[alias.generation]` table in
/// models.toml and the command line's flags alike.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationDefaults {
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub num_beams: Option<usize>,
    pub do_sample: Option<bool>,
    pub length_penalty: Option<f32>,
    pub early_stopping: Option<EarlyStoppingValue>,
    pub num_return_sequences: Option<usize>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub no_repeat_ngram_size: Option<usize>,
}

/// `early_stopping` as generation_config.json writes it: a bool or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum EarlyStoppingValue {
    Bool(bool),
    Word(NeverWord),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NeverWord {
    Never,
}

impl From<EarlyStoppingValue> for EarlyStopping {
    fn from(value: EarlyStoppingValue) -> Self {
        match value {
            EarlyStoppingValue::Bool(false) => EarlyStopping::False,
            EarlyStoppingValue::Bool(true) => EarlyStopping::True,
            EarlyStoppingValue::Word(NeverWord::Never) => EarlyStopping::Never,
        }
    }
}

impl From<EarlyStopping> for EarlyStoppingValue {
    fn from(value: EarlyStopping) -> Self {
        match value {
            EarlyStopping::False => EarlyStoppingValue::Bool(false),
            EarlyStopping::True => EarlyStoppingValue::Bool(true),
            EarlyStopping::Never => EarlyStoppingValue::Word(NeverWord::Never),
        }
    }
}

impl GenerationDefaults {
    /// The decoding settings of a `generation_config.json`; fields that are not
    /// about decoding (token ids, transformers' version) are not ours to read here.
    pub fn from_generation_config(json: &str) -> Result<Self> {
        serde_json::from_str(json).context("not a valid generation_config.json")
    }

    /// `self`, with every unset field taken from `lower`.
    pub fn or(self, lower: &Self) -> Self {
        Self {
            max_new_tokens: self.max_new_tokens.or(lower.max_new_tokens),
            min_new_tokens: self.min_new_tokens.or(lower.min_new_tokens),
            num_beams: self.num_beams.or(lower.num_beams),
            do_sample: self.do_sample.or(lower.do_sample),
            length_penalty: self.length_penalty.or(lower.length_penalty),
            early_stopping: self.early_stopping.or(lower.early_stopping),
            num_return_sequences: self.num_return_sequences.or(lower.num_return_sequences),
            temperature: self.temperature.or(lower.temperature),
            top_k: self.top_k.or(lower.top_k),
            top_p: self.top_p.or(lower.top_p),
            repetition_penalty: self.repetition_penalty.or(lower.repetition_penalty),
            no_repeat_ngram_size: self.no_repeat_ngram_size.or(lower.no_repeat_ngram_size),
        }
    }

    /// The settings to decode with: what is set here, transformers'
    /// `_get_default_generation_params` for the rest.
    pub fn resolve(&self, seed: u64) -> GenerationConfig {
        let base = GenerationConfig::default();
        let do_sample = self.do_sample.unwrap_or(base.do_sample);
        let mut config = GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            num_beams: self.num_beams.unwrap_or(base.num_beams),
            do_sample,
            length_penalty: self.length_penalty.unwrap_or(base.length_penalty),
            early_stopping: self.early_stopping.map_or(base.early_stopping, Into::into),
            num_return_sequences: self
                .num_return_sequences
                .unwrap_or(base.num_return_sequences),
            seed,
            logits: base.logits,
        };
        let logits = &mut config.logits;
        logits.repetition_penalty = self.repetition_penalty;
        logits.no_repeat_ngram_size = self.no_repeat_ngram_size;
        logits.min_new_tokens = self.min_new_tokens;
        logits.temperature = self.temperature;
        // transformers fills an unset top_k with 50; it only matters when sampling.
        logits.top_k = Some(self.top_k.unwrap_or(TRANSFORMERS_TOP_K));
        logits.top_p = self.top_p;
        config
    }
}

/// `_get_default_generation_params()["top_k"]`.
pub const TRANSFORMERS_TOP_K: usize = 50;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_json_reads_transformers_fields_and_ignores_the_rest() {
        let json = r#"{"_from_model_config": true, "bos_token_id": 30522, "num_beams": 3,
            "early_stopping": "never", "max_new_tokens": 30, "transformers_version": "5.23.0"}"#;
        let defaults: GenerationDefaults = serde_json::from_str(json).unwrap();
        assert_eq!(defaults.num_beams, Some(3));
        assert_eq!(defaults.max_new_tokens, Some(30));
        let config = defaults.resolve(0);
        assert_eq!(config.early_stopping, EarlyStopping::Never);
        assert_eq!(config.num_beams, 3);
        let flag: GenerationDefaults = serde_json::from_str(r#"{"early_stopping": true}"#).unwrap();
        assert_eq!(flag.resolve(0).early_stopping, EarlyStopping::True);
    }

    #[test]
    fn higher_layers_win_field_by_field() {
        let flags = GenerationDefaults {
            num_beams: Some(5),
            ..Default::default()
        };
        let model = GenerationDefaults {
            num_beams: Some(3),
            length_penalty: Some(0.6),
            ..Default::default()
        };
        let merged = flags.or(&model);
        assert_eq!(merged.num_beams, Some(5));
        assert_eq!(merged.length_penalty, Some(0.6));
    }

    #[test]
    fn nothing_set_is_transformers_defaults_with_top_k_fifty() {
        let config = GenerationDefaults::default().resolve(7);
        let expected = GenerationConfig {
            seed: 7,
            logits: crate::generate::LogitsSettings {
                top_k: Some(50),
                ..Default::default()
            },
            ..GenerationConfig::default()
        };
        assert_eq!(config, expected);
    }
}
