//! What every pipeline stage passes along: a record on its way from a source to the chunker.
//!
//! Stages are threads joined by bounded channels (`std::sync::mpsc::sync_channel`): a slow stage
//! makes its producer wait instead of growing a queue.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use protocol::Lane;

/// One record produced by a source, before filtering and chunking.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceRecord {
    /// The lane it travels on (sensor readings on `Sensor`, frames on `Media`).
    pub lane: Lane,
    /// A valid record key (`protocol::validate_key`: no '.', '/', control characters).
    pub key: String,
    /// Microseconds since the Unix epoch, stamped by the source.
    pub timestamp_us: u64,
    /// A MIME type, e.g. "application/json" or "image/jpeg".
    pub content_type: String,
    pub payload: Vec<u8>,
    /// Labels added by the tagging filter; the chunker merges them into JSON payloads under
    /// "tags".
    pub tags: BTreeMap<String, String>,
}

/// Set once to ask every stage to finish.
#[derive(Clone, Debug, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where a source sends its records: bounded, so a source blocks when the pipeline is behind.
pub type RecordSender = std::sync::mpsc::SyncSender<SourceRecord>;

/// A producer of records. `run` is called on a thread of its own and returns when `stop` is set,
/// when the receiving side hangs up, or with an error the daemon logs and counts.
pub trait Source: Send {
    /// The source's name from the config (used in metrics labels and logs).
    fn name(&self) -> &str;
    fn run(self: Box<Self>, out: RecordSender, stop: StopSignal) -> anyhow::Result<()>;
}
