//! Chunk-level operations over the segmented `chunks` database, shared by the writer (acks,
//! eviction, quarantine) and readers, so that segment handling lives in one place.

use std::ops::Bound;

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn};
use protocol::{CHUNK_ENCODED_BYTES_MAX, Lane};

use crate::layout::{chunk_key, parse_chunk_key, segment_stored_bytes};

pub(crate) type Chunks = Database<Bytes, Bytes>;

/// Keys of `lane` from `(from_seq, segment 0)` through `(through_seq, last segment)`.
pub(crate) fn seq_range(lane: Lane, from_seq: u64, through_seq: u64) -> ([u8; 11], [u8; 11]) {
    (chunk_key(lane, from_seq, 0), chunk_key(lane, through_seq, u16::MAX))
}

pub(crate) fn bounds(range: &([u8; 11], [u8; 11])) -> (Bound<&[u8]>, Bound<&[u8]>) {
    (Bound::Included(&range.0[..]), Bound::Included(&range.1[..]))
}

/// What a deletion freed, as accounted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Freed {
    pub chunks: u64,
    pub bytes: u64,
}

/// Deletes every segment of `lane` with seq in `from_seq..=through_seq`.
pub(crate) fn delete_seqs(
    chunks: Chunks,
    txn: &mut RwTxn,
    lane: Lane,
    from_seq: u64,
    through_seq: u64,
) -> heed::Result<Freed> {
    let range = seq_range(lane, from_seq, through_seq);
    let mut freed = Freed::default();
    let mut iter = chunks.range_mut(txn, &bounds(&range))?;
    while let Some(entry) = iter.next() {
        let (key, value) = entry?;
        let first_segment = parse_chunk_key(key).is_some_and(|(_, _, segment)| segment == 0);
        freed.bytes += segment_stored_bytes(value.len());
        freed.chunks += u64::from(first_segment);
        // SAFETY: no reference into the database is kept across the deletion.
        unsafe { iter.del_current()? };
    }
    Ok(freed)
}

/// The lowest seq held for `lane`.
pub(crate) fn oldest_seq(chunks: Chunks, txn: &RoTxn, lane: Lane) -> heed::Result<Option<u64>> {
    let range = seq_range(lane, 0, u64::MAX);
    let mut iter = chunks.remap_data_type::<heed::types::DecodeIgnore>().range(txn, &bounds(&range))?;
    Ok(match iter.next().transpose()? {
        Some((key, ())) => parse_chunk_key(key).map(|(_, seq, _)| seq),
        None => None,
    })
}

/// Reassembles chunks from consecutive segments, bounding memory by `CHUNK_ENCODED_BYTES_MAX`
/// before it grows: a damaged ring cannot make a reader allocate more than one maximal chunk.
#[derive(Default)]
pub(crate) struct Assembler {
    current: Option<Partial>,
}

struct Partial {
    seq: u64,
    encoded: Vec<u8>,
    next_segment: u16,
    damage: Option<String>,
}

pub(crate) type Assembled = (u64, Result<Vec<u8>, String>);

impl Assembler {
    /// Feeds one segment; returns the previous chunk when this segment starts a new seq.
    pub fn push(&mut self, seq: u64, segment: u16, value: &[u8]) -> Option<Assembled> {
        let finished = match &self.current {
            Some(partial) if partial.seq != seq => self.finish(),
            _ => None,
        };
        let partial = self.current.get_or_insert_with(|| Partial {
            seq,
            encoded: Vec::new(),
            next_segment: 0,
            damage: None,
        });
        if partial.damage.is_none() {
            if segment != partial.next_segment {
                partial.damage = Some(format!("segment {} missing (found {segment})", partial.next_segment));
            } else if partial.encoded.len() + value.len() > CHUNK_ENCODED_BYTES_MAX {
                partial.damage =
                    Some(format!("segments exceed the maximum chunk of {CHUNK_ENCODED_BYTES_MAX} bytes"));
            } else {
                partial.encoded.extend_from_slice(value);
                partial.next_segment = segment.wrapping_add(1);
            }
        }
        finished
    }

    /// The chunk in progress, if any.
    pub fn finish(&mut self) -> Option<Assembled> {
        self.current.take().map(|partial| match partial.damage {
            Some(damage) => (partial.seq, Err(damage)),
            None => (partial.seq, Ok(partial.encoded)),
        })
    }
}

/// Reads and reassembles one chunk.
pub(crate) fn read_chunk(
    chunks: Chunks,
    txn: &RoTxn,
    lane: Lane,
    seq: u64,
) -> heed::Result<Option<Result<Vec<u8>, String>>> {
    let range = seq_range(lane, seq, seq);
    let mut assembler = Assembler::default();
    for entry in chunks.range(txn, &bounds(&range))? {
        let (key, value) = entry?;
        if let Some((_, seq, segment)) = parse_chunk_key(key) {
            assembler.push(seq, segment, value);
        }
    }
    Ok(assembler.finish().map(|(_, result)| result))
}
