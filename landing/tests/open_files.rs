//! Raw landing keeps a bounded number of files open, whatever the number of (device, lane)
//! pairs it lands for: with the process's descriptor limit lowered below the number of pairs,
//! every chunk still lands, commits and reads back exactly once, also after a crash between a
//! file closed at the limit (with uncommitted bytes) and the next commit.
//!
//! Its own test binary: it lowers RLIMIT_NOFILE for the whole process.

use std::collections::BTreeMap;
use std::path::Path;

use landing::{CommittedLanding, Committer, RawLanding, ReadPosition};
use protocol::{Codec, Lane, SealedChunk};

/// More (device, lane) pairs than descriptors: the unbounded landing ran out at about this many.
const DEVICES: usize = 300;
const DESCRIPTORS: u64 = 200;

fn encoded(lane: Lane, seq: u64) -> Vec<u8> {
    let body = seq.to_le_bytes().to_vec();
    SealedChunk::new(lane, Codec::Raw, 0, 1, body.len() as u32, body).expect("valid chunk").encode(seq)
}

fn land(raw: &mut RawLanding, device: &str, lane: Lane, seq: u64) {
    let encoded = encoded(lane, seq);
    let (header, _) = protocol::decode_chunk(&encoded).expect("decodes");
    raw.land(device, &header, &encoded).unwrap_or_else(|error| panic!("land {device} {lane} {seq}: {error}"));
}

fn device(index: usize) -> String {
    format!("cam-{index:03}")
}

/// Every committed seq of every device's sensor lane.
fn read_all(dir: &Path, checkpoint: &[u8]) -> BTreeMap<String, Vec<u64>> {
    let committed = CommittedLanding::new(dir, checkpoint).expect("checkpoint parses");
    let mut seqs = BTreeMap::new();
    for index in 0..DEVICES {
        let from = ReadPosition { file_first_seq: 0, offset: 0, through_seq: 0 };
        let mut reader = committed.read(&device(index), Lane::Sensor, from).expect("files list");
        let mut device_seqs = Vec::new();
        while let Some(chunk) = reader.next_chunk().expect("committed landing reads back") {
            device_seqs.push(chunk.header.seq);
        }
        seqs.insert(device(index), device_seqs);
    }
    seqs
}

fn lower_descriptor_limit(limit: u64) {
    let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    let result = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) };
    assert_eq!(result, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn more_lanes_than_descriptors_land_commit_and_read_back_exactly_once() {
    let directory = tempfile::tempdir().expect("tempdir");
    let dir = directory.path().join("landing");
    lower_descriptor_limit(DESCRIPTORS);
    let mut raw = RawLanding::with_open_files_max(&dir, 1 << 20, 64);
    raw.recover(None).expect("recover");

    // Three rounds over every device, a commit after the first two only: round three is
    // uncommitted, partly in files closed at the limit, partly in files still open.
    for round in 1..=3u64 {
        for index in 0..DEVICES {
            land(&mut raw, &device(index), Lane::Sensor, round);
            assert!(raw.open_files() <= 64, "{} files open", raw.open_files());
        }
        if round < 3 {
            raw.commit().expect("commit");
        }
    }
    assert!(raw.files_closed_at_limit() >= (3 * DEVICES - 64) as u64);
    let checkpoint_after_two = raw.checkpoint();
    let expected_two: BTreeMap<String, Vec<u64>> =
        (0..DEVICES).map(|index| (device(index), vec![1, 2])).collect();
    assert_eq!(read_all(&dir, &checkpoint_after_two), expected_two);

    // A crash now: recovery from the last checkpoint drops round three everywhere.
    let mut recovered = RawLanding::with_open_files_max(&dir, 1 << 20, 64);
    recovered.recover(Some(&checkpoint_after_two)).expect("recover after the crash");
    assert_eq!(read_all(&dir, &checkpoint_after_two), expected_two);

    // Round three again, committed this time: the checkpoint covers files closed at the limit
    // before the commit as well as the open ones.
    for index in 0..DEVICES {
        land(&mut recovered, &device(index), Lane::Sensor, 3);
    }
    recovered.commit().expect("commit");
    let expected_three: BTreeMap<String, Vec<u64>> =
        (0..DEVICES).map(|index| (device(index), vec![1, 2, 3])).collect();
    assert_eq!(read_all(&dir, &recovered.checkpoint()), expected_three);
}
