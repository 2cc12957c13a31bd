//! Raw HTTP/1 over a std `TcpStream`: exact bytes out, everything the server sends back in.
//! For framing cases a real HTTP client refuses to produce. Blocking: call from
//! `tokio::task::spawn_blocking` (or a plain thread) so the test's upstreams keep running.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// What came back on one connection.
#[derive(Debug)]
pub struct Exchange {
    /// Every byte the server sent.
    pub text: String,
    /// The server closed the connection (EOF or reset) within the read timeout.
    pub closed: bool,
}

impl Exchange {
    /// The status code of the first response, if any.
    pub fn status(&self) -> Option<u16> {
        self.text
            .strip_prefix("HTTP/1.")
            .and_then(|s| s.get(2..5))
            .and_then(|s| s.parse().ok())
    }

    /// The body of the first response (everything after the blank line).
    pub fn body(&self) -> &str {
        self.text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }
}

/// Sends `bytes` on a new connection to `port` and reads until the server closes it or
/// `wait` passes without a byte.
pub fn exchange(port: u16, bytes: &[u8], wait: Duration) -> Exchange {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the proxy");
    s.set_read_timeout(Some(wait)).expect("read timeout");
    s.write_all(bytes).expect("send");
    read_all(&mut s)
}

/// Reads until EOF, reset, or a read timeout.
pub fn read_all(s: &mut TcpStream) -> Exchange {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break false
            }
            Err(_) => break true,
        }
    };
    Exchange {
        text: String::from_utf8_lossy(&out).into_owned(),
        closed,
    }
}

/// Reads one response with a `Content-Length` body (enough for keep-alive tests); bytes
/// read past its end are dropped (see [`read_next_response`]).
pub fn read_response(s: &mut TcpStream) -> Option<String> {
    read_next_response(s, &mut Vec::new())
}

/// The next response on a connection that may carry several (pipelined answers): what a
/// read brought past the end of this one stays in `carry`, to start the next. (Reading each
/// answer with [`read_response`] would drop the next one when both come in one read.)
pub fn read_next_response(s: &mut TcpStream, carry: &mut Vec<u8>) -> Option<String> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = carry.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&carry[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if carry.len() >= end + 4 + len {
                let rest = carry.split_off(end + 4 + len);
                let answer = String::from_utf8_lossy(carry).into_owned();
                *carry = rest;
                return Some(answer);
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => carry.extend_from_slice(&buf[..n]),
        }
    }
}
