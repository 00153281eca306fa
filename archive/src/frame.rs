//! Length-prefixed, checksummed frames: the on-disk unit of the entries file and the checkpoints
//! file.
//!
//! ```text
//! file  := magic (8 bytes, names the file kind and format version) ‖ frame*
//! frame := payload length u32 LE ‖ crc32c(payload) u32 LE ‖ payload
//! ```
//!
//! Readers treat the bytes as hostile: the length is checked against the caller's bound before
//! anything is allocated, the checksum before the payload is used. A frame cut short by the end of
//! the file is reported as torn (a crash during an append), not as an error, so that the caller
//! decides whether a torn tail is acceptable where it is found.

use std::io::{self, Read};

/// Bytes of a frame header: length and checksum.
pub const FRAME_HEADER_BYTES: usize = 8;
/// Bytes of a file's magic.
pub const MAGIC_BYTES: usize = 8;

/// What [`read_frame`] found at its position.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameRead {
    Frame(Vec<u8>),
    /// The end of the file, exactly at a frame boundary.
    End,
    /// The file ends inside a frame: `bytes` of it are present.
    Torn {
        bytes: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame claims {length} bytes, above the limit of {max}")]
    TooLarge { length: u64, max: usize },
    #[error("frame checksum mismatch")]
    Checksum,
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// Encodes one frame.
pub fn encode_frame(payload: &[u8], payload_bytes_max: usize) -> Vec<u8> {
    assert!(
        payload.len() <= payload_bytes_max,
        "frame payload of {} bytes above {payload_bytes_max}",
        payload.len()
    );
    let length = u32::try_from(payload.len()).expect("bounded above");
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    frame.extend_from_slice(&length.to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Reads as many bytes as are there, up to `buffer.len()`.
fn read_up_to<R: Read>(reader: &mut R, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Reads the next frame, refusing payloads above `payload_bytes_max` before allocating them.
pub fn read_frame<R: Read>(reader: &mut R, payload_bytes_max: usize) -> Result<FrameRead, FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let filled = read_up_to(reader, &mut header)?;
    if filled == 0 {
        return Ok(FrameRead::End);
    }
    if filled < FRAME_HEADER_BYTES {
        return Ok(FrameRead::Torn { bytes: filled as u64 });
    }
    let length = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let checksum = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if length as usize > payload_bytes_max {
        return Err(FrameError::TooLarge { length: u64::from(length), max: payload_bytes_max });
    }
    let mut payload = vec![0u8; length as usize];
    let filled = read_up_to(reader, &mut payload)?;
    if filled < payload.len() {
        return Ok(FrameRead::Torn { bytes: (FRAME_HEADER_BYTES + filled) as u64 });
    }
    if crc32c::crc32c(&payload) != checksum {
        return Err(FrameError::Checksum);
    }
    Ok(FrameRead::Frame(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8], max: usize) -> Result<(Vec<Vec<u8>>, FrameRead), FrameError> {
        let mut reader = bytes;
        let mut frames = Vec::new();
        loop {
            match read_frame(&mut reader, max)? {
                FrameRead::Frame(payload) => frames.push(payload),
                other => return Ok((frames, other)),
            }
        }
    }

    #[test]
    fn round_trip_torn_and_corrupt() {
        let mut bytes = encode_frame(b"first", 64);
        bytes.extend(encode_frame(b"", 64));
        bytes.extend(encode_frame(b"third", 64));
        let (frames, end) = read_all(&bytes, 64).unwrap();
        assert_eq!(frames, vec![b"first".to_vec(), Vec::new(), b"third".to_vec()]);
        assert_eq!(end, FrameRead::End);
        // Every cut inside the last frame is a torn tail after the first two frames.
        let last_start = bytes.len() - (FRAME_HEADER_BYTES + 5);
        for cut in last_start + 1..bytes.len() {
            let (frames, end) = read_all(&bytes[..cut], 64).unwrap();
            assert_eq!(frames.len(), 2);
            assert_eq!(end, FrameRead::Torn { bytes: (cut - last_start) as u64 });
        }
        // Every flipped bit in a payload or checksum is caught; in a length it is caught or torn.
        for position in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[position] ^= 0x10;
            let result = read_all(&flipped, 64);
            assert!(
                !matches!(&result, Ok((frames, FrameRead::End)) if frames.len() == 3),
                "flip at {position} went unnoticed"
            );
        }
        assert!(matches!(read_all(&bytes, 4), Err(FrameError::TooLarge { length: 5, max: 4 })));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x9e37_79b9_u64;
        for length in 0..3000 {
            let bytes: Vec<u8> = (0..length % 200)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (state >> 56) as u8
                })
                .collect();
            let _ = read_all(&bytes, 1024);
        }
    }
}
