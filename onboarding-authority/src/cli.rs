//! `core-sink fleet ...`: the operator's commands. They act on the registry (another process may
//! be running the authority: LMDB allows that), on the revocation list and on the fleet CA; the
//! running authority publishes config changes at its next poll.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use fleet::{FleetCa, RevocationList, Validity};

use crate::AuthorityConfig;
use crate::registry::{DeviceRecord, DeviceState, Registry, parse_duration};
use onboarding::messages::{Heartbeat, unix_ms_now};
use onboarding::{CLAIM_IDENTITY, OnboardingError};

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
    /// Free active DEVICE for a new key (its certificate expired, its key is lost, or the
    /// hardware was replaced): the old key goes on the revocation list (its certificates stay
    /// refused), and the id is claimed again like a new device (a new claim token, or `fleet
    /// approve`). The registry keeps the retired keys.
    Rebind { device: String },
    /// Revoke DEVICE: the QUIC sink refuses it within revocation_reload_ms and it cannot onboard again.
    Revoke { device: String },
    /// Devices with state, last heartbeat, uplink lag, ring fill and version.
    List,
    /// A live view of the fleet from the devices' heartbeats, worst uplink lag first: per device
    /// the lag in seconds (and its lane), ring fill per lane, intake rates, heartbeat age,
    /// version and boot slot. Redraws every INTERVAL seconds until interrupted.
    Top {
        /// Seconds between redraws.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval: u64,
        /// Print the view once and exit (for scripts).
        #[arg(long)]
        once: bool,
        /// Most devices shown (the worst ones).
        #[arg(long, default_value_t = 40)]
        rows: usize,
    },
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
        FleetCommand::Rebind { device } => {
            let registry = registry()?;
            // Revoked first: if the registry write then fails, the old key is refused and the
            // id still bound, and a re-run finishes (revoking a key twice is harmless).
            let key = registry.bound_key(&device)?;
            RevocationList::revoke_key(revocation_file, &key)?;
            let retired = registry.rebind(&device, unix_ms_now())?;
            if retired != key {
                // A renewal landed between the read and the rebind: its key is retired too.
                RevocationList::revoke_key(revocation_file, &retired)?;
            }
            Ok(format!(
                "device {device}: key sha256 {key} revoked in {}; the id is free for a new key (a new \
                 claim token, or `core-sink fleet approve {device}`)",
                revocation_file.display()
            ))
        }
        FleetCommand::Revoke { device } => {
            RevocationList::revoke(revocation_file, &device)?;
            registry()?.revoke(&device)?;
            Ok(format!("device {device} revoked in {}", revocation_file.display()))
        }
        FleetCommand::List => {
            let bundle = FleetCa::load(ca_dir).map(|ca| ca.certificate_pem().to_owned()).ok();
            list_with_issuers(&registry()?, bundle.as_deref())
        }
        FleetCommand::Top { interval, once, rows } => {
            let registry = registry()?;
            if once {
                return top(&registry.devices()?, unix_ms_now(), rows);
            }
            loop {
                let view = top(&registry.devices()?, unix_ms_now(), rows)?;
                // Clear the screen and home the cursor, then draw.
                print!("\x1b[2J\x1b[H{view}\n");
                std::io::Write::flush(&mut std::io::stdout())
                    .map_err(|source| OnboardingError::io("write", Path::new("stdout"), source))?;
                std::thread::sleep(Duration::from_secs(interval));
            }
        }
    }
}

/// One device's line in `fleet top`, and what it is sorted by.
struct TopRow {
    worst_lag_seconds: Option<f64>,
    heartbeat_age_ms: Option<u64>,
    line: String,
}

/// The `fleet top` view at `now_unix_ms`: a summary line, then at most `rows` devices, those with
/// the largest uplink lag first (devices never heard from last; ties by older heartbeat first).
pub fn top(devices: &[DeviceRecord], now_unix_ms: u64, rows: usize) -> Result<String, OnboardingError> {
    let mut table: Vec<TopRow> = devices
        .iter()
        .filter(|record| record.state != DeviceState::Revoked)
        .map(|record| top_row(record, now_unix_ms))
        .collect();
    table.sort_by(|a, b| {
        let lag = |row: &TopRow| row.worst_lag_seconds.unwrap_or(-1.0);
        lag(b).total_cmp(&lag(a)).then(b.heartbeat_age_ms.cmp(&a.heartbeat_age_ms))
    });
    let heard: Vec<&Heartbeat> = devices.iter().filter_map(|record| record.last_heartbeat.as_ref()).collect();
    let records_per_second: f64 = heard.iter().map(|heartbeat| heartbeat.records_per_second).sum();
    let bytes_per_second: f64 = heard.iter().map(|heartbeat| heartbeat.bytes_per_second).sum();
    let worst = table.first().and_then(|row| row.worst_lag_seconds).unwrap_or(0.0);
    let mut lines = vec![
        format!(
            "{} devices ({} reporting): {:.0} records/s, {:.2} MB/s in; worst uplink lag {worst:.1} s",
            table.len(),
            heard.len(),
            records_per_second,
            bytes_per_second / 1e6,
        ),
        format!(
            "{:<24} {:<8} {:>9} {:<8} {:>9} {:<38} {:>9} {:>8} {:<12} {}",
            "DEVICE",
            "STATE",
            "LAG_S",
            "LAG_LANE",
            "HEARD_S",
            "RING_FILL_%",
            "REC/S",
            "MB/S",
            "VERSION",
            "SLOT"
        ),
    ];
    lines.extend(table.into_iter().take(rows).map(|row| row.line));
    Ok(lines.join("\n"))
}

fn top_row(record: &DeviceRecord, now_unix_ms: u64) -> TopRow {
    let heartbeat_age_ms =
        record.last_heartbeat_received_unix_ms.map(|received| now_unix_ms.saturating_sub(received));
    let heard = heartbeat_age_ms.map_or("never".to_owned(), |age| format!("{:.0}", age as f64 / 1000.0));
    let Some(heartbeat) = &record.last_heartbeat else {
        let line =
            format!("{:<24} {:<8} {:>9} {:<8} {heard:>9}", record.device_id, record.state.as_str(), "-", "-");
        return TopRow { worst_lag_seconds: None, heartbeat_age_ms, line };
    };
    let worst = heartbeat
        .uplink_lag_seconds_per_lane
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(lane, seconds)| (lane.clone(), *seconds));
    let fill = heartbeat
        .ring_fill_percent_per_lane
        .iter()
        .map(|(lane, percent)| format!("{lane}={percent:.0}"))
        .collect::<Vec<_>>()
        .join(",");
    let (lag, lane) =
        worst.as_ref().map_or(("-".to_owned(), "-"), |(lane, seconds)| (format!("{seconds:.1}"), lane));
    let line = format!(
        "{:<24} {:<8} {lag:>9} {lane:<8} {heard:>9} {fill:<38} {:>9.0} {:>8.2} {:<12} {}",
        record.device_id,
        record.state.as_str(),
        heartbeat.records_per_second,
        heartbeat.bytes_per_second / 1e6,
        heartbeat.version,
        heartbeat.boot_slot.as_deref().unwrap_or("-"),
    );
    TopRow { worst_lag_seconds: worst.map(|(_, seconds)| seconds), heartbeat_age_ms, line }
}

/// The fleet view, one line per device.
pub fn list(registry: &Registry) -> Result<String, OnboardingError> {
    list_with_issuers(registry, None)
}

/// Active devices whose certificate the signing CA of `ca_dir` did not issue (during a CA
/// rollover: the devices not moved yet), sorted.
pub fn devices_on_other_cas(registry: &Registry, ca_dir: &Path) -> Result<Vec<String>, OnboardingError> {
    let ca = FleetCa::load(ca_dir)?;
    let mut devices: Vec<String> = registry
        .devices()?
        .into_iter()
        .filter(|record| record.state == DeviceState::Active)
        .filter(|record| {
            !record
                .certificate_pem
                .as_deref()
                .is_some_and(|pem| fleet::rollover::is_issued_by(pem, ca.signing_certificate()))
        })
        .map(|record| record.device_id)
        .collect();
    devices.sort();
    Ok(devices)
}

/// `fleet list`; with the CA bundle, the ISSUER column names the CA of each device's certificate
/// (short fingerprint, `fleet::rollover::short_fingerprint`; `other` for a CA not in the bundle),
/// so the operator sees when every device has moved to a new CA.
pub fn list_with_issuers(registry: &Registry, bundle_pem: Option<&str>) -> Result<String, OnboardingError> {
    let now = unix_ms_now();
    let mut lines = vec![format!(
        "{:<24} {:<8} {:>14} {:>10} {:<28} {:>7} {:<12} {:<64} {:>8} {:<16} {}",
        "DEVICE",
        "STATE",
        "HEARTBEAT_AGO",
        "LAG",
        "RING_FILL_%",
        "CONFIG",
        "VERSION",
        "KEY_SHA256",
        "RENEWALS",
        "CERT_EXPIRES_IN",
        "ISSUER"
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
        let expires_in = record
            .certificate_pem
            .as_deref()
            .and_then(|pem| fleet::Validity::of_certificate(pem).ok())
            .map_or("-".to_owned(), |validity| {
                let now = std::time::UNIX_EPOCH + std::time::Duration::from_millis(now);
                match validity.not_after.duration_since(now) {
                    Ok(left) => format!("{} s", left.as_secs()),
                    Err(_) => "expired".to_owned(),
                }
            });
        let issuer = match (bundle_pem, record.certificate_pem.as_deref()) {
            (Some(bundle), Some(certificate)) => {
                fleet::rollover::issuer_in_bundle(bundle, certificate).unwrap_or_else(|| "other".to_owned())
            }
            _ => "-".to_owned(),
        };
        lines.push(format!(
            "{:<24} {:<8} {:>14} {:>10} {:<28} {:>3}/{:<3} {:<12} {:<64} {:>8} {:<16} {}",
            record.device_id,
            record.state.as_str(),
            ago,
            lag,
            fill,
            record.config_acked_version,
            record.config.version,
            version,
            key,
            record.renewals,
            expires_in,
            issuer
        ));
    }
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(
        id: &str,
        heard_ms_ago: Option<u64>,
        lags: &[(&str, f64)],
        records_per_second: f64,
    ) -> DeviceRecord {
        let mut record = Registry::new_record(id, &Default::default());
        record.state = DeviceState::Active;
        if let Some(ago) = heard_ms_ago {
            record.last_heartbeat_received_unix_ms = Some(1_000_000 - ago);
            record.last_heartbeat = Some(Heartbeat {
                version: "1.2.3".to_owned(),
                uplink_lag_seconds_per_lane: lags
                    .iter()
                    .map(|(lane, seconds)| (lane.to_string(), *seconds))
                    .collect(),
                ring_fill_percent_per_lane: [("sensor".to_owned(), 12.0)].into(),
                records_per_second,
                bytes_per_second: records_per_second * 100.0,
                boot_slot: Some("B".to_owned()),
                ..Default::default()
            });
        }
        record
    }

    #[test]
    fn top_puts_the_worst_lag_first_and_sums_the_fleet() {
        let mut revoked = device("gone", Some(1_000), &[("sensor", 900.0)], 5.0);
        revoked.state = DeviceState::Revoked;
        let devices = vec![
            device("calm", Some(2_000), &[("sensor", 0.5), ("audit", 0.0)], 100.0),
            device("silent", None, &[], 0.0),
            device("behind", Some(30_000), &[("sensor", 1.0), ("media", 120.0)], 300.0),
            revoked,
        ];
        let view = top(&devices, 1_000_000, 10).expect("top");
        let lines: Vec<&str> = view.lines().collect();
        assert!(lines[0].starts_with("3 devices (3 reporting): 405 records/s"), "{view}");
        assert!(lines[0].ends_with("worst uplink lag 120.0 s"), "{view}");
        let order: Vec<&str> =
            lines[2..].iter().map(|line| line.split_whitespace().next().unwrap()).collect();
        assert_eq!(order, ["behind", "calm", "silent"], "{view}");
        assert!(lines[2].contains(" media "), "the lane that lags is named: {view}");
        assert!(lines[2].contains("sensor=12") && lines[2].ends_with(" B"), "{view}");
        assert!(lines[4].contains("never"), "{view}");
        assert_eq!(top(&devices, 1_000_000, 1).expect("top").lines().count(), 3, "rows bounds the table");
    }
}
