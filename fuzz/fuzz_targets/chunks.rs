//! A chunk as the sink receives it: header, CRCs, decompression (without and with a
//! dictionary) and the record block. Never panics; whatever decodes stays within the bounds.
//!
//! The CRCs would stop a fuzzer at the header, so inputs come in two shapes: arbitrary bytes
//! whose CRCs are fixed up (so the fields behind them are explored), and real zstd bodies of
//! arbitrary records, damaged at chosen places, under a valid header.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use protocol::{
    CHUNK_HEADER_LEN, CHUNK_RAW_BYTES_MAX, ChunkCompressor, ChunkDecompressor, Lane, SealedChunk,
    decode_chunk, decode_records, records,
};

#[derive(Arbitrary, Debug)]
enum Input {
    Bytes { bytes: Vec<u8>, fix_crcs: bool, dictionary: Option<Vec<u8>> },
    Compressed { raw: Vec<u8>, record_count: u32, damage: Vec<(u16, u8)> },
}

const BODY_CRC: usize = 32;
const HEADER_CRC: usize = 36;

fn check(bytes: &[u8], dictionary: Option<&[u8]>) {
    let Ok((header, body)) = decode_chunk(bytes) else { return };
    let mut decompressor = ChunkDecompressor::new();
    if let Some(dictionary) = dictionary {
        let _ = decompressor.add_dictionary(header.dict_id, dictionary);
    }
    let Ok(raw) = decompressor.decompress(&header, body) else { return };
    assert_eq!(raw.len(), header.raw_len as usize);
    assert!(raw.len() <= CHUNK_RAW_BYTES_MAX);
    if let Ok(decoded) = decode_records(&header, &raw) {
        assert_eq!(decoded.len(), header.record_count as usize);
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Bytes { mut bytes, fix_crcs, dictionary } => {
            // The record iterator alone, on bytes that never passed a header.
            for record in records(&bytes).take(1024) {
                if record.is_err() {
                    break;
                }
            }
            if fix_crcs && bytes.len() >= CHUNK_HEADER_LEN {
                let body_crc = crc32c::crc32c(&bytes[CHUNK_HEADER_LEN..]);
                bytes[BODY_CRC..BODY_CRC + 4].copy_from_slice(&body_crc.to_le_bytes());
                let header_crc = crc32c::crc32c(&bytes[..HEADER_CRC]);
                bytes[HEADER_CRC..HEADER_CRC + 4].copy_from_slice(&header_crc.to_le_bytes());
            }
            check(&bytes, dictionary.as_deref());
        }
        Input::Compressed { raw, record_count, damage } => {
            let Ok((codec, mut body)) = ChunkCompressor::new(1).compress(&raw, protocol::NO_DICTIONARY)
            else {
                return;
            };
            for (position, xor) in damage.into_iter().take(8) {
                if !body.is_empty() {
                    let index = usize::from(position) % body.len();
                    body[index] ^= xor;
                }
            }
            let Ok(chunk) = SealedChunk::new(Lane::Media, codec, 0, record_count, raw.len() as u32, body)
            else {
                return;
            };
            check(&chunk.encode(1), None);
        }
    }
});
