//! The headers Kanaria adds, as the peers receive them: `X-Forwarded-For`,
//! `X-Forwarded-Proto` and a generated request id upstream, the version, the request id and
//! an issued cookie to the client. They are written at serialization (the vendored
//! Pingora's wire headers, vendor/patches/0012), so what a client or an upstream sent under
//! the same names must be replaced or kept exactly as before, over HTTP/1.1 and HTTP/2 on
//! both sides: the real binary, real curl clients, real hyper upstreams (HTTP/1.1 and h2c).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use tokio::net::TcpListener;

use common::Proxy;

/// An upstream that echoes every request header (all values of each name, in order) as
/// JSON and answers with its own request id, version header and a cookie: the ones Kanaria
/// must replace (the first two) or keep (the cookie).
async fn echo_upstream(h2: bool) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
                    for (k, v) in req.headers() {
                        seen.entry(k.as_str().to_string())
                            .or_default()
                            .push(v.to_str().unwrap_or("").to_string());
                    }
                    let body = serde_json::json!({ "version": format!("{:?}", req.version()), "headers": seen });
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("x-request-id", "from-upstream")
                            .header("x-kanaria-version", "upstream-says")
                            .header("set-cookie", "up=1")
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body.to_string())))
                            .unwrap(),
                    )
                });
                common::serve_hyper(stream, svc, h2).await;
            });
        }
    });
    (addr, task)
}

/// One answer as curl saw it: the HTTP version, every response header (lowercase names, in
/// order, repeats kept) and the body.
struct Answer {
    version: String,
    headers: Vec<(String, String)>,
    body: serde_json::Value,
}

impl Answer {
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// What the upstream received under `name`, every value.
    fn upstream(&self, name: &str) -> Vec<String> {
        self.body["headers"][name]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn curl(h2: bool, url: &str, headers: &[&str]) -> Answer {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--noproxy", "*", "-i"]);
    cmd.arg(if h2 {
        "--http2-prior-knowledge"
    } else {
        "--http1.1"
    });
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("run curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let version = status.split(' ').next().unwrap_or_default().to_string();
    assert!(status.contains(" 200"), "{text}");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"));
    Answer {
        version,
        headers,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_headers_replace_or_append_over_http1_and_http2() {
    let (h1_up, _t1) = echo_upstream(false).await;
    let (h2_up, _t2) = echo_upstream(true).await;
    // `/h1` to an HTTP/1.1 upstream, `/h2` to an h2c one; keys are issued (a cookie to
    // every client without one).
    let routes = format!(
        "[[routes]]\nname = \"h1\"\npath_prefix = \"/h1\"\nsticky_by = [\"issued_cookie:uid\"]\n\
         [routes.stable]\nversion = \"v1\"\nendpoints = [\"{h1_up}\"]\n\n\
         [[routes]]\nname = \"h2\"\npath_prefix = \"/h2\"\nsticky_by = [\"issued_cookie:uid\"]\n\
         [routes.stable]\nversion = \"v1\"\nprotocol = \"h2c\"\nendpoints = [\"{h2_up}\"]\n"
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .proxy("h2c = true")
        .start()
        .await;

    for client_h2 in [false, true] {
        for upstream in ["h1", "h2"] {
            let url = proxy.url(&format!("/{upstream}/x"));
            let case = format!("client h2 {client_h2}, upstream {upstream}");
            let client_version = if client_h2 { "HTTP/2" } else { "HTTP/1.1" };
            let upstream_version = if upstream == "h2" {
                "HTTP/2.0"
            } else {
                "HTTP/1.1"
            };

            // The client sends the forwarding headers (twice for XFF), a version header and
            // no request id.
            let a = curl(
                client_h2,
                &url,
                &[
                    "x-forwarded-for: 203.0.113.9",
                    "X-Forwarded-For: 198.51.100.7, 10.1.2.3",
                    "x-forwarded-proto: https",
                    "x-kanaria-version: client-says",
                ],
            );
            assert_eq!(a.version, client_version, "{case}");
            assert_eq!(a.body["version"], upstream_version, "{case}");
            // Upstream: one folded XFF with the peer appended, the listener's scheme (the
            // client is not a trusted proxy), one generated id; the client's version header
            // is not Kanaria's to remove (no override header is configured).
            assert_eq!(
                a.upstream("x-forwarded-for"),
                ["203.0.113.9, 198.51.100.7, 10.1.2.3, 127.0.0.1"],
                "{case}"
            );
            assert_eq!(a.upstream("x-forwarded-proto"), ["http"], "{case}");
            let ids = a.upstream("x-request-id");
            assert_eq!(ids.len(), 1, "{case}: {ids:?}");
            assert_eq!(ids[0].len(), 32, "{case}");
            assert_eq!(a.upstream("x-kanaria-version"), ["client-says"], "{case}");
            // Client: the upstream's request id and version replaced by Kanaria's, its
            // cookie kept beside the issued one.
            assert_eq!(a.all("x-request-id"), [ids[0].as_str()], "{case}");
            assert_eq!(a.all("x-kanaria-version"), ["stable"], "{case}");
            let cookies = a.all("set-cookie");
            assert_eq!(cookies.len(), 2, "{case}: {cookies:?}");
            assert!(cookies.contains(&"up=1"), "{case}: {cookies:?}");
            assert!(
                cookies.iter().any(|c| c.starts_with("uid=")),
                "{case}: {cookies:?}"
            );

            // A client's own request id is forwarded and the upstream's answered as it is;
            // a first proxy: XFF is the peer alone.
            let a = curl(client_h2, &url, &["x-request-id: abc-123"]);
            assert_eq!(a.upstream("x-request-id"), ["abc-123"], "{case}");
            assert_eq!(a.upstream("x-forwarded-for"), ["127.0.0.1"], "{case}");
            assert_eq!(a.upstream("x-forwarded-proto"), ["http"], "{case}");
            assert_eq!(a.all("x-request-id"), ["from-upstream"], "{case}");
            assert_eq!(a.all("x-kanaria-version"), ["stable"], "{case}");
        }
    }
}

/// An HTTP/1.1 upstream that answers `/none`, `/one` and `/two` with no, one (lowercase) or
/// two `Date` headers of its own, and `Connection: keep-alive` except to `/none` (so Pingora's
/// headers are added there, replaced elsewhere); keeps the connection alive; bodyless GETs.
async fn date_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let dates = if head.contains(" /two ") {
                        "Date: Mon, 01 Jan 2001 00:00:00 GMT\r\nDate: Tue, 02 Jan 2001 00:00:00 GMT\r\n"
                    } else if head.contains(" /one ") {
                        "date: Mon, 01 Jan 2001 00:00:00 GMT\r\n"
                    } else {
                        ""
                    };
                    let connection = if head.contains(" /none ") {
                        ""
                    } else {
                        "Connection: keep-alive\r\n"
                    };
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\n{dates}{connection}Content-Length: 2\r\n\r\nok"
                    );
                    if stream.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// Pingora's own `Date` and `Connection` on every HTTP/1 response head (set without map
/// inserts since vendor/patches/0015-0016): exactly one of each, Pingora's values, whether
/// the upstream sent none, one or two `Date` headers (and its own `Connection` or none), on
/// a kept-alive connection and on requests that close theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn date_and_connection_are_written_once() {
    use tokio::io::AsyncWriteExt;
    let (up, _t) = date_upstream().await;
    let routes = format!(
        "[[routes]]\nname = \"d\"\npath_prefix = \"/\"\n\
         [routes.stable]\nversion = \"v1\"\nendpoints = [\"{up}\"]\n"
    );
    let proxy = Proxy::builder().routes(&routes).start().await;
    // One kept-alive connection for the first three, one each for the two that close it.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .expect("connect");
    for (path, close) in [
        ("/none", false),
        ("/one", false),
        ("/two", false),
        ("/none", true),
        ("/two", true),
    ] {
        if close {
            conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
                .await
                .expect("connect");
        }
        let close_header = if close { "Connection: close\r\n" } else { "" };
        let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\n{close_header}\r\n");
        conn.write_all(req.as_bytes()).await.expect("send");
        let head = read_head_and_two_bytes(&mut conn).await;
        let lines: Vec<(String, String)> = head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let all = |name: &str| -> Vec<String> {
            lines
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .collect()
        };
        let dates = all("date");
        assert_eq!(dates.len(), 1, "{path}: {head}");
        assert!(!dates[0].contains("2001"), "{path}: {head}");
        assert!(dates[0].ends_with(" GMT"), "{path}: {head}");
        let expected = if close { "close" } else { "keep-alive" };
        assert_eq!(all("connection"), [expected], "{path}: {head}");
    }
}

/// Reads one response head and its 2-byte body from `conn`.
async fn read_head_and_two_bytes(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            if out.len() >= end + 4 + 2 {
                return String::from_utf8_lossy(&out[..end]).into_owned();
            }
        }
        let n = tokio::time::timeout_at(deadline, conn.read(&mut b))
            .await
            .expect("a response within 10 s")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
        out.push(b[0]);
    }
}
