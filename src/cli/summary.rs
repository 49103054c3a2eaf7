//! The end of a run in one line (on a terminal) and, with `--summary
//! FILE`, as JSON for the scripts that drive big runs: images done, failed
//! and skipped, the rate and the wall time.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use caption::batch::Ended;
use serde::Serialize;

/// What a run did, counted as it goes.
pub struct Summary {
    started: Instant,
    /// Inputs left out as already done (sidecars, `--resume`, `--output-dir`).
    pub skipped: usize,
    /// Inputs left out by `--limit`.
    pub limited: usize,
    done: usize,
    failed: usize,
    interrupted: bool,
}

#[derive(Serialize)]
struct Figures {
    images: usize,
    done: usize,
    failed: usize,
    skipped: usize,
    not_reached: usize,
    interrupted: bool,
    wall_s: f64,
    images_per_s: f64,
}

impl Summary {
    /// Starts the clock: the wall time includes finding the inputs and
    /// loading the model, as a user waits for them.
    pub fn start() -> Self {
        Summary {
            started: Instant::now(),
            skipped: 0,
            limited: 0,
            done: 0,
            failed: 0,
            interrupted: false,
        }
    }

    /// Inputs that could not be used at all (reported before the run).
    pub fn problems(&mut self, count: usize) {
        self.failed += count;
    }

    /// How the batch engine ended over `total` inputs.
    pub fn ended(&mut self, ended: Ended, total: usize) {
        match ended {
            Ended::Finished { failed } => {
                self.done += total - failed;
                self.failed += failed;
            }
            Ended::Stopped { done, failed } => {
                self.done += done - failed;
                self.failed += failed;
                self.interrupted = true;
            }
        }
    }

    fn figures(&self) -> Figures {
        let wall_s = self.started.elapsed().as_secs_f64();
        let images = self.done + self.failed;
        Figures {
            images,
            done: self.done,
            failed: self.failed,
            skipped: self.skipped,
            not_reached: self.limited,
            interrupted: self.interrupted,
            wall_s: (wall_s * 1000.0).round() / 1000.0,
            images_per_s: if wall_s > 0.0 {
                ((images as f64 / wall_s) * 1000.0).round() / 1000.0
            } else {
                0.0
            },
        }
    }

    /// The line on stderr (a terminal only, unless `quiet`: logs and
    /// pipes get no extra line) and the JSON file, written whole.
    pub fn report(&self, file: Option<&Path>, quiet: bool) -> Result<()> {
        let figures = self.figures();
        if !quiet && std::io::stderr().is_terminal() {
            eprintln!("caption: {}", line(&figures));
        }
        if let Some(file) = file {
            let mut json = serde_json::to_vec_pretty(&figures)?;
            json.push(b'\n');
            caption::output::sidecar::write_whole(file, &json, true)?;
        }
        Ok(())
    }
}

fn line(f: &Figures) -> String {
    let mut line = format!(
        "{} images in {:.1} s ({:.2} images/s): {} done, {} failed",
        f.images, f.wall_s, f.images_per_s, f.done, f.failed
    );
    if f.skipped > 0 {
        line += &format!(", {} skipped as done", f.skipped);
    }
    if f.not_reached > 0 {
        line += &format!(", {} left by --limit", f.not_reached);
    }
    if f.interrupted {
        line += ", interrupted";
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_read_as_one_line() {
        let mut summary = Summary::start();
        summary.problems(2);
        summary.skipped = 5;
        summary.limited = 7;
        summary.ended(Ended::Finished { failed: 1 }, 10);
        let figures = summary.figures();
        assert_eq!((figures.images, figures.done, figures.failed), (12, 9, 3));
        let text = line(&figures);
        assert!(text.starts_with("12 images in "), "{text}");
        assert!(
            text.ends_with(": 9 done, 3 failed, 5 skipped as done, 7 left by --limit"),
            "{text}"
        );
        let mut stopped = Summary::start();
        stopped.ended(Ended::Stopped { done: 4, failed: 1 }, 10);
        let figures = stopped.figures();
        assert_eq!((figures.images, figures.done), (4, 3));
        assert!(line(&figures).ends_with(", interrupted"));
    }
}
