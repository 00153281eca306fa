//! Onboarding over MQTT: a device with no certificate obtains one from the fleet CA with a claim
//! token (or an operator's approval), then reports heartbeats and receives remote config.
//!
//! This crate is the edge side and the wire: the device's first boot, its agent, the messages,
//! topics and MQTT session both sides use. The core side (the authority that signs CSRs, its heed
//! registry, the fleet CLI) is the `onboarding-authority` crate, so an appliance does not link
//! it.
//!
//! Topic layout (prefix `tributary`; `{id}` is a device id, 1..=128 bytes of `[A-Za-z0-9_-]`;
//! `{key}` is the fingerprint of the requesting key: SHA-256 of its SubjectPublicKeyInfo, 64
//! lowercase hex digits, [`topics::key_fingerprint`]):
//!
//! | topic                                   | from      | to        | payload (JSON)         |
//! |-----------------------------------------|-----------|-----------|------------------------|
//! | `tributary/onboarding/request/{key}`    | device    | authority | [`OnboardingRequest`]  |
//! | `tributary/onboarding/response/{key}`   | authority | device    | [`OnboardingResponse`] |
//! | `tributary/device/{id}/heartbeat`       | device    | authority | [`Heartbeat`]          |
//! | `tributary/device/{id}/config`          | authority | device    | [`ConfigDocument`], retained |
//! | `tributary/device/{id}/config/ack`      | device    | authority | [`ConfigAck`]          |
//! | `tributary/device/{id}/renew/request`   | device    | authority | [`RenewalRequest`]     |
//! | `tributary/device/{id}/renew/response`  | authority | device    | [`RenewalResponse`]    |
//!
//! Identities at the broker (TLS client certificates signed by the fleet CA, CN = MQTT user
//! name): a device (CN = its id), the shared claim identity (CN `claim`, shipped in every image,
//! client id = `{key}` of the key it onboards) and the authority (CN `onboarding-authority`). The
//! ACL (`onboarding/mosquitto/acl`) keys a device's topics on its CN, and lets the claim identity
//! use only `request/{client id}` and `response/{client id}`. Both reserved ids are put on the
//! revocation list by the authority, so neither identity can stream to the QUIC sink.
//!
//! Against a holder of the claim identity (every device image has it): it can read only answers
//! to keys it holds (the authority answers on the topic of the CSR's key and refuses a topic that
//! is not that key's fingerprint, after the CSR signature proved possession); it cannot take a
//! device id bound to another key (an active device's certificate key, a pending request's key,
//! an approved key) nor reuse a claim token (single-use, consumed with the signature); and no
//! long-lived session uses a client id it can guess (agents and the authority add a random
//! suffix), so it cannot knock them off the broker. What it can still do is listed in
//! docs/ARCHITECTURE.md (onboarding).
//!
//! Limits: a payload is at most `PAYLOAD_BYTES_MAX` (16 KiB) and is refused before parsing when
//! larger; config holds at most `CONFIG_KEYS_MAX` (64) keys of at most `CONFIG_KEY_BYTES_MAX` (64)
//! bytes with values of at most `CONFIG_VALUE_BYTES_MAX` (256) bytes; received messages wait in
//! queues of at most `INCOMING_QUEUE_MAX` (1024) messages (more are dropped and counted: every
//! sender retries).
//!
//! - `onboarding-authority` (another crate, core side): the `Authority` answers requests, records
//!   heartbeats and config acks, publishes config changes and approvals the CLI writes into its
//!   `Registry` (heed: claim tokens (hashed), devices, heartbeats, config).
//! - `device.rs`: [`device::ensure_identity`] (appliance first boot).
//! - `agent.rs`: [`DeviceAgent`] (appliance: heartbeats out, config in, persisted).
//! - `broker.rs` (feature `embedded-broker`): [`broker::EmbeddedBroker`], rumqttd for the
//!   one-machine demo.
//! - `messages.rs`: payloads and [`RejectionCode`]; `mqtt.rs`: the rumqttc session driver.
//!
//! Invariant: a device's private key is generated on the device and is never sent: requests carry
//! a CSR, responses a certificate.
//! Invariant: an onboarding answer is published only on the topic of the key whose CSR signature
//! verified; a device id is bound to one key (pending, approved or certified) and a claim token
//! to the first certificate it was used for.
//! Invariant: the device's trust anchor is the fleet CA shipped in its image (claim bundle
//! `ca.pem`), never a CA named in an MQTT message.
//! Invariant: the rumqttc event loop runs in its own task and never publishes; publishing is done
//! by other tasks through the `AsyncClient`.

pub mod agent;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod device;
mod error;
mod files;
pub mod messages;
pub mod mqtt;
pub mod topics;

pub use agent::{ConfigUpdate, DeviceAgent, DeviceAgentConfig, DeviceStatus, RenewalMetrics};
pub use device::{DeviceIdentity, DeviceOnboardingConfig, SinkLocation, ensure_identity, load_identity};
pub use error::OnboardingError;
pub use messages::{
    CONFIG_KEY_BYTES_MAX, CONFIG_KEYS_MAX, CONFIG_VALUE_BYTES_MAX, ConfigAck, ConfigDocument, Heartbeat,
    OnboardingRequest, OnboardingResponse, PAYLOAD_BYTES_MAX, RejectionCode, RenewalRequest, RenewalResponse,
};
pub use mqtt::{BrokerEndpoint, INCOMING_QUEUE_MAX};

/// The subject CN of the shared bootstrap identity devices use before they have a certificate.
pub const CLAIM_IDENTITY: &str = "claim";
/// The subject CN of the authority's own MQTT identity.
pub const AUTHORITY_IDENTITY: &str = "onboarding-authority";
/// Device ids no device may claim: they name the identities above.
pub const RESERVED_DEVICE_IDS: [&str; 2] = [CLAIM_IDENTITY, AUTHORITY_IDENTITY];
