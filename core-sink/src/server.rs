//! The QUIC server and per-device sessions: a thin async driver around the protocol's decoders
//! and the lander.
//!
//! Per connection: the device id comes from the verified client certificate, never from the
//! Hello (a Hello naming another device is refused). One bidirectional control stream carries
//! Hello → Welcome{resume seq per lane = landed watermark + 1}, then Acks as commit points land.
//! Each unidirectional stream carries one lane's chunk frames in seq order; every chunk is
//! CRC-checked before it is queued for landing. A malformed frame or chunk closes only that
//! connection, with the error code and reason in the QUIC close frame and in the sink's log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use fleet::{IssuedCertificate, RevocationList};
use protocol::{
    Ack, ControlMessage, ErrorCode, FRAME_BYTES_MAX, FrameDecoder, FrameKind, Lane, LaneResume,
    PROTOCOL_VERSION, SessionLimits, Welcome, decode_chunk, decode_control, encode_control, encode_frame,
};
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use crate::config::SinkConfig;
use crate::dictionaries::DictionaryStore;
use crate::lander::{LandRequest, Lander, LanderConfig, SharedWatermarks, SinkMetrics};
use crate::landing::RawLanding;
use crate::state::SinkState;

/// How long a new connection may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from a stream per call.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Control messages queued for one connection's writer.
const CONTROL_QUEUE_MAX: usize = 64;

/// A running sink. Dropping it without `shutdown` stops accepting but skips the final commit.
pub struct Sink {
    endpoint: quinn::Endpoint,
    metrics: Arc<SinkMetrics>,
    shared: Arc<SharedWatermarks>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    lander: Option<std::thread::JoinHandle<()>>,
    context: Option<Arc<Context>>,
    datasets: Option<DatasetsRunner>,
    archive_feed: Option<crate::archive_feed::FeedRunner>,
    onboarding: Option<onboarding::Authority>,
    metrics_address: Option<SocketAddr>,
}

struct DatasetsRunner {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    metrics: Arc<crate::datasets::pipeline::DatasetMetrics>,
}

struct Context {
    land: Mutex<Option<std::sync::mpsc::Sender<LandRequest>>>,
    in_flight: Arc<Semaphore>,
    shared: Arc<SharedWatermarks>,
    metrics: Arc<SinkMetrics>,
    durable_generation: watch::Receiver<u64>,
    sessions: Mutex<HashMap<String, (u64, quinn::Connection)>>,
    next_connection: AtomicU64,
    commit_interval_ms: u32,
    in_flight_bytes_max: u64,
    revocations: RevocationList,
    dictionaries: Arc<DictionaryStore>,
}

fn close_code(code: ErrorCode) -> quinn::VarInt {
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
        let committer = Box::new(RawLanding::new(&config.landing_dir, config.raw_file_rotate_bytes));
        let lander_config = LanderConfig {
            commit_interval: Duration::from_millis(config.commit_interval_ms),
            commit_bytes_max: config.commit_bytes_max,
        };
        let (lander, shared, durable_generation) =
            Lander::new(lander_config, committer, state, metrics.clone())?;
        let datasets = match &config.datasets {
            Some(datasets_config) => {
                let pipeline = crate::datasets::pipeline::Pipeline::open(
                    datasets_config.clone(),
                    &config.landing_dir,
                    dictionaries.clone(),
                )?;
                let metrics = pipeline.metrics.clone();
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let checkpoint = shared.checkpoint.clone();
                let poll = Duration::from_millis(config.commit_interval_ms.max(20));
                let thread = std::thread::Builder::new().name("sink-datasets".into()).spawn({
                    let stop = stop.clone();
                    move || pipeline.run(checkpoint, stop, poll)
                })?;
                Some(DatasetsRunner { stop, thread, metrics })
            }
            None => None,
        };
        // The core archive of AI decisions, fed from the committed audit lane.
        let archive_feed = match &config.archive {
            Some(archive_config) => Some(crate::archive_feed::FeedRunner::start(
                archive_config.clone(),
                &config.landing_dir,
                dictionaries.clone(),
                shared.checkpoint.clone(),
                Duration::from_millis(config.commit_interval_ms.max(20)),
            )?),
            None => None,
        };
        // Onboarding over MQTT: signs device certificates with the fleet CA in ca_dir.
        let onboarding = match &config.onboarding {
            Some(onboarding_config) => {
                let ca = fleet::FleetCa::load(&config.ca_dir)?;
                Some(onboarding::Authority::start(onboarding_config.clone(), &ca, &config.revocation_file)?)
            }
            None => None,
        };
        let (land, requests) = std::sync::mpsc::channel();
        let lander =
            std::thread::Builder::new().name("sink-lander".into()).spawn(move || lander.run(requests))?;

        let context = Arc::new(Context {
            land: Mutex::new(Some(land)),
            in_flight: Arc::new(Semaphore::new(config.in_flight_bytes_max as usize)),
            shared: shared.clone(),
            metrics: metrics.clone(),
            durable_generation,
            sessions: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            commit_interval_ms: config.commit_interval_ms as u32,
            in_flight_bytes_max: config.in_flight_bytes_max,
            revocations,
            dictionaries,
        });
        let accept = tokio::spawn(accept_loop(endpoint.clone(), context.clone(), config.connections_max));
        let mut tasks = vec![accept];
        let mut metrics_address = None;
        if let Some(listen) = config.metrics_listen {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("metrics_listen: bind tcp {listen}"))?;
            metrics_address = Some(listener.local_addr()?);
            let sources = crate::metrics::MetricsSources {
                sink: metrics.clone(),
                datasets: datasets.as_ref().map(|datasets| datasets.metrics.clone()),
                in_flight_available: context.in_flight.clone(),
                in_flight_bytes_max: config.in_flight_bytes_max,
            };
            tasks.push(tokio::spawn(crate::metrics::serve(listener, sources)));
        }
        tasks.push(tokio::spawn(reload_revocations(
            context.clone(),
            Duration::from_millis(config.revocation_reload_ms),
        )));
        tracing::info!(listen = %endpoint.local_addr()?, "core sink listening");
        Ok(Sink {
            endpoint,
            metrics,
            shared,
            tasks,
            metrics_address,
            lander: Some(lander),
            context: Some(context),
            datasets,
            archive_feed,
            onboarding,
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

    /// Stops accepting, closes connections, commits what is pending, and waits for the lander.
    pub async fn shutdown(mut self) {
        if let Some(onboarding) = self.onboarding.take() {
            onboarding.shutdown().await;
        }
        self.endpoint.close(close_code(ErrorCode::ShuttingDown), b"sink shutting down");
        for task in &self.tasks {
            task.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle()).await;
        if let Some(context) = self.context.take() {
            context.land.lock().expect("land sender lock").take();
        }
        if let Some(lander) = self.lander.take() {
            let _ = tokio::task::spawn_blocking(move || lander.join()).await;
        }
        // After the last commit: the pipeline consumes it and publishes its open shards.
        if let Some(datasets) = self.datasets.take() {
            datasets.stop.store(true, Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(move || datasets.thread.join()).await;
        }
        if let Some(archive_feed) = self.archive_feed.take() {
            let _ = tokio::task::spawn_blocking(move || archive_feed.stop_and_join()).await;
        }
    }

    /// The onboarding authority, when `[onboarding]` is configured (its registry mints claim
    /// tokens; `wait_ready` waits until it listens at the broker).
    pub fn onboarding(&mut self) -> Option<&mut onboarding::Authority> {
        self.onboarding.as_mut()
    }

    /// Dataset counters, when datasets are configured.
    pub fn dataset_metrics(&self) -> Option<Arc<crate::datasets::pipeline::DatasetMetrics>> {
        self.datasets.as_ref().map(|datasets| datasets.metrics.clone())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(datasets) = &self.datasets {
            datasets.stop.store(true, Ordering::Relaxed);
        }
        if let Some(archive_feed) = &self.archive_feed {
            archive_feed.request_stop();
        }
        for task in &self.tasks {
            task.abort();
        }
        self.endpoint.close(close_code(ErrorCode::ShuttingDown), b"sink stopped");
    }
}

/// The key stateless resets are derived from, kept across restarts: a restarted sink can then
/// tell appliances at once that their old connection is gone (a valid stateless reset), instead
/// of leaving them to wait out the idle timeout.
fn load_or_create_reset_key(state_dir: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
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
    let temporary = state_dir.join("stateless-reset.key.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("create {}", temporary.display()))?;
    file.write_all(&key)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", temporary.display()))?;
    std::fs::rename(&temporary, &path).with_context(|| format!("rename to {}", path.display()))?;
    std::fs::File::open(state_dir).and_then(|directory| directory.sync_all())?;
    Ok(key)
}

/// Runs a sink until SIGINT or SIGTERM, then commits what is pending. Prints
/// `listening on ADDRESS` to stdout once ready (tools and tests wait for that line).
pub async fn run_until_signal(config: SinkConfig) -> anyhow::Result<()> {
    let sink = Sink::start(config).await?;
    println!("listening on {}", sink.local_addr());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
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

/// Re-reads the revocation list and closes sessions of devices revoked since.
async fn reload_revocations(context: Arc<Context>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        match context.revocations.reload_if_changed() {
            Ok(true) => {
                let sessions = context.sessions.lock().expect("sessions lock");
                for (device, (_, connection)) in sessions.iter() {
                    if context.revocations.is_revoked(device) {
                        tracing::warn!(%device, "closing the session of a revoked device");
                        connection.close(close_code(ErrorCode::Unauthorized), b"device certificate revoked");
                    }
                }
            }
            Ok(false) => {}
            Err(error) => tracing::error!(%error, "revocation list reload failed; keeping the previous list"),
        }
    }
}

async fn handle_incoming(incoming: quinn::Incoming, context: Arc<Context>) {
    let remote = incoming.remote_address();
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
            tracing::warn!(%remote, %error, "connection refused: no usable device identity");
            SinkMetrics::add(&context.metrics.connections_refused, 1);
            connection.close(close_code(ErrorCode::Unauthorized), error.to_string().as_bytes());
            return;
        }
    };
    let connection_id = context.next_connection.fetch_add(1, Ordering::Relaxed);
    if let Some((_, previous)) = context
        .sessions
        .lock()
        .expect("sessions lock")
        .insert(device.clone(), (connection_id, connection.clone()))
    {
        // The device reconnected before its old connection timed out: the new one wins.
        previous.close(close_code(ErrorCode::ShuttingDown), b"superseded by a newer connection");
    }
    SinkMetrics::add(&context.metrics.connections_accepted, 1);
    SinkMetrics::add(&context.metrics.sessions_active, 1);
    tracing::info!(%device, %remote, connection = connection_id, "session started");
    let result = run_session(&connection, &device, connection_id, &context).await;
    if let Err(failure) = result {
        tracing::warn!(%device, %remote, code = failure.code.name(), reason = %failure.reason, "closing the connection");
        connection.close(close_code(failure.code), failure.reason.as_bytes());
    }
    context.metrics.sessions_active.fetch_sub(1, Ordering::Relaxed);
    let mut sessions = context.sessions.lock().expect("sessions lock");
    if sessions.get(&device).is_some_and(|(id, _)| *id == connection_id) {
        sessions.remove(&device);
    }
}

/// Why a session ends with an error; the reason goes into the close frame and the log.
struct Failure {
    code: ErrorCode,
    reason: String,
}

fn failure(code: ErrorCode, reason: impl Into<String>) -> Failure {
    Failure { code, reason: reason.into() }
}

async fn read_frame(
    stream: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
    buffer: &mut [u8],
) -> Result<Option<protocol::Frame>, Failure> {
    loop {
        if let Some(frame) =
            decoder.next_frame().map_err(|error| failure(ErrorCode::BadFrame, error.to_string()))?
        {
            return Ok(Some(frame));
        }
        match stream.read(buffer).await {
            Ok(Some(read)) => decoder.push(&buffer[..read]),
            Ok(None) => return Ok(None),
            Err(error) => return Err(failure(ErrorCode::ShuttingDown, format!("stream closed: {error}"))),
        }
    }
}

fn control_frame(message: &ControlMessage) -> Vec<u8> {
    let payload = encode_control(message).expect("the sink only builds valid control messages");
    let mut frame = Vec::with_capacity(payload.len() + 5);
    encode_frame(FrameKind::Control, &payload, &mut frame).expect("control messages fit a frame");
    frame
}

async fn run_session(
    connection: &quinn::Connection,
    device: &str,
    connection_id: u64,
    context: &Arc<Context>,
) -> Result<(), Failure> {
    let (mut control_send, mut control_recv) =
        match tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi()).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(error)) => {
                return Err(failure(ErrorCode::ShuttingDown, format!("no control stream: {error}")));
            }
            Err(_) => return Err(failure(ErrorCode::BadFrame, "no control stream within 10 s")),
        };
    let mut decoder = FrameDecoder::new(1 + protocol::CONTROL_MESSAGE_BYTES_MAX);
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let hello =
        match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut control_recv, &mut decoder, &mut buffer))
            .await
        {
            Ok(Ok(Some(frame))) if frame.kind == FrameKind::Control => decode_control(&frame.payload)
                .map_err(|error| failure(ErrorCode::UnsupportedVersion, error.to_string()))?,
            Ok(Ok(Some(_))) => {
                return Err(failure(ErrorCode::BadFrame, "the control stream carried a chunk frame"));
            }
            Ok(Ok(None)) => return Err(failure(ErrorCode::BadFrame, "control stream ended before Hello")),
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(failure(ErrorCode::BadFrame, "no Hello within 10 s")),
        };
    let ControlMessage::Hello(hello) = hello else {
        return Err(failure(ErrorCode::BadFrame, "the first control message must be Hello"));
    };
    if hello.device_id != device {
        return Err(failure(
            ErrorCode::DeviceMismatch,
            format!("Hello names device {:?} but the certificate is for {device:?}", hello.device_id),
        ));
    }
    let resume = Lane::ALL
        .iter()
        .map(|&lane| LaneResume { lane, resume_seq: context.shared.landed(device, lane) + 1 })
        .collect();
    let welcome = ControlMessage::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        resume,
        limits: SessionLimits {
            frame_bytes_max: FRAME_BYTES_MAX as u32,
            in_flight_bytes_max: context.in_flight_bytes_max,
            commit_interval_ms: context.commit_interval_ms,
        },
    });
    control_send
        .write_all(&control_frame(&welcome))
        .await
        .map_err(|error| failure(ErrorCode::ShuttingDown, format!("sending Welcome: {error}")))?;

    let (control_queue, control_outgoing) = mpsc::channel::<ControlMessage>(CONTROL_QUEUE_MAX);
    let writer = tokio::spawn(write_control(control_send, control_outgoing));
    let acks = tokio::spawn(send_acks(device.to_string(), context.clone(), control_queue.clone()));
    let kill = Arc::new(Notify::new());
    let device: Arc<str> = Arc::from(device);
    let (failures, mut failed) = mpsc::channel::<Failure>(4);
    let result = loop {
        tokio::select! {
            stream = connection.accept_uni() => match stream {
                Ok(stream) => {
                    let lane_reader = LaneReader {
                        device: device.clone(),
                        connection: connection_id,
                        context: context.clone(),
                        kill: kill.clone(),
                    };
                    let failures = failures.clone();
                    tokio::spawn(async move {
                        if let Err(error) = lane_reader.run(stream).await {
                            let _ = failures.send(error).await;
                        }
                    });
                }
                Err(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed) => break Ok(()),
                Err(error) => break Err(failure(ErrorCode::ShuttingDown, format!("connection lost: {error}"))),
            },
            Some(error) = failed.recv() => break Err(error),
            () = kill.notified() => break Err(failure(ErrorCode::Internal, "sink storage failure; resend from the last Ack")),
        }
    };
    acks.abort();
    writer.abort();
    drop(control_recv);
    result
}

async fn write_control(mut send: quinn::SendStream, mut outgoing: mpsc::Receiver<ControlMessage>) {
    while let Some(message) = outgoing.recv().await {
        if send.write_all(&control_frame(&message)).await.is_err() {
            return;
        }
    }
}

/// Sends an Ack for each lane of `device` whose durable watermark advanced.
async fn send_acks(device: String, context: Arc<Context>, queue: mpsc::Sender<ControlMessage>) {
    let mut generation = context.durable_generation.clone();
    let mut sent = [0u64; Lane::COUNT];
    loop {
        for lane in Lane::ALL {
            let durable = context.shared.durable(&device, lane);
            if durable > sent[lane.index()] {
                if queue.send(ControlMessage::Ack(Ack { lane, durable_through: durable })).await.is_err() {
                    return;
                }
                sent[lane.index()] = durable;
                SinkMetrics::add(&context.metrics.acks_sent, 1);
            }
        }
        if generation.changed().await.is_err() {
            return;
        }
    }
}

struct LaneReader {
    device: Arc<str>,
    connection: u64,
    context: Arc<Context>,
    kill: Arc<Notify>,
}

impl LaneReader {
    /// Stores a dictionary frame's dictionary durably before the stream's next frame is read.
    async fn store_dictionary(&self, payload: Vec<u8>) -> Result<(), Failure> {
        let (dict_id, _) = protocol::decode_dictionary_frame(&payload)
            .map_err(|error| failure(ErrorCode::BadFrame, error.to_string()))?;
        if self.context.dictionaries.contains(&self.device, dict_id) {
            return Ok(());
        }
        let (store, device) = (self.context.dictionaries.clone(), self.device.clone());
        let stored = tokio::task::spawn_blocking(move || store.store(&device, dict_id, &payload[4..]))
            .await
            .map_err(|error| failure(ErrorCode::Internal, error.to_string()))?;
        match stored {
            Ok(()) => {
                SinkMetrics::add(&self.context.metrics.dictionaries_stored, 1);
                tracing::info!(device = %self.device, dict_id, "stored a compression dictionary");
                Ok(())
            }
            Err(error @ crate::dictionaries::DictionaryStoreError::Io { .. }) => {
                tracing::error!(device = %self.device, dict_id, %error, "cannot store a dictionary");
                Err(failure(ErrorCode::Internal, error.to_string()))
            }
            Err(error) => Err(failure(ErrorCode::LimitExceeded, error.to_string())),
        }
    }

    async fn run(self, mut stream: quinn::RecvStream) -> Result<(), Failure> {
        let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
        let mut buffer = vec![0u8; READ_BUFFER_BYTES];
        let mut stream_lane: Option<Lane> = None;
        let mut last_seq = 0u64;
        while let Some(frame) = read_frame(&mut stream, &mut decoder, &mut buffer).await? {
            match frame.kind {
                FrameKind::Chunk => {}
                FrameKind::Dictionary => {
                    self.store_dictionary(frame.payload).await?;
                    continue;
                }
                FrameKind::Control => {
                    return Err(failure(ErrorCode::BadFrame, "a lane stream carried a control frame"));
                }
            }
            let header = match decode_chunk(&frame.payload) {
                Ok((header, _)) => header,
                Err(error) => {
                    SinkMetrics::add(&self.context.metrics.bad_chunks, 1);
                    return Err(failure(ErrorCode::BadChunk, error.to_string()));
                }
            };
            if header.dict_id != protocol::NO_DICTIONARY
                && !self.context.dictionaries.contains(&self.device, header.dict_id)
            {
                SinkMetrics::add(&self.context.metrics.bad_chunks, 1);
                return Err(failure(
                    ErrorCode::BadChunk,
                    format!(
                        "{} seq {} is compressed with dictionary {}, which this device never sent",
                        header.lane, header.seq, header.dict_id
                    ),
                ));
            }
            match stream_lane {
                None => stream_lane = Some(header.lane),
                Some(lane) if lane != header.lane => {
                    return Err(failure(
                        ErrorCode::BadChunk,
                        format!("lane {} chunk on the {lane} stream", header.lane),
                    ));
                }
                Some(_) => {}
            }
            if header.seq <= last_seq {
                return Err(failure(
                    ErrorCode::BadChunk,
                    format!(
                        "{} seq {} after seq {last_seq}: seqs must increase on a stream",
                        header.lane, header.seq
                    ),
                ));
            }
            last_seq = header.seq;
            let received_at = std::time::Instant::now();
            let bytes = frame.payload.len() as u32;
            let permit = self
                .context
                .in_flight
                .clone()
                .acquire_many_owned(bytes)
                .await
                .map_err(|_| failure(ErrorCode::ShuttingDown, "sink shutting down"))?;
            let request = LandRequest {
                device: self.device.clone(),
                connection: self.connection,
                header,
                encoded: frame.payload,
                permit,
                kill: self.kill.clone(),
                received_at,
            };
            let sent =
                self.context.land.lock().expect("land sender lock").as_ref().map(|land| land.send(request));
            if !matches!(sent, Some(Ok(()))) {
                return Err(failure(ErrorCode::ShuttingDown, "sink shutting down"));
            }
        }
        Ok(())
    }
}
