//! `SinkState` as a `LandingStore`: ring bindings, watermarks and the checkpoint come back as
//! written, across a reopen; entries it cannot read are skipped (the others kept), never a failure
//! to start.
//!
//! The layout is re-declared here from `state.rs`'s module doc, so a change to the format shows
//! up as a failing test: database `watermarks`, key `device ‖ 0x00 ‖ lane id`, value u64 LE;
//! database `committer`, key `checkpoint`; database `rings`, key `device`, value `ring_id` (16
//! bytes) ‖ one u64 LE base per lane in lane id order (48 bytes).

use std::path::Path;

use heed::types::Bytes;
use heed::{Database, EnvOpenOptions};
use landing::{LandingStore, Prepared, RingBinding, SinkState, StoredState, Watermarks};
use protocol::Lane;

const RING_BINDING_BYTES: usize = 16 + 8 * Lane::COUNT;
const MAP_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone, Copy, Debug)]
enum Table {
    Watermarks,
    Committer,
    Rings,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Watermarks => "watermarks",
            Table::Committer => "committer",
            Table::Rings => "rings",
        }
    }
}

/// One raw entry: its database, key and value.
type Entry = (Table, Vec<u8>, Vec<u8>);

fn watermark_key(device: &[u8], lane_id: u8) -> Vec<u8> {
    [device, &[0, lane_id]].concat()
}

fn binding(ring: u8, bases: [u64; Lane::COUNT]) -> RingBinding {
    RingBinding { ring_id: [ring; 16], bases }
}

fn binding_bytes(binding: &RingBinding) -> Vec<u8> {
    let mut bytes = binding.ring_id.to_vec();
    for base in binding.bases {
        bytes.extend_from_slice(&base.to_le_bytes());
    }
    assert_eq!(bytes.len(), RING_BINDING_BYTES);
    bytes
}

/// Writes `entries` as they are into the databases of a state directory.
fn write_raw(path: &Path, entries: &[Entry]) {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(MAP_BYTES).max_dbs(3);
    // SAFETY: this test opens the path once at a time; the env is closed before SinkState opens it.
    let env = unsafe { options.open(path) }.expect("open the state env");
    let mut txn = env.write_txn().expect("begin");
    for (table, key, value) in entries {
        let database: Database<Bytes, Bytes> =
            env.create_database(&mut txn, Some(table.name())).expect("create database");
        database.put(&mut txn, key, value).expect("put");
    }
    txn.commit().expect("commit");
    env.prepare_for_closing().wait();
}

fn load(path: &Path) -> StoredState {
    SinkState::open(path).expect("open sink state").load().expect("load")
}

/// Raw entries in, what `SinkState` loads out.
fn check_load(entries: &[Entry], expected: StoredState) {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("state");
    std::fs::create_dir_all(&path).expect("create");
    write_raw(&path, entries);
    assert_eq!(load(&path), expected, "entries {entries:?}");
}

fn state(
    watermarks: &[(&str, Lane, u64)],
    bindings: &[(&str, RingBinding)],
    checkpoint: Option<&[u8]>,
) -> StoredState {
    StoredState {
        watermarks: watermarks
            .iter()
            .map(|(device, lane, seq)| ((device.to_string(), *lane), *seq))
            .collect(),
        bindings: bindings.iter().map(|(device, binding)| (device.to_string(), *binding)).collect(),
        checkpoint: checkpoint.map(<[u8]>::to_vec),
        prepared: None,
    }
}

#[test]
fn loads_what_the_layout_says() {
    let good = binding(7, [1, 2, 3, u64::MAX]);
    check_load(&[], StoredState::default());
    check_load(
        &[
            (Table::Watermarks, watermark_key(b"cam-01", Lane::Media.id()), 42u64.to_le_bytes().to_vec()),
            (Table::Watermarks, watermark_key(b"cam-01", Lane::Audit.id()), 7u64.to_le_bytes().to_vec()),
            (Table::Committer, b"checkpoint".to_vec(), b"cam-01 media 1 100\n".to_vec()),
            (Table::Rings, b"cam-01".to_vec(), binding_bytes(&good)),
        ],
        state(
            &[("cam-01", Lane::Media, 42), ("cam-01", Lane::Audit, 7)],
            &[("cam-01", good)],
            Some(b"cam-01 media 1 100\n"),
        ),
    );
}

#[test]
fn malformed_entries_are_skipped_and_the_rest_kept() {
    let good = binding(3, [10, 20, 30, 40]);
    let bytes = binding_bytes(&good);
    let keep_binding = (Table::Rings, b"kept".to_vec(), bytes.clone());
    let keep_watermark =
        (Table::Watermarks, watermark_key(b"kept", Lane::Sensor.id()), 5u64.to_le_bytes().to_vec());
    let kept = state(&[("kept", Lane::Sensor, 5)], &[("kept", good)], None);
    let malformed: Vec<(&str, Entry)> = vec![
        (
            "binding one byte short",
            (Table::Rings, b"short".to_vec(), bytes[..RING_BINDING_BYTES - 1].to_vec()),
        ),
        ("binding one byte long", (Table::Rings, b"long".to_vec(), [bytes.as_slice(), &[0]].concat())),
        ("binding of an empty value", (Table::Rings, b"empty".to_vec(), Vec::new())),
        ("binding under a non-UTF-8 device", (Table::Rings, vec![0xff, 0xfe], bytes.clone())),
        (
            "watermark of an unknown lane",
            (Table::Watermarks, watermark_key(b"dev", 9), 1u64.to_le_bytes().to_vec()),
        ),
        (
            "watermark without separator",
            (Table::Watermarks, b"dev\x01".to_vec(), 1u64.to_le_bytes().to_vec()),
        ),
        // LMDB refuses empty keys; the shortest key is a lone lane id.
        (
            "watermark of a lone lane id",
            (Table::Watermarks, vec![Lane::Audit.id()], 1u64.to_le_bytes().to_vec()),
        ),
        ("watermark of 7 bytes", (Table::Watermarks, watermark_key(b"dev", 0), vec![1; 7])),
        ("watermark of 9 bytes", (Table::Watermarks, watermark_key(b"dev", 0), vec![1; 9])),
    ];
    for (what, entry) in malformed {
        let entries = [keep_binding.clone(), keep_watermark.clone(), entry];
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("state");
        std::fs::create_dir_all(&path).expect("create");
        write_raw(&path, &entries);
        assert_eq!(load(&path), kept, "{what}");
    }
}

#[test]
fn bindings_round_trip_and_survive_a_reopen() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("state");
    let first = binding(1, [0; Lane::COUNT]);
    let renewed = binding(2, [5, 0, 9, u64::MAX]);
    let other = binding(1, [3, 3, 3, 3]);
    {
        let mut store = SinkState::open(&path).expect("open");
        store.bind("cam.02", &first).expect("bind");
        store.bind("caméra-1", &other).expect("bind");
        assert_eq!(store.load().expect("load"), state(&[], &[("cam.02", first), ("caméra-1", other)], None));
        // A new epoch replaces the device's binding.
        store.bind("cam.02", &renewed).expect("rebind");
        assert_eq!(
            store.load().expect("load"),
            state(&[], &[("cam.02", renewed), ("caméra-1", other)], None)
        );
    }
    assert_eq!(load(&path), state(&[], &[("cam.02", renewed), ("caméra-1", other)], None), "after a reopen");
}

#[test]
fn commits_merge_watermarks_replace_the_checkpoint_and_keep_bindings() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("state");
    let bound = binding(4, [1, 1, 1, 1]);
    let advanced = |entries: &[(&str, Lane, u64)]| -> Watermarks {
        entries.iter().map(|(device, lane, seq)| ((device.to_string(), *lane), *seq)).collect()
    };
    {
        let mut store = SinkState::open(&path).expect("open");
        store.bind("dev-1", &bound).expect("bind");
        store
            .commit(&advanced(&[("dev-1", Lane::Audit, 3), ("dev-2", Lane::Media, 9)]), b"one")
            .expect("commit");
        // Only the lanes a commit advanced are written; the others keep their watermark.
        store.commit(&advanced(&[("dev-1", Lane::Audit, 5)]), b"two").expect("commit");
        assert_eq!(store.load_watermarks().expect("load watermarks").1.as_deref(), Some(&b"two"[..]));
    }
    let expected =
        state(&[("dev-1", Lane::Audit, 5), ("dev-2", Lane::Media, 9)], &[("dev-1", bound)], Some(b"two"));
    assert_eq!(load(&path), expected, "after a reopen");
    let (watermarks, checkpoint) =
        SinkState::open(&path).expect("open").load_watermarks().expect("load watermarks");
    assert_eq!((watermarks, checkpoint), (expected.watermarks, expected.checkpoint));
}

/// Cluster mode: a prepared commit point survives a reopen without being current; promote makes
/// it current in one step; discard forgets it.
#[test]
fn prepared_commit_points_are_durable_and_not_current_until_promoted() {
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("state");
    let advanced: Watermarks = [(("dev-1".to_string(), Lane::Media), 7)].into_iter().collect();
    let prepared = Prepared { commit_id: 4, advanced: advanced.clone(), checkpoint: b"two".to_vec() };
    {
        let mut store = SinkState::open(&path).expect("open");
        store
            .commit(&[(("dev-1".to_string(), Lane::Media), 3)].into_iter().collect(), b"one")
            .expect("commit");
        store.prepare(&prepared).expect("prepare");
    }
    let loaded = load(&path);
    assert_eq!(loaded.prepared.as_ref(), Some(&prepared));
    assert_eq!(loaded.checkpoint.as_deref(), Some(&b"one"[..]), "prepared is not current");
    assert_eq!(loaded.watermarks[&("dev-1".to_string(), Lane::Media)], 3);
    {
        let mut store = SinkState::open(&path).expect("open");
        assert!(store.promote(5).is_err(), "only the prepared id can be promoted");
        store.promote(4).expect("promote");
    }
    let loaded = load(&path);
    assert_eq!(loaded, state(&[("dev-1", Lane::Media, 7)], &[], Some(b"two")));
    {
        let mut store = SinkState::open(&path).expect("open");
        store.prepare(&Prepared { commit_id: 5, ..prepared }).expect("prepare");
        store.discard_prepared().expect("discard");
    }
    assert_eq!(load(&path), state(&[("dev-1", Lane::Media, 7)], &[], Some(b"two")));
}
