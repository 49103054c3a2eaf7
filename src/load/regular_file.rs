//! Opening a file that must be a regular one, without ever waiting on it.
//!
//! Opening a named pipe for reading blocks until some process opens it for
//! writing (forever, for a pipe nobody writes to), and reading a device may
//! never end; opening some devices even has effects of its own. So a path is
//! refused from its metadata, before it is opened, when it is anything but a
//! regular file. The open itself does not block either (`O_NONBLOCK`), and
//! the opened handle is checked again: a file swapped for a pipe between the
//! check and the open is refused too, not waited on.

use std::fs::{File, Metadata};
use std::io;
use std::path::Path;

/// What a path that is not a regular file is refused with (the reason shown
/// after its name).
pub const NOT_REGULAR: &str = "not a regular file";

/// `path` opened for reading, with its metadata, if it is a regular file
/// (symbolic links followed); anything else (a named pipe, a socket, a
/// device, a folder) is an error of kind `InvalidInput` saying
/// [`NOT_REGULAR`], and is not opened.
pub fn open(path: &Path) -> io::Result<(File, Metadata)> {
    // `fs::metadata` is a stat: it follows links and opens nothing.
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    open_checked(path)
}

/// The non-blocking open and the check of what was opened, for a path
/// already seen to be a regular file (which may have been replaced since).
fn open_checked(path: &Path) -> io::Result<(File, Metadata)> {
    let file = open_nonblocking(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    Ok((file, meta))
}

/// The most a model folder's text file (config, tokenizer, processor,
/// generation settings) may hold: the largest tokenizer.json on the Hub is
/// tens of MB; a file beyond this is no such file, and is not read into
/// memory.
pub const MAX_TEXT_BYTES: u64 = 512 << 20;

/// The whole of the regular file at `path` as UTF-8 text, refused unread
/// (not waited on, not loaded) when it is not a regular file or is larger
/// than [`MAX_TEXT_BYTES`].
pub fn read_text(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let (file, meta) = open(path)?;
    if meta.len() > MAX_TEXT_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} bytes is more than a model's text file may hold ({} MB)",
                meta.len(),
                MAX_TEXT_BYTES >> 20
            ),
        ));
    }
    let mut text = String::with_capacity(meta.len() as usize);
    // `take`: a file that grows while it is read still stops at the limit.
    file.take(MAX_TEXT_BYTES).read_to_string(&mut text)?;
    Ok(text)
}

fn not_regular() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, NOT_REGULAR)
}

/// `O_NONBLOCK` changes only how pipes and devices open and read: on a
/// regular file, the only kind [`open_checked`] keeps, reads wait for the
/// disk as usual.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn open_nonblocking(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Without `libc` (a dependency on Linux with glibc only) the metadata check
/// is the guard; only a file replaced by a pipe between check and open
/// could still block.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn open_nonblocking(path: &Path) -> io::Result<File> {
    File::open(path)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;
    use std::time::Duration;

    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Runs `open_fn` on `path` on a thread of its own and fails the test if
    /// it takes more than 10 s: a pipe nobody writes to would block it for
    /// ever (the blocked thread dies with the test process).
    fn within_a_timeout(
        path: &Path,
        open_fn: fn(&Path) -> io::Result<(File, Metadata)>,
    ) -> io::Result<(File, Metadata)> {
        let (done, result) = mpsc::channel();
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            let _ = done.send(open_fn(&path));
        });
        result
            .recv_timeout(Duration::from_secs(10))
            .expect("opening a named pipe blocked")
    }

    fn refused(result: io::Result<(File, Metadata)>) -> bool {
        result.is_err_and(|err| {
            err.kind() == io::ErrorKind::InvalidInput && err.to_string() == NOT_REGULAR
        })
    }

    #[test]
    fn only_regular_files_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.jpg");
        mkfifo(&fifo);
        let link = dir.path().join("link.jpg");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        let socket = dir.path().join("socket.jpg");
        let _listener = UnixListener::bind(&socket).unwrap();
        for path in [fifo.as_path(), &link, &socket, dir.path()] {
            assert!(refused(within_a_timeout(path, open)), "{}", path.display());
        }
        assert!(refused(open(Path::new("/dev/null"))));
        let regular = dir.path().join("photo.jpg");
        std::fs::write(&regular, b"bytes").unwrap();
        let (_, meta) = open(&regular).unwrap();
        assert_eq!(meta.len(), 5);
        let missing = open(&dir.path().join("missing.jpg")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    /// A path that passed the metadata check and is a pipe by the time it
    /// is opened: the open does not wait for a writer, and the opened
    /// handle is refused.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_pipe_swapped_in_after_the_check_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("swapped.png");
        mkfifo(&fifo);
        assert!(refused(within_a_timeout(&fifo, open_checked)));
    }
}
