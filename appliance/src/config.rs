//! The appliance's one TOML config file, validated at start: every error names the file, the
//! key and what was expected. Relative paths are relative to the config file's directory.
//!
//! ```toml
//! data_dir = "/var/lib/tributary"       # ring, dictionaries, identity, decisions
//! metrics_listen = "127.0.0.1:9101"     # Prometheus text at GET /metrics (optional)
//! config_reload_ms = 2000               # how often the file is checked for filter changes
//!
//! [ring]
//! capacity_bytes = 268435456
//! audit_reserved_bytes = 33554432
//! durability = "periodic"               # or "sync"
//! sync_interval_ms = 200
//!
//! [uplink]                              # absent: keep data locally only
//! sink = "core.example:7000"
//! server_name = "core.example"
//! identity_dir = "identity"             # device certificate + key (relative to data_dir)
//! ca_file = "/etc/tributary/fleet-ca.pem"
//! # Tuning, defaults shown (`uplink::*_DEFAULT`); with [onboarding] the defaults apply.
//! reconnect_min_ms = 50                 # backoff floor, doubling up to reconnect_max_ms
//! reconnect_max_ms = 5000
//! connect_timeout_ms = 5000
//! read_chunks_max = 64                  # one ring read: at most this many chunks
//! read_bytes_max = 4194304              # and bytes (a larger chunk is read alone)
//! idle_poll_ms = 5                      # an idle lane looks for new chunks this often
//! in_flight_bytes_max = 67108864        # unacked bytes; the sink's own bound applies too
//! welcome_timeout_ms = 10000
//!
//! [sources.env]
//! input = { kind = "board", profile = "/etc/tributary/board.toml" }
//! chunker = { chunk_raw_bytes = 131072, chunk_age_max_ms = 1000 }
//! [[sources.env.filters]]
//! kind = "deadband"
//! fields = [{ name = "temperature_c", threshold = 0.05 }]
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use buffer::{Durability, RingConfig};
use serde::Deserialize;

use crate::chunker::ChunkerConfig;
use crate::filters::{FilterChain, FilterConfig};
use crate::sources::SourceConfig;

/// Records queued between a source and its pipeline thread, unless configured.
pub const CHANNEL_RECORDS_DEFAULT: usize = 1024;
/// Most records a source's channel may be configured to hold.
pub const CHANNEL_RECORDS_MAX: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{path}: cannot read the appliance config: {source} (pass --config with the path of an existing file)"
    )]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    /// The device id; defaults to the one in the device certificate.
    #[serde(default)]
    pub device_id: Option<String>,
    pub data_dir: PathBuf,
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default = "default_config_reload_ms")]
    pub config_reload_ms: u64,
    #[serde(default)]
    pub ring: RingSettings,
    #[serde(default)]
    pub uplink: Option<UplinkSettings>,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceSettings>,
    /// The local inference API with evidence on the audit lane; absent = no API.
    #[serde(default)]
    pub inference: Option<InferenceSettings>,
    /// First-boot onboarding over MQTT and heartbeats; the identity and sink address come from
    /// the fleet's authority, so `[uplink]` must be absent.
    #[serde(default)]
    pub onboarding: Option<OnboardingSettings>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InferenceSettings {
    /// Where `POST /v1/infer` and `GET /v1/decisions/ID` are served.
    pub listen: SocketAddr,
    /// Directory of `<name>.onnx` + `<name>.json` pairs.
    pub models_dir: PathBuf,
    /// Model names to load (hot-swapped when this list changes).
    pub models: Vec<String>,
    #[serde(default)]
    pub default_model: Option<String>,
    /// Largest request body; a model's own bound applies when smaller.
    #[serde(default = "default_inference_body_bytes")]
    pub body_bytes_max: usize,
    /// An image may be at most this many times the model's input a side.
    #[serde(default = "default_image_scale_max")]
    pub image_scale_max: u32,
    /// Most inputs decoded and run at once.
    #[serde(default = "default_decodes_max")]
    pub decodes_max: usize,
    /// Connection caps and timeouts of the API (see `inference::http_server`).
    #[serde(default = "default_connections_max")]
    pub connections_max: usize,
    #[serde(default = "default_connections_queued_max")]
    pub connections_queued_max: usize,
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    #[serde(default = "default_body_timeout_ms")]
    pub body_timeout_ms: u64,
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

impl InferenceSettings {
    /// The API's connection limits, checked; the error names the key and what was expected.
    pub fn http_limits(&self) -> Result<inference::http_server::HttpLimits, String> {
        inference::http_server::HttpLimits::from_config(
            self.connections_max,
            self.connections_queued_max,
            self.header_timeout_ms,
            self.body_timeout_ms,
            self.idle_timeout_ms,
        )
        .map_err(|error| format!("inference.{error}"))
    }
}

fn default_inference_body_bytes() -> usize {
    inference::service::BODY_BYTES_MAX_DEFAULT
}

fn default_image_scale_max() -> u32 {
    inference::input::IMAGE_SCALE_MAX_DEFAULT
}

fn default_decodes_max() -> usize {
    inference::service::DECODES_MAX_DEFAULT
}

fn default_connections_max() -> usize {
    inference::http_server::CONNECTIONS_MAX_DEFAULT
}

fn default_connections_queued_max() -> usize {
    inference::http_server::CONNECTIONS_QUEUED_MAX_DEFAULT
}

fn default_header_timeout_ms() -> u64 {
    inference::http_server::HEADER_TIMEOUT_DEFAULT_MS
}

fn default_body_timeout_ms() -> u64 {
    inference::http_server::BODY_TIMEOUT_DEFAULT_MS
}

fn default_idle_timeout_ms() -> u64 {
    inference::http_server::IDLE_TIMEOUT_DEFAULT_MS
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OnboardingSettings {
    /// The fleet broker.
    pub broker_host: String,
    pub broker_port: u16,
    /// The claim identity shipped in the image (`cert.pem`, `key.pem`, `ca.pem`).
    pub claim_identity_dir: PathBuf,
    /// A file holding the single-use claim token; absent = wait for an operator's approval.
    #[serde(default)]
    pub claim_token_file: Option<PathBuf>,
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Ask for a new certificate once this percentage of the current one's lifetime has passed.
    #[serde(default = "default_renew_after_percent")]
    pub renew_after_percent: u8,
    /// Wait before asking again when a renewal got no answer or was refused.
    #[serde(default = "default_renewal_retry_ms")]
    pub renewal_retry_ms: u64,
}

fn default_heartbeat_interval_ms() -> u64 {
    10_000
}

fn default_renew_after_percent() -> u8 {
    66
}

fn default_renewal_retry_ms() -> u64 {
    60_000
}

impl OnboardingSettings {
    /// The agent's settings: heartbeats and renewal.
    pub fn agent_config(&self) -> onboarding::DeviceAgentConfig {
        let broker = onboarding::BrokerEndpoint { host: self.broker_host.clone(), port: self.broker_port };
        let mut agent = onboarding::DeviceAgentConfig::new(broker);
        agent.heartbeat_interval_ms = self.heartbeat_interval_ms;
        agent.renew_after_percent = self.renew_after_percent;
        agent.renewal_retry_ms = self.renewal_retry_ms;
        agent
    }
}

fn default_config_reload_ms() -> u64 {
    2_000
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RingSettings {
    pub capacity_bytes: u64,
    pub audit_reserved_bytes: u64,
    /// "sync" (every commit group fsynced) or "periodic" (fsync every `sync_interval_ms`).
    pub durability: String,
    pub sync_interval_ms: u64,
}

impl Default for RingSettings {
    fn default() -> Self {
        RingSettings {
            capacity_bytes: 256 * 1024 * 1024,
            audit_reserved_bytes: 32 * 1024 * 1024,
            durability: "periodic".into(),
            sync_interval_ms: 200,
        }
    }
}

impl RingSettings {
    pub fn ring_config(&self) -> Result<RingConfig, String> {
        let mut config = RingConfig::with_capacity(self.capacity_bytes);
        config.audit_reserved_bytes = self.audit_reserved_bytes;
        config.durability = match self.durability.as_str() {
            "sync" => Durability::Sync,
            "periodic" => Durability::Periodic { sync_interval_ms: self.sync_interval_ms },
            other => {
                return Err(format!("ring.durability: expected \"sync\" or \"periodic\", got {other:?}"));
            }
        };
        config.validate().map_err(|error| format!("ring: {error}"))?;
        Ok(config)
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UplinkSettings {
    /// host:port of the core sink (resolved at start).
    pub sink: String,
    /// The name the sink's certificate carries.
    pub server_name: String,
    /// Where the device certificate and key are (relative paths: under `data_dir`).
    #[serde(default = "default_identity_dir")]
    pub identity_dir: PathBuf,
    pub ca_file: PathBuf,
    /// Tuning; the defaults are `uplink::*_DEFAULT`.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_read_chunks_max")]
    pub read_chunks_max: usize,
    #[serde(default = "default_read_bytes_max")]
    pub read_bytes_max: usize,
    #[serde(default = "default_idle_poll_ms")]
    pub idle_poll_ms: u64,
    #[serde(default = "default_in_flight_bytes_max")]
    pub in_flight_bytes_max: u64,
    #[serde(default = "default_welcome_timeout_ms")]
    pub welcome_timeout_ms: u64,
}

impl UplinkSettings {
    /// Copies the tuning keys onto a configuration built with the defaults.
    pub fn tune(&self, config: &mut crate::uplink::UplinkConfig) {
        config.reconnect_min_ms = self.reconnect_min_ms;
        config.reconnect_max_ms = self.reconnect_max_ms;
        config.connect_timeout_ms = self.connect_timeout_ms;
        config.read_chunks_max = self.read_chunks_max;
        config.read_bytes_max = self.read_bytes_max;
        config.idle_poll_ms = self.idle_poll_ms;
        config.in_flight_bytes_max = self.in_flight_bytes_max;
        config.welcome_timeout_ms = self.welcome_timeout_ms;
    }

    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("reconnect_min_ms", self.reconnect_min_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("read_chunks_max", self.read_chunks_max as u64),
            ("read_bytes_max", self.read_bytes_max as u64),
            ("idle_poll_ms", self.idle_poll_ms),
            ("in_flight_bytes_max", self.in_flight_bytes_max),
            ("welcome_timeout_ms", self.welcome_timeout_ms),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(format!("uplink.{key}: expected more than 0"));
        }
        if self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(format!(
                "uplink.reconnect_max_ms: expected at least reconnect_min_ms ({}), got {}",
                self.reconnect_min_ms, self.reconnect_max_ms
            ));
        }
        Ok(())
    }
}

fn default_identity_dir() -> PathBuf {
    PathBuf::from("identity")
}
fn default_reconnect_min_ms() -> u64 {
    crate::uplink::RECONNECT_MIN_MS_DEFAULT
}
fn default_reconnect_max_ms() -> u64 {
    crate::uplink::RECONNECT_MAX_MS_DEFAULT
}
fn default_connect_timeout_ms() -> u64 {
    crate::uplink::CONNECT_TIMEOUT_MS_DEFAULT
}
fn default_read_chunks_max() -> usize {
    crate::uplink::READ_CHUNKS_MAX_DEFAULT
}
fn default_read_bytes_max() -> usize {
    crate::uplink::READ_BYTES_MAX_DEFAULT
}
fn default_idle_poll_ms() -> u64 {
    crate::uplink::IDLE_POLL_MS_DEFAULT
}
fn default_in_flight_bytes_max() -> u64 {
    crate::uplink::IN_FLIGHT_BYTES_MAX_DEFAULT
}
fn default_welcome_timeout_ms() -> u64 {
    crate::uplink::WELCOME_TIMEOUT_MS_DEFAULT
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    pub input: SourceConfig,
    #[serde(default)]
    pub filters: Vec<FilterConfig>,
    #[serde(default)]
    pub chunker: ChunkerConfig,
    #[serde(default = "default_channel_records")]
    pub channel_records_max: usize,
}

fn default_channel_records() -> usize {
    CHANNEL_RECORDS_DEFAULT
}

impl ApplianceConfig {
    pub fn load(path: &Path) -> Result<ApplianceConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        ApplianceConfig::parse(&text, path)
    }

    /// Parses and validates `text` as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<ApplianceConfig, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: path.to_path_buf(), message };
        let mut config: ApplianceConfig = toml::from_str(text).map_err(|error| invalid(error.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.data_dir.is_relative() {
            config.data_dir = base.join(&config.data_dir);
        }
        if let Some(uplink) = &mut config.uplink {
            if uplink.ca_file.is_relative() {
                uplink.ca_file = base.join(&uplink.ca_file);
            }
            if uplink.identity_dir.is_relative() {
                uplink.identity_dir = config.data_dir.join(&uplink.identity_dir);
            }
        }
        for source in config.sources.values_mut() {
            let path = match &mut source.input {
                SourceConfig::Directory(input) => &mut input.path,
                SourceConfig::JsonSocket(input) => &mut input.path,
                SourceConfig::Http(_) => continue,
                SourceConfig::Board(input) => &mut input.profile,
                SourceConfig::Camera(input) => &mut input.profile,
            };
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        if let Some(inference) = &mut config.inference
            && inference.models_dir.is_relative()
        {
            inference.models_dir = base.join(&inference.models_dir);
        }
        if let Some(onboarding) = &mut config.onboarding {
            if onboarding.claim_identity_dir.is_relative() {
                onboarding.claim_identity_dir = base.join(&onboarding.claim_identity_dir);
            }
            if let Some(token) = &mut onboarding.claim_token_file
                && token.is_relative()
            {
                *token = base.join(&*token);
            }
        }
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        self.ring.ring_config()?;
        if !(100..=600_000).contains(&self.config_reload_ms) {
            return Err(format!("config_reload_ms: expected 100..=600000, got {}", self.config_reload_ms));
        }
        if let Some(uplink) = &self.uplink {
            if uplink.sink.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none() {
                return Err(format!("uplink.sink: expected host:port, got {:?}", uplink.sink));
            }
            if uplink.server_name.is_empty() {
                return Err(
                    "uplink.server_name: expected the name on the sink's certificate, got \"\"".into()
                );
            }
            uplink.validate()?;
        }
        if let Some(inference) = &self.inference {
            if inference.models.is_empty() {
                return Err("inference.models: expected at least one model name".into());
            }
            if !(1..=inference::service::BODY_BYTES_LIMIT).contains(&inference.body_bytes_max) {
                return Err(format!(
                    "inference.body_bytes_max: expected 1..={} bytes, found {}",
                    inference::service::BODY_BYTES_LIMIT,
                    inference.body_bytes_max
                ));
            }
            if !(1..=inference::input::IMAGE_SCALE_LIMIT).contains(&inference.image_scale_max) {
                return Err(format!(
                    "inference.image_scale_max: expected 1..={} times the model's input size, found {}",
                    inference::input::IMAGE_SCALE_LIMIT,
                    inference.image_scale_max
                ));
            }
            if !(1..=inference::service::DECODES_LIMIT).contains(&inference.decodes_max) {
                return Err(format!(
                    "inference.decodes_max: expected 1..={} decodes at once, found {}",
                    inference::service::DECODES_LIMIT,
                    inference.decodes_max
                ));
            }
            inference.http_limits()?;
        }
        if self.onboarding.is_some() {
            if self.uplink.is_some() {
                return Err("onboarding: the sink address comes from onboarding; remove [uplink]".into());
            }
            if self.device_id.is_none() {
                return Err("device_id: expected the device id this appliance onboards as".into());
            }
        }
        if let Some(onboarding) = &self.onboarding {
            onboarding.agent_config().validate().map_err(|problem| format!("onboarding.{problem}"))?;
        }
        for (name, source) in &self.sources {
            source.chunker.validate().map_err(|message| format!("sources.{name}.chunker.{message}"))?;
            FilterChain::from_config(&source.filters).map_err(|error| format!("sources.{name}.{error}"))?;
            if !(1..=CHANNEL_RECORDS_MAX).contains(&source.channel_records_max) {
                return Err(format!(
                    "sources.{name}.channel_records_max: expected 1..={CHANNEL_RECORDS_MAX}, got {}",
                    source.channel_records_max
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
data_dir = "data"
[ring]
capacity_bytes = 67108864
audit_reserved_bytes = 8388608
[sources.watch]
input = { kind = "directory", path = "incoming" }
[[sources.watch.filters]]
kind = "decimate"
keep_every = 2
"#;

    fn check(text: &str, expected: Result<(), &str>) {
        let path = Path::new("/etc/tributary/appliance.toml");
        match (ApplianceConfig::parse(text, path), expected) {
            (Ok(config), Ok(())) => {
                assert_eq!(config.data_dir, Path::new("/etc/tributary/data"));
                let SourceConfig::Directory(input) = &config.sources["watch"].input else { panic!() };
                assert_eq!(input.path, Path::new("/etc/tributary/incoming"), "relative to the file");
            }
            (Err(error), Err(fragment)) => {
                let message = error.to_string();
                assert!(message.starts_with("/etc/tributary/appliance.toml: "), "{message}");
                assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
            }
            (result, expected) => panic!("parse gave {result:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        check(VALID, Ok(()));
        check(&format!("{VALID}\nbogus = 1\n"), Err("unknown field `bogus`"));
        check(&VALID.replace("capacity_bytes = 67108864", "capacity_bytes = \"big\""), Err("capacity_bytes"));
        check("", Err("missing field `data_dir`"));
        check(&VALID.replace("[ring]", "[ring]\ndurability = \"often\""), Err("ring.durability: expected"));
        check(&VALID.replace("kind = \"directory\"", "kind = \"telepathy\""), Err("telepathy"));
        check(&VALID.replace("keep_every = 2", "keep_every = 2\nwhatever = 1"), Err("whatever"));
        check(
            &format!("{VALID}\n[sources.watch.chunker]\nzstd_level = 99\n"),
            Err("sources.watch.chunker.zstd_level: expected 1..=19, got 99"),
        );
        check(
            &format!("{VALID}\n[uplink]\nsink = \"nowhere\"\nserver_name = \"x\"\nca_file = \"ca.pem\"\n"),
            Err("uplink.sink: expected host:port"),
        );
        let uplink = "[uplink]\nsink = \"core:7000\"\nserver_name = \"core\"\nca_file = \"ca.pem\"\n";
        check(&format!("{VALID}\n{uplink}read_chunks_max = 8\nwelcome_timeout_ms = 2000\n"), Ok(()));
        check(
            &format!("{VALID}\n{uplink}read_chunks_max = 0\n"),
            Err("uplink.read_chunks_max: expected more than 0"),
        );
        check(
            &format!("{VALID}\n{uplink}reconnect_min_ms = 100\nreconnect_max_ms = 50\n"),
            Err("uplink.reconnect_max_ms: expected at least reconnect_min_ms (100), got 50"),
        );
        check(&format!("{VALID}\n{uplink}reconnect_ms = 5\n"), Err("unknown field `reconnect_ms`"));
        let inference =
            "\n[inference]\nlisten = \"127.0.0.1:0\"\nmodels_dir = \"m\"\nmodels = [\"shapes\"]\n";
        check(&format!("{VALID}{inference}"), Ok(()));
        check(
            &format!("{VALID}{inference}header_timeout_ms = 5\n"),
            Err("inference.header_timeout_ms: expected 100..=3600000 milliseconds, found 5"),
        );
        check(
            &format!("{VALID}{inference}connections_max = 0\n"),
            Err("inference.connections_max: expected 1..=1024 connections, found 0"),
        );
        check(
            &format!("{VALID}{inference}image_scale_max = 0\n"),
            Err("inference.image_scale_max: expected 1..=256"),
        );
        check(
            &format!("{VALID}{inference}decodes_max = 65\n"),
            Err("inference.decodes_max: expected 1..=64"),
        );
        check(
            &format!("{VALID}{inference}body_bytes_max = 0\n"),
            Err("inference.body_bytes_max: expected 1..="),
        );
        let missing = ApplianceConfig::load(Path::new("/nonexistent/appliance.toml")).unwrap_err();
        assert!(missing.to_string().starts_with("/nonexistent/appliance.toml: cannot read"), "{missing}");
    }
}
