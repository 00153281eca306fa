//! On-disk layout of the ring and its byte accounting.
//!
//! The ring is one LMDB environment (a directory holding `data.mdb` and `lock.mdb`) with three
//! named databases:
//!
//! | database     | key                                 | value                                   |
//! |--------------|-------------------------------------|-----------------------------------------|
//! | `chunks`     | lane u8 ‖ seq u64 BE ‖ segment u16 BE (11) | segment of an encoded chunk (header ‖ body) |
//! | `meta`       | `format`                            | `tributary-ring/1`                      |
//! |              | `identity`                          | 16 random bytes, the ring's identity    |
//! |              | `lane/<id>` (6 bytes)               | `LaneMeta`, 64 bytes little-endian      |
//! |              | `evicted-records/<id>` (17 bytes)   | u64 LE, records in evicted chunks       |
//! | `quarantine` | lane u8 ‖ seq u64 BE ‖ 0u16         | first `QUARANTINE_SAMPLE_BYTES` of a bad chunk |
//!
//! `LaneMeta` (all u64 LE): next_seq, acked_through, bytes_used, chunk_count, evicted_chunks,
//! evicted_bytes, quarantined_chunks, rejected_chunks. It is written in the same write
//! transaction as the chunks it describes, so it can never disagree with them after a crash.
//! `evicted-records/<id>` (u64 LE, same transactions) counts the records in evicted chunks; it
//! has its own key so that a ring written by this version still opens with a build that
//! predates it (an A/B rollback), which ignores the key.
//!
//! `identity` names this ring to the core, so that the core can keep its seq watermarks per ring:
//! a ring that is recreated (factory reset, a damaged ring quarantined) starts again at seq 1
//! under a new identity instead of being taken for a duplicate of the old one. It is written at open when
//! missing (a new ring, or one written by a build that predates the key), replaced by
//! `Ring::renew_identity`, and fsynced before either returns. Like `evicted-records/<id>` it is a
//! key of its own: builds that predate it read `meta` by key and ignore it, so an A/B rollback
//! still opens the ring (and keeps the identity for the roll forward).
//!
//! Segments: an encoded chunk is stored as consecutive segments of at most `SEGMENT_BYTES_MAX`
//! (65 520 bytes: exactly 16 pages with LMDB's page header). LMDB stores each large value on a
//! contiguous run of overflow pages; with chunk sizes from 1 KiB to 4 MiB, freed runs of one size
//! rarely fit the next chunk and the file fragments until MAP_FULL (the known LMDB trap, seen in
//! this ring's soak test before segmenting). With segments, every large allocation is at most 16
//! pages and any freed full segment fits any new one.
//!
//! Accounting: a chunk costs `stored_bytes(encoded_len)`, its real footprint in LMDB pages — each
//! segment above `INLINE_VALUE_BYTES_MAX` lives on whole overflow pages; smaller ones are charged
//! twice their node size because leaf pages split half full.

use protocol::Lane;

pub const PAGE_BYTES: u64 = 4096;
/// LMDB's page header.
const PAGE_HEADER_BYTES: u64 = 16;
/// LMDB's leaf node header.
const NODE_HEADER_BYTES: u64 = 8;
pub const CHUNK_KEY_BYTES: usize = 11;
/// Largest segment: 16 pages of overflow minus LMDB's page header.
pub const SEGMENT_BYTES_MAX: usize = 16 * PAGE_BYTES as usize - PAGE_HEADER_BYTES as usize;
/// Largest node LMDB keeps on a leaf page with 4 KiB pages: (4096 - 16) / 2, even.
const INLINE_VALUE_BYTES_MAX: u64 =
    (PAGE_BYTES - PAGE_HEADER_BYTES) / 2 - NODE_HEADER_BYTES - CHUNK_KEY_BYTES as u64;

// Segment 0 holds the whole header, and a maximal chunk's segments are numbered by a u16.
const _: () = assert!(SEGMENT_BYTES_MAX > protocol::CHUNK_HEADER_LEN);
const _: () = assert!(protocol::CHUNK_ENCODED_BYTES_MAX / SEGMENT_BYTES_MAX < u16::MAX as usize);
// A full segment lives on overflow pages, never inline, so every segment but a chunk's last costs
// the same and freed full segments are interchangeable.
const _: () = assert!(INLINE_VALUE_BYTES_MAX < SEGMENT_BYTES_MAX as u64);

pub const FORMAT_KEY: &[u8] = b"format";
pub const FORMAT_VALUE: &str = "tributary-ring/1";
pub const FORMAT_PREFIX: &str = "tributary-ring/";
pub const IDENTITY_KEY: &[u8] = b"identity";
/// 128 random bits: two rings drawing the same identity is not a case worth handling.
pub const IDENTITY_BYTES: usize = 16;
pub const LANE_META_BYTES: usize = 64;
/// How much of a bad chunk is kept for forensics, and how many are kept (oldest dropped first).
pub const QUARANTINE_SAMPLE_BYTES: usize = 1024;
pub const QUARANTINE_ENTRIES_MAX: u64 = 64;

pub const CHUNKS_DATABASE: &str = "chunks";
pub const META_DATABASE: &str = "meta";
pub const QUARANTINE_DATABASE: &str = "quarantine";
pub const DATABASES_MAX: u32 = 3;

pub fn chunk_key(lane: Lane, seq: u64, segment: u16) -> [u8; CHUNK_KEY_BYTES] {
    let mut key = [0u8; CHUNK_KEY_BYTES];
    key[0] = lane.id();
    key[1..9].copy_from_slice(&seq.to_be_bytes());
    key[9..].copy_from_slice(&segment.to_be_bytes());
    key
}

/// Splits a chunk key into (lane id, seq, segment); `None` if it is not 11 bytes (a foreign or
/// damaged entry).
pub fn parse_chunk_key(key: &[u8]) -> Option<(u8, u64, u16)> {
    let key: &[u8; CHUNK_KEY_BYTES] = key.try_into().ok()?;
    let seq = u64::from_be_bytes(key[1..9].try_into().expect("8 bytes"));
    Some((key[0], seq, u16::from_be_bytes([key[9], key[10]])))
}

pub fn lane_meta_key(lane: Lane) -> [u8; 6] {
    let mut key = *b"lane/\0";
    key[5] = lane.id();
    key
}

pub fn lane_evicted_records_key(lane: Lane) -> [u8; 17] {
    let mut key = *b"evicted-records/\0";
    key[16] = lane.id();
    key
}

/// Bytes an encoded chunk of `encoded_len` really occupies in the LMDB file, all segments.
pub fn stored_bytes(encoded_len: usize) -> u64 {
    let full_segments = (encoded_len / SEGMENT_BYTES_MAX) as u64;
    let last = encoded_len % SEGMENT_BYTES_MAX;
    let last_cost = if last > 0 || full_segments == 0 { segment_stored_bytes(last) } else { 0 };
    let stored = full_segments * segment_stored_bytes(SEGMENT_BYTES_MAX) + last_cost;
    // Charging less than the bytes themselves would let the file outgrow the capacity.
    assert!(stored >= encoded_len as u64, "stored_bytes({encoded_len}) = {stored} undercounts");
    stored
}

/// Bytes one segment value of `value_len` occupies.
pub fn segment_stored_bytes(value_len: usize) -> u64 {
    let value_len = value_len as u64;
    if value_len > INLINE_VALUE_BYTES_MAX {
        let pages = (PAGE_HEADER_BYTES + value_len).div_ceil(PAGE_BYTES);
        // The leaf node that points at the overflow pages, charged as a small inline value.
        pages * PAGE_BYTES + 2 * (NODE_HEADER_BYTES + CHUNK_KEY_BYTES as u64 + 8)
    } else {
        2 * (NODE_HEADER_BYTES + CHUNK_KEY_BYTES as u64 + value_len)
    }
}

/// Per-lane state persisted in `meta`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaneMeta {
    /// The seq the next append gets; seqs start at 1 and never go backwards.
    pub next_seq: u64,
    /// Highest seq the core has acknowledged as durable; everything at or below is deleted.
    pub acked_through: u64,
    pub bytes_used: u64,
    pub chunk_count: u64,
    pub evicted_chunks: u64,
    pub evicted_bytes: u64,
    pub quarantined_chunks: u64,
    pub rejected_chunks: u64,
    /// Records in the evicted chunks; persisted under `lane_evicted_records_key`, not in the
    /// 64 bytes of `encode`.
    pub evicted_records: u64,
}

impl LaneMeta {
    pub fn new() -> LaneMeta {
        LaneMeta { next_seq: 1, ..LaneMeta::default() }
    }

    pub fn encode(&self) -> [u8; LANE_META_BYTES] {
        let fields = [
            self.next_seq,
            self.acked_through,
            self.bytes_used,
            self.chunk_count,
            self.evicted_chunks,
            self.evicted_bytes,
            self.quarantined_chunks,
            self.rejected_chunks,
        ];
        let mut out = [0u8; LANE_META_BYTES];
        for (slot, field) in out.chunks_exact_mut(8).zip(fields) {
            slot.copy_from_slice(&field.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<LaneMeta> {
        if bytes.len() != LANE_META_BYTES {
            return None;
        }
        let field =
            |index: usize| u64::from_le_bytes(bytes[index * 8..index * 8 + 8].try_into().expect("8 bytes"));
        let meta = LaneMeta {
            next_seq: field(0),
            acked_through: field(1),
            bytes_used: field(2),
            chunk_count: field(3),
            evicted_chunks: field(4),
            evicted_bytes: field(5),
            quarantined_chunks: field(6),
            rejected_chunks: field(7),
            evicted_records: 0,
        };
        (meta.next_seq >= 1 && meta.acked_through < meta.next_seq).then_some(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_bytes_counts_whole_overflow_pages() {
        let check = |value_len: usize, expected: u64| {
            assert_eq!(stored_bytes(value_len), expected, "value_len {value_len}")
        };
        check(0, 38);
        check(100, 238);
        check(INLINE_VALUE_BYTES_MAX as usize, 2 * (8 + 11 + INLINE_VALUE_BYTES_MAX));
        check(4096 - 16, 4096 + 54);
        check(4096 - 15, 8192 + 54);
        check(SEGMENT_BYTES_MAX, 16 * 4096 + 54);
        check(SEGMENT_BYTES_MAX + 1, 16 * 4096 + 54 + 2 * (8 + 11 + 1));
        check(1 << 20, 16 * (16 * 4096 + 54) + 2 * (8 + 11 + 256));
    }

    #[test]
    fn lane_meta_round_trips_and_rejects_impossible_values() {
        let meta = LaneMeta {
            next_seq: 9,
            acked_through: 4,
            bytes_used: 7,
            chunk_count: 3,
            evicted_chunks: 1,
            evicted_bytes: 2,
            quarantined_chunks: 5,
            rejected_chunks: 6,
            evicted_records: 0,
        };
        assert_eq!(LaneMeta::decode(&meta.encode()), Some(meta));
        assert_eq!(LaneMeta::decode(&meta.encode()[..63]), None);
        let backwards = LaneMeta { acked_through: 9, ..meta };
        assert_eq!(LaneMeta::decode(&backwards.encode()), None);
    }

    #[test]
    fn chunk_keys_sort_by_lane_then_seq() {
        assert!(chunk_key(Lane::Audit, u64::MAX, u16::MAX) < chunk_key(Lane::Decisions, 0, 0));
        assert!(chunk_key(Lane::Sensor, 255, 9) < chunk_key(Lane::Sensor, 256, 0));
        assert!(chunk_key(Lane::Sensor, 255, 1) < chunk_key(Lane::Sensor, 255, 2));
        assert_eq!(parse_chunk_key(&chunk_key(Lane::Media, 77, 3)), Some((3, 77, 3)));
        assert_eq!(parse_chunk_key(b"short"), None);
    }
}
