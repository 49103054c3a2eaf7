//! Results on stdout, one writer per format. stdout carries data only; what
//! people need to read (errors, notes) goes to stderr elsewhere. Captions
//! beside their images: [`sidecar`].

pub mod npy;
pub mod parquet;
pub mod repeats;
pub mod resume;
pub mod shard_files;
pub mod sidecar;

use std::io::{self, Write};

use serde::Serialize;

use crate::captioner::embed::LabelScore;

/// One caption of an image.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionOutput {
    pub text: String,
    /// The question this text answers (`--ask`); `None` for a caption.
    pub question: Option<String>,
    /// 1 for the best, when several captions are printed per image (`--num-return`).
    pub rank: Option<usize>,
    /// The beam-search score, when there is one.
    pub score: Option<f32>,
    /// `--rerank`: the CLIP model's cosine similarity of image and text,
    /// what the candidates were ranked by.
    pub clip_score: Option<f32>,
}

impl From<&str> for CaptionOutput {
    fn from(text: &str) -> Self {
        Self {
            text: text.to_string(),
            question: None,
            rank: None,
            score: None,
            clip_score: None,
        }
    }
}

/// The result for one input image.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The path as the user gave it (or as found in a folder); where it is
    /// not UTF-8, each invalid sequence shows as U+FFFD.
    pub path: String,
    /// The path's bytes, only where they are not UTF-8 ([`path_bytes`]):
    /// jsonl writes them as `path_bytes`, so a program can find the file.
    pub path_bytes: Option<Vec<u8>>,
    /// For an image in a WebDataset tar: its sample's key, shard and
    /// passed-through `.json` / `.txt` (jsonl and json only).
    pub sample: Option<Sample>,
    pub outcome: Outcome,
}

/// What a jsonl record carries of an image's sample in a WebDataset tar
/// (read by `crate::batch::webdataset`).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub key: String,
    pub shard: String,
    /// The sample's `.json`, parsed (a member that is not JSON is left out).
    pub json: Option<serde_json::Value>,
    /// The sample's `.txt` (the original caption, in img2dataset's shards),
    /// else the `caption` field of its `.json`.
    pub source_caption: Option<String>,
}

/// `path`'s bytes, where they are not valid UTF-8 (file names on Unix may
/// be any bytes); `None` for every UTF-8 path, and everywhere but Unix.
pub fn path_bytes(path: &std::path::Path) -> Option<Vec<u8>> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        path.to_str()
            .is_none()
            .then(|| path.as_os_str().as_bytes().to_vec())
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Caption(CaptionOutput),
    /// Zero-shot labels (`--labels`), best first.
    Labels(Vec<LabelScore>),
    /// The image's L2-normalised embedding (`caption embed`).
    Embedding(Vec<f32>),
    /// A search result: the image's cosine similarity to the query.
    Match(f32),
    /// A one-line reason the image produced nothing.
    Error(String),
}

/// Output formats, chosen with `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The caption alone for one image; `path<TAB>caption` per line for several.
    Text,
    /// One JSON object per line: {"path": ..., "caption": ...} or {"path": ..., "error": ...}.
    Jsonl,
    /// One JSON array of the objects jsonl writes, valid JSON only once the run
    /// ends; for long runs prefer jsonl (a killed run leaves an unterminated array).
    Json,
    /// Comma-separated values with a header row: path,caption,error, or
    /// path,question,answer,error for answers; rank,score follow the caption or
    /// answer when several are printed per image. Quoted where needed.
    Csv,
    /// Tab-separated values with the same header and columns as csv, quoted the
    /// same way (so tabs and newlines in a caption survive).
    Tsv,
    /// A Parquet table (Snappy), one row per record, the jsonl fields as columns;
    /// readable once the run ends (redirect stdout to a file, or use --output-dir).
    Parquet,
}

/// Writes records in one format.
pub trait RecordWriter {
    fn write(&mut self, record: &Record) -> io::Result<()>;
    /// Called once after the last record.
    fn finish(&mut self) -> io::Result<()>;
}

/// What the records of a run hold, which decides the csv and tsv columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Content {
    /// path,caption,error (or path,question,answer,error).
    #[default]
    Captions,
    /// path,label,score,error: one row per image and label.
    Labels,
    /// path,embedding,error: the numbers separated by spaces.
    Embeddings,
    /// path,score,error: search results.
    Matches,
}

/// The columns of the text, csv and tsv formats, fixed before the first record
/// (the json formats name every field in each object and ignore this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TextColumns {
    pub content: Content,
    /// Csv and tsv: captions reranked by a CLIP model, with a clip_score
    /// column after the caption (and rank and score).
    pub reranked: bool,
    /// Text: print the path before each caption, so a line says which image it
    /// belongs to. Csv and tsv always have a path column.
    pub path: bool,
    /// Text: print the question before each answer. Csv and tsv: the records
    /// carry questions, so the columns are path,question,answer,error rather
    /// than path,caption,error.
    pub question: bool,
    /// Csv and tsv: add rank and score columns after the caption or answer.
    /// The text format ignores it.
    pub ranked: bool,
}

/// A writer for `format`; `columns` is for the text, csv and tsv formats.
pub fn writer<'a, W: Write + Send + 'a>(
    format: Format,
    out: W,
    columns: TextColumns,
) -> io::Result<Box<dyn RecordWriter + 'a>> {
    Ok(match format {
        Format::Text => Box::new(TextWriter { out, columns }),
        Format::Jsonl => Box::new(JsonlWriter { out }),
        Format::Json => Box::new(JsonArrayWriter {
            out,
            started: false,
        }),
        Format::Csv => Box::new(DelimitedWriter::new(out, b',', columns)),
        Format::Tsv => Box::new(DelimitedWriter::new(out, b'\t', columns)),
        Format::Parquet => Box::new(parquet::ParquetWriter::new(out)?),
    })
}

struct TextWriter<W> {
    out: W,
    columns: TextColumns,
}

impl<W: Write> RecordWriter for TextWriter<W> {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        // Failures are reported on stderr by the caller; the text format has no
        // place for them that a script reading captions would not trip over.
        let mut fields = Vec::with_capacity(3);
        // Search results always say which image they are.
        if self.columns.path || matches!(record.outcome, Outcome::Match(_)) {
            fields.push(single_line(&record.path));
        }
        let caption = match &record.outcome {
            Outcome::Caption(caption) => caption,
            Outcome::Error(_) => return Ok(()),
            Outcome::Labels(labels) => {
                let Some(best) = labels.first() else {
                    return Ok(());
                };
                fields.push(single_line(&best.label));
                return self.write_line(&fields);
            }
            Outcome::Embedding(embedding) => {
                fields.push(numbers(embedding));
                return self.write_line(&fields);
            }
            Outcome::Match(score) => {
                fields.push(score.to_string());
                return self.write_line(&fields);
            }
        };
        // One line per record whatever the caption holds.
        if let Some(question) = caption
            .question
            .as_deref()
            .filter(|_| self.columns.question)
        {
            fields.push(single_line(question));
        }
        fields.push(single_line(&caption.text));
        self.write_line(&fields)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl<W: Write> TextWriter<W> {
    fn write_line(&mut self, fields: &[String]) -> io::Result<()> {
        writeln!(self.out, "{}", fields.join("\t"))?;
        // Line by line, so a pipe sees each caption as soon as it exists.
        self.out.flush()
    }
}

/// An embedding as text: its numbers separated by spaces, each written
/// with the fewest digits that read back to the same f32.
fn numbers(values: &[f32]) -> String {
    values
        .iter()
        .map(f32::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

struct JsonlWriter<W> {
    out: W,
}

/// `record` as one jsonl line, newline included.
pub(crate) fn jsonl_line(record: &Record) -> io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(&JsonRecord::from(record)).map_err(io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

#[derive(Serialize)]
struct JsonRecord<'a> {
    path: &'a str,
    /// Only for a path that is not UTF-8: its bytes, as numbers.
    #[serde(skip_serializing_if = "Option::is_none")]
    path_bytes: Option<&'a [u8]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    caption: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    question: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    answer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rank: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clip_score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: Option<&'a [LabelScore]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    embedding: Option<&'a [f32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    /// The sample's original caption (its `.txt`, else its `.json`'s `caption`).
    #[serde(skip_serializing_if = "Option::is_none")]
    source_caption: Option<&'a str>,
    /// The sample's `.json`, as it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a serde_json::Value>,
}

impl<'a> From<&'a Record> for JsonRecord<'a> {
    fn from(record: &'a Record) -> Self {
        let sample = record.sample.as_ref();
        let bare = Self {
            path: &record.path,
            path_bytes: record.path_bytes.as_deref(),
            key: sample.map(|s| s.key.as_str()),
            shard: sample.map(|s| s.shard.as_str()),
            source_caption: sample.and_then(|s| s.source_caption.as_deref()),
            source: sample.and_then(|s| s.json.as_ref()),
            caption: None,
            question: None,
            answer: None,
            rank: None,
            score: None,
            clip_score: None,
            labels: None,
            embedding: None,
            error: None,
        };
        match &record.outcome {
            Outcome::Caption(c) => Self {
                caption: c.question.is_none().then_some(c.text.as_str()),
                question: c.question.as_deref(),
                answer: c.question.is_some().then_some(c.text.as_str()),
                rank: c.rank,
                score: c.score,
                clip_score: c.clip_score,
                ..bare
            },
            Outcome::Labels(labels) => Self {
                labels: Some(labels),
                ..bare
            },
            Outcome::Embedding(embedding) => Self {
                embedding: Some(embedding),
                ..bare
            },
            Outcome::Match(score) => Self {
                score: Some(*score),
                ..bare
            },
            Outcome::Error(e) => Self {
                error: Some(e),
                ..bare
            },
        }
    }
}

impl<W: Write> RecordWriter for JsonlWriter<W> {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        // Serialise first, then write the whole line at once: an interrupted run
        // never leaves half a record.
        self.out.write_all(&jsonl_line(record)?)?;
        self.out.flush()
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

struct JsonArrayWriter<W> {
    out: W,
    /// Whether "[" (and so at least one record) is out.
    started: bool,
}

impl<W: Write> RecordWriter for JsonArrayWriter<W> {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        // The separator (or the opening bracket) and the record in one write.
        let mut chunk = Vec::from(if self.started { &b",\n"[..] } else { b"[" });
        serde_json::to_writer(&mut chunk, &JsonRecord::from(record)).map_err(io::Error::other)?;
        self.out.write_all(&chunk)?;
        self.started = true;
        self.out.flush()
    }

    fn finish(&mut self) -> io::Result<()> {
        let end: &[u8] = if self.started { b"]\n" } else { b"[]\n" };
        self.out.write_all(end)?;
        self.out.flush()
    }
}

/// Csv or tsv: a header row, then one row per record.
struct DelimitedWriter<W> {
    out: W,
    builder: csv::WriterBuilder,
    columns: TextColumns,
    header_written: bool,
}

impl<W: Write> DelimitedWriter<W> {
    fn new(out: W, delimiter: u8, columns: TextColumns) -> Self {
        let mut builder = csv::WriterBuilder::new();
        builder
            .delimiter(delimiter)
            .terminator(csv::Terminator::Any(b'\n'))
            .quote_style(csv::QuoteStyle::Necessary)
            .has_headers(false);
        Self {
            out,
            builder,
            columns,
            header_written: false,
        }
    }

    fn header(&self) -> Vec<&'static str> {
        let mut row = vec!["path"];
        match self.columns.content {
            Content::Labels => row.extend(["label", "score"]),
            Content::Embeddings => row.push("embedding"),
            Content::Matches => row.push("score"),
            Content::Captions => {
                if self.columns.question {
                    row.extend(["question", "answer"]);
                } else {
                    row.push("caption");
                }
                if self.columns.ranked {
                    row.extend(["rank", "score"]);
                }
                if self.columns.reranked {
                    row.push("clip_score");
                }
            }
        }
        row.push("error");
        row
    }

    /// The record's rows: one per label for labels, else one.
    fn rows(&self, record: &Record) -> Vec<Vec<String>> {
        let path = record.path.clone();
        let error_row = |reason: &str| {
            let blanks = self.header().len() - 2;
            let mut row = vec![path.clone()];
            row.extend(std::iter::repeat_n(String::new(), blanks));
            row.push(reason.to_string());
            row
        };
        let caption = match &record.outcome {
            Outcome::Error(e) => return vec![error_row(e)],
            Outcome::Labels(labels) => {
                return labels
                    .iter()
                    .map(|l| {
                        vec![
                            path.clone(),
                            l.label.clone(),
                            l.score.to_string(),
                            String::new(),
                        ]
                    })
                    .collect()
            }
            Outcome::Embedding(embedding) => {
                return vec![vec![path, numbers(embedding), String::new()]]
            }
            Outcome::Match(score) => return vec![vec![path, score.to_string(), String::new()]],
            Outcome::Caption(c) => c,
        };
        let optional = |value: Option<String>| value.unwrap_or_default();
        let mut row = vec![path];
        if self.columns.question {
            row.push(optional(caption.question.clone()));
        }
        row.push(caption.text.clone());
        if self.columns.ranked {
            row.push(optional(caption.rank.map(|r| r.to_string())));
            row.push(optional(caption.score.map(|s| s.to_string())));
        }
        if self.columns.reranked {
            row.push(optional(caption.clip_score.map(|s| s.to_string())));
        }
        row.push(String::new());
        vec![row]
    }

    /// Quotes one row into a buffer and writes it whole, so an interrupted run
    /// never leaves half a row.
    fn write_row<I, F>(&mut self, fields: I) -> io::Result<()>
    where
        I: IntoIterator<Item = F>,
        F: AsRef<[u8]>,
    {
        let mut row = self.builder.from_writer(Vec::new());
        row.write_record(fields)?;
        let bytes = row.into_inner().map_err(|e| e.into_error())?;
        self.out.write_all(&bytes)?;
        self.out.flush()
    }

    fn write_header_once(&mut self) -> io::Result<()> {
        if !self.header_written {
            self.write_row(self.header())?;
            self.header_written = true;
        }
        Ok(())
    }
}

impl<W: Write> RecordWriter for DelimitedWriter<W> {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        self.write_header_once()?;
        for row in self.rows(record) {
            self.write_row(row)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        // An empty run still says what its columns would have been.
        self.write_header_once()?;
        self.out.flush()
    }
}

/// `text` on one line: line breaks and tabs become spaces. The text format
/// writes every field this way, and messages on stderr go through it too, so
/// a file name holding a newline cannot split one line into two.
pub fn single_line(text: &str) -> String {
    text.replace(['\n', '\r', '\t'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(format: Format, several: bool, records: &[Record]) -> String {
        let columns = TextColumns {
            path: several,
            question: true,
            ranked: false,
            ..TextColumns::default()
        };
        run_with(format, columns, records)
    }

    fn labelled(path: &str) -> Record {
        let label = |label: &str, score: f32| LabelScore {
            label: label.into(),
            score,
        };
        Record {
            path: path.into(),
            path_bytes: None,
            sample: None,
            outcome: Outcome::Labels(vec![label("red, car", 0.75), label("cat", 0.25)]),
        }
    }

    #[test]
    fn labels_print_the_best_or_every_label() {
        let records = [labelled("a.jpg"), error("b.jpg", "not an image")];
        assert_eq!(run(Format::Text, false, &records[..1]), "red, car\n");
        assert_eq!(run(Format::Text, true, &records), "a.jpg\tred, car\n");
        let jsonl = run(Format::Jsonl, true, &records);
        assert_eq!(
            jsonl,
            "{\"path\":\"a.jpg\",\"labels\":[{\"label\":\"red, car\",\"score\":0.75},\
             {\"label\":\"cat\",\"score\":0.25}]}\n{\"path\":\"b.jpg\",\"error\":\"not an image\"}\n"
        );
        let columns = TextColumns {
            content: Content::Labels,
            ..TextColumns::default()
        };
        let csv = run_with(Format::Csv, columns, &records);
        assert_eq!(
            csv,
            "path,label,score,error\na.jpg,\"red, car\",0.75,\na.jpg,cat,0.25,\nb.jpg,,,not an image\n"
        );
    }

    #[test]
    fn embeddings_and_matches() {
        let embedding = Record {
            path: "a.jpg".into(),
            path_bytes: None,
            sample: None,
            outcome: Outcome::Embedding(vec![0.5, -0.125]),
        };
        assert_eq!(
            run(Format::Text, true, std::slice::from_ref(&embedding)),
            "a.jpg\t0.5 -0.125\n"
        );
        assert_eq!(
            run(Format::Jsonl, false, std::slice::from_ref(&embedding)),
            "{\"path\":\"a.jpg\",\"embedding\":[0.5,-0.125]}\n"
        );
        let columns = TextColumns {
            content: Content::Embeddings,
            ..TextColumns::default()
        };
        assert_eq!(
            run_with(Format::Tsv, columns, &[embedding]),
            "path\tembedding\terror\na.jpg\t0.5 -0.125\t\n"
        );
        let hit = Record {
            path: "b.png".into(),
            path_bytes: None,
            sample: None,
            outcome: Outcome::Match(0.3125),
        };
        // A search result names its image even when it is the only one.
        assert_eq!(
            run(Format::Text, false, std::slice::from_ref(&hit)),
            "b.png\t0.3125\n"
        );
        assert_eq!(
            run(Format::Jsonl, false, &[hit]),
            "{\"path\":\"b.png\",\"score\":0.3125}\n"
        );
    }

    #[test]
    fn reranked_captions_carry_their_clip_score() {
        let record = Record {
            path: "a.jpg".into(),
            path_bytes: None,
            sample: None,
            outcome: Outcome::Caption(CaptionOutput {
                clip_score: Some(0.25),
                ..CaptionOutput::from("a dog")
            }),
        };
        assert_eq!(
            run(Format::Jsonl, false, std::slice::from_ref(&record)),
            "{\"path\":\"a.jpg\",\"caption\":\"a dog\",\"clip_score\":0.25}\n"
        );
        let columns = TextColumns {
            reranked: true,
            ..TextColumns::default()
        };
        assert_eq!(
            run_with(Format::Csv, columns, &[record]),
            "path,caption,clip_score,error\na.jpg,a dog,0.25,\n"
        );
    }

    fn run_with(format: Format, columns: TextColumns, records: &[Record]) -> String {
        let mut buf = Vec::new();
        {
            let mut w = writer(format, &mut buf, columns).unwrap();
            for r in records {
                w.write(r).unwrap();
            }
            w.finish().unwrap();
        }
        String::from_utf8(buf).unwrap()
    }

    fn records() -> Vec<Record> {
        vec![
            Record {
                path: "a.jpg".into(),
                path_bytes: None,
                sample: None,
                outcome: Outcome::Caption("a \"dog\"\non grass".into()),
            },
            Record {
                path: "b.jpg".into(),
                path_bytes: None,
                sample: None,
                outcome: Outcome::Error("not an image".into()),
            },
        ]
    }

    #[test]
    fn text_prints_the_caption_alone_for_one_image() {
        assert_eq!(
            run(Format::Text, false, &records()[..1]),
            "a \"dog\" on grass\n"
        );
    }

    #[test]
    fn text_names_each_image_when_there_are_several_and_skips_failures() {
        assert_eq!(
            run(Format::Text, true, &records()),
            "a.jpg\ta \"dog\" on grass\n"
        );
    }

    #[test]
    fn jsonl_writes_one_parseable_object_per_record() {
        let out = run(Format::Jsonl, true, &records());
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"path": "a.jpg", "caption": "a \"dog\"\non grass"})
        );
        assert_eq!(
            lines[1],
            serde_json::json!({"path": "b.jpg", "error": "not an image"})
        );
    }

    #[test]
    fn answers_carry_their_question() {
        let record = Record {
            path: "a.jpg".into(),
            path_bytes: None,
            sample: None,
            outcome: Outcome::Caption(CaptionOutput {
                question: Some("what is it?".into()),
                ..CaptionOutput::from("a cat")
            }),
        };
        let json: serde_json::Value =
            serde_json::from_str(run(Format::Jsonl, false, std::slice::from_ref(&record)).trim())
                .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"path": "a.jpg", "question": "what is it?", "answer": "a cat"})
        );
        assert_eq!(
            run(Format::Text, true, &[record]),
            "a.jpg\twhat is it?\ta cat\n"
        );
    }

    /// A caption no line-based format keeps intact without quoting.
    const AWKWARD: &str = "a \"dog\", a cat\tand a bird\non grass\r\n— 猫と犬 🐕";

    fn caption(path: &str, text: &str) -> Record {
        Record {
            path: path.into(),
            path_bytes: None,
            sample: None,
            outcome: Outcome::Caption(text.into()),
        }
    }

    fn answer(path: &str, question: &str, text: &str) -> Record {
        Record {
            path: path.into(),
            path_bytes: None,
            sample: None,
            outcome: Outcome::Caption(CaptionOutput {
                question: Some(question.into()),
                ..CaptionOutput::from(text)
            }),
        }
    }

    fn error(path: &str, reason: &str) -> Record {
        Record {
            path: path.into(),
            path_bytes: None,
            sample: None,
            outcome: Outcome::Error(reason.into()),
        }
    }

    fn ranked(path: &str, text: &str, rank: usize, score: f32) -> Record {
        Record {
            path: path.into(),
            path_bytes: None,
            sample: None,
            outcome: Outcome::Caption(CaptionOutput {
                rank: Some(rank),
                score: Some(score),
                clip_score: None,
                ..CaptionOutput::from(text)
            }),
        }
    }

    /// Parses csv or tsv output with the csv crate's reader: the header, then the rows.
    fn parse_delimited(out: &str, delimiter: u8) -> (Vec<String>, Vec<Vec<String>>) {
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(true)
            .from_reader(out.as_bytes());
        let header = reader.headers().unwrap().iter().map(String::from).collect();
        let rows = reader
            .records()
            .map(|r| r.unwrap().iter().map(String::from).collect())
            .collect();
        (header, rows)
    }

    fn strings(fields: &[&str]) -> Vec<String> {
        fields.iter().map(|f| f.to_string()).collect()
    }

    #[test]
    fn json_writes_one_array_that_parses_and_round_trips() {
        let records = [
            caption("a, b.jpg", AWKWARD),
            error("c.jpg", "not an image"),
            answer("d.jpg", "what's \"this\"?", "a cat"),
        ];
        let out = run(Format::Json, true, &records);
        assert!(out.starts_with("[{") && out.ends_with("}]\n"), "{out:?}");
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"path": "a, b.jpg", "caption": AWKWARD},
                {"path": "c.jpg", "error": "not an image"},
                {"path": "d.jpg", "question": "what's \"this\"?", "answer": "a cat"},
            ])
        );
        // The same objects as jsonl, separated by ",\n".
        let jsonl = run(Format::Jsonl, true, &records);
        let objects: Vec<&str> = jsonl.lines().collect();
        assert_eq!(out, format!("[{}]\n", objects.join(",\n")));
    }

    #[test]
    fn json_of_an_empty_run_is_an_empty_array() {
        assert_eq!(run(Format::Json, true, &[]), "[]\n");
    }

    #[test]
    fn json_is_unterminated_until_finished() {
        let mut buf = Vec::new();
        {
            let mut w = writer(Format::Json, &mut buf, TextColumns::default()).unwrap();
            w.write(&caption("a.jpg", "a dog")).unwrap();
            w.write(&caption("b.jpg", "a cat")).unwrap();
        }
        let partial = String::from_utf8(buf).unwrap();
        assert_eq!(
            partial,
            "[{\"path\":\"a.jpg\",\"caption\":\"a dog\"},\n{\"path\":\"b.jpg\",\"caption\":\"a cat\"}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(&partial).is_err());
    }

    #[test]
    fn json_carries_rank_and_score_when_present() {
        let out = run(Format::Json, true, &[ranked("a.jpg", "a dog", 1, -0.5)]);
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{"path": "a.jpg", "caption": "a dog", "rank": 1, "score": -0.5}])
        );
    }

    #[test]
    fn csv_and_tsv_round_trip_awkward_captions_and_errors() {
        let columns = TextColumns::default();
        let records = [
            caption("a, \"b\".jpg", AWKWARD),
            error("c\td.jpg", "not an image, or \"broken\""),
            caption("e.jpg", "plain"),
        ];
        for (format, delimiter) in [(Format::Csv, b','), (Format::Tsv, b'\t')] {
            let out = run_with(format, columns, &records);
            let (header, rows) = parse_delimited(&out, delimiter);
            assert_eq!(header, strings(&["path", "caption", "error"]), "{format:?}");
            assert_eq!(
                rows,
                vec![
                    strings(&["a, \"b\".jpg", AWKWARD, ""]),
                    strings(&["c\td.jpg", "", "not an image, or \"broken\""]),
                    strings(&["e.jpg", "plain", ""]),
                ],
                "{format:?}"
            );
        }
    }

    #[test]
    fn csv_and_tsv_quote_only_where_needed() {
        let records = [
            caption("a.jpg", "a dog, running"),
            caption("b.jpg", "a\tcat"),
        ];
        assert_eq!(
            run_with(Format::Csv, TextColumns::default(), &records),
            "path,caption,error\na.jpg,\"a dog, running\",\nb.jpg,a\tcat,\n"
        );
        assert_eq!(
            run_with(Format::Tsv, TextColumns::default(), &records),
            "path\tcaption\terror\na.jpg\ta dog, running\t\nb.jpg\t\"a\tcat\"\t\n"
        );
    }

    #[test]
    fn csv_and_tsv_have_question_and_answer_columns_for_answers() {
        let columns = TextColumns {
            question: true,
            ..TextColumns::default()
        };
        let records = [
            answer("a.jpg", "what is it, \"really\"?", AWKWARD),
            error("b.jpg", "not an image"),
        ];
        for (format, delimiter) in [(Format::Csv, b','), (Format::Tsv, b'\t')] {
            let (header, rows) = parse_delimited(&run_with(format, columns, &records), delimiter);
            assert_eq!(header, strings(&["path", "question", "answer", "error"]));
            assert_eq!(
                rows,
                vec![
                    strings(&["a.jpg", "what is it, \"really\"?", AWKWARD, ""]),
                    strings(&["b.jpg", "", "", "not an image"]),
                ],
                "{format:?}"
            );
        }
    }

    #[test]
    fn csv_and_tsv_add_rank_and_score_columns_when_ranked() {
        let plain = TextColumns {
            ranked: true,
            ..TextColumns::default()
        };
        let records = [
            ranked("a.jpg", "a dog", 1, -0.25),
            ranked("a.jpg", "a \"dog\", outside", 2, -1.5),
            error("b.jpg", "not an image"),
        ];
        for (format, delimiter) in [(Format::Csv, b','), (Format::Tsv, b'\t')] {
            let (header, rows) = parse_delimited(&run_with(format, plain, &records), delimiter);
            assert_eq!(
                header,
                strings(&["path", "caption", "rank", "score", "error"])
            );
            assert_eq!(
                rows,
                vec![
                    strings(&["a.jpg", "a dog", "1", "-0.25", ""]),
                    strings(&["a.jpg", "a \"dog\", outside", "2", "-1.5", ""]),
                    strings(&["b.jpg", "", "", "", "not an image"]),
                ],
                "{format:?}"
            );
        }
        let asked = TextColumns {
            question: true,
            ranked: true,
            ..TextColumns::default()
        };
        let record = Record {
            path: "a.jpg".into(),
            path_bytes: None,
            sample: None,
            outcome: Outcome::Caption(CaptionOutput {
                question: Some("what?".into()),
                rank: Some(1),
                score: None,
                clip_score: None,
                text: "a cat".into(),
            }),
        };
        let (header, rows) = parse_delimited(&run_with(Format::Csv, asked, &[record]), b',');
        assert_eq!(
            header,
            strings(&["path", "question", "answer", "rank", "score", "error"])
        );
        assert_eq!(
            rows,
            vec![strings(&["a.jpg", "what?", "a cat", "1", "", ""])]
        );
    }

    #[test]
    fn csv_and_tsv_of_an_empty_run_are_the_header_alone() {
        assert_eq!(
            run_with(Format::Csv, TextColumns::default(), &[]),
            "path,caption,error\n"
        );
        assert_eq!(
            run_with(Format::Tsv, TextColumns::default(), &[]),
            "path\tcaption\terror\n"
        );
    }

    #[test]
    fn csv_rows_are_written_whole_as_each_record_arrives() {
        let mut buf = Vec::new();
        {
            let mut w = writer(Format::Csv, &mut buf, TextColumns::default()).unwrap();
            w.write(&caption("a.jpg", "two\nlines")).unwrap();
        }
        // No finish(): the header and the (multi-line) row are already out.
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "path,caption,error\na.jpg,\"two\nlines\",\n"
        );
    }
}
