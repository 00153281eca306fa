//! Sources: where records enter the appliance. Each configured source runs on a thread of its
//! own (`Source::run`) and feeds the pipeline's bounded channel.
//!
//! Kinds (`kind` in the source's config table):
//! - `directory`: files that appear in a directory, one record per file (`directory.rs`).
//! - `json_socket`: JSON lines on a local Unix stream socket (`json_socket.rs`).
//! - `http`: `POST /v1/records` with JSON lines or one JSON object (`http.rs`).
//! - `board`: periodic JSON readings of every sensor of a board profile (`hardware.rs`).
//! - `camera`: JPEG frames of one camera of a board profile at a set rate (`hardware.rs`).
//!
//! Config: one table per source, named by the source, e.g. in the daemon's TOML:
//!
//! ```toml
//! [sources.camera-drop]
//! kind = "directory"
//! path = "/data/incoming"      # poll_interval_ms, file_bytes_max, after_send, lane optional
//!
//! [sources.local-sensors]
//! kind = "json_socket"
//! path = "/run/tributary/sensors.sock"   # line_bytes_max, connections_max, idle_timeout_ms (300000)
//!
//! [sources.web]
//! kind = "http"
//! listen = "127.0.0.1:8081"    # body_bytes_max, connections_max (16), connections_queued_max (16),
//!                              # header_timeout_ms (10000), body_timeout_ms (30000), idle_timeout_ms (30000)
//!
//! [sources.devkit-sensors]
//! kind = "board"
//! profile = "board/profiles/sim-devkit.toml"
//!
//! [sources.devkit-camera]
//! kind = "camera"
//! profile = "board/profiles/sim-devkit.toml"
//! camera = "cam0"
//! fps = 2
//! ```
//!
//! Record keys are `<source name>-<sequence>`, the sequence a zero-padded 20-digit decimal that
//! starts at the wall clock in microseconds when the source is built and counts up by one per
//! record, so keys stay unique across restarts without any stored state (unless the clock goes
//! back). A source name is therefore at most `SOURCE_NAME_BYTES_MAX` (59) bytes: 80 bytes of
//! key, less '-' and 20 digits. Clients of the JSON sources may bring their own keys.
//!
//! Limits, each a named constant next to the code it bounds: JSON line and body sizes
//! (`json_lines.rs`), open and queued connections and the header, body and idle timeouts per socket
//! or HTTP source (`http.rs`, `json_socket.rs`, `inference::http_server`), files tracked per directory
//! poll (`directory.rs`), and how often a blocked or sleeping source looks at its stop signal
//! (`STOP_POLL_INTERVAL_MS`, 20 ms), which is how quickly every source returns after `stop`.
//!
//! Every source counts what it produced and each kind of error in a [`SourceMetrics`] shared
//! with the daemon, which renders them with [`render_prometheus`].

mod directory;
mod hardware;
mod http;
mod json_lines;
mod json_socket;
mod metrics;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::TrySendError;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::{Lane, RECORD_KEY_BYTES_MAX};
use serde::Deserialize;

use crate::source::{RecordSender, Source, SourceRecord, StopSignal};

pub use directory::{AfterSend, DirectoryConfig, DirectorySource};
pub use hardware::{BoardConfig, BoardSource, CameraConfig, CameraSource, reading_payload};
pub use http::{HttpConfig, HttpSource, RECORDS_PATH, RECORDS_PER_BODY_MAX};
pub use json_socket::{JsonSocketConfig, JsonSocketSource};
pub use metrics::{SourceErrorKind, SourceMetrics, render_prometheus};

/// Digits of the sequence number in generated keys: enough for any `u64`.
const KEY_SEQUENCE_DIGITS: usize = 20;
/// Longest source name: a generated key is the name, '-' and `KEY_SEQUENCE_DIGITS` digits.
pub const SOURCE_NAME_BYTES_MAX: usize = RECORD_KEY_BYTES_MAX - 1 - KEY_SEQUENCE_DIGITS;
/// How often a source that waits (for a full channel, a poll interval, a connection) looks at
/// its stop signal.
pub(crate) const STOP_POLL_INTERVAL_MS: u64 = 20;
/// Longest wait between two attempts to hand a record to a full channel.
const SEND_RETRY_INTERVAL_MAX_MS: u64 = 10;

const _: () = assert!(SEND_RETRY_INTERVAL_MAX_MS <= STOP_POLL_INTERVAL_MS);
const _: () = assert!(u64::MAX.ilog10() as usize + 1 == KEY_SEQUENCE_DIGITS);

/// One source's settings, selected by `kind`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// `kind = "directory"`: files appearing in a directory.
    Directory(DirectoryConfig),
    /// `kind = "json_socket"`: JSON lines on a local Unix socket.
    JsonSocket(JsonSocketConfig),
    /// `kind = "http"`: `POST /v1/records`.
    Http(HttpConfig),
    /// `kind = "board"`: periodic readings of a board profile's sensors.
    Board(BoardConfig),
    /// `kind = "camera"`: JPEG frames of a board profile's camera.
    Camera(CameraConfig),
}

/// A source's configuration is unusable; says which key and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum SourceConfigError {
    /// A value outside what the key allows.
    #[error("source {source_name:?}: key {key:?}: expected {expected}, found {found}")]
    Invalid { source_name: String, key: &'static str, expected: String, found: String },
    /// The socket or port to listen on could not be set up.
    #[error("source {source_name:?}: key {key:?}: cannot listen on {address}: {error}")]
    Listen { source_name: String, key: &'static str, address: String, error: std::io::Error },
    /// A board profile could not be loaded or its devices opened; `error` names file and key.
    #[error("source {source_name:?}: key {key:?}: {error}")]
    Device { source_name: String, key: &'static str, error: String },
}

impl SourceConfigError {
    pub(crate) fn invalid(
        source_name: &str,
        key: &'static str,
        expected: impl Into<String>,
        found: impl std::fmt::Display,
    ) -> SourceConfigError {
        SourceConfigError::Invalid {
            source_name: source_name.to_string(),
            key,
            expected: expected.into(),
            found: found.to_string(),
        }
    }
}

/// Builds the source `name` from its config, with the metrics it will count into. Listening
/// sources bind here and board sources open their devices here, so a busy address, a bad socket
/// path or a missing sensor is a config error, not a failure later on the source's thread.
pub fn build_source(
    name: &str,
    config: &SourceConfig,
) -> Result<(Box<dyn Source>, Arc<SourceMetrics>), SourceConfigError> {
    let metrics = Arc::new(SourceMetrics::default());
    let source: Box<dyn Source> = match config {
        SourceConfig::Directory(config) => Box::new(DirectorySource::new(name, config, metrics.clone())?),
        SourceConfig::JsonSocket(config) => Box::new(JsonSocketSource::bind(name, config, metrics.clone())?),
        SourceConfig::Http(config) => Box::new(HttpSource::bind(name, config, metrics.clone())?),
        SourceConfig::Board(config) => Box::new(BoardSource::open(name, config, metrics.clone())?),
        SourceConfig::Camera(config) => Box::new(CameraSource::open(name, config, metrics.clone())?),
    };
    Ok((source, metrics))
}

/// Checks that `name` can prefix generated keys.
pub(crate) fn validate_source_name(name: &str) -> Result<(), SourceConfigError> {
    let expected = format!(
        "a source name of 1..={SOURCE_NAME_BYTES_MAX} bytes of printable ASCII without space, '.', '/' or '\\'"
    );
    if name.len() > SOURCE_NAME_BYTES_MAX || protocol::validate_key(name).is_err() {
        return Err(SourceConfigError::invalid(name, "name", expected, format!("{name:?}")));
    }
    Ok(())
}

/// Parses an optional `lane` setting, falling back to `default`.
pub(crate) fn lane_setting(
    source_name: &str,
    setting: Option<&str>,
    default: Lane,
) -> Result<Lane, SourceConfigError> {
    match setting {
        None => Ok(default),
        Some(text) => text.parse::<Lane>().map_err(|_| {
            SourceConfigError::invalid(
                source_name,
                "lane",
                "one of \"audit\", \"decisions\", \"sensor\", \"media\"",
                format!("{text:?}"),
            )
        }),
    }
}

/// Checks a numeric setting against its allowed range.
pub(crate) fn check_range<T: PartialOrd + std::fmt::Display + Copy>(
    source_name: &str,
    key: &'static str,
    value: T,
    range: std::ops::RangeInclusive<T>,
    unit: &str,
) -> Result<T, SourceConfigError> {
    if range.contains(&value) {
        return Ok(value);
    }
    let expected = format!("{}..={} {unit}", range.start(), range.end());
    Err(SourceConfigError::invalid(source_name, key, expected, value))
}

/// Checks that a configured path is absolute-or-relative but not empty.
pub(crate) fn check_path(source_name: &str, key: &'static str, path: &Path) -> Result<(), SourceConfigError> {
    if path.as_os_str().is_empty() {
        return Err(SourceConfigError::invalid(source_name, key, "a non-empty path", "\"\""));
    }
    Ok(())
}

/// Microseconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_us() -> u64 {
    micros_since_epoch(SystemTime::now())
}

pub(crate) fn micros_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
}

/// Generates `<source>-<sequence>` keys; shared between a source's connections.
#[derive(Debug)]
pub(crate) struct KeySequence {
    source_name: String,
    next: AtomicU64,
}

impl KeySequence {
    /// Starts at the current time in microseconds so keys continue after a restart.
    ///
    /// Every key it will generate is valid: the name passed `validate_source_name` when the
    /// config was read, and the sequence is always `KEY_SEQUENCE_DIGITS` decimal digits, so the
    /// longest key (checked here, in release builds too) stands for all of them.
    pub(crate) fn starting_now(source_name: &str) -> KeySequence {
        assert!(source_name.len() <= SOURCE_NAME_BYTES_MAX, "source name checked before");
        let longest = format!("{source_name}-{:0width$}", u64::MAX, width = KEY_SEQUENCE_DIGITS);
        assert!(
            protocol::validate_key(&longest).is_ok(),
            "source name {source_name:?} makes invalid keys: it is checked when the config is read"
        );
        KeySequence { source_name: source_name.to_string(), next: AtomicU64::new(now_us()) }
    }

    pub(crate) fn next_key(&self) -> String {
        let sequence = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{sequence:0width$}", self.source_name, width = KEY_SEQUENCE_DIGITS)
    }
}

/// What became of a record handed to the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    Sent,
    /// The stop signal was set while the channel was full; the record was dropped.
    Stopped,
    /// The pipeline hung up; the source should return.
    Disconnected,
}

/// One attempt to hand `record` over; gives it back if the channel is full.
fn try_deliver(
    out: &RecordSender,
    record: SourceRecord,
    metrics: &SourceMetrics,
) -> Result<Delivery, SourceRecord> {
    let payload_bytes = record.payload.len();
    match out.try_send(record) {
        Ok(()) => {
            metrics.count_record(payload_bytes);
            Ok(Delivery::Sent)
        }
        Err(TrySendError::Disconnected(_)) => Ok(Delivery::Disconnected),
        Err(TrySendError::Full(record)) => Err(record),
    }
}

/// A record on its way to the pipeline, with the retry state that `deliver_blocking` and
/// `deliver_async` share: they differ only in how they wait between attempts.
pub(crate) struct Handover<'a> {
    out: &'a RecordSender,
    record: Option<SourceRecord>,
    stop: &'a StopSignal,
    metrics: &'a SourceMetrics,
    /// The wait after the next failed attempt; doubles up to `SEND_RETRY_INTERVAL_MAX_MS`.
    interval: Duration,
}

impl<'a> Handover<'a> {
    pub(crate) fn new(
        out: &'a RecordSender,
        record: SourceRecord,
        stop: &'a StopSignal,
        metrics: &'a SourceMetrics,
    ) -> Handover<'a> {
        Handover { out, record: Some(record), stop, metrics, interval: Duration::from_millis(1) }
    }

    /// One attempt: the outcome, or how long to wait before the next attempt (the channel was
    /// full and the stop signal is not set).
    fn attempt(&mut self) -> Result<Delivery, Duration> {
        let record = self.record.take().expect("a handover attempts until it has an outcome");
        match try_deliver(self.out, record, self.metrics) {
            Ok(delivery) => return Ok(delivery),
            Err(returned) => self.record = Some(returned),
        }
        if self.stop.is_stopped() {
            return Ok(Delivery::Stopped);
        }
        let wait = self.interval;
        self.interval = (wait * 2).min(Duration::from_millis(SEND_RETRY_INTERVAL_MAX_MS));
        Err(wait)
    }

    /// Hands the record to the pipeline, waiting while the channel is full but returning soon
    /// after `stop` is set (a plain blocking `send` would not notice the stop signal).
    pub(crate) fn deliver_blocking(mut self) -> Delivery {
        loop {
            match self.attempt() {
                Ok(delivery) => return delivery,
                Err(wait) => std::thread::sleep(wait),
            }
        }
    }

    /// `deliver_blocking` for async tasks: sleeps on the runtime instead of the thread.
    pub(crate) async fn deliver_async(mut self) -> Delivery {
        loop {
            match self.attempt() {
                Ok(delivery) => return delivery,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

/// Sleeps until `deadline` in slices of `STOP_POLL_INTERVAL_MS`; false if `stop` was set.
pub(crate) fn sleep_until_unless_stopped(deadline: Instant, stop: &StopSignal) -> bool {
    loop {
        if stop.is_stopped() {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(STOP_POLL_INTERVAL_MS)));
    }
}

/// Resolves once either signal is set: the daemon's stop, or the source's own (set when the
/// pipeline hung up).
pub(crate) async fn stopped(stop: &StopSignal, finished: &StopSignal) {
    let mut interval = tokio::time::interval(Duration::from_millis(STOP_POLL_INTERVAL_MS));
    while !stop.is_stopped() && !finished.is_stopped() {
        interval.tick().await;
    }
}

/// A single-threaded runtime for one listening source: the source already has a thread of its
/// own, and two cores are shared by the whole daemon.
pub(crate) fn source_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("failed to start a tokio runtime for a source")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_valid_unique_and_ordered() {
        let name = "n".repeat(SOURCE_NAME_BYTES_MAX);
        let sequence = KeySequence::starting_now(&name);
        let first = sequence.next_key();
        let second = sequence.next_key();
        assert!(protocol::validate_key(&first).is_ok());
        assert_eq!(first.len(), RECORD_KEY_BYTES_MAX);
        assert!(first < second);
    }

    #[test]
    fn source_names_are_checked() {
        let check = |name: &str, valid: bool| {
            assert_eq!(validate_source_name(name).is_ok(), valid, "{name:?}");
        };
        check("camera-01", true);
        check(&"n".repeat(SOURCE_NAME_BYTES_MAX), true);
        check(&"n".repeat(SOURCE_NAME_BYTES_MAX + 1), false);
        check("", false);
        check("a.b", false);
        check("a/b", false);
    }
}
