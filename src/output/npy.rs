//! Embeddings as a NumPy `.npy` file (float32, one row per image) with the
//! images' paths beside it (`FILE.npy.paths`, one JSON string per line):
//! what `np.load` and a line reader take, for runs too large for JSON.
//!
//! Rows stream to temporary files; [`NpyWriter::finish`] writes the shape
//! into the header, syncs both files and renames them into place, so the
//! two always agree and neither is ever seen half-written.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tempfile::NamedTempFile;

/// The header's size: magic, version, length and a padded dict, room for
/// any shape (format 1.0 wants the total a multiple of 64).
const HEADER_BYTES: usize = 128;

pub struct NpyWriter {
    target: PathBuf,
    paths_target: PathBuf,
    rows: std::io::BufWriter<NamedTempFile>,
    paths: std::io::BufWriter<NamedTempFile>,
    dim: usize,
    count: u64,
}

impl NpyWriter {
    /// Starts `target` (and `target` + `.paths`) for rows of `dim` values.
    pub fn create(target: &Path, dim: usize) -> Result<Self> {
        let dir = match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let temp = || {
            NamedTempFile::new_in(dir)
                .with_context(|| format!("creating a temporary file in {}", dir.display()))
        };
        let mut rows = std::io::BufWriter::new(temp()?);
        // Room for the header, written for real by `finish`.
        rows.write_all(&[0u8; HEADER_BYTES])?;
        let mut paths_target = target.as_os_str().to_owned();
        paths_target.push(".paths");
        Ok(Self {
            target: target.to_path_buf(),
            paths_target: PathBuf::from(paths_target),
            rows,
            paths: std::io::BufWriter::new(temp()?),
            dim,
            count: 0,
        })
    }

    /// Appends one image's embedding.
    pub fn append(&mut self, path: &str, embedding: &[f32]) -> Result<()> {
        anyhow::ensure!(
            embedding.len() == self.dim,
            "an embedding of {} values in a file of {}",
            embedding.len(),
            self.dim
        );
        for value in embedding {
            self.rows.write_all(&value.to_le_bytes())?;
        }
        let mut line = serde_json::to_string(path)?;
        line.push('\n');
        self.paths.write_all(line.as_bytes())?;
        self.count += 1;
        Ok(())
    }

    /// Writes the header, syncs and renames both files into place; returns
    /// how many rows they hold.
    pub fn finish(self) -> Result<u64> {
        let mut rows = self.rows.into_inner().map_err(|e| e.into_error())?;
        rows.seek(SeekFrom::Start(0))?;
        rows.write_all(&header(self.count, self.dim))?;
        rows.as_file().sync_all()?;
        let paths = self.paths.into_inner().map_err(|e| e.into_error())?;
        paths.as_file().sync_all()?;
        paths
            .persist(&self.paths_target)
            .with_context(|| format!("writing {}", self.paths_target.display()))?;
        rows.persist(&self.target)
            .with_context(|| format!("writing {}", self.target.display()))?;
        Ok(self.count)
    }
}

/// The `.npy` 1.0 header of a little-endian float32 `[count, dim]` array,
/// padded with spaces to [`HEADER_BYTES`] and ended by a newline.
fn header(count: u64, dim: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({count}, {dim}), }}");
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    let len = (HEADER_BYTES - 10) as u16;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(HEADER_BYTES - 1, b' ');
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_paths_land_together() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.npy");
        let mut writer = NpyWriter::create(&target, 2).unwrap();
        writer.append("a.jpg", &[1.0, -2.5]).unwrap();
        writer.append("b\n.jpg", &[0.25, 3.0]).unwrap();
        assert!(writer.append("c.jpg", &[1.0]).is_err());
        assert!(!target.exists(), "nothing is in place before finish");
        assert_eq!(writer.finish().unwrap(), 2);
        let bytes = std::fs::read(&target).unwrap();
        assert_eq!(bytes.len(), HEADER_BYTES + 16);
        let header = String::from_utf8_lossy(&bytes[10..HEADER_BYTES]);
        assert!(header.contains("'shape': (2, 2)"), "{header}");
        assert!(header.ends_with('\n'));
        assert_eq!(
            &bytes[HEADER_BYTES..HEADER_BYTES + 4],
            &1.0f32.to_le_bytes()
        );
        let paths = std::fs::read_to_string(dir.path().join("out.npy.paths")).unwrap();
        assert_eq!(paths, "\"a.jpg\"\n\"b\\n.jpg\"\n");
    }
}
