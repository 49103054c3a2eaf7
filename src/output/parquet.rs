//! `--format parquet`: the records as a Parquet table (arrow-rs's `parquet`
//! crate, its column writer API: no Arrow arrays in between), for the
//! dataset tools that read Parquet (pandas, polars, DuckDB, Spark, the
//! Hugging Face `datasets` library).
//!
//! One row per record, the jsonl fields as columns: `path` always, the
//! others null where a record has none (`labels` is the jsonl array as JSON
//! text). Rows are written in row groups of [`ROW_GROUP_ROWS`], Snappy
//! compressed; the file is readable once [`RecordWriter::finish`] has
//! written the footer, so a killed run leaves no table: for long runs,
//! write one file per shard (`--output-dir`) or jsonl.

use std::io::{self, Write};
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, DataType, FloatType, Int32Type};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::{SerializedFileWriter, SerializedRowGroupWriter};
use parquet::schema::parser::parse_message_type;

use super::{Outcome, Record, RecordWriter};

/// Rows per row group: bounded memory, and readers can skip by group.
pub const ROW_GROUP_ROWS: usize = 10_000;

/// The table's schema; `path` is the only column every row has.
const SCHEMA: &str = "
message caption {
    required binary path (STRING);
    optional binary key (STRING);
    optional binary shard (STRING);
    optional binary caption (STRING);
    optional binary question (STRING);
    optional binary answer (STRING);
    optional int32 rank;
    optional float score;
    optional float clip_score;
    optional binary labels (STRING);
    optional binary source_caption (STRING);
    optional binary error (STRING);
}";

/// One row group's columns, in [`SCHEMA`]'s order.
#[derive(Default)]
struct Columns {
    path: Vec<ByteArray>,
    key: Vec<Option<ByteArray>>,
    shard: Vec<Option<ByteArray>>,
    caption: Vec<Option<ByteArray>>,
    question: Vec<Option<ByteArray>>,
    answer: Vec<Option<ByteArray>>,
    rank: Vec<Option<i32>>,
    score: Vec<Option<f32>>,
    clip_score: Vec<Option<f32>>,
    labels: Vec<Option<ByteArray>>,
    source_caption: Vec<Option<ByteArray>>,
    error: Vec<Option<ByteArray>>,
}

fn text(s: Option<&str>) -> Option<ByteArray> {
    s.map(|s| ByteArray::from(s.as_bytes().to_vec()))
}

impl Columns {
    fn push(&mut self, record: &Record) -> io::Result<()> {
        let sample = record.sample.as_ref();
        let (mut caption, mut question, mut answer) = (None, None, None);
        let (mut rank, mut score, mut clip_score, mut labels, mut error) =
            (None, None, None, None, None);
        match &record.outcome {
            Outcome::Caption(c) => {
                match &c.question {
                    Some(q) => {
                        question = Some(q.as_str());
                        answer = Some(c.text.as_str());
                    }
                    None => caption = Some(c.text.as_str()),
                }
                rank = c.rank.map(|r| i32::try_from(r).unwrap_or(i32::MAX));
                score = c.score;
                clip_score = c.clip_score;
            }
            Outcome::Labels(l) => {
                labels = Some(serde_json::to_string(l).map_err(io::Error::other)?);
            }
            Outcome::Match(s) => score = Some(*s),
            Outcome::Embedding(_) => {
                return Err(io::Error::other(
                    "parquet tables hold captions, answers, labels and scores; write \
                     embeddings with --npy or as jsonl",
                ))
            }
            Outcome::Error(e) => error = Some(e.as_str()),
        }
        self.path
            .push(ByteArray::from(record.path.as_bytes().to_vec()));
        self.key.push(text(sample.map(|s| s.key.as_str())));
        self.shard.push(text(sample.map(|s| s.shard.as_str())));
        self.caption.push(text(caption));
        self.question.push(text(question));
        self.answer.push(text(answer));
        self.rank.push(rank);
        self.score.push(score);
        self.clip_score.push(clip_score);
        self.labels.push(text(labels.as_deref()));
        self.source_caption
            .push(text(sample.and_then(|s| s.source_caption.as_deref())));
        self.error.push(text(error));
        Ok(())
    }

    fn len(&self) -> usize {
        self.path.len()
    }
}

/// The present values of an optional column and its definition levels
/// (1 present, 0 null).
fn levels<T: Clone>(column: &[Option<T>]) -> (Vec<T>, Vec<i16>) {
    let values = column.iter().flatten().cloned().collect();
    let defined = column.iter().map(|v| i16::from(v.is_some())).collect();
    (values, defined)
}

/// A [`RecordWriter`] of a Parquet table into `out`.
pub struct ParquetWriter<W: Write + Send> {
    file: Option<SerializedFileWriter<W>>,
    rows: Columns,
    row_group_rows: usize,
}

impl<W: Write + Send> ParquetWriter<W> {
    pub fn new(out: W) -> io::Result<Self> {
        let schema = Arc::new(parse_message_type(SCHEMA).map_err(io::Error::other)?);
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by(format!("caption {}", env!("CARGO_PKG_VERSION")))
            .build();
        let file = SerializedFileWriter::new(out, schema, Arc::new(properties))
            .map_err(io::Error::other)?;
        Ok(ParquetWriter {
            file: Some(file),
            rows: Columns::default(),
            row_group_rows: ROW_GROUP_ROWS,
        })
    }

    fn write_row_group(&mut self) -> parquet::errors::Result<()> {
        let rows = std::mem::take(&mut self.rows);
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let mut group = file.next_row_group()?;
        next_column::<ByteArrayType, W>(&mut group, &rows.path, None)?;
        for strings in [
            &rows.key,
            &rows.shard,
            &rows.caption,
            &rows.question,
            &rows.answer,
        ] {
            optional_column::<ByteArrayType, W>(&mut group, strings)?;
        }
        optional_column::<Int32Type, W>(&mut group, &rows.rank)?;
        for floats in [&rows.score, &rows.clip_score] {
            optional_column::<FloatType, W>(&mut group, floats)?;
        }
        for strings in [&rows.labels, &rows.source_caption, &rows.error] {
            optional_column::<ByteArrayType, W>(&mut group, strings)?;
        }
        group.close().map(drop)
    }
}

/// Writes the row group's next column.
fn next_column<T: DataType, W: Write + Send>(
    group: &mut SerializedRowGroupWriter<'_, W>,
    values: &[T::T],
    defined: Option<&[i16]>,
) -> parquet::errors::Result<()> {
    let mut column = group
        .next_column()?
        .ok_or_else(|| ParquetError::General("more columns than the schema".into()))?;
    column.typed::<T>().write_batch(values, defined, None)?;
    column.close()
}

fn optional_column<T: DataType, W: Write + Send>(
    group: &mut SerializedRowGroupWriter<'_, W>,
    column: &[Option<T::T>],
) -> parquet::errors::Result<()> {
    let (values, defined) = levels(column);
    next_column::<T, W>(group, &values, Some(&defined))
}

impl<W: Write + Send> RecordWriter for ParquetWriter<W> {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        self.rows.push(record)?;
        if self.rows.len() >= self.row_group_rows {
            self.write_row_group().map_err(io::Error::other)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        if self.rows.len() > 0 {
            self.write_row_group().map_err(io::Error::other)?;
        }
        if let Some(file) = self.file.take() {
            let mut out = file.into_inner().map_err(io::Error::other)?;
            out.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::CaptionOutput;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    fn caption(path: &str, text: &str, rank: Option<usize>) -> Record {
        Record {
            path: path.into(),
            path_bytes: None,
            sample: None,
            outcome: Outcome::Caption(CaptionOutput {
                rank,
                score: rank.map(|r| r as f32 + 0.5),
                ..CaptionOutput::from(text)
            }),
        }
    }

    /// Each row as "name=value" for its non-null columns.
    fn rows(bytes: Vec<u8>) -> (usize, Vec<Vec<String>>) {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        let reader = SerializedFileReader::new(file).unwrap();
        let groups = reader.metadata().num_row_groups();
        let rows = reader
            .get_row_iter(None)
            .unwrap()
            .map(|row| {
                row.unwrap()
                    .get_column_iter()
                    .filter_map(|(name, field)| {
                        let value = match field {
                            Field::Null => return None,
                            Field::Str(s) => s.clone(),
                            Field::Int(i) => i.to_string(),
                            Field::Float(f) => f.to_string(),
                            other => panic!("{name}: unexpected {other:?}"),
                        };
                        Some(format!("{name}={value}"))
                    })
                    .collect()
            })
            .collect();
        (groups, rows)
    }

    #[test]
    fn rows_come_back_in_order_across_row_groups_with_nulls_where_absent() {
        let mut out = Vec::new();
        {
            let mut writer = ParquetWriter::new(&mut out).unwrap();
            writer.row_group_rows = 10;
            for i in 0..25 {
                let rank = (i % 2 == 0).then_some(i);
                writer
                    .write(&caption(&format!("{i}.jpg"), &format!("c{i}"), rank))
                    .unwrap();
            }
            writer
                .write(&Record {
                    path: "bad.jpg".into(),
                    path_bytes: None,
                    sample: None,
                    outcome: Outcome::Error("file is empty".into()),
                })
                .unwrap();
            writer.finish().unwrap();
        }
        let (groups, rows) = rows(out);
        assert_eq!(groups, 3);
        assert_eq!(rows.len(), 26);
        assert_eq!(rows[0], ["path=0.jpg", "caption=c0", "rank=0", "score=0.5"]);
        assert_eq!(
            rows[12],
            ["path=12.jpg", "caption=c12", "rank=12", "score=12.5"]
        );
        assert_eq!(rows[13], ["path=13.jpg", "caption=c13"]);
        assert_eq!(rows[25], ["path=bad.jpg", "error=file is empty"]);
    }

    #[test]
    fn embeddings_are_refused_not_dropped() {
        let mut out = Vec::new();
        let mut writer = ParquetWriter::new(&mut out).unwrap();
        let err = writer
            .write(&Record {
                path: "a.jpg".into(),
                path_bytes: None,
                sample: None,
                outcome: Outcome::Embedding(vec![0.5]),
            })
            .unwrap_err();
        assert!(err.to_string().contains("--output FILE.npy") || err.to_string().contains("npy"));
    }
}
