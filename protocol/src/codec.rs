//! Chunk body codecs: how the record block of a chunk is stored and sent.
//!
//! | id | codec | body |
//! | --- | --- | --- |
//! | 0 | `raw` | the record block itself; `body_len == raw_len` |
//! | 1 | `zstd` | exactly one self-contained zstd frame whose content is the record block |
//!
//! A record block is compressed once, when its chunk is sealed at ingest, and never recompressed
//! on the way to the core. When the zstd frame would not be smaller than the block (JPEG, already
//! compressed media) the block is stored raw instead, so a body is never larger than
//! [`crate::CHUNK_RAW_BYTES_MAX`] (4 MiB).
//!
//! zstd frames carry their content size and the internal id of the zstd dictionary they used
//! (which zstd's trainer picks and which is not the protocol's `dict_id`), and no zstd checksum:
//! the chunk header's CRC32C already covers the body as stored and sent.
//!
//! Dictionaries: id 0 ([`NO_DICTIONARY`]) means "no dictionary"; any other id names a dictionary
//! both ends registered beforehand (small records, one dictionary per lane, announced in
//! `Hello`). At most [`DICTIONARIES_MAX`] (64) dictionaries of at most [`DICTIONARY_BYTES_MAX`]
//! (1 MiB) each are registered per compressor or decompressor.

use std::collections::BTreeMap;
use std::fmt;

use zstd::bulk::{Compressor, Decompressor};
use zstd::zstd_safe;

use crate::chunk::{CHUNK_RAW_BYTES_MAX, ChunkHeader};
use crate::control::CONTROL_LIST_ITEMS_MAX;
use crate::error::{CodecError, DecodeError};

/// The dictionary id that means "compressed without a dictionary".
pub const NO_DICTIONARY: u32 = 0;

/// Most dictionaries one compressor or decompressor holds. `Hello` can announce at most
/// [`CONTROL_LIST_ITEMS_MAX`] dictionaries, so a peer never needs more.
pub const DICTIONARIES_MAX: usize = 64;

/// Largest dictionary accepted. zstd's trainer defaults to 110 KiB; a dictionary larger than a
/// few hundred KiB only costs memory on every decompressor of the fleet.
pub const DICTIONARY_BYTES_MAX: usize = 1024 * 1024;

const _: () = assert!(DICTIONARIES_MAX == CONTROL_LIST_ITEMS_MAX);
const _: () = assert!(DICTIONARY_BYTES_MAX <= CHUNK_RAW_BYTES_MAX);

/// The id a dictionary travels under: the first four bytes of its sha256, little-endian, never 0.
/// Deriving it from the content makes it stable across restarts and checkable by the sink, and
/// the same dictionary always gets the same id.
pub fn dictionary_id(dictionary: &[u8]) -> u32 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(dictionary);
    let id = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
    if id == NO_DICTIONARY { 1 } else { id }
}

/// How a chunk body is encoded. The discriminant is the wire id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

impl Codec {
    /// Every codec, in id order.
    pub const ALL: [Codec; 2] = [Codec::Raw, Codec::Zstd];

    /// The codec's stable wire id.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The codec with wire id `id`, or [`DecodeError::UnknownCodec`].
    pub fn from_id(id: u8) -> Result<Codec, DecodeError> {
        Codec::ALL.get(usize::from(id)).copied().ok_or(DecodeError::UnknownCodec(id))
    }

    /// The codec's name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
        }
    }
}

const _: () = {
    let mut index = 0;
    while index < Codec::ALL.len() {
        assert!(Codec::ALL[index] as usize == index);
        index += 1;
    }
};

serde_as_wire_id!(Codec, u8, serialize_u8);

impl fmt::Display for Codec {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// Checks a dictionary offered for registration, and that `dict_id` does not already name a
/// different one. Shared by the compressor and the decompressor so both accept the same set.
fn check_new_dictionary(
    registered: Option<&[u8]>,
    registered_count: usize,
    dict_id: u32,
    dictionary: &[u8],
) -> Result<bool, CodecError> {
    if dict_id == NO_DICTIONARY {
        return Err(CodecError::ReservedDictionaryId);
    }
    if dictionary.is_empty() {
        return Err(CodecError::EmptyDictionary { dict_id });
    }
    if dictionary.len() > DICTIONARY_BYTES_MAX {
        return Err(CodecError::DictionaryTooLarge {
            dict_id,
            length: dictionary.len(),
            max: DICTIONARY_BYTES_MAX,
        });
    }
    match registered {
        // Registering the same bytes twice is harmless (a reconnect re-announces them).
        Some(existing) if existing == dictionary => Ok(false),
        Some(existing) => Err(CodecError::DictionaryConflict {
            dict_id,
            registered_bytes: existing.len(),
            offered_bytes: dictionary.len(),
        }),
        None if registered_count >= DICTIONARIES_MAX => {
            Err(CodecError::TooManyDictionaries { dict_id, max: DICTIONARIES_MAX })
        }
        None => Ok(true),
    }
}

fn zstd_error(operation: &'static str, dict_id: u32, error: std::io::Error) -> CodecError {
    CodecError::Zstd { operation, dict_id, reason: error.to_string() }
}

/// One zstd compression context per dictionary, configured once.
struct DictionaryCompressor {
    dictionary: Vec<u8>,
    compressor: Compressor<'static>,
}

/// Compresses record blocks into chunk bodies. Holds one zstd context per dictionary (and one
/// for "no dictionary") so a dictionary is digested once, not once per chunk. Not `Sync`: give
/// each chunker thread its own.
pub struct ChunkCompressor {
    level: i32,
    compressors: BTreeMap<u32, DictionaryCompressor>,
    /// Reused output buffer, grown to at most `compress_bound(CHUNK_RAW_BYTES_MAX)` (about
    /// 4 MiB + 16 KiB), so sealing a chunk does not allocate a worst-case buffer every time.
    scratch: Vec<u8>,
}

impl ChunkCompressor {
    /// A compressor at zstd `level`, which must be within zstd's range (1 to 22, or negative
    /// "fast" levels; 0 means zstd's default, 3). The level is a configuration choice, passed
    /// explicitly, never left to the library's default.
    pub fn new(level: i32) -> ChunkCompressor {
        assert!(
            zstd::compression_level_range().contains(&level),
            "zstd level {level} outside {:?}",
            zstd::compression_level_range()
        );
        let mut compressors = BTreeMap::new();
        let compressor = configured_compressor(level, &[])
            .expect("a zstd context without dictionary is only refused when memory runs out");
        compressors.insert(NO_DICTIONARY, DictionaryCompressor { dictionary: Vec::new(), compressor });
        ChunkCompressor { level, compressors, scratch: Vec::new() }
    }

    /// The zstd level this compressor uses.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Registers a dictionary; id 0 is reserved for "no dictionary" (error if 0 or already
    /// present with other bytes; registering the same bytes again is a no-op).
    pub fn add_dictionary(&mut self, dict_id: u32, dictionary: &[u8]) -> Result<(), CodecError> {
        let registered = self.compressors.get(&dict_id).map(|entry| entry.dictionary.as_slice());
        // The "no dictionary" context does not count against the limit.
        let registered_count = self.compressors.len() - 1;
        if !check_new_dictionary(registered, registered_count, dict_id, dictionary)? {
            return Ok(());
        }
        let compressor = configured_compressor(self.level, dictionary)
            .map_err(|error| zstd_error("load dictionary", dict_id, error))?;
        self.compressors
            .insert(dict_id, DictionaryCompressor { dictionary: dictionary.to_vec(), compressor });
        Ok(())
    }

    /// Compresses `raw` once as a single self-contained zstd frame (with the dictionary if
    /// dict_id != 0). If the frame would not be smaller than raw, returns
    /// `(Codec::Raw, raw.to_vec())` — data that does not shrink (JPEG) is stored raw.
    pub fn compress(&mut self, raw: &[u8], dict_id: u32) -> Result<(Codec, Vec<u8>), CodecError> {
        match self.compress_if_smaller(raw, dict_id)? {
            Some(frame) => Ok((Codec::Zstd, frame)),
            None => Ok((Codec::Raw, raw.to_vec())),
        }
    }

    /// The zstd frame for `raw` if it is smaller than `raw`, else `None` (store raw). Lets
    /// [`crate::ChunkBuilder`] keep its block as the body without copying it.
    pub(crate) fn compress_if_smaller(
        &mut self,
        raw: &[u8],
        dict_id: u32,
    ) -> Result<Option<Vec<u8>>, CodecError> {
        if raw.len() > CHUNK_RAW_BYTES_MAX {
            return Err(CodecError::InputTooLarge { length: raw.len(), max: CHUNK_RAW_BYTES_MAX });
        }
        let entry = self.compressors.get_mut(&dict_id).ok_or(CodecError::UnknownDictionary { dict_id })?;
        // Even an empty frame has a header, so nothing empty ever shrinks.
        if raw.is_empty() {
            return Ok(None);
        }
        self.scratch.clear();
        self.scratch.reserve(zstd::compress_bound(raw.len()));
        let frame_len = entry
            .compressor
            .compress_to_buffer(raw, &mut self.scratch)
            .map_err(|error| zstd_error("compress", dict_id, error))?;
        assert_eq!(frame_len, self.scratch.len());
        if frame_len < raw.len() { Ok(Some(self.scratch.clone())) } else { Ok(None) }
    }
}

impl fmt::Debug for ChunkCompressor {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ChunkCompressor")
            .field("level", &self.level)
            .field("dictionary_ids", &self.compressors.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A zstd context with every frame parameter that matters set explicitly, rather than relying
/// on zstd's defaults: the content size is written (the decoder checks it against `raw_len`
/// before decoding), the dictionary's internal zstd id is written (the decoder checks it
/// against the dictionary registered under the header's `dict_id`), and no zstd checksum (the
/// header's CRC32C covers the body already).
fn configured_compressor(level: i32, dictionary: &[u8]) -> std::io::Result<Compressor<'static>> {
    let mut compressor = Compressor::with_dictionary(level, dictionary)?;
    compressor.set_parameter(zstd_safe::CParameter::ContentSizeFlag(true))?;
    compressor.set_parameter(zstd_safe::CParameter::DictIdFlag(true))?;
    compressor.set_parameter(zstd_safe::CParameter::ChecksumFlag(false))?;
    Ok(compressor)
}

struct DictionaryDecompressor {
    dictionary: Vec<u8>,
    /// The id zstd's trainer wrote into the dictionary (and zstd into every frame made with
    /// it); 0 for no dictionary and for raw-content dictionaries.
    zstd_id: u32,
    decompressor: Decompressor<'static>,
}

/// Decompresses chunk bodies. Holds one zstd context per registered dictionary.
pub struct ChunkDecompressor {
    decompressors: BTreeMap<u32, DictionaryDecompressor>,
}

impl Default for ChunkDecompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkDecompressor {
    pub fn new() -> Self {
        let decompressor = Decompressor::new()
            .expect("a zstd context without dictionary is only refused when memory runs out");
        let mut decompressors = BTreeMap::new();
        decompressors.insert(
            NO_DICTIONARY,
            DictionaryDecompressor { dictionary: Vec::new(), zstd_id: 0, decompressor },
        );
        ChunkDecompressor { decompressors }
    }

    /// Registers a dictionary, with the same rules as [`ChunkCompressor::add_dictionary`].
    pub fn add_dictionary(&mut self, dict_id: u32, dictionary: &[u8]) -> Result<(), CodecError> {
        let registered = self.decompressors.get(&dict_id).map(|entry| entry.dictionary.as_slice());
        let registered_count = self.decompressors.len() - 1;
        if !check_new_dictionary(registered, registered_count, dict_id, dictionary)? {
            return Ok(());
        }
        let decompressor = Decompressor::with_dictionary(dictionary)
            .map_err(|error| zstd_error("load dictionary", dict_id, error))?;
        self.decompressors.insert(
            dict_id,
            DictionaryDecompressor {
                dictionary: dictionary.to_vec(),
                zstd_id: zstd_safe::get_dict_id_from_dict(dictionary).map_or(0, |id| id.get()),
                decompressor,
            },
        );
        Ok(())
    }

    /// Decompresses a chunk body given its (already validated) header. Output capacity is
    /// exactly `header.raw_len` (bounded by [`CHUNK_RAW_BYTES_MAX`], never more); a frame that
    /// decodes to a different length, an unknown dictionary id, or a raw body whose length !=
    /// raw_len is an error.
    ///
    /// The header's limits are checked again here (cheaply) so that a hand-built header cannot
    /// make this allocate past the bound. The body CRC is not checked again: that is
    /// [`crate::decode_chunk`]'s job, and the header says the body was validated.
    pub fn decompress(&mut self, header: &ChunkHeader, body: &[u8]) -> Result<Vec<u8>, DecodeError> {
        header.validate()?;
        if body.len() != header.body_len as usize {
            return Err(DecodeError::ChunkBodyLengthMismatch {
                declared: header.body_len,
                actual: body.len(),
            });
        }
        let raw_len = header.raw_len as usize;
        match header.codec {
            // validate() has checked body_len == raw_len for raw chunks.
            Codec::Raw => Ok(body.to_vec()),
            Codec::Zstd => self.decompress_zstd(header, body, raw_len),
        }
    }

    fn decompress_zstd(
        &mut self,
        header: &ChunkHeader,
        body: &[u8],
        raw_len: usize,
    ) -> Result<Vec<u8>, DecodeError> {
        let dict_id = header.dict_id;
        let entry = self.decompressors.get_mut(&dict_id).ok_or(DecodeError::UnknownDictionary { dict_id })?;
        let zstd_failure = |reason: &str| DecodeError::Decompress { dict_id, reason: reason.to_owned() };

        // The body must be exactly one frame: trailing bytes would be data nobody reads.
        let frame_len = zstd_safe::find_frame_compressed_size(body)
            .map_err(|code| zstd_failure(zstd_safe::get_error_name(code)))?;
        if frame_len != body.len() {
            return Err(DecodeError::NotOneZstdFrame { body_len: body.len(), frame_len });
        }
        // A frame made with another dictionary than the one registered under the header's
        // dict_id would fail inside zstd with a bare "dictionary mismatch"; say which ids
        // disagree instead. A frame without a dictionary id (none used, or a raw-content
        // dictionary) cannot be checked here and is left to zstd and the length check.
        let frame_zstd_id = zstd_safe::get_dict_id_from_frame(body).map_or(0, |id| id.get());
        if frame_zstd_id != 0 && frame_zstd_id != entry.zstd_id {
            return Err(DecodeError::DictionaryMismatch {
                dict_id,
                registered_zstd_id: entry.zstd_id,
                frame_zstd_id,
            });
        }
        // Refuse a frame that announces another size before decoding anything.
        match zstd_safe::get_frame_content_size(body) {
            Ok(Some(declared)) if declared != raw_len as u64 => {
                return Err(DecodeError::DecompressedLengthMismatch {
                    raw_len: header.raw_len,
                    found: declared,
                });
            }
            Ok(_) => {}
            Err(_) => return Err(zstd_failure("the frame header is corrupt")),
        }

        // The capacity is the bound: zstd never writes past a Vec's capacity, so a frame that
        // would decode to more than raw_len fails instead of growing the buffer.
        let mut raw = Vec::with_capacity(raw_len);
        entry
            .decompressor
            .decompress_to_buffer(body, &mut raw)
            .map_err(|error| zstd_failure(&error.to_string()))?;
        if raw.len() != raw_len {
            return Err(DecodeError::DecompressedLengthMismatch {
                raw_len: header.raw_len,
                found: raw.len() as u64,
            });
        }
        Ok(raw)
    }
}

impl fmt::Debug for ChunkDecompressor {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ChunkDecompressor")
            .field("dictionary_ids", &self.decompressors.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Trains a zstd dictionary of at most `dictionary_bytes_max` bytes from samples. zstd fits the
/// dictionary to the samples, so they should look like what it will compress: the appliance's
/// chunker passes runs of consecutive encoded records the size of small chunks, which on sensor
/// records gains 7–10 % on 1–4 KiB chunks over single records as samples. zstd wants many
/// samples (hundreds or more) and a total of roughly 100 times the dictionary size; with too
/// little data it fails, which is reported, not hidden.
pub fn train_dictionary<S: AsRef<[u8]>>(
    samples: &[S],
    dictionary_bytes_max: usize,
) -> Result<Vec<u8>, CodecError> {
    assert!(
        (1..=DICTIONARY_BYTES_MAX).contains(&dictionary_bytes_max),
        "dictionary_bytes_max {dictionary_bytes_max} outside 1..={DICTIONARY_BYTES_MAX}"
    );
    zstd::dict::from_samples(samples, dictionary_bytes_max)
        .map_err(|error| CodecError::Training { sample_count: samples.len(), reason: error.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_ids_round_trip_and_unknown_is_rejected() {
        for codec in Codec::ALL {
            assert_eq!(Codec::from_id(codec.id()), Ok(codec));
        }
        assert_eq!(Codec::from_id(2), Err(DecodeError::UnknownCodec(2)));
        assert_eq!(Codec::Zstd.to_string(), "zstd");
    }

    #[test]
    fn dictionary_registration_rules() {
        let mut compressor = ChunkCompressor::new(3);
        let mut decompressor = ChunkDecompressor::new();
        assert_eq!(compressor.add_dictionary(0, b"abc"), Err(CodecError::ReservedDictionaryId));
        assert_eq!(decompressor.add_dictionary(0, b"abc"), Err(CodecError::ReservedDictionaryId));
        assert_eq!(compressor.add_dictionary(5, b""), Err(CodecError::EmptyDictionary { dict_id: 5 }));
        // Raw-content dictionaries (no zstd magic) are accepted by zstd as plain prefixes.
        assert_eq!(compressor.add_dictionary(5, b"some shared prefix"), Ok(()));
        assert_eq!(compressor.add_dictionary(5, b"some shared prefix"), Ok(()));
        assert_eq!(
            compressor.add_dictionary(5, b"other"),
            Err(CodecError::DictionaryConflict { dict_id: 5, registered_bytes: 18, offered_bytes: 5 })
        );
        let oversized = vec![1u8; DICTIONARY_BYTES_MAX + 1];
        assert_eq!(
            decompressor.add_dictionary(6, &oversized),
            Err(CodecError::DictionaryTooLarge {
                dict_id: 6,
                length: DICTIONARY_BYTES_MAX + 1,
                max: DICTIONARY_BYTES_MAX
            })
        );
        for dict_id in 1..=DICTIONARIES_MAX as u32 {
            decompressor.add_dictionary(dict_id, &dict_id.to_le_bytes()).expect("within the limit");
        }
        assert_eq!(
            decompressor.add_dictionary(1000, b"one too many"),
            Err(CodecError::TooManyDictionaries { dict_id: 1000, max: DICTIONARIES_MAX })
        );
    }

    #[test]
    fn compress_refuses_oversized_input_and_unknown_dictionary() {
        let mut compressor = ChunkCompressor::new(1);
        let oversized = vec![0u8; CHUNK_RAW_BYTES_MAX + 1];
        assert_eq!(
            compressor.compress(&oversized, 0),
            Err(CodecError::InputTooLarge { length: CHUNK_RAW_BYTES_MAX + 1, max: CHUNK_RAW_BYTES_MAX })
        );
        assert_eq!(compressor.compress(b"x", 9), Err(CodecError::UnknownDictionary { dict_id: 9 }));
        assert_eq!(compressor.compress(b"", 0), Ok((Codec::Raw, Vec::new())));
        let (codec, body) = compressor.compress(&[7u8; 4096], 0).expect("compresses");
        assert_eq!(codec, Codec::Zstd);
        assert!(body.len() < 4096);
    }
}
