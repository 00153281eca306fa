//! The core archive of AI decisions: every decision an appliance's model made, with the input it
//! got, what the model saw and the model file, kept so that it can be interrogated later and
//! shown not to have been altered.
//!
//! Layout under the archive root:
//! ```text
//! objects.toml                              which store holds the objects (objects_config.rs)
//! objects/sha256/<2 hex>/<2 hex>/<64 hex>   content-addressed objects, kind = "local" (objects.rs)
//! log/entries                               the decision log's leaves (log.rs, leaf.rs)
//! log/index                                 60 bytes per entry: offset, length, leaf hash, id hash
//! log/checkpoints                           every signed checkpoint (checkpoint.rs)
//! keys/checkpoint-signing.pk8               Ed25519 PKCS#8, mode 0600
//! keys/checkpoint.vkey                      the verifier key, to publish
//! LOCK                                      flock of the one writer
//! ```
//!
//! Objects are local (the default) or in an S3-compatible object store through the `object_store`
//! crate (`store.rs`), as `<prefix>/sha256/<2 hex>/<2 hex>/<64 hex>` keys in a bucket; the log,
//! index, checkpoints and keys always stay local. `objects.toml` records the store when the
//! archive is created; opening it with a config naming another store is refused, and the audit
//! functions read it to find and check the objects (S3 credentials from `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY`, never from a file). The archive's API is synchronous: an object store
//! runs its requests on its own I/O thread with a current-thread tokio runtime, and no tokio type
//! is part of this crate's API.
//!
//! Invariants:
//! - An entry is written only after the objects it names are durable: local files and directories
//!   fsynced, or, in an object store, the PUT succeeded and a HEAD confirmed the size.
//! - Objects are immutable in an object store: an existing key is never overwritten, and one
//!   holding other bytes makes the flush fail.
//! - The log is append-only; a checkpoint is written only after the entries it covers and their
//!   index are durable, and every checkpoint is kept.
//! - A (device, kind, id) appears in the log at most once.
//! - Every decoder (frames, leaves, checkpoints, verifier keys, proofs, bundles, objects.toml)
//!   bounds lengths before allocating and refuses unknown versions.
//! - The audit functions (`verify`, `show`, `export`, `verify_bundle`) never write to an archive.

pub mod archive;
pub mod audit;
pub mod checkpoint;
pub mod frame;
pub mod leaf;
pub mod log;
pub mod merkle;
pub mod objects;
pub mod objects_config;
mod store;

pub use archive::{Archive, ArchiveConfig, ArchiveError, IngestOutcome, Ingested, IngestedRecord};
pub use audit::{
    AuditError, BundleError, BundleReport, DecisionView, ReviewItem, VerifyError, VerifyReport, export,
    review_list, show, verify, verify_bundle, verify_with_objects,
};
pub use objects::{ObjectError, Objects};
pub use objects_config::{ObjectsConfig, ObjectsKind, ObjectsRecord};
pub use store::s3_client;
