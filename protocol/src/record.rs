//! Records: what a chunk's uncompressed record block holds.
//!
//! A record block is records back to back, no padding, no count (the count is in the chunk
//! header). Each record, little-endian:
//!
//! ```text
//! size                 field
//! 2                    key_len        u16, 1..=RECORD_KEY_BYTES_MAX (80)
//! key_len              key            printable ASCII '!'..='~' except '.', '/', '\'
//! 8                    timestamp_us   u64, microseconds since the Unix epoch, stamped by the source
//! 1                    content_type_len  u8, 1..=CONTENT_TYPE_BYTES_MAX (64)
//! content_type_len     content_type   printable ASCII MIME type, e.g. "image/jpeg"
//! 4                    payload_len    u32, 0..=RECORD_PAYLOAD_BYTES_MAX (4 194 145)
//! payload_len          payload        opaque bytes
//! ```
//!
//! A record therefore takes 15 fixed bytes plus its key, content type and payload: at least
//! [`RECORD_BYTES_MIN`] (17) and at most [`CHUNK_RAW_BYTES_MAX`] (4 MiB) bytes, since one record
//! must fit one chunk. The key becomes a WebDataset key and a tar member name at the core
//! (`<device>/<key>.<extension>`): dots (WebDataset splits key from extension at the first dot),
//! slashes, backslashes, spaces, non-ASCII and control characters, and keys too long for a ustar
//! name field with an extension ([`RECORD_KEY_BYTES_MAX`] + 1 + [`KEY_EXTENSION_BYTES_MAX`] ≤ 100)
//! are refused at the edge, by this one rule, rather than discovered at the sink; the sink checks
//! the same rule when it decodes, so a chunk from an older or hostile edge is rejected there.
//!
//! A record's identity across the system is (device, lane, seq, index in chunk): the chunk is
//! the unit that gets a sequence number.

use std::iter::FusedIterator;

use crate::chunk::{CHUNK_RAW_BYTES_MAX, CHUNK_RECORDS_MAX, ChunkHeader, SealedChunk};
use crate::codec::{ChunkCompressor, Codec};
use crate::error::{ContentTypeProblem, DecodeError, EncodeError, KeyProblem, echo};
use crate::lane::Lane;

/// Longest record key, in bytes: `<key>.<extension>` must fit a ustar name field (100 bytes).
pub const RECORD_KEY_BYTES_MAX: usize = 80;
/// The key rule in words, for error messages that name what was expected.
pub const KEY_RULE: &str = "1..=80 bytes of printable ASCII without space, '.', '/' or '\\'";
/// Longest file extension the core puts after a key (`json`, `jpg`, ...).
pub const KEY_EXTENSION_BYTES_MAX: usize = 19;
/// Longest content type, in bytes.
pub const CONTENT_TYPE_BYTES_MAX: usize = 64;
/// The fixed part of a record: key_len (2) + timestamp_us (8) + content_type_len (1) +
/// payload_len (4).
pub const RECORD_FIXED_BYTES: usize = 2 + 8 + 1 + 4;
/// Most bytes a record spends on anything but its payload.
pub const RECORD_OVERHEAD_BYTES_MAX: usize =
    RECORD_FIXED_BYTES + RECORD_KEY_BYTES_MAX + CONTENT_TYPE_BYTES_MAX;
/// Largest payload: a record with the longest key and content type still fits one chunk.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = CHUNK_RAW_BYTES_MAX - RECORD_OVERHEAD_BYTES_MAX;
/// Smallest encoded record (one-byte key, one-byte content type, empty payload). Bounds how many
/// records a block of a given size can claim to hold.
pub const RECORD_BYTES_MIN: usize = RECORD_FIXED_BYTES + 1 + 1;

const _: () = assert!(RECORD_KEY_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(CONTENT_TYPE_BYTES_MAX <= u8::MAX as usize);
const _: () = assert!(RECORD_OVERHEAD_BYTES_MAX < CHUNK_RAW_BYTES_MAX);
const _: () = assert!(RECORD_PAYLOAD_BYTES_MAX + RECORD_OVERHEAD_BYTES_MAX == CHUNK_RAW_BYTES_MAX);
const _: () = assert!(RECORD_PAYLOAD_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(RECORD_PAYLOAD_BYTES_MAX == 4_194_145);
const _: () = assert!(RECORD_KEY_BYTES_MAX + 1 + KEY_EXTENSION_BYTES_MAX <= 100);

/// A record borrowed from a record block or from its producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub key: &'a str,
    pub timestamp_us: u64,
    pub content_type: &'a str,
    pub payload: &'a [u8],
}

/// An owned record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub timestamp_us: u64,
    pub content_type: String,
    pub payload: Vec<u8>,
}

impl Record {
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            key: &self.key,
            timestamp_us: self.timestamp_us,
            content_type: &self.content_type,
            payload: &self.payload,
        }
    }
}

impl RecordRef<'_> {
    /// Bytes this record takes in a record block.
    pub fn encoded_len(&self) -> usize {
        RECORD_FIXED_BYTES + self.key.len() + self.content_type.len() + self.payload.len()
    }

    pub fn to_owned(&self) -> Record {
        Record {
            key: self.key.to_owned(),
            timestamp_us: self.timestamp_us,
            content_type: self.content_type.to_owned(),
            payload: self.payload.to_vec(),
        }
    }

    /// Checks key, content type and payload size against the record rules.
    pub fn validate(&self) -> Result<(), EncodeError> {
        validate_key(self.key)?;
        validate_content_type(self.content_type)?;
        if self.payload.len() > RECORD_PAYLOAD_BYTES_MAX {
            return Err(EncodeError::PayloadTooLarge {
                length: self.payload.len(),
                max: RECORD_PAYLOAD_BYTES_MAX,
            });
        }
        Ok(())
    }

    /// The record as it sits in a record block (what a dictionary for a lane is trained on).
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        self.validate()?;
        let mut out = Vec::with_capacity(self.encoded_len());
        self.write_to(&mut out);
        Ok(out)
    }

    /// Appends the record's encoding to `out`. The record must have been validated.
    fn write_to(&self, out: &mut Vec<u8>) {
        let key_len = u16::try_from(self.key.len()).expect("key length validated");
        let content_type_len = u8::try_from(self.content_type.len()).expect("content type length validated");
        let payload_len = u32::try_from(self.payload.len()).expect("payload length validated");
        let start = out.len();
        out.extend_from_slice(&key_len.to_le_bytes());
        out.extend_from_slice(self.key.as_bytes());
        out.extend_from_slice(&self.timestamp_us.to_le_bytes());
        out.push(content_type_len);
        out.extend_from_slice(self.content_type.as_bytes());
        out.extend_from_slice(&payload_len.to_le_bytes());
        out.extend_from_slice(self.payload);
        assert_eq!(out.len() - start, self.encoded_len());
    }
}

fn key_problem(key: &str) -> Option<KeyProblem> {
    if key.is_empty() {
        return Some(KeyProblem::Empty);
    }
    if key.len() > RECORD_KEY_BYTES_MAX {
        return Some(KeyProblem::TooLong { length: key.len(), max: RECORD_KEY_BYTES_MAX });
    }
    key.char_indices()
        .find(|&(_, character)| !is_key_character(character))
        .map(|(position, character)| KeyProblem::ForbiddenCharacter { character, position })
}

/// Printable ASCII without space, '.', '/' and '\\': what a WebDataset key, a tar member name and
/// a file name on every file system the core writes to all accept.
fn is_key_character(character: char) -> bool {
    character.is_ascii_graphic() && !matches!(character, '.' | '/' | '\\')
}

fn content_type_problem(content_type: &[u8]) -> Option<ContentTypeProblem> {
    if content_type.is_empty() {
        return Some(ContentTypeProblem::Empty);
    }
    if content_type.len() > CONTENT_TYPE_BYTES_MAX {
        return Some(ContentTypeProblem::TooLong { length: content_type.len(), max: CONTENT_TYPE_BYTES_MAX });
    }
    content_type
        .iter()
        .position(|byte| !(b' '..=b'~').contains(byte))
        .map(|position| ContentTypeProblem::NotPrintableAscii { byte: content_type[position], position })
}

/// Checks a record key: 1..=80 bytes of printable ASCII ('!'..='~') except '.', '/' and '\\'.
/// The one definition of a valid key: the edge refuses records with other keys, and the core
/// rejects chunks holding them.
pub fn validate_key(key: &str) -> Result<(), EncodeError> {
    match key_problem(key) {
        None => Ok(()),
        Some(problem) => Err(EncodeError::InvalidKey { key: echo(key), problem }),
    }
}

/// Checks a content type: 1..=64 bytes of printable ASCII (space to '~').
pub fn validate_content_type(content_type: &str) -> Result<(), EncodeError> {
    match content_type_problem(content_type.as_bytes()) {
        None => Ok(()),
        Some(problem) => Err(EncodeError::InvalidContentType { content_type: echo(content_type), problem }),
    }
}

/// Accumulates records for one lane into a raw record block, then seals it (compress once).
#[derive(Debug)]
pub struct ChunkBuilder {
    lane: Lane,
    raw_bytes_target: usize,
    block: Vec<u8>,
    record_count: u32,
}

impl ChunkBuilder {
    /// A builder that reports [`ChunkBuilder::is_full`] once the block reaches
    /// `raw_bytes_target` bytes (1..=CHUNK_RAW_BYTES_MAX). The target is where the caller
    /// should seal; the hard limit on what `push` accepts is always `CHUNK_RAW_BYTES_MAX`, so a
    /// record larger than the target still fits an otherwise empty chunk.
    pub fn new(lane: Lane, raw_bytes_target: usize) -> ChunkBuilder {
        assert!(
            (1..=CHUNK_RAW_BYTES_MAX).contains(&raw_bytes_target),
            "raw_bytes_target {raw_bytes_target} outside 1..={CHUNK_RAW_BYTES_MAX}"
        );
        ChunkBuilder { lane, raw_bytes_target, block: Vec::new(), record_count: 0 }
    }

    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// Appends a record; error if the record is invalid or would exceed CHUNK_RAW_BYTES_MAX /
    /// CHUNK_RECORDS_MAX (the builder is unchanged on error).
    pub fn push(&mut self, record: RecordRef<'_>) -> Result<(), EncodeError> {
        record.validate()?;
        let record_bytes = record.encoded_len();
        if self.block.len() + record_bytes > CHUNK_RAW_BYTES_MAX {
            return Err(EncodeError::ChunkFull {
                record_bytes,
                raw_len: self.block.len(),
                max: CHUNK_RAW_BYTES_MAX,
            });
        }
        if self.record_count >= CHUNK_RECORDS_MAX {
            return Err(EncodeError::TooManyRecords { max: CHUNK_RECORDS_MAX });
        }
        record.write_to(&mut self.block);
        self.record_count += 1;
        Ok(())
    }

    /// The block has reached the target size: time to seal.
    pub fn is_full(&self) -> bool {
        self.block.len() >= self.raw_bytes_target
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// Bytes in the uncompressed record block so far.
    pub fn raw_len(&self) -> usize {
        self.block.len()
    }

    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    /// Compresses the accumulated block once (zstd, or raw when it does not shrink), resets the
    /// builder. On error the builder keeps its records, so the caller can retry (for example
    /// with another dictionary). Sealing an empty builder gives a valid empty chunk; callers
    /// usually check [`ChunkBuilder::is_empty`] first so no seq is spent on nothing.
    pub fn seal(
        &mut self,
        compressor: &mut ChunkCompressor,
        dict_id: u32,
    ) -> Result<SealedChunk, EncodeError> {
        let frame = compressor
            .compress_if_smaller(&self.block, dict_id)
            .map_err(|source| EncodeError::Compress { lane: self.lane, dict_id, source })?;
        let raw_len = u32::try_from(self.block.len()).expect("block bounded by CHUNK_RAW_BYTES_MAX");
        let (codec, body) = match frame {
            Some(frame) => {
                self.block.clear();
                (Codec::Zstd, frame)
            }
            // The block itself becomes the body: no copy.
            None => (Codec::Raw, std::mem::take(&mut self.block)),
        };
        let record_count = std::mem::take(&mut self.record_count);
        let chunk = SealedChunk::new(self.lane, codec, dict_id, record_count, raw_len, body)
            .expect("a builder's block obeys the chunk limits by construction");
        Ok(chunk)
    }
}

impl ChunkBuilder {
    /// Seals the accumulated block without trying to compress it: for content known not to
    /// shrink (JPEG, PNG, already-compressed files), where a zstd attempt would only burn CPU.
    pub fn seal_raw(&mut self) -> SealedChunk {
        let raw_len = u32::try_from(self.block.len()).expect("block bounded by CHUNK_RAW_BYTES_MAX");
        let record_count = std::mem::take(&mut self.record_count);
        let body = std::mem::take(&mut self.block);
        SealedChunk::new(self.lane, Codec::Raw, crate::NO_DICTIONARY, record_count, raw_len, body)
            .expect("a builder's block obeys the chunk limits by construction")
    }
}

/// Iterates the records of an uncompressed record block; yields `Err` once on the first
/// malformed record and then stops.
pub fn records(raw: &[u8]) -> RecordIter<'_> {
    RecordIter { raw, offset: 0, failed: false }
}

/// The iterator returned by [`records`].
#[derive(Clone, Debug)]
pub struct RecordIter<'a> {
    raw: &'a [u8],
    offset: usize,
    failed: bool,
}

impl<'a> RecordIter<'a> {
    /// Byte offset of the next record in the block.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RecordRef<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset == self.raw.len() {
            return None;
        }
        match parse_record(self.raw, self.offset) {
            Ok((record, next_offset)) => {
                assert!(next_offset > self.offset && next_offset <= self.raw.len());
                self.offset = next_offset;
                Some(Ok(record))
            }
            Err(error) => {
                self.failed = true;
                Some(Err(error))
            }
        }
    }
}

impl FusedIterator for RecordIter<'_> {}

/// Reads one record's fields, each bounds-checked against what remains of the block.
struct FieldReader<'a> {
    raw: &'a [u8],
    record_offset: usize,
    position: usize,
}

impl<'a> FieldReader<'a> {
    fn take(&mut self, field: &'static str, needed: usize) -> Result<&'a [u8], DecodeError> {
        let available = self.raw.len() - self.position;
        if needed > available {
            return Err(DecodeError::RecordTruncated {
                offset: self.record_offset,
                field,
                needed,
                available,
            });
        }
        let bytes = &self.raw[self.position..self.position + needed];
        self.position += needed;
        Ok(bytes)
    }

    fn take_array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        Ok(self.take(field, N)?.try_into().expect("take returned N bytes"))
    }
}

/// Parses the record at `offset`, returning it and the offset of the next one.
fn parse_record(raw: &[u8], offset: usize) -> Result<(RecordRef<'_>, usize), DecodeError> {
    let mut reader = FieldReader { raw, record_offset: offset, position: offset };
    let key_len = u16::from_le_bytes(reader.take_array("key_len")?);
    let key_bytes = reader.take("key", usize::from(key_len))?;
    let invalid_key = |problem| DecodeError::InvalidRecordKey { offset, problem };
    let key = std::str::from_utf8(key_bytes)
        .map_err(|error| invalid_key(KeyProblem::NotUtf8 { valid_up_to: error.valid_up_to() }))?;
    if let Some(problem) = key_problem(key) {
        return Err(invalid_key(problem));
    }
    let timestamp_us = u64::from_le_bytes(reader.take_array("timestamp_us")?);
    let [content_type_len] = reader.take_array("content_type_len")?;
    let content_type = reader.take("content_type", usize::from(content_type_len))?;
    if let Some(problem) = content_type_problem(content_type) {
        return Err(DecodeError::InvalidContentType { offset, problem });
    }
    let content_type = std::str::from_utf8(content_type).expect("printable ASCII is UTF-8");
    let payload_len = u32::from_le_bytes(reader.take_array("payload_len")?) as usize;
    if payload_len > RECORD_PAYLOAD_BYTES_MAX {
        return Err(DecodeError::RecordPayloadTooLarge {
            offset,
            length: payload_len,
            max: RECORD_PAYLOAD_BYTES_MAX,
        });
    }
    let payload = reader.take("payload", payload_len)?;
    let record = RecordRef { key, timestamp_us, content_type, payload };
    Ok((record, reader.position))
}

/// Convenience: decode a whole validated chunk's record block into borrowed records, checking
/// that the block is `raw_len` bytes and holds exactly `record_count` records.
pub fn decode_records<'a>(header: &ChunkHeader, raw: &'a [u8]) -> Result<Vec<RecordRef<'a>>, DecodeError> {
    if raw.len() != header.raw_len as usize {
        return Err(DecodeError::RecordBlockLengthMismatch { declared: header.raw_len, actual: raw.len() });
    }
    // The header's count is only a claim: never reserve more than the block could hold.
    let capacity = (header.record_count as usize).min(raw.len() / RECORD_BYTES_MIN);
    let mut decoded = Vec::with_capacity(capacity);
    for record in records(raw) {
        decoded.push(record?);
    }
    if decoded.len() != header.record_count as usize {
        return Err(DecodeError::RecordCountMismatch { declared: header.record_count, found: decoded.len() });
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(key: &'a str, payload: &'a [u8]) -> RecordRef<'a> {
        RecordRef { key, timestamp_us: 1_700_000_000_000_000, content_type: "application/json", payload }
    }

    #[test]
    fn record_layout_is_the_documented_one() {
        let mut block = Vec::new();
        let one = record("k1", b"{}");
        one.write_to(&mut block);
        let mut expected = Vec::new();
        expected.extend_from_slice(&2u16.to_le_bytes());
        expected.extend_from_slice(b"k1");
        expected.extend_from_slice(&1_700_000_000_000_000u64.to_le_bytes());
        expected.push(16);
        expected.extend_from_slice(b"application/json");
        expected.extend_from_slice(&2u32.to_le_bytes());
        expected.extend_from_slice(b"{}");
        assert_eq!(block, expected);
        assert_eq!(one.encoded_len(), block.len());
    }

    #[test]
    fn builder_is_unchanged_when_push_fails() {
        let mut builder = ChunkBuilder::new(Lane::Sensor, 100);
        builder.push(record("a", b"x")).expect("valid");
        let raw_len = builder.raw_len();
        let error = builder.push(record("a.b", b"x")).unwrap_err();
        assert_eq!(
            error,
            EncodeError::InvalidKey {
                key: "a.b".into(),
                problem: KeyProblem::ForbiddenCharacter { character: '.', position: 1 }
            }
        );
        // The largest valid record fits only an empty chunk.
        let payload = vec![0u8; RECORD_PAYLOAD_BYTES_MAX];
        let longest_key = "k".repeat(RECORD_KEY_BYTES_MAX);
        let longest_type = "t".repeat(CONTENT_TYPE_BYTES_MAX);
        let largest =
            RecordRef { key: &longest_key, timestamp_us: 0, content_type: &longest_type, payload: &payload };
        assert_eq!(
            builder.push(largest),
            Err(EncodeError::ChunkFull {
                record_bytes: CHUNK_RAW_BYTES_MAX,
                raw_len,
                max: CHUNK_RAW_BYTES_MAX
            })
        );
        assert_eq!(builder.raw_len(), raw_len);
        assert_eq!(builder.record_count(), 1);
        assert!(!builder.is_full());
    }

    #[test]
    fn builder_counts_records_up_to_the_limit() {
        let mut builder = ChunkBuilder::new(Lane::Sensor, CHUNK_RAW_BYTES_MAX);
        for _ in 0..CHUNK_RECORDS_MAX {
            builder.push(record("k", b"")).expect("within limits");
        }
        assert_eq!(
            builder.push(record("k", b"")),
            Err(EncodeError::TooManyRecords { max: CHUNK_RECORDS_MAX })
        );
        let mut compressor = ChunkCompressor::new(3);
        let chunk = builder.seal(&mut compressor, 0).expect("seals");
        assert_eq!(chunk.record_count, CHUNK_RECORDS_MAX);
        assert!(builder.is_empty());
        assert_eq!(builder.raw_len(), 0);
    }

    #[test]
    fn a_record_bigger_than_the_target_fits_an_empty_chunk() {
        let mut builder = ChunkBuilder::new(Lane::Media, 1024);
        let payload = vec![9u8; RECORD_PAYLOAD_BYTES_MAX];
        let longest_key = "k".repeat(RECORD_KEY_BYTES_MAX);
        let longest_type = "t".repeat(CONTENT_TYPE_BYTES_MAX);
        let largest =
            RecordRef { key: &longest_key, timestamp_us: 0, content_type: &longest_type, payload: &payload };
        builder.push(largest).expect("the largest record fits one chunk");
        assert_eq!(builder.raw_len(), CHUNK_RAW_BYTES_MAX);
        assert!(builder.is_full());
    }

    #[test]
    fn key_rules() {
        assert!(validate_key("camera-01_frame000123").is_ok());
        // Non-ASCII would not fit a ustar member name at the core (issue 15: one such record
        // wedged every dataset), so the one key rule refuses it at the edge.
        assert!(validate_key("überwachung").is_err());
        assert!(validate_key("!#$%&'()*+,-:;<=>?@[]^_`{|}~").is_ok());
        assert!(validate_key(&"k".repeat(RECORD_KEY_BYTES_MAX)).is_ok());
        let problem = |key: &str| match validate_key(key) {
            Err(EncodeError::InvalidKey { problem, .. }) => Some(problem),
            _ => None,
        };
        assert_eq!(problem(""), Some(KeyProblem::Empty));
        assert_eq!(
            problem(&"k".repeat(RECORD_KEY_BYTES_MAX + 1)),
            Some(KeyProblem::TooLong { length: 81, max: 80 })
        );
        for (key, character, position) in [
            ("a/b", '/', 1),
            ("a\nb", '\n', 1),
            ("a\u{7f}", '\u{7f}', 1),
            ("é.jpg", 'é', 0),
            ("a b", ' ', 1),
            ("a\\b", '\\', 1),
        ] {
            assert_eq!(problem(key), Some(KeyProblem::ForbiddenCharacter { character, position }));
        }
    }
}
