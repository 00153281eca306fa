//! zstd dictionaries for small records, and data that does not shrink (JPEG) stored raw.

mod common;

use common::json_builder;
use protocol::*;

const SENSOR_DICT_ID: u32 = 1;

/// A tiny deterministic generator (64-bit LCG), so the test data is the same on every run
/// without a random-number dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn bytes(&mut self, length: usize) -> Vec<u8> {
        (0..length).map(|_| self.next() as u8).collect()
    }
}

/// Synthetic JSON lines like a sensor lane carries.
fn sensor_lines(count: usize, seed: u64) -> Vec<String> {
    let mut random = Lcg(seed);
    let units = ["C", "hPa", "%RH", "lux"];
    let statuses = ["ok", "ok", "ok", "degraded", "calibrating"];
    (0..count)
        .map(|index| {
            let sensor = random.next() % 24;
            format!(
                "{{\"sensor\":\"env-{sensor:02}\",\"ts\":{},\"value\":{}.{:02},\"unit\":\"{}\",\
                 \"status\":\"{}\",\"site\":\"hall-b\"}}",
                1_700_000_000_000_000u64 + index as u64 * 250_000,
                random.next() % 1000,
                random.next() % 100,
                units[sensor as usize % units.len()],
                statuses[random.next() as usize % statuses.len()],
            )
        })
        .collect()
}

fn trained_dictionary(seed: u64) -> Vec<u8> {
    train_dictionary(&sensor_lines(1000, seed), 8 * 1024).expect("1000 samples are enough")
}

/// A sealed chunk of `lines` as records.
fn seal_lines(lines: &[String], compressor: &mut ChunkCompressor, dict_id: u32) -> SealedChunk {
    let records = lines.iter().enumerate().map(|(index, line)| (format!("env-{index:06}"), line.clone()));
    let mut builder = json_builder(64 * 1024, records);
    builder.seal(compressor, dict_id).expect("seals")
}

fn check_decompress(
    decompressor: &mut ChunkDecompressor,
    chunk: &SealedChunk,
    expected: Result<Vec<u8>, DecodeError>,
) {
    let bytes = chunk.encode(1);
    let (header, body) = decode_chunk(&bytes).expect("valid chunk");
    assert_eq!(decompressor.decompress(&header, body), expected);
}

#[test]
fn a_trained_dictionary_shrinks_small_chunks_and_is_required_to_read_them() {
    let dictionary = trained_dictionary(1);
    assert!(!dictionary.is_empty() && dictionary.len() <= 8 * 1024);
    let zstd_id =
        zstd::zstd_safe::get_dict_id_from_dict(&dictionary).expect("a trained dictionary has an id").get();

    let mut compressor = ChunkCompressor::new(3);
    compressor.add_dictionary(SENSOR_DICT_ID, &dictionary).expect("registers");
    // Fresh lines (another seed) in a small chunk, the case dictionaries are for.
    let lines = sensor_lines(8, 99);
    let with_dictionary = seal_lines(&lines, &mut compressor, SENSOR_DICT_ID);
    let without_dictionary = seal_lines(&lines, &mut compressor, NO_DICTIONARY);
    assert_eq!(with_dictionary.codec, Codec::Zstd);
    assert_eq!(with_dictionary.dict_id, SENSOR_DICT_ID);
    assert_eq!(with_dictionary.raw_len, without_dictionary.raw_len);
    assert!(
        // At least 10 % smaller; measured about 20 % on these 8 records (231 vs 288 bytes).
        with_dictionary.body.len() * 10 < without_dictionary.body.len() * 9,
        "with dictionary {} bytes, without {} bytes (raw {})",
        with_dictionary.body.len(),
        without_dictionary.body.len(),
        with_dictionary.raw_len
    );

    // With the dictionary registered: the records come back.
    let mut reader = ChunkDecompressor::new();
    reader.add_dictionary(SENSOR_DICT_ID, &dictionary).expect("registers");
    let bytes = with_dictionary.encode(1);
    let (header, body) = decode_chunk(&bytes).expect("valid chunk");
    let raw = reader.decompress(&header, body).expect("decompresses");
    let records = decode_records(&header, &raw).expect("valid records");
    let payloads: Vec<&[u8]> = records.iter().map(|record| record.payload).collect();
    let expected: Vec<&[u8]> = lines.iter().map(|line| line.as_bytes()).collect();
    assert_eq!(payloads, expected);
    // The chunk without a dictionary needs none.
    check_decompress(&mut ChunkDecompressor::new(), &without_dictionary, Ok(raw.clone()));

    // Without it registered: refused, naming the dictionary.
    check_decompress(
        &mut ChunkDecompressor::new(),
        &with_dictionary,
        Err(DecodeError::UnknownDictionary { dict_id: SENSOR_DICT_ID }),
    );

    // Another dictionary under the same id: refused before zstd tries, naming both ids.
    let mut confused = ChunkDecompressor::new();
    confused.add_dictionary(SENSOR_DICT_ID, b"a raw-content dictionary has no id").expect("registers");
    check_decompress(
        &mut confused,
        &with_dictionary,
        Err(DecodeError::DictionaryMismatch {
            dict_id: SENSOR_DICT_ID,
            registered_zstd_id: 0,
            frame_zstd_id: zstd_id,
        }),
    );
    let other = trained_dictionary(2);
    let other_id =
        zstd::zstd_safe::get_dict_id_from_dict(&other).expect("a trained dictionary has an id").get();
    if other_id != zstd_id {
        let mut confused = ChunkDecompressor::new();
        confused.add_dictionary(SENSOR_DICT_ID, &other).expect("registers");
        check_decompress(
            &mut confused,
            &with_dictionary,
            Err(DecodeError::DictionaryMismatch {
                dict_id: SENSOR_DICT_ID,
                registered_zstd_id: other_id,
                frame_zstd_id: zstd_id,
            }),
        );
    }
}

#[test]
fn jpeg_like_data_is_stored_raw() {
    // A JPEG's entropy-coded data looks random to zstd.
    let mut jpeg = vec![0xff, 0xd8, 0xff, 0xe0];
    jpeg.extend(Lcg(7).bytes(64 * 1024));
    jpeg.extend([0xff, 0xd9]);

    let mut compressor = ChunkCompressor::new(19);
    assert_eq!(compressor.compress(&jpeg, NO_DICTIONARY), Ok((Codec::Raw, jpeg.clone())));

    let mut builder = ChunkBuilder::new(Lane::Media, 256 * 1024);
    builder
        .push(RecordRef {
            key: "camera-02_000481",
            timestamp_us: 1_700_000_000_000_000,
            content_type: "image/jpeg",
            payload: &jpeg,
        })
        .expect("valid record");
    let chunk = builder.seal(&mut compressor, NO_DICTIONARY).expect("seals");
    assert_eq!(chunk.codec, Codec::Raw);
    assert_eq!(chunk.body.len(), chunk.raw_len as usize);
    let bytes = chunk.encode(3);
    let (header, body) = decode_chunk(&bytes).expect("valid chunk");
    let raw = ChunkDecompressor::new().decompress(&header, body).expect("raw bodies need no codec");
    assert_eq!(decode_records(&header, &raw).expect("valid")[0].payload, &jpeg[..]);
}

#[test]
fn sealing_with_an_unregistered_dictionary_keeps_the_records() {
    let mut compressor = ChunkCompressor::new(3);
    let mut builder = ChunkBuilder::new(Lane::Sensor, 1024);
    builder
        .push(RecordRef { key: "k", timestamp_us: 1, content_type: "application/json", payload: b"{}" })
        .expect("valid record");
    assert_eq!(
        builder.seal(&mut compressor, 5),
        Err(EncodeError::Compress {
            lane: Lane::Sensor,
            dict_id: 5,
            source: CodecError::UnknownDictionary { dict_id: 5 },
        })
    );
    assert_eq!(builder.record_count(), 1);
    assert!(builder.seal(&mut compressor, NO_DICTIONARY).is_ok());
}

#[test]
fn training_on_too_little_data_is_an_error() {
    let samples = [b"{}".as_slice(), b"{}".as_slice()];
    assert!(matches!(train_dictionary(&samples, 1024), Err(CodecError::Training { sample_count: 2, .. })));
}
