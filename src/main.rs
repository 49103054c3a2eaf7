//! The `caption` command: parse arguments, run the library, map the outcome to
//! an exit code (0: all good, 1: some input failed or the run could not go
//! on, 2: usage or setup error).

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    one_line_library_errors();
    caption::tune_allocator();
    if cli::stdout::closed_at_start() {
        eprintln!(
            "caption: stdout is closed, so every result would be lost: \
             redirect it to a file (or to /dev/null) instead"
        );
        return ExitCode::from(2);
    }
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(status) => status.exit_code(),
        Err(err) if cli::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            // A run that started and then could not go on (the weights
            // changed under it) failed; a setup or usage error is 2.
            let ran = err
                .chain()
                .any(|cause| cause.is::<caption::load::watched_map::WeightsChanged>());
            // One line, whatever the error quotes (a file name with a line break).
            let message = format!("caption: {err:#}");
            eprintln!("{}", caption::output::single_line(&message));
            ExitCode::from(if ran { 1 } else { 2 })
        }
    }
}

/// Keeps errors one line under `RUST_BACKTRACE=1`: candle captures a
/// backtrace into the text of its errors whenever library backtraces are on,
/// and `RUST_BACKTRACE` turns them on unless `RUST_LIB_BACKTRACE` says
/// otherwise. Panics still print theirs. Someone who sets
/// `RUST_LIB_BACKTRACE` asks for the long form and gets it.
fn one_line_library_errors() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // Still single-threaded here, as setting a variable requires.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}
