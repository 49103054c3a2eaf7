//! `caption embed` and `caption search`: CLIP embeddings of images and
//! texts, and images ranked by how well they match a query.

use std::collections::HashMap;
use std::io::Write;

use anyhow::{bail, Context, Result};

use super::args::{runtime_options, EmbedArgs, EmbedInputArgs, SearchArgs};
use super::images::{ended_status, write_problems, ProgressBar};
use super::interrupt;
use super::model::open_embedder;
use super::outcome::RunStatus;
use caption::batch::index::{EmbeddingIndex, FileKey};
use caption::batch::inputs::{Input, InputProblem};
use caption::batch::{Batches, Ended, Work};
use caption::output::npy::NpyWriter;
use caption::output::{self, Content, Format, Outcome, Record, TextColumns};
use caption::resolve::registry::Registry;
use caption::Embedder;

const WRITING_STDOUT: &str = "writing the results to stdout";
const PARQUET_EMBEDDINGS: &str = "--format parquet holds captions, answers, labels and scores: \
     write embeddings as jsonl (the default) or with --output FILE.npy";

/// `caption embed`.
pub fn embed(args: &EmbedArgs, registry: &Registry) -> Result<RunStatus> {
    match (args.images.is_empty(), args.text.is_empty()) {
        (true, true) => bail!("nothing to embed: give images, or texts with --text"),
        (false, false) => bail!(
            "embed images or --text, not both in one run (their records have different fields)"
        ),
        _ => {}
    }
    if args.output.is_some() && !args.text.is_empty() {
        bail!("--output writes image embeddings; print text embeddings on stdout");
    }
    if args.format == Format::Parquet {
        bail!(PARQUET_EMBEDDINGS);
    }
    let runtime = runtime_options(&args.input.runtime)?;
    caption::resolve_model(&args.input.model, registry)?;
    if !args.text.is_empty() {
        let embedder = open_embedder(&args.input.model, registry, &runtime, args.input.quiet)?;
        return embed_texts(&embedder, &args.text, args.format);
    }
    let (inputs, problems) = gather(&args.images, &args.input)?;
    let embedder = open_embedder(&args.input.model, registry, &runtime, args.input.quiet)?;
    let work = Work::Embed {
        embedder: &embedder,
    };
    match &args.output {
        Some(target) => embed_into_npy(&args.input, work, &inputs, problems, target, &embedder),
        None => {
            let several = inputs.len() + problems.len() > 1
                || args
                    .images
                    .iter()
                    .any(|a| a == "-" || std::path::Path::new(a).is_dir());
            let columns = TextColumns {
                content: Content::Embeddings,
                path: several,
                ..TextColumns::default()
            };
            let mut writer =
                output::writer(args.format, std::io::stdout(), columns).context(WRITING_STDOUT)?;
            let status = write_problems(&mut *writer, problems, WRITING_STDOUT)?;
            let ended = run(&args.input, work, &inputs, |record| {
                writer.write(&record).context(WRITING_STDOUT)
            });
            let finished = writer.finish().context(WRITING_STDOUT);
            let ended = ended?;
            finished?;
            Ok(ended_status(ended, inputs.len(), status))
        }
    }
}

/// `caption embed --text ...`: one record per text.
fn embed_texts(embedder: &Embedder, texts: &[String], format: Format) -> Result<RunStatus> {
    let embeds = embedder.embed_texts(texts)?.to_vec2::<f32>()?;
    let mut out = std::io::stdout().lock();
    let numbers = |e: &[f32]| e.iter().map(f32::to_string).collect::<Vec<_>>().join(" ");
    let json = |text: &str, e: &[f32]| serde_json::json!({"text": text, "embedding": e});
    match format {
        Format::Jsonl => {
            for (text, e) in texts.iter().zip(&embeds) {
                writeln!(out, "{}", json(text, e))?;
            }
        }
        Format::Json => {
            let all: Vec<_> = texts.iter().zip(&embeds).map(|(t, e)| json(t, e)).collect();
            writeln!(out, "{}", serde_json::Value::Array(all))?;
        }
        Format::Text => {
            for (text, e) in texts.iter().zip(&embeds) {
                writeln!(out, "{}\t{}", output::single_line(text), numbers(e))?;
            }
        }
        Format::Csv | Format::Tsv => {
            let delimiter = if format == Format::Csv { b',' } else { b'\t' };
            let mut csv = csv::WriterBuilder::new()
                .delimiter(delimiter)
                .terminator(csv::Terminator::Any(b'\n'))
                .from_writer(&mut out);
            csv.write_record(["text", "embedding"])?;
            for (text, e) in texts.iter().zip(&embeds) {
                csv.write_record([text.as_str(), numbers(e).as_str()])?;
            }
            csv.flush()?;
        }
        Format::Parquet => bail!(PARQUET_EMBEDDINGS),
    }
    out.flush().context(WRITING_STDOUT)?;
    Ok(RunStatus::AllGood)
}

/// `caption embed --output FILE.npy`.
fn embed_into_npy(
    args: &EmbedInputArgs,
    work: Work,
    inputs: &[Input],
    problems: Vec<InputProblem>,
    target: &std::path::Path,
    embedder: &Embedder,
) -> Result<RunStatus> {
    let mut status = RunStatus::AllGood;
    for problem in &problems {
        eprintln!(
            "{}",
            output::single_line(&format!("caption: {}: {}", problem.shown, problem.reason))
        );
        status = RunStatus::SomeFailed;
    }
    let mut npy = NpyWriter::create(target, embedder.projection_dim())?;
    let ended = run(args, work, inputs, |record| match record.outcome {
        Outcome::Embedding(embedding) => npy.append(&record.path, &embedding),
        // Said on stderr as it happened; the file holds images only.
        _ => Ok(()),
    })?;
    // A run stopped by Ctrl-C keeps the rows it has: each is whole.
    let rows = npy.finish()?;
    if !args.quiet {
        eprintln!(
            "caption: wrote {rows} embeddings of {} values to {} (paths in {}.paths)",
            embedder.projection_dim(),
            target.display(),
            target.display()
        );
    }
    Ok(ended_status(ended, inputs.len(), status))
}

/// `caption search`.
pub fn search(args: &SearchArgs, registry: &Registry) -> Result<RunStatus> {
    super::images::refuse_binary_on_a_terminal(args.format)?;
    let (query, paths) = match &args.like {
        Some(_) => (None, &args.terms[..]),
        None => {
            let (query, paths) = args
                .terms
                .split_first()
                .context("give a query and the images to search")?;
            let query = query
                .to_str()
                .context("the query is not valid UTF-8")?
                .to_string();
            anyhow::ensure!(!query.trim().is_empty(), "the query is empty");
            (Some(query), paths)
        }
    };
    anyhow::ensure!(
        !paths.is_empty(),
        "give the images or folders to search after the query"
    );
    let runtime = runtime_options(&args.input.runtime)?;
    caption::resolve_model(&args.input.model, registry)?;
    let (inputs, problems) = gather(paths, &args.input)?;
    let embedder = open_embedder(&args.input.model, registry, &runtime, args.input.quiet)?;
    let (query_embed, excluded) = match (&query, &args.like) {
        (Some(query), _) => (
            embedder
                .embed_texts(std::slice::from_ref(query))?
                .to_vec2::<f32>()?
                .remove(0),
            None,
        ),
        (None, Some(like)) => {
            let options = args.input.load.load_options();
            let image = caption::batch::load_image(like, &options)
                .with_context(|| format!("{}", like.to_string_lossy()))?;
            let embed = embedder.embed_images(&[image])?.to_vec2::<f32>()?.remove(0);
            (embed, std::path::absolute(like).ok())
        }
        (None, None) => unreachable!("a query or --like"),
    };
    let (scores, mut errors, ended) = scores_of(args, &embedder, &inputs, &query_embed)?;
    let mut ranked: Vec<(f32, &Input)> = inputs
        .iter()
        .zip(&scores)
        .filter(|(input, _)| {
            excluded.is_none() || std::path::absolute(&input.path).ok() != excluded
        })
        .filter_map(|(input, score)| Some(((*score)?, input)))
        .collect();
    // Best first; ties keep the inputs' order.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranked.truncate(args.top as usize);
    let columns = TextColumns {
        content: Content::Matches,
        path: true,
        ..TextColumns::default()
    };
    let mut writer =
        output::writer(args.format, std::io::stdout(), columns).context(WRITING_STDOUT)?;
    for (score, input) in ranked {
        writer
            .write(&Record {
                path: input.shown.clone(),
                path_bytes: output::path_bytes(&input.path),
                sample: None,
                outcome: Outcome::Match(score),
            })
            .context(WRITING_STDOUT)?;
    }
    let mut status = write_problems(&mut *writer, problems, WRITING_STDOUT)?;
    for record in errors.drain(..) {
        writer.write(&record).context(WRITING_STDOUT)?;
    }
    writer.finish().context(WRITING_STDOUT)?;
    if let Ended::Finished { failed } = ended {
        if failed > 0 {
            status = RunStatus::SomeFailed;
        }
    }
    Ok(ended_status(ended, inputs.len(), status))
}

/// Every input's cosine similarity to `query` (`None` for an image that
/// failed), from the embedding in the index where it holds the file as it
/// was found, else from a new one (added to the index); and the error
/// records of the images that failed.
fn scores_of(
    args: &SearchArgs,
    embedder: &Embedder,
    inputs: &[Input],
    query: &[f32],
) -> Result<(Vec<Option<f32>>, Vec<Record>, Ended)> {
    let dir = caption::resolve::bundled::cache_root().join("index");
    let mut index = (!args.no_index).then(|| {
        let (index, note) =
            EmbeddingIndex::open(&dir, embedder.identity(), embedder.projection_dim());
        if let Some(note) = note {
            eprintln!("caption: note: {note}");
        }
        index
    });
    // Keys are absolute paths: the working folder is asked for once, not
    // once per file (100,000 getcwd calls were 5% of a search).
    let cwd = std::env::current_dir().ok();
    let key_of = |input: &Input| -> Option<FileKey> {
        let stamp = input.stamp?;
        let path = match (&cwd, input.path.is_absolute()) {
            (_, true) => input.path.clone(),
            (Some(cwd), false) => cwd.join(&input.path),
            (None, false) => return None,
        };
        // An image in a tar: the tar's stamp, and its own name under the tar's path.
        let path = match &input.member {
            Some(member) => {
                let name = input.shown.strip_prefix(member.shard.as_str())?;
                path.join(name.trim_start_matches('/'))
            }
            None => path,
        };
        Some(FileKey { path, stamp })
    };
    let mut scores = vec![None; inputs.len()];
    let mut missing = vec![];
    // Position in `inputs` and index key of each image to embed, by path.
    let mut pending: HashMap<String, (usize, Option<FileKey>)> = HashMap::new();
    for (i, input) in inputs.iter().enumerate() {
        let key = key_of(input);
        let kept = match (&index, &key) {
            (Some(index), Some(key)) => index.get(key),
            _ => None,
        };
        match kept {
            Some(embedding) => scores[i] = Some(dot(query, embedding)),
            None => {
                pending.insert(input.shown.clone(), (i, key));
                missing.push(input.clone());
            }
        }
    }
    if !args.input.quiet && !missing.is_empty() && index.is_some() {
        eprintln!(
            "caption: embedding {} of {} images (the rest are in the index)",
            missing.len(),
            inputs.len()
        );
    }
    let mut errors = vec![];
    let ended = run(&args.input, Work::Embed { embedder }, &missing, |record| {
        match record.outcome {
            Outcome::Embedding(embedding) => {
                if let Some((i, key)) = pending.remove(&record.path) {
                    if let (Some(index), Some(key)) = (index.as_mut(), key) {
                        index.insert(key, &embedding);
                    }
                    scores[i] = Some(dot(query, &embedding));
                }
            }
            _ => errors.push(record),
        }
        Ok(())
    })?;
    if let Some(index) = &index {
        if let Err(err) = index.save() {
            eprintln!("caption: note: could not save the search index: {err:#}");
        }
    }
    Ok((scores, errors, ended))
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The inputs named by `paths`, walked and sharded.
fn gather(
    paths: &[std::ffi::OsString],
    args: &EmbedInputArgs,
) -> Result<(Vec<Input>, Vec<InputProblem>)> {
    super::images::gather(paths, args.recursive, args.shard.as_ref(), None)
}

/// Runs `work` over `inputs` through the batch engine, with a progress
/// bar and Ctrl-C finishing the batch in hand.
fn run(
    args: &EmbedInputArgs,
    work: Work,
    inputs: &[Input],
    record: impl FnMut(Record) -> Result<()>,
) -> Result<Ended> {
    if inputs.is_empty() {
        return Ok(Ended::Finished { failed: 0 });
    }
    let batches = Batches {
        work,
        batch_size: args.batch_size as usize,
        load_options: args.load.load_options(),
        decode_threads: args.load.decode_threads as usize,
        trim_repeats: false,
        sidecar: None,
        stop: Some(interrupt::stop_after_batch()),
    };
    let progress = ProgressBar::new(inputs.len(), args.quiet);
    let ended = batches.run(inputs, &progress, record);
    progress.finish();
    ended
}
