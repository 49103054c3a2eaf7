//! LLaVA's two costs on a model folder: time to first token (the image
//! encoded, the prompt with its 576 image features read, the first token
//! picked) and the decoding rate after it.
//!
//!     cargo bench --bench llava -- bench/models/llava-1.5-7b [--dtype bf16] \
//!         [--quantize q8_0|q4k] [--rounds 2] [--new-tokens 16]
//!
//! Prints one JSON object on stdout (bench/llava.sh puts it beside
//! transformers' figures from tools/bench_llava.py, on the same prompt,
//! image and weights). The model loads once; each round times the first
//! token from the decoded image on, then `--new-tokens` single-token steps.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor, D};
use caption::captioner::llava::LlavaDecoder;
use caption::captioner::{QuantFormat, Quantization};
use caption::generate::Decoder;
use caption::resolve::hub::{self, ModelSource};
use caption::{Captioner, RuntimeOptions};

/// The prompt both sides read: llava-1.5's format around one question.
pub const PROMPT: &str = "USER: <image>\nWhat is shown in this picture? ASSISTANT:";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut runtime = RuntimeOptions::default();
    let (mut rounds, mut new_tokens, mut model_dir) = (2usize, 16usize, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dtype" => {
                runtime.dtype = match args.next().unwrap_or_default().as_str() {
                    "f32" => Some(DType::F32),
                    "bf16" => Some(DType::BF16),
                    "f16" => Some(DType::F16),
                    other => anyhow::bail!("unknown --dtype {other}: f32, bf16 or f16"),
                };
            }
            "--quantize" => {
                let format: QuantFormat = args
                    .next()
                    .unwrap_or_default()
                    .parse()
                    .map_err(anyhow::Error::msg)?;
                runtime.quantization = Some(Quantization::of(format));
            }
            "--rounds" => rounds = args.next().unwrap_or_default().parse()?,
            "--new-tokens" => new_tokens = args.next().unwrap_or_default().parse()?,
            "--weight-cache" => runtime.pack_cache = args.next().map(PathBuf::from),
            other if other.starts_with("--") => {}
            _ => model_dir = Some(PathBuf::from(arg)),
        }
    }
    let Some(model_dir) = model_dir else {
        eprintln!("usage: cargo bench --bench llava -- MODEL_DIR [--dtype D] [--quantize Q] [--rounds R] [--new-tokens N]");
        return Ok(());
    };
    caption::tune_allocator();
    let start = Instant::now();
    let files = hub::fetch(&ModelSource::Folder(model_dir))?;
    let captioner = Captioner::load(&files, &runtime)?;
    let load_s = start.elapsed().as_secs_f64();

    let image_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/images/astronaut.jpg"
    );
    let image = caption::image::load_rgb8(image_path.as_ref(), &Default::default())?;
    let prompter = captioner.prompter()?;
    let ids = prompter.ids(PROMPT)?;
    let lm = &prompter.model.language_model;
    let (mut ttft, mut rates) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let start = Instant::now();
        let pixels = captioner.pixel_values(std::slice::from_ref(&image))?;
        let features = captioner.image_embeds(&pixels)?;
        let mut decoder =
            LlavaDecoder::new(lm, lm.new_cache(), features, prompter.image_start(&ids)?, 0);
        let input = Tensor::new(vec![ids.clone()], captioner.device())?;
        let mut next = argmax(&decoder.step(&input)?)?;
        ttft.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        for _ in 0..new_tokens {
            let input = Tensor::new(vec![vec![next]], captioner.device())?;
            next = argmax(&decoder.step(&input)?)?;
        }
        rates.push(new_tokens as f64 / start.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({
            "load_s": load_s,
            "prompt_tokens": ids.len(),
            "new_tokens": new_tokens,
            "ttft_s": ttft,
            "decode_tokens_per_s": rates,
        })
    );
    Ok(())
}

fn argmax(logits: &Tensor) -> anyhow::Result<u32> {
    Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0])
}
