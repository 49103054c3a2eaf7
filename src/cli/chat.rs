//! `caption chat IMAGE`: a conversation about one picture with a BLIP-2 or
//! LLaVA model.
//!
//! Questions come from stdin one line at a time, so the same command serves a
//! person at a terminal and a script writing into a pipe; each answer is one
//! line on stdout, flushed at once. The image is encoded once; every question
//! is asked with the earlier turns in the prompt.

use std::io::{BufRead, IsTerminal, Write};
use std::string::FromUtf8Error;

use anyhow::{bail, Context, Result};

use super::args::{generation_flags, runtime_options, ChatArgs};
use super::model::open_model;
use super::outcome::RunStatus;
use caption::captioner::chat::Conversation;
use caption::generate::GenerationConfig;
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
            "{} is a {} model and cannot hold a conversation: use a BLIP-2 or LLaVA model such as blip2-opt-2.7b or llava-1.5-7b",
            args.model,
            entry.family
        );
    }
    let load_options = args.load.load_options();
    let image = caption::batch::load_image(&args.image, &load_options)
        .map_err(|err| anyhow::anyhow!("{}: {err}", args.image.to_string_lossy()))?;
    let captioner = open_model(&source, entry, &runtime, args.quiet)?;
    if !captioner.converses() {
        bail!(
            "{} cannot hold a conversation: use a BLIP-2 or LLaVA model such as blip2-opt-2.7b or llava-1.5-7b",
            args.model
        );
    }
    let generation = captioner.generation(&flags, args.decoding.seed);
    generation.validate()?;
    let mut conversation = captioner.conversation(&image)?;
    // Sampling draws from a stream named by the image, as captioning does.
    let stream = caption::batch::inputs::fnv1a64(args.image.as_encoded_bytes());
    converse(&mut conversation, stream, &generation)
}

/// Answers the questions on stdin, one line on stdout each, until stdin ends.
fn converse(
    conversation: &mut Conversation<'_>,
    stream: u64,
    generation: &GenerationConfig,
) -> Result<RunStatus> {
    let interactive = std::io::stdin().is_terminal();
    let mut status = RunStatus::AllGood;
    let mut stdout = std::io::stdout().lock();
    let mut stdin = std::io::stdin().lock();
    for number in 1.. {
        if interactive {
            eprint!("{PROMPT_MARKER}");
        }
        let Some(line) = read_line(&mut stdin).context("reading a question from stdin")? else {
            // EOF (Ctrl-D at a terminal): the conversation is over.
            if interactive {
                eprintln!();
            }
            break;
        };
        // Blank lines are not questions (at a terminal: Enter re-prompts).
        if line.as_ref().is_ok_and(|q| q.trim().is_empty()) {
            continue;
        }
        // One line on stdout per question, whatever it contains, so a script
        // can pair each line it reads with the question it wrote: a question
        // that cannot be asked (or read) gets an empty line and its reason on
        // stderr.
        let answer = line
            .map_err(|_| anyhow::anyhow!("the line is not valid UTF-8"))
            .and_then(|question| reply_to(conversation, &question, stream, generation));
        let answer = answer.unwrap_or_else(|err| {
            let reason = format!("caption: question {number}: {err:#}");
            eprintln!("{}", caption::output::single_line(&reason));
            status = RunStatus::SomeFailed;
            String::new()
        });
        writeln!(stdout, "{answer}")
            .and_then(|()| stdout.flush())
            .context("writing the answer to stdout")?;
    }
    Ok(status)
}

/// One question's answer on one line, after the notice if turns were forgotten.
fn reply_to(
    conversation: &mut Conversation<'_>,
    question: &str,
    stream: u64,
    generation: &GenerationConfig,
) -> Result<String> {
    let reply = conversation.ask(question, stream, generation)?;
    if reply.forgotten > 0 {
        eprintln!("caption: {}", forgetting_notice(reply.forgotten));
    }
    Ok(reply.answers[0].text.replace(['\n', '\r'], " "))
}

/// The next line of `input` without its `\n` or `\r\n` (as `lines()` strips
/// them), `None` at the end. A line that is not UTF-8 comes back as the inner
/// error, so it costs one question rather than the whole conversation.
fn read_line(input: &mut impl BufRead) -> std::io::Result<Option<Result<String, FromUtf8Error>>> {
    let mut bytes = Vec::new();
    if input.read_until(b'\n', &mut bytes)? == 0 {
        return Ok(None);
    }
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    Ok(Some(String::from_utf8(bytes)))
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
    fn lines_lose_their_ending_and_a_bad_one_is_an_error_of_its_own() {
        let mut input: &[u8] = b"first\r\nbad \xff\nlast";
        assert_eq!(read_line(&mut input).unwrap().unwrap().unwrap(), "first");
        assert!(read_line(&mut input).unwrap().unwrap().is_err());
        assert_eq!(read_line(&mut input).unwrap().unwrap().unwrap(), "last");
        assert!(read_line(&mut input).unwrap().is_none());
    }

    #[test]
    fn the_forgetting_notice_counts_turns_in_words() {
        assert!(forgetting_notice(1).ends_with("forgot the oldest turn"));
        assert!(forgetting_notice(3).ends_with("forgot the 3 oldest turns"));
    }
}
