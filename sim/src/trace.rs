//! The run's trace: one line per notable event, kept as a bounded tail for failure reports and
//! printed as it happens in verbose mode.
//!
//! Formatting a line for every event costs more than simulating many of them, so a run starts
//! with tracing off; when it fails, `run_seed` replays the same seed with tracing on (a run is a
//! pure function of its seed) and reports the tail of that replay.
//!
//! Limits: the tail keeps the last [`TRACE_TAIL_LINES`] lines (or `Options::trace_lines`).

use std::collections::VecDeque;

/// Lines of trace kept for a failure report by default.
pub const TRACE_TAIL_LINES: usize = 400;

#[derive(Debug)]
pub struct Trace {
    pub enabled: bool,
    pub verbose: bool,
    lines_max: usize,
    lines: VecDeque<String>,
}

impl Trace {
    pub fn new(enabled: bool, verbose: bool, lines_max: usize) -> Trace {
        Trace { enabled: enabled || verbose, verbose, lines_max: lines_max.max(1), lines: VecDeque::new() }
    }

    pub fn line(&mut self, now: u64, line: String) {
        let line = format!("[{:>13}] {line}", crate::time::seconds(now));
        if self.verbose {
            eprintln!("{line}");
        }
        if self.lines.len() == self.lines_max {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    pub fn tail(&self) -> Vec<String> {
        self.lines.iter().cloned().collect()
    }
}
