//! Parquet files of series rows, written with the parquet crate's low-level file writer (no arrow).
//!
//! One file holds records of series lanes, one row per record. The fixed columns come first
//! (`SERIES_FIXED_FIELDS`), then the shard's typed columns (`typed.rs`: one optional column per
//! JSON field, fixed when the first row group is written):
//!
//! | column         | physical   | logical type                          | notes                        |
//! | ---            | ---        | ---                                   | ---                          |
//! | `device`       | BYTE_ARRAY | STRING                                | dictionary encoded           |
//! | `lane`         | BYTE_ARRAY | STRING                                | dictionary encoded           |
//! | `seq`          | INT64      | INTEGER(64, unsigned)                 | chunk sequence number        |
//! | `index`        | INT32      | INTEGER(32, unsigned)                 | record index in the chunk    |
//! | `key`          | BYTE_ARRAY | STRING                                |                              |
//! | `timestamp_us` | INT64      | TIMESTAMP(MICROS, adjusted to UTC)    |                              |
//! | `content_type` | BYTE_ARRAY | STRING                                | dictionary encoded           |
//! | `payload`      | BYTE_ARRAY | none (binary)                         | no statistics                |
//!
//! The fixed columns are required, typed ones optional. `device`, `lane`, `key`,
//! `content_type` and typed `string` columns are dictionary encoded; statistics are kept per
//! page and column chunk for every column but `payload`. Every column is ZSTD level `ZSTD_LEVEL` (pyarrow and the crate
//! default to other codecs, so it is set per column, not left to a default). Data pages are
//! format v1 (`WriterVersion::PARQUET_1_0`), the page version every stock reader has read for
//! years, at most `DATA_PAGE_BYTES` (1 MiB) and `DATA_PAGE_ROWS_MAX` (20 000) rows.
//!
//! Limits: text fields at most `SERIES_TEXT_BYTES_MAX` (1 KiB) each, payload at most
//! `SERIES_PAYLOAD_BYTES_MAX` (16 MiB); a row group holds at most `row_group_rows` rows
//! (1 ..= `ROW_GROUP_ROWS_MAX` = 1 Mi) and is also cut when the buffered rows reach
//! `ROW_GROUP_BUFFERED_BYTES_MAX` (128 MiB), which bounds the writer's memory.
//!
//! A Parquet file is readable only once its footer is written (`finish`): callers write under a
//! temporary name, fsync, rename. After any error the writer refuses further rows.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::column::writer::ColumnWriter;
use parquet::data_type::ByteArray;
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::record::{Field, Row};
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::{ColumnPath, Type};

use super::typed::{
    self, CONFLICTS_LISTED_MAX, Cell, ColumnType, FieldValue, Inference, TypeConflict, TypedColumn,
};

/// The fixed columns every series file starts with, checked on reading.
pub const SERIES_FIXED_FIELDS: &str = "
  required binary device (STRING);
  required binary lane (STRING);
  required int64 seq (INTEGER(64, false));
  required int32 index (INTEGER(32, false));
  required binary key (STRING);
  required int64 timestamp_us (TIMESTAMP(MICROS, true));
  required binary content_type (STRING);
  required binary payload;
";

/// Column names in schema order.
pub const SERIES_COLUMNS: [&str; 8] =
    ["device", "lane", "seq", "index", "key", "timestamp_us", "content_type", "payload"];

/// Level 1: sensor JSON compresses ≈ 4.5× at ≈ 290 MB/s on the target machine (field notes); higher
/// levels cost CPU the sink needs for landing and gain little on small repetitive values.
pub const ZSTD_LEVEL: i32 = 1;
/// Data page size target, the crate's and parquet-mr's usual value: pages big enough to compress
/// well, small enough for readers that skip by page.
pub const DATA_PAGE_BYTES: usize = 1024 * 1024;
/// Most rows in one data page.
pub const DATA_PAGE_ROWS_MAX: usize = 20_000;
/// Dictionary pages past this size fall back to plain encoding.
pub const DICTIONARY_PAGE_BYTES_MAX: usize = 1024 * 1024;
/// Longest min/max statistic kept per column chunk; keeps the footer small for long keys.
pub const STATISTICS_TRUNCATE_BYTES: usize = 64;
/// Most rows in one row group.
pub const ROW_GROUP_ROWS_MAX: usize = 1024 * 1024;
/// A row group is written early once its buffered rows take this much memory.
pub const ROW_GROUP_BUFFERED_BYTES_MAX: u64 = 128 * 1024 * 1024;
/// Longest device, lane, key or content type, in bytes.
pub const SERIES_TEXT_BYTES_MAX: usize = 1024;
/// Largest payload, in bytes.
pub const SERIES_PAYLOAD_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Byte-array values handed to the column writer per call; the writer checks its page limits
/// between calls, so this bounds a page to about `DATA_PAGE_BYTES` plus one value.
const WRITE_BATCH_BYTES_MAX: u64 = DATA_PAGE_BYTES as u64;
/// Fixed-width values handed to the column writer per call.
const WRITE_BATCH_VALUES_MAX: usize = 1024;
/// Bytes a buffered row costs besides its text and payload: seq, index, timestamp and one
/// `ByteArray` handle per byte-array column.
const ROW_FIXED_BYTES: u64 = 8 + 4 + 8 + 5 * std::mem::size_of::<ByteArray>() as u64;

const _: () = assert!(SERIES_TEXT_BYTES_MAX >= protocol::control::DEVICE_ID_BYTES_MAX);
const _: () = assert!(SERIES_TEXT_BYTES_MAX >= protocol::record::RECORD_KEY_BYTES_MAX);
const _: () = assert!(SERIES_TEXT_BYTES_MAX >= protocol::record::CONTENT_TYPE_BYTES_MAX);
const _: () = assert!(SERIES_PAYLOAD_BYTES_MAX >= protocol::record::RECORD_PAYLOAD_BYTES_MAX);
// One row of the largest size always fits a row group.
const _: () = assert!(
    ROW_FIXED_BYTES + 4 * SERIES_TEXT_BYTES_MAX as u64 + (SERIES_PAYLOAD_BYTES_MAX as u64)
        < ROW_GROUP_BUFFERED_BYTES_MAX
);
// Parquet stores byte-array lengths as 32-bit integers.
const _: () = assert!(SERIES_PAYLOAD_BYTES_MAX < i32::MAX as usize);
const _: () = assert!(ROW_GROUP_ROWS_MAX <= i32::MAX as usize);

#[derive(Debug, thiserror::Error)]
pub enum DatasetFormatError {
    #[error("parquet shard setting {setting}: {problem}")]
    Setting { setting: &'static str, problem: String },
    #[error("parquet shard: row {row} (device {device:?}, lane {lane:?}, seq {seq}) refused: {problem}")]
    RowRefused { row: u64, device: String, lane: String, seq: u64, problem: String },
    #[error("parquet shard: {operation}: {source}")]
    Write {
        operation: String,
        #[source]
        source: ParquetError,
    },
    #[error("parquet shard: {operation} refused: an earlier write failed and the file is torn")]
    Torn { operation: &'static str },
    #[error("parquet file {path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parquet file {path}: {operation}: {source}")]
    Read {
        path: PathBuf,
        operation: String,
        #[source]
        source: ParquetError,
    },
    #[error("parquet file {path} does not hold series rows: {problem}")]
    Malformed { path: PathBuf, problem: String },
}

/// One record of a series lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesRow<'a> {
    pub device: &'a str,
    pub lane: &'a str,
    pub seq: u64,
    pub index: u32,
    pub key: &'a str,
    pub timestamp_us: i64,
    pub content_type: &'a str,
    pub payload: &'a [u8],
}

/// A series row read back from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSeriesRow {
    pub device: String,
    pub lane: String,
    pub seq: u64,
    pub index: u32,
    pub key: String,
    pub timestamp_us: i64,
    pub content_type: String,
    pub payload: Vec<u8>,
}

impl OwnedSeriesRow {
    pub fn as_row(&self) -> SeriesRow<'_> {
        SeriesRow {
            device: &self.device,
            lane: &self.lane,
            seq: self.seq,
            index: self.index,
            key: &self.key,
            timestamp_us: self.timestamp_us,
            content_type: &self.content_type,
            payload: &self.payload,
        }
    }
}

impl From<&SeriesRow<'_>> for OwnedSeriesRow {
    fn from(row: &SeriesRow<'_>) -> Self {
        OwnedSeriesRow {
            device: row.device.to_owned(),
            lane: row.lane.to_owned(),
            seq: row.seq,
            index: row.index,
            key: row.key.to_owned(),
            timestamp_us: row.timestamp_us,
            content_type: row.content_type.to_owned(),
            payload: row.payload.to_vec(),
        }
    }
}

/// Rows of the row group being collected, column by column.
#[derive(Default)]
struct ColumnBuffers {
    device: Vec<ByteArray>,
    lane: Vec<ByteArray>,
    seq: Vec<i64>,
    index: Vec<i32>,
    key: Vec<ByteArray>,
    timestamp_us: Vec<i64>,
    content_type: Vec<ByteArray>,
    payload: Vec<ByteArray>,
    /// The payload's JSON fields that may become typed columns, every row's in name order, one
    /// row after the other; `field_ends[row]` is where row `row`'s end.
    fields: Vec<(FieldId, FieldValue)>,
    field_ends: Vec<usize>,
    /// The field names of the rows above, each stored once (rows repeat the same few names).
    names: FieldNames,
    /// The last device, lane and content type pushed: rows repeat them, and a `ByteArray` clone
    /// shares the bytes instead of copying them.
    last_texts: [Option<ByteArray>; 3],
    /// Rough memory held by the rows above.
    bytes: u64,
}

/// A field name's number among the names of one row group's rows.
type FieldId = u32;

#[derive(Default)]
struct FieldNames {
    ids: std::collections::HashMap<Box<str>, FieldId>,
    names: Vec<Box<str>>,
}

impl FieldNames {
    fn id(&mut self, name: &str) -> FieldId {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        // At most rows × `FIELDS_PER_RECORD_MAX` names, bounded with the rows by `bytes`.
        let id = FieldId::try_from(self.names.len()).expect("fewer names than 2^32");
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    fn name(&self, id: FieldId) -> &str {
        &self.names[id as usize]
    }

    fn find(&self, name: &str) -> Option<FieldId> {
        self.ids.get(name).copied()
    }

    fn len(&self) -> usize {
        self.names.len()
    }
}

/// `text` as a byte array, sharing the bytes of `last` when it holds the same text.
fn repeated_text(last: &mut Option<ByteArray>, text: &str) -> ByteArray {
    match last {
        Some(previous) if previous.data() == text.as_bytes() => previous.clone(),
        _ => last.insert(ByteArray::from(text)).clone(),
    }
}

impl ColumnBuffers {
    fn rows(&self) -> usize {
        self.seq.len()
    }

    fn push(&mut self, row: &SeriesRow<'_>) {
        let [last_device, last_lane, last_content_type] = &mut self.last_texts;
        self.device.push(repeated_text(last_device, row.device));
        self.lane.push(repeated_text(last_lane, row.lane));
        // Parquet stores unsigned integers in the signed physical type with the same bits; the
        // INTEGER(_, false) annotation tells readers to take them back as unsigned.
        self.seq.push(row.seq.cast_signed());
        self.index.push(row.index.cast_signed());
        self.key.push(ByteArray::from(row.key));
        self.timestamp_us.push(row.timestamp_us);
        self.content_type.push(repeated_text(last_content_type, row.content_type));
        self.payload.push(ByteArray::from(row.payload));
        let mut field_bytes = 0;
        for (name, value) in typed::payload_fields(row.payload) {
            field_bytes += name.len() as u64 + value.bytes();
            let id = self.names.id(&name);
            self.fields.push((id, value));
        }
        self.field_ends.push(self.fields.len());
        self.bytes += row_bytes(row) + field_bytes;
        assert!(self.rows() == self.device.len() && self.rows() == self.field_ends.len());
    }

    fn clear(&mut self) {
        *self = ColumnBuffers::default();
    }

    /// Buffered row `row`'s fields.
    fn row_fields(&self, row: usize) -> &[(FieldId, FieldValue)] {
        let start = if row == 0 { 0 } else { self.field_ends[row - 1] };
        &self.fields[start..self.field_ends[row]]
    }

    /// The value of field `id` in buffered row `row`, if the row has it.
    fn field(&self, row: usize, id: FieldId) -> Option<&FieldValue> {
        // A row has a few fields: a scan of their numbers beats a search by name.
        self.row_fields(row).iter().find(|(field, _)| *field == id).map(|(_, value)| value)
    }
}

fn row_bytes(row: &SeriesRow<'_>) -> u64 {
    ROW_FIXED_BYTES
        + (row.device.len() + row.lane.len() + row.key.len() + row.content_type.len() + row.payload.len())
            as u64
}

/// What a series shard learned about its typed columns, for the manifest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeriesReport {
    /// The shard's typed columns, in file order.
    pub columns: Vec<TypedColumn>,
    /// Fields first seen after the columns were fixed: columns from the next shard on.
    pub late_columns: Vec<TypedColumn>,
    /// Values that did not fit their column (typed cell null, raw JSON kept in `payload`).
    pub conflicts_total: u64,
    /// The first `CONFLICTS_LISTED_MAX` of them.
    pub conflicts: Vec<TypeConflict>,
}

/// Writes series rows into one Parquet file, a row group at a time.
pub struct ParquetShardWriter {
    /// The file until the first row group fixes the schema and starts the Parquet writer.
    file: Option<File>,
    writer: Option<SerializedFileWriter<File>>,
    buffered: ColumnBuffers,
    row_group_rows: usize,
    /// Columns the shard has whatever its records hold (declared, then the dataset's so far).
    known_columns: Vec<TypedColumn>,
    /// Fields seen after the columns were fixed.
    late: Inference,
    report: SeriesReport,
    rows: u64,
    row_groups: u64,
    /// Set when a write failed: the file is torn and must not be continued.
    failed: bool,
}

impl ParquetShardWriter {
    /// A writer whose typed columns are inferred from the first row group alone.
    pub fn new(file: File, row_group_rows: usize) -> Result<ParquetShardWriter, DatasetFormatError> {
        ParquetShardWriter::with_columns(file, row_group_rows, &[])
    }

    /// Fixed columns as in `SERIES_FIXED_FIELDS`, then `known_columns`, then the fields the first
    /// row group infers (`typed.rs`); ZSTD level `ZSTD_LEVEL` on every column, writer properties
    /// named explicitly (row group size, data page size, statistics). `row_group_rows` must be
    /// 1 ..= `ROW_GROUP_ROWS_MAX`.
    pub fn with_columns(
        file: File,
        row_group_rows: usize,
        known_columns: &[TypedColumn],
    ) -> Result<ParquetShardWriter, DatasetFormatError> {
        if !(1..=ROW_GROUP_ROWS_MAX).contains(&row_group_rows) {
            return Err(DatasetFormatError::Setting {
                setting: "row_group_rows",
                problem: format!("{row_group_rows} is outside 1..={ROW_GROUP_ROWS_MAX}"),
            });
        }
        if let Some(column) = known_columns.iter().find(|column| !typed::valid_column_name(&column.name)) {
            return Err(DatasetFormatError::Setting {
                setting: "typed columns",
                problem: format!("{:?} is not a valid column name", column.name),
            });
        }
        // Checked before any byte is written.
        writer_properties(row_group_rows, known_columns)?;
        Ok(ParquetShardWriter {
            file: Some(file),
            writer: None,
            buffered: ColumnBuffers::default(),
            row_group_rows,
            known_columns: typed::merge_columns(known_columns, &[]),
            late: Inference::default(),
            report: SeriesReport::default(),
            rows: 0,
            row_groups: 0,
            failed: false,
        })
    }

    /// Buffers the row (copying it); writes a row group when `row_group_rows` rows are buffered
    /// or they hold `ROW_GROUP_BUFFERED_BYTES_MAX` bytes.
    pub fn append(&mut self, row: &SeriesRow<'_>) -> Result<(), DatasetFormatError> {
        if self.failed {
            return Err(DatasetFormatError::Torn { operation: "append" });
        }
        self.check_row(row)?;
        self.buffered.push(row);
        self.rows += 1;
        if self.buffered.rows() >= self.row_group_rows || self.buffered.bytes >= ROW_GROUP_BUFFERED_BYTES_MAX
        {
            self.write_row_group()?;
        }
        assert!(self.buffered.rows() < self.row_group_rows);
        Ok(())
    }

    fn check_row(&self, row: &SeriesRow<'_>) -> Result<(), DatasetFormatError> {
        let refuse = |problem: String| DatasetFormatError::RowRefused {
            row: self.rows,
            device: truncated(row.device),
            lane: truncated(row.lane),
            seq: row.seq,
            problem,
        };
        let texts = [
            ("device", row.device),
            ("lane", row.lane),
            ("key", row.key),
            ("content_type", row.content_type),
        ];
        for (column, text) in texts {
            if text.len() > SERIES_TEXT_BYTES_MAX {
                return Err(refuse(format!(
                    "{column} of {} bytes is above the limit of {SERIES_TEXT_BYTES_MAX} bytes",
                    text.len()
                )));
            }
        }
        if row.payload.len() > SERIES_PAYLOAD_BYTES_MAX {
            return Err(refuse(format!(
                "payload of {} bytes is above the limit of {SERIES_PAYLOAD_BYTES_MAX} bytes",
                row.payload.len()
            )));
        }
        Ok(())
    }

    /// Rows appended so far, buffered ones included.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Row groups written to the file so far.
    pub fn row_groups(&self) -> u64 {
        self.row_groups
    }

    /// Bytes written to the file so far plus a rough size of buffered rows (for rotation by
    /// size). Buffered rows count uncompressed, so this overestimates until the footer is written.
    pub fn approximate_bytes(&self) -> u64 {
        self.writer.as_ref().map_or(0, |writer| writer.bytes_written() as u64) + self.buffered.bytes
    }

    /// Writes remaining rows and the footer; returns the file (not fsynced: the caller fsyncs and
    /// renames).
    pub fn finish(self) -> Result<File, DatasetFormatError> {
        self.finish_with_report().map(|(file, _)| file)
    }

    /// `finish`, and what the shard learned about its typed columns.
    pub fn finish_with_report(mut self) -> Result<(File, SeriesReport), DatasetFormatError> {
        if self.failed {
            return Err(DatasetFormatError::Torn { operation: "finish" });
        }
        if self.buffered.rows() > 0 {
            self.write_row_group()?;
        }
        assert_eq!(self.buffered.rows(), 0);
        self.start_file()?;
        let rows = self.rows;
        let writer = self.writer.take().expect("started above");
        let written_rows: i64 = writer.flushed_row_groups().iter().map(|group| group.num_rows()).sum();
        assert_eq!(u64::try_from(written_rows).ok(), Some(rows), "row groups must hold every appended row");
        // `into_inner` writes the footer and flushes the writer's buffer into the file.
        let file = writer.into_inner().map_err(|source| DatasetFormatError::Write {
            operation: format!("failed to write the footer after {rows} rows"),
            source,
        })?;
        let mut report = self.report;
        report.late_columns = self.late.columns();
        Ok((file, report))
    }

    /// Fixes the columns (known ones, then those the buffered rows infer) and starts the Parquet
    /// writer, once.
    fn start_file(&mut self) -> Result<(), DatasetFormatError> {
        let Some(file) = self.file.take() else { return Ok(()) };
        let mut inference = Inference::default();
        for (id, value) in &self.buffered.fields {
            inference.observe(self.buffered.names.name(*id), value);
        }
        let columns = typed::merge_columns(&self.known_columns, &inference.columns());
        let schema = Arc::new(series_schema(&columns)?);
        let properties = Arc::new(writer_properties(self.row_group_rows, &columns)?);
        let writer = SerializedFileWriter::new(file, schema, properties).map_err(|source| {
            self.failed = true;
            DatasetFormatError::Write { operation: "failed to start the file".to_owned(), source }
        })?;
        self.writer = Some(writer);
        self.report.columns = columns;
        Ok(())
    }

    fn write_row_group(&mut self) -> Result<(), DatasetFormatError> {
        let group = self.row_groups;
        let rows = self.buffered.rows();
        assert!(rows > 0);
        self.start_file()?;
        // Fields the columns lack are late: columns from the next shard on.
        let names = &self.buffered.names;
        let mut is_column = vec![false; names.len()];
        for column in &self.report.columns {
            if let Some(id) = names.find(&column.name) {
                is_column[id as usize] = true;
            }
        }
        for (id, value) in &self.buffered.fields {
            if !is_column[*id as usize] {
                self.late.observe(names.name(*id), value);
            }
        }
        let writer = self.writer.as_mut().expect("started above");
        let result = write_row_group(writer, &self.buffered, &mut self.report);
        self.buffered.clear();
        match result {
            Ok(()) => {
                self.row_groups += 1;
                Ok(())
            }
            Err(source) => {
                self.failed = true;
                Err(DatasetFormatError::Write {
                    operation: format!("failed to write row group {group} of {rows} rows"),
                    source,
                })
            }
        }
    }
}

fn write_row_group(
    writer: &mut SerializedFileWriter<File>,
    rows: &ColumnBuffers,
    report: &mut SeriesReport,
) -> Result<(), ParquetError> {
    let mut group = writer.next_row_group()?;
    let mut column_index: usize = 0;
    let typed_columns = report.columns.clone();
    while let Some(mut column) = group.next_column()? {
        if let Some(typed) =
            column_index.checked_sub(SERIES_COLUMNS.len()).and_then(|at| typed_columns.get(at))
        {
            write_typed_column(column.untyped(), typed, rows, report)?;
            column.close()?;
            column_index += 1;
            continue;
        }
        let name = SERIES_COLUMNS.get(column_index).copied().unwrap_or("(extra)");
        match (name, column.untyped()) {
            ("device", ColumnWriter::ByteArrayColumnWriter(writer)) => {
                write_byte_arrays(writer, &rows.device, None)?
            }
            ("lane", ColumnWriter::ByteArrayColumnWriter(writer)) => {
                write_byte_arrays(writer, &rows.lane, None)?
            }
            ("seq", ColumnWriter::Int64ColumnWriter(writer)) => write_values(writer, &rows.seq, None)?,
            ("index", ColumnWriter::Int32ColumnWriter(writer)) => write_values(writer, &rows.index, None)?,
            ("key", ColumnWriter::ByteArrayColumnWriter(writer)) => {
                write_byte_arrays(writer, &rows.key, None)?
            }
            ("timestamp_us", ColumnWriter::Int64ColumnWriter(writer)) => {
                write_values(writer, &rows.timestamp_us, None)?
            }
            ("content_type", ColumnWriter::ByteArrayColumnWriter(writer)) => {
                write_byte_arrays(writer, &rows.content_type, None)?
            }
            ("payload", ColumnWriter::ByteArrayColumnWriter(writer)) => {
                write_byte_arrays(writer, &rows.payload, None)?
            }
            (name, _) => {
                return Err(ParquetError::General(format!(
                    "column {column_index} ({name}) does not match the series schema"
                )));
            }
        }
        column.close()?;
        column_index += 1;
    }
    if column_index != SERIES_COLUMNS.len() + typed_columns.len() {
        return Err(ParquetError::General(format!(
            "row group has {column_index} columns, the shard's schema {}",
            SERIES_COLUMNS.len() + typed_columns.len()
        )));
    }
    let metadata = group.close()?;
    assert_eq!(usize::try_from(metadata.num_rows()).ok(), Some(rows.rows()));
    Ok(())
}

/// Writes one typed column of the buffered rows: a value where the row's field fits the column's
/// type, a null where the row lacks it or it is JSON null, and a null plus a recorded conflict
/// where it does not fit.
fn write_typed_column(
    writer: &mut ColumnWriter<'_>,
    column: &TypedColumn,
    rows: &ColumnBuffers,
    report: &mut SeriesReport,
) -> Result<(), ParquetError> {
    let mut cells = Vec::with_capacity(rows.rows());
    // A column no buffered row has is all nulls.
    let id = rows.names.find(&column.name);
    for row in 0..rows.rows() {
        let value = id.and_then(|id| rows.field(row, id));
        let cell = match value.map(|value| (value, value.cell(column.column_type))) {
            None => None,
            Some((_, Ok(cell))) => cell,
            Some((value, Err(()))) => {
                report.conflicts_total += 1;
                if report.conflicts.len() < CONFLICTS_LISTED_MAX {
                    report.conflicts.push(TypeConflict {
                        device: rows.device[row].as_utf8().unwrap_or("?").to_owned(),
                        seq: rows.seq[row].cast_unsigned(),
                        index: rows.index[row].cast_unsigned(),
                        column: column.name.clone(),
                        expected: column.column_type,
                        found: value.kind().to_owned(),
                    });
                }
                None
            }
        };
        cells.push(cell);
    }
    let levels: Vec<i16> = cells.iter().map(|cell| i16::from(cell.is_some())).collect();
    // The present values, in row order, of the one kind the column holds.
    fn present<T>(cells: &[Option<Cell>], pick: impl Fn(&Cell) -> Option<T>) -> Vec<T> {
        cells.iter().flatten().filter_map(pick).collect()
    }
    match (column.column_type, writer) {
        (ColumnType::Double, ColumnWriter::DoubleColumnWriter(writer)) => {
            let values =
                present(&cells, |cell| if let Cell::Double(value) = cell { Some(*value) } else { None });
            write_values(writer, &values, Some(&levels))
        }
        (ColumnType::Int64, ColumnWriter::Int64ColumnWriter(writer)) => {
            let values =
                present(&cells, |cell| if let Cell::Int64(value) = cell { Some(*value) } else { None });
            write_values(writer, &values, Some(&levels))
        }
        (ColumnType::Bool, ColumnWriter::BoolColumnWriter(writer)) => {
            let values =
                present(&cells, |cell| if let Cell::Bool(value) = cell { Some(*value) } else { None });
            write_values(writer, &values, Some(&levels))
        }
        (ColumnType::String, ColumnWriter::ByteArrayColumnWriter(writer)) => {
            let values = present(&cells, |cell| {
                if let Cell::Text(value) = cell {
                    Some(ByteArray::from(value.as_bytes().to_vec()))
                } else {
                    None
                }
            });
            write_byte_arrays(writer, &values, Some(&levels))
        }
        (column_type, _) => Err(ParquetError::General(format!(
            "typed column {} ({}) does not match its writer",
            column.name,
            column_type.name()
        ))),
    }
}

/// Hands fixed-width values to the column writer `WRITE_BATCH_VALUES_MAX` rows at a time;
/// `levels` are definition levels of an optional column (1 for a value, 0 for a null).
fn write_values<T: parquet::data_type::DataType>(
    writer: &mut parquet::column::writer::ColumnWriterImpl<'_, T>,
    values: &[T::T],
    levels: Option<&[i16]>,
) -> Result<(), ParquetError> {
    let rows = levels.map_or(values.len(), <[i16]>::len);
    let mut value_start = 0;
    let mut row_start = 0;
    while row_start < rows {
        let row_end = (row_start + WRITE_BATCH_VALUES_MAX).min(rows);
        let batch_levels = levels.map(|levels| &levels[row_start..row_end]);
        let value_count = batch_levels
            .map_or(row_end - row_start, |levels| levels.iter().filter(|level| **level == 1).count());
        let written =
            writer.write_batch(&values[value_start..value_start + value_count], batch_levels, None)?;
        assert_eq!(written, value_count);
        value_start += value_count;
        row_start = row_end;
    }
    assert_eq!(value_start, values.len());
    Ok(())
}

/// Hands byte arrays to the column writer in calls of about `WRITE_BATCH_BYTES_MAX` bytes, so the
/// writer checks its page limits at least that often whatever the value sizes. `levels` as in
/// `write_values`.
fn write_byte_arrays(
    writer: &mut parquet::column::writer::ColumnWriterImpl<'_, parquet::data_type::ByteArrayType>,
    values: &[ByteArray],
    levels: Option<&[i16]>,
) -> Result<(), ParquetError> {
    let rows = levels.map_or(values.len(), <[i16]>::len);
    let present = |row: usize| levels.is_none_or(|levels| levels[row] == 1);
    let (mut row_start, mut value_start) = (0, 0);
    while row_start < rows {
        let (mut row_end, mut value_end) = (row_start, value_start);
        let mut bytes = 0u64;
        while row_end < rows
            && (row_end == row_start || bytes < WRITE_BATCH_BYTES_MAX)
            && row_end - row_start < WRITE_BATCH_VALUES_MAX
        {
            if present(row_end) {
                bytes += values[value_end].len() as u64;
                value_end += 1;
            }
            row_end += 1;
        }
        assert!(row_end > row_start);
        let batch_levels = levels.map(|levels| &levels[row_start..row_end]);
        let written = writer.write_batch(&values[value_start..value_end], batch_levels, None)?;
        assert_eq!(written, value_end - value_start);
        (row_start, value_start) = (row_end, value_end);
    }
    assert_eq!(value_start, values.len());
    Ok(())
}

/// The message type of a series file with these typed columns.
fn series_schema(columns: &[TypedColumn]) -> Result<Type, DatasetFormatError> {
    let typed: String =
        columns.iter().map(|column| column.column_type.parquet_declaration(&column.name)).collect();
    parse_message_type(&format!("message tributary_series {{{SERIES_FIXED_FIELDS}{typed}}}"))
        .map_err(|error| DatasetFormatError::Setting { setting: "typed columns", problem: error.to_string() })
}

fn writer_properties(
    row_group_rows: usize,
    columns: &[TypedColumn],
) -> Result<WriterProperties, DatasetFormatError> {
    let zstd = ZstdLevel::try_new(ZSTD_LEVEL)
        .map_err(|error| DatasetFormatError::Setting { setting: "zstd level", problem: error.to_string() })?;
    let mut builder = WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_created_by(format!("tributary {} (parquet-rs)", env!("CARGO_PKG_VERSION")))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_data_page_size_limit(DATA_PAGE_BYTES)
        .set_data_page_row_count_limit(DATA_PAGE_ROWS_MAX)
        .set_dictionary_page_size_limit(DICTIONARY_PAGE_BYTES_MAX)
        .set_write_batch_size(WRITE_BATCH_VALUES_MAX)
        .set_statistics_truncate_length(Some(STATISTICS_TRUNCATE_BYTES))
        .set_column_index_truncate_length(Some(STATISTICS_TRUNCATE_BYTES))
        .set_bloom_filter_enabled(false)
        .set_compression(Compression::ZSTD(zstd))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_dictionary_enabled(false);
    for column in SERIES_COLUMNS {
        let path = ColumnPath::from(column);
        // Device, lane, key and content type repeat across rows: a dictionary makes them nearly
        // free, and lets engines filter on the dictionary.
        let dictionary = matches!(column, "device" | "lane" | "key" | "content_type");
        // Min/max of opaque payload bytes helps no query and would only grow the footer.
        let statistics = if column == "payload" { EnabledStatistics::None } else { EnabledStatistics::Page };
        builder = builder
            .set_column_compression(path.clone(), Compression::ZSTD(zstd))
            .set_column_dictionary_enabled(path.clone(), dictionary)
            .set_column_statistics_enabled(path, statistics);
    }
    for column in columns {
        // Sensor text fields (states, units, labels) repeat; numbers rarely do.
        let dictionary = column.column_type == ColumnType::String;
        builder = builder.set_column_dictionary_enabled(ColumnPath::from(column.name.as_str()), dictionary);
    }
    // Plain encoding for everything not dictionary encoded: the most widely read encoding.
    builder = builder.set_encoding(Encoding::PLAIN);
    Ok(builder.build())
}

/// Reads every row of a series file (fixed columns only), checking its schema and its row count
/// against the footer. Holds the whole file's rows in memory: meant for verification and tests,
/// not for training-time reading.
pub fn read_parquet_rows(path: impl AsRef<Path>) -> Result<Vec<OwnedSeriesRow>, DatasetFormatError> {
    Ok(read_parquet_typed(path)?.1.into_iter().map(|(row, _)| row).collect())
}

/// A row's typed cells by column name; a null cell is absent.
pub type TypedCells = std::collections::BTreeMap<String, Cell>;

/// Reads every row of a series file with its typed cells, and the file's typed columns.
pub fn read_parquet_typed(
    path: impl AsRef<Path>,
) -> Result<(Vec<TypedColumn>, Vec<(OwnedSeriesRow, TypedCells)>), DatasetFormatError> {
    let path = path.as_ref();
    let file =
        File::open(path).map_err(|source| DatasetFormatError::Open { path: path.to_owned(), source })?;
    let read_error = |operation: &str| {
        let operation = operation.to_owned();
        move |source| DatasetFormatError::Read { path: path.to_owned(), operation, source }
    };
    let reader = SerializedFileReader::new(file).map_err(read_error("failed to read the footer"))?;
    let file_schema = reader.metadata().file_metadata().schema();
    let malformed = |problem: String| DatasetFormatError::Malformed { path: path.to_owned(), problem };
    let fields = file_schema.get_fields();
    let fixed = series_schema(&[]).expect("the fixed schema parses");
    if fields.len() < SERIES_COLUMNS.len() || fields[..SERIES_COLUMNS.len()] != *fixed.get_fields() {
        return Err(malformed(format!("schema {file_schema:?} does not start with the series columns")));
    }
    let mut columns = Vec::new();
    for field in &fields[SERIES_COLUMNS.len()..] {
        let name = field.name().to_owned();
        let column_type = [ColumnType::Double, ColumnType::Int64, ColumnType::Bool, ColumnType::String]
            .into_iter()
            .find(|column_type| {
                series_schema(&[TypedColumn { name: name.clone(), column_type: *column_type }])
                    .is_ok_and(|schema| schema.get_fields().last() == Some(field))
            })
            .ok_or_else(|| malformed(format!("column {name:?} is not a typed series column")))?;
        columns.push(TypedColumn { name, column_type });
    }
    let row_count = reader.metadata().file_metadata().num_rows();
    let mut rows = Vec::with_capacity(usize::try_from(row_count).unwrap_or(0));
    for row in reader.get_row_iter(None).map_err(read_error("failed to start reading rows"))? {
        let row = row.map_err(read_error(&format!("failed to read row {}", rows.len())))?;
        let owned = series_row(&row, &columns)
            .map_err(|problem| malformed(format!("row {}: {problem}", rows.len())))?;
        rows.push(owned);
    }
    if i64::try_from(rows.len()).ok() != Some(row_count) {
        return Err(malformed(format!("footer counts {row_count} rows, {} read", rows.len())));
    }
    Ok((columns, rows))
}

fn series_row(row: &Row, columns: &[TypedColumn]) -> Result<(OwnedSeriesRow, TypedCells), String> {
    let fields: Vec<&Field> = row.get_column_iter().map(|(_, field)| field).collect();
    let names: Vec<&str> = row.get_column_iter().map(|(name, _)| name.as_str()).collect();
    let expected: Vec<&str> =
        SERIES_COLUMNS.iter().copied().chain(columns.iter().map(|column| column.name.as_str())).collect();
    if names != expected {
        return Err(format!("columns {names:?}, expected {expected:?}"));
    }
    let text = |column: usize| match fields[column] {
        Field::Str(text) => Ok(text.clone()),
        other => Err(format!("{} is {other:?}, expected a string", SERIES_COLUMNS[column])),
    };
    let seq = match fields[2] {
        Field::ULong(seq) => *seq,
        other => return Err(format!("seq is {other:?}, expected an unsigned 64-bit integer")),
    };
    let index = match fields[3] {
        Field::UInt(index) => *index,
        other => return Err(format!("index is {other:?}, expected an unsigned 32-bit integer")),
    };
    let timestamp_us = match fields[5] {
        Field::TimestampMicros(timestamp_us) => *timestamp_us,
        other => return Err(format!("timestamp_us is {other:?}, expected a timestamp in microseconds")),
    };
    let payload = match fields[7] {
        Field::Bytes(bytes) => bytes.data().to_vec(),
        other => return Err(format!("payload is {other:?}, expected bytes")),
    };
    let mut cells = TypedCells::new();
    for (column, field) in columns.iter().zip(&fields[SERIES_COLUMNS.len()..]) {
        let cell = match (column.column_type, field) {
            (_, Field::Null) => continue,
            (ColumnType::Double, Field::Double(value)) => Cell::Double(*value),
            (ColumnType::Int64, Field::Long(value)) => Cell::Int64(*value),
            (ColumnType::Bool, Field::Bool(value)) => Cell::Bool(*value),
            (ColumnType::String, Field::Str(value)) => Cell::Text(value.clone()),
            (column_type, other) => {
                return Err(format!("{} is {other:?}, expected {}", column.name, column_type.name()));
            }
        };
        cells.insert(column.name.clone(), cell);
    }
    let row = OwnedSeriesRow {
        device: text(0)?,
        lane: text(1)?,
        seq,
        index,
        key: text(4)?,
        timestamp_us,
        content_type: text(6)?,
        payload,
    };
    Ok((row, cells))
}

/// At most 64 bytes of a text for an error message, cut at a character boundary.
fn truncated(text: &str) -> String {
    const SHOWN_BYTES_MAX: usize = 64;
    if text.len() <= SHOWN_BYTES_MAX {
        return text.to_owned();
    }
    format!("{}…", &text[..text.floor_char_boundary(SHOWN_BYTES_MAX)])
}
