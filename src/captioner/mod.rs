//! A loaded captioning model: preprocessing, encoding and decoding together,
//! the library's main entry point.

pub mod blip2;
pub mod chat;
pub mod embed;
pub mod llava;
mod open;

pub use open::{parse_device, Options};

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::generate::{self, Decoder, GenerationConfig, GenerationDefaults, Limits};
use crate::image::PreprocessConfig;
use crate::load::chat_template::ChatTemplate;
use crate::load::tokenizer::TextCodec;
use crate::load::weight_cache::{self, WeightCache};
use crate::load::weights;
use crate::models::blip::{
    BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering, DecoderState, TextDecoder,
};
use crate::models::blip2::{Blip2Config, Blip2ForConditionalGeneration};
use crate::models::llava::{LlavaConfig, LlavaForConditionalGeneration};
use crate::nn::{packing_settings, LinearOptions};
pub use crate::nn::{QuantFormat, Quantization};
use crate::resolve::hub::{ModelFiles, ModelSource};
use crate::resolve::registry::Family;

/// Where and in what precision to run.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub device: Device,
    /// `None`: f32 on CPU (candle's fast path there); the checkpoint's own
    /// half-precision dtype on a GPU.
    pub dtype: Option<DType>,
    /// Quantize linear-layer weights at load (`--quantize`; CPU only).
    pub quantization: Option<Quantization>,
    /// The folder of the weight cache (see [`crate::load::weight_cache`]):
    /// linear layers packed for the CPU kernels, saved by the first load and
    /// mapped by later ones. `None`, the library's default, packs at every
    /// load; the CLI's default is [`crate::resolve::bundled::cache_root`]`/packed`.
    pub pack_cache: Option<std::path::PathBuf>,
    /// What the weight cache's files may take together; the least recently
    /// used are deleted beyond it (see [`WeightCache::with_size_limit`]).
    pub pack_cache_limit: u64,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
            quantization: None,
            pack_cache: None,
            pack_cache_limit: weight_cache::DEFAULT_SIZE_LIMIT,
        }
    }
}

/// What to generate for each image.
#[derive(Debug, Clone, Default)]
pub struct CaptionRequest {
    /// Text the caption must start with (`--prompt "a picture of"`).
    pub prompt: Option<String>,
    /// Decoding: greedy, beams or sampling, lengths, penalties.
    pub generation: GenerationConfig,
}

/// One generated caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    /// The full token sequence, prompt included, as transformers' `generate` returns it.
    pub ids: Vec<u32>,
    /// `decode(ids, skip_special_tokens=True)`: includes the prompt text, as
    /// transformers prints it. BLIP-2: the new tokens alone, decoded and
    /// stripped, as its model cards print `batch_decode(new_ids)`.
    pub text: String,
    /// Beam search: the length-penalised log-probability it was ranked by.
    pub score: Option<f32>,
}

/// The loaded network, by what it does.
enum Model {
    Caption(BlipForConditionalGeneration),
    Vqa(BlipForQuestionAnswering),
    /// BLIP-2: captions, answers through a question template, and converses.
    Blip2(Box<Blip2ForConditionalGeneration>),
    /// LLaVA: captions by an instruction, answers and converses through its
    /// chat template.
    Llava(Box<LlavaForConditionalGeneration>),
}

/// One question about one image, answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub question: String,
    /// Best first; more than one with `num_return_sequences`.
    pub answers: Vec<Caption>,
}

/// A captioning or question-answering model ready to run.
pub struct Captioner {
    model: Model,
    codec: TextCodec,
    preprocess: PreprocessConfig,
    device: Device,
    dtype: DType,
    /// Decoding defaults from the checkpoint's generation_config.json.
    generation_defaults: GenerationDefaults,
    /// Decoding defaults of the alias the model was opened by (models.toml).
    alias_generation: GenerationDefaults,
    notes: Vec<String>,
    /// BLIP-2: how `--ask` turns a question into a prompt (`{}` is the question).
    question_template: String,
    /// What the weight cache did at load, when there was one.
    weight_cache: Option<weight_cache::Outcome>,
    /// LLaVA: the checkpoint's chat template.
    chat_template: Option<ChatTemplate>,
    /// LLaVA: what captioning asks the model (models.toml's `instruction`).
    instruction: String,
}

impl Captioner {
    /// Fails, naming the file, if weights this model reads from the weight
    /// cache were cut short or changed by another program since they were
    /// mapped: anything computed since may be wrong. Cheap (one `fstat`
    /// per cache file); call it before giving out results.
    pub fn check_weights(&self) -> Result<()> {
        crate::load::watched_map::check()
    }

    /// Loads the model in `files` (from [`crate::resolve::hub::fetch`]).
    pub fn load(files: &ModelFiles, runtime: &RuntimeOptions) -> Result<Self> {
        let config_text = read(&files.config)?;
        let config_json: serde_json::Value = serde_json::from_str(&config_text)
            .with_context(|| format!("parsing {}", files.config.display()))?;
        let family = match family_of(&config_json) {
            Some(Family::Clip) => anyhow::bail!(
                "{} is a CLIP model: it labels, embeds and searches images (--labels, \
                 `caption embed`, `caption search`, --rerank) but writes no text",
                files.source
            ),
            Some(family) => family,
            None => anyhow::bail!(
                "{} is a {}; this version runs BlipForConditionalGeneration (captioning), \
                 BlipForQuestionAnswering (VQA), Blip2ForConditionalGeneration (BLIP-2 OPT), \
                 LlavaForConditionalGeneration (LLaVA with Llama) and CLIPModel (labels, \
                 embeddings, search) models",
                files.source,
                architectures_of(&config_json)
            ),
        };
        let mut parsed = match family {
            Family::Blip | Family::BlipVqa => ParsedConfig::Blip(
                BlipConfig::from_json(&config_text)
                    .with_context(|| format!("reading {}", files.config.display()))?,
            ),
            Family::Blip2Opt => ParsedConfig::Blip2(
                Blip2Config::from_json(&config_text)
                    .with_context(|| format!("reading {}", files.config.display()))?,
            ),
            Family::Llava => ParsedConfig::Llava(
                LlavaConfig::from_json(&config_text)
                    .with_context(|| format!("reading {}", files.config.display()))?,
            ),
            Family::Clip => unreachable!("refused above"),
        };
        if runtime.quantization.is_some() {
            anyhow::ensure!(
                runtime.device.is_cpu(),
                "--quantize runs on the CPU (candle's quantized kernels); drop it to use {:?}",
                runtime.device
            );
        }
        let dtype = model_dtype(runtime, &config_json);
        check_memory(files, runtime, dtype)?;
        let pack_cache = open_pack_cache(files, runtime, dtype, &config_text)?;
        parsed.set_linear_options(LinearOptions {
            quantization: runtime.quantization,
            weight_cache: pack_cache.clone(),
        });
        let preprocess = match family {
            Family::Llava => llava_preprocess_config(&files.image_processor)?,
            _ => load_preprocess_config(&files.image_processor)?,
        };
        check_image_size(&preprocess, parsed.image_size(), &files.image_processor)?;
        let codec = TextCodec::load(&files.tokenizer, files.tokenizer_config.as_deref())?;
        let mut notes = match &parsed {
            ParsedConfig::Blip(config) => config.filled_gaps.clone(),
            ParsedConfig::Blip2(_) | ParsedConfig::Llava(_) => vec![],
        };
        let chat_template = match family {
            Family::Llava => Some(
                ChatTemplate::find(
                    files.chat_template.as_deref(),
                    files.processor_config.as_deref(),
                    files.tokenizer_config.as_deref(),
                )?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{} has no chat template (chat_template.jinja, chat_template.json, or \
                             a chat_template in processor_config.json or tokenizer_config.json)",
                        files.source
                    )
                })?,
            ),
            _ => None,
        };
        let generation_defaults = match &files.generation_config {
            Some(path) => {
                let defaults = GenerationDefaults::from_generation_config(&read(path)?)
                    .with_context(|| format!("parsing {}", path.display()))?;
                if family.applies_generation_config() {
                    defaults
                } else {
                    if defaults != GenerationDefaults::default() {
                        notes.push(format!(
                            "{} sets decoding options that transformers does not apply to {family} models; \
                             they are ignored here too (use the decoding flags)",
                            path.display()
                        ));
                    }
                    GenerationDefaults::default()
                }
            }
            None => GenerationDefaults::default(),
        };
        let model = {
            // The VarBuilder holds every tensor it has handed out; dropping it
            // right after building keeps only the model's copy in memory.
            let vb = weights::var_builder(&files.weights, dtype, &runtime.device)?;
            let context = || format!("loading the weights of {}", files.source);
            match (family, parsed) {
                (Family::Blip, ParsedConfig::Blip(config)) => Model::Caption(
                    BlipForConditionalGeneration::new(config, vb).with_context(context)?,
                ),
                (Family::BlipVqa, ParsedConfig::Blip(config)) => {
                    Model::Vqa(BlipForQuestionAnswering::new(config, vb).with_context(context)?)
                }
                (_, ParsedConfig::Blip2(config)) => Model::Blip2(Box::new(
                    Blip2ForConditionalGeneration::new(config, vb).with_context(context)?,
                )),
                (_, ParsedConfig::Llava(config)) => Model::Llava(Box::new(
                    LlavaForConditionalGeneration::new(config, vb).with_context(context)?,
                )),
                (_, ParsedConfig::Blip(_)) => {
                    unreachable!("BLIP configs are parsed for BLIP families")
                }
            }
        };
        let weight_cache = finish_pack_cache(pack_cache.as_deref(), &mut notes);
        Ok(Self {
            model,
            codec,
            preprocess,
            device: runtime.device.clone(),
            dtype,
            generation_defaults,
            alias_generation: GenerationDefaults::default(),
            notes,
            question_template: blip2::DEFAULT_QUESTION_TEMPLATE.to_string(),
            weight_cache,
            chat_template,
            instruction: llava::DEFAULT_INSTRUCTION.to_string(),
        })
    }

    /// Sets how a BLIP-2 model turns an `--ask` question into a prompt
    /// (models.toml's `question_template`; `{}` stands for the question).
    pub fn set_question_template(&mut self, template: &str) -> Result<()> {
        anyhow::ensure!(
            template.contains("{}"),
            "the question template {template:?} has no {{}} for the question"
        );
        self.question_template = template.to_string();
        Ok(())
    }

    /// Sets what a LLaVA model is asked when it captions (models.toml's
    /// `instruction`).
    pub fn set_instruction(&mut self, instruction: &str) -> Result<()> {
        anyhow::ensure!(
            !instruction.trim().is_empty(),
            "the captioning instruction is empty"
        );
        self.instruction = instruction.to_string();
        Ok(())
    }

    /// LLaVA: the model, tokenizer and chat template that make its prompts.
    pub fn prompter(&self) -> Result<llava::Prompter<'_>> {
        match (&self.model, &self.chat_template) {
            (Model::Llava(model), Some(template)) => Ok(llava::Prompter {
                model,
                codec: &self.codec,
                template,
            }),
            _ => anyhow::bail!("this is not a LLaVA model"),
        }
    }

    /// Decoding defaults from the checkpoint's generation_config.json, where
    /// transformers applies that file to this family.
    pub fn generation_defaults(&self) -> &GenerationDefaults {
        &self.generation_defaults
    }

    /// Things the user should know about how the model was loaded (gaps in its
    /// config that were filled from the family's known values).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// What the weight cache did at load. `None` where there was none (not
    /// asked for, not on the CPU, a pickle checkpoint, or neither kernels
    /// nor `--quantize` to save anything for) or saving it failed (a note
    /// says why).
    pub fn weight_cache(&self) -> Option<&weight_cache::Outcome> {
        self.weight_cache.as_ref()
    }

    /// Where the model runs.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn preprocess_config(&self) -> &PreprocessConfig {
        &self.preprocess
    }

    /// `[batch, 3, H, W]` pixel values of decoded RGB images.
    pub fn pixel_values(&self, images: &[image::RgbImage]) -> Result<Tensor> {
        pixel_values(images, &self.preprocess, &self.device, self.dtype)
    }

    /// `image_embeds [batch, tokens, hidden]` of `pixel_values`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        on_pool(|| {
            let vision = match &self.model {
                Model::Caption(m) => &m.vision_model,
                Model::Vqa(m) => &m.vision_model,
                Model::Blip2(m) => &m.vision_model,
                // LLaVA's "image embeddings" are its projected features, what
                // the language model reads.
                Model::Llava(m) => {
                    return Ok(m.image_features(&pixel_values.to_dtype(self.dtype)?)?)
                }
            };
            Ok(vision.forward(&pixel_values.to_dtype(self.dtype)?)?)
        })
    }

    /// Whether this model captions images (without `--ask`).
    pub fn captions(&self) -> bool {
        !matches!(self.model, Model::Vqa(_))
    }

    /// Whether this model answers `--ask` questions.
    pub fn answers_questions(&self) -> bool {
        !matches!(self.model, Model::Caption(_))
    }

    /// Whether this model can hold a conversation (`caption chat`).
    pub fn converses(&self) -> bool {
        matches!(self.model, Model::Blip2(_) | Model::Llava(_))
    }

    fn config(&self) -> Result<&BlipConfig> {
        match &self.model {
            Model::Caption(m) => Ok(&m.config),
            Model::Vqa(m) => Ok(&m.config),
            Model::Blip2(_) | Model::Llava(_) => {
                anyhow::bail!("this model has no BLIP text decoder")
            }
        }
    }

    fn captioning_model(&self) -> Result<&BlipForConditionalGeneration> {
        match &self.model {
            Model::Caption(m) => Ok(m),
            Model::Vqa(_) => anyhow::bail!(
                "this is a question-answering model: ask it something with --ask, or caption with a captioning model"
            ),
            Model::Blip2(_) | Model::Llava(_) => {
                anyhow::bail!("this model captions through its language model")
            }
        }
    }

    fn vqa_model(&self) -> Result<&BlipForQuestionAnswering> {
        match &self.model {
            Model::Vqa(m) => Ok(m),
            Model::Caption(_) => anyhow::bail!(
                "this is a captioning model and cannot answer questions: use a VQA model such as blip-vqa-base"
            ),
            Model::Blip2(_) | Model::Llava(_) => {
                anyhow::bail!("this model answers through its language model")
            }
        }
    }

    fn blip2_model(&self) -> Result<&Blip2ForConditionalGeneration> {
        match &self.model {
            Model::Blip2(m) => Ok(m),
            _ => anyhow::bail!("this is not a BLIP-2 model"),
        }
    }

    /// BLIP-2: the projected query tokens of encoded images, `[batch,
    /// num_query_tokens, text_hidden]`, what the language model reads first.
    pub fn language_model_inputs(&self, image_embeds: &Tensor) -> Result<Tensor> {
        on_pool(|| Ok(self.blip2_model()?.language_model_inputs(image_embeds)?))
    }

    /// BLIP-2: the Q-Former's output for encoded images (for parity tests).
    pub fn query_output(&self, image_embeds: &Tensor) -> Result<Tensor> {
        on_pool(|| Ok(self.blip2_model()?.query_output(image_embeds)?))
    }

    /// Captions a batch of images together. Per image, in order, the
    /// requested number of captions, best first. Image i draws its random
    /// numbers (when sampling) from stream i.
    pub fn caption(
        &self,
        images: &[image::RgbImage],
        request: &CaptionRequest,
    ) -> Result<Vec<Vec<Caption>>> {
        let streams: Vec<u64> = (0..images.len() as u64).collect();
        self.caption_with_streams(images, &streams, request)
    }

    /// [`Self::caption`] with each image's random stream given: a caller that
    /// splits a run into batches passes the images' positions in the whole run,
    /// so sampled captions do not depend on the batch size.
    pub fn caption_with_streams(
        &self,
        images: &[image::RgbImage],
        streams: &[u64],
        request: &CaptionRequest,
    ) -> Result<Vec<Vec<Caption>>> {
        if !self.captions() {
            self.captioning_model()?;
        }
        if images.is_empty() {
            return Ok(vec![]);
        }
        let pixel_values = self.pixel_values(images)?;
        let image_embeds = self.image_embeds(&pixel_values)?;
        self.caption_embeds(&image_embeds, streams, request)
    }

    /// Generates from already encoded images, `streams` as in
    /// [`Self::caption_with_streams`].
    pub fn caption_embeds(
        &self,
        image_embeds: &Tensor,
        streams: &[u64],
        request: &CaptionRequest,
    ) -> Result<Vec<Vec<Caption>>> {
        on_pool(|| {
            if let Model::Llava(_) = &self.model {
                let prompter = self.prompter()?;
                let prompt = match request.prompt.as_deref() {
                    // Raw text, `<image>` where the picture goes.
                    Some(raw) => prompter.ids(raw)?,
                    None => prompter.question_ids(&self.instruction)?,
                };
                return prompter.generate(image_embeds, &prompt, streams, &request.generation);
            }
            if let Model::Blip2(model) = &self.model {
                return blip2::generate_continuations(
                    model,
                    &self.codec,
                    &model.language_model_inputs(image_embeds)?,
                    request.prompt.as_deref(),
                    streams,
                    &request.generation,
                );
            }
            let model = self.captioning_model()?;
            let batch = image_embeds.dim(0)?;
            let prompt = self.prompt_ids(request.prompt.as_deref())?;
            let state = model.decoder_state(image_embeds)?;
            self.decode(
                &model.text_decoder,
                state,
                vec![prompt; batch],
                streams,
                &request.generation,
            )
        })
    }

    /// Answers every question about every image. Each image is encoded once;
    /// each question is read against all the images together. Per image, in
    /// order, one [`Answer`] per question. Image i answering question j draws
    /// from stream `streams[i]` mixed with j (golden-ratio multiple), so each
    /// (image, question) pair has its own stream whatever else is asked.
    pub fn answer_with_streams(
        &self,
        images: &[image::RgbImage],
        questions: &[String],
        streams: &[u64],
        generation: &GenerationConfig,
    ) -> Result<Vec<Vec<Answer>>> {
        if !self.answers_questions() {
            self.vqa_model()?;
        }
        if images.is_empty() {
            return Ok(vec![]);
        }
        let pixel_values = self.pixel_values(images)?;
        let image_embeds = self.image_embeds(&pixel_values)?;
        self.answer_embeds(&image_embeds, questions, streams, generation)
    }

    /// [`Self::answer_with_streams`] from already encoded images.
    pub fn answer_embeds(
        &self,
        image_embeds: &Tensor,
        questions: &[String],
        streams: &[u64],
        generation: &GenerationConfig,
    ) -> Result<Vec<Vec<Answer>>> {
        on_pool(|| {
            let batch = image_embeds.dim(0)?;
            anyhow::ensure!(streams.len() == batch, "one random stream per image");
            let mut per_image: Vec<Vec<Answer>> = vec![Vec::with_capacity(questions.len()); batch];
            if let Model::Llava(_) = &self.model {
                let prompter = self.prompter()?;
                for (j, question) in questions.iter().enumerate() {
                    let prompt = prompter.question_ids(question)?;
                    let answers = prompter.generate(
                        image_embeds,
                        &prompt,
                        &question_streams(streams, j),
                        generation,
                    )?;
                    push_answers(&mut per_image, question, answers);
                }
                return Ok(per_image);
            }
            if let Model::Blip2(model) = &self.model {
                // The images are encoded once for all the questions.
                let queries = model.language_model_inputs(image_embeds)?;
                for (j, question) in questions.iter().enumerate() {
                    anyhow::ensure!(!question.trim().is_empty(), "the question is empty");
                    let prompt = blip2::fill_template(&self.question_template, question);
                    let answers = blip2::generate_continuations(
                        model,
                        &self.codec,
                        &queries,
                        Some(&prompt),
                        &question_streams(streams, j),
                        generation,
                    )?;
                    push_answers(&mut per_image, question, answers);
                }
                return Ok(per_image);
            }
            let model = self.vqa_model()?;
            for (j, question) in questions.iter().enumerate() {
                let question_embeds = self.question_embeds(image_embeds, question)?;
                let bos = model.config.text_config.bos_token_id;
                let answers = self.decode(
                    &model.text_decoder,
                    model.decoder_state(&question_embeds)?,
                    vec![vec![bos]; batch],
                    &question_streams(streams, j),
                    generation,
                )?;
                push_answers(&mut per_image, question, answers);
            }
            Ok(per_image)
        })
    }

    /// The question as the processor tokenizes it (`[CLS] question [SEP]`), checked.
    pub fn question_ids(&self, question: &str) -> Result<Vec<u32>> {
        let model = self.vqa_model()?;
        anyhow::ensure!(!question.trim().is_empty(), "the question is empty");
        let ids = self.codec.encode_with_special_tokens(question)?;
        anyhow::ensure!(
            ids.len() > 2,
            "the question {question:?} tokenizes to nothing"
        );
        let limit = model.text_encoder.max_position_embeddings();
        anyhow::ensure!(
            ids.len() <= limit,
            "the question is {} tokens long; this model reads at most {limit}",
            ids.len()
        );
        Ok(ids)
    }

    /// `[batch, seq, hidden]`: `question` read against each image of `image_embeds`.
    pub fn question_embeds(&self, image_embeds: &Tensor, question: &str) -> Result<Tensor> {
        on_pool(|| {
            let model = self.vqa_model()?;
            let ids = self.question_ids(question)?;
            let batch = image_embeds.dim(0)?;
            let input_ids = Tensor::new(vec![ids; batch], &self.device)?;
            Ok(model.question_embeds(&input_ids, image_embeds)?)
        })
    }

    /// Runs the shared decoding engine over a BLIP text decoder.
    fn decode(
        &self,
        text_decoder: &TextDecoder,
        state: DecoderState,
        prompts: Vec<Vec<u32>>,
        streams: &[u64],
        generation: &GenerationConfig,
    ) -> Result<Vec<Vec<Caption>>> {
        anyhow::ensure!(
            streams.len() == prompts.len(),
            "one random stream per image"
        );
        let limits = Limits {
            max_positions: text_decoder.max_position_embeddings(),
            eos_token_ids: vec![self.config()?.text_config.sep_token_id],
        };
        let mut decoder = BlipCaptionDecoder {
            text_decoder,
            state,
            device: self.device.clone(),
        };
        let hypotheses = generate::generate(&mut decoder, &prompts, streams, &limits, generation)?;
        captions_of(&self.codec, hypotheses, Text::Whole)
    }

    /// The decoder's starting tokens. Without a prompt: `[DEC]` alone. With one,
    /// transformers tokenizes it as `[CLS] prompt [SEP]`, swaps the `[CLS]` for
    /// `[DEC]` and drops the `[SEP]` (`BlipForConditionalGeneration.generate`).
    /// For BLIP-2, the ids after the query tokens: `</s>` and the prompt.
    pub fn prompt_ids(&self, prompt: Option<&str>) -> Result<Vec<u32>> {
        if let Model::Blip2(model) = &self.model {
            return blip2::prompt_ids(model, &self.codec, prompt);
        }
        let bos = self.config()?.text_config.bos_token_id;
        let Some(prompt) = prompt else {
            return Ok(vec![bos]);
        };
        let mut ids = self.codec.encode_with_special_tokens(prompt)?;
        anyhow::ensure!(ids.len() >= 2, "the prompt {prompt:?} tokenizes to nothing");
        ids[0] = bos;
        ids.pop();
        Ok(ids)
    }

    /// Logits for the token after `prompt`, `[batch, vocab]`, in the model's
    /// dtype (for parity tests). For a VQA model, `states` are question
    /// embeddings and `prompt` must be `None` (answers start from `[DEC]`).
    pub fn first_step_logits(&self, states: &Tensor, prompt: Option<&str>) -> Result<Tensor> {
        on_pool(|| {
            if let Model::Blip2(model) = &self.model {
                // `states` are image embeddings: the queries come from them.
                let ids = blip2::prompt_ids(model, &self.codec, prompt)?;
                let batch = states.dim(0)?;
                let lm = &model.language_model;
                let embeds = lm.embed(&Tensor::new(vec![ids; batch], &self.device)?)?;
                let queries = model.language_model_inputs(states)?;
                let inputs_embeds = Tensor::cat(&[&queries, &embeds], 1)?;
                return Ok(lm.forward_embeds(&inputs_embeds, &mut lm.new_cache())?);
            }
            let prompt = self.prompt_ids(prompt)?;
            let batch = states.dim(0)?;
            let (text_decoder, mut state) = match &self.model {
                Model::Caption(m) => (&m.text_decoder, m.decoder_state(states)?),
                Model::Vqa(m) => (&m.text_decoder, m.decoder_state(states)?),
                Model::Blip2(_) => unreachable!("handled above"),
                Model::Llava(_) => anyhow::bail!("LLaVA's logits come from its prompter"),
            };
            let input_ids = Tensor::new(vec![prompt; batch], &self.device)?;
            Ok(text_decoder.forward(&input_ids, &mut state)?)
        })
    }
}

/// Which text of a generated sequence a [`Caption`] shows.
pub(crate) enum Text {
    /// All of it, prompt included, as BLIP's `decode(ids)` prints it.
    Whole,
    /// The tokens after the prompt's first `n`, decoded and stripped, as
    /// language-model captioners print `batch_decode(new_ids)`.
    After(usize),
}

/// Per row, the captions of generated hypotheses.
pub(crate) fn captions_of(
    codec: &TextCodec,
    hypotheses: Vec<Vec<generate::Hypothesis>>,
    text: Text,
) -> Result<Vec<Vec<Caption>>> {
    let caption = |h: generate::Hypothesis| -> Result<Caption> {
        let text = match text {
            Text::Whole => codec.decode(&h.ids)?,
            Text::After(n) => codec.decode(&h.ids[n..])?.trim().to_string(),
        };
        Ok(Caption {
            text,
            ids: h.ids,
            score: h.score,
        })
    };
    hypotheses
        .into_iter()
        .map(|per_row| per_row.into_iter().map(caption).collect())
        .collect()
}

/// Question j's random stream for each image: the image's stream mixed with
/// j (a golden-ratio multiple), so each (image, question) pair has its own
/// stream whatever else is asked.
fn question_streams(streams: &[u64], j: usize) -> Vec<u64> {
    streams
        .iter()
        .map(|&s| s ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect()
}

/// The family config.json's `architectures` name, if this version runs it.
fn family_of(config_json: &serde_json::Value) -> Option<Family> {
    let architectures: Vec<String> = config_json
        .get("architectures")
        .and_then(|a| serde_json::from_value(a.clone()).ok())
        .unwrap_or_default();
    Family::from_architectures(&architectures)
}

/// config.json's `architectures`, for a message.
fn architectures_of(config_json: &serde_json::Value) -> String {
    let architectures: Vec<String> = config_json
        .get("architectures")
        .and_then(|a| serde_json::from_value(a.clone()).ok())
        .unwrap_or_default();
    if architectures.is_empty() {
        "model of unknown architecture".to_string()
    } else {
        format!("{} model", architectures.join(", "))
    }
}

/// The dtype to run in: `--dtype`, else f32 on the CPU (candle's fast path
/// there) and the checkpoint's own dtype on a GPU.
fn model_dtype(runtime: &RuntimeOptions, config_json: &serde_json::Value) -> DType {
    runtime.dtype.unwrap_or_else(|| match runtime.device {
        Device::Cpu => DType::F32,
        _ => weights::checkpoint_dtype(config_json).unwrap_or(DType::F32),
    })
}

/// A model's config.json, read by its family.
enum ParsedConfig {
    Blip(BlipConfig),
    Blip2(Blip2Config),
    Llava(LlavaConfig),
}

impl ParsedConfig {
    /// Every part of the model holds its linear layers the same way.
    fn set_linear_options(&mut self, options: LinearOptions) {
        match self {
            Self::Blip(config) => {
                config.vision_config.linear = options.clone();
                config.text_config.linear = options;
            }
            Self::Blip2(config) => {
                config.vision_config.linear = options.clone();
                config.qformer_config.linear = options.clone();
                config.text_config.linear = options;
            }
            Self::Llava(config) => {
                config.vision_config.linear = options.clone();
                config.text_config.linear = options;
            }
        }
    }

    /// The square input size of the vision encoder.
    fn image_size(&self) -> usize {
        match self {
            Self::Blip(config) => config.vision_config.image_size,
            Self::Blip2(config) => config.vision_config.image_size,
            Self::Llava(config) => config.vision_config.image_size,
        }
    }
}

/// The BLIP text decoder as seen by the generation loop.
struct BlipCaptionDecoder<'a> {
    text_decoder: &'a TextDecoder,
    state: DecoderState,
    device: Device,
}

impl Decoder for BlipCaptionDecoder<'_> {
    fn step(&mut self, input_ids: &Tensor) -> Result<Tensor> {
        let logits = self.text_decoder.forward(input_ids, &mut self.state)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        Ok(self.state.select_rows(rows)?)
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

fn read(path: &Path) -> Result<String> {
    crate::load::regular_file::read_text(path)
        .with_context(|| format!("reading {}", path.display()))
}

/// The image processor settings: `preprocessor_config.json` as it is, or the
/// `image_processor` object inside transformers 5's `processor_config.json`.
/// The weight cache for this load, where the runtime asks for one and
/// something would be saved: safetensors weights on the CPU, packed for our
/// kernels (where it has them) or quantized.
fn open_pack_cache(
    files: &ModelFiles,
    runtime: &RuntimeOptions,
    dtype: DType,
    config_text: &str,
) -> Result<Option<Arc<WeightCache>>> {
    let (Some(dir), crate::resolve::hub::WeightFiles::Safetensors(weights)) =
        (&runtime.pack_cache, &files.weights)
    else {
        return Ok(None);
    };
    if !runtime.device.is_cpu() {
        return Ok(None);
    }
    let Some(settings) = packing_settings(dtype, runtime.quantization) else {
        return Ok(None);
    };
    let label = match &files.source {
        ModelSource::Hub(model) => model.repo.clone(),
        ModelSource::Folder(dir) => std::fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.clone())
            .display()
            .to_string(),
    };
    let source = weight_cache::Source {
        label: &label,
        weights,
        config_json: config_text,
        settings: &settings,
    };
    let cache = WeightCache::open(dir, &source)?.with_size_limit(runtime.pack_cache_limit);
    Ok(Some(Arc::new(cache)))
}

/// Saves what the load packed into the weight cache; what it did, with a
/// note for the user where there is something to say.
fn finish_pack_cache(
    pack_cache: Option<&WeightCache>,
    notes: &mut Vec<String>,
) -> Option<weight_cache::Outcome> {
    match pack_cache.map(WeightCache::finish)? {
        Ok(outcome) => {
            notes.extend(pack_cache_note(&outcome));
            Some(outcome)
        }
        Err(err) => {
            notes.push(format!("could not save the weight cache: {err:#}"));
            None
        }
    }
}

/// What a user should hear about the weight cache after a load: that it
/// was written (once per model and setting).
fn pack_cache_note(outcome: &weight_cache::Outcome) -> Option<String> {
    let weight_cache::Outcome::Written {
        path,
        bytes,
        replaced,
    } = outcome
    else {
        return None;
    };
    Some(format!(
        "saved the weights in the CPU kernels' layout to {} ({} MB){}; later runs load \
         from there in a fraction of the time (--no-weight-cache: don't)",
        path.display(),
        bytes.div_ceil(1_000_000),
        replaced
            .as_ref()
            .map(|why| format!(", replacing the file there ({why})"))
            .unwrap_or_default()
    ))
}

/// Stops before loading a model that would not fit in the memory this
/// machine has available (CPU only; see [`crate::load::memory`]).
fn check_memory(files: &ModelFiles, runtime: &RuntimeOptions, dtype: DType) -> Result<()> {
    use crate::load::memory;
    if !runtime.device.is_cpu() || std::env::var_os(memory::IGNORE_ENV).is_some() {
        return Ok(());
    }
    let Some(available) = memory::available_bytes() else {
        return Ok(());
    };
    // A checkpoint whose headers cannot be read is reported, naming the
    // file, by the load that follows.
    let Ok(count) = memory::ParameterCount::of(&files.weights) else {
        return Ok(());
    };
    let format = match runtime.quantization.map(|q| q.format) {
        None => memory::LinearFormat::Dense,
        Some(QuantFormat::Q8_0) => memory::LinearFormat::Q8_0,
        Some(QuantFormat::Q4K) => memory::LinearFormat::Q4K,
    };
    memory::check_fits(&files.source.to_string(), count, dtype, format, available)
}

/// LLaVA-1.5's image processor: `CLIPImageProcessor` (or `LlavaImageProcessor`
/// without its square padding).
fn llava_preprocess_config(path: &Path) -> Result<PreprocessConfig> {
    let text = read(path)?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let section = json.get("image_processor").unwrap_or(&json);
    anyhow::ensure!(
        section.get("do_pad").and_then(serde_json::Value::as_bool) != Some(true),
        "{} pads images to a square before resizing (do_pad); not supported yet",
        path.display()
    );
    PreprocessConfig::clip_from_json_str(&section.to_string())
        .with_context(|| format!("reading {}", path.display()))
}

fn load_preprocess_config(path: &Path) -> Result<PreprocessConfig> {
    let text = read(path)?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let section = json.get("image_processor").unwrap_or(&json);
    PreprocessConfig::from_json_str(&section.to_string())
        .with_context(|| format!("reading {}", path.display()))
}

/// Fails unless `preprocess` gives every image the square `image_size`
/// the vision model was trained on.
pub(crate) fn check_image_size(
    preprocess: &PreprocessConfig,
    image_size: usize,
    path: &Path,
) -> Result<()> {
    let output = preprocess.output_size();
    anyhow::ensure!(
        output == Some((image_size as u32, image_size as u32)),
        "{} gives {} but the vision model expects {image_size}x{image_size}",
        path.display(),
        match output {
            Some((h, w)) => format!("{w}x{h} images"),
            None => "images of their own size".to_string(),
        }
    );
    Ok(())
}

/// `[batch, 3, H, W]` pixel values of decoded RGB images, in `dtype` on `device`.
pub(crate) fn pixel_values(
    images: &[image::RgbImage],
    preprocess: &PreprocessConfig,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let (h, w) = model_input_size(preprocess);
    let mut values = Vec::with_capacity(images.len() * 3 * h * w);
    for image in images {
        values.extend(crate::image::pixel_values(image, preprocess));
    }
    Ok(Tensor::from_vec(values, (images.len(), 3, h, w), device)?.to_dtype(dtype)?)
}

/// `(height, width)` of the pixel values `preprocess` makes (checked
/// against the model by [`check_image_size`] at load).
pub(crate) fn model_input_size(preprocess: &PreprocessConfig) -> (usize, usize) {
    let (h, w) = preprocess
        .output_size()
        .unwrap_or((preprocess.height, preprocess.width));
    (h as usize, w as usize)
}

/// Adds each image's answers to `question` to that image's list.
fn push_answers(per_image: &mut [Vec<Answer>], question: &str, answers: Vec<Vec<Caption>>) {
    for (image_answers, answers) in per_image.iter_mut().zip(answers) {
        image_answers.push(Answer {
            question: question.to_string(),
            answers,
        });
    }
}

/// Runs `work` on a worker of rayon's pool (directly when already on one).
/// Every matrix product is split over the pool. Split from a thread outside
/// it, the caller sleeps until the pool is done and must be woken again: two
/// more context switches for each of the ~100 products of a BLIP-base
/// decoding step. From a worker, the caller takes a share of the split
/// instead. BLIP-base, 20 greedy tokens from encoded images at batch 1
/// (stages bench, Zen 4, alternating runs): 3-10% faster, beam 3 2-17%.
pub(crate) fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

#[cfg(test)]
mod tests {
    use super::on_pool;

    #[test]
    fn work_runs_on_a_pool_worker_from_outside_and_inside() {
        assert_eq!(rayon::current_thread_index(), None);
        let outer = on_pool(|| {
            let worker = rayon::current_thread_index();
            // Nested: runs right there, on the same worker.
            let inner = on_pool(rayon::current_thread_index);
            assert_eq!(inner, worker);
            worker
        });
        assert!(outer.is_some(), "the work ran outside the pool");
    }
}
