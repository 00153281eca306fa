//! JSON records over HTTP/1.1 (`kind = "http"`).
//!
//! `POST /v1/records` with a body that is either one JSON value (a single object, pretty-printed
//! or not) or JSON lines (format in `json_lines.rs`). A body is taken whole or not at all:
//! - 202 `{"accepted": N}`: every record was handed to the pipeline.
//! - 400 `{"error": "...", "problems": ["line 2: invalid JSON: ...", ...]}`: an empty body or at
//!   least one refused line; nothing was accepted. At most `PROBLEMS_REPORTED_MAX` (10) problems
//!   are listed, each refused line is counted.
//! - 413 `{"error": "..."}`: the body is over `body_bytes_max` or holds over
//!   `RECORDS_PER_BODY_MAX` records.
//! - 503 `{"error": "...", "accepted": K}`: the appliance stopped while the body was being taken;
//!   the first K records were accepted.
//! - 404 for any other path, 405 for another method.
//!
//! Limits: `body_bytes_max` (default `BODY_BYTES_DEFAULT`, 1 MiB; at most `BODY_BYTES_LIMIT`,
//! 4 000 000 bytes, below `RECORD_PAYLOAD_BYTES_MAX` because a single object is one record) is
//! checked against Content-Length before reading and enforced while reading; `connections_max`
//! connections are served at once (default 16, at most 1024): further clients wait in the
//! kernel's accept backlog. So the memory held by bodies is at most `connections_max` ×
//! `body_bytes_max`. A connection that sends nothing for `idle_timeout_ms` (default 30 s) while
//! the server waits to read from it is closed, so stalled or idle clients give their slot back.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use protocol::RECORD_PAYLOAD_BYTES_MAX;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use super::json_lines::{
    CONNECTIONS_DEFAULT, Intake, RecordMaker, connections_default, lane_and_connections,
};
use super::metrics::{SourceErrorKind, SourceMetrics};
use super::{
    Delivery, KeySequence, STOP_POLL_INTERVAL_MS, SourceConfigError, check_range, source_runtime,
    validate_source_name,
};
use crate::source::{RecordSender, Source, SourceRecord, StopSignal};

/// Default largest body.
pub(crate) const BODY_BYTES_DEFAULT: usize = 1024 * 1024;
/// Largest `body_bytes_max` a config may ask for.
pub(crate) const BODY_BYTES_LIMIT: usize = 4_000_000;
/// Most records taken from one body.
pub const RECORDS_PER_BODY_MAX: usize = 10_000;
/// Most problems listed in one 400 answer.
const PROBLEMS_REPORTED_MAX: usize = 10;
/// How long requests in progress may finish after `stop` before they are cut off.
const SHUTDOWN_GRACE_MS: u64 = 1_000;
/// Default time a connection may send nothing while the server waits to read from it.
pub(crate) const IDLE_TIMEOUT_DEFAULT_MS: u64 = 30_000;
/// Shortest and longest `idle_timeout_ms` a config may ask for.
const IDLE_TIMEOUT_RANGE_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;

const _: () = assert!(BODY_BYTES_DEFAULT <= BODY_BYTES_LIMIT);
const _: () = assert!(BODY_BYTES_LIMIT <= RECORD_PAYLOAD_BYTES_MAX);

/// The one path records are posted to.
pub const RECORDS_PATH: &str = "/v1/records";

/// Settings of an `http` source.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address and port to listen on, e.g. "127.0.0.1:8081" (port 0: any free port).
    pub listen: SocketAddr,
    /// Lane of the records (default "sensor").
    #[serde(default)]
    pub lane: Option<String>,
    /// Largest request body, bytes.
    #[serde(default = "body_bytes_default")]
    pub body_bytes_max: usize,
    /// Most connections served at once.
    #[serde(default = "connections_default")]
    pub connections_max: usize,
    /// A connection that sends nothing for this long while the server waits for it (a stalled
    /// request or an idle keep-alive) is closed, so slow clients cannot hold every slot.
    #[serde(default = "idle_timeout_default_ms")]
    pub idle_timeout_ms: u64,
}

fn idle_timeout_default_ms() -> u64 {
    IDLE_TIMEOUT_DEFAULT_MS
}

fn body_bytes_default() -> usize {
    BODY_BYTES_DEFAULT
}

impl HttpConfig {
    /// A config with every default, listening on `listen`.
    pub fn new(listen: SocketAddr) -> HttpConfig {
        HttpConfig {
            listen,
            lane: None,
            body_bytes_max: BODY_BYTES_DEFAULT,
            connections_max: CONNECTIONS_DEFAULT,
            idle_timeout_ms: IDLE_TIMEOUT_DEFAULT_MS,
        }
    }
}

/// A bound `http` source, ready to run.
#[derive(Debug)]
pub struct HttpSource {
    name: String,
    listener: std::net::TcpListener,
    local_address: SocketAddr,
    body_bytes_max: usize,
    connections_max: usize,
    idle_timeout: Duration,
    records: RecordMaker,
    metrics: Arc<SourceMetrics>,
}

impl HttpSource {
    /// Checks the config and binds the listening socket.
    pub fn bind(
        name: &str,
        config: &HttpConfig,
        metrics: Arc<SourceMetrics>,
    ) -> Result<HttpSource, SourceConfigError> {
        validate_source_name(name)?;
        let (lane, connections_max) =
            lane_and_connections(name, config.lane.as_deref(), config.connections_max)?;
        let body_bytes_max =
            check_range(name, "body_bytes_max", config.body_bytes_max, 1..=BODY_BYTES_LIMIT, "bytes")?;
        let idle_timeout_ms = check_range(
            name,
            "idle_timeout_ms",
            config.idle_timeout_ms,
            IDLE_TIMEOUT_RANGE_MS,
            "milliseconds",
        )?;
        let listen_error = |error| SourceConfigError::Listen {
            source_name: name.to_string(),
            key: "listen",
            address: config.listen.to_string(),
            error,
        };
        let listener = std::net::TcpListener::bind(config.listen).map_err(listen_error)?;
        listener.set_nonblocking(true).map_err(listen_error)?;
        let local_address = listener.local_addr().map_err(listen_error)?;
        Ok(HttpSource {
            name: name.to_string(),
            listener,
            local_address,
            body_bytes_max,
            connections_max,
            idle_timeout: Duration::from_millis(idle_timeout_ms),
            records: RecordMaker::new(lane, Arc::new(KeySequence::starting_now(name))),
            metrics,
        })
    }

    /// The address actually bound (tells the port when the config asked for port 0).
    pub fn local_address(&self) -> SocketAddr {
        self.local_address
    }
}

/// What every request of one source shares.
struct Shared {
    body_bytes_max: usize,
    intake: Intake,
}

impl Source for HttpSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(self: Box<Self>, out: RecordSender, stop: StopSignal) -> anyhow::Result<()> {
        let source = *self;
        let runtime = source_runtime()?;
        let shared = Arc::new(Shared {
            body_bytes_max: source.body_bytes_max,
            intake: Intake::new(source.records, source.metrics, out, stop),
        });
        info!(source = %source.name, address = %source.local_address, "http source listening");
        runtime.block_on(async move {
            let listener = LimitedListener {
                listener: TcpListener::from_std(source.listener)?,
                connections: Arc::new(Semaphore::new(source.connections_max)),
                idle_timeout: source.idle_timeout,
            };
            let router = axum::Router::new()
                .route(RECORDS_PATH, post(accept_records))
                .fallback(unknown_path)
                .with_state(shared.clone());
            let shutdown = {
                let shared = shared.clone();
                async move { shared.intake.stopped().await }
            };
            let server =
                tokio::spawn(axum::serve(listener, router).with_graceful_shutdown(shutdown).into_future());
            shared.intake.stopped().await;
            match tokio::time::timeout(Duration::from_millis(SHUTDOWN_GRACE_MS), server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => warn!(source = %source.name, %error, "http server failed"),
                Ok(Err(error)) => warn!(source = %source.name, %error, "http server task failed"),
                Err(_) => warn!(source = %source.name, "requests still in progress were cut off at shutdown"),
            }
            anyhow::Ok(())
        })
    }
}

async fn unknown_path() -> Response {
    answer(StatusCode::NOT_FOUND, json!({ "error": format!("no such path; POST records to {RECORDS_PATH}") }))
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

async fn accept_records(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let too_large = || {
        shared.intake.metrics.count_error(SourceErrorKind::BodyTooLarge);
        let message = format!(
            "request body larger than {} bytes; send fewer records per request",
            shared.body_bytes_max
        );
        answer(StatusCode::PAYLOAD_TOO_LARGE, json!({ "error": message }))
    };
    let declared_bytes = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared_bytes.is_some_and(|bytes| bytes > shared.body_bytes_max as u64) {
        return too_large();
    }
    let body = match axum::body::to_bytes(body, shared.body_bytes_max).await {
        Ok(body) => body,
        // Either the limit was hit or the client went away; only the former gets to read this.
        Err(_) => return too_large(),
    };
    let records = match records_from_body(&shared.intake.records, &body, &shared.intake.metrics) {
        Ok(records) => records,
        Err((status, body)) => return answer(status, body),
    };
    let total = records.len();
    for (accepted, record) in records.into_iter().enumerate() {
        match shared.intake.deliver(record).await {
            Delivery::Sent => {}
            Delivery::Stopped | Delivery::Disconnected => {
                let message =
                    format!("the appliance is shutting down; accepted {accepted} of {total} records");
                return answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "error": message, "accepted": accepted }),
                );
            }
        }
    }
    answer(StatusCode::ACCEPTED, json!({ "accepted": total }))
}

/// Every record of a body, or the answer that refuses it (the refusal already counted).
fn records_from_body(
    maker: &RecordMaker,
    body: &[u8],
    metrics: &SourceMetrics,
) -> Result<Vec<SourceRecord>, (StatusCode, Value)> {
    if body.trim_ascii().is_empty() {
        metrics.count_error(SourceErrorKind::InvalidJson);
        let message = "empty request body; send one JSON object or JSON lines";
        return Err((StatusCode::BAD_REQUEST, json!({ "error": message, "problems": [] })));
    }
    // One JSON value, whatever its layout, is one record; anything else is read as JSON lines.
    let lines: Vec<&[u8]> = if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
        vec![body]
    } else {
        // A final '\n' ends the last line rather than starting an empty one.
        body.strip_suffix(b"\n").unwrap_or(body).split(|&byte| byte == b'\n').collect()
    };
    let mut records = Vec::new();
    let mut problems = Vec::new();
    let mut refused_lines = 0_usize;
    for (index, line) in lines.iter().enumerate() {
        match maker.record_from_line(line) {
            Ok(None) => {}
            Ok(Some(record)) => {
                if records.len() == RECORDS_PER_BODY_MAX {
                    metrics.count_error(SourceErrorKind::BodyTooLarge);
                    let message = format!(
                        "request body holds more than {RECORDS_PER_BODY_MAX} records; send fewer per request"
                    );
                    return Err((StatusCode::PAYLOAD_TOO_LARGE, json!({ "error": message })));
                }
                records.push(record);
            }
            Err(problem) => {
                metrics.count_error(problem.kind());
                refused_lines += 1;
                if problems.len() < PROBLEMS_REPORTED_MAX {
                    problems.push(format!("line {}: {problem}", index + 1));
                }
            }
        }
    }
    if refused_lines > 0 {
        let message = format!("{refused_lines} of {} lines refused; nothing was accepted", lines.len());
        return Err((StatusCode::BAD_REQUEST, json!({ "error": message, "problems": problems })));
    }
    Ok(records)
}

/// Accepts a connection only while fewer than `connections` are open; the others wait in the
/// kernel's backlog.
struct LimitedListener {
    listener: TcpListener,
    connections: Arc<Semaphore>,
    idle_timeout: Duration,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (LimitedStream, SocketAddr) {
        let permit = self.connections.clone().acquire_owned().await.expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, address)) => {
                    let idle_deadline = Box::pin(tokio::time::sleep(self.idle_timeout));
                    let stream = LimitedStream {
                        stream,
                        idle_timeout: self.idle_timeout,
                        idle_deadline,
                        _permit: permit,
                    };
                    return (stream, address);
                }
                Err(error) => {
                    // Running out of file descriptors must not end the source; wait and retry.
                    warn!(%error, "accepting an http connection failed");
                    tokio::time::sleep(Duration::from_millis(STOP_POLL_INTERVAL_MS)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// A connection that gives its slot back when it closes, and fails a read that has waited
/// `idle_timeout` since the last bytes arrived.
struct LimitedStream {
    stream: TcpStream,
    idle_timeout: Duration,
    idle_deadline: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_read(context, buffer) {
            Poll::Ready(result) => {
                let deadline = tokio::time::Instant::now() + this.idle_timeout;
                this.idle_deadline.as_mut().reset(deadline);
                Poll::Ready(result)
            }
            Poll::Pending => match this.idle_deadline.as_mut().poll(context) {
                Poll::Ready(()) => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle too long")))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(self: Pin<&mut Self>, context: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(context, bytes)
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(context)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
