//! Test support: a real etcd cluster of N members on loopback ports, each in its own temporary
//! data directory, killed when dropped. Used by this crate's tests and the process-level cluster
//! tests.
//!
//! `etcd_or_skip()`: tests skip (with a message) only when the `etcd` binary is missing and `CI`
//! is not `true`; under CI a missing etcd fails the test.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::etcd::EtcdClient;

/// How long a member set may take to elect a leader and answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// True when etcd can be run; false (after printing why) when the test should skip.
pub fn etcd_or_skip() -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if found {
        return true;
    }
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("etcd is missing and CI=true: install Debian's etcd-server (see .ci/run)");
    }
    eprintln!("SKIPPED: etcd is not installed (apt-get install etcd-server); CI would fail here");
    false
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    directory: tempfile::TempDir,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts `count` members and waits until every one answers a linearizable read.
    pub fn start(count: usize) -> EtcdCluster {
        assert!((1..=7).contains(&count));
        let directory = tempfile::tempdir().expect("temporary directory for etcd");
        let ports = free_ports(count * 2);
        let members: Vec<Member> = (0..count)
            .map(|index| Member {
                name: format!("etcd{index}"),
                client_port: ports[2 * index],
                peer_port: ports[2 * index + 1],
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster { directory, members };
        for index in 0..count {
            cluster.spawn(index, "new");
        }
        for index in 0..count {
            cluster.wait_ready(index);
        }
        cluster
    }

    /// Client endpoints (`127.0.0.1:port`) of every member, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|member| format!("127.0.0.1:{}", member.client_port)).collect()
    }

    /// SIGKILLs a member.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts a killed member from its data directory and waits until it answers.
    pub fn restart(&mut self, index: usize) {
        assert!(self.members[index].child.is_none(), "member {index} is running");
        self.spawn(index, "existing");
        self.wait_ready(index);
    }

    fn data_directory(&self, index: usize) -> PathBuf {
        self.directory.path().join(&self.members[index].name)
    }

    fn spawn(&mut self, index: usize, state: &str) {
        let initial_cluster: Vec<String> = self
            .members
            .iter()
            .map(|member| format!("{}=http://127.0.0.1:{}", member.name, member.peer_port))
            .collect();
        let member = &self.members[index];
        let client_url = format!("http://127.0.0.1:{}", member.client_port);
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.directory.path().join(format!("{}.log", member.name)))
            .expect("etcd log file");
        let child = Command::new("etcd")
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(self.data_directory(index))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster.join(","), "--initial-cluster-state", state])
            .args(["--initial-cluster-token", "tributary-test"])
            // Short raft timers: tests see leader loss and recovery in well under a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        self.members[index].child = Some(child);
    }

    fn wait_ready(&mut self, index: usize) {
        let endpoint = format!("127.0.0.1:{}", self.members[index].client_port);
        let mut client = EtcdClient::new(vec![endpoint.clone()], Duration::from_millis(1000));
        let started = Instant::now();
        loop {
            if client.get(b"/ready-probe").is_ok() {
                return;
            }
            if let Some(child) = self.members[index].child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "etcd member {index} exited with {status}; log in {}",
                    self.directory.path().display()
                );
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "etcd member {index} at {endpoint} not ready after {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}

/// Ports the kernel handed out just now (bound then released; a small race we accept in tests).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> =
        (0..count).map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a loopback port")).collect();
    listeners.iter().map(|listener| listener.local_addr().expect("bound address").port()).collect()
}
