//! The embedding index of `caption search`: each image's embedding, kept
//! in the cache under the model that made it and keyed by the file's
//! absolute path, size and modification time, so the next search of the
//! same folders embeds only new or changed images.
//!
//! One file per model, `<dir>/<model hash>.idx`, little-endian:
//!
//! ```text
//! b"CAPTIDX1"  dim: u32  count: u64
//! count x { path_len: u32, path bytes, size: u64, mtime_secs: i64, mtime_nanos: u32 }
//! count x dim x f32          the embeddings, one row per entry, in entry order
//! ```
//!
//! It is replaced whole (temporary file, fsync, rename), so a reader sees
//! the old index or the new one, never half of either. A file that does
//! not read back (cut short, another version, damaged) is ignored with a
//! note and rebuilt: it only ever saves work.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::inputs::FileStamp;

const MAGIC: &[u8; 8] = b"CAPTIDX1";

/// What identifies a file's content well enough to reuse its embedding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileKey {
    /// Absolute (not resolved through links), so `./photos` and
    /// `/home/me/photos` meet.
    pub path: PathBuf,
    pub stamp: FileStamp,
}

impl FileKey {
    /// The key of the file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let metadata = std::fs::metadata(path)?;
        let stamp = FileStamp::of(&metadata)
            .ok_or_else(|| std::io::Error::other("the file system keeps no modification times"))?;
        Ok(Self {
            path: std::path::absolute(path)?,
            stamp,
        })
    }
}

/// The embeddings one model made, by file.
#[derive(Debug)]
pub struct EmbeddingIndex {
    file: PathBuf,
    dim: usize,
    keys: Vec<FileKey>,
    /// `keys.len() x dim`.
    embeddings: Vec<f32>,
    by_path: HashMap<PathBuf, usize>,
    changed: bool,
}

impl EmbeddingIndex {
    /// The index of the model `model_identity` under `dir` (empty when
    /// there is none yet). The second value is a note for the user when a
    /// file was there but could not be read.
    pub fn open(dir: &Path, model_identity: &str, dim: usize) -> (Self, Option<String>) {
        let file = dir.join(format!(
            "{:016x}.idx",
            super::inputs::fnv1a64(model_identity.as_bytes())
        ));
        let mut index = Self {
            file,
            dim,
            keys: vec![],
            embeddings: vec![],
            by_path: HashMap::new(),
            changed: false,
        };
        let note = match std::fs::read(&index.file) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => Some(format!(
                "could not read the search index {}: {err}; embedding every image",
                index.file.display()
            )),
            Ok(bytes) => match index.read(&bytes) {
                Ok(()) => None,
                Err(err) => {
                    index.keys.clear();
                    index.embeddings.clear();
                    index.by_path.clear();
                    Some(format!(
                        "the search index {} is unreadable ({err:#}); rebuilding it",
                        index.file.display()
                    ))
                }
            },
        };
        (index, note)
    }

    pub fn path(&self) -> &Path {
        &self.file
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The embedding kept for `key`'s file, if its size and time still match.
    pub fn get(&self, key: &FileKey) -> Option<&[f32]> {
        let row = *self.by_path.get(&key.path)?;
        (self.keys[row] == *key).then(|| &self.embeddings[row * self.dim..(row + 1) * self.dim])
    }

    /// Keeps `embedding` for `key`'s file, replacing what was kept for it.
    pub fn insert(&mut self, key: FileKey, embedding: &[f32]) {
        if embedding.len() != self.dim {
            return;
        }
        self.changed = true;
        match self.by_path.get(&key.path) {
            Some(&row) => {
                self.embeddings[row * self.dim..(row + 1) * self.dim].copy_from_slice(embedding);
                self.keys[row] = key;
            }
            None => {
                self.by_path.insert(key.path.clone(), self.keys.len());
                self.keys.push(key);
                self.embeddings.extend_from_slice(embedding);
            }
        }
    }

    /// Writes the index if anything was added: whole, or not at all.
    pub fn save(&self) -> Result<()> {
        if !self.changed {
            return Ok(());
        }
        let dir = self.file.parent().context("the index has no folder")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut temp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        {
            let mut out = std::io::BufWriter::new(temp.as_file_mut());
            out.write_all(MAGIC)?;
            out.write_all(&(self.dim as u32).to_le_bytes())?;
            out.write_all(&(self.keys.len() as u64).to_le_bytes())?;
            for key in &self.keys {
                let path = path_bytes(&key.path);
                out.write_all(&(path.len() as u32).to_le_bytes())?;
                out.write_all(&path)?;
                out.write_all(&key.stamp.size.to_le_bytes())?;
                out.write_all(&key.stamp.modified.0.to_le_bytes())?;
                out.write_all(&key.stamp.modified.1.to_le_bytes())?;
            }
            for value in &self.embeddings {
                out.write_all(&value.to_le_bytes())?;
            }
            out.flush()?;
        }
        temp.as_file().sync_all()?;
        temp.persist(&self.file)
            .with_context(|| format!("replacing {}", self.file.display()))?;
        Ok(())
    }

    fn read(&mut self, bytes: &[u8]) -> Result<()> {
        let mut reader = Reader { bytes, at: 0 };
        anyhow::ensure!(reader.take(8)? == MAGIC, "not a caption search index");
        let dim = reader.u32()? as usize;
        anyhow::ensure!(
            dim == self.dim,
            "its embeddings have {dim} values, the model's {}",
            self.dim
        );
        let count = usize::try_from(reader.u64()?).context("too many entries")?;
        // Every entry takes at least 24 bytes and its embedding: a count
        // the file cannot hold is refused before anything is allocated.
        let least = count
            .checked_mul(24 + 4 * dim)
            .context("too many entries")?;
        anyhow::ensure!(least <= bytes.len(), "cut short");
        self.keys.reserve(count);
        for row in 0..count {
            let len = reader.u32()? as usize;
            let path = path_from_bytes(reader.take(len)?);
            let key = FileKey {
                path,
                stamp: FileStamp {
                    size: reader.u64()?,
                    modified: (reader.u64()? as i64, reader.u32()?),
                },
            };
            self.by_path.insert(key.path.clone(), row);
            self.keys.push(key);
        }
        let values = reader.take(count * dim * 4)?;
        anyhow::ensure!(reader.at == bytes.len(), "has bytes past its end");
        self.embeddings = values
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        anyhow::ensure!(self.by_path.len() == count, "names a file twice");
        Ok(())
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).context("cut short")?;
        let taken = self.bytes.get(self.at..end).context("cut short")?;
        self.at = end;
        Ok(taken)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
}

#[cfg(unix)]
fn path_bytes(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().to_vec()
}

#[cfg(unix)]
fn path_from_bytes(bytes: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

#[cfg(not(unix))]
fn path_bytes(path: &Path) -> Vec<u8> {
    path.to_string_lossy().into_owned().into_bytes()
}

#[cfg(not(unix))]
fn path_from_bytes(bytes: &[u8]) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(path: &str, size: u64) -> FileKey {
        FileKey {
            path: PathBuf::from(path),
            stamp: FileStamp {
                size,
                modified: (1_700_000_000, 5),
            },
        }
    }

    #[test]
    fn entries_round_trip_and_changed_files_miss() {
        let dir = tempfile::tempdir().unwrap();
        let (mut index, note) = EmbeddingIndex::open(dir.path(), "model-a", 3);
        assert!(note.is_none() && index.is_empty());
        index.insert(key("/p/a.jpg", 10), &[1.0, 2.0, 3.0]);
        index.insert(key("/p/b.jpg", 20), &[4.0, 5.0, 6.0]);
        index.insert(key("/p/a.jpg", 11), &[7.0, 8.0, 9.0]);
        index.save().unwrap();
        let (again, note) = EmbeddingIndex::open(dir.path(), "model-a", 3);
        assert!(note.is_none());
        assert_eq!(again.len(), 2);
        assert_eq!(again.get(&key("/p/a.jpg", 11)), Some(&[7.0, 8.0, 9.0][..]));
        assert_eq!(
            again.get(&key("/p/a.jpg", 10)),
            None,
            "an old size is a miss"
        );
        assert_eq!(again.get(&key("/p/b.jpg", 20)), Some(&[4.0, 5.0, 6.0][..]));
        // Another model has an index of its own.
        let (other, _) = EmbeddingIndex::open(dir.path(), "model-b", 3);
        assert!(other.is_empty());
    }

    #[test]
    fn damaged_files_are_ignored_with_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let (mut index, _) = EmbeddingIndex::open(dir.path(), "m", 2);
        index.insert(key("/p/a.jpg", 1), &[1.0, 2.0]);
        index.save().unwrap();
        let file = index.path().to_path_buf();
        let whole = std::fs::read(&file).unwrap();
        for cut in [0, 7, 12, 20, whole.len() - 1] {
            std::fs::write(&file, &whole[..cut]).unwrap();
            let (index, note) = EmbeddingIndex::open(dir.path(), "m", 2);
            assert!(index.is_empty(), "cut at {cut}");
            assert!(note.unwrap().contains("rebuilding"), "cut at {cut}");
        }
        // A count far past the file's size allocates nothing.
        let mut huge = whole.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&file, &huge).unwrap();
        assert!(EmbeddingIndex::open(dir.path(), "m", 2).1.is_some());
        // Another dimension (a different model under the same name).
        std::fs::write(&file, &whole).unwrap();
        assert!(EmbeddingIndex::open(dir.path(), "m", 3).1.is_some());
    }
}
