//! The one decoding loop every model family uses.
//!
//! A model plugs in through [`Decoder`]: a forward step over a batch of
//! sequences with a cache it keeps itself, and a way to keep or reorder the
//! batch rows of that cache. Semantics follow transformers' `generate()`
//! (generation/utils.py); where a choice matters for parity, the comment says
//! which part of transformers it mirrors.

use anyhow::Result;
use candle_core::{Device, Tensor};

/// A decoder that generation can drive.
pub trait Decoder {
    /// Feeds `input_ids [batch, seq]` (the whole prompt on the first call, one
    /// token per row after that) and returns the logits for the next token,
    /// `[batch, vocab]` in f32.
    fn step(&mut self, input_ids: &Tensor) -> Result<Tensor>;

    /// Keeps only the batch rows named in `rows`, in that order (sequences that
    /// are still running; surviving beams).
    fn select_rows(&mut self, rows: &[u32]) -> Result<()>;

    fn device(&self) -> &Device;
}

/// When to stop, resolved for one `generate` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoppingConfig {
    /// Total sequence length (prompt included) at which generation stops.
    pub max_length: usize,
    /// Tokens that end a sequence (kept as its last token).
    pub eos_token_ids: Vec<u32>,
}

impl StoppingConfig {
    /// transformers' length rule (`_prepare_generated_length`): an explicit
    /// `max_new_tokens` counts from the end of the prompt; the default is 20 new
    /// tokens, capped at the model's position limit.
    pub fn new(
        prompt_len: usize,
        max_new_tokens: Option<usize>,
        max_positions: usize,
        eos_token_ids: Vec<u32>,
    ) -> Self {
        let max_length = match max_new_tokens {
            Some(n) => prompt_len + n,
            None => (prompt_len + DEFAULT_MAX_NEW_TOKENS).min(max_positions),
        };
        Self {
            max_length,
            eos_token_ids,
        }
    }
}

/// transformers' `GenerationConfig.max_length` default (20) read as new tokens,
/// which is how `generate()` applies it when nobody sets a length.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 20;

/// Greedy decoding of a batch of prompts of equal length (transformers'
/// `_sample` with `do_sample=False`). Returns each full sequence, prompt
/// included, ending with its EOS token when it produced one.
///
/// Rows that finish leave the batch (transformers keeps computing them and
/// pads): rows never interact, so the results are the same and the work shrinks.
pub fn greedy(
    decoder: &mut impl Decoder,
    prompts: &[Vec<u32>],
    stopping: &StoppingConfig,
) -> Result<Vec<Vec<u32>>> {
    let Some(prompt_len) = prompts.first().map(Vec::len) else {
        return Ok(vec![]);
    };
    anyhow::ensure!(
        prompts.iter().all(|p| p.len() == prompt_len) && prompt_len > 0,
        "greedy decoding needs non-empty prompts of equal length"
    );
    let mut sequences: Vec<Vec<u32>> = prompts.to_vec();
    // `running[i]` is the index in `sequences` of batch row i.
    let mut running: Vec<usize> = (0..prompts.len()).collect();
    let mut input = Tensor::new(prompts.to_vec(), decoder.device())?;
    let mut len = prompt_len;
    while len < stopping.max_length && !running.is_empty() {
        let logits = decoder.step(&input)?;
        let next: Vec<u32> = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
        let mut still_running = Vec::with_capacity(running.len());
        let mut kept_rows = Vec::with_capacity(running.len());
        for (row, (&seq, &token)) in running.iter().zip(&next).enumerate() {
            sequences[seq].push(token);
            if !stopping.eos_token_ids.contains(&token) {
                still_running.push(seq);
                kept_rows.push(row as u32);
            }
        }
        len += 1;
        if still_running.len() < running.len() && !still_running.is_empty() {
            decoder.select_rows(&kept_rows)?;
        }
        let last: Vec<u32> = still_running
            .iter()
            .map(|&s| *sequences[s].last().expect("sequences are never empty"))
            .collect();
        running = still_running;
        if !running.is_empty() {
            input = Tensor::new(last, decoder.device())?.unsqueeze(1)?;
        }
    }
    Ok(sequences)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoder whose next token is a fixed function of the row's last token,
    /// so the loop's bookkeeping can be checked by hand.
    struct TableDecoder {
        vocab: usize,
        /// `next[t]` is the token that follows `t`.
        next: Vec<u32>,
        rows: Vec<u32>,
        calls: Vec<usize>,
    }

    impl Decoder for TableDecoder {
        fn step(&mut self, input_ids: &Tensor) -> Result<Tensor> {
            let ids: Vec<Vec<u32>> = input_ids.to_vec2()?;
            self.calls.push(ids.len());
            self.rows = ids.iter().map(|r| *r.last().unwrap()).collect();
            let mut logits = vec![0f32; ids.len() * self.vocab];
            for (i, &last) in self.rows.iter().enumerate() {
                logits[i * self.vocab + self.next[last as usize] as usize] = 1.0;
            }
            Ok(Tensor::from_vec(
                logits,
                (ids.len(), self.vocab),
                &Device::Cpu,
            )?)
        }
        fn select_rows(&mut self, _rows: &[u32]) -> Result<()> {
            Ok(())
        }
        fn device(&self) -> &Device {
            &Device::Cpu
        }
    }

    fn decoder() -> TableDecoder {
        // 1 -> 2 -> 3 -> 0(eos); 4 -> 4 forever
        TableDecoder {
            vocab: 5,
            next: vec![0, 2, 3, 0, 4],
            rows: vec![],
            calls: vec![],
        }
    }

    #[test]
    fn stops_each_row_on_eos_and_drops_it_from_the_batch() {
        let mut dec = decoder();
        let stop = StoppingConfig::new(1, Some(6), 512, vec![0]);
        let out = greedy(&mut dec, &[vec![1], vec![4]], &stop).unwrap();
        assert_eq!(out[0], vec![1, 2, 3, 0]);
        assert_eq!(out[1], vec![4, 4, 4, 4, 4, 4, 4]);
        // Both rows for three steps, then only the row still running.
        assert_eq!(dec.calls, vec![2, 2, 2, 1, 1, 1]);
    }

    #[test]
    fn default_length_is_twenty_new_tokens_capped_by_positions() {
        assert_eq!(StoppingConfig::new(4, None, 512, vec![]).max_length, 24);
        assert_eq!(StoppingConfig::new(4, None, 10, vec![]).max_length, 10);
        assert_eq!(StoppingConfig::new(4, Some(3), 10, vec![]).max_length, 7);
    }
}
