//! A minimal HTTP/1.0 client for etcd's JSON gateway: one request per connection
//! (`Connection: close`), std `TcpStream` with connect/read/write timeouts and an overall
//! deadline, the response read up to `RESPONSE_BYTES_MAX` (4 MiB) and refused beyond.
//!
//! Why not hyper/reqwest: the cluster client is synchronous (it runs on the sink's lander thread,
//! which is synchronous by design) and only ever POSTs small JSON bodies to loopback or LAN
//! endpoints. HTTP/1.0 keeps the server from chunking the answer, so the whole protocol is a
//! status line, headers and a body delimited by `Content-Length` or the end of the stream.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The largest response we read. etcd's answers here are one range of at most
/// `RANGE_KEYS_MAX` small keys or a txn result; 4 MiB is far above both.
pub const RESPONSE_BYTES_MAX: usize = 4 << 20;
/// The largest header block we accept.
const HEADER_BYTES_MAX: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Nothing was sent: safe to retry anywhere.
    #[error("connecting to {address}: {reason}")]
    Connect { address: String, reason: String },
    /// The request may have reached the server.
    #[error("talking to {address}: {reason}")]
    Exchange { address: String, reason: String },
}

impl HttpError {
    pub fn request_may_have_been_sent(&self) -> bool {
        matches!(self, HttpError::Exchange { .. })
    }
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// POSTs `body` (JSON) to `http://address/path` and returns the status and body.
pub fn post_json(address: &str, path: &str, body: &[u8], timeout: Duration) -> Result<Response, HttpError> {
    let deadline = Instant::now() + timeout;
    let connect = |reason: String| HttpError::Connect { address: address.to_string(), reason };
    let exchange = |reason: String| HttpError::Exchange { address: address.to_string(), reason };
    let socket_addresses: Vec<SocketAddr> =
        address.to_socket_addrs().map_err(|error| connect(format!("resolving: {error}")))?.collect();
    let socket_address = socket_addresses.first().ok_or_else(|| connect("resolves to no address".into()))?;
    let mut stream =
        TcpStream::connect_timeout(socket_address, timeout).map_err(|error| connect(error.to_string()))?;
    stream.set_nodelay(true).map_err(|error| connect(error.to_string()))?;
    stream.set_write_timeout(Some(timeout)).map_err(|error| connect(error.to_string()))?;
    let request_head = format!(
        "POST {path} HTTP/1.0\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut request = request_head.into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).map_err(|error| exchange(format!("sending: {error}")))?;

    let mut received = Vec::new();
    let mut buffer = [0u8; 16 << 10];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(exchange(format!("no complete answer within {} ms", timeout.as_millis())));
        }
        stream.set_read_timeout(Some(deadline - now)).map_err(|error| exchange(error.to_string()))?;
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => {
                received.extend_from_slice(&buffer[..count]);
                if received.len() > RESPONSE_BYTES_MAX + HEADER_BYTES_MAX {
                    return Err(exchange(format!("answer larger than {RESPONSE_BYTES_MAX} bytes")));
                }
                if response_complete(&received) {
                    break;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(exchange(format!("receiving: {error}"))),
        }
    }
    parse_response(&received).map_err(exchange)
}

fn header_end(received: &[u8]) -> Option<usize> {
    received.windows(4).position(|window| window == b"\r\n\r\n").map(|position| position + 4)
}

/// Whether a response with a Content-Length has all its body (lets us stop before EOF).
fn response_complete(received: &[u8]) -> bool {
    let Some(end) = header_end(received) else { return false };
    let Ok(head) = std::str::from_utf8(&received[..end]) else { return false };
    content_length(head).is_some_and(|length| received.len() - end >= length)
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
    })
}

/// Parses a complete HTTP/1.x response. Hostile input: every length is checked.
pub fn parse_response(received: &[u8]) -> Result<Response, String> {
    let end = header_end(received).ok_or("answer has no complete header block")?;
    if end > HEADER_BYTES_MAX {
        return Err(format!("header block larger than {HEADER_BYTES_MAX} bytes"));
    }
    let head = std::str::from_utf8(&received[..end]).map_err(|_| "header block is not UTF-8")?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 status line: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|code| code.parse().ok())
        .filter(|code| (100..600).contains(code))
        .ok_or_else(|| format!("bad status line: {status_line:?}"))?;
    let chunked = head.lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && !value.trim().eq_ignore_ascii_case("identity")
        })
    });
    if chunked {
        return Err("answer uses a transfer encoding (an HTTP/1.0 request must not get one)".into());
    }
    let body = &received[end..];
    if body.len() > RESPONSE_BYTES_MAX {
        return Err(format!("answer body larger than {RESPONSE_BYTES_MAX} bytes"));
    }
    let body = match content_length(head) {
        Some(length) if body.len() < length => {
            return Err(format!("answer truncated: {} of {length} body bytes", body.len()));
        }
        Some(length) => &body[..length],
        None => body,
    };
    Ok(Response { status, body: body.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &[u8], expected: Result<(u16, &[u8]), &str>) {
        let result = parse_response(input).map(|response| (response.status, response.body));
        match (result, expected) {
            (Ok((status, body)), Ok((expected_status, expected_body))) => {
                assert_eq!((status, body.as_slice()), (expected_status, expected_body))
            }
            (Err(error), Err(expected)) => {
                assert!(error.contains(expected), "{error:?} should contain {expected:?}")
            }
            (result, expected) => panic!("{result:?} != {expected:?}"),
        }
    }

    #[test]
    fn responses() {
        check(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", Ok((200, b"{}")));
        check(b"HTTP/1.1 200 OK\r\n\r\n{\"a\":1}", Ok((200, b"{\"a\":1}")));
        check(b"HTTP/1.0 503 Unavailable\r\ncontent-length: 0\r\n\r\n", Ok((503, b"")));
        check(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n{}", Err("truncated"));
        check(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n", Err("no complete header"));
        check(b"SSH-2.0\r\n\r\n", Err("not an HTTP/1 status line"));
        check(b"HTTP/1.0 999 X\r\n\r\n", Err("bad status line"));
        check(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            Err("transfer encoding"),
        );
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "Response({}, {} bytes)", self.status, self.body.len())
    }
}
