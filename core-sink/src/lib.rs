//! The core sink: receives chunks from many appliances over QUIC with mutual TLS, lands each
//! exactly once through a `Committer`, and acks only what is durable.
//!
//! Invariants:
//! - An Ack for (device, lane, seq) is sent only after the committer's fsync and the synced
//!   state transaction that records the watermark (`lander.rs`).
//! - A chunk at or below the landed watermark of its (device, lane) is dropped and counted.
//! - The device id comes from the verified certificate, never from the Hello.
//! - Chunks in flight between sessions and the lander are bounded by `in_flight_bytes_max`.

pub mod archive_feed;
mod components;
pub mod config;
pub mod datasets;
pub mod dictionaries;
pub mod lander;
pub mod metrics;
pub mod replication;
pub mod server;

/// The landing core (crate `landing`), re-exported where it used to live.
pub use ::landing;
pub use ::landing::state;
pub use config::SinkConfig;
pub use lander::SinkMetrics;
pub use server::{Sink, run_until_signal};
