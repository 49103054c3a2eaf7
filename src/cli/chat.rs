//! `caption chat IMAGE`: a conversation about one picture with a BLIP-2 model.
//!
//! Questions come from stdin one line at a time, so the same command serves a
//! person at a terminal and a script writing into a pipe; each answer is one
//! line on stdout, flushed at once. The image is encoded once; every question
//! is asked with the earlier turns in the prompt.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{bail, Context, Result};

use super::args::{generation_flags, runtime_options, ChatArgs};
use super::model::open_model;
use super::outcome::RunStatus;
use caption::image::LoadOptions;
use caption::resolve::registry::{Registry, Task};

/// What a person at a terminal sees before typing a question (on stderr, so
/// stdout stays answers only).
const PROMPT_MARKER: &str = "> ";

pub fn run(args: &ChatArgs, registry: &Registry) -> Result<RunStatus> {
    let runtime = runtime_options(&args.runtime)?;
    let flags = generation_flags(&args.decoding);
    flags.resolve(args.decoding.seed).validate()?;
    if args.decoding.num_return.is_some_and(|n| n > 1) {
        bail!("a conversation keeps one answer per question: drop --num-return");
    }
    let (source, entry) = caption::resolve_model(&args.model, registry)?;
    if let Some(entry) = entry.filter(|e| e.task != Task::Chat) {
        bail!(
            "{} is a {} model and cannot hold a conversation: use a BLIP-2 model such as blip2-opt-2.7b",
            args.model,
            entry.family
        );
    }
    let load_options = LoadOptions {
        exif_rotate: !args.no_exif_rotate,
        ..LoadOptions::default()
    };
    let image = caption::batch::load_image(&args.image, &load_options)
        .map_err(|err| anyhow::anyhow!("{}: {err}", args.image))?;
    let captioner = open_model(&source, entry, &runtime, args.quiet)?;
    if !captioner.converses() {
        bail!(
            "{} cannot hold a conversation: use a BLIP-2 model such as blip2-opt-2.7b",
            args.model
        );
    }
    let generation = captioner.generation(&flags, args.decoding.seed);
    generation.validate()?;
    let mut conversation = captioner.conversation(&image)?;

    let interactive = std::io::stdin().is_terminal();
    let mut status = RunStatus::AllGood;
    let mut stdout = std::io::stdout().lock();
    let mut lines = std::io::stdin().lock().lines();
    // Sampling draws from a stream named by the image, as captioning does.
    let stream = caption::batch::inputs::fnv1a64(args.image.as_bytes());
    for number in 1.. {
        if interactive {
            eprint!("{PROMPT_MARKER}");
        }
        let Some(line) = lines.next() else {
            // EOF (Ctrl-D at a terminal): the conversation is over.
            if interactive {
                eprintln!();
            }
            break;
        };
        let question = line.context("reading a question from stdin")?;
        // Blank lines are not questions (at a terminal: Enter re-prompts).
        if question.trim().is_empty() {
            continue;
        }
        // One line on stdout per question, whatever it contains, so a script
        // can pair each line it reads with the question it wrote: a question
        // that cannot be asked gets an empty line and its reason on stderr.
        let answer = match conversation.ask(&question, stream, &generation) {
            Ok(reply) => {
                if reply.forgotten > 0 {
                    eprintln!("caption: {}", forgetting_notice(reply.forgotten));
                }
                reply.answers[0].text.replace(['\n', '\r'], " ")
            }
            Err(err) => {
                eprintln!("caption: question {number}: {err:#}");
                status = RunStatus::SomeFailed;
                String::new()
            }
        };
        writeln!(stdout, "{answer}")?;
        stdout.flush()?;
    }
    Ok(status)
}

/// What a person is told when the oldest turns leave the prompt.
fn forgetting_notice(forgotten: usize) -> String {
    let what = match forgotten {
        1 => "the oldest turn".to_string(),
        n => format!("the {n} oldest turns"),
    };
    format!("the conversation no longer fits the model's context: forgot {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forgetting_notice_counts_turns_in_words() {
        assert!(forgetting_notice(1).ends_with("forgot the oldest turn"));
        assert!(forgetting_notice(3).ends_with("forgot the 3 oldest turns"));
    }
}
