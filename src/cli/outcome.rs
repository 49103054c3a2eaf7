//! How a run ended, as the exit code says it.

use std::process::ExitCode;

/// How a run ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Every input produced a result.
    AllGood,
    /// At least one input failed (and was reported); the others were processed.
    SomeFailed,
    /// Ctrl-C: the batch in hand was finished and written, the rest not started.
    Interrupted,
}

impl RunStatus {
    pub fn exit_code(self) -> ExitCode {
        match self {
            Self::AllGood => ExitCode::SUCCESS,
            Self::SomeFailed => ExitCode::from(1),
            // The shell's convention for a run ended by SIGINT.
            Self::Interrupted => ExitCode::from(130),
        }
    }
}

/// True when `err` comes from writing to a closed pipe (`caption … | head`).
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
