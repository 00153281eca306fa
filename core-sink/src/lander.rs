//! The landing thread: the single place where chunks become durable and watermarks advance.
//!
//! Sessions (async) verify chunks and send them here; this thread drops duplicates (any seq at or
//! below what was already landed for that (device, lane)), writes the rest through the
//! `Committer`, and at each commit point fsyncs (`Committer::commit`), records the advanced
//! watermarks with the committer's checkpoint in `SinkState` (one synced transaction), and only
//! then publishes the new durable watermarks, from which sessions send Acks.
//!
//! Memory bound: every chunk in flight holds permits of a byte semaphore
//! (`in_flight_bytes_max`) from before it is queued until it is written.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::{ChunkHeader, Lane};
use tokio::sync::{Notify, OwnedSemaphorePermit, watch};

use crate::landing::Committer;
use crate::state::{SinkState, Watermarks};

/// Counters the sink reports (Prometheus export comes with the metrics issue).
#[derive(Debug, Default)]
pub struct SinkMetrics {
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub sessions_active: AtomicU64,
    pub chunks_landed: AtomicU64,
    pub bytes_landed: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    pub bad_chunks: AtomicU64,
    pub commits: AtomicU64,
    pub commit_failures: AtomicU64,
    pub landing_failures: AtomicU64,
    pub acks_sent: AtomicU64,
    /// Compression dictionaries received and stored durably.
    pub dictionaries_stored: AtomicU64,
    /// From a chunk read off its stream to the commit that made it durable (its Ack follows at
    /// once): waiting for in-flight room, the landing queue, the write and the fsync.
    pub ack_latency: telemetry::LatencyHistogram,
}

impl SinkMetrics {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }
}

/// Watermarks shared between the lander and the sessions.
#[derive(Default)]
pub struct SharedWatermarks {
    /// Highest seq written per (device, lane), durable or not: the dedupe line.
    pub landed: Mutex<Watermarks>,
    /// Highest seq durable per (device, lane): what Acks report.
    pub durable: Mutex<Watermarks>,
    /// The committer's checkpoint at the last commit: what downstream readers (the dataset
    /// pipeline) may consume.
    pub checkpoint: Arc<Mutex<Vec<u8>>>,
}

impl SharedWatermarks {
    pub fn landed(&self, device: &str, lane: Lane) -> u64 {
        self.landed.lock().expect("watermarks lock").get(&(device.to_string(), lane)).copied().unwrap_or(0)
    }

    pub fn durable(&self, device: &str, lane: Lane) -> u64 {
        self.durable.lock().expect("watermarks lock").get(&(device.to_string(), lane)).copied().unwrap_or(0)
    }
}

/// Lanes refused to a connection after a failed landing or commit, kept until newer failures
/// push them out; long before that the refused connection has been closed.
const REFUSED_ENTRIES_MAX: usize = 4096;

pub struct LandRequest {
    pub device: Arc<str>,
    /// Distinguishes connections of one device: a lane that failed to land is refused for the
    /// rest of that connection, so nothing after the gap is written.
    pub connection: u64,
    pub header: ChunkHeader,
    pub encoded: Vec<u8>,
    pub permit: OwnedSemaphorePermit,
    /// Closes the connection when its chunk cannot be landed.
    pub kill: Arc<Notify>,
    /// When the session read the chunk off its stream (for `SinkMetrics::ack_latency`).
    pub received_at: Instant,
}

pub struct LanderConfig {
    pub commit_interval: Duration,
    pub commit_bytes_max: u64,
}

pub struct Lander {
    config: LanderConfig,
    committer: Box<dyn Committer>,
    state: SinkState,
    shared: Arc<SharedWatermarks>,
    metrics: Arc<SinkMetrics>,
    durable_generation: watch::Sender<u64>,
    /// Landed since the last commit: seq, and the connection to refuse and kill if it fails.
    pending: BTreeMap<(String, Lane), (u64, u64, Arc<Notify>)>,
    pending_bytes: u64,
    /// When each chunk landed since the last commit was received; as many entries as chunks
    /// written since the last commit, which `commit_bytes_max` and `commit_interval` bound.
    pending_received_at: Vec<Instant>,
    refused: BTreeSet<(String, Lane, u64)>,
}

impl Lander {
    /// Recovers the committer to the last checkpoint and loads the watermarks.
    pub fn new(
        config: LanderConfig,
        mut committer: Box<dyn Committer>,
        state: SinkState,
        metrics: Arc<SinkMetrics>,
    ) -> anyhow::Result<(Lander, Arc<SharedWatermarks>, watch::Receiver<u64>)> {
        let (watermarks, checkpoint) = state.load()?;
        committer.recover(checkpoint.as_deref())?;
        let shared = Arc::new(SharedWatermarks {
            landed: Mutex::new(watermarks.clone()),
            durable: Mutex::new(watermarks),
            checkpoint: Arc::new(Mutex::new(checkpoint.clone().unwrap_or_default())),
        });
        let (durable_generation, receiver) = watch::channel(0);
        let lander = Lander {
            config,
            committer,
            state,
            shared: shared.clone(),
            metrics,
            durable_generation,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            pending_received_at: Vec::new(),
            refused: BTreeSet::new(),
        };
        Ok((lander, shared, receiver))
    }

    /// Runs until every sender is dropped, committing what is pending before it returns.
    pub fn run(mut self, requests: Receiver<LandRequest>) {
        let mut next_commit = Instant::now() + self.config.commit_interval;
        loop {
            match requests.recv_timeout(next_commit.saturating_duration_since(Instant::now())) {
                Ok(request) => self.land(request),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.commit();
                    return;
                }
            }
            if self.pending_bytes >= self.config.commit_bytes_max || Instant::now() >= next_commit {
                self.commit();
                next_commit = Instant::now() + self.config.commit_interval;
            }
        }
    }

    fn land(&mut self, request: LandRequest) {
        let LandRequest { device, connection, header, encoded, permit, kill, received_at } = request;
        let key = (device.to_string(), header.lane);
        if self.refused.contains(&(key.0.clone(), key.1, connection)) {
            return;
        }
        let landed = self.shared.landed(&device, header.lane);
        if header.seq <= landed {
            SinkMetrics::add(&self.metrics.duplicates_dropped, 1);
            return;
        }
        match self.committer.land(&device, &header, &encoded) {
            Ok(()) => {
                self.shared.landed.lock().expect("watermarks lock").insert(key.clone(), header.seq);
                self.pending.insert(key, (header.seq, connection, kill));
                self.pending_bytes += encoded.len() as u64;
                self.pending_received_at.push(received_at);
                SinkMetrics::add(&self.metrics.chunks_landed, 1);
                SinkMetrics::add(&self.metrics.bytes_landed, encoded.len() as u64);
            }
            Err(error) => {
                // A partial write may sit in the file: roll this lane back to its last commit,
                // refuse the rest of this connection's lane and close it; the appliance resumes
                // from the durable watermark on its next connection.
                tracing::error!(%device, lane = %header.lane, seq = header.seq, %error, "landing failed; closing the connection, nothing is acked");
                SinkMetrics::add(&self.metrics.landing_failures, 1);
                self.roll_back(&key);
                self.refuse(&key, connection);
                kill.notify_one();
            }
        }
        drop(permit);
    }

    fn roll_back(&mut self, key: &(String, Lane)) {
        if let Err(error) = self.committer.discard_uncommitted(&key.0, key.1) {
            tracing::error!(device = %key.0, lane = %key.1, %error, "rolling back uncommitted landing failed");
        }
        let durable = self.shared.durable(&key.0, key.1);
        self.shared.landed.lock().expect("watermarks lock").insert(key.clone(), durable);
        if let Some((_, connection, kill)) = self.pending.remove(key) {
            self.refuse(key, connection);
            kill.notify_one();
        }
    }

    /// Refuses the rest of `connection`'s chunks on this lane: after a rollback, anything it still
    /// has in flight would land after a gap. Connection ids only grow, so the oldest entries are
    /// the ones to forget when the set is full.
    fn refuse(&mut self, key: &(String, Lane), connection: u64) {
        self.refused.insert((key.0.clone(), key.1, connection));
        while self.refused.len() > REFUSED_ENTRIES_MAX {
            let oldest = self.refused.iter().min_by_key(|entry| entry.2).cloned().expect("non-empty");
            self.refused.remove(&oldest);
        }
    }

    fn commit(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let advanced: Watermarks =
            self.pending.iter().map(|(key, (seq, _, _))| (key.clone(), *seq)).collect();
        let mut checkpoint = Vec::new();
        let result = self.committer.commit().map_err(anyhow::Error::from).and_then(|()| {
            checkpoint = self.committer.checkpoint();
            self.state.commit(&advanced, &checkpoint).map_err(anyhow::Error::from)
        });
        match result {
            Ok(()) => {
                *self.shared.checkpoint.lock().expect("checkpoint lock") = checkpoint;
                self.durable_advanced(advanced);
                self.pending.clear();
                self.pending_bytes = 0;
                let durable_at = Instant::now();
                for received_at in self.pending_received_at.drain(..) {
                    self.metrics.ack_latency.observe(durable_at - received_at);
                }
                SinkMetrics::add(&self.metrics.commits, 1);
            }
            Err(error) => {
                // After a failed fsync the kernel may have dropped the dirty pages: never retry
                // the sync and trust it. Roll every pending lane back and let the devices resend.
                tracing::error!(%error, "commit failed; rolling back everything since the last commit, no Acks sent");
                SinkMetrics::add(&self.metrics.commit_failures, 1);
                let keys: Vec<_> = self.pending.keys().cloned().collect();
                for key in keys {
                    self.roll_back(&key);
                }
                self.pending_bytes = 0;
                self.pending_received_at.clear();
            }
        }
    }

    fn durable_advanced(&self, advanced: Watermarks) {
        let mut durable = self.shared.durable.lock().expect("watermarks lock");
        for (key, seq) in advanced {
            let entry = durable.entry(key).or_insert(0);
            debug_assert!(seq >= *entry, "durable watermarks never go backwards");
            *entry = (*entry).max(seq);
        }
        drop(durable);
        self.durable_generation.send_modify(|generation| *generation += 1);
    }
}
