//! The simulator's seed runs.
//!
//! - `cargo test --release -p tributary-sim --test seeds`: seeds `0..N`, N from
//!   `TRIBUTARY_SIM_SEEDS` (default [`DEFAULT_SEEDS`]: about a minute on this project's 2-core
//!   machine), spread over one worker thread per core (each seed is its own deterministic world;
//!   the simulator itself runs no threads).
//! - `TRIBUTARY_SIM_SEED=x`: replays seed x with the full trace on stderr (add `-- --nocapture`).
//! - `TRIBUTARY_SIM_HOURS=h`: the soak: random seeds for h hours (fractions allowed), every
//!   fourth in long mode; each failing seed is printed when it is found, with its replay line.
//! - `TRIBUTARY_SIM_LONG=1`: long mode for the seeds of the first two forms too.
//! - `TRIBUTARY_SIM_REPORTS=1`: print each passing seed's report.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sim::{Failure, Options, run_seed};

/// Seeds a plain `cargo test` runs.
const DEFAULT_SEEDS: u64 = 3000;
/// Worker threads, at most (one seed per worker at a time).
const WORKERS_MAX: usize = 8;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|value| value.parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a number")))
}

fn options(long: bool) -> Options {
    Options { long: long || std::env::var_os("TRIBUTARY_SIM_LONG").is_some(), ..Options::default() }
}

fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from).clamp(1, WORKERS_MAX)
}

/// Runs seeds from `next_seed` on every worker until `more(seed)` says stop.
fn run_seeds(next_seed: impl Fn() -> Option<(u64, bool)> + Sync) -> (u64, Vec<Failure>) {
    let failures = Mutex::new(Vec::new());
    let ran = AtomicU64::new(0);
    let reports = std::env::var_os("TRIBUTARY_SIM_REPORTS").is_some();
    std::thread::scope(|scope| {
        for _ in 0..workers() {
            scope.spawn(|| {
                while let Some((seed, long)) = next_seed() {
                    match run_seed(seed, &options(long)) {
                        Ok(report) if reports => eprintln!("{report}"),
                        Ok(_) => {}
                        Err(failure) => {
                            eprintln!("{failure}");
                            failures.lock().expect("failures lock").push(failure);
                        }
                    }
                    ran.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let mut failures = failures.into_inner().expect("failures lock");
    failures.sort_by_key(|failure| failure.seed);
    (ran.into_inner(), failures)
}

fn finish(ran: u64, failures: &[Failure], started: Instant) {
    eprintln!(
        "{ran} seeds in {:.1} s on {} workers, {} failed",
        started.elapsed().as_secs_f64(),
        workers(),
        failures.len()
    );
    if let Some(first) = failures.first() {
        let seeds: Vec<u64> = failures.iter().map(|failure| failure.seed).collect();
        panic!("failing seeds: {seeds:?}; the first:\n{first}");
    }
}

#[test]
fn seeds() {
    if let Some(seed) = env_u64("TRIBUTARY_SIM_SEED") {
        let options = Options { verbose: true, ..options(false) };
        match run_seed(seed, &options) {
            Ok(report) => eprintln!("{report}"),
            Err(failure) => panic!("{failure}"),
        }
        return;
    }
    let started = Instant::now();
    if let Ok(hours) = std::env::var("TRIBUTARY_SIM_HOURS") {
        let hours: f64 =
            hours.parse().unwrap_or_else(|_| panic!("TRIBUTARY_SIM_HOURS={hours:?} is not a number"));
        let deadline = started + Duration::from_secs_f64(hours * 3600.0);
        // Random seeds (from the wall clock; the simulator itself never reads it).
        let base = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos() as u64;
        eprintln!("soak: seeds from {base} (stride 0x9e3779b97f4a7c15) for {hours} h");
        let index = AtomicU64::new(0);
        let (ran, failures) = run_seeds(|| {
            (Instant::now() < deadline).then(|| {
                let index = index.fetch_add(1, Ordering::Relaxed);
                (base.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15)), index % 4 == 3)
            })
        });
        finish(ran, &failures, started);
        return;
    }
    let count = env_u64("TRIBUTARY_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let next = AtomicU64::new(0);
    let (ran, failures) = run_seeds(|| {
        let seed = next.fetch_add(1, Ordering::Relaxed);
        (seed < count).then_some((seed, false))
    });
    finish(ran, &failures, started);
}
