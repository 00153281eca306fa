//! Dictionary compression on the demo's own sensor records (the simulated dev kit's SHT3x and
//! accelerometer, read through the real drivers, as the `board` source formats them): on small,
//! time-bound chunks (≤ 4 KiB raw) the dictionary should reach at least 1.5× the ratio zstd
//! reaches without one at the same level, and on full-size chunks it must not be worse. 1.5× holds
//! at 1 and 2 KiB; at 4 KiB it is out of reach (see the test and docs/benchmarks.md).

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

/// One row of the measurement: a chunk size and the ratios without and with the dictionary.
struct Row {
    chunk_raw_bytes: usize,
    plain: f64,
    dictionary: f64,
}

impl Row {
    fn gain(&self) -> f64 {
        self.dictionary / self.plain
    }
}

/// Measures every chunk size with the chunker's defaults but for `dictionary_bytes`, and prints
/// the table recorded in docs/benchmarks.md.
fn measure(records: &[SourceRecord], dictionary_bytes: usize) -> Vec<Row> {
    let defaults = ChunkerConfig { dictionary_bytes, ..ChunkerConfig::default() };
    // The chunker samples the first records before training; compare after that.
    let skip = defaults.dictionary_sample_records;
    let rows: Vec<Row> = [1024, 2048, 4096, 16 * 1024, 128 * 1024]
        .into_iter()
        .map(|chunk_raw_bytes| {
            let config = |dictionary| ChunkerConfig { chunk_raw_bytes, dictionary, ..defaults.clone() };
            Row {
                chunk_raw_bytes,
                plain: ratio_with(records, config(false), skip),
                dictionary: ratio_with(records, config(true), skip),
            }
        })
        .collect();
    println!("dictionary_bytes = {dictionary_bytes}");
    println!("| chunk size | without dictionary | with dictionary | gain |");
    for row in &rows {
        println!(
            "| {} KiB | {:.2} | {:.2} | {:.2}x |",
            row.chunk_raw_bytes / 1024,
            row.plain,
            row.dictionary,
            row.gain()
        );
    }
    rows
}

#[test]
fn dictionaries_pay_on_small_chunks_and_cost_nothing_on_large_ones() {
    let records = demo_sensor_records(40_000);
    // The previous default dictionary size, for the record in docs/benchmarks.md.
    measure(&records, 16 * 1024);
    let rows = measure(&records, ChunkerConfig::default().dictionary_bytes);
    let gain = |chunk_raw_bytes: usize| {
        let row = rows.iter().find(|row| row.chunk_raw_bytes == chunk_raw_bytes).expect("measured");
        (row.gain(), row.plain, row.dictionary)
    };
    // Time-bound chunks of a slow sensor (CHUNK_RAW_BYTES_MIN is about ten readings).
    for chunk_raw_bytes in [1024, 2048] {
        let (gain, plain, dictionary) = gain(chunk_raw_bytes);
        assert!(gain >= 1.5, "{chunk_raw_bytes} B: {dictionary:.2} vs {plain:.2} ({gain:.2}x)");
    }
    // The issue asks 1.5x at 4 KiB too; that is out of reach at zstd level 3 (it would take
    // 4 KiB chunks compressing better than 128 KiB chunks do without a dictionary; even level 19
    // reaches 1.47x; docs/benchmarks.md). Asserted is what the chunker achieves, with margin.
    let (four_kib, plain, dictionary) = gain(4096);
    assert!(four_kib >= 1.25, "4 KiB: {dictionary:.2} vs {plain:.2} ({four_kib:.2}x)");
    let (sixteen_kib, plain, dictionary) = gain(16 * 1024);
    assert!(sixteen_kib > 1.0, "16 KiB: {dictionary:.2} vs {plain:.2} ({sixteen_kib:.2}x)");
    // Chunks over DICTIONARY_CHUNK_RAW_BYTES_MAX are compressed without it: never worse.
    let (large, plain, dictionary) = gain(128 * 1024);
    assert!(large >= 1.0, "128 KiB: {dictionary:.2} vs {plain:.2} ({large:.2}x)");
}
