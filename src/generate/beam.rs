//! Beam search, step for step as transformers 5's `_beam_search`
//! (generation/utils.py: `_get_top_k_continuations`,
//! `_get_running_beams_for_next_iteration`, `_update_finished_beams`,
//! `_check_early_stop_heuristic`), one group of beams per prompt.
//!
//! transformers decides when to stop for the whole batch at once, so a group
//! that is done can keep running junk beams while others finish; we stop each
//! group on its own, which is what the same prompt alone would do, so a batch
//! gives exactly the single-prompt results.

use anyhow::Result;
use candle_core::Tensor;

use super::{log_softmax_rows, processors, Decoder, EarlyStopping, Hypothesis, Search};

/// transformers marks impossible scores by adding this (in f32).
const NEG_BIG: f32 = -1.0e9;

#[derive(Debug, Clone)]
struct Beam {
    ids: Vec<u32>,
    score: f32,
}

#[derive(Debug, Clone)]
struct Slot {
    beam: Beam,
    is_finished: bool,
}

/// One candidate continuation: beam `beam` extended by `token`.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    beam: usize,
    token: u32,
    log_prob: f32,
    hits_stop: bool,
}

/// The beams of one prompt.
struct Group {
    running: Vec<Beam>,
    finished: Vec<Slot>,
    /// `is_early_stop_heuristic_unsatisfied`: better finished sequences may still come.
    improvable: bool,
    done: bool,
}

pub(super) fn beam_search(
    decoder: &mut impl Decoder,
    prompts: &[Vec<u32>],
    search: &Search,
) -> Result<Vec<Vec<Hypothesis>>> {
    let config = search.config;
    let num_beams = config.num_beams;
    // Enough candidates that `num_beams` survive even if every EOS is among them.
    let keep = 2usize.max(1 + search.eos.len()) * num_beams;
    let mut groups: Vec<Group> = prompts
        .iter()
        .map(|prompt| Group {
            // All beams start as the prompt; only the first counts at first.
            running: (0..num_beams)
                .map(|b| Beam {
                    ids: prompt.clone(),
                    score: if b == 0 { 0.0 } else { NEG_BIG },
                })
                .collect(),
            finished: vec![
                Slot {
                    beam: Beam {
                        ids: prompt.clone(),
                        score: NEG_BIG,
                    },
                    is_finished: false,
                };
                num_beams
            ],
            improvable: true,
            done: false,
        })
        .collect();

    // Each prompt's row becomes `num_beams` rows.
    let expand: Vec<u32> = (0..prompts.len() as u32)
        .flat_map(|g| std::iter::repeat_n(g, num_beams))
        .collect();
    decoder.select_rows(&expand)?;
    let mut active: Vec<usize> = (0..groups.len()).collect();
    let first_input: Vec<Vec<u32>> = expand
        .iter()
        .map(|&g| prompts[g as usize].clone())
        .collect();
    let mut input = Tensor::new(first_input, decoder.device())?;
    let mut cur_len = search.prompt_len;

    loop {
        let logits = decoder.step(&input)?;
        let vocab = logits.dim(1)?;
        let mut scores: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        log_softmax_rows(&mut scores, vocab);
        let rows: Vec<&[u32]> = active
            .iter()
            .flat_map(|&g| groups[g].running.iter().map(|b| b.ids.as_slice()))
            .collect();
        processors::process(
            &config.logits,
            &rows,
            search.prompt_len,
            search.eos,
            &mut scores,
            vocab,
            false,
            1,
        );

        let mut next_rows = Vec::new();
        let mut next_active = Vec::new();
        for (a, &g) in active.iter().enumerate() {
            let group_scores = &scores[a * num_beams * vocab..(a + 1) * num_beams * vocab];
            let candidates = top_candidates(&groups[g], group_scores, vocab, keep, cur_len, search);
            let group = &mut groups[g];
            update_finished(group, &candidates, cur_len, search);
            let sources = advance_running(group, &candidates, num_beams);
            let all_hit = candidates.iter().all(|c| c.hits_stop);
            update_done(group, all_hit, cur_len + 1, search);
            if !group.done {
                next_rows.extend(sources.iter().map(|&b| (a * num_beams + b) as u32));
                next_active.push(g);
            }
        }
        cur_len += 1;
        if next_active.is_empty() {
            break;
        }
        decoder.select_rows(&next_rows)?;
        active = next_active;
        let last: Vec<u32> = active
            .iter()
            .flat_map(|&g| {
                groups[g]
                    .running
                    .iter()
                    .map(|b| *b.ids.last().expect("never empty"))
            })
            .collect();
        input = Tensor::new(last, decoder.device())?.unsqueeze(1)?;
    }

    Ok(groups
        .into_iter()
        .map(|group| {
            group
                .finished
                .into_iter()
                .take(config.num_return_sequences)
                .map(|slot| Hypothesis {
                    ids: slot.beam.ids,
                    score: Some(slot.beam.score),
                })
                .collect()
        })
        .collect())
}

/// The `keep` best continuations over all beams of a group, by accumulated
/// log-prob, best first (`torch.topk` over `num_beams * vocab` scores).
fn top_candidates(
    group: &Group,
    log_probs: &[f32],
    vocab: usize,
    keep: usize,
    cur_len: usize,
    search: &Search,
) -> Vec<Candidate> {
    let accumulated = |i: usize| log_probs[i] + group.running[i / vocab].score;
    let mut order: Vec<usize> = (0..log_probs.len()).collect();
    let keep = keep.min(order.len());
    // Partial selection, then sort: ties go to the lower flat index.
    let by_score_then_index =
        |&a: &usize, &b: &usize| accumulated(b).total_cmp(&accumulated(a)).then(a.cmp(&b));
    order.select_nth_unstable_by(keep - 1, by_score_then_index);
    order.truncate(keep);
    order.sort_by(by_score_then_index);
    order
        .into_iter()
        .map(|i| {
            let token = (i % vocab) as u32;
            Candidate {
                beam: i / vocab,
                token,
                log_prob: accumulated(i),
                hits_stop: search.eos.contains(&token) || cur_len + 1 >= search.max_length,
            }
        })
        .collect()
}

/// The `num_beams` best candidates that did not stop become the running beams
/// (if too few, stopped ones fill in with a -1e9 score, as in transformers).
/// Returns, for each new beam, the beam it continues.
fn advance_running(group: &mut Group, candidates: &[Candidate], num_beams: usize) -> Vec<usize> {
    let adjusted = |c: &Candidate| {
        if c.hits_stop {
            c.log_prob + NEG_BIG
        } else {
            c.log_prob
        }
    };
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| {
        adjusted(&candidates[b])
            .total_cmp(&adjusted(&candidates[a]))
            .then(a.cmp(&b))
    });
    let chosen = &order[..num_beams];
    let new_running: Vec<Beam> = chosen
        .iter()
        .map(|&i| {
            let c = &candidates[i];
            Beam {
                ids: extended(&group.running[c.beam].ids, c.token),
                score: adjusted(c),
            }
        })
        .collect();
    let sources = chosen.iter().map(|&i| candidates[i].beam).collect();
    group.running = new_running;
    sources
}

/// Adds the candidates that just finished among the top `num_beams` to the
/// finished set, keeping its `num_beams` best by length-penalised score.
fn update_finished(group: &mut Group, candidates: &[Candidate], cur_len: usize, search: &Search) {
    let config = search.config;
    let num_beams = config.num_beams;
    let new_tokens = cur_len + 1 - search.prompt_len;
    let penalty = (new_tokens as f64).powf(config.length_penalty as f64) as f32;
    let full = config.early_stopping == EarlyStopping::True
        && group.finished.iter().all(|s| s.is_finished);
    let mut merged: Vec<Slot> = group.finished.clone();
    for (j, c) in candidates.iter().enumerate() {
        let just_finished = c.hits_stop && j < num_beams;
        let mut score = c.log_prob / penalty;
        if full {
            score += NEG_BIG;
        }
        if !group.improvable {
            score += NEG_BIG;
        }
        if !just_finished {
            score += NEG_BIG;
        }
        merged.push(Slot {
            beam: Beam {
                ids: extended(&group.running[c.beam].ids, c.token),
                score,
            },
            is_finished: just_finished,
        });
    }
    let mut order: Vec<usize> = (0..merged.len()).collect();
    order.sort_by(|&a, &b| {
        merged[b]
            .beam
            .score
            .total_cmp(&merged[a].beam.score)
            .then(a.cmp(&b))
    });
    group.finished = order[..num_beams]
        .iter()
        .map(|&i| merged[i].clone())
        .collect();
}

/// transformers' stopping rules for one group, after a step made sequences
/// `cur_len` long.
fn update_done(group: &mut Group, all_candidates_stopped: bool, cur_len: usize, search: &Search) {
    let config = search.config;
    let lp = config.length_penalty as f64;
    let best_len = if config.early_stopping == EarlyStopping::Never && lp > 0.0 {
        search.max_length - search.prompt_len
    } else {
        cur_len - search.prompt_len
    };
    let best_possible = group.running[0].score / (best_len as f64).powf(lp) as f32;
    let all_finished = group.finished.iter().all(|s| s.is_finished);
    // An open slot can always be filled; a full set only by beating its worst.
    let worst_score = group
        .finished
        .iter()
        .map(|s| s.beam.score)
        .fold(f32::INFINITY, f32::min);
    let could_improve = group
        .finished
        .iter()
        .any(|s| best_possible > if s.is_finished { worst_score } else { NEG_BIG });
    group.improvable &= could_improve;
    let full = all_finished && config.early_stopping == EarlyStopping::True;
    group.done = !group.improvable || full || all_candidates_stopped;
}

fn extended(ids: &[u32], token: u32) -> Vec<u32> {
    let mut ids = ids.to_vec();
    ids.push(token);
    ids
}
