//! The command line's arguments (clap structs) and the library options
//! they stand for.

use anyhow::Result;
use candle_core::DType;
use clap::{Args, Parser, Subcommand, ValueEnum};

use caption::batch::schedulers::ShardArg;
use caption::captioner::{QuantFormat, Quantization};
use caption::generate::{EarlyStopping, GenerationDefaults};
use caption::output::Format;
use caption::RuntimeOptions;

const DEFAULT_CHAT_MODEL: &str = "blip2-opt-2.7b";
/// The CLIP model of `--labels`, `--rerank`, `caption embed` and `caption search`.
pub const DEFAULT_CLIP_MODEL: &str = "clip-vit-base-patch32";

/// `caption --version`: the version and whether this build can use a GPU.
#[cfg(feature = "cuda")]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (CPU and CUDA)");
#[cfg(not(feature = "cuda"))]
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (CPU only: built without the cuda feature)"
);

/// Caption, question, label and search images with BLIP, BLIP-2, LLaVA and CLIP, natively: the same
/// answers as transformers, in one fast binary.
#[derive(Debug, Parser)]
#[command(name = "caption", version = VERSION, args_conflicts_with_subcommands = true)]
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
    /// Talk about one image with a BLIP-2 or LLaVA model: questions are read from
    /// stdin line by line, each answered with the conversation so far in the prompt.
    Chat(Box<ChatArgs>),
    /// Print a shell completion script, e.g.
    /// `caption completions bash > ~/.local/share/bash-completion/completions/caption`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `caption man > ~/.local/share/man/man1/caption.1`.
    Man,
    /// Write the CLIP embedding of each image (L2-normalised), or of each --text.
    Embed(Box<EmbedArgs>),
    /// Rank images by how well they match a text (or, with --like, another image), best first.
    /// Embeddings are kept in an index in the cache: a second search of the same folders
    /// embeds only new or changed images.
    Search(Box<SearchArgs>),
}

#[derive(Debug, Args)]
pub struct CaptionArgs {
    /// Image files and folders to caption; `-` reads paths from stdin, one per line.
    #[arg(value_name = "IMAGE")]
    pub images: Vec<std::ffi::OsString>,

    /// Descend into subfolders of the folders given.
    #[arg(short, long)]
    pub recursive: bool,

    /// Caption only this share of the inputs, e.g. 2/8: N jobs with 1/N..N/N split a corpus
    /// between them with no coordination (by a stable hash of each path). `auto` reads K and N
    /// from SLURM (job arrays, srun tasks) or a Kubernetes Indexed Job (auto/N, or
    /// CAPTION_SHARD_COUNT=N).
    #[arg(long, value_name = "K/N|auto")]
    pub shard: Option<ShardArg>,

    /// Write jsonl records into FILE instead of stdout, appending to what an earlier run left
    /// there and skipping the images it holds without error; after a crash or kill, the same
    /// command carries on (an unfinished last line is redone, never duplicated).
    #[arg(long, value_name = "FILE.jsonl")]
    pub resume: Option<std::path::PathBuf>,

    /// WebDataset tar shards: write each shard's records to DIR/<shard>.<format> (whole, once
    /// the shard is done), and skip the shards whose file is already there.
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub output_dir: Option<std::path::PathBuf>,

    /// Cut repetition loops out of captions and answers ("a hat on top of a hat on top of a
    /// hat" -> "a hat on top of a hat"); text without one is unchanged. Off by default: the
    /// output is transformers' own.
    #[arg(long)]
    pub trim_repeats: bool,

    /// Only the first N images (after --shard and the images skipped as done): a quick trial
    /// on a big folder.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,

    /// Write the run's figures (images done, failed, skipped; images/s; wall time) as JSON to
    /// FILE at the end. On a terminal they are also one line on stderr.
    #[arg(long, value_name = "FILE")]
    pub summary: Option<std::path::PathBuf>,

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

    /// What to do with an image's existing sidecar: refuse (an error for that image), skip (do
    /// not caption the image: resume a run), overwrite, append or prepend the new caption
    /// (joined by ", ") [default: refuse].
    #[arg(
        long,
        value_enum,
        value_name = "POLICY",
        requires = "sidecar",
        conflicts_with_all = ["skip_existing", "overwrite"],
        help_heading = "Sidecar files"
    )]
    pub existing: Option<caption::output::sidecar::Existing>,

    /// --existing skip.
    #[arg(
        long,
        requires = "sidecar",
        conflicts_with = "overwrite",
        help_heading = "Sidecar files"
    )]
    pub skip_existing: bool,

    /// --existing overwrite.
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

    /// Ask a question about each image (needs a VQA, BLIP-2 or LLaVA model); repeat to ask several.
    /// @FILE asks the questions in FILE, one per line.
    #[arg(long, value_name = "QUESTION")]
    pub ask: Vec<String>,

    #[command(flatten)]
    pub clip: ClipArgs,

    /// Start every caption with this text, e.g. "a picture of" (BLIP prints it as part of the caption,
    /// as transformers does); BLIP-2 continues it as a raw prompt and prints only the continuation;
    /// LLaVA reads it as its whole prompt, `<image>` where the picture goes (no chat template).
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

    #[command(flatten)]
    pub load: ImageArgs,

    /// Print nothing on stderr but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

/// How images are read.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Ignore EXIF orientation (transformers does): use the pixels as stored.
    #[arg(long)]
    pub no_exif_rotate: bool,

    /// Refuse (as a failed input) an image with more pixels than this,
    /// before decoding it. The default is where Pillow refuses an image as
    /// a decompression bomb (2 x Image.MAX_IMAGE_PIXELS); a decoded pixel
    /// takes 3-8 bytes while it is decoded.
    #[arg(long, value_name = "N", default_value_t = caption::image::PILLOW_MAX_PIXELS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pixels: u64,

    /// Threads decoding and resizing the next batch's images while the model works on this
    /// one; 0 (the default) is half the machine's threads, at most 8.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=256))]
    pub decode_threads: u32,
}

impl ImageArgs {
    pub fn load_options(&self) -> caption::image::LoadOptions {
        caption::image::LoadOptions {
            exif_rotate: !self.no_exif_rotate,
            max_pixels: self.max_pixels,
        }
    }
}

/// Zero-shot labels and CLIP reranking on the main command.
#[derive(Debug, Args)]
pub struct ClipArgs {
    /// Label each image with the best of these labels, scored by a CLIP model (-m, default
    /// clip-vit-base-patch32): comma-separated ("cat,dog,red car"), or @FILE with one label
    /// per line.
    #[arg(long, value_name = "LABELS", conflicts_with_all = ["ask", "prompt", "sidecar", "rerank"],
          help_heading = "CLIP")]
    pub labels: Option<String>,

    /// The sentence each label is put into before it is encoded; {} is the label.
    #[arg(long, value_name = "TEMPLATE", default_value = caption::captioner::embed::DEFAULT_LABEL_TEMPLATE,
          requires = "labels", help_heading = "CLIP")]
    pub label_template: String,

    /// Keep only the K best labels of each image (jsonl, json, csv, tsv) [default: all].
    #[arg(long, value_name = "K", requires = "labels",
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "CLIP")]
    pub top: Option<u32>,

    /// Generate --candidates captions per image and print the one a CLIP model finds
    /// closest to the image (its cosine similarity is jsonl's clip_score). Name the model
    /// as --rerank=MODEL [default: clip-vit-base-patch32].
    #[arg(long, value_name = "CLIP-MODEL", num_args = 0..=1, require_equals = true,
          default_missing_value = DEFAULT_CLIP_MODEL, conflicts_with = "ask", help_heading = "CLIP")]
    pub rerank: Option<String>,

    /// How many candidates --rerank chooses from: beam search returning N (or N samples
    /// with --sample); --num-return K prints the best K of them, ranked.
    #[arg(long, value_name = "N", default_value_t = 5, requires = "rerank",
          value_parser = clap::value_parser!(u32).range(2..=64), help_heading = "CLIP")]
    pub candidates: u32,
}

/// What `caption embed` and `caption search` read and how they run.
#[derive(Debug, Args)]
pub struct EmbedInputArgs {
    /// Descend into subfolders of the folders given.
    #[arg(short, long)]
    pub recursive: bool,

    /// Use only this share of the inputs, e.g. 2/8 (by a stable hash of each path); `auto`
    /// reads it from SLURM or a Kubernetes Indexed Job, as for captioning.
    #[arg(long, value_name = "K/N|auto")]
    pub shard: Option<ShardArg>,

    /// A CLIP model: an alias (see `caption models`), a Hub id, or a local folder.
    #[arg(short, long, env = "CAPTION_CLIP_MODEL", default_value = DEFAULT_CLIP_MODEL)]
    pub model: String,

    /// Images encoded together. Larger batches use the CPU better; results are identical.
    #[arg(long, default_value_t = 8, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,

    #[command(flatten)]
    pub runtime: RuntimeArgs,

    #[command(flatten)]
    pub load: ImageArgs,

    /// Print nothing on stderr but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `caption embed IMAGES...`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Image files and folders; `-` reads paths from stdin, one per line.
    #[arg(value_name = "IMAGE")]
    pub images: Vec<std::ffi::OsString>,

    /// Embed this text instead (repeatable): {"text": ..., "embedding": [...]}.
    #[arg(long, value_name = "TEXT")]
    pub text: Vec<String>,

    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    pub format: Format,

    /// Write the image embeddings to FILE.npy (float32, one row per image) and their paths,
    /// one JSON string per line, to FILE.npy.paths, instead of stdout: a million
    /// embeddings in 2 GB rather than a 10 GB JSON file. Both are written whole
    /// (temporary file, then rename).
    #[arg(long, short, value_name = "FILE.npy")]
    pub output: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub input: EmbedInputArgs,
}

/// `caption search QUERY PATHS...`.
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// What to look for, e.g. "a red car at night" (not with --like), then the image files
    /// and folders to search; `-` reads paths from stdin, one per line.
    #[arg(value_name = "QUERY] [PATH", required = true)]
    pub terms: Vec<std::ffi::OsString>,

    /// Search by this image instead of a text: near duplicates first (the image itself is
    /// left out). Every argument is then a path.
    #[arg(long, value_name = "IMAGE")]
    pub like: Option<std::ffi::OsString>,

    /// How many results to print, best first.
    #[arg(long, value_name = "K", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub top: u32,

    /// Output format: text (path<TAB>score) or jsonl ({"path": ..., "score": ...}), etc.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Neither read nor update the embedding index in the cache (~/.cache/caption/index).
    #[arg(long)]
    pub no_index: bool,

    #[command(flatten)]
    pub input: EmbedInputArgs,
}

/// How to pick the tokens of a caption or answer.
#[derive(Debug, Args)]
pub struct DecodingArgs {
    /// Generate at most this many new tokens, at least 1 [default: 20; at most the model's position limit].
    #[arg(long, value_name = "N", help_heading = "Decoding")]
    pub max_tokens: Option<usize>,

    /// Generate at least this many new tokens before the caption may end.
    #[arg(long, value_name = "N", help_heading = "Decoding")]
    pub min_tokens: Option<usize>,

    /// Beam search with N beams, 1 to 64 (1: greedy) [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), help_heading = "Decoding")]
    pub beams: Option<u32>,

    /// Beam search: score = log-prob / length^P, P from -2 to 10; above 0 favours longer captions [default: 1.0].
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

    /// CPU threads for the model, 1 to 1024 [default: all cores].
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

    /// How much the weight cache's files may take together, e.g. 20G or
    /// 500M (bytes without a suffix); after each load the least recently
    /// used are deleted until the rest fit. The one in use always stays.
    /// Also CAPTION_WEIGHT_CACHE_LIMIT.
    #[arg(long, value_name = "SIZE", env = "CAPTION_WEIGHT_CACHE_LIMIT", hide_env = true,
          default_value = "20G", value_parser = parse_size)]
    pub weight_cache_limit: u64,
}

/// `20G`, `500M`, `64K` (powers of 1024) or plain bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((at, unit)) if unit.is_ascii_alphabetic() => {
            let shift = match unit.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{text:?}: the unit must be K, M, G or T")),
            };
            (&text[..at], shift)
        }
        _ => (text, 0),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 20G, 500M or 1000000"))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is more than 16 EiB"))
}

/// `caption chat IMAGE`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The image to talk about.
    #[arg(value_name = "IMAGE")]
    pub image: std::ffi::OsString,

    /// A BLIP-2 or LLaVA model: an alias (see `caption models`), a Hub id, or a local folder.
    #[arg(short, long, env = "CAPTION_CHAT_MODEL", default_value = DEFAULT_CHAT_MODEL)]
    pub model: String,

    #[command(flatten)]
    pub runtime: RuntimeArgs,

    #[command(flatten)]
    pub decoding: DecodingArgs,

    #[command(flatten)]
    pub load: ImageArgs,

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
    pub fn quantization(self) -> Quantization {
        Quantization::of(match self {
            Self::Q8_0 => QuantFormat::Q8_0,
            Self::Q4k => QuantFormat::Q4K,
        })
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

/// The most threads `--threads` takes. More threads than cores only slow the
/// kernels down, and the largest servers have a few hundred hardware threads;
/// thousands of threads meet the system's limits instead (20000 failed to
/// start in the thread pool, which then waited forever for them). A fixed
/// number rather than a multiple of this machine's cores, so the same
/// command line is accepted everywhere.
pub const MAX_THREADS: u32 = 1024;

/// `--device`, `--dtype`, `--threads` and the weight cache, applied.
pub fn runtime_options(args: &RuntimeArgs) -> Result<RuntimeOptions> {
    if let Some(threads) = args.threads {
        anyhow::ensure!(
            threads <= MAX_THREADS,
            "--threads {threads} is more than {MAX_THREADS}: more threads than cores only \
             slow the model down (default: all cores)"
        );
        // candle's CPU kernels size their thread pools from this variable; we
        // are still single-threaded here, before any of them start.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let device = caption::captioner::parse_device(&args.device)?;
    if args.device == "auto" && cfg!(feature = "cuda") {
        // Said once, here: a CUDA build could have run on either. (A build
        // without CUDA had no choice to make, and says nothing.)
        match device {
            candle_core::Device::Cpu => {
                eprintln!("caption: --device auto: no CUDA device found, running on the CPU")
            }
            _ => eprintln!("caption: --device auto: running on CUDA device 0"),
        }
    }
    Ok(RuntimeOptions {
        device,
        dtype: args.dtype.dtype(),
        quantization: args.quantize.map(QuantizeArg::quantization),
        pack_cache: (!args.no_weight_cache)
            .then(|| caption::resolve::bundled::cache_root().join("packed")),
        pack_cache_limit: args.weight_cache_limit,
    })
}
