//! MQTT payloads (JSON) and their limits. Every payload is bounded by `PAYLOAD_BYTES_MAX` before it
//! is parsed, and unknown fields are refused, so a hostile or mistaken sender gets a reason code
//! instead of partial processing.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Longest payload any side parses. A request is about 1 KiB (a P-256 CSR is about 0.5 KiB); a
/// response with certificate, CA and config about 3 KiB.
pub const PAYLOAD_BYTES_MAX: usize = 16 * 1024;
/// Most keys one device config holds.
pub const CONFIG_KEYS_MAX: usize = 64;
/// Longest config key in bytes (`[a-z0-9_.]`).
pub const CONFIG_KEY_BYTES_MAX: usize = 64;
/// Longest config value in bytes.
pub const CONFIG_VALUE_BYTES_MAX: usize = 256;
/// Longest claim token in bytes (ours are 43).
pub const CLAIM_TOKEN_BYTES_MAX: usize = 128;
/// Longest message string (rejection message, ack message) a sender may put in a payload.
pub const MESSAGE_BYTES_MAX: usize = 512;
/// Most ring lanes a heartbeat reports.
pub const HEARTBEAT_LANES_MAX: usize = 16;
/// Longest boot slot name a heartbeat reports (RAUC names slots `A`, `B`, `rootfs.0`, ...).
pub const BOOT_SLOT_BYTES_MAX: usize = 32;

// A full config fits in one payload with room for the envelope.
const _: () =
    assert!(CONFIG_KEYS_MAX * (CONFIG_KEY_BYTES_MAX + CONFIG_VALUE_BYTES_MAX + 8) < PAYLOAD_BYTES_MAX * 2);

/// A device asks for a certificate: `tributary/onboarding/request/{key}`, where `{key}` is the
/// [`key_fingerprint`](crate::topics::key_fingerprint) of the key in `csr_pem`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OnboardingRequest {
    pub device_id: String,
    /// Absent: the request waits for an operator's approval (if the authority allows that).
    #[serde(default)]
    pub claim_token: Option<String>,
    /// PKCS#10, PEM, subject CN = `device_id`, ECDSA P-256.
    pub csr_pem: String,
}

/// The authority's answer: `tributary/onboarding/response/{key}` (the request's key fingerprint).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum OnboardingResponse {
    Accepted {
        certificate_pem: String,
        /// The fleet CAs trusted (the signer first) and, during a CA rollover, the
        /// cross-certificate by which the old CA vouches for the new one. The device takes a CA
        /// from here only if it pins it already (the claim bundle's `ca.pem`) or a pinned CA
        /// vouches for it; otherwise it refuses the answer.
        ca_pem: String,
        /// Where the QUIC sink listens (`host:port`) and the name its certificate carries.
        sink_address: String,
        sink_server_name: String,
        config: ConfigDocument,
    },
    /// Waiting for `core-sink fleet approve ID`; the device keeps asking.
    Pending {
        message: String,
    },
    Rejected {
        code: RejectionCode,
        message: String,
    },
}

/// An onboarded device asks for a new certificate before its own expires:
/// `tributary/device/{id}/renew/request`, published with the current certificate (the broker's
/// ACL ties the topic to that certificate's CN). `csr_pem` is for a new key, subject CN = the id.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RenewalRequest {
    pub csr_pem: String,
}

/// The authority's answer on `tributary/device/{id}/renew/response`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum RenewalResponse {
    /// For the CSR's key; the device checks it chains to its pinned CA before installing it.
    Renewed {
        certificate_pem: String,
        /// The fingerprint of the key it is for, so a device can tell answers to an older
        /// request (a retry) from the answer to its current one.
        key_sha256: String,
        /// The fleet's trust offer, as in `OnboardingResponse::Accepted::ca_pem`: how a device
        /// learns a new CA during a rollover and drops a retired one. Absent from authorities
        /// older than the rollover; the device then keeps its pinned CAs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_pem: Option<String>,
    },
    Rejected {
        code: RejectionCode,
        message: String,
    },
}

/// Why a request was refused; sent to the device and logged.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RejectionCode {
    PayloadTooLarge,
    MalformedPayload,
    TopicMismatch,
    InvalidDeviceId,
    ReservedDeviceId,
    MissingToken,
    UnknownToken,
    ExpiredToken,
    TokenUsed,
    CsrMalformed,
    CsrBadSignature,
    CsrUnsupportedKey,
    CsrSubjectMismatch,
    DeviceIdTaken,
    /// The device id is bound to another key: requested by it (pending) or approved for it.
    KeyMismatch,
    DeviceRevoked,
    /// More requests per second than `requests_per_second_max`; ask again later.
    RateLimited,
    /// `pending_devices_max` unapproved devices are waiting already; ask again later.
    TooManyPending,
    /// A renewal for a device that is not onboarded (unknown or pending).
    NotOnboarded,
    InternalError,
}

impl RejectionCode {
    /// Every code, in declaration order (`index` is the position here).
    pub const ALL: [RejectionCode; 20] = [
        RejectionCode::PayloadTooLarge,
        RejectionCode::MalformedPayload,
        RejectionCode::TopicMismatch,
        RejectionCode::InvalidDeviceId,
        RejectionCode::ReservedDeviceId,
        RejectionCode::MissingToken,
        RejectionCode::UnknownToken,
        RejectionCode::ExpiredToken,
        RejectionCode::TokenUsed,
        RejectionCode::CsrMalformed,
        RejectionCode::CsrBadSignature,
        RejectionCode::CsrUnsupportedKey,
        RejectionCode::CsrSubjectMismatch,
        RejectionCode::DeviceIdTaken,
        RejectionCode::KeyMismatch,
        RejectionCode::DeviceRevoked,
        RejectionCode::RateLimited,
        RejectionCode::TooManyPending,
        RejectionCode::NotOnboarded,
        RejectionCode::InternalError,
    ];

    /// The position of this code in [`RejectionCode::ALL`] (a metrics slot).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RejectionCode::PayloadTooLarge => "payload_too_large",
            RejectionCode::MalformedPayload => "malformed_payload",
            RejectionCode::TopicMismatch => "topic_mismatch",
            RejectionCode::InvalidDeviceId => "invalid_device_id",
            RejectionCode::ReservedDeviceId => "reserved_device_id",
            RejectionCode::MissingToken => "missing_token",
            RejectionCode::UnknownToken => "unknown_token",
            RejectionCode::ExpiredToken => "expired_token",
            RejectionCode::TokenUsed => "token_used",
            RejectionCode::CsrMalformed => "csr_malformed",
            RejectionCode::CsrBadSignature => "csr_bad_signature",
            RejectionCode::CsrUnsupportedKey => "csr_unsupported_key",
            RejectionCode::CsrSubjectMismatch => "csr_subject_mismatch",
            RejectionCode::DeviceIdTaken => "device_id_taken",
            RejectionCode::KeyMismatch => "key_mismatch",
            RejectionCode::DeviceRevoked => "device_revoked",
            RejectionCode::RateLimited => "rate_limited",
            RejectionCode::TooManyPending => "too_many_pending",
            RejectionCode::NotOnboarded => "not_onboarded",
            RejectionCode::InternalError => "internal_error",
        }
    }

    /// Whether asking again with the same request can succeed (after an internal error or a
    /// limit of the authority's, it can).
    pub fn is_permanent(self) -> bool {
        !matches!(
            self,
            RejectionCode::InternalError | RejectionCode::RateLimited | RejectionCode::TooManyPending
        )
    }
}

impl fmt::Display for RejectionCode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A device's config: `tributary/device/{id}/config`, retained, so a device that connects later
/// still gets the latest. `version` only grows; a device applies a version above its own.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigDocument {
    pub version: u64,
    pub values: BTreeMap<String, String>,
}

impl ConfigDocument {
    /// Checks the key alphabet and the limits; the error says which key.
    pub fn validate(&self) -> Result<(), String> {
        if self.values.len() > CONFIG_KEYS_MAX {
            return Err(format!("{} keys, at most {CONFIG_KEYS_MAX}", self.values.len()));
        }
        for (key, value) in &self.values {
            validate_config_entry(key, value)?;
        }
        Ok(())
    }
}

/// Checks one config key and value against the alphabet and limits.
pub fn validate_config_entry(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > CONFIG_KEY_BYTES_MAX {
        return Err(format!("config key {key:?}: 1..={CONFIG_KEY_BYTES_MAX} bytes expected"));
    }
    if !key.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"_.".contains(&byte)) {
        return Err(format!("config key {key:?}: only a-z 0-9 _ . allowed"));
    }
    if value.len() > CONFIG_VALUE_BYTES_MAX || value.chars().any(char::is_control) {
        return Err(format!(
            "config value of {key:?}: at most {CONFIG_VALUE_BYTES_MAX} bytes, no control characters"
        ));
    }
    Ok(())
}

/// The device's answer to a config: `tributary/device/{id}/config/ack`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigAck {
    pub version: u64,
    pub applied: bool,
    pub message: String,
}

/// Periodic device report: `tributary/device/{id}/heartbeat`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Software version of the appliance.
    pub version: String,
    pub uptime_seconds: u64,
    /// Ring fill per lane (lane name → percent of the lane's share, 0..=100).
    pub ring_fill_percent_per_lane: BTreeMap<String, f64>,
    /// Chunks in the ring not yet acknowledged by the sink.
    pub uplink_lag_chunks: u64,
    /// When the sink last acknowledged a chunk (Unix milliseconds); absent if never.
    pub last_ack_unix_ms: Option<u64>,
    /// The config version the device runs with.
    pub config_version: u64,
    /// When the device sent this heartbeat (Unix milliseconds, the device's clock).
    pub sent_unix_ms: u64,
    /// Per lane, the age in seconds of the oldest record the sink has not acknowledged as
    /// durable (0 when everything is acked). Absent from devices older than this field.
    #[serde(default)]
    pub uplink_lag_seconds_per_lane: BTreeMap<String, f64>,
    /// Records and payload bytes the device's sources took in per second, since its last report.
    #[serde(default)]
    pub records_per_second: f64,
    #[serde(default)]
    pub bytes_per_second: f64,
    /// The A/B image slot the device booted (`rauc.slot=` on its kernel command line); absent
    /// when it does not run from an image.
    #[serde(default)]
    pub boot_slot: Option<String>,
}

impl Heartbeat {
    pub fn validate(&self) -> Result<(), String> {
        if self.version.len() > CONFIG_VALUE_BYTES_MAX {
            return Err(format!("version: at most {CONFIG_VALUE_BYTES_MAX} bytes"));
        }
        if self.ring_fill_percent_per_lane.len() > HEARTBEAT_LANES_MAX
            || self.ring_fill_percent_per_lane.keys().any(|lane| lane.len() > CONFIG_KEY_BYTES_MAX)
        {
            return Err(format!(
                "ring_fill_percent_per_lane: at most {HEARTBEAT_LANES_MAX} short lane names"
            ));
        }
        if self.uplink_lag_seconds_per_lane.len() > HEARTBEAT_LANES_MAX
            || self.uplink_lag_seconds_per_lane.keys().any(|lane| lane.len() > CONFIG_KEY_BYTES_MAX)
        {
            return Err(format!(
                "uplink_lag_seconds_per_lane: at most {HEARTBEAT_LANES_MAX} short lane names"
            ));
        }
        let measures = [self.records_per_second, self.bytes_per_second]
            .into_iter()
            .chain(self.uplink_lag_seconds_per_lane.values().copied())
            .chain(self.ring_fill_percent_per_lane.values().copied());
        if measures.into_iter().any(|value| !value.is_finite() || value < 0.0) {
            return Err("rates, lags and fills must be finite and not negative".to_owned());
        }
        if self.boot_slot.as_ref().is_some_and(|slot| slot.is_empty() || slot.len() > BOOT_SLOT_BYTES_MAX) {
            return Err(format!("boot_slot: 1..={BOOT_SLOT_BYTES_MAX} bytes"));
        }
        Ok(())
    }
}

/// Parses a payload after checking its size: the reason code and message on failure.
pub fn parse_bounded<T: DeserializeOwned>(payload: &[u8]) -> Result<T, (RejectionCode, String)> {
    if payload.len() > PAYLOAD_BYTES_MAX {
        return Err((
            RejectionCode::PayloadTooLarge,
            format!("payload is {} bytes, at most {PAYLOAD_BYTES_MAX}", payload.len()),
        ));
    }
    serde_json::from_slice(payload).map_err(|error| {
        (RejectionCode::MalformedPayload, format!("payload is not the expected JSON: {error}"))
    })
}

/// Cuts `text` to at most `MESSAGE_BYTES_MAX` bytes at a character boundary.
pub fn shorten(text: &str) -> String {
    if text.len() <= MESSAGE_BYTES_MAX {
        return text.to_owned();
    }
    format!("{}...", &text[..text.floor_char_boundary(MESSAGE_BYTES_MAX)])
}

pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_codes_are_listed_once_in_order_and_serialize_as_their_names() {
        for (index, code) in RejectionCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), index, "{code}");
            assert_eq!(serde_json::to_string(code).expect("json"), format!("\"{}\"", code.as_str()));
        }
    }
}

/// SHA-256 of `bytes` as 64 lowercase hex digits (claim tokens are stored so; certificate
/// fingerprints in errors).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}
