//! The inference HTTP API (axum), served by the appliance daemon.
//!
//! ```text
//! POST /v1/infer[?model=NAME]     body: image/jpeg | image/png | application/x-tensor-f32 |
//!                                 application/json tensor (see `input`); optional header
//!                                 x-request-id (<= 256 bytes), stored with the evidence
//!   200 {"decision_id","label","label_index","score","scores","model_name","model_sha256","latency_us"}
//!       only after the evidence record is durable on the audit lane
//!   400 not_an_image | malformed_tensor | shape_mismatch | bad_request
//!   404 unknown_model        408 body_timeout          415 unsupported_media_type
//!   413 body_too_large (over min(body_bytes_max, what the model can need))
//!       | image_too_large (the image's header declares more pixels than the model's bound)
//!   503 audit_full | evidence_queue_full | ring_failed, with Retry-After; nothing was decided
//!   500 internal_error (the model failed at run time)
//! GET /v1/decisions/{id}
//!   200 the recorded decision (while its evidence is still in the ring), 404 unknown_decision
//! ```
//!
//! Every error body is `{"error": "<reason>", "message": "<what and what to do>"}`. The client
//! address in the evidence comes from `ConnectInfo<SocketAddr>` in the request's extensions (as
//! [`serve`] puts it there), else "unknown".
//!
//! Limits: [`serve`] runs the router on `http_server::serve` with the service's `http` limits
//! (connection cap and queue, header, body and idle timeouts; refusals get 503
//! `too_many_connections`); a body must arrive within `body_timeout` (else 408); at most
//! `decodes_max` inputs are decoded and run at once on blocking threads, the rest wait for a slot
//! (counted in `decodes_waited_total`) holding only their bounded body.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Json;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use protocol::evidence::{
    Blob, BlobSummary, Decision, DecisionSummary, EVIDENCE_FIELD_BYTES_MAX, Evidence, RequestMeta,
};
use serde::{Deserialize, Serialize};

use crate::input::{InputError, InputKind, TENSOR_CONTENT_TYPE, body_bytes_max_for_model, prepare_within};
use crate::ledger::{CommitError, PendingEvidence, record_bytes};
use crate::metrics::{RejectReason, UnavailableReason};
use crate::model::Classification;
use crate::service::{EvidenceMode, InferenceService};
use crate::state::now_us;

/// Header carrying the caller's own request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The routes, with the service as state. Mount with `Router::merge`.
pub fn router(service: Arc<InferenceService>) -> axum::Router {
    axum::Router::new()
        .route("/v1/infer", post(infer))
        .route("/v1/decisions/{decision_id}", get(decision))
        .with_state(service)
}

/// Serves [`router`] on `listener` (with client addresses) within the service's `http` limits
/// until `shutdown` completes; requests in progress then get `SHUTDOWN_GRACE_MS` to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<InferenceService>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = service.config.http;
    let observer = service.metrics.clone();
    crate::http_server::serve(
        "inference",
        listener,
        router(service),
        limits,
        observer,
        shutdown,
        std::time::Duration::from_millis(crate::service::SHUTDOWN_GRACE_MS),
    )
    .await
}

/// The answer to a decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferResponse {
    pub decision_id: String,
    pub label: String,
    pub label_index: u32,
    pub score: f32,
    pub scores: Vec<f32>,
    pub model_name: String,
    /// Lower-case hex.
    pub model_sha256: String,
    /// Pre-processing and inference, microseconds (not the evidence write).
    pub latency_us: u64,
}

/// `GET /v1/decisions/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedDecision {
    /// The decision's fields inline (the schema the archive's leaves use too).
    #[serde(flatten)]
    pub decision: DecisionSummary,
    /// The evidence blobs, described (the bytes themselves stay in the ring).
    pub original: BlobSummary,
    pub modified: Option<BlobSummary>,
    /// The audit-lane chunk holding the evidence.
    pub audit_seq: u64,
}

/// An error body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

/// Counts a decode in `decodes_in_progress` while it lives (on the blocking thread).
struct DecodeInProgress(Arc<crate::metrics::InferenceMetrics>);

impl DecodeInProgress {
    fn start(metrics: Arc<crate::metrics::InferenceMetrics>) -> DecodeInProgress {
        let now = metrics.decodes_in_progress.fetch_add(1, Ordering::Relaxed) + 1;
        metrics.decodes_in_progress_peak.fetch_max(now, Ordering::Relaxed);
        DecodeInProgress(metrics)
    }
}

impl Drop for DecodeInProgress {
    fn drop(&mut self) {
        self.0.decodes_in_progress.fetch_sub(1, Ordering::Relaxed);
    }
}

struct ApiError {
    status: StatusCode,
    reason: &'static str,
    message: String,
    retry_after_seconds: Option<u32>,
    /// Answer with `connection: close` (the rest of the request was not read).
    close: bool,
}

impl ApiError {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, reason, message: message.into(), retry_after_seconds: None, close: false }
    }

    fn rejected(
        service: &InferenceService,
        reason: RejectReason,
        status: StatusCode,
        message: impl Into<String>,
    ) -> ApiError {
        service.metrics.reject(reason);
        ApiError::new(status, reason.name(), message)
    }

    fn input(service: &InferenceService, error: InputError) -> ApiError {
        let (reason, status) = match &error {
            InputError::UnsupportedMediaType { .. } => {
                (RejectReason::UnsupportedMediaType, StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            InputError::NotAnImage { .. } | InputError::ImagesNotAccepted { .. } => {
                (RejectReason::NotAnImage, StatusCode::BAD_REQUEST)
            }
            InputError::ImageTooLarge { .. } => (RejectReason::ImageTooLarge, StatusCode::PAYLOAD_TOO_LARGE),
            InputError::MalformedTensor(_) => (RejectReason::MalformedTensor, StatusCode::BAD_REQUEST),
            InputError::ShapeMismatch { .. } => (RejectReason::ShapeMismatch, StatusCode::BAD_REQUEST),
        };
        ApiError::rejected(service, reason, status, error.to_string())
    }

    fn unavailable(service: &InferenceService, error: CommitError) -> ApiError {
        let reason = match error {
            CommitError::AuditFull { .. } => UnavailableReason::AuditFull,
            CommitError::QueueFull { .. } => UnavailableReason::QueueFull,
            CommitError::Ring(_) => UnavailableReason::RingFailed,
        };
        service.metrics.unavailable(reason);
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: reason.name(),
            message: error.to_string(),
            retry_after_seconds: Some(service.config.retry_after_seconds),
            close: false,
        }
    }

    fn internal(service: &InferenceService, message: String) -> ApiError {
        service.metrics.internal_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%message, "inference request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, Json(ErrorBody { error: self.reason.to_string(), message: self.message }))
                .into_response();
        if let Some(seconds) = self.retry_after_seconds {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.close {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[derive(Deserialize)]
struct InferParams {
    model: Option<String>,
}

async fn infer(State(service): State<Arc<InferenceService>>, request: Request) -> Response {
    service.metrics.requests.fetch_add(1, Ordering::Relaxed);
    match infer_inner(&service, request).await {
        Ok(answer) => {
            service.metrics.decisions.fetch_add(1, Ordering::Relaxed);
            Json(answer).into_response()
        }
        Err(error) => error.into_response(),
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

async fn infer_inner(service: &Arc<InferenceService>, request: Request) -> Result<InferResponse, ApiError> {
    let (parts, body) = request.into_parts();
    let bad_request = |message: String| {
        ApiError::rejected(service, RejectReason::BadRequest, StatusCode::BAD_REQUEST, message)
    };
    let Query(params) = Query::<InferParams>::try_from_uri(&parts.uri)
        .map_err(|error| bad_request(format!("query string does not parse: {error}")))?;
    let client = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |ConnectInfo(address)| address.to_string());
    let request_id = match parts.headers.get(REQUEST_ID_HEADER) {
        None => None,
        Some(value) => {
            let text = value
                .to_str()
                .map_err(|_| bad_request(format!("{REQUEST_ID_HEADER} is not visible ASCII")))?;
            if text.len() > EVIDENCE_FIELD_BYTES_MAX {
                return Err(bad_request(format!(
                    "{REQUEST_ID_HEADER} of {} bytes exceeds {EVIDENCE_FIELD_BYTES_MAX}",
                    text.len()
                )));
            }
            Some(text.to_string())
        }
    };
    let kind = InputKind::from_content_type(header_text(&parts.headers, "content-type").unwrap_or(""))
        .map_err(|error| ApiError::input(service, error))?;
    let models = service.models();
    let model = models
        .get(params.model.as_deref())
        .map_err(|message| {
            ApiError::rejected(service, RejectReason::UnknownModel, StatusCode::NOT_FOUND, message)
        })?
        .clone();
    // Bound by what this model can need, so a small model's API does not buffer a large body.
    let body_bytes_max = service
        .config
        .body_bytes_max
        .min(body_bytes_max_for_model(model.input_shape(), service.config.image_scale_max));
    let too_large = |length: String| {
        ApiError::rejected(
            service,
            RejectReason::BodyTooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body of {length} bytes exceeds the limit of {body_bytes_max} bytes"),
        )
    };
    // Refuse early on the declared length, so the body is not even read.
    if let Some(length) =
        header_text(&parts.headers, "content-length").and_then(|text| text.parse::<u64>().ok())
        && length > body_bytes_max as u64
    {
        return Err(too_large(length.to_string()));
    }
    let body_timeout = service.config.http.body_timeout;
    let collected = tokio::time::timeout(body_timeout, Limited::new(body, body_bytes_max).collect()).await;
    let original = match collected {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(too_large(format!("more than {body_bytes_max}")));
        }
        Ok(Err(error)) => return Err(bad_request(format!("body could not be read: {error}"))),
        Err(_) => {
            let mut error = ApiError::rejected(
                service,
                RejectReason::BodyTimeout,
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within {} ms (body_timeout_ms); send it at once",
                    body_timeout.as_millis()
                ),
            );
            error.close = true;
            return Err(error);
        }
    };

    // Decoding takes milliseconds: keep it off the async workers, and at most `decodes_max` at
    // once so a burst of requests cannot take every blocking thread and the memory they decode
    // into. Waiting requests hold only their (bounded) body.
    let decode_slot = match service.decodes.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            service.metrics.decodes_waited.fetch_add(1, Ordering::Relaxed);
            service
                .decodes
                .clone()
                .acquire_owned()
                .await
                .map_err(|error| ApiError::internal(service, format!("decode slots closed: {error}")))?
        }
    };
    let in_progress = DecodeInProgress::start(service.metrics.clone());
    let worker_model = model.clone();
    let worker_original = original.clone();
    let image_scale_max = service.config.image_scale_max;
    let prepared = tokio::task::spawn_blocking(move || {
        let _slot = decode_slot;
        let _in_progress = in_progress;
        let started = Instant::now();
        let (tensor, modified) = prepare_within(
            kind,
            &worker_original,
            worker_model.name(),
            worker_model.input_shape(),
            worker_model.normalisation(),
            image_scale_max,
        )
        .map_err(Ok)?;
        let classification = worker_model.classify(&tensor).map_err(Err)?;
        let latency_us = started.elapsed().as_micros() as u64;
        Ok::<_, Result<InputError, crate::model::ModelError>>((
            modified.then(|| tensor.encode()),
            classification,
            latency_us,
        ))
    })
    .await
    .map_err(|error| ApiError::internal(service, format!("inference task failed: {error}")))?;
    let (modified, classification, latency_us) = match prepared {
        Ok(prepared) => prepared,
        Err(Ok(input_error)) => return Err(ApiError::input(service, input_error)),
        Err(Err(model_error)) => return Err(ApiError::internal(service, model_error.to_string())),
    };
    let Classification { label, label_index, score, scores } = classification;
    let decision_id = service.ids.next();
    let decided_at_us = now_us();
    let answer = InferResponse {
        decision_id: decision_id.clone(),
        label: label.clone(),
        label_index,
        score,
        scores: scores.clone(),
        model_name: model.name().to_string(),
        model_sha256: model.sha256_hex(),
        latency_us,
    };
    if service.config.evidence == EvidenceMode::UnrecordedForBenchmark {
        return Ok(answer);
    }
    let evidence = Evidence {
        decision: Decision {
            decision_id: decision_id.clone(),
            decided_at_us,
            model_name: model.name().to_string(),
            model_sha256: *model.sha256(),
            label,
            label_index,
            score,
            scores,
            latency_us,
            request: RequestMeta { client, request_id },
        },
        original: Blob::new(kind.content_type(), original.to_vec()),
        modified: modified.map(|bytes| Blob::new(TENSOR_CONTENT_TYPE, bytes)),
    };
    let payload = evidence
        .encode()
        .map_err(|error| ApiError::internal(service, format!("evidence refused: {error}")))?;
    let chunk_bytes_max = service.ledger.limits().chunk_raw_bytes_max;
    let evidence_bytes = record_bytes(&decision_id, protocol::evidence::EVIDENCE_CONTENT_TYPE, payload.len());
    if evidence_bytes > chunk_bytes_max {
        return Err(too_large(format!(
            "{} (its evidence takes {evidence_bytes} bytes, one audit chunk holds {chunk_bytes_max}); it is",
            original.len()
        )));
    }
    let pending = PendingEvidence { decision_id, decided_at_us, payload, model };
    service.ledger.commit(pending).await.map_err(|error| ApiError::unavailable(service, error))?;
    Ok(answer)
}

async fn decision(State(service): State<Arc<InferenceService>>, Path(decision_id): Path<String>) -> Response {
    if let Err(error) = protocol::validate_key(&decision_id) {
        return ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("not a decision id: {error}"))
            .into_response();
    }
    let lookup_service = service.clone();
    let lookup_id = decision_id.clone();
    let found = tokio::task::spawn_blocking(move || lookup_service.ledger.find_blocking(&lookup_id)).await;
    match found {
        Ok(Ok(Some((audit_seq, evidence)))) => {
            let Evidence { decision, original, modified } = evidence;
            Json(RecordedDecision {
                decision: DecisionSummary::of(&decision),
                original: BlobSummary::of(&original),
                modified: modified.as_ref().map(BlobSummary::of),
                audit_seq,
            })
            .into_response()
        }
        Ok(Ok(None)) => ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_decision",
            format!(
                "decision {decision_id} is not in this appliance's ring: it was never made here, or the core \
                 has acknowledged its evidence and it was removed (ask the core archive)"
            ),
        )
        .into_response(),
        Ok(Err(error)) => {
            ApiError::internal(&service, format!("reading the audit lane failed: {error}")).into_response()
        }
        Err(error) => ApiError::internal(&service, format!("lookup task failed: {error}")).into_response(),
    }
}
