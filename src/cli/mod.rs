//! The command line: clap structs, resolved once into a validated run, then
//! executed over the library. Nothing here but arguments and what people
//! see: the work is the library's.

mod args;
mod chat;
mod images;
mod interrupt;
mod manual;
mod model;
mod outcome;
mod search;
pub mod stdout;
mod summary;

pub use args::Cli;
use args::Command;
pub use outcome::{is_broken_pipe, RunStatus};

use anyhow::Result;
use caption::resolve::registry::Registry;

pub fn run(cli: Cli) -> Result<RunStatus> {
    // Before anything that can take time: loading a model, reading stdin.
    interrupt::install();
    let registry = Registry::builtin();
    match cli.command {
        Some(Command::Models) => model::list_models(&registry),
        Some(Command::Chat(args)) => chat::run(&args, &registry),
        Some(Command::Completions { shell }) => manual::print_completions(shell),
        Some(Command::Man) => manual::print_man_page(),
        Some(Command::Embed(args)) => search::embed(&args, &registry),
        Some(Command::Search(args)) => search::search(&args, &registry),
        None => {
            let mut args = cli.caption;
            args.ask = images::questions_from_files(&args.ask)?;
            images::caption_images(&args, &registry)
        }
    }
}
