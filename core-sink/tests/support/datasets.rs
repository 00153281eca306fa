//! Landing records for the dataset pipeline's tests, and checking what came out.

#![allow(dead_code)] // each test binary uses its own part

use std::collections::BTreeMap;
use std::path::Path;

use core_sink::dictionaries::DictionaryStore;
use core_sink::landing::{Committer, RawLanding};
use protocol::{ChunkBuilder, ChunkCompressor, Lane, RecordRef};

pub const MIB: u64 = 1024 * 1024;

/// Lands `count` sensor records and `count / 10` media records for `device`, starting at `first`,
/// commits, and returns the checkpoint.
pub fn land(
    landing: &mut RawLanding,
    device: &str,
    first: u64,
    count: u64,
    seqs: &mut BTreeMap<Lane, u64>,
) -> Vec<u8> {
    let mut compressor = ChunkCompressor::new(1);
    for (lane, records, payload_bytes) in
        [(Lane::Sensor, count, 300usize), (Lane::Media, count / 10, 40_000usize)]
    {
        let mut builder = ChunkBuilder::new(lane, 128 * 1024);
        let mut seal = |builder: &mut ChunkBuilder, landing: &mut RawLanding| {
            let seq = seqs.entry(lane).or_insert(0);
            *seq += 1;
            let chunk = if lane == Lane::Media {
                builder.seal_raw()
            } else {
                builder.seal(&mut compressor, 0).unwrap()
            };
            let encoded = chunk.encode(*seq);
            let (header, _) = protocol::decode_chunk(&encoded).unwrap();
            landing.land(device, &header, &encoded).unwrap();
        };
        for index in first..first + records {
            let key = format!("{}-{index:08}", lane.name());
            let payload: Vec<u8> = (0..payload_bytes).map(|i| (i as u64 * 31 + index) as u8).collect();
            let content_type = if lane == Lane::Media { "image/jpeg" } else { "application/json" };
            builder
                .push(RecordRef { key: &key, timestamp_us: index, content_type, payload: &payload })
                .unwrap();
            if builder.is_full() {
                seal(&mut builder, landing);
            }
        }
        if !builder.is_empty() {
            seal(&mut builder, landing);
        }
    }
    landing.commit().unwrap();
    landing.checkpoint()
}

/// Compares key counts and reports only what differs, so a failure stays readable.
pub fn assert_exactly_once(actual: &BTreeMap<String, usize>, expected: &BTreeMap<String, usize>) {
    let missing: Vec<&String> = expected.keys().filter(|key| !actual.contains_key(*key)).collect();
    let twice: Vec<(&String, &usize)> = actual.iter().filter(|(_, count)| **count > 1).collect();
    let extra: Vec<&String> = actual.keys().filter(|key| !expected.contains_key(*key)).collect();
    assert!(
        missing.is_empty() && twice.is_empty() && extra.is_empty(),
        "{} missing (first {:?}), {} more than once (first {:?}), {} unexpected (first {:?})",
        missing.len(),
        missing.first(),
        twice.len(),
        twice.first(),
        extra.len(),
        extra.first()
    );
}

/// An empty raw landing under `base`.
pub fn new_landing(base: &Path) -> (std::path::PathBuf, RawLanding) {
    let landing_dir = base.join("landing");
    let mut landing = RawLanding::new(&landing_dir, 64 * MIB);
    landing.recover(None).unwrap();
    (landing_dir, landing)
}

pub fn dictionaries(base: &Path) -> std::sync::Arc<DictionaryStore> {
    std::sync::Arc::new(DictionaryStore::open(&base.join("dictionaries")).unwrap())
}

/// The keys `land` writes for batches starting at each of `firsts`, `count` records each.
pub fn expected_keys(firsts: &[u64], count: u64) -> BTreeMap<String, usize> {
    let mut keys = BTreeMap::new();
    for first in firsts {
        for index in *first..first + count {
            keys.insert(format!("sensor-{index:08}"), 1);
        }
        for index in *first..first + count / 10 {
            keys.insert(format!("media-{index:08}"), 1);
        }
    }
    keys
}
