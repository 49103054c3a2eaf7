//! The pack cache's folder as a whole: the temporary files packs are
//! written under (and those of writers that died), the room left on the
//! disk, and the size limit, kept by evicting the least recently used
//! packs. [`super::weight_cache`] is one pack's reading and writing.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::regular_file;

/// Temporary files are named `.pack-*`; one left unmodified this long is a
/// write that will never finish (its process was killed, or the machine
/// went down): a live writer modifies its file all along (BLIP-2's 15 GB
/// took under a minute in all).
pub(super) const TEMP_PREFIX: &str = ".pack-";
pub(super) const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Deletes the temporary files in `dir` untouched for `age`: a killed
/// writer's leftovers, as large as a model, would otherwise stay forever.
pub(super) fn remove_abandoned_temp_files(dir: &Path, age: std::time::Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            continue;
        }
        let idle = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .unwrap_or_default();
        if idle >= age || (idle >= LOCK_GRACE && nobody_writes(&entry.path())) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A writer locks its temporary file right after making it; one this old
/// and unlocked has no writer left.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether no process holds the lock of the temporary file at `path`
/// (its writer died: a lock does not outlive its process). False where
/// that cannot be known (no locks on this file system, not a file).
fn nobody_writes(path: &Path) -> bool {
    match regular_file::open(path) {
        // Our lock goes with `file`, at once.
        Ok((file, _)) => file.try_lock().is_ok(),
        Err(_) => false,
    }
}

/// Deletes the packs in `kept`'s folder other than `kept`, least recently
/// used first, until all of them, `kept` included, take at most `limit`
/// bytes. Best effort: a file that cannot be read or removed is left.
pub(super) fn evict_least_recently_used(kept: &Path, limit: u64) {
    let Some(dir) = kept.parent() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut packs: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|e| e == "pack"))
        .filter_map(|entry| {
            let meta = entry.metadata().ok().filter(|m| m.is_file())?;
            let used = meta.accessed().or_else(|_| meta.modified()).ok()?;
            Some((used, meta.len(), entry.path()))
        })
        .collect();
    // Newest first; the kept file before all.
    packs.sort_by_key(|(used, _, path)| std::cmp::Reverse((path == kept, *used)));
    let mut total = 0u64;
    let mut full = false;
    for (_, len, path) in packs {
        if path == kept {
            total = len;
        } else if !full && total.saturating_add(len) <= limit {
            total += len;
        } else {
            // Strictly by age: once one does not fit, no older one stays.
            full = true;
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The temporary files this process is writing. A process that exits on
/// Ctrl-C mid-load runs no destructors, so their `TempPath`s cannot delete
/// them: [`remove_temp_files`] does, before it exits.
static TEMP_FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A temporary file's path in [`TEMP_FILES`], for as long as this lives.
pub(super) struct ListedTempFile(PathBuf);

impl ListedTempFile {
    pub(super) fn new(path: PathBuf) -> Self {
        temp_files().push(path.clone());
        Self(path)
    }
}

impl Drop for ListedTempFile {
    fn drop(&mut self) {
        temp_files().retain(|path| *path != self.0);
    }
}

pub(super) fn temp_files() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    TEMP_FILES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Deletes the temporary files this process is writing into any pack
/// cache, for a process about to exit in the middle of a load (on Ctrl-C):
/// each is as large as its model, and nothing else would remove it before
/// [`ABANDONED_AFTER`]. A load still writing one can no longer save it.
pub fn remove_temp_files() {
    remove_listed_temp_files(|_| true);
}

/// Deletes the listed temporary files that `which` picks.
pub(super) fn remove_listed_temp_files(which: impl Fn(&Path) -> bool) {
    temp_files().retain(|path| {
        let picked = which(path);
        if picked {
            let _ = std::fs::remove_file(path);
        }
        !picked
    });
}

/// Whether writing `needed` bytes leaves the disk its reserve: a cache
/// must never be what fills the disk a user's captions are written to.
pub(super) fn leaves_room(needed: u64, available: u64, total: u64) -> bool {
    available
        .checked_sub(needed)
        .is_some_and(|left| left >= reserve(total))
}

/// What a cache file must leave free: 5% of the disk, at least 1 GiB.
pub(super) fn reserve(total: u64) -> u64 {
    (total / 20).max(1 << 30)
}

/// Bytes available to us and the disk's size, for the file system holding `dir`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(super) fn disk_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct we own from a NUL-terminated path.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return None;
    }
    let block = stats.f_frsize as u64;
    Some((stats.f_bavail as u64 * block, stats.f_blocks as u64 * block))
}

/// Elsewhere the write itself reports a full disk.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) fn disk_space(_dir: &Path) -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_leaves_the_disk_its_reserve() {
        const GB: u64 = 1 << 30;
        // 5% of a large disk, 1 GiB of a small one.
        assert!(leaves_room(GB, 7 * GB, 100 * GB));
        assert!(!leaves_room(GB, 5 * GB, 100 * GB));
        assert!(leaves_room(GB, 2 * GB + 1, 4 * GB));
        assert!(!leaves_room(GB, 2 * GB - 1, 4 * GB));
        assert!(!leaves_room(3 * GB, 2 * GB, 100 * GB));
        let (available, total) = disk_space(Path::new(".")).unwrap_or((1, 1));
        assert!(available <= total);
    }

    #[test]
    fn only_abandoned_temporary_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(".pack-killed");
        let fresh = dir.path().join(".pack-writing");
        let cache = dir.path().join("model-0123.pack");
        for path in [&old, &fresh, &cache] {
            std::fs::write(path, b"x").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - 2 * ABANDONED_AFTER;
        for path in [&old, &cache] {
            let file = std::fs::File::options().write(true).open(path).unwrap();
            file.set_modified(two_hours_ago).unwrap();
        }
        remove_abandoned_temp_files(dir.path(), ABANDONED_AFTER);
        assert!(!old.exists());
        assert!(
            fresh.exists(),
            "a write in progress elsewhere is left alone"
        );
        assert!(cache.exists(), "cache files are not temporary files");
    }

    /// The reproduction: SIGKILLed writers left their temporary
    /// files (2.5 GB after 8 kills) until the hour-long age rule removed
    /// them. A writer's lock dies with it, so an unlocked temporary file a
    /// few seconds old is removed at once; a locked one, however old its
    /// last write, or one just made (not locked yet) stays.
    #[test]
    fn a_temporary_file_nobody_holds_locked_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let [dead, alive, just_made] =
            [".pack-dead", ".pack-alive", ".pack-new"].map(|name| dir.path().join(name));
        for path in [&dead, &alive, &just_made] {
            std::fs::write(path, b"x").unwrap();
        }
        let a_minute_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        for path in [&dead, &alive] {
            let file = std::fs::File::options().write(true).open(path).unwrap();
            file.set_modified(a_minute_ago).unwrap();
        }
        // Held as a live writer holds it (another open of the file, so the
        // cleaner's own open cannot share the lock).
        let writer = std::fs::File::open(&alive).unwrap();
        writer.try_lock().unwrap();
        remove_abandoned_temp_files(dir.path(), ABANDONED_AFTER);
        assert!(!dead.exists(), "its writer is gone");
        assert!(alive.exists(), "its writer holds the lock");
        assert!(just_made.exists(), "its writer may not have locked it yet");
        drop(writer);
        remove_abandoned_temp_files(dir.path(), ABANDONED_AFTER);
        assert!(!alive.exists(), "the lock went with its holder");
    }

    /// Packs were never removed. Beyond the size limit the least recently
    /// used go first, strictly by age, and the one in use always stays.
    #[test]
    fn the_least_recently_used_packs_beyond_the_limit_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let hours_ago =
            |h: u64| std::time::SystemTime::now() - std::time::Duration::from_secs(3600 * h);
        let packs: Vec<PathBuf> = (1..=4)
            .map(|h| {
                let path = dir.path().join(format!("used-{h}h-ago.pack"));
                std::fs::write(&path, [0u8; 100]).unwrap();
                let file = std::fs::File::open(&path).unwrap();
                file.set_times(std::fs::FileTimes::new().set_accessed(hours_ago(h)))
                    .unwrap();
                path
            })
            .collect();
        let temp = dir.path().join(".pack-writing");
        std::fs::write(&temp, [0u8; 1000]).unwrap();
        // In use: the oldest. Room for it and one more.
        evict_least_recently_used(&packs[3], 250);
        let left: Vec<bool> = packs.iter().map(|p| p.exists()).collect();
        assert_eq!(left, [true, false, false, true]);
        assert!(
            temp.exists(),
            "temporary files are not the cache's to evict"
        );
        evict_least_recently_used(&packs[0], 50);
        assert!(
            packs[0].exists(),
            "the pack in use stays even over the limit"
        );
        assert!(!packs[3].exists());
    }
}
