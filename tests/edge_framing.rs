//! Strict HTTP/1 framing at the edge: every request whose end is ambiguous is refused with
//! 400 and a closed connection before anything reaches an upstream; ambiguous upstream
//! responses become 502; hop-by-hop headers are not forwarded; header size and count limits
//! answer 431.
//!
//! The request cases follow the client side of HAProxy's
//! `reg-tests/http-messaging/http_transfer_encoding.vtc` (described here, not copied):
//! Transfer-Encoding together with Content-Length (both orders, with a smuggled second
//! request in the body), Transfer-Encoding with a coding other than a final lone `chunked`
//! (`gzip, chunked`, `chunked, gzip`, `chunked, chunked`, `identity`, empty, repeated on two
//! lines), Transfer-Encoding on HTTP/1.0; plus Content-Length oddities and line-ending
//! tricks (obsolete folding, bare LF).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener as StdListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::raw::{exchange, Exchange};
use common::{metric, pool, Proxy, Upstream};

const WAIT: Duration = Duration::from_secs(10);

fn route(up: &Upstream) -> String {
    format!(
        "[[routes]]\nname = \"app\"\n{}",
        pool("routes.stable", "v1", &[up.addr])
    )
}

async fn send(port: u16, bytes: &'static [u8]) -> Exchange {
    tokio::task::spawn_blocking(move || exchange(port, bytes, WAIT))
        .await
        .expect("raw exchange")
}

/// (what it is, the exact request bytes). Each must get 400, a closed connection, and
/// must not reach the upstream.
const REFUSED: &[(&str, &[u8])] = &[
    (
        "CL then TE, with a smuggled request in the body",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    ),
    (
        "TE then CL, with a smuggled request in the body",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    ),
    (
        "TE chunked, chunked on one line",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE chunked on two lines",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE gzip, chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE chunked, gzip (chunked not final)",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE identity",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
    ),
    (
        "TE empty",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n",
    ),
    (
        "TE with a space before the colon",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE xchunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE on HTTP/1.0",
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE folded onto a continuation line",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "Content-Length twice, same value",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    ),
    (
        "Content-Length twice, different values",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    ),
    (
        "Content-Length list, different values",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd",
    ),
    (
        "Content-Length list, same values",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    ),
    (
        "Content-Length +3",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    ),
    (
        "Content-Length -1",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    ),
    (
        "Content-Length in hex",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\nabc",
    ),
    (
        "Content-Length empty",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n",
    ),
    (
        "obsolete line folding",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n",
    ),
    (
        "bare LF after the request line",
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    ),
    (
        "bare LF everywhere",
        b"GET / HTTP/1.1\nHost: a\nX: 1\n\n",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_requests_get_400_close_and_never_reach_the_upstream() {
    let up = Upstream::start("v1").await;
    let proxy = Proxy::builder().routes(&route(&up)).start().await;

    // Control: a well-framed chunked POST on the same proxy does reach the upstream.
    let ok = send(
        proxy.port,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(ok.status(), Some(200), "control request: {ok:?}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);

    let mut failures = Vec::new();
    for (what, bytes) in REFUSED {
        let before = up.requests.load(Ordering::SeqCst);
        let ex = send(proxy.port, bytes).await;
        let after = up.requests.load(Ordering::SeqCst);
        if ex.status() != Some(400) || !ex.closed || after != before {
            failures.push(format!(
                "{what}: status {:?}, closed {}, upstream saw {} request(s): {:?}",
                ex.status(),
                ex.closed,
                after - before,
                ex.text
            ));
        }
        // Only one response: nothing smuggled was answered after it.
        assert!(
            ex.text.matches("HTTP/1.").count() <= 1,
            "{what}: more than one response: {:?}",
            ex.text
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        1,
        "the upstream saw a smuggled request"
    );
    // Pingora's own parser refuses some cases (400) before Kanaria's hooks; the ones it
    // accepts (both CL and TE, identical duplicate lengths, bare LF, `chunked, chunked`)
    // are refused and counted by Kanaria.
    let m = proxy.metrics().await;
    assert!(
        metric(&m, "kanaria_rejected_requests_total{reason=\"framing\"}") >= 5.0,
        "framing rejections not counted:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_and_override_are_not_forwarded() {
    let up = Upstream::start("v1").await;
    let routes = format!(
        "[[routes]]\nname = \"app\"\noverride_header = \"x-kanaria-version\"\noverride_cookie = \"kv\"\n{}",
        pool("routes.stable", "v1", &[up.addr])
    );
    let proxy = Proxy::builder().routes(&routes).start().await;
    let ex = send(
        proxy.port,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\nX-Kanaria-Version: stable\r\nCookie: a=1; kv=stable; b=2\r\nX-End-To-End: kept\r\n\r\n",
    )
    .await;
    assert_eq!(ex.status(), Some(200), "{ex:?}");
    let body: serde_json::Value = serde_json::from_str(ex.body()).expect("echo json");
    let seen = body["headers"].as_object().expect("headers");
    for h in [
        "x-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "x-kanaria-version",
    ] {
        assert!(!seen.contains_key(h), "{h} was forwarded: {seen:?}");
    }
    assert_eq!(seen["x-end-to-end"], "kept");
    assert_eq!(seen["cookie"], "a=1; b=2", "override cookie forwarded");
    if let Some(c) = seen.get("connection") {
        assert!(
            !c.as_str()
                .unwrap_or("")
                .to_ascii_lowercase()
                .contains("x-hop"),
            "client's Connection forwarded: {c}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_size_and_count_limits_answer_431() {
    let up = Upstream::start("v1").await;
    let proxy = Proxy::builder()
        .routes(&format!(
            "[edge]\nmax_header_bytes = 2048\nmax_headers = 10\n\n{}",
            route(&up)
        ))
        .start()
        .await;
    let headers = |n: usize| -> &'static [u8] {
        let mut s = String::from("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n");
        for i in 0..n - 2 {
            s.push_str(&format!("X-H{i}: v\r\n"));
        }
        s.push_str("\r\n");
        Box::leak(s.into_bytes().into_boxed_slice())
    };
    let at_limit = send(proxy.port, headers(10)).await;
    assert_eq!(at_limit.status(), Some(200), "{at_limit:?}");
    let over = send(proxy.port, headers(11)).await;
    assert_eq!(over.status(), Some(431), "{over:?}");
    assert!(over.closed);

    let big = |len: usize| -> &'static [u8] {
        let head = "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: \r\n\r\n";
        let s = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
            "b".repeat(len - head.len())
        );
        Box::leak(s.into_bytes().into_boxed_slice())
    };
    let fits = send(proxy.port, big(2048)).await;
    assert_eq!(fits.status(), Some(200), "{fits:?}");
    let too_big = send(proxy.port, big(2049)).await;
    assert_eq!(too_big.status(), Some(431), "{too_big:?}");
    assert!(too_big.closed);
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);

    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "kanaria_rejected_requests_total{reason=\"too_many_headers\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "kanaria_rejected_requests_total{reason=\"header_too_large\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_header_count_limit_is_100() {
    let up = Upstream::start("v1").await;
    let proxy = Proxy::builder().routes(&route(&up)).start().await;
    let mut s = String::from("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n");
    for i in 0..99 {
        s.push_str(&format!("X-H{i}: v\r\n"));
    }
    s.push_str("\r\n");
    let bytes: &'static [u8] = Box::leak(s.into_bytes().into_boxed_slice());
    let ex = send(proxy.port, bytes).await;
    assert_eq!(ex.status(), Some(431), "101 headers: {ex:?}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
}

/// An upstream that answers every request with the same raw bytes, then closes.
fn raw_upstream(answer: &'static [u8]) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let l = StdListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            h.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.read(&mut buf);
            let _ = s.write_all(answer);
        }
    });
    (addr, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_upstream_responses_become_502() {
    let cases: &[(&str, &'static [u8])] = &[
        (
            "two Content-Length, same value",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        ),
        (
            "two Content-Length, different values",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
        ),
        (
            "Content-Length +2",
            b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        ),
        (
            "Transfer-Encoding gzip",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        ),
        (
            "Transfer-Encoding chunked, chunked",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ),
    ];
    for (what, answer) in cases {
        let (addr, hits) = raw_upstream(answer);
        let routes = format!(
            "[[routes]]\nname = \"app\"\n{}",
            pool("routes.stable", "v1", &[addr])
        );
        let proxy = Proxy::builder().routes(&routes).start().await;
        let ex = send(
            proxy.port,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(ex.status(), Some(502), "{what}: {ex:?}\n{}", proxy.log());
        assert!(
            hits.load(Ordering::SeqCst) >= 1,
            "{what}: upstream not reached"
        );
    }
}
