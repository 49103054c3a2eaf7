//! Text in and out: tokenizer.json through the `tokenizers` crate, plus the
//! decode-time clean-up transformers applies on top of it.

use std::path::Path;

use anyhow::{Context, Result};

/// tokenizer.json through the `tokenizers` crate, once it is known to be
/// JSON: that crate panics on some syntax errors (inside a `decoder`, found
/// by fuzzing: fuzz/regressions/model_file) rather than returning them.
fn read_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = super::regular_file::read_text(path)?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text).context("not valid JSON")?;
    guarded(|| text.parse::<tokenizers::Tokenizer>())?.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs `f`, a call into the `tokenizers` crate, turning a panic inside it
/// into an error. That crate trusts tokenizer.json more than we may: the
/// fuzzer found it panicking on a JSON syntax error inside a `decoder` and,
/// at encode time, on a template post-processor naming a special token it
/// does not define (fuzz/regressions/model_file). A tokenizer.json comes
/// from whichever Hub repository the user names; no such file may end a
/// run with a panic. The panic's own report is kept off stderr (the error
/// says what it said, on one line); panics elsewhere are reported as ever.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T> {
    quiet_panics_in_guard();
    let previous = IN_GUARD.replace(true);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_GUARD.set(previous);
    outcome.map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        anyhow::anyhow!("the tokenizers library failed on this tokenizer: {message}")
    })
}

thread_local! {
    /// Whether this thread is inside [`guarded`].
    static IN_GUARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs, once, a panic hook that stays silent for panics inside
/// [`guarded`] on the panicking thread and hands every other panic to the
/// hook that was there before.
fn quiet_panics_in_guard() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_GUARD.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
}

/// A model's tokenizer, decoding as transformers' `batch_decode(ids,
/// skip_special_tokens=True)` does.
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    clean_up_spaces: bool,
}

impl TextCodec {
    pub fn load(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let tokenizer = read_tokenizer(tokenizer_json)
            .with_context(|| format!("reading {}", tokenizer_json.display()))?;
        let clean_up_requested = match tokenizer_config {
            Some(path) => {
                let text = super::regular_file::read_text(path)
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

    /// This codec, cutting every encoding with special tokens to `max_len`
    /// ids, special tokens included, as transformers' `tokenizer(text,
    /// truncation=True, max_length=max_len)` does (the text's end is
    /// dropped; the start and end tokens stay).
    pub fn truncating_at(mut self, max_len: usize) -> Result<Self> {
        let params = tokenizers::TruncationParams {
            max_length: max_len,
            ..Default::default()
        };
        guarded(|| {
            self.tokenizer
                .with_truncation(Some(params))
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("{e}"))
        })??;
        Ok(self)
    }

    /// Token ids of `text` with the tokenizer's special tokens (e.g. `[CLS] … [SEP]`).
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = guarded(|| self.tokenizer.encode(text, true))
            .and_then(|encoded| encoded.map_err(|e| anyhow::anyhow!("{e}")))
            .with_context(|| format!("tokenizing {text:?}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` alone, without special tokens.
    pub fn encode_without_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = guarded(|| self.tokenizer.encode(text, false))
            .and_then(|encoded| encoded.map_err(|e| anyhow::anyhow!("{e}")))
            .with_context(|| format!("tokenizing {text:?}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids` without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = guarded(|| self.tokenizer.decode(ids, true))
            .and_then(|decoded| decoded.map_err(|e| anyhow::anyhow!("{e}")))
            .context("decoding tokens")?;
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
