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
//! Limits: every queue has a named bound (`time::EVENTS_QUEUED_MAX`,
//! `link::FRAGMENTS_IN_FLIGHT_MAX`, `sink::SINK_INPUTS_QUEUED_MAX`, `trace::TRACE_TAIL_LINES`);
//! a run ends by `scenario::HEAL_MAX_US` of virtual time after healing, converged or failed.

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
    pub landing: LandingStats,
    /// Sink-side session closes by code.
    pub sink_closes: BTreeMap<String, u64>,
    pub faults: String,
}

impl fmt::Display for Report {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "seed {}: {} s virtual, {} events, {} devices, {} hostiles; {} records in {} chunks: {} delivered, \
             {} evicted, {} lost to power cuts, {} to recreations, {} undeliverable; landed {} (dup {}, fenced {}), \
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
        writeln!(formatter, "tributary-sim: seed {} failed at {} s ({:?}): {}", self.seed, time::seconds(self.virtual_us), self.kind, self.message)?;
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
    let now = Rc::new(RefCell::new(0u64));
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut world = World::new(seed, options, trace.clone());
        let result = world.run();
        *now.borrow_mut() = world.queue.now;
        result
    }));
    let failure = |kind, message: String| Failure {
        seed,
        kind,
        message,
        virtual_us: *now.borrow(),
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
