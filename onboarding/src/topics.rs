//! Topic names (see the table in the crate documentation).
//!
//! Onboarding topics are named by a key fingerprint, not a device id: `{key}` is
//! [`key_fingerprint`], 64 lowercase hex digits of SHA-256 over the requesting key's
//! SubjectPublicKeyInfo (DER). The claim identity's MQTT client id is that fingerprint and the ACL
//! lets it use only the topics named by its client id, so a claim holder reads only answers to its
//! own key; the authority refuses a request whose topic is not the fingerprint of the CSR's key.

use sha2::{Digest as _, Sha256};

/// Every topic starts with this.
pub const PREFIX: &str = "tributary";

/// What the authority subscribes to.
pub const REQUEST_FILTER: &str = "tributary/onboarding/request/+";
pub const HEARTBEAT_FILTER: &str = "tributary/device/+/heartbeat";
pub const CONFIG_ACK_FILTER: &str = "tributary/device/+/config/ack";
pub const RENEW_REQUEST_FILTER: &str = "tributary/device/+/renew/request";

/// Length of a key fingerprint: SHA-256 in hex.
pub const KEY_FINGERPRINT_HEX_BYTES: usize = 64;

/// The fingerprint of a public key: SHA-256 of its SubjectPublicKeyInfo (DER), lowercase hex.
/// The same as `openssl pkey -pubin -outform DER | sha256sum`.
pub fn key_fingerprint(subject_public_key_info_der: &[u8]) -> String {
    let fingerprint: String =
        Sha256::digest(subject_public_key_info_der).iter().map(|byte| format!("{byte:02x}")).collect();
    assert!(is_key_fingerprint(&fingerprint));
    fingerprint
}

/// Whether `text` has the shape of a [`key_fingerprint`].
pub fn is_key_fingerprint(text: &str) -> bool {
    text.len() == KEY_FINGERPRINT_HEX_BYTES
        && text.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
}

/// Where the holder of the key with fingerprint `key` asks for a certificate.
pub fn request(key: &str) -> String {
    format!("{PREFIX}/onboarding/request/{key}")
}

/// Where the authority answers the holder of the key with fingerprint `key`.
pub fn response(key: &str) -> String {
    format!("{PREFIX}/onboarding/response/{key}")
}

pub fn heartbeat(device_id: &str) -> String {
    format!("{PREFIX}/device/{device_id}/heartbeat")
}

pub fn config(device_id: &str) -> String {
    format!("{PREFIX}/device/{device_id}/config")
}

pub fn config_ack(device_id: &str) -> String {
    format!("{PREFIX}/device/{device_id}/config/ack")
}

/// Where an onboarded device asks for a new certificate (with its current one: the broker's
/// ACL lets only the holder of a certificate for `device_id` publish here).
pub fn renew_request(device_id: &str) -> String {
    format!("{PREFIX}/device/{device_id}/renew/request")
}

/// Where the authority answers a renewal (only the device's own certificate may read it).
pub fn renew_response(device_id: &str) -> String {
    format!("{PREFIX}/device/{device_id}/renew/response")
}

/// What a received topic is, with the key fingerprint or device id it names (not yet validated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topic<'a> {
    Request(&'a str),
    Response(&'a str),
    Heartbeat(&'a str),
    Config(&'a str),
    ConfigAck(&'a str),
    RenewRequest(&'a str),
    RenewResponse(&'a str),
}

/// Classifies `topic`; `None` for anything outside the layout.
pub fn parse(topic: &str) -> Option<Topic<'_>> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    match parts.as_slice() {
        ["onboarding", "request", id] => Some(Topic::Request(id)),
        ["onboarding", "response", id] => Some(Topic::Response(id)),
        ["device", id, "heartbeat"] => Some(Topic::Heartbeat(id)),
        ["device", id, "config"] => Some(Topic::Config(id)),
        ["device", id, "config", "ack"] => Some(Topic::ConfigAck(id)),
        ["device", id, "renew", "request"] => Some(Topic::RenewRequest(id)),
        ["device", id, "renew", "response"] => Some(Topic::RenewResponse(id)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(topic: &str, expected: Option<Topic<'_>>) {
        assert_eq!(parse(topic), expected, "{topic}");
    }

    #[test]
    fn topics_round_trip_and_strangers_are_refused() {
        check(&request("a-1"), Some(Topic::Request("a-1")));
        check(&response("a-1"), Some(Topic::Response("a-1")));
        check(&heartbeat("a-1"), Some(Topic::Heartbeat("a-1")));
        check(&config("a-1"), Some(Topic::Config("a-1")));
        check(&config_ack("a-1"), Some(Topic::ConfigAck("a-1")));
        check(&renew_request("a-1"), Some(Topic::RenewRequest("a-1")));
        check(&renew_response("a-1"), Some(Topic::RenewResponse("a-1")));
        check("tributary/device/a-1/renew", None);
        check("tributary/device/a/b/heartbeat", None);
        check("other/onboarding/request/a", None);
        check("tributary/onboarding/request/a/b", None);
    }

    #[test]
    fn key_fingerprints_have_one_shape() {
        let check = |text: &str, expected: bool| assert_eq!(is_key_fingerprint(text), expected, "{text:?}");
        check(&key_fingerprint(b"any key"), true);
        check(&"0".repeat(64), true);
        check(&"0".repeat(63), false);
        check(&"0".repeat(65), false);
        check(&"A".repeat(64), false);
        check(&format!("{}g", "0".repeat(63)), false);
        check("dev-01", false);
        // SHA-256 of the empty input, as `sha256sum` prints it.
        assert_eq!(key_fingerprint(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
