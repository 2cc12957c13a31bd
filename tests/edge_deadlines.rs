//! Client deadlines and limits: the whole-request-header deadline (a client trickling bytes
//! is closed however steadily it sends), keep-alive idle timeout, request body read timeout,
//! and the per-listener connection cap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::raw::{read_all, read_response};
use common::{eventually, metric, pool, Proxy, Upstream};

fn routes(edge: &str, up: &Upstream) -> String {
    format!(
        "[edge]\n{edge}\n\n[[routes]]\nname = \"app\"\n{}",
        pool("routes.stable", "v1", &[up.addr])
    )
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s
}

/// Whether the server closed `s`: a read returning EOF or a reset (not a timeout).
fn server_closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let closed = read_all(s).closed;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    closed
}

/// Sends one header line every 200 ms: each read is quick, so only a deadline on the
/// whole header can end this. The line at which the proxy closed the connection, or `None`
/// after 40 lines (8 s): the caller's test fails.
fn trickle_header_lines(s: &mut TcpStream) -> Option<usize> {
    for i in 0..40 {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(format!("X-Trickle-{i}: a\r\n").as_bytes())
            .is_err()
            || server_closed(s)
        {
            return Some(i);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_header_is_cut_off_at_the_deadline() {
    let up = Upstream::start("v1").await;
    let proxy = Proxy::builder()
        .routes(&routes("header_timeout = \"1s\"", &up))
        .start()
        .await;
    let port = proxy.port;
    let outcome = tokio::task::spawn_blocking(move || {
        let mut s = connect(port);
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .expect("start");
        trickle_header_lines(&mut s)
    })
    .await
    .expect("trickle");
    assert!(
        outcome.is_some(),
        "the proxy kept a trickling client for 8 s with header_timeout = 1s"
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    let m = proxy.metrics().await;
    assert!(
        metric(
            &m,
            "kanaria_rejected_requests_total{reason=\"header_timeout\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_header_after_a_kept_alive_request_is_cut_off() {
    // The deadline of a later header on a kept-alive connection is taken only when its
    // first read did not complete it (the guard's cheap path): it must still cut off a
    // trickle.
    let up = Upstream::start("v1").await;
    let proxy = Proxy::builder()
        .routes(&routes("header_timeout = \"1s\"", &up))
        .start()
        .await;
    let port = proxy.port;
    let outcome = tokio::task::spawn_blocking(move || {
        let mut s = connect(port);
        s.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
            .expect("first");
        let first = read_response(&mut s).expect("first response");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        // Idle past the first header's deadline (not the idle timeout), so that only the
        // second header's own deadline can end what follows.
        std::thread::sleep(Duration::from_millis(1500));
        s.write_all(b"GET /2 HTTP/1.1\r\nHost: a\r\n")
            .expect("start of the second");
        trickle_header_lines(&mut s)
    })
    .await
    .expect("trickle");
    assert!(
        outcome.is_some(),
        "the proxy kept a trickling kept-alive client for 8 s with header_timeout = 1s"
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_and_idle_keepalive_is_not_a_header() {
    let up = Upstream::start("v1").await;
    let proxy = Proxy::builder()
        .routes(&routes(
            "header_timeout = \"1s\"\nidle_timeout = \"3s\"",
            &up,
        ))
        .start()
        .await;
    let port = proxy.port;
    tokio::task::spawn_blocking(move || {
        // Connect and say nothing: the first header's deadline runs from accept.
        let mut silent = connect(port);
        let started = Instant::now();
        let ex = read_all(&mut silent);
        assert!(ex.closed, "a silent connection stayed open 10 s");
        assert!(started.elapsed() < Duration::from_secs(10));

        // Keep-alive: idle for longer than header_timeout between two requests is fine
        // (that is idle_timeout's business), and the second request succeeds.
        let mut s = connect(port);
        s.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
            .expect("first");
        let first = read_response(&mut s).expect("first response");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        std::thread::sleep(Duration::from_millis(1500));
        s.write_all(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
            .expect("second");
        let second = read_response(&mut s).expect("second response on the kept-alive connection");
        assert!(second.starts_with("HTTP/1.1 200"), "{second}");
        // Then idle past idle_timeout: the proxy closes the connection.
        let ex = read_all(&mut s);
        assert!(ex.closed, "idle connection kept past idle_timeout: {ex:?}");
    })
    .await
    .expect("keep-alive checks");
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_timed_out() {
    let up = Upstream::start("v1").await;
    let proxy = Proxy::builder()
        .routes(&routes("body_timeout = \"1s\"", &up))
        .start()
        .await;
    let port = proxy.port;
    let ex = tokio::task::spawn_blocking(move || {
        let mut s = connect(port);
        s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly-a-bit")
            .expect("send");
        read_all(&mut s)
    })
    .await
    .expect("stalled body");
    assert!(ex.closed, "a stalled body kept the connection 10 s: {ex:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_above_the_listener_cap_are_closed() {
    let up = Upstream::start("v1").await;
    let proxy = Proxy::builder()
        .routes(&routes("max_connections = 3", &up))
        .start()
        .await;
    let port = proxy.port;
    let mut held = tokio::task::spawn_blocking(move || {
        // Three kept-alive connections, each proven registered by a full exchange.
        let held: Vec<TcpStream> = (0..3)
            .map(|i| {
                let mut s = connect(port);
                s.write_all(format!("GET /{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
                    .expect("send");
                let r = read_response(&mut s).expect("response");
                assert!(r.starts_with("HTTP/1.1 200"), "{r}");
                s
            })
            .collect();
        let mut fourth = connect(port);
        let _ = fourth.write_all(b"GET /4 HTTP/1.1\r\nHost: a\r\n\r\n");
        let ex = read_all(&mut fourth);
        assert!(
            ex.closed && ex.status().is_none(),
            "a 4th connection was served with max_connections = 3: {ex:?}"
        );
        held
    })
    .await
    .expect("cap checks");
    // Freeing one makes room again.
    drop(held.pop());
    eventually(
        "room after a connection closed",
        Duration::from_secs(10),
        || async move {
            let ex = tokio::task::spawn_blocking(move || {
                let mut s = connect(port);
                let _ = s.write_all(b"GET /5 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
                read_all(&mut s)
            })
            .await
            .expect("a fifth connection");
            match ex.status() {
                Some(200) => Ok(()),
                _ => Err(format!("{ex:?}")),
            }
        },
    )
    .await;
    drop(held);
    let m = proxy.metrics().await;
    assert!(
        metric(
            &m,
            "kanaria_rejected_requests_total{reason=\"connection_limit\"}"
        ) >= 1.0
    );
}
