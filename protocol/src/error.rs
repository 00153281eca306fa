//! Errors of the protocol crate, one type per direction.
//!
//! - [`DecodeError`]: bytes that came from outside broke a rule. Input is hostile until proven
//!   otherwise, so every variant names the offending value and the limit or the expectation it
//!   broke, for the log line of whoever has to find out which peer sent it.
//! - [`EncodeError`]: a value we were asked to put on the wire, or into a chunk, breaks a rule.
//! - [`CodecError`]: compression setup (dictionaries) or zstd itself failed.
//!
//! Rules that both directions enforce — the key syntax, the chunk limits, the control message
//! bounds — have one "violation" type each ([`KeyProblem`], [`ContentTypeProblem`],
//! [`ChunkViolation`], [`ControlViolation`]) that both error types wrap, so each rule and its
//! message is written once.

use thiserror::Error;

use crate::frame::FrameKind;
use crate::lane::Lane;

/// Why a record key is not acceptable. Keys become WebDataset keys and file names at the core,
/// hence the forbidden characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum KeyProblem {
    #[error("key is empty")]
    Empty,
    #[error("key is {length} bytes, maximum {max}")]
    TooLong { length: usize, max: usize },
    #[error("key is not UTF-8 (invalid byte at {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
    #[error(
        "key contains {character:?} at byte {position} (keys become WebDataset keys and tar \
         member names: printable ASCII without space, '.', '/' or '\\')"
    )]
    ForbiddenCharacter { character: char, position: usize },
}

/// Why a record content type is not acceptable: it must be a printable ASCII MIME type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum ContentTypeProblem {
    #[error("content type is empty")]
    Empty,
    #[error("content type is {length} bytes, maximum {max}")]
    TooLong { length: usize, max: usize },
    #[error("content type has byte {byte:#04x} at {position} (only printable ASCII is allowed)")]
    NotPrintableAscii { byte: u8, position: usize },
}

/// A chunk's fields break the format's rules: what [`crate::ChunkHeader::decode`] rejects and
/// what [`crate::SealedChunk::new`] refuses to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum ChunkViolation {
    #[error("seq 0 is invalid (sequence numbers start at 1)")]
    ZeroSeq,
    #[error("record_count {record_count} exceeds maximum {max}")]
    TooManyRecords { record_count: u64, max: u32 },
    #[error("raw_len {raw_len} exceeds maximum {max}")]
    RawTooLarge { raw_len: u64, max: usize },
    #[error("body_len {body_len} exceeds maximum {max}")]
    BodyTooLarge { body_len: u64, max: usize },
    #[error("codec raw requires body_len == raw_len, got body_len {body_len} and raw_len {raw_len}")]
    RawBodyLengthMismatch { body_len: u64, raw_len: u64 },
    #[error("record_count 0 requires raw_len 0, got raw_len {raw_len}")]
    EmptyChunkWithBytes { raw_len: u64 },
}

/// A control message breaks one of its bounds (see the limits in [`crate::control`]).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ControlViolation {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {length} bytes, maximum {max}")]
    TooManyBytes { field: &'static str, length: usize, max: usize },
    #[error("{field} has {count} items, maximum {max}")]
    TooManyItems { field: &'static str, count: usize, max: usize },
    #[error("{field} is {value}, allowed {min}..={max}")]
    OutOfRange { field: &'static str, value: u64, min: u64, max: u64 },
}

/// Bytes from outside broke a rule. Every decoder in this crate returns this type.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    // --- chunk header and chunk ---
    #[error("chunk header truncated: need {needed} bytes, got {available}")]
    ChunkHeaderTruncated { needed: usize, available: usize },
    #[error("bad chunk magic {found:02x?} (expected \"TC\", [54, 43])")]
    BadChunkMagic { found: [u8; 2] },
    #[error("unsupported chunk format version {found} (this build reads {supported})")]
    UnsupportedChunkVersion { found: u8, supported: u8 },
    #[error("chunk header crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderCrcMismatch { stored: u32, computed: u32 },
    #[error("unknown lane id {0} (known: 0 audit, 1 decisions, 2 sensor, 3 media)")]
    UnknownLane(u8),
    #[error("unknown codec id {0} (known: 0 raw, 1 zstd)")]
    UnknownCodec(u8),
    #[error("chunk header flags are {found:#04x}, must be 0 in chunk format version 1")]
    ChunkFlagsSet { found: u8 },
    #[error("chunk header reserved bytes are {found:#06x}, must be 0 in chunk format version 1")]
    ChunkReservedSet { found: u16 },
    #[error("invalid chunk header: {0}")]
    InvalidChunkHeader(ChunkViolation),
    #[error("chunk body length mismatch: header says {declared} bytes, {actual} bytes follow the header")]
    ChunkBodyLengthMismatch { declared: u32, actual: usize },
    #[error("chunk body crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BodyCrcMismatch { stored: u32, computed: u32 },

    // --- decompression ---
    #[error("chunk needs zstd dictionary {dict_id}, which this decompressor does not have")]
    UnknownDictionary { dict_id: u32 },
    /// zstd dictionaries carry their own id (set by the trainer), which zstd writes into each
    /// frame; it differs from the protocol's `dict_id`, which is what the header names.
    #[error(
        "zstd frame needs the zstd dictionary with internal id {frame_zstd_id}, but chunk \
         dictionary {dict_id} registered here has internal id {registered_zstd_id} (0 = none)"
    )]
    DictionaryMismatch { dict_id: u32, registered_zstd_id: u32, frame_zstd_id: u32 },
    #[error("zstd body of {body_len} bytes is not exactly one frame (the frame is {frame_len} bytes)")]
    NotOneZstdFrame { body_len: usize, frame_len: usize },
    #[error("zstd frame decodes to {found} bytes but the chunk header says raw_len {raw_len}")]
    DecompressedLengthMismatch { raw_len: u32, found: u64 },
    #[error("zstd decompression failed (dictionary {dict_id}): {reason}")]
    Decompress { dict_id: u32, reason: String },

    #[error("bad dictionary frame: {reason}")]
    BadDictionaryFrame { reason: String },

    // --- records ---
    #[error("record at offset {offset} truncated: {field} needs {needed} bytes, {available} remain")]
    RecordTruncated { offset: usize, field: &'static str, needed: usize, available: usize },
    #[error("record at offset {offset}: {problem}")]
    InvalidRecordKey { offset: usize, problem: KeyProblem },
    #[error("record at offset {offset}: {problem}")]
    InvalidContentType { offset: usize, problem: ContentTypeProblem },
    #[error("record at offset {offset}: payload is {length} bytes, maximum {max}")]
    RecordPayloadTooLarge { offset: usize, length: usize, max: usize },
    #[error("record block is {actual} bytes but the chunk header says raw_len {declared}")]
    RecordBlockLengthMismatch { declared: u32, actual: usize },
    #[error("record count mismatch: chunk header says {declared}, record block holds {found}")]
    RecordCountMismatch { declared: u32, found: usize },

    // --- control messages ---
    #[error("control message is {length} bytes, maximum {max}")]
    ControlTooLarge { length: usize, max: usize },
    #[error("control message malformed: {reason}")]
    ControlMalformed { reason: String },
    #[error("control message has {count} trailing bytes after a complete message")]
    ControlTrailingBytes { count: usize },
    #[error("unsupported protocol version {found} (this build speaks {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("invalid control message: {0}")]
    InvalidControl(ControlViolation),
    #[error("unknown error code {0} (known: 1 to 8)")]
    UnknownErrorCode(u16),

    // --- framing ---
    #[error("frame length {length} exceeds maximum {max}")]
    FrameTooLarge { length: u32, max: usize },
    #[error("{kind} frame length {length} exceeds the maximum {max} for {kind} frames")]
    FrameTooLargeForKind { kind: FrameKind, length: u32, max: usize },
    #[error("frame length 0 (every frame holds at least its kind byte)")]
    ZeroLengthFrame,
    #[error("unknown frame kind {0} (known: 1 control, 2 chunk)")]
    UnknownFrameKind(u8),
}

impl From<ChunkViolation> for DecodeError {
    fn from(violation: ChunkViolation) -> Self {
        DecodeError::InvalidChunkHeader(violation)
    }
}

impl From<ControlViolation> for DecodeError {
    fn from(violation: ControlViolation) -> Self {
        DecodeError::InvalidControl(violation)
    }
}

/// A value cannot be encoded: it breaks a rule of the format.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// `key` is a copy of the offending key, cut to at most [`ERROR_ECHO_BYTES_MAX`] bytes.
    #[error("record key {key:?} is invalid: {problem}")]
    InvalidKey { key: String, problem: KeyProblem },
    /// `content_type` is a copy cut to at most [`ERROR_ECHO_BYTES_MAX`] bytes.
    #[error("record content type {content_type:?} is invalid: {problem}")]
    InvalidContentType { content_type: String, problem: ContentTypeProblem },
    #[error("record payload is {length} bytes, maximum {max}")]
    PayloadTooLarge { length: usize, max: usize },
    #[error(
        "record of {record_bytes} bytes does not fit: the chunk holds {raw_len} of at most {max} \
         raw bytes (seal the chunk first)"
    )]
    ChunkFull { record_bytes: usize, raw_len: usize, max: usize },
    #[error("chunk already holds the maximum of {max} records (seal the chunk first)")]
    TooManyRecords { max: u32 },
    #[error("invalid chunk: {0}")]
    InvalidChunk(ChunkViolation),
    #[error("failed to compress a {lane} chunk with dictionary {dict_id}: {source}")]
    Compress { lane: Lane, dict_id: u32, source: CodecError },
    #[error("invalid control message: {0}")]
    InvalidControl(ControlViolation),
    #[error("control message failed to serialize: {reason}")]
    ControlSerialize { reason: String },
    #[error("{kind} frame payload of {length} bytes exceeds the maximum {max} for {kind} frames")]
    FrameTooLarge { kind: FrameKind, length: usize, max: usize },
}

impl From<ChunkViolation> for EncodeError {
    fn from(violation: ChunkViolation) -> Self {
        EncodeError::InvalidChunk(violation)
    }
}

impl From<ControlViolation> for EncodeError {
    fn from(violation: ControlViolation) -> Self {
        EncodeError::InvalidControl(violation)
    }
}

/// Compression setup or zstd itself failed. zstd's own errors are kept as their message (zstd
/// reports a static name per error code), which keeps this type `Clone` and comparable in tests.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum CodecError {
    #[error("dictionary id 0 is reserved for \"no dictionary\"")]
    ReservedDictionaryId,
    #[error("dictionary {dict_id} is empty")]
    EmptyDictionary { dict_id: u32 },
    #[error("dictionary {dict_id} is {length} bytes, maximum {max}")]
    DictionaryTooLarge { dict_id: u32, length: usize, max: usize },
    #[error(
        "dictionary {dict_id} is already registered with different bytes ({registered_bytes} \
         bytes registered, {offered_bytes} bytes offered)"
    )]
    DictionaryConflict { dict_id: u32, registered_bytes: usize, offered_bytes: usize },
    #[error("cannot register dictionary {dict_id}: {max} dictionaries are already registered")]
    TooManyDictionaries { dict_id: u32, max: usize },
    #[error("dictionary {dict_id} is not registered")]
    UnknownDictionary { dict_id: u32 },
    #[error("input of {length} bytes exceeds the chunk maximum of {max} raw bytes")]
    InputTooLarge { length: usize, max: usize },
    #[error("zstd failed to {operation} (dictionary {dict_id}): {reason}")]
    Zstd { operation: &'static str, dict_id: u32, reason: String },
    #[error("zstd dictionary training on {sample_count} samples failed: {reason}")]
    Training { sample_count: usize, reason: String },
}

/// How much of an offending string an [`EncodeError`] copies: enough to recognise it in a log,
/// bounded so that a hostile multi-megabyte key does not get copied into every error.
pub const ERROR_ECHO_BYTES_MAX: usize = 160;

/// Copies at most [`ERROR_ECHO_BYTES_MAX`] bytes of `text`, cut at a character boundary.
pub(crate) fn echo(text: &str) -> String {
    text[..text.floor_char_boundary(ERROR_ECHO_BYTES_MAX)].to_owned()
}
