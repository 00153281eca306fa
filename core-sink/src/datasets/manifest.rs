//! A dataset's manifest: the list of record of its published shards and of how far each
//! (device, lane) has been consumed from the raw landing. Replaced atomically (temporary file,
//! fsync, rename, fsync of the directory). A shard file that is not in the manifest is not part
//! of the dataset (recovery deletes such files).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::typed::{TypeConflict, TypedColumn};

pub const MANIFEST_FORMAT: &str = "tributary-manifest/1";
/// Manifests larger than this are refused when read (a damaged or foreign file).
pub const MANIFEST_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Quarantined chunks a manifest lists by name; older ones are only counted.
pub const QUARANTINE_LISTED_MAX: usize = 1024;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub dataset: String,
    /// `webdataset` or `parquet`.
    pub kind: String,
    /// The shard sequence number the next shard gets; files numbered at or above it are orphans.
    pub next_shard_seq: u64,
    pub shards: Vec<ShardEntry>,
    pub consumed: Vec<Consumed>,
    /// Chunks left out of the dataset because their records cannot go into it (a key or record
    /// the format cannot hold, a chunk that does not decode), newest last, at most
    /// `QUARANTINE_LISTED_MAX`. The raw landing keeps them as received.
    #[serde(default)]
    pub quarantined: Vec<QuarantinedChunk>,
    /// Every chunk ever quarantined, listed or not.
    #[serde(default)]
    pub quarantined_total: u64,
    /// Typed columns of the dataset so far (Parquet datasets): every column a shard had or a
    /// shard saw late, with its type. Every later shard has at least these columns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<TypedColumn>,
    /// Values that did not fit their typed column (the cell is null, the raw JSON stays in
    /// `payload`), every one ever counted.
    #[serde(default)]
    pub type_conflicts_total: u64,
    /// The newest of them, at most `typed::CONFLICTS_LISTED_MAX`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub type_conflicts: Vec<TypeConflict>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantinedChunk {
    pub device: String,
    pub lane: String,
    pub seq: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub name: String,
    /// Path of the published file (absolute when the target directory is).
    pub path: PathBuf,
    /// Path of the published file below its target directory, partitions included
    /// (`sensor/date=2026-12-03/sensor-node0-t00-00000001.parquet`).
    #[serde(default)]
    pub relative_path: String,
    /// The shard's typed columns, in file order (Parquet shards).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<TypedColumn>,
    pub target: usize,
    pub shard_seq: u64,
    pub bytes: u64,
    pub samples: u64,
    pub sha256: String,
    pub time_range_us: [u64; 2],
    pub ranges: Vec<SeqRange>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqRange {
    pub device: String,
    pub lane: String,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Everything of (device, lane) through `through_seq` is in published shards; reading resumes
/// at `raw_offset` of the raw landing file that starts at `raw_file_first_seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consumed {
    pub device: String,
    pub lane: String,
    pub through_seq: u64,
    pub raw_file_first_seq: u64,
    pub raw_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

impl Manifest {
    pub fn empty(dataset: &str, kind: &str) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            dataset: dataset.into(),
            kind: kind.into(),
            ..Manifest::default()
        }
    }

    /// Reads a manifest; `Ok(None)` if there is none yet.
    pub fn read(path: &Path) -> Result<Option<Manifest>, ManifestError> {
        let io = |source| ManifestError::Io { path: path.to_path_buf(), source };
        let metadata = match std::fs::metadata(path) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io(error)),
        };
        if metadata.len() > MANIFEST_BYTES_MAX {
            return Err(ManifestError::Malformed {
                path: path.to_path_buf(),
                reason: format!("{} bytes, more than {MANIFEST_BYTES_MAX}", metadata.len()),
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|error| {
            ManifestError::Malformed { path: path.to_path_buf(), reason: error.to_string() }
        })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(ManifestError::Malformed {
                path: path.to_path_buf(),
                reason: format!("format {:?}, this build reads {MANIFEST_FORMAT:?}", manifest.format),
            });
        }
        Ok(Some(manifest))
    }

    /// Replaces the manifest at `path` atomically and durably.
    pub fn write(&self, path: &Path) -> Result<(), ManifestError> {
        let bytes = serde_json::to_vec_pretty(self).expect("manifests serialize");
        durable::Options::default()
            .create_directory()
            .write(path, &bytes)
            .map_err(|error| ManifestError::Io { path: path.to_path_buf(), source: error.source })
    }
}
