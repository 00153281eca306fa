//! Targeted, data-driven tests: one `check(input, expected)` helper per boundary, and one table
//! of hand-made inputs per boundary, each breaking one rule. A last test checks that the
//! tables together produce every `DecodeError` variant, so a new variant without a case fails
//! to compile (the match in `variant_name`) or fails that test.

mod common;

use common::*;
use protocol::*;

/// (case name, input, expected) rows of a boundary's table.
type Cases<Input, Expected> = Vec<(&'static str, Input, Expected)>;
/// (case name, first input, second input, expected) rows.
type Cases2<First, Second, Expected> = Vec<(&'static str, First, Second, Expected)>;

// ---------------------------------------------------------------- chunk header ----------

fn check_header(bytes: &[u8], expected: Result<ChunkHeader, DecodeError>) {
    assert_eq!(ChunkHeader::decode(bytes), expected, "header bytes {bytes:02x?}");
}

fn header_cases() -> Cases<Vec<u8>, Result<ChunkHeader, DecodeError>> {
    let valid = sample_header().encode().to_vec();
    let mut bad_crc = valid.clone();
    bad_crc[8] ^= 0x01; // seq changed, CRC not recomputed
    let bad_crc_expected = DecodeError::HeaderCrcMismatch {
        stored: crc32c::crc32c(&valid[..36]),
        computed: crc32c::crc32c(&bad_crc[..36]),
    };
    let mut bad_magic = valid.clone();
    bad_magic[0] = b'X';
    let with_trailing_bytes = [valid.clone(), b"body".to_vec()].concat();
    let raw_len_max = CHUNK_RAW_BYTES_MAX as u32;
    vec![
        ("valid", valid.clone(), Ok(sample_header())),
        ("bytes after the header are not its business", with_trailing_bytes, Ok(sample_header())),
        (
            "truncated",
            valid[..CHUNK_HEADER_LEN - 1].to_vec(),
            Err(DecodeError::ChunkHeaderTruncated { needed: 40, available: 39 }),
        ),
        ("empty", Vec::new(), Err(DecodeError::ChunkHeaderTruncated { needed: 40, available: 0 })),
        ("bad magic", bad_magic, Err(DecodeError::BadChunkMagic { found: *b"XC" })),
        (
            "version 2",
            header_bytes_with(|bytes| bytes[2] = 2),
            Err(DecodeError::UnsupportedChunkVersion { found: 2, supported: 1 }),
        ),
        ("bad header crc", bad_crc, Err(bad_crc_expected)),
        ("unknown lane", header_bytes_with(|bytes| bytes[3] = 7), Err(DecodeError::UnknownLane(7))),
        ("unknown codec", header_bytes_with(|bytes| bytes[4] = 2), Err(DecodeError::UnknownCodec(2))),
        (
            "flags set",
            header_bytes_with(|bytes| bytes[5] = 0x80),
            Err(DecodeError::ChunkFlagsSet { found: 0x80 }),
        ),
        (
            "reserved set",
            header_bytes_with(|bytes| bytes[7] = 1),
            Err(DecodeError::ChunkReservedSet { found: 0x0100 }),
        ),
        (
            "seq 0",
            header_bytes_with(|bytes| bytes[8..16].fill(0)),
            Err(DecodeError::InvalidChunkHeader(ChunkViolation::ZeroSeq)),
        ),
        (
            "too many records",
            header_bytes_with(|bytes| put_u32(bytes, 16, CHUNK_RECORDS_MAX + 1)),
            Err(DecodeError::InvalidChunkHeader(ChunkViolation::TooManyRecords {
                record_count: 65_537,
                max: CHUNK_RECORDS_MAX,
            })),
        ),
        (
            "raw_len over the maximum",
            header_bytes_with(|bytes| put_u32(bytes, 20, raw_len_max + 1)),
            Err(DecodeError::InvalidChunkHeader(ChunkViolation::RawTooLarge {
                raw_len: u64::from(raw_len_max) + 1,
                max: CHUNK_RAW_BYTES_MAX,
            })),
        ),
        (
            "body_len over the maximum",
            header_bytes_with(|bytes| put_u32(bytes, 24, u32::MAX)),
            Err(DecodeError::InvalidChunkHeader(ChunkViolation::BodyTooLarge {
                body_len: u64::from(u32::MAX),
                max: CHUNK_BODY_BYTES_MAX,
            })),
        ),
        (
            "raw codec with body_len != raw_len",
            header_bytes_with(|bytes| bytes[4] = Codec::Raw.id()),
            Err(DecodeError::InvalidChunkHeader(ChunkViolation::RawBodyLengthMismatch {
                body_len: 4,
                raw_len: 300,
            })),
        ),
        (
            "no records but raw bytes",
            header_bytes_with(|bytes| put_u32(bytes, 16, 0)),
            Err(DecodeError::InvalidChunkHeader(ChunkViolation::EmptyChunkWithBytes { raw_len: 300 })),
        ),
    ]
}

#[test]
fn chunk_header_boundaries() {
    for (name, bytes, expected) in header_cases() {
        println!("case: {name}");
        check_header(&bytes, expected);
    }
}

// ---------------------------------------------------------------- whole chunk ----------

fn check_chunk(bytes: &[u8], expected: Result<(ChunkHeader, &[u8]), DecodeError>) {
    assert_eq!(decode_chunk(bytes), expected, "chunk bytes {bytes:02x?}");
}

/// A decoded chunk, owned so a table can hold it.
type OwnedChunk = (ChunkHeader, Vec<u8>);

fn chunk_cases() -> Cases<Vec<u8>, Result<OwnedChunk, DecodeError>> {
    let header = sample_header().encode().to_vec();
    vec![
        ("valid", [&header[..], b"body"].concat(), Ok((sample_header(), b"body".to_vec()))),
        (
            "body shorter than body_len",
            [&header[..], b"bod"].concat(),
            Err(DecodeError::ChunkBodyLengthMismatch { declared: 4, actual: 3 }),
        ),
        (
            "body longer than body_len",
            [&header[..], b"bodyy"].concat(),
            Err(DecodeError::ChunkBodyLengthMismatch { declared: 4, actual: 5 }),
        ),
        (
            "bad body crc",
            [&header[..], b"BODY"].concat(),
            Err(DecodeError::BodyCrcMismatch {
                stored: crc32c::crc32c(b"body"),
                computed: crc32c::crc32c(b"BODY"),
            }),
        ),
    ]
}

#[test]
fn whole_chunk_boundaries() {
    for (name, bytes, expected) in chunk_cases() {
        println!("case: {name}");
        let expected = expected.as_ref().map(|(header, body)| (*header, &body[..])).map_err(Clone::clone);
        check_chunk(&bytes, expected);
    }
}

// ---------------------------------------------------------------- decompression ----------

fn check_decompress(
    decompressor: &mut ChunkDecompressor,
    header: &ChunkHeader,
    body: &[u8],
    expected: Result<Vec<u8>, DecodeError>,
) {
    assert_eq!(decompressor.decompress(header, body), expected, "{header:?}");
}

/// A raw block of `length` compressible bytes and its zstd frame.
fn compressed(length: usize) -> (Vec<u8>, Vec<u8>) {
    let raw: Vec<u8> = (0..length).map(|index| b"sensor "[index % 7]).collect();
    let (codec, frame) = ChunkCompressor::new(3).compress(&raw, NO_DICTIONARY).expect("compresses");
    assert_eq!(codec, Codec::Zstd);
    (raw, frame)
}

fn zstd_header(raw_len: usize, body: &[u8], dict_id: u32) -> ChunkHeader {
    ChunkHeader {
        lane: Lane::Sensor,
        codec: Codec::Zstd,
        seq: 1,
        record_count: 1,
        raw_len: raw_len as u32,
        body_len: body.len() as u32,
        dict_id,
        body_crc32c: crc32c::crc32c(body),
    }
}

fn decompress_cases() -> Cases2<ChunkHeader, Vec<u8>, Result<Vec<u8>, DecodeError>> {
    let (raw, frame) = compressed(1000);
    let frame_and_more = [&frame[..], &[0u8]].concat();
    let raw_header = ChunkHeader { codec: Codec::Raw, body_len: 3, raw_len: 3, ..zstd_header(3, b"abc", 0) };
    vec![
        ("valid zstd", zstd_header(1000, &frame, 0), frame.clone(), Ok(raw.clone())),
        ("valid raw", raw_header, b"abc".to_vec(), Ok(b"abc".to_vec())),
        (
            "body length differs from the header",
            raw_header,
            b"abcd".to_vec(),
            Err(DecodeError::ChunkBodyLengthMismatch { declared: 3, actual: 4 }),
        ),
        (
            "header breaking a limit",
            ChunkHeader { seq: 0, ..raw_header },
            b"abc".to_vec(),
            Err(DecodeError::InvalidChunkHeader(ChunkViolation::ZeroSeq)),
        ),
        (
            "unknown dictionary",
            zstd_header(1000, &frame, 42),
            frame.clone(),
            Err(DecodeError::UnknownDictionary { dict_id: 42 }),
        ),
        (
            "trailing bytes after the frame",
            zstd_header(1000, &frame_and_more, 0),
            frame_and_more.clone(),
            Err(DecodeError::NotOneZstdFrame { body_len: frame.len() + 1, frame_len: frame.len() }),
        ),
        (
            "frame announces another size",
            zstd_header(999, &frame, 0),
            frame.clone(),
            Err(DecodeError::DecompressedLengthMismatch { raw_len: 999, found: 1000 }),
        ),
        (
            "not zstd at all",
            zstd_header(1000, b"not zstd", 0),
            b"not zstd".to_vec(),
            Err(DecodeError::Decompress { dict_id: 0, reason: "Unknown frame descriptor".into() }),
        ),
    ]
}

#[test]
fn decompression_boundaries() {
    let mut decompressor = ChunkDecompressor::new();
    for (name, header, body, expected) in decompress_cases() {
        println!("case: {name}");
        check_decompress(&mut decompressor, &header, &body, expected);
    }
}

// ---------------------------------------------------------------- records ----------

fn check_records(raw: &[u8], expected: Vec<Result<Record, DecodeError>>) {
    let found: Vec<Result<Record, DecodeError>> =
        records(raw).map(|item| item.map(|record| record.to_owned())).collect();
    assert_eq!(found, expected, "record block {raw:02x?}");
}

/// Encodes one record field by field, without validation, so cases can break any rule.
fn record_bytes(key: &[u8], content_type: &[u8], payload_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    raw.extend_from_slice(&(key.len() as u16).to_le_bytes());
    raw.extend_from_slice(key);
    raw.extend_from_slice(&1_700_000_000_000_000u64.to_le_bytes());
    raw.push(content_type.len() as u8);
    raw.extend_from_slice(content_type);
    raw.extend_from_slice(&payload_len.to_le_bytes());
    raw.extend_from_slice(payload);
    raw
}

fn good_record() -> Record {
    Record {
        key: "frame-0001".into(),
        timestamp_us: 1_700_000_000_000_000,
        content_type: "image/jpeg".into(),
        payload: vec![0xff, 0xd8, 0xff],
    }
}

fn record_cases() -> Cases<Vec<u8>, Vec<Result<Record, DecodeError>>> {
    let good = record_bytes(b"frame-0001", b"image/jpeg", 3, &[0xff, 0xd8, 0xff]);
    let key_problem = |problem| Err(DecodeError::InvalidRecordKey { offset: 0, problem });
    let type_problem = |problem| Err(DecodeError::InvalidContentType { offset: 0, problem });
    vec![
        ("empty block", Vec::new(), vec![]),
        ("one good record", good.clone(), vec![Ok(good_record())]),
        (
            "record key with a dot",
            record_bytes(b"frame.jpg", b"image/jpeg", 0, b""),
            vec![key_problem(KeyProblem::ForbiddenCharacter { character: '.', position: 5 })],
        ),
        (
            "record key with a slash",
            record_bytes(b"etc/passwd", b"image/jpeg", 0, b""),
            vec![key_problem(KeyProblem::ForbiddenCharacter { character: '/', position: 3 })],
        ),
        (
            "record key with a control character",
            record_bytes(b"a\x1bb", b"image/jpeg", 0, b""),
            vec![key_problem(KeyProblem::ForbiddenCharacter { character: '\x1b', position: 1 })],
        ),
        (
            "record key with a non-ASCII character (a ustar name cannot hold it)",
            record_bytes("cam\u{e9}ra".as_bytes(), b"image/jpeg", 0, b""),
            vec![key_problem(KeyProblem::ForbiddenCharacter { character: '\u{e9}', position: 3 })],
        ),
        (
            "record key with a space",
            record_bytes(b"a b", b"image/jpeg", 0, b""),
            vec![key_problem(KeyProblem::ForbiddenCharacter { character: ' ', position: 1 })],
        ),
        (
            "record key with a backslash",
            record_bytes(b"a\\b", b"image/jpeg", 0, b""),
            vec![key_problem(KeyProblem::ForbiddenCharacter { character: '\\', position: 1 })],
        ),
        ("empty key", record_bytes(b"", b"image/jpeg", 0, b""), vec![key_problem(KeyProblem::Empty)]),
        (
            "key too long",
            record_bytes(&[b'k'; 81], b"image/jpeg", 0, b""),
            vec![key_problem(KeyProblem::TooLong { length: 81, max: 80 })],
        ),
        (
            "key not UTF-8",
            record_bytes(b"ab\xff", b"image/jpeg", 0, b""),
            vec![key_problem(KeyProblem::NotUtf8 { valid_up_to: 2 })],
        ),
        (
            "empty content type",
            record_bytes(b"k", b"", 0, b""),
            vec![type_problem(ContentTypeProblem::Empty)],
        ),
        (
            "content type too long",
            record_bytes(b"k", &[b't'; 65], 0, b""),
            vec![type_problem(ContentTypeProblem::TooLong { length: 65, max: 64 })],
        ),
        (
            "content type not printable ASCII",
            record_bytes(b"k", b"image/\xc3\xa9", 0, b""),
            vec![type_problem(ContentTypeProblem::NotPrintableAscii { byte: 0xc3, position: 6 })],
        ),
        (
            "payload_len over the maximum",
            record_bytes(b"k", b"a/b", u32::MAX, b""),
            vec![Err(DecodeError::RecordPayloadTooLarge {
                offset: 0,
                length: u32::MAX as usize,
                max: RECORD_PAYLOAD_BYTES_MAX,
            })],
        ),
        (
            "truncated record: payload cut short",
            good[..good.len() - 1].to_vec(),
            vec![Err(DecodeError::RecordTruncated { offset: 0, field: "payload", needed: 3, available: 2 })],
        ),
        (
            "truncated record: half a key length",
            vec![1],
            vec![Err(DecodeError::RecordTruncated { offset: 0, field: "key_len", needed: 2, available: 1 })],
        ),
        (
            "truncated second record, after a good one; iteration stops at the error",
            [&good[..], &good[..12]].concat(),
            vec![
                Ok(good_record()),
                Err(DecodeError::RecordTruncated {
                    offset: good.len(),
                    field: "timestamp_us",
                    needed: 8,
                    available: 0,
                }),
            ],
        ),
    ]
}

#[test]
fn record_boundaries() {
    for (name, raw, expected) in record_cases() {
        println!("case: {name}");
        check_records(&raw, expected);
    }
}

fn check_decode_records(header: &ChunkHeader, raw: &[u8], expected: Result<Vec<Record>, DecodeError>) {
    let found = decode_records(header, raw)
        .map(|records| records.iter().map(RecordRef::to_owned).collect::<Vec<_>>());
    assert_eq!(found, expected, "{header:?}");
}

fn decode_records_cases() -> Cases2<ChunkHeader, Vec<u8>, Result<Vec<Record>, DecodeError>> {
    let good = record_bytes(b"frame-0001", b"image/jpeg", 3, &[0xff, 0xd8, 0xff]);
    let two = [&good[..], &good[..]].concat();
    let header = |record_count: u32, raw_len: usize| ChunkHeader {
        record_count,
        raw_len: raw_len as u32,
        ..sample_header()
    };
    vec![
        ("two records", header(2, two.len()), two.clone(), Ok(vec![good_record(), good_record()])),
        (
            "block shorter than raw_len",
            header(2, two.len() + 1),
            two.clone(),
            Err(DecodeError::RecordBlockLengthMismatch { declared: two.len() as u32 + 1, actual: two.len() }),
        ),
        (
            "fewer records than record_count",
            header(3, two.len()),
            two.clone(),
            Err(DecodeError::RecordCountMismatch { declared: 3, found: 2 }),
        ),
        (
            "more records than record_count",
            header(1, two.len()),
            two.clone(),
            Err(DecodeError::RecordCountMismatch { declared: 1, found: 2 }),
        ),
    ]
}

#[test]
fn decode_records_boundaries() {
    for (name, header, raw, expected) in decode_records_cases() {
        println!("case: {name}");
        check_decode_records(&header, &raw, expected);
    }
}

fn check_push(record: RecordRef<'_>, expected: Result<(), EncodeError>) {
    let mut builder = ChunkBuilder::new(Lane::Media, 1024);
    assert_eq!(builder.push(record), expected, "{record:?}");
    if expected.is_err() {
        assert!(builder.is_empty());
        assert_eq!(builder.raw_len(), 0);
    }
}

#[test]
fn record_encode_boundaries() {
    let record = |key, content_type| RecordRef { key, timestamp_us: 0, content_type, payload: b"" };
    let long_key = "k".repeat(RECORD_KEY_BYTES_MAX);
    let too_long_key = "k".repeat(RECORD_KEY_BYTES_MAX + 1);
    let cases: Vec<(RecordRef<'_>, Result<(), EncodeError>)> = vec![
        (record("ok", "text/plain"), Ok(())),
        (record(&long_key, "text/plain"), Ok(())),
        (
            record(&too_long_key, "text/plain"),
            Err(EncodeError::InvalidKey {
                key: too_long_key.clone(),
                problem: KeyProblem::TooLong { length: 81, max: 80 },
            }),
        ),
        (
            record("a.b", "text/plain"),
            Err(EncodeError::InvalidKey {
                key: "a.b".into(),
                problem: KeyProblem::ForbiddenCharacter { character: '.', position: 1 },
            }),
        ),
        (
            record("k", "text/\tplain"),
            Err(EncodeError::InvalidContentType {
                content_type: "text/\tplain".into(),
                problem: ContentTypeProblem::NotPrintableAscii { byte: b'\t', position: 5 },
            }),
        ),
        (
            record("k", ""),
            Err(EncodeError::InvalidContentType {
                content_type: String::new(),
                problem: ContentTypeProblem::Empty,
            }),
        ),
    ];
    for (record, expected) in cases {
        check_push(record, expected);
    }
    let payload = vec![0u8; RECORD_PAYLOAD_BYTES_MAX + 1];
    check_push(
        RecordRef { key: "k", timestamp_us: 0, content_type: "a/b", payload: &payload },
        Err(EncodeError::PayloadTooLarge {
            length: RECORD_PAYLOAD_BYTES_MAX + 1,
            max: RECORD_PAYLOAD_BYTES_MAX,
        }),
    );
}

#[test]
fn long_offending_values_are_echoed_cut() {
    let key = "ä".repeat(200); // 400 bytes, two bytes per character
    let Err(EncodeError::InvalidKey { key: echoed, .. }) = validate_key(&key) else {
        panic!("a 400-byte key is invalid");
    };
    assert_eq!(echoed.len(), ERROR_ECHO_BYTES_MAX);
    assert!(key.starts_with(&echoed));
}

// ---------------------------------------------------------------- control ----------

fn check_control(bytes: &[u8], expected: Result<ControlMessage, DecodeError>) {
    assert_eq!(decode_control(bytes), expected, "control bytes {bytes:02x?}");
}

fn hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        device_id: "cam-0042".into(),
        boot_id: [7; 16],
        ring_id: [9; 16],
        lanes: Lane::ALL.to_vec(),
        codecs: vec![Codec::Raw, Codec::Zstd],
        dictionary_ids: vec![LaneDictionary { lane: Lane::Sensor, dict_id: 3 }],
    }
}

fn welcome() -> Welcome {
    Welcome {
        protocol_version: PROTOCOL_VERSION,
        resume: vec![LaneResume { lane: Lane::Audit, resume_seq: 17 }],
        limits: SessionLimits {
            frame_bytes_max: FRAME_BYTES_MAX as u32,
            in_flight_bytes_max: 64 << 20,
            commit_interval_ms: 500,
        },
    }
}

/// postcard bytes of `message` without the bounds check, to hand-make out-of-bounds input.
fn unchecked(message: &ControlMessage) -> Vec<u8> {
    postcard::to_allocvec(message).expect("serializes")
}

fn control_cases() -> Cases<Vec<u8>, Result<ControlMessage, DecodeError>> {
    let ack = ControlMessage::Ack(Ack { lane: Lane::Media, durable_through: 300 });
    let ack_bytes = unchecked(&ack);
    assert_eq!(ack_bytes, [2, 3, 0xac, 0x02], "Ack: tag 2, lane 3, varint 300");
    let hello_bytes = unchecked(&ControlMessage::Hello(hello()));
    assert_eq!(&hello_bytes[..2], &[0, 2], "Hello: tag 0, version 2 first");
    let mut hello_version_1 = hello_bytes.clone();
    hello_version_1[1] = 1;
    // A version-1 Hello as a version-1 appliance sends it (no ring_id): refused by its version.
    let version_1_layout = [&hello_bytes[..27], &hello_bytes[43..]].concat();
    let mut hello_version_1_layout = version_1_layout;
    hello_version_1_layout[1] = 1;
    let welcome_version_300 = [vec![1, 0xac, 0x02], b"a layout this build does not know".to_vec()].concat();
    let invalid = |violation| Err(DecodeError::InvalidControl(violation));
    let unknown_id = || {
        Err(DecodeError::ControlMalformed {
            reason: "unknown message kind, lane id, codec id or error code".into(),
        })
    };
    vec![
        ("ack", ack_bytes.clone(), Ok(ack.clone())),
        ("hello", hello_bytes.clone(), Ok(ControlMessage::Hello(hello()))),
        ("welcome", unchecked(&ControlMessage::Welcome(welcome())), Ok(ControlMessage::Welcome(welcome()))),
        (
            "trailing bytes in control",
            [&ack_bytes[..], &[0, 0]].concat(),
            Err(DecodeError::ControlTrailingBytes { count: 2 }),
        ),
        (
            "Hello with protocol_version 1",
            hello_version_1,
            Err(DecodeError::UnsupportedVersion { found: 1, supported: 2 }),
        ),
        (
            "a version-1 appliance's Hello (no ring_id)",
            hello_version_1_layout,
            Err(DecodeError::UnsupportedVersion { found: 1, supported: 2 }),
        ),
        (
            "Welcome with protocol_version 300 and an unknown layout",
            welcome_version_300,
            Err(DecodeError::UnsupportedVersion { found: 300, supported: 2 }),
        ),
        (
            "too large to be a control message",
            vec![0; CONTROL_MESSAGE_BYTES_MAX + 1],
            Err(DecodeError::ControlTooLarge { length: 2049, max: CONTROL_MESSAGE_BYTES_MAX }),
        ),
        (
            "empty",
            Vec::new(),
            Err(DecodeError::ControlMalformed { reason: "Hit the end of buffer, expected more data".into() }),
        ),
        (
            "truncated ack",
            ack_bytes[..3].to_vec(),
            Err(DecodeError::ControlMalformed { reason: "Hit the end of buffer, expected more data".into() }),
        ),
        ("unknown message kind", vec![4, 0], unknown_id()),
        ("unknown lane in an ack", vec![2, 9, 0], unknown_id()),
        ("unknown error code", vec![3, 99, 0], unknown_id()),
        (
            "device id too long",
            unchecked(&ControlMessage::Hello(Hello { device_id: "d".repeat(129), ..hello() })),
            invalid(ControlViolation::TooManyBytes { field: "hello.device_id", length: 129, max: 128 }),
        ),
        (
            "empty device id",
            unchecked(&ControlMessage::Hello(Hello { device_id: String::new(), ..hello() })),
            invalid(ControlViolation::Empty { field: "hello.device_id" }),
        ),
        (
            "too many lanes",
            unchecked(&ControlMessage::Hello(Hello { lanes: vec![Lane::Audit; 65], ..hello() })),
            invalid(ControlViolation::TooManyItems { field: "hello.lanes", count: 65, max: 64 }),
        ),
        (
            "resume_seq 0",
            unchecked(&ControlMessage::Welcome(Welcome {
                resume: vec![LaneResume { lane: Lane::Media, resume_seq: 0 }],
                ..welcome()
            })),
            invalid(ControlViolation::OutOfRange {
                field: "welcome.resume.resume_seq",
                value: 0,
                min: 1,
                max: u64::MAX,
            }),
        ),
        (
            "frame_bytes_max beyond what the protocol allows",
            unchecked(&ControlMessage::Welcome(Welcome {
                limits: SessionLimits { frame_bytes_max: u32::MAX, ..welcome().limits },
                ..welcome()
            })),
            invalid(ControlViolation::OutOfRange {
                field: "welcome.limits.frame_bytes_max",
                value: u64::from(u32::MAX),
                min: 1 + CONTROL_MESSAGE_BYTES_MAX as u64,
                max: FRAME_BYTES_MAX as u64,
            }),
        ),
        (
            "error reason too long",
            unchecked(&ControlMessage::Error(ErrorMessage {
                code: ErrorCode::Internal,
                reason: "r".repeat(ERROR_REASON_BYTES_MAX + 1),
            })),
            invalid(ControlViolation::TooManyBytes { field: "error.reason", length: 1025, max: 1024 }),
        ),
    ]
}

#[test]
fn control_boundaries() {
    for (name, bytes, expected) in control_cases() {
        println!("case: {name}");
        check_control(&bytes, expected);
    }
}

fn check_encode_control(message: &ControlMessage, expected: Result<(), EncodeError>) {
    assert_eq!(encode_control(message).map(drop), expected, "{message:?}");
}

#[test]
fn control_encode_boundaries() {
    check_encode_control(&ControlMessage::Hello(hello()), Ok(()));
    check_encode_control(
        &ControlMessage::Hello(Hello {
            dictionary_ids: vec![LaneDictionary { lane: Lane::Sensor, dict_id: 1 }; 65],
            ..hello()
        }),
        Err(EncodeError::InvalidControl(ControlViolation::TooManyItems {
            field: "hello.dictionary_ids",
            count: 65,
            max: 64,
        })),
    );
    check_encode_control(
        &ControlMessage::Welcome(Welcome {
            resume: vec![LaneResume { lane: Lane::Media, resume_seq: 1 }; 65],
            ..welcome()
        }),
        Err(EncodeError::InvalidControl(ControlViolation::TooManyItems {
            field: "welcome.resume",
            count: 65,
            max: 64,
        })),
    );
    check_encode_control(
        &ControlMessage::Welcome(Welcome {
            limits: SessionLimits { frame_bytes_max: 100, ..welcome().limits },
            ..welcome()
        }),
        Err(EncodeError::InvalidControl(ControlViolation::OutOfRange {
            field: "welcome.limits.frame_bytes_max",
            value: 100,
            min: 2049,
            max: FRAME_BYTES_MAX as u64,
        })),
    );
}

// ---------------------------------------------------------------- frames ----------

/// Pushes `stream` in one go, then drains: the frames, then `Ok(None)` or the error.
fn check_frames(stream: &[u8], frame_bytes_max: usize, expected: Vec<Result<Option<Frame>, DecodeError>>) {
    let mut decoder = FrameDecoder::new(frame_bytes_max);
    decoder.push(stream);
    let mut found = Vec::new();
    loop {
        let item = decoder.next_frame();
        let done = !matches!(item, Ok(Some(_)));
        found.push(item);
        if done {
            break;
        }
    }
    assert_eq!(found, expected, "stream {stream:02x?}");
}

/// What successive `next_frame` calls return.
type FrameResults = Vec<Result<Option<Frame>, DecodeError>>;

fn frame_cases() -> Cases2<Vec<u8>, usize, FrameResults> {
    let mut two_frames = Vec::new();
    encode_frame(FrameKind::Control, b"\x02\x00\x05", &mut two_frames).expect("small");
    encode_frame(FrameKind::Chunk, b"chunk bytes", &mut two_frames).expect("small");
    let control = |payload: &[u8]| Ok(Some(Frame { kind: FrameKind::Control, payload: payload.to_vec() }));
    let chunk = |payload: &[u8]| Ok(Some(Frame { kind: FrameKind::Chunk, payload: payload.to_vec() }));
    vec![
        (
            "two frames and half of a third",
            [&two_frames[..], &[9, 0, 0]].concat(),
            FRAME_BYTES_MAX,
            vec![control(b"\x02\x00\x05"), chunk(b"chunk bytes"), Ok(None)],
        ),
        (
            "frame too large",
            9_000_000u32.to_le_bytes().to_vec(),
            FRAME_BYTES_MAX,
            vec![Err(DecodeError::FrameTooLarge { length: 9_000_000, max: FRAME_BYTES_MAX })],
        ),
        (
            "frame over the session's smaller maximum",
            [&two_frames[..], &two_frames[..]].concat(),
            5,
            vec![control(b"\x02\x00\x05"), Err(DecodeError::FrameTooLarge { length: 12, max: 5 })],
        ),
        (
            "unknown frame kind",
            vec![1, 0, 0, 0, 4],
            FRAME_BYTES_MAX,
            vec![Err(DecodeError::UnknownFrameKind(4))],
        ),
        ("zero length", vec![0, 0, 0, 0], FRAME_BYTES_MAX, vec![Err(DecodeError::ZeroLengthFrame)]),
        (
            "control frame longer than any control message",
            [&3000u32.to_le_bytes()[..], &[1]].concat(),
            FRAME_BYTES_MAX,
            vec![Err(DecodeError::FrameTooLargeForKind {
                kind: FrameKind::Control,
                length: 3000,
                max: 1 + CONTROL_MESSAGE_BYTES_MAX,
            })],
        ),
    ]
}

#[test]
fn frame_boundaries() {
    for (name, stream, frame_bytes_max, expected) in frame_cases() {
        println!("case: {name}");
        check_frames(&stream, frame_bytes_max, expected);
    }
}

// ---------------------------------------------------------------- dictionary frames ----------

type DictionaryFrameCase = (&'static str, Vec<u8>, Result<(u32, Vec<u8>), DecodeError>);

fn dictionary_frame_cases() -> Vec<DictionaryFrameCase> {
    let dictionary = b"a dictionary's bytes".to_vec();
    let id = protocol::dictionary_id(&dictionary);
    let with_id = |dict_id: u32, bytes: &[u8]| [&dict_id.to_le_bytes()[..], bytes].concat();
    vec![
        ("valid", with_id(id, &dictionary), Ok((id, dictionary.clone()))),
        (
            "shorter than the id",
            vec![1, 2, 3],
            Err(DecodeError::BadDictionaryFrame { reason: "shorter than its 4-byte id".into() }),
        ),
        (
            "id 0",
            with_id(0, &dictionary),
            Err(DecodeError::BadDictionaryFrame { reason: "dict_id 0 means no dictionary".into() }),
        ),
        (
            "empty dictionary",
            with_id(id, b""),
            Err(DecodeError::BadDictionaryFrame {
                reason: format!("dictionary of 0 bytes, expected 1..={DICTIONARY_BYTES_MAX}"),
            }),
        ),
        (
            "oversized dictionary",
            with_id(id, &vec![0; DICTIONARY_BYTES_MAX + 1]),
            Err(DecodeError::BadDictionaryFrame {
                reason: format!(
                    "dictionary of {} bytes, expected 1..={DICTIONARY_BYTES_MAX}",
                    DICTIONARY_BYTES_MAX + 1
                ),
            }),
        ),
        (
            "id not derived from the bytes",
            with_id(id ^ 1, &dictionary),
            Err(DecodeError::BadDictionaryFrame {
                reason: format!("dict_id {} is not the content id {id} of its bytes", id ^ 1),
            }),
        ),
    ]
}

#[test]
fn dictionary_frame_boundaries() {
    for (name, payload, expected) in dictionary_frame_cases() {
        println!("case: {name}");
        let found = protocol::decode_dictionary_frame(&payload).map(|(id, bytes)| (id, bytes.to_vec()));
        assert_eq!(found, expected);
    }
    let dictionary = b"round trip".to_vec();
    let payload = protocol::dictionary_frame_payload(protocol::dictionary_id(&dictionary), &dictionary);
    assert_eq!(protocol::decode_dictionary_frame(&payload).unwrap().1, &dictionary[..]);
}

// ---------------------------------------------------------------- wire ids ----------

fn check_id<T: PartialEq + std::fmt::Debug>(found: Result<T, DecodeError>, expected: Result<T, DecodeError>) {
    assert_eq!(found, expected);
}

fn id_errors() -> Vec<DecodeError> {
    vec![
        DecodeError::UnknownLane(4),
        DecodeError::UnknownCodec(255),
        DecodeError::UnknownErrorCode(0),
        DecodeError::UnknownFrameKind(0),
    ]
}

#[test]
fn wire_id_boundaries() {
    check_id(Lane::from_id(3), Ok(Lane::Media));
    check_id(Lane::from_id(4), Err(id_errors()[0].clone()));
    check_id(Codec::from_id(1), Ok(Codec::Zstd));
    check_id(Codec::from_id(255), Err(id_errors()[1].clone()));
    check_id(ErrorCode::from_id(8), Ok(ErrorCode::ShuttingDown));
    check_id(ErrorCode::from_id(0), Err(id_errors()[2].clone()));
    check_id(FrameKind::from_id(2), Ok(FrameKind::Chunk));
    check_id(FrameKind::from_id(0), Err(id_errors()[3].clone()));
}

// ---------------------------------------------------------------- messages ----------

#[test]
fn error_messages_carry_the_values() {
    let cases: Vec<(DecodeError, &str)> = vec![
        (
            DecodeError::HeaderCrcMismatch { stored: 0xdeadbeef, computed: 0x12345678 },
            "chunk header crc mismatch: stored 0xdeadbeef, computed 0x12345678",
        ),
        (
            DecodeError::FrameTooLarge { length: 9_000_000, max: FRAME_BYTES_MAX },
            "frame length 9000000 exceeds maximum 4194345",
        ),
        (DecodeError::UnknownLane(7), "unknown lane id 7 (known: 0 audit, 1 decisions, 2 sensor, 3 media)"),
        (
            DecodeError::UnsupportedVersion { found: 9, supported: PROTOCOL_VERSION },
            "unsupported protocol version 9 (this build speaks 2)",
        ),
        (
            DecodeError::BadChunkMagic { found: *b"XC" },
            "bad chunk magic [58, 43] (expected \"TC\", [54, 43])",
        ),
        (
            DecodeError::InvalidChunkHeader(ChunkViolation::RawBodyLengthMismatch {
                body_len: 4,
                raw_len: 300,
            }),
            "invalid chunk header: codec raw requires body_len == raw_len, got body_len 4 and raw_len 300",
        ),
        (
            DecodeError::InvalidRecordKey {
                offset: 34,
                problem: KeyProblem::ForbiddenCharacter { character: '.', position: 5 },
            },
            "record at offset 34: key contains '.' at byte 5 (keys become WebDataset keys and tar \
             member names: printable ASCII without space, '.', '/' or '\\')",
        ),
    ];
    for (error, message) in cases {
        assert_eq!(error.to_string(), message);
    }
}

// ---------------------------------------------------------------- coverage ----------

/// Every variant, by name. The exhaustive match makes a new variant a compile error here until
/// it is listed, and `every_decode_error_variant_has_a_case` then demands a case for it.
fn variant_name(error: &DecodeError) -> &'static str {
    match error {
        DecodeError::ChunkHeaderTruncated { .. } => "ChunkHeaderTruncated",
        DecodeError::BadChunkMagic { .. } => "BadChunkMagic",
        DecodeError::UnsupportedChunkVersion { .. } => "UnsupportedChunkVersion",
        DecodeError::HeaderCrcMismatch { .. } => "HeaderCrcMismatch",
        DecodeError::UnknownLane(_) => "UnknownLane",
        DecodeError::UnknownCodec(_) => "UnknownCodec",
        DecodeError::ChunkFlagsSet { .. } => "ChunkFlagsSet",
        DecodeError::ChunkReservedSet { .. } => "ChunkReservedSet",
        DecodeError::InvalidChunkHeader(_) => "InvalidChunkHeader",
        DecodeError::ChunkBodyLengthMismatch { .. } => "ChunkBodyLengthMismatch",
        DecodeError::BodyCrcMismatch { .. } => "BodyCrcMismatch",
        DecodeError::UnknownDictionary { .. } => "UnknownDictionary",
        DecodeError::DictionaryMismatch { .. } => "DictionaryMismatch",
        DecodeError::NotOneZstdFrame { .. } => "NotOneZstdFrame",
        DecodeError::DecompressedLengthMismatch { .. } => "DecompressedLengthMismatch",
        DecodeError::Decompress { .. } => "Decompress",
        DecodeError::RecordTruncated { .. } => "RecordTruncated",
        DecodeError::InvalidRecordKey { .. } => "InvalidRecordKey",
        DecodeError::InvalidContentType { .. } => "InvalidContentType",
        DecodeError::RecordPayloadTooLarge { .. } => "RecordPayloadTooLarge",
        DecodeError::RecordBlockLengthMismatch { .. } => "RecordBlockLengthMismatch",
        DecodeError::RecordCountMismatch { .. } => "RecordCountMismatch",
        DecodeError::ControlTooLarge { .. } => "ControlTooLarge",
        DecodeError::ControlMalformed { .. } => "ControlMalformed",
        DecodeError::ControlTrailingBytes { .. } => "ControlTrailingBytes",
        DecodeError::UnsupportedVersion { .. } => "UnsupportedVersion",
        DecodeError::InvalidControl(_) => "InvalidControl",
        DecodeError::UnknownErrorCode(_) => "UnknownErrorCode",
        DecodeError::FrameTooLarge { .. } => "FrameTooLarge",
        DecodeError::FrameTooLargeForKind { .. } => "FrameTooLargeForKind",
        DecodeError::ZeroLengthFrame => "ZeroLengthFrame",
        DecodeError::UnknownFrameKind(_) => "UnknownFrameKind",
        DecodeError::BadDictionaryFrame { .. } => "BadDictionaryFrame",
    }
}

const ALL_VARIANTS: [&str; 33] = [
    "BadDictionaryFrame",
    "ChunkHeaderTruncated",
    "BadChunkMagic",
    "UnsupportedChunkVersion",
    "HeaderCrcMismatch",
    "UnknownLane",
    "UnknownCodec",
    "ChunkFlagsSet",
    "ChunkReservedSet",
    "InvalidChunkHeader",
    "ChunkBodyLengthMismatch",
    "BodyCrcMismatch",
    "UnknownDictionary",
    "DictionaryMismatch",
    "NotOneZstdFrame",
    "DecompressedLengthMismatch",
    "Decompress",
    "RecordTruncated",
    "InvalidRecordKey",
    "InvalidContentType",
    "RecordPayloadTooLarge",
    "RecordBlockLengthMismatch",
    "RecordCountMismatch",
    "ControlTooLarge",
    "ControlMalformed",
    "ControlTrailingBytes",
    "UnsupportedVersion",
    "InvalidControl",
    "UnknownErrorCode",
    "FrameTooLarge",
    "FrameTooLargeForKind",
    "ZeroLengthFrame",
    "UnknownFrameKind",
];

#[test]
fn every_decode_error_variant_has_a_case() {
    let mut covered = std::collections::BTreeSet::new();
    let mut note = |error: &DecodeError| {
        covered.insert(variant_name(error));
    };
    header_cases().iter().filter_map(|case| case.2.as_ref().err()).for_each(&mut note);
    chunk_cases().iter().filter_map(|case| case.2.as_ref().err()).for_each(&mut note);
    decompress_cases().iter().filter_map(|case| case.3.as_ref().err()).for_each(&mut note);
    for case in record_cases() {
        case.2.iter().filter_map(|item| item.as_ref().err()).for_each(&mut note);
    }
    decode_records_cases().iter().filter_map(|case| case.3.as_ref().err()).for_each(&mut note);
    control_cases().iter().filter_map(|case| case.2.as_ref().err()).for_each(&mut note);
    for case in frame_cases() {
        case.3.iter().filter_map(|item| item.as_ref().err()).for_each(&mut note);
    }
    id_errors().iter().for_each(&mut note);
    for case in dictionary_frame_cases() {
        if let Err(error) = &case.2 {
            note(error);
        }
    }
    // DictionaryMismatch needs a trained dictionary; tests/dictionary.rs has its case.
    covered.insert("DictionaryMismatch");
    let missing: Vec<_> = ALL_VARIANTS.iter().filter(|name| !covered.contains(*name)).collect();
    assert!(missing.is_empty(), "DecodeError variants without a hand-made case: {missing:?}");
}

#[test]
fn restamping_a_seq_keeps_the_chunk_valid_and_its_body_untouched() {
    let body = b"records".to_vec();
    let sealed = SealedChunk::new(Lane::Sensor, Codec::Raw, 0, 1, body.len() as u32, body.clone()).unwrap();
    for (from, to) in [(1, 1), (1, 2), (7, u64::MAX), (u64::MAX, 1)] {
        let mut encoded = sealed.encode(from);
        protocol::restamp_seq(&mut encoded, to);
        let (header, restamped_body) = decode_chunk(&encoded).expect("still a valid chunk");
        assert_eq!(header, sealed.header(to), "{from} → {to}");
        assert_eq!(restamped_body, &body[..]);
        assert_eq!(encoded, sealed.encode(to), "{from} → {to}: same bytes as encoding at the new seq");
    }
}
