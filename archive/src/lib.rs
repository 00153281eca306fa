//! The core archive of AI decisions: every decision an appliance's model made, with the input it
//! got, what the model saw and the model file, kept so that it can be interrogated later and
//! shown not to have been altered.
//!
//! Layout under the archive root:
//! ```text
//! objects/sha256/<2 hex>/<2 hex>/<64 hex>   content-addressed objects (objects.rs)
//! log/entries                               the decision log's leaves (log.rs, leaf.rs)
//! log/index                                 60 bytes per entry: offset, length, leaf hash, id hash
//! log/checkpoints                           every signed checkpoint (checkpoint.rs)
//! keys/checkpoint-signing.pk8               Ed25519 PKCS#8, mode 0600
//! keys/checkpoint.vkey                      the verifier key, to publish
//! LOCK                                      flock of the one writer
//! ```
//!
//! Invariants:
//! - An entry is written only after the objects it names are durable (file and directory fsynced).
//! - The log is append-only; a checkpoint is written only after the entries it covers and their
//!   index are durable, and every checkpoint is kept.
//! - A (device, kind, id) appears in the log at most once.
//! - Every decoder (frames, leaves, checkpoints, verifier keys, proofs, bundles) bounds lengths
//!   before allocating and refuses unknown versions.
//! - The audit functions (`verify`, `show`, `export`, `verify_bundle`) never write to an archive.

pub mod archive;
pub mod audit;
pub mod checkpoint;
pub mod frame;
pub mod leaf;
pub mod log;
pub mod merkle;
pub mod objects;

pub use archive::{Archive, ArchiveConfig, ArchiveError, IngestOutcome, Ingested, IngestedRecord};
pub use audit::{
    AuditError, BundleError, BundleReport, DecisionView, ReviewItem, VerifyError, VerifyReport, export,
    review_list, show, verify, verify_bundle,
};
