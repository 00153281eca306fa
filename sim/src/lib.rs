//! Tributary's deterministic simulator, in the style of TigerBeetle's VOPR and FoundationDB's
//! simulation testing: one `u64` seed drives a whole fleet — honest appliances with their rings,
//! hostile devices, lossy links and a sink — through the real `session` state machines and the
//! real `landing::LandingCore`, with faults everywhere, and then checks that the design's
//! invariants held.
//!
//! Layout:
//! - [`rng`]: the PRNG (xoshiro256** seeded by SplitMix64), the only source of randomness;
//! - [`time`]: virtual microseconds, `Instant`s for the state machines, the event queue;
//! - [`scenario`]: what a seed simulates, drawn within named bounds;
//! - [`ring`]: the model of an appliance ring and the ledger of every chunk's fate;
//! - [`link`]: QUIC connections as ordered, fragmented, delayed byte streams that break;
//! - [`device`]: honest appliances (producer, ring, uplink driving `DeviceSession`);
//! - [`sink`]: the sink (sessions driving `SinkSession`, the lander driving `LandingCore`);
//! - [`hostile`]: devices that break the protocol on purpose, and the codes that must close them;
//! - [`world`]: the event loop, fault injection, healing and convergence;
//! - [`check`]: the final invariants and the report;
//! - [`trace`]: the bounded trace of the last events.
//!
//! **Invariant:** nothing here reads the wall clock (beyond one `Instant` as the base of virtual
//! time), spawns a thread, does I/O or iterates a hash map in a way that changes what happens: a
//! seed replays the same run, event for event. `run_seed` relies on it: a failing seed is run a
//! second time with the trace on, and a failure that does not come back is reported as
//! nondeterminism.
//!
//! What a run checks (see [`check`] and the modules that check while running): every chunk an
//! honest ring deleted on an Ack was durable at the sink at that moment; after healing, every
//! chunk that stayed durable in its ring is in the sink's durable data exactly once, and nothing
//! is there twice whatever happened to it; core seqs strictly increase per (device, lane) and are
//! `base + ring seq` of an epoch the device had; durable watermarks never go backwards, across
//! sink crashes too; the rings' eviction counts and the sessions' `Undeliverable` reports match
//! the ledger; `LandingStats` match the outcomes the simulator saw and the faults that fired;
//! honest sessions are never closed for a protocol violation, hostile ones always with their
//! code; nothing panics (a panic fails the seed with its message).
//!
//! Limits: every queue has a named bound (`time::EVENTS_QUEUED_MAX`,
//! `link::FRAGMENTS_IN_FLIGHT_MAX`, `sink::SINK_INPUTS_QUEUED_MAX`, `trace::TRACE_TAIL_LINES`;
//! the lander's queue is bounded by its byte permits, `scenario::SinkParams::permits_bytes`);
//! the ledger of chunks grows with the run and is the oracle, not a queue. A run ends at most
//! `scenario::HEAL_MAX_US` of virtual time after healing, converged or failed, and fails
//! earlier when nothing progresses for 30 s of virtual time after healing.
//!
//! Not modelled: QUIC itself (loss, reordering, duplication and congestion appear only as delay,
//! fragmentation and broken connections; no flow-control windows beyond the writers' pacing;
//! connection migration, 0-RTT and TLS are out); certificates (a session's device id is given);
//! the real ring's LMDB layer (segments, map size, free-list reuse, per-lane byte caps,
//! `block` timeouts, quarantine of damaged chunks) — the model keeps the rules the protocol
//! relies on; zstd (chunks are `Codec::Raw`, dictionaries are random bytes the sink only stores);
//! the sink's datasets, archive and raw-file layout (`MemoryDisk` stands in for `RawLanding` and
//! `SinkState`); several sink nodes; the appliance's sources, chunker and inference API; clock
//! skew between machines (one virtual clock).

/// Formats a trace line only when the trace is on (formatting costs more than most events).
macro_rules! trace {
    ($world:expr, $($argument:tt)*) => {
        if $world.tracing {
            let now = $world.queue.now;
            $world.trace.borrow_mut().line(now, format!($($argument)*));
        }
    };
}

pub mod check;
pub mod device;
pub mod hostile;
pub mod link;
pub mod ring;
pub mod rng;
pub mod scenario;
pub mod sink;
pub mod time;
pub mod trace;
pub mod world;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;

use landing::LandingStats;

use crate::trace::{TRACE_TAIL_LINES, Trace};
use crate::world::World;

#[derive(Clone, Debug)]
pub struct Options {
    /// Print every trace line as it happens (to stderr).
    pub verbose: bool,
    /// Long runs (minutes of virtual time, more faults, hostiles in most seeds): the soak mode.
    pub long: bool,
    /// Lines of trace a failure report keeps.
    pub trace_lines: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { verbose: false, long: false, trace_lines: TRACE_TAIL_LINES }
    }
}

/// What a passing seed did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub virtual_us: u64,
    pub events: u64,
    pub devices: usize,
    /// (id, connection attempts, sessions closed) per hostile device.
    pub hostiles: Vec<(String, u64, usize)>,
    pub chunks: u64,
    pub records: u64,
    pub delivered_records: u64,
    pub evicted_records: u64,
    pub power_cut_records: u64,
    pub recreation_records: u64,
    pub undeliverable_records: u64,
    /// Records restored with a ring from a backup after they may have been delivered (allowed
    /// to be at the sink twice: the design accepts that duplicate).
    pub duplicated_records: u64,
    /// Chunks whose eviction a power cut undid (they were back in the ring, to be sent).
    pub evictions_undone: u64,
    /// Undeliverable chunks by reason, and how many the sessions reported.
    pub undeliverable_chunks: BTreeMap<String, u64>,
    pub landing: LandingStats,
    /// Sink-side session closes by code.
    pub sink_closes: BTreeMap<String, u64>,
    pub faults: String,
    /// Witnesses that a seed reaches a situation (the regression tests check them).
    pub grants_over_pending: u64,
    pub max_restores_of_a_chunk: u32,
    pub ring_identity_renewals: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "seed {}: {} s virtual, {} events, {} devices, {} hostiles; {} records in {} chunks: {} delivered, \
             {} evicted, {} lost to power cuts, {} to recreations or restores, {} undeliverable, {} restored (may be twice), {} evictions undone by power cuts; landed {} (dup {}, fenced {}), \
             commits {} (failed {}), epochs {}",
            self.seed,
            time::seconds(self.virtual_us),
            self.events,
            self.devices,
            self.hostiles.len(),
            self.records,
            self.chunks,
            self.delivered_records,
            self.evicted_records,
            self.power_cut_records,
            self.recreation_records,
            self.undeliverable_records,
            self.duplicated_records,
            self.evictions_undone,
            self.landing.chunks_landed,
            self.landing.duplicates_dropped,
            self.landing.fenced_chunks,
            self.landing.commits,
            self.landing.commit_failures,
            self.landing.epochs_started,
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// An invariant did not hold (or the world did not converge).
    Invariant,
    /// Something panicked: the code under test or the simulator.
    Panic,
}

/// A failing seed, with what failed and the trace of the events before it.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub kind: FailureKind,
    pub message: String,
    pub virtual_us: u64,
    pub trace: Vec<String>,
    /// Set when the replay with the trace on did not fail the same way.
    pub nondeterminism: Option<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            formatter,
            "tributary-sim: seed {} failed at {} s ({:?}): {}",
            self.seed,
            time::seconds(self.virtual_us),
            self.kind,
            self.message
        )?;
        if let Some(replay) = &self.nondeterminism {
            writeln!(formatter, "NONDETERMINISM: the replay of this seed went differently: {replay}")?;
        }
        writeln!(formatter, "--- the last {} trace lines ---", self.trace.len())?;
        for line in &self.trace {
            writeln!(formatter, "{line}")?;
        }
        write!(
            formatter,
            "--- replay: TRIBUTARY_SIM_SEED={} cargo test --release -p tributary-sim --test seeds -- --nocapture",
            self.seed
        )
    }
}

impl std::error::Error for Failure {}

/// Runs one seed: the whole fleet, the faults, the heal, the checks. A failure comes back with
/// the trace of a replay of the same seed.
pub fn run_seed(seed: u64, options: &Options) -> Result<Report, Failure> {
    let traced = options.verbose;
    match run_once(seed, options, traced) {
        Ok(report) => Ok(report),
        Err(failure) if traced => Err(failure),
        Err(first) => match run_once(seed, options, true) {
            Err(mut replay) => {
                if replay.message != first.message || replay.kind != first.kind {
                    replay.nondeterminism = Some(format!("first run: {}", first.message));
                }
                Err(replay)
            }
            Ok(_) => Err(Failure { nondeterminism: Some("the replay passed".to_string()), ..first }),
        },
    }
}

fn run_once(seed: u64, options: &Options, traced: bool) -> Result<Report, Failure> {
    let trace = Rc::new(RefCell::new(Trace::new(traced, options.verbose, options.trace_lines)));
    // The virtual time of the last event, readable after a panic unwound the world.
    let now = Rc::new(std::cell::Cell::new(0u64));
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut world = World::new(seed, options, trace.clone(), now.clone());
        world.run()
    }));
    let failure = |kind, message: String| Failure {
        seed,
        kind,
        message,
        virtual_us: now.get(),
        trace: trace.borrow().tail(),
        nondeterminism: None,
    };
    match outcome {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(message)) => Err(failure(FailureKind::Invariant, message)),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|text| text.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic with a non-text payload".to_string());
            Err(failure(FailureKind::Panic, format!("PANIC: {message}")))
        }
    }
}
