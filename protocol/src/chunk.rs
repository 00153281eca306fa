//! The chunk: the unit of storage, transmission, acknowledgement and eviction.
//!
//! An encoded chunk is a fixed 40-byte header followed by `body_len` bytes of body. The same
//! bytes are the value in the appliance's ring, the payload of a chunk frame on the uplink, and
//! what the sink validates before writing. All integers are little-endian.
//!
//! ```text
//! offset size field
//!  0     2    magic          b"TC"
//!  2     1    version        CHUNK_FORMAT_VERSION = 1
//!  3     1    lane id        0 audit, 1 decisions, 2 sensor, 3 media
//!  4     1    codec id       0 raw, 1 zstd
//!  5     1    flags          must be 0
//!  6     2    reserved       must be 0
//!  8     8    seq            u64, per (device, lane), assigned by the appliance's ring, >= 1
//! 16     4    record_count   u32, <= CHUNK_RECORDS_MAX (65 536)
//! 20     4    raw_len        u32, uncompressed record block, <= CHUNK_RAW_BYTES_MAX (4 MiB)
//! 24     4    body_len       u32, body bytes after the header, <= CHUNK_BODY_BYTES_MAX (4 MiB)
//! 28     4    dict_id        u32, 0 = no dictionary
//! 32     4    body_crc32c    CRC32C (Castagnoli) of the body bytes as stored and sent
//! 36     4    header_crc32c  CRC32C of header bytes 0..36
//! 40          body
//! ```
//!
//! Rules beyond the limits: a raw chunk has `body_len == raw_len`; a chunk with
//! `record_count == 0` has `raw_len == 0`. Flags and reserved bytes are zero so a later format
//! version can give them meaning; a version-1 reader rejects any other value rather than
//! silently ignoring a feature it does not know.
//!
//! The header is a hand-specified fixed layout rather than postcard so that its size is known
//! before reading it (the ring and the sink read 40 bytes, then exactly `body_len`), and so that
//! the header CRC covers exact, stable bytes.

use crate::codec::Codec;
use crate::error::{ChunkViolation, DecodeError, EncodeError};
use crate::lane::Lane;

/// Bytes in an encoded chunk header.
pub const CHUNK_HEADER_LEN: usize = 40;
/// The chunk format version this build writes and reads.
pub const CHUNK_FORMAT_VERSION: u8 = 1;
/// The first two bytes of every chunk.
pub const CHUNK_MAGIC: [u8; 2] = *b"TC";
/// Most uncompressed record bytes per chunk. Chunks are sealed at ingest near 64–256 KiB; this
/// is the hard ceiling that bounds every buffer sized from a header.
pub const CHUNK_RAW_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Most body bytes per chunk: a compressed body is never larger than its raw block, because a
/// block that does not shrink is stored raw.
pub const CHUNK_BODY_BYTES_MAX: usize = CHUNK_RAW_BYTES_MAX;
/// Most records per chunk.
pub const CHUNK_RECORDS_MAX: u32 = 65_536;
/// Most bytes of an encoded chunk, header included.
pub const CHUNK_ENCODED_BYTES_MAX: usize = CHUNK_HEADER_LEN + CHUNK_BODY_BYTES_MAX;

const OFFSET_MAGIC: usize = 0;
const OFFSET_VERSION: usize = 2;
const OFFSET_LANE: usize = 3;
const OFFSET_CODEC: usize = 4;
const OFFSET_FLAGS: usize = 5;
const OFFSET_RESERVED: usize = 6;
const OFFSET_SEQ: usize = 8;
const OFFSET_RECORD_COUNT: usize = 16;
const OFFSET_RAW_LEN: usize = 20;
const OFFSET_BODY_LEN: usize = 24;
const OFFSET_DICT_ID: usize = 28;
const OFFSET_BODY_CRC: usize = 32;
const OFFSET_HEADER_CRC: usize = 36;

// The layout table above, checked: fields are contiguous and the header CRC is last.
const _: () = assert!(OFFSET_MAGIC + 2 == OFFSET_VERSION);
const _: () = assert!(OFFSET_VERSION + 1 == OFFSET_LANE);
const _: () = assert!(OFFSET_LANE + 1 == OFFSET_CODEC);
const _: () = assert!(OFFSET_CODEC + 1 == OFFSET_FLAGS);
const _: () = assert!(OFFSET_FLAGS + 1 == OFFSET_RESERVED);
const _: () = assert!(OFFSET_RESERVED + 2 == OFFSET_SEQ);
const _: () = assert!(OFFSET_SEQ + 8 == OFFSET_RECORD_COUNT);
const _: () = assert!(OFFSET_RECORD_COUNT + 4 == OFFSET_RAW_LEN);
const _: () = assert!(OFFSET_RAW_LEN + 4 == OFFSET_BODY_LEN);
const _: () = assert!(OFFSET_BODY_LEN + 4 == OFFSET_DICT_ID);
const _: () = assert!(OFFSET_DICT_ID + 4 == OFFSET_BODY_CRC);
const _: () = assert!(OFFSET_BODY_CRC + 4 == OFFSET_HEADER_CRC);
const _: () = assert!(OFFSET_HEADER_CRC + 4 == CHUNK_HEADER_LEN);
// Lengths travel as u32.
const _: () = assert!(CHUNK_RAW_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(CHUNK_BODY_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(CHUNK_BODY_BYTES_MAX >= CHUNK_RAW_BYTES_MAX);
const _: () = assert!(CHUNK_RECORDS_MAX >= 1);

/// The decoded fields of a chunk header. The magic, version, flags, reserved bytes and header
/// CRC are implied: [`ChunkHeader::encode`] writes them and [`ChunkHeader::decode`] checks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub lane: Lane,
    pub codec: Codec,
    pub seq: u64,
    pub record_count: u32,
    pub raw_len: u32,
    pub body_len: u32,
    pub dict_id: u32,
    pub body_crc32c: u32,
}

/// The rules on a chunk's sizes, shared by header decoding and [`SealedChunk::new`]. Takes
/// `u64` so a body `Vec` longer than `u32::MAX` is reported, not truncated.
fn check_chunk_fields(
    codec: Codec,
    record_count: u64,
    raw_len: u64,
    body_len: u64,
) -> Result<(), ChunkViolation> {
    if record_count > u64::from(CHUNK_RECORDS_MAX) {
        return Err(ChunkViolation::TooManyRecords { record_count, max: CHUNK_RECORDS_MAX });
    }
    if raw_len > CHUNK_RAW_BYTES_MAX as u64 {
        return Err(ChunkViolation::RawTooLarge { raw_len, max: CHUNK_RAW_BYTES_MAX });
    }
    if body_len > CHUNK_BODY_BYTES_MAX as u64 {
        return Err(ChunkViolation::BodyTooLarge { body_len, max: CHUNK_BODY_BYTES_MAX });
    }
    if codec == Codec::Raw && body_len != raw_len {
        return Err(ChunkViolation::RawBodyLengthMismatch { body_len, raw_len });
    }
    if record_count == 0 && raw_len != 0 {
        return Err(ChunkViolation::EmptyChunkWithBytes { raw_len });
    }
    Ok(())
}

fn read_u16(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(bytes[offset..offset + 2].try_into().expect("2-byte slice"))
}

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4-byte slice"))
}

fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8-byte slice"))
}

impl ChunkHeader {
    /// Checks the field rules (seq >= 1, limits, raw body length, empty chunk). Decoding does
    /// this; it is public so holders of a hand-built header can check it too.
    pub fn validate(&self) -> Result<(), ChunkViolation> {
        if self.seq == 0 {
            return Err(ChunkViolation::ZeroSeq);
        }
        check_chunk_fields(
            self.codec,
            u64::from(self.record_count),
            u64::from(self.raw_len),
            u64::from(self.body_len),
        )
    }

    /// The 40 header bytes. Panics if the header breaks a rule ([`ChunkHeader::validate`]):
    /// writing a header no reader accepts is a programmer error.
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        if let Err(violation) = self.validate() {
            panic!("refusing to encode an invalid chunk header {self:?}: {violation}");
        }
        let mut bytes = [0u8; CHUNK_HEADER_LEN];
        bytes[OFFSET_MAGIC..OFFSET_MAGIC + 2].copy_from_slice(&CHUNK_MAGIC);
        bytes[OFFSET_VERSION] = CHUNK_FORMAT_VERSION;
        bytes[OFFSET_LANE] = self.lane.id();
        bytes[OFFSET_CODEC] = self.codec.id();
        bytes[OFFSET_FLAGS] = 0;
        bytes[OFFSET_RESERVED..OFFSET_RESERVED + 2].copy_from_slice(&0u16.to_le_bytes());
        bytes[OFFSET_SEQ..OFFSET_SEQ + 8].copy_from_slice(&self.seq.to_le_bytes());
        bytes[OFFSET_RECORD_COUNT..OFFSET_RECORD_COUNT + 4].copy_from_slice(&self.record_count.to_le_bytes());
        bytes[OFFSET_RAW_LEN..OFFSET_RAW_LEN + 4].copy_from_slice(&self.raw_len.to_le_bytes());
        bytes[OFFSET_BODY_LEN..OFFSET_BODY_LEN + 4].copy_from_slice(&self.body_len.to_le_bytes());
        bytes[OFFSET_DICT_ID..OFFSET_DICT_ID + 4].copy_from_slice(&self.dict_id.to_le_bytes());
        bytes[OFFSET_BODY_CRC..OFFSET_BODY_CRC + 4].copy_from_slice(&self.body_crc32c.to_le_bytes());
        let header_crc = crc32c::crc32c(&bytes[..OFFSET_HEADER_CRC]);
        bytes[OFFSET_HEADER_CRC..].copy_from_slice(&header_crc.to_le_bytes());
        bytes
    }

    /// Validates magic, version, header crc, lane, codec, flags/reserved zero, seq >= 1,
    /// limits (record_count <= CHUNK_RECORDS_MAX, raw_len <= CHUNK_RAW_BYTES_MAX,
    /// body_len <= CHUNK_BODY_BYTES_MAX, codec Raw => body_len == raw_len,
    /// record_count == 0 => raw_len == 0). Needs at least CHUNK_HEADER_LEN bytes; bytes after
    /// the header are ignored here ([`decode_chunk`] checks them).
    ///
    /// Order matters: magic and version come first because a later version may move the CRC;
    /// the CRC comes before the fields so that a flipped bit is reported as corruption, not as
    /// an unknown lane.
    pub fn decode(bytes: &[u8]) -> Result<ChunkHeader, DecodeError> {
        if bytes.len() < CHUNK_HEADER_LEN {
            return Err(DecodeError::ChunkHeaderTruncated {
                needed: CHUNK_HEADER_LEN,
                available: bytes.len(),
            });
        }
        let bytes = &bytes[..CHUNK_HEADER_LEN];
        let magic = [bytes[OFFSET_MAGIC], bytes[OFFSET_MAGIC + 1]];
        if magic != CHUNK_MAGIC {
            return Err(DecodeError::BadChunkMagic { found: magic });
        }
        if bytes[OFFSET_VERSION] != CHUNK_FORMAT_VERSION {
            return Err(DecodeError::UnsupportedChunkVersion {
                found: bytes[OFFSET_VERSION],
                supported: CHUNK_FORMAT_VERSION,
            });
        }
        let stored = read_u32(bytes, OFFSET_HEADER_CRC);
        let computed = crc32c::crc32c(&bytes[..OFFSET_HEADER_CRC]);
        if stored != computed {
            return Err(DecodeError::HeaderCrcMismatch { stored, computed });
        }
        let lane = Lane::from_id(bytes[OFFSET_LANE])?;
        let codec = Codec::from_id(bytes[OFFSET_CODEC])?;
        if bytes[OFFSET_FLAGS] != 0 {
            return Err(DecodeError::ChunkFlagsSet { found: bytes[OFFSET_FLAGS] });
        }
        let reserved = read_u16(bytes, OFFSET_RESERVED);
        if reserved != 0 {
            return Err(DecodeError::ChunkReservedSet { found: reserved });
        }
        let header = ChunkHeader {
            lane,
            codec,
            seq: read_u64(bytes, OFFSET_SEQ),
            record_count: read_u32(bytes, OFFSET_RECORD_COUNT),
            raw_len: read_u32(bytes, OFFSET_RAW_LEN),
            body_len: read_u32(bytes, OFFSET_BODY_LEN),
            dict_id: read_u32(bytes, OFFSET_DICT_ID),
            body_crc32c: read_u32(bytes, OFFSET_BODY_CRC),
        };
        header.validate()?;
        Ok(header)
    }

    /// Bytes of the whole encoded chunk this header describes.
    pub fn encoded_len(&self) -> usize {
        CHUNK_HEADER_LEN + self.body_len as usize
    }
}

/// A compressed chunk that has no seq yet: what the chunker produces and the ring stores.
///
/// The fields are public for reading; a `SealedChunk` built through [`SealedChunk::new`] obeys
/// the chunk rules and its `body_crc32c` matches its body, and encoding asserts both again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedChunk {
    pub lane: Lane,
    pub codec: Codec,
    pub dict_id: u32,
    pub record_count: u32,
    pub raw_len: u32,
    pub body: Vec<u8>,
    pub body_crc32c: u32,
}

impl SealedChunk {
    /// Builds from parts, computing the crc. Returns an error if limits are violated.
    pub fn new(
        lane: Lane,
        codec: Codec,
        dict_id: u32,
        record_count: u32,
        raw_len: u32,
        body: Vec<u8>,
    ) -> Result<SealedChunk, EncodeError> {
        check_chunk_fields(codec, u64::from(record_count), u64::from(raw_len), body.len() as u64)?;
        let body_crc32c = crc32c::crc32c(&body);
        Ok(SealedChunk { lane, codec, dict_id, record_count, raw_len, body, body_crc32c })
    }

    /// Copies a validated encoded chunk back into a `SealedChunk`, returning its seq too (for
    /// example when the ring hands back what it stored).
    pub fn from_encoded(bytes: &[u8]) -> Result<(u64, SealedChunk), DecodeError> {
        let (header, body) = decode_chunk(bytes)?;
        let chunk = SealedChunk {
            lane: header.lane,
            codec: header.codec,
            dict_id: header.dict_id,
            record_count: header.record_count,
            raw_len: header.raw_len,
            body: body.to_vec(),
            body_crc32c: header.body_crc32c,
        };
        Ok((header.seq, chunk))
    }

    /// The header this chunk gets once the ring assigns it `seq` (which must be >= 1).
    pub fn header(&self, seq: u64) -> ChunkHeader {
        assert!(seq >= 1, "chunk seq starts at 1, got 0");
        let body_len = u32::try_from(self.body.len()).expect("body length checked by new()");
        ChunkHeader {
            lane: self.lane,
            codec: self.codec,
            seq,
            record_count: self.record_count,
            raw_len: self.raw_len,
            body_len,
            dict_id: self.dict_id,
            body_crc32c: self.body_crc32c,
        }
    }

    /// `CHUNK_HEADER_LEN + body.len()`.
    pub fn encoded_len(&self) -> usize {
        CHUNK_HEADER_LEN + self.body.len()
    }

    /// Writes header(seq) ‖ body into `out`, which must be exactly `encoded_len()` bytes.
    ///
    /// The body CRC is recomputed and asserted before writing (cheap next to the compression
    /// that produced the body): a chunk whose body changed after sealing must never reach the
    /// ring or the wire with a CRC that vouches for it.
    pub fn encode_into(&self, seq: u64, out: &mut [u8]) {
        assert_eq!(out.len(), self.encoded_len(), "encode_into needs exactly encoded_len() bytes");
        assert_eq!(
            crc32c::crc32c(&self.body),
            self.body_crc32c,
            "sealed {} chunk body changed after its crc was computed",
            self.lane
        );
        out[..CHUNK_HEADER_LEN].copy_from_slice(&self.header(seq).encode());
        out[CHUNK_HEADER_LEN..].copy_from_slice(&self.body);
    }

    /// header(seq) ‖ body as a new vector.
    pub fn encode(&self, seq: u64) -> Vec<u8> {
        let mut out = vec![0u8; self.encoded_len()];
        self.encode_into(seq, &mut out);
        out
    }
}

/// Rewrites the seq of a valid encoded chunk in place and recomputes the header CRC; the body and
/// its CRC are untouched. The sink uses it to move a ring's seqs into the core's seq space (a new
/// ring epoch starts above everything the device's earlier rings landed).
///
/// Panics if `encoded` is not a valid chunk header or `seq` is 0: callers restamp only chunks
/// they decoded, with seqs they computed with checked arithmetic.
pub fn restamp_seq(encoded: &mut [u8], seq: u64) {
    let header = ChunkHeader::decode(encoded).expect("restamp_seq needs a valid chunk header");
    assert!(seq >= 1, "chunk seq starts at 1, got 0");
    if header.seq == seq {
        return;
    }
    encoded[OFFSET_SEQ..OFFSET_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&encoded[..OFFSET_HEADER_CRC]);
    encoded[OFFSET_HEADER_CRC..OFFSET_HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(ChunkHeader::decode(encoded).map(|decoded| decoded.seq), Ok(seq));
}

/// Validates a whole encoded chunk (header checks + body_len matches remaining bytes exactly +
/// body crc). Returns the header and the body slice. Never allocates.
pub fn decode_chunk(bytes: &[u8]) -> Result<(ChunkHeader, &[u8]), DecodeError> {
    let header = ChunkHeader::decode(bytes)?;
    let body = &bytes[CHUNK_HEADER_LEN..];
    if body.len() != header.body_len as usize {
        return Err(DecodeError::ChunkBodyLengthMismatch { declared: header.body_len, actual: body.len() });
    }
    let computed = crc32c::crc32c(body);
    if computed != header.body_crc32c {
        return Err(DecodeError::BodyCrcMismatch { stored: header.body_crc32c, computed });
    }
    Ok((header, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_header() -> ChunkHeader {
        ChunkHeader {
            lane: Lane::Sensor,
            codec: Codec::Zstd,
            seq: 0x0102_0304_0506_0708,
            record_count: 3,
            raw_len: 300,
            body_len: 120,
            dict_id: 7,
            body_crc32c: 0xdead_beef,
        }
    }

    #[test]
    fn header_layout_is_the_documented_one() {
        let bytes = sample_header().encode();
        assert_eq!(&bytes[0..2], b"TC");
        assert_eq!(bytes[2], 1);
        assert_eq!(bytes[3], 2);
        assert_eq!(bytes[4], 1);
        assert_eq!(&bytes[5..8], &[0, 0, 0]);
        assert_eq!(&bytes[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[16..20], &3u32.to_le_bytes());
        assert_eq!(&bytes[20..24], &300u32.to_le_bytes());
        assert_eq!(&bytes[24..28], &120u32.to_le_bytes());
        assert_eq!(&bytes[28..32], &7u32.to_le_bytes());
        assert_eq!(&bytes[32..36], &0xdead_beefu32.to_le_bytes());
        assert_eq!(&bytes[36..40], &crc32c::crc32c(&bytes[..36]).to_le_bytes());
        assert_eq!(ChunkHeader::decode(&bytes), Ok(sample_header()));
    }

    #[test]
    fn sealed_chunk_rejects_broken_limits() {
        let body = vec![1u8; 10];
        assert_eq!(
            SealedChunk::new(Lane::Media, Codec::Raw, 0, 1, 11, body.clone()),
            Err(EncodeError::InvalidChunk(ChunkViolation::RawBodyLengthMismatch {
                body_len: 10,
                raw_len: 11
            }))
        );
        assert_eq!(
            SealedChunk::new(Lane::Media, Codec::Zstd, 0, 0, 11, body.clone()),
            Err(EncodeError::InvalidChunk(ChunkViolation::EmptyChunkWithBytes { raw_len: 11 }))
        );
        assert_eq!(
            SealedChunk::new(Lane::Media, Codec::Zstd, 0, CHUNK_RECORDS_MAX + 1, 11, body),
            Err(EncodeError::InvalidChunk(ChunkViolation::TooManyRecords {
                record_count: u64::from(CHUNK_RECORDS_MAX) + 1,
                max: CHUNK_RECORDS_MAX
            }))
        );
        let oversized = vec![0u8; CHUNK_BODY_BYTES_MAX + 1];
        assert!(matches!(
            SealedChunk::new(Lane::Media, Codec::Zstd, 0, 1, 5, oversized),
            Err(EncodeError::InvalidChunk(ChunkViolation::BodyTooLarge { .. }))
        ));
    }

    #[test]
    fn sealed_chunk_encodes_and_comes_back() {
        let chunk = SealedChunk::new(Lane::Audit, Codec::Raw, 0, 1, 4, b"abcd".to_vec()).expect("valid");
        let bytes = chunk.encode(42);
        assert_eq!(bytes.len(), chunk.encoded_len());
        let (header, body) = decode_chunk(&bytes).expect("valid");
        assert_eq!(header, chunk.header(42));
        assert_eq!(body, b"abcd");
        assert_eq!(SealedChunk::from_encoded(&bytes), Ok((42, chunk)));
    }
}
