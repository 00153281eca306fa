//! Honest devices: a producer, a model ring (`ring`), and an uplink that drives
//! `session::DeviceSession` exactly as `appliance/src/uplink.rs` does:
//! - connect (a handshake, or a timeout when the sink is down or the device partitioned), then
//!   `DeviceSession::new` with the ring's identity and next seqs;
//! - `poll_read` → a ring read on a "blocking thread" (a delay) → `handle_read` with the
//!   device's dictionaries; transmits → the control stream or the lane's stream (opened on first
//!   use); `handle_written` when the link took a lane transmit;
//! - events: `Acked` → one ring ack per lane at a time (`ack_wanted` / `ack_started` /
//!   `ack_running`), `RingBehind` → `renew_identity`, `Undeliverable` → counted (and checked
//!   against the model: only chunks built undeliverable may be reported);
//! - when the session closes, the acks already handed to the ring finish, the connection is
//!   closed with the session's code, and `Backoff::next_delay` (jitter from the seed) says when
//!   to reconnect.
//!
//! Edge faults: a power cut (the ring goes back to its last fsync, the session vanishes without
//! a word, a new boot id), a process restart (the ring keeps everything and fsyncs it when it
//! opens again), a recreation (factory reset or quarantine: an empty ring with a new identity),
//! a restore of the ring from an older backup (the sink may then hold seqs the ring has not
//! written: `RingBehind` and a new identity, or the old identity comes back as a new epoch; the
//! chunks it brings back may land again, which the design accepts), a partition.
//!
//! Producer: a chunk every `produce_mean_us` on average, on a lane by weight, with 1..records_max
//! records numbered globally and padding; sensor and media chunks may name one of the device's
//! dictionaries (or, rarely, one it lost). A `block` lane that is full keeps its chunk and
//! retries at the next tick; no record id is given to a chunk before the ring took it.

use std::time::Duration;

use protocol::{Codec, Lane, NO_DICTIONARY, SealedChunk};
use session::{Backoff, DeviceConfig, DeviceEvent, DeviceSession, Stream};

use crate::link::{ConnId, Dir, Payload, Peer, StreamKey};
use crate::ring::{Fate, LedgerChunk, ModelRing, Refused, RingState, Undeliverable};
use crate::rng::Rng;
use crate::scenario::DeviceParams;
use crate::time::MICROS_PER_MS;
use crate::world::{Event, Side, World};

/// A session that lasted this long was healthy (`appliance::uplink::HEALTHY_SESSION`).
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// A chunk the producer wants to append.
#[derive(Clone, Copy, Debug)]
pub struct ChunkPlan {
    pub lane: Lane,
    pub records: u32,
    pub pad: usize,
    /// Index into the device's dictionaries; `Some(usize::MAX)` names a lost dictionary.
    pub dictionary: Option<usize>,
}

const LOST_DICTIONARY: usize = usize::MAX;

pub struct DeviceConn {
    pub conn: ConnId,
    pub session: DeviceSession,
    pub started: u64,
    pub lane_streams: [Option<StreamKey>; Lane::COUNT],
    pub ack_wanted: [u64; Lane::COUNT],
    pub ack_started: [u64; Lane::COUNT],
    pub ack_running: [bool; Lane::COUNT],
    pub renewed: bool,
    pub wake_at: Option<u64>,
    /// The session closed; acks handed to the ring are finishing.
    pub closed: bool,
}

pub enum Uplink {
    /// Powered off.
    Down,
    /// Waiting out the backoff.
    Waiting,
    Connecting {
        conn: ConnId,
        started: u64,
    },
    Session(Box<DeviceConn>),
}

#[derive(Clone, Debug, Default)]
pub struct DeviceCounters {
    pub connects: u64,
    pub connect_failures: u64,
    pub sessions_ended: u64,
    pub chunks_sent: u64,
    pub dictionaries_sent: u64,
    pub acks: u64,
    pub undeliverable_events: u64,
    pub ring_identity_renewals: u64,
    /// Evicted records of rings this device no longer has (recreated).
    pub evicted_records_past_rings: u64,
    pub appends_refused: u64,
}

pub struct Device {
    pub index: usize,
    pub id: String,
    pub params: DeviceParams,
    pub ring: ModelRing,
    /// Every identity each ring storage had: (storage, ring id).
    pub identities: Vec<(u32, [u8; 16])>,
    pub dictionaries: Vec<(u32, Vec<u8>)>,
    pub lost_dictionary: u32,
    pub boot: u64,
    pub boot_id: [u8; 16],
    pub up: bool,
    pub uplink: Uplink,
    pub backoff: Backoff,
    pub held: [Option<ChunkPlan>; Lane::COUNT],
    pub partitioned_until: u64,
    pub counters: DeviceCounters,
    /// An older copy of the ring's data partition: (ring storage, fsynced state, append count).
    pub backup: Option<(u32, RingState, u64)>,
}

fn new_backoff(params: &DeviceParams) -> Backoff {
    let min = Duration::from_millis(params.backoff_min_ms.max(1));
    let max = Duration::from_millis(params.backoff_max_ms.max(params.backoff_min_ms.max(1)));
    Backoff::new(min, max, HEALTHY_SESSION)
}

impl Device {
    pub fn new(index: usize, params: DeviceParams, rng: &mut Rng) -> Device {
        let identity = rng.bytes16();
        let dictionaries = (0..params.dictionary_count)
            .map(|_| {
                let length = rng.range_usize(1, params.dictionary_bytes_max);
                let bytes = rng.bytes(length);
                (protocol::dictionary_id(&bytes), bytes)
            })
            .collect();
        let lost_dictionary = protocol::dictionary_id(&rng.bytes(32));
        Device {
            index,
            id: params.id.clone(),
            ring: ModelRing::new(params.ring.clone(), identity, 0),
            identities: vec![(0, identity)],
            dictionaries,
            lost_dictionary,
            boot: 0,
            boot_id: rng.bytes16(),
            up: false,
            uplink: Uplink::Down,
            backoff: new_backoff(&params),
            held: Default::default(),
            partitioned_until: 0,
            counters: DeviceCounters::default(),
            backup: None,
            params,
        }
    }

    fn session_mut(&mut self, conn: ConnId) -> Option<&mut DeviceConn> {
        match &mut self.uplink {
            Uplink::Session(session) if session.conn == conn => Some(session),
            _ => None,
        }
    }
}

impl World {
    // ---- power and boot ----

    pub fn device_boot(&mut self, device: usize) {
        let boot_id = self.rng.bytes16();
        let state = &mut self.devices[device];
        // `Ring::open` fsyncs: after a process restart what the page cache kept is durable now.
        state.ring.sync();
        state.up = true;
        state.boot_id = boot_id;
        state.backoff = new_backoff(&state.params);
        state.uplink = Uplink::Waiting;
        let boot = state.boot;
        trace!(self, "{}: boot", self.devices[device].id);
        self.queue.after(0, Event::DeviceReconnect { device, boot });
    }

    /// The device goes away without a word: the sink finds out by an idle timeout.
    fn device_vanishes(&mut self, device: usize) {
        let conn = match &self.devices[device].uplink {
            Uplink::Connecting { conn, .. } => Some(*conn),
            Uplink::Session(session) => Some(session.conn),
            _ => None,
        };
        if let Some(conn) = conn {
            self.break_connection(conn, "the device lost power or restarted");
            if let Some(connection) = self.connections.get_mut(&conn) {
                connection.device_open = false;
            }
        }
        let reboot = self.rng.range(1, self.devices[device].params.reboot_us_max);
        let state = &mut self.devices[device];
        state.up = false;
        state.boot += 1;
        state.uplink = Uplink::Down;
        state.held = Default::default();
        let boot = state.boot;
        self.queue.after(reboot, Event::DeviceBoot { device, boot });
    }

    pub fn power_cut(&mut self, device: usize) {
        trace!(self, "{}: POWER CUT", self.devices[device].id);
        // Fates: what the last fsync holds is back in the ring (even if trimmed or evicted since);
        // what was appended after it is lost.
        let state = &self.devices[device];
        let storage = state.ring.storage;
        let synced_writes = state.ring.synced_writes();
        let mut in_synced = std::collections::BTreeSet::new();
        for lane in &state.ring.synced().lanes {
            in_synced.extend(lane.chunks.values().map(|chunk| chunk.ledger));
        }
        for (index, chunk) in self.ledger.chunks.iter_mut().enumerate() {
            if chunk.device != device || chunk.storage != storage {
                continue;
            }
            if in_synced.contains(&index) {
                if chunk.fate == Fate::Evicted {
                    self.tally.evictions_undone += 1;
                }
                chunk.fate = Fate::InRing;
            } else if chunk.write_number >= synced_writes {
                chunk.fate = Fate::LostPowerCut;
            }
        }
        self.devices[device].ring.power_cut();
        self.device_vanishes(device);
    }

    /// Someone copies the data partition (what `restore_backup` may bring back later).
    pub fn take_backup(&mut self, device: usize) {
        let state = &mut self.devices[device];
        let (ring, writes) = state.ring.backup();
        state.backup = Some((state.ring.storage, ring, writes));
        trace!(self, "{}: backup of the ring taken", self.devices[device].id);
    }

    /// The ring comes back from the backup (an operator restored it, or an old image booted):
    /// what it held then is back, what was appended since is lost, and the sink may hold seqs
    /// this ring has not written (`RingBehind`).
    pub fn restore_backup(&mut self, device: usize) -> bool {
        let state = &self.devices[device];
        let Some((storage, ring, writes)) = state.backup.clone() else { return false };
        if storage != state.ring.storage {
            return false;
        }
        trace!(
            self,
            "{}: RING RESTORED FROM A BACKUP (ring {})",
            self.devices[device].id,
            hex(&ring.identity)
        );
        let mut restored = std::collections::BTreeSet::new();
        for lane in &ring.lanes {
            restored.extend(lane.chunks.values().map(|chunk| chunk.ledger));
        }
        for (index, chunk) in self.ledger.chunks.iter_mut().enumerate() {
            if chunk.device != device || chunk.storage != storage {
                continue;
            }
            if restored.contains(&index) {
                chunk.fate = Fate::InRing;
                chunk.restored += 1;
            } else if chunk.write_number >= writes {
                chunk.fate = Fate::LostRestore;
            }
        }
        let identity = ring.identity;
        self.devices[device].ring.restore(ring);
        if !self.devices[device].identities.contains(&(storage, identity)) {
            self.devices[device].identities.push((storage, identity));
        }
        self.device_vanishes(device);
        true
    }

    pub fn restart(&mut self, device: usize) {
        trace!(self, "{}: process restart", self.devices[device].id);
        self.device_vanishes(device);
    }

    pub fn recreate(&mut self, device: usize) {
        trace!(self, "{}: RING RECREATED (factory reset)", self.devices[device].id);
        let identity = self.rng.bytes16();
        let state = &mut self.devices[device];
        let storage = state.ring.storage;
        state.counters.evicted_records_past_rings += state.ring.evicted_records();
        for chunk in
            self.ledger.chunks.iter_mut().filter(|chunk| chunk.device == device && chunk.storage == storage)
        {
            if chunk.fate == Fate::InRing {
                chunk.fate = Fate::LostRecreation;
            }
        }
        state.ring = ModelRing::new(state.params.ring.clone(), identity, storage + 1);
        state.identities.push((storage + 1, identity));
        self.device_vanishes(device);
    }

    pub fn partition(&mut self, device: usize, length: u64) {
        trace!(self, "{}: partitioned for {} ms", self.devices[device].id, length / MICROS_PER_MS);
        let until = self.now() + length;
        let state = &mut self.devices[device];
        state.partitioned_until = state.partitioned_until.max(until);
        let conn = match &state.uplink {
            Uplink::Session(session) => Some(session.conn),
            _ => None,
        };
        if let Some(conn) = conn {
            self.break_connection(conn, "partition");
        }
    }

    // ---- the producer ----

    pub fn produce(&mut self, device: usize) {
        if self.healing {
            return;
        }
        let mean = self.devices[device].params.produce_mean_us;
        let next = self.rng.exponential_us(mean);
        self.queue.after(next, Event::Produce { device });
        if !self.devices[device].up {
            return;
        }
        let params = self.devices[device].params.clone();
        let total: u64 = params.lane_weights.iter().sum();
        let mut pick = self.rng.below(total);
        let lane = Lane::ALL
            .into_iter()
            .find(|lane| {
                let weight = params.lane_weights[lane.index()];
                if pick < weight {
                    true
                } else {
                    pick -= weight;
                    false
                }
            })
            .expect("weights sum to total");
        let plan = match self.devices[device].held[lane.index()].take() {
            Some(plan) => plan,
            None => {
                let records = self.rng.range(1, u64::from(params.records_max)) as u32;
                let pad = self.rng.range_usize(0, params.pad_bytes_max);
                let dictionary = if matches!(lane, Lane::Sensor | Lane::Media)
                    && self.rng.chance(params.missing_dictionary_chance)
                {
                    Some(LOST_DICTIONARY)
                } else if !self.devices[device].dictionaries.is_empty()
                    && self.rng.chance(params.dictionary_chance)
                {
                    Some(self.rng.range_usize(0, self.devices[device].dictionaries.len() - 1))
                } else {
                    None
                };
                ChunkPlan { lane, records, pad, dictionary }
            }
        };
        self.append(device, plan);
    }

    fn append(&mut self, device: usize, plan: ChunkPlan) {
        let needed = (protocol::CHUNK_HEADER_LEN + 8 * plan.records as usize + plan.pad) as u64;
        let result = self.devices[device].ring.make_room(plan.lane, needed);
        let evicted = match &result {
            Ok(evicted) | Err((_, evicted)) => evicted.clone(),
        };
        for chunk in evicted {
            let entry = &mut self.ledger.chunks[chunk.ledger];
            assert_eq!(entry.fate, Fate::InRing, "only chunks in the ring are evicted");
            entry.fate = Fate::Evicted;
            trace!(
                self,
                "{}: evicted {} seq {} ({} records)",
                self.devices[device].id,
                entry.lane,
                entry.seq,
                entry.records
            );
        }
        match result {
            Err((Refused::TooLarge, _)) => {
                self.fail(format!(
                    "{}: the producer built a chunk of {needed} bytes the ring can never take",
                    self.devices[device].id
                ));
            }
            Err((Refused::Full, _)) => {
                self.devices[device].counters.appends_refused += 1;
                self.devices[device].held[plan.lane.index()] = Some(plan);
            }
            Ok(_) => {
                let first_record = self.next_record;
                self.next_record += u64::from(plan.records);
                let mut body = Vec::with_capacity(needed as usize);
                for record in first_record..first_record + u64::from(plan.records) {
                    body.extend_from_slice(&record.to_le_bytes());
                }
                let mut pad = vec![0u8; plan.pad];
                self.rng.fill(&mut pad);
                body.extend_from_slice(&pad);
                let frame_bytes_max = self.scenario.sink.session.frame_bytes_max;
                let state = &self.devices[device];
                let (dict_id, mut undeliverable) = match plan.dictionary {
                    None => (NO_DICTIONARY, None),
                    Some(LOST_DICTIONARY) => (state.lost_dictionary, Some(Undeliverable::MissingDictionary)),
                    Some(index) => {
                        let (dict_id, bytes) = &state.dictionaries[index];
                        let frame = protocol::FRAME_KIND_BYTES + 4 + bytes.len();
                        (*dict_id, (frame > frame_bytes_max).then_some(Undeliverable::DictionaryTooLarge))
                    }
                };
                let raw_len = body.len() as u32;
                let chunk = SealedChunk::new(plan.lane, Codec::Raw, dict_id, plan.records, raw_len, body)
                    .expect("the producer builds chunks within the protocol's bounds");
                let seq = state.ring.lane(plan.lane).next_seq;
                let encoded = chunk.encode(seq);
                if protocol::FRAME_KIND_BYTES + encoded.len() > frame_bytes_max {
                    undeliverable = Some(Undeliverable::ChunkTooLarge);
                }
                let ledger = self.ledger.push(LedgerChunk {
                    device,
                    storage: state.ring.storage,
                    lane: plan.lane,
                    seq,
                    first_record,
                    records: plan.records,
                    dict_id,
                    write_number: 0,
                    appended_at: self.queue.now,
                    fate: Fate::InRing,
                    undeliverable,
                    reported_undeliverable: false,
                    restored: 0,
                });
                let ring = &mut self.devices[device].ring;
                let put = ring.put(plan.lane, ledger, encoded, plan.records);
                assert_eq!(put, seq);
                self.ledger.chunks[ledger].write_number = ring.lane(plan.lane).chunks[&seq].write_number;
                trace!(
                    self,
                    "{}: append {} seq {seq} records {}..{} dict {dict_id:08x}{}",
                    self.devices[device].id,
                    plan.lane,
                    first_record,
                    first_record + u64::from(plan.records) - 1,
                    undeliverable.map_or(String::new(), |why| format!(" (undeliverable: {why:?})"))
                );
            }
        }
    }

    pub fn ring_sync(&mut self, device: usize) {
        if let crate::ring::Durability::Periodic { sync_interval_us } =
            self.devices[device].params.ring.durability
        {
            if self.devices[device].up {
                self.devices[device].ring.sync();
            }
            self.queue.after(sync_interval_us, Event::RingSync { device });
        }
    }

    // ---- the uplink ----

    pub fn device_reconnect(&mut self, device: usize, boot: u64) {
        let state = &self.devices[device];
        if state.boot != boot || !state.up || !matches!(state.uplink, Uplink::Waiting) {
            return;
        }
        let conn = self.new_connection(Peer::Honest(device), self.devices[device].id.clone());
        let handshake = self.connections[&conn].handshake_us();
        self.devices[device].uplink = Uplink::Connecting { conn, started: self.now() };
        trace!(self, "{}: connecting (conn#{conn})", self.devices[device].id);
        self.queue.after(handshake, Event::DeviceConnected { device, conn });
    }

    pub fn device_connected(&mut self, device: usize, conn: ConnId) {
        let Uplink::Connecting { conn: connecting, started } = self.devices[device].uplink else { return };
        if connecting != conn {
            return;
        }
        let reachable = self.sink.accepting()
            && self.devices[device].partitioned_until <= self.now()
            && self.connections.get(&conn).is_some_and(|connection| !connection.broken);
        if !reachable {
            let timeout_at = started + self.scenario.link.connect_timeout_us;
            self.queue.at(timeout_at, Event::DeviceConnectFailed { device, conn });
            return;
        }
        self.devices[device].counters.connects += 1;
        self.sink_accept(conn, None);
        let now = self.clock.instant(self.now());
        let state = &mut self.devices[device];
        let params = &state.params;
        let config = DeviceConfig {
            device_id: state.id.clone(),
            boot_id: state.boot_id,
            ring_id: state.ring.identity(),
            lanes: Lane::ALL.to_vec(),
            welcome_timeout: Duration::from_millis(params.welcome_timeout_ms),
            read_chunks_max: params.read_chunks_max.max(1),
            read_bytes_max: params.read_bytes_max.max(1),
            idle_poll: Duration::from_millis(params.idle_poll_ms),
            in_flight_bytes_max: params.in_flight_bytes_max.max(1),
        };
        let session = DeviceSession::new(config, state.ring.next_seqs(), now);
        state.uplink = Uplink::Session(Box::new(DeviceConn {
            conn,
            session,
            started,
            lane_streams: [None; Lane::COUNT],
            ack_wanted: [0; Lane::COUNT],
            ack_started: [0; Lane::COUNT],
            ack_running: [false; Lane::COUNT],
            renewed: false,
            wake_at: None,
            closed: false,
        }));
        trace!(
            self,
            "{}: connected (conn#{conn}), ring {}",
            self.devices[device].id,
            hex(&self.devices[device].ring.identity())
        );
        self.device_drive(device);
    }

    pub fn device_connect_failed(&mut self, device: usize, conn: ConnId) {
        let Uplink::Connecting { conn: connecting, started } = self.devices[device].uplink else { return };
        if connecting != conn {
            return;
        }
        self.devices[device].counters.connect_failures += 1;
        if let Some(connection) = self.connections.get_mut(&conn) {
            connection.device_open = false;
        }
        trace!(self, "{}: connect failed (conn#{conn})", self.devices[device].id);
        self.device_backoff(device, started, false);
    }

    fn device_backoff(&mut self, device: usize, started: u64, at_once: bool) {
        let jitter = self.rng.float(session::backoff::JITTER_MIN, session::backoff::JITTER_MAX);
        let ran_for = Duration::from_micros(self.now() - started);
        let state = &mut self.devices[device];
        let delay = state.backoff.next_delay(ran_for, jitter, at_once);
        state.uplink = Uplink::Waiting;
        let boot = state.boot;
        self.queue.after(delay.as_micros() as u64, Event::DeviceReconnect { device, boot });
    }

    /// `SessionDriver::drive` and the end of `SessionDriver::run`: reads, transmits, events,
    /// acks, and when the session is closed and its acks are done, the reconnect.
    pub fn device_drive(&mut self, device: usize) {
        let now_us = self.now();
        let now = self.clock.instant(now_us);
        let latency_max = self.devices[device].params.ring_latency_us_max;
        let Uplink::Session(mut conn_state) =
            std::mem::replace(&mut self.devices[device].uplink, Uplink::Waiting)
        else {
            return;
        };
        let conn = conn_state.conn;
        if !conn_state.closed {
            while let Some(request) = conn_state.session.poll_read(now) {
                let delay = self.rng.range(1, latency_max);
                self.queue.after(
                    delay,
                    Event::DeviceRead {
                        device,
                        conn,
                        lane: request.lane,
                        from_seq: request.from_seq,
                        chunks_max: request.chunks_max,
                        bytes_max: request.bytes_max,
                    },
                );
            }
            while let Some(transmit) = conn_state.session.poll_transmit() {
                match transmit.stream {
                    Stream::Control => {
                        self.send(conn, Dir::Up, StreamKey::Control, Payload::Bytes(transmit.bytes));
                    }
                    Stream::Lane(lane) => {
                        let stream = match conn_state.lane_streams[lane.index()] {
                            Some(stream) => stream,
                            None => {
                                let stream = match self.connections.get_mut(&conn) {
                                    Some(connection) => connection.open_uni(),
                                    None => StreamKey::Uni(u64::MAX),
                                };
                                conn_state.lane_streams[lane.index()] = Some(stream);
                                stream
                            }
                        };
                        let bytes = transmit.bytes.len();
                        let taken_at = self.send(conn, Dir::Up, stream, Payload::Bytes(transmit.bytes));
                        self.queue.at(taken_at, Event::DeviceWritten { device, conn, lane, bytes });
                    }
                }
            }
        }
        while let Some(event) = conn_state.session.poll_event() {
            match event {
                DeviceEvent::Welcomed => trace!(self, "{}: welcomed (conn#{conn})", self.devices[device].id),
                DeviceEvent::Acked { lane, through } => {
                    trace!(self, "{}: acked {lane} through {through} (conn#{conn})", self.devices[device].id);
                    self.devices[device].counters.acks += 1;
                    conn_state.ack_wanted[lane.index()] = conn_state.ack_wanted[lane.index()].max(through);
                }
                DeviceEvent::AckLatency { .. } => {}
                DeviceEvent::RingBehind { lane, resume_seq, ring_next_seq } => {
                    let identity = self.rng.bytes16();
                    let state = &mut self.devices[device];
                    state.ring.renew_identity(identity);
                    let storage = state.ring.storage;
                    state.identities.push((storage, identity));
                    state.counters.ring_identity_renewals += 1;
                    conn_state.renewed = true;
                    trace!(
                        self,
                        "{}: RING BEHIND on {lane} (sink resumes at {resume_seq}, ring next {ring_next_seq}): new identity {}",
                        self.devices[device].id,
                        hex(&identity)
                    );
                }
                DeviceEvent::Undeliverable { lane, seq, reason } => {
                    self.devices[device].counters.undeliverable_events += 1;
                    let ledger =
                        self.devices[device].ring.lane(lane).chunks.get(&seq).map(|chunk| chunk.ledger);
                    match ledger {
                        Some(ledger) if self.ledger.chunks[ledger].undeliverable.is_some() => {
                            self.ledger.chunks[ledger].reported_undeliverable = true;
                            trace!(
                                self,
                                "{}: undeliverable {lane} seq {seq}: {reason}", self.devices[device].id
                            );
                        }
                        _ => {
                            let id = self.devices[device].id.clone();
                            self.fail(format!("{id}: the session reported {lane} seq {seq} undeliverable ({reason}), but it is deliverable"));
                        }
                    }
                }
                DeviceEvent::Closed => {
                    let close = conn_state.session.close().cloned().expect("a closed session has a close");
                    trace!(
                        self,
                        "{}: session closed (conn#{conn}): {} by_sink={} {}",
                        self.devices[device].id,
                        close.code,
                        close.by_peer,
                        close.reason
                    );
                    if !close.by_peer && !crate::hostile::is_transient(close.code) {
                        let id = self.devices[device].id.clone();
                        self.fail(format!(
                            "{id}: the device session closed with {}: {} (the sink is honest)",
                            close.code, close.reason
                        ));
                    }
                }
            }
        }
        if !conn_state.closed {
            for lane in Lane::ALL {
                let index = lane.index();
                let wanted = conn_state.ack_wanted[index];
                if wanted > conn_state.ack_started[index] && !conn_state.ack_running[index] {
                    conn_state.ack_started[index] = wanted;
                    conn_state.ack_running[index] = true;
                    let delay = self.rng.range(1, latency_max);
                    let boot = self.devices[device].boot;
                    self.queue
                        .after(delay, Event::DeviceAckDone { device, boot, conn, lane, through: wanted });
                }
            }
            if conn_state.session.is_closed() {
                conn_state.closed = true;
            }
        }
        if conn_state.closed {
            if conn_state.ack_running.iter().any(|&running| running) {
                self.devices[device].uplink = Uplink::Session(conn_state);
                return;
            }
            // `connect_and_run`: close the connection with the session's code, then back off.
            let close = conn_state.session.close().cloned().expect("closed");
            self.devices[device].counters.sessions_ended += 1;
            if self.connections.get(&conn).is_some_and(|connection| connection.device_open) {
                self.close_connection(
                    conn,
                    Side::Device,
                    format!("closed by the device: {} {}", close.code, close.reason),
                );
            }
            self.device_backoff(device, conn_state.started, conn_state.renewed);
            return;
        }
        if let Some(deadline) = conn_state.session.poll_timeout() {
            let at = self.clock.micros(deadline).max(now_us);
            if conn_state.wake_at.is_none_or(|scheduled| at < scheduled) {
                conn_state.wake_at = Some(at);
                self.queue.at(at, Event::DeviceWake { device, conn });
            }
        }
        self.devices[device].uplink = Uplink::Session(conn_state);
    }

    pub fn device_wake(&mut self, device: usize, conn: ConnId) {
        let now_us = self.now();
        let now = self.clock.instant(now_us);
        let Some(state) = self.devices[device].session_mut(conn) else { return };
        if state.wake_at != Some(now_us) {
            return;
        }
        state.wake_at = None;
        state.session.handle_timeout(now);
        self.device_drive(device);
    }

    pub fn device_read(
        &mut self,
        device: usize,
        conn: ConnId,
        lane: Lane,
        from_seq: u64,
        chunks_max: usize,
        bytes_max: usize,
    ) {
        let now = self.clock.instant(self.now());
        let state = &mut self.devices[device];
        let chunks = state.ring.read_from(lane, from_seq, chunks_max, bytes_max);
        let dictionaries = state.dictionaries.clone();
        let Uplink::Session(conn_state) = &mut state.uplink else { return };
        if conn_state.conn != conn {
            return;
        }
        let mut dictionary =
            |dict_id: u32| dictionaries.iter().find(|(id, _)| *id == dict_id).map(|(_, bytes)| bytes.clone());
        let summary = conn_state.session.handle_read(now, lane, chunks, &mut dictionary);
        state.counters.chunks_sent += summary.chunks;
        state.counters.dictionaries_sent += summary.dictionaries;
        self.device_drive(device);
    }

    pub fn device_written(&mut self, device: usize, conn: ConnId, lane: Lane, bytes: usize) {
        let Some(state) = self.devices[device].session_mut(conn) else { return };
        state.session.handle_written(lane, bytes);
        self.device_drive(device);
    }

    pub fn device_ack_done(&mut self, device: usize, boot: u64, conn: ConnId, lane: Lane, through: u64) {
        if self.devices[device].boot != boot {
            return; // The ring's writer never ran it: the device lost power first.
        }
        let id = self.devices[device].id.clone();
        match self.devices[device].ring.ack(lane, through) {
            Ok(trimmed) => {
                let trimmed_any = !trimmed.is_empty();
                for chunk in trimmed {
                    let fate = if self.ledger.chunks[chunk.ledger].undeliverable.is_some() {
                        Fate::Trimmed
                    } else {
                        self.check_durable_at_sink(device, chunk.ledger)
                    };
                    self.ledger.chunks[chunk.ledger].fate = fate;
                }
                if !trimmed_any {
                    trace!(self, "{id}: ring trimmed nothing new of {lane} through {through}");
                } else {
                    self.last_progress = self.now();
                    trace!(self, "{id}: ring trimmed {lane} through {through}");
                }
            }
            Err(error) => self.fail(format!("{id}: {error}")),
        }
        if let Some(state) = self.devices[device].session_mut(conn) {
            state.ack_running[lane.index()] = false;
            self.device_drive(device);
        }
    }

    /// Invariant: a chunk the ring deletes on an Ack is durable at the sink.
    fn check_durable_at_sink(&mut self, device: usize, ledger: usize) -> Fate {
        let entry = self.ledger.chunks[ledger].clone();
        let id = self.devices[device].id.clone();
        if self.sink.mirror.holds(entry.first_record) {
            return Fate::Trimmed;
        }
        {
            self.fail(format!(
                "ACKED DATA NOT DURABLE: {id} trimmed {} seq {} (records {}..{}) on an Ack, but the sink's durable data does not hold it",
                entry.lane,
                entry.seq,
                entry.first_record,
                entry.first_record + u64::from(entry.records) - 1
            ));
        }
        Fate::Trimmed
    }

    pub fn device_deliver(&mut self, device: usize, conn: ConnId, payload: Payload) {
        let now = self.clock.instant(self.now());
        let Some(state) = self.devices[device].session_mut(conn) else { return };
        match payload {
            Payload::Bytes(bytes) => state.session.handle_control_bytes(now, &bytes),
            Payload::Fin => state.session.handle_control_finished(),
        }
        self.device_drive(device);
    }

    pub fn device_connection_lost(&mut self, device: usize, conn: ConnId, reason: &str) {
        if let Uplink::Connecting { conn: connecting, started } = self.devices[device].uplink
            && connecting == conn
        {
            self.devices[device].counters.connect_failures += 1;
            self.device_backoff(device, started, false);
            return;
        }
        let Some(state) = self.devices[device].session_mut(conn) else { return };
        state.session.connection_lost(reason);
        self.device_drive(device);
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().take(4).map(|byte| format!("{byte:02x}")).collect()
}
