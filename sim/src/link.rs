//! Simulated QUIC connections, at the level the state machines see them: ordered byte streams.
//!
//! A connection has one bidirectional control stream (device → sink and sink → device) and the
//! unidirectional streams the device opens (one per lane for honest devices, any number for
//! hostile ones). QUIC turns packet loss, reordering and duplication into delay within a stream,
//! so that is what is modelled:
//! - a sender's bytes are *taken* by the link at the connection's throughput (a slow link makes
//!   the writer wait, which is what backs the session up into the ring);
//! - taken bytes are cut into random fragments, each delivered after the latency plus a random
//!   jitter, never before the fragment ahead of it on the same stream (order within a stream),
//!   while streams interleave freely;
//! - a connection can break (route loss, NAT rebinding, an idle timeout): everything in flight is
//!   lost and each side learns it on its own, at a different time (see `World::break_connection`);
//! - a side can close it (with an error code): the other side learns after one latency.
//!
//! Limits: at most [`FRAGMENTS_IN_FLIGHT_MAX`] fragments in flight per connection (the sessions'
//! in-flight bounds keep real runs far below it; reaching it means the simulator lost a bound).

use std::collections::BTreeMap;

use crate::rng::Rng;

pub type ConnId = u64;

/// Fragments one connection may have in flight at once.
pub const FRAGMENTS_IN_FLIGHT_MAX: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dir {
    /// Device → sink.
    Up,
    /// Sink → device.
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StreamKey {
    Control,
    /// A unidirectional stream the device opened, by QUIC stream id.
    Uni(u64),
}

#[derive(Clone, Debug)]
pub enum Payload {
    Bytes(Vec<u8>),
    /// The sender finished the stream.
    Fin,
}

/// Who the device end of a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Honest(usize),
    Hostile(usize),
}

#[derive(Clone, Copy, Debug)]
pub struct LinkParams {
    pub latency_us: u64,
    pub jitter_us: u64,
    /// Throughput, each direction.
    pub bytes_per_ms: u64,
    pub fragment_bytes_max: usize,
    /// Chance that a transmit travels as one fragment.
    pub whole_chance: f64,
}

pub struct Connection {
    pub id: ConnId,
    pub peer: Peer,
    /// The device id its certificate names.
    pub device_id: String,
    pub params: LinkParams,
    /// Routes gone: nothing more is delivered.
    pub broken: bool,
    /// Each end, until it closed or learned the connection is gone.
    pub device_open: bool,
    pub sink_open: bool,
    send_free_at: [u64; 2],
    last_delivery: BTreeMap<(Dir, StreamKey), u64>,
    next_uni: u64,
    pub fragments_in_flight: usize,
}

impl Connection {
    pub fn new(id: ConnId, peer: Peer, device_id: String, params: LinkParams) -> Connection {
        Connection {
            id,
            peer,
            device_id,
            params,
            broken: false,
            device_open: true,
            sink_open: false,
            send_free_at: [0; 2],
            last_delivery: BTreeMap::new(),
            next_uni: 0,
            fragments_in_flight: 0,
        }
    }

    /// A new unidirectional stream of the device (QUIC numbers client uni streams 2, 6, 10…).
    pub fn open_uni(&mut self) -> StreamKey {
        let id = 2 + 4 * self.next_uni;
        self.next_uni += 1;
        StreamKey::Uni(id)
    }

    /// The handshake: about one round trip.
    pub fn handshake_us(&self) -> u64 {
        2 * self.params.latency_us + self.params.jitter_us
    }

    /// Hands `payload` to the link. Returns when the link took it (the writer's `write_all`
    /// returns) and the deliveries `(at, fragment)` to schedule, in order.
    pub fn send(
        &mut self,
        rng: &mut Rng,
        now: u64,
        dir: Dir,
        stream: StreamKey,
        payload: Payload,
    ) -> (u64, Vec<(u64, Payload)>) {
        let side = dir as usize;
        let length = match &payload {
            Payload::Bytes(bytes) => bytes.len() as u64,
            Payload::Fin => 0,
        };
        let taken_at = self.send_free_at[side].max(now) + length * 1_000 / self.params.bytes_per_ms.max(1);
        self.send_free_at[side] = taken_at;
        let fragments = match payload {
            Payload::Fin => vec![Payload::Fin],
            Payload::Bytes(bytes) if bytes.is_empty() => Vec::new(),
            Payload::Bytes(bytes) if rng.chance(self.params.whole_chance) => vec![Payload::Bytes(bytes)],
            Payload::Bytes(bytes) => {
                let mut pieces = Vec::new();
                let mut rest = &bytes[..];
                while !rest.is_empty() {
                    let size = rng.range_usize(1, self.params.fragment_bytes_max.max(1)).min(rest.len());
                    pieces.push(Payload::Bytes(rest[..size].to_vec()));
                    rest = &rest[size..];
                }
                pieces
            }
        };
        let last = self.last_delivery.entry((dir, stream)).or_insert(0);
        let mut deliveries = Vec::with_capacity(fragments.len());
        for fragment in fragments {
            let at = (taken_at + self.params.latency_us + rng.below(self.params.jitter_us + 1)).max(*last);
            *last = at;
            deliveries.push((at, fragment));
        }
        self.fragments_in_flight += deliveries.len();
        assert!(
            self.fragments_in_flight <= FRAGMENTS_IN_FLIGHT_MAX,
            "connection {} has {} fragments in flight",
            self.id,
            self.fragments_in_flight
        );
        (taken_at, deliveries)
    }

    /// How long a close notice takes to reach the other side.
    pub fn one_way_us(&self, rng: &mut Rng) -> u64 {
        self.params.latency_us + rng.below(self.params.jitter_us + 1)
    }
}
