//! Results on stdout, one writer per format. stdout carries data only; what
//! people need to read (errors, notes) goes to stderr elsewhere.

use std::io::{self, Write};

use serde::Serialize;

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
}

impl From<&str> for CaptionOutput {
    fn from(text: &str) -> Self {
        Self {
            text: text.to_string(),
            question: None,
            rank: None,
            score: None,
        }
    }
}

/// The result for one input image.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The path as the user gave it (or as found in a folder).
    pub path: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Caption(CaptionOutput),
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
}

/// Writes records in one format.
pub trait RecordWriter {
    fn write(&mut self, record: &Record) -> io::Result<()>;
    /// Called once after the last record.
    fn finish(&mut self) -> io::Result<()>;
}

/// What the text format prints before each caption or answer, so a line
/// says which image (and question) it belongs to when there are several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TextColumns {
    pub path: bool,
    pub question: bool,
}

/// A writer for `format`; `columns` is for the text format.
pub fn writer<'a, W: Write + 'a>(
    format: Format,
    out: W,
    columns: TextColumns,
) -> Box<dyn RecordWriter + 'a> {
    match format {
        Format::Text => Box::new(TextWriter { out, columns }),
        Format::Jsonl => Box::new(JsonlWriter { out }),
    }
}

struct TextWriter<W> {
    out: W,
    columns: TextColumns,
}

impl<W: Write> RecordWriter for TextWriter<W> {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        // Failures are reported on stderr by the caller; the text format has no
        // place for them that a script reading captions would not trip over.
        let Outcome::Caption(caption) = &record.outcome else {
            return Ok(());
        };
        // One line per record whatever the caption holds.
        let mut fields = Vec::with_capacity(3);
        if self.columns.path {
            fields.push(single_line(&record.path));
        }
        if let Some(question) = caption
            .question
            .as_deref()
            .filter(|_| self.columns.question)
        {
            fields.push(single_line(question));
        }
        fields.push(single_line(&caption.text));
        writeln!(self.out, "{}", fields.join("\t"))?;
        // Line by line, so a pipe sees each caption as soon as it exists.
        self.out.flush()
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

struct JsonlWriter<W> {
    out: W,
}

#[derive(Serialize)]
struct JsonRecord<'a> {
    path: &'a str,
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
    error: Option<&'a str>,
}

impl<'a> From<&'a Record> for JsonRecord<'a> {
    fn from(record: &'a Record) -> Self {
        match &record.outcome {
            Outcome::Caption(c) => Self {
                path: &record.path,
                caption: c.question.is_none().then_some(c.text.as_str()),
                question: c.question.as_deref(),
                answer: c.question.is_some().then_some(c.text.as_str()),
                rank: c.rank,
                score: c.score,
                error: None,
            },
            Outcome::Error(e) => Self {
                path: &record.path,
                caption: None,
                question: None,
                answer: None,
                rank: None,
                score: None,
                error: Some(e),
            },
        }
    }
}

impl<W: Write> RecordWriter for JsonlWriter<W> {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        // Serialise first, then write the whole line at once: an interrupted run
        // never leaves half a record.
        let mut line = serde_json::to_vec(&JsonRecord::from(record)).map_err(io::Error::other)?;
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.out.flush()
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn single_line(text: &str) -> String {
    text.replace(['\n', '\r', '\t'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(format: Format, several: bool, records: &[Record]) -> String {
        let columns = TextColumns {
            path: several,
            question: true,
        };
        let mut buf = Vec::new();
        {
            let mut w = writer(format, &mut buf, columns);
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
                outcome: Outcome::Caption("a \"dog\"\non grass".into()),
            },
            Record {
                path: "b.jpg".into(),
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
}
