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
//! - 408 `{"error": "..."}`: the body did not arrive within `body_timeout_ms`; the connection is
//!   closed.
//!
//! Limits: `body_bytes_max` (default `BODY_BYTES_DEFAULT`, 1 MiB; at most `BODY_BYTES_LIMIT`,
//! 4 000 000 bytes, below `RECORD_PAYLOAD_BYTES_MAX` because a single object is one record) is
//! checked against Content-Length before reading and enforced while reading. The server is
//! `inference::http_server` (shared with the inference API): `connections_max` connections are
//! served at once (default 16, at most 1024), `connections_queued_max` more wait for a slot
//! (default 16) at most `header_timeout_ms`, and the rest get 503 `too_many_connections` and are
//! closed; headers must be complete within `header_timeout_ms` (default 10 s, also the longest
//! wait for the next request on a kept-alive connection), a body within `body_timeout_ms`
//! (default 30 s), and a connection that sends nothing for `idle_timeout_ms` (default 30 s)
//! while the server waits to read from it is closed. So a slow client gives its slot back within
//! a bounded time however it trickles, and the memory held by bodies is at most
//! `connections_max` × `body_bytes_max`. Refusals and timeouts are counted as source errors
//! (`too_many_connections`, `header_timeout`, `body_timeout`, `idle_timeout`), waits for a slot
//! in `tributary_source_connections_queued_total`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use inference::http_server::{
    BODY_TIMEOUT_DEFAULT_MS, CONNECTIONS_QUEUED_MAX_DEFAULT, HEADER_TIMEOUT_DEFAULT_MS, HttpLimits,
    IDLE_TIMEOUT_DEFAULT_MS,
};
use protocol::RECORD_PAYLOAD_BYTES_MAX;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::json_lines::{
    CONNECTIONS_DEFAULT, Intake, RecordMaker, connections_default, lane_and_connections,
};
use super::metrics::{SourceErrorKind, SourceMetrics};
use super::{Delivery, KeySequence, SourceConfigError, check_range, source_runtime, validate_source_name};
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
    /// Most connections waiting for a slot (each at most `header_timeout_ms`); beyond, 503.
    #[serde(default = "connections_queued_default")]
    pub connections_queued_max: usize,
    /// A request's headers must be complete this long after the server starts waiting for them.
    #[serde(default = "header_timeout_default_ms")]
    pub header_timeout_ms: u64,
    /// A request's body must be complete this long after its headers (else 408).
    #[serde(default = "body_timeout_default_ms")]
    pub body_timeout_ms: u64,
    /// A connection that sends nothing for this long while the server waits for it (a stalled
    /// request or an idle keep-alive) is closed, so slow clients cannot hold every slot.
    #[serde(default = "idle_timeout_default_ms")]
    pub idle_timeout_ms: u64,
}

fn connections_queued_default() -> usize {
    CONNECTIONS_QUEUED_MAX_DEFAULT
}

fn header_timeout_default_ms() -> u64 {
    HEADER_TIMEOUT_DEFAULT_MS
}

fn body_timeout_default_ms() -> u64 {
    BODY_TIMEOUT_DEFAULT_MS
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
            connections_queued_max: CONNECTIONS_QUEUED_MAX_DEFAULT,
            header_timeout_ms: HEADER_TIMEOUT_DEFAULT_MS,
            body_timeout_ms: BODY_TIMEOUT_DEFAULT_MS,
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
    limits: HttpLimits,
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
        let limits = HttpLimits::from_config(
            connections_max,
            config.connections_queued_max,
            config.header_timeout_ms,
            config.body_timeout_ms,
            config.idle_timeout_ms,
        )
        .map_err(|error| SourceConfigError::invalid(name, error.key, error.expected, error.found))?;
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
            limits,
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
    body_timeout: Duration,
    intake: Intake,
}

impl Source for HttpSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(self: Box<Self>, out: RecordSender, stop: StopSignal) -> anyhow::Result<()> {
        let source = *self;
        let runtime = source_runtime()?;
        let metrics = source.metrics.clone();
        let shared = Arc::new(Shared {
            body_bytes_max: source.body_bytes_max,
            body_timeout: source.limits.body_timeout,
            intake: Intake::new(source.records, source.metrics, out, stop),
        });
        info!(source = %source.name, address = %source.local_address, limits = ?source.limits, "http source listening");
        runtime.block_on(async move {
            let listener = TcpListener::from_std(source.listener)?;
            let router = axum::Router::new()
                .route(RECORDS_PATH, post(accept_records))
                .fallback(unknown_path)
                .with_state(shared.clone());
            let shutdown = {
                let shared = shared.clone();
                async move { shared.intake.stopped().await }
            };
            let served = inference::http_server::serve(
                "records",
                listener,
                router,
                source.limits,
                metrics,
                shutdown,
                Duration::from_millis(SHUTDOWN_GRACE_MS),
            )
            .await;
            if let Err(error) = served {
                warn!(source = %source.name, %error, "http server failed");
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
    let body =
        match tokio::time::timeout(shared.body_timeout, axum::body::to_bytes(body, shared.body_bytes_max))
            .await
        {
            Ok(Ok(body)) => body,
            // Either the limit was hit or the client went away; only the former gets to read this.
            Ok(Err(_)) => return too_large(),
            Err(_) => {
                shared.intake.metrics.count_error(SourceErrorKind::BodyTimeout);
                let message = format!(
                    "request body not complete within {} ms; send it at once",
                    shared.body_timeout.as_millis()
                );
                let mut response = answer(StatusCode::REQUEST_TIMEOUT, json!({ "error": message }));
                // The rest of the body was not read: this connection cannot carry another request.
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                return response;
            }
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
