//! JSON lines on a local Unix stream socket (`kind = "json_socket"`).
//!
//! Protocol: a client connects and writes JSON objects, one per line (format in
//! `json_lines.rs`). Valid lines are not answered, so a client that never reads cannot stall on
//! its own acknowledgements; each refused line is answered with one line
//! `{"error":"line N: <what was wrong>"}` and the connection goes on. A client over the
//! connection limit gets `{"error":"too many connections ..."}` and is closed. When the pipeline
//! is behind, reading stops until it catches up (the kernel's socket buffer then fills and the
//! client's writes block): backpressure, no queue.
//!
//! Limits: `line_bytes_max` per line (default 64 KiB, at most 1 MiB), `connections_max` open
//! connections (default `CONNECTIONS_DEFAULT`, 16; at most `CONNECTIONS_LIMIT`, 1024), one read
//! buffer of `READ_BUFFER_BYTES` and one line buffer per connection. A connection that does not
//! complete a line within `idle_timeout_ms` (default `IDLE_TIMEOUT_DEFAULT_MS`, 5 min; 100 ms
//! ..= 1 h), idle or trickling bytes, is closed and counted (`idle_timeout`), so silent or slow
//! clients cannot keep every slot; the same bound applies to writing an error answer to a
//! client that does not read. While the pipeline is behind the clock does not run (that wait is
//! backpressure, not the client's fault). The refusal of a connection over the limit is written
//! without waiting (`try_write`), so refused clients cost no task.
//!
//! The socket file is created when the source is built (a stale socket file from an earlier run
//! is replaced; any other kind of file there is a config error) and removed when `run` returns.

use std::io;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inference::http_server::TIMEOUT_RANGE_MS;
use serde::Deserialize;
use telemetry::LogRateLimit;
use tokio::io::{AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::json_lines::{
    CONNECTIONS_DEFAULT, Intake, LINE_BYTES_DEFAULT, LINE_BYTES_LIMIT, LineProblem, LineRead, RecordMaker,
    connections_default, lane_and_connections,
};
use super::metrics::{SourceErrorKind, SourceMetrics};
use super::{
    Delivery, KeySequence, SourceConfigError, check_path, check_range, source_runtime, validate_source_name,
};
use crate::source::{RecordSender, Source, StopSignal};

/// Read buffer per connection.
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Default time a connection may take to complete a line.
pub(crate) const IDLE_TIMEOUT_DEFAULT_MS: u64 = 300_000;

/// Settings of a `json_socket` source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSocketConfig {
    /// Where the socket file is created.
    pub path: PathBuf,
    /// Lane of the records (default "sensor").
    #[serde(default)]
    pub lane: Option<String>,
    /// Longest line accepted, bytes.
    #[serde(default = "line_bytes_default")]
    pub line_bytes_max: usize,
    /// Most connections served at once.
    #[serde(default = "connections_default")]
    pub connections_max: usize,
    /// A connection that does not complete a line (or take an error answer) within this long is
    /// closed.
    #[serde(default = "idle_timeout_default_ms")]
    pub idle_timeout_ms: u64,
}

fn line_bytes_default() -> usize {
    LINE_BYTES_DEFAULT
}

fn idle_timeout_default_ms() -> u64 {
    IDLE_TIMEOUT_DEFAULT_MS
}

impl JsonSocketConfig {
    /// A config with every default, listening at `path`.
    pub fn new(path: impl Into<PathBuf>) -> JsonSocketConfig {
        JsonSocketConfig {
            path: path.into(),
            lane: None,
            line_bytes_max: LINE_BYTES_DEFAULT,
            connections_max: CONNECTIONS_DEFAULT,
            idle_timeout_ms: IDLE_TIMEOUT_DEFAULT_MS,
        }
    }
}

/// A bound `json_socket` source, ready to run.
#[derive(Debug)]
pub struct JsonSocketSource {
    name: String,
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
    line_bytes_max: usize,
    connections_max: usize,
    idle_timeout: Duration,
    records: RecordMaker,
    metrics: Arc<SourceMetrics>,
}

impl JsonSocketSource {
    /// Checks the config and creates the socket file.
    pub fn bind(
        name: &str,
        config: &JsonSocketConfig,
        metrics: Arc<SourceMetrics>,
    ) -> Result<JsonSocketSource, SourceConfigError> {
        validate_source_name(name)?;
        check_path(name, "path", &config.path)?;
        let (lane, connections_max) =
            lane_and_connections(name, config.lane.as_deref(), config.connections_max)?;
        let line_bytes_max =
            check_range(name, "line_bytes_max", config.line_bytes_max, 1..=LINE_BYTES_LIMIT, "bytes")?;
        let idle_timeout_ms =
            check_range(name, "idle_timeout_ms", config.idle_timeout_ms, TIMEOUT_RANGE_MS, "milliseconds")?;
        let listen_error = |error| SourceConfigError::Listen {
            source_name: name.to_string(),
            key: "path",
            address: config.path.display().to_string(),
            error,
        };
        remove_stale_socket(&config.path).map_err(listen_error)?;
        let listener = std::os::unix::net::UnixListener::bind(&config.path).map_err(listen_error)?;
        listener.set_nonblocking(true).map_err(listen_error)?;
        Ok(JsonSocketSource {
            name: name.to_string(),
            path: config.path.clone(),
            listener,
            line_bytes_max,
            connections_max,
            idle_timeout: Duration::from_millis(idle_timeout_ms),
            records: RecordMaker::new(lane, Arc::new(KeySequence::starting_now(name))),
            metrics,
        })
    }

    /// Where clients connect.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Replaces a socket file left behind by an earlier run; refuses to touch anything else.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
        Ok(metadata) if metadata.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => {
            Err(io::Error::new(io::ErrorKind::AlreadyExists, "a file that is not a socket is in the way"))
        }
    }
}

/// Removes the socket file when the source ends, however it ends.
struct SocketFileGuard<'a>(&'a Path);

impl Drop for SocketFileGuard<'_> {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(self.0) {
            debug!(path = %self.0.display(), %error, "could not remove the socket file");
        }
    }
}

/// What every connection of one source shares.
struct Shared {
    name: String,
    line_bytes_max: usize,
    idle_timeout: Duration,
    intake: Intake,
    /// One log line per interval for refusals and for timeouts (the metrics count them all).
    refusal_logs: std::sync::Mutex<LogRateLimit>,
    timeout_logs: std::sync::Mutex<LogRateLimit>,
}

/// One log line per this interval for each repeating condition.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs `message` unless one was logged within `LOG_INTERVAL`.
fn log_limited(limit: &std::sync::Mutex<LogRateLimit>, source: &str, message: &str) {
    let allowed = limit.lock().unwrap_or_else(std::sync::PoisonError::into_inner).allow(Instant::now());
    if let Some(suppressed) = allowed {
        warn!(source, suppressed, "{message}");
    }
}

impl Source for JsonSocketSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(self: Box<Self>, out: RecordSender, stop: StopSignal) -> anyhow::Result<()> {
        let source = *self;
        let _socket_file = SocketFileGuard(&source.path);
        let runtime = source_runtime()?;
        let shared = Arc::new(Shared {
            name: source.name.clone(),
            line_bytes_max: source.line_bytes_max,
            idle_timeout: source.idle_timeout,
            intake: Intake::new(source.records, source.metrics, out, stop),
            refusal_logs: std::sync::Mutex::new(LogRateLimit::new(LOG_INTERVAL)),
            timeout_logs: std::sync::Mutex::new(LogRateLimit::new(LOG_INTERVAL)),
        });
        info!(source = %shared.name, path = %source.path.display(), "json socket source listening");
        // Dropping the runtime when this returns cancels every connection task.
        runtime.block_on(accept_connections(source.listener, source.connections_max, shared))
    }
}

async fn accept_connections(
    listener: std::os::unix::net::UnixListener,
    connections_max: usize,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let connections = Arc::new(Semaphore::new(connections_max));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.intake.stopped() => return Ok(()),
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Running out of file descriptors must not end the source; wait and retry.
                shared.intake.metrics.count_error(SourceErrorKind::Io);
                warn!(source = %shared.name, %error, "accepting a connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(super::STOP_POLL_INTERVAL_MS)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            shared.intake.metrics.count_error(SourceErrorKind::TooManyConnections);
            log_limited(
                &shared.refusal_logs,
                &shared.name,
                &format!("turned a connection away: too many connections (at most {connections_max})"),
            );
            let mut answer = serde_json::json!({
                "error": format!("too many connections (at most {connections_max}); try again later")
            })
            .to_string();
            answer.push('\n');
            // Without waiting: a refused client that does not read gets less, and costs no task.
            let _ = stream.try_write(answer.as_bytes());
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_connection(stream, &shared).await;
            drop(permit);
        });
    }
}

async fn serve_connection(stream: UnixStream, shared: &Shared) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let mut line = Vec::new();
    let mut line_number: u64 = 0;
    loop {
        // A line already whole in the buffer completes without waiting, so it needs no timer
        // (one per line was a clock read and a timer entry per record).
        let line_buffered = reader.buffer().contains(&b'\n');
        let read_line = super::json_lines::read_line_bounded(&mut reader, &mut line, shared.line_bytes_max);
        let read = if line_buffered {
            Ok(read_line.await)
        } else {
            tokio::time::timeout(shared.idle_timeout, read_line).await
        };
        let read = match read {
            Ok(Ok(read)) => read,
            Ok(Err(error)) => {
                shared.intake.metrics.count_error(SourceErrorKind::Io);
                debug!(source = %shared.name, %error, "reading from a client failed");
                return;
            }
            Err(_) => {
                timed_out(shared, "closed a connection that completed no line within idle_timeout_ms");
                return;
            }
        };
        line_number += 1;
        let outcome = match read {
            LineRead::End => return,
            LineRead::TooLong => Err(LineProblem::TooLong { bytes_max: shared.line_bytes_max }),
            LineRead::Line => shared.intake.records.record_from_line(&line),
        };
        match outcome {
            Ok(None) => {}
            Ok(Some(record)) => {
                if shared.intake.deliver(record).await != Delivery::Sent {
                    return;
                }
            }
            Err(problem) => {
                shared.intake.metrics.count_error(problem.kind());
                if answer_error(&mut writer, &format!("line {line_number}: {problem}"), shared).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Counts and (rate-limited) logs a connection closed by `idle_timeout`.
fn timed_out(shared: &Shared, message: &str) {
    shared.intake.metrics.count_error(SourceErrorKind::IdleTimeout);
    log_limited(&shared.timeout_logs, &shared.name, message);
}

/// Writes `{"error": message}` and a newline, within `idle_timeout` (a client that never reads
/// cannot hold its slot by filling the socket buffer).
async fn answer_error<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &str,
    shared: &Shared,
) -> io::Result<()> {
    let mut answer = serde_json::json!({ "error": message }).to_string();
    answer.push('\n');
    let written = match tokio::time::timeout(shared.idle_timeout, writer.write_all(answer.as_bytes())).await {
        Ok(written) => written,
        Err(_) => {
            timed_out(
                shared,
                "closed a connection that did not read its error answers within idle_timeout_ms",
            );
            return Err(io::Error::new(io::ErrorKind::TimedOut, "client did not read its answer"));
        }
    };
    if let Err(error) = &written {
        shared.intake.metrics.count_error(SourceErrorKind::Io);
        debug!(source = %shared.name, %error, "answering a client failed");
    }
    written
}
