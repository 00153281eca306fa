//! Local inference with evidence, on the appliance.
//!
//! A request comes in over HTTP (`api`): an image or a tensor (`input`). The named model
//! (`model`: ONNX run by tract, with a sidecar JSON) decides; the decision, the input exactly as
//! received and what the model actually saw are appended as one evidence record to the ring's
//! audit lane (`ledger`, group-committed across concurrent requests) and only then is the
//! decision answered. The audit lane is never evicted: when it is full the API answers 503
//! until the core acknowledges what it holds.
//!
//! Code map: `input` (content types, tensor wire format, image pre-processing), `model`
//! (loading, running), `ledger` (the evidence writer and lookups), `state` (decision ids and
//! model-record markers that survive restarts), `service` (config, hot-swappable models),
//! `api` (the axum router), `http_server` (the server loop with connection limits and timeouts,
//! shared with the appliance's `/v1/records` source), `metrics` (atomics), `synthetic` (the test images, twin of
//! `models/train_classifier.py`), `client` (loopback client for tests and the benchmark).
//!
//! Invariant: a decision is answered only after its evidence is durable on the audit lane
//! (committed, and fsynced or followed by `Ring::sync`); the one exception is
//! `EvidenceMode::UnrecordedForBenchmark`, which the benchmark uses to measure that cost.
//! Invariant: each model version's record is appended before the first evidence naming it.

pub mod api;
pub mod client;
pub mod http_server;
pub mod input;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod service;
pub mod state;
pub mod synthetic;

#[cfg(feature = "bench")]
pub mod bench;
pub use api::{InferResponse, RecordedDecision, router, serve};
pub use input::{InputError, InputKind, InputTensor, Normalisation, TENSOR_CONTENT_TYPE};
pub use metrics::{InferenceMetrics, MetricsSnapshot};
pub use model::{Classification, Model, ModelError, ModelSpec};
pub use service::{EvidenceMode, InferenceConfig, InferenceService, ModelSource, ServiceError};
