//! BLIP-2 generation: the projected query tokens in front of a text prompt,
//! continued by the OPT language model through the shared decoding engine,
//! and conversations that keep their turns in the prompt.
//!
//! transformers has had two ways to put the queries in front of the prompt.
//! Checkpoints converted after the change carry an `image_token_index`: the
//! processor writes `<image>` × num_query_tokens, then `</s>` and the prompt,
//! and `Blip2ForConditionalGeneration.generate` replaces the `<image>`
//! embeddings with the projected queries. Older ones prepend the queries to
//! the embeddings of `</s>` + prompt. Both hand the language model the same
//! embeddings at the same positions (the attention mask is all ones), so one
//! path serves both: queries, then `</s>`, then the prompt.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

pub use super::chat::Turn;
use super::Caption;
use crate::generate::{self, Decoder, GenerationConfig, Limits, DEFAULT_MAX_NEW_TOKENS};
use crate::load::tokenizer::TextCodec;
use crate::models::blip2::Blip2ForConditionalGeneration;
use crate::models::opt::{OptCache, OptForCausalLM};

/// The question template of BLIP-2 OPT checkpoints (the BLIP-2 paper's VQA
/// prompt), used when models.toml names none.
pub const DEFAULT_QUESTION_TEMPLATE: &str = "Question: {} Answer:";

/// Fills a question template's `{}` with `question`.
pub fn fill_template(template: &str, question: &str) -> String {
    template.replacen("{}", question.trim(), 1)
}

/// The ids the language model reads after the queries: `</s>` (OPT's bos)
/// and the prompt, as `Blip2Processor` tokenizes it (OPT's tokenizer puts the
/// bos in front; `generate` uses the bos alone when there is no prompt).
pub fn prompt_ids(
    model: &Blip2ForConditionalGeneration,
    codec: &TextCodec,
    prompt: Option<&str>,
) -> Result<Vec<u32>> {
    let bos = model.config.text_config.bos_token_id.ok_or_else(|| {
        anyhow::anyhow!("the language model's config has no bos_token_id to start the text with")
    })?;
    let mut ids = vec![bos];
    if let Some(prompt) = prompt {
        ids.extend(codec.encode_without_special_tokens(prompt)?);
    }
    Ok(ids)
}

/// Continues `prompt` after each row of `language_model_inputs [batch,
/// queries, hidden]`. Each caption's `ids` are the prompt ids and the new
/// tokens; its `text` is the new tokens alone, decoded and stripped, as
/// transformers' users print `batch_decode(new_ids, skip_special_tokens=True)`.
pub fn generate_continuations(
    model: &Blip2ForConditionalGeneration,
    codec: &TextCodec,
    language_model_inputs: &Tensor,
    prompt: Option<&str>,
    streams: &[u64],
    generation: &GenerationConfig,
) -> Result<Vec<Vec<Caption>>> {
    let batch = language_model_inputs.dim(0)?;
    anyhow::ensure!(streams.len() == batch, "one random stream per image");
    let prompt = prompt_ids(model, codec, prompt)?;
    let prompt_len = prompt.len();
    let limits = Limits {
        max_positions: model.max_text_positions(),
        eos_token_ids: model
            .config
            .text_config
            .eos_token_id
            .as_ref()
            .map(|ids| ids.to_vec())
            .unwrap_or_default(),
    };
    let mut decoder = OptDecoder {
        language_model: &model.language_model,
        cache: model.language_model.new_cache(),
        pending_queries: Some(language_model_inputs.clone()),
        device: language_model_inputs.device().clone(),
    };
    let hypotheses = generate::generate(
        &mut decoder,
        &vec![prompt; batch],
        streams,
        &limits,
        generation,
    )?;
    super::captions_of(codec, hypotheses, super::Text::After(prompt_len))
}

/// The OPT language model as the generation loop sees it. The projected
/// queries wait in `pending_queries` until the first step, which reads them
/// in front of the prompt's embeddings.
struct OptDecoder<'a> {
    language_model: &'a OptForCausalLM,
    cache: OptCache,
    pending_queries: Option<Tensor>,
    device: Device,
}

impl Decoder for OptDecoder<'_> {
    fn step(&mut self, input_ids: &Tensor) -> Result<Tensor> {
        let embeds = self.language_model.embed(input_ids)?;
        let embeds = match self.pending_queries.take() {
            Some(queries) => Tensor::cat(&[&queries, &embeds], 1)?,
            None => embeds,
        };
        let logits = self
            .language_model
            .forward_embeds(&embeds, &mut self.cache)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let rows = Tensor::new(rows, &self.device)?;
        self.cache.select_rows(&rows)?;
        if let Some(queries) = &mut self.pending_queries {
            *queries = queries.index_select(&rows, 0)?;
        }
        Ok(())
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// The prompt of a conversation: the earlier turns, each written as the
/// template filled with its question, the answer and a full stop, then the
/// new question's template, joined by spaces. With the default template:
/// "Question: q1 Answer: a1. Question: q2 Answer:", the multi-turn format of
/// the BLIP-2 authors' examples.
pub fn conversation_prompt(template: &str, turns: &[Turn], question: &str) -> String {
    let mut parts: Vec<String> = turns
        .iter()
        .map(|turn| {
            format!(
                "{} {}.",
                fill_template(template, &turn.question),
                turn.answer
            )
        })
        .collect();
    parts.push(fill_template(template, question));
    parts.join(" ")
}

/// How many new tokens a reply may take, to reserve room for it.
pub fn reply_budget(generation: &GenerationConfig) -> usize {
    generation.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS)
}
