//! One source's pipeline: source thread → bounded channel → pipeline thread (filters → chunker
//! per lane → ring).
//!
//! The pipeline thread wakes at least every `IDLE_WAKE_MS`, so time-bound chunks are sealed on
//! time and its heartbeat (which the systemd watchdog checks) advances while it is healthy even
//! when the source is quiet. A ring append that fails with backpressure (a `block` lane with no
//! room) is retried until it succeeds or the daemon stops, so a record the filters kept is never
//! dropped here: the source blocks on the full channel instead. The retry uses the chunk the ring
//! hands back with its refusal; no copy of each chunk is kept for it.
//!
//! Invariant: every record a source sends is either kept by the filters and appended to the ring
//! inside a chunk, or counted as dropped with a reason (`FilterMetrics`); on stop, open chunks
//! are flushed before the thread ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

use buffer::{AppendError, Ring, RingError};
use protocol::{Lane, SealedChunk};

use crate::chunker::{Chunker, ChunkerConfig, ChunkerMetrics};
use crate::dictionaries::DictionaryStore;
use crate::filters::{FilterChain, FilterConfig, FilterMetrics, Verdict};
use crate::source::{Source, SourceRecord, StopSignal};

/// Longest the pipeline thread sleeps without looking at its chunkers and stop signal.
pub const IDLE_WAKE_MS: u64 = 50;
/// Pause between two attempts to append a chunk the ring refused for lack of room.
const APPEND_RETRY_MS: u64 = 50;
/// Filter reconfigurations queued for one pipeline.
const FILTER_UPDATES_MAX: usize = 4;

/// Counters of one source's pipeline besides the filters' and chunkers' own.
#[derive(Debug, Default)]
pub struct PipelineMetrics {
    pub records_received: AtomicU64,
    pub chunks_appended: AtomicU64,
    /// Encoded bytes appended to the ring.
    pub bytes_appended: AtomicU64,
    pub append_retries: AtomicU64,
    pub append_failures: AtomicU64,
    /// Records the chunker refused (invalid key or content type from the source).
    pub records_refused: AtomicU64,
    pub source_errors: AtomicU64,
    /// Milliseconds since the Unix epoch of the pipeline thread's last loop: the watchdog's
    /// measure of progress.
    pub heartbeat_unix_ms: AtomicU64,
    pub filter_reloads: AtomicU64,
}

/// What a running source pipeline exposes.
pub struct SourcePipeline {
    pub name: String,
    pub metrics: Arc<PipelineMetrics>,
    pub filter_metrics: Arc<FilterMetrics>,
    /// One per lane the source has written to so far.
    pub chunker_metrics: Arc<std::sync::Mutex<BTreeMap<Lane, Arc<ChunkerMetrics>>>>,
    filter_updates: SyncSender<Vec<FilterConfig>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

pub struct PipelineSettings {
    pub name: String,
    pub filters: Vec<FilterConfig>,
    pub chunker: ChunkerConfig,
    /// Records queued between the source and the pipeline thread.
    pub channel_records_max: usize,
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

impl SourcePipeline {
    /// Starts the source's thread and its pipeline thread.
    pub fn spawn(
        settings: PipelineSettings,
        source: Box<dyn Source>,
        ring: Ring,
        dictionaries: Option<Arc<DictionaryStore>>,
        stop: StopSignal,
    ) -> anyhow::Result<SourcePipeline> {
        assert!(settings.channel_records_max > 0, "channel_records_max must be positive");
        let filters = FilterChain::from_config(&settings.filters)
            .map_err(|error| anyhow::anyhow!("sources.{}.filters: {error}", settings.name))?;
        let metrics = Arc::new(PipelineMetrics::default());
        metrics.heartbeat_unix_ms.store(unix_ms(), Ordering::Relaxed);
        let filter_metrics = filters.metrics();
        let chunker_metrics = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let (records, received) = std::sync::mpsc::sync_channel(settings.channel_records_max);
        let (filter_updates, updates) = std::sync::mpsc::sync_channel(FILTER_UPDATES_MAX);
        let name = settings.name.clone();
        let source_thread = std::thread::Builder::new().name(format!("source-{name}")).spawn({
            let (stop, metrics, name) = (stop.clone(), metrics.clone(), name.clone());
            move || {
                if let Err(error) = source.run(records, stop) {
                    metrics.source_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(source = %name, error = format!("{error:#}"), "source stopped with an error");
                }
            }
        })?;
        let mut stage = Stage {
            name: name.clone(),
            chunker_config: settings.chunker,
            chunkers: BTreeMap::new(),
            chunker_metrics: chunker_metrics.clone(),
            filters,
            ring,
            dictionaries,
            metrics: metrics.clone(),
            stop,
        };
        let pipeline_thread = std::thread::Builder::new()
            .name(format!("pipeline-{name}"))
            .spawn(move || stage.run(received, updates))?;
        Ok(SourcePipeline {
            name,
            metrics,
            filter_metrics,
            chunker_metrics,
            filter_updates,
            threads: vec![source_thread, pipeline_thread],
        })
    }

    /// Replaces the filters between two records; an invalid list leaves the old one in force
    /// (the pipeline logs why).
    pub fn reconfigure_filters(&self, filters: Vec<FilterConfig>) -> anyhow::Result<()> {
        self.filter_updater().reconfigure(filters)
    }

    /// A handle that reconfigures this pipeline's filters from another task (remote config).
    pub fn filter_updater(&self) -> FilterUpdater {
        FilterUpdater { name: self.name.clone(), updates: self.filter_updates.clone() }
    }

    /// Waits for both threads (after the stop signal was set).
    /// Whether all its threads still run.
    pub fn is_running(&self) -> bool {
        self.threads.iter().all(|thread| !thread.is_finished())
    }

    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

#[derive(Clone)]
pub struct FilterUpdater {
    name: String,
    updates: SyncSender<Vec<FilterConfig>>,
}

impl FilterUpdater {
    /// As `SourcePipeline::reconfigure_filters`.
    pub fn reconfigure(&self, filters: Vec<FilterConfig>) -> anyhow::Result<()> {
        FilterChain::from_config(&filters)
            .map_err(|error| anyhow::anyhow!("sources.{}.filters: {error}", self.name))?;
        self.updates
            .try_send(filters)
            .map_err(|_| anyhow::anyhow!("sources.{}: too many filter updates queued", self.name))
    }
}

struct Stage {
    name: String,
    chunker_config: ChunkerConfig,
    chunkers: BTreeMap<Lane, Chunker>,
    chunker_metrics: Arc<std::sync::Mutex<BTreeMap<Lane, Arc<ChunkerMetrics>>>>,
    filters: FilterChain,
    ring: Ring,
    dictionaries: Option<Arc<DictionaryStore>>,
    metrics: Arc<PipelineMetrics>,
    stop: StopSignal,
}

impl Stage {
    fn run(&mut self, records: Receiver<SourceRecord>, updates: Receiver<Vec<FilterConfig>>) {
        loop {
            self.metrics.heartbeat_unix_ms.store(unix_ms(), Ordering::Relaxed);
            match updates.try_recv() {
                Ok(filters) => match self.filters.reconfigure(&filters) {
                    Ok(()) => {
                        self.metrics.filter_reloads.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(source = %self.name, "filters reconfigured");
                    }
                    Err(error) => tracing::error!(source = %self.name, %error, "filter update refused"),
                },
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
            }
            let now = Instant::now();
            let wait = self
                .chunkers
                .values()
                .filter_map(Chunker::deadline)
                .min()
                .map_or(Duration::from_millis(IDLE_WAKE_MS), |deadline| {
                    deadline.saturating_duration_since(now)
                })
                .min(Duration::from_millis(IDLE_WAKE_MS));
            match records.recv_timeout(wait) {
                Ok(record) => self.accept(record),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Drain what is queued without waking up per record.
            while let Ok(record) = records.try_recv() {
                self.accept(record);
            }
            let now = Instant::now();
            let due: Vec<SealedChunk> =
                self.chunkers.values_mut().filter_map(|chunker| chunker.poll(now).ok().flatten()).collect();
            for chunk in due {
                self.append(chunk);
            }
            if self.stop.is_stopped() && matches!(records.try_recv(), Err(TryRecvError::Empty)) {
                break;
            }
        }
        while let Ok(record) = records.try_recv() {
            self.accept(record);
        }
        let open: Vec<SealedChunk> =
            self.chunkers.values_mut().filter_map(|chunker| chunker.flush().ok().flatten()).collect();
        for chunk in open {
            self.append(chunk);
        }
    }

    fn accept(&mut self, record: SourceRecord) {
        self.metrics.records_received.fetch_add(1, Ordering::Relaxed);
        let record = match self.filters.apply(record) {
            Verdict::Keep(record) => record,
            Verdict::Drop { .. } => return,
        };
        let lane = record.lane;
        let chunker = self.chunkers.entry(lane).or_insert_with(|| {
            let chunker = Chunker::new(
                &format!("{}-{}", self.name, lane),
                lane,
                self.chunker_config.clone(),
                self.dictionaries.clone(),
            );
            self.chunker_metrics.lock().expect("chunker metrics lock").insert(lane, chunker.metrics());
            chunker
        });
        match chunker.push(&record, Instant::now()) {
            Ok(sealed) => {
                for chunk in sealed {
                    self.append(chunk);
                }
            }
            Err(error) => {
                self.metrics.records_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.name, %error, "record refused by the chunker");
            }
        }
    }

    fn append(&mut self, chunk: SealedChunk) {
        if let Err(error) = append_chunk(&self.ring, chunk, &self.stop, &self.metrics) {
            tracing::error!(source = %self.name, %error, "cannot append a chunk to the ring");
        }
    }
}

/// Appends `chunk` to `ring`, retrying every `APPEND_RETRY_MS` while a `block` lane refuses it
/// with backpressure, until it is stored or `stop` is set; counts into `metrics`. The pipeline
/// thread's own append (and `tributary bench pipeline`'s, so the bench measures this path).
pub fn append_chunk(
    ring: &Ring,
    mut chunk: SealedChunk,
    stop: &StopSignal,
    metrics: &PipelineMetrics,
) -> Result<u64, RingError> {
    let bytes = chunk.encoded_len() as u64;
    loop {
        match ring.append(chunk) {
            Ok(seq) => {
                metrics.chunks_appended.fetch_add(1, Ordering::Relaxed);
                metrics.bytes_appended.fetch_add(bytes, Ordering::Relaxed);
                return Ok(seq);
            }
            // The ring hands the refused chunk back, so the retry needs no copy of it.
            Err(AppendError { error: RingError::Backpressure { .. }, chunk: Some(refused) })
                if !stop.is_stopped() =>
            {
                chunk = refused;
                metrics.append_retries.fetch_add(1, Ordering::Relaxed);
                metrics.heartbeat_unix_ms.store(unix_ms(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(APPEND_RETRY_MS));
            }
            Err(refused) => {
                metrics.append_failures.fetch_add(1, Ordering::Relaxed);
                return Err(refused.error);
            }
        }
    }
}
