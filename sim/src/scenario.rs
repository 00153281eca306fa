//! What one seed simulates: devices, their rings and sessions, the sink's configuration, link
//! quality and fault rates, all drawn from the seed within the bounds named here.
//!
//! Each fault kind is switched on per seed with some probability and then happens as a Poisson
//! process with a per-seed mean interval, so some seeds are calm and some are storms; calm seeds
//! matter too (they exercise the steady state, long streams and full rings).

use std::time::Duration;

use landing::LandingConfig;
use protocol::Lane;
use session::SinkSessionConfig;

use crate::hostile::HostileKind;
use crate::link::LinkParams;
use crate::ring::{Durability, Policy, RingParams};
use crate::rng::Rng;
use crate::time::{MICROS_PER_MS, MICROS_PER_S};

/// Honest devices per run.
pub const DEVICES_MIN: usize = 1;
pub const DEVICES_MAX: usize = 6;
/// Hostile devices per run (each plays one scenario).
pub const HOSTILES_MAX: usize = 4;
/// Dictionaries one honest device keeps (well under the sink's per-device quota of 64).
pub const DEVICE_DICTIONARIES_MAX: usize = 4;
/// Ring capacities of the model (the real ring's minimum is 4 MiB; the rules scale down).
pub const RING_CAPACITY_BYTES_MIN: u64 = 16 * 1024;
pub const RING_CAPACITY_BYTES_MAX: u64 = 512 * 1024;
/// Records per chunk.
pub const CHUNK_RECORDS_MAX: u32 = 64;
/// Run phase, CI and long mode; the heal phase must converge within `HEAL_MAX_US`.
pub const RUN_US_CI: (u64, u64) = (2 * MICROS_PER_S, 8 * MICROS_PER_S);
pub const RUN_US_LONG: (u64, u64) = (30 * MICROS_PER_S, 300 * MICROS_PER_S);
pub const HEAL_MAX_US: u64 = 120 * MICROS_PER_S;

#[derive(Clone, Debug)]
pub struct DeviceParams {
    pub id: String,
    pub lanes: Vec<Lane>,
    /// Relative production weight per lane (0 for lanes not used).
    pub lane_weights: [u64; Lane::COUNT],
    pub ring: RingParams,
    pub produce_mean_us: f64,
    pub records_max: u32,
    pub pad_bytes_max: usize,
    pub dictionary_count: usize,
    pub dictionary_bytes_max: usize,
    /// Chance a sensor or media chunk names one of the device's dictionaries.
    pub dictionary_chance: f64,
    /// Chance a chunk names a dictionary the appliance lost (undeliverable by construction).
    pub missing_dictionary_chance: f64,
    pub read_chunks_max: usize,
    pub read_bytes_max: usize,
    pub idle_poll_ms: u64,
    pub in_flight_bytes_max: u64,
    pub welcome_timeout_ms: u64,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// A ring read or ack runs on a blocking thread: this long at most.
    pub ring_latency_us_max: u64,
    pub reboot_us_max: u64,
}

#[derive(Clone, Debug)]
pub struct SinkParams {
    pub session: SinkSessionConfig,
    pub landing: LandingConfig,
    /// The lander's byte semaphore (`in_flight_bytes_max` in the real sink, the same number the
    /// Welcome advertises).
    pub permits_bytes: u64,
    pub land_us_max: u64,
    pub commit_us_max: u64,
    pub dictionary_store_us_max: u64,
    /// Lane bytes may be handed to the session late: (chance per delivery, delay bound).
    pub late_handoff: Option<(f64, u64)>,
    pub downtime_us_max: u64,
    /// How long an operator (systemd) takes to restart a broken sink.
    pub broken_restart_us_max: u64,
}

#[derive(Clone, Debug)]
pub struct LinkRanges {
    pub latency_us_max: u64,
    pub bytes_per_ms_min: u64,
    pub bytes_per_ms_max: u64,
    pub fragment_bytes_max: usize,
    pub whole_chance: f64,
    /// How long each side may take to notice a broken connection.
    pub device_detect_us_max: u64,
    pub sink_detect_us_max: u64,
    pub connect_timeout_us: u64,
}

impl LinkRanges {
    pub fn draw(&self, rng: &mut Rng) -> LinkParams {
        let latency_us = log_uniform(rng, 20, self.latency_us_max);
        LinkParams {
            latency_us,
            jitter_us: rng.range(0, latency_us),
            bytes_per_ms: log_uniform(rng, self.bytes_per_ms_min, self.bytes_per_ms_max),
            fragment_bytes_max: log_uniform(
                rng,
                (self.fragment_bytes_max as u64 / 4).max(1),
                self.fragment_bytes_max as u64,
            ) as usize,
            whole_chance: self.whole_chance,
        }
    }
}

/// Mean interval of each fault kind, `None` when off for this seed.
#[derive(Clone, Debug, Default)]
pub struct FaultRates {
    pub connection_break_us: Option<f64>,
    pub partition_us: Option<f64>,
    pub partition_length_us_max: u64,
    pub power_cut_us: Option<f64>,
    pub restart_us: Option<f64>,
    pub recreate_us: Option<f64>,
    pub sink_crash_us: Option<f64>,
    pub sink_restart_us: Option<f64>,
    pub landing_fault_us: Option<f64>,
    pub dictionary_fault_us: Option<f64>,
    /// Restores of a ring from an older backup (backups are taken four times as often).
    pub restore_us: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub run_us: u64,
    pub heal_max_us: u64,
    pub devices: Vec<DeviceParams>,
    pub hostiles: Vec<HostileKind>,
    pub sink: SinkParams,
    pub link: LinkRanges,
    pub faults: FaultRates,
}

/// Log-uniform in `low..=high` (sizes and times spanning orders of magnitude).
pub fn log_uniform(rng: &mut Rng, low: u64, high: u64) -> u64 {
    assert!(low >= 1 && low <= high);
    let value = rng.float((low as f64).ln(), (high as f64).ln()).exp() as u64;
    value.clamp(low, high)
}

fn maybe(rng: &mut Rng, on: f64, low_s: f64, high_s: f64) -> Option<f64> {
    rng.chance(on).then(|| rng.float(low_s, high_s) * MICROS_PER_S as f64)
}

impl Scenario {
    pub fn draw(rng: &mut Rng, long: bool) -> Scenario {
        let (run_low, run_high) = if long { RUN_US_LONG } else { RUN_US_CI };
        let run_us = rng.range(run_low, run_high);
        let frame_bytes_max = if rng.chance(0.8) {
            protocol::FRAME_BYTES_MAX
        } else {
            rng.range_usize(protocol::FRAME_KIND_BYTES + protocol::CONTROL_MESSAGE_BYTES_MAX, 8 * 1024)
        };
        // At least the largest chunk (a ring's capacity / 32) plus a hostile chunk, or a chunk
        // would wait for permits forever; small budgets make sessions wait for the lander.
        let permits_bytes = log_uniform(rng, 32 * 1024, 16 * 1024 * 1024);
        let sink = SinkParams {
            session: SinkSessionConfig {
                hello_timeout: Duration::from_millis(rng.range(500, 10_000)),
                frame_bytes_max,
                in_flight_bytes_max: permits_bytes,
                commit_interval_ms: 0, // set below from the landing config
                ..SinkSessionConfig::default()
            },
            landing: LandingConfig {
                commit_bytes_max: log_uniform(rng, 512, 4 * 1024 * 1024),
                commit_interval: Duration::from_millis(rng.range(1, 100)),
            },
            permits_bytes,
            land_us_max: rng.range(5, 300),
            commit_us_max: log_uniform(rng, 100, 30_000),
            dictionary_store_us_max: log_uniform(rng, 100, 10_000),
            late_handoff: rng.chance(0.3).then(|| (rng.float(0.05, 0.6), log_uniform(rng, 100, 300_000))),
            downtime_us_max: log_uniform(rng, 1_000, 3 * MICROS_PER_S),
            broken_restart_us_max: log_uniform(rng, 1_000, MICROS_PER_S),
        };
        let mut sink = sink;
        sink.session.commit_interval_ms = sink.landing.commit_interval.as_millis() as u32;

        let device_count = rng.range_usize(DEVICES_MIN, DEVICES_MAX);
        let devices = (0..device_count).map(|index| DeviceParams::draw(rng, index)).collect();

        let link = LinkRanges {
            latency_us_max: log_uniform(rng, 100, 50 * MICROS_PER_MS),
            bytes_per_ms_min: 50,
            bytes_per_ms_max: log_uniform(rng, 200, 1 << 20),
            // Byte-sized fragments stress every decoder's reassembly but cost an event per byte:
            // a few seeds get them, the rest packet-sized or larger reads.
            fragment_bytes_max: if rng.chance(0.05) { rng.range(1, 16) } else { log_uniform(rng, 64, 65_536) }
                as usize,
            whole_chance: rng.float(0.0, 0.9),
            device_detect_us_max: log_uniform(rng, 1_000, 3 * MICROS_PER_S),
            sink_detect_us_max: log_uniform(rng, 1_000, 3 * MICROS_PER_S),
            connect_timeout_us: rng.range(100 * MICROS_PER_MS, 2 * MICROS_PER_S),
        };

        // Storms and calm: one intensity per seed scales every fault kind.
        let calm = rng.chance(0.15);
        let on = if calm { 0.0 } else { rng.float(0.3, 0.9) };
        let scale = if long { 3.0 } else { 1.0 };
        let faults = FaultRates {
            connection_break_us: maybe(rng, on, 0.2, 8.0),
            partition_us: maybe(rng, on, 1.0, 20.0 * scale),
            partition_length_us_max: log_uniform(rng, 10 * MICROS_PER_MS, 4 * MICROS_PER_S),
            power_cut_us: maybe(rng, on, 1.0, 20.0 * scale),
            restart_us: maybe(rng, on, 2.0, 30.0 * scale),
            recreate_us: maybe(rng, on * 0.5, 3.0, 60.0 * scale),
            sink_crash_us: maybe(rng, on, 1.0, 20.0 * scale),
            sink_restart_us: maybe(rng, on, 2.0, 30.0 * scale),
            landing_fault_us: maybe(rng, on, 0.1, 5.0),
            dictionary_fault_us: maybe(rng, on, 0.5, 20.0),
            restore_us: maybe(rng, on * 0.3, 2.0, 30.0 * scale),
        };

        let mut hostiles = Vec::new();
        if rng.chance(if long { 0.9 } else { 0.5 }) {
            let count = rng.range_usize(1, HOSTILES_MAX);
            while hostiles.len() < count {
                let kind = *rng.pick(&HostileKind::ALL);
                if !hostiles.contains(&kind) {
                    hostiles.push(kind);
                }
            }
        }
        Scenario { run_us, heal_max_us: HEAL_MAX_US, devices, hostiles, sink, link, faults }
    }
}

impl DeviceParams {
    fn draw(rng: &mut Rng, index: usize) -> DeviceParams {
        let mut lanes: Vec<Lane> = Lane::ALL.into_iter().filter(|_| rng.chance(0.6)).collect();
        if lanes.is_empty() {
            lanes.push(*rng.pick(&Lane::ALL));
        }
        let mut lane_weights = [0u64; Lane::COUNT];
        for lane in &lanes {
            lane_weights[lane.index()] = rng.range(1, 10);
        }
        let capacity_bytes = log_uniform(rng, RING_CAPACITY_BYTES_MIN, RING_CAPACITY_BYTES_MAX);
        let audit_reserved_bytes = capacity_bytes / rng.range(4, 16);
        let mut policies = [Policy::DropOldest; Lane::COUNT];
        policies[Lane::Audit.index()] = Policy::Block;
        if rng.chance(0.5) {
            policies[Lane::Decisions.index()] = Policy::Block;
        }
        if rng.chance(0.1) {
            policies[Lane::Sensor.index()] = Policy::Block;
        }
        let durability = if rng.chance(0.5) {
            Durability::Sync
        } else {
            Durability::Periodic { sync_interval_us: log_uniform(rng, MICROS_PER_MS, 500 * MICROS_PER_MS) }
        };
        let ring = RingParams { capacity_bytes, audit_reserved_bytes, policies, durability };
        // A chunk must fit the ring's chunk bound and the audit reservation.
        let chunk_bytes_max =
            ring.chunk_bytes_max().min(audit_reserved_bytes) as usize - protocol::CHUNK_HEADER_LEN;
        let records_max = rng.range(1, u64::from(CHUNK_RECORDS_MAX)).min((chunk_bytes_max / 8) as u64) as u32;
        let pad_bytes_max =
            if rng.chance(0.5) { 0 } else { rng.range_usize(0, chunk_bytes_max - 8 * records_max as usize) };
        let dictionary_count = if rng.chance(0.5) { rng.range_usize(1, DEVICE_DICTIONARIES_MAX) } else { 0 };
        DeviceParams {
            id: format!("dev-{index}"),
            lanes,
            lane_weights,
            ring,
            produce_mean_us: log_uniform(rng, 2 * MICROS_PER_MS, 40 * MICROS_PER_MS) as f64,
            records_max: records_max.max(1),
            pad_bytes_max,
            dictionary_count,
            dictionary_bytes_max: log_uniform(rng, 16, 8192) as usize,
            dictionary_chance: rng.float(0.0, 0.6),
            missing_dictionary_chance: if rng.chance(0.15) { 0.02 } else { 0.0 },
            read_chunks_max: log_uniform(rng, 1, 64) as usize,
            read_bytes_max: log_uniform(rng, 256, 64 * 1024) as usize,
            idle_poll_ms: rng.range(2, 30),
            in_flight_bytes_max: log_uniform(rng, 1024, 1024 * 1024),
            welcome_timeout_ms: rng.range(1_000, 5_000),
            backoff_min_ms: rng.range(10, 200),
            backoff_max_ms: rng.range(500, 5_000),
            ring_latency_us_max: log_uniform(rng, 10, 5_000),
            reboot_us_max: log_uniform(rng, 1_000, 2 * MICROS_PER_S),
        }
    }
}
