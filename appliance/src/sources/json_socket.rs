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
//! buffer of `READ_BUFFER_BYTES` and one line buffer per connection.
//!
//! The socket file is created when the source is built (a stale socket file from an earlier run
//! is replaced; any other kind of file there is a config error) and removed when `run` returns.

use std::io;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
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
}

fn line_bytes_default() -> usize {
    LINE_BYTES_DEFAULT
}

impl JsonSocketConfig {
    /// A config with every default, listening at `path`.
    pub fn new(path: impl Into<PathBuf>) -> JsonSocketConfig {
        JsonSocketConfig {
            path: path.into(),
            lane: None,
            line_bytes_max: LINE_BYTES_DEFAULT,
            connections_max: CONNECTIONS_DEFAULT,
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
    intake: Intake,
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
            intake: Intake::new(source.records, source.metrics, out, stop),
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
        let mut stream = match accepted {
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
            warn!(source = %shared.name, connections_max, "turned a connection away: too many connections");
            let message = format!("too many connections (at most {connections_max}); try again later");
            let shared = shared.clone();
            tokio::spawn(async move {
                let _ = answer_error(&mut stream, &message, &shared).await;
            });
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
        let read =
            match super::json_lines::read_line_bounded(&mut reader, &mut line, shared.line_bytes_max).await {
                Ok(read) => read,
                Err(error) => {
                    shared.intake.metrics.count_error(SourceErrorKind::Io);
                    debug!(source = %shared.name, %error, "reading from a client failed");
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

/// Writes `{"error": message}` and a newline.
async fn answer_error<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &str,
    shared: &Shared,
) -> io::Result<()> {
    let mut answer = serde_json::json!({ "error": message }).to_string();
    answer.push('\n');
    let written = writer.write_all(answer.as_bytes()).await;
    if let Err(error) = &written {
        shared.intake.metrics.count_error(SourceErrorKind::Io);
        debug!(source = %shared.name, %error, "answering a client failed");
    }
    written
}
