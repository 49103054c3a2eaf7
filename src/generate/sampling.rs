//! Greedy decoding and sampling: one token per sequence per step
//! (transformers' `_sample`).

use anyhow::Result;
use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::{processors, Decoder, Search};

/// Runs every prompt to EOS or the length limit; returns the full sequences.
///
/// Rows that finish leave the batch (transformers keeps computing them and
/// pads): rows never interact, so results are the same and the work shrinks.
pub(super) fn sample_or_greedy(
    decoder: &mut impl Decoder,
    prompts: &[Vec<u32>],
    streams: &[u64],
    search: &Search,
) -> Result<Vec<Vec<u32>>> {
    let config = search.config;
    let mut sequences: Vec<Vec<u32>> = prompts.to_vec();
    let mut rngs: Vec<ChaCha8Rng> = streams
        .iter()
        .map(|&s| sequence_rng(config.seed, s))
        .collect();
    // `running[row]` is the index in `sequences` of decoder batch row `row`.
    let mut running: Vec<usize> = (0..prompts.len()).collect();
    let mut input = Tensor::new(prompts.to_vec(), decoder.device())?;
    let mut len = search.prompt_len;
    while len < search.max_length && !running.is_empty() {
        let logits = decoder.step(&input)?;
        let vocab = logits.dim(1)?;
        let mut scores: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let rows: Vec<&[u32]> = running.iter().map(|&s| sequences[s].as_slice()).collect();
        processors::process(
            &config.logits,
            &rows,
            search.prompt_len,
            search.eos,
            &mut scores,
            vocab,
            config.do_sample,
            1,
        );
        let mut kept_rows = Vec::with_capacity(running.len());
        let mut still_running = Vec::with_capacity(running.len());
        for (row, &seq) in running.iter().enumerate() {
            let row_scores = &scores[row * vocab..(row + 1) * vocab];
            let token = if config.do_sample {
                sample(row_scores, &mut rngs[seq])
            } else {
                argmax(row_scores)
            };
            sequences[seq].push(token);
            if !search.eos.contains(&token) {
                kept_rows.push(row as u32);
                still_running.push(seq);
            }
        }
        len += 1;
        if still_running.is_empty() {
            break;
        }
        if still_running.len() < running.len() {
            decoder.select_rows(&kept_rows)?;
        }
        running = still_running;
        let last: Vec<u32> = running
            .iter()
            .map(|&s| *sequences[s].last().expect("never empty"))
            .collect();
        input = Tensor::new(last, decoder.device())?.unsqueeze(1)?;
    }
    Ok(sequences)
}

/// Sequence `stream`'s generator under `seed`: ChaCha8 with the stream number
/// in its stream counter, so each sequence draws the same numbers whatever else
/// is in its batch, on every platform.
fn sequence_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// The first index of the largest score (torch's argmax on CPU picks the first too).
pub(super) fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws a token from softmax(scores); masked (-inf) tokens are never drawn.
fn sample(scores: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = scores.iter().map(|&s| ((s - max) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    // 53 random bits -> a uniform f64 in [0, 1).
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
    let mut cumulative = 0.0;
    let mut last_possible = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            cumulative += w;
            last_possible = i;
            if u < cumulative {
                return i as u32;
            }
        }
    }
    // Rounding left u at the very top: the last token that had any weight.
    last_possible as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::table::TableDecoder;
    use crate::generate::{generate, GenerationConfig, Limits, LogitsSettings};

    fn limits() -> Limits {
        Limits {
            max_positions: 512,
            eos_token_ids: vec![0],
        }
    }

    #[test]
    fn greedy_stops_each_row_on_eos_and_drops_it_from_the_batch() {
        // 1 -> 2 -> 3 -> 0 (eos); 4 -> 4 forever.
        let mut table = vec![vec![0.0; 5]; 5];
        for (from, to) in [(0, 0), (1, 2), (2, 3), (3, 0), (4, 4)] {
            table[from][to] = 1.0;
        }
        let mut dec = TableDecoder {
            table,
            batch_sizes: vec![],
        };
        let config = GenerationConfig {
            max_new_tokens: Some(6),
            ..GenerationConfig::default()
        };
        let out = generate(&mut dec, &[vec![1], vec![4]], &[0, 1], &limits(), &config).unwrap();
        assert_eq!(out[0][0].ids, vec![1, 2, 3, 0]);
        assert_eq!(out[1][0].ids, vec![4, 4, 4, 4, 4, 4, 4]);
        assert_eq!(dec.batch_sizes, vec![2, 2, 2, 1, 1, 1]);
    }

    fn spread_decoder() -> TableDecoder {
        // From any token, tokens 1..=4 are about equally likely; 0 (eos) rare.
        TableDecoder {
            table: vec![vec![-3.0, 0.1, 0.0, -0.1, 0.05]; 5],
            batch_sizes: vec![],
        }
    }

    fn sampled(seed: u64, prompts: usize, temperature: Option<f32>) -> Vec<Vec<u32>> {
        let config = GenerationConfig {
            max_new_tokens: Some(12),
            do_sample: true,
            seed,
            logits: LogitsSettings {
                temperature,
                ..LogitsSettings::default()
            },
            ..GenerationConfig::default()
        };
        let prompts = vec![vec![1]; prompts];
        let streams: Vec<u64> = (0..prompts.len() as u64).collect();
        generate(
            &mut spread_decoder(),
            &prompts,
            &streams,
            &limits(),
            &config,
        )
        .unwrap()
        .into_iter()
        .map(|h| h[0].ids.clone())
        .collect()
    }

    #[test]
    fn sampling_is_reproducible_and_independent_of_batching() {
        let together = sampled(7, 3, None);
        assert_eq!(together, sampled(7, 3, None));
        // Sequence 0 alone draws what it drew in a batch of three.
        assert_eq!(sampled(7, 1, None)[0], together[0]);
        // Different streams and different seeds give different text.
        assert_ne!(together[0], together[1]);
        assert_ne!(sampled(8, 1, None)[0], together[0]);
    }

    #[test]
    fn a_tiny_temperature_samples_the_greedy_sequence() {
        let greedy = generate(
            &mut spread_decoder(),
            &[vec![1]],
            &[0],
            &limits(),
            &GenerationConfig {
                max_new_tokens: Some(12),
                ..GenerationConfig::default()
            },
        )
        .unwrap()[0][0]
            .ids
            .clone();
        for seed in 0..5 {
            assert_eq!(sampled(seed, 1, Some(1e-3))[0], greedy);
        }
    }

    #[test]
    fn sample_never_draws_a_masked_token() {
        let mut rng = sequence_rng(1, 0);
        let scores = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
        for _ in 0..200 {
            let t = sample(&scores, &mut rng);
            assert!(t == 1 || t == 3);
        }
    }
}
