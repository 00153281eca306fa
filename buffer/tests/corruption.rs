//! A damaged ring never wedges the appliance: bad chunks are quarantined and counted, a ring LMDB
//! cannot open is moved aside intact (or refused, by policy), and unknown versions are rejected.

mod common;

use std::fs;
use std::path::Path;

use buffer::{OnCorrupt, ReadLimits, Ring, RingConfig, RingError};
use common::{MIB, chunk, open};
use protocol::Lane;

fn config(on_corrupt: OnCorrupt) -> RingConfig {
    let mut config = RingConfig::with_capacity(8 * MIB);
    config.on_corrupt = on_corrupt;
    config
}

fn all(ring: &Ring, lane: Lane) -> Vec<u64> {
    let read = ring.read_from(lane, 0, ReadLimits { chunks_max: usize::MAX, bytes_max: usize::MAX }).unwrap();
    read.iter().map(|stored| stored.seq).collect()
}

/// Damages the ring at `path` with `damage`, then checks both policies: `refuse` leaves the bytes
/// untouched and names the path; `quarantine` moves them aside intact and starts a fresh ring.
fn check_damaged(name: &str, damage: impl Fn(&Path)) {
    for policy in [OnCorrupt::Refuse, OnCorrupt::Quarantine] {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("ring");
        damage(&path);
        let before = snapshot(&path);
        match (policy, Ring::open(&path, config(policy))) {
            (OnCorrupt::Refuse, Err(RingError::CorruptRefused { path: named, reason })) => {
                assert_eq!(named, path, "{name}: {reason}");
                assert_eq!(snapshot(&path), before, "{name}: refuse must not touch the ring");
            }
            (OnCorrupt::Quarantine, Ok(ring)) => {
                let aside = ring.stats().quarantined_ring.expect("moved aside");
                assert!(aside.to_string_lossy().contains("ring.corrupt-"), "{name}: {}", aside.display());
                assert_eq!(snapshot(&aside), before, "{name}: moved aside intact");
                // The fresh ring works.
                assert_eq!(ring.append(chunk(Lane::Sensor, 1, 100)).unwrap(), 1);
            }
            (_, Err(error)) => panic!("{name} with {policy:?}: unexpected error {error}"),
            (_, Ok(_)) => panic!("{name} with {policy:?}: opened a damaged ring"),
        }
    }
}

/// Every file under `path` with its bytes (or the file itself when it is one).
fn snapshot(path: &Path) -> Vec<(String, Vec<u8>)> {
    if path.is_file() {
        return vec![(String::new(), fs::read(path).unwrap())];
    }
    let mut files: Vec<_> = fs::read_dir(path)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|file| file.file_name().unwrap() != "lock.mdb")
        .map(|file| (file.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&file).unwrap()))
        .collect();
    files.sort();
    files
}

fn ring_with_chunks(path: &Path) {
    let ring = open(path, config(OnCorrupt::Refuse));
    for step in 0..20 {
        ring.append(chunk(Lane::Sensor, step, 50_000)).unwrap();
    }
}

#[test]
fn garbage_file_is_handled_by_policy() {
    check_damaged("garbage data.mdb", |path| {
        fs::create_dir_all(path).unwrap();
        let garbage: Vec<u8> =
            (0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        fs::write(path.join("data.mdb"), garbage).unwrap();
    });
}

#[test]
fn a_file_where_the_ring_directory_should_be_is_handled_by_policy() {
    check_damaged("file at the ring path", |path| fs::write(path, b"not a ring").unwrap());
}

#[test]
fn truncated_ring_is_handled_by_policy() {
    check_damaged("truncated data.mdb", |path| {
        ring_with_chunks(path);
        let file = fs::OpenOptions::new().write(true).open(path.join("data.mdb")).unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len / 2).unwrap();
    });
}

#[test]
fn foreign_lmdb_environment_is_handled_by_policy() {
    check_damaged("foreign LMDB", |path| {
        fs::create_dir_all(path).unwrap();
        let env =
            unsafe { heed::EnvOpenOptions::new().map_size(MIB as usize).max_dbs(2).open(path).unwrap() };
        let mut txn = env.write_txn().unwrap();
        let users =
            env.create_database::<heed::types::Str, heed::types::Str>(&mut txn, Some("users")).unwrap();
        users.put(&mut txn, "alice", "admin").unwrap();
        txn.commit().unwrap();
        env.prepare_for_closing().wait();
    });
}

#[test]
fn newer_format_is_refused_even_under_quarantine() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    ring_with_chunks(&path);
    {
        let env =
            unsafe { heed::EnvOpenOptions::new().map_size(9 * MIB as usize).max_dbs(3).open(&path).unwrap() };
        let mut txn = env.write_txn().unwrap();
        let meta =
            env.open_database::<heed::types::Bytes, heed::types::Bytes>(&txn, Some("meta")).unwrap().unwrap();
        meta.put(&mut txn, b"format", b"tributary-ring/2").unwrap();
        txn.commit().unwrap();
        env.prepare_for_closing().wait();
    }
    let error = Ring::open(&path, config(OnCorrupt::Quarantine)).err().expect("refused");
    assert!(
        matches!(&error, RingError::UnsupportedFormat { found, .. } if found == "tributary-ring/2"),
        "{error}"
    );
    assert!(error.to_string().contains(&path.display().to_string()));
}

#[test]
fn a_flipped_bit_in_a_chunk_is_quarantined_and_counted_not_sent() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    ring_with_chunks(&path);
    // Flip one bit in the body of seq 7; bodies are deterministic, so find it in the file.
    let needle = &chunk(Lane::Sensor, 6, 50_000).body[1000..1064];
    let data_file = path.join("data.mdb");
    let mut bytes = fs::read(&data_file).unwrap();
    let offset = bytes.windows(needle.len()).position(|window| window == needle).expect("body in file");
    bytes[offset + 10] ^= 0x04;
    fs::write(&data_file, bytes).unwrap();

    let ring = open(&path, config(OnCorrupt::Refuse));
    let expected: Vec<u64> = (1..=20).filter(|seq| *seq != 7).collect();
    assert_eq!(all(&ring, Lane::Sensor), expected, "the damaged chunk is skipped");
    ring.sync().unwrap(); // the quarantine request is ahead of this one in the writer's queue
    let stats = ring.stats();
    assert_eq!(stats.lane(Lane::Sensor).quarantined_chunks, 1);
    assert_eq!(stats.lane(Lane::Sensor).chunk_count, 19);
    assert_eq!(all(&ring, Lane::Sensor), expected);
    // Accounting stays right: acking everything leaves nothing.
    ring.ack(Lane::Sensor, 20).unwrap();
    assert_eq!(ring.stats().lane(Lane::Sensor).bytes_used, 0);
}

#[test]
fn a_ring_larger_than_the_configured_capacity_is_a_config_error() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    {
        let ring = open(&path, RingConfig::with_capacity(64 * MIB));
        for step in 0..40 {
            ring.append(chunk(Lane::Sensor, step, 1_000_000)).unwrap();
        }
    }
    match Ring::open(&path, RingConfig::with_capacity(8 * MIB)) {
        Err(RingError::Config { key: "capacity_bytes", problem }) => {
            assert!(problem.contains("data.mdb"), "{problem}")
        }
        Err(other) => panic!("expected a capacity config error, got {other}"),
        Ok(_) => panic!("expected a capacity config error"),
    }
}

#[test]
fn the_same_ring_cannot_be_opened_twice_in_one_process() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ring");
    let _ring = open(&path, config(OnCorrupt::Quarantine));
    let error = Ring::open(&path, config(OnCorrupt::Quarantine)).err().expect("second open refused");
    assert!(matches!(error, RingError::AlreadyOpen { .. }), "{error}");
}
