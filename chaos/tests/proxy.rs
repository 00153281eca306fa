//! Tests of the chaos proxy (`chaos` crate), the lossy network that the end-to-end tests stand
//! on: if it silently forwarded everything, an exactly-once test through it would prove nothing.
//!
//! Every test puts a UDP echo server (or a sink that only counts) on 127.0.0.1 behind a proxy, sends
//! numbered datagrams in batches of `BATCH_DATAGRAMS` (small enough that no kernel socket buffer
//! overflows, which would be loss the proxy did not decide), and after each batch waits with
//! `settle` until every datagram is accounted for. Every receive is bounded by a timeout, and no
//! assertion depends on how fast the machine is.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chaos::{ChaosConfig, ChaosLimits, ChaosProxy, ChaosStats, DATAGRAM_BYTES_MAX};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

/// Datagrams sent between two waits for the network to settle.
const BATCH_DATAGRAMS: u64 = 50;
/// How long a receive waits before `settle` checks whether anything is still in flight. Too short
/// only costs extra checks; it never makes a test pass or fail.
const RECEIVE_POLL: Duration = Duration::from_millis(5);
/// Upper bound on one `settle`, only reached when a test is failing.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest UDP payload over IPv4: 65535 minus the 20-byte IP and 8-byte UDP headers.
const UDP_PAYLOAD_BYTES_MAX: usize = 65_507;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Sends every datagram back to where it came from.
    Echo,
    /// Only records what it receives.
    Sink,
}

/// What an upstream received, in order, and from whom.
#[derive(Default)]
struct UpstreamLog {
    received: AtomicU64,
    echoed: AtomicU64,
    datagrams: Mutex<Vec<(SocketAddr, Vec<u8>)>>,
}

struct TestUpstream {
    address: SocketAddr,
    mode: Mode,
    log: Arc<UpstreamLog>,
    task: JoinHandle<()>,
}

impl TestUpstream {
    async fn start(mode: Mode) -> TestUpstream {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind the test upstream");
        let address = socket.local_addr().expect("test upstream address");
        let log = Arc::new(UpstreamLog::default());
        let task_log = Arc::clone(&log);
        // A server loop, not a test wait: it is aborted when the upstream is dropped.
        let task = tokio::spawn(async move {
            let mut buffer = vec![0_u8; DATAGRAM_BYTES_MAX];
            loop {
                let (length, source) = socket.recv_from(&mut buffer).await.expect("test upstream receive");
                task_log.datagrams.lock().unwrap().push((source, buffer[..length].to_vec()));
                task_log.received.fetch_add(1, Ordering::SeqCst);
                if mode == Mode::Echo {
                    let sent = socket.send_to(&buffer[..length], source).await.expect("test upstream echo");
                    assert_eq!(sent, length);
                    task_log.echoed.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        TestUpstream { address, mode, log, task }
    }

    fn received(&self) -> u64 {
        self.log.received.load(Ordering::SeqCst)
    }

    fn payloads(&self) -> Vec<Vec<u8>> {
        self.log.datagrams.lock().unwrap().iter().map(|(_, payload)| payload.clone()).collect()
    }

    /// Distinct source addresses in the order they first appeared.
    fn sources(&self) -> Vec<SocketAddr> {
        let mut sources = Vec::new();
        for (source, _) in self.log.datagrams.lock().unwrap().iter() {
            if !sources.contains(source) {
                sources.push(*source);
            }
        }
        sources
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct TestClient {
    socket: UdpSocket,
    proxy: SocketAddr,
    sent: u64,
    received: Vec<Vec<u8>>,
}

impl TestClient {
    async fn bind(proxy: SocketAddr) -> TestClient {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind a test client");
        TestClient { socket, proxy, sent: 0, received: Vec::new() }
    }

    fn address(&self) -> SocketAddr {
        self.socket.local_addr().expect("test client address")
    }

    async fn send(&mut self, payload: &[u8]) {
        let sent = self.socket.send_to(payload, self.proxy).await.expect("test client send");
        assert_eq!(sent, payload.len());
        self.sent += 1;
    }
}

/// `[client_id] ++ index as big-endian u64`.
fn numbered(client_id: u8, index: u64) -> Vec<u8> {
    let mut payload = vec![client_id];
    payload.extend_from_slice(&index.to_be_bytes());
    payload
}

fn parse_numbered(payload: &[u8]) -> (u8, u64) {
    assert_eq!(payload.len(), 9, "a numbered payload is 9 bytes: {payload:?}");
    (payload[0], u64::from_be_bytes(payload[1..].try_into().unwrap()))
}

/// How many times each payload appears.
fn counts(payloads: &[Vec<u8>]) -> BTreeMap<Vec<u8>, usize> {
    let mut counts = BTreeMap::new();
    for payload in payloads {
        *counts.entry(payload.clone()).or_insert(0) += 1;
    }
    counts
}

fn exactly_once(payloads: impl IntoIterator<Item = Vec<u8>>) -> BTreeMap<Vec<u8>, usize> {
    payloads.into_iter().map(|payload| (payload, 1)).collect()
}

/// Everything `settle` compares; equal snapshots twice in a row with nothing in flight end the wait.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Snapshot {
    stats: ChaosStats,
    upstream_echoed: u64,
    upstream_received: u64,
    upstreams_idle: bool,
    client_sent: u64,
    client_received: u64,
}

impl Snapshot {
    /// Reads the proxy first and the upstreams after it, echoed before received: a datagram moving
    /// while the snapshot is taken then shows up as unbalanced instead of being missed.
    fn take(proxy: &ChaosProxy, upstreams: &[&TestUpstream], clients: &[&mut TestClient]) -> Snapshot {
        let stats = proxy.stats();
        let upstream_echoed =
            upstreams.iter().map(|upstream| upstream.log.echoed.load(Ordering::SeqCst)).sum();
        let upstream_received = upstreams.iter().map(|upstream| upstream.received()).sum();
        let upstreams_idle = upstreams.iter().all(|upstream| {
            upstream.mode == Mode::Sink || upstream.log.echoed.load(Ordering::SeqCst) == upstream.received()
        });
        Snapshot {
            stats,
            upstream_echoed,
            upstream_received,
            upstreams_idle,
            client_sent: clients.iter().map(|client| client.sent).sum(),
            client_received: clients.iter().map(|client| client.received.len() as u64).sum(),
        }
    }

    /// True when nothing waits in the proxy (every datagram that entered it is forwarded, dropped or
    /// blackholed), nothing waits in a socket (every forwarded copy was read) and no echo is pending.
    fn is_quiescent(&self) -> bool {
        let stats = self.stats;
        stats.forwarded + stats.dropped + stats.blackholed
            == self.client_sent + self.upstream_echoed + stats.duplicated
            && stats.forwarded == self.upstream_received + self.client_received
            && self.upstreams_idle
    }
}

/// Receives on every client until nothing is in flight anywhere, and returns the proxy's stats.
async fn settle(
    proxy: &ChaosProxy,
    upstreams: &[&TestUpstream],
    clients: &mut [&mut TestClient],
) -> ChaosStats {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut buffer = vec![0_u8; DATAGRAM_BYTES_MAX];
    let mut previous = None;
    loop {
        let mut received_any = false;
        for client in clients.iter_mut() {
            while let Ok(result) = timeout(RECEIVE_POLL, client.socket.recv_from(&mut buffer)).await {
                let (length, source) = result.expect("test client receive");
                assert_eq!(source, client.proxy, "clients hear only from the proxy");
                client.received.push(buffer[..length].to_vec());
                received_any = true;
                assert!(Instant::now() < deadline, "traffic did not stop within {SETTLE_TIMEOUT:?}");
            }
        }
        let snapshot = Snapshot::take(proxy, upstreams, clients);
        if !received_any && snapshot.is_quiescent() && previous.as_ref() == Some(&snapshot) {
            return snapshot.stats;
        }
        assert!(
            Instant::now() < deadline,
            "the network did not settle within {SETTLE_TIMEOUT:?}: {snapshot:?}"
        );
        previous = Some(snapshot);
    }
}

/// Sends `numbered(client_id, index)` for every index from `clients[sender]`, settling after each
/// batch. `clients` lists every client of the proxy, since `settle` accounts for all of them.
async fn send_numbered(
    proxy: &ChaosProxy,
    upstreams: &[&TestUpstream],
    clients: &mut [&mut TestClient],
    sender: usize,
    client_id: u8,
    indices: std::ops::Range<u64>,
) -> ChaosStats {
    let mut stats = proxy.stats();
    let mut unsettled = 0;
    for index in indices {
        clients[sender].send(&numbered(client_id, index)).await;
        unsettled += 1;
        if unsettled == BATCH_DATAGRAMS {
            stats = settle(proxy, upstreams, clients).await;
            unsettled = 0;
        }
    }
    if unsettled > 0 {
        stats = settle(proxy, upstreams, clients).await;
    }
    stats
}

async fn start_proxy(upstream: &TestUpstream, config: ChaosConfig) -> ChaosProxy {
    ChaosProxy::start(upstream.address, config).await.expect("start the chaos proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_config_forwards_every_datagram_both_ways() {
    let upstream = TestUpstream::start(Mode::Echo).await;
    let proxy = start_proxy(&upstream, ChaosConfig::clean(1)).await;
    let mut client = TestClient::bind(proxy.local_addr()).await;

    let stats = send_numbered(&proxy, &[&upstream], &mut [&mut client], 0, 1, 0..200).await;

    let sent = exactly_once((0..200).map(|index| numbered(1, index)));
    assert_eq!(counts(&upstream.payloads()), sent);
    assert_eq!(counts(&client.received), sent);
    assert_eq!(stats, ChaosStats { forwarded: 400, ..ChaosStats::default() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_udp_payload_passes_intact_both_ways() {
    let upstream = TestUpstream::start(Mode::Echo).await;
    let proxy = start_proxy(&upstream, ChaosConfig::clean(2)).await;
    let mut client = TestClient::bind(proxy.local_addr()).await;
    let payload: Vec<u8> = (0..UDP_PAYLOAD_BYTES_MAX).map(|index| (index % 251) as u8).collect();

    client.send(&payload).await;
    let stats = settle(&proxy, &[&upstream], &mut [&mut client]).await;

    assert_eq!(upstream.payloads(), vec![payload.clone()]);
    assert_eq!(client.received, vec![payload]);
    assert_eq!(stats, ChaosStats { forwarded: 2, ..ChaosStats::default() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_config_drops_about_the_configured_fraction_in_both_directions() {
    let upstream = TestUpstream::start(Mode::Echo).await;
    let proxy = start_proxy(&upstream, ChaosConfig::lossy(3, 0.3)).await;
    let mut client = TestClient::bind(proxy.local_addr()).await;

    let stats = send_numbered(&proxy, &[&upstream], &mut [&mut client], 0, 1, 0..2000).await;

    // Every datagram that entered the proxy, from the client or echoed by the upstream, is accounted.
    let upstream_received = upstream.received();
    let entered = client.sent + upstream_received;
    let client_received = client.received.len() as u64;
    assert_eq!(stats.forwarded + stats.dropped + stats.blackholed, entered + stats.duplicated);
    assert_eq!(stats.forwarded, upstream_received + client_received);
    assert_eq!(stats.blackholed, 0);
    let loss_fraction = stats.dropped as f64 / entered as f64;
    assert!((0.15..=0.45).contains(&loss_fraction), "loss fraction {loss_fraction} for {stats:?}");
    // Loss happens on the way up and on the way back (1% duplication cannot make up 30% loss).
    assert!(upstream_received < client.sent, "{upstream_received} of {} reached the upstream", client.sent);
    assert!(client_received < upstream_received, "{client_received} of {upstream_received} came back");
    assert!(stats.duplicated > 0 && stats.reordered > 0, "{stats:?}");
    // Nothing arrives that was not sent.
    for payload in upstream.payloads().iter().chain(&client.received) {
        let (client_id, index) = parse_numbered(payload);
        assert!(client_id == 1 && index < 2000, "unexpected payload {payload:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_makes_the_same_decisions_for_the_same_datagrams() {
    async fn surviving_indices(seed: u64) -> BTreeSet<u64> {
        let sink = TestUpstream::start(Mode::Sink).await;
        let proxy = start_proxy(&sink, ChaosConfig { loss: 0.5, ..ChaosConfig::clean(seed) }).await;
        let mut client = TestClient::bind(proxy.local_addr()).await;
        let stats = send_numbered(&proxy, &[&sink], &mut [&mut client], 0, 1, 0..400).await;
        assert_eq!(stats.forwarded + stats.dropped, 400, "{stats:?}");
        sink.payloads().iter().map(|payload| parse_numbered(payload).1).collect()
    }

    let first = surviving_indices(7).await;
    let second = surviving_indices(7).await;
    let other_seed = surviving_indices(8).await;

    assert_eq!(first, second);
    assert_ne!(first, other_seed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_probability_one_doubles_every_datagram_in_each_direction() {
    let upstream = TestUpstream::start(Mode::Echo).await;
    let proxy = start_proxy(&upstream, ChaosConfig { duplicate: 1.0, ..ChaosConfig::clean(4) }).await;
    let mut client = TestClient::bind(proxy.local_addr()).await;

    let stats = send_numbered(&proxy, &[&upstream], &mut [&mut client], 0, 1, 0..50).await;

    // Doubled on the way up, and each of those echoes doubled again on the way back.
    let sent = (0..50).map(|index| numbered(1, index));
    assert_eq!(counts(&upstream.payloads()), sent.clone().map(|payload| (payload, 2)).collect());
    assert_eq!(counts(&client.received), sent.map(|payload| (payload, 4)).collect());
    assert_eq!(stats, ChaosStats { forwarded: 300, duplicated: 150, ..ChaosStats::default() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_drops_everything_while_on_and_traffic_resumes_when_off() {
    let upstream = TestUpstream::start(Mode::Echo).await;
    let proxy = start_proxy(&upstream, ChaosConfig::clean(5)).await;
    let mut client = TestClient::bind(proxy.local_addr()).await;

    proxy.set_blackhole(true);
    let stats = send_numbered(&proxy, &[&upstream], &mut [&mut client], 0, 1, 0..20).await;
    assert_eq!(upstream.received(), 0);
    assert!(client.received.is_empty());
    assert_eq!(stats, ChaosStats { blackholed: 20, ..ChaosStats::default() });

    proxy.set_blackhole(false);
    let stats = send_numbered(&proxy, &[&upstream], &mut [&mut client], 0, 1, 20..40).await;
    let resumed = exactly_once((20..40).map(|index| numbered(1, index)));
    assert_eq!(counts(&upstream.payloads()), resumed);
    assert_eq!(counts(&client.received), resumed);
    assert_eq!(stats, ChaosStats { forwarded: 40, blackholed: 20, ..ChaosStats::default() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_blackhole_cuts_only_that_client_both_ways_until_lifted() {
    let upstream = TestUpstream::start(Mode::Echo).await;
    let proxy = start_proxy(&upstream, ChaosConfig::clean(7)).await;
    let mut cut = TestClient::bind(proxy.local_addr()).await;
    let mut other = TestClient::bind(proxy.local_addr()).await;

    proxy.set_client_blackhole(cut.address(), true);
    let stats = send_numbered(&proxy, &[&upstream], &mut [&mut cut, &mut other], 0, 1, 0..20).await;
    assert_eq!(upstream.received(), 0);
    assert_eq!(stats, ChaosStats { blackholed: 20, ..ChaosStats::default() });
    let stats = send_numbered(&proxy, &[&upstream], &mut [&mut cut, &mut other], 1, 2, 0..20).await;
    let from_other = exactly_once((0..20).map(|index| numbered(2, index)));
    assert_eq!(counts(&upstream.payloads()), from_other);
    assert_eq!(counts(&other.received), from_other);
    assert!(cut.received.is_empty());
    assert_eq!(stats, ChaosStats { forwarded: 40, blackholed: 20, ..ChaosStats::default() });

    proxy.set_client_blackhole(cut.address(), false);
    let stats = send_numbered(&proxy, &[&upstream], &mut [&mut cut, &mut other], 0, 1, 20..40).await;
    let resumed = exactly_once((20..40).map(|index| numbered(1, index)));
    assert_eq!(counts(&cut.received), resumed);
    assert_eq!(stats, ChaosStats { forwarded: 80, blackholed: 20, ..ChaosStats::default() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorder_delivers_out_of_order_but_delivers_everything() {
    let upstream = TestUpstream::start(Mode::Echo).await;
    let proxy = start_proxy(&upstream, ChaosConfig { reorder: 0.5, ..ChaosConfig::clean(6) }).await;
    let mut client = TestClient::bind(proxy.local_addr()).await;

    let stats = send_numbered(&proxy, &[&upstream], &mut [&mut client], 0, 1, 0..500).await;

    let sent = exactly_once((0..500).map(|index| numbered(1, index)));
    assert_eq!(counts(&upstream.payloads()), sent);
    assert_eq!(counts(&client.received), sent);
    let indices: Vec<u64> = client.received.iter().map(|payload| parse_numbered(payload).1).collect();
    let inversions = indices.windows(2).filter(|pair| pair[0] > pair[1]).count();
    assert!(inversions > 0, "no datagram arrived out of order: {indices:?}");
    assert!(stats.reordered > 0, "{stats:?}");
    assert_eq!(stats, ChaosStats { forwarded: 1000, reordered: stats.reordered, ..ChaosStats::default() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_datagram_limit_zero_sends_everything_immediately_and_in_order() {
    let upstream = TestUpstream::start(Mode::Echo).await;
    let config = ChaosConfig { reorder: 1.0, delay_ms: (50, 50), ..ChaosConfig::clean(7) };
    let limits = ChaosLimits { held_datagrams_max: 0, ..ChaosLimits::default() };
    let proxy =
        ChaosProxy::start_with_limits(upstream.address, config, limits).await.expect("start the chaos proxy");
    let mut client = TestClient::bind(proxy.local_addr()).await;

    let stats = send_numbered(&proxy, &[&upstream], &mut [&mut client], 0, 1, 0..100).await;

    // Each hop is a single task reading one socket in order, so nothing held means nothing reordered.
    let sent: Vec<Vec<u8>> = (0..100).map(|index| numbered(1, index)).collect();
    assert_eq!(upstream.payloads(), sent);
    assert_eq!(client.received, sent);
    assert_eq!(stats, ChaosStats { forwarded: 200, ..ChaosStats::default() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_get_separate_mappings_and_only_their_own_replies() {
    let upstream = TestUpstream::start(Mode::Echo).await;
    let proxy = start_proxy(&upstream, ChaosConfig::clean(8)).await;
    let mut first = TestClient::bind(proxy.local_addr()).await;
    let mut second = TestClient::bind(proxy.local_addr()).await;

    for batch in 0..4 {
        for index in batch * 25..(batch + 1) * 25 {
            first.send(&numbered(1, index)).await;
            second.send(&numbered(2, index)).await;
        }
        settle(&proxy, &[&upstream], &mut [&mut first, &mut second]).await;
    }

    assert_eq!(counts(&first.received), exactly_once((0..100).map(|index| numbered(1, index))));
    assert_eq!(counts(&second.received), exactly_once((0..100).map(|index| numbered(2, index))));
    // The upstream sees two peers, and they are the proxy's mapping sockets, not the clients.
    let sources = upstream.sources();
    assert_eq!(sources.len(), 2, "{sources:?}");
    for source in sources {
        assert!(source.ip().is_loopback());
        assert!(![first.address(), second.address(), proxy.local_addr()].contains(&source), "{source}");
    }
    assert_eq!(proxy.stats(), ChaosStats { forwarded: 400, ..ChaosStats::default() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_upstream_moves_existing_and_new_mappings() {
    let old_upstream = TestUpstream::start(Mode::Echo).await;
    let new_upstream = TestUpstream::start(Mode::Echo).await;
    let upstreams = [&old_upstream, &new_upstream];
    let proxy = start_proxy(&old_upstream, ChaosConfig::clean(9)).await;
    let mut existing = TestClient::bind(proxy.local_addr()).await;

    let mut newcomer = TestClient::bind(proxy.local_addr()).await;

    send_numbered(&proxy, &upstreams, &mut [&mut existing, &mut newcomer], 0, 1, 0..20).await;
    proxy.set_upstream(new_upstream.address);
    send_numbered(&proxy, &upstreams, &mut [&mut existing, &mut newcomer], 0, 1, 20..40).await;
    send_numbered(&proxy, &upstreams, &mut [&mut existing, &mut newcomer], 1, 2, 0..20).await;

    assert_eq!(counts(&old_upstream.payloads()), exactly_once((0..20).map(|index| numbered(1, index))));
    assert_eq!(
        counts(&new_upstream.payloads()),
        exactly_once((20..40).map(|index| numbered(1, index)).chain((0..20).map(|index| numbered(2, index))))
    );
    assert_eq!(counts(&existing.received), exactly_once((0..40).map(|index| numbered(1, index))));
    assert_eq!(counts(&newcomer.received), exactly_once((0..20).map(|index| numbered(2, index))));
    // The existing client kept its mapping socket across the move.
    assert_eq!(old_upstream.sources().first(), new_upstream.sources().first());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mapping_table_evicts_the_least_recently_active_client() {
    let upstream = TestUpstream::start(Mode::Echo).await;
    let limits = ChaosLimits { client_mappings_max: 2, ..ChaosLimits::default() };
    let proxy = ChaosProxy::start_with_limits(upstream.address, ChaosConfig::clean(10), limits)
        .await
        .expect("start the chaos proxy");
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(TestClient::bind(proxy.local_addr()).await);
    }

    // Each step: (client that sends, distinct upstream-facing sources seen so far).
    let steps = [
        (0, 1), // a new mapping for client 0
        (1, 2), // a new mapping for client 1; the table is full
        (2, 3), // client 2 evicts client 0, the least recently active
        (0, 4), // client 0 comes back through a new mapping and evicts client 1
        (2, 4), // client 2 was more recent than client 1, so it kept its mapping
        (1, 5), // client 1 was evicted, so it gets a new mapping
    ];
    for (step, (sender, sources_expected)) in steps.into_iter().enumerate() {
        let mut all_clients: Vec<&mut TestClient> = clients.iter_mut().collect();
        let index = step as u64;
        send_numbered(&proxy, &[&upstream], &mut all_clients, sender, sender as u8, index..index + 1).await;
        assert_eq!(upstream.sources().len(), sources_expected, "after step {step}");
        let reply = clients[sender].received.last().cloned();
        assert_eq!(reply, Some(numbered(sender as u8, step as u64)), "reply at step {step}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_upstreams_off_the_ipv4_loopback() {
    async fn check(upstream: &str, refused_expected: bool) {
        let upstream: SocketAddr = upstream.parse().unwrap();
        let started = tokio::spawn(ChaosProxy::start(upstream, ChaosConfig::clean(11))).await;
        match started {
            Ok(proxy) => {
                assert!(!refused_expected, "{upstream} was accepted");
                proxy.expect("start the chaos proxy");
            }
            Err(error) => {
                assert!(refused_expected, "{upstream} was refused: {error}");
                let message = error.into_panic().downcast::<String>().expect("a formatted panic message");
                assert!(message.contains("is not an IPv4 loopback address"), "{message}");
            }
        }
    }

    check("127.0.0.1:9", false).await;
    check("127.0.0.2:9", false).await;
    check("192.0.2.1:9", true).await;
    check("10.0.0.1:9", true).await;
    check("0.0.0.0:9", true).await;
    check("[::1]:9", true).await;
    check("127.0.0.1:0", true).await;
}
