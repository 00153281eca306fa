//! The adaptive bandwidth budget: backs replication off when ingest latency rises, and gives the
//! bandwidth back step by step while ingest is healthy (AIMD, as TCP's congestion window; the
//! baseline is the lowest latency seen lately, as LEDBAT's base delay).
//!
//! Pure: no I/O and no clock of its own. The replicator calls `tick(now, sum_us, count)` with the
//! cumulative sum and count of the ingest latency signal (in `serve` the lander's
//! `tributary_sink_ack_latency_seconds` histogram: from a chunk read off its stream to the commit
//! that made it durable), and applies the budget it answers. At most once per `interval` the
//! controller takes the mean latency of the chunks acked since the last decision and:
//!
//! - above the threshold (`latency_target_us`, or else the baseline × `latency_factor`): halves the
//!   budget, not below `bytes_per_second_min`; after a cut it waits `CUT_HOLD_INTERVALS` intervals
//!   before cutting again, so that latency caused before the cut does not cut twice;
//! - at or below it, or with no chunk acked in the interval and nothing waiting for its ack
//!   (nothing to protect): raises the budget by `1 / RAISE_STEPS` of the span between floor and
//!   max, not above `bytes_per_second_max`.
//!
//! A commit stuck for longer than an interval yields no sample; it would read as idle and the
//! budget would rise while ingest waits. So the signal also carries `pending_us`, the age of the
//! oldest chunk landed but not yet acked (in `serve`; the age of the commit in progress in the
//! benchmark): in an interval without samples, that age is the interval's latency, compared with
//! the threshold as a mean would be (it does not enter the baseline). Without a baseline yet and
//! without a target, the threshold for it is one interval.
//!
//! The budget starts at the floor: a replicator that starts while ingest is busy does not take the
//! whole disk before it has seen a sample. Baseline: the minimum of per-interval means over the
//! last `BASELINE_WINDOWS` windows of `BASELINE_WINDOW` each (10 minutes), so a baseline learned
//! while ingest was light ages out; the threshold is never below `THRESHOLD_US_MIN`.
//!
//! Limits: memory is fixed (`BASELINE_WINDOWS` minima); one decision per `interval`.

use std::time::{Duration, Instant};

/// The budget rises from floor to max in this many healthy intervals.
pub const RAISE_STEPS: u64 = 16;
/// Intervals after a cut during which no further cut is made.
pub const CUT_HOLD_INTERVALS: u32 = 2;
/// The baseline is the minimum over this many windows...
pub const BASELINE_WINDOWS: usize = 10;
/// ...of this length each.
pub const BASELINE_WINDOW: Duration = Duration::from_secs(60);
/// A relative threshold below this is noise (a baseline of microseconds times a factor).
pub const THRESHOLD_US_MIN: u64 = 1_000;

/// What the controller is given; `validate` of `[replication]` checks the ranges.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveConfig {
    pub bytes_per_second_min: u64,
    pub bytes_per_second_max: u64,
    /// An absolute threshold; `None`: the baseline × `latency_factor`.
    pub latency_target_us: Option<u64>,
    pub latency_factor: f64,
    /// Time between two decisions.
    pub interval: Duration,
}

/// What the last decision was, for logs, metrics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Latency above the threshold: the budget was halved (or stayed at the floor).
    Cut,
    /// Latency above the threshold within the hold after a cut: the budget stayed.
    Hold,
    /// Healthy (or idle) ingest: the budget rose one step (or stayed at the max).
    Raise,
}

#[derive(Clone, Debug)]
pub struct AdaptiveBudget {
    config: AdaptiveConfig,
    budget: u64,
    /// The cumulative (sum, count) at the last decision, and when it was.
    last: Option<(Instant, u64, u64)>,
    last_cut: Option<Instant>,
    /// Per window: (its start, the lowest interval mean in it).
    minima: [Option<(Instant, u64)>; BASELINE_WINDOWS],
    /// The mean of the last interval with samples, and the threshold it was compared with.
    pub latency_us: u64,
    pub threshold_us: u64,
    pub cuts: u64,
}

impl AdaptiveBudget {
    pub fn new(config: AdaptiveConfig) -> AdaptiveBudget {
        assert!(config.bytes_per_second_min > 0);
        assert!(config.bytes_per_second_min <= config.bytes_per_second_max);
        assert!(config.latency_factor >= 1.0);
        assert!(!config.interval.is_zero());
        AdaptiveBudget {
            budget: config.bytes_per_second_min,
            config,
            last: None,
            last_cut: None,
            minima: [None; BASELINE_WINDOWS],
            latency_us: 0,
            threshold_us: 0,
            cuts: 0,
        }
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.budget
    }

    /// Feeds the cumulative latency sum (microseconds) and count at `now`, and the age of what
    /// waits for its ack (`pending_us`, 0 when nothing); returns the decision when one was due (at
    /// most once per interval), `None` otherwise. The budget is `bytes_per_second()` afterwards.
    pub fn tick(&mut self, now: Instant, sum_us: u64, count: u64, pending_us: u64) -> Option<Decision> {
        let Some((at, last_sum_us, last_count)) = self.last else {
            self.last = Some((now, sum_us, count));
            return None;
        };
        if now.saturating_duration_since(at) < self.config.interval {
            return None;
        }
        self.last = Some((now, sum_us, count));
        // Counters that went back (a restarted source) give no sample.
        let samples = count.checked_sub(last_count).unwrap_or(0);
        let mean_us = (samples > 0).then(|| sum_us.saturating_sub(last_sum_us) / samples);
        // The interval's latency: the mean of its samples, or, without samples, the age of what
        // still waits for its ack (a stuck commit); neither: idle.
        let latency_us = match mean_us {
            Some(mean_us) => Some((mean_us, self.remember(now, mean_us))),
            None if pending_us > 0 => Some((pending_us, self.baseline(now).unwrap_or(0))),
            None => None,
        };
        let decision = match latency_us {
            None => Decision::Raise,
            Some((latency_us, baseline_us)) => {
                self.latency_us = latency_us;
                self.threshold_us = match (self.config.latency_target_us, baseline_us) {
                    (Some(target_us), _) => target_us,
                    (None, 0) => self.config.interval.as_micros() as u64,
                    (None, _) => {
                        ((baseline_us as f64 * self.config.latency_factor) as u64).max(THRESHOLD_US_MIN)
                    }
                };
                if latency_us <= self.threshold_us {
                    Decision::Raise
                } else if self.last_cut.is_some_and(|cut| {
                    now.saturating_duration_since(cut) < self.config.interval * CUT_HOLD_INTERVALS
                }) {
                    Decision::Hold
                } else {
                    Decision::Cut
                }
            }
        };
        let (min, max) = (self.config.bytes_per_second_min, self.config.bytes_per_second_max);
        match decision {
            Decision::Cut => {
                self.budget = (self.budget / 2).max(min);
                self.last_cut = Some(now);
                self.cuts += 1;
            }
            Decision::Hold => {}
            Decision::Raise => {
                let step = (max - min).div_ceil(RAISE_STEPS).max(1);
                self.budget = self.budget.saturating_add(step).min(max);
            }
        }
        assert!((min..=max).contains(&self.budget), "the budget stays between floor and max");
        Some(decision)
    }

    /// Records an interval's mean in its window; returns the baseline (the minimum over the
    /// windows not older than `BASELINE_WINDOWS` windows).
    fn remember(&mut self, now: Instant, mean_us: u64) -> u64 {
        let horizon = BASELINE_WINDOW * BASELINE_WINDOWS as u32;
        for slot in &mut self.minima {
            if slot.is_some_and(|(start, _)| now.saturating_duration_since(start) >= horizon) {
                *slot = None;
            }
        }
        let current = self
            .minima
            .iter_mut()
            .flatten()
            .find(|(start, _)| now.saturating_duration_since(*start) < BASELINE_WINDOW);
        match current {
            Some((_, minimum)) => *minimum = (*minimum).min(mean_us),
            None => {
                // A new window in a free slot, or in place of the oldest.
                let slot = match self.minima.iter().position(Option::is_none) {
                    Some(free) => free,
                    None => (0..BASELINE_WINDOWS)
                        .min_by_key(|&index| self.minima[index].map(|(start, _)| start))
                        .expect("BASELINE_WINDOWS > 0"),
                };
                self.minima[slot] = Some((now, mean_us));
            }
        }
        self.baseline(now).expect("just recorded")
    }

    /// The lowest interval mean of the windows not older than `BASELINE_WINDOWS` windows; `None`
    /// before the first sample (or after all aged out).
    fn baseline(&self, now: Instant) -> Option<u64> {
        let horizon = BASELINE_WINDOW * BASELINE_WINDOWS as u32;
        self.minima
            .iter()
            .flatten()
            .filter(|(start, _)| now.saturating_duration_since(*start) < horizon)
            .map(|&(_, minimum)| minimum)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn config(latency_target_us: Option<u64>) -> AdaptiveConfig {
        AdaptiveConfig {
            bytes_per_second_min: 4 * MIB,
            bytes_per_second_max: 64 * MIB,
            latency_target_us,
            latency_factor: 2.0,
            interval: Duration::from_millis(500),
        }
    }

    /// Drives a controller on a virtual clock: each step is one interval in which `acked` chunks
    /// were acked with `latency_ms` each; returns the budget in MiB/s after each step.
    struct Drive {
        budget: AdaptiveBudget,
        start: Instant,
        now: Duration,
        sum_us: u64,
        count: u64,
    }

    impl Drive {
        fn new(config: AdaptiveConfig) -> Drive {
            let start = Instant::now();
            let mut budget = AdaptiveBudget::new(config);
            assert_eq!(budget.tick(start, 0, 0, 0), None, "the first tick only takes the counters");
            Drive { budget, start, now: Duration::ZERO, sum_us: 0, count: 0 }
        }

        fn step(&mut self, acked: u64, latency_ms: u64) -> (Option<Decision>, u64) {
            self.step_pending(acked, latency_ms, 0)
        }

        /// A step at whose end the oldest unacked chunk is `pending_ms` old.
        fn step_pending(&mut self, acked: u64, latency_ms: u64, pending_ms: u64) -> (Option<Decision>, u64) {
            self.now += Duration::from_millis(500);
            self.count += acked;
            self.sum_us += acked * latency_ms * 1_000;
            let decision =
                self.budget.tick(self.start + self.now, self.sum_us, self.count, pending_ms * 1_000);
            (decision, self.budget.bytes_per_second() / MIB)
        }

        fn steps(&mut self, count: usize, acked: u64, latency_ms: u64) -> Vec<u64> {
            (0..count).map(|_| self.step(acked, latency_ms).1).collect()
        }
    }

    #[test]
    fn healthy_ingest_raises_the_budget_from_the_floor_to_the_max_and_no_further() {
        let mut drive = Drive::new(config(None));
        assert_eq!(drive.budget.bytes_per_second(), 4 * MIB, "starts at the floor");
        // (64 - 4) / 16 = 3.75 MiB/s per step: 16 steps to the max, then it stays there.
        let budgets = drive.steps(20, 100, 5);
        assert_eq!(budgets[0], 7);
        assert_eq!(budgets[15], 64);
        assert!(budgets.windows(2).all(|pair| pair[0] <= pair[1]));
        assert_eq!(budgets[19], 64);
    }

    #[test]
    fn rising_latency_halves_the_budget_down_to_the_floor_then_it_recovers() {
        let mut drive = Drive::new(config(None));
        drive.steps(20, 100, 5); // at the max; baseline 5 ms, threshold 10 ms
        assert_eq!(drive.budget.threshold_us, 10_000);
        // 30 ms: cut, held for two intervals, cut again...
        let decisions: Vec<_> = (0..6).map(|_| drive.step(100, 30)).collect();
        assert_eq!(
            decisions,
            vec![
                (Some(Decision::Cut), 32),
                (Some(Decision::Hold), 32),
                (Some(Decision::Cut), 16),
                (Some(Decision::Hold), 16),
                (Some(Decision::Cut), 8),
                (Some(Decision::Hold), 8),
            ]
        );
        // ...never below the floor.
        let budgets = drive.steps(20, 100, 30);
        assert!(budgets.iter().all(|&budget| budget == 4), "{budgets:?}");
        assert_eq!(drive.budget.latency_us, 30_000);
        // Latency back at its baseline: the budget climbs back step by step.
        let budgets = drive.steps(20, 100, 6);
        assert_eq!(&budgets[..3], &[7, 11, 15]);
        assert_eq!(budgets[19], 64);
    }

    #[test]
    fn an_absolute_target_replaces_the_relative_threshold() {
        let mut drive = Drive::new(config(Some(50_000)));
        drive.steps(20, 10, 5);
        // 30 ms is six times the baseline but under the 50 ms target: healthy.
        assert_eq!(drive.step(10, 30), (Some(Decision::Raise), 64));
        assert_eq!(drive.step(10, 80), (Some(Decision::Cut), 32));
        assert_eq!(drive.budget.threshold_us, 50_000);
    }

    #[test]
    fn no_acked_chunk_counts_as_healthy_and_decisions_wait_for_the_interval() {
        let start = Instant::now();
        let mut budget = AdaptiveBudget::new(config(None));
        budget.tick(start, 0, 0, 0);
        assert_eq!(budget.tick(start + Duration::from_millis(499), 0, 0, 0), None);
        assert_eq!(budget.tick(start + Duration::from_millis(500), 0, 0, 0), Some(Decision::Raise));
        assert_eq!(budget.tick(start + Duration::from_secs(1), 1_000_000, 10, 0), Some(Decision::Raise));
        // Counters that went back (a restarted lander) are no sample: healthy.
        assert_eq!(budget.tick(start + Duration::from_millis(1_500), 0, 0, 0), Some(Decision::Raise));
        assert_eq!(budget.latency_us, 100_000);
    }

    #[test]
    fn a_commit_stuck_for_intervals_without_acks_cuts_the_budget_instead_of_raising_it() {
        let mut drive = Drive::new(config(None));
        drive.steps(20, 100, 5); // at the max; baseline 5 ms, threshold 10 ms
        // A commit stalls: no chunk is acked for three intervals while the oldest unacked chunk
        // ages. Read as idle, the budget would rise (it stayed at the max); it is cut instead.
        assert_eq!(drive.step_pending(0, 0, 600), (Some(Decision::Cut), 32));
        assert_eq!(drive.budget.latency_us, 600_000);
        assert_eq!(drive.step_pending(0, 0, 1_100), (Some(Decision::Hold), 32));
        assert_eq!(drive.step_pending(0, 0, 1_600), (Some(Decision::Cut), 16));
        // The commit lands (its chunks' latency is one sample) and ingest is healthy again: it
        // rises step by step; the stuck ages did not enter the baseline (threshold still 10 ms).
        drive.step(100, 5);
        assert_eq!(drive.budget.threshold_us, 10_000);
        // An interval without acks and with nothing waiting is idle: raise.
        assert_eq!(drive.step_pending(0, 0, 0).0, Some(Decision::Raise));
        // Something waiting, but younger than the threshold: healthy.
        assert_eq!(drive.step_pending(0, 0, 8).0, Some(Decision::Raise));
    }

    #[test]
    fn a_stuck_commit_before_any_sample_is_judged_against_one_interval() {
        let mut drive = Drive::new(config(None));
        assert_eq!(drive.step_pending(0, 0, 300).0, Some(Decision::Raise), "younger than an interval");
        assert_eq!(drive.step_pending(0, 0, 800), (Some(Decision::Cut), 4));
        assert_eq!(drive.budget.threshold_us, 500_000);
    }

    #[test]
    fn the_baseline_forgets_what_is_older_than_its_windows() {
        let mut drive = Drive::new(config(None));
        drive.steps(4, 10, 2); // baseline 2 ms: threshold 2 × 2 ms
        assert_eq!(drive.budget.threshold_us, 4_000);
        // Eleven minutes at 20 ms (cut to the floor meanwhile): the 2 ms window ages out and the
        // baseline becomes 20 ms, so 20 ms is healthy again.
        drive.steps(11 * 120, 10, 20);
        assert_eq!(drive.budget.threshold_us, 40_000);
        assert_eq!(drive.step(10, 20).0, Some(Decision::Raise));
    }
}
