//! `--output-dir DIR`: one output file per WebDataset shard
//! (`shards/00012.tar` → `DIR/00012.jsonl`), so a job that stops part-way
//! leaves whole files for the shards it finished, and a re-run skips them.
//!
//! A shard's records go into a temporary file in DIR; once every image of
//! the shard has its records, the file is flushed to the disk and renamed
//! into place. A file there is therefore always complete. A shard that is
//! damaged (a problem reported for the tar itself) or left unfinished (a
//! stopped run) gets no file, and a re-run does it again.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use super::{Format, Record, RecordWriter, TextColumns};

/// The file `shard` (a tar's path as shown) writes to in `dir`: its name
/// without `.tar`, with the format's extension.
pub fn output_path(dir: &Path, shard: &str, format: Format) -> PathBuf {
    let name = Path::new(shard)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| shard.to_string());
    let stem = match name.len().checked_sub(4) {
        Some(cut) if name.is_char_boundary(cut) && name[cut..].eq_ignore_ascii_case(".tar") => {
            &name[..cut]
        }
        _ => name.as_str(),
    };
    dir.join(format!("{stem}.{}", extension(format)))
}

fn extension(format: Format) -> &'static str {
    match format {
        Format::Text => "txt",
        Format::Jsonl => "jsonl",
        Format::Json => "json",
        Format::Csv => "csv",
        Format::Tsv => "tsv",
        Format::Parquet => "parquet",
    }
}

struct OpenShard {
    temp: tempfile::NamedTempFile,
    writer: Box<dyn RecordWriter>,
    /// Images whose records have come.
    seen: HashSet<String>,
}

/// A [`RecordWriter`] that sorts records into their shard's file.
pub struct ShardFiles {
    dir: PathBuf,
    format: Format,
    columns: TextColumns,
    /// How many images each shard holds.
    expected: HashMap<String, usize>,
    /// Shards reported damaged: never written.
    broken: HashSet<String>,
    open: HashMap<String, OpenShard>,
    /// The last record's shard and image: a shard is closed once a record
    /// of another image comes (an image's records are consecutive).
    last: Option<(String, String)>,
    /// The files written, in order.
    pub written: Vec<PathBuf>,
}

impl ShardFiles {
    /// `expected`: each shard (as shown) and how many images it holds.
    pub fn new(
        dir: &Path,
        format: Format,
        columns: TextColumns,
        expected: HashMap<String, usize>,
    ) -> Self {
        ShardFiles {
            dir: dir.to_path_buf(),
            format,
            columns,
            expected,
            broken: HashSet::new(),
            open: HashMap::new(),
            last: None,
            written: Vec::new(),
        }
    }

    fn shard_writer(&mut self, shard: &str) -> io::Result<&mut OpenShard> {
        if !self.open.contains_key(shard) {
            let temp = tempfile::Builder::new()
                .prefix(".caption-")
                .suffix(".tmp")
                .tempfile_in(&self.dir)?;
            let out = BufWriter::new(temp.as_file().try_clone()?);
            let writer = super::writer(self.format, out, self.columns)?;
            let open = OpenShard {
                temp,
                writer,
                seen: HashSet::new(),
            };
            self.open.insert(shard.to_string(), open);
        }
        Ok(self.open.get_mut(shard).expect("just opened"))
    }

    /// Closes `shard` into its file if all its images are in.
    fn close_if_complete(&mut self, shard: &str) -> io::Result<()> {
        let complete = match (self.open.get(shard), self.expected.get(shard)) {
            (Some(open), Some(&expected)) => open.seen.len() >= expected,
            _ => false,
        };
        if !complete || self.broken.contains(shard) {
            return Ok(());
        }
        let mut open = self.open.remove(shard).expect("an open shard");
        open.writer.finish()?;
        drop(open.writer);
        open.temp.as_file().sync_all()?;
        let target = output_path(&self.dir, shard, self.format);
        open.temp.persist(&target).map_err(|e| e.error)?;
        self.written.push(target);
        Ok(())
    }
}

impl RecordWriter for ShardFiles {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        let Some(sample) = &record.sample else {
            // A problem with a tar itself (damaged, compressed): reported
            // on stderr by the caller; its shard gets no file.
            if self.expected.contains_key(&record.path) {
                self.broken.insert(record.path.clone());
            }
            return Ok(());
        };
        if let Some((shard, path)) = self.last.take() {
            if path != record.path {
                self.close_if_complete(&shard)?;
            }
        }
        let open = self.shard_writer(&sample.shard)?;
        open.writer.write(record)?;
        open.seen.insert(record.path.clone());
        self.last = Some((sample.shard.clone(), record.path.clone()));
        Ok(())
    }

    /// Closes the shards that are complete; the others' temporary files are
    /// deleted.
    fn finish(&mut self) -> io::Result<()> {
        if let Some((shard, _)) = self.last.take() {
            self.close_if_complete(&shard)?;
        }
        self.open.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{Outcome, Sample};

    fn record(shard: &str, image: &str, text: &str) -> Record {
        Record {
            path: format!("{shard}/{image}"),
            path_bytes: None,
            sample: Some(Sample {
                key: image.trim_end_matches(".jpg").into(),
                shard: shard.into(),
                json: None,
                source_caption: None,
            }),
            outcome: Outcome::Caption(text.into()),
        }
    }

    #[test]
    fn names_drop_the_tar_extension() {
        let dir = Path::new("out");
        assert_eq!(
            output_path(dir, "data/shard-00012.tar", Format::Jsonl),
            Path::new("out/shard-00012.jsonl")
        );
        assert_eq!(
            output_path(dir, "x.TAR", Format::Csv),
            Path::new("out/x.csv")
        );
    }

    #[test]
    fn a_shard_s_file_appears_whole_once_its_images_are_in() {
        let dir = tempfile::tempdir().unwrap();
        let expected = HashMap::from([("a.tar".to_string(), 2), ("b.tar".to_string(), 2)]);
        let mut files =
            ShardFiles::new(dir.path(), Format::Jsonl, TextColumns::default(), expected);
        files.write(&record("a.tar", "1.jpg", "one")).unwrap();
        files.write(&record("a.tar", "2.jpg", "two")).unwrap();
        files
            .write(&record("a.tar", "2.jpg", "two, again"))
            .unwrap();
        // The last image may have more records: a.tar closes at the next image.
        assert!(!dir.path().join("a.jsonl").exists());
        files.write(&record("b.tar", "3.jpg", "three")).unwrap();
        let a = std::fs::read_to_string(dir.path().join("a.jsonl")).unwrap();
        assert_eq!(a.lines().count(), 3);
        // Stopped before b.tar's second image: no file, no temporary left.
        files.finish().unwrap();
        assert!(!dir.path().join("b.jsonl").exists());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
        assert_eq!(files.written, [dir.path().join("a.jsonl")]);
    }

    #[test]
    fn a_damaged_shard_gets_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let expected = HashMap::from([("a.tar".to_string(), 1)]);
        let mut files =
            ShardFiles::new(dir.path(), Format::Jsonl, TextColumns::default(), expected);
        files
            .write(&Record {
                path: "a.tar".into(),
                path_bytes: None,
                sample: None,
                outcome: Outcome::Error("damaged tar file after 1 members".into()),
            })
            .unwrap();
        files.write(&record("a.tar", "1.jpg", "one")).unwrap();
        files.finish().unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
