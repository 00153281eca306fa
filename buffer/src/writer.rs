//! The ring's single writer thread: group commit, eviction, acks, quarantine.
//!
//! Producers send `Request`s over a bounded channel and wait on a one-slot reply channel. The
//! writer takes everything queued (up to `commit_group_bytes_max` of chunks), applies it in one
//! LMDB write transaction, commits (fsync in `Sync` mode) and only then replies. Every append
//! first joins its lane's FIFO queue, so a lane's seqs follow arrival order and a blocked append
//! holds back the appends queued behind it instead of being overtaken.
//!
//! Durable points: after each fsync (`force_sync` in `Periodic` mode, each commit in `Sync`
//! mode) the writer records every lane's `next_seq` as `synced_next_seq` and publishes it;
//! `Ring::read_from` serves only seqs below it. Only appends move `next_seq`; acks, evictions,
//! quarantines and the MAP_FULL relief delete chunks below it. A power cut that undoes such a
//! deletion brings back a chunk, with its counters undone in the same transaction, so the core
//! must not have moved past the gap the deletion made: before a transaction deletes a lane's chunk
//! other than by an ack, the writer raises the lane's `unsynced_deleted_through` (published before
//! the commit, cleared at the next durable point), and `read_from` serves nothing past a gap at or
//! below it. Otherwise (found by the simulator) the chunks after the gap were sent and acked, the
//! power cut brought the evicted chunk back below the core's watermark, and the next Ack deleted
//! it unsent and uncounted. Renewing the identity is fsynced before it is answered, in every mode.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use heed::types::Bytes;
use heed::{Database, Env, MdbError, RwTxn, WithoutTls};
use protocol::{Lane, SealedChunk};

use crate::config::{Durability, LanePolicy, RingConfig};
use crate::error::{AppendError, Result, RingError};
use crate::layout::{
    IDENTITY_BYTES, IDENTITY_KEY, LaneMeta, QUARANTINE_ENTRIES_MAX, QUARANTINE_SAMPLE_BYTES,
    SEGMENT_BYTES_MAX, chunk_key, lane_meta_key, stored_bytes,
};
use crate::store;

/// How many times a group is retried after LMDB reports MAP_FULL, each time with a larger
/// reserve kept free. The headroom makes this rare; the retries make it survivable.
const MAP_FULL_RETRIES_MAX: u32 = 4;

pub(crate) type Reply<T> = SyncSender<Result<T>>;
/// An append's answer: its seq, or the refusal with the chunk handed back.
pub(crate) type AppendReply = SyncSender<std::result::Result<u64, AppendError>>;

pub(crate) enum Request {
    Append {
        chunk: SealedChunk,
        reply: AppendReply,
    },
    Ack {
        lane: Lane,
        through_seq: u64,
        reply: Reply<()>,
    },
    /// A reader found a chunk that fails its checks; move it out of the way.
    Quarantine {
        lane: Lane,
        seq: u64,
        reason: String,
    },
    /// Replace the ring identity with fresh random bytes; replies once they are fsynced.
    RenewIdentity {
        reply: Reply<[u8; IDENTITY_BYTES]>,
    },
    /// Force an fsync now (periodic mode); replies when the file is durable.
    Sync {
        reply: Reply<()>,
    },
}

struct PendingAppend {
    chunk: SealedChunk,
    stored_bytes: u64,
    enqueued_at: Instant,
    deadline: Instant,
    reply: AppendReply,
}

impl PendingAppend {
    /// Answers a refusal, handing the chunk back to the producer.
    fn refuse(self, error: RingError) {
        let _ = self.reply.send(Err(AppendError { error, chunk: Some(self.chunk) }));
    }
}

/// Counters and committed lane state, shared with `Ring::stats`.
#[derive(Clone, Debug, Default)]
pub(crate) struct SharedState {
    pub lanes: [LaneMeta; Lane::COUNT],
    /// Per lane, `next_seq` as of the last fsync: `read_from` serves only seqs below it.
    pub synced_next_seq: [u64; Lane::COUNT],
    /// Per lane, the highest seq deleted other than by an ack (evicted, quarantined) whose deletion
    /// may not be durable yet; 0 when none. Raised before the deleting transaction commits, cleared
    /// at each durable point; `read_from` serves nothing past a gap at or below it.
    pub unsynced_deleted_through: [u64; Lane::COUNT],
    /// The durable ring identity (`Ring::identity`).
    pub identity: [u8; IDENTITY_BYTES],
    pub waiting_appends: [usize; Lane::COUNT],
    pub commit_groups: u64,
    pub syncs: u64,
    pub map_full_retries: u64,
    pub reserve_bytes: u64,
    pub writer_error: Option<String>,
}

pub(crate) struct Databases {
    pub chunks: Database<Bytes, Bytes>,
    pub meta: Database<Bytes, Bytes>,
    pub quarantine: Database<Bytes, Bytes>,
}

pub(crate) struct Writer {
    pub env: Env<WithoutTls>,
    pub databases: Databases,
    pub config: RingConfig,
    pub path: PathBuf,
    pub lanes: [LaneMeta; Lane::COUNT],
    pub shared: Arc<Mutex<SharedState>>,
    queues: [VecDeque<PendingAppend>; Lane::COUNT],
    /// Extra bytes kept free in the shared pool after LMDB reported MAP_FULL (fragmentation).
    reserve_bytes: u64,
    unsynced_commits: bool,
    last_sync: Instant,
    meta_dirty: bool,
    /// Per lane, `next_seq` as of the last fsync (published in `SharedState`).
    synced_next_seq: [u64; Lane::COUNT],
}

/// The chunks of one lane evicted by one transaction, logged as one line once it commits (a
/// transaction that fails evicted nothing).
#[derive(Clone, Copy, Debug, Default)]
struct Evicted {
    /// Lowest and highest seq evicted; 0 while nothing was. Seqs between them may have been acked
    /// or quarantined earlier, so `chunks` can be fewer than the range.
    first_seq: u64,
    last_seq: u64,
    chunks: u64,
    records: u64,
    bytes: u64,
}

type Evictions = [Evicted; Lane::COUNT];

/// What one attempt decided for the head of each lane's queue.
enum Outcome {
    Appended(u64),
    Failed(RingError),
}

struct Attempt {
    lanes: [LaneMeta; Lane::COUNT],
    /// Per lane: outcomes for the first `len()` queued appends, which leave the queue on commit.
    outcomes: [Vec<Outcome>; Lane::COUNT],
    ack_replies: Vec<(Reply<()>, Result<()>)>,
    evictions: Evictions,
}

impl Writer {
    pub fn new(
        env: Env<WithoutTls>,
        databases: Databases,
        config: RingConfig,
        path: PathBuf,
        lanes: [LaneMeta; Lane::COUNT],
        shared: Arc<Mutex<SharedState>>,
    ) -> Writer {
        Writer {
            env,
            databases,
            config,
            path,
            lanes,
            shared,
            queues: Default::default(),
            reserve_bytes: 0,
            unsynced_commits: false,
            last_sync: Instant::now(),
            meta_dirty: false,
            // `Ring::open` fsynced the ring before starting the writer.
            synced_next_seq: lanes.map(|meta| meta.next_seq),
        }
    }

    fn storage_error(&self, operation: &'static str, source: heed::Error) -> RingError {
        RingError::Storage { path: self.path.clone(), operation, source }
    }

    /// Runs until every sender is gone, then flushes and returns.
    pub fn run(mut self, requests: Receiver<Request>) {
        let mut acks: Vec<(Lane, u64, Reply<()>)> = Vec::new();
        let mut quarantines: Vec<(Lane, u64, String)> = Vec::new();
        let mut sync_replies: Vec<Reply<()>> = Vec::new();
        let mut disconnected = false;
        let mut more_ready = false;
        while !disconnected || self.queues.iter().any(|queue| !queue.is_empty()) {
            let first = if more_ready {
                requests.try_recv().ok()
            } else {
                match requests.recv_timeout(self.next_wakeup()) {
                    Ok(request) => Some(request),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        disconnected = true;
                        None
                    }
                }
            };
            let mut group_bytes = 0u64;
            let mut group_operations = 0usize;
            let mut next = first;
            while let Some(request) = next {
                group_operations += 1;
                match request {
                    Request::Append { chunk, reply } => {
                        group_bytes += stored_bytes(chunk.encoded_len());
                        self.enqueue(chunk, reply);
                    }
                    Request::Ack { lane, through_seq, reply } => acks.push((lane, through_seq, reply)),
                    Request::Quarantine { lane, seq, reason } => quarantines.push((lane, seq, reason)),
                    Request::Sync { reply } => sync_replies.push(reply),
                    Request::RenewIdentity { reply } => {
                        let _ = reply.send(self.renew_identity());
                    }
                }
                if group_bytes >= self.config.commit_group_bytes_max
                    || group_operations >= crate::config::COMMIT_GROUP_OPERATIONS_MAX
                {
                    break;
                }
                next = requests.try_recv().ok();
            }
            more_ready = self.commit_group(&mut acks, &mut quarantines);
            self.expire_waiting();
            if disconnected {
                // Nobody can ack any more: fail whatever still waits for room.
                self.fail_all_waiting();
            }
            self.sync_if_due(&mut sync_replies, disconnected);
            self.publish();
        }
        if let Err(error) = self.fsync() {
            tracing::error!(path = %self.path.display(), %error, "final ring fsync failed");
        }
    }

    /// Forces an fsync; on success everything committed so far is durable.
    fn fsync(&mut self) -> Result<()> {
        self.env.force_sync().map_err(|source| self.storage_error("fsync", source))?;
        self.unsynced_commits = false;
        self.last_sync = Instant::now();
        self.shared.lock().expect("ring state lock").syncs += 1;
        self.made_durable();
        Ok(())
    }

    /// Bookkeeping after a commit: in `Sync` mode LMDB fsynced it, so it is a durable point; in
    /// `Periodic` mode the next fsync makes it one.
    fn committed(&mut self) {
        match self.config.durability {
            Durability::Sync => self.made_durable(),
            Durability::Periodic { .. } => self.unsynced_commits = true,
        }
    }

    /// Everything committed is on disk: show the observer the file as a power cut would leave it,
    /// then let readers see the chunks this made durable. The observer goes first so that no
    /// chunk can be sent before it has seen a state holding it. Callers publish.
    fn made_durable(&mut self) {
        if let Some(observer) = &self.config.sync_observer {
            observer.observe(&self.path);
        }
        for lane in Lane::ALL {
            let next_seq = self.lanes[lane.index()].next_seq;
            assert!(next_seq >= self.synced_next_seq[lane.index()], "{lane}: next_seq went backwards");
            self.synced_next_seq[lane.index()] = next_seq;
        }
        // The writer is between transactions: every deletion so far is committed, so durable now.
        self.shared.lock().expect("ring state lock").unsynced_deleted_through = [0; Lane::COUNT];
    }

    /// Called before a transaction deletes `seq` of `lane` other than by an ack: from now until
    /// the next durable point, `read_from` serves nothing past a gap at or below `seq` (see the
    /// module doc). Raising it before the commit means a reader whose snapshot shows the gap
    /// always sees the hold too; a transaction that then fails leaves a harmless, stale hold.
    fn hold_reads_past_deletion(&self, lane: Lane, seq: u64) {
        assert!(seq >= 1, "seqs start at 1: 0 means no hold");
        let mut shared = self.shared.lock().expect("ring state lock");
        let held = &mut shared.unsynced_deleted_through[lane.index()];
        *held = (*held).max(seq);
    }

    /// Writes a fresh identity and fsyncs it, in every durability mode, before it is published or
    /// answered: the core must never see an identity a power cut could take back.
    fn renew_identity(&mut self) -> Result<[u8; IDENTITY_BYTES]> {
        let storage =
            |source| RingError::Storage { path: self.path.clone(), operation: "renew identity", source };
        let identity = crate::ring::random_identity().map_err(|error| storage(heed::Error::Io(error)))?;
        let mut txn = self.env.write_txn().map_err(storage)?;
        self.databases.meta.put(&mut txn, IDENTITY_KEY, &identity).map_err(storage)?;
        txn.commit().map_err(storage)?;
        // The fsync below is the durable point, in every mode (in `Sync` mode LMDB has already
        // synced the commit; one more fdatasync on a rare call buys a rule without exceptions).
        let synced = self.fsync();
        if synced.is_err() {
            self.unsynced_commits = true;
        }
        // Committed either way: the ring's identity is the new one from here on (see
        // `Ring::renew_identity` for what an fsync error means).
        self.shared.lock().expect("ring state lock").identity = identity;
        self.publish();
        synced?;
        tracing::warn!(path = %self.path.display(), "renewed the ring identity");
        Ok(identity)
    }

    fn enqueue(&mut self, chunk: SealedChunk, reply: AppendReply) {
        let lane = chunk.lane;
        let waiting: usize = self.queues.iter().map(VecDeque::len).sum();
        let stored = stored_bytes(chunk.encoded_len());
        if waiting >= self.config.queue_depth_max {
            self.lanes[lane.index()].rejected_chunks += 1;
            self.meta_dirty = true;
            self.publish();
            let error = self.backpressure(lane, stored, Duration::ZERO);
            let _ = reply.send(Err(AppendError { error, chunk: Some(chunk) }));
            return;
        }
        let now = Instant::now();
        let deadline = now + self.config.block_timeout(lane);
        self.queues[lane.index()].push_back(PendingAppend {
            chunk,
            stored_bytes: stored,
            enqueued_at: now,
            deadline,
            reply,
        });
        let waiting: usize = self.queues.iter().map(VecDeque::len).sum();
        assert!(waiting <= self.config.queue_depth_max, "the writer queue stays within queue_depth_max");
    }

    fn backpressure(&self, lane: Lane, needed_bytes: u64, waited: Duration) -> RingError {
        RingError::Backpressure {
            lane,
            used_bytes: self.lanes[lane.index()].bytes_used,
            budget_bytes: self.config.lane_budget_bytes(lane),
            needed_bytes,
            waited_ms: waited.as_millis() as u64,
        }
    }

    fn next_wakeup(&self) -> Duration {
        let now = Instant::now();
        let mut wakeup = Duration::from_secs(1);
        for queue in &self.queues {
            if let Some(head) = queue.front() {
                wakeup = wakeup.min(head.deadline.saturating_duration_since(now));
            }
        }
        if let Durability::Periodic { sync_interval_ms } = self.config.durability
            && self.unsynced_commits
        {
            let due = self.last_sync + Duration::from_millis(sync_interval_ms);
            wakeup = wakeup.min(due.saturating_duration_since(now));
        }
        wakeup
    }

    /// Applies acks, quarantines and as many queued appends as fit in one transaction. Returns
    /// whether appends that could proceed were left for the next group (byte bound reached).
    fn commit_group(
        &mut self,
        acks: &mut Vec<(Lane, u64, Reply<()>)>,
        quarantines: &mut Vec<(Lane, u64, String)>,
    ) -> bool {
        let has_appends = self.queues.iter().any(|queue| !queue.is_empty());
        if acks.is_empty() && quarantines.is_empty() && !has_appends && !self.meta_dirty {
            return false;
        }
        let mut retries = 0;
        let mut include_appends = true;
        loop {
            match self.attempt(acks, quarantines, include_appends) {
                Ok((attempt, cut_by_bound)) => {
                    self.finish(attempt, acks);
                    quarantines.clear();
                    return cut_by_bound && include_appends;
                }
                Err(heed::Error::Mdb(MdbError::MapFull)) if retries < MAP_FULL_RETRIES_MAX => {
                    retries += 1;
                    let pool = self.config.pool_budget_bytes(Lane::Sensor);
                    self.reserve_bytes = (self.reserve_bytes + pool / 16).min(pool / 4);
                    tracing::warn!(
                        path = %self.path.display(),
                        reserve_bytes = self.reserve_bytes,
                        "ring map full despite accounting; evicting further ahead"
                    );
                    self.shared.lock().expect("ring state lock").map_full_retries += 1;
                    if let Err(error) = self.relieve_map_pressure() {
                        tracing::warn!(path = %self.path.display(), %error, "evicting for room failed");
                    }
                }
                Err(heed::Error::Mdb(MdbError::MapFull)) if include_appends => {
                    // Nothing more to evict: land the acks (they free space) and leave the appends
                    // queued; they proceed when room appears or fail at their deadline.
                    include_appends = false;
                }
                Err(source) => {
                    let message = source.to_string();
                    tracing::error!(path = %self.path.display(), error = %message, "ring write transaction failed");
                    self.shared.lock().expect("ring state lock").writer_error = Some(message);
                    for (_, _, reply) in acks.drain(..) {
                        let _ = reply.send(Err(self.storage_error("ack", clone_heed_error(&source))));
                    }
                    quarantines.clear();
                    for queue in &mut self.queues {
                        for pending in queue.drain(..) {
                            pending.refuse(RingError::Storage {
                                path: self.path.clone(),
                                operation: "append",
                                source: clone_heed_error(&source),
                            });
                        }
                    }
                    return false;
                }
            }
        }
    }

    /// LMDB reuses the pages a transaction frees only two commits later, so evicting inside the
    /// failed transaction cannot help it. Evict down to the lowered budget in a transaction of
    /// its own, then commit once more so those pages are free for the retry.
    fn relieve_map_pressure(&mut self) -> std::result::Result<(), heed::Error> {
        let mut lanes = self.lanes;
        let mut evictions = Evictions::default();
        let target = self.config.pool_budget_bytes(Lane::Sensor) - self.reserve_bytes;
        let mut txn = self.env.write_txn()?;
        loop {
            let used: u64 = Lane::ALL
                .iter()
                .filter(|lane| **lane != Lane::Audit)
                .map(|lane| lanes[lane.index()].bytes_used)
                .sum();
            let victim = Lane::ALL.iter().rev().copied().find(|lane| {
                *lane != Lane::Audit
                    && self.config.lane(*lane).policy == LanePolicy::DropOldest
                    && lanes[lane.index()].chunk_count > 0
            });
            match victim {
                Some(victim) if used > target => {
                    self.evict_oldest(&mut txn, &mut lanes, &mut evictions, victim)?
                }
                _ => break,
            }
        }
        self.write_all_lane_meta(&mut txn, &lanes)?;
        txn.commit()?;
        self.lanes = lanes;
        self.committed();
        self.log_evictions(&evictions);
        // A real write, so that this second commit advances LMDB's transaction id.
        let mut txn = self.env.write_txn()?;
        self.write_all_lane_meta(&mut txn, &lanes)?;
        txn.commit()?;
        self.committed();
        Ok(())
    }

    /// One line per lane that lost chunks in one transaction, never one per chunk: a full ring
    /// under `drop_oldest` can evict on every append.
    fn log_evictions(&self, evictions: &Evictions) {
        for lane in Lane::ALL {
            let evicted = evictions[lane.index()];
            if evicted.last_seq == 0 {
                continue;
            }
            tracing::warn!(
                path = %self.path.display(),
                %lane,
                first_seq = evicted.first_seq,
                last_seq = evicted.last_seq,
                chunks = evicted.chunks,
                records = evicted.records,
                bytes = evicted.bytes,
                "evicted unacked chunks to make room (drop_oldest): lost unless the core already holds them"
            );
        }
    }

    fn attempt(
        &self,
        acks: &[(Lane, u64, Reply<()>)],
        quarantines: &[(Lane, u64, String)],
        include_appends: bool,
    ) -> std::result::Result<(Attempt, bool), heed::Error> {
        let mut txn = self.env.write_txn()?;
        let mut attempt = Attempt {
            lanes: self.lanes,
            outcomes: Default::default(),
            ack_replies: Vec::new(),
            evictions: Evictions::default(),
        };
        for (lane, through_seq, reply) in acks {
            let result = self.apply_ack(&mut txn, &mut attempt.lanes, *lane, *through_seq)?;
            attempt.ack_replies.push((reply.clone(), result));
        }
        for (lane, seq, reason) in quarantines {
            self.apply_quarantine(&mut txn, &mut attempt.lanes, *lane, *seq, reason)?;
        }
        let mut group_bytes = 0u64;
        let mut cut_by_bound = false;
        let lanes_to_fill: &[Lane] = if include_appends { &Lane::ALL } else { &[] };
        'lanes: for &lane in lanes_to_fill {
            for pending in &self.queues[lane.index()] {
                if group_bytes >= self.config.commit_group_bytes_max {
                    cut_by_bound = true;
                    break 'lanes;
                }
                match self.make_room(
                    &mut txn,
                    &mut attempt.lanes,
                    &mut attempt.evictions,
                    lane,
                    pending.stored_bytes,
                )? {
                    Room::Fits => {
                        let seq = self.put_chunk(
                            &mut txn,
                            &mut attempt.lanes,
                            &pending.chunk,
                            pending.stored_bytes,
                        )?;
                        group_bytes += pending.stored_bytes;
                        self.assert_within_budgets(&attempt.lanes, lane);
                        attempt.outcomes[lane.index()].push(Outcome::Appended(seq));
                    }
                    Room::Refused(error) => {
                        attempt.lanes[lane.index()].rejected_chunks += 1;
                        attempt.outcomes[lane.index()].push(Outcome::Failed(error));
                    }
                    // Keep FIFO order: nothing queued behind a blocked append may overtake it.
                    Room::Wait => continue 'lanes,
                }
            }
        }
        self.write_all_lane_meta(&mut txn, &attempt.lanes)?;
        txn.commit()?;
        Ok((attempt, cut_by_bound))
    }

    /// Postcondition of `make_room` answering `Fits` and the append that followed: the lane and
    /// its pool are within their budgets (the audit pool holds only the audit lane).
    fn assert_within_budgets(&self, lanes: &[LaneMeta; Lane::COUNT], lane: Lane) {
        let lane_used = lanes[lane.index()].bytes_used;
        assert!(
            lane_used <= self.config.lane_budget_bytes(lane),
            "{lane}: {lane_used} bytes over its budget"
        );
        let pool_used: u64 = Lane::ALL
            .iter()
            .filter(|other| (**other == Lane::Audit) == (lane == Lane::Audit))
            .map(|other| lanes[other.index()].bytes_used)
            .sum();
        assert!(
            pool_used <= self.config.pool_budget_bytes(lane),
            "{lane}: pool of {pool_used} bytes over budget"
        );
    }

    fn write_all_lane_meta(
        &self,
        txn: &mut RwTxn,
        lanes: &[LaneMeta; Lane::COUNT],
    ) -> std::result::Result<(), heed::Error> {
        for lane in Lane::ALL {
            self.databases.meta.put(txn, &lane_meta_key(lane), &lanes[lane.index()].encode())?;
            let evicted_records = lanes[lane.index()].evicted_records.to_le_bytes();
            self.databases.meta.put(txn, &crate::layout::lane_evicted_records_key(lane), &evicted_records)?;
        }
        Ok(())
    }

    fn finish(&mut self, attempt: Attempt, acks: &mut Vec<(Lane, u64, Reply<()>)>) {
        self.lanes = attempt.lanes;
        self.meta_dirty = false;
        self.committed();
        self.log_evictions(&attempt.evictions);
        self.shared.lock().expect("ring state lock").commit_groups += 1;
        // Stats (and, in `Sync` mode, reads) must already show the commit when a producer wakes up.
        self.publish();
        for (reply, result) in attempt.ack_replies {
            let _ = reply.send(result);
        }
        acks.clear();
        for (lane_index, outcomes) in attempt.outcomes.into_iter().enumerate() {
            assert!(outcomes.len() <= self.queues[lane_index].len(), "an outcome answers a queued append");
            for outcome in outcomes {
                let pending = self.queues[lane_index].pop_front().expect("an outcome for every head");
                match outcome {
                    Outcome::Appended(seq) => {
                        let _ = pending.reply.send(Ok(seq));
                    }
                    Outcome::Failed(error) => pending.refuse(error),
                }
            }
        }
    }

    fn apply_ack(
        &self,
        txn: &mut RwTxn,
        lanes: &mut [LaneMeta; Lane::COUNT],
        lane: Lane,
        through_seq: u64,
    ) -> std::result::Result<Result<()>, heed::Error> {
        let meta = &mut lanes[lane.index()];
        let last_seq = meta.next_seq - 1;
        if through_seq > last_seq {
            return Ok(Err(RingError::AckBeyondHead { lane, through_seq, last_seq }));
        }
        if through_seq <= meta.acked_through {
            return Ok(Ok(())); // Acks are idempotent: a repeated or older watermark changes nothing.
        }
        assert!(meta.acked_through < through_seq && through_seq < meta.next_seq);
        let freed =
            store::delete_seqs(self.databases.chunks, txn, lane, meta.acked_through + 1, through_seq)?;
        // One chunk per seq at most: an ack never frees more chunks than seqs it covers.
        assert!(freed.chunks <= through_seq - meta.acked_through, "{lane}: ack freed more chunks than seqs");
        meta.bytes_used -= freed.bytes;
        meta.chunk_count -= freed.chunks;
        meta.acked_through = through_seq;
        Ok(Ok(()))
    }

    fn apply_quarantine(
        &self,
        txn: &mut RwTxn,
        lanes: &mut [LaneMeta; Lane::COUNT],
        lane: Lane,
        seq: u64,
        reason: &str,
    ) -> std::result::Result<(), heed::Error> {
        let sample = match store::read_chunk(self.databases.chunks, txn, lane, seq)? {
            None => return Ok(()), // Acked or evicted since the reader saw it.
            // Never quarantine a chunk that checks out.
            Some(Ok(encoded)) if crate::ring::validate_stored_chunk(lane, seq, &encoded).is_ok() => {
                return Ok(());
            }
            Some(Ok(encoded)) => encoded[..encoded.len().min(QUARANTINE_SAMPLE_BYTES)].to_vec(),
            Some(Err(_)) => Vec::new(),
        };
        self.databases.quarantine.put(txn, &chunk_key(lane, seq, 0), &sample)?;
        self.hold_reads_past_deletion(lane, seq);
        let freed = store::delete_seqs(self.databases.chunks, txn, lane, seq, seq)?;
        assert!(freed.chunks <= 1, "{lane}: one seq holds at most one chunk");
        let meta = &mut lanes[lane.index()];
        meta.bytes_used -= freed.bytes;
        meta.chunk_count -= freed.chunks;
        meta.quarantined_chunks += 1;
        tracing::error!(path = %self.path.display(), %lane, seq, reason, "quarantined a damaged chunk; it will not be sent");
        while self.databases.quarantine.len(txn)? > QUARANTINE_ENTRIES_MAX {
            let Some((oldest, _)) = self.databases.quarantine.first(txn)? else { break };
            let oldest = oldest.to_vec();
            self.databases.quarantine.delete(txn, &oldest)?;
        }
        Ok(())
    }

    fn make_room(
        &self,
        txn: &mut RwTxn,
        lanes: &mut [LaneMeta; Lane::COUNT],
        evictions: &mut Evictions,
        lane: Lane,
        needed: u64,
    ) -> std::result::Result<Room, heed::Error> {
        let lane_budget = self.config.lane_budget_bytes(lane);
        let mut pool_budget = self.config.pool_budget_bytes(lane);
        if lane != Lane::Audit {
            pool_budget -= self.reserve_bytes;
        }
        let budget_bytes = lane_budget.min(pool_budget).min(self.config.chunk_stored_bytes_max());
        if needed > budget_bytes {
            return Ok(Room::Refused(RingError::ChunkTooLarge { lane, bytes: needed, budget_bytes }));
        }
        let policy = self.config.lane(lane).policy;
        loop {
            let lane_over = lanes[lane.index()].bytes_used + needed > lane_budget;
            let pool_used: u64 = Lane::ALL
                .iter()
                .filter(|other| (**other == Lane::Audit) == (lane == Lane::Audit))
                .map(|other| lanes[other.index()].bytes_used)
                .sum();
            let pool_over = pool_used + needed > pool_budget;
            if !lane_over && !pool_over {
                return Ok(Room::Fits);
            }
            // Victims, lowest priority first: this lane itself when it is over its own cap or is
            // `drop_oldest`, then lower-priority `drop_oldest` lanes of the same pool. The audit
            // pool holds only the audit lane, which is never evicted.
            let victim = if lane == Lane::Audit {
                None
            } else if lane_over {
                (policy == LanePolicy::DropOldest && lanes[lane.index()].chunk_count > 0).then_some(lane)
            } else {
                Lane::ALL.iter().rev().copied().find(|other| {
                    let evictable = *other > lane || (*other == lane && policy == LanePolicy::DropOldest);
                    evictable
                        && self.config.lane(*other).policy == LanePolicy::DropOldest
                        && lanes[other.index()].chunk_count > 0
                })
            };
            match victim {
                Some(victim) => self.evict_oldest(txn, lanes, evictions, victim)?,
                None if policy == LanePolicy::Block => return Ok(Room::Wait),
                None => return Ok(Room::Refused(RingError::Rejected { lane, needed_bytes: needed })),
            }
        }
    }

    fn evict_oldest(
        &self,
        txn: &mut RwTxn,
        lanes: &mut [LaneMeta; Lane::COUNT],
        evictions: &mut Evictions,
        lane: Lane,
    ) -> std::result::Result<(), heed::Error> {
        // The audit lane is never evicted, and only `drop_oldest` lanes are (`make_room`,
        // `relieve_map_pressure` choose their victims by these rules).
        assert!(lane != Lane::Audit, "the audit lane is never evicted");
        assert_eq!(
            self.config.lane(lane).policy,
            LanePolicy::DropOldest,
            "{lane}: only drop_oldest lanes evict"
        );
        let seq = store::oldest_seq(self.databases.chunks, txn, lane)?
            .expect("chunk_count > 0 means the lane holds a chunk");
        // The header is in the first segment; a damaged one counts no records (reads quarantine it).
        let records = self
            .databases
            .chunks
            .get(txn, &chunk_key(lane, seq, 0))?
            .and_then(|segment| protocol::ChunkHeader::decode(segment).ok())
            .map_or(0, |header| u64::from(header.record_count));
        self.hold_reads_past_deletion(lane, seq);
        let freed = store::delete_seqs(self.databases.chunks, txn, lane, seq, seq)?;
        assert!(freed.chunks <= 1, "{lane}: one seq holds at most one chunk");
        let meta = &mut lanes[lane.index()];
        meta.evicted_records += records;
        meta.bytes_used -= freed.bytes;
        meta.chunk_count -= freed.chunks;
        meta.evicted_chunks += freed.chunks;
        meta.evicted_bytes += freed.bytes;
        let evicted = &mut evictions[lane.index()];
        assert!(seq > evicted.last_seq, "{lane}: evictions go oldest first");
        if evicted.first_seq == 0 {
            evicted.first_seq = seq;
        }
        evicted.last_seq = seq;
        evicted.chunks += freed.chunks;
        evicted.records += records;
        evicted.bytes += freed.bytes;
        Ok(())
    }

    fn put_chunk(
        &self,
        txn: &mut RwTxn,
        lanes: &mut [LaneMeta; Lane::COUNT],
        chunk: &SealedChunk,
        stored: u64,
    ) -> std::result::Result<u64, heed::Error> {
        let meta = &mut lanes[chunk.lane.index()];
        let seq = meta.next_seq;
        assert!(
            seq >= 1 && meta.acked_through < seq,
            "{}: seqs start at 1, above the acked ones",
            chunk.lane
        );
        assert_eq!(stored, stored_bytes(chunk.encoded_len()), "the accounted size is the stored size");
        // Segments of the virtual concatenation header ‖ body, written straight into LMDB's pages
        // (no intermediate copy of the chunk: this thread is the ring's one serial stage).
        let header = chunk.header(seq).encode();
        let encoded_len = chunk.encoded_len();
        for (segment, start) in (0..encoded_len).step_by(SEGMENT_BYTES_MAX).enumerate() {
            let end = (start + SEGMENT_BYTES_MAX).min(encoded_len);
            let segment = u16::try_from(segment).expect("a maximal chunk has fewer than 65536 segments");
            let key = chunk_key(chunk.lane, seq, segment);
            self.databases.chunks.put_reserved(txn, &key, end - start, |space| {
                if start < header.len() {
                    space.write_all(&header[start..])?;
                    space.write_all(&chunk.body[..end - header.len()])
                } else {
                    space.write_all(&chunk.body[start - header.len()..end - header.len()])
                }
            })?;
        }
        meta.next_seq += 1;
        meta.bytes_used += stored;
        meta.chunk_count += 1;
        assert!(meta.next_seq > seq, "next_seq only moves forward");
        Ok(seq)
    }

    fn expire_waiting(&mut self) {
        let now = Instant::now();
        for lane in Lane::ALL {
            while let Some(head) = self.queues[lane.index()].front() {
                if head.deadline > now {
                    break;
                }
                let pending = self.queues[lane.index()].pop_front().expect("head exists");
                self.lanes[lane.index()].rejected_chunks += 1;
                self.meta_dirty = true;
                self.publish();
                let error = self.backpressure(lane, pending.stored_bytes, now - pending.enqueued_at);
                pending.refuse(error);
            }
        }
    }

    fn fail_all_waiting(&mut self) {
        for lane in Lane::ALL {
            while let Some(pending) = self.queues[lane.index()].pop_front() {
                let error = self.backpressure(lane, pending.stored_bytes, pending.enqueued_at.elapsed());
                pending.refuse(error);
            }
        }
    }

    fn sync_if_due(&mut self, sync_replies: &mut Vec<Reply<()>>, closing: bool) {
        let due = match self.config.durability {
            // Every commit was already fsynced by LMDB.
            Durability::Sync => false,
            Durability::Periodic { sync_interval_ms } => {
                self.unsynced_commits && self.last_sync.elapsed() >= Duration::from_millis(sync_interval_ms)
            }
        };
        if !(due || closing || !sync_replies.is_empty()) {
            return;
        }
        let result = if self.unsynced_commits || !sync_replies.is_empty() { self.fsync() } else { Ok(()) };
        if let Err(error) = &result {
            tracing::error!(path = %self.path.display(), %error, "ring fsync failed");
        }
        // A caller of `sync` may read what it made durable as soon as it is answered.
        self.publish();
        for reply in sync_replies.drain(..) {
            let _ = reply.send(match &result {
                Ok(()) => Ok(()),
                Err(_) => Err(RingError::Storage {
                    path: self.path.clone(),
                    operation: "fsync",
                    source: heed::Error::Io(std::io::Error::other("fsync failed; see log")),
                }),
            });
        }
    }

    fn publish(&self) {
        for lane in Lane::ALL {
            // Reads stop below the synced seq, which was a `next_seq` once: never beyond the head.
            assert!(self.synced_next_seq[lane.index()] <= self.lanes[lane.index()].next_seq);
            assert!(self.lanes[lane.index()].acked_through < self.lanes[lane.index()].next_seq);
        }
        let mut shared = self.shared.lock().expect("ring state lock");
        shared.lanes = self.lanes;
        shared.synced_next_seq = self.synced_next_seq;
        shared.reserve_bytes = self.reserve_bytes;
        for lane in Lane::ALL {
            shared.waiting_appends[lane.index()] = self.queues[lane.index()].len();
        }
    }
}

enum Room {
    Fits,
    Wait,
    Refused(RingError),
}

/// heed errors are not `Clone`; one failed transaction fails every request in its group.
fn clone_heed_error(error: &heed::Error) -> heed::Error {
    match error {
        heed::Error::Mdb(mdb) => heed::Error::Mdb(mdb_clone(mdb)),
        other => heed::Error::Io(std::io::Error::other(other.to_string())),
    }
}

fn mdb_clone(error: &MdbError) -> MdbError {
    MdbError::from_err_code(error.to_err_code())
}
