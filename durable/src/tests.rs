//! Crash tests: a child process (this test binary again) is SIGKILLed after each step of a
//! durable write, and at random moments while it rewrites a file in a loop; the destination must
//! hold the old content or the new content, whole, every time. SIGKILL keeps the page cache, so
//! it shows atomicity, not durability against power loss; that the file and its directory are
//! fsynced before the write returns is shown by the recorded step order.

use std::cell::RefCell;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::*;

thread_local! {
    static STEPS: RefCell<Vec<Step>> = const { RefCell::new(Vec::new()) };
}

const CHILD_PATH_ENV: &str = "TRIBUTARY_DURABLE_CHILD_PATH";
const CHILD_STOP_AFTER_ENV: &str = "TRIBUTARY_DURABLE_CHILD_STOP_AFTER";
const CHILD_LOOP_ENV: &str = "TRIBUTARY_DURABLE_CHILD_LOOP";
/// Large enough that a write takes several syscalls' worth of time, so random kills land inside.
const CONTENT_BYTES: usize = 4 * 1024 * 1024;

pub(super) fn record(step: Step) {
    STEPS.with(|steps| steps.borrow_mut().push(step));
    if std::env::var(CHILD_STOP_AFTER_ENV).is_ok_and(|name| name == format!("{step:?}")) {
        println!("stopped after {step:?}");
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }
}

fn recorded() -> Vec<Step> {
    STEPS.with(|steps| std::mem::take(&mut *steps.borrow_mut()))
}

fn content(byte: u8) -> Vec<u8> {
    vec![byte; CONTENT_BYTES]
}

/// What a reader may see: the old content (`a`) or the new one (`b`), whole.
fn check_whole(path: &Path, allowed: &[u8]) {
    let bytes = fs::read(path).expect("the destination exists throughout");
    assert_eq!(bytes.len(), CONTENT_BYTES, "torn file at {}", path.display());
    let first = bytes[0];
    assert!(allowed.contains(&first), "unexpected content {first}");
    assert!(bytes.iter().all(|byte| *byte == first), "mixed content at {}", path.display());
}

/// The child's side: runs only when the parent set the environment.
#[test]
fn child_process_entry() {
    let Ok(path) = std::env::var(CHILD_PATH_ENV) else { return };
    let path = Path::new(&path);
    if std::env::var(CHILD_LOOP_ENV).is_ok() {
        println!("looping");
        for round in 0u64.. {
            write(path, &content(if round % 2 == 0 { b'b' } else { b'a' })).expect("write");
        }
    }
    write(path, &content(b'b')).expect("write");
    println!("finished");
}

fn spawn_child(path: &Path, stop_after: Option<Step>, looping: bool) -> std::process::Child {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args(["tests::child_process_entry", "--exact", "--nocapture", "--test-threads=1", "--quiet"])
        .env(CHILD_PATH_ENV, path)
        .stdout(Stdio::piped());
    if let Some(step) = stop_after {
        command.env(CHILD_STOP_AFTER_ENV, format!("{step:?}"));
    }
    if looping {
        command.env(CHILD_LOOP_ENV, "1");
    }
    command.spawn().expect("spawn the child")
}

/// Reads the child's stdout up to a line starting with `prefix`.
fn wait_for_line(child: &mut std::process::Child, prefix: &str) -> BufReader<std::process::ChildStdout> {
    let mut reader = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).expect("read the child's output") > 0, "child exited early");
        if line.starts_with(prefix) {
            return reader;
        }
    }
}

#[test]
fn a_child_killed_after_any_step_leaves_the_old_or_the_new_file_whole() {
    let steps = [
        Step::TemporaryCreated,
        Step::TemporaryWritten,
        Step::TemporarySynced,
        Step::Installed,
        Step::DirectorySynced,
    ];
    for step in steps {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("state.bin");
        write(&path, &content(b'a')).unwrap();
        let mut child = spawn_child(&path, Some(step), false);
        let _reader = wait_for_line(&mut child, "stopped after");
        child.kill().expect("SIGKILL the child");
        child.wait().unwrap();
        let installed = matches!(step, Step::Installed | Step::DirectorySynced);
        check_whole(&path, if installed { b"b" } else { b"a" });
        // The temporary is clutter after a crash; a store listing its directory recognises it.
        for entry in fs::read_dir(directory.path()).unwrap() {
            let entry = entry.unwrap().path();
            assert!(entry == path || is_temporary(&entry), "unexpected file {}", entry.display());
        }
    }
}

#[test]
fn a_child_killed_at_random_moments_never_leaves_a_torn_file() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("state.bin");
    write(&path, &content(b'a')).unwrap();
    for kill in 0..20u64 {
        let mut child = spawn_child(&path, None, true);
        let _reader = wait_for_line(&mut child, "looping");
        // Spread the kills over a few writes' worth of time without a random generator.
        std::thread::sleep(Duration::from_millis(5 + (kill * 7919) % 40));
        child.kill().expect("SIGKILL the child");
        child.wait().unwrap();
        check_whole(&path, b"ab");
    }
}

#[test]
fn a_write_fsyncs_the_file_before_the_rename_and_the_directory_after_it() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("state.bin");
    recorded();
    write(&path, b"one").unwrap();
    assert_eq!(
        recorded(),
        [
            Step::TemporaryCreated,
            Step::TemporaryWritten,
            Step::TemporarySynced,
            Step::Installed,
            Step::DirectorySynced
        ]
    );
    assert_eq!(fs::read(&path).unwrap(), b"one");
    let temporary = directory.path().join(".shard.tar.partial");
    let mut file = File::create(&temporary).unwrap();
    file.write_all(b"shard").unwrap();
    sync_file(&file, &temporary).unwrap();
    rename_into_place(&temporary, &directory.path().join("shard.tar")).unwrap();
    assert_eq!(recorded(), [Step::Installed, Step::DirectorySynced]);
}

#[test]
fn keep_existing_refuses_atomically_and_leaves_no_temporary() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("ca.key");
    let options = Options::default().mode(0o600).keep_existing();
    options.write(&path, b"first").unwrap();
    let error = options.write(&path, b"second").unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
    assert_eq!(error.path, path);
    assert_eq!(fs::read(&path).unwrap(), b"first");
    let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(fs::read_dir(directory.path()).unwrap().count(), 1);
}

#[test]
fn errors_name_the_operation_and_the_path() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("missing").join("state.json");
    let error = write(&path, b"{}").unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::NotFound);
    assert!(error.to_string().starts_with("create "), "{error}");
    Options::default().create_directory().write(&path, b"{}").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"{}");
    let error = write(Path::new("/"), b"").unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn a_streamed_write_installs_all_its_source_or_nothing_when_the_source_fails() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("shard.tar");
    let bytes: Vec<u8> = (0..200_000u32).map(|index| (index % 251) as u8).collect();
    assert_eq!(Options::default().write_from(&path, &mut &bytes[..]).unwrap(), 200_000);
    assert_eq!(fs::read(&path).unwrap(), bytes);
    // A source that fails after some bytes: the old file stays, no temporary is left.
    struct Failing(usize);
    impl io::Read for Failing {
        fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("source gone"));
            }
            let read = buffer.len().min(self.0);
            buffer[..read].fill(7);
            self.0 -= read;
            Ok(read)
        }
    }
    let error = Options::default().write_from(&path, &mut Failing(100_000)).unwrap_err();
    assert_eq!(error.operation, "read source");
    assert!(error.to_string().contains("source gone"), "{error}");
    assert_eq!(fs::read(&path).unwrap(), bytes);
    assert_eq!(fs::read_dir(directory.path()).unwrap().count(), 1);
}
