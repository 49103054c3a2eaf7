//! What shells and `man` need to know about `caption`, generated from the
//! clap definitions themselves: completion scripts and the manual page.

use std::io::Write;

use anyhow::Result;
use clap::CommandFactory;

use super::args::Cli;
use super::outcome::RunStatus;

/// `caption completions SHELL`: the completion script on stdout.
pub fn print_completions(shell: clap_complete::Shell) -> Result<RunStatus> {
    // Into memory first: clap_complete panics on a failed write, and a
    // closed pipe (`caption completions bash | head`) must end quietly.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "caption", &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)?;
    out.flush()?;
    Ok(RunStatus::AllGood)
}

/// `caption man`: the manual page, in roff, on stdout.
pub fn print_man_page() -> Result<RunStatus> {
    let mut out = std::io::stdout().lock();
    clap_mangen::Man::new(Cli::command()).render(&mut out)?;
    out.flush()?;
    Ok(RunStatus::AllGood)
}
