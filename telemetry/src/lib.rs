//! Latency histograms for the Prometheus text endpoints of the appliance and the core sink.
//!
//! A `LatencyHistogram` is a fixed set of cumulative-at-render buckets (`LATENCY_BUCKET_BOUNDS_US`,
//! 1 ms to 60 s, plus `+Inf`) of atomic counters, a sum and a count: observing is three relaxed
//! atomic adds, no lock and no allocation, so the uplink and the lander can observe every chunk.
//! Rendering follows the Prometheus text format (`_bucket{le=…}` cumulative, `_sum` in seconds,
//! `_count`). Memory is fixed: 17 counters per histogram.
//!
//! `LogRateLimit` keeps a repeating condition (a poison chunk per read, a step that fails every
//! poll) to one log line per interval, with the number of lines it held back. `TokenBucket` bounds
//! a rate (requests, bytes) with a burst; it reads no clock itself, so simulations drive it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets one log line through per `interval`; the caller counts the condition in a metric anyway.
#[derive(Debug)]
pub struct LogRateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogRateLimit {
    pub const fn new(interval: Duration) -> LogRateLimit {
        LogRateLimit { interval, last: None, suppressed: 0 }
    }

    /// `Some(lines held back since the last one let through)` when a line may be logged now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|last| now.saturating_duration_since(last) < self.interval) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// At most `rate` units per second on average, at most `burst` at once. The caller passes the
/// time (an `Instant`), so a virtual clock can drive it.
///
/// Two ways to take: `try_take` refuses what is not there (a request rate: the caller answers
/// "busy"); `reserve` always grants and leaves the bucket in debt, answering how long the caller
/// must wait before using what it took (a bandwidth budget: an object larger than the burst still
/// goes through, at the rate on average). Tokens are counted in millionths so that a refill of
/// `rate` tokens per second is exact per microsecond, without floating point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    rate_per_second: u64,
    burst: u64,
    /// Tokens held, in millionths; negative while in debt.
    micro_tokens: i128,
    refilled_at: Option<Instant>,
}

/// Millionths of a token per token.
const MICROS_PER_TOKEN: i128 = 1_000_000;

impl TokenBucket {
    /// A bucket that starts full. `rate_per_second` and `burst` are at least 1.
    pub fn new(rate_per_second: u64, burst: u64) -> TokenBucket {
        let burst = burst.max(1);
        TokenBucket {
            rate_per_second: rate_per_second.max(1),
            burst,
            micro_tokens: i128::from(burst) * MICROS_PER_TOKEN,
            refilled_at: None,
        }
    }

    pub fn rate_per_second(&self) -> u64 {
        self.rate_per_second
    }

    /// Changes the rate and the burst from `now` on (what was saved up beyond the new burst is
    /// dropped; a debt stays and is paid at the new rate).
    pub fn set_rate(&mut self, now: Instant, rate_per_second: u64, burst: u64) {
        self.refill(now);
        self.rate_per_second = rate_per_second.max(1);
        self.burst = burst.max(1);
        self.micro_tokens = self.micro_tokens.min(i128::from(self.burst) * MICROS_PER_TOKEN);
    }

    /// Takes `amount` tokens if they are there at `now`; returns whether it did. An amount larger
    /// than the burst never fits.
    pub fn try_take(&mut self, now: Instant, amount: u64) -> bool {
        self.refill(now);
        let wanted = i128::from(amount) * MICROS_PER_TOKEN;
        if wanted > self.micro_tokens {
            return false;
        }
        self.micro_tokens -= wanted;
        true
    }

    /// Takes `amount` tokens at `now` whether or not they are there; returns how long the caller
    /// must wait before using them (zero when they were there).
    pub fn reserve(&mut self, now: Instant, amount: u64) -> Duration {
        self.refill(now);
        self.micro_tokens -= i128::from(amount) * MICROS_PER_TOKEN;
        if self.micro_tokens >= 0 {
            return Duration::ZERO;
        }
        let rate = i128::from(self.rate_per_second);
        // Ceiling: after this many microseconds the debt is paid.
        let wait_us = (-self.micro_tokens + rate - 1) / rate;
        Duration::from_micros(u64::try_from(wait_us).unwrap_or(u64::MAX))
    }

    fn refill(&mut self, now: Instant) {
        let capacity = i128::from(self.burst) * MICROS_PER_TOKEN;
        if let Some(last) = self.refilled_at {
            let elapsed_us = now.saturating_duration_since(last).as_micros() as i128;
            // micro-tokens per microsecond = rate
            let added = elapsed_us.saturating_mul(i128::from(self.rate_per_second));
            self.micro_tokens = self.micro_tokens.saturating_add(added).min(capacity);
        }
        // A clock that went backwards (a virtual clock reset) neither refills nor stalls.
        if self.refilled_at.is_none_or(|last| now >= last) {
            self.refilled_at = Some(now);
        }
        assert!(self.micro_tokens <= capacity, "a bucket never holds more than its burst");
    }
}

/// The metric families a text names (a dashboard's queries, an alert file): every
/// `tributary_…` word, with a histogram's `_bucket`, `_sum` or `_count` suffix taken off.
pub fn metric_families_named_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut families = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("tributary_") {
        let word = &rest[start..];
        let end = word
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(word.len());
        let name = &word[..end];
        let family =
            ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(name);
        families.insert(family.to_owned());
        rest = &word[end..];
    }
    families
}

/// Upper bounds of the buckets, in microseconds; a last `+Inf` bucket takes the rest.
pub const LATENCY_BUCKET_BOUNDS_US: [u64; 15] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000, 30_000_000, 60_000_000,
];

const _: () = {
    let mut index = 1;
    while index < LATENCY_BUCKET_BOUNDS_US.len() {
        assert!(LATENCY_BUCKET_BOUNDS_US[index - 1] < LATENCY_BUCKET_BOUNDS_US[index]);
        index += 1;
    }
};

/// Since when the oldest item still waiting (a chunk for its ack, a commit in progress) has
/// waited: kept by the thread that queues and completes items, read as an age by another (the
/// replicator's adaptive budget, which must see a stuck commit that yields no latency sample).
#[derive(Debug, Default)]
pub struct OldestPending(std::sync::Mutex<Option<Instant>>);

impl OldestPending {
    /// The oldest waiting item is from `since` (`None`: nothing waits).
    pub fn set(&self, since: Option<Instant>) {
        *self.0.lock().expect("oldest pending lock") = since;
    }

    /// An item from `since` waits too: kept when older than what is there.
    pub fn add(&self, since: Instant) {
        let mut oldest = self.0.lock().expect("oldest pending lock");
        *oldest = Some(oldest.map_or(since, |oldest| oldest.min(since)));
    }

    /// How long the oldest item has waited at `now`; zero when nothing waits.
    pub fn age(&self, now: Instant) -> Duration {
        self.0
            .lock()
            .expect("oldest pending lock")
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKET_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// A consistent-enough copy for rendering and for tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub buckets: [u64; LATENCY_BUCKET_BOUNDS_US.len() + 1],
    pub sum_us: u64,
    pub count: u64,
}

impl LatencyHistogram {
    pub fn observe(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let index = LATENCY_BUCKET_BOUNDS_US
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(LATENCY_BUCKET_BOUNDS_US.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros.min(u64::MAX / 2), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|index| self.buckets[index].load(Ordering::Relaxed)),
            sum_us: self.sum_us.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    /// The upper bound of the bucket holding the `quantile` (0..=1) observation, in seconds;
    /// `None` with no observations, `f64::INFINITY` when it lies beyond the last bound. Coarse
    /// by design (a live view, not a benchmark).
    pub fn quantile_upper_bound_seconds(&self, quantile: f64) -> Option<f64> {
        assert!((0.0..=1.0).contains(&quantile), "quantile {quantile} outside 0..=1");
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((quantile * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(
                    LATENCY_BUCKET_BOUNDS_US.get(index).map_or(f64::INFINITY, |bound| *bound as f64 / 1e6),
                );
            }
        }
        unreachable!("the rank is at most the total")
    }
}

/// Writes `# HELP` and `# TYPE histogram` for `name`, then one series per `(labels, histogram)`;
/// `labels` is the inside of the braces without them (e.g. `lane="audit"`), or empty.
pub fn render_histograms(out: &mut String, name: &str, help: &str, series: &[(String, &LatencyHistogram)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (labels, histogram) in series {
        let snapshot = histogram.snapshot();
        let separator = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (index, count) in snapshot.buckets.iter().enumerate() {
            cumulative += count;
            let bound = LATENCY_BUCKET_BOUNDS_US
                .get(index)
                .map_or_else(|| "+Inf".to_string(), |bound| format!("{}", *bound as f64 / 1e6));
            let _ = writeln!(out, "{name}_bucket{{{labels}{separator}le=\"{bound}\"}} {cumulative}");
        }
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", snapshot.sum_us as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{braces} {}", snapshot.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 5);
        let taken = (0..20).filter(|_| bucket.try_take(start, 1)).count();
        assert_eq!(taken, 5, "a full bucket lets the burst through at once");
        assert!(!bucket.try_take(start + Duration::from_millis(99), 1), "under 1/rate nothing refills");
        assert!(bucket.try_take(start + Duration::from_millis(100), 1));
        // A long pause refills only up to the burst.
        let later = start + Duration::from_secs(3600);
        assert_eq!((0..20).filter(|_| bucket.try_take(later, 1)).count(), 5);
        // Over one simulated second at the limit: the rate, never more.
        let mut granted = 0;
        for millisecond in 1..=1000 {
            if bucket.try_take(later + Duration::from_millis(millisecond), 1) {
                granted += 1;
            }
        }
        assert_eq!(granted, 10);
        assert!(!bucket.try_take(later + Duration::from_secs(10), 6), "more than the burst never fits");
        // A clock that goes backwards takes nothing that was not there.
        assert!(bucket.try_take(later + Duration::from_secs(10), 5));
        assert!(!bucket.try_take(later, 1));
    }

    /// Runs `(now_us, amount, expected_wait_us)` reservations against a bucket of `rate` and
    /// `burst` whose first use is at 0 us of a virtual clock.
    fn check_reserve(rate: u64, burst: u64, steps: &[(u64, u64, u64)]) {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(rate, burst);
        for (number, &(now_us, amount, expected_wait_us)) in steps.iter().enumerate() {
            assert_eq!(
                bucket.reserve(start + Duration::from_micros(now_us), amount),
                Duration::from_micros(expected_wait_us),
                "step {number}: reserve {amount} at {now_us} us"
            );
        }
    }

    #[test]
    fn reserve_grants_the_burst_at_once() {
        check_reserve(1_000, 1_000, &[(0, 400, 0), (0, 600, 0)]);
    }

    #[test]
    fn beyond_the_burst_reserve_waits_for_the_debt() {
        // 1 000 bytes/s: 500 bytes of debt take half a second.
        check_reserve(1_000, 1_000, &[(0, 1_500, 500_000)]);
        // The debt is paid by the refill: at 0.5 s the bucket is empty again, not full.
        check_reserve(1_000, 1_000, &[(0, 1_500, 500_000), (500_000, 1, 1_000)]);
        // 10 MB at 1 MB/s with a 1 MB burst: 9 s of debt, then nothing owed.
        check_reserve(1_000_000, 1_000_000, &[(0, 10_000_000, 9_000_000), (9_000_000, 0, 0)]);
    }

    #[test]
    fn reserve_refills_up_to_the_burst_only() {
        // Ten idle seconds save one second's worth, not ten.
        check_reserve(1_000, 1_000, &[(0, 1_000, 0), (10_000_000, 1_000, 0), (10_000_000, 1_000, 1_000_000)]);
        // A clock that goes backwards adds nothing.
        check_reserve(1_000, 1_000, &[(5_000_000, 1_000, 0), (1_000_000, 1, 1_000)]);
    }

    #[test]
    fn the_sustained_rate_of_reservations_equals_the_rate() {
        // 100 objects of 100 bytes at 1 000 bytes/s with a 100-byte burst: the last one may go
        // at 9.9 s, whatever the callers' timing.
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1_000, 100);
        let mut now = start;
        for _ in 0..100 {
            now += bucket.reserve(now, 100);
        }
        assert_eq!(now - start, Duration::from_micros(9_900_000));
    }

    #[test]
    fn a_new_rate_applies_from_then_on_and_caps_the_savings() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1_000, 1_000);
        // In debt by 1 000 at 1 000/s; the rate drops to 100/s: the debt takes 10 s now.
        assert_eq!(bucket.reserve(start, 2_000), Duration::from_secs(1));
        bucket.set_rate(start, 100, 100);
        assert_eq!(bucket.reserve(start, 0), Duration::from_secs(10));
        // Savings beyond a smaller burst are dropped.
        let mut bucket = TokenBucket::new(1_000, 1_000);
        bucket.set_rate(start, 1_000, 10);
        assert!(bucket.try_take(start, 10));
        assert!(!bucket.try_take(start, 1));
        assert_eq!(bucket.rate_per_second(), 1_000);
    }

    fn check(observations_ms: &[u64], expected_buckets: &[(usize, u64)], expected_count: u64) {
        let histogram = LatencyHistogram::default();
        for ms in observations_ms {
            histogram.observe(Duration::from_millis(*ms));
        }
        let snapshot = histogram.snapshot();
        let mut expected = [0u64; LATENCY_BUCKET_BOUNDS_US.len() + 1];
        for (index, count) in expected_buckets {
            expected[*index] = *count;
        }
        assert_eq!(snapshot.buckets, expected, "observations {observations_ms:?}");
        assert_eq!(snapshot.count, expected_count);
        assert_eq!(snapshot.sum_us, observations_ms.iter().sum::<u64>() * 1000);
    }

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_holds_them() {
        check(&[], &[], 0);
        check(&[0, 1], &[(0, 2)], 2);
        check(&[2, 3], &[(1, 1), (2, 1)], 2);
        check(&[60_000], &[(14, 1)], 1);
        check(&[60_001, 3_600_000], &[(15, 2)], 2);
    }

    #[test]
    fn quantile_reports_the_bucket_bound() {
        let histogram = LatencyHistogram::default();
        assert_eq!(histogram.snapshot().quantile_upper_bound_seconds(0.99), None);
        for _ in 0..99 {
            histogram.observe(Duration::from_millis(3));
        }
        histogram.observe(Duration::from_secs(2));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.quantile_upper_bound_seconds(0.5), Some(0.005));
        assert_eq!(snapshot.quantile_upper_bound_seconds(0.99), Some(0.005));
        assert_eq!(snapshot.quantile_upper_bound_seconds(1.0), Some(2.5));
        histogram.observe(Duration::from_secs(100));
        assert_eq!(histogram.snapshot().quantile_upper_bound_seconds(1.0), Some(f64::INFINITY));
    }

    #[test]
    fn renders_cumulative_buckets_sum_and_count_per_series() {
        let (audit, media) = (LatencyHistogram::default(), LatencyHistogram::default());
        audit.observe(Duration::from_millis(2));
        audit.observe(Duration::from_millis(40));
        media.observe(Duration::from_secs(90));
        let mut out = String::new();
        render_histograms(
            &mut out,
            "x_seconds",
            "Help.",
            &[("lane=\"audit\"".into(), &audit), ("lane=\"media\"".into(), &media)],
        );
        assert!(out.starts_with("# HELP x_seconds Help.\n# TYPE x_seconds histogram\n"), "{out}");
        for line in [
            "x_seconds_bucket{lane=\"audit\",le=\"0.001\"} 0",
            "x_seconds_bucket{lane=\"audit\",le=\"0.0025\"} 1",
            "x_seconds_bucket{lane=\"audit\",le=\"0.05\"} 2",
            "x_seconds_bucket{lane=\"audit\",le=\"+Inf\"} 2",
            "x_seconds_sum{lane=\"audit\"} 0.042",
            "x_seconds_count{lane=\"audit\"} 2",
            "x_seconds_bucket{lane=\"media\",le=\"60\"} 0",
            "x_seconds_bucket{lane=\"media\",le=\"+Inf\"} 1",
            "x_seconds_count{lane=\"media\"} 1",
        ] {
            assert!(out.lines().any(|candidate| candidate == line), "missing {line:?} in\n{out}");
        }
    }
}

#[cfg(test)]
mod oldest_pending_tests {
    use super::*;

    #[test]
    fn the_age_is_that_of_the_oldest_item_and_zero_when_nothing_waits() {
        let start = Instant::now();
        let pending = OldestPending::default();
        assert_eq!(pending.age(start + Duration::from_secs(5)), Duration::ZERO);
        pending.add(start + Duration::from_secs(2));
        pending.add(start + Duration::from_secs(1));
        pending.add(start + Duration::from_secs(3));
        assert_eq!(pending.age(start + Duration::from_secs(4)), Duration::from_secs(3));
        pending.set(Some(start + Duration::from_secs(3)));
        assert_eq!(pending.age(start + Duration::from_secs(4)), Duration::from_secs(1));
        pending.set(None);
        assert_eq!(pending.age(start + Duration::from_secs(4)), Duration::ZERO);
    }
}

#[cfg(test)]
mod log_rate_limit_tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let mut limit = LogRateLimit::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(limit.allow(start), Some(0));
        for second in 1..10 {
            assert_eq!(limit.allow(start + Duration::from_secs(second)), None);
        }
        assert_eq!(limit.allow(start + Duration::from_secs(10)), Some(9));
        assert_eq!(limit.allow(start + Duration::from_secs(11)), None);
        assert_eq!(limit.allow(start + Duration::from_secs(25)), Some(1));
    }
}
