//! Sidecar caption files for dataset work: `photo.jpg` -> `photo.txt` next to
//! it, written whole or not at all (a temporary file in the same folder,
//! renamed over the target), so an interrupted run never leaves half a caption.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// What to do when an image already has a sidecar (`--existing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Existing {
    /// Leave it, and report the image as failed: nothing is silently replaced.
    #[default]
    Refuse,
    /// Do not caption the image at all (resuming an interrupted run).
    Skip,
    /// Replace it.
    Overwrite,
    /// Keep its text and add the new caption after it, joined by ", ".
    Append,
    /// Keep its text and put the new caption before it, joined by ", ".
    Prepend,
}

/// What `append` and `prepend` put between the old text and the new
/// caption: the comma of comma-separated training captions.
pub const JOIN: &str = ", ";

/// The most of an existing sidecar that `append`/`prepend` read: a caption
/// file, not a document.
const MAX_EXISTING_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarOptions {
    /// The sidecar's extension, without the dot (`txt`).
    pub extension: String,
    pub existing: Existing,
    /// Text put before and after every caption (trigger words).
    pub prefix: String,
    pub suffix: String,
}

impl SidecarOptions {
    /// Refuses an extension [`Self::path_for`] cannot use: std's
    /// `with_extension` panics on a path separator, and an empty one, or one
    /// starting with a dot (`..`, `.txt`), names another file than
    /// `<stem>.<ext>`.
    pub fn check_extension(&self) -> Result<()> {
        let extension = &self.extension;
        let problem = if extension.is_empty() {
            "is empty"
        } else if extension.contains(['/', '\\']) || extension.contains(std::path::is_separator) {
            "contains a path separator"
        } else if extension.starts_with('.') {
            "starts with a dot"
        } else if extension.contains('\0') {
            "contains a NUL character"
        } else {
            return Ok(());
        };
        anyhow::bail!(
            "--sidecar-ext {:?} {problem}: give the extension alone, e.g. --sidecar-ext txt",
            extension
        )
    }

    /// `image` with its extension replaced: `a/photo.jpg` -> `a/photo.txt`.
    /// The extension must have passed [`Self::check_extension`].
    pub fn path_for(&self, image: &Path) -> PathBuf {
        image.with_extension(&self.extension)
    }

    /// The file's contents: prefix, caption, suffix, one line.
    pub fn contents(&self, caption: &str) -> String {
        format!("{}{caption}{}\n", self.prefix, self.suffix)
    }

    /// Writes the sidecar of `image`, whole, honouring [`Existing`]; returns
    /// the path written.
    pub fn write(&self, image: &Path, caption: &str) -> Result<PathBuf> {
        self.check_extension()?;
        let target = self.path_for(image);
        anyhow::ensure!(
            target != image,
            "the sidecar would replace the image itself: choose another --sidecar-ext"
        );
        let contents = match self.existing {
            Existing::Append | Existing::Prepend => self.combined(&target, caption)?,
            _ => self.contents(caption),
        };
        let replace = matches!(
            self.existing,
            Existing::Overwrite | Existing::Append | Existing::Prepend
        );
        write_whole(&target, contents.as_bytes(), replace)?;
        Ok(target)
    }

    /// `append`/`prepend`: the existing sidecar's text (its line ending
    /// dropped) and the new caption joined by [`JOIN`], or the caption alone
    /// where there is none yet.
    fn combined(&self, target: &Path, caption: &str) -> Result<String> {
        let new = self.contents(caption);
        let new = new.trim_end_matches('\n');
        let old = match std::fs::metadata(target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(format!("{new}\n")),
            Err(e) => return Err(e).with_context(|| format!("reading {}", target.display())),
            Ok(meta) => {
                anyhow::ensure!(
                    meta.is_file() && meta.len() <= MAX_EXISTING_BYTES,
                    "{} is not a caption file of at most 1 MiB: not adding to it",
                    target.display()
                );
                let text = std::fs::read_to_string(target)
                    .with_context(|| format!("reading {} (UTF-8 text)", target.display()))?;
                text.trim_end().to_string()
            }
        };
        Ok(match (old.is_empty(), self.existing) {
            (true, _) => format!("{new}\n"),
            (false, Existing::Prepend) => format!("{new}{JOIN}{old}\n"),
            (false, _) => format!("{old}{JOIN}{new}\n"),
        })
    }
}

/// Writes `bytes` to `target` through a temporary file in the same folder
/// (so the rename cannot cross file systems) and a rename. Without
/// `overwrite`, an existing target is an error and is left untouched, even if
/// it appears while we write.
pub fn write_whole(target: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    let folder = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !overwrite && target.exists() {
        anyhow::bail!(
            "{} already exists (use --overwrite or --skip-existing)",
            target.display()
        );
    }
    let mut temp = temp_file_in(folder)?;
    #[cfg(unix)]
    keep_existing_mode(&temp, target, overwrite)?;
    temp.write_all(bytes)
        .and_then(|()| temp.as_file().sync_all())
        .with_context(|| format!("writing {}", target.display()))?;
    let persisted = if overwrite {
        temp.persist(target).map(drop)
    } else {
        temp.persist_noclobber(target).map(drop)
    };
    persisted.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} already exists (use --overwrite or --skip-existing)",
                target.display()
            )
        } else {
            anyhow::Error::new(e.error).context(format!("writing {}", target.display()))
        }
    })
}

/// A temporary file in `folder`, created with the mode any new file gets
/// there: 0666 less the umask, as `File::create` would. tempfile's own
/// default, 0600, would make every sidecar private to its owner, unlike the
/// rest of a dataset.
fn temp_file_in(folder: &Path) -> Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(".caption-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // open(2) applies the umask to this mode, as for any new file.
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder
        .tempfile_in(folder)
        .with_context(|| format!("cannot write in {}", folder.display()))
}

/// When replacing `target`, gives the new file the old one's mode (not
/// subject to the umask), so `--overwrite` leaves permissions as they were.
#[cfg(unix)]
fn keep_existing_mode(
    temp: &tempfile::NamedTempFile,
    target: &Path,
    overwrite: bool,
) -> Result<()> {
    if !overwrite {
        return Ok(());
    }
    let Ok(existing) = std::fs::metadata(target) else {
        return Ok(()); // no file yet: the new one keeps the umask's mode
    };
    temp.as_file()
        .set_permissions(existing.permissions())
        .with_context(|| format!("giving {} its former mode", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_and_prepend_keep_the_old_text_and_join_the_new() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.jpg");
        let sidecar = dir.path().join("a.txt");
        let plain = |existing| SidecarOptions {
            prefix: String::new(),
            suffix: String::new(),
            ..options(existing)
        };
        // No sidecar yet: the caption alone.
        plain(Existing::Append).write(&image, "a cat").unwrap();
        assert_eq!(std::fs::read_to_string(&sidecar).unwrap(), "a cat\n");
        plain(Existing::Append).write(&image, "on a mat").unwrap();
        assert_eq!(
            std::fs::read_to_string(&sidecar).unwrap(),
            "a cat, on a mat\n"
        );
        // The new caption keeps its prefix and suffix (a trigger word first).
        options(Existing::Prepend).write(&image, "a tabby").unwrap();
        assert_eq!(
            std::fs::read_to_string(&sidecar).unwrap(),
            "sks, a tabby, photo, a cat, on a mat\n"
        );
        std::fs::write(&sidecar, [0xff, 0xfe]).unwrap();
        let err = plain(Existing::Append).write(&image, "x").unwrap_err();
        assert!(format!("{err:#}").contains("UTF-8"), "{err:#}");
        assert_eq!(std::fs::read(&sidecar).unwrap(), [0xff, 0xfe]);
    }

    fn options(existing: Existing) -> SidecarOptions {
        SidecarOptions {
            extension: "txt".into(),
            existing,
            prefix: "sks, ".into(),
            suffix: ", photo".into(),
        }
    }

    #[test]
    fn the_sidecar_sits_next_to_the_image_with_prefix_and_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("cat.v2.jpg");
        let written = options(Existing::Refuse).write(&image, "a cat").unwrap();
        assert_eq!(written, dir.path().join("cat.v2.txt"));
        assert_eq!(
            std::fs::read_to_string(&written).unwrap(),
            "sks, a cat, photo\n"
        );
        // Nothing else is left in the folder: the temporary file was renamed.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_existing_sidecar_is_refused_unless_overwriting() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.png");
        std::fs::write(dir.path().join("a.txt"), "mine\n").unwrap();
        let err = options(Existing::Refuse).write(&image, "new").unwrap_err();
        assert!(format!("{err:#}").contains("already exists"), "{err:#}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.txt")).unwrap(),
            "mine\n"
        );
        options(Existing::Overwrite).write(&image, "new").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.txt")).unwrap(),
            "sks, new, photo\n"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn extensions_that_name_another_file_are_refused() {
        for bad in ["", "a/b", "../x", "..", ".txt", "a\0b"] {
            let opts = SidecarOptions {
                extension: bad.into(),
                ..options(Existing::Refuse)
            };
            let err = opts.check_extension().unwrap_err().to_string();
            assert!(err.starts_with("--sidecar-ext"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        for good in ["txt", "caption.txt", "tags"] {
            let opts = SidecarOptions {
                extension: good.into(),
                ..options(Existing::Refuse)
            };
            assert!(opts.check_extension().is_ok(), "{good}");
        }
    }

    /// The mode `File::create` gives a new file in `dir` under this
    /// process's umask.
    #[cfg(unix)]
    fn new_file_mode(dir: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        let probe = dir.join("probe");
        std::fs::File::create(&probe).unwrap();
        let mode = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
        std::fs::remove_file(probe).unwrap();
        mode
    }

    #[cfg(unix)]
    #[test]
    fn a_new_sidecar_gets_the_mode_of_any_new_file_and_a_replaced_one_keeps_its_own() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let expected = new_file_mode(dir.path());
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        let image = dir.path().join("a.png");
        let written = options(Existing::Refuse).write(&image, "new").unwrap();
        assert_eq!(mode(&written), expected);
        // A mode the umask would never give, so keeping it cannot be luck.
        std::fs::set_permissions(&written, std::fs::Permissions::from_mode(0o604)).unwrap();
        options(Existing::Overwrite).write(&image, "again").unwrap();
        assert_eq!(mode(&written), 0o604);
    }

    #[test]
    fn a_sidecar_may_not_replace_its_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.txt");
        let opts = options(Existing::Overwrite);
        assert!(opts.write(&image, "x").is_err());
    }
}
