//! The `caption` command: parse arguments, run the library, map the outcome to
//! an exit code (0: all good, 1: some input failed, 2: usage or setup error).

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    caption::tune_allocator();
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(status) => status.exit_code(),
        Err(err) if cli::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("caption: {err:#}");
            ExitCode::from(2)
        }
    }
}
