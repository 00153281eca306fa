use std::fmt;
use std::path::PathBuf;

use protocol::{Lane, SealedChunk};

/// Everything that can go wrong with the ring, each with the context an operator needs.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("invalid ring configuration: {key}: {problem}")]
    Config { key: &'static str, problem: String },

    #[error("failed to open ring at {path}: {reason}")]
    Open { path: PathBuf, reason: String },

    #[error(
        "ring at {path} is corrupt or foreign ({reason}); on_corrupt = refuse, so it was left \
         untouched (move it aside or set on_corrupt = quarantine)"
    )]
    CorruptRefused { path: PathBuf, reason: String },

    #[error("ring at {path} has format {found:?}, this build reads {supported:?}")]
    UnsupportedFormat { path: PathBuf, found: String, supported: &'static str },

    #[error("ring at {path} is already open in this process")]
    AlreadyOpen { path: PathBuf },

    #[error(
        "chunk of {bytes} bytes cannot fit lane {lane}: the most it takes is {budget_bytes} bytes \
         (its budget, and at most a thirty-second of the ring's capacity)"
    )]
    ChunkTooLarge { lane: Lane, bytes: u64, budget_bytes: u64 },

    #[error(
        "lane {lane} is full ({used_bytes} of {budget_bytes} bytes) and waited {waited_ms} ms \
         for acks to free {needed_bytes} bytes"
    )]
    Backpressure { lane: Lane, used_bytes: u64, budget_bytes: u64, needed_bytes: u64, waited_ms: u64 },

    #[error(
        "lane {lane} (drop_oldest) could not make room for {needed_bytes} bytes: the rest of the \
         ring is held by lanes it may not evict; the chunk was rejected and counted"
    )]
    Rejected { lane: Lane, needed_bytes: u64 },

    #[error("ack for lane {lane} through seq {through_seq} is beyond the last appended seq {last_seq}")]
    AckBeyondHead { lane: Lane, through_seq: u64, last_seq: u64 },

    #[error("ring storage error at {path}: {operation}: {source}")]
    Storage {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: heed::Error,
    },

    #[error("ring writer has stopped (the ring is closing or its writer thread failed)")]
    WriterStopped,
}

pub type Result<T> = std::result::Result<T, RingError>;

/// An append the ring did not store, with the chunk handed back untouched (no seq given), so a
/// caller that retries — after `Backpressure` on a `block` lane, or `Rejected` once acks free room
/// — needs no copy of its own (frames make chunks of up to 1 MiB).
pub struct AppendError {
    pub error: RingError,
    /// The refused chunk, exactly as it was passed to `Ring::append`. `None` only with
    /// `WriterStopped` when the writer thread died holding it.
    pub chunk: Option<SealedChunk>,
}

impl From<AppendError> for RingError {
    fn from(refused: AppendError) -> RingError {
        refused.error
    }
}

/// Says what the ring reported; the chunk is data, not part of the message.
impl fmt::Display for AppendError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, formatter)
    }
}

/// `SealedChunk`'s own `Debug` prints every body byte; a panic message or log line naming a
/// refused 1 MiB chunk should not.
impl fmt::Debug for AppendError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chunk = self.chunk.as_ref().map(|chunk| {
            format!("{} chunk, {} records, {} body bytes", chunk.lane, chunk.record_count, chunk.body.len())
        });
        formatter.debug_struct("AppendError").field("error", &self.error).field("chunk", &chunk).finish()
    }
}

/// Transparent over `error`: the same message and the same source, so an error chain does not
/// repeat the message.
impl std::error::Error for AppendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}
