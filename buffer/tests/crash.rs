//! Crash test: a child process appends (sync mode) and acks on two lanes from two threads; the
//! parent kills it with SIGKILL at random moments, reopens the ring and checks that every append
//! that returned Ok and is not acked is present byte for byte, that seqs are contiguous, and that
//! watermarks never go backwards. LMDB writes through mmap and the OS page cache, so only a real
//! process kill (not a dropped handle) tests this.
//!
//! `TRIBUTARY_CRASH_ITERATIONS` sets the number of kills (default 50).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use buffer::{ReadLimits, RingConfig};
use common::{MIB, Rng, body_bytes, chunk, open};
use protocol::Lane;

const CHILD_ENV: &str = "TRIBUTARY_RING_CRASH_CHILD";
const LANES: [Lane; 2] = [Lane::Audit, Lane::Sensor];

fn crash_config() -> RingConfig {
    RingConfig::with_capacity(64 * MIB)
}

/// Chunk length for (lane, seq): the parent recomputes it to check bytes.
fn length_for(lane: Lane, seq: u64) -> usize {
    Rng(seq * 7 + lane.id() as u64).size_between(64, 48 * 1024)
}

/// The child: runs only when the parent re-executes this test binary with `CHILD_ENV` set.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else { return };
    let ring = open(Path::new(&path), crash_config());
    let stdout = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    for lane in LANES {
        let ring = ring.clone();
        let stdout = stdout.clone();
        std::thread::spawn(move || {
            let mut expected_seq = ring.stats().lane(lane).next_seq;
            loop {
                let seq =
                    ring.append(chunk(lane, expected_seq, length_for(lane, expected_seq))).expect("append");
                assert_eq!(seq, expected_seq, "one producer per lane gets consecutive seqs");
                expected_seq += 1;
                writeln!(stdout.lock().unwrap(), "@A {} {seq}", lane.id()).unwrap();
                if seq.is_multiple_of(8) {
                    let through = seq.saturating_sub(24);
                    ring.ack(lane, through).expect("ack");
                    writeln!(stdout.lock().unwrap(), "@K {} {through}", lane.id()).unwrap();
                }
            }
        });
    }
    // The producers run until the parent kills this process.
    loop {
        std::thread::park();
    }
}

#[derive(Default, Clone, Copy)]
struct Printed {
    appended_max: u64,
    acked_max: u64,
}

#[test]
fn kill_nine_never_loses_an_append_that_returned() {
    let iterations: usize =
        std::env::var("TRIBUTARY_CRASH_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    let executable = std::env::current_exe().unwrap();
    let mut rng = Rng(0xC0FFEE);
    let mut watermarks = [0u64; Lane::COUNT];
    let mut total_appends = 0u64;
    for iteration in 0..iterations {
        let mut child = Command::new(&executable)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut printed = [Printed::default(); Lane::COUNT];
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Markers start with '@': the harness may print its own text before them on a line.
                let Some(marker) = line.find('@').map(|at| &line[at + 1..]) else { continue };
                let fields: Vec<&str> = marker.split_whitespace().collect();
                let (Some(kind), Some(lane), Some(value)) = (fields.first(), fields.get(1), fields.get(2))
                else {
                    continue;
                };
                let (Ok(lane), Ok(value)) = (lane.parse::<usize>(), value.parse::<u64>()) else { continue };
                match *kind {
                    "A" => printed[lane].appended_max = printed[lane].appended_max.max(value),
                    "K" => printed[lane].acked_max = printed[lane].acked_max.max(value),
                    _ => {}
                }
            }
            printed
        });
        std::thread::sleep(Duration::from_millis(20 + rng.below(180)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let printed = reader.join().unwrap();

        let ring = open(&path, crash_config());
        let stats = ring.stats();
        for lane in LANES {
            let lane_stats = stats.lane(lane);
            let seen = printed[lane.index()];
            total_appends += seen.appended_max.saturating_sub(watermarks[lane.index()]);
            assert!(
                lane_stats.acked_through >= watermarks[lane.index()],
                "iteration {iteration}: {lane} watermark went backwards"
            );
            assert!(
                lane_stats.acked_through >= seen.acked_max,
                "iteration {iteration}: {lane} lost an ack that returned"
            );
            assert!(
                lane_stats.next_seq > seen.appended_max,
                "iteration {iteration}: {lane} lost an append that returned"
            );
            assert_eq!(lane_stats.evicted_chunks + lane_stats.quarantined_chunks, 0);
            let held = ring
                .read_from(lane, 0, ReadLimits { chunks_max: usize::MAX, bytes_max: usize::MAX })
                .unwrap();
            let seqs: Vec<u64> = held.iter().map(|stored| stored.seq).collect();
            let expected: Vec<u64> = (lane_stats.acked_through + 1..lane_stats.next_seq).collect();
            assert_eq!(
                seqs, expected,
                "iteration {iteration}: {lane} seqs not contiguous from the watermark"
            );
            for stored in &held {
                let body = body_bytes(lane, stored.seq, length_for(lane, stored.seq));
                assert!(
                    stored.body() == body.as_slice(),
                    "iteration {iteration}: {lane} seq {} corrupted",
                    stored.seq
                );
            }
            watermarks[lane.index()] = lane_stats.acked_through;
        }
    }
    assert!(total_appends > iterations as u64, "the child made progress ({total_appends} appends)");
}
