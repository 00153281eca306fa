use std::path::PathBuf;

use protocol::Lane;

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
