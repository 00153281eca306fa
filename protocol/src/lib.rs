//! Tributary's wire protocol, sans-IO.
//!
//! This crate owns every byte layout that crosses a process boundary between an appliance and
//! the core sink: lane ids ([`lane`]), the compressed chunk and its fixed 40-byte header
//! ([`chunk`]), the records inside a chunk ([`record`]), the zstd codec ([`codec`]), the
//! handshake and ack messages ([`control`]) and the stream framing that carries both
//! ([`frame`]). It does no I/O, opens no sockets and reads no clock: inputs are byte slices and
//! method calls, outputs are values and byte vectors, so every decoder can be driven by tests
//! and fuzzers with hostile input.
//!
//! Every decoder treats its input as hostile: lengths are checked against a named maximum before
//! anything is allocated, unknown versions, lanes, codecs and kinds are rejected with an error
//! that names the value, and no decoder panics on any input.
//!
//! The limits, in one place (all in bytes unless named otherwise):
//!
//! | constant | value |
//! | --- | --- |
//! | [`CHUNK_HEADER_LEN`] | 40 |
//! | [`CHUNK_RAW_BYTES_MAX`] | 4 194 304 (4 MiB) |
//! | [`CHUNK_BODY_BYTES_MAX`] | 4 194 304 |
//! | [`CHUNK_ENCODED_BYTES_MAX`] | 4 194 344 |
//! | [`CHUNK_RECORDS_MAX`] | 65 536 records |
//! | [`RECORD_KEY_BYTES_MAX`] | 80 |
//! | [`CONTENT_TYPE_BYTES_MAX`] | 64 |
//! | [`RECORD_PAYLOAD_BYTES_MAX`] | 4 194 145 |
//! | [`CONTROL_MESSAGE_BYTES_MAX`] | 2 048 |
//! | [`FRAME_BYTES_MAX`] | 4 194 345 |
//! | [`DEVICE_ID_BYTES_MAX`] | 128 |
//! | [`CONTROL_LIST_ITEMS_MAX`] | 64 items |
//! | [`ERROR_REASON_BYTES_MAX`] | 1 024 |
//! | [`DICTIONARY_BYTES_MAX`] | 1 048 576 (1 MiB) |
//! | [`DICTIONARIES_MAX`] | 64 dictionaries |

/// Implements serde for a wire enum as its numeric id (`id()` / `from_id()`), so the encoding
/// stays stable when variants are reordered or renamed, and an unknown id is rejected by the
/// decoder instead of being mapped to some variant.
macro_rules! serde_as_wire_id {
    ($type:ty, $id:ty, $serialize:ident) => {
        impl serde::Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.$serialize(self.id())
            }
        }

        impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let id = <$id as serde::Deserialize>::deserialize(deserializer)?;
                <$type>::from_id(id).map_err(serde::de::Error::custom)
            }
        }
    };
}

pub mod chunk;
pub mod codec;
pub mod control;
pub mod error;
pub mod evidence;
pub mod frame;
pub mod lane;
pub mod record;

pub use chunk::{
    CHUNK_BODY_BYTES_MAX, CHUNK_ENCODED_BYTES_MAX, CHUNK_FORMAT_VERSION, CHUNK_HEADER_LEN, CHUNK_MAGIC,
    CHUNK_RAW_BYTES_MAX, CHUNK_RECORDS_MAX, ChunkHeader, SealedChunk, decode_chunk, restamp_seq,
};
pub use codec::{
    ChunkCompressor, ChunkDecompressor, Codec, DICTIONARIES_MAX, DICTIONARY_BYTES_MAX, NO_DICTIONARY,
    dictionary_id, train_dictionary,
};
pub use control::{
    Ack, CONTROL_LIST_ITEMS_MAX, CONTROL_MESSAGE_BYTES_MAX, ControlMessage, DEVICE_ID_BYTES_MAX,
    ERROR_REASON_BYTES_MAX, ErrorCode, ErrorMessage, Hello, LaneDictionary, LaneResume, SessionLimits,
    Welcome, decode_control, encode_control,
};
pub use error::{
    ChunkViolation, CodecError, ContentTypeProblem, ControlViolation, DecodeError, ERROR_ECHO_BYTES_MAX,
    EncodeError, KeyProblem,
};
pub use frame::{
    DICTIONARY_FRAME_PAYLOAD_BYTES_MAX, FRAME_BYTES_MAX, FRAME_KIND_BYTES, FRAME_LENGTH_PREFIX_BYTES, Frame,
    FrameDecoder, FrameKind, decode_dictionary_frame, dictionary_frame_payload, encode_frame,
};
pub use lane::{Lane, ParseLaneError};
pub use record::{
    CONTENT_TYPE_BYTES_MAX, ChunkBuilder, RECORD_BYTES_MIN, RECORD_FIXED_BYTES, RECORD_KEY_BYTES_MAX,
    RECORD_OVERHEAD_BYTES_MAX, RECORD_PAYLOAD_BYTES_MAX, Record, RecordIter, RecordRef, decode_records,
    records, validate_content_type, validate_key,
};

/// The protocol version this build speaks, carried in `Hello` and `Welcome`. A peer that sends
/// any other version is refused with [`DecodeError::UnsupportedVersion`]; there is no
/// negotiation. Version 2 added the ring identity to `Hello`.
pub const PROTOCOL_VERSION: u16 = 2;
