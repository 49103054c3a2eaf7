//! The batch engine: inputs → decoded images (the next batch decoded on
//! another thread while the model works on this one) → captions or
//! answers → one [`Record`] per result, sidecars written on the way. The
//! caller decides where records go and what people see.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};

use anyhow::{Context, Result};

use super::inputs::{self, Input};
use crate::captioner::embed::{Embedder, ScoredCaption, TextSet};
use crate::captioner::{Answer, Caption, CaptionRequest, Captioner};
use crate::generate::GenerationConfig;
use crate::image::{ImageError, LoadOptions, PreprocessConfig};
use crate::output::sidecar::{Existing, SidecarOptions};
use crate::output::{CaptionOutput, Outcome, Record};

/// What to do with each image, and the models that do it.
pub enum Work<'a> {
    /// Caption it.
    Caption {
        captioner: &'a Captioner,
        request: CaptionRequest,
    },
    /// Answer each question about it (the image is encoded once).
    Ask {
        captioner: &'a Captioner,
        questions: Vec<String>,
        generation: GenerationConfig,
    },
    /// Score it against labels encoded once for the run (zero-shot
    /// classification); keep the best `top`, or all.
    Labels {
        embedder: &'a Embedder,
        labels: &'a TextSet,
        top: Option<usize>,
    },
    /// Its L2-normalised embedding.
    Embed { embedder: &'a Embedder },
    /// Caption it with several candidates (`request` asks for them) and
    /// keep the `keep` that `embedder` finds closest to the image, best first.
    Rerank {
        captioner: &'a Captioner,
        request: CaptionRequest,
        embedder: &'a Embedder,
        keep: usize,
    },
}

impl Work<'_> {
    /// How each model wants its images, in the order [`Self::run`] takes them.
    fn preprocess_configs(&self) -> Vec<PreprocessConfig> {
        match self {
            Self::Caption { captioner, .. } | Self::Ask { captioner, .. } => {
                vec![captioner.preprocess_config().clone()]
            }
            Self::Labels { embedder, .. } | Self::Embed { embedder } => {
                vec![embedder.preprocess_config().clone()]
            }
            Self::Rerank {
                captioner,
                embedder,
                ..
            } => vec![
                captioner.preprocess_config().clone(),
                embedder.preprocess_config().clone(),
            ],
        }
    }

    /// Each image's outputs, in order. `images[m]` are the images prepared
    /// for model m of [`Self::preprocess_configs`].
    fn run(&self, images: &[Vec<image::RgbImage>], streams: &[u64]) -> Result<Vec<Vec<Output>>> {
        Ok(match self {
            Self::Ask {
                captioner,
                questions,
                generation,
            } => answer_outputs(
                captioner.answer_with_streams(&images[0], questions, streams, generation)?,
            ),
            Self::Caption { captioner, request } => {
                caption_outputs(captioner.caption_with_streams(&images[0], streams, request)?)
            }
            Self::Labels {
                embedder,
                labels,
                top,
            } => {
                if images[0].is_empty() {
                    return Ok(vec![]);
                }
                let embeds = embedder.embed_images(&images[0])?;
                embedder
                    .score_labels(&embeds, labels)?
                    .into_iter()
                    .map(|mut scores| {
                        scores.truncate(top.unwrap_or(usize::MAX));
                        vec![Output::Labels(scores)]
                    })
                    .collect()
            }
            Self::Embed { embedder } => {
                if images[0].is_empty() {
                    return Ok(vec![]);
                }
                embedder
                    .embed_images(&images[0])?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|embedding| vec![Output::Embedding(embedding)])
                    .collect()
            }
            Self::Rerank {
                captioner,
                request,
                embedder,
                keep,
            } => {
                let candidates = captioner.caption_with_streams(&images[0], streams, request)?;
                if candidates.is_empty() {
                    return Ok(vec![]);
                }
                let image_embeds = embedder.embed_images(&images[1])?;
                let reranked = embedder.rank_captions(&image_embeds, candidates)?;
                reranked
                    .into_iter()
                    .map(|ranked| ranked_by_clip(ranked, *keep))
                    .collect()
            }
        })
    }

    /// See [`Captioner::check_weights`].
    fn check_weights(&self) -> Result<()> {
        // One process-wide check covers every model of the run.
        crate::load::watched_map::check()
    }
}

/// What one image gave, before it becomes a [`Record`].
enum Output {
    Text(CaptionOutput),
    Labels(Vec<crate::captioner::embed::LabelScore>),
    Embedding(Vec<f32>),
}

impl Output {
    fn text(&self) -> Option<&str> {
        match self {
            Self::Text(output) => Some(&output.text),
            Self::Labels(_) | Self::Embedding(_) => None,
        }
    }

    fn into_outcome(self) -> Outcome {
        match self {
            Self::Text(output) => Outcome::Caption(output),
            Self::Labels(labels) => Outcome::Labels(labels),
            Self::Embedding(embedding) => Outcome::Embedding(embedding),
        }
    }
}

/// A run over many images.
pub struct Batches<'a> {
    pub work: Work<'a>,
    /// Images decoded and run together.
    pub batch_size: usize,
    pub load_options: LoadOptions,
    /// Threads decoding the next batch; 0: [`default_decode_threads`].
    pub decode_threads: usize,
    /// Cut repetition loops out of captions and answers
    /// ([`crate::output::repeats`]), sidecars included.
    pub trim_repeats: bool,
    /// Write each caption beside its image as well.
    pub sidecar: Option<SidecarOptions>,
    /// Set (by a Ctrl-C handler) to stop after the batch in hand.
    pub stop: Option<&'a AtomicBool>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every input was processed; `failed` of them gave an error record.
    Finished { failed: usize },
    /// Stopped by [`Batches::stop`] after `done` images; every record
    /// given out is complete.
    Stopped { done: usize, failed: usize },
}

/// What the engine tells its caller as it goes.
pub trait Progress {
    /// A line for people: an image that failed, and why.
    fn note(&self, line: &str);
    /// One more image done (captioned or failed).
    fn advance(&self);
}

/// Progress nobody watches.
pub struct Silent;

impl Progress for Silent {
    fn note(&self, _line: &str) {}
    fn advance(&self) {}
}

impl Batches<'_> {
    /// Runs over `inputs`, handing each result to `record` in input order
    /// (several records for an image with several captions or questions).
    /// Fails only where `record` fails or the model itself errs.
    pub fn run(
        &self,
        inputs: &[Input],
        progress: &dyn Progress,
        mut record: impl FnMut(Record) -> Result<()>,
    ) -> Result<Ended> {
        let batch_size = self.batch_size.max(1);
        let mut done = 0;
        let mut failed = 0;
        let decoded = decode_ahead(
            inputs.to_vec(),
            batch_size,
            match self.decode_threads {
                0 => default_decode_threads(),
                n => n,
            },
            self.load_options,
            self.work.preprocess_configs(),
        )?;
        let mut chunks = inputs.chunks(batch_size);
        loop {
            let images = match self.next_batch(&decoded) {
                Next::Batch(images) => images,
                Next::Stopped => return Ok(Ended::Stopped { done, failed }),
                Next::End => {
                    anyhow::ensure!(
                        chunks.next().is_none(),
                        "the image decoder stopped before the last image"
                    );
                    return Ok(Ended::Finished { failed });
                }
            };
            let chunk = chunks
                .next()
                .expect("one chunk of inputs per decoded batch");
            done += chunk.len();
            failed += self.run_batch(chunk.iter().zip(images).collect(), progress, &mut record)?;
        }
    }

    /// The next decoded batch, waited for while answering [`Self::stop`]
    /// at once: a download that hangs must not hold a Ctrl-C for its
    /// minute-long timeout (the decoder is left to finish or time out
    /// alone; nothing it still brings is used).
    fn next_batch(&self, decoded: &Receiver<DecodedBatch>) -> Next {
        loop {
            if self.stop.is_some_and(|stop| stop.load(Ordering::SeqCst)) {
                return Next::Stopped;
            }
            match decoded.recv_timeout(STOP_POLL) {
                Ok(images) => return Next::Batch(images),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Next::End,
            }
        }
    }

    /// One batch of decoded inputs; returns how many failed.
    fn run_batch(
        &self,
        decoded: Vec<(&Input, Result<Vec<image::RgbImage>, ImageError>)>,
        progress: &dyn Progress,
        record: &mut impl FnMut(Record) -> Result<()>,
    ) -> Result<usize> {
        let mut failed = 0;
        let mut loaded: Vec<Vec<image::RgbImage>> = vec![];
        let mut streams = Vec::with_capacity(decoded.len());
        let mut inputs = Vec::with_capacity(decoded.len());
        for (input, image) in decoded {
            match image {
                Ok(prepared) => {
                    loaded.resize_with(prepared.len(), Vec::new);
                    for (per_model, image) in loaded.iter_mut().zip(prepared) {
                        per_model.push(image);
                    }
                    // Each image's random stream is named by its path, so a
                    // sampled caption is the same whatever else is in the run
                    // (batch size, shards, skipped images).
                    streams.push(inputs::fnv1a64(input.shown.as_bytes()));
                    inputs.push((input, None));
                }
                Err(err) => {
                    progress.note(&format!("caption: {}: {err}", input.shown));
                    failed += 1;
                    inputs.push((input, Some(err.to_string())));
                }
            }
        }
        if loaded.is_empty() {
            loaded = vec![vec![]; self.work.preprocess_configs().len()];
        }
        let mut results = self.work.run(&loaded, &streams)?.into_iter();
        // Weights changed under the model (a cache file truncated or
        // rewritten by another program) make this batch's results
        // untrustworthy: none of them is given out.
        self.work.check_weights()?;
        for (input, error) in inputs {
            let path = input.shown.clone();
            let path_bytes = crate::output::path_bytes(&input.path);
            let sample = input
                .member
                .as_ref()
                .map(|member| super::webdataset::sample(&input.path, member));
            let outputs = match error {
                Some(reason) => Err(reason),
                None => {
                    let mut outputs = results.next().expect("results for every loaded image");
                    if self.trim_repeats {
                        for output in &mut outputs {
                            if let Output::Text(caption) = output {
                                caption.text = crate::output::repeats::trim_repeats(&caption.text)
                                    .into_owned();
                            }
                        }
                    }
                    match self.write_sidecar(input, &outputs) {
                        Err(err) => {
                            progress.note(&format!("caption: {path}: {err:#}"));
                            failed += 1;
                            Err(format!("{err:#}"))
                        }
                        Ok(()) => Ok(outputs),
                    }
                }
            };
            match outputs {
                Err(reason) => record(Record {
                    path,
                    path_bytes,
                    sample,
                    outcome: Outcome::Error(reason),
                })?,
                Ok(outputs) => {
                    for output in outputs {
                        record(Record {
                            path: path.clone(),
                            path_bytes: path_bytes.clone(),
                            sample: sample.clone(),
                            outcome: output.into_outcome(),
                        })?;
                    }
                }
            }
            progress.advance();
        }
        Ok(failed)
    }

    /// The image's first caption into its sidecar, when asked for.
    fn write_sidecar(&self, input: &Input, outputs: &[Output]) -> Result<()> {
        let Some(sidecar) = &self.sidecar else {
            return Ok(());
        };
        let Some(text) = outputs.first().and_then(Output::text) else {
            anyhow::bail!("there is no caption to write into a sidecar");
        };
        anyhow::ensure!(
            !inputs::is_url(&input.shown),
            "a downloaded image has no folder for a sidecar"
        );
        sidecar.write(&input.path, text)?;
        Ok(())
    }
}

/// One batch's images, as the decoder hands them over: each image prepared
/// for each model of the run.
type DecodedBatch = Vec<Result<Vec<image::RgbImage>, ImageError>>;

enum Next {
    Batch(DecodedBatch),
    Stopped,
    End,
}

/// How often a run waiting for images looks at its stop flag.
const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Decodes `inputs` a batch at a time on threads of their own, one batch
/// ahead of the model (decoding overlaps its work; one ahead hides it), the
/// images of a batch spread over `threads` decoders. Each image is resized
/// for the model as soon as it is decoded, so a decoder holds one full-size
/// image at a time, whatever the batch size (24 photos of 177 KB took 1.0 GB
/// at batch 1 and 4.9 GB at batch 8 when a batch was resized after all of
/// it was decoded). The thread is not joined: a run that stops does not
/// wait for a hung download.
fn decode_ahead(
    inputs: Vec<Input>,
    batch_size: usize,
    threads: usize,
    options: LoadOptions,
    preprocess: Vec<PreprocessConfig>,
) -> Result<Receiver<DecodedBatch>> {
    let (ready, decoded) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("caption-decode".into())
        .spawn(move || {
            for chunk in inputs.chunks(batch_size) {
                let images = decode_batch(chunk, threads, |input| {
                    load_input(input, &options).map(|image| prepared_for(image, &preprocess))
                });
                if ready.send(images).is_err() {
                    break; // the run stopped
                }
            }
        })
        .context("starting the image decoder")?;
    Ok(decoded)
}

/// `decode` of every input of `chunk`, in order, on up to `threads`
/// threads that each take the next image not yet taken. A decoder that
/// panics (a bug in a codec, on one file) fails that image alone.
fn decode_batch<F>(chunk: &[Input], threads: usize, decode: F) -> DecodedBatch
where
    F: Fn(&Input) -> Result<Vec<image::RgbImage>, ImageError> + Sync,
{
    let guarded = |input: &Input| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(input))).unwrap_or_else(
            |_| {
                Err(ImageError::Unsupported(
                    "the image decoder failed on this file".into(),
                ))
            },
        )
    };
    let threads = threads.clamp(1, chunk.len().max(1));
    if threads == 1 {
        return chunk.iter().map(guarded).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut slots: Vec<Option<Result<Vec<image::RgbImage>, ImageError>>> =
        (0..chunk.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(input) = chunk.get(i) else {
                            return done;
                        };
                        done.push((i, guarded(input)));
                    }
                })
            })
            .collect();
        for worker in workers {
            for (i, result) in worker.join().unwrap_or_default() {
                slots[i] = Some(result);
            }
        }
    });
    slots
        .into_iter()
        .map(|slot| {
            slot.unwrap_or_else(|| {
                Err(ImageError::Unsupported(
                    "the image decoder failed on this file".into(),
                ))
            })
        })
        .collect()
}

/// Decoder threads for `--decode-threads 0` (automatic): half the machine's
/// threads, at most 8, at least 1. The model's kernels use them all during
/// a batch; decoding one batch ahead needs only as many as keep up with
/// the model (measured in bench/RESULTS.md), and each holds a full-size
/// image.
pub fn default_decode_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).clamp(1, 8)
}

/// `image` prepared for each model: resized for the last in place, for the
/// others from a copy.
fn prepared_for(image: image::RgbImage, configs: &[PreprocessConfig]) -> Vec<image::RgbImage> {
    let Some((last, others)) = configs.split_last() else {
        return vec![];
    };
    let mut prepared: Vec<_> = others
        .iter()
        .map(|config| crate::image::resized_for_model(image.clone(), config))
        .collect();
    prepared.push(crate::image::resized_for_model(image, last));
    prepared
}

/// The pixels of one input: a file, or an address to download.
pub fn load_input(input: &Input, options: &LoadOptions) -> Result<image::RgbImage, ImageError> {
    if let Some(member) = &input.member {
        let bytes = super::webdataset::read_member(&input.path, member).map_err(ImageError::Io)?;
        return crate::image::decode_rgb8(&bytes, options);
    }
    // By its path, not as shown: a name that is not UTF-8 is shown lossily.
    load_image(input.path.as_os_str(), options)
}

/// The pixels of one image named by a path (any bytes) or an address.
pub fn load_image(
    name: &std::ffi::OsStr,
    options: &LoadOptions,
) -> Result<image::RgbImage, ImageError> {
    match name.to_str() {
        Some(url) if inputs::is_url(url) => super::fetch::load_url(url, options),
        _ => crate::image::load_rgb8(std::path::Path::new(name), options),
    }
}

/// Drops the inputs that already have a sidecar when resuming (`--skip-existing`);
/// returns the rest and how many were dropped.
pub fn skip_captioned(inputs: Vec<Input>, sidecar: Option<&SidecarOptions>) -> (Vec<Input>, usize) {
    let Some(sidecar) = sidecar.filter(|s| s.existing == Existing::Skip) else {
        return (inputs, 0);
    };
    let before = inputs.len();
    let kept: Vec<Input> = inputs
        .into_iter()
        .filter(|input| !sidecar.path_for(&input.path).exists())
        .collect();
    let skipped = before - kept.len();
    (kept, skipped)
}

/// Each image's captions as output records, ranked when there are several.
fn caption_outputs(per_image: Vec<Vec<Caption>>) -> Vec<Vec<Output>> {
    per_image
        .into_iter()
        .map(|captions| ranked(captions, None))
        .collect()
}

/// Each image's answers, question by question, as output records.
fn answer_outputs(per_image: Vec<Vec<Answer>>) -> Vec<Vec<Output>> {
    per_image
        .into_iter()
        .map(|answers| {
            answers
                .into_iter()
                .flat_map(|a| ranked(a.answers, Some(a.question)))
                .collect()
        })
        .collect()
}

fn ranked(captions: Vec<Caption>, question: Option<String>) -> Vec<Output> {
    let several = captions.len() > 1;
    captions
        .into_iter()
        .enumerate()
        .map(|(rank, caption)| {
            Output::Text(CaptionOutput {
                text: caption.text,
                question: question.clone(),
                rank: several.then_some(rank + 1),
                score: caption.score,
                clip_score: None,
            })
        })
        .collect()
}

/// One image's reranked candidates as outputs: the best `keep`, ranked
/// when more than one is kept.
fn ranked_by_clip(candidates: Vec<ScoredCaption>, keep: usize) -> Vec<Output> {
    let several = keep > 1;
    candidates
        .into_iter()
        .take(keep)
        .enumerate()
        .map(|(rank, scored)| {
            Output::Text(CaptionOutput {
                text: scored.caption.text,
                question: None,
                rank: several.then_some(rank + 1),
                score: scored.caption.score,
                clip_score: Some(scored.clip_score),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(n: usize) -> Vec<Input> {
        (0..n)
            .map(|i| Input {
                shown: format!("{i}.png"),
                path: format!("{i}.png").into(),
                stamp: None,
                member: None,
            })
            .collect()
    }

    /// A 1x1 image whose red value is the input's number.
    fn numbered(input: &Input) -> Result<Vec<image::RgbImage>, ImageError> {
        let n: u8 = input.shown.trim_end_matches(".png").parse().unwrap();
        Ok(vec![image::RgbImage::from_pixel(
            1,
            1,
            image::Rgb([n, 0, 0]),
        )])
    }

    fn reds(batch: &DecodedBatch) -> Vec<Option<u8>> {
        batch
            .iter()
            .map(|r| r.as_ref().ok().map(|images| images[0].get_pixel(0, 0)[0]))
            .collect()
    }

    #[test]
    fn a_batch_decoded_on_several_threads_keeps_its_order() {
        let chunk = inputs(13);
        let expected: Vec<Option<u8>> = (0..13).map(Some).collect();
        for threads in [1, 2, 4, 32] {
            let batch = decode_batch(&chunk, threads, |input| {
                // Later images finish first.
                let n: u64 = input.shown.trim_end_matches(".png").parse().unwrap();
                std::thread::sleep(std::time::Duration::from_micros(200 * (13 - n)));
                numbered(input)
            });
            assert_eq!(reds(&batch), expected, "{threads} threads");
        }
    }

    #[test]
    fn a_decoder_that_panics_fails_its_images_and_no_others() {
        let chunk = inputs(6);
        let batch = decode_batch(&chunk, 3, |input| {
            if input.shown == "4.png" {
                panic!("a decoder bug");
            }
            numbered(input)
        });
        let expected: Vec<Option<u8>> = (0..6).map(|i| (i != 4).then_some(i)).collect();
        assert_eq!(reds(&batch), expected);
        let err = batch[4].as_ref().unwrap_err().to_string();
        assert!(err.contains("decoder failed"), "{err}");
    }
}
