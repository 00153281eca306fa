//! The appliance: the edge daemon. Pipeline per source: source → filters → chunker → ring →
//! uplink (ring → QUIC → core sink).
//!
//! Invariant: the uplink never blocks ingest: it only reads the ring and acks what the sink
//! reports durable.
//! Invariant: a chunk leaves the ring only through `Ring::ack` with a sink's durable watermark.

pub mod chunker;
mod components;
pub mod config;
pub mod daemon;
pub mod dictionaries;
pub mod filters;
pub mod lag;
pub mod metrics;
pub mod pipeline;
pub mod source;
pub mod sources;
pub mod uplink;

pub use source::{RecordSender, Source, SourceRecord, StopSignal};
pub use uplink::{Uplink, UplinkConfig, UplinkMetrics};
