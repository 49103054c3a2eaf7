//! The command line: clap structs, resolved once into a validated run, then
//! executed over the library.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::generate::{EarlyStopping, GenerationDefaults};
use crate::hub;
use crate::image::LoadOptions;
use crate::inputs::{self, CollectOptions, Input, Shard};
use crate::output::{self, CaptionOutput, Format, Outcome, Record, TextColumns};
use crate::registry::{Registry, Task};
use crate::sidecar::{Existing, SidecarOptions};
use crate::{CaptionRequest, Captioner, RuntimeOptions};

/// Caption images with BLIP, natively: the same captions as transformers, in one fast binary.
#[derive(Debug, Parser)]
#[command(name = "caption", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub caption: CaptionArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the model aliases, and whether each is already in the local cache.
    Models,
    /// Talk about one image with a BLIP-2 model: questions are read from stdin
    /// line by line, each answered with the conversation so far in the prompt.
    Chat(Box<ChatArgs>),
}

#[derive(Debug, Args)]
pub struct CaptionArgs {
    /// Image files and folders to caption; `-` reads paths from stdin, one per line.
    #[arg(value_name = "IMAGE")]
    pub images: Vec<String>,

    /// Descend into subfolders of the folders given.
    #[arg(short, long)]
    pub recursive: bool,

    /// Caption only this share of the inputs, e.g. 2/8: N jobs with 1/N..N/N split a corpus
    /// between them with no coordination (by a stable hash of each path).
    #[arg(long, value_name = "K/N")]
    pub shard: Option<Shard>,

    /// Also write each caption next to its image as <stem>.txt (written whole: temp file + rename).
    #[arg(long, help_heading = "Sidecar files")]
    pub sidecar: bool,

    /// The sidecar's extension.
    #[arg(
        long,
        default_value = "txt",
        value_name = "EXT",
        requires = "sidecar",
        help_heading = "Sidecar files"
    )]
    pub sidecar_ext: String,

    /// Skip images that already have a sidecar (resume an interrupted run).
    #[arg(
        long,
        requires = "sidecar",
        conflicts_with = "overwrite",
        help_heading = "Sidecar files"
    )]
    pub skip_existing: bool,

    /// Replace existing sidecars (without this or --skip-existing, an existing one is an error for that image).
    #[arg(long, requires = "sidecar", help_heading = "Sidecar files")]
    pub overwrite: bool,

    /// Text put before every sidecar caption (trigger words).
    #[arg(
        long,
        default_value = "",
        requires = "sidecar",
        help_heading = "Sidecar files"
    )]
    pub prefix: String,

    /// Text put after every sidecar caption.
    #[arg(
        long,
        default_value = "",
        requires = "sidecar",
        help_heading = "Sidecar files"
    )]
    pub suffix: String,

    /// Model: an alias (see `caption models`), a Hub id `owner/name[@revision]`, or a local folder
    /// [default: blip-base; with --ask, blip-vqa-base].
    #[arg(short, long, env = "CAPTION_MODEL")]
    pub model: Option<String>,

    /// Ask a question about each image (needs a VQA or BLIP-2 model); repeat to ask several.
    #[arg(long, value_name = "QUESTION")]
    pub ask: Vec<String>,

    /// Start every caption with this text, e.g. "a picture of" (BLIP prints it as part of the caption,
    /// as transformers does); BLIP-2 continues it as a raw prompt and prints only the continuation.
    #[arg(long)]
    pub prompt: Option<String>,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Images encoded and decoded together. Larger batches use the CPU better; results are identical.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,

    #[command(flatten)]
    pub runtime: RuntimeArgs,

    #[command(flatten)]
    pub decoding: DecodingArgs,

    /// Ignore EXIF orientation (transformers does): use the pixels as stored.
    #[arg(long)]
    pub no_exif_rotate: bool,

    /// Print nothing on stderr but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

/// How to pick the tokens of a caption or answer.
#[derive(Debug, Args)]
pub struct DecodingArgs {
    /// Generate at most this many new tokens [default: 20, within the model's position limit].
    #[arg(long, value_name = "N", help_heading = "Decoding")]
    pub max_tokens: Option<usize>,

    /// Generate at least this many new tokens before the caption may end.
    #[arg(long, value_name = "N", help_heading = "Decoding")]
    pub min_tokens: Option<usize>,

    /// Beam search with N beams (1: greedy) [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), help_heading = "Decoding")]
    pub beams: Option<u32>,

    /// Beam search: score = log-prob / length^P; above 0 favours longer captions [default: 1.0].
    #[arg(
        long,
        value_name = "P",
        allow_negative_numbers = true,
        help_heading = "Decoding"
    )]
    pub length_penalty: Option<f32>,

    /// Beam search stopping rule: false (transformers' heuristic), true (as soon as N captions finished), never [default: false].
    #[arg(long, value_enum, help_heading = "Decoding")]
    pub early_stopping: Option<EarlyStopping>,

    /// Print the N best captions of the beam search, best first [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), help_heading = "Decoding")]
    pub num_return: Option<u32>,

    /// Sample tokens instead of taking the most likely one.
    #[arg(long, help_heading = "Decoding")]
    pub sample: bool,

    /// Sampling temperature (below 1: closer to greedy).
    #[arg(long, value_name = "T", help_heading = "Decoding")]
    pub temperature: Option<f32>,

    /// Sample only among the K most likely tokens; 0 turns this off [default: 50].
    #[arg(long, value_name = "K", help_heading = "Decoding")]
    pub top_k: Option<usize>,

    /// Sample only among the most likely tokens whose probabilities add up to P.
    #[arg(long, value_name = "P", help_heading = "Decoding")]
    pub top_p: Option<f32>,

    /// Seed for --sample: the same seed gives the same captions, whatever the batch size.
    #[arg(long, default_value_t = 0, help_heading = "Decoding")]
    pub seed: u64,

    /// Penalise tokens already in the caption (or prompt): above 1 discourages repetition.
    #[arg(long, value_name = "P", help_heading = "Decoding")]
    pub repetition_penalty: Option<f32>,

    /// Never repeat an N-token sequence ("bald bald bald").
    #[arg(long, value_name = "N", help_heading = "Decoding")]
    pub no_repeat_ngram: Option<usize>,
}

/// Where and how the model runs.
#[derive(Debug, Args)]
pub struct RuntimeArgs {
    /// Where to run: cpu, cuda, cuda:N, or auto (a GPU if this build supports one and it is present).
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Weight precision. auto: f32 on CPU, the checkpoint's dtype on GPU.
    /// bf16 halves the memory and, on CPUs with AVX512-BF16 (AMD Zen 4+,
    /// Intel Sapphire Rapids+), is also the fastest, with near-f32 outputs.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    /// Quantize the linear layers' weights at load (CPU): q8_0 (8-bit) or
    /// q4k (4-bit k-quants). Faster and smaller, with slightly different
    /// outputs; layers whose input width is not a multiple of 256 stay as
    /// they are.
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,

    /// CPU threads for the model [default: all cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,

    /// Do not keep a copy of the weights in the CPU kernels' layout under
    /// ~/.cache/caption/packed ($XDG_CACHE_HOME/caption/packed). The first
    /// run of each model and setting writes it (about the model's size);
    /// later runs map it instead of converting the weights again, and start
    /// several times faster. Also CAPTION_NO_WEIGHT_CACHE=1.
    #[arg(long, env = "CAPTION_NO_WEIGHT_CACHE", hide_env = true,
          value_parser = clap::builder::FalseyValueParser::new())]
    pub no_weight_cache: bool,
}

/// `caption chat IMAGE`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The image to talk about.
    #[arg(value_name = "IMAGE")]
    pub image: String,

    /// A BLIP-2 model: an alias (see `caption models`), a Hub id, or a local folder.
    #[arg(short, long, env = "CAPTION_CHAT_MODEL", default_value = DEFAULT_CHAT_MODEL)]
    pub model: String,

    #[command(flatten)]
    pub runtime: RuntimeArgs,

    #[command(flatten)]
    pub decoding: DecodingArgs,

    /// Ignore EXIF orientation (transformers does): use the pixels as stored.
    #[arg(long)]
    pub no_exif_rotate: bool,

    /// Print nothing on stderr but errors and notices about the conversation.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    #[value(name = "q8_0")]
    Q8_0,
    Q4k,
}

impl QuantizeArg {
    pub fn quantization(self) -> crate::captioner::Quantization {
        crate::captioner::Quantization {
            format: match self {
                Self::Q8_0 => crate::captioner::QuantFormat::Q8_0,
                Self::Q4k => crate::captioner::QuantFormat::Q4K,
            },
            only_fast_widths: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Auto,
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    pub fn dtype(self) -> Option<DType> {
        match self {
            Self::Auto => None,
            Self::F32 => Some(DType::F32),
            Self::F16 => Some(DType::F16),
            Self::Bf16 => Some(DType::BF16),
        }
    }
}

/// How a run ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Every input produced a result.
    AllGood,
    /// At least one input failed (and was reported); the others were processed.
    SomeFailed,
    /// Ctrl-C: the batch in hand was finished and written, the rest not started.
    Interrupted,
}

impl RunStatus {
    pub fn exit_code(self) -> ExitCode {
        match self {
            Self::AllGood => ExitCode::SUCCESS,
            Self::SomeFailed => ExitCode::from(1),
            // The shell's convention for a run ended by SIGINT.
            Self::Interrupted => ExitCode::from(130),
        }
    }
}

/// True when `err` comes from writing to a closed pipe (`caption … | head`).
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

pub fn run(cli: Cli) -> Result<RunStatus> {
    let registry = Registry::builtin();
    match cli.command {
        Some(Command::Models) => list_models(&registry),
        Some(Command::Chat(args)) => crate::chat::run(&args, &registry),
        None => caption_images(&cli.caption, &registry),
    }
}

fn list_models(registry: &Registry) -> Result<RunStatus> {
    let cache = hub::hub_cache_dir().ok();
    let mut out = std::io::stdout().lock();
    writeln!(out, "alias\tfamily\ttask\trepo\trevision\tcached")?;
    for (name, entry) in &registry.entries {
        let (repo, revision, cached) = match &entry.bundled {
            Some(bundle) => ("(bundled)", bundle.as_str(), "built in"),
            None => {
                let cached = cache
                    .as_deref()
                    .and_then(|dir| hub::cached_snapshot(dir, &entry.hub_model()))
                    .is_some_and(|snapshot| snapshot.join("config.json").is_file());
                let cached = if cached { "yes" } else { "no" };
                (entry.repo.as_str(), entry.revision.as_str(), cached)
            }
        };
        writeln!(
            out,
            "{name}\t{}\t{}\t{repo}\t{revision}\t{cached}",
            entry.family, entry.task,
        )?;
    }
    Ok(RunStatus::AllGood)
}

/// The decoding settings the flags set; unset ones are left to the model's
/// defaults (see [`GenerationDefaults`]).
pub fn generation_flags(args: &DecodingArgs) -> GenerationDefaults {
    GenerationDefaults {
        max_new_tokens: args.max_tokens,
        min_new_tokens: args.min_tokens,
        num_beams: args.beams.map(|n| n as usize),
        do_sample: args.sample.then_some(true),
        length_penalty: args.length_penalty,
        early_stopping: args.early_stopping.map(Into::into),
        num_return_sequences: args.num_return.map(|n| n as usize),
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        no_repeat_ngram_size: args.no_repeat_ngram,
    }
}

/// The pixels of one input: a file, or an address to download.
fn load_input(
    input: &Input,
    options: &LoadOptions,
) -> Result<image::RgbImage, crate::image::ImageError> {
    if inputs::is_url(&input.shown) {
        crate::fetch::load_url(&input.shown, options)
    } else {
        crate::image::load_rgb8(&input.path, options)
    }
}

/// The pixels of one image named on the command line: a path or an address.
pub fn load_image(
    shown: &str,
    options: &LoadOptions,
) -> Result<image::RgbImage, crate::image::ImageError> {
    if inputs::is_url(shown) {
        crate::fetch::load_url(shown, options)
    } else {
        crate::image::load_rgb8(std::path::Path::new(shown), options)
    }
}

/// A progress bar with rate and ETA on stderr, only when stderr is a terminal
/// (never in pipes or logs) and not `--quiet`; messages for people go through
/// it so they do not tear the bar.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(total: usize, quiet: bool) -> Self {
        let shown = !quiet && std::io::stderr().is_terminal() && total > 1;
        let bar = shown.then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} images  {per_sec}  ETA {eta}",
                )
                .expect("a valid template"),
            );
            bar
        });
        Self { bar }
    }

    fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn advance(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Turns the first Ctrl-C into a request to stop after the batch in hand (so
/// every line and sidecar written is whole); a second one ends the process at once.
fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&flag);
    let installed = ctrlc::set_handler(move || {
        if seen.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("caption: stopping after the current batch (Ctrl-C again to stop now)");
    });
    if let Err(err) = installed {
        // Without the handler Ctrl-C still stops the run, only less gently.
        eprintln!("caption: warning: cannot handle Ctrl-C: {err}");
    }
    flag
}

/// The images to run on: the arguments walked, stdin read, the shard taken.
fn gather_inputs(args: &CaptionArgs) -> Result<(Vec<Input>, Vec<inputs::InputProblem>)> {
    let options = CollectOptions {
        recursive: args.recursive,
    };
    let (mut found, mut problems) =
        inputs::collect(&args.images, std::io::stdin().lock(), &options);
    if let Some(shard) = args.shard {
        found.retain(|input| shard.takes(&input.shown));
        problems.retain(|problem| shard.takes(&problem.shown));
    }
    if found.is_empty() && problems.is_empty() && args.shard.is_none() {
        bail!("no images found in {}", args.images.join(" "));
    }
    Ok((found, problems))
}

/// Drops the inputs that already have a sidecar when resuming (`--skip-existing`);
/// returns the rest and how many were dropped.
fn skip_captioned(inputs: Vec<Input>, sidecar: Option<&SidecarOptions>) -> (Vec<Input>, usize) {
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

/// Fetches and loads a model, applies its alias's settings, and shows the
/// notes about how it was loaded (unless `quiet`).
pub fn load_captioner(
    source: &hub::ModelSource,
    entry: Option<&crate::registry::Entry>,
    runtime: &RuntimeOptions,
    quiet: bool,
) -> Result<Captioner> {
    let files = hub::fetch(source)?;
    let mut captioner = Captioner::load(&files, runtime)?;
    if let Some(template) = entry.and_then(|e| e.question_template.as_deref()) {
        captioner.set_question_template(template)?;
    }
    if !quiet {
        for note in captioner.notes() {
            eprintln!("caption: note: {source}: {note}");
        }
    }
    Ok(captioner)
}

/// `--device`, `--dtype`, `--threads` and the weight cache, applied.
pub fn runtime_options(args: &RuntimeArgs) -> Result<RuntimeOptions> {
    if let Some(threads) = args.threads {
        // candle's CPU kernels size their thread pools from this variable; we
        // are still single-threaded here, before any of them start.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    Ok(RuntimeOptions {
        device: parse_device(&args.device)?,
        dtype: args.dtype.dtype(),
        quantization: args.quantize.map(QuantizeArg::quantization),
        pack_cache: (!args.no_weight_cache).then(|| crate::bundled::cache_root().join("packed")),
    })
}

const DEFAULT_CAPTION_MODEL: &str = "blip-base";
const DEFAULT_CHAT_MODEL: &str = "blip2-opt-2.7b";
const DEFAULT_VQA_MODEL: &str = "blip-vqa-base";

/// Refuses to caption with a VQA model or to answer with a captioning one,
/// rather than silently doing the other job.
fn check_task(model: &str, task: Task, asking: bool) -> Result<()> {
    match (task, asking) {
        (Task::Caption, true) => bail!(
            "{model} is a captioning model and cannot answer --ask questions; \
             use a VQA model, e.g. --model {DEFAULT_VQA_MODEL} (see `caption models`)"
        ),
        (Task::Vqa, false) => bail!(
            "{model} answers questions: pass --ask QUESTION, or caption with e.g. --model {DEFAULT_CAPTION_MODEL}"
        ),
        (Task::Caption | Task::Vqa | Task::Chat, _) => Ok(()),
    }
}

/// Each image's captions as output records, ranked when there are several.
fn caption_outputs(per_image: Vec<Vec<crate::Caption>>) -> Vec<Vec<CaptionOutput>> {
    per_image
        .into_iter()
        .map(|captions| ranked(captions, None))
        .collect()
}

/// Each image's answers, question by question, as output records.
fn answer_outputs(per_image: Vec<Vec<crate::Answer>>) -> Vec<Vec<CaptionOutput>> {
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

fn ranked(captions: Vec<crate::Caption>, question: Option<String>) -> Vec<CaptionOutput> {
    let several = captions.len() > 1;
    captions
        .into_iter()
        .enumerate()
        .map(|(rank, caption)| CaptionOutput {
            text: caption.text,
            question: question.clone(),
            rank: several.then_some(rank + 1),
            score: caption.score,
        })
        .collect()
}

/// `cpu`, `cuda`, `cuda:N` or `auto`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let cuda = |ordinal: usize| -> Result<Device> {
        if !cfg!(feature = "cuda") {
            bail!("this build has no CUDA support: rebuild with `--features cuda`, or use --device cpu");
        }
        Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if cfg!(feature = "cuda") {
            Device::cuda_if_available(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => bail!("unknown device `{other}`: expected cpu, cuda, cuda:N or auto"),
        },
    }
}

fn caption_images(args: &CaptionArgs, registry: &Registry) -> Result<RunStatus> {
    if args.images.is_empty() {
        bail!("no images given (try `caption photo.jpg`, or `caption --help`)");
    }
    let runtime = runtime_options(&args.runtime)?;
    let flags = generation_flags(&args.decoding);
    // Bad flag values fail before any download or model load.
    flags.resolve(args.decoding.seed).validate()?;
    let asking = !args.ask.is_empty();
    if let Some(empty) = args.ask.iter().position(|q| q.trim().is_empty()) {
        bail!("--ask number {} is empty: ask a question", empty + 1);
    }
    if asking && args.sidecar {
        bail!("--sidecar writes captions; it cannot be combined with --ask");
    }
    if asking && args.prompt.is_some() {
        bail!(
            "--prompt and --ask cannot be combined: --ask makes the prompt from the question \
             (with BLIP-2, pass a whole prompt with --prompt instead)"
        );
    }
    let model = args.model.as_deref().unwrap_or(if asking {
        DEFAULT_VQA_MODEL
    } else {
        DEFAULT_CAPTION_MODEL
    });
    let (source, entry) = crate::resolve_model(model, registry)?;
    if let Some(entry) = entry {
        check_task(model, entry.task, asking)?;
    }
    let captioner = load_captioner(&source, entry, &runtime, args.quiet)?;
    let task = match (captioner.captions(), captioner.answers_questions()) {
        (true, true) => Task::Chat,
        (false, _) => Task::Vqa,
        (true, false) => Task::Caption,
    };
    check_task(model, task, asking)?;
    let request = CaptionRequest {
        prompt: args.prompt.clone(),
        // Flags, then the checkpoint's generation_config.json (where the
        // family's transformers code applies it), then models.toml.
        generation: flags
            .or(captioner.generation_defaults())
            .or(&entry.map(|e| e.generation.clone()).unwrap_or_default())
            .resolve(args.decoding.seed),
    };
    request.generation.validate()?;
    let load_options = LoadOptions {
        exif_rotate: !args.no_exif_rotate,
        ..LoadOptions::default()
    };
    let (inputs, problems) = gather_inputs(args)?;
    let sidecar = args.sidecar.then(|| SidecarOptions {
        extension: args.sidecar_ext.clone(),
        existing: if args.skip_existing {
            Existing::Skip
        } else if args.overwrite {
            Existing::Overwrite
        } else {
            Existing::Refuse
        },
        prefix: args.prefix.clone(),
        suffix: args.suffix.clone(),
    });
    let (inputs, skipped) = skip_captioned(inputs, sidecar.as_ref());
    if skipped > 0 && !args.quiet {
        eprintln!("caption: skipped {skipped} images that already have a sidecar");
    }
    let several = inputs.len() + problems.len() > 1
        || args
            .images
            .iter()
            .any(|a| a == "-" || std::path::Path::new(a).is_dir());
    let stdout = std::io::stdout().lock();
    let columns = TextColumns {
        path: several,
        // Text shows the question only when there is a choice; the
        // delimited formats always carry it when asking.
        question: if matches!(args.format, Format::Csv | Format::Tsv) {
            asking
        } else {
            args.ask.len() > 1
        },
        ranked: request.generation.num_return_sequences > 1,
    };
    let mut writer = output::writer(args.format, stdout, columns);
    let mut status = RunStatus::AllGood;
    for problem in problems {
        eprintln!("caption: {}: {}", problem.shown, problem.reason);
        status = RunStatus::SomeFailed;
        writer.write(&Record {
            path: problem.shown,
            outcome: Outcome::Error(problem.reason),
        })?;
    }
    let batch_size = args.batch_size as usize;
    let interrupted = stop_on_ctrl_c();
    let progress = Progress::new(inputs.len(), args.quiet);
    let mut done = 0;
    std::thread::scope(|scope| -> Result<()> {
        // Decoding and resizing the next batch overlaps with the model's work
        // on this one; one batch ahead is enough to hide it.
        let (ready, batches) = std::sync::mpsc::sync_channel(1);
        let inputs = &inputs;
        scope.spawn(move || {
            for chunk in inputs.chunks(batch_size) {
                let decoded: Vec<_> = chunk
                    .iter()
                    .map(|input| (input, load_input(input, &load_options)))
                    .collect();
                if ready.send(decoded).is_err() {
                    break; // the run stopped
                }
            }
        });
        for decoded in batches {
            if interrupted.load(Ordering::SeqCst) {
                progress.println(&format!(
                    "caption: interrupted after {done} of {} images; every result written is complete",
                    inputs.len()
                ));
                status = RunStatus::Interrupted;
                break;
            }
            done += decoded.len();
            let mut loaded = Vec::with_capacity(decoded.len());
            let mut streams = Vec::with_capacity(decoded.len());
            let mut records = Vec::with_capacity(decoded.len());
            for (input, image) in decoded {
                match image {
                    Ok(image) => {
                        loaded.push(image);
                        // Each image's random stream is named by its path, so a
                        // sampled caption is the same whatever else is in the run
                        // (batch size, shards, skipped images).
                        streams.push(inputs::fnv1a64(input.shown.as_bytes()));
                        records.push((input, None));
                    }
                    Err(err) => {
                        progress.println(&format!("caption: {}: {err}", input.shown));
                        status = RunStatus::SomeFailed;
                        records.push((input, Some(err.to_string())));
                    }
                }
            }
            let mut results = if asking {
                answer_outputs(captioner.answer_with_streams(
                    &loaded,
                    &args.ask,
                    &streams,
                    &request.generation,
                )?)
            } else {
                caption_outputs(captioner.caption_with_streams(&loaded, &streams, &request)?)
            }
            .into_iter();
            for (input, error) in records {
                let path = input.shown.clone();
                let outputs = match error {
                    Some(reason) => Err(reason),
                    None => {
                        let outputs = results.next().expect("results for every loaded image");
                        let write_sidecar = |s: &SidecarOptions| {
                            anyhow::ensure!(
                                !inputs::is_url(&input.shown),
                                "a downloaded image has no folder for a sidecar"
                            );
                            s.write(&input.path, &outputs[0].text)
                        };
                        match sidecar.as_ref().map(write_sidecar) {
                            Some(Err(err)) => {
                                progress.println(&format!("caption: {path}: {err:#}"));
                                status = RunStatus::SomeFailed;
                                Err(format!("{err:#}"))
                            }
                            _ => Ok(outputs),
                        }
                    }
                };
                match outputs {
                    Err(reason) => writer.write(&Record {
                        path,
                        outcome: Outcome::Error(reason),
                    })?,
                    Ok(outputs) => {
                        for output in outputs {
                            writer.write(&Record {
                                path: path.clone(),
                                outcome: Outcome::Caption(output),
                            })?;
                        }
                    }
                }
                progress.advance();
            }
        }
        Ok(())
    })?;
    progress.finish();
    writer.finish()?;
    Ok(status)
}
