//! Onboarding over MQTT, core side: the [`Authority`] that answers onboarding requests (signs a
//! device's CSR with the fleet CA after checking its claim token or an operator's approval),
//! records heartbeats and config acknowledgements and publishes config; its device [`Registry`]
//! (heed); and the operator's fleet CLI (`core-sink fleet ...`).
//!
//! The wire it speaks (messages, topics, the MQTT session) and the device side are the
//! `onboarding` crate; the topic layout, the identities at the broker and the limits are
//! described there. Only the core (core-sink, the demo) links this crate: the appliance's
//! dependency tree holds `onboarding` but not this crate, its heed registry or its CLI.
//!
//! - `authority.rs`: [`Authority`]: answers requests, records heartbeats and config acks,
//!   publishes config changes and approvals the CLI writes into the registry.
//! - `registry.rs`: [`Registry`] (heed): claim tokens (hashed), devices, heartbeats, config.
//! - `cli.rs`: `core-sink fleet ...` (tokens, approve, revoke, config, list, top).
//!
//! Invariant: an onboarding answer is published only on the topic of the key whose CSR signature
//! verified; a device id is bound to one key (pending, approved or certified) and a claim token
//! to the first certificate it was used for.

pub mod authority;
pub mod cli;
pub mod registry;

pub use authority::{Authority, AuthorityConfig};
pub use registry::{DeviceRecord, DeviceState, Registry};
