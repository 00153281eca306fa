//! Trigger input: debounce and timestamps against scripted pins and a virtual clock.

use board::sim::SimPin;
use board::trigger::{Config, RisingEdge, Trigger};
use embedded_hal_mock::eh1::MockError;
use embedded_hal_mock::eh1::digital::{Mock as PinMock, State, Transaction as PinTransaction};

/// Polls once per `(clock_us, level_high)` sample; `expected` lists the rising-edge timestamps
/// in the order they are reported.
fn check(samples: &[(u64, bool)], debounce_us: u64, expected: &[u64]) {
    let times: Vec<u64> = samples.iter().map(|&(time_us, _)| time_us).collect();
    let levels: Vec<bool> = samples.iter().map(|&(_, high)| high).collect();
    let mut clock = times.into_iter();
    let mut trigger =
        Trigger::new(SimPin::new(levels), move || clock.next().unwrap(), Config { debounce_us });
    let mut reported = Vec::new();
    for _ in samples {
        if let Some(RisingEdge { timestamp_us }) = trigger.poll().unwrap() {
            reported.push(timestamp_us);
        }
    }
    assert_eq!(reported, expected, "samples {samples:?}, debounce {debounce_us} µs");
    let (pin, _clock) = trigger.destroy();
    assert_eq!(pin.reads(), samples.len());
}

#[test]
fn first_poll_learns_resting_level() {
    check(&[(0, true), (100, true), (200, true)], 0, &[]);
    check(&[(0, false), (100, true)], 0, &[100]);
}

#[test]
fn no_debounce_reports_every_rising_edge() {
    check(&[(0, false), (10, true), (20, false), (30, true), (40, true), (50, false)], 0, &[10, 30]);
}

#[test]
fn debounce_delays_report_but_keeps_first_seen_timestamp() {
    // High from 100 µs; accepted at 600 µs (500 µs later), stamped 100 µs.
    check(&[(0, false), (100, true), (300, true), (599, true), (600, true), (700, true)], 500, &[100]);
}

#[test]
fn debounce_ignores_short_glitches() {
    // A 200 µs high glitch is shorter than the 500 µs debounce.
    check(&[(0, false), (100, true), (300, false), (1_000, false)], 500, &[]);
    // A low glitch inside a long high pulse neither re-arms nor reports a second edge.
    check(&[(0, false), (100, true), (700, true), (800, false), (900, true), (2_000, true)], 500, &[100]);
    // A glitch restarts the stability window: the edge is stamped where the level settled.
    check(&[(0, false), (100, true), (200, false), (300, true), (700, true), (800, true)], 500, &[300]);
}

#[test]
fn debounced_falling_edge_rearms() {
    check(
        &[(0, false), (100, true), (700, true), (800, false), (1_400, false), (1_500, true), (2_100, true)],
        500,
        &[100, 1_500],
    );
}

#[test]
fn pin_error_surfaces_and_mock_sees_every_read() {
    let error = MockError::Io(std::io::ErrorKind::NotConnected);
    let expectations = [
        PinTransaction::get(State::Low),
        PinTransaction::get(State::High),
        PinTransaction::get(State::High).with_error(error.clone()),
    ];
    let mut time_us = 0;
    let clock = move || {
        time_us += 1_000;
        time_us
    };
    let mut trigger = Trigger::new(PinMock::new(&expectations), clock, Config { debounce_us: 0 });
    assert_eq!(trigger.poll(), Ok(None));
    assert_eq!(trigger.poll(), Ok(Some(RisingEdge { timestamp_us: 2_000 })));
    assert_eq!(trigger.poll(), Err(error));
    let (mut pin, _clock) = trigger.destroy();
    pin.done();
}
