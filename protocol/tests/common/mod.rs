//! Helpers shared by the integration tests: proptest strategies for valid values, and a way to
//! hand-make header bytes that break one rule while keeping a correct header CRC (so the rule,
//! not the CRC, is what the decoder trips on).

#![allow(dead_code, reason = "each test binary uses a different subset")]

use proptest::collection::vec;
use proptest::prelude::*;
use protocol::{
    CHUNK_HEADER_LEN, CHUNK_RECORDS_MAX, ChunkBuilder, ChunkHeader, Codec, ControlMessage, Lane, Record,
    RecordRef,
};

pub const HEADER_CRC_OFFSET: usize = 36;

/// A sensor-lane builder (at most `raw_bytes_max` raw bytes) holding JSON records, each
/// `(key, payload)`, the record at index `i` stamped `1_700_000_000_000_000 + i` µs.
pub fn json_builder(
    raw_bytes_max: usize,
    records: impl IntoIterator<Item = (String, String)>,
) -> ChunkBuilder {
    let mut builder = ChunkBuilder::new(Lane::Sensor, raw_bytes_max);
    for (index, (key, payload)) in records.into_iter().enumerate() {
        builder
            .push(RecordRef {
                key: &key,
                timestamp_us: 1_700_000_000_000_000 + index as u64,
                content_type: "application/json",
                payload: payload.as_bytes(),
            })
            .expect("valid record");
    }
    builder
}

/// A valid header to start hand-made cases from.
pub fn sample_header() -> ChunkHeader {
    ChunkHeader {
        lane: Lane::Sensor,
        codec: Codec::Zstd,
        seq: 9,
        record_count: 3,
        raw_len: 300,
        body_len: 4,
        dict_id: 0,
        body_crc32c: crc32c::crc32c(b"body"),
    }
}

/// Recomputes the header CRC over bytes 0..36 after a test edited them.
pub fn reseal_header(bytes: &mut [u8]) {
    let crc = crc32c::crc32c(&bytes[..HEADER_CRC_OFFSET]);
    bytes[HEADER_CRC_OFFSET..CHUNK_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
}

/// The sample header's bytes with `edit` applied and the CRC fixed up.
pub fn header_bytes_with(edit: impl FnOnce(&mut [u8; CHUNK_HEADER_LEN])) -> Vec<u8> {
    let mut bytes = sample_header().encode();
    edit(&mut bytes);
    reseal_header(&mut bytes);
    bytes.to_vec()
}

/// Writes a little-endian u32 at `offset`.
pub fn put_u32(bytes: &mut [u8], offset: usize, value: u32) {
    bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

pub fn lane() -> impl Strategy<Value = Lane> {
    proptest::sample::select(Lane::ALL.to_vec())
}

pub fn codec() -> impl Strategy<Value = Codec> {
    proptest::sample::select(Codec::ALL.to_vec())
}

/// Any header that obeys the rules.
pub fn valid_header() -> impl Strategy<Value = ChunkHeader> {
    (
        lane(),
        codec(),
        1..=u64::MAX,
        0..=CHUNK_RECORDS_MAX,
        0..=protocol::CHUNK_RAW_BYTES_MAX as u32,
        0..=protocol::CHUNK_BODY_BYTES_MAX as u32,
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(lane, codec, seq, record_count, raw_len, body_len, dict_id, body_crc32c)| {
            let raw_len = if record_count == 0 { 0 } else { raw_len };
            let body_len = if codec == Codec::Raw { raw_len } else { body_len };
            ChunkHeader { lane, codec, seq, record_count, raw_len, body_len, dict_id, body_crc32c }
        })
}

/// Keys that pass validation: 1..=80 characters of printable ASCII but '.', '/' and backslash.
pub fn valid_key() -> impl Strategy<Value = String> {
    "[!-\\-0-\\[\\]-~]{1,80}"
}

pub fn valid_content_type() -> impl Strategy<Value = String> {
    prop_oneof![Just("image/jpeg".to_owned()), Just("application/json".to_owned()), "[ -~]{1,64}",]
}

/// Payloads that compress well, not at all, or are empty.
pub fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..512),
        (any::<u8>(), 0..4096usize).prop_map(|(byte, length)| vec![byte; length]),
        "[a-z ]{0,300}".prop_map(String::into_bytes),
    ]
}

pub fn valid_record() -> impl Strategy<Value = Record> {
    (valid_key(), any::<u64>(), valid_content_type(), payload()).prop_map(
        |(key, timestamp_us, content_type, payload)| Record { key, timestamp_us, content_type, payload },
    )
}

/// Strings of at most `max` bytes.
fn bounded_text(max: usize) -> impl Strategy<Value = String> {
    "\\PC{0,40}".prop_map(move |text| text[..text.floor_char_boundary(max)].to_owned())
}

pub fn valid_control_message() -> impl Strategy<Value = ControlMessage> {
    use protocol::*;
    let lane_dictionary = (lane(), any::<u32>()).prop_map(|(lane, dict_id)| LaneDictionary { lane, dict_id });
    let hello = (
        "[a-z0-9-]{1,128}",
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
        vec(lane(), 0..=CONTROL_LIST_ITEMS_MAX),
        vec(codec(), 0..=4),
        vec(lane_dictionary, 0..=8),
    )
        .prop_map(|(device_id, boot_id, ring_id, lanes, codecs, dictionary_ids)| {
            ControlMessage::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                device_id,
                boot_id,
                ring_id,
                lanes,
                codecs,
                dictionary_ids,
            })
        });
    let lane_resume = (lane(), 1..=u64::MAX).prop_map(|(lane, resume_seq)| LaneResume { lane, resume_seq });
    let welcome = (
        vec(lane_resume, 0..=CONTROL_LIST_ITEMS_MAX),
        (1 + CONTROL_MESSAGE_BYTES_MAX as u32)..=FRAME_BYTES_MAX as u32,
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(|(resume, frame_bytes_max, in_flight_bytes_max, commit_interval_ms)| {
            ControlMessage::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                resume,
                limits: SessionLimits { frame_bytes_max, in_flight_bytes_max, commit_interval_ms },
            })
        });
    let ack = (lane(), any::<u64>())
        .prop_map(|(lane, durable_through)| ControlMessage::Ack(Ack { lane, durable_through }));
    let error = (proptest::sample::select(ErrorCode::ALL.to_vec()), bounded_text(ERROR_REASON_BYTES_MAX))
        .prop_map(|(code, reason)| ControlMessage::Error(ErrorMessage { code, reason }));
    prop_oneof![hello, welcome, ack, error]
}
