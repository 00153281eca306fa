//! `core-sink` configuration (TOML). Unknown keys are errors; every error names the file, the key
//! and what was expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fleet::transport::TransportSettings;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// UDP address the QUIC server listens on.
    pub listen: SocketAddr,
    /// The sink's own state (watermarks, committer checkpoint): a heed environment.
    pub state_dir: PathBuf,
    /// Where landed data goes (`raw/` for the raw landing).
    pub landing_dir: PathBuf,
    /// Holds `ca.pem` (the fleet CA that signs device certificates).
    pub ca_dir: PathBuf,
    /// Holds the sink's `cert.pem` and `key.pem`.
    pub server_certificate_dir: PathBuf,
    /// One revoked device id per line; re-read every `revocation_reload_ms`.
    #[serde(default = "default_revocation_file")]
    pub revocation_file: PathBuf,
    #[serde(default = "default_revocation_reload_ms")]
    pub revocation_reload_ms: u64,
    /// Commit point: every `commit_interval_ms`, or sooner once `commit_bytes_max` are pending.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    #[serde(default = "default_commit_bytes_max")]
    pub commit_bytes_max: u64,
    /// A raw landing file is rotated after this many bytes.
    #[serde(default = "default_raw_file_rotate_bytes")]
    pub raw_file_rotate_bytes: u64,
    /// Bytes of verified chunks waiting to be written, all connections together.
    #[serde(default = "default_in_flight_bytes_max")]
    pub in_flight_bytes_max: u64,
    /// Bytes of verified chunks one connection (one device) may have waiting to be written, and
    /// what its Welcome advertises; absent = a quarter of `in_flight_bytes_max`, at least two
    /// maximal chunks. One device cannot hold the whole budget and starve the others.
    #[serde(default)]
    pub device_in_flight_bytes_max: Option<u64>,
    /// Raw landing files open at once (least recently used closed first): file descriptors are
    /// a process-wide limit, and every (device, lane) would otherwise keep one open forever.
    #[serde(default = "default_open_files_max")]
    pub open_files_max: usize,
    #[serde(default = "default_connections_max")]
    pub connections_max: u64,
    #[serde(default)]
    pub transport: TransportSettings,
    /// TCP address of the Prometheus text endpoint (`GET /metrics`); absent = none.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Training datasets derived from the raw landing; absent = raw landing only.
    #[serde(default)]
    pub datasets: Option<crate::datasets::DatasetsConfig>,
    /// The core archive of AI decisions fed from the audit lane; absent = no archive.
    #[serde(default)]
    pub archive: Option<crate::archive_feed::ArchiveConfig>,
    /// Device onboarding over MQTT (claim tokens, CSR signing, heartbeats, remote config); absent = none.
    #[serde(default)]
    pub onboarding: Option<onboarding_authority::AuthorityConfig>,
    /// Continuous copies of the datasets and the archive to replicas (`core-sink replicate`, and a
    /// thread of `serve`); absent = none.
    #[serde(default)]
    pub replication: Option<crate::replication::ReplicationConfig>,
    /// Cluster mode on etcd (device ownership, fenced commits); absent = standalone, no etcd.
    #[serde(default)]
    pub cluster: Option<cluster::ClusterConfig>,
}

fn default_revocation_file() -> PathBuf {
    PathBuf::from("revoked.txt")
}
fn default_revocation_reload_ms() -> u64 {
    1_000
}
fn default_commit_interval_ms() -> u64 {
    50
}
fn default_commit_bytes_max() -> u64 {
    32 * 1024 * 1024
}
fn default_raw_file_rotate_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_in_flight_bytes_max() -> u64 {
    64 * 1024 * 1024
}
fn default_open_files_max() -> usize {
    landing::raw::OPEN_FILES_MAX_DEFAULT
}
fn default_connections_max() -> u64 {
    4096
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl SinkConfig {
    /// Defaults for everything but the paths and address.
    pub fn new(listen: SocketAddr, base_dir: &Path) -> SinkConfig {
        SinkConfig {
            listen,
            state_dir: base_dir.join("state"),
            landing_dir: base_dir.join("landing"),
            ca_dir: base_dir.join("ca"),
            server_certificate_dir: base_dir.join("server"),
            revocation_file: base_dir.join("ca").join("revoked.txt"),
            revocation_reload_ms: default_revocation_reload_ms(),
            commit_interval_ms: default_commit_interval_ms(),
            commit_bytes_max: default_commit_bytes_max(),
            raw_file_rotate_bytes: default_raw_file_rotate_bytes(),
            in_flight_bytes_max: default_in_flight_bytes_max(),
            device_in_flight_bytes_max: None,
            open_files_max: default_open_files_max(),
            connections_max: default_connections_max(),
            transport: TransportSettings::default(),
            datasets: None,
            archive: None,
            metrics_listen: None,
            onboarding: None,
            replication: None,
            cluster: None,
        }
    }

    pub fn load(path: &Path) -> Result<SinkConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut config: SinkConfig = toml::from_str(&text)
            .map_err(|error| ConfigError::Invalid { path: path.to_path_buf(), message: error.to_string() })?;
        // Relative paths are relative to the config file's directory.
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(datasets) = &mut config.datasets {
            let staging = datasets.buckets.iter_mut().map(|bucket| &mut bucket.staging_dir);
            for field in datasets.targets.iter_mut().chain([&mut datasets.manifest_dir]).chain(staging) {
                if field.is_relative() {
                    *field = base.join(&*field);
                }
            }
        }
        if let Some(archive) = &mut config.archive {
            for field in [&mut archive.root, &mut archive.review_dir] {
                if field.is_relative() {
                    *field = base.join(&*field);
                }
            }
        }
        if let Some(onboarding) = &mut config.onboarding {
            onboarding.resolve_relative(base);
        }
        if let Some(replication) = &mut config.replication {
            replication.resolve_relative(base);
        }
        for field in [
            &mut config.state_dir,
            &mut config.landing_dir,
            &mut config.ca_dir,
            &mut config.server_certificate_dir,
            &mut config.revocation_file,
        ] {
            if field.is_relative() {
                *field = base.join(&*field);
            }
        }
        config.validate().map_err(|message| ConfigError::Invalid { path: path.to_path_buf(), message })?;
        Ok(config)
    }

    /// What one connection may hold of `in_flight_bytes_max` (see `device_in_flight_bytes_max`).
    pub fn device_in_flight_bytes(&self) -> u64 {
        self.device_in_flight_bytes_max.unwrap_or_else(|| {
            (self.in_flight_bytes_max / 4)
                .max(2 * protocol::CHUNK_ENCODED_BYTES_MAX as u64)
                .min(self.in_flight_bytes_max)
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, message: String| if ok { Ok(()) } else { Err(message) };
        check(
            (1..=60_000).contains(&self.commit_interval_ms),
            format!("commit_interval_ms = {}: expected 1..=60000", self.commit_interval_ms),
        )?;
        check(
            self.commit_bytes_max >= 1024 * 1024,
            format!("commit_bytes_max = {}: expected at least 1048576", self.commit_bytes_max),
        )?;
        check(
            self.raw_file_rotate_bytes >= 1024 * 1024,
            format!("raw_file_rotate_bytes = {}: expected at least 1048576", self.raw_file_rotate_bytes),
        )?;
        check(
            self.in_flight_bytes_max >= 2 * protocol::CHUNK_ENCODED_BYTES_MAX as u64,
            format!(
                "in_flight_bytes_max = {}: expected at least two maximal chunks ({})",
                self.in_flight_bytes_max,
                2 * protocol::CHUNK_ENCODED_BYTES_MAX
            ),
        )?;
        if let Some(device) = self.device_in_flight_bytes_max {
            check(
                (2 * protocol::CHUNK_ENCODED_BYTES_MAX as u64..=self.in_flight_bytes_max).contains(&device),
                format!(
                    "device_in_flight_bytes_max = {device}: expected at least two maximal chunks ({}) and at most in_flight_bytes_max ({})",
                    2 * protocol::CHUNK_ENCODED_BYTES_MAX,
                    self.in_flight_bytes_max
                ),
            )?;
        }
        check(
            (1..=65_536).contains(&self.open_files_max),
            format!("open_files_max = {}: expected 1..=65536", self.open_files_max),
        )?;
        check(
            (1..=1_000_000).contains(&self.connections_max),
            format!("connections_max = {}: expected 1..=1000000", self.connections_max),
        )?;
        check(
            (10..=3_600_000).contains(&self.revocation_reload_ms),
            format!("revocation_reload_ms = {}: expected 10..=3600000", self.revocation_reload_ms),
        )?;
        if let Some(datasets) = &self.datasets {
            datasets.validate()?;
        }
        if let Some(archive) = &self.archive {
            archive.validate()?;
        }
        if let Some(onboarding) = &self.onboarding {
            onboarding.validate()?;
        }
        if let Some(replication) = &self.replication {
            replication.validate()?;
        }
        if let Some(cluster) = &self.cluster {
            cluster
                .validate(Path::new(""))
                .map_err(|error| format!("[cluster] {}: {}", error.key, error.expectation))?;
        }
        self.transport.validate()
    }
}
