//! Conversations about one image (`caption chat`): BLIP-2 keeps the turns
//! in its question template's prompt; LLaVA renders them with its chat
//! template and keeps its language model's cache between turns.

use anyhow::Result;
use candle_core::Tensor;

use super::blip2::{conversation_prompt, generate_continuations, prompt_ids, reply_budget};
use super::llava::ChatMemory;
use super::{on_pool, Caption, Captioner, Model};
use crate::generate::GenerationConfig;
use crate::load::chat_template::Message;
use crate::models::blip2::Blip2ForConditionalGeneration;

/// One question and its answer, kept for the next turns' prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub question: String,
    pub answer: String,
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

/// A conversation about one image: the image is encoded once, and every
/// question is asked with the earlier turns in the prompt.
pub struct Conversation<'c> {
    captioner: &'c Captioner,
    engine: Engine<'c>,
    turns: Vec<Turn>,
    asked: u64,
}

/// What each family keeps of the image between turns.
enum Engine<'c> {
    Blip2 {
        model: &'c Blip2ForConditionalGeneration,
        /// The image's projected queries, `[1, queries, hidden]`.
        queries: Tensor,
    },
    Llava(ChatMemory),
}

impl Captioner {
    /// Starts a conversation about `image` (BLIP-2 and LLaVA models).
    pub fn conversation(&self, image: &image::RgbImage) -> Result<Conversation<'_>> {
        let engine = match &self.model {
            Model::Blip2(model) => {
                let pixel_values = self.pixel_values(std::slice::from_ref(image))?;
                let image_embeds = self.image_embeds(&pixel_values)?;
                Engine::Blip2 {
                    model,
                    queries: on_pool(|| model.language_model_inputs(&image_embeds))?,
                }
            }
            Model::Llava(_) => {
                let pixel_values = self.pixel_values(std::slice::from_ref(image))?;
                Engine::Llava(ChatMemory::new(self.image_embeds(&pixel_values)?))
            }
            _ => anyhow::bail!(
                "this is a BLIP model: it cannot hold a conversation (BLIP-2 and LLaVA models can)"
            ),
        };
        Ok(Conversation {
            captioner: self,
            engine,
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
            let stream = stream ^ self.asked.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            self.asked += 1;
            let (answers, forgotten) = match &mut self.engine {
                Engine::Blip2 { model, queries } => blip2_reply(
                    self.captioner,
                    model,
                    queries,
                    &self.turns,
                    question,
                    stream,
                    generation,
                )?,
                Engine::Llava(memory) => llava_reply(
                    self.captioner,
                    memory,
                    &self.turns,
                    question,
                    stream,
                    generation,
                )?,
            };
            self.captioner.check_weights()?;
            self.turns.drain(..forgotten);
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

    /// Prompt positions the language model's cache holds from the last turn,
    /// which the next turn's prompt reads again only where it differs (LLaVA;
    /// BLIP-2 re-reads every prompt: 0).
    pub fn cached_positions(&self) -> usize {
        match &self.engine {
            Engine::Blip2 { .. } => 0,
            Engine::Llava(memory) => memory.cached_positions(),
        }
    }
}

/// The fewest oldest turns to drop so that `needed(kept turns)` fits in
/// `room` positions; an error when even the question alone does not.
fn turns_to_forget(
    turns: &[Turn],
    room: usize,
    generation: &GenerationConfig,
    mut needed: impl FnMut(&[Turn]) -> Result<usize>,
) -> Result<usize> {
    let mut forgotten = 0;
    loop {
        if needed(&turns[forgotten..])?.saturating_add(reply_budget(generation)) <= room {
            return Ok(forgotten);
        }
        anyhow::ensure!(
            forgotten < turns.len(),
            "the question is too long: with room for a {}-token reply it does not fit in the \
             model's {room} text positions",
            reply_budget(generation)
        );
        forgotten += 1;
    }
}

fn blip2_reply(
    captioner: &Captioner,
    model: &Blip2ForConditionalGeneration,
    queries: &Tensor,
    turns: &[Turn],
    question: &str,
    stream: u64,
    generation: &GenerationConfig,
) -> Result<(Vec<Caption>, usize)> {
    let template = &captioner.question_template;
    let prompt_of = |kept: &[Turn]| conversation_prompt(template, kept, question);
    let forgotten = turns_to_forget(turns, model.max_text_positions(), generation, |kept| {
        Ok(prompt_ids(model, &captioner.codec, Some(&prompt_of(kept)))?.len())
    })?;
    let answers = generate_continuations(
        model,
        &captioner.codec,
        queries,
        Some(&prompt_of(&turns[forgotten..])),
        &[stream],
        generation,
    )?
    .pop()
    .expect("one row of answers per image");
    Ok((answers, forgotten))
}

/// The messages of a LLaVA conversation: the image in the first user turn
/// kept, each answer as the assistant's, then the new question.
pub fn llava_messages(turns: &[Turn], question: &str) -> Vec<Message> {
    let mut messages = Vec::with_capacity(2 * turns.len() + 1);
    for (i, turn) in turns.iter().enumerate() {
        messages.push(Message::user(&turn.question, i == 0));
        messages.push(Message::assistant(&turn.answer));
    }
    messages.push(Message::user(question.trim(), turns.is_empty()));
    messages
}

fn llava_reply(
    captioner: &Captioner,
    memory: &mut ChatMemory,
    turns: &[Turn],
    question: &str,
    stream: u64,
    generation: &GenerationConfig,
) -> Result<(Vec<Caption>, usize)> {
    let prompter = captioner.prompter()?;
    let ids_of = |kept: &[Turn]| prompter.ids(&prompter.render(&llava_messages(kept, question))?);
    let room = prompter.model.language_model.max_position_embeddings();
    let forgotten = turns_to_forget(turns, room, generation, |kept| Ok(ids_of(kept)?.len()))?;
    let prompt = ids_of(&turns[forgotten..])?;
    let answers = memory.reply(&prompter, &prompt, stream, generation)?;
    Ok((answers, forgotten))
}
