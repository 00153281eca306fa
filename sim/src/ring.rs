//! A model of an appliance's ring (`buffer::Ring`) and the ledger of every chunk ever appended.
//!
//! The model keeps the rules the uplink and the sink rely on, not LMDB:
//! - per lane: seqs from 1, `next_seq`, `acked_through`, chunks by seq, bytes used, evicted
//!   chunk and record counters (the ring's `LaneStats`);
//! - capacity: the audit lane draws from its reservation, the other lanes share the rest; a chunk
//!   may use at most a thirty-second of the capacity (`RingConfig::chunk_stored_bytes_max`);
//!   appending to a full pool evicts the oldest chunks of `drop_oldest` lanes, lowest priority
//!   first (`Writer::make_room`); the audit lane is never evicted, and a `block` lane with no
//!   victim left refuses the append (the producer retries);
//! - durability: in `Sync` mode every change is fsynced at once; in `Periodic` mode the state as
//!   of the last fsync is kept aside (`synced`) and `read_from` serves only seqs below the
//!   `next_seq` of that fsync, so nothing a power cut can take back was ever sent;
//! - a power cut brings the ring back to its last fsynced state; opening the ring fsyncs (so
//!   after a process restart the page cache's commits are durable); `renew_identity` replaces the
//!   identity and fsyncs; recreation (factory reset, quarantine) is a new `ModelRing`.
//!
//! Stored bytes are the encoded length (the real ring adds per-segment overhead; the rules do not
//! depend on it). Per-lane byte caps (`LaneConfig::bytes_max`) are not modelled.
//!
//! The ledger gives every appended chunk a fate (in the ring, trimmed by an Ack, evicted, lost to
//! a power cut, lost to a recreation) that the invariants are checked against at the end.

use std::collections::BTreeMap;
use std::rc::Rc;

use protocol::Lane;

/// The real ring's bound on one chunk: a thirty-second of the capacity.
pub const CHUNK_SHARE_OF_CAPACITY_DIVISOR: u64 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    DropOldest,
    Block,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Sync,
    Periodic { sync_interval_us: u64 },
}

#[derive(Clone, Debug)]
pub struct RingParams {
    pub capacity_bytes: u64,
    pub audit_reserved_bytes: u64,
    pub policies: [Policy; Lane::COUNT],
    pub durability: Durability,
}

impl RingParams {
    pub fn chunk_bytes_max(&self) -> u64 {
        self.capacity_bytes / CHUNK_SHARE_OF_CAPACITY_DIVISOR
    }

    fn pool_budget_bytes(&self, lane: Lane) -> u64 {
        if lane == Lane::Audit {
            self.audit_reserved_bytes
        } else {
            self.capacity_bytes - self.audit_reserved_bytes
        }
    }
}

/// A chunk as the ring holds it.
#[derive(Clone, Debug)]
pub struct StoredChunk {
    /// Index in the [`Ledger`].
    pub ledger: usize,
    pub encoded: Rc<Vec<u8>>,
    pub records: u32,
    /// The ring's append counter when it was written (tells what a power cut takes back).
    pub write_number: u64,
}

#[derive(Clone, Debug)]
pub struct LaneState {
    pub next_seq: u64,
    pub acked_through: u64,
    pub chunks: BTreeMap<u64, StoredChunk>,
    pub bytes_used: u64,
    pub evicted_chunks: u64,
    pub evicted_records: u64,
}

impl Default for LaneState {
    fn default() -> Self {
        LaneState {
            next_seq: 1,
            acked_through: 0,
            chunks: BTreeMap::new(),
            bytes_used: 0,
            evicted_chunks: 0,
            evicted_records: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RingState {
    pub identity: [u8; 16],
    pub lanes: [LaneState; Lane::COUNT],
}

/// Why an append did not go in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Larger than the chunk bound or the lane's pool: never fits (the producer never builds one).
    TooLarge,
    /// A `block` lane is full and nothing may be evicted for it: retry later.
    Full,
}

pub struct ModelRing {
    pub params: RingParams,
    /// Which ring storage of its device this is (0, then +1 at every recreation).
    pub storage: u32,
    pub live: RingState,
    /// The state as of the last fsync, in `Periodic` mode (in `Sync` mode it is always `live`).
    synced: Option<RingState>,
    dirty: bool,
    /// Appends so far; never taken back by a power cut, so chunks appended after an fsync always
    /// have numbers at or above [`ModelRing::synced_writes`].
    writes: u64,
    synced_writes: u64,
}

impl ModelRing {
    pub fn new(params: RingParams, identity: [u8; 16], storage: u32) -> ModelRing {
        assert!(params.audit_reserved_bytes < params.capacity_bytes);
        let live = RingState { identity, lanes: Default::default() };
        let synced = matches!(params.durability, Durability::Periodic { .. }).then(|| live.clone());
        ModelRing { params, storage, live, synced, dirty: false, writes: 0, synced_writes: 0 }
    }

    pub fn identity(&self) -> [u8; 16] {
        self.live.identity
    }

    pub fn lane(&self, lane: Lane) -> &LaneState {
        &self.live.lanes[lane.index()]
    }

    pub fn next_seqs(&self) -> [u64; Lane::COUNT] {
        Lane::ALL.map(|lane| self.lane(lane).next_seq)
    }

    /// The state a power cut would bring back.
    pub fn synced(&self) -> &RingState {
        self.synced.as_ref().unwrap_or(&self.live)
    }

    /// Appends numbered below this are in the fsynced state (unless deleted before the fsync).
    pub fn synced_writes(&self) -> u64 {
        if self.synced.is_some() { self.synced_writes } else { self.writes }
    }

    /// Seqs of `lane` below this are fsynced and may be served.
    pub fn visible_next_seq(&self, lane: Lane) -> u64 {
        self.synced().lanes[lane.index()].next_seq
    }

    /// `Ring::read_from`: chunks of `lane` from `from_seq`, fsynced ones only, at least one chunk
    /// when any is there, then within `chunks_max` and `bytes_max`.
    pub fn read_from(
        &self,
        lane: Lane,
        from_seq: u64,
        chunks_max: usize,
        bytes_max: usize,
    ) -> Vec<(u64, Vec<u8>)> {
        let visible = self.visible_next_seq(lane);
        let mut chunks = Vec::new();
        let mut bytes = 0usize;
        if from_seq >= visible {
            return chunks;
        }
        // A deletion (eviction) not fsynced yet may be undone by a power cut: nothing past a gap
        // at or above `from_seq` is served until it is durable (`buffer`'s `writer` module doc).
        let live = self.lane(lane);
        let unsynced_deleted_through = self.synced().lanes[lane.index()]
            .chunks
            .keys()
            .filter(|seq| **seq > live.acked_through && !live.chunks.contains_key(seq))
            .max()
            .copied()
            .unwrap_or(0);
        let first_seq = from_seq.max(1);
        let hold_at_gap = unsynced_deleted_through != 0 && unsynced_deleted_through >= first_seq;
        for ((&seq, chunk), expected_seq) in live.chunks.range(from_seq..visible).zip(first_seq..) {
            if hold_at_gap && seq != expected_seq {
                break;
            }
            if chunks.len() >= chunks_max || (!chunks.is_empty() && bytes + chunk.encoded.len() > bytes_max) {
                break;
            }
            bytes += chunk.encoded.len();
            chunks.push((seq, chunk.encoded.as_ref().clone()));
        }
        chunks
    }

    /// `Writer::make_room`: evicts what a chunk of `needed` bytes on `lane` needs, returning the
    /// evicted chunks, or why it cannot go in.
    pub fn make_room(
        &mut self,
        lane: Lane,
        needed: u64,
    ) -> Result<Vec<StoredChunk>, (Refused, Vec<StoredChunk>)> {
        let pool_budget = self.params.pool_budget_bytes(lane);
        if needed > pool_budget.min(self.params.chunk_bytes_max()) {
            return Err((Refused::TooLarge, Vec::new()));
        }
        let policy = self.params.policies[lane.index()];
        let mut evicted = Vec::new();
        loop {
            let pool_used: u64 = Lane::ALL
                .iter()
                .filter(|other| (**other == Lane::Audit) == (lane == Lane::Audit))
                .map(|other| self.lane(*other).bytes_used)
                .sum();
            if pool_used + needed <= pool_budget {
                return Ok(evicted);
            }
            let victim = if lane == Lane::Audit {
                None
            } else {
                Lane::ALL.iter().rev().copied().find(|other| {
                    (*other > lane || (*other == lane && policy == Policy::DropOldest))
                        && self.params.policies[other.index()] == Policy::DropOldest
                        && !self.lane(*other).chunks.is_empty()
                })
            };
            match victim {
                Some(victim) => evicted.push(self.evict_oldest(victim)),
                None => return Err((Refused::Full, evicted)),
            }
        }
    }

    fn evict_oldest(&mut self, lane: Lane) -> StoredChunk {
        assert_ne!(lane, Lane::Audit, "the audit lane is never evicted");
        assert_eq!(
            self.params.policies[lane.index()],
            Policy::DropOldest,
            "only drop_oldest lanes are evicted"
        );
        let state = &mut self.live.lanes[lane.index()];
        let (_, chunk) = state.chunks.pop_first().expect("a victim lane holds a chunk");
        state.bytes_used -= chunk.encoded.len() as u64;
        state.evicted_chunks += 1;
        state.evicted_records += u64::from(chunk.records);
        self.changed();
        chunk
    }

    /// Appends at the lane's next seq (room already made). Returns the seq.
    pub fn put(&mut self, lane: Lane, ledger: usize, encoded: Vec<u8>, records: u32) -> u64 {
        let writes = self.writes;
        let state = &mut self.live.lanes[lane.index()];
        let seq = state.next_seq;
        state.bytes_used += encoded.len() as u64;
        state
            .chunks
            .insert(seq, StoredChunk { ledger, encoded: Rc::new(encoded), records, write_number: writes });
        state.next_seq += 1;
        self.writes += 1;
        self.changed();
        seq
    }

    /// `Ring::ack`: deletes `lane` through `through`; returns the trimmed chunks. Refuses an Ack
    /// beyond the head (`RingError::AckBeyondHead`).
    pub fn ack(&mut self, lane: Lane, through: u64) -> Result<Vec<StoredChunk>, String> {
        let state = &mut self.live.lanes[lane.index()];
        let last_seq = state.next_seq - 1;
        if through > last_seq {
            return Err(format!("ack of {lane} through {through} beyond the ring's last seq {last_seq}"));
        }
        if through <= state.acked_through {
            return Ok(Vec::new());
        }
        let kept = state.chunks.split_off(&(through + 1));
        let trimmed: Vec<StoredChunk> = std::mem::replace(&mut state.chunks, kept).into_values().collect();
        state.bytes_used -= trimmed.iter().map(|chunk| chunk.encoded.len() as u64).sum::<u64>();
        state.acked_through = through;
        self.changed();
        Ok(trimmed)
    }

    fn changed(&mut self) {
        self.dirty = true;
    }

    /// The periodic fsync (and `Ring::sync`).
    pub fn sync(&mut self) {
        if let Some(synced) = &mut self.synced
            && self.dirty
        {
            *synced = self.live.clone();
        }
        self.synced_writes = self.writes;
        self.dirty = false;
    }

    /// Whether everything in the ring is fsynced.
    pub fn is_synced(&self) -> bool {
        self.synced.is_none() || !self.dirty
    }

    /// `Ring::renew_identity`: a new identity, durably.
    pub fn renew_identity(&mut self, identity: [u8; 16]) {
        self.live.identity = identity;
        self.changed();
        self.sync();
    }

    /// Power loss: back to the last fsynced state.
    pub fn power_cut(&mut self) {
        if let Some(synced) = &self.synced {
            self.live = synced.clone();
        }
        self.dirty = false;
    }

    /// What a backup of the data partition holds: the fsynced state and its append count.
    pub fn backup(&self) -> (RingState, u64) {
        (self.synced().clone(), self.synced_writes())
    }

    /// The ring comes back from an older copy (a restored backup, an old disk image): its
    /// identity, seqs and chunks as they were then. Append numbers stay monotonic.
    pub fn restore(&mut self, state: RingState) {
        if let Some(synced) = &mut self.synced {
            *synced = state.clone();
        }
        self.live = state;
        self.synced_writes = self.writes;
        self.dirty = false;
    }

    /// Evicted records over every lane (what `RingStats` reports).
    pub fn evicted_records(&self) -> u64 {
        self.live.lanes.iter().map(|lane| lane.evicted_records).sum()
    }
}

/// What became of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    InRing,
    /// Deleted by an Ack.
    Trimmed,
    Evicted,
    /// Appended after the last fsync and taken back by a power cut.
    LostPowerCut,
    /// Held by a ring that was recreated.
    LostRecreation,
    /// Appended after the backup the ring was restored from.
    LostRestore,
}

/// Why an honest chunk can never be delivered (the device session skips it and says so).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undeliverable {
    /// The chunk frame exceeds the sink's frame limit.
    ChunkTooLarge,
    /// It names a dictionary the appliance does not have.
    MissingDictionary,
    /// Its dictionary's frame exceeds the sink's frame limit.
    DictionaryTooLarge,
}

#[derive(Clone, Debug)]
pub struct LedgerChunk {
    pub device: usize,
    pub storage: u32,
    pub lane: Lane,
    pub seq: u64,
    /// Records are numbered globally; a chunk holds `first_record..first_record + records`.
    pub first_record: u64,
    pub records: u32,
    pub dict_id: u32,
    pub write_number: u64,
    pub appended_at: u64,
    pub fate: Fate,
    pub undeliverable: Option<Undeliverable>,
    /// The device session reported it undeliverable.
    pub reported_undeliverable: bool,
    /// It came back with a ring restored from a backup after the sink may have landed it: the
    /// ring takes a new identity (`RingBehind`) or the old identity starts a new epoch, and the
    /// chunk is sent again under new core seqs. The design accepts that duplicate (the uplink
    /// logs it), so the checks allow this chunk once more per restore that brought it back.
    pub restored: u32,
}

/// Every chunk honest devices appended, in record order (records are numbered at append).
#[derive(Default)]
pub struct Ledger {
    pub chunks: Vec<LedgerChunk>,
}

impl Ledger {
    pub fn push(&mut self, chunk: LedgerChunk) -> usize {
        if let Some(last) = self.chunks.last() {
            assert!(
                chunk.first_record >= last.first_record + u64::from(last.records),
                "records are numbered in order"
            );
        }
        self.chunks.push(chunk);
        self.chunks.len() - 1
    }

    /// The chunk holding `record`.
    pub fn owner(&self, record: u64) -> Option<usize> {
        let index = self.chunks.partition_point(|chunk| chunk.first_record <= record).checked_sub(1)?;
        let chunk = &self.chunks[index];
        (record < chunk.first_record + u64::from(chunk.records)).then_some(index)
    }
}
