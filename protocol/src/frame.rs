//! Stream framing: how control messages and chunks travel on a byte stream.
//!
//! ```text
//! size     field
//! 4        length   u32 little-endian: bytes of kind + payload, 1..=FRAME_BYTES_MAX
//! 1        kind     1 = control, 2 = chunk, 3 = dictionary
//! length-1 payload  control:    one postcard ControlMessage (<= CONTROL_MESSAGE_BYTES_MAX = 2 048)
//!                   chunk:      one encoded chunk, header ‖ body (<= CHUNK_ENCODED_BYTES_MAX = 4 194 344)
//!                   dictionary: dict_id u32 LE ‖ zstd dictionary bytes (<= 4 + DICTIONARY_BYTES_MAX)
//! ```
//!
//! A dictionary frame travels on a lane stream before the first chunk of that session that
//! names its `dict_id`, so the sink holds every dictionary a chunk needs before it acks the
//! chunk. `dict_id` is derived from the bytes ([`dictionary_id`]), which lets the sink check it.
//!
//! [`FRAME_BYTES_MAX`] is 4 194 345 (one kind byte plus the largest chunk). A session may agree on
//! a smaller maximum (`SessionLimits.frame_bytes_max`), which is what a [`FrameDecoder`] is
//! built with. The decoder checks the length prefix against that maximum, and the kind byte and
//! the per-kind maximum, before buffering any of the payload: a peer announcing 4 GiB costs
//! five bytes, not an allocation.
//!
//! Memory bound of a [`FrameDecoder`]: it buffers less than one whole frame between calls, as
//! long as its owner drains it ([`FrameDecoder::next_frame`] until `Ok(None)` or an error)
//! after every [`FrameDecoder::push`], which `push` asserts. So [`FrameDecoder::buffered_len`]
//! stays at most `4 + frame_bytes_max + (bytes of the last push)`.

use std::fmt;

use crate::chunk::CHUNK_ENCODED_BYTES_MAX;
use crate::codec::{DICTIONARY_BYTES_MAX, NO_DICTIONARY, dictionary_id};
use crate::control::CONTROL_MESSAGE_BYTES_MAX;
use crate::error::{DecodeError, EncodeError};

/// Bytes of the length prefix.
pub const FRAME_LENGTH_PREFIX_BYTES: usize = 4;
/// Bytes of the kind field.
pub const FRAME_KIND_BYTES: usize = 1;
/// Largest frame length (kind + payload): a kind byte and the largest encoded chunk.
pub const FRAME_BYTES_MAX: usize = FRAME_KIND_BYTES + CHUNK_ENCODED_BYTES_MAX;

const _: () = assert!(FRAME_BYTES_MAX >= FRAME_KIND_BYTES + CONTROL_MESSAGE_BYTES_MAX);
const _: () = assert!(FRAME_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(FRAME_BYTES_MAX == 4_194_345);

/// Largest dictionary frame payload: the id and the largest dictionary.
pub const DICTIONARY_FRAME_PAYLOAD_BYTES_MAX: usize = 4 + DICTIONARY_BYTES_MAX;
const _: () = assert!(FRAME_BYTES_MAX >= FRAME_KIND_BYTES + DICTIONARY_FRAME_PAYLOAD_BYTES_MAX);

/// The payload of a dictionary frame: `dict_id ‖ dictionary`.
pub fn dictionary_frame_payload(dict_id: u32, dictionary: &[u8]) -> Vec<u8> {
    assert_eq!(dict_id, dictionary_id(dictionary), "dict_id must be the dictionary's content id");
    let mut payload = Vec::with_capacity(4 + dictionary.len());
    payload.extend_from_slice(&dict_id.to_le_bytes());
    payload.extend_from_slice(dictionary);
    payload
}

/// Splits a dictionary frame payload into its id and bytes, checking the bounds and that the id
/// is the dictionary's content id.
pub fn decode_dictionary_frame(payload: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    let Some((id_bytes, dictionary)) = payload.split_first_chunk::<4>() else {
        return Err(DecodeError::BadDictionaryFrame { reason: "shorter than its 4-byte id".into() });
    };
    let dict_id = u32::from_le_bytes(*id_bytes);
    if dict_id == NO_DICTIONARY {
        return Err(DecodeError::BadDictionaryFrame { reason: "dict_id 0 means no dictionary".into() });
    }
    if dictionary.is_empty() || dictionary.len() > DICTIONARY_BYTES_MAX {
        return Err(DecodeError::BadDictionaryFrame {
            reason: format!("dictionary of {} bytes, expected 1..={DICTIONARY_BYTES_MAX}", dictionary.len()),
        });
    }
    let expected = dictionary_id(dictionary);
    if dict_id != expected {
        return Err(DecodeError::BadDictionaryFrame {
            reason: format!("dict_id {dict_id} is not the content id {expected} of its bytes"),
        });
    }
    Ok((dict_id, dictionary))
}

/// What a frame carries. The discriminant is the wire id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    Control = 1,
    Chunk = 2,
    Dictionary = 3,
}

impl FrameKind {
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The kind with wire id `id`, or [`DecodeError::UnknownFrameKind`].
    pub fn from_id(id: u8) -> Result<FrameKind, DecodeError> {
        match id {
            1 => Ok(FrameKind::Control),
            2 => Ok(FrameKind::Chunk),
            3 => Ok(FrameKind::Dictionary),
            _ => Err(DecodeError::UnknownFrameKind(id)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Control => "control",
            FrameKind::Chunk => "chunk",
            FrameKind::Dictionary => "dictionary",
        }
    }

    /// Largest payload a frame of this kind may carry.
    pub fn payload_bytes_max(self) -> usize {
        match self {
            FrameKind::Control => CONTROL_MESSAGE_BYTES_MAX,
            FrameKind::Chunk => CHUNK_ENCODED_BYTES_MAX,
            FrameKind::Dictionary => DICTIONARY_FRAME_PAYLOAD_BYTES_MAX,
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// Appends one frame (length ‖ kind ‖ payload) to `out`. Refuses a payload larger than its
/// kind allows; `out` is unchanged on error.
pub fn encode_frame(kind: FrameKind, payload: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let max = kind.payload_bytes_max();
    if payload.len() > max {
        return Err(EncodeError::FrameTooLarge { kind, length: payload.len(), max });
    }
    let length = u32::try_from(FRAME_KIND_BYTES + payload.len()).expect("bounded by FRAME_BYTES_MAX");
    out.reserve(FRAME_LENGTH_PREFIX_BYTES + FRAME_KIND_BYTES + payload.len());
    out.extend_from_slice(&length.to_le_bytes());
    out.push(kind.id());
    out.extend_from_slice(payload);
    Ok(())
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

/// Sans-IO incremental decoder: feed it bytes as they arrive, pull whole frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    frame_bytes_max: usize,
    /// Received bytes; the undecoded ones are `buffer[start..]`.
    buffer: Vec<u8>,
    start: usize,
    /// Set by the first error; the decoder then refuses everything with that error, because a
    /// byte stream that lost its framing cannot be resynchronised.
    poisoned: Option<DecodeError>,
}

/// What the buffered bytes hold.
enum Buffered {
    /// Not a whole frame yet.
    Partial,
    /// A whole frame of `length` bytes (kind + payload) after the prefix.
    Frame { kind: FrameKind, length: usize },
}

impl FrameDecoder {
    /// A decoder accepting frames up to `frame_bytes_max` bytes (kind + payload), which must be
    /// in `1..=FRAME_BYTES_MAX`.
    pub fn new(frame_bytes_max: usize) -> Self {
        assert!(
            (1..=FRAME_BYTES_MAX).contains(&frame_bytes_max),
            "frame_bytes_max {frame_bytes_max} outside 1..={FRAME_BYTES_MAX}"
        );
        FrameDecoder { frame_bytes_max, buffer: Vec::new(), start: 0, poisoned: None }
    }

    pub fn frame_bytes_max(&self) -> usize {
        self.frame_bytes_max
    }

    /// Buffers `bytes`. The owner must have drained the decoder first (called
    /// [`FrameDecoder::next_frame`] until it returned `Ok(None)` or an error), which keeps the
    /// buffer under one frame plus one push; pushing while a whole frame waits panics. A bad
    /// length prefix or kind is detected here already, and poisons the decoder without
    /// buffering anything more.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.poisoned.is_some() {
            return;
        }
        assert!(
            matches!(self.examine(), Ok(Buffered::Partial)),
            "FrameDecoder::push called while a whole frame or an error was waiting: call \
             next_frame until it returns Ok(None) before pushing more"
        );
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
        if let Err(error) = self.examine() {
            self.poison(error);
        }
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed, or an error
    /// (length over the maximum, checked from the 4-byte prefix before buffering the body;
    /// unknown kind; zero length). After an error the decoder is poisoned and keeps returning
    /// the same error.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if let Some(error) = &self.poisoned {
            return Err(error.clone());
        }
        match self.examine() {
            Err(error) => {
                self.poison(error.clone());
                Err(error)
            }
            Ok(Buffered::Partial) => Ok(None),
            Ok(Buffered::Frame { kind, length }) => {
                let payload_start = self.start + FRAME_LENGTH_PREFIX_BYTES + FRAME_KIND_BYTES;
                let frame_end = self.start + FRAME_LENGTH_PREFIX_BYTES + length;
                let payload = self.buffer[payload_start..frame_end].to_vec();
                self.start = frame_end;
                if self.start == self.buffer.len() {
                    self.buffer.clear();
                    self.start = 0;
                }
                Ok(Some(Frame { kind, payload }))
            }
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// The decoder's error, if it has seen one.
    pub fn error(&self) -> Option<&DecodeError> {
        self.poisoned.as_ref()
    }

    fn poison(&mut self, error: DecodeError) {
        self.poisoned = Some(error);
        // Nothing buffered can be decoded any more; give the memory back.
        self.buffer = Vec::new();
        self.start = 0;
    }

    /// Looks at the buffered bytes without consuming them. Validates the prefix and the kind
    /// as soon as they are there, so an oversized frame is refused before its body arrives.
    fn examine(&self) -> Result<Buffered, DecodeError> {
        let pending = &self.buffer[self.start..];
        let Some((prefix, rest)) = pending.split_first_chunk::<FRAME_LENGTH_PREFIX_BYTES>() else {
            return Ok(Buffered::Partial);
        };
        let length = u32::from_le_bytes(*prefix);
        if length == 0 {
            return Err(DecodeError::ZeroLengthFrame);
        }
        if length as usize > self.frame_bytes_max {
            return Err(DecodeError::FrameTooLarge { length, max: self.frame_bytes_max });
        }
        let Some(&kind_id) = rest.first() else {
            return Ok(Buffered::Partial);
        };
        let kind = FrameKind::from_id(kind_id)?;
        let kind_max = FRAME_KIND_BYTES + kind.payload_bytes_max();
        if length as usize > kind_max {
            return Err(DecodeError::FrameTooLargeForKind { kind, length, max: kind_max });
        }
        let length = length as usize;
        if rest.len() < length {
            return Ok(Buffered::Partial);
        }
        Ok(Buffered::Frame { kind, length })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_layout_is_the_documented_one() {
        let mut out = Vec::new();
        encode_frame(FrameKind::Chunk, b"abc", &mut out).expect("small");
        assert_eq!(out, [4, 0, 0, 0, 2, b'a', b'b', b'c']);
    }

    #[test]
    fn decoder_yields_frames_pushed_byte_by_byte() {
        let mut stream = Vec::new();
        encode_frame(FrameKind::Control, b"hello", &mut stream).expect("small");
        encode_frame(FrameKind::Chunk, b"", &mut stream).expect("small");
        let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
        let mut frames = Vec::new();
        for byte in stream {
            decoder.push(&[byte]);
            while let Some(frame) = decoder.next_frame().expect("valid stream") {
                frames.push(frame);
            }
        }
        assert_eq!(
            frames,
            [
                Frame { kind: FrameKind::Control, payload: b"hello".to_vec() },
                Frame { kind: FrameKind::Chunk, payload: Vec::new() }
            ]
        );
        assert_eq!(decoder.buffered_len(), 0);
    }

    #[test]
    fn oversized_payloads_are_refused_on_encode() {
        let payload = vec![0u8; CONTROL_MESSAGE_BYTES_MAX + 1];
        let mut out = Vec::new();
        assert_eq!(
            encode_frame(FrameKind::Control, &payload, &mut out),
            Err(EncodeError::FrameTooLarge {
                kind: FrameKind::Control,
                length: CONTROL_MESSAGE_BYTES_MAX + 1,
                max: CONTROL_MESSAGE_BYTES_MAX
            })
        );
        assert!(out.is_empty());
    }

    #[test]
    fn error_poisons_and_frees_the_buffer() {
        let mut decoder = FrameDecoder::new(100);
        decoder.push(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        let expected = DecodeError::FrameTooLarge { length: u32::MAX, max: 100 };
        assert_eq!(decoder.buffered_len(), 0);
        assert_eq!(decoder.next_frame(), Err(expected.clone()));
        decoder.push(&[1, 0, 0, 0, 1]);
        assert_eq!(decoder.next_frame(), Err(expected));
        assert_eq!(decoder.buffered_len(), 0);
    }
}
