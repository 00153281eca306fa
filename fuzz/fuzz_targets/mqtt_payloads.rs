//! Onboarding payloads as they arrive over MQTT (requests, answers, renewals, heartbeats, config
//! and its acks: JSON from anyone holding the claim identity or a device certificate), and the topics
//! they arrive on. Whatever parses is within the bounds its `validate` checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onboarding::messages::{
    ConfigAck, ConfigDocument, Heartbeat, OnboardingRequest, OnboardingResponse, RenewalRequest,
    RenewalResponse, parse_bounded,
};

fuzz_target!(|bytes: &[u8]| {
    let _ = parse_bounded::<OnboardingRequest>(bytes);
    let _ = parse_bounded::<OnboardingResponse>(bytes);
    if let Ok(heartbeat) = parse_bounded::<Heartbeat>(bytes) {
        let _ = heartbeat.validate();
    }
    if let Ok(config) = parse_bounded::<ConfigDocument>(bytes) {
        let _ = config.validate();
    }
    let _ = parse_bounded::<ConfigAck>(bytes);
    let _ = parse_bounded::<RenewalRequest>(bytes);
    let _ = parse_bounded::<RenewalResponse>(bytes);
    if let Ok(topic) = std::str::from_utf8(bytes) {
        let _ = onboarding::topics::parse(topic);
        let _ = onboarding::topics::is_key_fingerprint(topic);
    }
});
