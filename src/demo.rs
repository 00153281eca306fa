//! `tributary demo`: the whole pipeline on one machine with embedded defaults — a fleet CA, an
//! embedded MQTT broker, a core sink (raw landing, WebDataset/Parquet datasets striped over two targets, the
//! tamper-evident decision archive) and N appliance daemons. Each appliance runs the simulated dev
//! kit through the real drivers (SHT3x + accelerometer readings, a camera producing JPEG frames of
//! a moving scene), filters (deadband, tagging, duplicate frames), the chunker with zstd
//! dictionaries, its LMDB ring, the QUIC uplink and the inference API, which the demo feeds
//! synthetic images. A live view shows every stage; at the end every kept record is durable at
//! the sink and a summary says where everything is.
//!
//! `--fault` switches show the invariants live (they combine):
//! - `sink-outage` stops the core sink for a few seconds a third of the way in: appliances keep
//!   producing into their rings and resume exactly where the sink's watermark says.
//! - `drop-network` drops every datagram between the appliances and the sink for a few seconds
//!   halfway through (a UDP fault proxy, `chaos`, sits between them): QUIC sessions time out and
//!   reconnect, chunks sent but not acked are sent again and the sink drops the duplicates.
//! - `fill-ring` cuts the first appliance's link from a quarter to three quarters of the run,
//!   gives it a small ring (16 MiB) and drops a burst of files larger than that ring into a
//!   watched directory: the ring stays within its capacity by evicting the oldest media chunks
//!   (counted, with their records), sensor readings and the audit lane's reservation are
//!   untouched, inference keeps answering, and everything still held drains when the link returns.
//!
//! Onboarding: an embedded MQTT broker (rumqttd, TLS) carries each appliance's first boot — a
//! single-use claim token, a key made on the appliance, a CSR, a certificate signed by the
//! sink's onboarding authority — and then its heartbeats.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use appliance::config::ApplianceConfig;
use appliance::daemon::Daemon;
use appliance::filters::DropReason;
use clap::{Args, ValueEnum};
use core_sink::datasets::manifest::Manifest;
use core_sink::{Sink, SinkConfig, SinkMetrics};
use fleet::{FleetCa, Validity};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use protocol::Lane;

/// How long the demo waits for the last chunks to be acked after producing stops.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);
/// How long `--fault sink-outage` keeps the sink down.
const OUTAGE: Duration = Duration::from_secs(4);
/// How long `--fault drop-network` drops every datagram: longer than the uplink's idle timeout
/// would be needed to force reconnects, but even a short cut makes QUIC resend.
const NETWORK_DROP: Duration = Duration::from_secs(5);
/// The `--fault fill-ring` appliance's ring: small, so a burst fills it within the demo.
const FILL_RING_CAPACITY_BYTES: u64 = 16 * 1024 * 1024;
const FILL_RING_AUDIT_RESERVED_BYTES: u64 = 4 * 1024 * 1024;
/// The burst: files of `FILL_BURST_FILE_BYTES` of incompressible bytes adding up to 1.5 times
/// the ring's shared pool.
const FILL_BURST_FILE_BYTES: usize = 96 * 1024;
const FILL_BURST_FILES: usize =
    (FILL_RING_CAPACITY_BYTES - FILL_RING_AUDIT_RESERVED_BYTES) as usize * 3 / 2 / FILL_BURST_FILE_BYTES;
/// Camera chunks stay under a thirty-second of the smallest ring (the ring's chunk bound).
const CAMERA_CHUNK_RAW_BYTES: u64 = 256 * 1024;
const _: () = assert!(CAMERA_CHUNK_RAW_BYTES * 2 <= FILL_RING_CAPACITY_BYTES / 32);
const BOARD_PROFILE: &str = include_str!("../board/profiles/sim-devkit.toml");
const MODEL_ONNX: &[u8] = include_bytes!("../models/shapes.onnx");
const MODEL_SIDECAR: &[u8] = include_bytes!("../models/shapes.json");

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Fault {
    /// Stop the core sink for a few seconds a third of the way in, then start it again.
    SinkOutage,
    /// Drop every datagram between the appliances and the sink for a few seconds halfway through.
    DropNetwork,
    /// Cut the first appliance's link for half the run and drop a burst larger than its (small)
    /// ring into a watched directory: the ring evicts its oldest media, counted.
    FillRing,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo keeps its fleet CA, sink state, landing, datasets, archive and appliances
    /// (replaced if it exists).
    #[arg(long, default_value = "tributary-demo")]
    dir: PathBuf,
    /// Simulated appliances.
    #[arg(long, default_value_t = 3)]
    appliances: usize,
    /// How long the appliances produce data, in seconds.
    #[arg(long = "duration", alias = "seconds", default_value_t = 15)]
    seconds: u64,
    /// Camera frames per second per appliance (320×240 JPEG of a moving scene).
    #[arg(long, default_value_t = 5)]
    frames_per_second: u32,
    /// Inference requests per second per appliance (synthetic shapes, each decision archived).
    #[arg(long, default_value_t = 10)]
    inferences_per_second: u32,
    /// Show an invariant live (repeatable): `sink-outage` stops the sink for a few seconds,
    /// `drop-network` drops all appliance↔sink datagrams for a few seconds, `fill-ring` cuts one
    /// appliance off and overfills its ring.
    #[arg(long, value_enum)]
    fault: Vec<Fault>,
}

/// `advertised` is the sink address devices get at onboarding: the fault proxy's when network
/// faults are on, else `listen`.
fn write_sink_config(
    dir: &Path,
    listen: SocketAddr,
    advertised: SocketAddr,
    broker_port: u16,
) -> Result<PathBuf> {
    let path = dir.join("sink.toml");
    let onboarding = format!(
        "\n[onboarding]\n\
         broker = {{ host = \"127.0.0.1\", port = {broker_port} }}\n\
         registry_dir = \"sink/registry\"\n\
         sink_address = \"{advertised}\"\n\
         sink_server_name = \"localhost\"\n\
         poll_interval_ms = 100\n"
    );
    std::fs::write(
        &path,
        format!(
            "# Written by `tributary demo`; relative paths are relative to this file.\n\
         listen = \"{listen}\"\n\
         state_dir = \"sink/state\"\n\
         landing_dir = \"sink/landing\"\n\
         ca_dir = \"ca\"\n\
         server_certificate_dir = \"sink/server\"\n\
         revocation_file = \"ca/revoked.txt\"\n\
         commit_interval_ms = 50\n\
         \n\
         [datasets]\n\
         targets = [\"targets/ost0\", \"targets/ost1\"]\n\
         manifest_dir = \"sink/manifests\"\n\
         shard_bytes_max = 16777216\n\
         shard_age_max_ms = 5000\n\
         \n\
         [archive]\n\
         root = \"sink/archive\"\n\
         review_dir = \"targets/review\"\n\
         flush_interval_ms = 500\n{onboarding}"
        ),
    )
    .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

fn free_tcp_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One appliance's config: the dev kit's sensors and camera with filters, the inference API;
/// with `fill_ring`, a small ring and a watched `backlog` directory.
fn write_appliance_config(
    dir: &Path,
    device: &str,
    broker_port: u16,
    api: SocketAddr,
    args: &DemoArgs,
    fill_ring: bool,
) -> Result<PathBuf> {
    let (capacity_bytes, audit_reserved_bytes) = if fill_ring {
        (FILL_RING_CAPACITY_BYTES, FILL_RING_AUDIT_RESERVED_BYTES)
    } else {
        (134_217_728, 16_777_216)
    };
    let backlog = if fill_ring {
        std::fs::create_dir_all(dir.join("backlog"))?;
        "\n# Files dropped here become media records (the fill-ring burst).\n\
         [sources.backlog]\n\
         input = { kind = \"directory\", path = \"backlog\", poll_interval_ms = 100 }\n\
         chunker = { chunk_raw_bytes = 131072, chunk_age_max_ms = 250 }\n"
    } else {
        ""
    };
    let config = format!(
        r#"# Written by `tributary demo`; relative paths are relative to this file.
data_dir = "."
device_id = "{device}"
[ring]
capacity_bytes = {capacity_bytes}
audit_reserved_bytes = {audit_reserved_bytes}
durability = "periodic"
sync_interval_ms = 200
# First boot: a key made here, a certificate from the fleet's authority over MQTT.
[onboarding]
broker_host = "127.0.0.1"
broker_port = {broker_port}
claim_identity_dir = "../../claim"
claim_token_file = "claim-token"
heartbeat_interval_ms = 1000

[sources.sensors]
input = {{ kind = "board", profile = "../../board.toml" }}
# Small time-bound chunks: a dictionary trained on the first 500 kept readings pays here.
chunker = {{ chunk_raw_bytes = 131072, chunk_age_max_ms = 250, dictionary_bytes = 4096, dictionary_sample_records = 500 }}
[[sources.sensors.filters]]
kind = "deadband"
fields = [{{ field = "z_mg", threshold = 15.0 }}]
max_silence_ms = 1000
[[sources.sensors.filters]]
kind = "tag"
tags = {{ site = "demo-lab" }}

[sources.camera]
input = {{ kind = "camera", profile = "../../board.toml", fps = {fps} }}
chunker = {{ chunk_raw_bytes = {CAMERA_CHUNK_RAW_BYTES}, chunk_age_max_ms = 250 }}
[[sources.camera.filters]]
kind = "drop_duplicates"
window = 8

[inference]
listen = "{api}"
models_dir = "../../models"
models = ["shapes"]
# The feeder's images are small; the evidence of one body must fit one audit chunk of the
# smallest (fill-ring) ring.
body_bytes_max = 262144
{backlog}"#,
        fps = args.frames_per_second
    );
    let path = dir.join("appliance.toml");
    std::fs::write(&path, config).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

struct Appliance {
    device: String,
    daemon: Daemon,
    api: SocketAddr,
    decisions: Arc<AtomicU64>,
    /// The watched directory of the `fill-ring` appliance.
    backlog: Option<PathBuf>,
    /// Highest ring fill seen, bytes (all lanes).
    ring_peak_bytes: AtomicU64,
}

fn source_view<'a>(daemon: &'a Daemon, name: &str) -> &'a appliance::metrics::PipelineView {
    daemon.metrics_view.pipelines.iter().find(|view| view.name == name).expect("configured source")
}

fn line(appliance: &Appliance) -> String {
    let sensors = source_view(&appliance.daemon, "sensors");
    let camera = source_view(&appliance.daemon, "camera");
    let stats = appliance.daemon.ring.stats();
    let used: u64 = stats.lanes.iter().map(|lane| lane.bytes_used).sum();
    appliance.ring_peak_bytes.fetch_max(used, Ordering::Relaxed);
    let lag: u64 =
        stats.lanes.iter().map(|lane| (lane.next_seq - 1).saturating_sub(lane.acked_through)).sum();
    let now = SystemTime::now();
    let lag_time = Lane::ALL
        .iter()
        .filter_map(|lane| appliance.daemon.metrics_view.lag.lag(*lane, now).ok())
        .max()
        .unwrap_or_default();
    let evicted: u64 = stats.lanes.iter().map(|lane| lane.evicted_chunks).sum();
    format!(
        "{}  readings {:>6} kept {:>6}  frames {:>4}  decisions {:>4}  ring {:>5.1}% of {:>3} MiB  \
         lag {:>3} chunks {:>5.1} s  evicted {:>3}",
        appliance.device,
        sensors.source.records_produced(),
        sensors.filters.records_out.load(Ordering::Relaxed),
        camera.filters.records_out.load(Ordering::Relaxed),
        appliance.decisions.load(Ordering::Relaxed),
        100.0 * used as f64 / stats.capacity_bytes as f64,
        stats.capacity_bytes >> 20,
        lag,
        lag_time.as_secs_f64(),
        evicted
    )
}

/// Writes `FILL_BURST_FILES` files of incompressible bytes into `dir`, each under a `.partial`
/// name first so the directory source never takes a file half-written.
fn write_burst(dir: &Path) -> Result<()> {
    // xorshift64*: cheap bytes zstd cannot shrink.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut bytes = vec![0u8; FILL_BURST_FILE_BYTES];
    for index in 0..FILL_BURST_FILES {
        for word in bytes.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let partial = dir.join(format!("backlog-{index:04}.bin.partial"));
        std::fs::write(&partial, &bytes).with_context(|| format!("write {}", partial.display()))?;
        std::fs::rename(&partial, dir.join(format!("backlog-{index:04}.bin")))
            .with_context(|| format!("rename {}", partial.display()))?;
    }
    Ok(())
}

/// Sends synthetic images to one appliance's inference API until `stop`.
async fn feed_inference(api: SocketAddr, per_second: u32, stop: Arc<AtomicBool>, decisions: Arc<AtomicU64>) {
    if per_second == 0 {
        return;
    }
    let images: Vec<Vec<u8>> = inference::synthetic::dataset(api.port().into(), 32)
        .iter()
        .map(|(_, image)| inference::synthetic::encode_png(image))
        .collect();
    let Ok(mut client) = inference::client::LoopbackClient::connect(api).await else {
        tracing::error!(%api, "cannot reach the inference API");
        return;
    };
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_second)));
    let mut index = 0usize;
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        match client.infer(None, "image/png", images[index % images.len()].clone()).await {
            Ok(response) if response.status == 200 => {
                decisions.fetch_add(1, Ordering::Relaxed);
            }
            Ok(response) => tracing::warn!(status = response.status, "inference request refused"),
            Err(error) => tracing::warn!(%error, "inference request failed"),
        }
        index += 1;
    }
}

async fn start_sink_on(config: &SinkConfig) -> Result<Sink> {
    // The previous endpoint's socket closes once its last connection task has ended.
    let mut last_error = None;
    for _ in 0..100 {
        match Sink::start(config.clone()).await {
            Ok(sink) => return Ok(sink),
            Err(error) => last_error = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last_error.expect("tried at least once"))
}

/// The demo, step by step: set up the directory and the fleet's certificates, start the core
/// (`Demo::start`: broker, fault proxy, sink, appliances, inference feeders), produce for
/// `--duration` seconds under the chosen faults, drain, show the fleet, shut down (appliances
/// first, then the sink) and report what the sink published.
pub fn run(args: &DemoArgs) -> Result<()> {
    anyhow::ensure!((1..=64).contains(&args.appliances), "--appliances must be within 1..=64");
    anyhow::ensure!((1..=30).contains(&args.frames_per_second), "--frames-per-second must be within 1..=30");
    let dir = prepare_dir(&args.dir)?;
    println!(
        "tributary demo: {} appliances for {} s, everything under {}",
        args.appliances,
        args.seconds,
        dir.display()
    );
    issue_certificates(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut demo = Demo::start(args, &dir, &runtime)?;
    let view = LiveView::new(demo.appliances.len(), args.seconds);
    demo.produce(args, &runtime, &view)?;
    demo.drain(&runtime, &view)?;
    summarize(&demo.appliances);
    demo.print_fleet_view()?;
    runtime.block_on(demo.shutdown())?;
    report_published(&dir)
}

/// Replaces `dir` with a fresh one holding the board profile and the model; returns it
/// canonical.
fn prepare_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("remove the previous demo at {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("models")).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    std::fs::write(dir.join("board.toml"), BOARD_PROFILE)?;
    std::fs::write(dir.join("models/shapes.onnx"), MODEL_ONNX)?;
    std::fs::write(dir.join("models/shapes.json"), MODEL_SIDECAR)?;
    Ok(dir)
}

/// The fleet CA, the sink's and the broker's server certificates, and the claim identity a
/// device image ships with (good only for asking to be onboarded).
fn issue_certificates(dir: &Path) -> Result<()> {
    let ca = FleetCa::init(&dir.join("ca"), "tributary demo fleet")?;
    ca.issue_server(&["localhost".into(), "127.0.0.1".into()], Validity::days(30))?
        .write_to(&dir.join("sink").join("server"), ca.certificate_pem())?;
    ca.issue_server(&["localhost".into(), "127.0.0.1".into()], Validity::days(30))?
        .write_to(&dir.join("broker"), ca.certificate_pem())?;
    ca.issue_device(onboarding::CLAIM_IDENTITY, Validity::days(30))?
        .write_to(&dir.join("claim"), ca.certificate_pem())?;
    Ok(())
}

/// What the demo runs, in start order: the embedded MQTT broker (until the process ends), the
/// fault proxy, the core sink, the appliances and the inference feeders. `shutdown` stops them
/// in the reverse order.
struct Demo {
    faults: Vec<Fault>,
    broker_address: SocketAddr,
    proxy: Option<chaos::ChaosProxy>,
    sink_config: SinkConfig,
    /// `None` while `--fault sink-outage` keeps it down.
    sink: Option<Sink>,
    /// What earlier sinks (before an outage) landed and dropped, for the live view.
    sink_totals: (u64, u64),
    appliances: Vec<Appliance>,
    feeders: Feeders,
}

impl Demo {
    fn start(args: &DemoArgs, dir: &Path, runtime: &tokio::runtime::Runtime) -> Result<Demo> {
        let broker_address = free_tcp_port()?;
        onboarding::broker::EmbeddedBroker::start(broker_address, &dir.join("broker"))?;
        println!("embedded MQTT broker (rumqttd, TLS) on {broker_address}");
        let sink_address = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
        let faults = args.fault.clone();
        // Network faults need a place to cut: a fault proxy between every appliance and the sink.
        let proxy = if faults.contains(&Fault::DropNetwork) || faults.contains(&Fault::FillRing) {
            let proxy =
                runtime.block_on(chaos::ChaosProxy::start(sink_address, chaos::ChaosConfig::clean(1)))?;
            println!(
                "fault proxy on {} in front of the sink (for --fault drop-network/fill-ring)",
                proxy.local_addr()
            );
            Some(proxy)
        } else {
            None
        };
        let advertised = proxy.as_ref().map_or(sink_address, chaos::ChaosProxy::local_addr);
        let config_path = write_sink_config(dir, sink_address, advertised, broker_address.port())?;
        let sink_config = SinkConfig::load(&config_path)?;
        let mut sink = runtime.block_on(Sink::start(sink_config.clone()))?;
        println!("core sink listening on {sink_address} (config {})", config_path.display());
        let tokens = runtime.block_on(claim_tokens(&mut sink, args.appliances))?;
        let mut demo = Demo {
            faults,
            broker_address,
            proxy,
            sink_config,
            sink: Some(sink),
            sink_totals: (0, 0),
            appliances: Vec::new(),
            feeders: Feeders::default(),
        };
        let onboarding_started = Instant::now();
        for (index, token) in tokens.into_iter().enumerate() {
            let appliance = demo.start_appliance(args, dir, index, &token, runtime)?;
            demo.appliances.push(appliance);
        }
        println!(
            "{} appliances onboarded over MQTT (claim token → key made on the device → CSR → certificate) in {:.1} s",
            demo.appliances.len(),
            onboarding_started.elapsed().as_secs_f64()
        );
        demo.feeders = Feeders::start(runtime, &demo.appliances, args.inferences_per_second);
        Ok(demo)
    }

    fn has(&self, fault: Fault) -> bool {
        self.faults.contains(&fault)
    }

    /// Appliance `index`: its directory, claim token and config, then its daemon, which onboards
    /// over MQTT on first start.
    fn start_appliance(
        &self,
        args: &DemoArgs,
        dir: &Path,
        index: usize,
        token: &str,
        runtime: &tokio::runtime::Runtime,
    ) -> Result<Appliance> {
        let device = format!("demo-appliance-{index:02}");
        let appliance_dir = dir.join("appliances").join(&device);
        std::fs::create_dir_all(&appliance_dir)?;
        std::fs::write(appliance_dir.join("claim-token"), format!("{token}\n"))?;
        let api = free_tcp_port()?;
        let fill_ring = index == 0 && self.has(Fault::FillRing);
        let path = write_appliance_config(
            &appliance_dir,
            &device,
            self.broker_address.port(),
            api,
            args,
            fill_ring,
        )?;
        let config = ApplianceConfig::load(&path)?;
        let daemon = runtime.block_on(Daemon::start(config))?;
        Ok(Appliance {
            device,
            daemon,
            api,
            decisions: Arc::new(AtomicU64::new(0)),
            backlog: fill_ring.then(|| appliance_dir.join("backlog")),
            ring_peak_bytes: AtomicU64::new(0),
        })
    }

    /// Lets the appliances produce for `--duration` seconds, injecting the chosen faults and
    /// updating the live view; every fault is over when it returns.
    fn produce(&mut self, args: &DemoArgs, runtime: &tokio::runtime::Runtime, view: &LiveView) -> Result<()> {
        let mut faults = FaultSchedule::new(self, args.seconds);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(args.seconds) {
            std::thread::sleep(Duration::from_millis(250));
            faults.tick(self, started, runtime, view)?;
            view.show(&self.appliances, self.sink_line());
            view.clock.set_position(started.elapsed().as_secs());
        }
        if self.sink.is_none() {
            self.sink = Some(runtime.block_on(start_sink_on(&self.sink_config))?);
        }
        // Faults still on when producing stops end now, so everything can drain.
        faults.end(self);
        Ok(())
    }

    /// Stops the feeders and the sources, then waits until the sink has acked every chunk.
    fn drain(&mut self, runtime: &tokio::runtime::Runtime, view: &LiveView) -> Result<()> {
        runtime.block_on(async {
            std::mem::take(&mut self.feeders).stop().await;
            for appliance in &mut self.appliances {
                appliance.daemon.stop_sources().await?;
            }
            anyhow::Ok(())
        })?;
        view.clock.finish_with_message("producing stopped; waiting for the last acks");
        let drain_started = Instant::now();
        let drained = |appliances: &[Appliance]| {
            appliances.iter().all(|appliance| {
                let stats = appliance.daemon.ring.stats();
                Lane::ALL.iter().all(|lane| stats.lane(*lane).acked_through + 1 == stats.lane(*lane).next_seq)
            })
        };
        while !drained(&self.appliances) {
            anyhow::ensure!(
                drain_started.elapsed() < DRAIN_LIMIT,
                "the sink did not ack everything within {DRAIN_LIMIT:?}"
            );
            view.show(&self.appliances, self.sink_line());
            std::thread::sleep(Duration::from_millis(50));
        }
        view.finish(&self.appliances, self.sink_line());
        Ok(())
    }

    /// The live view's sink line.
    fn sink_line(&self) -> String {
        match &self.sink {
            Some(sink) => format!(
                "core sink        chunks landed {:>6}  resends dropped {:>4}  dictionaries {}",
                self.sink_totals.0 + SinkMetrics::get(&sink.metrics().chunks_landed),
                self.sink_totals.1 + SinkMetrics::get(&sink.metrics().duplicates_dropped),
                SinkMetrics::get(&sink.metrics().dictionaries_stored)
            ),
            None => {
                "core sink        DOWN (fault injected): appliances keep producing into their rings".into()
            }
        }
    }

    /// `--fault sink-outage`: stops the sink, keeping what it counted for the live view.
    fn stop_sink(&mut self, runtime: &tokio::runtime::Runtime) {
        if let Some(running) = self.sink.take() {
            self.sink_totals.0 += SinkMetrics::get(&running.metrics().chunks_landed);
            self.sink_totals.1 += SinkMetrics::get(&running.metrics().duplicates_dropped);
            runtime.block_on(running.shutdown());
        }
    }

    /// The fleet view the sink's onboarding authority built from the appliances' heartbeats.
    fn print_fleet_view(&mut self) -> Result<()> {
        let Some(authority) = self.sink.as_mut().and_then(Sink::onboarding) else {
            return Ok(());
        };
        let devices = authority.registry().devices()?;
        let now_unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
        let view = onboarding_authority::cli::top(&devices, now_unix_ms, 10)?;
        println!("fleet view from the appliances' heartbeats (live: `core-sink fleet top`):");
        for line in view.lines() {
            println!("  {line}");
        }
        Ok(())
    }

    /// Stops what `start` started, last first: the feeders, the appliances, then the sink, which
    /// publishes open shards and flushes the archive.
    async fn shutdown(self) -> Result<()> {
        self.feeders.stop().await;
        for appliance in self.appliances {
            appliance.daemon.shutdown().await?;
        }
        if let Some(sink) = self.sink {
            sink.shutdown().await;
        }
        Ok(())
    }
}

/// `count` single-use claim tokens from the sink's onboarding authority, once it has reached the
/// broker.
async fn claim_tokens(sink: &mut Sink, count: usize) -> Result<Vec<String>> {
    let authority = sink.onboarding().context("the demo sink has an onboarding authority")?;
    anyhow::ensure!(
        authority.wait_ready(Duration::from_secs(30)).await,
        "the onboarding authority did not reach the embedded broker"
    );
    let now_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    Ok(authority.registry().create_tokens(count as u32, Duration::from_secs(3600), now_unix_ms)?)
}

/// One inference feeder per appliance, stopped together.
#[derive(Default)]
struct Feeders {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Feeders {
    fn start(runtime: &tokio::runtime::Runtime, appliances: &[Appliance], per_second: u32) -> Feeders {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = appliances
            .iter()
            .map(|appliance| {
                runtime.spawn(feed_inference(
                    appliance.api,
                    per_second,
                    stop.clone(),
                    appliance.decisions.clone(),
                ))
            })
            .collect();
        Feeders { stop, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The live view: one line per appliance, one for the sink, and the clock.
struct LiveView {
    view: MultiProgress,
    lines: Vec<ProgressBar>,
    sink_line: ProgressBar,
    clock: ProgressBar,
}

impl LiveView {
    fn new(appliances: usize, seconds: u64) -> LiveView {
        let view = MultiProgress::new();
        let style = ProgressStyle::with_template("{msg}").expect("template");
        let lines =
            (0..appliances).map(|_| view.add(ProgressBar::new_spinner().with_style(style.clone()))).collect();
        let sink_line = view.add(ProgressBar::new_spinner().with_style(style.clone()));
        let clock = view.add(ProgressBar::new(seconds));
        clock.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} s {msg}")
                .expect("template")
                .progress_chars("=> "),
        );
        LiveView { view, lines, sink_line, clock }
    }

    fn show(&self, appliances: &[Appliance], sink_line: String) {
        for (bar, appliance) in self.lines.iter().zip(appliances) {
            bar.set_message(line(appliance));
        }
        self.sink_line.set_message(sink_line);
    }

    fn finish(&self, appliances: &[Appliance], sink_line: String) {
        for (bar, appliance) in self.lines.iter().zip(appliances) {
            bar.finish_with_message(line(appliance));
        }
        self.sink_line.finish_with_message(sink_line);
    }

    /// Prints `message` above the live lines.
    fn say(&self, message: &str) {
        self.view.suspend(|| println!("{message}"));
    }
}

/// When each `--fault` starts and ends, and which are on.
struct FaultSchedule {
    outage_at: Option<Duration>,
    outage_until: Option<Instant>,
    network_drop: Option<(Duration, Duration)>,
    network_dropping: bool,
    /// The fill-ring appliance's uplink as the proxy sees it, and when its link is cut.
    fill: Option<(SocketAddr, Duration, Duration)>,
    filling: bool,
}

impl FaultSchedule {
    fn new(demo: &Demo, seconds: u64) -> FaultSchedule {
        let at = |fraction: f64| Duration::from_secs_f64(seconds as f64 * fraction);
        let fill = demo
            .appliances
            .first()
            .filter(|appliance| appliance.backlog.is_some())
            .and_then(|appliance| appliance.daemon.uplink_local_addr())
            .map(|local| (SocketAddr::from(([127, 0, 0, 1], local.port())), at(0.25), at(0.75)));
        FaultSchedule {
            outage_at: demo.has(Fault::SinkOutage).then(|| at(1.0 / 3.0)),
            outage_until: None,
            network_drop: demo.has(Fault::DropNetwork).then(|| (at(0.5), at(0.5) + NETWORK_DROP)),
            network_dropping: false,
            fill,
            filling: false,
        }
    }

    /// Starts and ends faults as the time since `started` (producing) passes their times.
    fn tick(
        &mut self,
        demo: &mut Demo,
        started: Instant,
        runtime: &tokio::runtime::Runtime,
        view: &LiveView,
    ) -> Result<()> {
        if let (Some(at), None) = (self.outage_at, self.outage_until)
            && started.elapsed() >= at
            && demo.sink.is_some()
        {
            demo.stop_sink(runtime);
            self.outage_until = Some(Instant::now() + OUTAGE);
            view.say(&format!("fault: core sink stopped for {} s", OUTAGE.as_secs()));
        }
        if let Some(until) = self.outage_until
            && demo.sink.is_none()
            && Instant::now() >= until
        {
            demo.sink = Some(runtime.block_on(start_sink_on(&demo.sink_config))?);
            view.say("fault over: core sink restarted; appliances resume from its watermarks");
        }
        let elapsed = started.elapsed();
        if let (Some((from, until)), Some(proxy)) = (self.network_drop, &demo.proxy) {
            if elapsed >= from && !self.network_dropping {
                self.network_dropping = true;
                proxy.set_blackhole(true);
                view.say(&format!(
                    "fault: network between appliances and sink drops every datagram for {} s",
                    NETWORK_DROP.as_secs()
                ));
            }
            if elapsed >= until && self.network_dropping {
                proxy.set_blackhole(false);
                self.network_drop = None;
                view.say(
                    "fault over: network restored; unacked chunks are resent, the sink drops duplicates",
                );
            }
        }
        if let (Some((client, from, until)), Some(proxy)) = (self.fill, &demo.proxy) {
            let appliance = &demo.appliances[0];
            if elapsed >= from && !self.filling {
                self.filling = true;
                proxy.set_client_blackhole(client, true);
                write_burst(appliance.backlog.as_ref().expect("the fill-ring appliance has a backlog"))?;
                view.say(&format!(
                    "fault: {} cut off from the sink; {} files ({} MiB) dropped into its backlog \
                     directory; its ring holds {} MiB",
                    appliance.device,
                    FILL_BURST_FILES,
                    (FILL_BURST_FILES * FILL_BURST_FILE_BYTES) >> 20,
                    FILL_RING_CAPACITY_BYTES >> 20
                ));
            }
            if elapsed >= until && self.filling {
                proxy.set_client_blackhole(client, false);
                self.fill = None;
                view.say(&format!(
                    "fault over: {} reconnected; its ring drains from the sink's watermark",
                    appliance.device
                ));
            }
        }
        Ok(())
    }

    /// Ends the network faults still on.
    fn end(&self, demo: &Demo) {
        let Some(proxy) = &demo.proxy else {
            return;
        };
        if self.network_drop.is_some() && self.network_dropping {
            proxy.set_blackhole(false);
            println!("fault over: network restored; unacked chunks are resent, the sink drops duplicates");
        }
        if let Some((client, _, _)) = self.fill
            && self.filling
        {
            proxy.set_client_blackhole(client, false);
            println!(
                "fault over: {} reconnected; its ring drains from the sink's watermark",
                demo.appliances[0].device
            );
        }
    }
}

fn summarize(appliances: &[Appliance]) {
    let mut produced = BTreeMap::new();
    let mut kept = BTreeMap::new();
    let mut dropped: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut raw_bytes, mut body_bytes, mut decisions) = (0u64, 0u64, 0u64);
    for appliance in appliances {
        for view in &appliance.daemon.metrics_view.pipelines {
            *produced.entry(view.name.clone()).or_insert(0) += view.source.records_produced();
            *kept.entry(view.name.clone()).or_insert(0) += view.filters.records_out.load(Ordering::Relaxed);
            for reason in DropReason::ALL {
                *dropped.entry(reason.as_str()).or_insert(0) += view.filters.dropped(reason);
            }
            for chunker in view.chunkers.lock().expect("chunker metrics").values() {
                raw_bytes += chunker.chunk_raw_bytes.load(Ordering::Relaxed);
                body_bytes += chunker.chunk_body_bytes.load(Ordering::Relaxed);
            }
        }
        decisions += appliance.decisions.load(Ordering::Relaxed);
    }
    println!();
    println!(
        "produced {} sensor readings and {} frames; kept {} sensor readings and {} frames after filters \
         (dropped: {})",
        produced.get("sensors").copied().unwrap_or(0),
        produced.get("camera").copied().unwrap_or(0),
        kept.get("sensors").copied().unwrap_or(0),
        kept.get("camera").copied().unwrap_or(0),
        dropped
            .iter()
            .filter(|(_, count)| **count > 0)
            .map(|(reason, count)| format!("{count} {reason}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "chunks: {:.1} MiB of records became {:.1} MiB on the wire (compression {:.2}x; JPEG frames stored raw)",
        raw_bytes as f64 / (1 << 20) as f64,
        body_bytes as f64 / (1 << 20) as f64,
        raw_bytes as f64 / body_bytes.max(1) as f64
    );
    if let Some(backlog) = kept.get("backlog") {
        println!(
            "backlog files (the fill-ring burst): produced {}, kept {backlog}",
            produced.get("backlog").copied().unwrap_or(0)
        );
    }
    println!("decisions answered by the appliances' inference APIs: {decisions}");
    let (mut evicted_chunks, mut evicted_records) = (BTreeMap::new(), BTreeMap::new());
    for appliance in appliances {
        let stats = appliance.daemon.ring.stats();
        for lane in Lane::ALL {
            *evicted_chunks.entry(lane).or_insert(0u64) += stats.lane(lane).evicted_chunks;
            *evicted_records.entry(lane).or_insert(0u64) += stats.lane(lane).evicted_records;
        }
        let ack = appliance.daemon.uplink_metrics().map(|metrics| {
            let mut merged = telemetry::LatencyHistogram::default().snapshot();
            for lane in Lane::ALL {
                let snapshot = metrics.ack_latency[lane.index()].snapshot();
                merged.count += snapshot.count;
                for (total, count) in merged.buckets.iter_mut().zip(snapshot.buckets) {
                    *total += count;
                }
            }
            merged
        });
        let milliseconds = |quantile: f64| {
            ack.as_ref()
                .and_then(|snapshot| snapshot.quantile_upper_bound_seconds(quantile))
                .map_or_else(|| "-".to_string(), |seconds| format!("{}", seconds * 1000.0))
        };
        println!(
            "  {}: acked through seq audit {} sensor {} media {}; ring holds {} unacked chunks, peaked at \
             {:.1} of {} MiB; {} chunks evicted; ack latency p50 ≤ {} ms, p99 ≤ {} ms",
            appliance.device,
            stats.lane(Lane::Audit).acked_through,
            stats.lane(Lane::Sensor).acked_through,
            stats.lane(Lane::Media).acked_through,
            stats.lanes.iter().map(|lane| lane.chunk_count).sum::<u64>(),
            appliance.ring_peak_bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
            stats.capacity_bytes >> 20,
            stats.lanes.iter().map(|lane| lane.evicted_chunks).sum::<u64>(),
            milliseconds(0.5),
            milliseconds(0.99)
        );
    }
    for lane in Lane::ALL {
        if evicted_chunks[&lane] > 0 {
            println!(
                "evicted {lane}: {} chunks holding {} records (ring full while cut off; counted, never silent)",
                evicted_chunks[&lane], evicted_records[&lane]
            );
        }
    }
}

/// After the sink has shut down: what it published.
fn report_published(dir: &Path) -> Result<()> {
    for dataset in ["media", "sensor"] {
        let manifest_path = dir.join("sink").join("manifests").join(dataset).join("manifest.json");
        if let Some(manifest) = Manifest::read(&manifest_path)? {
            let samples: u64 = manifest.shards.iter().map(|shard| shard.samples).sum();
            println!(
                "landed {dataset}: {samples} samples in {} {} shards — manifest {}",
                manifest.shards.len(),
                manifest.kind,
                manifest_path.display()
            );
            for shard in &manifest.shards {
                println!("    {}", shard.path.display());
            }
        }
    }
    let archive_root = dir.join("sink").join("archive");
    match archive::audit::verify(&archive_root) {
        Ok(report) => println!(
            "archive: {} decisions and {} model(s) in the tamper-evident log, {} signed checkpoints, \
             verify passed — `core-sink audit verify --archive {}`",
            report.decisions,
            report.models,
            report.checkpoints,
            archive_root.display()
        ),
        Err(error) => println!("archive: verify FAILED: {error}"),
    }
    println!(
        "raw landing (originals as received): {}",
        dir.join("sink").join("landing").join("raw").display()
    );
    println!("read the datasets with the stock Python readers (pip install webdataset pyarrow):");
    println!("  import glob, webdataset, pyarrow.parquet as pq");
    println!(
        "  frames = list(webdataset.WebDataset(sorted(glob.glob(\"{0}/targets/ost*/media/*.tar\")), shardshuffle=False))",
        dir.display()
    );
    println!(
        "  readings = pq.ParquetDataset(sorted(glob.glob(\"{0}/targets/ost*/sensor/date=*/*.parquet\"))).read()",
        dir.display()
    );
    Ok(())
}
