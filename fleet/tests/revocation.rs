//! The revocation file: parsing, idempotent atomic revokes, and reloads.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use fleet::{DeviceIdProblem, FleetError, RevocationList};

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|id| id.to_string()).collect()
}

/// The boundary of the file format: `text` parses to `expected` ids, or fails on the given line.
fn check(text: &str, expected: Result<&[&str], (usize, DeviceIdProblem)>) {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("revoked.txt");
    fs::write(&path, text).expect("write");
    match (RevocationList::open(&path), expected) {
        (Ok(list), Ok(ids)) => assert_eq!(list.revoked(), set(ids), "{text:?}"),
        (Err(FleetError::RevocationLine { line, problem, path: named }), Err(expected)) => {
            assert_eq!((line, problem), expected, "{text:?}");
            assert_eq!(named, path);
        }
        (result, expected) => panic!("{text:?}: got {result:?}, expected {expected:?}"),
    }
}

#[test]
fn file_format() {
    use DeviceIdProblem::*;
    check("", Ok(&[]));
    check("\n\n   \n", Ok(&[]));
    check("dev-1", Ok(&["dev-1"]));
    check("dev-1\ndev-2\n", Ok(&["dev-1", "dev-2"]));
    check("dev-1\r\ndev-2\r\n", Ok(&["dev-1", "dev-2"]));
    check("# revoked devices\n  dev-1  \n\tdev-2\t# stolen 2026-05-01\n#dev-3\n", Ok(&["dev-1", "dev-2"]));
    check("dev-1\ndev-1\n", Ok(&["dev-1"]));
    check("dev-1\ndev 2\n", Err((2, ForbiddenCharacter { character: ' ', position: 3 })));
    check("# ok\ncam.01\n", Err((2, ForbiddenCharacter { character: '.', position: 3 })));
    check(&"x".repeat(129), Err((1, TooLong { length: 129, max: 128 })));
}

#[test]
fn missing_file_is_an_empty_list() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let list = RevocationList::open(&directory.path().join("absent.txt")).expect("open");
    assert!(list.revoked().is_empty());
    assert!(!list.is_revoked("dev-1"));
    assert!(!list.reload_if_changed().expect("reload"));
}

#[test]
fn revoke_is_idempotent_and_keeps_the_rest_of_the_file() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("lists").join("revoked.txt");

    RevocationList::revoke(&path, "dev-1").expect("revoke creates the file");
    assert_eq!(fs::read_to_string(&path).expect("read"), "dev-1\n");
    RevocationList::revoke(&path, "dev-1").expect("revoke again");
    assert_eq!(fs::read_to_string(&path).expect("read"), "dev-1\n");

    fs::write(&path, "# lost on 2026-05-01\ndev-1 # stolen").expect("write");
    RevocationList::revoke(&path, "dev-2").expect("revoke");
    assert_eq!(fs::read_to_string(&path).expect("read"), "# lost on 2026-05-01\ndev-1 # stolen\ndev-2\n");
    RevocationList::revoke(&path, "dev-1").expect("revoke one that is there behind a comment");
    assert_eq!(fs::read_to_string(&path).expect("read"), "# lost on 2026-05-01\ndev-1 # stolen\ndev-2\n");
    assert_eq!(RevocationList::open(&path).expect("open").revoked(), set(&["dev-1", "dev-2"]));
    assert_only(&path, "revoked.txt");
}

/// Asserts that `path`'s directory holds only `name` (no temporary files left behind).
fn assert_only(path: &Path, name: &str) {
    let names: Vec<String> = fs::read_dir(path.parent().expect("parent"))
        .expect("list")
        .map(|entry| entry.expect("entry").file_name().into_string().expect("name"))
        .collect();
    assert_eq!(names, [name]);
}

#[test]
fn revoke_refuses_bad_input() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("revoked.txt");
    let result = RevocationList::revoke(&path, "../etc");
    assert!(matches!(result, Err(FleetError::InvalidDeviceId { .. })), "{result:?}");
    assert!(!path.exists());

    // A file the sink could not read is not extended either: the operator fixes it first.
    fs::write(&path, "dev-1\nnot valid\n").expect("write");
    let result = RevocationList::revoke(&path, "dev-2");
    assert!(matches!(result, Err(FleetError::RevocationLine { line: 2, .. })), "{result:?}");
    assert_eq!(fs::read_to_string(&path).expect("read"), "dev-1\nnot valid\n");
}

#[test]
fn reload_follows_the_file() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("revoked.txt");
    let list = RevocationList::open(&path).expect("open");
    let shared = list.clone();

    RevocationList::revoke(&path, "dev-1").expect("revoke");
    assert!(!shared.is_revoked("dev-1"), "not in force before a reload");
    assert!(list.reload_if_changed().expect("reload"));
    assert!(shared.is_revoked("dev-1"), "clones share the reloaded set");
    assert!(!list.reload_if_changed().expect("reload"), "nothing changed");

    RevocationList::revoke(&path, "dev-1").expect("revoke again");
    assert!(!list.reload_if_changed().expect("reload"), "an idempotent revoke changes nothing");

    // A change that leaves the set as it was: the file is re-read, the answer is "unchanged".
    fs::write(&path, "dev-1 # a comment\n").expect("write");
    assert!(!list.reload_if_changed().expect("reload"));

    RevocationList::revoke(&path, "dev-2").expect("revoke");
    assert!(list.reload_if_changed().expect("reload"));
    assert_eq!(shared.revoked(), set(&["dev-1", "dev-2"]));

    // Edits in place that keep the inode and the length, quicker than the file system's clock
    // ticks: the modification time may not change, yet each edit is seen.
    for edited in ["dev-1\ndev-3\n", "dev-1\ndev-4\n", "dev-1\ndev-2\n"] {
        fs::write(&path, edited).expect("edit in place");
        assert!(list.reload_if_changed().expect("reload"), "{edited:?}");
        assert_eq!(shared.revoked(), set(&edited.lines().collect::<Vec<_>>()));
    }

    // A broken file is an error and the previous set stays in force.
    fs::write(&path, "dev-1\ndev.2\n").expect("write");
    assert!(matches!(list.reload_if_changed(), Err(FleetError::RevocationLine { line: 2, .. })));
    assert_eq!(shared.revoked(), set(&["dev-1", "dev-2"]));

    fs::remove_file(&path).expect("remove");
    assert!(list.reload_if_changed().expect("reload"), "a removed file revokes nobody");
    assert!(shared.revoked().is_empty());
}

#[test]
fn oversized_file_is_refused() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("revoked.txt");
    let file = fs::File::create(&path).expect("create");
    file.set_len(fleet::REVOCATION_FILE_BYTES_MAX + 1).expect("grow");
    let result = RevocationList::open(&path);
    assert!(matches!(result, Err(FleetError::FileTooLarge { .. })), "{result:?}");
}

/// `key:` entries revoke one key under any id; a malformed one names its line.
#[test]
fn key_entries_revoke_one_key() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("revoked.txt");
    let key = "ab".repeat(32);
    RevocationList::revoke_key(&path, &key).expect("revoke key");
    RevocationList::revoke_key(&path, &key).expect("idempotent");
    RevocationList::revoke(&path, "dev-1").expect("revoke id");
    let list = RevocationList::open(&path).expect("open");
    assert!(list.is_key_revoked(&key));
    assert!(!list.is_key_revoked(&"cd".repeat(32)));
    assert!(!list.is_revoked(&key), "a key entry does not revoke an id spelled like it");
    assert!(list.is_revoked("dev-1"));
    assert_eq!(fs::read_to_string(&path).expect("read").lines().count(), 2);
    assert!(matches!(RevocationList::revoke_key(&path, "ABC"), Err(FleetError::RevocationKey { .. })));
    fs::write(&path, format!("dev-1\nkey:{}\n", "AB".repeat(32))).expect("write");
    match RevocationList::open(&path) {
        Err(FleetError::RevocationKey { line, .. }) => assert_eq!(line, 2),
        other => panic!("an upper-case fingerprint was accepted: {other:?}"),
    }
}
