//! Evictions are logged once per lane and commit group, naming the seq range, chunks, records and
//! bytes; never once per chunk. Its own test binary: it installs a global log subscriber (the
//! writer logs from its own thread).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use buffer::layout::stored_bytes;
use buffer::{Durability, Ring, RingConfig};
use common::{MIB, body_bytes, open};
use protocol::{CHUNK_HEADER_LEN, Codec, Lane, SealedChunk};

/// Every formatted log line, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn eviction_lines(&self) -> Vec<String> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines().filter(|line| line.contains("evicted")).map(str::to_string).collect()
    }
}

fn media_chunk(tag: u64, len: usize, records: u32) -> SealedChunk {
    SealedChunk::new(Lane::Media, Codec::Raw, 0, records, len as u32, body_bytes(Lane::Media, tag, len))
        .unwrap()
}

#[test]
fn one_line_per_lane_and_commit_group_with_the_seq_range() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .init();

    let directory = tempfile::tempdir().unwrap();
    let mut config = RingConfig::with_capacity(8 * MIB);
    // Filling needs no fsync per append; eviction works the same in both modes.
    config.durability = Durability::Periodic { sync_interval_ms: 1_000 };
    let pool = config.pool_budget_bytes(Lane::Media);
    let ring: Ring = open(&directory.path().join("ring"), config);
    // Fill the shared pool with small media chunks of 3 records each, up to the last one that
    // fits without evicting.
    let small = 10_000;
    let small_cost = stored_bytes(CHUNK_HEADER_LEN + small);
    let mut appended = 0u64;
    while ring.stats().lane(Lane::Media).bytes_used + small_cost <= pool {
        ring.append(media_chunk(appended, small, 3)).unwrap();
        appended += 1;
    }
    assert!(captured.eviction_lines().is_empty(), "nothing was evicted while filling");

    // One large chunk needs the room of many small ones: one commit group evicts them all.
    let large = 200 * 1024;
    let needed = stored_bytes(CHUNK_HEADER_LEN + large);
    let seq = ring.append(media_chunk(1_000, large, 1)).unwrap();
    let media = ring.stats().lanes[Lane::Media.index()];
    let evicted = media.evicted_chunks;
    assert!(evicted >= needed / small_cost, "{evicted} chunks evicted to fit {needed} bytes");
    assert_eq!(seq, appended + 1);
    let lines = captured.eviction_lines();
    assert_eq!(lines.len(), 1, "one line for one group: {lines:#?}");
    let line = &lines[0];
    for field in [
        "lane=media".to_string(),
        "first_seq=1".to_string(),
        format!("last_seq={evicted}"),
        format!("chunks={evicted}"),
        format!("records={}", 3 * evicted),
        format!("bytes={}", media.evicted_bytes),
    ] {
        assert!(line.contains(&field), "{field} missing from {line}");
    }
    assert_eq!(media.evicted_records, 3 * evicted);
    assert_eq!(media.evicted_bytes, evicted * small_cost);
}
