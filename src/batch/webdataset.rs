//! WebDataset shards as input: a `.tar` (img2dataset's output: `KEY.jpg`,
//! `KEY.json`, `KEY.txt`, ...) is read as a container of images, never
//! extracted to disk.
//!
//! [`expand`] turns each tar input into one input per image member, after
//! `--shard` has chosen whole tar files; it reads only the tar headers
//! (seeking over the data), so a shard of 10,000 samples is listed in
//! milliseconds. An image is read later at its offset ([`read_member`]).
//! A sample's key is, as in the `webdataset` library, the member's path up
//! to the first `.` of its file name (`a/000123.jpg` and `a/000123.json` are
//! sample `a/000123`); its `.json` and `.txt` members ride along into the
//! jsonl record ([`Sample`]).
//!
//! Compressed shards (`.tar.gz`, `.tgz`) cannot be read at an offset and
//! are reported as a problem that says to decompress them.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use super::inputs::{is_compressed_tar, is_tar, Input, InputProblem, TarMember, IMAGE_EXTENSIONS};
use crate::output::Sample;

/// The most bytes one member may have to be read: a decoded picture of
/// Pillow's pixel limit is far smaller as a file.
const MAX_MEMBER_BYTES: u64 = 512 << 20;
/// The most bytes of a `.json` or `.txt` member passed through.
const MAX_TEXT_BYTES: u64 = 1 << 20;

/// Every tar input replaced by its image members, in the tar's order; a
/// compressed tar, an unreadable one and a damaged one become problems (a
/// tar damaged part-way keeps the members before the damage).
pub fn expand(inputs: Vec<Input>, problems: &mut Vec<InputProblem>) -> Vec<Input> {
    let mut out = Vec::with_capacity(inputs.len());
    for input in inputs {
        if input.member.is_some() || super::inputs::is_url(&input.shown) {
            out.push(input);
        } else if is_compressed_tar(&input.path) {
            problems.push(problem(
                &input,
                "compressed tar shards are not read (no random access): decompress it \
                 (e.g. gunzip) and give the .tar",
            ));
        } else if is_tar(&input.path) {
            match members(&input) {
                Ok(members) if members.is_empty() => {
                    problems.push(problem(&input, "tar file holds no images"))
                }
                Ok(members) => out.extend(members),
                Err((members, reason)) => {
                    out.extend(members);
                    problems.push(problem(&input, &reason));
                }
            }
        } else {
            out.push(input);
        }
    }
    out
}

fn problem(input: &Input, reason: &str) -> InputProblem {
    InputProblem {
        shown: input.shown.clone(),
        path_bytes: crate::output::path_bytes(&input.path),
        reason: reason.to_string(),
    }
}

/// A member's key and extension (lower case, after the key's dot).
fn split_key(name: &str) -> (&str, String) {
    let file_start = name.rfind('/').map_or(0, |i| i + 1);
    match name[file_start..].find('.') {
        Some(dot) => (
            &name[..file_start + dot],
            name[file_start + dot + 1..].to_ascii_lowercase(),
        ),
        None => (name, String::new()),
    }
}

/// The image members of a tar input, or those read before it proved
/// damaged and why.
#[allow(clippy::type_complexity)]
fn members(input: &Input) -> Result<Vec<Input>, (Vec<Input>, String)> {
    let file = File::open(&input.path).map_err(|e| {
        (
            vec![],
            format!("cannot open: {}", super::inputs::describe(&e)),
        )
    })?;
    let mut archive = tar::Archive::new(file);
    // (key, extension, offset, size), in the tar's order.
    let mut found: Vec<(String, String, u64, u64)> = Vec::new();
    let mut failure = None;
    match archive.entries_with_seek() {
        Err(e) => failure = Some(format!("not a readable tar file: {e}")),
        Ok(entries) => {
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) => {
                        failure = Some(format!(
                            "damaged tar file after {} members: {e}",
                            found.len()
                        ));
                        break;
                    }
                };
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let Ok(name) = std::str::from_utf8(&entry.path_bytes()).map(str::to_string) else {
                    continue;
                };
                let (key, extension) = split_key(&name);
                found.push((
                    key.to_string(),
                    extension,
                    entry.raw_file_position(),
                    entry.size(),
                ));
            }
        }
    }
    let mut texts: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
    for (key, extension, offset, size) in &found {
        if extension == "json" || extension == "txt" {
            texts.insert((key.as_str(), extension.as_str()), (*offset, *size));
        }
    }
    let members = found
        .iter()
        .filter(|(_, extension, _, _)| {
            // The last part names the format: `seg.png` is a PNG.
            let last = extension.rsplit('.').next().unwrap_or_default();
            IMAGE_EXTENSIONS.contains(&last)
        })
        .map(|(key, extension, offset, size)| Input {
            shown: format!("{}/{key}.{extension}", input.shown),
            path: input.path.clone(),
            stamp: input.stamp,
            member: Some(Arc::new(TarMember {
                shard: input.shown.clone(),
                key: key.clone(),
                offset: *offset,
                size: *size,
                json: texts.get(&(key.as_str(), "json")).copied(),
                txt: texts.get(&(key.as_str(), "txt")).copied(),
            })),
        })
        .collect();
    match failure {
        None => Ok(members),
        Some(reason) => Err((members, reason)),
    }
}

/// `size` bytes at `offset` of the file at `path`.
fn read_at(path: &Path, offset: u64, size: u64, limit: u64) -> std::io::Result<Vec<u8>> {
    if size > limit {
        return Err(std::io::Error::other(format!(
            "tar member of {size} bytes is larger than the {limit} bytes read"
        )));
    }
    let file = File::open(path)?;
    let mut bytes = vec![0; size as usize];
    read_exact_at(&file, &mut bytes, offset)?;
    Ok(bytes)
}

#[cfg(unix)]
fn read_exact_at(file: &File, bytes: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, bytes, offset)
}

#[cfg(not(unix))]
fn read_exact_at(mut file: &File, bytes: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(bytes)
}

/// The bytes of an image member.
pub fn read_member(path: &Path, member: &TarMember) -> std::io::Result<Vec<u8>> {
    read_at(path, member.offset, member.size, MAX_MEMBER_BYTES)
}

/// The sample an image member belongs to, its `.json` and `.txt` read.
/// Text that cannot be read or parsed is left out: the caption is what
/// the run is for.
pub fn sample(path: &Path, member: &TarMember) -> Sample {
    let text = |at: Option<(u64, u64)>| {
        at.and_then(|(offset, size)| read_at(path, offset, size, MAX_TEXT_BYTES).ok())
            .and_then(|bytes| String::from_utf8(bytes).ok())
    };
    let json = text(member.json).and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let source_caption = text(member.txt)
        .map(|t| t.trim_end_matches(['\n', '\r']).to_string())
        .or_else(|| {
            json.as_ref()
                .and_then(|j| j.get("caption"))
                .and_then(|c| c.as_str())
                .map(str::to_string)
        });
    Sample {
        key: member.key.clone(),
        shard: member.shard.clone(),
        json,
        source_caption,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_end_at_the_file_name_s_first_dot() {
        assert_eq!(split_key("000123.jpg"), ("000123", "jpg".into()));
        assert_eq!(
            split_key("a.b/000123.seg.PNG"),
            ("a.b/000123", "seg.png".into())
        );
        assert_eq!(split_key("noext"), ("noext", String::new()));
    }

    #[test]
    fn compressed_shards_are_recognised() {
        assert!(is_compressed_tar(Path::new("s/00001.tar.gz")));
        assert!(is_compressed_tar(Path::new("s/00001.TGZ")));
        assert!(!is_compressed_tar(Path::new("s/00001.tar")));
        assert!(is_tar(Path::new("s/00001.TAR")));
    }
}
