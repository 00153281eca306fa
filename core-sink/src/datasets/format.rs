//! Dataset formats: what a shard file is and how a landed record becomes one of its samples.
//!
//! A format is a `ShardFormat` variant plus a `ShardWriter` implementation; the pipeline
//! (`pipeline.rs`) and the target threads (`targets.rs`) know formats only through the methods
//! here, so a new format touches this file (and its writer's own module) and nothing else.
//! Formats today: `WebDataset` (POSIX ustar, `tar.rs`) and `Parquet` (`parquet.rs`).

use std::fs::File;
use std::io::BufWriter;

use protocol::{Lane, RecordRef};

use super::parquet::ParquetShardWriter;
pub use super::parquet::{OwnedSeriesRow, SeriesReport};
use super::tar::TarShardWriter;
use super::typed::TypedColumn;

/// The buffer between a shard writer and its file.
pub const WRITE_BUFFER_BYTES: usize = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardFormat {
    WebDataset,
    Parquet { row_group_rows: usize },
}

/// One sample, owned, on its way to a target.
pub enum Sample {
    /// WebDataset members `<base>.<extension>` and `<base>.json`.
    Media {
        base: String,
        extension: &'static str,
        payload: Vec<u8>,
        metadata: Vec<u8>,
        mtime_seconds: u64,
    },
    Series(OwnedSeriesRow),
}

/// Writes one shard file of a format, sample by sample, on a target's thread.
pub trait ShardWriter: Send {
    /// Appends one sample; a sample of another format's kind is an error.
    fn append(&mut self, sample: Sample) -> Result<(), String>;
    /// Writes what is buffered and the format's trailer, and hands back the file to fsync with
    /// what the shard learned about its typed columns (nothing for formats without them).
    fn finish(self: Box<Self>) -> Result<(File, SeriesReport), String>;
}

impl ShardFormat {
    /// The file name extension of its shards.
    pub fn extension(self) -> &'static str {
        match self {
            ShardFormat::WebDataset => "tar",
            ShardFormat::Parquet { .. } => "parquet",
        }
    }

    /// The format named in a new manifest.
    pub fn manifest_kind(self) -> &'static str {
        match self {
            ShardFormat::WebDataset => "webdataset",
            ShardFormat::Parquet { .. } => "parquet",
        }
    }

    /// A writer for a new shard in `file`; `known_columns` are the typed columns a series shard
    /// has whatever its records hold (other formats ignore them).
    pub fn create(self, file: File, known_columns: &[TypedColumn]) -> Result<Box<dyn ShardWriter>, String> {
        Ok(match self {
            ShardFormat::WebDataset => {
                Box::new(TarShardWriter::new(BufWriter::with_capacity(WRITE_BUFFER_BYTES, file)))
            }
            ShardFormat::Parquet { row_group_rows } => Box::new(
                ParquetShardWriter::with_columns(file, row_group_rows, known_columns)
                    .map_err(|error| error.to_string())?,
            ),
        })
    }

    /// The sample record `index` of chunk `seq` of (device, lane) becomes in this format.
    pub fn sample(self, device: &str, lane: Lane, seq: u64, index: usize, record: &RecordRef<'_>) -> Sample {
        let mtime_seconds = record.timestamp_us / 1_000_000;
        match self {
            ShardFormat::WebDataset => {
                let extension = match record.content_type {
                    "image/jpeg" => "jpg",
                    "image/png" => "png",
                    _ => "bin",
                };
                let metadata = serde_json::json!({
                    "device": device,
                    "lane": lane.name(),
                    "seq": seq,
                    "index": index,
                    "key": record.key,
                    "timestamp_us": record.timestamp_us,
                    "content_type": record.content_type,
                    "sha256": super::targets::hex(&<sha2::Sha256 as sha2::Digest>::digest(record.payload)),
                });
                Sample::Media {
                    base: format!("{device}/{}", record.key),
                    extension,
                    payload: record.payload.to_vec(),
                    metadata: serde_json::to_vec(&metadata).expect("json"),
                    mtime_seconds,
                }
            }
            ShardFormat::Parquet { .. } => Sample::Series(OwnedSeriesRow {
                device: device.to_string(),
                lane: lane.name().to_string(),
                seq,
                index: index as u32,
                key: record.key.to_string(),
                timestamp_us: record.timestamp_us as i64,
                content_type: record.content_type.to_string(),
                payload: record.payload.to_vec(),
            }),
        }
    }
}

impl Sample {
    /// Why the shard writer would refuse this sample, checked before it is handed over: a refusal
    /// inside the writer fails the whole shard and the target, so one bad record must be caught
    /// here. `protocol::validate_key` already keeps keys within what a tar member name holds;
    /// this is the writer's own rule, checked again because the bytes came from a device.
    pub fn problem(&self) -> Option<String> {
        match self {
            Sample::Media { base, extension, .. } => [format!("{base}.{extension}"), format!("{base}.json")]
                .iter()
                .find_map(|name| super::tar::split_member_name(name).err())
                .map(|error| error.to_string()),
            // Every series column is bounded by the protocol's own limits at compile time
            // (`parquet.rs`), so a decoded record always makes a valid row.
            Sample::Series(_) => None,
        }
    }
}

impl ShardWriter for TarShardWriter<BufWriter<File>> {
    fn append(&mut self, sample: Sample) -> Result<(), String> {
        let Sample::Media { base, extension, payload, metadata, mtime_seconds } = sample else {
            return Err("sample kind does not match the shard format".into());
        };
        self.append_file(&format!("{base}.{extension}"), mtime_seconds, &payload)
            .map_err(|error| error.to_string())?;
        self.append_file(&format!("{base}.json"), mtime_seconds, &metadata).map_err(|error| error.to_string())
    }

    fn finish(self: Box<Self>) -> Result<(File, SeriesReport), String> {
        TarShardWriter::finish(*self)
            .and_then(|buffer| buffer.into_inner().map_err(|error| error.into_error()))
            .map(|file| (file, SeriesReport::default()))
            .map_err(|error| error.to_string())
    }
}

impl ShardWriter for ParquetShardWriter {
    fn append(&mut self, sample: Sample) -> Result<(), String> {
        let Sample::Series(row) = sample else {
            return Err("sample kind does not match the shard format".into());
        };
        ParquetShardWriter::append(self, &row.as_row()).map_err(|error| error.to_string())
    }

    fn finish(self: Box<Self>) -> Result<(File, SeriesReport), String> {
        ParquetShardWriter::finish_with_report(*self).map_err(|error| error.to_string())
    }
}
