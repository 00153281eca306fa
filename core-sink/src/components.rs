//! The sink's parts as `lifecycle` components. `Sink::start` pushes them in start order; a new
//! part (replication, a cluster agent) is one type here and one `components.push` there.
//!
//! | component           | what it is                                   | stop                                   |
//! |---------------------|----------------------------------------------|----------------------------------------|
//! | `replication`       | thread copying published data to replicas    | flag, join                             |
//! | `archive-feed`      | thread feeding the decision archive          | flag, join (last persist)              |
//! | `datasets`          | thread deriving dataset shards               | flag, join (publishes open shards)     |
//! | `lander`            | thread driving `landing::LandingCore`        | close its channel, join (final commit) |
//! | `onboarding`        | the MQTT onboarding authority (`Stoppable`)  | `Authority::shutdown`                  |
//! | `sessions`          | QUIC endpoint, accept loop, connection tasks | tell sessions, close, wait idle ≤ 5 s  |
//! | `metrics`           | `GET /metrics` server task                   | abort                                  |
//! | `revocation-reload` | revocation list reload task                  | abort                                  |

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lifecycle::{Component, Health, StopFuture};
use protocol::ErrorCode;

use crate::server::{Command, Context, LandSender, close_code};

/// How long `sessions` waits for connections to close after telling them to.
const SESSIONS_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Joins a thread on a blocking task (never on the async threads).
async fn join(thread: std::thread::JoinHandle<()>, name: &'static str) {
    if let Ok(Err(_)) = tokio::task::spawn_blocking(move || thread.join()).await {
        tracing::error!(component = name, "thread panicked");
    }
}

fn thread_health(thread: Option<&std::thread::JoinHandle<()>>) -> Health {
    match thread {
        Some(thread) if !thread.is_finished() => Health::Running,
        _ => Health::Stopped,
    }
}

pub(crate) struct ArchiveFeedComponent(pub Option<crate::archive_feed::FeedRunner>);

impl Component for ArchiveFeedComponent {
    fn name(&self) -> &'static str {
        "archive-feed"
    }

    fn request_stop(&mut self) {
        if let Some(feed) = &self.0 {
            feed.request_stop();
        }
    }

    fn stop(mut self: Box<Self>) -> StopFuture {
        let feed = self.0.take();
        Box::pin(async move {
            if let Some(feed) = feed {
                let _ = tokio::task::spawn_blocking(move || feed.stop_and_join()).await;
            }
        })
    }
}

/// A part that is one thread stopped by a flag (`datasets`, `replication`).
pub(crate) struct ThreadComponent {
    name: &'static str,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ThreadComponent {
    /// Runs `run` on the `sink-<name>` thread; `stop` is the flag it watches.
    pub fn start(
        name: &'static str,
        stop: Arc<AtomicBool>,
        run: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<ThreadComponent> {
        let thread = std::thread::Builder::new().name(format!("sink-{name}")).spawn(run)?;
        Ok(ThreadComponent { name, stop, thread: Some(thread) })
    }
}

impl Component for ThreadComponent {
    fn name(&self) -> &'static str {
        self.name
    }

    fn health(&self) -> Health {
        thread_health(self.thread.as_ref())
    }

    fn request_stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn stop(mut self: Box<Self>) -> StopFuture {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take();
        let name = self.name;
        Box::pin(async move {
            if let Some(thread) = thread {
                join(thread, name).await;
            }
        })
    }
}

pub(crate) struct LanderComponent {
    land: LandSender,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LanderComponent {
    /// Runs `lander` on the `sink-lander` thread; it ends once `land` is closed.
    pub fn start(
        land: LandSender,
        lander: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<LanderComponent> {
        let thread = std::thread::Builder::new().name("sink-lander".into()).spawn(lander)?;
        Ok(LanderComponent { land, thread: Some(thread) })
    }
}

impl Component for LanderComponent {
    fn name(&self) -> &'static str {
        "lander"
    }

    fn health(&self) -> Health {
        thread_health(self.thread.as_ref())
    }

    fn stop(mut self: Box<Self>) -> StopFuture {
        // Closing the channel ends the lander after it commits what is pending.
        self.land.lock().expect("land sender lock").take();
        let thread = self.thread.take();
        Box::pin(async move {
            if let Some(thread) = thread {
                join(thread, "lander").await;
            }
        })
    }
}

pub(crate) struct SessionsComponent {
    pub endpoint: quinn::Endpoint,
    pub context: Arc<Context>,
    pub accept: tokio::task::JoinHandle<()>,
}

impl Component for SessionsComponent {
    fn name(&self) -> &'static str {
        "sessions"
    }

    fn health(&self) -> Health {
        if self.accept.is_finished() { Health::Stopped } else { Health::Running }
    }

    fn request_stop(&mut self) {
        self.accept.abort();
        self.endpoint.close(close_code(ErrorCode::ShuttingDown), b"sink stopped");
    }

    fn stop(self: Box<Self>) -> StopFuture {
        let sessions: Vec<_> = self
            .context
            .sessions
            .lock()
            .expect("sessions lock")
            .values()
            .map(|(_, commands)| commands.clone())
            .collect();
        for commands in sessions {
            let _ = commands.try_send(Command::ShuttingDown);
        }
        self.endpoint.close(close_code(ErrorCode::ShuttingDown), b"sink shutting down");
        self.accept.abort();
        Box::pin(async move {
            let _ = tokio::time::timeout(SESSIONS_CLOSE_WAIT, self.endpoint.wait_idle()).await;
        })
    }
}
