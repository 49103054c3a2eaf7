//! Turns the command line's image arguments into the list of files to caption.
//!
//! Each argument is a file (kept whatever its extension: the user named it), a
//! folder (its image files, found by extension), or `-`, which reads
//! newline-separated paths from standard input. Arguments that cannot be used
//! become [`InputProblem`]s, reported per input by the caller without stopping
//! the run. [`Shard`] splits the resulting list across machines or processes.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::load::regular_file;

/// File extensions (compared case-insensitively) that mark a file inside a
/// folder as an image. Files named explicitly are kept whatever their extension.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "png", "webp", "gif", "bmp", "tif", "tiff", "pnm", "pbm", "pgm",
    "ppm", "pam", "tga", "ico", "qoi", "hdr",
];

/// One image to caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The path as the user gave it, or for a file found in a folder the
    /// folder argument joined with the entry's relative path; used in output
    /// and error messages, and as the [`Shard`] key.
    pub shown: String,
    /// The path to open.
    pub path: PathBuf,
    /// The file's size and modification time when it was found (`None` for
    /// a URL): what the search index keys on, without a second `stat`.
    pub stamp: Option<FileStamp>,
    /// An image inside a WebDataset tar (`path` is the tar file): where it
    /// is ([`super::webdataset`]).
    pub member: Option<std::sync::Arc<TarMember>>,
}

impl Input {
    /// What `--shard` splits by: the tar file for a member of one (each job
    /// reads whole shards), else the path as shown.
    pub fn shard_key(&self) -> &str {
        match &self.member {
            Some(member) => &member.shard,
            None => &self.shown,
        }
    }
}

/// A file's size and modification time (seconds and nanoseconds since the
/// Unix epoch, negative before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub size: u64,
    pub modified: (i64, u32),
}

impl FileStamp {
    pub fn of(meta: &fs::Metadata) -> Option<Self> {
        let modified = match meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH) {
            Ok(after) => (after.as_secs() as i64, after.subsec_nanos()),
            Err(before) => {
                let d = before.duration();
                (-(d.as_secs() as i64), d.subsec_nanos())
            }
        };
        Some(Self {
            size: meta.len(),
            modified,
        })
    }
}

/// Where one image of a WebDataset shard is, and its sample's other
/// members ([`super::webdataset`] finds them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarMember {
    /// The shard as shown (the argument or the path found in a folder).
    pub shard: String,
    /// The sample's key: the member's path up to its file name's first `.`.
    pub key: String,
    /// The member's data: where it starts in the tar file, and its length.
    pub offset: u64,
    pub size: u64,
    /// The sample's `.json` and `.txt` members (offset, length), if any.
    pub json: Option<(u64, u64)>,
    pub txt: Option<(u64, u64)>,
}

/// Whether `path` names a tar file (by extension).
pub fn is_tar(path: &Path) -> bool {
    extension_is(path, &["tar"])
}

/// Whether `path` names a compressed tar file, which is not read.
pub fn is_compressed_tar(path: &Path) -> bool {
    let name = path.to_string_lossy().to_ascii_lowercase();
    [".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

fn extension_is(path: &Path, extensions: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// An argument (or an entry found while walking a folder) that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputProblem {
    /// The path as given or found, like [`Input::shown`].
    pub shown: String,
    /// The path's bytes, where they are not UTF-8 (see [`crate::output::path_bytes`]).
    pub path_bytes: Option<Vec<u8>>,
    /// Why it cannot be used, in one line (e.g. "no such file or directory").
    pub reason: String,
}

/// How [`collect`] treats folders.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CollectOptions {
    /// Descend into subfolders of folder arguments.
    pub recursive: bool,
}

/// Expands the image arguments into inputs, in argument order.
///
/// * A regular file is kept as is, whatever its extension: the user named it.
///   Anything else that is not a folder (a named pipe, a socket, a device,
///   `/dev/stdin` when it is a pipe) is a problem, "not a regular file":
///   opening a pipe waits for a writer, for ever if none comes, and a device
///   may never end. Only its metadata is read, never its contents.
/// * A folder yields its image files (by [`IMAGE_EXTENSIONS`],
///   case-insensitively), sorted by file name bytes; names starting with `.`
///   are skipped. With `opts.recursive`, subfolders are walked too, files and
///   subfolders interleaved in that same sorted order (depth first).
///   Symbolic links to files and folders are followed, but a folder already
///   walked for this argument (same canonical path) is not walked again, so
///   link loops terminate. An entry with an image extension that is a broken
///   link, or not a regular file, is a problem; without one, it is skipped
///   like any other file that is not an image.
///   A folder that yields no image files (and no other problem) is a problem.
/// * `-` reads newline-separated paths from `stdin` (a trailing `\r` is
///   trimmed, empty lines are skipped); each line is then treated like an
///   argument, folders included. `stdin` is read only once: a second `-` reads
///   nothing more.
///
/// Nothing is deduplicated: a file named twice, or reached through two
/// arguments, is listed twice.
pub fn collect(
    args: &[impl AsRef<OsStr>],
    mut stdin: impl BufRead,
    opts: &CollectOptions,
) -> (Vec<Input>, Vec<InputProblem>) {
    let mut out = Collected::default();
    for arg in args {
        let arg = arg.as_ref();
        if arg == "-" {
            read_list(&mut stdin, opts, &mut out);
        } else {
            // A name that is not UTF-8 is shown with U+FFFD in its place
            // and opened by its bytes.
            out.argument(arg.to_string_lossy().into_owned(), PathBuf::from(arg), opts);
        }
    }
    (out.inputs, out.problems)
}

/// An `http://` or `https://` address rather than a file.
pub fn is_url(arg: &str) -> bool {
    let lower = arg.get(..8).unwrap_or(arg).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

#[derive(Default)]
struct Collected {
    inputs: Vec<Input>,
    problems: Vec<InputProblem>,
}

impl Collected {
    /// `shown`: the path as given or found (shown lossily where it is not
    /// UTF-8; its bytes are kept too).
    fn problem(&mut self, shown: &Path, reason: impl Into<String>) {
        self.problems.push(InputProblem {
            shown: shown.display().to_string(),
            path_bytes: crate::output::path_bytes(shown),
            reason: reason.into(),
        });
    }

    /// One argument, from the command line or a stdin line.
    fn argument(&mut self, shown: String, path: PathBuf, opts: &CollectOptions) {
        if is_url(&shown) {
            // Fetched when its batch is loaded (see `crate::batch::fetch`).
            self.inputs.push(Input {
                shown,
                path,
                stamp: None,
                member: None,
            });
            return;
        }
        match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => self.folder(path, opts),
            Ok(meta) if meta.is_file() => self.inputs.push(Input {
                shown,
                path,
                stamp: FileStamp::of(&meta),
                member: None,
            }),
            Ok(_) => self.problem(&path, regular_file::NOT_REGULAR),
            Err(err) => {
                let reason = if is_broken_link(&path, &err) {
                    "broken symbolic link".to_string()
                } else {
                    describe(&err)
                };
                self.problem(&path, reason);
            }
        }
    }

    /// Walks a folder argument depth first with an explicit stack (no
    /// recursion, so deep trees cannot overflow the call stack).
    fn folder(&mut self, root: PathBuf, opts: &CollectOptions) {
        let (inputs_before, problems_before) = (self.inputs.len(), self.problems.len());
        let mut visited = HashSet::new();
        if let Ok(canonical) = fs::canonicalize(&root) {
            visited.insert(canonical);
        }
        // Entries are shown under the folder as it was named.
        let shown_root = root.clone();
        let entries = match sorted_entries(&root) {
            Ok(entries) => entries,
            Err(err) => {
                self.problem(
                    &shown_root,
                    format!("cannot read folder: {}", describe(&err)),
                );
                return;
            }
        };
        // Each level: the entries still to visit (reversed, so `pop` yields them
        // in sorted order) and the paths they are relative to.
        let mut stack = vec![(entries, root, shown_root.clone())];
        let mut skipped_subfolders = false;
        while let Some((entries, dir, shown_dir)) = stack.last_mut() {
            let Some(name) = entries.pop() else {
                stack.pop();
                continue;
            };
            if name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let path = dir.join(&name);
            let shown_path = shown_dir.join(&name);
            let meta = match fs::metadata(&path) {
                Ok(meta) => meta,
                Err(err) => {
                    let broken = is_broken_link(&path, &err);
                    // A dangling link that was not an image (a stale README link)
                    // is none of our business; one that was is a missing input.
                    if !broken || has_image_extension(&name) {
                        let reason = if broken {
                            "broken symbolic link".to_string()
                        } else {
                            describe(&err)
                        };
                        self.problem(&shown_path, reason);
                    }
                    continue;
                }
            };
            if meta.is_dir() {
                if !opts.recursive {
                    skipped_subfolders = true;
                    continue;
                }
                // Not walking a folder twice is what stops symlink loops.
                let canonical = fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                if !visited.insert(canonical) {
                    continue;
                }
                match sorted_entries(&path) {
                    Ok(entries) => stack.push((entries, path, shown_path)),
                    Err(err) => self.problem(
                        &shown_path,
                        format!("cannot read folder: {}", describe(&err)),
                    ),
                }
            } else if has_image_extension(&name) || is_tar_shard(&path) {
                self.image_entry(shown_path, path, &meta);
            }
            // Anything else (notes, sidecars, a socket some program keeps
            // here) is not ours to caption or to complain about.
        }
        if self.inputs.len() == inputs_before && self.problems.len() == problems_before {
            let reason = if skipped_subfolders {
                "folder holds no image files (only subfolders: add --recursive to descend)"
            } else {
                "folder holds no image files"
            };
            self.problem(&shown_root, reason);
        }
    }

    /// An entry named as an image, found in a folder: kept when it is a
    /// regular file; anything else is a problem, as a broken link with an
    /// image's name is, since the user expects it to be captioned.
    fn image_entry(&mut self, shown_path: PathBuf, path: PathBuf, meta: &fs::Metadata) {
        let shown = shown_path.display().to_string();
        if meta.is_file() {
            self.inputs.push(Input {
                shown,
                path,
                stamp: FileStamp::of(meta),
                member: None,
            });
        } else {
            self.problem(&shown_path, regular_file::NOT_REGULAR);
        }
    }
}

/// A WebDataset shard (read as a container of images), or a compressed one
/// (reported: it cannot be read in place).
fn is_tar_shard(path: &Path) -> bool {
    is_tar(path) || is_compressed_tar(path)
}

/// Reads the `-` list: one path per line.
fn read_list(stdin: &mut impl BufRead, opts: &CollectOptions, out: &mut Collected) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match stdin.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(err) => {
                out.problem(
                    Path::new("-"),
                    format!("cannot read standard input: {}", describe(&err)),
                );
                return;
            }
        }
        let mut bytes = line.as_slice();
        if let Some(rest) = bytes.strip_suffix(b"\n") {
            bytes = rest;
        }
        if let Some(rest) = bytes.strip_suffix(b"\r") {
            bytes = rest;
        }
        if bytes.is_empty() {
            continue;
        }
        match os_string_from_bytes(bytes.to_vec()) {
            Ok(name) => {
                let path = PathBuf::from(name);
                out.argument(path.display().to_string(), path, opts);
            }
            Err(lossy) => out.problem(
                Path::new(&lossy),
                "path on standard input is not valid UTF-8",
            ),
        }
    }
}

#[cfg(unix)]
fn os_string_from_bytes(bytes: Vec<u8>) -> Result<OsString, String> {
    use std::os::unix::ffi::OsStringExt;
    Ok(OsString::from_vec(bytes))
}

#[cfg(not(unix))]
fn os_string_from_bytes(bytes: Vec<u8>) -> Result<OsString, String> {
    String::from_utf8(bytes)
        .map(OsString::from)
        .map_err(|err| String::from_utf8_lossy(err.as_bytes()).into_owned())
}

/// A folder's entry names, sorted by their bytes and then reversed (the walk
/// pops from the end).
fn sorted_entries(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names = fs::read_dir(dir)?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    names.sort_unstable_by(|a, b| b.as_encoded_bytes().cmp(a.as_encoded_bytes()));
    Ok(names)
}

fn has_image_extension(name: &OsStr) -> bool {
    Path::new(name)
        .extension()
        .and_then(OsStr::to_str)
        .is_some_and(|ext| {
            IMAGE_EXTENSIONS
                .iter()
                .any(|known| known.eq_ignore_ascii_case(ext))
        })
}

/// A path whose target is missing although the link itself exists.
fn is_broken_link(path: &Path, err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound
        && fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_symlink())
}

/// An I/O error as a short lowercase phrase, without the "(os error N)" tail.
pub(crate) fn describe(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::NotFound => "no such file or directory".to_string(),
        io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => {
            let text = err.to_string();
            match text.rfind(" (os error ") {
                Some(at) => text[..at].to_string(),
                None => text,
            }
        }
    }
}

/// One of `count` disjoint parts of the inputs, numbered from 1: `--shard 1/4`
/// through `--shard 4/4` together cover every input exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    /// Which part, 1 to `count`.
    pub index: u64,
    /// How many parts, at least 1.
    pub count: u64,
}

impl Shard {
    /// Whether this shard captions the input shown as `shown`
    /// ([`Input::shown`]): `fnv1a64(shown) % count == index - 1`.
    ///
    /// The decision depends only on that string, so it is the same on every
    /// machine and run; the same file given as `./a.jpg` and as `a.jpg` counts
    /// as two different strings.
    pub fn takes(&self, shown: &str) -> bool {
        fnv1a64(shown.as_bytes()) % self.count == self.index - 1
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Why a `--shard` value is not `K/N` with `1 <= K <= N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseShardError(String);

impl ParseShardError {
    pub(crate) fn new(message: String) -> Self {
        ParseShardError(message)
    }
}

impl FromStr for Shard {
    type Err = ParseShardError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |message: String| Err(ParseShardError(message));
        let Some((index, count)) = text.split_once('/') else {
            return fail(format!(
                "expected K/N (shard K of N, e.g. 1/4), got `{text}`"
            ));
        };
        let number = |part: &str, what: &str| {
            part.trim().parse::<u64>().map_err(|_| {
                ParseShardError(format!(
                    "expected K/N (shard K of N, e.g. 1/4), got `{text}`: {what} `{}` is not a whole number",
                    part.trim()
                ))
            })
        };
        let index = number(index, "K")?;
        let count = number(count, "N")?;
        if count == 0 {
            return fail(format!(
                "shard `{text}`: N (the number of shards) must be at least 1"
            ));
        }
        if index == 0 {
            return fail(format!(
                "shard `{text}`: shards are numbered from 1, so K must be 1 to {count}"
            ));
        }
        if index > count {
            return fail(format!(
                "shard `{text}`: there are only {count} shards, so K must be 1 to {count}"
            ));
        }
        Ok(Shard { index, count })
    }
}

/// 64-bit FNV-1a of `bytes`: the hash [`Shard::takes`] splits inputs by.
///
/// Fixed forever: changing it would move inputs between shards, so runs split
/// with different versions (or on different machines) would overlap or miss
/// files. The tests pin its values.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(path, b"x").unwrap();
    }

    fn arg(path: &Path) -> String {
        path.to_str().unwrap().to_string()
    }

    fn run(args: &[String], stdin: &str, recursive: bool) -> (Vec<Input>, Vec<InputProblem>) {
        collect(args, stdin.as_bytes(), &CollectOptions { recursive })
    }

    /// The shown paths relative to `root`'s shown form.
    fn shown_under(inputs: &[Input], root: &Path) -> Vec<String> {
        let prefix = format!("{}/", root.display());
        inputs
            .iter()
            .map(|input| {
                assert_eq!(input.shown, input.path.display().to_string());
                input.shown.strip_prefix(&prefix).unwrap().to_string()
            })
            .collect()
    }

    #[test]
    fn folder_sorted_by_name_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "b.jpg", "a.png", "B.gif", "a10.jpg", "a2.jpg", "é.jpg", "_.jpg",
        ] {
            touch(&dir.path().join(name));
        }
        let (inputs, problems) = run(&[arg(dir.path())], "", false);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            shown_under(&inputs, dir.path()),
            ["B.gif", "_.jpg", "a.png", "a10.jpg", "a2.jpg", "b.jpg", "é.jpg"]
        );
    }

    #[test]
    fn extension_filter_is_case_insensitive() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "a.JPG",
            "b.Jpeg",
            "c.PNG",
            "d.webp",
            "e.TIFF",
            "f.qoi",
            "g.HDR",
            "h.txt",
            "i.json",
            "jpg",
            "k.jpg.bak",
            "l.pdf",
        ] {
            touch(&dir.path().join(name));
        }
        let (inputs, problems) = run(&[arg(dir.path())], "", false);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            shown_under(&inputs, dir.path()),
            ["a.JPG", "b.Jpeg", "c.PNG", "d.webp", "e.TIFF", "f.qoi", "g.HDR"]
        );
    }

    #[test]
    fn hidden_entries_skipped() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join(".hidden.jpg"));
        touch(&dir.path().join(".thumbs/x.jpg"));
        touch(&dir.path().join("seen.jpg"));
        let (inputs, problems) = run(&[arg(dir.path())], "", true);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(shown_under(&inputs, dir.path()), ["seen.jpg"]);
        // Named explicitly, a hidden file is kept.
        let hidden = arg(&dir.path().join(".hidden.jpg"));
        let (inputs, _) = run(std::slice::from_ref(&hidden), "", false);
        assert_eq!(inputs[0].shown, hidden);
    }

    #[test]
    fn recursive_walk_interleaves_files_and_folders() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "a.jpg",
            "b/x.jpg",
            "b/c/y.png",
            "b/z.jpg",
            "c.jpg",
            "d/e.png",
        ] {
            touch(&dir.path().join(name));
        }
        let (inputs, problems) = run(&[arg(dir.path())], "", false);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(shown_under(&inputs, dir.path()), ["a.jpg", "c.jpg"]);

        let (inputs, problems) = run(&[arg(dir.path())], "", true);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            shown_under(&inputs, dir.path()),
            [
                "a.jpg",
                "b/c/y.png",
                "b/x.jpg",
                "b/z.jpg",
                "c.jpg",
                "d/e.png"
            ]
        );
    }

    #[test]
    fn empty_folder_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("notes.txt"));
        touch(&dir.path().join("sub/a.jpg"));
        let (inputs, problems) = run(&[arg(dir.path())], "", false);
        assert!(inputs.is_empty());
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].shown, arg(dir.path()));
        assert!(problems[0].reason.contains("--recursive"), "{problems:?}");

        let empty = tempfile::tempdir().unwrap();
        let (_, problems) = run(&[arg(empty.path())], "", true);
        assert_eq!(problems[0].reason, "folder holds no image files");
    }

    #[test]
    fn argument_order_kept() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("z.jpg"));
        touch(&dir.path().join("f/b.jpg"));
        touch(&dir.path().join("f/a.jpg"));
        let args = [arg(&dir.path().join("z.jpg")), arg(&dir.path().join("f"))];
        let (inputs, problems) = run(&args, "", false);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            shown_under(&inputs, dir.path()),
            ["z.jpg", "f/a.jpg", "f/b.jpg"]
        );
    }

    #[cfg(unix)]
    #[test]
    fn symlink_loops_terminate() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        touch(&root.join("a.jpg"));
        touch(&root.join("sub/b.jpg"));
        symlink(&root, root.join("sub/loop")).unwrap(); // back to the top
        symlink(root.join("sub"), root.join("sub/self")).unwrap(); // to itself
        symlink(root.join("sub"), root.join("again")).unwrap(); // a sibling, seen later
        let (inputs, problems) = run(&[arg(&root)], "", true);
        assert!(problems.is_empty(), "{problems:?}");
        // "again" sorts before "sub", so the sibling link is walked and "sub" is not.
        assert_eq!(shown_under(&inputs, &root), ["a.jpg", "again/b.jpg"]);
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_followed_and_broken_ones_reported() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        touch(&elsewhere.join("pic.png"));
        touch(&elsewhere.join("deep/q.jpg"));
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        symlink(elsewhere.join("pic.png"), root.join("link.png")).unwrap();
        symlink(elsewhere.join("deep"), root.join("linked")).unwrap();
        symlink(dir.path().join("gone.jpg"), root.join("broken.jpg")).unwrap();
        symlink(dir.path().join("gone.txt"), root.join("broken.txt")).unwrap();
        let (inputs, problems) = run(&[arg(&root)], "", true);
        assert_eq!(shown_under(&inputs, &root), ["link.png", "linked/q.jpg"]);
        assert_eq!(
            problems,
            [InputProblem {
                shown: arg(&root.join("broken.jpg")),
                path_bytes: None,
                reason: "broken symbolic link".into()
            }]
        );
        // Given explicitly, a broken link says so too.
        let (_, problems) = run(&[arg(&root.join("broken.txt"))], "", false);
        assert_eq!(problems[0].reason, "broken symbolic link");
    }

    #[test]
    fn stdin_list_with_folders_blank_lines_and_crlf() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("one.jpg"));
        touch(&dir.path().join("with space.png"));
        touch(&dir.path().join("folder/b.jpg"));
        touch(&dir.path().join("folder/a.jpg"));
        touch(&dir.path().join("last.jpg"));
        let d = dir.path().display();
        let stdin = format!(
            "{d}/one.jpg\r\n\n\r\n{d}/folder\n{d}/with space.png\r\n{d}/missing.jpg\n{d}/last.jpg"
        );
        let args = ["-".to_string(), arg(&dir.path().join("one.jpg"))];
        let (inputs, problems) = run(&args, &stdin, false);
        assert_eq!(
            shown_under(&inputs, dir.path()),
            [
                "one.jpg",
                "folder/a.jpg",
                "folder/b.jpg",
                "with space.png",
                "last.jpg",
                "one.jpg"
            ]
        );
        assert_eq!(
            problems,
            [InputProblem {
                shown: format!("{d}/missing.jpg"),
                path_bytes: None,
                reason: "no such file or directory".into()
            }]
        );
    }

    #[test]
    fn missing_path_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("real.jpg"));
        let missing = arg(&dir.path().join("nope.jpg"));
        let args = [missing.clone(), arg(&dir.path().join("real.jpg"))];
        let (inputs, problems) = run(&args, "", false);
        assert_eq!(shown_under(&inputs, dir.path()), ["real.jpg"]);
        assert_eq!(
            problems,
            [InputProblem {
                shown: missing,
                path_bytes: None,
                reason: "no such file or directory".into()
            }]
        );
    }

    #[test]
    fn explicit_non_image_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let notes = dir.path().join("scan.txt");
        touch(&notes);
        let (inputs, problems) = run(&[arg(&notes)], "", false);
        assert!(problems.is_empty());
        assert_eq!(
            inputs,
            [Input {
                shown: arg(&notes),
                stamp: FileStamp::of(&fs::metadata(&notes).unwrap()),
                path: notes,
                member: None,
            }]
        );
    }

    #[cfg(unix)]
    fn mkfifo(path: &Path) {
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(made.success());
    }

    /// Named pipes, sockets and devices, named on the command line, listed on
    /// stdin or reached through a link, are problems of their own (they used
    /// to be kept, and opening the pipe then blocked for ever); the regular
    /// files beside them are kept.
    #[cfg(unix)]
    #[test]
    fn named_special_files_are_not_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.jpg");
        mkfifo(&fifo);
        let link = dir.path().join("link.png");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        let socket = dir.path().join("socket.png");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let listed = dir.path().join("listed.jpg");
        mkfifo(&listed);
        touch(&dir.path().join("real.jpg"));
        let args = [
            arg(&fifo),
            arg(&link),
            arg(&socket),
            "/dev/null".to_string(),
            "-".to_string(),
            arg(&dir.path().join("real.jpg")),
        ];
        let (inputs, problems) = run(&args, &format!("{}\n", listed.display()), false);
        assert_eq!(shown_under(&inputs, dir.path()), ["real.jpg"]);
        let refused: Vec<&str> = problems.iter().map(|p| p.shown.as_str()).collect();
        let expected = [
            arg(&fifo),
            arg(&link),
            arg(&socket),
            "/dev/null".into(),
            arg(&listed),
        ];
        assert_eq!(refused, expected);
        assert!(
            problems.iter().all(|p| p.reason == "not a regular file"),
            "{problems:?}"
        );
    }

    /// In a folder, a special file with an image's name is a problem (the
    /// user expects it captioned, as with a broken link), and one without is
    /// skipped like any other file that is not an image.
    #[cfg(unix)]
    #[test]
    fn special_files_in_a_folder_are_reported_when_named_as_images() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("a.jpg"));
        mkfifo(&dir.path().join("b.png"));
        fs::create_dir(dir.path().join("sub")).unwrap();
        mkfifo(&dir.path().join("sub/c.jpg"));
        mkfifo(&dir.path().join("control"));
        let _listener =
            std::os::unix::net::UnixListener::bind(dir.path().join("agent.sock")).unwrap();
        let (inputs, problems) = run(&[arg(dir.path())], "", true);
        assert_eq!(shown_under(&inputs, dir.path()), ["a.jpg"]);
        assert_eq!(
            problems,
            ["b.png", "sub/c.jpg"].map(|name| InputProblem {
                shown: arg(&dir.path().join(name)),
                path_bytes: None,
                reason: "not a regular file".into()
            })
        );
        // A folder holding nothing but a pipe named as an image says so, not
        // "folder holds no image files".
        let lone = tempfile::tempdir().unwrap();
        mkfifo(&lone.path().join("only.jpg"));
        let (_, problems) = run(&[arg(lone.path())], "", false);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].reason, "not a regular file");
    }

    #[test]
    fn shard_parsing() {
        assert_eq!(
            "1/4".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 4 }
        );
        assert_eq!(
            "4/4".parse::<Shard>().unwrap(),
            Shard { index: 4, count: 4 }
        );
        assert_eq!(
            "1/1".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 1 }
        );
        assert_eq!("3/7".parse::<Shard>().unwrap().to_string(), "3/7");
        for (text, needle) in [
            ("0/4", "numbered from 1"),
            ("5/4", "only 4 shards"),
            ("1/0", "at least 1"),
            ("0/0", "at least 1"),
            ("junk", "expected K/N"),
            ("", "expected K/N"),
            ("1/", "not a whole number"),
            ("a/4", "not a whole number"),
            ("-1/4", "not a whole number"),
            ("1/4/2", "not a whole number"),
            ("1.5/4", "not a whole number"),
        ] {
            let err = text.parse::<Shard>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn hash_is_pinned() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // Shard keys that must never move.
        assert_eq!(fnv1a64("photos/cat.jpg".as_bytes()), 0x4664_4eaa_9e47_eeb2);
        assert_eq!(
            fnv1a64("Ürlaub/Strand 01.JPG".as_bytes()),
            0x11fc_3b49_2e00_2f59
        );
    }

    #[test]
    fn shards_partition_and_balance() {
        let names: Vec<String> = (0..1000)
            .map(|i| format!("photos/IMG_{i:04}.jpg"))
            .collect();
        for count in [1, 2, 3, 4, 7, 10] {
            let mut owner = vec![None; names.len()];
            for index in 1..=count {
                let shard = Shard { index, count };
                let mut size = 0;
                for (i, name) in names.iter().enumerate() {
                    if shard.takes(name) {
                        assert_eq!(owner[i], None, "{name} in two shards of {count}");
                        owner[i] = Some(index);
                        size += 1;
                    }
                }
                let fair = names.len() as f64 / count as f64;
                assert!(
                    (size as f64 - fair).abs() <= 0.3 * fair,
                    "shard {shard} has {size} of {}",
                    names.len()
                );
            }
            assert!(
                owner.iter().all(Option::is_some),
                "{count} shards miss some"
            );
        }
    }
}
