//! Sidecar caption files for dataset work: `photo.jpg` -> `photo.txt` next to
//! it, written whole or not at all (a temporary file in the same folder,
//! renamed over the target), so an interrupted run never leaves half a caption.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// What to do when an image already has a sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Existing {
    /// Leave it, and report the image as failed: nothing is silently replaced.
    #[default]
    Refuse,
    /// Do not caption the image at all (resuming an interrupted run).
    Skip,
    /// Replace it.
    Overwrite,
}

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
    /// `image` with its extension replaced: `a/photo.jpg` -> `a/photo.txt`.
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
        let target = self.path_for(image);
        anyhow::ensure!(
            target != image,
            "the sidecar would replace the image itself: choose another --sidecar-ext"
        );
        write_whole(
            &target,
            self.contents(caption).as_bytes(),
            self.existing == Existing::Overwrite,
        )?;
        Ok(target)
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
    let mut temp = tempfile::Builder::new()
        .prefix(".caption-")
        .suffix(".tmp")
        .tempfile_in(folder)
        .with_context(|| format!("cannot write in {}", folder.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_sidecar_may_not_replace_its_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.txt");
        let opts = options(Existing::Overwrite);
        assert!(opts.write(&image, "x").is_err());
    }
}
