//! The uplink: streams the ring to the core sink over QUIC with mutual TLS, and trims the ring as
//! durable Acks come back.
//!
//! One connection at a time. Per connection: a bidirectional control stream (Hello → Welcome,
//! then Acks) and one long-lived unidirectional stream per lane with QUIC stream priorities
//! audit > decisions > sensor > media. Each lane is read from the ring from the sink's resume seq
//! in bounded batches (`read_chunks_max`, `read_bytes_max`); QUIC flow control is the
//! backpressure, so a slow link fills the ring and the ring's per-lane policy applies — the
//! uplink never blocks ingest. Any failure drops the connection and reconnects forever with
//! exponential backoff and jitter; the sink's watermarks make resends harmless.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use buffer::{ReadLimits, Ring};
use fleet::IssuedCertificate;
use fleet::transport::TransportSettings;
use protocol::{
    Codec, ControlMessage, FrameDecoder, FrameKind, Hello, Lane, PROTOCOL_VERSION, decode_control,
    encode_control, encode_frame,
};
use rand::Rng as _;
use tokio::sync::watch;

use crate::dictionaries::DictionaryStore;
use telemetry::LatencyHistogram;
use tokio::task::JoinSet;

/// Chunks per lane whose send time is kept for the ack latency; beyond it chunks go untimed
/// until Acks catch up (a slow link sends thousands of small chunks ahead of its Acks).
const SENT_TIMES_MAX: usize = 4096;

/// Send times of chunks awaiting their Ack, per lane, in seq order.
type SentTimes = Arc<std::sync::Mutex<[std::collections::VecDeque<(u64, Instant)>; Lane::COUNT]>>;

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
    /// Where the chunkers keep their zstd dictionaries; each is sent ahead of the first chunk
    /// of a session that names it. Without a store, a chunk naming a dictionary ends the session.
    pub dictionaries: Option<Arc<DictionaryStore>>,
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
            reconnect_min_ms: 50,
            reconnect_max_ms: 5_000,
            connect_timeout_ms: 5_000,
            read_chunks_max: 64,
            read_bytes_max: 4 * 1024 * 1024,
            idle_poll_ms: 5,
            dictionaries: None,
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
    /// Durable watermark per lane as last acked by the sink.
    pub acked_through: [AtomicU64; Lane::COUNT],
    /// Per lane: from a chunk handed to QUIC to the sink's Ack covering it (network both ways,
    /// the sink's queue and its fsync). Sampled: at most `SENT_TIMES_MAX` chunks per lane are
    /// timed at once.
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

    /// Closes the connection and waits for the task to end.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn run(
    endpoint: quinn::Endpoint,
    ring: Ring,
    config: UplinkConfig,
    metrics: Arc<UplinkMetrics>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(config.reconnect_min_ms);
    loop {
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = session(&endpoint, &ring, &config, &metrics) => outcome,
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        metrics.sessions_ended.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = outcome {
            tracing::warn!(device = %config.device_id, error = %format!("{error:#}"), "uplink session ended; reconnecting");
        }
        // A session that ran a while was healthy: start the next backoff from the bottom.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(config.reconnect_min_ms);
        }
        let jitter = rand::rng().random_range(0.5..1.5);
        tokio::select! {
            () = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
            _ = stopped.wait_for(|stop| *stop) => break,
        }
        backoff = (backoff * 2).min(Duration::from_millis(config.reconnect_max_ms));
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"appliance stopping");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

fn control_frame(message: &ControlMessage) -> anyhow::Result<Vec<u8>> {
    let payload = encode_control(message)?;
    let mut frame = Vec::with_capacity(payload.len() + 5);
    encode_frame(FrameKind::Control, &payload, &mut frame)?;
    Ok(frame)
}

/// Reads the next control message; `None` when the stream ended.
async fn read_control(
    stream: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
    buffer: &mut [u8],
) -> anyhow::Result<Option<ControlMessage>> {
    loop {
        if let Some(frame) = decoder.next_frame()? {
            anyhow::ensure!(
                frame.kind == FrameKind::Control,
                "the sink sent a chunk frame on the control stream"
            );
            return Ok(Some(decode_control(&frame.payload)?));
        }
        match stream.read(buffer).await? {
            Some(read) => decoder.push(&buffer[..read]),
            None => return Ok(None),
        }
    }
}

async fn session(
    endpoint: &quinn::Endpoint,
    ring: &Ring,
    config: &UplinkConfig,
    metrics: &Arc<UplinkMetrics>,
) -> anyhow::Result<()> {
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
    let result = drive(&connection, ring, config, metrics).await;
    connection.close(quinn::VarInt::from_u32(0), b"reconnecting");
    result
}

async fn drive(
    connection: &quinn::Connection,
    ring: &Ring,
    config: &UplinkConfig,
    metrics: &Arc<UplinkMetrics>,
) -> anyhow::Result<()> {
    let (mut control_send, mut control_recv) = connection.open_bi().await?;
    let hello = ControlMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        device_id: config.device_id.clone(),
        boot_id: config.boot_id,
        lanes: Lane::ALL.to_vec(),
        codecs: vec![Codec::Raw, Codec::Zstd],
        dictionary_ids: Vec::new(),
    });
    control_send.write_all(&control_frame(&hello)?).await?;
    let mut decoder = FrameDecoder::new(1 + protocol::CONTROL_MESSAGE_BYTES_MAX);
    let mut buffer = vec![0u8; 4096];
    let welcome = match read_control(&mut control_recv, &mut decoder, &mut buffer).await? {
        Some(ControlMessage::Welcome(welcome)) => welcome,
        Some(ControlMessage::Error(error)) => {
            anyhow::bail!("sink refused: {:?}: {}", error.code, error.reason)
        }
        Some(other) => anyhow::bail!("expected Welcome, got {other:?}"),
        None => anyhow::bail!("sink closed the control stream before Welcome"),
    };
    for resume in &welcome.resume {
        // The sink holds more of this lane than this ring ever wrote under its identity: the ring
        // was recreated or restored. A new identity makes the sink start a new seq epoch instead
        // of taking new chunks for duplicates; it is durable before it is ever sent.
        let next_seq = ring.stats().lane(resume.lane).next_seq;
        if resume.resume_seq > next_seq {
            let renewing = ring.clone();
            let identity = tokio::task::spawn_blocking(move || renewing.renew_identity()).await??;
            let identity: String = identity.iter().map(|byte| format!("{byte:02x}")).collect();
            anyhow::bail!(
                "the sink holds lane {} through seq {} but this ring's next seq is {next_seq}: \
                 renewed the ring identity to {identity} so the sink starts a new epoch; reconnecting",
                resume.lane,
                resume.resume_seq - 1
            );
        }
    }
    let sent_times = SentTimes::default();
    let mut lanes = JoinSet::new();
    for resume in &welcome.resume {
        let stream = connection.open_uni().await?;
        // Higher value = sent first: audit 3 … media 0.
        stream.set_priority((Lane::COUNT - 1 - resume.lane.index()) as i32)?;
        lanes.spawn(send_lane(
            stream,
            ring.clone(),
            resume.lane,
            resume.resume_seq,
            config.clone(),
            metrics.clone(),
            sent_times.clone(),
        ));
    }
    loop {
        tokio::select! {
            message = read_control(&mut control_recv, &mut decoder, &mut buffer) => match message? {
                Some(ControlMessage::Ack(ack)) => {
                    metrics.acks_received.fetch_add(1, Ordering::Relaxed);
                    {
                        let acked_at = Instant::now();
                        let mut sent = sent_times.lock().expect("sent times lock");
                        let waiting = &mut sent[ack.lane.index()];
                        while let Some(&(seq, sent_at)) = waiting.front() && seq <= ack.durable_through {
                            metrics.ack_latency[ack.lane.index()].observe(acked_at - sent_at);
                            waiting.pop_front();
                        }
                    }
                    let ring = ring.clone();
                    // The ring's ack waits for its writer's commit: keep it off the async threads.
                    let result = tokio::task::spawn_blocking(move || ring.ack(ack.lane, ack.durable_through)).await?;
                    match result {
                        Ok(()) => {
                            metrics.acked_through[ack.lane.index()].fetch_max(ack.durable_through, Ordering::Relaxed);
                        }
                        Err(error) => tracing::error!(lane = %ack.lane, through = ack.durable_through, %error, "the sink acked beyond this ring"),
                    }
                }
                Some(ControlMessage::Error(error)) => anyhow::bail!("sink error {:?}: {}", error.code, error.reason),
                Some(other) => anyhow::bail!("unexpected control message {other:?}"),
                None => anyhow::bail!("sink closed the control stream"),
            },
            Some(finished) = lanes.join_next() => {
                finished??;
                anyhow::bail!("a lane sender stopped");
            }
        }
    }
}

async fn send_lane(
    mut stream: quinn::SendStream,
    ring: Ring,
    lane: Lane,
    resume_seq: u64,
    config: UplinkConfig,
    metrics: Arc<UplinkMetrics>,
    sent_times: SentTimes,
) -> anyhow::Result<()> {
    let limits = ReadLimits { chunks_max: config.read_chunks_max, bytes_max: config.read_bytes_max };
    let mut next_seq = resume_seq;
    let mut frame = Vec::new();
    // Dictionaries the sink has been sent on this stream; it stores each durably before it
    // reads the next frame, so sending once per session is enough.
    let mut dictionaries_sent = std::collections::HashSet::new();
    loop {
        let batch = {
            let ring = ring.clone();
            tokio::task::spawn_blocking(move || ring.read_from(lane, next_seq, limits)).await??
        };
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(config.idle_poll_ms)).await;
            continue;
        }
        for chunk in batch {
            let dict_id = chunk.header.dict_id;
            if dict_id != protocol::NO_DICTIONARY && dictionaries_sent.insert(dict_id) {
                let Some(dictionary) = config.dictionaries.as_ref().and_then(|store| store.get(dict_id))
                else {
                    anyhow::bail!(
                        "{lane} seq {} names dictionary {dict_id}, which this appliance does not have",
                        chunk.seq
                    );
                };
                frame.clear();
                let payload = protocol::dictionary_frame_payload(dict_id, &dictionary);
                encode_frame(FrameKind::Dictionary, &payload, &mut frame)?;
                stream.write_all(&frame).await?;
                metrics.dictionaries_sent.fetch_add(1, Ordering::Relaxed);
            }
            frame.clear();
            encode_frame(FrameKind::Chunk, &chunk.encoded, &mut frame)?;
            // Timed from before the write, so its Ack can never come first.
            {
                let mut sent = sent_times.lock().expect("sent times lock");
                if sent[lane.index()].len() < SENT_TIMES_MAX {
                    sent[lane.index()].push_back((chunk.seq, Instant::now()));
                }
            }
            stream.write_all(&frame).await?;
            next_seq = chunk.seq + 1;
            metrics.chunks_sent.fetch_add(1, Ordering::Relaxed);
            metrics.bytes_sent.fetch_add(chunk.encoded.len() as u64, Ordering::Relaxed);
        }
    }
}
