//! The ring handle: open (with corruption policy), append, read, ack, stats.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use heed::types::{Bytes, DecodeIgnore};
use heed::{EnvFlags, EnvOpenOptions, MdbError, WithoutTls};
use protocol::{ChunkHeader, Lane, SealedChunk, decode_chunk};

use crate::config::{Durability, OnCorrupt, RingConfig};
use crate::error::{AppendError, Result, RingError};
use crate::layout::{
    CHUNKS_DATABASE, DATABASES_MAX, FORMAT_KEY, FORMAT_PREFIX, FORMAT_VALUE, IDENTITY_BYTES, IDENTITY_KEY,
    LaneMeta, META_DATABASE, QUARANTINE_DATABASE, QUARANTINE_SAMPLE_BYTES, lane_meta_key, parse_chunk_key,
    segment_stored_bytes,
};
use crate::store::{self, Assembler};
use crate::writer::{Databases, Request, SharedState, Writer};

/// A chunk as read back from the ring: validated (header, body CRC, lane and seq match its key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredChunk {
    pub seq: u64,
    pub header: ChunkHeader,
    /// The encoded chunk (header ‖ body), exactly the bytes that go on the wire.
    pub encoded: Vec<u8>,
}

impl StoredChunk {
    pub fn body(&self) -> &[u8] {
        &self.encoded[protocol::CHUNK_HEADER_LEN..]
    }
}

/// Bounds for one read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimits {
    pub chunks_max: usize,
    /// The first chunk is always returned, even when larger, so that one big chunk cannot stall a
    /// reader.
    pub bytes_max: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaneStats {
    pub next_seq: u64,
    /// `next_seq` as of the last fsync: chunks below it survive a power cut, and only they are
    /// served by `read_from`. Equal to `next_seq` after every commit in `Sync` mode; in
    /// `Periodic` mode it trails by up to `sync_interval_ms` of appends.
    pub synced_next_seq: u64,
    pub acked_through: u64,
    pub chunk_count: u64,
    pub bytes_used: u64,
    pub budget_bytes: u64,
    pub evicted_chunks: u64,
    pub evicted_bytes: u64,
    /// Records in the evicted chunks (from their headers).
    pub evicted_records: u64,
    pub quarantined_chunks: u64,
    pub rejected_chunks: u64,
    pub waiting_appends: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingStats {
    pub lanes: [LaneStats; Lane::COUNT],
    pub capacity_bytes: u64,
    pub map_size_bytes: u64,
    /// Size of `data.mdb` on disk right now.
    pub file_bytes: u64,
    pub commit_groups: u64,
    pub syncs: u64,
    pub map_full_retries: u64,
    /// Extra bytes kept free in the shared pool after MAP_FULL retries.
    pub reserve_bytes: u64,
    /// Set once a write transaction failed for a reason other than MAP_FULL.
    pub writer_error: Option<String>,
    /// Where a damaged ring was moved at open, if it was.
    pub quarantined_ring: Option<PathBuf>,
}

impl RingStats {
    pub fn lane(&self, lane: Lane) -> &LaneStats {
        &self.lanes[lane.index()]
    }
}

/// The bounded, crash-safe chunk ring. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct Ring {
    core: Arc<RingCore>,
}

struct RingCore {
    path: PathBuf,
    config: RingConfig,
    env: heed::Env<WithoutTls>,
    chunks: heed::Database<Bytes, Bytes>,
    requests: Option<SyncSender<Request>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Mutex<SharedState>>,
    quarantined_ring: Option<PathBuf>,
}

impl Drop for RingCore {
    fn drop(&mut self) {
        // Closing the channel lets the writer drain, fsync and exit; then the environment can be
        // closed so the same path may be opened again in this process.
        self.requests = None;
        if let Some(handle) = self.writer.lock().expect("writer handle lock").take()
            && handle.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "ring writer thread panicked");
        }
    }
}

/// Why an open attempt failed: damage (handled by `on_corrupt`) or anything else.
enum OpenFailure {
    Corrupt(String),
    Fatal(RingError),
}

struct Opened {
    env: heed::Env<WithoutTls>,
    databases: Databases,
    lanes: [LaneMeta; Lane::COUNT],
    identity: [u8; IDENTITY_BYTES],
}

impl Ring {
    /// Opens the ring in directory `path` (created if missing). A damaged or foreign ring is
    /// handled by `config.on_corrupt`.
    pub fn open(path: impl AsRef<Path>, config: RingConfig) -> Result<Ring> {
        config.validate()?;
        let path = path.as_ref().to_path_buf();
        let mut quarantined_ring = None;
        let opened = match try_open(&path, &config) {
            Ok(opened) => opened,
            Err(OpenFailure::Fatal(error)) => return Err(error),
            Err(OpenFailure::Corrupt(reason)) => match config.on_corrupt {
                OnCorrupt::Refuse => return Err(RingError::CorruptRefused { path, reason }),
                OnCorrupt::Quarantine => {
                    let aside = move_aside(&path)?;
                    tracing::error!(
                        path = %path.display(),
                        moved_to = %aside.display(),
                        %reason,
                        "RING DAMAGED: moved it aside intact for forensics and started a fresh ring; \
                         unacked data in it was not sent"
                    );
                    quarantined_ring = Some(aside);
                    match try_open(&path, &config) {
                        Ok(opened) => opened,
                        Err(OpenFailure::Fatal(error)) => return Err(error),
                        Err(OpenFailure::Corrupt(reason)) => {
                            return Err(RingError::Open {
                                path,
                                reason: format!("fresh ring is unusable: {reason}"),
                            });
                        }
                    }
                }
            },
        };
        // `try_open` fsynced the ring: everything in it survives a power cut from here on.
        if let Some(observer) = &config.sync_observer {
            observer.observe(&path);
        }
        let shared = Arc::new(Mutex::new(SharedState {
            lanes: opened.lanes,
            synced_next_seq: opened.lanes.map(|meta| meta.next_seq),
            identity: opened.identity,
            ..SharedState::default()
        }));
        let (requests, receiver) = sync_channel(config.queue_depth_max);
        let chunks = opened.databases.chunks;
        let writer = Writer::new(
            opened.env.clone(),
            opened.databases,
            config.clone(),
            path.clone(),
            opened.lanes,
            shared.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("ring-writer".to_string())
            .spawn(move || writer.run(receiver))
            .map_err(|error| RingError::Open {
                path: path.clone(),
                reason: format!("cannot start writer thread: {error}"),
            })?;
        Ok(Ring {
            core: Arc::new(RingCore {
                path,
                config,
                env: opened.env,
                chunks,
                requests: Some(requests),
                writer: Mutex::new(Some(handle)),
                shared,
                quarantined_ring,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.core.path
    }

    pub fn config(&self) -> &RingConfig {
        &self.core.config
    }

    fn send<T>(&self, make: impl FnOnce(SyncSender<Result<T>>) -> Request) -> Result<T> {
        let (reply, answer) = sync_channel(1);
        let requests = self.core.requests.as_ref().ok_or(RingError::WriterStopped)?;
        requests.send(make(reply)).map_err(|_| RingError::WriterStopped)?;
        answer.recv().map_err(|_| RingError::WriterStopped)?
    }

    /// Appends a sealed chunk to its lane and returns the seq it was given. Returns once the
    /// chunk is committed (and fsynced in `Sync` mode). When the lane is full its policy applies:
    /// `drop_oldest` evicts (counted), `block` waits up to its timeout, then `Backpressure`.
    ///
    /// A refused chunk comes back in the error untouched, so a caller may retry it (after
    /// `Backpressure`, typically) without keeping a copy of every chunk it appends.
    pub fn append(&self, chunk: SealedChunk) -> std::result::Result<u64, AppendError> {
        let stopped = |chunk| AppendError { error: RingError::WriterStopped, chunk };
        let (reply, answer) = sync_channel(1);
        let Some(requests) = self.core.requests.as_ref() else { return Err(stopped(Some(chunk))) };
        if let Err(unsent) = requests.send(Request::Append { chunk, reply }) {
            let Request::Append { chunk, .. } = unsent.0 else { unreachable!("an append was sent") };
            return Err(stopped(Some(chunk)));
        }
        // The writer answers every append it took, handing refused chunks back; without an
        // answer it died holding the chunk.
        answer.recv().unwrap_or_else(|_| Err(stopped(None)))
    }

    /// Records that the core holds everything in `lane` through `through_seq` durably, and
    /// deletes those chunks. Idempotent; never moves the watermark backwards.
    pub fn ack(&self, lane: Lane, through_seq: u64) -> Result<()> {
        self.send(|reply| Request::Ack { lane, through_seq, reply })
    }

    /// This ring's identity: 16 random bytes made when the ring was first opened by a build that
    /// has them, durable, and the same across reopens until `renew_identity`. It lets the core
    /// keep its seq watermarks per ring, so that a recreated ring (new identity) is not taken for
    /// a duplicate of the old one. Cheap: a cached copy.
    pub fn identity(&self) -> [u8; IDENTITY_BYTES] {
        self.core.shared.lock().expect("ring state lock").identity
    }

    /// Replaces the identity with fresh random bytes and returns them once they are durable: the
    /// writer commits them and fsyncs, in every durability mode, before answering. A renewed
    /// identity that a power cut could take back would let the core land the same chunks under
    /// two identities. Called when the core holds more of a lane under this identity than the
    /// ring ever wrote (the ring was restored or recreated under an old identity).
    ///
    /// On an fsync error the new identity is committed but perhaps not durable: `identity()`
    /// already returns it (it is the ring's state), and nothing may be sent under it until a
    /// later `sync` or `renew_identity` succeeds.
    pub fn renew_identity(&self) -> Result<[u8; IDENTITY_BYTES]> {
        self.send(|reply| Request::RenewIdentity { reply })
    }

    /// Forces an fsync now: before a planned shutdown, or in `Periodic` mode to make appends
    /// durable (and so readable by `read_from`) without waiting for the next interval.
    pub fn sync(&self) -> Result<()> {
        self.send(|reply| Request::Sync { reply })
    }

    /// Reads chunks of `lane` with seq >= `from_seq`, in seq order, in one short read
    /// transaction. Chunks that fail validation are skipped, counted and quarantined.
    ///
    /// Only chunks whose commit is durable are returned: seq below `LaneStats::synced_next_seq`.
    /// In `Sync` mode that is every committed chunk; in `Periodic` mode an appended chunk becomes
    /// readable at the next fsync (`sync_interval_ms`, or `sync`). What leaves the ring (to the
    /// core, or as an answer) therefore survives a power cut, and a ring that lost its unsynced
    /// tail is never behind the core: the seqs it gives again were never sent. Nor does it serve
    /// a chunk past a gap whose deletion (eviction, quarantine) is not durable yet: a power cut
    /// would bring the deleted chunk back below what the core then holds, and the next Ack would
    /// delete it unsent. Such a read returns the chunks before the gap (maybe none) until the
    /// next fsync.
    pub fn read_from(&self, lane: Lane, from_seq: u64, limits: ReadLimits) -> Result<Vec<StoredChunk>> {
        let storage =
            |operation, source| RingError::Storage { path: self.core.path.clone(), operation, source };
        // Read before the transaction begins: every chunk below it is then in the snapshot the
        // transaction sees (or was acked, evicted or quarantined since), and seqs are never reused
        // while the ring is open.
        let synced_next_seq = self.core.shared.lock().expect("ring state lock").synced_next_seq[lane.index()];
        assert!(synced_next_seq >= 1, "seqs start at 1");
        if from_seq >= synced_next_seq {
            return Ok(Vec::new());
        }
        let mut chunks: Vec<StoredChunk> = Vec::new();
        let mut damaged = Vec::new();
        let unsynced_deleted_through;
        {
            let txn = self.core.env.read_txn().map_err(|source| storage("begin read", source))?;
            // Read after the transaction begins: the writer raises it before committing a
            // deletion, so a snapshot that shows the gap comes with a hold that covers it.
            unsynced_deleted_through =
                self.core.shared.lock().expect("ring state lock").unsynced_deleted_through[lane.index()];
            let range = store::seq_range(lane, from_seq, synced_next_seq - 1);
            let mut bytes = 0usize;
            let mut assembler = Assembler::default();
            // Returns false once the limits are reached.
            let mut take = |(seq, assembled): store::Assembled| -> bool {
                if chunks.len() >= limits.chunks_max {
                    return false;
                }
                match assembled.and_then(|encoded| {
                    validate_stored_chunk(lane, seq, &encoded).map(|header| (header, encoded))
                }) {
                    Ok((header, encoded)) => {
                        if !chunks.is_empty() && bytes + encoded.len() > limits.bytes_max {
                            return false;
                        }
                        bytes += encoded.len();
                        chunks.push(StoredChunk { seq, header, encoded });
                    }
                    Err(reason) => damaged.push((seq, reason)),
                }
                true
            };
            let mut open = true;
            for entry in self
                .core
                .chunks
                .range(&txn, &store::bounds(&range))
                .map_err(|source| storage("read", source))?
            {
                let (key, value) = entry.map_err(|source| storage("read", source))?;
                // Open quarantines malformed keys, so this only skips what a foreign writer added since.
                let Some((_, seq, segment)) = parse_chunk_key(key) else { continue };
                if let Some(finished) = assembler.push(seq, segment, value)
                    && !take(finished)
                {
                    open = false;
                    break;
                }
            }
            if open && let Some(finished) = assembler.finish() {
                take(finished);
            }
        }
        // Seqs start at 1, so 0 means no hold, and a read from 0 starts at seq 1.
        let first_seq = from_seq.max(1);
        if unsynced_deleted_through != 0 && unsynced_deleted_through >= first_seq {
            // A deletion at or above `from_seq` may be undone by a power cut: serve only the run
            // without a gap, so the core never moves past a chunk that can come back (module doc
            // of `writer`). The next durable point lifts the hold.
            let contiguous =
                chunks.iter().zip(first_seq..).take_while(|(chunk, seq)| chunk.seq == *seq).count();
            chunks.truncate(contiguous);
        }
        assert!(chunks.iter().all(|chunk| chunk.seq >= from_seq && chunk.seq < synced_next_seq));
        // Postconditions of the read: seq order, the lane asked for, within the read limits (a
        // single chunk may exceed `bytes_max`, so that a large chunk is never stuck).
        assert!(chunks.windows(2).all(|pair| pair[0].seq < pair[1].seq), "chunks come in seq order");
        assert!(chunks.iter().all(|chunk| chunk.header.lane == lane && chunk.header.seq == chunk.seq));
        assert!(chunks.len() <= limits.chunks_max.max(1));
        let bytes: usize = chunks.iter().map(|chunk| chunk.encoded.len()).sum();
        assert!(chunks.len() <= 1 || bytes <= limits.bytes_max, "a read stays within bytes_max");
        if let Some(requests) = &self.core.requests {
            for (seq, reason) in damaged {
                // Best effort: if the writer is busy the next read finds the chunk again.
                let _ = requests.try_send(Request::Quarantine { lane, seq, reason });
            }
        }
        Ok(chunks)
    }

    /// The lowest seq still held for `lane`, if any.
    pub fn oldest_seq(&self, lane: Lane) -> Result<Option<u64>> {
        let storage =
            |operation, source| RingError::Storage { path: self.core.path.clone(), operation, source };
        let txn = self.core.env.read_txn().map_err(|source| storage("begin read", source))?;
        store::oldest_seq(self.core.chunks, &txn, lane).map_err(|source| storage("read", source))
    }

    pub fn stats(&self) -> RingStats {
        let shared = self.core.shared.lock().expect("ring state lock").clone();
        let config = &self.core.config;
        let lanes = Lane::ALL.map(|lane| {
            let meta = shared.lanes[lane.index()];
            LaneStats {
                next_seq: meta.next_seq,
                synced_next_seq: shared.synced_next_seq[lane.index()],
                acked_through: meta.acked_through,
                chunk_count: meta.chunk_count,
                bytes_used: meta.bytes_used,
                budget_bytes: config.lane_budget_bytes(lane),
                evicted_chunks: meta.evicted_chunks,
                evicted_bytes: meta.evicted_bytes,
                evicted_records: meta.evicted_records,
                quarantined_chunks: meta.quarantined_chunks,
                rejected_chunks: meta.rejected_chunks,
                waiting_appends: shared.waiting_appends[lane.index()],
            }
        });
        RingStats {
            lanes,
            capacity_bytes: config.capacity_bytes,
            map_size_bytes: config.map_size_bytes(),
            file_bytes: fs::metadata(self.core.path.join("data.mdb")).map(|m| m.len()).unwrap_or(0),
            commit_groups: shared.commit_groups,
            syncs: shared.syncs,
            map_full_retries: shared.map_full_retries,
            reserve_bytes: shared.reserve_bytes,
            writer_error: shared.writer_error,
            quarantined_ring: self.core.quarantined_ring.clone(),
        }
    }
}

/// Checks a stored value against its key: header and body CRC valid, lane and seq match.
pub(crate) fn validate_stored_chunk(
    lane: Lane,
    seq: u64,
    value: &[u8],
) -> std::result::Result<ChunkHeader, String> {
    let (header, _) = decode_chunk(value).map_err(|error| error.to_string())?;
    if header.lane != lane || header.seq != seq {
        return Err(format!(
            "chunk stored under lane {lane} seq {seq} claims lane {} seq {}",
            header.lane, header.seq
        ));
    }
    Ok(header)
}

fn move_aside(path: &Path) -> Result<PathBuf> {
    let seconds = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "ring".into());
    for attempt in 0..1000u32 {
        let suffix = if attempt == 0 { String::new() } else { format!("-{attempt}") };
        let aside = path.with_file_name(format!("{name}.corrupt-{seconds}{suffix}"));
        if aside.exists() {
            continue;
        }
        return fs::rename(path, &aside).map(|()| aside).map_err(|error| RingError::Open {
            path: path.to_path_buf(),
            reason: format!("ring is damaged and could not be moved aside: {error}"),
        });
    }
    Err(RingError::Open { path: path.to_path_buf(), reason: "too many quarantined rings beside it".into() })
}

fn is_damage(error: &MdbError) -> bool {
    matches!(
        error,
        MdbError::Invalid
            | MdbError::Corrupted
            | MdbError::VersionMismatch
            | MdbError::PageNotFound
            | MdbError::Incompatible
            | MdbError::Panic
            | MdbError::BadValSize
    )
}

fn try_open(path: &Path, config: &RingConfig) -> std::result::Result<Opened, OpenFailure> {
    let open_error =
        |reason: String| OpenFailure::Fatal(RingError::Open { path: path.to_path_buf(), reason });
    match fs::metadata(path) {
        Ok(metadata) if !metadata.is_dir() => {
            return Err(OpenFailure::Corrupt("the path is a file, not a ring directory".into()));
        }
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(path)
                .map_err(|error| open_error(format!("cannot create directory: {error}")))?;
        }
        Err(error) => return Err(open_error(format!("cannot stat: {error}"))),
    }
    let data_file = path.join("data.mdb");
    let map_size = config.map_size_bytes();
    let file_bytes = match fs::metadata(&data_file) {
        Ok(metadata) => metadata.len(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
        Err(error) => return Err(open_error(format!("cannot stat {}: {error}", data_file.display()))),
    };
    if file_bytes > map_size {
        return Err(OpenFailure::Fatal(RingError::Config {
            key: "capacity_bytes",
            problem: format!(
                "{} holds {file_bytes} bytes, more than the map size {map_size} derived from capacity {}; \
                 raise capacity_bytes or drain and move the ring aside",
                data_file.display(),
                config.capacity_bytes
            ),
        }));
    }
    // NOSYNC only in periodic mode, and never together with WRITEMAP (which this ring never sets):
    // with WRITEMAP, unsynced dirty pages could reach disk in any order and corrupt the tree.
    let flags = match config.durability {
        Durability::Sync => EnvFlags::empty(),
        Durability::Periodic { .. } => EnvFlags::NO_SYNC,
    };
    assert!(!flags.contains(EnvFlags::WRITE_MAP), "the ring never opens LMDB with WRITEMAP");
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(map_size as usize).max_dbs(DATABASES_MAX).max_readers(config.readers_max);
    // SAFETY: flags are checked above; the env is opened once per path per process (heed refuses a
    // second open) and the file is only modified through LMDB.
    unsafe { options.flags(flags) };
    let env = match unsafe { options.open(path) } {
        Ok(env) => env,
        Err(heed::Error::Mdb(error)) if is_damage(&error) => {
            return Err(OpenFailure::Corrupt(format!("LMDB cannot open it: {error}")));
        }
        Err(heed::Error::EnvAlreadyOpened) => {
            return Err(OpenFailure::Fatal(RingError::AlreadyOpen { path: path.to_path_buf() }));
        }
        Err(error) => return Err(open_error(format!("LMDB open failed: {error}"))),
    };
    let cleared =
        env.clear_stale_readers().map_err(|error| open_error(format!("clearing stale readers: {error}")))?;
    if cleared > 0 {
        tracing::warn!(path = %path.display(), cleared, "cleared stale reader slots left by a dead process");
    }
    // mmap past the end of a truncated file raises SIGBUS on access: check before touching pages.
    let needed = (env.info().last_page_number as u64 + 1) * crate::layout::PAGE_BYTES;
    let file_bytes = fs::metadata(&data_file).map(|m| m.len()).unwrap_or(0);
    if file_bytes < needed {
        close(env);
        return Err(OpenFailure::Corrupt(format!(
            "data.mdb is truncated: {file_bytes} bytes, its meta page needs {needed}"
        )));
    }
    let initialized = initialize(path, &env).and_then(|initialized| {
        // In every durability mode: the identity may be new, and in `Periodic` mode the commits a
        // crashed process left in the page cache are not durable yet. After this fsync everything
        // in the ring survives a power cut, which is what `read_from` relies on (it serves every
        // chunk below the `next_seq` found here).
        env.force_sync()
            .map_err(|source| {
                OpenFailure::Fatal(RingError::Storage {
                    path: path.to_path_buf(),
                    operation: "fsync at open",
                    source,
                })
            })
            .map(|()| initialized)
    });
    match initialized {
        Ok((databases, lanes, identity)) => Ok(Opened { env, databases, lanes, identity }),
        Err(failure) => {
            close(env);
            Err(failure)
        }
    }
}

/// Drops the environment and waits until LMDB has really closed it, so the directory can be
/// renamed or reopened.
fn close(env: heed::Env<WithoutTls>) {
    env.prepare_for_closing().wait();
}

/// What `initialize` found (and repaired) in the ring: its databases, lane state and identity.
type Initialized = (Databases, [LaneMeta; Lane::COUNT], [u8; IDENTITY_BYTES]);

/// Checks the format and the accounting, writes what is missing (the format of a new ring, the
/// identity of a new or older ring) in one transaction. Keys of `meta` are read one by one, never
/// iterated, so keys this build does not know (written by a newer one) are ignored: what lets an
/// older build open a ring after an A/B rollback.
fn initialize(path: &Path, env: &heed::Env<WithoutTls>) -> std::result::Result<Initialized, OpenFailure> {
    let storage = |operation, source| {
        OpenFailure::Fatal(RingError::Storage { path: path.to_path_buf(), operation, source })
    };
    let damage = |source: heed::Error| match source {
        heed::Error::Mdb(error) if is_damage(&error) => OpenFailure::Corrupt(format!("LMDB reports {error}")),
        other => OpenFailure::Fatal(RingError::Storage {
            path: path.to_path_buf(),
            operation: "initialize",
            source: other,
        }),
    };
    let mut txn = env.write_txn().map_err(|source| storage("begin write", source))?;
    // The unnamed database lists the named ones; anything else there means this is not our file.
    let main = env
        .open_database::<Bytes, DecodeIgnore>(&txn, None)
        .map_err(damage)?
        .ok_or_else(|| OpenFailure::Corrupt("LMDB main database is missing".into()))?;
    let mut names = Vec::new();
    for entry in main.iter(&txn).map_err(damage)? {
        let (name, ()) = entry.map_err(damage)?;
        names.push(String::from_utf8_lossy(name).into_owned());
    }
    let ours = [CHUNKS_DATABASE, META_DATABASE, QUARANTINE_DATABASE];
    if let Some(foreign) = names.iter().find(|name| !ours.contains(&name.as_str())) {
        return Err(OpenFailure::Corrupt(format!(
            "foreign LMDB environment: it holds a database or key {foreign:?}"
        )));
    }
    let fresh = names.is_empty();
    let chunks = env.create_database::<Bytes, Bytes>(&mut txn, Some(CHUNKS_DATABASE)).map_err(damage)?;
    let meta = env.create_database::<Bytes, Bytes>(&mut txn, Some(META_DATABASE)).map_err(damage)?;
    let quarantine =
        env.create_database::<Bytes, Bytes>(&mut txn, Some(QUARANTINE_DATABASE)).map_err(damage)?;
    if fresh {
        meta.put(&mut txn, FORMAT_KEY, FORMAT_VALUE.as_bytes())
            .map_err(|source| storage("initialize", source))?;
    }
    let format =
        meta.get(&txn, FORMAT_KEY).map_err(damage)?.map(|value| String::from_utf8_lossy(value).into_owned());
    match format.as_deref() {
        Some(FORMAT_VALUE) => {}
        Some(other) if other.starts_with(FORMAT_PREFIX) => {
            return Err(OpenFailure::Fatal(RingError::UnsupportedFormat {
                path: path.to_path_buf(),
                found: other.to_string(),
                supported: FORMAT_VALUE,
            }));
        }
        Some(other) => {
            return Err(OpenFailure::Corrupt(format!("format marker {other:?} is not a tributary ring")));
        }
        None => return Err(OpenFailure::Corrupt("format marker is missing".into())),
    }
    let identity = match meta.get(&txn, IDENTITY_KEY).map_err(damage)? {
        Some(value) => <[u8; IDENTITY_BYTES]>::try_from(value).map_err(|_| {
            OpenFailure::Corrupt(format!("ring identity is {} bytes, not {IDENTITY_BYTES}", value.len()))
        })?,
        // A new ring, or one written by a build that predates identities.
        None => {
            let identity = random_identity().map_err(|error| {
                OpenFailure::Fatal(RingError::Open {
                    path: path.to_path_buf(),
                    reason: format!("no randomness for the ring identity: {error}"),
                })
            })?;
            meta.put(&mut txn, IDENTITY_KEY, &identity).map_err(|source| storage("initialize", source))?;
            if !fresh {
                tracing::info!(path = %path.display(), "gave a ring written by an older build its identity");
            }
            identity
        }
    };
    let mut lanes = [LaneMeta::new(); Lane::COUNT];
    for lane in Lane::ALL {
        if let Some(value) = meta.get(&txn, &lane_meta_key(lane)).map_err(damage)? {
            lanes[lane.index()] = LaneMeta::decode(value)
                .ok_or_else(|| OpenFailure::Corrupt(format!("lane {lane} metadata is malformed")))?;
        }
        // Absent in rings written before the counter existed: their evictions counted no records.
        if let Some(value) = meta.get(&txn, &crate::layout::lane_evicted_records_key(lane)).map_err(damage)? {
            let bytes: [u8; 8] = value.try_into().map_err(|_| {
                OpenFailure::Corrupt(format!(
                    "lane {lane} evicted-records counter is {} bytes, not 8",
                    value.len()
                ))
            })?;
            lanes[lane.index()].evicted_records = u64::from_le_bytes(bytes);
        }
    }
    // Rebuild the accounting from the chunks themselves: it is written in the same transaction as
    // the data, so a mismatch means damage or a bug, and the scan is the truth. Entries that are
    // not chunk keys of a known lane are moved to quarantine.
    let mut scanned = [LaneMeta::default(); Lane::COUNT];
    let mut last_seq = [0u64; Lane::COUNT];
    let mut strays: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for entry in chunks.iter(&txn).map_err(damage)? {
        let (key, value) = entry.map_err(damage)?;
        match parse_chunk_key(key)
            .and_then(|(id, seq, segment)| Lane::from_id(id).ok().map(|lane| (lane, seq, segment)))
        {
            Some((lane, seq, segment)) if seq >= 1 => {
                scanned[lane.index()].bytes_used += segment_stored_bytes(value.len());
                scanned[lane.index()].chunk_count += u64::from(segment == 0);
                last_seq[lane.index()] = seq;
            }
            _ => strays.push((key.to_vec(), value[..value.len().min(QUARANTINE_SAMPLE_BYTES)].to_vec())),
        }
    }
    for (key, sample) in &strays {
        tracing::error!(path = %path.display(), key = ?key, "quarantined a ring entry with an unknown lane or key");
        quarantine.put(&mut txn, key, sample).map_err(|source| storage("quarantine", source))?;
        chunks.delete(&mut txn, key).map_err(|source| storage("quarantine", source))?;
    }
    for lane in Lane::ALL {
        let meta_lane = &mut lanes[lane.index()];
        let found = scanned[lane.index()];
        if meta_lane.bytes_used != found.bytes_used || meta_lane.chunk_count != found.chunk_count {
            tracing::warn!(%lane, recorded = ?(meta_lane.chunk_count, meta_lane.bytes_used), found = ?(found.chunk_count, found.bytes_used), "ring accounting repaired from a scan");
            meta_lane.bytes_used = found.bytes_used;
            meta_lane.chunk_count = found.chunk_count;
        }
        if last_seq[lane.index()] >= meta_lane.next_seq {
            tracing::warn!(%lane, next_seq = meta_lane.next_seq, found = last_seq[lane.index()], "ring next seq repaired from a scan");
            meta_lane.next_seq = last_seq[lane.index()] + 1;
        }
        meta.put(&mut txn, &lane_meta_key(lane), &meta_lane.encode())
            .map_err(|source| storage("initialize", source))?;
    }
    txn.commit().map_err(|source| storage("commit", source))?;
    Ok((Databases { chunks, meta, quarantine }, lanes, identity))
}

/// 16 bytes from the operating system's random source (`getrandom(2)` on Linux).
pub(crate) fn random_identity() -> std::io::Result<[u8; IDENTITY_BYTES]> {
    let mut identity = [0u8; IDENTITY_BYTES];
    getrandom::fill(&mut identity).map_err(|error| std::io::Error::other(error.to_string()))?;
    assert!(identity != [0u8; IDENTITY_BYTES], "the OS returned 128 zero bits");
    Ok(identity)
}
