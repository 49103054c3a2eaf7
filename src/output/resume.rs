//! `--resume FILE`: a jsonl file that a run appends to and a later run
//! continues, whatever killed the one before.
//!
//! Each image's records (one per question and returned caption) go into the
//! file in one `write` ([`ResumeFile::write_group`]), so a killed process
//! leaves whole images and, at worst, one torn group at the end. On opening,
//! [`ResumeFile::open`] reads what is there: an unfinished last line is a
//! torn group, and it and the group before it (which the same write may have
//! begun) are cut off and done again; images whose record is an error are
//! done again too, their records dropped. Every other image is skipped, so
//! the finished file holds each image once.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{Record, RecordWriter};

/// How often the file is flushed to the disk while a run appends to it
/// (and always at the end): a machine that crashes loses at most this much.
const SYNC_EVERY: Duration = Duration::from_secs(5);

/// What an existing file held, as [`ResumeFile::open`] found it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Found {
    /// Images already done (their `path` field), which the run skips.
    pub done: HashSet<String>,
    /// Images whose record was an error: dropped, to be done again.
    pub retried_errors: usize,
    /// Whether the file ended in an unfinished line (a killed run); it and
    /// the image before it are cut off, to be done again.
    pub torn: bool,
}

impl Found {
    /// One line for stderr.
    pub fn summary(&self, file: &Path) -> String {
        let mut line = format!(
            "--resume {}: {} images already done",
            file.display(),
            self.done.len()
        );
        if self.torn {
            line += "; an unfinished last line and the image before it removed, to do again";
        }
        if self.retried_errors > 0 {
            line += &format!("; {} earlier errors to try again", self.retried_errors);
        }
        line
    }
}

/// The jsonl file a resumable run appends to.
pub struct ResumeFile {
    file: File,
    path: PathBuf,
    last_sync: Instant,
}

/// One image's records: consecutive lines with the same `path`.
struct Group {
    path: String,
    /// Byte range of its lines in the file.
    start: usize,
    end: usize,
    error: bool,
}

impl ResumeFile {
    /// Opens (or creates) `path` for appending and reads what earlier runs
    /// wrote there. A line that is whole but not a record of ours stops the
    /// run: the file is someone else's, or damaged in the middle, and
    /// appending to it would hide that.
    pub fn open(path: &Path) -> Result<(ResumeFile, Found)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("--resume {}: cannot open it", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .with_context(|| format!("--resume {}: cannot read it", path.display()))?;
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let torn = whole < bytes.len();
        let mut groups = groups(&bytes[..whole], path)?;
        let mut found = Found {
            torn,
            ..Found::default()
        };
        if torn {
            // The torn line's image may have begun with whole lines (a group
            // is one write): the group before the torn line goes too.
            groups.pop();
        }
        let errors = groups.iter().filter(|g| g.error).count();
        found.retried_errors = errors;
        let end = groups.last().map_or(0, |g| g.end);
        if errors > 0 {
            // Drop the errors' lines: rewrite the file whole (temporary
            // file, fsync, rename), so a crash now leaves the old or the new.
            let mut kept = Vec::with_capacity(end);
            for group in groups.iter().filter(|g| !g.error) {
                kept.extend_from_slice(&bytes[group.start..group.end]);
            }
            crate::output::sidecar::write_whole(path, &kept, true)?;
            file = OpenOptions::new()
                .append(true)
                .open(path)
                .with_context(|| format!("--resume {}: cannot reopen it", path.display()))?;
        } else if end < bytes.len() {
            file.set_len(end as u64)
                .and_then(|()| file.sync_all())
                .with_context(|| format!("--resume {}: cannot cut the torn end", path.display()))?;
        }
        file.seek(SeekFrom::End(0))?;
        found.done = groups
            .into_iter()
            .filter(|g| !g.error)
            .map(|g| g.path)
            .collect();
        let resume = ResumeFile {
            file,
            path: path.to_path_buf(),
            last_sync: Instant::now(),
        };
        Ok((resume, found))
    }

    /// Appends one image's lines in a single write.
    pub fn write_group(&mut self, lines: &[u8]) -> io::Result<()> {
        self.file.write_all(lines)?;
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    /// Flushes what was appended to the disk.
    pub fn sync(&mut self) -> io::Result<()> {
        self.last_sync = Instant::now();
        self.file.sync_data()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A [`RecordWriter`] into a [`ResumeFile`]: jsonl, each image's records
/// kept together and appended in one write when the next image's come (or
/// at [`RecordWriter::finish`], which also flushes the file to the disk).
pub struct ResumeWriter {
    file: ResumeFile,
    group: Vec<u8>,
    group_path: Option<String>,
}

impl ResumeWriter {
    pub fn new(file: ResumeFile) -> Self {
        ResumeWriter {
            file,
            group: Vec::new(),
            group_path: None,
        }
    }

    fn commit(&mut self) -> io::Result<()> {
        if !self.group.is_empty() {
            self.file.write_group(&self.group)?;
            self.group.clear();
        }
        Ok(())
    }
}

impl RecordWriter for ResumeWriter {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        if self.group_path.as_deref() != Some(record.path.as_str()) {
            self.commit()?;
            self.group_path = Some(record.path.clone());
        }
        self.group.extend_from_slice(&super::jsonl_line(record)?);
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        self.commit()?;
        self.file.sync()
    }
}

/// The records of `bytes` (whole lines), grouped by image.
fn groups(bytes: &[u8], file: &Path) -> Result<Vec<Group>> {
    let mut groups: Vec<Group> = Vec::new();
    let mut start = 0;
    for (number, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        let end = start + line.len();
        let record: serde_json::Value = serde_json::from_slice(line)
            .ok()
            .filter(serde_json::Value::is_object)
            .with_context(|| {
                format!(
                    "--resume {}: line {} is not a jsonl record; not appending to this file",
                    file.display(),
                    number + 1
                )
            })?;
        let path = record["path"].as_str().with_context(|| {
            format!(
                "--resume {}: line {} has no \"path\"; not appending to this file",
                file.display(),
                number + 1
            )
        })?;
        let error = record.get("error").is_some_and(|e| !e.is_null());
        match groups.last_mut() {
            Some(group) if group.path == path => {
                group.end = end;
                group.error |= error;
            }
            _ => groups.push(Group {
                path: path.to_string(),
                start,
                end,
                error,
            }),
        }
        start = end;
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(text: &str) -> (tempfile::TempDir, PathBuf, Found) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, text).unwrap();
        let (_, found) = ResumeFile::open(&path).unwrap();
        (dir, path, found)
    }

    fn done(found: &Found) -> Vec<&str> {
        let mut done: Vec<&str> = found.done.iter().map(String::as_str).collect();
        done.sort();
        done
    }

    const A: &str = "{\"path\":\"a.jpg\",\"caption\":\"x\"}\n";
    const B1: &str = "{\"path\":\"b.jpg\",\"question\":\"q1\",\"answer\":\"y\"}\n";
    const B2: &str = "{\"path\":\"b.jpg\",\"question\":\"q2\",\"answer\":\"z\"}\n";
    const E: &str = "{\"path\":\"e.jpg\",\"error\":\"e.jpg: not an image\"}\n";

    #[test]
    fn an_image_s_records_are_appended_together_when_the_next_image_comes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let (file, _) = ResumeFile::open(&path).unwrap();
        let mut writer = ResumeWriter::new(file);
        let record = |path: &str, text: &str| Record {
            path: path.into(),
            path_bytes: None,
            sample: None,
            outcome: crate::output::Outcome::Caption(text.into()),
        };
        writer.write(&record("a.jpg", "one")).unwrap();
        writer.write(&record("a.jpg", "two")).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        writer.write(&record("b.jpg", "three")).unwrap();
        let a =
            "{\"path\":\"a.jpg\",\"caption\":\"one\"}\n{\"path\":\"a.jpg\",\"caption\":\"two\"}\n";
        assert_eq!(std::fs::read_to_string(&path).unwrap(), a);
        writer.finish().unwrap();
        let (_, found) = ResumeFile::open(&path).unwrap();
        assert_eq!(done(&found), ["a.jpg", "b.jpg"]);
    }

    #[test]
    fn a_whole_file_is_kept_as_it_is() {
        let text = format!("{A}{B1}{B2}");
        let (_dir, path, found) = open(&text);
        assert_eq!(done(&found), ["a.jpg", "b.jpg"]);
        assert!(!found.torn);
        assert_eq!(std::fs::read_to_string(path).unwrap(), text);
    }

    #[test]
    fn a_torn_end_is_cut_with_the_group_before_it() {
        let text = format!("{A}{B1}{}", &B2[..10]);
        let (_dir, path, found) = open(&text);
        assert_eq!(done(&found), ["a.jpg"]);
        assert!(found.torn);
        assert_eq!(std::fs::read_to_string(path).unwrap(), A);
        assert!(found.summary(Path::new("out.jsonl")).contains("unfinished"));
    }

    #[test]
    fn errors_are_dropped_and_done_again() {
        let text = format!("{A}{E}{B1}{B2}");
        let (_dir, path, found) = open(&text);
        assert_eq!(done(&found), ["a.jpg", "b.jpg"]);
        assert_eq!(found.retried_errors, 1);
        assert_eq!(
            std::fs::read_to_string(path).unwrap(),
            format!("{A}{B1}{B2}")
        );
    }

    #[test]
    fn a_missing_file_is_created_and_a_foreign_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.jsonl");
        let (mut file, found) = ResumeFile::open(&path).unwrap();
        assert!(found.done.is_empty());
        file.write_group(A.as_bytes()).unwrap();
        file.sync().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), A);

        let foreign = dir.path().join("notes.txt");
        std::fs::write(&foreign, format!("{A}hello\n{B1}")).unwrap();
        let err = format!("{:#}", ResumeFile::open(&foreign).err().unwrap());
        assert!(err.contains("line 2 is not a jsonl record"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&foreign).unwrap(),
            format!("{A}hello\n{B1}")
        );
    }
}
