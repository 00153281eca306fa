//! The appliance daemon's parts as `lifecycle` components, like the sink's
//! (`core-sink/src/components.rs`). `Daemon::start` pushes them in start order and
//! `Daemon::shutdown` stops them last-first; a new part is one type here (or a
//! `lifecycle::TaskComponent`) and one `components.push` there.
//!
//! | component          | what it is                                          | stop                                   |
//! |--------------------|-----------------------------------------------------|----------------------------------------|
//! | `uplink`           | QUIC uplink task: ring → core sink                  | `Uplink::stop` (close, await)          |
//! | `onboarding-agent` | MQTT device agent: heartbeats, remote config        | `DeviceAgent::shutdown` (`Stoppable`)  |
//! | `sources`          | one pipeline per source (source, filters, chunker)  | raise stop, join, flush, sync the ring |
//! | `metrics`          | `GET /metrics` server task                          | abort                                  |
//! | `inference`        | the inference API                                   | raise stop, await ≤ grace, abort       |
//! | `remote-config`    | applies filters the fleet authority sends           | abort                                  |
//! | `status-report`    | fills the heartbeats' status                        | abort                                  |
//! | `watchdog`         | systemd watchdog pings while pipelines progress     | abort                                  |
//!
//! Stopping last-first keeps the daemon's shutdown invariant: the sources stop, the pipelines
//! flush their open chunks into the ring and the ring is synced before the uplink stops, so what
//! was produced is in the ring for the next start.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use buffer::Ring;
use lifecycle::{Component, Health, StopFuture};

use crate::config::SourceSettings;
use crate::dictionaries::DictionaryStore;
use crate::metrics::PipelineView;
use crate::pipeline::{PipelineSettings, SourcePipeline};
use crate::source::StopSignal;
use crate::uplink::Uplink;

pub(crate) struct UplinkComponent(pub Option<Uplink>);

impl Component for UplinkComponent {
    fn name(&self) -> &'static str {
        "uplink"
    }

    fn health(&self) -> Health {
        match &self.0 {
            Some(uplink) if uplink.is_running() => Health::Running,
            _ => Health::Stopped,
        }
    }

    fn request_stop(&mut self) {
        if let Some(uplink) = &self.0 {
            uplink.request_stop();
        }
    }

    fn stop(mut self: Box<Self>) -> StopFuture {
        let uplink = self.0.take();
        Box::pin(async move {
            if let Some(uplink) = uplink {
                uplink.stop().await;
            }
        })
    }
}

/// One pipeline per configured source, all stopped by one signal.
pub(crate) struct SourcesComponent {
    pub pipelines: BTreeMap<String, SourcePipeline>,
    stop: StopSignal,
    ring: Ring,
    /// Where `stop` leaves a failed flush for `Daemon::shutdown` to return.
    failure: Arc<Mutex<Option<anyhow::Error>>>,
}

impl SourcesComponent {
    /// Starts a pipeline for each of `sources`; returns the component and the pipelines' views
    /// for the metrics.
    pub fn start(
        sources: &BTreeMap<String, SourceSettings>,
        ring: &Ring,
        dictionaries: &Arc<DictionaryStore>,
        stop: &StopSignal,
        failure: Arc<Mutex<Option<anyhow::Error>>>,
    ) -> anyhow::Result<(SourcesComponent, Vec<PipelineView>)> {
        let mut component =
            SourcesComponent { pipelines: BTreeMap::new(), stop: stop.clone(), ring: ring.clone(), failure };
        let mut views = Vec::new();
        for (name, settings) in sources {
            // On an error the pipelines started so far stop with `component` (`Drop`).
            let (pipeline, view) = start_pipeline(name, settings, ring, dictionaries, stop)?;
            views.push(view);
            component.pipelines.insert(name.clone(), pipeline);
        }
        Ok((component, views))
    }

    /// Stops the sources and flushes every pipeline's open chunks into the ring, then syncs it.
    /// Idempotent.
    pub async fn stop_and_flush(&mut self) -> anyhow::Result<()> {
        self.stop.stop();
        let pipelines = std::mem::take(&mut self.pipelines);
        tokio::task::spawn_blocking(move || pipelines.into_values().for_each(SourcePipeline::join)).await?;
        let ring = self.ring.clone();
        tokio::task::spawn_blocking(move || ring.sync()).await??;
        Ok(())
    }
}

impl Drop for SourcesComponent {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

impl Component for SourcesComponent {
    fn name(&self) -> &'static str {
        "sources"
    }

    fn health(&self) -> Health {
        if self.pipelines.values().all(SourcePipeline::is_running) {
            Health::Running
        } else {
            Health::Stopped
        }
    }

    fn request_stop(&mut self) {
        self.stop.stop();
    }

    fn stop(mut self: Box<Self>) -> StopFuture {
        Box::pin(async move {
            if let Err(error) = self.stop_and_flush().await {
                tracing::error!(%error, "stopping the sources");
                self.failure.lock().expect("failure lock").get_or_insert(error);
            }
        })
    }
}

fn start_pipeline(
    name: &str,
    settings: &SourceSettings,
    ring: &Ring,
    dictionaries: &Arc<DictionaryStore>,
    stop: &StopSignal,
) -> anyhow::Result<(SourcePipeline, PipelineView)> {
    let (source, source_metrics) = crate::sources::build_source(name, &settings.input)
        .with_context(|| format!("sources.{name}.input"))?;
    let pipeline = SourcePipeline::spawn(
        PipelineSettings {
            name: name.to_string(),
            filters: settings.filters.clone(),
            chunker: settings.chunker.clone(),
            channel_records_max: settings.channel_records_max,
        },
        source,
        ring.clone(),
        Some(dictionaries.clone()),
        stop.clone(),
    )?;
    let view = PipelineView::new(&pipeline, source_metrics);
    Ok((pipeline, view))
}

/// The inference API: it ends when the daemon's stop signal is raised (with the sources, or by
/// this component's `stop`), letting requests in progress finish within the service's grace.
pub(crate) struct InferenceComponent {
    pub stop: StopSignal,
    pub task: tokio::task::JoinHandle<()>,
}

impl Component for InferenceComponent {
    fn name(&self) -> &'static str {
        "inference"
    }

    fn health(&self) -> Health {
        if self.task.is_finished() { Health::Stopped } else { Health::Running }
    }

    fn request_stop(&mut self) {
        self.stop.stop();
        self.task.abort();
    }

    fn stop(self: Box<Self>) -> StopFuture {
        self.stop.stop();
        let grace = Duration::from_millis(inference::service::SHUTDOWN_GRACE_MS);
        Box::pin(async move {
            let abort = self.task.abort_handle();
            if tokio::time::timeout(grace, self.task).await.is_err() {
                abort.abort();
            }
        })
    }
}
