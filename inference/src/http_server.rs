//! The HTTP/1.1 server loop of the appliance's network APIs: the inference API (`api::serve`)
//! and the `/v1/records` source in `appliance` both run on [`serve`], so a client on the
//! appliance's network meets the same limits on either.
//!
//! Anyone who can reach the port may connect, so every resource a connection holds is bounded:
//!
//! ```text
//! limit                     default    range           what happens at the limit
//! connections_max           16         1..=1024        further connections wait in the queue
//! connections_queued_max    16         0..=1024        further connections get 503 and are closed
//! (queue wait)              header_timeout_ms          a queued connection still without a slot
//!                                                      gets 503 and is closed
//! header_timeout_ms         10 000     100..=3600000   headers not complete in time (counted from
//!                                                      when the server waits for a request, so it
//!                                                      also ends an idle keep-alive): closed
//! body_timeout_ms           30 000     100..=3600000   body not complete in time: 408, closed
//!                                                      (enforced by the handlers, see
//!                                                      `HttpLimits::body_timeout`)
//! idle_timeout_ms           30 000     100..=3600000   no byte for this long while the server
//!                                                      waits to read: closed
//! HEADER_BUFFER_BYTES_MAX   64 KiB                     hyper's read buffer: larger headers 431
//! ```
//!
//! A refused connection gets a fixed 503 written without waiting (`try_write`: a client that
//! does not read cannot hold the accept loop) and is closed. Every refusal and every timeout is
//! reported to a [`ConnectionObserver`] (the API's metrics) and logged at most once per
//! `LOG_INTERVAL` per kind.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use telemetry::LogRateLimit;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

/// Default most connections served at once.
pub const CONNECTIONS_MAX_DEFAULT: usize = 16;
/// Largest `connections_max` (and `connections_queued_max`) a config may ask for.
pub const CONNECTIONS_LIMIT: usize = 1024;
/// Default most connections waiting for a slot.
pub const CONNECTIONS_QUEUED_MAX_DEFAULT: usize = 16;
/// Default time to receive a request's complete headers.
pub const HEADER_TIMEOUT_DEFAULT_MS: u64 = 10_000;
/// Default time to receive a request's complete body.
pub const BODY_TIMEOUT_DEFAULT_MS: u64 = 30_000;
/// Default time a connection may send nothing while the server waits to read from it.
pub const IDLE_TIMEOUT_DEFAULT_MS: u64 = 30_000;
/// Shortest and longest timeout a config may ask for.
pub const TIMEOUT_RANGE_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;
/// hyper's read buffer per connection, which bounds a request's headers.
pub const HEADER_BUFFER_BYTES_MAX: usize = 64 * 1024;
/// One log line per kind of refusal or timeout per this interval (the metrics count them all).
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (out of file descriptors, say) before trying again.
const ACCEPT_RETRY_MS: u64 = 50;

const _: () = assert!(CONNECTIONS_MAX_DEFAULT <= CONNECTIONS_LIMIT);
const _: () = assert!(CONNECTIONS_QUEUED_MAX_DEFAULT <= CONNECTIONS_LIMIT);
const _: () = assert!(HEADER_BUFFER_BYTES_MAX >= 8192, "hyper's smallest read buffer");

/// The limits of one API's connections (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    pub connections_max: usize,
    pub connections_queued_max: usize,
    pub header_timeout: Duration,
    /// The handlers bound their body reads with it (`tokio::time::timeout` around the read,
    /// answering 408): the server cannot tell where a body is read.
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            connections_max: CONNECTIONS_MAX_DEFAULT,
            connections_queued_max: CONNECTIONS_QUEUED_MAX_DEFAULT,
            header_timeout: Duration::from_millis(HEADER_TIMEOUT_DEFAULT_MS),
            body_timeout: Duration::from_millis(BODY_TIMEOUT_DEFAULT_MS),
            idle_timeout: Duration::from_millis(IDLE_TIMEOUT_DEFAULT_MS),
        }
    }
}

/// A limit outside its range: the config key and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: expected {expected}, found {found}")]
pub struct LimitError {
    pub key: &'static str,
    pub expected: String,
    pub found: String,
}

impl HttpLimits {
    /// Limits from config values (milliseconds), each checked against its range.
    pub fn from_config(
        connections_max: usize,
        connections_queued_max: usize,
        header_timeout_ms: u64,
        body_timeout_ms: u64,
        idle_timeout_ms: u64,
    ) -> Result<HttpLimits, LimitError> {
        fn check<T: PartialOrd + std::fmt::Display>(
            key: &'static str,
            value: T,
            range: std::ops::RangeInclusive<T>,
            unit: &str,
        ) -> Result<T, LimitError> {
            if range.contains(&value) {
                return Ok(value);
            }
            let expected = format!("{}..={} {unit}", range.start(), range.end());
            Err(LimitError { key, expected, found: value.to_string() })
        }
        let timeout =
            |key, value| check(key, value, TIMEOUT_RANGE_MS, "milliseconds").map(Duration::from_millis);
        Ok(HttpLimits {
            connections_max: check("connections_max", connections_max, 1..=CONNECTIONS_LIMIT, "connections")?,
            connections_queued_max: check(
                "connections_queued_max",
                connections_queued_max,
                0..=CONNECTIONS_LIMIT,
                "connections",
            )?,
            header_timeout: timeout("header_timeout_ms", header_timeout_ms)?,
            body_timeout: timeout("body_timeout_ms", body_timeout_ms)?,
            idle_timeout: timeout("idle_timeout_ms", idle_timeout_ms)?,
        })
    }

    /// Checks limits built by hand (tests, the benchmark) against the same ranges.
    pub fn validate(&self) -> Result<(), LimitError> {
        HttpLimits::from_config(
            self.connections_max,
            self.connections_queued_max,
            u64::try_from(self.header_timeout.as_millis()).unwrap_or(u64::MAX),
            u64::try_from(self.body_timeout.as_millis()).unwrap_or(u64::MAX),
            u64::try_from(self.idle_timeout.as_millis()).unwrap_or(u64::MAX),
        )
        .map(|_| ())
    }
}

/// What happened to a connection, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// Given a slot (at once or after queueing).
    Accepted,
    /// Every slot was taken; the connection waits in the queue.
    Queued,
    /// Turned away with 503: slots and queue full, or no slot within the queue wait.
    Refused,
    /// Closed: its headers were not complete within `header_timeout`.
    HeaderTimeout,
    /// Closed: it sent nothing for `idle_timeout` while the server waited to read.
    IdleTimeout,
    /// A served connection ended (however), giving its slot back.
    Closed,
}

impl ConnectionEvent {
    pub const ALL: [ConnectionEvent; 6] = [
        ConnectionEvent::Accepted,
        ConnectionEvent::Queued,
        ConnectionEvent::Refused,
        ConnectionEvent::HeaderTimeout,
        ConnectionEvent::IdleTimeout,
        ConnectionEvent::Closed,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            ConnectionEvent::Accepted => "accepted",
            ConnectionEvent::Queued => "queued",
            ConnectionEvent::Refused => "refused",
            ConnectionEvent::HeaderTimeout => "header_timeout",
            ConnectionEvent::IdleTimeout => "idle_timeout",
            ConnectionEvent::Closed => "closed",
        }
    }
}

/// Counts connection events (the API's metrics).
pub trait ConnectionObserver: Send + Sync + 'static {
    fn connection_event(&self, event: ConnectionEvent);
}

/// What the accept loop and every connection task share.
struct Server {
    name: &'static str,
    limits: HttpLimits,
    observer: Arc<dyn ConnectionObserver>,
    slots: Arc<Semaphore>,
    queue: Arc<Semaphore>,
    /// One rate limit per event kind, indexed like `ConnectionEvent::ALL`.
    logs: Mutex<[LogRateLimit; ConnectionEvent::ALL.len()]>,
}

impl Server {
    /// Counts `event`; logs it (at most once per `LOG_INTERVAL` per kind) when it is a refusal
    /// or a timeout.
    fn report(&self, event: ConnectionEvent, address: SocketAddr) {
        self.observer.connection_event(event);
        let loggable = matches!(
            event,
            ConnectionEvent::Refused | ConnectionEvent::HeaderTimeout | ConnectionEvent::IdleTimeout
        );
        if !loggable {
            return;
        }
        let index = ConnectionEvent::ALL.iter().position(|&known| known == event).unwrap_or(0);
        let allowed =
            self.logs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[index].allow(Instant::now());
        if let Some(suppressed) = allowed {
            tracing::warn!(
                api = self.name,
                client = %address,
                event = event.name(),
                connections_max = self.limits.connections_max,
                header_timeout_ms = self.limits.header_timeout.as_millis() as u64,
                idle_timeout_ms = self.limits.idle_timeout.as_millis() as u64,
                suppressed,
                "closed or refused a connection at its limit"
            );
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes; then stops
/// accepting, lets requests in progress finish for `shutdown_grace` and cuts off the rest.
/// Handlers find the client's address as `ConnectInfo<SocketAddr>` in the request extensions.
/// `name` labels the log lines.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    observer: Arc<dyn ConnectionObserver>,
    shutdown: impl Future<Output = ()> + Send,
    shutdown_grace: Duration,
) -> io::Result<()> {
    assert!(limits.validate().is_ok(), "limits are validated with the config: {limits:?}");
    let server = Arc::new(Server {
        name,
        limits,
        observer,
        slots: Arc::new(Semaphore::new(limits.connections_max)),
        queue: Arc::new(Semaphore::new(limits.connections_queued_max)),
        logs: Mutex::new(std::array::from_fn(|_| LogRateLimit::new(LOG_INTERVAL))),
    });
    let (closing, closing_watch) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut accept_errors = LogRateLimit::new(LOG_INTERVAL);
    tokio::pin!(shutdown);
    loop {
        let (stream, address) = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Running out of file descriptors must not end the API; wait and retry.
                    if let Some(suppressed) = accept_errors.allow(Instant::now()) {
                        tracing::warn!(api = name, %error, suppressed, "accepting a connection failed");
                    }
                    tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let closing_watch = closing_watch.clone();
        if let Ok(slot) = server.slots.clone().try_acquire_owned() {
            let server = server.clone();
            connections.spawn(async move {
                serve_connection(&server, stream, address, router, slot, closing_watch).await;
            });
        } else if let Ok(queue_place) = server.queue.clone().try_acquire_owned() {
            server.report(ConnectionEvent::Queued, address);
            let server = server.clone();
            connections.spawn(async move {
                let waited =
                    tokio::time::timeout(server.limits.header_timeout, server.slots.clone().acquire_owned())
                        .await;
                drop(queue_place);
                match waited {
                    Ok(Ok(slot)) => {
                        serve_connection(&server, stream, address, router, slot, closing_watch).await
                    }
                    _ => refuse(&server, &stream, address),
                }
            });
        } else {
            refuse(&server, &stream, address);
        }
    }
    drop(listener);
    let _ = closing.send(true);
    let drained =
        tokio::time::timeout(shutdown_grace, async { while connections.join_next().await.is_some() {} })
            .await;
    if drained.is_err() {
        tracing::warn!(
            api = name,
            open = connections.len(),
            "connections still open were cut off at shutdown"
        );
        connections.shutdown().await;
    }
    Ok(())
}

/// The fixed answer to a connection over the limits.
const REFUSED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: 98\r\n\r\n\
{\"error\":\"too_many_connections\",\"message\":\"every connection slot is taken; try again in a second\"}";

const _: () = {
    // The content-length above must match the JSON body.
    let body = b"{\"error\":\"too_many_connections\",\"message\":\"every connection slot is taken; try again in a second\"}";
    assert!(body.len() == 98);
};

/// Writes the 503 without waiting (a client that does not read gets less) and closes.
fn refuse(server: &Server, stream: &TcpStream, address: SocketAddr) {
    server.report(ConnectionEvent::Refused, address);
    let _ = stream.try_write(REFUSED_RESPONSE);
}

async fn serve_connection(
    server: &Arc<Server>,
    stream: TcpStream,
    address: SocketAddr,
    router: axum::Router,
    slot: OwnedSemaphorePermit,
    mut closing: watch::Receiver<bool>,
) {
    server.report(ConnectionEvent::Accepted, address);
    let stream = IdleStream::new(stream, server.limits.idle_timeout);
    let idle_fired = stream.fired.clone();
    let service = TowerToHyperService::new(router.layer(axum::Extension(ConnectInfo(address))));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(server.limits.header_timeout)
        .max_buf_size(HEADER_BUFFER_BYTES_MAX)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    // Resolves once the server closes (the watch's guard is dropped inside, not held across
    // an await of this task).
    let closed = async move {
        let _ = closing.wait_for(|closing| *closing).await;
    };
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = closed => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if idle_fired.load(std::sync::atomic::Ordering::Relaxed) {
        server.report(ConnectionEvent::IdleTimeout, address);
    } else if let Err(error) = result {
        if error.is_timeout() {
            server.report(ConnectionEvent::HeaderTimeout, address);
        } else {
            tracing::debug!(api = server.name, client = %address, %error, "connection ended with an error");
        }
    }
    server.report(ConnectionEvent::Closed, address);
    drop(slot);
}

/// A connection whose read fails once it has waited `idle_timeout` since the last bytes arrived.
struct IdleStream {
    stream: TcpStream,
    idle_timeout: Duration,
    idle_deadline: Pin<Box<tokio::time::Sleep>>,
    fired: Arc<std::sync::atomic::AtomicBool>,
}

impl IdleStream {
    fn new(stream: TcpStream, idle_timeout: Duration) -> IdleStream {
        IdleStream {
            stream,
            idle_timeout,
            idle_deadline: Box::pin(tokio::time::sleep(idle_timeout)),
            fired: Arc::default(),
        }
    }
}

impl AsyncRead for IdleStream {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_read(context, buffer) {
            Poll::Ready(result) => {
                let deadline = tokio::time::Instant::now() + this.idle_timeout;
                this.idle_deadline.as_mut().reset(deadline);
                Poll::Ready(result)
            }
            Poll::Pending => match this.idle_deadline.as_mut().poll(context) {
                Poll::Ready(()) => {
                    this.fired.store(true, std::sync::atomic::Ordering::Relaxed);
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle too long")))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for IdleStream {
    fn poll_write(self: Pin<&mut Self>, context: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(context, bytes)
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(context)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_outside_their_range_name_the_key() {
        let check =
            |limits: Result<HttpLimits, LimitError>, expected: Result<(), &str>| match (limits, expected) {
                (Ok(_), Ok(())) => {}
                (Err(error), Err(fragment)) => assert!(error.to_string().contains(fragment), "{error}"),
                (got, expected) => panic!("got {got:?}, expected {expected:?}"),
            };
        check(HttpLimits::from_config(16, 16, 10_000, 30_000, 30_000), Ok(()));
        check(HttpLimits::from_config(1, 0, 100, 100, 100), Ok(()));
        check(
            HttpLimits::from_config(0, 16, 10_000, 30_000, 30_000),
            Err("connections_max: expected 1..=1024 connections, found 0"),
        );
        check(HttpLimits::from_config(16, 1025, 10_000, 30_000, 30_000), Err("connections_queued_max"));
        check(
            HttpLimits::from_config(16, 16, 99, 30_000, 30_000),
            Err("header_timeout_ms: expected 100..=3600000 milliseconds, found 99"),
        );
        check(HttpLimits::from_config(16, 16, 10_000, 0, 30_000), Err("body_timeout_ms"));
        check(HttpLimits::from_config(16, 16, 10_000, 30_000, 3_600_001), Err("idle_timeout_ms"));
        assert_eq!(HttpLimits::default().validate(), Ok(()));
    }
}
