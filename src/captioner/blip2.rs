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

use super::{on_pool, Caption, Captioner};
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
    hypotheses
        .into_iter()
        .map(|per_row| {
            per_row
                .into_iter()
                .map(|h| {
                    Ok(Caption {
                        text: codec.decode(&h.ids[prompt_len..])?.trim().to_string(),
                        ids: h.ids,
                        score: h.score,
                    })
                })
                .collect()
        })
        .collect()
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

/// One question and its answer, kept for the next turns' prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub question: String,
    pub answer: String,
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

/// A conversation about one image: the image is encoded once, and every
/// question is asked with the earlier turns in the prompt.
pub struct Conversation<'c> {
    captioner: &'c Captioner,
    model: &'c Blip2ForConditionalGeneration,
    /// The image's projected queries, `[1, queries, hidden]`.
    queries: Tensor,
    turns: Vec<Turn>,
    asked: u64,
}

/// What one question got.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The best answer (and more with `num_return_sequences`).
    pub answers: Vec<Caption>,
    /// How many of the oldest turns were dropped from the prompt to make room
    /// for this one within the model's context.
    pub forgotten: usize,
}

impl Captioner {
    /// Starts a conversation about `image` (BLIP-2 models only).
    pub fn conversation(&self, image: &image::RgbImage) -> Result<Conversation<'_>> {
        let model = self.blip2_model()?;
        let pixel_values = self.pixel_values(std::slice::from_ref(image))?;
        let image_embeds = self.image_embeds(&pixel_values)?;
        Ok(Conversation {
            captioner: self,
            model,
            queries: model.language_model_inputs(&image_embeds)?,
            turns: Vec::new(),
            asked: 0,
        })
    }
}

impl Conversation<'_> {
    /// Asks `question` with the conversation so far in the prompt. When the
    /// prompt and the reply would not fit in the model's context, the oldest
    /// turns are dropped for good (the reply says how many). `stream` seeds
    /// sampling; each question draws from its own sub-stream of it.
    pub fn ask(
        &mut self,
        question: &str,
        stream: u64,
        generation: &GenerationConfig,
    ) -> Result<Reply> {
        on_pool(|| {
            anyhow::ensure!(!question.trim().is_empty(), "the question is empty");
            let room = self.model.max_text_positions();
            let needed = |prompt: &str| -> Result<usize> {
                let ids = prompt_ids(self.model, &self.captioner.codec, Some(prompt))?;
                Ok(ids.len().saturating_add(reply_budget(generation)))
            };
            let template = &self.captioner.question_template;
            let mut forgotten = 0;
            let prompt = loop {
                let prompt = conversation_prompt(template, &self.turns[forgotten..], question);
                if needed(&prompt)? <= room {
                    break prompt;
                }
                anyhow::ensure!(
                forgotten < self.turns.len(),
                "the question is too long: with room for a {}-token reply it does not fit in the \
                 model's {room} text positions",
                reply_budget(generation)
            );
                forgotten += 1;
            };
            self.turns.drain(..forgotten);
            let streams = [stream ^ self.asked.wrapping_mul(0x9E37_79B9_7F4A_7C15)];
            self.asked += 1;
            let answers = generate_continuations(
                self.model,
                &self.captioner.codec,
                &self.queries,
                Some(&prompt),
                &streams,
                generation,
            )?
            .pop()
            .expect("one row of answers per image");
            self.captioner.check_weights()?;
            self.turns.push(Turn {
                question: question.trim().to_string(),
                answer: answers[0].text.clone(),
            });
            Ok(Reply { answers, forgotten })
        })
    }

    /// The turns the next question's prompt will carry.
    pub fn turns(&self) -> &[Turn] {
        &self.turns
    }
}
