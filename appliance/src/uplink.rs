//! The uplink: a thin async driver around `session::DeviceSession`, which decides every protocol
//! rule. It connects to the sink over QUIC with mutual TLS, moves the session's transmits onto the
//! control stream and one unidirectional stream per lane (QUIC priorities audit > decisions >
//! sensor > media), answers the session's ring reads (`Ring::read_from`, which serves only
//! fsynced chunks), trims the ring on Acks, renews the ring's identity when the session finds the
//! ring behind the core, and reconnects forever with `session::Backoff` and jitter drawn here.
//!
//! Tasks per connection: the session task (owns the state machine, reads the control stream),
//! one writer task per lane stream and one for the control stream; ring reads and acks run on
//! blocking threads. QUIC flow control is the backpressure: a lane reads its next batch only when
//! less than one batch is waiting for its writer, so a slow link fills the ring and the ring's
//! per-lane policy applies; the uplink never blocks ingest.
//!
//! Certificate renewal: with `identity_dir` set, the certificate, key and pinned CA bundle
//! (`ca.pem`) are read again from there before each connection, and a pair or bundle that changed
//! (the agent renewed the pair, `fleet::install_renewal`, or took a CA of a rollover) becomes the
//! endpoint's client config; files that do not read back whole keep the previous config. A live connection is not broken for a renewal: the sink checks a
//! certificate at the handshake, so the old one serves until the next reconnect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use buffer::{ReadLimits, Ring, StoredChunk};
use fleet::IssuedCertificate;
use fleet::transport::TransportSettings;
use protocol::{ErrorCode, Lane};
use rand::Rng as _;
use session::{Backoff, DeviceConfig, DeviceEvent, DeviceSession, Stream};
use telemetry::LatencyHistogram;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::dictionaries::DictionaryStore;

/// A session that ran this long was healthy: the next reconnect delay starts from the minimum.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// Bytes read from the control stream per call.
const CONTROL_READ_BYTES: usize = 4096;

/// Defaults of the uplink's tuning, which `[uplink]` can override (`config::UplinkSettings`).
/// Reconnect backoff floor and ceiling (`session::Backoff`, jitter 0.5–1.5 on top).
pub const RECONNECT_MIN_MS_DEFAULT: u64 = 50;
pub const RECONNECT_MAX_MS_DEFAULT: u64 = 5_000;
/// How long a QUIC handshake may take before the attempt counts as failed.
pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// One `Ring::read_from` for the session: at most this many chunks and bytes (a larger single
/// chunk is still read alone).
pub const READ_CHUNKS_MAX_DEFAULT: usize = 64;
pub const READ_BYTES_MAX_DEFAULT: usize = 4 * 1024 * 1024;
/// How often an idle lane looks for new chunks.
pub const IDLE_POLL_MS_DEFAULT: u64 = 5;
/// This appliance's bound on unacked bytes in flight (the sink's, from its Welcome, applies too).
pub const IN_FLIGHT_BYTES_MAX_DEFAULT: u64 = 64 * 1024 * 1024;
/// How long to wait for the sink's Welcome after the Hello.
pub const WELCOME_TIMEOUT_MS_DEFAULT: u64 = 10_000;

#[derive(Clone, Debug)]
pub struct UplinkConfig {
    pub sink_address: SocketAddr,
    /// The name the sink's certificate must carry (a DNS name or an IP address).
    pub sink_server_name: String,
    pub device_id: String,
    /// This device's certificate and key (signed by the fleet CA).
    pub identity: IssuedCertificate,
    /// The fleet CA that signed the sink's certificate.
    pub ca_pem: String,
    pub transport: TransportSettings,
    /// Identifies this boot in the Hello (the sink logs it).
    pub boot_id: [u8; 16],
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub connect_timeout_ms: u64,
    pub read_chunks_max: usize,
    pub read_bytes_max: usize,
    /// How often an idle lane looks for new chunks.
    pub idle_poll_ms: u64,
    /// This appliance's bound on unacked bytes in flight (the sink's limit applies too).
    pub in_flight_bytes_max: u64,
    /// How long to wait for the sink's Welcome after the Hello.
    pub welcome_timeout_ms: u64,
    /// Where the chunkers keep their zstd dictionaries; each is sent ahead of the first chunk
    /// of a session that names it. Without a store, a chunk naming a dictionary ends the session.
    pub dictionaries: Option<Arc<DictionaryStore>>,
    /// Where the device's `cert.pem` and `key.pem` live; read again before each connection so a
    /// renewed certificate is used. `None`: `identity` for the uplink's whole life.
    pub identity_dir: Option<std::path::PathBuf>,
}

impl UplinkConfig {
    pub fn new(
        sink_address: SocketAddr,
        sink_server_name: &str,
        device_id: &str,
        identity: IssuedCertificate,
        ca_pem: &str,
    ) -> UplinkConfig {
        UplinkConfig {
            sink_address,
            sink_server_name: sink_server_name.to_string(),
            device_id: device_id.to_string(),
            identity,
            ca_pem: ca_pem.to_string(),
            transport: TransportSettings::default(),
            boot_id: rand::random(),
            reconnect_min_ms: RECONNECT_MIN_MS_DEFAULT,
            reconnect_max_ms: RECONNECT_MAX_MS_DEFAULT,
            connect_timeout_ms: CONNECT_TIMEOUT_MS_DEFAULT,
            read_chunks_max: READ_CHUNKS_MAX_DEFAULT,
            read_bytes_max: READ_BYTES_MAX_DEFAULT,
            idle_poll_ms: IDLE_POLL_MS_DEFAULT,
            in_flight_bytes_max: IN_FLIGHT_BYTES_MAX_DEFAULT,
            welcome_timeout_ms: WELCOME_TIMEOUT_MS_DEFAULT,
            dictionaries: None,
            identity_dir: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct UplinkMetrics {
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub sessions_ended: AtomicU64,
    pub chunks_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub acks_received: AtomicU64,
    pub dictionaries_sent: AtomicU64,
    /// Chunks skipped because they can never be delivered (each logged with lane and seq).
    pub undeliverable_chunks: AtomicU64,
    /// Times the ring took a new identity because the sink held seqs it had not written.
    pub ring_identity_renewals: AtomicU64,
    /// Times a renewed device certificate was taken up for the next connections.
    pub certificate_reloads: AtomicU64,
    /// Durable watermark per lane as last acked by the sink.
    pub acked_through: [AtomicU64; Lane::COUNT],
    /// Per lane: from a chunk handed to QUIC to the sink's Ack covering it (network both ways,
    /// the sink's queue and its fsync). Sampled: at most `session::device::ACK_TIMINGS_MAX`
    /// chunks per lane are timed at once.
    pub ack_latency: [LatencyHistogram; Lane::COUNT],
}

impl UplinkMetrics {
    pub fn acked_through(&self, lane: Lane) -> u64 {
        self.acked_through[lane.index()].load(Ordering::Relaxed)
    }
}

/// A running uplink task.
pub struct Uplink {
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
    metrics: Arc<UplinkMetrics>,
    local_addr: SocketAddr,
}

impl Uplink {
    /// Starts the uplink on the current tokio runtime.
    pub fn spawn(ring: Ring, config: UplinkConfig) -> anyhow::Result<Uplink> {
        config.transport.validate().map_err(|message| anyhow::anyhow!("uplink config: {message}"))?;
        let client = fleet::client_config(&config.ca_pem, &config.identity, config.transport.to_quinn())?;
        let bind: SocketAddr =
            if config.sink_address.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(client);
        let local_addr = endpoint.local_addr()?;
        let metrics = Arc::new(UplinkMetrics::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(endpoint, ring, config, metrics.clone(), stopped));
        Ok(Uplink { task, stop, metrics, local_addr })
    }

    pub fn metrics(&self) -> Arc<UplinkMetrics> {
        self.metrics.clone()
    }

    /// The UDP address every connection of this uplink leaves from (one endpoint for its whole
    /// life): what the sink, or a proxy in between, sees as this appliance.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether its task still runs (it ends only when stopped).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Asks the uplink to stop without waiting for it.
    pub fn request_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Closes the connection and waits for the task to end.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn run(
    mut endpoint: quinn::Endpoint,
    ring: Ring,
    config: UplinkConfig,
    metrics: Arc<UplinkMetrics>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(
        Duration::from_millis(config.reconnect_min_ms.max(1)),
        Duration::from_millis(config.reconnect_max_ms.max(config.reconnect_min_ms.max(1))),
        HEALTHY_SESSION,
    );
    let mut in_use = (config.identity.certificate_pem.clone(), config.ca_pem.clone());
    loop {
        if let Some(identity_dir) = &config.identity_dir {
            reload_certificate(&mut endpoint, &mut in_use, identity_dir, &config, &metrics);
        }
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = connect_and_run(&endpoint, &ring, &config, &metrics) => outcome,
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        metrics.sessions_ended.fetch_add(1, Ordering::Relaxed);
        let at_once = match &outcome {
            Ok(end) => {
                if !end.renewed_ring_identity {
                    tracing::warn!(device = %config.device_id, code = end.close.code.name(), reason = %end.close.reason, by_sink = end.close.by_peer, "uplink session ended; reconnecting");
                }
                end.renewed_ring_identity
            }
            Err(error) => {
                tracing::warn!(device = %config.device_id, error = %format!("{error:#}"), "uplink session failed; reconnecting");
                false
            }
        };
        let jitter = rand::rng().random_range(session::backoff::JITTER_MIN..=session::backoff::JITTER_MAX);
        let delay = backoff.next_delay(started.elapsed(), jitter, at_once);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stopped.wait_for(|stop| *stop) => break,
        }
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"appliance stopping");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// Takes up a renewed certificate or a changed CA bundle in `identity_dir` for the next
/// connections; `in_use` is (certificate, CA bundle) of the endpoint's client config.
fn reload_certificate(
    endpoint: &mut quinn::Endpoint,
    in_use: &mut (String, String),
    identity_dir: &std::path::Path,
    config: &UplinkConfig,
    metrics: &UplinkMetrics,
) {
    let client = IssuedCertificate::read_from(identity_dir).and_then(|identity| {
        // An identity directory without ca.pem (written by other means) keeps the configured CA.
        let ca_pem = match identity_dir.join(fleet::CA_CERTIFICATE_FILE).exists() {
            true => fleet::read_ca_pem(identity_dir)?,
            false => in_use.1.clone(),
        };
        if identity.certificate_pem == in_use.0 && ca_pem == in_use.1 {
            return Ok(None);
        }
        let client = fleet::client_config(&ca_pem, &identity, config.transport.to_quinn())?;
        Ok(Some((client, (identity.certificate_pem, ca_pem))))
    });
    match client {
        Ok(None) => {}
        Ok(Some((client, renewed))) => {
            endpoint.set_default_client_config(client);
            *in_use = renewed;
            metrics.certificate_reloads.fetch_add(1, Ordering::Relaxed);
            tracing::info!(device = %config.device_id, "renewed device certificate or CA bundle taken up for new connections");
        }
        Err(error) => {
            tracing::warn!(device = %config.device_id, %error, "device certificate not reloaded; keeping the one in use")
        }
    }
}

/// How a session ended.
struct SessionEnd {
    close: session::Close,
    renewed_ring_identity: bool,
}

fn close_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(u32::from(code.id()))
}

async fn connect_and_run(
    endpoint: &quinn::Endpoint,
    ring: &Ring,
    config: &UplinkConfig,
    metrics: &Arc<UplinkMetrics>,
) -> anyhow::Result<SessionEnd> {
    let connecting = endpoint.connect(config.sink_address, &config.sink_server_name)?;
    let connection =
        match tokio::time::timeout(Duration::from_millis(config.connect_timeout_ms), connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                metrics.connect_failures.fetch_add(1, Ordering::Relaxed);
                return Err(anyhow::anyhow!("connect to {}: {error}", config.sink_address));
            }
            Err(_) => {
                metrics.connect_failures.fetch_add(1, Ordering::Relaxed);
                return Err(anyhow::anyhow!("connect to {}: timed out", config.sink_address));
            }
        };
    metrics.connects.fetch_add(1, Ordering::Relaxed);
    let result = SessionDriver::start(&connection, ring, config, metrics).await;
    match &result {
        Ok(end) => connection.close(close_code(end.close.code), end.close.reason.as_bytes()),
        Err(_) => connection.close(close_code(ErrorCode::Internal), b"appliance uplink error"),
    }
    result
}

/// One connection's session task.
struct SessionDriver<'a> {
    connection: &'a quinn::Connection,
    ring: &'a Ring,
    config: &'a UplinkConfig,
    metrics: &'a Arc<UplinkMetrics>,
    session: DeviceSession,
    control: mpsc::UnboundedSender<Vec<u8>>,
    lanes: [Option<mpsc::UnboundedSender<Vec<u8>>>; Lane::COUNT],
    /// Writers report bytes written, or why they stopped.
    written: mpsc::UnboundedSender<Result<(Option<Lane>, usize), String>>,
    writers: JoinSet<()>,
    reads: JoinSet<(Lane, Result<Vec<StoredChunk>, buffer::RingError>)>,
    acks: JoinSet<(Lane, u64, Result<(), buffer::RingError>)>,
    /// Per lane: highest watermark the session acked, the highest handed to the ring so far.
    ack_wanted: [u64; Lane::COUNT],
    ack_started: [u64; Lane::COUNT],
    ack_running: [bool; Lane::COUNT],
    renewed_ring_identity: bool,
}

impl<'a> SessionDriver<'a> {
    async fn start(
        connection: &'a quinn::Connection,
        ring: &'a Ring,
        config: &'a UplinkConfig,
        metrics: &'a Arc<UplinkMetrics>,
    ) -> anyhow::Result<SessionEnd> {
        let stats = ring.stats();
        let device_config = DeviceConfig {
            device_id: config.device_id.clone(),
            boot_id: config.boot_id,
            ring_id: ring.identity(),
            lanes: Lane::ALL.to_vec(),
            welcome_timeout: Duration::from_millis(config.welcome_timeout_ms),
            read_chunks_max: config.read_chunks_max.max(1),
            read_bytes_max: config.read_bytes_max.max(1),
            idle_poll: Duration::from_millis(config.idle_poll_ms),
            in_flight_bytes_max: config.in_flight_bytes_max.max(1),
        };
        let session = DeviceSession::new(
            device_config,
            Lane::ALL.map(|lane| stats.lane(lane).next_seq),
            Instant::now(),
        );
        let (control_send, control_receive) = connection.open_bi().await?;
        let (written, written_receiver) = mpsc::unbounded_channel();
        let mut writers = JoinSet::new();
        let (control, control_outgoing) = mpsc::unbounded_channel();
        writers.spawn(write_stream(control_send, None, control_outgoing, written.clone()));
        let driver = SessionDriver {
            connection,
            ring,
            config,
            metrics,
            session,
            control,
            lanes: Default::default(),
            written,
            writers,
            reads: JoinSet::new(),
            acks: JoinSet::new(),
            ack_wanted: [0; Lane::COUNT],
            ack_started: [0; Lane::COUNT],
            ack_running: [false; Lane::COUNT],
            renewed_ring_identity: false,
        };
        driver.run(control_receive, written_receiver).await
    }

    async fn run(
        mut self,
        mut control_receive: quinn::RecvStream,
        mut written: mpsc::UnboundedReceiver<Result<(Option<Lane>, usize), String>>,
    ) -> anyhow::Result<SessionEnd> {
        let mut buffer = vec![0u8; CONTROL_READ_BYTES];
        loop {
            self.drive().await?;
            if let Some(close) = self.session.close() {
                // Let trims already handed to the ring finish: they are what the sink holds.
                while self.acks.join_next().await.is_some() {}
                self.writers.abort_all();
                return Ok(SessionEnd {
                    close: close.clone(),
                    renewed_ring_identity: self.renewed_ring_identity,
                });
            }
            let timeout = self.session.poll_timeout();
            let sleep = async {
                match timeout {
                    Some(deadline) => {
                        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = control_receive.read(&mut buffer) => match read {
                    Ok(Some(read)) => self.session.handle_control_bytes(Instant::now(), &buffer[..read]),
                    Ok(None) => self.session.handle_control_finished(),
                    Err(error) => self.session.connection_lost(&format!("control stream: {error}")),
                },
                Some(read) = self.reads.join_next() => {
                    let (lane, chunks) = read?;
                    self.send(lane, chunks?);
                }
                Some(ack) = self.acks.join_next() => {
                    let (lane, through, result) = ack?;
                    self.ack_running[lane.index()] = false;
                    match result {
                        Ok(()) => {
                            self.metrics.acked_through[lane.index()].fetch_max(through, Ordering::Relaxed);
                        }
                        Err(error) => tracing::error!(%lane, through, %error, "trimming the ring after an Ack failed"),
                    }
                }
                Some(report) = written.recv() => match report {
                    Ok((Some(lane), bytes)) => self.session.handle_written(lane, bytes),
                    Ok((None, _)) => {}
                    Err(reason) => self.session.connection_lost(&reason),
                },
                () = sleep => self.session.handle_timeout(Instant::now()),
            }
        }
    }

    /// Hands a ring read to the session, which frames it for the lane's stream.
    fn send(&mut self, lane: Lane, chunks: Vec<StoredChunk>) {
        let dictionaries = self.config.dictionaries.clone();
        let mut dictionary = |dict_id: u32| -> Option<Vec<u8>> {
            dictionaries.as_ref().and_then(|store| store.get(dict_id)).map(|bytes| bytes.as_ref().clone())
        };
        let chunks = chunks.into_iter().map(|chunk| (chunk.seq, chunk.encoded)).collect();
        let summary = self.session.handle_read(Instant::now(), lane, chunks, &mut dictionary);
        self.metrics.chunks_sent.fetch_add(summary.chunks, Ordering::Relaxed);
        self.metrics.bytes_sent.fetch_add(summary.bytes, Ordering::Relaxed);
        self.metrics.dictionaries_sent.fetch_add(summary.dictionaries, Ordering::Relaxed);
    }

    /// Carries out what the session asks for: reads, transmits, events.
    async fn drive(&mut self) -> anyhow::Result<()> {
        while let Some(request) = self.session.poll_read(Instant::now()) {
            let ring = self.ring.clone();
            let limits = ReadLimits { chunks_max: request.chunks_max, bytes_max: request.bytes_max };
            self.reads.spawn_blocking(move || {
                (request.lane, ring.read_from(request.lane, request.from_seq, limits))
            });
        }
        while let Some(transmit) = self.session.poll_transmit() {
            let sender = match transmit.stream {
                Stream::Control => &self.control,
                Stream::Lane(lane) => self.lane_writer(lane).await?,
            };
            if sender.send(transmit.bytes).is_err() {
                self.session.connection_lost("a stream writer stopped");
            }
        }
        while let Some(event) = self.session.poll_event() {
            match event {
                DeviceEvent::Welcomed => {
                    tracing::debug!(device = %self.config.device_id, "sink welcomed the session")
                }
                DeviceEvent::Acked { lane, through } => {
                    self.metrics.acks_received.fetch_add(1, Ordering::Relaxed);
                    self.ack_wanted[lane.index()] = self.ack_wanted[lane.index()].max(through);
                }
                DeviceEvent::AckLatency { lane, latency } => {
                    self.metrics.ack_latency[lane.index()].observe(latency)
                }
                DeviceEvent::RingBehind { lane, resume_seq, ring_next_seq } => {
                    let ring = self.ring.clone();
                    let renewed = tokio::task::spawn_blocking(move || ring.renew_identity()).await??;
                    self.metrics.ring_identity_renewals.fetch_add(1, Ordering::Relaxed);
                    self.renewed_ring_identity = true;
                    tracing::error!(
                        device = %self.config.device_id,
                        %lane,
                        resume_seq,
                        ring_next_seq,
                        new_ring_id = %renewed.iter().map(|byte| format!("{byte:02x}")).collect::<String>(),
                        "the sink holds seqs this ring has not written (was the ring restored from an older copy?): \
                         the ring took a new identity, so the sink starts a new seq epoch; chunks it held may land twice"
                    );
                }
                DeviceEvent::Undeliverable { lane, seq, reason } => {
                    self.metrics.undeliverable_chunks.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(device = %self.config.device_id, %lane, seq, %reason, "chunk cannot be delivered; skipped (it stays in the ring until a later Ack covers it)");
                }
                DeviceEvent::Closed => {}
            }
        }
        for lane in Lane::ALL {
            let (wanted, index) = (self.ack_wanted[lane.index()], lane.index());
            if wanted > self.ack_started[index] && !self.ack_running[index] {
                self.ack_started[index] = wanted;
                self.ack_running[index] = true;
                let ring = self.ring.clone();
                // The ring's ack waits for its writer's commit: keep it off the async threads.
                self.acks.spawn_blocking(move || (lane, wanted, ring.ack(lane, wanted)));
            }
        }
        Ok(())
    }

    /// The writer of `lane`'s stream, opened on first use with the lane's priority.
    async fn lane_writer(&mut self, lane: Lane) -> anyhow::Result<&mpsc::UnboundedSender<Vec<u8>>> {
        if self.lanes[lane.index()].is_none() {
            let stream = self.connection.open_uni().await?;
            // Higher value = sent first: audit 3 … media 0.
            stream.set_priority((Lane::COUNT - 1 - lane.index()) as i32)?;
            let (sender, outgoing) = mpsc::unbounded_channel();
            self.writers.spawn(write_stream(stream, Some(lane), outgoing, self.written.clone()));
            self.lanes[lane.index()] = Some(sender);
        }
        Ok(self.lanes[lane.index()].as_ref().expect("opened above"))
    }
}

/// Writes frames to one stream in order and reports each write. The queue it reads is bounded by
/// the session: a lane reads more only while less than one batch waits here.
async fn write_stream(
    mut stream: quinn::SendStream,
    lane: Option<Lane>,
    mut outgoing: mpsc::UnboundedReceiver<Vec<u8>>,
    written: mpsc::UnboundedSender<Result<(Option<Lane>, usize), String>>,
) {
    while let Some(frame) = outgoing.recv().await {
        let length = frame.len();
        // Handed to quinn as it is (`Bytes` from the Vec takes it over without a copy).
        let report = match stream.write_chunk(bytes::Bytes::from(frame)).await {
            Ok(()) => Ok((lane, length)),
            Err(error) => Err(format!("writing the {} stream: {error}", lane.map_or("control", Lane::name))),
        };
        let failed = report.is_err();
        if written.send(report).is_err() || failed {
            return;
        }
    }
}
