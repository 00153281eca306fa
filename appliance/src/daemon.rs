//! The appliance daemon: opens the ring, starts one pipeline per configured source, the uplink,
//! the metrics endpoint, and tells systemd it is ready; then watches the config file (filters
//! apply without restart) and pings the systemd watchdog only while every pipeline thread makes
//! progress.
//!
//! Invariant: the watchdog is pinged only while every pipeline thread's heartbeat is younger than
//! half the watchdog interval, so a wedged pipeline gets the appliance restarted by systemd.
//! Invariant: on shutdown, sources stop first, pipelines flush their open chunks into the ring,
//! the ring is synced, and only then does the uplink stop.

use std::collections::BTreeMap;
use std::net::ToSocketAddrs as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use buffer::Ring;
use fleet::IssuedCertificate;
use lifecycle::{Components, Health, Stoppable, TaskComponent};

use crate::components::{InferenceComponent, SourcesComponent, UplinkComponent};
use crate::config::ApplianceConfig;
use crate::dictionaries::DictionaryStore;
use crate::metrics::MetricsView;
use crate::pipeline::{SourcePipeline, unix_ms};
use crate::source::StopSignal;
use crate::uplink::{Uplink, UplinkConfig, UplinkMetrics};

/// A running appliance: its parts are `lifecycle::Components` (`components.rs`), started in
/// order by `start` and stopped last-first by `shutdown` (or asked to stop, last-first, when the
/// daemon is dropped).
pub struct Daemon {
    pub ring: Ring,
    pub dictionaries: Arc<DictionaryStore>,
    pub metrics_address: Option<std::net::SocketAddr>,
    pub metrics_view: Arc<MetricsView>,
    pub device_id: Option<String>,
    /// The inference service and the address its API listens on.
    pub inference: Option<(Arc<inference::InferenceService>, std::net::SocketAddr)>,
    components: Components,
    /// A failed flush of the sources while stopping, for `shutdown` to return.
    stop_failure: Arc<Mutex<Option<anyhow::Error>>>,
}

impl Daemon {
    /// Starts everything `config` asks for, in start order: the ring and dictionaries, the
    /// device identity (onboarding), then the components `uplink`, `onboarding-agent`, `sources`,
    /// `metrics`, `inference`, `remote-config`, `status-report` and `watchdog`. Watching the
    /// config file is `run`'s job (`apply_reload`).
    pub async fn start(config: ApplianceConfig) -> anyhow::Result<Daemon> {
        let (ring, dictionaries) = open_storage(&config).await?;
        let onboarded = onboard(&config).await?;
        let mut device_id = config.device_id.clone();
        let uplink_config = match &onboarded {
            Some(identity) => Some(onboarded_uplink(identity)?),
            None => configured_uplink(&config, &mut device_id)?,
        };

        let mut components = Components::new();
        if let Some(mut uplink_config) = uplink_config {
            uplink_config.dictionaries = Some(dictionaries.clone());
            components.push(UplinkComponent(Some(Uplink::spawn(ring.clone(), uplink_config)?)));
        }
        let mut renewal_metrics = None;
        if let (Some(settings), Some(identity)) = (&config.onboarding, &onboarded) {
            let agent = onboarding::DeviceAgent::start(settings.agent_config(), identity)
                .context("heartbeat agent")?;
            renewal_metrics = Some(agent.renewal_metrics());
            components.push(Stoppable::new("onboarding-agent", agent, |agent| Box::pin(agent.shutdown())));
        }
        let stop = StopSignal::new();
        let stop_failure = Arc::new(Mutex::new(None));
        let (sources, views) =
            SourcesComponent::start(&config.sources, &ring, &dictionaries, &stop, stop_failure.clone())?;
        components.push(sources);
        let metrics_view = Arc::new(MetricsView {
            ring: ring.clone(),
            pipelines: views,
            uplink: components
                .get::<UplinkComponent>()
                .and_then(|uplink| uplink.0.as_ref())
                .map(Uplink::metrics),
            lag: crate::lag::LagProbe::new(ring.clone(), dictionaries.clone()),
            renewal: renewal_metrics,
        });
        let mut metrics_address = None;
        if let Some(listen) = config.metrics_listen {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("metrics_listen: bind tcp {listen}"))?;
            metrics_address = Some(listener.local_addr()?);
            components.push(TaskComponent::new(
                "metrics",
                tokio::spawn(crate::metrics::serve(listener, metrics_view.clone())),
            ));
        }
        let inference = match &config.inference {
            Some(settings) => Some(start_inference(settings, &config, &ring, &stop, &mut components).await?),
            None => None,
        };
        if let (Some(settings), Some(agent)) = (
            &config.onboarding,
            components.get::<Stoppable<onboarding::DeviceAgent>>().and_then(Stoppable::get),
        ) {
            let (remote_config, reporter) = (agent.config(), agent.status_reporter());
            let updaters = sources_of(&components)
                .iter()
                .map(|(name, pipeline)| (name.clone(), pipeline.filter_updater()))
                .collect();
            components.push(TaskComponent::new(
                "remote-config",
                tokio::spawn(apply_remote_config(remote_config, updaters)),
            ));
            components.push(TaskComponent::new(
                "status-report",
                tokio::spawn(report_status(
                    reporter,
                    metrics_view.clone(),
                    Duration::from_millis(settings.heartbeat_interval_ms),
                )),
            ));
        }
        if let Some(watchdog) = systemd::watchdog_interval() {
            let heartbeats =
                sources_of(&components).values().map(|pipeline| pipeline.metrics.clone()).collect();
            components
                .push(TaskComponent::new("watchdog", tokio::spawn(systemd::watchdog(watchdog, heartbeats))));
        }
        systemd::notify("READY=1");
        tracing::info!(
            sources = sources_of(&components).len(),
            uplink = components.get::<UplinkComponent>().is_some(),
            metrics = ?metrics_address,
            components = ?components.names(),
            "appliance running"
        );
        Ok(Daemon {
            ring,
            dictionaries,
            metrics_address,
            metrics_view,
            device_id,
            inference,
            components,
            stop_failure,
        })
    }

    /// The running pipeline of source `name` (until `stop_sources`).
    pub fn pipeline(&self, name: &str) -> Option<&SourcePipeline> {
        sources_of(&self.components).get(name)
    }

    /// The UDP address the uplink's connections leave from (what a proxy in front of the sink
    /// sees as this appliance), if the daemon has an uplink.
    pub fn uplink_local_addr(&self) -> Option<std::net::SocketAddr> {
        self.components.get::<UplinkComponent>().and_then(|uplink| uplink.0.as_ref()).map(Uplink::local_addr)
    }

    /// The uplink's metrics (acks, ack latency per lane), if the daemon has an uplink.
    pub fn uplink_metrics(&self) -> Option<Arc<UplinkMetrics>> {
        self.metrics_view.uplink.clone()
    }

    /// Each component's health, in start order.
    pub fn health(&self) -> Vec<(&'static str, Health)> {
        self.components.health()
    }

    /// Applies a changed config file: filter changes take effect between records, a changed
    /// inference model list is hot-swapped; other changes are reported as needing a restart.
    pub fn apply_reload(&self, old: &ApplianceConfig, new: &ApplianceConfig) {
        for (name, settings) in &new.sources {
            let Some(pipeline) = self.pipeline(name) else {
                tracing::warn!(source = %name, "new source in the config: restart the appliance to start it");
                continue;
            };
            let unchanged = old.sources.get(name).is_some_and(|old| old.filters == settings.filters);
            if !unchanged {
                match pipeline.reconfigure_filters(settings.filters.clone()) {
                    Ok(()) => tracing::info!(source = %name, "filters reloaded"),
                    Err(error) => tracing::error!(source = %name, %error, "filter reload refused"),
                }
            }
        }
        if let (Some((service, _)), Some(old_inference), Some(new_inference)) =
            (&self.inference, &old.inference, &new.inference)
            && (old_inference.models != new_inference.models
                || old_inference.default_model != new_inference.default_model)
        {
            let sources: Vec<_> = new_inference
                .models
                .iter()
                .map(|name| inference::ModelSource::in_directory(&new_inference.models_dir, name))
                .collect();
            match service.reload_models(&sources, new_inference.default_model.clone()) {
                Ok(()) => tracing::info!(models = ?new_inference.models, "inference models swapped"),
                Err(error) => {
                    tracing::error!(%error, "inference model swap refused; the running models stay")
                }
            }
        }
        let without_live_settings = |config: &ApplianceConfig| {
            let mut config = config.clone();
            config.sources.values_mut().for_each(|source| source.filters.clear());
            if let Some(inference) = &mut config.inference {
                inference.models.clear();
                inference.default_model = None;
            }
            config
        };
        if without_live_settings(old) != without_live_settings(new) {
            tracing::warn!("config changes other than filters and inference models apply after a restart");
        }
    }

    /// Stops the sources and flushes every pipeline's open chunks into the ring (synced), leaving
    /// the uplink running so the ring drains. Idempotent.
    pub async fn stop_sources(&mut self) -> anyhow::Result<()> {
        match self.components.get_mut::<SourcesComponent>() {
            Some(sources) => sources.stop_and_flush().await,
            None => Ok(()),
        }
    }

    /// Stops every component, the last started first: the sources stop and the pipelines flush
    /// into the ring, which is synced, before the onboarding agent and then the uplink stop.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        systemd::notify("STOPPING=1");
        self.components.stop().await;
        match self.stop_failure.lock().expect("failure lock").take() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// The `sources` component's pipelines by name (none before it starts or after `stop_sources`).
fn sources_of(components: &Components) -> &BTreeMap<String, SourcePipeline> {
    static NONE: BTreeMap<String, SourcePipeline> = BTreeMap::new();
    components.get::<SourcesComponent>().map_or(&NONE, |sources| &sources.pipelines)
}

/// Creates `data_dir`, opens the ring and the dictionary store in it.
async fn open_storage(config: &ApplianceConfig) -> anyhow::Result<(Ring, Arc<DictionaryStore>)> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data_dir {}", config.data_dir.display()))?;
    let ring_config = config.ring.ring_config().map_err(|message| anyhow::anyhow!(message))?;
    let ring_path = config.data_dir.join("ring");
    let ring = tokio::task::spawn_blocking(move || Ring::open(&ring_path, ring_config))
        .await?
        .context("open the ring")?;
    let dictionaries = Arc::new(DictionaryStore::open(&config.data_dir.join("dictionaries"))?);
    Ok((ring, dictionaries))
}

/// With `[onboarding]`: the device identity, onboarded over MQTT on first boot.
async fn onboard(config: &ApplianceConfig) -> anyhow::Result<Option<onboarding::DeviceIdentity>> {
    let Some(settings) = &config.onboarding else {
        return Ok(None);
    };
    let id = config.device_id.clone().expect("validated: onboarding needs device_id");
    let token = match &settings.claim_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("onboarding.claim_token_file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let broker =
        onboarding::BrokerEndpoint { host: settings.broker_host.clone(), port: settings.broker_port };
    let onboarding_config = onboarding::DeviceOnboardingConfig::new(
        &id,
        &config.data_dir.join("identity"),
        broker,
        &settings.claim_identity_dir,
        token,
    );
    Ok(Some(onboarding::ensure_identity(&onboarding_config).await.context("onboarding")?))
}

/// The uplink to the sink an onboarded identity names.
fn onboarded_uplink(identity: &onboarding::DeviceIdentity) -> anyhow::Result<UplinkConfig> {
    let sink = identity
        .sink
        .sink_address
        .to_socket_addrs()
        .with_context(|| format!("onboarded sink address {}", identity.sink.sink_address))?
        .next()
        .context("onboarded sink address resolves to nothing")?;
    let mut uplink_config = UplinkConfig::new(
        sink,
        &identity.sink.sink_server_name,
        &identity.device_id,
        identity.certificate.clone(),
        &identity.ca_pem,
    );
    // The agent renews the certificate there; the uplink takes it up at its next connection.
    uplink_config.identity_dir = Some(identity.identity_dir.clone());
    Ok(uplink_config)
}

/// The uplink `[uplink]` configures, with the certificate in its `identity_dir`, which names the
/// device (`device_id`, if set, must agree).
fn configured_uplink(
    config: &ApplianceConfig,
    device_id: &mut Option<String>,
) -> anyhow::Result<Option<UplinkConfig>> {
    let Some(settings) = &config.uplink else {
        return Ok(None);
    };
    let identity = IssuedCertificate::read_from(&settings.identity_dir).with_context(|| {
        format!("uplink.identity_dir {}: read the device certificate", settings.identity_dir.display())
    })?;
    let certified = identity.device_id()?;
    if let Some(configured) = device_id.as_ref() {
        anyhow::ensure!(
            *configured == certified,
            "device_id {configured:?} differs from the certificate's {certified:?}"
        );
    }
    *device_id = Some(certified.clone());
    let ca_pem = std::fs::read_to_string(&settings.ca_file)
        .with_context(|| format!("uplink.ca_file {}", settings.ca_file.display()))?;
    let sink = settings
        .sink
        .to_socket_addrs()
        .with_context(|| format!("uplink.sink {}: resolve", settings.sink))?
        .next()
        .with_context(|| format!("uplink.sink {}: no address", settings.sink))?;
    let mut uplink_config = UplinkConfig::new(sink, &settings.server_name, &certified, identity, &ca_pem);
    settings.tune(&mut uplink_config);
    // A certificate replaced in place (renewed by other means) is taken up.
    uplink_config.identity_dir = Some(settings.identity_dir.clone());
    Ok(Some(uplink_config))
}

/// Starts the inference service and its API (the `inference` component), which ends when
/// `stop` is raised.
async fn start_inference(
    settings: &crate::config::InferenceSettings,
    config: &ApplianceConfig,
    ring: &Ring,
    stop: &StopSignal,
    components: &mut Components,
) -> anyhow::Result<(Arc<inference::InferenceService>, std::net::SocketAddr)> {
    let models = settings
        .models
        .iter()
        .map(|name| inference::ModelSource::in_directory(&settings.models_dir, name))
        .collect();
    let mut inference_config = inference::InferenceConfig::new(config.data_dir.join("inference"), models);
    inference_config.default_model = settings.default_model.clone();
    inference_config.body_bytes_max = settings.body_bytes_max;
    inference_config.image_scale_max = settings.image_scale_max;
    inference_config.decodes_max = settings.decodes_max;
    // Checked when the config was parsed; this only converts.
    inference_config.http = settings.http_limits().map_err(|message| anyhow::anyhow!("{message}"))?;
    let service = inference::InferenceService::start(inference_config, ring.clone())
        .context("inference: start the service")?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("inference.listen: bind tcp {}", settings.listen))?;
    let address = listener.local_addr()?;
    let stopped = stop.clone();
    let shutdown = async move {
        while !stopped.is_stopped() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let task = tokio::spawn({
        let service = service.clone();
        async move {
            if let Err(error) = inference::serve(listener, service, shutdown).await {
                tracing::error!(%error, "inference API stopped");
            }
        }
    });
    components.push(InferenceComponent { stop: stop.clone(), task });
    tracing::info!(%address, "inference API listening");
    Ok((service, address))
}

/// What heartbeats report: ring fill per lane, uplink lag in chunks and in seconds per lane,
/// the last ack, intake rates and the boot slot.
async fn report_status(
    reporter: tokio::sync::watch::Sender<onboarding::DeviceStatus>,
    view: Arc<MetricsView>,
    interval: Duration,
) {
    let started = std::time::Instant::now();
    let mut last_acked = 0u64;
    let mut last_ack_unix_ms = None;
    let boot_slot = std::fs::read_to_string("/proc/cmdline").ok().and_then(|line| boot_slot(&line));
    let intake = |view: &MetricsView| {
        view.pipelines.iter().fold((0u64, 0u64), |(records, bytes), pipeline| {
            (
                records.saturating_add(pipeline.source.records_produced()),
                bytes.saturating_add(pipeline.source.payload_bytes_produced()),
            )
        })
    };
    let mut previous = (std::time::Instant::now(), intake(&view));
    let (ring, uplink) = (&view.ring, &view.uplink);
    loop {
        let stats = ring.stats();
        let ring_fill_percent_per_lane = protocol::Lane::ALL
            .iter()
            .map(|lane| {
                let lane_stats = stats.lane(*lane);
                (
                    lane.to_string(),
                    100.0 * lane_stats.bytes_used as f64 / lane_stats.budget_bytes.max(1) as f64,
                )
            })
            .collect();
        let uplink_lag_chunks = protocol::Lane::ALL.iter().map(|lane| stats.lane(*lane).chunk_count).sum();
        if let Some(uplink) = &uplink {
            let acked: u64 = protocol::Lane::ALL.iter().map(|lane| uplink.acked_through(*lane)).sum();
            if acked != last_acked {
                last_acked = acked;
                last_ack_unix_ms = Some(unix_ms());
            }
        }
        let now = std::time::Instant::now();
        let totals = intake(&view);
        let seconds = now.duration_since(previous.0).as_secs_f64().max(0.001);
        let records_per_second = totals.0.saturating_sub(previous.1.0) as f64 / seconds;
        let bytes_per_second = totals.1.saturating_sub(previous.1.1) as f64 / seconds;
        previous = (now, totals);
        let wall_clock = std::time::SystemTime::now();
        let uplink_lag_seconds_per_lane = protocol::Lane::ALL
            .iter()
            .filter_map(|lane| {
                let lag = view.lag.lag(*lane, wall_clock).ok()?;
                Some((lane.to_string(), lag.as_secs_f64()))
            })
            .collect();
        reporter.send_replace(onboarding::DeviceStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: started.elapsed().as_secs(),
            ring_fill_percent_per_lane,
            uplink_lag_chunks,
            last_ack_unix_ms,
            uplink_lag_seconds_per_lane,
            records_per_second,
            bytes_per_second,
            boot_slot: boot_slot.clone(),
        });
        tokio::time::sleep(interval.min(Duration::from_secs(1))).await;
    }
}

/// The slot named by `rauc.slot=` on a kernel command line (how RAUC learns which slot booted).
fn boot_slot(cmdline: &str) -> Option<String> {
    let slot = cmdline.split_ascii_whitespace().find_map(|word| word.strip_prefix("rauc.slot="))?;
    (!slot.is_empty() && slot.len() <= onboarding::messages::BOOT_SLOT_BYTES_MAX).then(|| slot.to_owned())
}

/// Applies remote config from the fleet authority: `sources.NAME.filters` holds a TOML array of
/// filter tables (e.g. `[{kind = "decimate", keep_every = 2}]`) that replaces that source's
/// filters without a restart; other keys are logged and ignored.
async fn apply_remote_config(
    mut config: tokio::sync::watch::Receiver<onboarding::ConfigDocument>,
    updaters: BTreeMap<String, crate::pipeline::FilterUpdater>,
) {
    loop {
        let document = config.borrow_and_update().clone();
        for (key, value) in &document.values {
            let Some(source) = key.strip_prefix("sources.").and_then(|rest| rest.strip_suffix(".filters"))
            else {
                continue;
            };
            let Some(updater) = updaters.get(source) else {
                tracing::warn!(%key, "remote config names a source this appliance does not have");
                continue;
            };
            let parsed = toml::from_str::<toml::Table>(&format!("filters = {value}"))
                .map_err(|error| error.to_string())
                .and_then(|table| {
                    crate::filters::FilterConfig::list_from_toml(&table["filters"])
                        .map_err(|error| error.to_string())
                });
            match parsed.map(|filters| updater.reconfigure(filters)) {
                Ok(Ok(())) => tracing::info!(%key, version = document.version, "remote filters applied"),
                Ok(Err(error)) => tracing::error!(%key, %error, "remote filters refused"),
                Err(error) => tracing::error!(%key, %error, "remote filters do not parse"),
            }
        }
        if config.changed().await.is_err() {
            return;
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|metadata| metadata.modified()).ok()
}

/// Runs the daemon from `config_path` until `shutdown` completes (SIGTERM/Ctrl-C in the binary).
pub async fn run(config_path: &Path, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let mut config = ApplianceConfig::load(config_path)?;
    let reload = Duration::from_millis(config.config_reload_ms);
    let daemon = Daemon::start(config.clone()).await?;
    let mut last_modified = modified(config_path);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(reload) => {
                let now_modified = modified(config_path);
                if now_modified == last_modified {
                    continue;
                }
                last_modified = now_modified;
                match ApplianceConfig::load(config_path) {
                    Ok(new) => {
                        daemon.apply_reload(&config, &new);
                        config = new;
                    }
                    Err(error) => tracing::error!(%error, "config change refused; the running config stays"),
                }
            }
        }
    }
    tracing::info!("shutting down");
    daemon.shutdown().await
}

/// systemd's notify protocol (sd_notify) without libsystemd: a datagram to `$NOTIFY_SOCKET`.
pub mod systemd {
    use super::*;

    /// Sends `state` (e.g. "READY=1") when running under systemd with `Type=notify`; a no-op
    /// otherwise.
    pub fn notify(state: &str) {
        let Some(socket_path) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        let result = (|| -> std::io::Result<()> {
            let socket = std::os::unix::net::UnixDatagram::unbound()?;
            let bytes = socket_path.as_encoded_bytes();
            if let Some(abstract_name) = bytes.strip_prefix(b"@") {
                use std::os::linux::net::SocketAddrExt as _;
                let address = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
                socket.send_to_addr(state.as_bytes(), &address)?;
            } else {
                socket.send_to(state.as_bytes(), &socket_path)?;
            }
            Ok(())
        })();
        if let Err(error) = result {
            tracing::warn!(%error, state, "sd_notify failed");
        }
    }

    /// The watchdog interval systemd expects pings within (`WatchdogSec`), if it set one for us.
    pub fn watchdog_interval() -> Option<Duration> {
        let microseconds: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|pid| pid.parse::<u32>().ok())
            && pid != std::process::id()
        {
            return None;
        }
        (microseconds > 0).then(|| Duration::from_micros(microseconds))
    }

    /// Pings every half interval while all pipeline heartbeats are fresh.
    pub async fn watchdog(interval: Duration, heartbeats: Vec<Arc<crate::pipeline::PipelineMetrics>>) {
        let half = interval / 2;
        loop {
            tokio::time::sleep(half).await;
            let now = unix_ms();
            let stale = heartbeats
                .iter()
                .filter(|metrics| {
                    now.saturating_sub(metrics.heartbeat_unix_ms.load(Ordering::Relaxed))
                        > half.as_millis() as u64
                })
                .count();
            if stale == 0 {
                notify("WATCHDOG=1");
            } else {
                tracing::error!(stale, "pipelines stopped making progress; withholding the watchdog ping");
            }
        }
    }
}

#[cfg(test)]
mod boot_slot_tests {
    #[test]
    fn the_booted_slot_comes_from_the_kernel_command_line() {
        let line = "console=ttyS0 root=PARTLABEL=rootfs-b rw rootwait rauc.slot=B panic=-1 quiet\n";
        assert_eq!(super::boot_slot(line).as_deref(), Some("B"));
        assert_eq!(super::boot_slot("console=ttyS0 quiet"), None);
        assert_eq!(super::boot_slot("rauc.slot= quiet"), None);
        assert_eq!(super::boot_slot(&format!("rauc.slot={}", "x".repeat(100))), None);
    }
}
