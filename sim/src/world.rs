//! The world: every simulated component, the event loop, fault injection, the heal phase and
//! the convergence test.
//!
//! One run: draw a [`Scenario`] from the seed, start the sink, the devices (each with its ring,
//! producer and uplink) and the hostile devices, schedule the first fault of each kind, then pop
//! events in virtual-time order until the run phase ends. At `run_us` the world heals: producers
//! stop, every fault stops, armed landing faults are disarmed, partitions end. The run then
//! continues until every honest device's ring is fully acked and every hostile device got its
//! close (convergence), or fails when that takes longer than `heal_max_us`. Last come the
//! invariants (`check`).
//!
//! Faults, each a Poisson process with a per-seed mean (or off): connection breaks, partitions,
//! power cuts, process restarts, ring recreations, backups and restores of rings, sink power
//! losses and restarts, armed landing faults (`landing::memory::Faults`), failing dictionary
//! stores; plus the sink's operator restarting a core that reports itself broken.
//!
//! Invariant violations found while running (an Ack for data that is not durable, an honest
//! session closed for a protocol violation, counters that disagree) stop the run at once with a
//! message; the trace then shows the events that led there.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use protocol::Lane;

use crate::device::{Device, Uplink};
use crate::hostile::Hostile;
use crate::link::{ConnId, Connection, Dir, LinkParams, Payload, Peer, StreamKey};
use crate::ring::Ledger;
use crate::rng::Rng;
use crate::scenario::Scenario;
use crate::sink::Sink;
use crate::time::{Clock, MICROS_PER_MS, Queue};
use crate::trace::Trace;
use crate::{Options, Report};

/// How often the heal phase looks for convergence.
const CONVERGENCE_POLL_US: u64 = 50 * MICROS_PER_MS;
/// After healing, a run that makes no progress (no ring trimmed, no hostile answered) for this
/// long is stuck: every wait in the system (backoff, timeouts, downtime, commit interval) is far
/// shorter. Failing here instead of at `HEAL_MAX_US` keeps stuck seeds cheap.
const HEAL_STALL_US: u64 = 30 * crate::time::MICROS_PER_S;

#[derive(Clone, Copy, Debug)]
pub enum Side {
    Device,
    Sink,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    ConnectionBreak,
    Partition,
    PowerCut,
    Restart,
    Recreate,
    SinkCrash,
    SinkRestart,
    LandingFault,
    DictionaryFault,
    Backup,
    RestoreBackup,
}

impl FaultKind {
    const ALL: [FaultKind; 11] = [
        FaultKind::ConnectionBreak,
        FaultKind::Partition,
        FaultKind::PowerCut,
        FaultKind::Restart,
        FaultKind::Recreate,
        FaultKind::SinkCrash,
        FaultKind::SinkRestart,
        FaultKind::LandingFault,
        FaultKind::DictionaryFault,
        FaultKind::Backup,
        FaultKind::RestoreBackup,
    ];
}

pub enum Event {
    Produce {
        device: usize,
    },
    RingSync {
        device: usize,
    },
    DeviceBoot {
        device: usize,
        boot: u64,
    },
    DeviceReconnect {
        device: usize,
        boot: u64,
    },
    DeviceConnected {
        device: usize,
        conn: ConnId,
    },
    DeviceConnectFailed {
        device: usize,
        conn: ConnId,
    },
    DeviceWake {
        device: usize,
        conn: ConnId,
    },
    DeviceRead {
        device: usize,
        conn: ConnId,
        lane: Lane,
        from_seq: u64,
        chunks_max: usize,
        bytes_max: usize,
    },
    DeviceWritten {
        device: usize,
        conn: ConnId,
        lane: Lane,
        bytes: usize,
    },
    DeviceAckDone {
        device: usize,
        boot: u64,
        conn: ConnId,
        lane: Lane,
        through: u64,
    },
    Deliver {
        conn: ConnId,
        dir: Dir,
        stream: StreamKey,
        payload: Payload,
    },
    /// One side learns that the connection is gone (`reason` says how).
    Learn {
        conn: ConnId,
        side: Side,
        reason: String,
    },
    SinkPump {
        conn: ConnId,
    },
    SinkHandOff {
        conn: ConnId,
        stream: u64,
    },
    SinkTimeout {
        conn: ConnId,
    },
    SinkDictionaryDone {
        conn: ConnId,
    },
    LanderStep {
        incarnation: u64,
    },
    LanderCommitCheck {
        incarnation: u64,
    },
    SinkStart {
        incarnation: u64,
    },
    SinkOperatorRestart {
        incarnation: u64,
    },
    HostileConnect {
        hostile: usize,
    },
    HostileConnected {
        hostile: usize,
        conn: ConnId,
    },
    HostileGiveUp {
        hostile: usize,
        conn: ConnId,
    },
    Fault(FaultKind),
    Heal,
    ConvergenceCheck,
}

/// Counts of what happened, for the report.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub power_cuts: u64,
    /// Chunks whose eviction a power cut undid (back in the ring, counters undone).
    pub evictions_undone: u64,
    pub restarts: u64,
    pub recreations: u64,
    pub restores: u64,
    pub partitions: u64,
    pub connection_breaks: u64,
    pub sink_crashes: u64,
    pub sink_restarts: u64,
    pub landing_faults_armed: u64,
    pub dictionary_faults: u64,
    pub connections: u64,
    pub honest_sessions_closed: BTreeMap<String, u64>,
}

pub struct World {
    pub seed: u64,
    pub rng: Rng,
    pub clock: Clock,
    pub queue: Queue<Event>,
    pub trace: Rc<RefCell<Trace>>,
    pub tracing: bool,
    /// The virtual time of the event being handled, for a failure report after a panic.
    now_probe: Rc<Cell<u64>>,
    pub scenario: Scenario,
    pub devices: Vec<Device>,
    pub hostiles: Vec<Hostile>,
    pub sink: Sink,
    pub connections: BTreeMap<ConnId, Connection>,
    next_conn: ConnId,
    pub ledger: Ledger,
    pub next_record: u64,
    pub healing: bool,
    pub converged: bool,
    /// When a ring last trimmed or a hostile device last got its answer.
    pub last_progress: u64,
    pub failure: Option<String>,
    pub tally: Tally,
    /// Per (device, ring id): the seq bases of each epoch that ring was bound in, from the grants
    /// seen (a ring restored from a backup may be bound again after another ring, with new bases).
    pub ring_bases: BTreeMap<(String, [u8; 16]), Vec<[u64; Lane::COUNT]>>,
    /// The unidirectional streams each hostile device opened on its current connection.
    pub hostile_streams: BTreeMap<usize, Vec<StreamKey>>,
}

impl World {
    pub fn new(seed: u64, options: &Options, trace: Rc<RefCell<Trace>>, now: Rc<Cell<u64>>) -> World {
        let mut rng = Rng::new(seed);
        let scenario = Scenario::draw(&mut rng, options.long);
        let tracing = trace.borrow().enabled;
        let sink = Sink::new(&scenario.sink);
        let devices = scenario
            .devices
            .iter()
            .enumerate()
            .map(|(index, params)| Device::new(index, params.clone(), &mut rng))
            .collect();
        let hostiles = scenario
            .hostiles
            .iter()
            .enumerate()
            .map(|(index, kind)| Hostile::new(index, *kind, &mut rng))
            .collect();
        World {
            seed,
            rng,
            clock: Clock::new(),
            queue: Queue::new(),
            trace,
            tracing,
            now_probe: now,
            scenario,
            devices,
            hostiles,
            sink,
            connections: BTreeMap::new(),
            next_conn: 1,
            ledger: Ledger::default(),
            next_record: 1,
            healing: false,
            converged: false,
            last_progress: 0,
            failure: None,
            tally: Tally::default(),
            ring_bases: BTreeMap::new(),
            hostile_streams: BTreeMap::new(),
        }
    }

    /// Records the first invariant violation; the loop stops after the current event.
    pub fn fail(&mut self, message: String) {
        trace!(self, "FAILURE: {message}");
        if self.failure.is_none() {
            self.failure = Some(message);
        }
    }

    pub fn now(&self) -> u64 {
        self.queue.now
    }

    pub fn describe(&self) -> String {
        let scenario = &self.scenario;
        let mut text = format!(
            "seed {}: {} devices, hostiles {:?}, run {} s, sink frame limit {}, permits {} B, commit every {:?} or {} B",
            self.seed,
            scenario.devices.len(),
            scenario.hostiles,
            crate::time::seconds(scenario.run_us),
            scenario.sink.session.frame_bytes_max,
            scenario.sink.permits_bytes,
            scenario.sink.landing.commit_interval,
            scenario.sink.landing.commit_bytes_max,
        );
        for device in &scenario.devices {
            text.push_str(&format!(
                "\n  {}: lanes {:?}, ring {} B ({:?}), policies {:?}, chunk every {:.1} ms, {} dictionaries",
                device.id,
                device.lanes,
                device.ring.capacity_bytes,
                device.ring.durability,
                device.ring.policies,
                device.produce_mean_us / 1000.0,
                device.dictionary_count
            ));
        }
        text.push_str(&format!("\n  faults: {:?}", scenario.faults));
        text
    }

    pub fn run(&mut self) -> Result<Report, String> {
        let description = self.describe();
        trace!(self, "{description}");
        self.sink_start_now();
        for device in 0..self.devices.len() {
            self.device_boot(device);
            let mean = self.devices[device].params.produce_mean_us;
            let first = self.rng.exponential_us(mean);
            self.queue.after(first, Event::Produce { device });
            if let crate::ring::Durability::Periodic { sync_interval_us } =
                self.devices[device].params.ring.durability
            {
                self.queue.after(sync_interval_us, Event::RingSync { device });
            }
        }
        for hostile in 0..self.hostiles.len() {
            let delay = self.rng.range(0, self.scenario.run_us / 2);
            self.queue.after(delay, Event::HostileConnect { hostile });
        }
        for kind in FaultKind::ALL {
            self.schedule_fault(kind);
        }
        let run_us = self.scenario.run_us;
        self.queue.at(run_us, Event::Heal);
        let deadline = run_us + self.scenario.heal_max_us;
        while let Some(event) = self.queue.pop() {
            if self.queue.now > deadline {
                return Err(format!(
                    "no convergence within {} s of healing:\n{}",
                    crate::time::seconds(self.scenario.heal_max_us),
                    self.convergence_report()
                ));
            }
            self.now_probe.set(self.queue.now);
            self.handle(event);
            if let Some(failure) = self.failure.take() {
                return Err(failure);
            }
            if self.converged {
                break;
            }
        }
        if !self.converged {
            return Err(format!(
                "the event queue ran dry before convergence:\n{}",
                self.convergence_report()
            ));
        }
        crate::check::final_checks(self)?;
        Ok(self.report())
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Produce { device } => self.produce(device),
            Event::RingSync { device } => self.ring_sync(device),
            Event::DeviceBoot { device, boot } => {
                if self.devices[device].boot == boot && !self.devices[device].up {
                    self.device_boot(device);
                }
            }
            Event::DeviceReconnect { device, boot } => self.device_reconnect(device, boot),
            Event::DeviceConnected { device, conn } => self.device_connected(device, conn),
            Event::DeviceConnectFailed { device, conn } => self.device_connect_failed(device, conn),
            Event::DeviceWake { device, conn } => self.device_wake(device, conn),
            Event::DeviceRead { device, conn, lane, from_seq, chunks_max, bytes_max } => {
                self.device_read(device, conn, lane, from_seq, chunks_max, bytes_max)
            }
            Event::DeviceWritten { device, conn, lane, bytes } => {
                self.device_written(device, conn, lane, bytes)
            }
            Event::DeviceAckDone { device, boot, conn, lane, through } => {
                self.device_ack_done(device, boot, conn, lane, through)
            }
            Event::Deliver { conn, dir, stream, payload } => self.deliver(conn, dir, stream, payload),
            Event::Learn { conn, side, reason } => self.learn(conn, side, reason),
            Event::SinkPump { conn } => self.sink_pump(conn),
            Event::SinkHandOff { conn, stream } => self.sink_hand_off(conn, stream),
            Event::SinkTimeout { conn } => self.sink_timeout(conn),
            Event::SinkDictionaryDone { conn } => self.sink_dictionary_done(conn),
            Event::LanderStep { incarnation } => self.lander_step(incarnation),
            Event::LanderCommitCheck { incarnation } => self.lander_commit_check(incarnation),
            Event::SinkStart { incarnation } => self.sink_start(incarnation),
            Event::SinkOperatorRestart { incarnation } => {
                if self.sink.incarnation == incarnation && self.sink.core.is_some() {
                    trace!(self, "sink: operator restarts the broken sink");
                    self.sink_stop(false);
                }
            }
            Event::HostileConnect { hostile } => self.hostile_connect(hostile),
            Event::HostileConnected { hostile, conn } => self.hostile_connected(hostile, conn),
            Event::HostileGiveUp { hostile, conn } => self.hostile_give_up(hostile, conn),
            Event::Fault(kind) => self.fault(kind),
            Event::Heal => self.heal(),
            Event::ConvergenceCheck => self.convergence_check(),
        }
    }

    // ---- connections ----

    pub fn new_connection(&mut self, peer: Peer, device_id: String) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        let params: LinkParams = self.scenario.link.draw(&mut self.rng);
        self.connections.insert(id, Connection::new(id, peer, device_id, params));
        self.tally.connections += 1;
        id
    }

    /// Writes `payload` on a stream of `conn`; returns when the link took it.
    pub fn send(&mut self, conn: ConnId, dir: Dir, stream: StreamKey, payload: Payload) -> u64 {
        let now = self.now();
        let Some(connection) = self.connections.get_mut(&conn) else { return now };
        let (taken_at, deliveries) = connection.send(&mut self.rng, now, dir, stream, payload);
        if connection.broken {
            // Bytes written into a connection whose routes are gone vanish.
            connection.fragments_in_flight -= deliveries.len();
            return taken_at;
        }
        for (at, payload) in deliveries {
            self.queue.at(at, Event::Deliver { conn, dir, stream, payload });
        }
        taken_at
    }

    fn deliver(&mut self, conn: ConnId, dir: Dir, stream: StreamKey, payload: Payload) {
        let Some(connection) = self.connections.get_mut(&conn) else { return };
        connection.fragments_in_flight -= 1;
        if connection.broken {
            return;
        }
        let peer = connection.peer;
        match dir {
            Dir::Up if connection.sink_open => self.sink_deliver(conn, stream, payload),
            Dir::Down if connection.device_open => match peer {
                Peer::Honest(device) => self.device_deliver(device, conn, payload),
                Peer::Hostile(hostile) => self.hostile_deliver(hostile, conn, payload),
            },
            _ => {}
        }
        self.forget_connection_if_done(conn);
    }

    /// The routes of `conn` are gone: nothing in flight arrives, and each side notices on its own
    /// time (an idle timeout, a failed write, a stateless reset).
    pub fn break_connection(&mut self, conn: ConnId, why: &str) {
        let device_detect = self.rng.range(0, self.scenario.link.device_detect_us_max);
        let sink_detect = self.rng.range(0, self.scenario.link.sink_detect_us_max);
        let Some(connection) = self.connections.get_mut(&conn) else { return };
        if connection.broken {
            return;
        }
        connection.broken = true;
        trace!(self, "conn#{conn}: broken ({why})");
        self.queue.after(
            device_detect,
            Event::Learn { conn, side: Side::Device, reason: format!("connection lost ({why})") },
        );
        self.queue.after(
            sink_detect,
            Event::Learn { conn, side: Side::Sink, reason: format!("connection lost ({why})") },
        );
    }

    /// One side closes `conn` (with a QUIC close frame): the other learns after one latency.
    pub fn close_connection(&mut self, conn: ConnId, by: Side, reason: String) {
        let delay = match self.connections.get_mut(&conn) {
            Some(connection) => connection.one_way_us(&mut self.rng),
            None => return,
        };
        let connection = self.connections.get_mut(&conn).expect("checked above");
        let other = match by {
            Side::Device => {
                connection.device_open = false;
                Side::Sink
            }
            Side::Sink => {
                connection.sink_open = false;
                Side::Device
            }
        };
        if !connection.broken {
            self.queue.after(delay, Event::Learn { conn, side: other, reason });
        }
        self.forget_connection_if_done(conn);
    }

    fn learn(&mut self, conn: ConnId, side: Side, reason: String) {
        let Some(connection) = self.connections.get(&conn) else { return };
        let peer = connection.peer;
        match side {
            Side::Device if connection.device_open => match peer {
                Peer::Honest(device) => self.device_connection_lost(device, conn, &reason),
                Peer::Hostile(hostile) => self.hostile_connection_lost(hostile, conn),
            },
            Side::Sink if connection.sink_open => self.sink_connection_lost(conn, &reason),
            _ => {}
        }
        if let Some(connection) = self.connections.get_mut(&conn) {
            match side {
                Side::Device => connection.device_open = false,
                Side::Sink => connection.sink_open = false,
            }
        }
        self.forget_connection_if_done(conn);
    }

    fn forget_connection_if_done(&mut self, conn: ConnId) {
        if let Some(connection) = self.connections.get(&conn)
            && !connection.device_open
            && !connection.sink_open
            && connection.fragments_in_flight == 0
            && !self.sink.conns.contains_key(&conn)
        {
            self.connections.remove(&conn);
        }
    }

    // ---- faults ----

    fn fault_mean(&self, kind: FaultKind) -> Option<f64> {
        let faults = &self.scenario.faults;
        match kind {
            FaultKind::ConnectionBreak => faults.connection_break_us,
            FaultKind::Partition => faults.partition_us,
            FaultKind::PowerCut => faults.power_cut_us,
            FaultKind::Restart => faults.restart_us,
            FaultKind::Recreate => faults.recreate_us,
            FaultKind::SinkCrash => faults.sink_crash_us,
            FaultKind::SinkRestart => faults.sink_restart_us,
            FaultKind::LandingFault => faults.landing_fault_us,
            FaultKind::DictionaryFault => faults.dictionary_fault_us,
            FaultKind::Backup => faults.restore_us.map(|mean| mean / 4.0),
            FaultKind::RestoreBackup => faults.restore_us,
        }
    }

    fn schedule_fault(&mut self, kind: FaultKind) {
        if let Some(mean) = self.fault_mean(kind) {
            let delay = self.rng.exponential_us(mean);
            self.queue.after(delay, Event::Fault(kind));
        }
    }

    fn fault(&mut self, kind: FaultKind) {
        if self.healing {
            return;
        }
        let devices = self.devices.len();
        match kind {
            FaultKind::ConnectionBreak => {
                let live: Vec<ConnId> = self
                    .connections
                    .values()
                    .filter(|connection| !connection.broken)
                    .map(|connection| connection.id)
                    .collect();
                if !live.is_empty() {
                    let conn = *self.rng.pick(&live);
                    self.tally.connection_breaks += 1;
                    self.break_connection(conn, "injected");
                }
            }
            FaultKind::Partition => {
                let device = self.rng.range_usize(0, devices - 1);
                let length = self.rng.range(1, self.scenario.faults.partition_length_us_max);
                self.tally.partitions += 1;
                self.partition(device, length);
            }
            FaultKind::PowerCut => {
                let device = self.rng.range_usize(0, devices - 1);
                self.tally.power_cuts += 1;
                self.power_cut(device);
            }
            FaultKind::Restart => {
                let device = self.rng.range_usize(0, devices - 1);
                self.tally.restarts += 1;
                self.restart(device);
            }
            FaultKind::Recreate => {
                let device = self.rng.range_usize(0, devices - 1);
                self.tally.recreations += 1;
                self.recreate(device);
            }
            FaultKind::SinkCrash => {
                if self.sink.core.is_some() {
                    self.tally.sink_crashes += 1;
                    trace!(self, "sink: POWER LOSS");
                    self.sink_stop(true);
                }
            }
            FaultKind::SinkRestart => {
                if self.sink.core.is_some() {
                    self.tally.sink_restarts += 1;
                    trace!(self, "sink: process restart");
                    self.sink_stop(false);
                }
            }
            FaultKind::LandingFault => {
                self.tally.landing_faults_armed += 1;
                self.arm_landing_faults();
            }
            FaultKind::Backup => {
                let device = self.rng.range_usize(0, devices - 1);
                self.take_backup(device);
            }
            FaultKind::RestoreBackup => {
                let device = self.rng.range_usize(0, devices - 1);
                if self.restore_backup(device) {
                    self.tally.restores += 1;
                }
            }
            FaultKind::DictionaryFault => {
                self.tally.dictionary_faults += 1;
                self.sink.dictionary_fault = true;
                trace!(self, "sink: the next dictionary store fails");
            }
        }
        self.schedule_fault(kind);
    }

    fn heal(&mut self) {
        trace!(self, "HEAL: producers stop, faults stop, partitions end");
        self.healing = true;
        self.last_progress = self.now();
        self.sink.disk.arm(landing::memory::Faults::default());
        self.sink.dictionary_fault = false;
        for device in 0..self.devices.len() {
            self.devices[device].partitioned_until = 0;
            self.devices[device].held = Default::default();
        }
        self.queue.after(CONVERGENCE_POLL_US, Event::ConvergenceCheck);
    }

    /// Every honest ring fully acked (but for chunks that can never be delivered), every hostile
    /// device answered.
    pub fn is_converged(&self) -> bool {
        self.devices.iter().all(|device| device.up && self.device_drained(device))
            && self.hostiles.iter().all(|hostile| hostile.done)
    }

    pub fn device_drained(&self, device: &Device) -> bool {
        Lane::ALL.iter().all(|lane| {
            let state = device.ring.lane(*lane);
            state
                .chunks
                .range(state.acked_through + 1..)
                .all(|(_, chunk)| self.ledger.chunks[chunk.ledger].undeliverable.is_some())
        })
    }

    fn convergence_check(&mut self) {
        if self.is_converged() {
            trace!(self, "CONVERGED");
            self.converged = true;
        } else if self.now() - self.last_progress > HEAL_STALL_US {
            let report = self.convergence_report();
            self.fail(format!(
                "STUCK: no progress for {} s after healing (nothing trimmed, no hostile answered):\n{report}",
                crate::time::seconds(HEAL_STALL_US)
            ));
        } else {
            self.queue.after(CONVERGENCE_POLL_US, Event::ConvergenceCheck);
        }
    }

    fn convergence_report(&self) -> String {
        let mut text = String::new();
        for device in &self.devices {
            let uplink = match &device.uplink {
                Uplink::Down => "down".to_string(),
                Uplink::Waiting => "waiting to reconnect".to_string(),
                Uplink::Connecting { conn, .. } => format!("connecting (conn#{conn})"),
                Uplink::Session(session) => format!(
                    "conn#{} streaming={} closed={:?}",
                    session.conn,
                    session.session.is_streaming(),
                    session.session.close()
                ),
            };
            text.push_str(&format!("  {} ({}): {uplink}\n", device.id, if device.up { "up" } else { "off" }));
            for lane in Lane::ALL {
                let state = device.ring.lane(lane);
                if state.chunks.is_empty() && state.next_seq == 1 {
                    continue;
                }
                text.push_str(&format!(
                    "    {lane}: next {} acked {} held {:?}..{:?} visible below {} sink landed {} durable {}\n",
                    state.next_seq,
                    state.acked_through,
                    state.chunks.keys().next(),
                    state.chunks.keys().next_back(),
                    device.ring.visible_next_seq(lane),
                    self.sink.core.as_ref().map_or(0, |core| core.landed(&device.id, lane)),
                    self.sink.core.as_ref().map_or(0, |core| core.durable(&device.id, lane)),
                ));
            }
        }
        for hostile in &self.hostiles {
            text.push_str(&format!(
                "  {} done={} attempts={} closes={:?}\n",
                hostile.id, hostile.done, hostile.attempts, hostile.closes
            ));
        }
        text.push_str(&format!(
            "  sink up={} broken={:?}\n",
            self.sink.core.is_some(),
            self.sink.core.as_ref().and_then(|core| core.broken())
        ));
        text
    }
}
