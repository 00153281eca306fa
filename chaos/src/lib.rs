//! A seeded UDP chaos proxy: it sits between QUIC clients (appliances) and one upstream (the core
//! sink), all on 127.0.0.1, and drops, duplicates, delays and reorders datagrams in both directions,
//! so end-to-end tests can prove exactly-once delivery through a lossy network, and `tributary demo
//! --fault drop-network|fill-ring` can cut the network of every appliance or of one.
//!
//! Layout:
//!
//! ```text
//!  client A ─┐                          ┌─ mapping socket for A ─┐
//!            ├──► client socket ──chaos─┤                        ├──► upstream
//!  client B ─┘   (local_addr)           └─ mapping socket for B ─┘
//!            ◄── client socket ◄──chaos── replies read from the mapping sockets
//! ```
//!
//! Every distinct client source address gets its own upstream-facing "mapping" socket, like a NAT, so
//! the upstream sees one peer per client and many QUIC clients can share one proxy. Each datagram, in
//! either direction, gets one decision drawn from a seeded random number generator:
//!
//! 1. While the blackhole is on, for everyone or for this datagram's client
//!    (`set_client_blackhole`), it is dropped and counted as `blackholed` (no random draw).
//! 2. Otherwise exactly five numbers are drawn (loss, duplicate, reorder, delay, hold), whatever the
//!    configuration, so the decision stream depends only on the seed and the sequence of datagrams.
//! 3. Lost datagrams are counted as `dropped`. Survivors are sent once, or twice (`duplicated`).
//! 4. A reordered datagram is held back (`reordered`) until the next datagram on the same path (same
//!    client, same direction) has been sent, or for 1..=`REORDER_HOLD_MS_MAX` ms if none comes first.
//! 5. Every other datagram waits its uniform delay from `delay_ms`, then goes out.
//!
//! Accounting: every datagram that reaches the proxy ends in exactly one of `dropped` or `blackholed`,
//! or becomes one or two copies, each of which ends in `forwarded`, `dropped` (socket error) or
//! `blackholed` (the blackhole went on while it waited). Once nothing is waiting inside the proxy:
//! `forwarded + dropped + blackholed == datagrams received + duplicated`.
//!
//! Determinism: datagrams towards the upstream and towards the clients draw from two generators, both
//! seeded from `ChaosConfig::seed` (and reseeded by `set_config`). All client-bound traffic shares the
//! one client-bound generator, so decisions are reproducible for a given arrival order; with a single
//! client sending, the upstream-bound decisions depend only on what it sends.
//!
//! Limits:
//! - `CLIENT_MAPPINGS_MAX` = 4096 client mappings; beyond that the least recently active is evicted
//!   (its socket closes, so its client looks migrated to the upstream, as after a NAT rebinding).
//! - `HELD_DATAGRAMS_MAX` = 8192 datagrams waiting for a delay or a reorder at once; beyond that
//!   datagrams are sent immediately, without delay or reorder.
//! - `DATAGRAM_BYTES_MAX` = 65535 bytes per datagram (above the IPv4 UDP payload maximum of 65507, so
//!   nothing is ever truncated).
//! - `DELAY_MS_MAX` = 10000 ms configured delay, `REORDER_HOLD_MS_MAX` = 10 ms hold for a reordered
//!   datagram that no later datagram overtakes.
//!
//! The upstream must be an IPv4 loopback address and every socket binds 127.0.0.1: tests never send
//! traffic off the machine. Socket errors are printed with `eprintln!` and never panic; the proxy runs
//! on the current tokio runtime until it is dropped, and dropping it aborts every task it started.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};

/// Client mappings kept at once; the least recently active is evicted to make room.
pub const CLIENT_MAPPINGS_MAX: usize = 4096;
/// Datagrams waiting for a delay or a reorder at once; beyond that datagrams go out immediately.
pub const HELD_DATAGRAMS_MAX: usize = 8192;
/// Largest datagram read or written, in bytes.
pub const DATAGRAM_BYTES_MAX: usize = 65535;
/// Largest configurable delay, so a typo cannot park datagrams (and a test) for hours.
pub const DELAY_MS_MAX: u64 = 10_000;
/// Longest a reordered datagram waits for a later datagram on its path to overtake it.
pub const REORDER_HOLD_MS_MAX: u64 = 10;
/// Due datagrams the scheduler takes per lock, so senders are not starved while it drains a backlog.
const SCHEDULER_BATCH_MAX: usize = 64;
/// Pause after a failed receive, so a persistent socket error logs and retries instead of spinning.
const RECEIVE_ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Salt for the client-bound generator, so the two directions do not make identical decisions.
const CLIENT_BOUND_SEED_SALT: u64 = 0x9E37_79B9_7F4A_7C15;

// The largest IPv4 UDP payload (65535 - 20 byte IP header - 8 byte UDP header) fits the buffer.
const _: () = assert!(DATAGRAM_BYTES_MAX >= 65_507);
// Every path (two per mapping) can hold one reordered datagram even with every mapping in use.
const _: () = assert!(HELD_DATAGRAMS_MAX >= 2 * CLIENT_MAPPINGS_MAX);
const _: () = assert!(REORDER_HOLD_MS_MAX >= 1 && REORDER_HOLD_MS_MAX <= DELAY_MS_MAX);

/// What the network does to each datagram. Probabilities apply independently in each direction.
#[derive(Clone, Debug)]
pub struct ChaosConfig {
    pub seed: u64,
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a surviving datagram is sent twice.
    pub duplicate: f64,
    /// Probability that a surviving datagram is held back until the next one on its path went out
    /// (or for 1..=`REORDER_HOLD_MS_MAX` ms if no next one comes).
    pub reorder: f64,
    /// Uniform extra latency range in milliseconds, inclusive, for every datagram; (0, 0) means none.
    pub delay_ms: (u64, u64),
}

impl ChaosConfig {
    /// A perfect network: nothing lost, duplicated, reordered or delayed.
    pub fn clean(seed: u64) -> ChaosConfig {
        ChaosConfig { seed, loss: 0.0, duplicate: 0.0, reorder: 0.0, delay_ms: (0, 0) }
    }

    /// A bad but plausible network: the given loss plus 5% reordering, 1% duplication and 0..=2 ms of
    /// jitter, which also reorders datagrams sent less than 2 ms apart.
    pub fn lossy(seed: u64, loss: f64) -> ChaosConfig {
        ChaosConfig { seed, loss, duplicate: 0.01, reorder: 0.05, delay_ms: (0, 2) }
    }

    fn assert_valid(&self) {
        for (name, probability) in
            [("loss", self.loss), ("duplicate", self.duplicate), ("reorder", self.reorder)]
        {
            assert!(
                (0.0..=1.0).contains(&probability),
                "chaos config {name} probability {probability} is outside 0.0..=1.0"
            );
        }
        let (delay_ms_min, delay_ms_max) = self.delay_ms;
        assert!(
            delay_ms_min <= delay_ms_max && delay_ms_max <= DELAY_MS_MAX,
            "chaos config delay_ms {:?} must be an ascending range within 0..={DELAY_MS_MAX}",
            self.delay_ms
        );
    }
}

/// Counters since the proxy started, both directions together. See the module comment for how they
/// add up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChaosStats {
    /// Copies written to a socket (a duplicated datagram counts twice).
    pub forwarded: u64,
    /// Datagrams lost by chance, plus copies whose send failed.
    pub dropped: u64,
    /// Datagrams that got a second copy.
    pub duplicated: u64,
    /// Datagrams held back to be overtaken.
    pub reordered: u64,
    /// Datagrams and copies dropped because the blackhole was on.
    pub blackholed: u64,
}

/// Bounds of one proxy; `Default` gives the documented maxima. Tests of the proxy itself shrink them
/// to reach eviction and overflow with a handful of datagrams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChaosLimits {
    pub client_mappings_max: usize,
    pub held_datagrams_max: usize,
}

impl Default for ChaosLimits {
    fn default() -> ChaosLimits {
        ChaosLimits { client_mappings_max: CLIENT_MAPPINGS_MAX, held_datagrams_max: HELD_DATAGRAMS_MAX }
    }
}

/// A running chaos proxy; see the module comment.
pub struct ChaosProxy {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    client_task: JoinHandle<()>,
    scheduler_task: JoinHandle<()>,
}

impl ChaosProxy {
    /// Binds 127.0.0.1:0. Every distinct client source address gets its own upstream UDP socket (so many
    /// QUIC clients can share one proxy), and replies from upstream go back to that client. Both
    /// directions suffer the configured chaos. Runs on the current tokio runtime until dropped (Drop
    /// aborts its tasks).
    ///
    /// Panics if `upstream` is not an IPv4 loopback address with a port, or `config` is invalid.
    pub async fn start(upstream: SocketAddr, config: ChaosConfig) -> io::Result<ChaosProxy> {
        ChaosProxy::start_with_limits(upstream, config, ChaosLimits::default()).await
    }

    /// `start` with other bounds than the documented maxima.
    pub async fn start_with_limits(
        upstream: SocketAddr,
        config: ChaosConfig,
        limits: ChaosLimits,
    ) -> io::Result<ChaosProxy> {
        assert_loopback_upstream(upstream);
        config.assert_valid();
        assert!(
            (1..=CLIENT_MAPPINGS_MAX).contains(&limits.client_mappings_max),
            "chaos limits client_mappings_max {} is outside 1..={CLIENT_MAPPINGS_MAX}",
            limits.client_mappings_max
        );
        assert!(
            limits.held_datagrams_max <= HELD_DATAGRAMS_MAX,
            "chaos limits held_datagrams_max {} is above {HELD_DATAGRAMS_MAX}",
            limits.held_datagrams_max
        );

        let client_socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let local_addr = client_socket.local_addr()?;
        assert!(local_addr.ip().is_loopback());
        let shared = Arc::new(Shared {
            client_socket: Arc::new(client_socket),
            limits,
            chaos: Mutex::new(Chaos::new(config)),
            blackhole: AtomicBool::new(false),
            blackholed_clients: Mutex::new(HashSet::new()),
            upstream: Mutex::new(upstream),
            mappings: Mutex::new(Mappings { by_client: HashMap::new(), shut_down: false }),
            schedule: Mutex::new(Schedule { queue: BTreeMap::new(), held: HashMap::new(), sequence_next: 0 }),
            schedule_changed: Notify::new(),
            activity_tick: AtomicU64::new(0),
            stats: StatsCounters::default(),
        });
        let client_task = tokio::spawn(Arc::clone(&shared).run_client_socket());
        let scheduler_task = tokio::spawn(Arc::clone(&shared).run_scheduler());
        Ok(ChaosProxy { shared, local_addr, client_task, scheduler_task })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// While on, every datagram in both directions is dropped (counted as blackholed), including
    /// datagrams that were already waiting for a delay or a reorder.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// `set_blackhole` for one client only (by its source address as the proxy sees it, e.g.
    /// `127.0.0.1:<the client's local port>`): the other clients' traffic goes on. At most
    /// `CLIENT_MAPPINGS_MAX` clients can be cut at once; beyond that the call panics.
    pub fn set_client_blackhole(&self, client: SocketAddr, on: bool) {
        let mut cut = lock(&self.shared.blackholed_clients);
        if on {
            cut.insert(client);
            assert!(cut.len() <= CLIENT_MAPPINGS_MAX, "at most {CLIENT_MAPPINGS_MAX} clients can be cut");
        } else {
            cut.remove(&client);
        }
    }

    /// Replaces the chaos and reseeds both generators from `config.seed`, so the decisions after this
    /// call are reproducible on their own. Panics if `config` is invalid.
    pub fn set_config(&self, config: ChaosConfig) {
        config.assert_valid();
        *lock(&self.shared.chaos) = Chaos::new(config);
    }

    /// Points new and existing client mappings at another upstream (e.g. a restarted sink on a new
    /// port). Datagrams already waiting inside the proxy go to the new upstream too. Panics if
    /// `upstream` is not an IPv4 loopback address with a port.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        assert_loopback_upstream(upstream);
        *lock(&self.shared.upstream) = upstream;
    }

    pub fn stats(&self) -> ChaosStats {
        self.shared.stats.snapshot()
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.client_task.abort();
        self.scheduler_task.abort();
        // The client task may be between spawning a mapping task and inserting it (on another worker
        // thread); `shut_down` makes it abort that task itself instead of inserting it.
        let mut mappings = lock(&self.shared.mappings);
        mappings.shut_down = true;
        for (_, mapping) in mappings.by_client.drain() {
            mapping.task.abort();
        }
    }
}

fn assert_loopback_upstream(upstream: SocketAddr) {
    assert!(
        upstream.is_ipv4() && upstream.ip().is_loopback() && upstream.port() != 0,
        "chaos proxy upstream {upstream} is not an IPv4 loopback address with a port; \
         tests must never send traffic off the machine (use 127.0.0.1)"
    );
}

/// Locks a mutex whether or not another thread panicked while holding it: the guarded data is plain
/// counters and queues that stay consistent between statements, and a test support proxy should
/// keep forwarding so the test reports its own failure.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Direction {
    ToUpstream,
    ToClient,
}

/// One direction of one client's traffic; reordering happens within a path.
type PathKey = (SocketAddr, Direction);
/// Release time, then a sequence number so equal times keep arrival order.
type QueueKey = (Instant, u64);

struct Shared {
    client_socket: Arc<UdpSocket>,
    limits: ChaosLimits,
    chaos: Mutex<Chaos>,
    blackhole: AtomicBool,
    /// Clients whose traffic, both ways, is dropped as if the blackhole were on for them alone.
    blackholed_clients: Mutex<HashSet<SocketAddr>>,
    upstream: Mutex<SocketAddr>,
    mappings: Mutex<Mappings>,
    schedule: Mutex<Schedule>,
    /// Wakes the scheduler when an entry was queued (it may be due before the one it sleeps for).
    schedule_changed: Notify,
    /// Monotonic activity counter for least-recently-active eviction (a counter, not a clock, so
    /// ties and clock resolution do not matter).
    activity_tick: AtomicU64,
    stats: StatsCounters,
}

struct Chaos {
    config: ChaosConfig,
    upstream_bound: StdRng,
    client_bound: StdRng,
}

impl Chaos {
    fn new(config: ChaosConfig) -> Chaos {
        Chaos {
            upstream_bound: StdRng::seed_from_u64(config.seed),
            client_bound: StdRng::seed_from_u64(config.seed ^ CLIENT_BOUND_SEED_SALT),
            config,
        }
    }
}

struct Mappings {
    by_client: HashMap<SocketAddr, Mapping>,
    shut_down: bool,
}

struct Mapping {
    socket: Arc<UdpSocket>,
    last_active_tick: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

/// Datagrams waiting inside the proxy. Invariant: every value in `held` is a key of `queue` whose
/// entry has `held_path` equal to that key of `held`; `queue.len() <= held_datagrams_max`.
struct Schedule {
    queue: BTreeMap<QueueKey, Waiting>,
    held: HashMap<PathKey, QueueKey>,
    sequence_next: u64,
}

impl Schedule {
    fn insert(&mut self, release_at: Instant, waiting: Waiting) -> QueueKey {
        let key = (release_at, self.sequence_next);
        self.sequence_next += 1;
        let previous = self.queue.insert(key, waiting);
        assert!(previous.is_none(), "schedule sequence numbers are unique");
        key
    }

    /// Takes the datagram held on `path`, if any, so it can go out right after the current one.
    fn release_held(&mut self, path: PathKey) -> Option<Waiting> {
        let key = self.held.remove(&path)?;
        let mut waiting = self.queue.remove(&key).expect("every held datagram is queued");
        assert_eq!(waiting.held_path, Some(path));
        waiting.held_path = None;
        Some(waiting)
    }
}

struct Waiting {
    route: Route,
    payload: Vec<u8>,
    copies: u8,
    /// Set while the datagram is held for reordering, so releasing it early can find it.
    held_path: Option<PathKey>,
}

/// Where a datagram goes: the upstream is resolved when it is sent, so `set_upstream` also moves
/// datagrams that were waiting.
#[derive(Clone)]
struct Route {
    socket: Arc<UdpSocket>,
    destination: Destination,
    /// The client whose traffic this is, either way (for per-client blackholes).
    client: SocketAddr,
}

#[derive(Clone, Copy)]
enum Destination {
    Upstream,
    Client(SocketAddr),
}

enum Decision {
    Drop,
    Forward { copies: u8, delay_ms: u64, reorder_hold_ms: Option<u64> },
}

#[derive(Default)]
struct StatsCounters {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    blackholed: AtomicU64,
}

impl StatsCounters {
    fn snapshot(&self) -> ChaosStats {
        ChaosStats {
            forwarded: self.forwarded.load(Ordering::SeqCst),
            dropped: self.dropped.load(Ordering::SeqCst),
            duplicated: self.duplicated.load(Ordering::SeqCst),
            reordered: self.reordered.load(Ordering::SeqCst),
            blackholed: self.blackholed.load(Ordering::SeqCst),
        }
    }
}

fn increment(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::SeqCst);
}

impl Shared {
    /// Reads from clients and forwards upstream through each client's mapping.
    async fn run_client_socket(self: Arc<Self>) {
        let mut buffer = vec![0_u8; DATAGRAM_BYTES_MAX];
        loop {
            let (length, client) = match self.client_socket.recv_from(&mut buffer).await {
                Ok(received) => received,
                Err(error) => {
                    eprintln!("chaos proxy: failed to receive from clients: {error} (retrying)");
                    sleep(RECEIVE_ERROR_BACKOFF).await;
                    continue;
                }
            };
            let socket = match self.mapping_for(client).await {
                Ok(socket) => socket,
                Err(error) => {
                    eprintln!(
                        "chaos proxy: failed to bind an upstream socket for client {client}: {error} \
                         (datagram counted as dropped)"
                    );
                    increment(&self.stats.dropped);
                    continue;
                }
            };
            let route = Route { socket, destination: Destination::Upstream, client };
            self.handle((client, Direction::ToUpstream), &route, &buffer[..length]).await;
        }
    }

    /// Reads replies on one client's mapping socket and forwards them to that client.
    async fn run_mapping(
        self: Arc<Self>,
        client: SocketAddr,
        socket: Arc<UdpSocket>,
        last_active_tick: Arc<AtomicU64>,
    ) {
        let route = Route {
            socket: Arc::clone(&self.client_socket),
            destination: Destination::Client(client),
            client,
        };
        let mut buffer = vec![0_u8; DATAGRAM_BYTES_MAX];
        loop {
            let length = match socket.recv_from(&mut buffer).await {
                Ok((length, _source)) => length,
                Err(error) => {
                    eprintln!(
                        "chaos proxy: failed to receive from upstream for client {client}: {error} (retrying)"
                    );
                    sleep(RECEIVE_ERROR_BACKOFF).await;
                    continue;
                }
            };
            last_active_tick.store(self.next_activity_tick(), Ordering::SeqCst);
            self.handle((client, Direction::ToClient), &route, &buffer[..length]).await;
        }
    }

    fn is_blackholed(&self, client: SocketAddr) -> bool {
        self.blackhole.load(Ordering::SeqCst) || lock(&self.blackholed_clients).contains(&client)
    }

    fn next_activity_tick(&self) -> u64 {
        self.activity_tick.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The upstream-facing socket for `client`, created on first use; evicts the least recently
    /// active mapping when full.
    async fn mapping_for(self: &Arc<Self>, client: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        if let Some(mapping) = lock(&self.mappings).by_client.get(&client) {
            mapping.last_active_tick.store(self.next_activity_tick(), Ordering::SeqCst);
            return Ok(Arc::clone(&mapping.socket));
        }
        // Only this task creates mappings, so nobody else can insert `client` during the bind.
        let socket = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
        let last_active_tick = Arc::new(AtomicU64::new(self.next_activity_tick()));
        let task = tokio::spawn(Arc::clone(self).run_mapping(
            client,
            Arc::clone(&socket),
            Arc::clone(&last_active_tick),
        ));

        let mut mappings = lock(&self.mappings);
        if mappings.shut_down {
            task.abort();
            return Err(io::Error::other("the chaos proxy is shutting down"));
        }
        if mappings.by_client.len() >= self.limits.client_mappings_max {
            let oldest = mappings
                .by_client
                .iter()
                .min_by_key(|(_, mapping)| mapping.last_active_tick.load(Ordering::SeqCst))
                .map(|(address, _)| *address)
                .expect("a full mapping table is not empty");
            let evicted = mappings.by_client.remove(&oldest).expect("the oldest mapping exists");
            evicted.task.abort();
        }
        let previous = mappings
            .by_client
            .insert(client, Mapping { socket: Arc::clone(&socket), last_active_tick, task });
        assert!(previous.is_none(), "a client mapping is created once");
        assert!(mappings.by_client.len() <= self.limits.client_mappings_max);
        Ok(socket)
    }

    /// Draws the fate of one datagram; counts drops, blackholing and duplication.
    fn decide(&self, (client, direction): PathKey) -> Decision {
        if self.is_blackholed(client) {
            increment(&self.stats.blackholed);
            return Decision::Drop;
        }
        let mut chaos = lock(&self.chaos);
        let Chaos { config, upstream_bound, client_bound } = &mut *chaos;
        let rng = match direction {
            Direction::ToUpstream => upstream_bound,
            Direction::ToClient => client_bound,
        };
        // Always five draws, in this order, so each decision consumes the same amount of the stream.
        let loss_roll: f64 = rng.random();
        let duplicate_roll: f64 = rng.random();
        let reorder_roll: f64 = rng.random();
        let delay_roll: f64 = rng.random();
        let hold_roll: f64 = rng.random();

        if loss_roll < config.loss {
            increment(&self.stats.dropped);
            return Decision::Drop;
        }
        let copies = if duplicate_roll < config.duplicate {
            increment(&self.stats.duplicated);
            2
        } else {
            1
        };
        let (delay_ms_min, delay_ms_max) = config.delay_ms;
        let delay_ms = uniform_inclusive(delay_ms_min, delay_ms_max, delay_roll);
        let reorder_hold_ms =
            (reorder_roll < config.reorder).then(|| uniform_inclusive(1, REORDER_HOLD_MS_MAX, hold_roll));
        Decision::Forward { copies, delay_ms, reorder_hold_ms }
    }

    /// Applies the chaos to one datagram on `path` and sends, delays or holds it.
    async fn handle(&self, path: PathKey, route: &Route, payload: &[u8]) {
        let Decision::Forward { copies, delay_ms, reorder_hold_ms } = self.decide(path) else {
            return;
        };
        let now = Instant::now();
        let released = {
            let mut schedule = lock(&self.schedule);
            // Room is judged before the held datagram leaves the queue: it may go back in together
            // with this one.
            let has_room = schedule.queue.len() < self.limits.held_datagrams_max;
            let released = schedule.release_held(path);
            let waiting =
                |held_path| Waiting { route: route.clone(), payload: payload.to_vec(), copies, held_path };
            let queued = match (reorder_hold_ms, released) {
                (Some(hold_ms), None) if has_room => {
                    let key = schedule.insert(now + Duration::from_millis(hold_ms), waiting(Some(path)));
                    schedule.held.insert(path, key);
                    increment(&self.stats.reordered);
                    None
                }
                // A datagram already held on this path is released after this one, which therefore
                // overtakes it instead of being held itself.
                (_, released) if delay_ms > 0 && has_room => {
                    let release_at = now + Duration::from_millis(delay_ms);
                    schedule.insert(release_at, waiting(None));
                    if let Some(released) = released {
                        schedule.insert(release_at, released);
                    }
                    None
                }
                (_, released) => Some(released),
            };
            assert!(schedule.queue.len() <= self.limits.held_datagrams_max);
            match queued {
                None => {
                    drop(schedule);
                    self.schedule_changed.notify_one();
                    return;
                }
                Some(released) => released,
            }
        };
        self.transmit(route, payload, copies).await;
        if let Some(released) = released {
            self.transmit(&released.route, &released.payload, released.copies).await;
        }
    }

    /// Sends queued datagrams when they are due.
    async fn run_scheduler(self: Arc<Self>) {
        let mut due = Vec::with_capacity(SCHEDULER_BATCH_MAX);
        loop {
            let next_release_at = {
                let mut schedule = lock(&self.schedule);
                let now = Instant::now();
                while due.len() < SCHEDULER_BATCH_MAX {
                    let Some(entry) = schedule.queue.first_entry() else { break };
                    if entry.key().0 > now {
                        break;
                    }
                    let (key, waiting) = entry.remove_entry();
                    if let Some(path) = waiting.held_path {
                        let held_key = schedule.held.remove(&path);
                        assert_eq!(held_key, Some(key), "a held datagram is found through its path");
                    }
                    due.push(waiting);
                }
                schedule.queue.first_key_value().map(|((release_at, _), _)| *release_at)
            };
            if !due.is_empty() {
                for waiting in due.drain(..) {
                    self.transmit(&waiting.route, &waiting.payload, waiting.copies).await;
                }
                continue;
            }
            match next_release_at {
                Some(release_at) => {
                    tokio::select! {
                        () = sleep_until(release_at) => {}
                        () = self.schedule_changed.notified() => {}
                    }
                }
                None => self.schedule_changed.notified().await,
            }
        }
    }

    /// Writes `copies` copies of a datagram, unless the blackhole is on; never panics on socket errors.
    async fn transmit(&self, route: &Route, payload: &[u8], copies: u8) {
        for _ in 0..copies {
            if self.is_blackholed(route.client) {
                increment(&self.stats.blackholed);
                continue;
            }
            let destination = match route.destination {
                Destination::Upstream => *lock(&self.upstream),
                Destination::Client(client) => client,
            };
            match route.socket.send_to(payload, destination).await {
                Ok(length) if length == payload.len() => increment(&self.stats.forwarded),
                Ok(length) => {
                    eprintln!(
                        "chaos proxy: sent {length} of {} bytes to {destination} (datagram counted as dropped)",
                        payload.len()
                    );
                    increment(&self.stats.dropped);
                }
                Err(error) => {
                    eprintln!(
                        "chaos proxy: failed to send {} bytes to {destination}: {error} \
                         (datagram counted as dropped)",
                        payload.len()
                    );
                    increment(&self.stats.dropped);
                }
            }
        }
    }
}

/// Maps `roll` in [0, 1) uniformly onto `minimum..=maximum`.
fn uniform_inclusive(minimum: u64, maximum: u64, roll: f64) -> u64 {
    assert!(minimum <= maximum);
    assert!((0.0..1.0).contains(&roll));
    let span = maximum - minimum + 1;
    // The float product can round up to `span` for rolls just below 1; clamp back into range.
    (minimum + (span as f64 * roll) as u64).min(maximum)
}
