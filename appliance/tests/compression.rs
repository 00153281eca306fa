//! Dictionary compression on the demo's own sensor records (the simulated dev kit's SHT3x and
//! accelerometer, read through the real drivers, as the `board` source formats them): on small,
//! time-bound chunks (≤ 4 KiB raw) the dictionary must at least 1.5× the ratio zstd reaches
//! without one at the same level; on full-size chunks it must not be worse.

use std::path::Path;
use std::time::Instant;

use appliance::SourceRecord;
use appliance::chunker::{Chunker, ChunkerConfig};
use appliance::dictionaries::DictionaryStore;
use board::board::Board;
use board::profile::Profile;
use protocol::Lane;

/// The demo's sensor records: the dev kit's sensors in the proportion of their periods.
fn demo_sensor_records(count: usize) -> Vec<SourceRecord> {
    let profile_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../board/profiles/sim-devkit.toml");
    let profile = Profile::load(&profile_path).unwrap();
    let mut board = Board::open(&profile).unwrap();
    let periods: Vec<u64> = board.sensors.iter().map(|sensor| u64::from(sensor.period_ms)).collect();
    let mut records = Vec::with_capacity(count);
    let mut tick_ms = 0u64;
    while records.len() < count {
        tick_ms += 1;
        for (sensor, period) in board.sensors.iter_mut().zip(&periods) {
            if !tick_ms.is_multiple_of(*period) {
                continue;
            }
            let Ok(reading) = sensor.sensor.read() else { continue };
            let Some(payload) = appliance::sources::reading_payload(&sensor.name, &reading) else { continue };
            records.push(SourceRecord {
                lane: Lane::Sensor,
                key: format!("devkit-sensors-{:020}", 1_700_000_000_000_000 + records.len() as u64),
                timestamp_us: 1_700_000_000_000_000 + tick_ms * 1_000,
                content_type: "application/json".into(),
                payload,
                tags: Default::default(),
            });
        }
    }
    records
}

/// Raw bytes / body bytes over the chunks sealed after the first `skip` records.
fn ratio(records: &[SourceRecord], chunk_raw_bytes: usize, dictionary: bool, skip: usize) -> f64 {
    ratio_with(records, ChunkerConfig { chunk_raw_bytes, dictionary, ..ChunkerConfig::default() }, skip)
}

fn ratio_with(records: &[SourceRecord], config: ChunkerConfig, skip: usize) -> f64 {
    let dictionary = config.dictionary;
    let directory = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(DictionaryStore::open(directory.path()).unwrap());
    let mut chunker = Chunker::new("devkit-sensors", Lane::Sensor, config, Some(store));
    let now = Instant::now();
    let (mut raw, mut body) = (0u64, 0u64);
    for (index, record) in records.iter().enumerate() {
        for chunk in chunker.push(record, now).unwrap() {
            if index >= skip {
                raw += u64::from(chunk.raw_len);
                body += chunk.body.len() as u64;
            }
        }
    }
    assert_eq!(chunker.dictionary_id() != protocol::NO_DICTIONARY, dictionary, "dictionary state");
    raw as f64 / body as f64
}

#[test]
fn dictionaries_pay_on_small_chunks_and_cost_nothing_on_large_ones() {
    let records = demo_sensor_records(40_000);
    // The chunker samples the default 4 000 records before training; compare after that.
    let skip = ChunkerConfig::default().dictionary_sample_records;
    // A time-bound chunk of a slow sensor: about ten readings (CHUNK_RAW_BYTES_MIN).
    let small_plain = ratio(&records, 1024, false, skip);
    let small_dictionary = ratio(&records, 1024, true, skip);
    // At the 4 KiB end of "small" the chunk's own repetition already helps zstd (recorded in
    // docs/benchmarks.md, not asserted).
    let four_kib = (ratio(&records, 4096, false, skip), ratio(&records, 4096, true, skip));
    let large_plain = ratio(&records, 128 * 1024, false, skip);
    let large_dictionary = ratio(&records, 128 * 1024, true, skip);
    println!(
        "1 KiB chunks: {small_plain:.2} plain, {small_dictionary:.2} with dictionary ({:.2}x); \
         4 KiB chunks: {:.2} plain, {:.2} with dictionary ({:.2}x); \
         128 KiB chunks: {large_plain:.2} plain, {large_dictionary:.2} with dictionary ({:.2}x)",
        small_dictionary / small_plain,
        four_kib.0,
        four_kib.1,
        four_kib.1 / four_kib.0,
        large_dictionary / large_plain
    );
    assert!(small_dictionary >= 1.5 * small_plain, "small: {small_dictionary:.2} vs {small_plain:.2}");
    assert!(four_kib.1 > four_kib.0, "4 KiB: {:.2} vs {:.2}", four_kib.1, four_kib.0);
    // Chunks over DICTIONARY_CHUNK_RAW_BYTES_MAX are compressed without it.
    assert!(large_dictionary >= large_plain, "large: {large_dictionary:.2} vs {large_plain:.2}");
}
