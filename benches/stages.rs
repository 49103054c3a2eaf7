//! Where a caption's time goes, stage by stage, on a model folder:
//!
//!     cargo bench --bench stages -- bench/models/blip-base [ROUNDS [ONLY]] \
//!         [--dtype bf16] [--quantize q8_0|q4k] [--weight-cache DIR]
//!
//! Times (median of ROUNDS, default 5) image preprocessing, the vision
//! encoder at batch 1 and 8, and generation of exactly 20 new tokens from
//! encoded images (greedy at batch 1 and 8, beam 3). A working tool for
//! profiling, not a comparison: bench/compare.sh measures us against
//! transformers. No criterion: it would add minutes to every CI build for a
//! harness we need only the clock of.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::DType;
use caption::captioner::{QuantFormat, Quantization};
use caption::generate::GenerationConfig;
use caption::resolve::hub::{self, ModelSource};
use caption::{CaptionRequest, Captioner, RuntimeOptions};

fn main() -> anyhow::Result<()> {
    // Positional: MODEL_DIR [ROUNDS [ONLY]]; options: --dtype f32|bf16|f16,
    // --quantize q8_0|q4k, --weight-cache DIR. (cargo bench adds its own --bench.)
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut runtime = RuntimeOptions::default();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // The values the CLI's flags take, meaning what they mean there.
            "--dtype" => {
                runtime.dtype = match args.next().unwrap_or_default().as_str() {
                    "f32" => Some(DType::F32),
                    "bf16" => Some(DType::BF16),
                    "f16" => Some(DType::F16),
                    "auto" => None,
                    other => anyhow::bail!("unknown --dtype {other}: f32, bf16, f16 or auto"),
                };
            }
            "--quantize" => {
                let value = args.next().unwrap_or_default();
                let format: QuantFormat = value.parse().map_err(anyhow::Error::msg)?;
                runtime.quantization = Some(Quantization::of(format));
            }
            // Where the CLI keeps packed weights: the first run writes the
            // cache, later runs time the layers as mapped from it.
            "--weight-cache" => {
                runtime.pack_cache = args.next().map(PathBuf::from);
            }
            other if other.starts_with("--") => {}
            _ => positional.push(arg),
        }
    }
    let args = positional;
    let Some(model_dir) = args.first() else {
        eprintln!("usage: cargo bench --bench stages -- MODEL_DIR [ROUNDS [ONLY]] [--dtype D] [--quantize Q] [--weight-cache DIR]");
        return Ok(());
    };
    let rounds: usize = args.get(1).map_or(Ok(5), |r| r.parse())?;
    // Optional third argument: run only the stages whose name contains it
    // (for profiling one stage under perf).
    let only = args.get(2).cloned().unwrap_or_default();
    let report = |name: &str, rounds: usize, f: &mut dyn FnMut() -> anyhow::Result<()>| {
        if name.contains(only.as_str()) {
            report(name, rounds, f)
        } else {
            Ok(())
        }
    };
    caption::tune_allocator();
    let load_start = Instant::now();
    let files = hub::fetch(&ModelSource::Folder(PathBuf::from(model_dir)))?;
    let captioner = Captioner::load(&files, &runtime)?;
    println!(
        "load                {:>9.3} s",
        load_start.elapsed().as_secs_f64()
    );

    let image_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/images/astronaut.jpg"
    );
    let image = caption::image::load_rgb8(image_path.as_ref(), &Default::default())?;
    let one = vec![image.clone()];
    let eight = vec![image; 8];
    report("pixel values b1", rounds, &mut || {
        captioner.pixel_values(&one).map(drop)
    })?;
    let pixels1 = captioner.pixel_values(&one)?;
    let pixels8 = captioner.pixel_values(&eight)?;
    report("vision b1", rounds, &mut || {
        captioner.image_embeds(&pixels1).map(drop)
    })?;
    report("vision b8", rounds.div_ceil(2), &mut || {
        captioner.image_embeds(&pixels8).map(drop)
    })?;
    let embeds1 = captioner.image_embeds(&pixels1)?;
    // The batch of 8 is eight copies of the one image: no need to encode it again.
    let embeds8 = embeds1.repeat((8, 1, 1))?;
    let request = |beams: usize| CaptionRequest {
        prompt: None,
        generation: GenerationConfig {
            max_new_tokens: Some(20),
            num_beams: beams,
            logits: caption::generate::LogitsSettings {
                min_new_tokens: Some(20),
                ..Default::default()
            },
            ..Default::default()
        },
    };
    let greedy = request(1);
    let beam3 = request(3);
    report("20 tokens greedy b1", rounds, &mut || {
        captioner.caption_embeds(&embeds1, &[0], &greedy).map(drop)
    })?;
    report("20 tokens greedy b8", rounds.div_ceil(2), &mut || {
        captioner
            .caption_embeds(&embeds8, &[0, 1, 2, 3, 4, 5, 6, 7], &greedy)
            .map(drop)
    })?;
    report("20 tokens beam3 b1", rounds, &mut || {
        captioner.caption_embeds(&embeds1, &[0], &beam3).map(drop)
    })?;
    Ok(())
}

/// Runs `f` `rounds` times after one warm-up and prints the median.
fn report(
    name: &str,
    rounds: usize,
    f: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    f()?;
    let mut times: Vec<Duration> = (0..rounds.max(1))
        .map(|_| {
            let start = Instant::now();
            f().map(|()| start.elapsed())
        })
        .collect::<anyhow::Result<_>>()?;
    times.sort();
    println!("{name:<20}{:>9.3} s", times[times.len() / 2].as_secs_f64());
    Ok(())
}
