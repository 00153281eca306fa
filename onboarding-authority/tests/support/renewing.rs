//! What the renewal and CA rollover tests share: certificates that live seconds, an agent that
//! renews at half of that, and onboarding with a fresh token.

use std::time::Duration;

use onboarding::DeviceAgentConfig;
use onboarding_authority::{AuthorityConfig, Registry};

use super::{TestFleet, now_unix_ms};

/// Device certificates live this long; the agent renews at half of it.
pub const VALIDITY_SECONDS: u64 = 12;
pub const RENEW_AFTER_PERCENT: u8 = 50;

/// The authority config of `fleet` with `VALIDITY_SECONDS` certificates.
pub fn short_lived(fleet: &TestFleet, sink: std::net::SocketAddr) -> AuthorityConfig {
    let mut config = fleet.authority_config(sink);
    config.certificate_validity_seconds = Some(VALIDITY_SECONDS);
    config
}

/// Heartbeats every 500 ms, renewal at `RENEW_AFTER_PERCENT`, retried every 500 ms.
pub fn agent_config(fleet: &TestFleet) -> DeviceAgentConfig {
    let mut config = DeviceAgentConfig::new(fleet.broker.endpoint());
    config.heartbeat_interval_ms = 500;
    config.renew_after_percent = RENEW_AFTER_PERCENT;
    config.renewal_retry_ms = 500;
    config
}

/// Onboards `device_id` with a token created for it.
pub async fn onboard(fleet: &TestFleet, registry: &Registry, device_id: &str) -> onboarding::DeviceIdentity {
    let token = registry.create_tokens(1, Duration::from_secs(3600), now_unix_ms()).expect("token").remove(0);
    fleet.onboard(device_id, &token).await
}
