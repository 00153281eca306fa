//! The sink: the real `landing::LandingCore` over a `landing::memory::MemoryDisk`, one real
//! `session::SinkSession` per connection, driven as `core-sink/src/server.rs` and
//! `core-sink/src/lander.rs` drive them.
//!
//! Per connection a driver task (`SinkConn`) takes one input at a time (control bytes, a lane
//! stream's bytes, a command, a refusal, "durable watermarks changed", a timeout) and then drives
//! the session's outputs: transmits go to the control stream; a `Hello` asks the lander for a
//! grant and the driver waits for it; a `Dictionary` is stored durably (the driver waits); a
//! `Chunk` takes byte permits from the lander's semaphore (the driver waits, FIFO, when there are
//! none) and is queued for the lander. While the driver waits, inputs queue up, as they do in the
//! real driver's channels. A newer connection of a device supersedes the older one.
//!
//! The lander takes requests in order (`Open` → `open_session` and the grant back; `Land` →
//! `land`, refusals back to the session that sent the chunk), commits when `commit_due`, and
//! publishes (durable, generation) per lane at the same points `Lander` does, after which every
//! session is told to send Acks (`handle_durable` for every lane).
//!
//! Faults: armed `landing::memory::Faults`, a failing dictionary store, crashes (power loss:
//! `MemoryDisk::crash`, or a process restart that keeps the page cache), and a restart by the
//! operator when the core reports itself broken. Each core call is bracketed by the armed faults
//! before and after, so the simulator knows exactly which injected fault fired, and every
//! outcome is checked against the core's rules and its `LandingStats`.
//!
//! Limits: [`SINK_INPUTS_QUEUED_MAX`] inputs per connection (the real driver's channels plus
//! QUIC's receive windows); the lander queue is bounded by the permits (bytes) plus one `Open`
//! per connection.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use landing::memory::{Faults, MemoryCommitter, MemoryDisk, MemoryStore};
use landing::{LandOutcome, LandRequest, LandingCore, LandingStats};
use protocol::Lane;
use session::{DictionaryRefusal, Grant, IncomingChunk, LandingRefusal, SinkEvent, SinkSession, Stream};

use crate::link::{ConnId, Dir, Payload, StreamKey};
use crate::scenario::SinkParams;
use crate::world::{Event, Side, World};

/// Inputs one connection's driver may have waiting.
pub const SINK_INPUTS_QUEUED_MAX: usize = 1 << 20;
/// Dictionaries the sink stores per device (`core_sink::dictionaries::DEVICE_DICTIONARIES_MAX`).
pub const DEVICE_DICTIONARIES_MAX: usize = protocol::DICTIONARIES_MAX;

type Core = LandingCore<MemoryCommitter, MemoryStore>;

enum Busy {
    /// Waiting for the lander's answer to the Hello.
    Grant,
    /// Storing a dictionary.
    Dictionary { stream: u64, dict_id: u32, dictionary: Vec<u8> },
    /// Waiting for byte permits for this chunk.
    Permits(IncomingChunk),
}

enum Input {
    Control(Payload),
    Stream(u64, Payload),
    Superseded,
    Refusal(LandingRefusal),
    DurableChanged,
    Timeout,
    Lost(String),
}

/// What waits for a driver, per source, as in the real driver's `select!`: the control stream,
/// the lane streams' reader channel (FIFO), the commands channel, the refusals channel (holds
/// one: `try_send`), the durable-watermarks watch (coalesces), the timer, a connection error.
/// The driver takes the next input from a source chosen at random among those with one ready,
/// as `tokio::select!` does; so a superseded session may still land chunks it had queued.
#[derive(Default)]
struct Inputs {
    control: VecDeque<Payload>,
    streams: VecDeque<(u64, Payload)>,
    superseded: bool,
    refusal: Option<LandingRefusal>,
    durable_changed: bool,
    timeout: bool,
    lost: Option<String>,
}

impl Inputs {
    fn len(&self) -> usize {
        self.control.len() + self.streams.len()
    }

    fn push(&mut self, input: Input) {
        match input {
            Input::Control(payload) => self.control.push_back(payload),
            Input::Stream(stream, payload) => self.streams.push_back((stream, payload)),
            Input::Superseded => self.superseded = true,
            Input::Refusal(refusal) => {
                self.refusal.get_or_insert(refusal);
            }
            Input::DurableChanged => self.durable_changed = true,
            Input::Timeout => self.timeout = true,
            Input::Lost(reason) => {
                self.lost.get_or_insert(reason);
            }
        }
    }

    fn pop(&mut self, rng: &mut crate::rng::Rng) -> Option<Input> {
        let ready = [
            !self.control.is_empty(),
            !self.streams.is_empty(),
            self.superseded,
            self.refusal.is_some(),
            self.durable_changed,
            self.timeout,
            self.lost.is_some(),
        ];
        let count = ready.iter().filter(|&&ready| ready).count();
        if count == 0 {
            return None;
        }
        let mut pick = rng.below(count as u64) as usize;
        let source = ready
            .iter()
            .position(|&ready| {
                ready
                    && (pick == 0 || {
                        pick -= 1;
                        false
                    })
            })
            .expect("picked");
        Some(match source {
            0 => Input::Control(self.control.pop_front().expect("ready")),
            1 => {
                let (stream, payload) = self.streams.pop_front().expect("ready");
                Input::Stream(stream, payload)
            }
            2 => {
                self.superseded = false;
                Input::Superseded
            }
            3 => Input::Refusal(self.refusal.take().expect("ready")),
            4 => {
                self.durable_changed = false;
                Input::DurableChanged
            }
            5 => {
                self.timeout = false;
                Input::Timeout
            }
            _ => Input::Lost(self.lost.take().expect("ready")),
        })
    }
}

pub struct SinkConn {
    pub device: String,
    pub hostile: Option<usize>,
    pub session: SinkSession,
    busy: Option<Busy>,
    inputs: Inputs,
    /// Lane bytes a slow reader task has not handed over yet, per stream.
    late: BTreeMap<u64, VecDeque<Payload>>,
    timeout_at: Option<u64>,
    pump_scheduled: bool,
}

enum LanderRequest {
    Open { conn: ConnId, device: String, ring_id: [u8; 16] },
    Land { conn: ConnId, device: String, chunk: IncomingChunk },
}

/// What the simulator saw the core do, per core incarnation, to compare with `LandingStats`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observed {
    pub landed: u64,
    pub bytes_landed: u64,
    pub duplicates: u64,
    pub fenced: u64,
    pub land_failures: u64,
    pub commits: u64,
    pub commit_failures: u64,
    pub epochs: u64,
    pub grants: u64,
    /// Injected faults that fired, by kind.
    pub fired_land: u64,
    pub fired_commit: u64,
    pub fired_store_commit: u64,
    pub fired_bind: u64,
    pub fired_recover: u64,
    pub open_failures: u64,
}

/// One durable (or pending) chunk as the mirror keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorEntry {
    pub seq: u64,
    pub body_crc32c: u32,
    pub encoded_len: usize,
}

/// What the sink's durable data holds, as the landing core's outcomes say: chunks landed since
/// the last commit are pending; a successful commit makes them durable; a failed write rolls its
/// lane back, a failed commit or a restart all of them. The trim-time check reads it (cheap);
/// [`DurableMirror::verify`] compares it with `MemoryDisk::durable_chunks` at every sink stop and
/// at the end. Both only grow, so agreeing there means they agreed at every trim in between.
/// A landed chunk and the records it carries (`None` for a hostile device's body).
type PendingChunk = (MirrorEntry, Option<(u64, u64)>);

#[derive(Default)]
pub struct DurableMirror {
    pending: BTreeMap<(String, Lane), Vec<PendingChunk>>,
    durable: BTreeMap<(String, Lane), Vec<MirrorEntry>>,
    /// first record → last record of every durable honest chunk.
    records: BTreeMap<u64, u64>,
}

impl DurableMirror {
    fn landed(&mut self, device: &str, chunk: &IncomingChunk) {
        let entry = MirrorEntry {
            seq: chunk.seq,
            body_crc32c: chunk.header.body_crc32c,
            encoded_len: chunk.encoded.len(),
        };
        self.pending
            .entry((device.to_string(), chunk.lane))
            .or_default()
            .push((entry, record_range(&chunk.encoded)));
    }

    fn rolled_back(&mut self, device: &str, lane: Lane) {
        self.pending.remove(&(device.to_string(), lane));
    }

    fn committed(&mut self) {
        for (key, entries) in std::mem::take(&mut self.pending) {
            let durable = self.durable.entry(key).or_default();
            for (entry, records) in entries {
                durable.push(entry);
                if let Some((first, last)) = records {
                    self.records.insert(first, last);
                }
            }
        }
    }

    fn lost_pending(&mut self) {
        self.pending.clear();
    }

    /// Whether `record` is in the durable data.
    pub fn holds(&self, record: u64) -> bool {
        self.records.range(..=record).next_back().is_some_and(|(_, &last)| record <= last)
    }

    /// The mirror equals the disk's durable data, lane by lane.
    pub fn verify(&self, disk: &MemoryDisk) -> Result<(), String> {
        let mut keys: BTreeSet<(String, Lane)> = disk.lanes().into_iter().collect();
        keys.extend(self.durable.keys().cloned());
        for (device, lane) in keys {
            let on_disk: Vec<MirrorEntry> = disk
                .durable_chunks(&device, lane)
                .iter()
                .map(|(seq, encoded)| MirrorEntry {
                    seq: *seq,
                    body_crc32c: protocol::ChunkHeader::decode(encoded)
                        .map_or(0, |header| header.body_crc32c),
                    encoded_len: encoded.len(),
                })
                .collect();
            let mirrored = self.durable.get(&(device.clone(), lane)).map_or(&[][..], Vec::as_slice);
            if on_disk != mirrored {
                let first_difference = on_disk
                    .iter()
                    .zip(mirrored)
                    .position(|(a, b)| a != b)
                    .unwrap_or(on_disk.len().min(mirrored.len()));
                return Err(format!(
                    "{device}/{lane}: the durable data ({} chunks) is not what the commits reported ({} chunks); first difference at #{first_difference}: disk {:?}, commits {:?}",
                    on_disk.len(),
                    mirrored.len(),
                    on_disk.get(first_difference),
                    mirrored.get(first_difference)
                ));
            }
        }
        Ok(())
    }
}

/// The records an honest chunk carries: its body starts with `record_count` u64 record ids.
pub fn record_range(encoded: &[u8]) -> Option<(u64, u64)> {
    let (header, body) = protocol::decode_chunk(encoded).ok()?;
    let count = header.record_count as usize;
    if count == 0 || body.len() < 8 * count {
        return None;
    }
    let id = |index: usize| u64::from_le_bytes(body[8 * index..8 * index + 8].try_into().expect("8 bytes"));
    let first = id(0);
    (0..count).all(|index| id(index) == first + index as u64).then(|| (first, first + count as u64 - 1))
}

pub struct Sink {
    pub params: SinkParams,
    pub disk: MemoryDisk,
    pub core: Option<Core>,
    pub incarnation: u64,
    pub conns: BTreeMap<ConnId, SinkConn>,
    live_session: BTreeMap<String, ConnId>,
    lander: VecDeque<LanderRequest>,
    lander_bytes: u64,
    lander_step_scheduled: bool,
    lander_free_at: u64,
    commit_check_at: Option<u64>,
    permit_waiters: VecDeque<ConnId>,
    published: BTreeMap<(String, Lane), (u64, u64)>,
    /// The durable dictionary store: device → id → bytes.
    pub dictionaries: BTreeMap<String, BTreeMap<u32, Vec<u8>>>,
    pub dictionary_fault: bool,
    operator_restart_scheduled: bool,
    pub observed: Observed,
    /// Stats of earlier core incarnations, added up.
    pub past_stats: LandingStats,
    pub past_observed: Observed,
    pub max_durable: BTreeMap<(String, Lane), u64>,
    pub mirror: DurableMirror,
    pub closes: BTreeMap<String, u64>,
    /// Grants given while some lane of the device had landed chunks not yet committed.
    pub grants_over_pending: u64,
}

impl Sink {
    pub fn new(params: &SinkParams) -> Sink {
        Sink {
            params: params.clone(),
            disk: MemoryDisk::new(),
            core: None,
            incarnation: 0,
            conns: BTreeMap::new(),
            live_session: BTreeMap::new(),
            lander: VecDeque::new(),
            lander_bytes: 0,
            lander_step_scheduled: false,
            lander_free_at: 0,
            commit_check_at: None,
            permit_waiters: VecDeque::new(),
            published: BTreeMap::new(),
            dictionaries: BTreeMap::new(),
            dictionary_fault: false,
            operator_restart_scheduled: false,
            observed: Observed::default(),
            past_stats: LandingStats::default(),
            past_observed: Observed::default(),
            max_durable: BTreeMap::new(),
            mirror: DurableMirror::default(),
            closes: BTreeMap::new(),
            grants_over_pending: 0,
        }
    }

    /// Whether a connection attempt reaches a listening sink.
    pub fn accepting(&self) -> bool {
        self.core.is_some()
    }

    fn publish(&mut self, device: &str, lane: Lane) -> bool {
        let core = self.core.as_ref().expect("publishing needs a core");
        let current = (core.durable(device, lane), core.generation(device, lane));
        self.published.insert((device.to_string(), lane), current).unwrap_or((0, 0)) != current
    }
}

fn fired(before: Faults, after: Faults, pick: fn(&Faults) -> bool) -> u64 {
    u64::from(pick(&before) && !pick(&after))
}

impl World {
    fn sink_instant(&self) -> Instant {
        self.clock.instant(self.now())
    }

    // ---- start, crash, restart ----

    pub fn sink_start_now(&mut self) {
        let incarnation = self.sink.incarnation;
        self.sink_start(incarnation);
    }

    pub fn sink_start(&mut self, incarnation: u64) {
        if self.sink.incarnation != incarnation || self.sink.core.is_some() {
            return;
        }
        let before = self.sink.disk.armed();
        let opened =
            LandingCore::open(self.sink.params.landing, self.sink.disk.committer(), self.sink.disk.store());
        let after = self.sink.disk.armed();
        self.sink.observed.fired_recover += fired(before, after, |faults| faults.recover);
        let core = match opened {
            Ok(core) => core,
            Err(error) => {
                trace!(self, "sink: open failed ({error}); retrying");
                if fired(before, after, |faults| faults.recover) == 0 {
                    self.fail(format!("the landing core failed to open without an injected fault: {error}"));
                }
                self.queue.after(100 * crate::time::MICROS_PER_MS, Event::SinkStart { incarnation });
                return;
            }
        };
        // Durable watermarks never go backwards, across crashes too.
        let mut problems = Vec::new();
        for ((device, lane), &seen) in &self.sink.max_durable {
            let durable = core.durable(device, *lane);
            if durable < seen {
                problems.push(format!("{device}/{lane}: durable {durable} after a restart, {seen} before"));
            }
        }
        let mut devices: Vec<String> = core.devices().map(str::to_string).collect();
        devices.sort();
        self.sink.core = Some(core);
        self.sink.published.clear();
        for device in devices {
            for lane in Lane::ALL {
                self.sink.publish(&device, lane);
            }
        }
        self.sink.lander_free_at = self.now();
        trace!(self, "sink: up (incarnation {incarnation})");
        for problem in problems {
            self.fail(format!("DURABLE WATERMARK WENT BACKWARDS: {problem}"));
        }
    }

    /// The sink process ends; with `power_loss`, everything not fsynced is lost too.
    pub fn sink_stop(&mut self, power_loss: bool) {
        let Some(core) = self.sink.core.take() else { return };
        self.sink_check_stats(&core);
        self.sink.past_stats = add_stats(self.sink.past_stats, *core.stats());
        self.sink.past_observed = add_observed(self.sink.past_observed, self.sink.observed);
        self.sink.observed = Observed::default();
        drop(core.into_parts());
        if power_loss {
            self.sink.disk.crash();
        }
        self.sink.mirror.lost_pending();
        if let Err(problem) = self.sink.mirror.verify(&self.sink.disk) {
            self.fail(format!("DURABLE DATA MISMATCH after the sink stopped: {problem}"));
        }
        let conns: Vec<ConnId> = self.sink.conns.keys().copied().collect();
        for conn in conns {
            let reason = if power_loss { "the sink lost power" } else { "the sink restarted" };
            self.break_connection(conn, reason);
            if let Some(connection) = self.connections.get_mut(&conn) {
                connection.sink_open = false;
            }
        }
        self.sink.conns.clear();
        self.sink.live_session.clear();
        self.sink.lander.clear();
        self.sink.lander_bytes = 0;
        self.sink.lander_step_scheduled = false;
        self.sink.commit_check_at = None;
        self.sink.permit_waiters.clear();
        self.sink.published.clear();
        self.sink.operator_restart_scheduled = false;
        self.sink.incarnation += 1;
        let incarnation = self.sink.incarnation;
        let downtime = self.rng.range(1, self.sink.params.downtime_us_max);
        self.queue.after(downtime, Event::SinkStart { incarnation });
    }

    fn schedule_operator_restart(&mut self) {
        if !self.sink.operator_restart_scheduled {
            self.sink.operator_restart_scheduled = true;
            let delay = self.rng.range(1, self.sink.params.broken_restart_us_max);
            let incarnation = self.sink.incarnation;
            self.queue.after(delay, Event::SinkOperatorRestart { incarnation });
        }
    }

    pub fn arm_landing_faults(&mut self) {
        let faults = Faults {
            land: self.rng.chance(0.4),
            torn_write: self.rng.chance(0.5),
            commit: self.rng.chance(0.3),
            sync_partially: self.rng.chance(0.5),
            store_commit: self.rng.chance(0.2),
            store_bind: self.rng.chance(0.2),
            recover: self.rng.chance(0.05),
            // Cluster mode only (the simulator runs standalone); no draw, so seeds replay as before.
            store_promote: false,
        };
        trace!(self, "sink: armed {faults:?}");
        self.sink.disk.arm(faults);
    }

    /// Counters are honest: the core's stats match what the simulator saw it do.
    pub fn sink_check_stats(&mut self, core: &Core) {
        let stats = *core.stats();
        let observed = self.sink.observed;
        let mut problems = Vec::new();
        let mut check = |name: &str, stat: u64, seen: u64| {
            if stat != seen {
                problems.push(format!("LandingStats.{name} is {stat}, the simulator saw {seen}"));
            }
        };
        check("chunks_landed", stats.chunks_landed, observed.landed);
        check("bytes_landed", stats.bytes_landed, observed.bytes_landed);
        check("duplicates_dropped", stats.duplicates_dropped, observed.duplicates);
        check("fenced_chunks", stats.fenced_chunks, observed.fenced);
        check("landing_failures", stats.landing_failures, observed.land_failures);
        check("landing_failures (vs injected land faults)", stats.landing_failures, observed.fired_land);
        check("commits", stats.commits, observed.commits);
        check("commit_failures", stats.commit_failures, observed.commit_failures);
        check(
            "commit_failures (vs injected commit and store faults)",
            stats.commit_failures,
            observed.fired_commit + observed.fired_store_commit,
        );
        check("epochs_started", stats.epochs_started, observed.epochs);
        check("sessions_granted", stats.sessions_granted, observed.grants);
        for problem in problems {
            self.fail(format!("DISHONEST COUNTER: {problem}"));
        }
    }

    // ---- connections ----

    /// A connection from `conn`'s device is established (its certificate verified).
    pub fn sink_accept(&mut self, conn: ConnId, hostile: Option<usize>) {
        let connection = self.connections.get_mut(&conn).expect("accepting a known connection");
        connection.sink_open = true;
        let device = connection.device_id.clone();
        let known: Vec<u32> =
            self.sink.dictionaries.get(&device).map(|ids| ids.keys().copied().collect()).unwrap_or_default();
        let session = SinkSession::new(self.sink.params.session.clone(), &device, known, self.sink_instant());
        self.sink.conns.insert(
            conn,
            SinkConn {
                device: device.clone(),
                hostile,
                session,
                busy: None,
                inputs: Inputs::default(),
                late: BTreeMap::new(),
                timeout_at: None,
                pump_scheduled: false,
            },
        );
        if let Some(previous) = self.sink.live_session.insert(device.clone(), conn) {
            // The device reconnected before its old connection timed out: the new one wins.
            trace!(self, "sink: conn#{conn} of {device} supersedes conn#{previous}");
            self.sink_input(previous, Input::Superseded);
        }
        self.sink_schedule_timeout(conn);
    }

    fn sink_input(&mut self, conn: ConnId, input: Input) {
        let Some(state) = self.sink.conns.get_mut(&conn) else { return };
        state.inputs.push(input);
        assert!(
            state.inputs.len() <= SINK_INPUTS_QUEUED_MAX,
            "conn#{conn}: more than {SINK_INPUTS_QUEUED_MAX} inputs queued"
        );
        self.sink_schedule_pump(conn);
    }

    fn sink_schedule_pump(&mut self, conn: ConnId) {
        let Some(state) = self.sink.conns.get_mut(&conn) else { return };
        if !state.pump_scheduled {
            state.pump_scheduled = true;
            self.queue.after(0, Event::SinkPump { conn });
        }
    }

    pub fn sink_deliver(&mut self, conn: ConnId, stream: StreamKey, payload: Payload) {
        match stream {
            StreamKey::Control => self.sink_input(conn, Input::Control(payload)),
            StreamKey::Uni(stream) => {
                let late_handoff = self.sink.params.late_handoff;
                let Some(state) = self.sink.conns.get_mut(&conn) else { return };
                let queue = state.late.entry(stream).or_default();
                let late =
                    !queue.is_empty() || late_handoff.is_some_and(|(chance, _)| self.rng.chance(chance));
                if late {
                    queue.push_back(payload);
                    assert!(
                        queue.len() <= SINK_INPUTS_QUEUED_MAX,
                        "conn#{conn}: more than {SINK_INPUTS_QUEUED_MAX} late reads"
                    );
                    if queue.len() == 1 {
                        let delay = self.rng.range(1, late_handoff.map_or(1, |(_, delay)| delay));
                        self.queue.after(delay, Event::SinkHandOff { conn, stream });
                    }
                } else {
                    self.sink_input(conn, Input::Stream(stream, payload));
                }
            }
        }
    }

    pub fn sink_hand_off(&mut self, conn: ConnId, stream: u64) {
        let Some(state) = self.sink.conns.get_mut(&conn) else { return };
        let queue = state.late.entry(stream).or_default();
        let payloads: Vec<Payload> = queue.drain(..).collect();
        for payload in payloads {
            self.sink_input(conn, Input::Stream(stream, payload));
        }
    }

    pub fn sink_connection_lost(&mut self, conn: ConnId, reason: &str) {
        self.sink_input(conn, Input::Lost(reason.to_string()));
    }

    pub fn sink_timeout(&mut self, conn: ConnId) {
        let now = self.now();
        let Some(state) = self.sink.conns.get_mut(&conn) else { return };
        if state.timeout_at == Some(now) {
            state.timeout_at = None;
            self.sink_input(conn, Input::Timeout);
        }
    }

    fn sink_schedule_timeout(&mut self, conn: ConnId) {
        let Some(state) = self.sink.conns.get_mut(&conn) else { return };
        if let Some(deadline) = state.session.poll_timeout() {
            let at = self.clock.micros(deadline).max(self.queue.now);
            if state.timeout_at.is_none_or(|scheduled| at < scheduled) {
                state.timeout_at = Some(at);
                self.queue.at(at, Event::SinkTimeout { conn });
            }
        }
    }

    /// The driver loop: one input at a time while the driver is not waiting.
    pub fn sink_pump(&mut self, conn: ConnId) {
        if let Some(state) = self.sink.conns.get_mut(&conn) {
            state.pump_scheduled = false;
        }
        loop {
            let now = self.sink_instant();
            let Some(state) = self.sink.conns.get_mut(&conn) else { return };
            if state.busy.is_some() {
                return;
            }
            let Some(input) = state.inputs.pop(&mut self.rng) else { break };
            let session = &mut state.session;
            match input {
                Input::Control(Payload::Bytes(bytes)) => session.handle_control_bytes(&bytes),
                Input::Control(Payload::Fin) => session.handle_control_finished(),
                Input::Stream(stream, Payload::Bytes(bytes)) => {
                    if !session.is_closed() && !session.stream_ready(stream) {
                        self.fail(format!(
                            "conn#{conn}: stream {stream} got bytes while it waits for a dictionary"
                        ));
                        return;
                    }
                    session.handle_stream_bytes(stream, &bytes)
                }
                Input::Stream(stream, Payload::Fin) => session.handle_stream_finished(stream),
                Input::Superseded => session.superseded(),
                Input::Refusal(refusal) => session.refuse_landing(refusal),
                Input::DurableChanged => self.sink_acks(conn),
                Input::Timeout => session.handle_timeout(now),
                Input::Lost(reason) => session.connection_lost(&reason),
            }
            self.sink_drive(conn);
        }
        self.sink_schedule_timeout(conn);
    }

    /// `SessionDriver::acks`: every lane's published watermark into the session.
    fn sink_acks(&mut self, conn: ConnId) {
        let Some(state) = self.sink.conns.get_mut(&conn) else { return };
        for lane in Lane::ALL {
            let (durable, generation) =
                self.sink.published.get(&(state.device.clone(), lane)).copied().unwrap_or((0, 0));
            state.session.handle_durable(lane, durable, generation);
        }
    }

    /// `SessionDriver::drive_events`: transmits out, events carried out until the driver waits.
    fn sink_drive(&mut self, conn: ConnId) {
        loop {
            let Some(state) = self.sink.conns.get_mut(&conn) else { return };
            let mut transmits = Vec::new();
            while let Some(transmit) = state.session.poll_transmit() {
                assert_eq!(transmit.stream, Stream::Control, "the sink only writes its control stream");
                transmits.push(transmit.bytes);
            }
            for bytes in transmits {
                self.send(conn, Dir::Down, StreamKey::Control, Payload::Bytes(bytes));
            }
            let state = self.sink.conns.get_mut(&conn).expect("still here");
            if state.busy.is_some() {
                return;
            }
            let Some(event) = state.session.poll_event() else { break };
            let device = state.device.clone();
            match event {
                SinkEvent::Hello { ring_id, .. } => {
                    trace!(
                        self,
                        "sink: conn#{conn} Hello from {device}, ring {}",
                        crate::device::hex(&ring_id)
                    );
                    state.busy = Some(Busy::Grant);
                    self.lander_push(LanderRequest::Open { conn, device, ring_id });
                }
                SinkEvent::Dictionary { stream, dict_id, dictionary } => {
                    state.busy = Some(Busy::Dictionary { stream, dict_id, dictionary });
                    let delay = self.rng.range(1, self.sink.params.dictionary_store_us_max);
                    self.queue.after(delay, Event::SinkDictionaryDone { conn });
                }
                SinkEvent::Chunk(chunk) => {
                    let bytes = chunk.encoded.len() as u64;
                    if !self.sink.permit_waiters.is_empty()
                        || self.sink.lander_bytes + bytes > self.sink.params.permits_bytes
                    {
                        state.busy = Some(Busy::Permits(chunk));
                        self.sink.permit_waiters.push_back(conn);
                    } else {
                        self.sink.lander_bytes += bytes;
                        self.lander_push(LanderRequest::Land { conn, device, chunk });
                    }
                }
                SinkEvent::Closed => {}
            }
        }
        let closed = self.sink.conns.get(&conn).is_some_and(|state| state.session.is_closed());
        if closed {
            self.sink_close(conn);
        }
    }

    /// The session ended: close the connection with its code.
    fn sink_close(&mut self, conn: ConnId) {
        let Some(state) = self.sink.conns.remove(&conn) else { return };
        let close = state.session.close().cloned().expect("closed");
        trace!(
            self,
            "sink: conn#{conn} of {} closed: {} by_device={} {}",
            state.device,
            close.code,
            close.by_peer,
            close.reason
        );
        *self.sink.closes.entry(close.code.name().to_string()).or_default() += 1;
        if self.sink.live_session.get(&state.device) == Some(&conn) {
            self.sink.live_session.remove(&state.device);
        }
        match state.hostile {
            Some(hostile) => self.hostile_closed(hostile, close.code, close.by_peer, &close.reason),
            None => {
                *self.tally.honest_sessions_closed.entry(close.code.name().to_string()).or_default() += 1;
                if !crate::hostile::is_transient(close.code) {
                    self.fail(format!(
                        "HONEST DEVICE REFUSED: the sink closed {}'s session with {}: {}",
                        state.device, close.code, close.reason
                    ));
                }
            }
        }
        if self.connections.get(&conn).is_some_and(|connection| connection.sink_open) {
            self.close_connection(
                conn,
                Side::Sink,
                format!("closed by the sink: {} ({})", close.code, close.reason),
            );
        }
    }

    pub fn sink_dictionary_done(&mut self, conn: ConnId) {
        let Some(state) = self.sink.conns.get_mut(&conn) else { return };
        let Some(Busy::Dictionary { stream, dict_id, dictionary }) = state.busy.take() else {
            unreachable!("a dictionary store finished for a driver not storing one")
        };
        let device = state.device.clone();
        let stored = self.sink.dictionaries.entry(device.clone()).or_default();
        let outcome = if protocol::dictionary_id(&dictionary) != dict_id {
            Err(DictionaryRefusal::Refused(format!(
                "dictionary {dict_id} is not the content id of its bytes"
            )))
        } else if stored.contains_key(&dict_id) {
            Ok(())
        } else if self.sink.dictionary_fault {
            self.sink.dictionary_fault = false;
            Err(DictionaryRefusal::Storage("injected dictionary store failure".to_string()))
        } else if stored.len() >= DEVICE_DICTIONARIES_MAX {
            Err(DictionaryRefusal::Refused(format!(
                "device {device} already has {DEVICE_DICTIONARIES_MAX} dictionaries"
            )))
        } else {
            stored.insert(dict_id, dictionary);
            Ok(())
        };
        trace!(self, "sink: conn#{conn} dictionary {dict_id:08x} of {device}: {outcome:?}");
        let state = self.sink.conns.get_mut(&conn).expect("still here");
        match outcome {
            Ok(()) => state.session.dictionary_stored(stream, dict_id),
            Err(refusal) => state.session.dictionary_refused(refusal),
        }
        self.sink_drive(conn);
        self.sink_schedule_pump(conn);
    }

    fn sink_wake_permit_waiters(&mut self) {
        while let Some(&conn) = self.sink.permit_waiters.front() {
            let Some(state) = self.sink.conns.get_mut(&conn) else {
                self.sink.permit_waiters.pop_front();
                continue;
            };
            let Some(Busy::Permits(chunk)) = &state.busy else {
                self.sink.permit_waiters.pop_front();
                continue;
            };
            let bytes = chunk.encoded.len() as u64;
            if self.sink.lander_bytes + bytes > self.sink.params.permits_bytes {
                return;
            }
            self.sink.permit_waiters.pop_front();
            let Some(Busy::Permits(chunk)) = state.busy.take() else { unreachable!() };
            let device = state.device.clone();
            self.sink.lander_bytes += bytes;
            self.lander_push(LanderRequest::Land { conn, device, chunk });
            self.sink_drive(conn);
            self.sink_schedule_pump(conn);
        }
    }

    /// Every session re-reads the published watermarks (`durable_generation` changed).
    fn sink_notify_all(&mut self) {
        let conns: Vec<ConnId> = self.sink.conns.keys().copied().collect();
        for conn in conns {
            self.sink_input(conn, Input::DurableChanged);
        }
    }

    // ---- the lander ----

    fn lander_push(&mut self, request: LanderRequest) {
        self.sink.lander.push_back(request);
        self.lander_schedule();
    }

    fn lander_schedule(&mut self) {
        if !self.sink.lander_step_scheduled && !self.sink.lander.is_empty() {
            self.sink.lander_step_scheduled = true;
            let at =
                self.sink.lander_free_at.max(self.now()) + self.rng.range(1, self.sink.params.land_us_max);
            let incarnation = self.sink.incarnation;
            self.queue.at(at, Event::LanderStep { incarnation });
        }
    }

    pub fn lander_step(&mut self, incarnation: u64) {
        if incarnation != self.sink.incarnation || self.sink.core.is_none() {
            return;
        }
        self.sink.lander_step_scheduled = false;
        self.sink.lander_free_at = self.now();
        if let Some(request) = self.sink.lander.pop_front() {
            match request {
                LanderRequest::Open { conn, device, ring_id } => self.lander_open(conn, &device, ring_id),
                LanderRequest::Land { conn, device, chunk } => self.lander_land(conn, &device, chunk),
            }
        }
        self.lander_commit_if_due();
        self.lander_schedule();
    }

    pub fn lander_commit_check(&mut self, incarnation: u64) {
        if incarnation != self.sink.incarnation || self.sink.core.is_none() {
            return;
        }
        if self.sink.commit_check_at == Some(self.now()) {
            self.sink.commit_check_at = None;
        }
        if !self.sink.lander_step_scheduled {
            self.lander_commit_if_due();
        }
    }

    fn lander_commit_if_due(&mut self) {
        let now = self.sink_instant();
        let core = self.sink.core.as_ref().expect("running");
        if core.commit_due(now) {
            self.lander_commit();
        }
        let Some(core) = self.sink.core.as_ref() else { return };
        if let Some(deadline) = core.commit_deadline() {
            let at = self.clock.micros(deadline).max(self.now());
            if self.sink.commit_check_at.is_none_or(|scheduled| at < scheduled) {
                self.sink.commit_check_at = Some(at);
                let incarnation = self.sink.incarnation;
                self.queue.at(at, Event::LanderCommitCheck { incarnation });
            }
        }
    }

    fn lander_open(&mut self, conn: ConnId, device: &str, ring_id: [u8; 16]) {
        let core = self.sink.core.as_mut().expect("running");
        let bound_before = core.binding(device).copied();
        let before = self.sink.disk.armed();
        let result = core.open_session(device, ring_id);
        let after = self.sink.disk.armed();
        let fired_bind = fired(before, after, |faults| faults.store_bind);
        self.sink.observed.fired_bind += fired_bind;
        let broken = core.broken().is_some();
        let binding = core.binding(device).copied();
        let grant = match result {
            Ok(grant) => {
                self.sink.observed.grants += 1;
                if Lane::ALL.iter().any(|lane| core.landed(device, *lane) > core.durable(device, *lane)) {
                    // The device resumes above data the sink has not committed yet.
                    self.sink.grants_over_pending += 1;
                }
                if bound_before.is_some_and(|bound| bound.ring_id != ring_id) {
                    self.sink.observed.epochs += 1;
                }
                let binding = binding.expect("a granted device is bound");
                if binding.ring_id != ring_id {
                    self.fail(format!(
                        "{device}: granted ring {} but bound to {}",
                        crate::device::hex(&ring_id),
                        crate::device::hex(&binding.ring_id)
                    ));
                }
                for lane in Lane::ALL {
                    let lane_grant = grant.lanes[lane.index()];
                    if lane_grant.base != binding.bases[lane.index()] {
                        self.fail(format!(
                            "{device}/{lane}: the grant's base {} is not the binding's {}",
                            lane_grant.base,
                            binding.bases[lane.index()]
                        ));
                    }
                }
                // A ring keeps its bases while it is bound; a new epoch (a ring the device is not
                // bound to) starts at or above every base any earlier epoch of the device used.
                let key = (device.to_string(), ring_id);
                let new_epoch = bound_before.is_none_or(|bound| bound.ring_id != ring_id);
                if new_epoch {
                    for ((other_device, _), epochs) in &self.ring_bases {
                        for bases in epochs.iter().filter(|_| other_device == device) {
                            for lane in Lane::ALL {
                                if binding.bases[lane.index()] < bases[lane.index()] {
                                    self.failure.get_or_insert(format!(
                                        "{device}/{lane}: new epoch of ring {} has base {} below an earlier epoch's {}",
                                        crate::device::hex(&ring_id),
                                        binding.bases[lane.index()],
                                        bases[lane.index()]
                                    ));
                                }
                            }
                        }
                    }
                    self.ring_bases.entry(key).or_default().push(binding.bases);
                } else if self.ring_bases.get(&key).and_then(|epochs| epochs.last()) != Some(&binding.bases) {
                    let before = self.ring_bases.get(&key).and_then(|epochs| epochs.last()).copied();
                    self.fail(format!(
                        "{device}: ring {} had bases {before:?} and, still bound, now {:?}",
                        crate::device::hex(&ring_id),
                        binding.bases
                    ));
                }
                trace!(
                    self,
                    "lander: grant conn#{conn} {device}: {:?}",
                    grant.lanes.map(|lane| (lane.base, lane.landed, lane.generation))
                );
                Ok(grant)
            }
            Err(error) => {
                self.sink.observed.open_failures += 1;
                if fired_bind == 0 && !broken {
                    self.fail(format!("{device}: open_session failed without an injected fault: {error}"));
                }
                trace!(self, "lander: open for conn#{conn} {device} failed: {error}");
                Err(LandingRefusal::Unavailable(error.to_string()))
            }
        };
        // A new epoch bumps the device's generations: that fences its older sessions.
        let mut changed = false;
        for lane in Lane::ALL {
            changed |= self.sink.publish(device, lane);
        }
        if changed {
            self.sink_notify_all();
        }
        self.sink_reply_grant(conn, grant);
    }

    fn sink_reply_grant(&mut self, conn: ConnId, grant: Result<Grant, LandingRefusal>) {
        let Some(state) = self.sink.conns.get_mut(&conn) else { return };
        if !matches!(state.busy, Some(Busy::Grant)) {
            return;
        }
        state.busy = None;
        state.session.handle_grant(grant);
        // Acks for what became durable while the grant was on its way.
        self.sink_acks(conn);
        self.sink_drive(conn);
        self.sink_schedule_pump(conn);
    }

    fn lander_land(&mut self, conn: ConnId, device: &str, chunk: IncomingChunk) {
        let now = self.sink_instant();
        let bytes = chunk.encoded.len() as u64;
        let core = self.sink.core.as_mut().expect("running");
        let lane = chunk.lane;
        let generation_before = core.generation(device, lane);
        let landed_before = core.landed(device, lane);
        let broken_before = core.broken().is_some();
        let before = self.sink.disk.armed();
        let outcome = core.land(
            now,
            LandRequest {
                device,
                generation: chunk.generation,
                header: &chunk.header,
                encoded: &chunk.encoded,
            },
        );
        let after = self.sink.disk.armed();
        let fired_land = fired(before, after, |faults| faults.land);
        self.sink.observed.fired_land += fired_land;
        let broken_after = core.broken().is_some();
        self.sink.lander_bytes -= bytes;
        let stale = chunk.generation != generation_before || broken_before;
        let seq = chunk.seq;
        let mut problems = Vec::new();
        let refusal = match outcome {
            LandOutcome::Landed => {
                self.sink.mirror.landed(device, &chunk);
                self.sink.observed.landed += 1;
                self.sink.observed.bytes_landed += bytes;
                if stale || seq <= landed_before || fired_land > 0 {
                    problems.push(format!("{device}/{lane} seq {seq} landed (generation {} vs {generation_before}, landed {landed_before})", chunk.generation));
                }
                None
            }
            LandOutcome::Duplicate => {
                self.sink.observed.duplicates += 1;
                if stale || seq > landed_before {
                    problems.push(format!(
                        "{device}/{lane} seq {seq} dropped as a duplicate above landed {landed_before}"
                    ));
                }
                None
            }
            LandOutcome::Fenced => {
                self.sink.observed.fenced += 1;
                if !stale {
                    problems.push(format!(
                        "{device}/{lane} seq {seq} fenced with the lane's current generation {generation_before} (no rollback or epoch since its grant)"
                    ));
                }
                Some(LandingRefusal::Fenced)
            }
            LandOutcome::Failed(error) => {
                self.sink.observed.land_failures += 1;
                if fired_land == 0 {
                    problems.push(format!(
                        "{device}/{lane} seq {seq} failed to land without an injected fault: {error}"
                    ));
                }
                // `Lander::land`: publish the rolled-back lane, wake every session.
                self.sink.mirror.rolled_back(device, lane);
                self.sink.publish(device, lane);
                self.sink_notify_all();
                Some(LandingRefusal::StorageFailed(error.to_string()))
            }
        };
        trace!(
            self,
            "lander: conn#{conn} {device}/{lane} core seq {seq} (ring seq {}): {}",
            chunk.ring_seq,
            match &refusal {
                None if seq > landed_before && !stale => "landed",
                None => "duplicate",
                Some(LandingRefusal::Fenced) => "FENCED",
                Some(_) => "FAILED",
            }
        );
        for problem in problems {
            self.fail(format!("LANDING RULE BROKEN: {problem}"));
        }
        if let Some(refusal) = refusal {
            self.sink_input(conn, Input::Refusal(refusal));
        }
        if broken_after {
            self.schedule_operator_restart();
        }
        self.sink_wake_permit_waiters();
    }

    fn lander_commit(&mut self) {
        let core = self.sink.core.as_mut().expect("running");
        let before = self.sink.disk.armed();
        let result = core.commit();
        let after = self.sink.disk.armed();
        let fired_commit = fired(before, after, |faults| faults.commit);
        let fired_store = fired(before, after, |faults| faults.store_commit);
        let fired_recover = fired(before, after, |faults| faults.recover);
        self.sink.observed.fired_commit += fired_commit;
        self.sink.observed.fired_store_commit += fired_store;
        self.sink.observed.fired_recover += fired_recover;
        let commit_us = self.rng.range(1, self.sink.params.commit_us_max);
        self.sink.lander_free_at = self.now() + commit_us;
        match result {
            Ok(advanced) if advanced.is_empty() => {}
            Ok(advanced) => {
                self.sink.mirror.committed();
                self.sink.observed.commits += 1;
                if fired_commit + fired_store > 0 {
                    self.fail("a commit succeeded although an injected fault fired".to_string());
                }
                let mut problems = Vec::new();
                for ((device, lane), seq) in &advanced {
                    self.sink.publish(device, *lane);
                    let seen = self.sink.max_durable.entry((device.clone(), *lane)).or_insert(0);
                    if *seq < *seen {
                        problems.push(format!("{device}/{lane}: durable {seq} after {seen}"));
                    }
                    *seen = (*seen).max(*seq);
                }
                trace!(self, "lander: commit {:?}", advanced);
                for problem in problems {
                    self.fail(format!("DURABLE WATERMARK WENT BACKWARDS: {problem}"));
                }
                self.sink_notify_all();
            }
            Err(failure) => {
                self.sink.mirror.lost_pending();
                self.sink.observed.commit_failures += 1;
                if fired_commit + fired_store == 0 {
                    self.fail(format!("a commit failed without an injected fault: {}", failure.error));
                }
                trace!(
                    self,
                    "lander: COMMIT FAILED ({}); rolled back {:?}; broken {:?}",
                    failure.error,
                    failure.rolled_back,
                    failure.broken
                );
                for (device, lane) in &failure.rolled_back {
                    self.sink.publish(device, *lane);
                }
                self.sink_notify_all();
                if failure.broken.is_some() {
                    self.schedule_operator_restart();
                }
            }
        }
    }

    /// The sink's final state for the checks: the core (running), its stats checked.
    pub fn sink_final_stats(&mut self) -> (LandingStats, Observed) {
        let core = self.sink.core.take().expect("the sink runs at the end");
        self.sink_check_stats(&core);
        if let Err(problem) = self.sink.mirror.verify(&self.sink.disk) {
            self.fail(format!("DURABLE DATA MISMATCH at the end: {problem}"));
        }
        let stats = add_stats(self.sink.past_stats, *core.stats());
        let observed = add_observed(self.sink.past_observed, self.sink.observed);
        self.sink.core = Some(core);
        (stats, observed)
    }
}

/// `$a + $b` field by field, for structs of counters; the struct literal names every field, so a
/// field added to the struct and not here does not compile.
macro_rules! sum_fields {
    ($type:ident { $($field:ident),+ $(,)? } of $a:expr, $b:expr) => {
        $type { $($field: $a.$field + $b.$field),+ }
    };
}

fn add_stats(a: LandingStats, b: LandingStats) -> LandingStats {
    sum_fields!(LandingStats {
        chunks_landed, bytes_landed, duplicates_dropped, fenced_chunks, landing_failures, commits,
        commit_failures, epochs_started, sessions_granted,
    } of a, b)
}

fn add_observed(a: Observed, b: Observed) -> Observed {
    sum_fields!(Observed {
        landed, bytes_landed, duplicates, fenced, land_failures, commits, commit_failures, epochs, grants,
        fired_land, fired_commit, fired_store_commit, fired_bind, fired_recover, open_failures,
    } of a, b)
}
