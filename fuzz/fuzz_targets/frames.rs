//! The incremental frame decoder on arbitrary bytes in arbitrary pieces: never panics, never
//! buffers more than one frame plus one push, never returns a frame over the bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{FRAME_BYTES_MAX, FrameDecoder};

fuzz_target!(|input: (u32, Vec<Vec<u8>>)| {
    let (bound, pushes) = input;
    let frame_bytes_max = 1 + bound as usize % FRAME_BYTES_MAX;
    let mut decoder = FrameDecoder::new(frame_bytes_max);
    for piece in pushes {
        decoder.push(&piece);
        assert!(decoder.buffered_len() <= 4 + frame_bytes_max + piece.len());
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(1 + frame.payload.len() <= frame_bytes_max);
                    assert!(frame.payload.len() <= frame.kind.payload_bytes_max());
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(decoder.error().is_some());
                    assert_eq!(decoder.buffered_len(), 0);
                    return;
                }
            }
        }
    }
});
