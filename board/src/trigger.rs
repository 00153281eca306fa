//! Debounced rising-edge timestamps from a polled GPIO input.
//!
//! The driver reads no clock of its own: the caller supplies a monotonic microsecond clock as a
//! closure (`FnMut() -> u64`), read once per `poll`, so tests drive it with a virtual clock.
//!
//! Debounce rule: a level change is accepted only when the pin has read the new level on every
//! poll for at least `debounce_us` microseconds (0..=`DEBOUNCE_US_MAX`, 1 000 000 µs). A rising
//! edge is reported once, when it is accepted, stamped with the clock value of the first poll that
//! saw the pin high, so debouncing delays the report but not the timestamp. Pulses shorter than
//! `debounce_us` are ignored in both directions: a short high glitch reports nothing, and a short
//! low glitch inside a high pulse neither reports a new edge nor re-arms the trigger.
//!
//! The first poll only learns the resting level: a pin already high then is not an edge.
//! Resolution is the polling interval; the trigger never sees pulses that fall between polls.

use embedded_hal::digital::InputPin;

/// Largest debounce accepted, 1 s: longer would hide real events at any sensible trigger rate.
pub const DEBOUNCE_US_MAX: u64 = 1_000_000;

/// Settings of a trigger input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How long a new level must hold before it counts, in microseconds, 0..=`DEBOUNCE_US_MAX`.
    pub debounce_us: u64,
}

/// An accepted rising edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RisingEdge {
    /// Clock value, in microseconds, of the first poll that saw the pin high.
    pub timestamp_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No poll yet: the resting level is unknown.
    Unknown,
    /// The accepted level, and the time a different level was first seen, if it has not held long enough yet.
    Stable { high: bool, pending_since_us: Option<u64> },
}

/// Polled trigger input over any embedded-hal 1.0 input pin.
pub struct Trigger<PIN, CLOCK> {
    pin: PIN,
    clock: CLOCK,
    debounce_us: u64,
    state: State,
    last_now_us: u64,
}

impl<PIN: InputPin, CLOCK: FnMut() -> u64> Trigger<PIN, CLOCK> {
    /// Wraps the pin and clock; does no I/O and reads no clock.
    pub fn new(pin: PIN, clock: CLOCK, config: Config) -> Self {
        assert!(
            config.debounce_us <= DEBOUNCE_US_MAX,
            "debounce {} µs above the maximum {} µs",
            config.debounce_us,
            DEBOUNCE_US_MAX
        );
        Self { pin, clock, debounce_us: config.debounce_us, state: State::Unknown, last_now_us: 0 }
    }

    /// Gives the pin and the clock back.
    pub fn destroy(self) -> (PIN, CLOCK) {
        (self.pin, self.clock)
    }

    /// Reads the clock and the pin once; returns the rising edge accepted by this poll, if any.
    pub fn poll(&mut self) -> Result<Option<RisingEdge>, PIN::Error> {
        let now_us = (self.clock)();
        assert!(
            now_us >= self.last_now_us,
            "clock went backwards: {} µs after {} µs",
            now_us,
            self.last_now_us
        );
        self.last_now_us = now_us;
        let level_high = self.pin.is_high()?;

        match self.state {
            State::Unknown => {
                self.state = State::Stable { high: level_high, pending_since_us: None };
                Ok(None)
            }
            State::Stable { high, pending_since_us } => {
                if level_high == high {
                    // Back at the accepted level: any pending change was a glitch.
                    self.state = State::Stable { high, pending_since_us: None };
                    return Ok(None);
                }
                let since_us = pending_since_us.unwrap_or(now_us);
                if now_us - since_us >= self.debounce_us {
                    self.state = State::Stable { high: level_high, pending_since_us: None };
                    if level_high {
                        return Ok(Some(RisingEdge { timestamp_us: since_us }));
                    }
                    return Ok(None);
                }
                self.state = State::Stable { high, pending_since_us: Some(since_us) };
                Ok(None)
            }
        }
    }
}
