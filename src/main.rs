//! The `caption` command: parse arguments, run the library, map the outcome to
//! an exit code (0: all good, 1: some input failed, 2: usage or setup error).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    caption::tune_allocator();
    let cli = caption::cli::Cli::parse();
    match caption::cli::run(cli) {
        Ok(status) => status.exit_code(),
        Err(err) if caption::cli::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("caption: {err:#}");
            ExitCode::from(2)
        }
    }
}
