//! LLaVA generation: a conversation rendered by the checkpoint's chat
//! template, its `<image>` placeholder expanded to one token per image
//! feature (as `LlavaProcessor` does), the projected features written over
//! those tokens' embeddings, and the Llama language model continuing
//! through the shared decoding engine.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::Caption;
use crate::generate::{self, Decoder, GenerationConfig, Limits};
use crate::load::chat_template::{ChatTemplate, Message};
use crate::load::tokenizer::TextCodec;
use crate::models::llama::{LlamaCache, LlamaForCausalLM};
use crate::models::llava::LlavaForConditionalGeneration;

/// What a LLaVA model is asked when it captions without `--prompt` and its
/// alias names no instruction of its own.
pub const DEFAULT_INSTRUCTION: &str = "Describe this image in one sentence.";

/// The text form of the image placeholder in LLaVA prompts.
pub const IMAGE_TOKEN: &str = "<image>";

/// A model, its tokenizer and its chat template: what turns a
/// conversation into prompt ids.
pub struct Prompter<'a> {
    pub model: &'a LlavaForConditionalGeneration,
    pub codec: &'a TextCodec,
    pub template: &'a ChatTemplate,
}

impl Prompter<'_> {
    /// The prompt text of `messages`, ending where the reply begins.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        self.template.render(messages, true)
    }

    /// `LlavaProcessor`'s `input_ids` for `text`: each `<image>` expanded to
    /// one placeholder per image feature, then tokenized with the
    /// tokenizer's special tokens (Llama's `<s>` in front).
    pub fn ids(&self, text: &str) -> Result<Vec<u32>> {
        let features = self.model.config.image_features();
        let expanded = text.replace(IMAGE_TOKEN, &IMAGE_TOKEN.repeat(features));
        let ids = self.codec.encode_with_special_tokens(&expanded)?;
        let image_token = self.model.config.image_token_index;
        let placeholders = ids.iter().filter(|&&id| id == image_token).count();
        anyhow::ensure!(
            placeholders == features,
            "the prompt holds {placeholders} image placeholder tokens where one image needs \
             {features}: it must name the image exactly once (as {IMAGE_TOKEN}), and the \
             question cannot contain {IMAGE_TOKEN} itself"
        );
        Ok(ids)
    }

    /// The prompt ids of a one-turn conversation: `question` about the image.
    pub fn question_ids(&self, question: &str) -> Result<Vec<u32>> {
        anyhow::ensure!(!question.trim().is_empty(), "the question is empty");
        self.ids(&self.render(&[Message::user(question, true)])?)
    }

    /// Where the image's placeholders start in `ids`.
    pub fn image_start(&self, ids: &[u32]) -> Result<usize> {
        let image_token = self.model.config.image_token_index;
        ids.iter()
            .position(|&id| id == image_token)
            .ok_or_else(|| anyhow::anyhow!("the prompt has no image placeholder"))
    }

    /// Continues `prompt` (from [`Self::ids`]) for each row of
    /// `image_features [batch, features, hidden]`. Each caption's `ids` are
    /// the prompt and the new tokens; its `text` the new tokens alone,
    /// decoded and stripped, as the model cards print
    /// `batch_decode(new_ids, skip_special_tokens=True)`.
    pub fn generate(
        &self,
        image_features: &Tensor,
        prompt: &[u32],
        streams: &[u64],
        generation: &GenerationConfig,
    ) -> Result<Vec<Vec<Caption>>> {
        let batch = image_features.dim(0)?;
        anyhow::ensure!(streams.len() == batch, "one random stream per image");
        let lm = &self.model.language_model;
        let mut decoder = LlavaDecoder::new(
            lm,
            lm.new_cache(),
            image_features.clone(),
            self.image_start(prompt)?,
            0,
        );
        let hypotheses = generate::generate(
            &mut decoder,
            &vec![prompt.to_vec(); batch],
            streams,
            &self.limits(),
            generation,
        )?;
        self.captions(hypotheses, prompt.len())
    }

    /// Generation's limits: the language model's positions (the image's
    /// placeholders count), and its end-of-sequence ids.
    pub fn limits(&self) -> Limits {
        let text = &self.model.config.text_config;
        Limits {
            max_positions: self.model.language_model.max_position_embeddings(),
            eos_token_ids: text
                .eos_token_id
                .as_ref()
                .map(|ids| ids.to_vec())
                .unwrap_or_default(),
        }
    }

    pub fn captions(
        &self,
        hypotheses: Vec<Vec<generate::Hypothesis>>,
        prompt_len: usize,
    ) -> Result<Vec<Vec<Caption>>> {
        super::captions_of(self.codec, hypotheses, super::Text::After(prompt_len))
    }
}

/// The Llama language model as the generation loop sees it. The first step
/// reads the prompt with the image features in place of its placeholders;
/// positions already in the cache (`skip`, a conversation's earlier turns)
/// are not read again.
pub struct LlavaDecoder<'a> {
    language_model: &'a LlamaForCausalLM,
    cache: LlamaCache,
    /// `[rows, features, hidden]` until the first step.
    pending_features: Option<Tensor>,
    image_start: usize,
    skip: usize,
    /// Whether to keep the cache as it is after the first step.
    keep_prefilled: bool,
    /// The cache right after the first step, one row: what a conversation
    /// keeps for its next turn.
    prefilled: Option<LlamaCache>,
    device: Device,
}

impl<'a> LlavaDecoder<'a> {
    pub fn new(
        language_model: &'a LlamaForCausalLM,
        cache: LlamaCache,
        features: Tensor,
        image_start: usize,
        skip: usize,
    ) -> Self {
        Self {
            device: features.device().clone(),
            language_model,
            cache,
            pending_features: Some(features),
            image_start,
            skip,
            keep_prefilled: false,
            prefilled: None,
        }
    }

    /// Keeps the cache as it is after reading the prompt (one row), for
    /// [`Self::take_prefilled`].
    pub fn keeping_prefilled(mut self) -> Self {
        self.keep_prefilled = true;
        self
    }

    /// The cache as it was after reading the prompt (one row).
    pub fn take_prefilled(&mut self) -> Option<LlamaCache> {
        self.prefilled.take()
    }

    /// The prompt's embeddings with the image features written over the
    /// placeholders, from position `skip` on.
    fn prompt_embeds(&self, input_ids: &Tensor, features: &Tensor) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        let n = features.dim(1)?;
        let (start, end) = (self.image_start, self.image_start + n);
        anyhow::ensure!(end <= len, "the image placeholders run past the prompt");
        let mut parts = Vec::with_capacity(3);
        if start > 0 {
            parts.push(self.language_model.embed(&input_ids.narrow(1, 0, start)?)?);
        }
        parts.push(features.to_dtype(self.language_model.dtype())?);
        if end < len {
            parts.push(
                self.language_model
                    .embed(&input_ids.narrow(1, end, len - end)?)?,
            );
        }
        let embeds = Tensor::cat(&parts, 1)?;
        Ok(embeds.narrow(1, self.skip, len - self.skip)?)
    }
}

impl Decoder for LlavaDecoder<'_> {
    fn step(&mut self, input_ids: &Tensor) -> Result<Tensor> {
        let first = self.pending_features.is_some();
        let embeds = match self.pending_features.take() {
            // The image is already in the cache: the new tokens alone.
            Some(_) if self.skip > self.image_start => {
                let len = input_ids.dim(1)?;
                self.language_model
                    .embed(&input_ids.narrow(1, self.skip, len - self.skip)?)?
            }
            Some(features) => self.prompt_embeds(input_ids, &features)?,
            None => self.language_model.embed(input_ids)?,
        };
        let logits = self
            .language_model
            .forward_embeds(&embeds, &mut self.cache)?;
        if first && self.keep_prefilled {
            // Every row has read the same prompt: row 0 stands for all.
            let mut one_row = self.cache.clone();
            one_row.select_rows(&Tensor::new(&[0u32], &self.device)?)?;
            self.prefilled = Some(one_row);
        }
        Ok(logits.to_dtype(DType::F32)?)
    }

    fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let rows = Tensor::new(rows, &self.device)?;
        self.cache.select_rows(&rows)?;
        if let Some(features) = &mut self.pending_features {
            *features = features.index_select(&rows, 0)?;
        }
        Ok(())
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// What a LLaVA conversation keeps between turns: the image's features and
/// the language model's cache of the last prompt it read, so the next turn
/// reads only what its prompt adds (the last answer and the new question),
/// not the image and the whole history again.
pub struct ChatMemory {
    /// `[1, features, hidden]`.
    features: Tensor,
    /// The cache after the last prompt, and that prompt's ids.
    read: Option<(LlamaCache, Vec<u32>)>,
}

impl ChatMemory {
    pub fn new(features: Tensor) -> Self {
        Self {
            features,
            read: None,
        }
    }

    /// Generates the reply to `prompt` (the whole conversation's ids), reusing
    /// the cache for the longest prefix it shares with the last prompt.
    pub fn reply(
        &mut self,
        prompter: &Prompter,
        prompt: &[u32],
        stream: u64,
        generation: &GenerationConfig,
    ) -> Result<Vec<Caption>> {
        let lm = &prompter.model.language_model;
        let (cache, skip) = match self.read.take() {
            Some((mut cache, ids)) => {
                // At least one token must be read to have logits to continue from.
                let shared = common_prefix(&ids, prompt).min(prompt.len().saturating_sub(1));
                cache.truncate(shared)?;
                (cache, shared)
            }
            None => (lm.new_cache(), 0),
        };
        let image_start = prompter.image_start(prompt)?;
        let mut decoder = LlavaDecoder::new(lm, cache, self.features.clone(), image_start, skip)
            .keeping_prefilled();
        let hypotheses = generate::generate(
            &mut decoder,
            &[prompt.to_vec()],
            &[stream],
            &prompter.limits(),
            generation,
        )?;
        if let Some(cache) = decoder.take_prefilled() {
            self.read = Some((cache, prompt.to_vec()));
        }
        Ok(prompter
            .captions(hypotheses, prompt.len())?
            .pop()
            .unwrap_or_default())
    }

    /// How many prompt positions the cache holds (for tests and notes).
    pub fn cached_positions(&self) -> usize {
        self.read.as_ref().map_or(0, |(cache, _)| cache.seq_len())
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
