//! The test harness's own guarantees: `eventually` returns the first success or fails with
//! what it last saw, `listening_ports` reads back what a process listens on, a reserved port
//! is one a server can still bind, and a dead address refuses connections.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::eventually;
use common::ports::{listening_ports, DeadAddr, ReservedPort};

#[tokio::test]
async fn eventually_returns_the_first_success() {
    let calls = AtomicU32::new(0);
    let got = eventually("the third call", Duration::from_secs(5), || {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        std::future::ready(if n == 3 { Ok(n) } else { Err(n) })
    })
    .await;
    assert_eq!(got, 3);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
#[should_panic(expected = "waiting for the impossible; last seen: still 7")]
async fn eventually_fails_with_what_it_waited_for_and_last_saw() {
    let started = Instant::now();
    eventually("the impossible", Duration::from_millis(100), || {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "ran past the timeout"
        );
        std::future::ready(Err::<(), _>("still 7"))
    })
    .await;
}

#[test]
fn listening_ports_are_read_back_from_proc() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let reserved = ReservedPort::new();
    let ports = listening_ports(std::process::id());
    assert!(ports.contains(&port), "{port} not in {ports:?}");
    // Bound but not listening: not a listener.
    assert!(!ports.contains(&reserved.port()), "{ports:?}");
    drop(listener);
    assert!(!listening_ports(std::process::id()).contains(&port));
    assert_eq!(listening_ports(u32::MAX), Vec::<u16>::new());
}

#[test]
fn a_reserved_port_is_bound_by_its_server_and_no_one_else() {
    let reserved = ReservedPort::new();
    // std's listener sets SO_REUSEADDR, as Pingora's and redis-server's do: it binds, and
    // binds again after a restart.
    for _ in 0..2 {
        let server = TcpListener::bind(("127.0.0.1", reserved.port())).expect("bind");
        TcpStream::connect(("127.0.0.1", reserved.port())).expect("connect");
        drop(server);
    }
    // The kernel picks it for no one else while it is held.
    let picked: Vec<TcpListener> = (0..200)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    assert!(picked
        .iter()
        .all(|l| l.local_addr().unwrap().port() != reserved.port()));
}

#[test]
fn a_dead_address_refuses_connections_and_cannot_be_taken() {
    let dead = DeadAddr::new();
    let err = TcpStream::connect(dead.addr).expect_err("connected to a dead address");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    let err = TcpListener::bind(dead.addr).expect_err("bound a dead address");
    assert_eq!(err.kind(), ErrorKind::AddrInUse);
}
