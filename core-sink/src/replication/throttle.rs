//! Replication's budgets: a bandwidth budget (bytes per second) and an operations budget (objects
//! per second), each a token bucket. Pure logic: the caller passes `now_us` (microseconds on any
//! monotonic clock) and sleeps for what `reserve` answers, so the arithmetic is tested with a
//! virtual clock (`tests` below) and the replicator drives it with `Instant`.
//!
//! A reservation larger than the tokens available is granted and leaves the bucket in debt: the
//! caller waits until the debt is paid. An object larger than the burst therefore still goes
//! through, at the configured rate on average. Tokens are counted in millionths so that the refill
//! of `rate` tokens per second is exact per microsecond.

/// Millionths of a token per token.
const MICROS_PER_TOKEN: i128 = 1_000_000;

/// One budget: `rate_per_second` tokens per second, at most `burst` saved up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    rate_per_second: u64,
    burst: u64,
    /// Millionths of a token; negative while in debt.
    tokens_micros: i128,
    last_us: u64,
}

impl TokenBucket {
    /// A full bucket at `now_us`.
    pub fn new(rate_per_second: u64, burst: u64, now_us: u64) -> TokenBucket {
        assert!(rate_per_second > 0, "a budget of zero would stop replication forever");
        assert!(burst > 0);
        TokenBucket {
            rate_per_second,
            burst,
            tokens_micros: i128::from(burst) * MICROS_PER_TOKEN,
            last_us: now_us,
        }
    }

    fn refill(&mut self, now_us: u64) {
        // A clock that goes backwards adds nothing (and never takes tokens away).
        let elapsed_us = now_us.saturating_sub(self.last_us);
        self.last_us = self.last_us.max(now_us);
        let added = i128::from(elapsed_us) * i128::from(self.rate_per_second);
        let full = i128::from(self.burst) * MICROS_PER_TOKEN;
        self.tokens_micros = (self.tokens_micros + added).min(full);
    }

    /// Takes `amount` tokens at `now_us`; returns how many microseconds the caller must wait before
    /// using them (0 when they were there).
    pub fn reserve(&mut self, now_us: u64, amount: u64) -> u64 {
        self.refill(now_us);
        self.tokens_micros -= i128::from(amount) * MICROS_PER_TOKEN;
        if self.tokens_micros >= 0 {
            return 0;
        }
        let debt = -self.tokens_micros;
        let rate = i128::from(self.rate_per_second);
        // Ceiling: after this many microseconds the debt is paid.
        u64::try_from((debt + rate - 1) / rate).unwrap_or(u64::MAX)
    }
}

/// Both budgets of one replicator; every object copied reserves its bytes and one operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Throttle {
    bytes: TokenBucket,
    objects: TokenBucket,
}

impl Throttle {
    /// Bursts of one second of each budget.
    pub fn new(bytes_per_second_max: u64, objects_per_second_max: u64, now_us: u64) -> Throttle {
        Throttle {
            bytes: TokenBucket::new(bytes_per_second_max, bytes_per_second_max, now_us),
            objects: TokenBucket::new(objects_per_second_max, objects_per_second_max, now_us),
        }
    }

    /// Reserves one object of `bytes`; the wait before it may be sent, in microseconds.
    pub fn reserve(&mut self, now_us: u64, bytes: u64) -> u64 {
        self.bytes.reserve(now_us, bytes).max(self.objects.reserve(now_us, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `(now_us, amount)` reservations against a bucket of `rate` and `burst` created at 0
    /// and checks each wait.
    fn check(rate: u64, burst: u64, steps: &[(u64, u64, u64)]) {
        let mut bucket = TokenBucket::new(rate, burst, 0);
        for (number, &(now_us, amount, expected_wait_us)) in steps.iter().enumerate() {
            assert_eq!(
                bucket.reserve(now_us, amount),
                expected_wait_us,
                "step {number}: reserve {amount} at {now_us} us"
            );
        }
    }

    #[test]
    fn a_full_bucket_grants_its_burst_at_once() {
        check(1_000, 1_000, &[(0, 400, 0), (0, 600, 0)]);
    }

    #[test]
    fn beyond_the_burst_the_caller_waits_for_the_debt() {
        // 1 000 bytes/s: 500 bytes of debt take half a second.
        check(1_000, 1_000, &[(0, 1_500, 500_000)]);
        // The debt is paid by the refill: at 0.5 s the bucket is empty again, not full.
        check(1_000, 1_000, &[(0, 1_500, 500_000), (500_000, 1, 1_000)]);
    }

    #[test]
    fn the_refill_is_capped_at_the_burst() {
        // Ten idle seconds save one second's worth, not ten.
        check(1_000, 1_000, &[(0, 1_000, 0), (10_000_000, 1_000, 0), (10_000_000, 1_000, 1_000_000)]);
    }

    #[test]
    fn an_object_larger_than_the_burst_still_passes_at_the_rate() {
        // 10 MB at 1 MB/s with a 1 MB burst: 9 s of debt.
        check(1_000_000, 1_000_000, &[(0, 10_000_000, 9_000_000), (9_000_000, 0, 0)]);
    }

    #[test]
    fn a_clock_going_backwards_adds_nothing() {
        check(1_000, 1_000, &[(5_000_000, 1_000, 0), (1_000_000, 1, 1_000)]);
    }

    #[test]
    fn the_sustained_rate_equals_the_budget() {
        // 100 objects of 100 bytes at 1 000 bytes/s with a 100-byte burst: the last one may go
        // at 9.9 s, whatever the callers' timing.
        let mut bucket = TokenBucket::new(1_000, 100, 0);
        let mut now_us = 0;
        for _ in 0..100 {
            now_us += bucket.reserve(now_us, 100);
        }
        assert_eq!(now_us, 9_900_000);
    }

    #[test]
    fn the_throttle_waits_for_the_tighter_budget() {
        // Plenty of bandwidth, 2 objects per second: the third object waits half a second.
        let mut throttle = Throttle::new(1_000_000, 2, 0);
        assert_eq!(throttle.reserve(0, 10), 0);
        assert_eq!(throttle.reserve(0, 10), 0);
        assert_eq!(throttle.reserve(0, 10), 500_000);
        // Plenty of operations, 100 bytes per second: 150 bytes wait for 50.
        let mut throttle = Throttle::new(100, 1_000, 0);
        assert_eq!(throttle.reserve(0, 150), 500_000);
    }
}
