//! Python `moto` in server mode on a free loopback port (`pip install 'moto[server]'`; CI installs
//! it), shared by the tests that need a real S3-compatible server.

#![allow(dead_code)] // each test binary uses its own part

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MOTO_START_TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_RESPONSE_BYTES_MAX: u64 = 1024 * 1024;

/// A moto server on a free loopback port, killed when dropped.
pub struct Moto {
    pub child: Child,
    pub address: SocketAddr,
}

impl Moto {
    pub fn start() -> Moto {
        let probe = Command::new("python3").args(["-c", "import moto.server, flask"]).output();
        match probe {
            Ok(output) if output.status.success() => {}
            Ok(output) => panic!(
                "this test needs moto's S3 server: install it with `python3 -m pip install 'moto[server]'` \
                 (CI does, in .ci/run); importing it failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => panic!(
                "this test needs python3 with moto's S3 server (`python3 -m pip install 'moto[server]'`): {error}"
            ),
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 -m moto.server");
        let mut moto = Moto { child, address };
        let started = Instant::now();
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!("moto server exited with {status} before listening on {address}");
            }
            assert!(
                started.elapsed() < MOTO_START_TIMEOUT,
                "moto server not listening on {address} after 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// Sets the test credentials object_store reads from the environment, starts the server and
    /// creates `bucket`. Call it before the test starts any thread of its own: it writes the
    /// process environment.
    pub fn start_with_bucket(bucket: &str) -> Moto {
        // SAFETY: called first in a test binary's only test, before any thread of its own
        // exists; nothing else in the process reads the environment concurrently.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "tributary-test-key");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "tributary-test-secret");
            std::env::remove_var("AWS_SESSION_TOKEN");
        }
        let moto = Moto::start();
        let (status, body) = moto.http("PUT", &format!("/{bucket}"), b"");
        assert_eq!(status, 200, "create bucket: {}", String::from_utf8_lossy(&body));
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// An S3 objects config for `bucket` and `prefix` on this server, with short bounds (one
    /// retry, short backoff and timeouts) so that a request to the stopped server fails in
    /// seconds, not minutes.
    pub fn objects_config(
        &self,
        bucket: &str,
        prefix: &str,
        request_timeout_ms: u64,
    ) -> archive::ObjectsConfig {
        archive::ObjectsConfig {
            retries_max: 1,
            retry_timeout_ms: 2_000,
            backoff_initial_ms: 50,
            backoff_max_ms: 200,
            connect_timeout_ms: 1_000,
            request_timeout_ms,
            ..archive::ObjectsConfig::s3(bucket, Some(&self.endpoint()), prefix)
        }
    }

    /// One plain, unsigned HTTP/1.1 request (moto takes them for bucket creation); returns the
    /// status and body.
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut stream = TcpStream::connect(self.address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.address,
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut response = Vec::new();
        stream.take(HTTP_RESPONSE_BYTES_MAX).read_to_end(&mut response).unwrap();
        let text = String::from_utf8_lossy(&response);
        let status = text.split(' ').nth(1).and_then(|code| code.parse().ok()).expect("an HTTP status line");
        let body_start =
            response.windows(4).position(|window| window == b"\r\n\r\n").map_or(response.len(), |at| at + 4);
        (status, response[body_start..].to_vec())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
