//! Round trips: whatever the encoders produce, the decoders give back unchanged.

mod common;

use common::*;
use proptest::collection::vec;
use proptest::prelude::*;
use protocol::*;

proptest! {
    #[test]
    fn chunk_header_round_trips(header in valid_header()) {
        let bytes = header.encode();
        prop_assert_eq!(ChunkHeader::decode(&bytes), Ok(header));
        prop_assert_eq!(header.encoded_len(), CHUNK_HEADER_LEN + header.body_len as usize);
    }

    #[test]
    fn sealed_chunk_round_trips(
        lane in lane(),
        codec in codec(),
        dict_id in any::<u32>(),
        record_count in 1..=CHUNK_RECORDS_MAX,
        raw_len in 0..100_000u32,
        body in vec(any::<u8>(), 0..2048),
        seq in 1..=u64::MAX,
    ) {
        let raw_len = if codec == Codec::Raw { body.len() as u32 } else { raw_len };
        let chunk = SealedChunk::new(lane, codec, dict_id, record_count, raw_len, body.clone())
            .expect("valid parts");
        prop_assert_eq!(chunk.body_crc32c, crc32c::crc32c(&body));
        let bytes = chunk.encode(seq);
        prop_assert_eq!(bytes.len(), chunk.encoded_len());
        let (header, decoded_body) = decode_chunk(&bytes).expect("valid chunk");
        prop_assert_eq!(header, chunk.header(seq));
        prop_assert_eq!(decoded_body, &body[..]);
        prop_assert_eq!(SealedChunk::from_encoded(&bytes), Ok((seq, chunk)));
    }

    /// Valid records → ChunkBuilder → seal (zstd when it shrinks, raw otherwise, with or
    /// without a dictionary) → encode → decode_chunk → decompress → decode_records: the same
    /// records come back.
    #[test]
    fn records_round_trip_through_a_sealed_chunk(
        lane in lane(),
        records_in in vec(valid_record(), 0..24),
        level in 1..=6i32,
        use_dictionary in any::<bool>(),
        seq in 1..=u64::MAX,
    ) {
        const DICT_ID: u32 = 17;
        let dictionary = b"{\"sensor\":\"temp\",\"value\":application/json image/jpeg";
        let mut compressor = ChunkCompressor::new(level);
        let mut decompressor = ChunkDecompressor::new();
        compressor.add_dictionary(DICT_ID, dictionary).expect("valid dictionary");
        decompressor.add_dictionary(DICT_ID, dictionary).expect("valid dictionary");
        let dict_id = if use_dictionary { DICT_ID } else { NO_DICTIONARY };

        let mut builder = ChunkBuilder::new(lane, CHUNK_RAW_BYTES_MAX);
        for record in &records_in {
            builder.push(record.as_ref()).expect("valid record");
        }
        let raw_len = builder.raw_len();
        prop_assert_eq!(
            raw_len,
            records_in.iter().map(|record| record.as_ref().encoded_len()).sum::<usize>()
        );
        let chunk = builder.seal(&mut compressor, dict_id).expect("seals");
        prop_assert!(builder.is_empty());
        prop_assert_eq!(builder.raw_len(), 0);
        prop_assert_eq!(chunk.raw_len as usize, raw_len);
        prop_assert_eq!(chunk.record_count as usize, records_in.len());
        match chunk.codec {
            Codec::Zstd => prop_assert!(chunk.body.len() < raw_len),
            Codec::Raw => prop_assert_eq!(chunk.body.len(), raw_len),
        }

        let bytes = chunk.encode(seq);
        let (header, body) = decode_chunk(&bytes).expect("valid chunk");
        let raw = decompressor.decompress(&header, body).expect("decompresses");
        prop_assert_eq!(raw.len(), raw_len);
        let decoded: Vec<Record> = decode_records(&header, &raw)
            .expect("valid records")
            .iter()
            .map(RecordRef::to_owned)
            .collect();
        prop_assert_eq!(decoded, records_in);
    }

    #[test]
    fn compressor_output_decompresses_to_the_input(raw in payload(), level in -5..=9i32) {
        let mut compressor = ChunkCompressor::new(level);
        let (codec, body) = compressor.compress(&raw, NO_DICTIONARY).expect("compresses");
        match codec {
            Codec::Zstd => prop_assert!(body.len() < raw.len()),
            Codec::Raw => prop_assert_eq!(&body, &raw),
        }
        // A made-up header: the codec does not look at record counts beyond the chunk rules.
        let header = ChunkHeader {
            lane: Lane::Media,
            codec,
            seq: 1,
            record_count: 1,
            raw_len: raw.len() as u32,
            body_len: body.len() as u32,
            dict_id: NO_DICTIONARY,
            body_crc32c: crc32c::crc32c(&body),
        };
        prop_assert_eq!(ChunkDecompressor::new().decompress(&header, &body), Ok(raw));
    }

    #[test]
    fn control_messages_round_trip(message in valid_control_message()) {
        let bytes = encode_control(&message).expect("valid message");
        prop_assert!(bytes.len() <= CONTROL_MESSAGE_BYTES_MAX);
        prop_assert_eq!(decode_control(&bytes), Ok(message));
    }

    /// Frames survive any split of the byte stream into pushes, and the decoder never holds
    /// more than one frame plus the last push.
    #[test]
    fn frames_round_trip_across_arbitrary_splits(
        frames in vec(
            (
                prop_oneof![Just(FrameKind::Control), Just(FrameKind::Chunk)],
                vec(any::<u8>(), 0..600),
            ),
            0..12,
        ),
        split_lengths in vec(1..700usize, 1..40),
    ) {
        let mut stream = Vec::new();
        for (kind, payload) in &frames {
            encode_frame(*kind, payload, &mut stream).expect("small payload");
        }
        let frame_bytes_max = 601;
        let mut decoder = FrameDecoder::new(frame_bytes_max);
        let mut decoded = Vec::new();
        let mut rest = &stream[..];
        let mut splits = split_lengths.iter().cycle();
        while !rest.is_empty() {
            let length = (*splits.next().expect("cycle never ends")).min(rest.len());
            let (piece, remaining) = rest.split_at(length);
            rest = remaining;
            decoder.push(piece);
            prop_assert!(decoder.buffered_len() <= 4 + frame_bytes_max + piece.len());
            while let Some(frame) = decoder.next_frame().expect("valid stream") {
                decoded.push((frame.kind, frame.payload));
            }
        }
        prop_assert_eq!(decoder.buffered_len(), 0);
        prop_assert_eq!(decoded, frames);
    }

    /// A chunk travels as a frame: frame → decoder → decode_chunk gives the chunk back.
    #[test]
    fn chunk_frames_carry_chunks(body in vec(any::<u8>(), 0..3000), seq in 1..=u64::MAX) {
        let chunk = SealedChunk::new(Lane::Decisions, Codec::Raw, 0, 1, body.len() as u32, body)
            .expect("valid");
        let mut stream = Vec::new();
        encode_frame(FrameKind::Chunk, &chunk.encode(seq), &mut stream).expect("fits");
        let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
        decoder.push(&stream);
        let frame = decoder.next_frame().expect("valid").expect("complete");
        prop_assert_eq!(frame.kind, FrameKind::Chunk);
        prop_assert_eq!(SealedChunk::from_encoded(&frame.payload), Ok((seq, chunk)));
        prop_assert_eq!(decoder.next_frame(), Ok(None));
    }
}

#[test]
fn a_largest_chunk_fits_the_largest_frame() {
    let body = vec![0x5a; CHUNK_BODY_BYTES_MAX];
    let chunk =
        SealedChunk::new(Lane::Media, Codec::Raw, 0, 1, CHUNK_RAW_BYTES_MAX as u32, body).expect("valid");
    let encoded = chunk.encode(u64::MAX);
    assert_eq!(encoded.len(), CHUNK_ENCODED_BYTES_MAX);
    let mut stream = Vec::new();
    encode_frame(FrameKind::Chunk, &encoded, &mut stream).expect("fits");
    assert_eq!(stream.len(), 4 + FRAME_BYTES_MAX);
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    decoder.push(&stream);
    let frame = decoder.next_frame().expect("valid").expect("complete");
    assert_eq!(frame.payload, encoded);
}
