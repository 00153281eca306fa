//! The lander thread: a thin driver around `landing::LandingCore`, which decides everything
//! (dedupe, ring epochs, fencing, commit points).
//!
//! Sessions (async) send it requests over a channel: `Open` (a Hello: bind the device's ring,
//! answer with the grant) and `Land` (a verified chunk). The thread lands them in order, commits
//! when the core says a commit is due, and then publishes the durable watermarks and lane
//! generations the sessions' Acks and fencing read. Outcomes go back to the session that sent
//! the chunk as a `LandingRefusal` when the chunk was not landed for a reason the session must
//! act on.
//!
//! Memory bound: every chunk in flight holds permits of a byte semaphore
//! (`in_flight_bytes_max`) from before it is queued until the core has written it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::Claim;
use landing::{
    Committer, LandOutcome, LandRequest as CoreLandRequest, LandingCore, LandingStats, LandingStore,
};
use protocol::Lane;
use session::{Grant, IncomingChunk, LandingRefusal};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

/// Counters the sink reports on `/metrics`.
#[derive(Debug, Default)]
pub struct SinkMetrics {
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub sessions_active: AtomicU64,
    pub chunks_landed: AtomicU64,
    pub bytes_landed: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    /// Chunks refused because their lane was rolled back or re-bound since their session began.
    pub fenced_chunks: AtomicU64,
    pub bad_chunks: AtomicU64,
    pub commits: AtomicU64,
    pub commit_failures: AtomicU64,
    pub landing_failures: AtomicU64,
    pub acks_sent: AtomicU64,
    /// Devices whose ring changed (a recreated or renewed ring starts a new seq epoch).
    pub ring_epochs_started: AtomicU64,
    /// Raw landing files open now, and files closed to stay within `open_files_max`.
    pub landing_files_open: AtomicU64,
    pub landing_files_closed_at_limit: AtomicU64,
    /// Chunks that waited because their connection held its whole in-flight share.
    pub device_in_flight_waits: AtomicU64,
    /// Compression dictionaries received and stored durably.
    pub dictionaries_stored: AtomicU64,
    /// Dictionaries refused: over the device's quota, or not loadable by zstd.
    pub dictionaries_refused: AtomicU64,
    /// From a chunk read off its stream to the commit that made it durable (its Ack follows at
    /// once): waiting for in-flight room, the landing queue, the write and the fsync.
    pub ack_latency: telemetry::LatencyHistogram,
    /// The oldest chunk landed and not yet acked (what a stuck commit holds up).
    pub oldest_unacked: telemetry::OldestPending,
}

impl SinkMetrics {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    fn mirror<C: Committer>(&self, stats: &LandingStats, committer: &C) {
        let set = |counter: &AtomicU64, value: u64| counter.store(value, Ordering::Relaxed);
        set(&self.landing_files_open, committer.open_files() as u64);
        set(&self.landing_files_closed_at_limit, committer.files_closed_at_limit());
        set(&self.chunks_landed, stats.chunks_landed);
        set(&self.bytes_landed, stats.bytes_landed);
        set(&self.duplicates_dropped, stats.duplicates_dropped);
        set(&self.fenced_chunks, stats.fenced_chunks);
        set(&self.commits, stats.commits);
        set(&self.commit_failures, stats.commit_failures);
        set(&self.landing_failures, stats.landing_failures);
        set(&self.ring_epochs_started, stats.epochs_started);
    }
}

/// What sessions read from the lander: per (device, lane) the durable watermark (core seq) and
/// the lane's generation, and the committer's checkpoint at the last commit.
#[derive(Default)]
pub struct SharedWatermarks {
    lanes: Mutex<HashMap<String, [(u64, u64); Lane::COUNT]>>,
    /// The committer's checkpoint at the last commit: what downstream readers (datasets, the
    /// archive feed) may consume.
    pub checkpoint: Arc<Mutex<Vec<u8>>>,
}

impl SharedWatermarks {
    /// (durable core seq, generation) of (device, lane).
    pub fn lane(&self, device: &str, lane: Lane) -> (u64, u64) {
        self.lanes.lock().expect("watermarks lock").get(device).map_or((0, 0), |lanes| lanes[lane.index()])
    }

    pub fn durable(&self, device: &str, lane: Lane) -> u64 {
        self.lane(device, lane).0
    }

    /// Copies (durable, generation) of (device, lane) from the core; returns whether it changed.
    fn publish<C: Committer, S: LandingStore>(
        &self,
        core: &LandingCore<C, S>,
        device: &str,
        lane: Lane,
    ) -> bool {
        let mut lanes = self.lanes.lock().expect("watermarks lock");
        let entry = lanes.entry(device.to_string()).or_insert([(0, 0); Lane::COUNT]);
        let current = (core.durable(device, lane), core.generation(device, lane));
        let previous = std::mem::replace(&mut entry[lane.index()], current);
        // Sessions ack what they read here: a watermark going back would ack less than before
        // (harmless) but means the core lost track of what is durable (not harmless).
        assert!(current.0 >= previous.0, "{device}/{lane}: published durable watermark went back");
        assert!(current.1 >= previous.1, "{device}/{lane}: published generation went back");
        previous != current
    }
}

/// A chunk a session verified, on its way to the landing core.
pub struct LandRequest {
    pub device: Arc<str>,
    pub chunk: IncomingChunk,
    pub permits: InFlightPermits,
    /// Where to tell the session that its chunk was not landed (it closes the connection).
    pub refusals: mpsc::Sender<LandingRefusal>,
    /// When the session read the chunk off its stream (for `SinkMetrics::ack_latency`).
    pub received_at: Instant,
}

/// A chunk's bytes held against the sink's in-flight budget and its connection's share of it,
/// released once the chunk is written.
pub struct InFlightPermits {
    pub connection: OwnedSemaphorePermit,
    pub all: OwnedSemaphorePermit,
}

impl InFlightPermits {
    /// Takes `bytes` from the connection's share first, then from the budget all connections
    /// share: a connection at its share waits without holding any of the shared budget, so one
    /// device whose chunks land slowly cannot starve the others. `on_wait` runs when the share
    /// is full (a metric). `None`: a semaphore was closed (shutdown).
    pub async fn acquire(
        connection: &Arc<Semaphore>,
        all: &Arc<Semaphore>,
        bytes: u32,
        on_wait: impl FnOnce(),
    ) -> Option<InFlightPermits> {
        let connection = match connection.clone().try_acquire_many_owned(bytes) {
            Ok(permit) => permit,
            Err(_) => {
                on_wait();
                connection.clone().acquire_many_owned(bytes).await.ok()?
            }
        };
        let all = all.clone().acquire_many_owned(bytes).await.ok()?;
        Some(InFlightPermits { connection, all })
    }
}

pub enum LanderRequest {
    /// A session's Hello: bind the ring if new, answer with the grant.
    Open {
        device: Arc<str>,
        ring_id: [u8; 16],
        reply: oneshot::Sender<Result<Grant, LandingRefusal>>,
    },
    Land(LandRequest),
}

pub struct Lander<C: Committer, S: LandingStore> {
    core: LandingCore<C, S>,
    shared: Arc<SharedWatermarks>,
    metrics: Arc<SinkMetrics>,
    durable_generation: watch::Sender<u64>,
    /// When each chunk landed since the last commit was received, per (device, lane): as many
    /// entries as chunks pending, which `commit_bytes_max` and `commit_interval` bound.
    received_at: HashMap<(Arc<str>, Lane), Vec<Instant>>,
}

impl<C: Committer, S: LandingStore> Lander<C, S> {
    pub fn new(
        core: LandingCore<C, S>,
        metrics: Arc<SinkMetrics>,
    ) -> (Lander<C, S>, Arc<SharedWatermarks>, watch::Receiver<u64>) {
        let shared = Arc::new(SharedWatermarks {
            lanes: Mutex::new(HashMap::new()),
            checkpoint: Arc::new(Mutex::new(core.checkpoint().to_vec())),
        });
        let devices: Vec<String> = core.devices().map(str::to_string).collect();
        for device in devices {
            for lane in Lane::ALL {
                shared.publish(&core, &device, lane);
            }
        }
        let (durable_generation, receiver) = watch::channel(0);
        let lander =
            Lander { core, shared: shared.clone(), metrics, durable_generation, received_at: HashMap::new() };
        (lander, shared, receiver)
    }

    /// Runs until every sender is dropped, committing what is pending before it returns.
    pub fn run(mut self, requests: Receiver<LanderRequest>) {
        loop {
            let wait = self.core.commit_deadline().map_or(Duration::from_secs(1), |deadline| {
                deadline.saturating_duration_since(Instant::now())
            });
            match requests.recv_timeout(wait) {
                Ok(LanderRequest::Open { device, ring_id, reply }) => {
                    // Cluster mode: the device must be this node's (standalone: always).
                    let grant = match self.core.claim(&device) {
                        Ok(Claim::Owned { .. }) => {
                            self.core.open_session(&device, ring_id).map_err(|error| {
                                tracing::error!(%device, %error, "cannot grant a session");
                                LandingRefusal::Unavailable(error.to_string())
                            })
                        }
                        Ok(Claim::OwnedElsewhere { node }) => {
                            tracing::info!(%device, owner = node, "Hello refused: the device is owned by another cluster node");
                            Err(LandingRefusal::Unavailable(format!(
                                "owned by cluster node {node}: connect there"
                            )))
                        }
                        Err(error) => {
                            tracing::error!(%device, %error, "cannot claim the device in the cluster");
                            Err(LandingRefusal::Unavailable(error.to_string()))
                        }
                    };
                    // A new epoch bumps the device's generations: that fences its older sessions.
                    let mut changed = false;
                    for lane in Lane::ALL {
                        changed |= self.shared.publish(&self.core, &device, lane);
                    }
                    if changed {
                        self.durable_generation.send_modify(|generation| *generation += 1);
                    }
                    let _ = reply.send(grant);
                }
                Ok(LanderRequest::Land(request)) => self.land(request),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.commit();
                    return;
                }
            }
            if self.core.commit_due(Instant::now()) {
                self.commit();
            }
            self.metrics.mirror(self.core.stats(), self.core.committer());
        }
    }

    fn land(&mut self, request: LandRequest) {
        let LandRequest { device, chunk, permits, refusals, received_at } = request;
        let outcome = self.core.land(
            Instant::now(),
            CoreLandRequest {
                device: &device,
                generation: chunk.generation,
                header: &chunk.header,
                encoded: &chunk.encoded,
            },
        );
        drop(permits);
        match outcome {
            LandOutcome::Landed => {
                self.received_at.entry((device, chunk.lane)).or_default().push(received_at);
                self.metrics.oldest_unacked.add(received_at);
            }
            LandOutcome::Duplicate => {}
            LandOutcome::Fenced => {
                let _ = refusals.try_send(LandingRefusal::Fenced);
            }
            LandOutcome::Failed(error) => {
                self.received_at.remove(&(device.clone(), chunk.lane));
                self.refresh_oldest_unacked();
                self.shared.publish(&self.core, &device, chunk.lane);
                self.durable_generation.send_modify(|generation| *generation += 1);
                let _ = refusals.try_send(LandingRefusal::StorageFailed(error.to_string()));
            }
        }
    }

    /// Publishes the oldest chunk still waiting for its ack.
    fn refresh_oldest_unacked(&self) {
        let oldest = self.received_at.values().flatten().min().copied();
        self.metrics.oldest_unacked.set(oldest);
    }

    fn commit(&mut self) {
        self.commit_landed();
        self.refresh_oldest_unacked();
    }

    fn commit_landed(&mut self) {
        match self.core.commit() {
            Ok(advanced) if advanced.is_empty() => {}
            Ok(advanced) => {
                *self.shared.checkpoint.lock().expect("checkpoint lock") = self.core.checkpoint().to_vec();
                let durable_at = Instant::now();
                for ((device, lane), _) in &advanced {
                    self.shared.publish(&self.core, device, *lane);
                    let key: (Arc<str>, Lane) = (Arc::from(device.as_str()), *lane);
                    for received_at in self.received_at.remove(&key).unwrap_or_default() {
                        self.metrics.ack_latency.observe(durable_at - received_at);
                    }
                }
                self.durable_generation.send_modify(|generation| *generation += 1);
            }
            Err(failure) => {
                tracing::error!(error = %failure.error, lanes = failure.rolled_back.len(), "commit failed; sessions of the rolled-back lanes are closed and resend");
                for (device, lane) in &failure.rolled_back {
                    self.shared.publish(&self.core, device, *lane);
                    self.received_at.remove(&(Arc::from(device.as_str()), *lane));
                }
                self.durable_generation.send_modify(|generation| *generation += 1);
            }
        }
    }
}

#[cfg(test)]
mod in_flight_tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::Poll;

    use super::*;

    /// Polls `future` once: `Some` if it completed without waiting.
    async fn now<T>(future: impl Future<Output = T>) -> Option<T> {
        let mut future = pin!(future);
        std::future::poll_fn(|context| match future.as_mut().poll(context) {
            Poll::Ready(value) => Poll::Ready(Some(value)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }

    /// Device A sends as fast as it can and its chunks never finish landing (it holds every
    /// permit it got); then device B sends one chunk of the same size. Returns whether B had to
    /// wait, and how often A was told to wait.
    async fn second_device_waits(budget: u32, share: u32, chunk: u32) -> (bool, u64) {
        let all = Arc::new(Semaphore::new(budget as usize));
        let a_share = Arc::new(Semaphore::new(share as usize));
        let b_share = Arc::new(Semaphore::new(share as usize));
        let waits = AtomicU64::new(0);
        let count_wait = || {
            waits.fetch_add(1, Ordering::Relaxed);
        };
        let mut held_by_a = Vec::new();
        while let Some(Some(permits)) = now(InFlightPermits::acquire(&a_share, &all, chunk, count_wait)).await
        {
            held_by_a.push(permits);
        }
        assert!(!held_by_a.is_empty());
        let b = now(InFlightPermits::acquire(&b_share, &all, chunk, || {})).await;
        (b.is_none(), waits.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn a_device_whose_chunks_land_slowly_cannot_starve_the_others() {
        // The sink's defaults: a quarter of the budget per connection.
        let (b_waited, a_waits) = second_device_waits(64, 16, 4).await;
        assert!(!b_waited, "B got its chunk in while A held its whole share");
        assert_eq!(a_waits, 1, "A was stopped at its share");
        // One pool for everybody (a share as large as the budget): A takes it all, B starves.
        let (b_waited, _) = second_device_waits(64, 64, 4).await;
        assert!(b_waited, "the test sees starvation when there is no per-connection share");
    }
}
