//! What the vendored Pingora's memory patches change (issue 23, `vendor/patches/0019`–):
//! a kept-alive client connection waits for its next request without a header buffer or
//! the request's future, both taken again when bytes arrive. Checked end to end through the
//! real `kanaria` binary: an idle connection woken by a large head (more than the first
//! header buffer, arriving in pieces) gets its answer, and again after another idle wait;
//! pipelined requests on one connection are all answered, in order; a slow upstream's
//! answer of several MiB arrives whole, and the connection is reused after it. And HTTP/2
//! (the vendored `h2`'s patches 0024–0028: an idle connection gives back its buffers and
//! slabs): an idle connection whose bytes arrive cut at arbitrary places is woken by a
//! large head with a large body, by concurrent streams and by headers from the HPACK
//! tables, towards an HTTP/1.1 and an h2c upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::raw::{read_next_response, read_response};
use common::{pool, Proxy, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(20);
/// How long a client leaves its connection idle before the next request: long enough for
/// the proxy to have read everything, found nothing more and parked the connection (the
/// state under test). Not a timing assertion: any value passes the test, a shorter one
/// may only test less.
const IDLE: Duration = Duration::from_millis(300);

fn route(addr: SocketAddr) -> String {
    format!(
        "[[routes]]\nname = \"app\"\n{}",
        pool("routes.stable", "v1", &[addr])
    )
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the proxy");
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    s
}

/// The status of a response read by [`read_response`].
fn status(response: &str) -> Option<u16> {
    response.get(9..12).and_then(|s| s.parse().ok())
}

/// How many headers a large head has.
const LARGE_HEADERS: usize = 20;

/// Header `i` of a large head: `x-large-{i}`, 1,000 times one letter.
fn large_header(i: usize) -> (String, String) {
    let c = char::from(b'a' + i as u8);
    (format!("x-large-{i}"), c.to_string().repeat(1000))
}

/// A request head of about 20 KiB: the [`LARGE_HEADERS`] headers of [`large_header`]
/// (under Kanaria's default 64 KiB and 100-header limits), five times the first header
/// buffer (4 KiB).
fn large_head(path: &str) -> Vec<u8> {
    let mut s = format!("GET {path} HTTP/1.1\r\nHost: a\r\n");
    for (name, value) in (0..LARGE_HEADERS).map(large_header) {
        s.push_str(&format!("{name}: {value}\r\n"));
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// The echo upstream saw every header of [`large_head`], whole.
fn saw_large_head(response: &str, path: &str) {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let echo: serde_json::Value = serde_json::from_str(body).expect("the upstream's echo");
    assert_eq!(echo["path"], path, "{body}");
    for (name, value) in (0..LARGE_HEADERS).map(large_header) {
        assert_eq!(echo["headers"][&name], value, "header {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_woken_by_a_large_head_is_answered() {
    let up = Upstream::start("v1").await;
    let proxy = Proxy::builder().routes(&route(up.addr)).start().await;
    let port = proxy.port;
    tokio::task::spawn_blocking(move || {
        let mut s = connect(port);
        s.write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        let first = read_response(&mut s).expect("first answer");
        assert_eq!(status(&first), Some(200), "{first}");

        // Idle, then the whole large head at once.
        std::thread::sleep(IDLE);
        s.write_all(&large_head("/large-whole")).unwrap();
        let r = read_response(&mut s).expect("answer to the large head");
        assert_eq!(status(&r), Some(200), "{r}");
        saw_large_head(&r, "/large-whole");

        // Idle again, then a large head in pieces with waits between them: the proxy
        // waits with a partial head in its buffer (which must be kept), and its first
        // read after the idle wait takes less than the whole head.
        std::thread::sleep(IDLE);
        let head = large_head("/large-pieces");
        for piece in [&head[..10], &head[10..9000], &head[9000..]] {
            s.write_all(piece).unwrap();
            std::thread::sleep(IDLE / 3);
        }
        let r = read_response(&mut s).expect("answer to the large head in pieces");
        assert_eq!(status(&r), Some(200), "{r}");
        saw_large_head(&r, "/large-pieces");

        // And the connection still serves a small request after that.
        std::thread::sleep(IDLE);
        s.write_all(b"GET /last HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        let last = read_response(&mut s).expect("last answer");
        assert_eq!(status(&last), Some(200), "{last}");
        assert!(last.contains("\"/last\""), "{last}");
    })
    .await
    .unwrap();
    // All four on one upstream-facing path: none was refused or retried elsewhere.
    assert_eq!(up.requests.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_in_order() {
    let up = Upstream::start("v1").await;
    let proxy = Proxy::builder().routes(&route(up.addr)).start().await;
    let port = proxy.port;
    tokio::task::spawn_blocking(move || {
        let mut s = connect(port);
        // Five requests in one write, the third with a large head: the proxy reads several
        // at once, and the large one is partly in what it read with the ones before.
        let mut bytes = Vec::new();
        for i in 0..5 {
            if i == 2 {
                bytes.extend_from_slice(&large_head("/p2"));
            } else {
                bytes
                    .extend_from_slice(format!("GET /p{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
            }
        }
        s.write_all(&bytes).unwrap();
        // Answers may arrive several in one read: what follows one is kept for the next.
        let mut carry = Vec::new();
        for i in 0..5 {
            let r = read_next_response(&mut s, &mut carry).unwrap_or_else(|| panic!("answer {i}"));
            assert_eq!(status(&r), Some(200), "answer {i}: {r}");
            let path = format!("/p{i}");
            assert!(
                r.contains(&format!("\"{path}\"")),
                "answer {i} is not for {path}: {r}"
            );
            if i == 2 {
                saw_large_head(&r, &path);
            }
        }
        // The connection is kept after them.
        std::thread::sleep(IDLE);
        s.write_all(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        assert!(carry.is_empty(), "bytes after the fifth answer");
        let r = read_response(&mut s).expect("answer after the pipelined ones");
        assert!(r.contains("\"/after\""), "{r}");
    })
    .await
    .unwrap();
    assert_eq!(up.requests.load(Ordering::SeqCst), 6);
}

/// The big answer: `BIG` bytes, byte `i` is `b'a' + i % 26`.
const BIG: usize = 6 * 1024 * 1024;
/// The slow upstream writes it in pieces of `PIECE` bytes with `PAUSE` between them.
const PIECE: usize = 256 * 1024;
const PAUSE: Duration = Duration::from_millis(20);

fn big_byte(i: usize) -> u8 {
    b'a' + (i % 26) as u8
}

/// A keep-alive HTTP/1.1 upstream answering every GET with the big body, slowly: the
/// head at once, then `PIECE` bytes every `PAUSE`. Counts the answers it finished.
async fn slow_big_upstream() -> (SocketAddr, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answers = Arc::new(AtomicU64::new(0));
    let a = answers.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let a = a.clone();
            tokio::spawn(async move {
                let body: Vec<u8> = (0..BIG).map(big_byte).collect();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // GETs only: a request is its head.
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear();
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    for piece in body.chunks(PIECE) {
                        if stream.write_all(piece).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(PAUSE).await;
                    }
                    a.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, answers, task)
}

/// Reads one response whose body is `Content-Length` bytes: (head, body).
fn read_big(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).into_owned();
            let len: usize = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(str::to_string))
                .and_then(|v| v.trim().parse().ok())
                .expect("a Content-Length");
            let mut body = out.split_off(end + 4);
            while body.len() < len {
                let n = s.read(&mut buf).expect("body read");
                assert!(n > 0, "closed after {} of {len} body bytes", body.len());
                body.extend_from_slice(&buf[..n]);
            }
            assert_eq!(
                body.len(),
                len,
                "more than the body before the next request"
            );
            return (head, body);
        }
        let n = s.read(&mut buf).expect("head read");
        assert!(n > 0, "closed before the head");
        out.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstreams_big_answer_arrives_whole() {
    let (addr, answers, task) = slow_big_upstream().await;
    let proxy = Proxy::builder().routes(&route(addr)).start().await;
    let port = proxy.port;
    tokio::task::spawn_blocking(move || {
        let mut s = connect(port);
        for round in 0..2 {
            if round > 0 {
                std::thread::sleep(IDLE);
            }
            s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
                .unwrap();
            let (head, body) = read_big(&mut s);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(body.len(), BIG);
            if let Some(i) = (0..BIG).find(|&i| body[i] != big_byte(i)) {
                panic!("round {round}: byte {i} differs");
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(answers.load(Ordering::SeqCst), 2);
    task.abort();
}

/// An upstream that reads each request's whole body and answers with what it saw: the
/// path, the length of each [`large_header`] (0 when absent), and the body's length and
/// checksum. It speaks HTTP/2 (h2c) when `h2`, HTTP/1.1 otherwise; the counter is of
/// requests.
async fn digest_upstream(h2: bool) -> (common::CountingServer, Arc<AtomicU64>) {
    use http_body_util::{BodyExt, Full};
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response};

    let requests = Arc::new(AtomicU64::new(0));
    let count = requests.clone();
    let server = common::CountingServer::start(move |tcp, _open| {
        let count = count.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let count = count.clone();
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                let path = req.uri().path().to_string();
                let large: Vec<usize> = (0..LARGE_HEADERS)
                    .map(|i| {
                        let (name, _) = large_header(i);
                        req.headers().get(name).map_or(0, |v| v.len())
                    })
                    .collect();
                let body = req.into_body().collect().await?.to_bytes();
                let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
                let answer = serde_json::json!({
                    "path": path, "large": large, "len": body.len(), "sum": sum,
                });
                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(answer.to_string()))))
            }
        });
        common::serve_hyper(tcp, svc, h2)
    })
    .await;
    (server, requests)
}

/// A TCP relay from a local port to `to` that passes the client's bytes on in pieces of at
/// most `PIECE_H2` bytes with a short wait between them, so that frames reach the proxy
/// cut at arbitrary places (a read finds part of a frame, then nothing). The answers pass
/// back as they come.
async fn piecewise_relay(to: u16) -> (u16, tokio::task::JoinHandle<()>) {
    const PIECE_H2: usize = 5_000;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let proxy = tokio::net::TcpStream::connect(("127.0.0.1", to))
            .await
            .unwrap();
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_proxy, mut to_proxy) = proxy.into_split();
        let up = async move {
            let mut buf = vec![0u8; PIECE_H2];
            loop {
                match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to_proxy.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
            let _ = to_proxy.shutdown().await;
        };
        let down = async move {
            let _ = tokio::io::copy(&mut from_proxy, &mut to_client).await;
        };
        tokio::join!(up, down);
    });
    (port, task)
}

/// What the digest upstream saw, parsed; panics with the answer when it is not 200.
async fn h2_send(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    req: hyper::Request<http_body_util::Full<bytes::Bytes>>,
) -> serde_json::Value {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_string();
    let res = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .expect("the body")
        .to_bytes();
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).expect("the digest upstream's answer")
}

/// A request through the proxy on `/path`, with [`large_head`]'s headers when `large` (20
/// KiB of header block: more than one frame, so CONTINUATION frames too) and a body of
/// `body` bytes (byte `i` is [`big_byte`]`(i)`).
fn h2_request(
    path: &str,
    large: bool,
    body: usize,
) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    let mut b = hyper::Request::builder()
        .method(if body > 0 { "POST" } else { "GET" })
        .uri(format!("http://a{path}"));
    if large {
        for (name, value) in (0..LARGE_HEADERS).map(large_header) {
            b = b.header(name, value);
        }
    }
    let bytes: Vec<u8> = (0..body).map(big_byte).collect();
    b.body(http_body_util::Full::new(bytes::Bytes::from(bytes)))
        .unwrap()
}

fn saw(answer: &serde_json::Value, path: &str, large: bool, body: usize) {
    assert_eq!(answer["path"], path, "{answer}");
    let want = if large { 1000 } else { 0 };
    assert!(
        answer["large"]
            .as_array()
            .is_some_and(|l| l.len() == LARGE_HEADERS && l.iter().all(|v| v == want)),
        "headers of {path}: {answer}"
    );
    let sum: u64 = (0..body).map(|i| u64::from(big_byte(i))).sum();
    assert_eq!(answer["len"], body, "body length of {path}");
    assert_eq!(answer["sum"], sum, "body checksum of {path}");
}

/// HTTP/2 (vendor patches 0024, 0026–0028): an idle HTTP/2 connection gives back its read
/// and write buffers, the HPACK decoder's string room and its stream and queue slabs, and
/// takes them again for the next request. One client connection, through a relay that cuts
/// the bytes at arbitrary places, to an HTTP/1.1 upstream and to an h2c upstream (whose
/// pooled connection goes idle the same way): after each idle wait, a large head with a
/// 300 KiB body (more than the read buffer and the stream's flow-control window), 20
/// streams at once, the large head again (now from the HPACK tables), and a small request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_takes_its_buffers_again_for_large_and_concurrent_requests() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    const BODY: usize = 300 * 1024;

    for upstream_h2 in [false, true] {
        let (upstream, requests) = digest_upstream(upstream_h2).await;
        let mut routes = route(upstream.addr);
        if upstream_h2 {
            routes.push_str("protocol = \"h2c\"\n");
        }
        let proxy = Proxy::builder()
            .routes(&routes)
            .proxy("h2c = true")
            .start()
            .await;
        let (relay_port, relay) = piecewise_relay(proxy.port).await;
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", relay_port))
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("HTTP/2 handshake through the proxy");
        let conn = tokio::spawn(conn);
        let what = if upstream_h2 {
            "h2c upstream"
        } else {
            "HTTP/1.1 upstream"
        };

        saw(
            &h2_send(&mut sender, h2_request("/first", false, 0)).await,
            "/first",
            false,
            0,
        );
        tokio::time::sleep(IDLE).await;
        let a = h2_send(&mut sender, h2_request("/large", true, BODY)).await;
        saw(&a, "/large", true, BODY);

        tokio::time::sleep(IDLE).await;
        let mut streams = tokio::task::JoinSet::new();
        for i in 0..20 {
            let mut sender = sender.clone();
            let path = format!("/c{i}");
            streams.spawn(async move {
                let body = if i % 4 == 0 { 20_000 } else { 0 };
                let a = h2_send(&mut sender, h2_request(&path, i % 5 == 0, body)).await;
                saw(&a, &path, i % 5 == 0, body);
            });
        }
        while let Some(done) = streams.join_next().await {
            done.unwrap_or_else(|e| panic!("a concurrent stream ({what}): {e}"));
        }

        tokio::time::sleep(IDLE).await;
        let a = h2_send(&mut sender, h2_request("/large-again", true, BODY)).await;
        saw(&a, "/large-again", true, BODY);
        tokio::time::sleep(IDLE).await;
        saw(
            &h2_send(&mut sender, h2_request("/last", false, 0)).await,
            "/last",
            false,
            0,
        );

        assert_eq!(requests.load(Ordering::SeqCst), 24, "{what}");
        drop(sender);
        let _ = tokio::time::timeout(WAIT, conn).await;
        relay.abort();
        drop(upstream);
    }
}
