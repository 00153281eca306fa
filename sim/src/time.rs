//! Virtual time and the event queue.
//!
//! Time is a count of virtual microseconds since the start of the run. The state machines take
//! `std::time::Instant`s; the simulator hands them `base + now` where `base` is one `Instant`
//! read at the start of the run and never again: only differences between instants reach the
//! code under test, so the wall clock cannot change what a seed does.
//!
//! The queue orders events by (time, insertion order): two events at the same microsecond run in
//! the order they were scheduled, which keeps a run deterministic and keeps every byte stream's
//! fragments in order (see `link`).
//!
//! Limits: at most [`EVENTS_QUEUED_MAX`] events wait at once; more means a runaway feedback loop
//! in the simulator, and the run fails loudly instead of eating the machine's memory.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// Most events that may wait in the queue at once.
pub const EVENTS_QUEUED_MAX: usize = 2_000_000;

pub const MICROS_PER_MS: u64 = 1_000;
pub const MICROS_PER_S: u64 = 1_000_000;

/// Virtual microseconds as an `Instant`, and back.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock { base: Instant::now() }
    }

    pub fn instant(&self, micros: u64) -> Instant {
        self.base + Duration::from_micros(micros)
    }

    /// The virtual microsecond at or after `instant` (rounded up, so that waking at the returned
    /// time never finds a deadline still in the future).
    pub fn micros(&self, instant: Instant) -> u64 {
        let nanos = instant.saturating_duration_since(self.base).as_nanos();
        u64::try_from(nanos.div_ceil(1_000)).expect("virtual time fits u64 microseconds")
    }
}

struct Scheduled<E> {
    at: u64,
    order: u64,
    event: E,
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}

impl<E> Eq for Scheduled<E> {}

impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Scheduled<E> {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest event must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.order).cmp(&(self.at, self.order))
    }
}

/// Events by virtual time, ties in scheduling order.
pub struct Queue<E> {
    heap: BinaryHeap<Scheduled<E>>,
    next_order: u64,
    pub now: u64,
    pub processed: u64,
}

impl<E> Queue<E> {
    pub fn new() -> Queue<E> {
        Queue { heap: BinaryHeap::new(), next_order: 0, now: 0, processed: 0 }
    }

    /// Schedules `event` at `at` (never in the past: an earlier time runs now).
    pub fn at(&mut self, at: u64, event: E) {
        assert!(
            self.heap.len() < EVENTS_QUEUED_MAX,
            "more than {EVENTS_QUEUED_MAX} events queued: a runaway loop"
        );
        let at = at.max(self.now);
        self.heap.push(Scheduled { at, order: self.next_order, event });
        self.next_order += 1;
    }

    pub fn after(&mut self, delay: u64, event: E) {
        self.at(self.now.saturating_add(delay), event);
    }

    /// The next event, advancing the clock to it.
    pub fn pop(&mut self) -> Option<E> {
        let scheduled = self.heap.pop()?;
        assert!(scheduled.at >= self.now, "time never goes backwards");
        self.now = scheduled.at;
        self.processed += 1;
        Some(scheduled.event)
    }

    pub fn peek_time(&self) -> Option<u64> {
        self.heap.peek().map(|scheduled| scheduled.at)
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Queue::new()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// `micros` as seconds with six decimals, for traces.
pub fn seconds(micros: u64) -> String {
    format!("{}.{:06}", micros / MICROS_PER_S, micros % MICROS_PER_S)
}
