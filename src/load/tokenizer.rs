//! Text in and out: tokenizer.json through the `tokenizers` crate, plus the
//! decode-time clean-up transformers applies on top of it.

use std::path::Path;

use anyhow::{Context, Result};

/// A model's tokenizer, decoding as transformers' `batch_decode(ids,
/// skip_special_tokens=True)` does.
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    clean_up_spaces: bool,
}

impl TextCodec {
    pub fn load(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("reading {}", tokenizer_json.display()))?;
        let clean_up_requested = match tokenizer_config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let config: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?;
                // transformers 5 defaults this to false; older configs often say true.
                config
                    .get("clean_up_tokenization_spaces")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false)
            }
            None => false,
        };
        // transformers skips the clean-up for BPE models: it would delete real
        // spaces before punctuation (tokenization_utils_tokenizers.py `_decode`).
        let is_bpe = matches!(tokenizer.get_model(), tokenizers::ModelWrapper::BPE(_));
        Ok(Self {
            tokenizer,
            clean_up_spaces: clean_up_requested && !is_bpe,
        })
    }

    /// Token ids of `text` with the tokenizer's special tokens (e.g. `[CLS] … [SEP]`).
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` alone, without special tokens.
    pub fn encode_without_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids` without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding tokens: {e}"))?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }
}

/// transformers' `clean_up_tokenization`: glue punctuation and English
/// contractions back onto the preceding word.
pub fn clean_up_tokenization(text: &str) -> String {
    const REPLACEMENTS: [(&str, &str); 10] = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    REPLACEMENTS
        .iter()
        .fold(text.to_string(), |acc, (from, to)| acc.replace(from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_up_matches_transformers_replacement_order() {
        assert_eq!(
            clean_up_tokenization("a dog , a cat . is n't it ?"),
            "a dog, a cat. isn't it?"
        );
        // Replacements run in sequence, so " ' " is consumed before " 's".
        assert_eq!(clean_up_tokenization("it ' s"), "it's");
    }
}
