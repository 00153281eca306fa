//! Hostile input: arbitrary and corrupted bytes into every decoder. None may panic, none may
//! allocate past its bound, and corruption of a valid encoding must be detected.

mod common;

use common::*;
use proptest::collection::vec;
use proptest::prelude::*;
use protocol::*;

/// A valid encoded chunk with a zstd body of `records` records.
fn zstd_chunk(records: usize) -> Vec<u8> {
    let mut builder = json_builder(
        CHUNK_RAW_BYTES_MAX,
        (0..records).map(|index| {
            (format!("reading-{index}"), format!("{{\"sensor\":\"temp-{}\",\"value\":{index}}}", index % 7))
        }),
    );
    let chunk = builder.seal(&mut ChunkCompressor::new(3), NO_DICTIONARY).expect("seals");
    assert_eq!(chunk.codec, Codec::Zstd);
    chunk.encode(1)
}

proptest! {
    #[test]
    fn header_decode_survives_any_bytes(bytes in vec(any::<u8>(), 0..64)) {
        if let Ok(header) = ChunkHeader::decode(&bytes) {
            // Anything accepted is exactly what encode would write.
            prop_assert_eq!(&header.encode()[..], &bytes[..CHUNK_HEADER_LEN]);
        }
    }

    #[test]
    fn header_decode_survives_any_fields_under_a_valid_crc(mut bytes in any::<[u8; 40]>()) {
        // Random fields, but magic, version and CRC right: reaches every field check.
        bytes[0..2].copy_from_slice(&CHUNK_MAGIC);
        bytes[2] = CHUNK_FORMAT_VERSION;
        reseal_header(&mut bytes);
        if let Ok(header) = ChunkHeader::decode(&bytes) {
            prop_assert_eq!(header.validate(), Ok(()));
            prop_assert_eq!(header.encode(), bytes);
        }
    }

    /// CRC32C catches every burst of up to 32 bits, so any change to one byte of a valid
    /// header is caught (by the magic, version or CRC check).
    #[test]
    fn any_changed_header_byte_is_detected(
        header in valid_header(),
        position in 0..CHUNK_HEADER_LEN,
        flip in 1..=255u8,
    ) {
        let mut bytes = header.encode();
        bytes[position] ^= flip;
        prop_assert!(ChunkHeader::decode(&bytes).is_err());
    }

    #[test]
    fn decode_chunk_survives_any_bytes(bytes in vec(any::<u8>(), 0..256)) {
        let _ = decode_chunk(&bytes);
    }

    /// Any changed byte of a valid chunk, header or body, is detected by decode_chunk.
    #[test]
    fn any_changed_chunk_byte_is_detected(
        body in vec(any::<u8>(), 1..256),
        position in any::<prop::sample::Index>(),
        flip in 1..=255u8,
    ) {
        let chunk = SealedChunk::new(Lane::Audit, Codec::Raw, 0, 1, body.len() as u32, body)
            .expect("valid");
        let mut bytes = chunk.encode(5);
        let position = position.index(bytes.len());
        bytes[position] ^= flip;
        prop_assert!(decode_chunk(&bytes).is_err());
    }

    #[test]
    fn truncated_or_extended_chunks_are_rejected(
        body in vec(any::<u8>(), 0..256),
        cut in any::<prop::sample::Index>(),
        extra in vec(any::<u8>(), 1..8),
    ) {
        let chunk = SealedChunk::new(Lane::Audit, Codec::Raw, 0, 1, body.len() as u32, body)
            .expect("valid");
        let bytes = chunk.encode(5);
        let cut = cut.index(bytes.len());
        prop_assert!(decode_chunk(&bytes[..cut]).is_err());
        let mut extended = bytes.clone();
        extended.extend_from_slice(&extra);
        prop_assert!(decode_chunk(&extended).is_err());
    }

    /// `records` yields at most one error and then stops; decode_records never panics and
    /// never trusts the header's count for allocation.
    #[test]
    fn records_survive_any_bytes(raw in vec(any::<u8>(), 0..512), record_count in 0..=CHUNK_RECORDS_MAX) {
        let mut iterator = records(&raw);
        let mut errors = 0;
        for item in iterator.by_ref() {
            match item {
                Ok(record) => prop_assert_eq!(record.validate(), Ok(())),
                Err(_) => errors += 1,
            }
        }
        prop_assert!(errors <= 1);
        prop_assert!(iterator.next().is_none());
        let header = ChunkHeader {
            lane: Lane::Sensor,
            codec: Codec::Raw,
            seq: 1,
            record_count,
            raw_len: raw.len() as u32,
            body_len: raw.len() as u32,
            dict_id: 0,
            body_crc32c: 0,
        };
        let _ = decode_records(&header, &raw);
    }

    /// Random field values inside a well-formed record skeleton reach every record check.
    #[test]
    fn records_survive_plausible_lengths(
        key in vec(any::<u8>(), 0..40),
        key_len_delta in -3i32..3,
        content_type in vec(any::<u8>(), 0..20),
        payload_len in prop_oneof![0..64u32, Just(u32::MAX), any::<u32>()],
        tail in vec(any::<u8>(), 0..64),
    ) {
        let mut raw = Vec::new();
        let key_len = (key.len() as i32 + key_len_delta).clamp(0, u16::MAX.into()) as u16;
        raw.extend_from_slice(&key_len.to_le_bytes());
        raw.extend_from_slice(&key);
        raw.extend_from_slice(&7u64.to_le_bytes());
        raw.push(content_type.len() as u8);
        raw.extend_from_slice(&content_type);
        raw.extend_from_slice(&payload_len.to_le_bytes());
        raw.extend_from_slice(&tail);
        for record in records(&raw).flatten() {
            prop_assert_eq!(record.validate(), Ok(()));
        }
    }

    #[test]
    fn decode_control_survives_any_bytes(bytes in vec(any::<u8>(), 0..300)) {
        if let Ok(message) = decode_control(&bytes) {
            prop_assert_eq!(message.validate(), Ok(()));
        }
    }

    /// Corrupted valid control messages: decoded or rejected, never a panic, and anything
    /// accepted is within bounds.
    #[test]
    fn decode_control_survives_corrupted_messages(
        message in valid_control_message(),
        position in any::<prop::sample::Index>(),
        replacement in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encode_control(&message).expect("valid");
        let position = position.index(bytes.len());
        bytes[position] = replacement;
        if let Ok(decoded) = decode_control(&bytes) {
            prop_assert_eq!(decoded.validate(), Ok(()));
        }
        let cut = cut.index(bytes.len());
        let _ = decode_control(&bytes[..cut]);
    }

    /// Arbitrary bytes in arbitrary pushes: the decoder never panics, stays within its bound,
    /// and after its first error keeps returning that error.
    #[test]
    fn frame_decoder_survives_any_stream(
        pushes in vec(vec(any::<u8>(), 0..64), 0..32),
        frame_bytes_max in 1..300usize,
    ) {
        let mut decoder = FrameDecoder::new(frame_bytes_max);
        let mut first_error = None;
        for piece in &pushes {
            decoder.push(piece);
            prop_assert!(decoder.buffered_len() <= 4 + frame_bytes_max + piece.len());
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        prop_assert!(frame.payload.len() < frame_bytes_max, "kind byte + payload within the maximum");
                        prop_assert!(first_error.is_none());
                    }
                    Ok(None) => break,
                    Err(error) => {
                        match &first_error {
                            None => first_error = Some(error),
                            Some(first) => prop_assert_eq!(&error, first),
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Garbage bodies under a valid zstd header: an error or exactly raw_len bytes, never more.
    #[test]
    fn decompress_survives_garbage_bodies(
        garbage in vec(any::<u8>(), 1..512),
        zstd_magic in any::<bool>(),
        raw_len in 1..8192u32,
    ) {
        let mut body = garbage;
        if zstd_magic {
            // Get past the magic-number check into zstd's frame parser.
            body.splice(0..0, [0x28, 0xb5, 0x2f, 0xfd]);
        }
        let header = ChunkHeader {
            lane: Lane::Media,
            codec: Codec::Zstd,
            seq: 1,
            record_count: 1,
            raw_len,
            body_len: body.len() as u32,
            dict_id: NO_DICTIONARY,
            body_crc32c: crc32c::crc32c(&body),
        };
        if let Ok(raw) = ChunkDecompressor::new().decompress(&header, &body) {
            prop_assert_eq!(raw.len(), raw_len as usize);
        }
    }

    /// Real zstd frames with a changed byte, and with a raw_len claim that may be wrong.
    #[test]
    fn decompress_survives_corrupted_frames(
        position in any::<prop::sample::Index>(),
        flip in 1..=255u8,
        raw_len_delta in -2i64..=2,
    ) {
        let bytes = zstd_chunk(40);
        let (mut header, body) = decode_chunk(&bytes).expect("valid");
        let mut body = body.to_vec();
        let position = position.index(body.len());
        body[position] ^= flip;
        header.raw_len = (i64::from(header.raw_len) + raw_len_delta) as u32;
        header.body_crc32c = crc32c::crc32c(&body);
        if let Ok(raw) = ChunkDecompressor::new().decompress(&header, &body) {
            prop_assert_eq!(raw.len(), header.raw_len as usize);
        }
    }
}

#[test]
fn a_length_prefix_of_u32_max_fails_without_buffering() {
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    decoder.push(&u32::MAX.to_le_bytes());
    assert_eq!(decoder.buffered_len(), 0);
    let expected = DecodeError::FrameTooLarge { length: u32::MAX, max: FRAME_BYTES_MAX };
    assert_eq!(decoder.next_frame(), Err(expected.clone()));
    assert_eq!(decoder.error(), Some(&expected));
    // Poisoned: more bytes are dropped, the same error comes back.
    decoder.push(&[1, 0, 0, 0, 1]);
    assert_eq!(decoder.buffered_len(), 0);
    assert_eq!(decoder.next_frame(), Err(expected));
}

#[test]
fn an_oversized_prefix_is_refused_before_its_body_arrives() {
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    let length = FRAME_BYTES_MAX as u32 + 1;
    decoder.push(&length.to_le_bytes()[..3]);
    assert_eq!(decoder.next_frame(), Ok(None));
    decoder.push(&length.to_le_bytes()[3..]);
    assert_eq!(decoder.next_frame(), Err(DecodeError::FrameTooLarge { length, max: FRAME_BYTES_MAX }));
}

#[test]
fn a_control_frame_announcing_a_chunk_sized_length_is_refused_at_its_kind_byte() {
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    let length = 1 + CONTROL_MESSAGE_BYTES_MAX as u32 + 1;
    let mut prefix = length.to_le_bytes().to_vec();
    prefix.push(FrameKind::Control.id());
    decoder.push(&prefix);
    assert_eq!(decoder.buffered_len(), 0);
    assert_eq!(
        decoder.next_frame(),
        Err(DecodeError::FrameTooLargeForKind {
            kind: FrameKind::Control,
            length,
            max: 1 + CONTROL_MESSAGE_BYTES_MAX
        })
    );
}

#[test]
fn decompress_never_allocates_past_raw_len_for_a_lying_header() {
    // A real frame of N bytes under a header claiming fewer: zstd stops at the capacity.
    let bytes = zstd_chunk(200);
    let (mut header, body) = decode_chunk(&bytes).expect("valid");
    let true_len = header.raw_len;
    header.raw_len = true_len / 2;
    assert_eq!(
        ChunkDecompressor::new().decompress(&header, body),
        Err(DecodeError::DecompressedLengthMismatch { raw_len: true_len / 2, found: u64::from(true_len) })
    );
}

#[test]
fn decode_records_does_not_trust_the_header_count_for_allocation() {
    // 65 536 claimed records in a 17-byte block: capacity is bounded by the block, and the
    // mismatch is reported.
    let mut raw = Vec::new();
    raw.extend_from_slice(&1u16.to_le_bytes());
    raw.push(b'k');
    raw.extend_from_slice(&0u64.to_le_bytes());
    raw.push(1);
    raw.push(b't');
    raw.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(raw.len(), RECORD_BYTES_MIN);
    let header = ChunkHeader {
        lane: Lane::Sensor,
        codec: Codec::Raw,
        seq: 1,
        record_count: CHUNK_RECORDS_MAX,
        raw_len: raw.len() as u32,
        body_len: raw.len() as u32,
        dict_id: 0,
        body_crc32c: 0,
    };
    assert_eq!(
        decode_records(&header, &raw),
        Err(DecodeError::RecordCountMismatch { declared: CHUNK_RECORDS_MAX, found: 1 })
    );
}
