//! The one decoding engine every model family uses.
//!
//! A model plugs in through [`Decoder`]: a forward step over a batch of
//! sequences with a cache it keeps itself, and a way to keep, repeat or reorder
//! the batch rows of that cache. Greedy decoding, sampling and beam search run
//! over it with transformers 5's semantics (generation/utils.py `_sample` and
//! `_beam_search`, generation/logits_process.py); where a choice matters for
//! parity, the comment says which part of transformers it mirrors.

mod beam;
pub mod defaults;
pub mod processors;
mod sampling;

use anyhow::Result;
use candle_core::{Device, Tensor};

pub use defaults::GenerationDefaults;
pub use processors::LogitsSettings;

/// A decoder that generation can drive.
pub trait Decoder {
    /// Feeds `input_ids [batch, seq]` (the whole prompt on the first call, one
    /// token per row after that) and returns the logits for the next token,
    /// `[batch, vocab]` in f32.
    fn step(&mut self, input_ids: &Tensor) -> Result<Tensor>;

    /// Makes batch row i a copy of the current row `rows[i]`: drops finished
    /// sequences, repeats an image for its beams, reorders surviving beams.
    fn select_rows(&mut self, rows: &[u32]) -> Result<()>;

    fn device(&self) -> &Device;
}

/// transformers' `early_stopping` for beam search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EarlyStopping {
    /// Stop when it is unlikely that better candidates will be found (transformers' heuristic).
    #[default]
    False,
    /// Stop as soon as `beams` finished candidates exist.
    True,
    /// Stop only when no better candidate can exist (the canonical beam search).
    Never,
}

/// How to pick tokens, resolved for one `generate` call.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// New tokens at most; `None` is transformers' default (see [`max_length`]).
    pub max_new_tokens: Option<usize>,
    /// 1: greedy or sampling; more: beam search.
    pub num_beams: usize,
    /// Sample from the distribution instead of taking the most likely token.
    pub do_sample: bool,
    /// Beam search: a finished score is its summed log-prob / (new tokens ** length_penalty).
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// Beam search: how many of the best finished sequences to return.
    pub num_return_sequences: usize,
    /// Sampling: the seed of every sequence's random stream.
    pub seed: u64,
    pub logits: LogitsSettings,
}

impl Default for GenerationConfig {
    /// transformers' `GenerationConfig` defaults.
    fn default() -> Self {
        Self {
            max_new_tokens: None,
            num_beams: 1,
            do_sample: false,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            num_return_sequences: 1,
            seed: 0,
            logits: LogitsSettings::default(),
        }
    }
}

impl GenerationConfig {
    /// Refuses settings transformers refuses, and those that would give
    /// empty or cut captions instead of an error.
    pub fn validate(&self) -> Result<()> {
        self.validate_search()?;
        self.validate_scores()
    }

    /// Beams, returned sequences and lengths.
    fn validate_search(&self) -> Result<()> {
        anyhow::ensure!(self.num_beams >= 1, "beams must be at least 1");
        anyhow::ensure!(
            self.num_beams <= MAX_BEAMS,
            "--beams {} is more than {MAX_BEAMS}: every beam holds its own copy of the \
             decoder's caches, and captions stop improving long before that",
            self.num_beams
        );
        anyhow::ensure!(
            self.num_return_sequences >= 1,
            "the number of returned sequences must be at least 1"
        );
        anyhow::ensure!(
            self.num_return_sequences <= MAX_BEAMS,
            "--num-return {} is more than {MAX_BEAMS}, the most beams a search may use",
            self.num_return_sequences
        );
        anyhow::ensure!(
            self.num_return_sequences <= self.num_beams,
            "cannot return {} sequences from {} beams: use --beams {} or more",
            self.num_return_sequences,
            self.num_beams,
            self.num_return_sequences
        );
        anyhow::ensure!(
            !(self.do_sample && self.num_beams > 1),
            "sampling with beam search is not supported: use --sample or --beams, not both"
        );
        // GenerationConfig.validate: "`max_new_tokens` must be greater than 0".
        anyhow::ensure!(
            self.max_new_tokens != Some(0),
            "--max-tokens must be at least 1 (transformers refuses max_new_tokens=0)"
        );
        anyhow::ensure!(
            LENGTH_PENALTY_RANGE.contains(&self.length_penalty),
            "--length-penalty must be between {} and {}, got {}: beyond them beam scores \
             overflow and captions come out empty or cut",
            LENGTH_PENALTY_RANGE.start(),
            LENGTH_PENALTY_RANGE.end(),
            self.length_penalty
        );
        Ok(())
    }

    /// The settings that transform next-token scores.
    fn validate_scores(&self) -> Result<()> {
        if let Some(t) = self.logits.temperature {
            anyhow::ensure!(
                t > 0.0 && t.is_finite(),
                "temperature must be a positive number, got {t}"
            );
            anyhow::ensure!(
                t >= MIN_SCORE_DIVISOR,
                "--temperature {t:e} is too small: scores divided by it overflow to infinity; \
                 use at least {MIN_SCORE_DIVISOR:e} (or leave out --sample for greedy decoding)"
            );
        }
        if let Some(p) = self.logits.top_p {
            anyhow::ensure!(p > 0.0 && p <= 1.0, "top-p must be in (0, 1], got {p}");
        }
        if let Some(p) = self.logits.repetition_penalty {
            anyhow::ensure!(
                p > 0.0 && p.is_finite(),
                "repetition penalty must be positive, got {p}"
            );
            anyhow::ensure!(
                p >= MIN_SCORE_DIVISOR,
                "--repetition-penalty {p:e} is too small: scores divided by it overflow to \
                 infinity; use at least {MIN_SCORE_DIVISOR:e}"
            );
        }
        Ok(())
    }
}

/// transformers' length rule (`_prepare_generated_length`): an explicit
/// `max_new_tokens` counts from the end of the prompt; the default is 20 new
/// tokens. Both are capped at the model's position limit: transformers caps
/// only the default, and an explicit length past the positions fails there
/// with an index error, so capping it changes no output transformers gives.
/// Saturating, so `--max-tokens 18446744073709551615` means "as many as fit".
pub fn max_length(prompt_len: usize, max_new_tokens: Option<usize>, max_positions: usize) -> usize {
    let new_tokens = max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS);
    prompt_len.saturating_add(new_tokens).min(max_positions)
}

/// The most beams a search may use. Each beam is a row of the decoder's
/// batch with its own copy of the caches (BLIP-base: about 40 MB of image
/// cross-attention keys and values per row), so 64 beams already take a few
/// GB per image; captions of twenty-odd tokens stop gaining from more beams
/// long before that, and transformers' own examples use 3 to 10.
pub const MAX_BEAMS: usize = 64;

/// The length penalties beam search accepts (NaN is outside). A finished
/// score is its summed log-prob divided by `new_tokens ^ P` in f32, and
/// transformers' arithmetic keeps unfinished beams out of the results by
/// adding -1e9 to their scores. Up to 10, `2048 ^ P` (OPT's positions) stays
/// below f32's 3.4e38; at 40 it overflowed to infinity and every score to
/// -0. Below -2 the divided scores outgrow -1e9 (the log-prob sum times
/// `length ^ 2` stays under 1e9 for any caption within 512 positions), and
/// the demo model's captions came out empty from -10 on. transformers' own
/// examples use -1 to 2.
pub const LENGTH_PENALTY_RANGE: std::ops::RangeInclusive<f32> = -2.0..=10.0;

/// The smallest temperature and repetition penalty accepted: both divide the
/// scores, and an f32 score `x` divided by `d` overflows to infinity once
/// `|x| / d` passes `f32::MAX` (3.4e38), which turns the softmax into NaN and
/// the caption into garbage (1e-45, a denormal, did). At 1e-30 only a logit
/// beyond 3.4e8 overflows, while real models' logits are a few tens; and
/// nothing is lost: at that bound the scaled scores already differ by so much
/// that sampling always takes the most likely token, as greedy search does.
pub const MIN_SCORE_DIVISOR: f32 = 1e-30;

/// transformers' `GenerationConfig.max_length` default (20) read as new tokens,
/// which is how `generate()` applies it when nobody sets a length.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 20;

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// The full sequence, prompt included, ending with EOS if one was produced.
    pub ids: Vec<u32>,
    /// Beam search: the length-penalised score it was ranked by.
    pub score: Option<f32>,
}

/// What the model contributes to a `generate` call besides its decoder.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The decoder's position limit (prompt and new tokens together).
    pub max_positions: usize,
    /// Tokens that end a sequence.
    pub eos_token_ids: Vec<u32>,
}

/// Generates for a batch of prompts of equal length, one row of the decoder's
/// batch per prompt. `streams[i]` names prompt i's random stream (its position
/// in the whole run), so sampled text does not depend on how inputs are batched.
/// Returns, per prompt, `num_return_sequences` hypotheses, best first.
pub fn generate(
    decoder: &mut impl Decoder,
    prompts: &[Vec<u32>],
    streams: &[u64],
    limits: &Limits,
    config: &GenerationConfig,
) -> Result<Vec<Vec<Hypothesis>>> {
    config.validate()?;
    let Some(prompt_len) = prompts.first().map(Vec::len) else {
        return Ok(vec![]);
    };
    anyhow::ensure!(
        prompt_len > 0 && prompts.iter().all(|p| p.len() == prompt_len),
        "generation needs non-empty prompts of equal length"
    );
    anyhow::ensure!(
        streams.len() == prompts.len(),
        "one random stream per prompt"
    );
    let max_length = max_length(prompt_len, config.max_new_tokens, limits.max_positions);
    // transformers raises when the prompt leaves no room to generate
    // (`_validate_generated_length`); going on would print the prompt alone.
    anyhow::ensure!(
        prompt_len < max_length,
        "the prompt is {prompt_len} tokens, which leaves no room for a new token in the \
         model's {} positions",
        limits.max_positions
    );
    let search = Search {
        prompt_len,
        max_length,
        eos: &limits.eos_token_ids,
        config,
    };
    if config.num_beams > 1 {
        beam::beam_search(decoder, prompts, &search)
    } else {
        let sequences = sampling::sample_or_greedy(decoder, prompts, streams, &search)?;
        Ok(sequences
            .into_iter()
            .map(|ids| vec![Hypothesis { ids, score: None }])
            .collect())
    }
}

/// The fixed facts of one search.
struct Search<'a> {
    prompt_len: usize,
    max_length: usize,
    eos: &'a [u32],
    config: &'a GenerationConfig,
}

/// Log-softmax of each row of `logits` ([rows, vocab], row-major), in place,
/// in f32 like torch's `log_softmax` on f32 logits.
fn log_softmax_rows(logits: &mut [f32], vocab: usize) {
    for row in logits.chunks_mut(vocab) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
        let log_sum = sum.ln();
        for x in row.iter_mut() {
            *x = *x - max - log_sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_length_is_twenty_new_tokens_capped_by_positions() {
        assert_eq!(max_length(4, None, 512), 24);
        assert_eq!(max_length(4, None, 10), 10);
        assert_eq!(max_length(4, Some(3), 10), 7);
    }

    #[test]
    fn an_explicit_length_is_capped_by_positions_and_never_overflows() {
        assert_eq!(max_length(4, Some(100), 40), 40);
        assert_eq!(max_length(4, Some(usize::MAX), 40), 40);
        assert_eq!(max_length(usize::MAX, Some(usize::MAX), 40), 40);
    }

    #[test]
    fn settings_that_would_print_empty_or_cut_captions_are_rejected() {
        let refused = [
            GenerationConfig {
                max_new_tokens: Some(0),
                ..GenerationConfig::default()
            },
            GenerationConfig {
                num_beams: MAX_BEAMS + 1,
                ..GenerationConfig::default()
            },
            GenerationConfig {
                length_penalty: f32::NAN,
                ..GenerationConfig::default()
            },
            GenerationConfig {
                length_penalty: f32::NEG_INFINITY,
                ..GenerationConfig::default()
            },
            GenerationConfig {
                length_penalty: -1e30,
                ..GenerationConfig::default()
            },
            GenerationConfig {
                length_penalty: 40.0,
                ..GenerationConfig::default()
            },
            GenerationConfig {
                do_sample: true,
                logits: LogitsSettings {
                    temperature: Some(1e-45),
                    ..LogitsSettings::default()
                },
                ..GenerationConfig::default()
            },
            GenerationConfig {
                logits: LogitsSettings {
                    repetition_penalty: Some(1e-45),
                    ..LogitsSettings::default()
                },
                ..GenerationConfig::default()
            },
        ];
        for config in refused {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.starts_with("--"), "names the flag: {err}");
        }
        let edges = GenerationConfig {
            max_new_tokens: Some(usize::MAX),
            num_beams: MAX_BEAMS,
            length_penalty: -2.0,
            logits: LogitsSettings {
                temperature: Some(MIN_SCORE_DIVISOR),
                repetition_penalty: Some(MIN_SCORE_DIVISOR),
                ..LogitsSettings::default()
            },
            ..GenerationConfig::default()
        };
        assert!(edges.validate().is_ok());
    }

    /// The smallest temperature accepted still leaves a realistic logit
    /// finite, which is what the bound is for.
    #[test]
    fn the_smallest_divisor_keeps_large_logits_finite() {
        let mut row = vec![1e8f32, -1e8, 30.0];
        processors::temperature(&mut row, MIN_SCORE_DIVISOR);
        assert!(row.iter().all(|x| x.is_finite()), "{row:?}");
    }

    #[test]
    fn a_prompt_that_fills_the_positions_is_an_error_not_an_empty_caption() {
        let mut decoder = table::TableDecoder {
            table: vec![vec![0.0, 1.0]; 2],
            batch_sizes: vec![],
        };
        let limits = Limits {
            max_positions: 3,
            eos_token_ids: vec![0],
        };
        let config = GenerationConfig::default();
        let full = generate(&mut decoder, &[vec![1, 1, 1]], &[0], &limits, &config);
        assert!(full.is_err());
        let room = generate(&mut decoder, &[vec![1, 1]], &[0], &limits, &config).unwrap();
        assert_eq!(room[0][0].ids, vec![1, 1, 1]);
    }

    #[test]
    fn log_softmax_rows_normalise_each_row() {
        let mut rows = vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0];
        log_softmax_rows(&mut rows, 3);
        for row in rows.chunks(3) {
            let total: f32 = row.iter().map(|x| x.exp()).sum();
            assert!((total - 1.0).abs() < 1e-6);
        }
        assert!((rows[3] - (1.0f32 / 3.0).ln()).abs() < 1e-6);
    }

    #[test]
    fn invalid_combinations_are_rejected() {
        let mut config = GenerationConfig {
            num_beams: 2,
            num_return_sequences: 3,
            ..GenerationConfig::default()
        };
        assert!(config.validate().is_err());
        config.num_return_sequences = 2;
        assert!(config.validate().is_ok());
        config.do_sample = true;
        assert!(config.validate().is_err());
    }
}

/// A test decoder whose logits are a fixed function of each row's last token,
/// so the search bookkeeping can be checked by hand.
#[cfg(test)]
pub(crate) mod table {
    use super::*;

    pub struct TableDecoder {
        /// `table[t]` is the logit row that follows token `t`.
        pub table: Vec<Vec<f32>>,
        pub batch_sizes: Vec<usize>,
    }

    impl Decoder for TableDecoder {
        fn step(&mut self, input_ids: &Tensor) -> Result<Tensor> {
            let ids: Vec<Vec<u32>> = input_ids.to_vec2()?;
            self.batch_sizes.push(ids.len());
            let vocab = self.table[0].len();
            let rows: Vec<f32> = ids
                .iter()
                .flat_map(|r| self.table[*r.last().unwrap() as usize].clone())
                .collect();
            Ok(Tensor::from_vec(rows, (ids.len(), vocab), &Device::Cpu)?)
        }
        fn select_rows(&mut self, _rows: &[u32]) -> Result<()> {
            Ok(())
        }
        fn device(&self) -> &Device {
            &Device::Cpu
        }
    }
}
