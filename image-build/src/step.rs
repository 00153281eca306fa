//! Running the build's steps: one progress spinner per step, each external command's output
//! kept in a log file whose tail is shown when the command fails, and the time of each step.

use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

/// Lines of a failed command's log shown in the error.
pub const LOG_TAIL_LINES: usize = 25;

pub struct Steps {
    total: usize,
    done: usize,
    pub timings: Vec<(String, Duration)>,
    show_progress: bool,
}

impl Steps {
    pub fn new(total: usize, show_progress: bool) -> Steps {
        Steps { total, done: 0, timings: Vec::new(), show_progress }
    }

    /// Runs `body` as the next step, with a spinner named `name`, and records its duration.
    pub fn run<T>(&mut self, name: &str, body: impl FnOnce(&ProgressBar) -> Result<T>) -> Result<T> {
        self.done += 1;
        assert!(self.done <= self.total, "more steps than announced ({})", self.total);
        let bar = if self.show_progress { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{prefix:.bold} {spinner} {msg} [{elapsed}]")
                .expect("static template")
                .tick_chars("⠁⠂⠄⡀⢀⠠⠐⠈✓"),
        );
        bar.set_prefix(format!("[{}/{}]", self.done, self.total));
        bar.set_message(name.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        // Spinners draw only on a terminal; CI logs get one plain line per step instead.
        let plain = self.show_progress && !std::io::stderr().is_terminal();
        if plain {
            eprintln!("[{}/{}] {name} ...", self.done, self.total);
        }
        tracing::info!(step = name, "starting");
        let started = Instant::now();
        let result = body(&bar);
        let elapsed = started.elapsed();
        let outcome = match &result {
            Ok(_) => {
                let outcome = format!("{name}: done in {:.1} s", elapsed.as_secs_f64());
                bar.finish_with_message(outcome.clone());
                outcome
            }
            Err(_) => {
                let outcome = format!("{name}: FAILED after {:.1} s", elapsed.as_secs_f64());
                bar.abandon_with_message(outcome.clone());
                outcome
            }
        };
        if plain {
            eprintln!("[{}/{}] {outcome}", self.done, self.total);
        }
        if result.is_ok() {
            tracing::info!(step = name, seconds = elapsed.as_secs_f64(), "done");
        }
        self.timings.push((name.to_string(), elapsed));
        result
    }
}

/// Runs `program arguments`, its stdout and stderr appended to `log`. On failure the error
/// holds the command, exit status and the log's last lines.
pub fn run_logged(
    program: &str,
    arguments: &[String],
    log: &Path,
    working_directory: Option<&Path>,
) -> Result<()> {
    let log_file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("failed to open log {}", log.display()))?;
    let mut command = Command::new(program);
    command
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().context("failed to duplicate log handle")?)
        .stderr(log_file);
    if let Some(directory) = working_directory {
        command.current_dir(directory);
    }
    tracing::debug!(?command, "running");
    let status = command.status().with_context(|| format!("failed to start {program}"))?;
    if !status.success() {
        bail!(
            "{program} failed ({status}); last lines of {}:\n{}",
            log.display(),
            log_tail(log, LOG_TAIL_LINES)
        );
    }
    Ok(())
}

pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub fn log_path(output: &Path, name: &str) -> PathBuf {
    output.join("logs").join(format!("{name}.log"))
}
