//! The demo models built into the binary (`models/` in the repository, see
//! tools/make_demo_models.py): small models trained on a synthetic world of
//! coloured shapes, so the whole pipeline runs offline on a fresh machine.
//!
//! They are written out once to a cache folder and loaded from there like any
//! `--model DIR`, so they take exactly the path a downloaded model takes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// One embedded model folder.
pub struct Bundle {
    pub name: &'static str,
    /// A fingerprint of the files' names and bytes: names the extracted folder.
    pub digest: &'static str,
    pub files: &'static [(&'static str, &'static [u8])],
}

include!(concat!(env!("OUT_DIR"), "/bundled_models.rs"));

/// The embedded model called `name`.
pub fn get(name: &str) -> Option<&'static Bundle> {
    BUNDLED.iter().find(|b| b.name == name)
}

/// The folder holding bundled model `name`, written out on first use under
/// the cache folder ([`cache_dir`]).
pub fn folder(name: &str) -> Result<PathBuf> {
    let bundle =
        get(name).with_context(|| format!("this build has no bundled model called {name}"))?;
    extract(bundle, &cache_dir())
}

/// `<cache root>/bundled` ([`cache_root`]).
pub fn cache_dir() -> PathBuf {
    cache_root().join("bundled")
}

/// Our cache folder: `$XDG_CACHE_HOME/caption`, else `~/.cache/caption`,
/// else `caption` in the system's temporary folder.
pub fn cache_root() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let base = match (var("XDG_CACHE_HOME"), var("HOME")) {
        (Some(xdg), _) => PathBuf::from(xdg),
        (None, Some(home)) => PathBuf::from(home).join(".cache"),
        (None, None) => std::env::temp_dir(),
    };
    base.join("caption")
}

/// Writes `bundle` to `<root>/<name>-<digest>` unless it is already there.
/// The files go to a temporary folder first, renamed into place whole, so a
/// reader never sees a half-written model, and two processes racing both end
/// with the same complete folder.
pub fn extract(bundle: &Bundle, root: &Path) -> Result<PathBuf> {
    let target = root.join(format!("{}-{}", bundle.name, bundle.digest));
    if target.is_dir() {
        return Ok(target);
    }
    let fail = || format!("cannot write the bundled model to {}", root.display());
    std::fs::create_dir_all(root).with_context(fail)?;
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{}-", bundle.name))
        .tempdir_in(root)
        .with_context(fail)?;
    for (file_name, bytes) in bundle.files {
        std::fs::write(staging.path().join(file_name), bytes).with_context(fail)?;
    }
    match std::fs::rename(staging.path(), &target) {
        Ok(()) => {
            // The folder is in place: nothing left for the guard to delete.
            let _ = staging.keep();
            Ok(target)
        }
        // Another process put it there first; ours is dropped.
        Err(_) if target.is_dir() => Ok(target),
        Err(err) => Err(err).with_context(fail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static TOY: Bundle = Bundle {
        name: "toy",
        digest: "0123456789abcdef",
        files: &[("a.json", b"{}"), ("b.bin", &[1, 2, 3])],
    };

    #[test]
    fn extraction_writes_every_file_once_and_reuses_the_folder() {
        let root = tempfile::tempdir().unwrap();
        let dir = extract(&TOY, root.path()).unwrap();
        assert_eq!(dir, root.path().join("toy-0123456789abcdef"));
        assert_eq!(std::fs::read(dir.join("b.bin")).unwrap(), [1, 2, 3]);
        // A second call finds it; no staging folders are left behind.
        assert_eq!(extract(&TOY, root.path()).unwrap(), dir);
        let entries: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn an_unwritable_cache_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        let err = extract(&TOY, &file).unwrap_err();
        assert!(format!("{err:#}").contains("cannot write the bundled model"));
    }
}
