//! A dictionary frame as a device sends it, then loaded into zstd the way the sink validates a
//! dictionary before storing it, then used to decompress a chunk that names it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{ChunkDecompressor, decode_chunk, decode_dictionary_frame, dictionary_id};

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (payload, chunk) = input;
    let Ok((dict_id, dictionary)) = decode_dictionary_frame(&payload) else { return };
    if dictionary_id(dictionary) != dict_id {
        return;
    }
    let mut decompressor = ChunkDecompressor::new();
    if decompressor.add_dictionary(dict_id, dictionary).is_err() {
        return;
    }
    if let Ok((header, body)) = decode_chunk(&chunk) {
        if let Ok(raw) = decompressor.decompress(&header, body) {
            assert_eq!(raw.len(), header.raw_len as usize);
        }
    }
});
