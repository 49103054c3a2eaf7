//! `caption IMAGES...`: caption images or answer questions about them,
//! results on stdout in the chosen format.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::args::{generation_flags, runtime_options, CaptionArgs};
use super::interrupt;
use super::model::{open_embedder, open_model};
use super::outcome::RunStatus;
use super::summary::Summary;
use caption::batch::inputs::{self, CollectOptions, Input};
use caption::batch::schedulers::ShardArg;
use caption::batch::webdataset;
use caption::batch::{skip_captioned, Batches, Ended, Progress, Work};
use caption::generate::GenerationDefaults;
use caption::output::resume::{ResumeFile, ResumeWriter};
use caption::output::shard_files::{output_path, ShardFiles};
use caption::output::sidecar::{Existing, SidecarOptions};
use caption::output::{self, Content, Format, Outcome, Record, RecordWriter, TextColumns};
use caption::resolve::hub::ModelSource;
use caption::resolve::registry::{Entry, Registry, Task};
use caption::CaptionRequest;

const DEFAULT_CAPTION_MODEL: &str = "blip-base";
const DEFAULT_VQA_MODEL: &str = "blip-vqa-base";
/// The context of a failed write of results, so the one line that ends the
/// run says where the results were going (a full disk, say).
const WRITING_STDOUT: &str = "writing the results to stdout";

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
        (Task::Embed, _) => bail!(
            "{model} is a CLIP model: it labels (--labels), embeds (`caption embed`), searches \
             (`caption search`) and reranks captions (--rerank CLIP-MODEL), but writes no text"
        ),
        (Task::Caption | Task::Vqa | Task::Chat, _) => Ok(()),
    }
}

/// A progress bar with rate and ETA on stderr, only when stderr is a terminal
/// (never in pipes or logs) and not `--quiet`; messages for people go through
/// it so they do not tear the bar.
pub(super) struct ProgressBar {
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressBar {
    pub(super) fn new(total: usize, quiet: bool) -> Self {
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

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress for ProgressBar {
    fn note(&self, line: &str) {
        // A note names files, and a name may hold a line break.
        let line = output::single_line(line);
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
}

/// The images to run on: the arguments walked, stdin read, the shard taken.
fn gather_inputs(args: &CaptionArgs) -> Result<(Vec<Input>, Vec<inputs::InputProblem>)> {
    let done = args.output_dir.as_deref().map(|dir| (dir, args.format));
    gather(&args.images, args.recursive, args.shard.as_ref(), done)
}

/// The inputs named by `paths` (folders walked, `-` read from stdin), with
/// only `shard`'s share kept; `--shard auto` says on stderr which it took.
/// Tar shards are read for their images, except those whose output file
/// in `done`'s folder (`--output-dir`, in its format) is already there.
pub(super) fn gather(
    paths: &[std::ffi::OsString],
    recursive: bool,
    shard: Option<&ShardArg>,
    done: Option<(&Path, Format)>,
) -> Result<(Vec<Input>, Vec<inputs::InputProblem>)> {
    let shard = match shard {
        Some(arg) => {
            let resolved = arg.resolve()?;
            if resolved.source.is_some() {
                eprintln!("caption: {resolved}");
            }
            Some(resolved.shard)
        }
        None => None,
    };
    let options = CollectOptions { recursive };
    let (mut found, mut problems) = inputs::collect(paths, std::io::stdin().lock(), &options);
    if let Some(shard) = shard {
        // A tar is still one input here: each job takes whole shards.
        found.retain(|input| shard.takes(input.shard_key()));
        problems.retain(|problem| shard.takes(&problem.shown));
    }
    if let Some((dir, format)) = done {
        let before = found.len();
        found.retain(|input| {
            !(inputs::is_tar(&input.path)
                && input.member.is_none()
                && output_path(dir, &input.shown, format).exists())
        });
        let skipped = before - found.len();
        if skipped > 0 {
            eprintln!(
                "caption: skipped {skipped} shards whose output is already in {}",
                dir.display()
            );
        }
    }
    let found = webdataset::expand(found, &mut problems);
    if found.is_empty() && problems.is_empty() && shard.is_none() {
        let named: Vec<_> = paths.iter().map(|a| a.to_string_lossy()).collect();
        bail!("no images found in {}", named.join(" "));
    }
    Ok((found, problems))
}

/// `caption IMAGES...`: every input captioned (or asked about, or
/// labelled), one record each on stdout.
pub fn caption_images(args: &CaptionArgs, registry: &Registry) -> Result<RunStatus> {
    let mut summary = Summary::start();
    check_arguments(args)?;
    let runtime = runtime_options(&args.runtime)?;
    let status = match &args.clip.labels {
        Some(labels) => label_images(args, labels, registry, &runtime, &mut summary)?,
        None => caption_or_answer(args, registry, &runtime, &mut summary)?,
    };
    summary.report(args.summary.as_deref(), args.quiet)?;
    Ok(status)
}

/// Captions (or answers about, or reranks the captions of) every input.
fn caption_or_answer(
    args: &CaptionArgs,
    registry: &Registry,
    runtime: &caption::RuntimeOptions,
    summary: &mut Summary,
) -> Result<RunStatus> {
    let flags = rerank_flags(args, generation_flags(&args.decoding))?;
    // Bad flag values fail before any download or model load.
    flags.resolve(args.decoding.seed).validate()?;
    let model = resolve_for_task(args, registry)?;
    // The inputs are gathered and checked before the model is fetched: a
    // mistyped path must not cost a gigabyte's download first.
    let (inputs, problems) = gather_inputs(args)?;
    let (inputs, destination) = destination(args, inputs, summary)?;
    let sidecar = sidecar_options(args);
    if sidecar.is_some() && inputs.iter().any(|input| input.member.is_some()) {
        bail!(
            "--sidecar writes beside each image, and images inside a tar have no folder of \
             their own: write jsonl (--format jsonl, or --resume FILE) instead"
        );
    }
    let (inputs, skipped) = skip_captioned(inputs, sidecar.as_ref());
    if skipped > 0 && !args.quiet {
        eprintln!("caption: skipped {skipped} images that already have a sidecar");
    }
    summary.skipped += skipped;
    let inputs = limited(args, inputs, summary);
    summary.problems(problems.len());
    let several = several_results(args, &inputs, &problems);
    let kept = args.decoding.num_return.unwrap_or(1) as usize;
    let ranked = match args.clip.rerank {
        Some(_) => kept > 1,
        None => flags.resolve(args.decoding.seed).num_return_sequences > 1,
    };
    let columns = TextColumns {
        reranked: args.clip.rerank.is_some(),
        ..text_columns(args, several, ranked)
    };
    if inputs.is_empty() {
        // Nothing for a model to do: report the problems, load nothing.
        return report_problems_only(args.format, columns, problems, destination);
    }
    let captioner = open_for_task(args, model, runtime)?;
    let request = CaptionRequest {
        prompt: args.prompt.clone(),
        generation: captioner.generation(&flags, args.decoding.seed),
    };
    request.generation.validate()?;
    // The model's own defaults may ask for several captions.
    let columns = TextColumns {
        ranked: match args.clip.rerank {
            Some(_) => kept > 1,
            None => request.generation.num_return_sequences > 1,
        },
        ..columns
    };
    let embedder = match &args.clip.rerank {
        Some(clip_model) => Some(open_embedder(clip_model, registry, runtime, args.quiet)?),
        None => None,
    };
    let work = match &embedder {
        Some(embedder) => Work::Rerank {
            captioner: &captioner,
            request,
            embedder,
            keep: kept,
        },
        None => work(args, &captioner, request),
    };
    let sink = Sink {
        columns,
        destination,
    };
    run_batches(args, work, &inputs, problems, sink, sidecar, summary)
}

/// `caption --labels LABELS IMAGES...`: zero-shot labels from a CLIP model.
fn label_images(
    args: &CaptionArgs,
    labels: &str,
    registry: &Registry,
    runtime: &caption::RuntimeOptions,
    summary: &mut Summary,
) -> Result<RunStatus> {
    let labels = parse_labels(labels)?;
    let model = args
        .model
        .as_deref()
        .unwrap_or(super::args::DEFAULT_CLIP_MODEL);
    // A mistyped alias fails before the inputs are walked.
    caption::resolve_model(model, registry)?;
    let (inputs, problems) = gather_inputs(args)?;
    let (inputs, destination) = destination(args, inputs, summary)?;
    let inputs = limited(args, inputs, summary);
    summary.problems(problems.len());
    let columns = TextColumns {
        content: Content::Labels,
        ..text_columns(args, several_results(args, &inputs, &problems), false)
    };
    if inputs.is_empty() {
        return report_problems_only(args.format, columns, problems, destination);
    }
    let embedder = open_embedder(model, registry, runtime, args.quiet)?;
    // Encoded once for the whole run.
    let labels = embedder.label_set(&labels, &args.clip.label_template)?;
    let work = Work::Labels {
        embedder: &embedder,
        labels: &labels,
        top: args.clip.top.map(|k| k as usize),
    };
    let sink = Sink {
        columns,
        destination,
    };
    run_batches(args, work, &inputs, problems, sink, None, summary)
}

/// `--limit N`: the first N inputs; how many were left goes to `summary`.
fn limited(args: &CaptionArgs, mut inputs: Vec<Input>, summary: &mut Summary) -> Vec<Input> {
    if let Some(limit) = args.limit.map(|n| usize::try_from(n).unwrap_or(usize::MAX)) {
        if inputs.len() > limit {
            summary.limited = inputs.len() - limit;
            if !args.quiet {
                eprintln!(
                    "caption: --limit {limit}: the first {limit} of {} images",
                    inputs.len()
                );
            }
            inputs.truncate(limit);
        }
    }
    inputs
}

/// Where a run's records go, and in what columns.
struct Sink {
    columns: TextColumns,
    destination: Destination,
}

/// Where a run's records go.
enum Destination {
    Stdout,
    /// `--resume FILE`.
    Resume(ResumeFile),
    /// `--output-dir DIR`: a file per tar shard, each holding this many images.
    ShardFiles {
        dir: PathBuf,
        expected: HashMap<String, usize>,
    },
}

/// Where the records go, and the inputs still to do there: `--resume`'s
/// file (the images it holds done are taken out), `--output-dir` (every
/// input must be in a tar, and no two shards may share an output name), or
/// stdout.
fn destination(
    args: &CaptionArgs,
    mut inputs: Vec<Input>,
    summary: &mut Summary,
) -> Result<(Vec<Input>, Destination)> {
    if let Some(path) = &args.resume {
        let (file, found) = ResumeFile::open(path)?;
        if !args.quiet {
            eprintln!("caption: {}", found.summary(path));
        }
        let before = inputs.len();
        inputs.retain(|input| !found.done.contains(&input.shown));
        summary.skipped += before - inputs.len();
        return Ok((inputs, Destination::Resume(file)));
    }
    let Some(dir) = &args.output_dir else {
        return Ok((inputs, Destination::Stdout));
    };
    let mut expected: HashMap<String, usize> = HashMap::new();
    let mut names: HashMap<PathBuf, &str> = HashMap::new();
    for input in &inputs {
        let Some(member) = &input.member else {
            bail!(
                "--output-dir writes one file per tar shard, and {} is not in a tar (for \
                 plain images use --resume FILE or stdout)",
                input.shown
            );
        };
        *expected.entry(member.shard.clone()).or_default() += 1;
        let name = output_path(dir, &member.shard, args.format);
        if let Some(other) = names.insert(name.clone(), &member.shard) {
            if other != member.shard {
                bail!(
                    "--output-dir: shards {other} and {} would both write {}",
                    member.shard,
                    name.display()
                );
            }
        }
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--output-dir: cannot make {}", dir.display()))?;
    let dir = dir.clone();
    Ok((inputs, Destination::ShardFiles { dir, expected }))
}

/// The writer for `destination`, and what a failed write was doing, for
/// its error.
fn record_writer<'a>(
    format: Format,
    columns: TextColumns,
    destination: Destination,
) -> Result<(Box<dyn RecordWriter + 'a>, String)> {
    Ok(match destination {
        Destination::Resume(file) => {
            let what = format!("writing the results to {}", file.path().display());
            (Box::new(ResumeWriter::new(file)), what)
        }
        Destination::ShardFiles { dir, expected } => {
            let what = format!("writing the results in {}", dir.display());
            (
                Box::new(ShardFiles::new(&dir, format, columns, expected)),
                what,
            )
        }
        Destination::Stdout => (
            output::writer(format, std::io::stdout(), columns).context(WRITING_STDOUT)?,
            WRITING_STDOUT.to_string(),
        ),
    })
}

/// `--ask`: each `@FILE` replaced by the questions in FILE, one per line
/// (blank lines dropped), in order; other values are questions as given.
pub(super) fn questions_from_files(asked: &[String]) -> Result<Vec<String>> {
    let mut questions = Vec::with_capacity(asked.len());
    for value in asked {
        let Some(file) = value.strip_prefix('@') else {
            questions.push(value.clone());
            continue;
        };
        let text = caption::load::regular_file::read_text(std::path::Path::new(file))
            .with_context(|| format!("--ask @{file}: reading the questions"))?;
        let before = questions.len();
        questions.extend(
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(str::to_string),
        );
        anyhow::ensure!(
            questions.len() > before,
            "--ask @{file} holds no questions (one per line)"
        );
    }
    Ok(questions)
}

/// `--labels`: "a,b,c", or @FILE with one label per line; blank entries
/// are dropped.
fn parse_labels(spec: &str) -> Result<Vec<String>> {
    let labels: Vec<String> = match spec.strip_prefix('@') {
        Some(file) => {
            let path = std::path::Path::new(file);
            caption::load::regular_file::read_text(path)
                .with_context(|| format!("reading the labels in {file}"))?
                .lines()
                .map(|line| line.trim().to_string())
                .filter(|line| !line.is_empty())
                .collect()
        }
        None => spec
            .split(',')
            .map(|label| label.trim().to_string())
            .filter(|label| !label.is_empty())
            .collect(),
    };
    anyhow::ensure!(
        !labels.is_empty(),
        "--labels {spec:?} holds no labels (give \"cat,dog\" or @FILE with one per line)"
    );
    Ok(labels)
}

/// The decoding flags with `--rerank`'s candidates asked for: N beams
/// returning N (or N samples with --sample).
fn rerank_flags(args: &CaptionArgs, mut flags: GenerationDefaults) -> Result<GenerationDefaults> {
    if args.clip.rerank.is_none() {
        return Ok(flags);
    }
    let candidates = args.clip.candidates as usize;
    let keep = args.decoding.num_return.unwrap_or(1) as usize;
    anyhow::ensure!(
        keep <= candidates,
        "--num-return {keep} asks for more captions than the {candidates} --candidates"
    );
    flags.num_return_sequences = Some(candidates);
    if !args.decoding.sample {
        flags.num_beams = Some(flags.num_beams.unwrap_or(1).max(candidates));
    }
    Ok(flags)
}

/// Whether results need their path beside them: several inputs, a folder
/// or stdin.
fn several_results(
    args: &CaptionArgs,
    inputs: &[Input],
    problems: &[inputs::InputProblem],
) -> bool {
    inputs.len() + problems.len() > 1
        || args
            .images
            .iter()
            .any(|a| a == "-" || std::path::Path::new(a).is_dir())
}

/// A run with nothing to give a model: the problems reported, nothing loaded.
fn report_problems_only(
    format: Format,
    columns: TextColumns,
    problems: Vec<inputs::InputProblem>,
    destination: Destination,
) -> Result<RunStatus> {
    let (mut writer, what) = record_writer(format, columns, destination)?;
    let status = write_problems(&mut *writer, problems, &what)?;
    writer.finish().context(what)?;
    Ok(status)
}

/// Runs `work` over `inputs`, records to stdout (or `--resume`'s file) as
/// they come.
fn run_batches(
    args: &CaptionArgs,
    work: Work,
    inputs: &[Input],
    problems: Vec<inputs::InputProblem>,
    sink: Sink,
    sidecar: Option<SidecarOptions>,
    summary: &mut Summary,
) -> Result<RunStatus> {
    // From here on records are written: a Ctrl-C lets the batch in hand
    // finish, so that every one of them is whole.
    let interrupted = interrupt::stop_after_batch();
    let (mut writer, what) = record_writer(args.format, sink.columns, sink.destination)?;
    let status = write_problems(&mut *writer, problems, &what)?;
    let batches = Batches {
        work,
        batch_size: args.batch_size as usize,
        load_options: args.load.load_options(),
        decode_threads: args.load.decode_threads as usize,
        trim_repeats: args.trim_repeats,
        sidecar,
        stop: Some(interrupted),
    };
    let progress = ProgressBar::new(inputs.len(), args.quiet);
    let ended = batches.run(inputs, &progress, |record| {
        writer.write(&record).with_context(|| what.clone())
    });
    progress.finish();
    // Closed even when the run failed part-way (e.g. `--format json`'s
    // array), so what was written stays a whole document.
    let finished = writer.finish().with_context(|| what.clone());
    let ended = ended?;
    finished?;
    summary.ended(ended, inputs.len());
    Ok(ended_status(ended, inputs.len(), status))
}

/// The exit status of a run that ended as `ended`, `status` being what
/// came before it (inputs that could not be used).
pub(super) fn ended_status(ended: Ended, total: usize, status: RunStatus) -> RunStatus {
    match ended {
        Ended::Stopped { done, .. } => {
            eprintln!(
                "caption: interrupted after {done} of {total} images; every result written is complete"
            );
            RunStatus::Interrupted
        }
        Ended::Finished { failed } if failed > 0 => RunStatus::SomeFailed,
        Ended::Finished { .. } => status,
    }
}

/// Each input that could not be used: a line on stderr and an error record.
pub(super) fn write_problems(
    writer: &mut dyn output::RecordWriter,
    problems: Vec<inputs::InputProblem>,
    what: &str,
) -> Result<RunStatus> {
    let mut status = RunStatus::AllGood;
    for problem in problems {
        let line = format!("caption: {}: {}", problem.shown, problem.reason);
        eprintln!("{}", output::single_line(&line));
        status = RunStatus::SomeFailed;
        writer
            .write(&Record {
                path: problem.shown,
                path_bytes: problem.path_bytes,
                sample: None,
                outcome: Outcome::Error(problem.reason),
            })
            .with_context(|| what.to_string())?;
    }
    Ok(status)
}

/// `--format parquet` is a binary table: not for a terminal.
pub(super) fn refuse_binary_on_a_terminal(format: Format) -> Result<()> {
    if format == Format::Parquet && std::io::stdout().is_terminal() {
        bail!(
            "--format parquet writes a binary table: redirect stdout to a file \
             (> captions.parquet) or give --output-dir"
        );
    }
    Ok(())
}

/// The combinations of flags that cannot work, refused before anything loads.
fn check_arguments(args: &CaptionArgs) -> Result<()> {
    if args.images.is_empty() {
        bail!("no images given (try `caption photo.jpg`, or `caption --help`)");
    }
    if let Some(empty) = args.ask.iter().position(|q| q.trim().is_empty()) {
        bail!("--ask number {} is empty: ask a question", empty + 1);
    }
    let asking = !args.ask.is_empty();
    if asking && args.sidecar {
        bail!("--sidecar writes captions; it cannot be combined with --ask");
    }
    if let Some(sidecar) = sidecar_options(args) {
        sidecar.check_extension()?;
    }
    if args.output_dir.is_none() {
        refuse_binary_on_a_terminal(args.format)?;
    }
    if args.resume.is_some() && !matches!(args.format, Format::Text | Format::Jsonl) {
        bail!(
            "--resume writes jsonl records into its file; it cannot be combined with --format {}",
            format!("{:?}", args.format).to_lowercase()
        );
    }
    if asking && args.prompt.is_some() {
        bail!(
            "--prompt and --ask cannot be combined: --ask makes the prompt from the question \
             (with BLIP-2, pass a whole prompt with --prompt instead)"
        );
    }
    Ok(())
}

/// The model `--model` names (or the default for the job), resolved (no
/// download yet) and refused when its alias is for the other job.
fn resolve_for_task<'r>(
    args: &CaptionArgs,
    registry: &'r Registry,
) -> Result<(&'static str, ModelSource, Option<&'r Entry>)> {
    let asking = !args.ask.is_empty();
    let default = if asking {
        DEFAULT_VQA_MODEL
    } else {
        DEFAULT_CAPTION_MODEL
    };
    let model = args.model.as_deref().unwrap_or(default);
    let (source, entry) = caption::resolve_model(model, registry)?;
    if let Some(entry) = entry {
        check_task(model, entry.task, asking)?;
    }
    Ok((default, source, entry))
}

/// The resolved model, fetched and loaded, refused when the checkpoint
/// itself is for the other job.
fn open_for_task(
    args: &CaptionArgs,
    (model, source, entry): (&str, ModelSource, Option<&Entry>),
    runtime: &caption::RuntimeOptions,
) -> Result<caption::Captioner> {
    let model = args.model.as_deref().unwrap_or(model);
    let captioner = open_model(&source, entry, runtime, args.quiet)?;
    let task = match (captioner.captions(), captioner.answers_questions()) {
        (true, true) => Task::Chat,
        (false, _) => Task::Vqa,
        (true, false) => Task::Caption,
    };
    check_task(model, task, !args.ask.is_empty())?;
    Ok(captioner)
}

/// `--sidecar` and its companions.
fn sidecar_options(args: &CaptionArgs) -> Option<SidecarOptions> {
    args.sidecar.then(|| SidecarOptions {
        extension: args.sidecar_ext.clone(),
        existing: match (args.existing, args.skip_existing, args.overwrite) {
            (Some(policy), _, _) => policy,
            (None, true, _) => Existing::Skip,
            (None, false, true) => Existing::Overwrite,
            (None, false, false) => Existing::Refuse,
        },
        prefix: args.prefix.clone(),
        suffix: args.suffix.clone(),
    })
}

/// Which columns the text formats show.
fn text_columns(args: &CaptionArgs, several: bool, ranked: bool) -> TextColumns {
    TextColumns {
        content: Content::Captions,
        reranked: false,
        path: several,
        // Text shows the question only when there is a choice; the
        // delimited formats always carry it when asking.
        question: if matches!(args.format, Format::Csv | Format::Tsv) {
            !args.ask.is_empty()
        } else {
            args.ask.len() > 1
        },
        ranked,
    }
}

/// Captions, or the `--ask` questions' answers.
fn work<'a>(
    args: &CaptionArgs,
    captioner: &'a caption::Captioner,
    request: CaptionRequest,
) -> Work<'a> {
    if args.ask.is_empty() {
        Work::Caption { captioner, request }
    } else {
        Work::Ask {
            captioner,
            questions: args.ask.clone(),
            generation: request.generation,
        }
    }
}
