//! Replication's budgets: a bandwidth budget (bytes per second) and an operations budget (objects
//! per second), each a `telemetry::TokenBucket` with a one-second burst. Pure logic: the caller
//! passes `now` and sleeps for what `reserve` answers, so the arithmetic is tested with a virtual
//! clock (`tests` below; the bucket's own tests are in the telemetry crate) and the replicator
//! drives it with `Instant::now()`.
//!
//! A reservation larger than the tokens available is granted and leaves the bucket in debt: the
//! caller waits until the debt is paid. An object larger than the burst therefore still goes
//! through, at the configured rate on average. The adaptive mode (`adaptive.rs`) moves the
//! bandwidth budget with `set_bytes_per_second`.

use std::time::{Duration, Instant};

use telemetry::TokenBucket;

/// Both budgets of one replicator; every object copied reserves its bytes and one operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Throttle {
    bytes: TokenBucket,
    objects: TokenBucket,
}

impl Throttle {
    /// Bursts of one second of each budget.
    pub fn new(bytes_per_second: u64, objects_per_second: u64) -> Throttle {
        assert!(
            bytes_per_second > 0 && objects_per_second > 0,
            "a budget of zero would stop replication forever"
        );
        Throttle {
            bytes: TokenBucket::new(bytes_per_second, bytes_per_second),
            objects: TokenBucket::new(objects_per_second, objects_per_second),
        }
    }

    /// Reserves one object of `bytes`; how long to wait before it may be sent.
    pub fn reserve(&mut self, now: Instant, bytes: u64) -> Duration {
        self.bytes.reserve(now, bytes).max(self.objects.reserve(now, 1))
    }

    /// Reserves `bytes` more of an object already reserved (a chunk of it); how long to wait.
    pub fn reserve_bytes(&mut self, now: Instant, bytes: u64) -> Duration {
        self.bytes.reserve(now, bytes)
    }

    /// How long until what was reserved may be used, at the rates in force at `now`.
    pub fn debt(&mut self, now: Instant) -> Duration {
        self.bytes.reserve(now, 0).max(self.objects.reserve(now, 0))
    }

    /// The bandwidth budget from `now` on (burst: one second of it).
    pub fn set_bytes_per_second(&mut self, now: Instant, bytes_per_second: u64) {
        assert!(bytes_per_second > 0, "a budget of zero would stop replication forever");
        self.bytes.set_rate(now, bytes_per_second, bytes_per_second);
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.bytes.rate_per_second()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_waits_for_the_tighter_budget() {
        let start = Instant::now();
        // Plenty of bandwidth, 2 objects per second: the third object waits half a second.
        let mut throttle = Throttle::new(1_000_000, 2);
        assert_eq!(throttle.reserve(start, 10), Duration::ZERO);
        assert_eq!(throttle.reserve(start, 10), Duration::ZERO);
        assert_eq!(throttle.reserve(start, 10), Duration::from_millis(500));
        // Plenty of operations, 100 bytes per second: 150 bytes wait for 50.
        let mut throttle = Throttle::new(100, 1_000);
        assert_eq!(throttle.reserve(start, 150), Duration::from_millis(500));
    }

    #[test]
    fn a_lowered_bandwidth_budget_slows_what_follows() {
        let start = Instant::now();
        let mut throttle = Throttle::new(1_000, 1_000);
        assert_eq!(throttle.reserve(start, 1_000), Duration::ZERO);
        throttle.set_bytes_per_second(start, 100);
        assert_eq!(throttle.bytes_per_second(), 100);
        // The bucket is empty; 100 bytes at 100 bytes/s take a second.
        assert_eq!(throttle.reserve(start, 100), Duration::from_secs(1));
        // Half of that debt is paid after half a second; raising the budget tenfold pays the rest
        // in a twentieth of a second.
        let half = start + Duration::from_millis(500);
        assert_eq!(throttle.debt(half), Duration::from_millis(500));
        throttle.set_bytes_per_second(half, 1_000);
        assert_eq!(throttle.debt(half), Duration::from_millis(50));
    }
}
