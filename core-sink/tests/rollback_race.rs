//! A rollback must never let a later Ack cover a gap, even when another connection of the same
//! device was welcomed before the rollback.
//!
//! The race: a Welcome's resume seq is `landed + 1` (server.rs), and `landed` counts chunks
//! written but not yet committed. Connection C1 of a device lands seqs 1..=10 uncommitted;
//! connection C2 of the same device (a reconnect) is welcomed with resume seq 11; then C1's
//! writes are rolled back, by a failed `Committer::land` of C1's seq 11 or by a failed
//! `Committer::commit` of seqs 1..=11. `landed` drops back to the durable 0 and only C1 is
//! refused, so C2's seqs 11 and 12 land above a gap and the next commit makes the durable
//! watermark (what Acks report, after which the device trims its ring) 12 while seqs 1..=10
//! were never committed.
//!
//! C2 sends everything from its resume seq: whatever lies at or below C1's uncommitted seq 10
//! (nothing today) before the failure, where the lander drops it as duplicates of C1's writes,
//! and the rest after. So a sink that resumes from the durable watermark instead still has to
//! refuse C2 after the rollback: its resend of 1..=10 was dropped, and its seq 11 would land
//! above the same gap.
//!
//! Deterministic: one lander thread fed in order through its channel and a scripted committer
//! that fails on a chosen call. The lander API is touched only by `Driver`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use core_sink::SinkMetrics;
use core_sink::lander::{LandRequest, Lander, LanderConfig, SharedWatermarks};
use core_sink::landing::{Committer, LandingError};
use core_sink::state::SinkState;
use protocol::{ChunkBuilder, ChunkHeader, Lane, RecordRef};
use tokio::sync::{Notify, Semaphore, watch};

const DEVICE: &str = "racer";
const LANE: Lane = Lane::Sensor;
/// C1's chunks that sit landed but uncommitted when C2 is welcomed.
const UNCOMMITTED_SEQ_LAST: u64 = 10;
/// The device's last chunk: C2 sends `UNCOMMITTED_SEQ_LAST + 1..=SEQ_LAST`.
const SEQ_LAST: u64 = 12;
const C1: u64 = 1;
const C2: u64 = 2;
/// The device's connection after everything settled, resending from its Welcome.
const C3: u64 = 3;
/// Bounds every wait on the lander thread.
const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// Which write is made to fail while C1's seqs 1..=10 are landed but not committed.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// `Committer::land` of C1's seq 11 (the 11th land call) fails.
    Land,
    /// C1's seq 11 lands and reaches `commit_bytes_max`; that first `Committer::commit` fails.
    Commit,
}

/// What the committer holds: written since the last commit, and committed, in call order.
#[derive(Debug, Default)]
struct Model {
    written: Vec<(String, Lane, u64)>,
    committed: Vec<(String, Lane, u64)>,
    land_calls: u64,
    commit_calls: u64,
}

impl Model {
    fn committed_seqs(&self) -> Vec<u64> {
        self.committed
            .iter()
            .filter(|(device, lane, _)| device == DEVICE && *lane == LANE)
            .map(|entry| entry.2)
            .collect()
    }
}

/// A committer over `Model` that fails the chosen land and commit calls (1-based).
struct ScriptedCommitter {
    model: Arc<Mutex<Model>>,
    fail_land_call: Option<u64>,
    fail_commit_call: Option<u64>,
}

fn injected(operation: &str) -> LandingError {
    LandingError::Io {
        path: format!("scripted/{operation}").into(),
        source: std::io::Error::other(format!("injected {operation} failure")),
    }
}

impl Committer for ScriptedCommitter {
    fn land(&mut self, device: &str, header: &ChunkHeader, _encoded: &[u8]) -> Result<(), LandingError> {
        let mut model = self.model.lock().unwrap();
        model.land_calls += 1;
        if self.fail_land_call == Some(model.land_calls) {
            return Err(injected("land"));
        }
        model.written.push((device.to_string(), header.lane, header.seq));
        Ok(())
    }

    fn commit(&mut self) -> Result<(), LandingError> {
        let mut model = self.model.lock().unwrap();
        model.commit_calls += 1;
        if self.fail_commit_call == Some(model.commit_calls) {
            return Err(injected("commit"));
        }
        let written = std::mem::take(&mut model.written);
        model.committed.extend(written);
        Ok(())
    }

    fn checkpoint(&self) -> Vec<u8> {
        (self.model.lock().unwrap().committed.len() as u64).to_le_bytes().to_vec()
    }

    fn recover(&mut self, checkpoint: Option<&[u8]>) -> Result<(), LandingError> {
        let committed = checkpoint.map_or(0, |bytes| u64::from_le_bytes(bytes.try_into().expect("8 bytes")));
        let mut model = self.model.lock().unwrap();
        model.committed.truncate(committed as usize);
        model.written.clear();
        Ok(())
    }

    fn discard_uncommitted(&mut self, device: &str, lane: Lane) -> Result<(), LandingError> {
        self.model.lock().unwrap().written.retain(|entry| !(entry.0 == device && entry.1 == lane));
        Ok(())
    }
}

fn encoded_chunk(seq: u64) -> (ChunkHeader, Vec<u8>) {
    let mut builder = ChunkBuilder::new(LANE, 64 * 1024);
    let key = format!("{DEVICE}-sensor-{seq:010}");
    builder
        .push(RecordRef { key: &key, timestamp_us: seq, content_type: "application/json", payload: b"{}" })
        .expect("valid record");
    let chunk = builder.seal_raw();
    (chunk.header(seq), chunk.encode(seq))
}

/// Bytes of C1's seqs 1..=11: a `commit_bytes_max` of exactly this puts the commit point right
/// after C1's seq 11 lands.
fn c1_bytes() -> u64 {
    (1..=UNCOMMITTED_SEQ_LAST + 1).map(|seq| encoded_chunk(seq).1.len() as u64).sum()
}

/// A lander on its own thread, fed in order as the sessions feed it; the only code here that
/// knows the lander's API.
struct Driver {
    requests: mpsc::Sender<LandRequest>,
    thread: std::thread::JoinHandle<()>,
    shared: Arc<SharedWatermarks>,
    _durable_generation: watch::Receiver<u64>,
    in_flight: Arc<Semaphore>,
    kills: BTreeMap<u64, Arc<Notify>>,
}

impl Driver {
    fn start(state_dir: &Path, committer: ScriptedCommitter, commit_bytes_max: u64) -> Driver {
        let state = SinkState::open(state_dir).expect("sink state");
        // Commits happen only at `commit_bytes_max` and when the channel closes.
        let config = LanderConfig { commit_interval: Duration::from_secs(3600), commit_bytes_max };
        let (lander, shared, durable_generation) =
            Lander::new(config, Box::new(committer), state, Arc::new(SinkMetrics::default()))
                .expect("lander");
        let (requests, receiver) = mpsc::channel();
        let thread = std::thread::spawn(move || lander.run(receiver));
        Driver {
            requests,
            thread,
            shared,
            _durable_generation: durable_generation,
            in_flight: Arc::new(Semaphore::new(1 << 30)),
            kills: BTreeMap::new(),
        }
    }

    /// Connection `connection` sends its chunk `seq`, as a `LaneReader` does.
    fn send(&mut self, connection: u64, seq: u64) {
        let (header, encoded) = encoded_chunk(seq);
        let permit =
            self.in_flight.clone().try_acquire_many_owned(encoded.len() as u32).expect("room in flight");
        let kill = self.kills.entry(connection).or_insert_with(|| Arc::new(Notify::new())).clone();
        let device: Arc<str> = Arc::from(DEVICE);
        let request =
            LandRequest { device, connection, header, encoded, permit, kill, received_at: Instant::now() };
        self.requests.send(request).expect("the lander is running");
    }

    fn landed(&self) -> u64 {
        self.shared.landed(DEVICE, LANE)
    }

    /// The resume seq a Welcome built now would carry. This mirrors `run_session` in server.rs
    /// (landed watermark + 1); when the sink changes how it picks a resume seq, this line changes
    /// with it.
    fn resume_seq(&self) -> u64 {
        self.landed() + 1
    }

    fn wait_landed(&self, seq: u64) {
        let deadline = Instant::now() + WAIT_LIMIT;
        while self.landed() != seq {
            assert!(Instant::now() < deadline, "landed watermark {} never reached {seq}", self.landed());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Closes the channel (the lander commits what is pending and returns), then reports the
    /// durable watermark and which connections were told to close.
    fn finish(self) -> (u64, BTreeMap<u64, bool>) {
        drop(self.requests);
        self.thread.join().expect("the lander thread returns");
        let durable = self.shared.durable(DEVICE, LANE);
        let killed = self
            .kills
            .iter()
            .map(|(&connection, kill)| {
                let notified = std::pin::pin!(kill.notified());
                (connection, notified.poll(&mut Context::from_waker(Waker::noop())) == Poll::Ready(()))
            })
            .collect();
        (durable, killed)
    }
}

fn persisted_watermark(state_dir: &Path) -> u64 {
    let (watermarks, _) = SinkState::open(state_dir).expect("reopen sink state").load().expect("load");
    watermarks.get(&(DEVICE.to_string(), LANE)).copied().unwrap_or(0)
}

/// What one run showed, kept whole so a failure prints every symptom.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
struct Observed {
    failure: Failure,
    resume_seq_welcomed_to_c2: u64,
    durable_after_race: u64,
    persisted_after_race: u64,
    committed_after_race: Vec<u64>,
    connections_told_to_close: BTreeMap<u64, bool>,
    durable_after_resend: u64,
    committed_after_resend: Vec<u64>,
}

fn check(failure: Failure) {
    let directory = tempfile::tempdir().expect("temp dir");
    let state_dir = directory.path().join("state");
    let model = Arc::new(Mutex::new(Model::default()));
    let (fail_land_call, fail_commit_call, commit_bytes_max) = match failure {
        Failure::Land => (Some(UNCOMMITTED_SEQ_LAST + 1), None, u64::MAX),
        Failure::Commit => (None, Some(1), c1_bytes()),
    };
    let committer = ScriptedCommitter { model: model.clone(), fail_land_call, fail_commit_call };
    let mut driver = Driver::start(&state_dir, committer, commit_bytes_max);

    for seq in 1..=UNCOMMITTED_SEQ_LAST {
        driver.send(C1, seq);
    }
    driver.wait_landed(UNCOMMITTED_SEQ_LAST);
    // C2 connects now and is welcomed, as `run_session` builds the Welcome (today: 11, above
    // C1's uncommitted writes), and sends what it has up to C1's last write.
    let resume_seq_welcomed_to_c2 = driver.resume_seq();
    for seq in resume_seq_welcomed_to_c2..=UNCOMMITTED_SEQ_LAST {
        driver.send(C2, seq);
    }
    // C1's seq 11 fails to land, or lands and its commit point fails: C1's writes roll back.
    driver.send(C1, UNCOMMITTED_SEQ_LAST + 1);
    for seq in resume_seq_welcomed_to_c2.max(UNCOMMITTED_SEQ_LAST + 1)..=SEQ_LAST {
        driver.send(C2, seq);
    }
    let (durable_after_race, connections_told_to_close) = driver.finish();
    let persisted_after_race = persisted_watermark(&state_dir);
    let committed_after_race = model.lock().unwrap().committed_seqs();

    // The device reconnects once more and resends from its Welcome: in the end every seq it
    // holds must be landed exactly once, in order.
    let committer = ScriptedCommitter { model: model.clone(), fail_land_call: None, fail_commit_call: None };
    let mut driver = Driver::start(&state_dir, committer, u64::MAX);
    for seq in driver.resume_seq()..=SEQ_LAST {
        driver.send(C3, seq);
    }
    let (durable_after_resend, _) = driver.finish();
    let committed_after_resend = model.lock().unwrap().committed_seqs();

    let observed = Observed {
        failure,
        resume_seq_welcomed_to_c2,
        durable_after_race,
        persisted_after_race,
        committed_after_race,
        connections_told_to_close,
        durable_after_resend,
        committed_after_resend,
    };
    let exactly_through = |through: u64| (1..=through).collect::<Vec<u64>>();
    assert!(
        observed.committed_after_race == exactly_through(observed.durable_after_race)
            && observed.persisted_after_race == observed.durable_after_race
            && observed.durable_after_resend == SEQ_LAST
            && observed.committed_after_resend == exactly_through(SEQ_LAST),
        "the durable watermark must cover exactly the committed seqs 1..=durable (it is what Acks report), \
         and after the device resends everything lands once; observed {observed:#?}"
    );
}

#[test]
fn a_failed_land_never_lets_a_connection_welcomed_before_it_land_above_the_gap() {
    check(Failure::Land);
}

#[test]
fn a_failed_commit_never_lets_a_connection_welcomed_before_it_land_above_the_gap() {
    check(Failure::Commit);
}
