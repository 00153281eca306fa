//! A fleet on one machine for the onboarding tests: a fleet CA, a real Mosquitto (TLS listener on
//! a free loopback port, client certificates, the shipped ACL file plus one broad observer), the
//! claim identity, and helpers to stream a few records over QUIC.
#![allow(dead_code)]

pub mod renewing;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buffer::{Ring, RingConfig};
use fleet::{FleetCa, IssuedCertificate, Validity};
use onboarding::mqtt::{Session, TlsIdentity};
use onboarding::{BrokerEndpoint, CLAIM_IDENTITY, DeviceIdentity, DeviceOnboardingConfig, OnboardingError};
use onboarding_authority::cli::FleetCommand;
use onboarding_authority::{Authority, AuthorityConfig};
use protocol::Lane;

/// The observer identity: reads every topic (test-only ACL line).
pub const OBSERVER: &str = "observer";
/// Longest bounded wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// Wall-clock time for the registry's token expiries (never asserted on).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64
}

/// A fleet CA named `fleet_name` in `<dir>/ca`, and the claim identity (which every device
/// image ships) in the directory returned, `<dir>/claim`.
pub fn fleet_with_claim(dir: &Path, fleet_name: &str) -> (FleetCa, PathBuf) {
    let ca = FleetCa::init(&dir.join("ca"), fleet_name).expect("CA");
    let claim_dir = dir.join("claim");
    ca.issue_device(CLAIM_IDENTITY, Validity::days(1))
        .expect("claim identity")
        .write_to(&claim_dir, ca.certificate_pem())
        .expect("write claim identity");
    (ca, claim_dir)
}

/// Writes a server certificate of `ca` for `names`, valid one day, to `directory`.
pub fn write_server_certificate(ca: &FleetCa, names: &[&str], directory: &Path) {
    let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    ca.issue_server(&names, Validity::days(1))
        .expect("server certificate")
        .write_to(directory, ca.certificate_pem())
        .expect("write server certificate");
}

/// An authority on `broker` with its registry in `registry_dir`, answering devices with `sink`:
/// fast polls, and rate and pending limits no test reaches unless it lowers them.
pub fn authority_config(broker: BrokerEndpoint, registry_dir: &Path, sink: SocketAddr) -> AuthorityConfig {
    AuthorityConfig {
        broker,
        registry_dir: registry_dir.to_path_buf(),
        sink_address: sink.to_string(),
        sink_server_name: "localhost".to_owned(),
        allow_operator_approval: false,
        certificate_validity_days: 1,
        certificate_validity_seconds: None,
        default_config: [("log_level".to_owned(), "info".to_owned())].into(),
        poll_interval_ms: 50,
        requests_per_second_max: 1_000,
        pending_devices_max: 1_000,
    }
}

pub struct Broker {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Broker {
    /// Starts `mosquitto -c <generated conf>` on a free loopback port; fails clearly when
    /// Mosquitto is not installed.
    pub fn start(dir: &Path, ca: &FleetCa) -> Broker {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        Broker::start_on_port(dir, ca, port)
    }

    /// Stops the broker and starts it again on the same port, with a server certificate of the
    /// signing CA of `ca` and its whole bundle as `cafile` (a CA rollover phase). Clients
    /// reconnect by themselves.
    pub fn restart(&mut self, dir: &Path, ca: &FleetCa) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Broker::start_on_port(dir, ca, self.port);
    }

    fn start_on_port(dir: &Path, ca: &FleetCa, port: u16) -> Broker {
        let broker_dir = dir.join("broker");
        write_server_certificate(ca, &["localhost", "127.0.0.1"], &broker_dir);
        let shipped = include_str!("../../../onboarding/mosquitto/acl");
        let acl = format!(
            "{shipped}\n# Test only: a subscriber that sees everything.\nuser {OBSERVER}\ntopic read #\n"
        );
        let acl_path = broker_dir.join("acl");
        std::fs::write(&acl_path, acl).expect("write ACL");
        let conf = format!(
            "per_listener_settings false\nallow_anonymous false\nuser root\npersistence false\n\
             listener {port} 127.0.0.1\ncertfile {dir}/cert.pem\nkeyfile {dir}/key.pem\ncafile {dir}/ca.pem\n\
             require_certificate true\nuse_identity_as_username true\nacl_file {acl}\n\
             max_packet_size 262144\nmax_queued_messages 100000\nlog_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
            dir = broker_dir.display(),
            acl = acl_path.display(),
        );
        let conf_path = broker_dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf).expect("write mosquitto.conf");
        let log = broker_dir.join("mosquitto.log");
        let child = match Command::new("mosquitto")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
        {
            Ok(child) => child,
            Err(error) => panic!(
                "cannot start mosquitto ({error}): these tests need the Debian package \
                 (apt-get install -y mosquitto mosquitto-clients)"
            ),
        };
        let mut broker = Broker { child, port, log };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return broker;
            }
            if let Ok(Some(status)) = broker.child.try_wait() {
                panic!("mosquitto exited ({status}): {}", broker.log_text());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not listen within 10 s: {}",
                broker.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn endpoint(&self) -> BrokerEndpoint {
        BrokerEndpoint { host: "127.0.0.1".to_owned(), port: self.port }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct TestFleet {
    pub dir: tempfile::TempDir,
    pub ca: FleetCa,
    pub broker: Broker,
    pub claim_dir: PathBuf,
}

impl TestFleet {
    pub fn new() -> TestFleet {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca, claim_dir) = fleet_with_claim(dir.path(), "test fleet");
        write_server_certificate(&ca, &["localhost", "127.0.0.1"], &dir.path().join("server"));
        let broker = Broker::start(dir.path(), &ca);
        TestFleet { dir, ca, broker, claim_dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn revocation_file(&self) -> PathBuf {
        self.path().join("ca").join("revoked.txt")
    }

    pub fn authority_config(&self, sink: SocketAddr) -> AuthorityConfig {
        authority_config(self.broker.endpoint(), &self.path().join("registry"), sink)
    }

    /// Starts an authority with `config` on this fleet's CA and waits until it subscribed.
    pub async fn start_authority(&self, config: AuthorityConfig) -> Authority {
        let mut authority = Authority::start(config, &self.ca, &self.revocation_file()).expect("authority");
        assert!(authority.wait_ready(WAIT).await, "authority did not subscribe: {}", self.broker.log_text());
        authority
    }

    /// Runs an operator's `fleet` command against this fleet's CA and revocation file.
    pub fn fleet_command(
        &self,
        command: FleetCommand,
        config: &AuthorityConfig,
    ) -> Result<String, OnboardingError> {
        onboarding_authority::cli::run(command, config, &self.path().join("ca"), &self.revocation_file())
    }

    /// A sink config with fast commits and fast revocation reloads.
    pub fn sink_config(&self, listen: SocketAddr) -> core_sink::SinkConfig {
        let mut config = core_sink::SinkConfig::new(listen, self.path());
        config.commit_interval_ms = 20;
        config.revocation_reload_ms = 100;
        config.transport.idle_timeout_ms = 3_000;
        config.transport.keep_alive_ms = 500;
        config
    }

    pub fn onboarding_config(&self, device_id: &str, token: Option<String>) -> DeviceOnboardingConfig {
        let mut config = DeviceOnboardingConfig::new(
            device_id,
            &self.identity_dir(device_id),
            self.broker.endpoint(),
            &self.claim_dir,
            token,
        );
        config.response_timeout_ms = 3_000;
        config.attempts_max = 5;
        config
    }

    /// Onboards `device_id` with the claim token `token` (the authority must be running).
    pub async fn onboard(&self, device_id: &str, token: &str) -> DeviceIdentity {
        let config = self.onboarding_config(device_id, Some(token.to_owned()));
        onboarding::ensure_identity(&config)
            .await
            .unwrap_or_else(|error| panic!("onboard {device_id}: {error}"))
    }

    pub fn identity_dir(&self, device_id: &str) -> PathBuf {
        self.path().join("devices").join(device_id)
    }

    /// An MQTT session with a certificate for `common_name` (a device, the observer, ...).
    pub fn session(&self, common_name: &str, client_id: &str, subscriptions: &[String]) -> Session {
        let identity = self.ca.issue_device(common_name, Validity::days(1)).expect("identity");
        self.session_with(&identity, client_id, subscriptions)
    }

    pub fn session_with(
        &self,
        identity: &IssuedCertificate,
        client_id: &str,
        subscriptions: &[String],
    ) -> Session {
        Session::start(
            &self.broker.endpoint(),
            client_id,
            &TlsIdentity {
                ca_pem: self.ca.certificate_pem(),
                certificate_pem: &identity.certificate_pem,
                private_key_pem: &identity.private_key_pem,
            },
            subscriptions,
        )
        .expect("MQTT session")
    }

    /// The claim identity's session for onboarding `client_id`.
    pub fn claim_session(&self, client_id: &str) -> Session {
        let claim = IssuedCertificate::read_from(&self.claim_dir).expect("claim identity");
        self.session_with(&claim, client_id, &[onboarding::topics::response(client_id)])
    }
}

/// Everything published on the broker, as the observer (subscribed to `#`) received it.
/// A received message: topic and payload.
pub type Captured = (String, Vec<u8>);

#[derive(Clone, Default)]
pub struct Capture {
    pub messages: Arc<Mutex<Vec<Captured>>>,
}

impl Capture {
    pub async fn start(fleet: &TestFleet) -> (Capture, tokio::task::JoinHandle<()>) {
        let mut session = fleet.session(OBSERVER, OBSERVER, &["#".to_owned()]);
        assert!(session.wait_ready(WAIT).await, "observer did not subscribe");
        let capture = Capture::default();
        let messages = capture.messages.clone();
        let task = tokio::spawn(async move {
            // The whole session moves in: dropping it would disconnect the observer.
            let mut session = session;
            while let Some(message) = session.incoming.recv().await {
                messages
                    .lock()
                    .expect("capture lock")
                    .push((message.topic.clone(), message.payload.to_vec()));
            }
        });
        (capture, task)
    }

    pub fn snapshot(&self) -> Vec<Captured> {
        self.messages.lock().expect("capture lock").clone()
    }

    pub fn contains(&self, needle: &[u8]) -> bool {
        self.snapshot()
            .iter()
            .any(|(_, payload)| payload.windows(needle.len()).any(|window| window == needle))
    }

    pub fn on_topic(&self, topic: &str) -> usize {
        self.snapshot().iter().filter(|(received, _)| received == topic).count()
    }
}

// Not every test file uses both.
#[allow(unused_imports)]
pub use testkit::{free_udp_port, init_tracing, wait_until};

pub fn open_ring(fleet: &TestFleet, device_id: &str) -> Ring {
    Ring::open(fleet.path().join("rings").join(device_id), RingConfig::with_capacity(16 * 1024 * 1024))
        .expect("ring")
}

/// Appends one sensor chunk of `count` small JSON records; returns its seq.
pub fn produce(ring: &Ring, device_id: &str, first: u64, count: u64) -> u64 {
    let records = (first..first + count).map(|index| {
        let payload = format!("{{\"device\":\"{device_id}\",\"index\":{index}}}");
        (format!("{device_id}-{index:06}"), 1_700_000_000_000_000 + index, payload.into_bytes())
    });
    let seqs = testkit::append_json_records(ring, Lane::Sensor, records);
    assert_eq!(seqs.len(), 1, "one chunk");
    seqs[0]
}

/// Streams one chunk of 10 records from `first` and waits until the sink acknowledged it;
/// returns whether it did.
pub async fn stream_once(uplink: &appliance::Uplink, ring: &Ring, device_id: &str, first: u64) -> bool {
    let seq = produce(ring, device_id, first, 10);
    let metrics = uplink.metrics();
    wait_until(WAIT, || metrics.acked_through(Lane::Sensor) >= seq).await
}

/// Produces one chunk of 10 records from `first` and asserts that an uplink with `config` cannot
/// deliver it: its sessions fail or end at least twice and the chunk is never acknowledged.
/// `why` names the refused certificate in the failure message.
pub async fn assert_uplink_refused(
    ring: &Ring,
    config: appliance::UplinkConfig,
    device_id: &str,
    first: u64,
    why: &str,
) {
    let uplink = appliance::Uplink::spawn(ring.clone(), config).expect("refused uplink");
    let metrics = uplink.metrics();
    let unsent = produce(ring, device_id, first, 10);
    let refusals = || {
        metrics.connect_failures.load(std::sync::atomic::Ordering::Relaxed)
            + metrics.sessions_ended.load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(wait_until(WAIT, || refusals() >= 2).await, "{why} kept a session");
    assert!(metrics.acked_through(Lane::Sensor) < unsent, "the sink took chunks from {why}");
    uplink.stop().await;
}

/// The uplink config for an onboarded identity, with short timeouts for tests.
pub fn uplink_config(identity: &onboarding::DeviceIdentity) -> appliance::UplinkConfig {
    let address: SocketAddr = identity.sink.sink_address.parse().expect("sink address");
    let mut config = appliance::UplinkConfig::new(
        address,
        &identity.sink.sink_server_name,
        &identity.device_id,
        identity.certificate.clone(),
        &identity.ca_pem,
    );
    config.transport.idle_timeout_ms = 3_000;
    config.transport.keep_alive_ms = 500;
    config.reconnect_max_ms = 300;
    config.connect_timeout_ms = 2_000;
    config
}

/// Standard base64 (with padding), for building hostile PEM in tests.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let value = chunk
            .iter()
            .enumerate()
            .fold(0u32, |value, (index, byte)| value | (u32::from(*byte) << (16 - 8 * index)));
        for index in 0..4 {
            if index <= chunk.len() {
                out.push(ALPHABET[(value >> (18 - 6 * index)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let body = base64(der);
    let lines: Vec<&str> =
        body.as_bytes().chunks(64).map(|line| std::str::from_utf8(line).expect("ascii")).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}
