//! The QUIC server: a thin async driver around `session::SinkSession` (every protocol rule and
//! every close code) and the lander thread (`landing::LandingCore`: dedupe, epochs, fencing,
//! commits).
//!
//! Per connection, one task owns the session state machine and moves bytes: the device id from
//! the verified client certificate into `SinkSession::new`, control-stream bytes and lane-stream
//! bytes (one reader task per stream, bounded channel) into the session, the session's Hello to
//! the lander and its grant back, dictionaries to the durable store, chunks to the lander (after
//! taking in-flight permits), durable watermarks into Acks, and the session's transmits out. When
//! the session closes, the connection is closed with its error code and reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use fleet::{IssuedCertificate, RevocationList};
use landing::{LandingConfig, LandingCore, RawLanding, SinkState};
use protocol::{ErrorCode, Lane};
use session::{Close, DictionaryRefusal, LandingRefusal, SinkEvent, SinkSession, SinkSessionConfig, Stream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use lifecycle::{Components, Stoppable, TaskComponent};

use crate::components::{ArchiveFeedComponent, LanderComponent, SessionsComponent, ThreadComponent};
use crate::config::SinkConfig;
use crate::dictionaries::DictionaryStore;
use crate::lander::{InFlightPermits, LandRequest, Lander, LanderRequest, SharedWatermarks, SinkMetrics};

/// Most bytes taken from a stream per read (quinn hands out its received buffers without a copy).
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Reads queued from a connection's lane streams for its session task: with
/// `READ_BUFFER_BYTES`, at most 1 MiB per connection beyond QUIC's windows.
const STREAM_READS_QUEUED_MAX: usize = 16;
/// Control frames queued for one connection's writer (Acks are coalesced per commit, so a
/// connection needs at most one per lane per commit).
const CONTROL_QUEUE_MAX: usize = 64;

/// A running sink: its parts are `lifecycle::Components` (`components.rs`), started in order
/// by `start` and stopped in reverse by `shutdown`. Dropping it without `shutdown` asks each part
/// to stop (stops accepting) but skips the final commit.
pub struct Sink {
    endpoint: quinn::Endpoint,
    metrics: Arc<SinkMetrics>,
    shared: Arc<SharedWatermarks>,
    dataset_metrics: Option<Arc<crate::datasets::pipeline::DatasetMetrics>>,
    metrics_address: Option<SocketAddr>,
    components: Components,
    /// Cluster mode: renews the node's etcd lease until the sink is dropped.
    _keep_alive: Option<cluster::KeepAlive>,
}

/// The lander's request channel: the sessions send on it, and stopping the lander closes it.
pub(crate) type LandSender = Arc<Mutex<Option<std::sync::mpsc::Sender<LanderRequest>>>>;

pub(crate) struct Context {
    land: LandSender,
    in_flight: Arc<Semaphore>,
    /// Each connection's share of `in_flight` (`SinkConfig::device_in_flight_bytes`).
    device_in_flight_bytes: u64,
    shared: Arc<SharedWatermarks>,
    metrics: Arc<SinkMetrics>,
    durable_generation: watch::Receiver<u64>,
    /// The live session of each device, and how to tell it to end.
    pub(crate) sessions: Mutex<HashMap<String, (u64, mpsc::Sender<Command>)>>,
    next_connection: AtomicU64,
    session_config: SinkSessionConfig,
    revocations: RevocationList,
    dictionaries: Arc<DictionaryStore>,
}

/// What the rest of the sink tells a session task.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Command {
    Superseded,
    Revoked,
    ShuttingDown,
}

impl Context {
    fn send_to_lander(&self, request: LanderRequest) -> bool {
        self.land.lock().expect("land sender lock").as_ref().is_some_and(|land| land.send(request).is_ok())
    }
}

pub(crate) fn close_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(u32::from(code.id()))
}

impl Sink {
    pub async fn start(config: SinkConfig) -> anyhow::Result<Sink> {
        config.validate().map_err(|message| anyhow::anyhow!("invalid sink config: {message}"))?;
        let ca_path = config.ca_dir.join("ca.pem");
        let ca_pem = std::fs::read_to_string(&ca_path).with_context(|| {
            format!("read fleet CA {} (create it with `core-sink ca init`)", ca_path.display())
        })?;
        let server = IssuedCertificate::read_from(&config.server_certificate_dir).with_context(|| {
            format!("read the sink's certificate from {}", config.server_certificate_dir.display())
        })?;
        let revocations = RevocationList::open(&config.revocation_file)?;
        let server_config =
            fleet::server_config(&ca_pem, &server, revocations.clone(), config.transport.to_quinn())?;
        let reset_key = load_or_create_reset_key(&config.state_dir)?;
        let endpoint_config =
            quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_key)));
        let socket = std::net::UdpSocket::bind(config.listen)
            .with_context(|| format!("listen on udp {}", config.listen))?;
        let runtime = quinn::default_runtime().context("the sink must run inside a tokio runtime")?;
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)?;

        let metrics = Arc::new(SinkMetrics::default());
        let state = SinkState::open(&config.state_dir)?;
        let dictionaries = Arc::new(DictionaryStore::open(&config.state_dir.join("dictionaries"))?);
        let committer = RawLanding::with_open_files_max(
            &config.landing_dir,
            config.raw_file_rotate_bytes,
            config.open_files_max,
        );
        let landing_config = LandingConfig {
            commit_interval: Duration::from_millis(config.commit_interval_ms),
            commit_bytes_max: config.commit_bytes_max,
        };
        // Cluster mode: join etcd (the node's lease, renewed on a thread for the sink's life) and
        // fence every commit point with it. Standalone without `[cluster]`: no etcd at all.
        let mut keep_alive = None;
        let core = match &config.cluster {
            None => LandingCore::open(landing_config, committer, state)?,
            Some(cluster_config) => {
                let registry = cluster::EtcdRegistry::connect(cluster_config).with_context(|| {
                    format!(
                        "join the cluster as {} through etcd at {:?}",
                        cluster_config.node, cluster_config.endpoints
                    )
                })?;
                keep_alive = Some(registry.spawn_keep_alive());
                LandingCore::open_clustered(
                    landing_config,
                    committer,
                    state,
                    Box::new(registry),
                    cluster_config.commit_batch_devices_max,
                )?
            }
        };
        let (lander, shared, durable_generation) = Lander::new(core, metrics.clone());
        // Start order (stopped in reverse by `shutdown`): the readers of committed data, the
        // lander, the onboarding authority, then what takes input (sessions, metrics, reloads).
        let mut components = Components::new();
        // Replication of what the datasets pipeline and the archive published, on its own thread
        // and within its own budgets: it reads published files and committed raw landing only.
        // First started, so last stopped: it can copy what the final commit published.
        let mut replication_metrics = None;
        if config.replication.is_some() {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            // The adaptive budget (when `adaptive = true`) follows the lander's ack latency.
            let lander_metrics = metrics.clone();
            let replicator = crate::replication::Replicator::open(&config, stop.clone())?
                .with_latency_signal(Arc::new(move || {
                    let snapshot = lander_metrics.ack_latency.snapshot();
                    let pending = lander_metrics.oldest_unacked.age(std::time::Instant::now());
                    crate::replication::LatencyReading {
                        sum_us: snapshot.sum_us,
                        count: snapshot.count,
                        pending_us: pending.as_micros() as u64,
                    }
                }))
                // The committed raw landing too, as the lander's checkpoint says it stands.
                .with_landing_checkpoint(shared.checkpoint.clone());
            replication_metrics = Some(replicator.metrics.clone());
            components.push(ThreadComponent::start("replication", stop, move || replicator.run())?);
        }
        // The core archive of AI decisions, fed from the committed audit lane.
        if let Some(archive_config) = &config.archive {
            components.push(ArchiveFeedComponent(Some(crate::archive_feed::FeedRunner::start(
                archive_config.clone(),
                &config.landing_dir,
                dictionaries.clone(),
                shared.checkpoint.clone(),
                Duration::from_millis(config.commit_interval_ms.max(20)),
            )?)));
        }
        let mut dataset_metrics = None;
        if let Some(datasets_config) = &config.datasets {
            let pipeline = crate::datasets::pipeline::Pipeline::open(
                datasets_config.clone(),
                &config.landing_dir,
                dictionaries.clone(),
            )?;
            dataset_metrics = Some(pipeline.metrics.clone());
            let checkpoint = shared.checkpoint.clone();
            let poll = Duration::from_millis(config.commit_interval_ms.max(20));
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopped = stop.clone();
            components.push(ThreadComponent::start("datasets", stop, move || {
                pipeline.run(checkpoint, stopped, poll)
            })?);
        }
        let (land, requests) = std::sync::mpsc::channel();
        let land: LandSender = Arc::new(Mutex::new(Some(land)));
        components.push(LanderComponent::start(land.clone(), move || lander.run(requests))?);
        // Onboarding over MQTT: signs device certificates with the fleet CA in ca_dir.
        let mut onboarding_metrics = None;
        if let Some(onboarding_config) = &config.onboarding {
            let ca = fleet::FleetCa::load(&config.ca_dir)?;
            let authority = onboarding_authority::Authority::start(
                onboarding_config.clone(),
                &ca,
                &config.revocation_file,
            )?;
            onboarding_metrics = Some(authority.shared_metrics());
            components
                .push(Stoppable::new("onboarding", authority, |authority| Box::pin(authority.shutdown())));
        }

        let context = Arc::new(Context {
            land,
            in_flight: Arc::new(Semaphore::new(config.in_flight_bytes_max as usize)),
            shared: shared.clone(),
            metrics: metrics.clone(),
            durable_generation,
            sessions: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            device_in_flight_bytes: config.device_in_flight_bytes(),
            session_config: SinkSessionConfig {
                in_flight_bytes_max: config.device_in_flight_bytes(),
                commit_interval_ms: u32::try_from(config.commit_interval_ms).unwrap_or(u32::MAX),
                ..SinkSessionConfig::default()
            },
            revocations,
            dictionaries,
        });
        let accept = tokio::spawn(accept_loop(endpoint.clone(), context.clone(), config.connections_max));
        components.push(SessionsComponent { endpoint: endpoint.clone(), context: context.clone(), accept });
        let mut metrics_address = None;
        if let Some(listen) = config.metrics_listen {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("metrics_listen: bind tcp {listen}"))?;
            metrics_address = Some(listener.local_addr()?);
            let sources = crate::metrics::MetricsSources {
                sink: metrics.clone(),
                datasets: dataset_metrics.clone(),
                in_flight_available: context.in_flight.clone(),
                in_flight_bytes_max: config.in_flight_bytes_max,
                onboarding: onboarding_metrics,
                replication: replication_metrics,
            };
            components
                .push(TaskComponent::new("metrics", tokio::spawn(crate::metrics::serve(listener, sources))));
        }
        let trust = TrustFiles {
            endpoint: endpoint.clone(),
            ca_path,
            server_certificate_dir: config.server_certificate_dir.clone(),
            transport: config.transport.clone(),
            loaded: (ca_pem, server.certificate_pem, server.private_key_pem),
        };
        components.push(TaskComponent::new(
            "revocation-reload",
            tokio::spawn(reload_revocations(
                context.clone(),
                trust,
                Duration::from_millis(config.revocation_reload_ms),
            )),
        ));
        tracing::info!(listen = %endpoint.local_addr()?, components = ?components.names(), "core sink listening");
        Ok(Sink {
            endpoint,
            metrics,
            shared,
            dataset_metrics,
            metrics_address,
            components,
            _keep_alive: keep_alive,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("bound endpoint has an address")
    }

    pub fn metrics(&self) -> &SinkMetrics {
        &self.metrics
    }

    /// Where `GET /metrics` is served, when `metrics_listen` is configured.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address
    }

    /// The durable watermark of (device, lane): what has been acked or may be acked now.
    pub fn durable_through(&self, device: &str, lane: Lane) -> u64 {
        self.shared.durable(device, lane)
    }

    /// Stops every part, the last started first: reloads and metrics, then accepting and the
    /// connections, the onboarding authority, the lander (which commits what is pending), then
    /// the dataset pipeline (it consumes that last commit and publishes its open shards) and the
    /// archive feed.
    pub async fn shutdown(mut self) {
        self.components.stop().await;
    }

    /// Each part's health, in start order.
    pub fn health(&self) -> Vec<(&'static str, lifecycle::Health)> {
        self.components.health()
    }

    /// The onboarding authority, when `[onboarding]` is configured (its registry mints claim
    /// tokens; `wait_ready` waits until it listens at the broker).
    pub fn onboarding(&mut self) -> Option<&mut onboarding_authority::Authority> {
        self.components.get_mut::<Stoppable<onboarding_authority::Authority>>().and_then(Stoppable::get_mut)
    }

    /// Dataset counters, when datasets are configured.
    pub fn dataset_metrics(&self) -> Option<Arc<crate::datasets::pipeline::DatasetMetrics>> {
        self.dataset_metrics.clone()
    }
}

/// The key stateless resets are derived from, kept across restarts: a restarted sink can then
/// tell appliances at once that their old connection is gone (a valid stateless reset), instead
/// of leaving them to wait out the idle timeout.
fn load_or_create_reset_key(state_dir: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    let path = state_dir.join("stateless-reset.key");
    match std::fs::read(&path) {
        Ok(bytes) => {
            return bytes.try_into().map_err(|bytes: Vec<u8>| {
                anyhow::anyhow!("{} holds {} bytes, expected 32", path.display(), bytes.len())
            });
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("read {}", path.display())),
    }
    std::fs::create_dir_all(state_dir).with_context(|| format!("create {}", state_dir.display()))?;
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| anyhow::anyhow!("no system randomness for the stateless reset key"))?;
    durable::Options::default().mode(0o600).write(&path, &key)?;
    Ok(key)
}

/// Runs a sink until SIGINT or SIGTERM, then commits what is pending. Prints
/// `listening on ADDRESS` to stdout once ready (tools and tests wait for that line).
pub async fn run_until_signal(config: SinkConfig) -> anyhow::Result<()> {
    let sink = Sink::start(config).await?;
    // The handler is installed before "listening on" is printed: a supervisor (or a test) that
    // sends SIGTERM as soon as it reads the line gets a clean shutdown, not the default death.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    println!("listening on {}", sink.local_addr());
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down: committing what is pending");
    sink.shutdown().await;
    Ok(())
}

async fn accept_loop(endpoint: quinn::Endpoint, context: Arc<Context>, connections_max: u64) {
    while let Some(incoming) = endpoint.accept().await {
        if SinkMetrics::get(&context.metrics.sessions_active) >= connections_max {
            tracing::warn!(remote = %incoming.remote_address(), connections_max, "refusing a connection: at the connection limit");
            SinkMetrics::add(&context.metrics.connections_refused, 1);
            incoming.refuse();
            continue;
        }
        tokio::spawn(handle_incoming(incoming, context.clone()));
    }
}

/// Re-reads the revocation list and ends the sessions of devices revoked since.
/// The fleet CA bundle and the sink's certificate as the endpoint uses them, and where they are
/// read again from.
struct TrustFiles {
    endpoint: quinn::Endpoint,
    ca_path: std::path::PathBuf,
    server_certificate_dir: std::path::PathBuf,
    transport: fleet::transport::TransportSettings,
    /// (CA bundle, server certificate, server key) in use.
    loaded: (String, String, String),
}

impl TrustFiles {
    /// Takes up a changed `ca.pem` (a CA rollover phase) or server certificate for new
    /// handshakes; live connections keep what they were verified with. Files that do not read
    /// back whole, or do not make a server config, keep the one in use.
    fn reload_if_changed(&mut self, revocations: &RevocationList) {
        let read = fleet::files::read_bounded(&self.ca_path, fleet::PEM_FILE_BYTES_MAX)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| {
                let ca_pem = String::from_utf8(bytes.unwrap_or_default()).context("ca.pem is not UTF-8")?;
                let server = IssuedCertificate::read_from(&self.server_certificate_dir)?;
                Ok((ca_pem, server))
            });
        let (ca_pem, server) = match read {
            Ok(read) => read,
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "fleet CA or sink certificate not readable; keeping the ones in use");
                return;
            }
        };
        let now = (ca_pem, server.certificate_pem.clone(), server.private_key_pem.clone());
        if now == self.loaded {
            return;
        }
        match fleet::server_config(&now.0, &server, revocations.clone(), self.transport.to_quinn()) {
            Ok(server_config) => {
                self.endpoint.set_server_config(Some(server_config));
                self.loaded = now;
                tracing::info!(ca = %self.ca_path.display(), "fleet CA bundle or sink certificate changed: taken up for new connections");
            }
            Err(error) => {
                tracing::error!(%error, "changed fleet CA or sink certificate not usable; keeping the ones in use")
            }
        }
    }
}

async fn reload_revocations(context: Arc<Context>, mut trust: TrustFiles, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        trust.reload_if_changed(&context.revocations);
        match context.revocations.reload_if_changed() {
            Ok(true) => {
                let sessions = context.sessions.lock().expect("sessions lock");
                for (device, (_, commands)) in sessions.iter() {
                    if context.revocations.is_revoked(device) {
                        tracing::warn!(%device, "ending the session of a revoked device");
                        let _ = commands.try_send(Command::Revoked);
                    }
                }
            }
            Ok(false) => {}
            Err(error) => tracing::error!(%error, "revocation list reload failed; keeping the previous list"),
        }
    }
}

/// Counts a session as active for exactly as long as it lives, whatever way its task ends.
struct ActiveSession(Arc<SinkMetrics>);

impl ActiveSession {
    fn start(metrics: &Arc<SinkMetrics>) -> ActiveSession {
        SinkMetrics::add(&metrics.sessions_active, 1);
        ActiveSession(metrics.clone())
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.sessions_active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle_incoming(incoming: quinn::Incoming, context: Arc<Context>) {
    let remote = incoming.remote_address();
    // Counted from the first packet: a handshake in progress holds a connection slot too.
    let _active = ActiveSession::start(&context.metrics);
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::warn!(%remote, %error, "connection refused during the handshake");
            SinkMetrics::add(&context.metrics.connections_refused, 1);
            return;
        }
    };
    let device = match fleet::peer_device_id(&connection) {
        Ok(device) => device,
        Err(error) => {
            let close = SinkSession::unidentified(&error.to_string());
            tracing::warn!(%remote, code = close.code.name(), reason = %close.reason, "connection refused");
            SinkMetrics::add(&context.metrics.connections_refused, 1);
            connection.close(close_code(close.code), close.reason.as_bytes());
            return;
        }
    };
    let connection_id = context.next_connection.fetch_add(1, Ordering::Relaxed);
    let (commands, command_receiver) = mpsc::channel(4);
    if let Some((_, previous)) =
        context.sessions.lock().expect("sessions lock").insert(device.clone(), (connection_id, commands))
    {
        // The device reconnected before its old connection timed out: the new one wins.
        let _ = previous.try_send(Command::Superseded);
    }
    SinkMetrics::add(&context.metrics.connections_accepted, 1);
    tracing::info!(%device, %remote, connection = connection_id, "session started");
    let close =
        SessionDriver::new(connection.clone(), &device, command_receiver, context.clone()).run().await;
    if close.code == ErrorCode::BadChunk {
        SinkMetrics::add(&context.metrics.bad_chunks, 1);
    }
    if close.by_peer {
        tracing::info!(%device, %remote, code = close.code.name(), reason = %close.reason, "session ended by the device");
    } else {
        tracing::warn!(%device, %remote, code = close.code.name(), reason = %close.reason, "closing the connection");
    }
    connection.close(close_code(close.code), close.reason.as_bytes());
    let mut sessions = context.sessions.lock().expect("sessions lock");
    if sessions.get(&device).is_some_and(|(id, _)| *id == connection_id) {
        sessions.remove(&device);
    }
}

/// Bytes read from one lane stream, or its end.
enum StreamRead {
    /// Bytes as quinn received them (no copy between the stream and the session).
    Bytes(u64, bytes::Bytes),
    Finished(u64),
    Failed(String),
}

/// One connection's task: owns the session state machine and moves bytes.
struct SessionDriver {
    connection: quinn::Connection,
    device: Arc<str>,
    session: SinkSession,
    context: Arc<Context>,
    commands: mpsc::Receiver<Command>,
    control: Option<(mpsc::Sender<Vec<u8>>, quinn::RecvStream)>,
    stream_reads: mpsc::Receiver<StreamRead>,
    stream_reads_sender: mpsc::Sender<StreamRead>,
    refusals: mpsc::Receiver<LandingRefusal>,
    refusals_sender: mpsc::Sender<LandingRefusal>,
    durable_generation: watch::Receiver<u64>,
    readers: tokio::task::JoinSet<()>,
    /// Acks of this session already added to `SinkMetrics::acks_sent`.
    acks_counted: u64,
    /// This connection's share of the sink's in-flight budget.
    in_flight: Arc<Semaphore>,
}

impl SessionDriver {
    fn new(
        connection: quinn::Connection,
        device: &str,
        commands: mpsc::Receiver<Command>,
        context: Arc<Context>,
    ) -> SessionDriver {
        let session = SinkSession::new(
            context.session_config.clone(),
            device,
            context.dictionaries.ids(device),
            std::time::Instant::now(),
        );
        let (stream_reads_sender, stream_reads) = mpsc::channel(STREAM_READS_QUEUED_MAX);
        let (refusals_sender, refusals) = mpsc::channel(1);
        let in_flight = Arc::new(Semaphore::new(context.device_in_flight_bytes as usize));
        SessionDriver {
            connection,
            device: Arc::from(device),
            session,
            durable_generation: context.durable_generation.clone(),
            context,
            commands,
            control: None,
            stream_reads,
            stream_reads_sender,
            refusals,
            refusals_sender,
            readers: tokio::task::JoinSet::new(),
            acks_counted: 0,
            in_flight,
        }
    }

    /// Runs until the session closes; returns why.
    async fn run(mut self) -> Close {
        let mut control_buffer = vec![0u8; READ_BUFFER_BYTES];
        let mut control_finished = false;
        while !self.session.is_closed() {
            let timeout = self.session.poll_timeout();
            let sleep = async {
                match timeout {
                    Some(deadline) => {
                        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await
                    }
                    None => std::future::pending().await,
                }
            };
            let awaiting_control = self.control.is_none();
            tokio::select! {
                streams = self.connection.accept_bi(), if awaiting_control => match streams {
                    Ok((send, receive)) => {
                        let (writer, outgoing) = mpsc::channel(CONTROL_QUEUE_MAX);
                        tokio::spawn(write_control(send, outgoing));
                        self.control = Some((writer, receive));
                    }
                    Err(error) => self.session.connection_lost(&error.to_string()),
                },
                read = async {
                    match &mut self.control {
                        Some((_, receive)) if !control_finished => receive.read(&mut control_buffer).await,
                        _ => std::future::pending().await,
                    }
                } => match read {
                    Ok(Some(read)) => self.session.handle_control_bytes(&control_buffer[..read]),
                    Ok(None) => {
                        control_finished = true;
                        self.session.handle_control_finished();
                    }
                    Err(error) => self.session.connection_lost(&format!("control stream: {error}")),
                },
                stream = self.connection.accept_uni() => match stream {
                    Ok(stream) => {
                        let reads = self.stream_reads_sender.clone();
                        self.readers.spawn(read_stream(stream, reads));
                    }
                    Err(error) => self.session.connection_lost(&error.to_string()),
                },
                Some(read) = self.stream_reads.recv() => match read {
                    StreamRead::Bytes(stream, bytes) => self.session.handle_stream_bytes(stream, &bytes),
                    StreamRead::Finished(stream) => self.session.handle_stream_finished(stream),
                    StreamRead::Failed(reason) => self.session.connection_lost(&reason),
                },
                Some(command) = self.commands.recv() => match command {
                    Command::Superseded => self.session.superseded(),
                    Command::Revoked => self.session.revoked(),
                    Command::ShuttingDown => self.session.shutting_down(),
                },
                Some(refusal) = self.refusals.recv() => self.session.refuse_landing(refusal),
                changed = self.durable_generation.changed() => match changed {
                    Ok(()) => self.acks(),
                    Err(_) => self.session.shutting_down(),
                },
                () = sleep => self.session.handle_timeout(std::time::Instant::now()),
            }
            self.drive().await;
        }
        self.readers.abort_all();
        self.session.close().cloned().expect("the loop ends when the session closes")
    }

    /// Hands every durable watermark of this device to the session (it queues Acks).
    fn acks(&mut self) {
        for lane in Lane::ALL {
            let (durable, generation) = self.context.shared.lane(&self.device, lane);
            self.session.handle_durable(lane, durable, generation);
        }
    }

    /// Carries out what the session asks for until it has nothing more.
    async fn drive(&mut self) {
        self.drive_events().await;
        let acks = self.session.acks_queued();
        SinkMetrics::add(&self.context.metrics.acks_sent, acks - self.acks_counted);
        self.acks_counted = acks;
    }

    async fn drive_events(&mut self) {
        loop {
            while let Some(transmit) = self.session.poll_transmit() {
                assert_eq!(transmit.stream, Stream::Control, "the sink only writes its control stream");
                let sent = match &self.control {
                    Some((writer, _)) => writer.send(transmit.bytes).await.is_ok(),
                    None => false,
                };
                if !sent {
                    self.session.connection_lost("the control stream writer stopped");
                }
            }
            let Some(event) = self.session.poll_event() else { return };
            match event {
                SinkEvent::Hello { ring_id, boot_id } => {
                    tracing::info!(device = %self.device, ring = %hex(&ring_id), boot = %hex(&boot_id), "hello");
                    let (reply, answer) = oneshot::channel();
                    let request = LanderRequest::Open { device: self.device.clone(), ring_id, reply };
                    let grant = if self.context.send_to_lander(request) {
                        answer
                            .await
                            .unwrap_or_else(|_| Err(LandingRefusal::Unavailable("sink shutting down".into())))
                    } else {
                        Err(LandingRefusal::Unavailable("sink shutting down".into()))
                    };
                    self.session.handle_grant(grant);
                    // Acks for what became durable while the grant was on its way.
                    self.acks();
                }
                SinkEvent::Dictionary { stream, dict_id, dictionary } => {
                    let (store, device) = (self.context.dictionaries.clone(), self.device.clone());
                    let stored =
                        tokio::task::spawn_blocking(move || store.store(&device, dict_id, &dictionary)).await;
                    match stored {
                        Ok(Ok(())) => {
                            SinkMetrics::add(&self.context.metrics.dictionaries_stored, 1);
                            tracing::info!(device = %self.device, dict_id, "stored a compression dictionary");
                            self.session.dictionary_stored(stream, dict_id);
                        }
                        Ok(Err(error @ crate::dictionaries::DictionaryStoreError::Io { .. })) => {
                            tracing::error!(device = %self.device, dict_id, %error, "cannot store a dictionary");
                            self.session.dictionary_refused(DictionaryRefusal::Storage(error.to_string()));
                        }
                        Ok(Err(error @ crate::dictionaries::DictionaryStoreError::Unusable { .. })) => {
                            SinkMetrics::add(&self.context.metrics.dictionaries_refused, 1);
                            tracing::warn!(device = %self.device, dict_id, %error, "refused a dictionary zstd cannot load");
                            self.session.dictionary_refused(DictionaryRefusal::Invalid(error.to_string()))
                        }
                        Ok(Err(error)) => {
                            SinkMetrics::add(&self.context.metrics.dictionaries_refused, 1);
                            self.session.dictionary_refused(DictionaryRefusal::Refused(error.to_string()))
                        }
                        Err(error) => {
                            self.session.dictionary_refused(DictionaryRefusal::Storage(error.to_string()))
                        }
                    }
                }
                SinkEvent::Chunk(chunk) => {
                    let received_at = std::time::Instant::now();
                    let bytes =
                        u32::try_from(chunk.encoded.len()).expect("frames are bounded by FRAME_BYTES_MAX");
                    let waits = &self.context.metrics.device_in_flight_waits;
                    let acquired =
                        InFlightPermits::acquire(&self.in_flight, &self.context.in_flight, bytes, || {
                            SinkMetrics::add(waits, 1)
                        });
                    let Some(permits) = acquired.await else {
                        self.session.shutting_down();
                        continue;
                    };
                    let request = LandRequest {
                        device: self.device.clone(),
                        chunk,
                        permits,
                        refusals: self.refusals_sender.clone(),
                        received_at,
                    };
                    if !self.context.send_to_lander(LanderRequest::Land(request)) {
                        self.session.shutting_down();
                    }
                }
                SinkEvent::Closed => {}
            }
        }
    }
}

async fn write_control(mut send: quinn::SendStream, mut outgoing: mpsc::Receiver<Vec<u8>>) {
    while let Some(frame) = outgoing.recv().await {
        if send.write_all(&frame).await.is_err() {
            return;
        }
    }
}

/// Forwards one lane stream's bytes to its session task; the bounded channel is the
/// backpressure (QUIC flow control does the rest).
async fn read_stream(mut stream: quinn::RecvStream, reads: mpsc::Sender<StreamRead>) {
    let id = stream.id().index();
    loop {
        let read = match stream.read_chunk(READ_BUFFER_BYTES, true).await {
            Ok(Some(chunk)) => StreamRead::Bytes(id, chunk.bytes),
            Ok(None) => StreamRead::Finished(id),
            Err(error) => StreamRead::Failed(format!("lane stream: {error}")),
        };
        let last = !matches!(read, StreamRead::Bytes(..));
        if reads.send(read).await.is_err() || last {
            return;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
