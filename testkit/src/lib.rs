//! Helpers shared by the integration tests of the root package (`tests/support/harness.rs`) and
//! of `onboarding` (`onboarding/tests/support`), which used to carry a copy each. A
//! dev-dependency only: nothing that ships links it.

use std::net::SocketAddr;
use std::time::Duration;

use buffer::Ring;
use protocol::{ChunkBuilder, ChunkCompressor, Lane, RecordRef};

/// How often `wait_until` looks again.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// Polls `condition` every 20 ms until it holds or `limit` passes; returns whether it held.
pub async fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
    condition()
}

/// Logs of the code under test, at the level `TRIBUTARY_LOG` names (default `warn`), in the
/// test's output; a second call in the same test binary does nothing.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRIBUTARY_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A free UDP port on 127.0.0.1 (bound and released; the sink binds it right after).
pub fn free_udp_port() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr")
}

/// Appends JSON records (key, timestamp, payload) to `lane` in zstd chunks of about 64 KiB raw;
/// returns the seqs appended, in order.
pub fn append_json_records(
    ring: &Ring,
    lane: Lane,
    records: impl IntoIterator<Item = (String, u64, Vec<u8>)>,
) -> Vec<u64> {
    let mut compressor = ChunkCompressor::new(1);
    let mut builder = ChunkBuilder::new(lane, 64 * 1024);
    let mut seqs = Vec::new();
    for (key, timestamp_us, payload) in records {
        let record =
            RecordRef { key: &key, timestamp_us, content_type: "application/json", payload: &payload };
        builder.push(record).expect("valid record");
        if builder.is_full() {
            seqs.push(ring.append(builder.seal(&mut compressor, 0).expect("seal")).expect("append"));
        }
    }
    if !builder.is_empty() {
        seqs.push(ring.append(builder.seal(&mut compressor, 0).expect("seal")).expect("append"));
    }
    seqs
}
