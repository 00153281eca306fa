//! `core-sink fleet ...`: the operator's commands. They act on the registry (another process may
//! be running the authority: LMDB allows that), on the revocation list and on the fleet CA; the
//! running authority publishes config changes at its next poll.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use fleet::{FleetCa, RevocationList, Validity};

use crate::messages::unix_ms_now;
use crate::registry::{Registry, parse_duration};
use crate::{AuthorityConfig, CLAIM_IDENTITY, OnboardingError};

#[derive(Clone, Debug, Subcommand)]
pub enum FleetCommand {
    /// Claim tokens and the claim identity devices onboard with.
    Claim {
        #[command(subcommand)]
        command: ClaimCommand,
    },
    /// Approve a device that asked without a token (or will): operator approval mode. Prints the
    /// fingerprint of the key the approval signs; compare it with the `key_sha256` the device logs.
    Approve {
        device: String,
        /// Sign only this key (SHA-256 of its SubjectPublicKeyInfo, 64 hex digits), even if
        /// another key asked for DEVICE first.
        #[arg(long)]
        key_sha256: Option<String>,
    },
    /// Device config delivered over MQTT.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Forget pending DEVICE (one you will not approve): its record goes, its id is free again,
    /// and it no longer counts against `pending_devices_max`.
    Forget { device: String },
    /// Revoke DEVICE: the QUIC sink refuses it within revocation_reload_ms and it cannot onboard again.
    Revoke { device: String },
    /// Devices with state, last heartbeat, uplink lag, ring fill and version.
    List,
}

#[derive(Clone, Debug, Subcommand)]
pub enum ClaimCommand {
    /// Create COUNT single-use claim tokens valid for EXPIRES (7d, 12h, 30m); printed once, stored hashed.
    Create {
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value = "7d")]
        expires: String,
    },
    /// Write the claim identity (cert.pem, key.pem, ca.pem; CN "claim") that device images carry.
    Identity {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
}

#[derive(Clone, Debug, Subcommand)]
pub enum ConfigCommand {
    /// Set key=value pairs in the config of DEVICE.
    Set {
        device: String,
        #[arg(required = true)]
        assignments: Vec<String>,
    },
}

/// Runs `command`; returns what to print.
pub fn run(
    command: FleetCommand,
    config: &AuthorityConfig,
    ca_dir: &Path,
    revocation_file: &Path,
) -> Result<String, OnboardingError> {
    let registry = || Registry::open(&config.registry_dir);
    match command {
        FleetCommand::Claim { command: ClaimCommand::Create { count, expires } } => {
            let validity: Duration = parse_duration(&expires)?;
            let tokens = registry()?.create_tokens(count, validity, unix_ms_now())?;
            Ok(tokens.join("\n"))
        }
        FleetCommand::Claim { command: ClaimCommand::Identity { out, days } } => {
            let ca = FleetCa::load(ca_dir)?;
            ca.issue_device(CLAIM_IDENTITY, Validity::days(days))?.write_to(&out, ca.certificate_pem())?;
            Ok(format!("claim identity written to {}", out.display()))
        }
        FleetCommand::Approve { device, key_sha256 } => {
            match registry()?.approve(&device, key_sha256.as_deref(), &config.default_config)? {
                Some(key) => Ok(format!("device {device} approved for key sha256 {key}")),
                None => Ok(format!(
                    "device {device} approved before it asked: the first key to ask will be signed \
                     (pass --key-sha256 to bind the approval to one key)"
                )),
            }
        }
        FleetCommand::Config { command: ConfigCommand::Set { device, assignments } } => {
            let registry = registry()?;
            let mut version = 0;
            for assignment in &assignments {
                let (key, value) = assignment
                    .split_once('=')
                    .ok_or_else(|| OnboardingError::Config(format!("{assignment:?}: expected key=value")))?;
                version = registry.set_config(&device, key, value)?;
            }
            Ok(format!("device {device}: config version {version} (delivered at the authority's next poll)"))
        }
        FleetCommand::Forget { device } => {
            registry()?.forget_pending(&device)?;
            Ok(format!("pending device {device} forgotten"))
        }
        FleetCommand::Revoke { device } => {
            RevocationList::revoke(revocation_file, &device)?;
            registry()?.revoke(&device)?;
            Ok(format!("device {device} revoked in {}", revocation_file.display()))
        }
        FleetCommand::List => list(&registry()?),
    }
}

/// The fleet view, one line per device.
pub fn list(registry: &Registry) -> Result<String, OnboardingError> {
    let now = unix_ms_now();
    let mut lines = vec![format!(
        "{:<24} {:<8} {:>14} {:>10} {:<28} {:>7} {:<12} {}",
        "DEVICE", "STATE", "HEARTBEAT_AGO", "LAG", "RING_FILL_%", "CONFIG", "VERSION", "KEY_SHA256"
    )];
    for record in registry.devices()? {
        let ago = record
            .last_heartbeat_received_unix_ms
            .map_or("never".to_owned(), |received| format!("{} s", now.saturating_sub(received) / 1000));
        let (lag, fill, version) = match &record.last_heartbeat {
            Some(heartbeat) => (
                heartbeat.uplink_lag_chunks.to_string(),
                heartbeat
                    .ring_fill_percent_per_lane
                    .iter()
                    .map(|(lane, percent)| format!("{lane}={percent:.0}"))
                    .collect::<Vec<_>>()
                    .join(","),
                heartbeat.version.clone(),
            ),
            None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
        };
        // The certified key, or the key a pending id is bound to.
        let key = record.key_sha256.as_deref().or(record.pending_key_sha256.as_deref()).unwrap_or("-");
        lines.push(format!(
            "{:<24} {:<8} {:>14} {:>10} {:<28} {:>3}/{:<3} {:<12} {}",
            record.device_id,
            record.state.as_str(),
            ago,
            lag,
            fill,
            record.config_acked_version,
            record.config.version,
            version,
            key
        ));
    }
    Ok(lines.join("\n"))
}
