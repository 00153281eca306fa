//! Reconnect delays: exponential from `min` to `max`, scaled by a jitter the caller draws (the
//! state machines never draw random numbers), reset after a session that ran long enough to
//! count as healthy.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// A session that lasted at least this long was healthy: the next delay starts from `min`.
    healthy_after: Duration,
    current: Duration,
}

/// The jitter range callers draw from: a delay is `current × jitter`.
pub const JITTER_MIN: f64 = 0.5;
pub const JITTER_MAX: f64 = 1.5;

impl Backoff {
    pub fn new(min: Duration, max: Duration, healthy_after: Duration) -> Backoff {
        assert!(!min.is_zero() && min <= max, "backoff needs 0 < min <= max, got {min:?}..{max:?}");
        Backoff { min, max, healthy_after, current: min }
    }

    /// The delay before the next connection attempt, after a session that lasted `ran_for`.
    /// `jitter` must be in `JITTER_MIN..=JITTER_MAX`; `at_once` (the ring took a new identity)
    /// skips the wait.
    pub fn next_delay(&mut self, ran_for: Duration, jitter: f64, at_once: bool) -> Duration {
        assert!(
            (JITTER_MIN..=JITTER_MAX).contains(&jitter),
            "jitter {jitter} outside {JITTER_MIN}..={JITTER_MAX}"
        );
        if ran_for >= self.healthy_after {
            self.current = self.min;
        }
        if at_once {
            return Duration::ZERO;
        }
        let delay = self.current.mul_f64(jitter);
        self.current = (self.current * 2).min(self.max);
        delay
    }

    /// The undelayed base of the next delay.
    pub fn current(&self) -> Duration {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_maximum_and_resets_after_a_healthy_session() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(50), ms(400), Duration::from_secs(10));
        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay(ms(1), 1.0, false)).collect();
        assert_eq!(delays, [ms(50), ms(100), ms(200), ms(400), ms(400)]);
        assert_eq!(backoff.next_delay(Duration::from_secs(11), 1.5, false), ms(75));
        assert_eq!(backoff.next_delay(ms(1), 0.5, false), ms(50));
        assert_eq!(backoff.next_delay(ms(1), 1.0, true), Duration::ZERO);
    }
}
