//! Training datasets derived from the raw landing: WebDataset tar shards for media, Parquet for
//! sensor series, striped across storage targets (directories and S3 buckets), each with a
//! manifest. See `pipeline.rs` and `targets.rs`.

pub mod format;
pub mod manifest;
pub mod parquet;
pub mod pipeline;
pub mod tar;
pub mod targets;
pub mod typed;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use typed::{ColumnType, TYPED_COLUMNS_MAX, TypedColumn};

/// How a new shard picks its target.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    #[default]
    RoundRobin,
    /// The target with the most free bytes (statvfs).
    LeastLoaded,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DatasetsConfig {
    /// Directories standing for mount points (OST pools, disks, NFS/BeeGFS paths).
    #[serde(default)]
    pub targets: Vec<PathBuf>,
    /// Object storage targets (`[[datasets.buckets]]`), numbered after the directory targets.
    #[serde(default)]
    pub buckets: Vec<BucketTargetConfig>,
    /// Where each dataset's `manifest.json` lives (`<manifest_dir>/<dataset>/manifest.json`).
    pub manifest_dir: PathBuf,
    #[serde(default)]
    pub placement: Placement,
    /// This sink node's name in shard file names, so several nodes can share targets.
    #[serde(default = "default_node")]
    pub node: String,
    #[serde(default = "default_shard_bytes_max")]
    pub shard_bytes_max: u64,
    #[serde(default = "default_shard_age_max_ms")]
    pub shard_age_max_ms: u64,
    #[serde(default = "default_parquet_row_group_rows")]
    pub parquet_row_group_rows: usize,
    /// A target whose shard failed (full, unwritable) gets no new shard for this long.
    #[serde(default = "default_target_retry_after_ms")]
    pub target_retry_after_ms: u64,
    /// The sensor dataset's settings (`[datasets.sensor]`).
    #[serde(default)]
    pub sensor: SensorDatasetConfig,
}

/// Most dataset targets, directories and buckets together.
pub const TARGETS_MAX: usize = 256;
/// S3's bounds on a multipart upload's parts (all but the last at least 5 MiB, at most 5 GiB),
/// and ours: a part is held in memory while it is uploaded.
pub const PART_BYTES_MIN: u64 = 5 * 1024 * 1024;
pub const PART_BYTES_MAX: u64 = 512 * 1024 * 1024;
/// S3 copies at most 5 GiB in one part, and a shard is published by one create-only copy; a
/// shard overshoots `shard_bytes_max` by at most one chunk, so the bound leaves room.
pub const BUCKET_SHARD_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;
/// S3 allows at most 10 000 parts per upload.
pub const PARTS_PER_UPLOAD_MAX: u64 = 10_000;

/// `[[datasets.buckets]]`: shards are written to `staging_dir`, then uploaded in parts of
/// `part_bytes` and published create-only under `<s3.prefix>/<dataset>/…`; the manifest and the
/// wids index follow them (`targets.rs`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BucketTargetConfig {
    /// The bucket: the keys of `[archive.objects]` (bucket, endpoint, region, allow_http, prefix,
    /// timeouts and retries); credentials from the environment as there. `kind` is taken as `s3`.
    pub s3: archive::ObjectsConfig,
    /// A local directory holding the shards being written before their upload (one per
    /// dataset at a time, each at most `shard_bytes_max` plus one chunk).
    pub staging_dir: PathBuf,
    /// Multipart upload part size (8 MiB: S3's minimum is 5 MiB; one part is in memory at a time).
    #[serde(default = "default_part_bytes")]
    pub part_bytes: u64,
}

impl BucketTargetConfig {
    pub fn new(s3: archive::ObjectsConfig, staging_dir: PathBuf) -> BucketTargetConfig {
        BucketTargetConfig { s3, staging_dir, part_bytes: default_part_bytes() }
    }

    /// The bucket's S3 config, `kind` set.
    pub fn objects_config(&self) -> archive::ObjectsConfig {
        archive::ObjectsConfig { kind: archive::ObjectsKind::S3, ..self.s3.clone() }
    }

    /// `s3://bucket/prefix` (no trailing '/').
    pub fn base_url(&self) -> String {
        let bucket = self.s3.bucket.clone().unwrap_or_default();
        let prefix = self.s3.prefix.trim_matches('/');
        if prefix.is_empty() { format!("s3://{bucket}") } else { format!("s3://{bucket}/{prefix}") }
    }
}

fn default_part_bytes() -> u64 {
    8 * 1024 * 1024
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SensorDatasetConfig {
    /// Typed columns every sensor shard has, by JSON field name (`[datasets.sensor.schema]`,
    /// `temperature_c = "double"`; types `double`, `int64`, `bool`, `string`). Fields not
    /// declared are inferred per shard (`typed.rs`).
    #[serde(default)]
    pub schema: BTreeMap<String, ColumnType>,
}

impl SensorDatasetConfig {
    /// The declared columns, in name order.
    pub fn declared_columns(&self) -> Vec<TypedColumn> {
        self.schema
            .iter()
            .map(|(name, column_type)| TypedColumn { name: name.clone(), column_type: *column_type })
            .collect()
    }
}

fn default_target_retry_after_ms() -> u64 {
    30_000
}

fn default_node() -> String {
    "node0".to_string()
}
fn default_shard_bytes_max() -> u64 {
    256 * 1024 * 1024
}
fn default_shard_age_max_ms() -> u64 {
    60_000
}
/// About 10–30 MiB of compressed sensor rows per row group: large enough for scans to read long
/// runs of each column, small enough to buffer (the writer also cuts a group at 128 MiB buffered).
fn default_parquet_row_group_rows() -> usize {
    262_144
}

impl DatasetsConfig {
    pub fn with_targets(targets: Vec<PathBuf>, manifest_dir: PathBuf) -> DatasetsConfig {
        DatasetsConfig {
            targets,
            buckets: Vec::new(),
            manifest_dir,
            placement: Placement::default(),
            node: default_node(),
            shard_bytes_max: default_shard_bytes_max(),
            shard_age_max_ms: default_shard_age_max_ms(),
            parquet_row_group_rows: default_parquet_row_group_rows(),
            target_retry_after_ms: default_target_retry_after_ms(),
            sensor: SensorDatasetConfig::default(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let count = self.targets.len() + self.buckets.len();
        if count == 0 || count > TARGETS_MAX {
            return Err(format!(
                "datasets.targets and datasets.buckets: {count} targets together, expected 1..={TARGETS_MAX}"
            ));
        }
        for (index, bucket) in self.buckets.iter().enumerate() {
            let key = format!("datasets.buckets[{index}]");
            bucket.objects_config().validate().map_err(|message| format!("{key}.s3: {message}"))?;
            if !(PART_BYTES_MIN..=PART_BYTES_MAX).contains(&bucket.part_bytes) {
                return Err(format!(
                    "{key}.part_bytes = {}: expected {PART_BYTES_MIN}..={PART_BYTES_MAX}",
                    bucket.part_bytes
                ));
            }
            if self.shard_bytes_max > BUCKET_SHARD_BYTES_MAX {
                return Err(format!(
                    "datasets.shard_bytes_max = {}: at most {BUCKET_SHARD_BYTES_MAX} with bucket targets",
                    self.shard_bytes_max
                ));
            }
            if self.shard_bytes_max.div_ceil(bucket.part_bytes) + 1 > PARTS_PER_UPLOAD_MAX {
                return Err(format!(
                    "{key}.part_bytes = {}: a shard of datasets.shard_bytes_max = {} needs more than {PARTS_PER_UPLOAD_MAX} parts",
                    bucket.part_bytes, self.shard_bytes_max
                ));
            }
        }
        if self.node.is_empty() || !self.node.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("datasets.node = {:?}: expected letters, digits and '_' only", self.node));
        }
        if self.shard_bytes_max < 1024 * 1024 {
            return Err(format!(
                "datasets.shard_bytes_max = {}: expected at least 1048576",
                self.shard_bytes_max
            ));
        }
        if !(100..=86_400_000).contains(&self.shard_age_max_ms) {
            return Err(format!(
                "datasets.shard_age_max_ms = {}: expected 100..=86400000",
                self.shard_age_max_ms
            ));
        }
        if !(1..=1_048_576).contains(&self.parquet_row_group_rows) {
            return Err(format!(
                "datasets.parquet_row_group_rows = {}: expected 1..=1048576",
                self.parquet_row_group_rows
            ));
        }
        if self.sensor.schema.len() > TYPED_COLUMNS_MAX {
            return Err(format!(
                "datasets.sensor.schema: {} columns, at most {TYPED_COLUMNS_MAX}",
                self.sensor.schema.len()
            ));
        }
        if let Some(name) = self.sensor.schema.keys().find(|name| !typed::valid_column_name(name)) {
            return Err(format!(
                "datasets.sensor.schema.{name}: expected [A-Za-z_][A-Za-z0-9_]*, at most {} bytes, not a fixed column or `date`",
                typed::COLUMN_NAME_BYTES_MAX
            ));
        }
        if !(10..=3_600_000).contains(&self.target_retry_after_ms) {
            return Err(format!(
                "datasets.target_retry_after_ms = {}: expected 10..=3600000",
                self.target_retry_after_ms
            ));
        }
        Ok(())
    }
}
