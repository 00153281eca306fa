//! QUIC transport settings shared by the appliance and the sink, named in config instead of
//! relying on quinn's defaults (tuned for ~100 Mbit/s × 100 ms).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// Congestion controllers quinn offers.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Congestion {
    Cubic,
    NewReno,
    Bbr,
}

/// Defaults are sized for a 1 Gbit/s × 20 ms edge link (bandwidth-delay product 2.5 MB): the
/// stream window holds one such product so one lane can fill the link, the connection window two,
/// and the send window four so a burst after an outage does not stall on acknowledgements.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSettings {
    pub stream_receive_window_bytes: u32,
    pub receive_window_bytes: u32,
    pub send_window_bytes: u64,
    /// A silent peer is declared gone after this long; keep-alives keep a quiet link open.
    pub idle_timeout_ms: u32,
    pub keep_alive_ms: u32,
    pub congestion: Congestion,
    /// Unidirectional streams a peer may open at once: one per lane, with room for a reconnect.
    pub uni_streams_max: u32,
}

impl Default for TransportSettings {
    fn default() -> TransportSettings {
        TransportSettings {
            stream_receive_window_bytes: 4 * 1024 * 1024,
            receive_window_bytes: 8 * 1024 * 1024,
            send_window_bytes: 16 * 1024 * 1024,
            idle_timeout_ms: 10_000,
            keep_alive_ms: 2_000,
            congestion: Congestion::Cubic,
            uni_streams_max: 8,
        }
    }
}

impl TransportSettings {
    /// Checks relations between the settings; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.keep_alive_ms == 0 || self.keep_alive_ms >= self.idle_timeout_ms {
            return Err(format!(
                "transport.keep_alive_ms ({}) must be above 0 and below transport.idle_timeout_ms ({})",
                self.keep_alive_ms, self.idle_timeout_ms
            ));
        }
        if self.stream_receive_window_bytes < 64 * 1024
            || self.receive_window_bytes < self.stream_receive_window_bytes
        {
            return Err(format!(
                "transport.stream_receive_window_bytes ({}) must be at least 65536 and at most \
                 transport.receive_window_bytes ({})",
                self.stream_receive_window_bytes, self.receive_window_bytes
            ));
        }
        if self.uni_streams_max < 4 || self.uni_streams_max > 64 {
            return Err(format!(
                "transport.uni_streams_max ({}) must be within 4..=64",
                self.uni_streams_max
            ));
        }
        Ok(())
    }

    pub fn to_quinn(&self) -> Arc<quinn::TransportConfig> {
        let mut transport = quinn::TransportConfig::default();
        transport
            .stream_receive_window(quinn::VarInt::from_u32(self.stream_receive_window_bytes))
            .receive_window(quinn::VarInt::from_u32(self.receive_window_bytes))
            .send_window(self.send_window_bytes)
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(Duration::from_millis(u64::from(self.idle_timeout_ms)))
                    .expect("idle timeout within QUIC's range"),
            ))
            .keep_alive_interval(Some(Duration::from_millis(u64::from(self.keep_alive_ms))))
            .max_concurrent_uni_streams(quinn::VarInt::from_u32(self.uni_streams_max))
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
        match self.congestion {
            Congestion::Cubic => {
                transport.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            Congestion::NewReno => {
                transport.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
            }
            Congestion::Bbr => {
                transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
        };
        Arc::new(transport)
    }
}
