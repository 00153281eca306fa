//! The appliance: the edge daemon. Today it holds the uplink (ring → QUIC → core sink); the
//! pipeline (sources, filters, chunker), inference API and onboarding join with their issues.
//!
//! Invariant: the uplink never blocks ingest: it only reads the ring and acks what the sink
//! reports durable.
//! Invariant: a chunk leaves the ring only through `Ring::ack` with a sink's durable watermark.

pub mod uplink;

pub use uplink::{Uplink, UplinkConfig, UplinkMetrics};
