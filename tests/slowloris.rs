//! A bounded slowloris on loopback: 2,000 connections trickle request headers one byte at a
//! time while legitimate clients use the proxy. Every legitimate request must succeed, and
//! every attacking connection must be closed by the header deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{client, eventually, pool, Proxy, Upstream};

const ATTACKERS: usize = 2000;
/// Each attacker gives up (and the test fails) after this long without being closed.
const ATTACKER_BOUND: Duration = Duration::from_secs(12);

/// Raises this process's open-file limit (inherited by the proxy it spawns) to fit the
/// attack: 2,000 sockets here and as many in the proxy.
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    assert!(
        lim.rlim_cur >= want,
        "open-file limit {} (hard {}) is below the {want} this test needs",
        lim.rlim_cur,
        lim.rlim_max
    );
}

/// One attacking connection: a partial header, then one byte every 500 ms until the proxy
/// closes the connection. Returns whether it was closed within `ATTACKER_BOUND`.
async fn attacker(port: u16, connected: Arc<AtomicU64>) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    connected.fetch_add(1, Ordering::SeqCst);
    if s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .is_err()
    {
        return true;
    }
    let end = Instant::now() + ATTACKER_BOUND;
    let mut buf = [0u8; 512];
    while Instant::now() < end {
        tokio::select! {
            r = s.read(&mut buf) => {
                // EOF, reset, or an error answer followed by close: the proxy hung up.
                if matches!(r, Ok(0) | Err(_)) { return true; }
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if s.write_all(b"a").await.is_err() { return true; }
            }
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legitimate_traffic_succeeds_during_a_slowloris() {
    raise_fd_limit(3 * ATTACKERS as u64 + 512);
    let up = Upstream::start("v1").await;
    let routes = format!(
        "[edge]\nheader_timeout = \"4s\"\n\n[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\n{}",
        pool("routes.stable", "v1", &[up.addr])
    );
    let proxy = Proxy::builder().routes(&routes).start().await;

    let connected = Arc::new(AtomicU64::new(0));
    let attack: Vec<_> = (0..ATTACKERS)
        .map(|_| tokio::spawn(attacker(proxy.port, connected.clone())))
        .collect();
    // Legitimate traffic starts once the attack is fully in place.
    eventually(
        "the attack connections to connect",
        Duration::from_secs(30),
        || {
            std::future::ready(match connected.load(Ordering::SeqCst) {
                n if n >= ATTACKERS as u64 => Ok(()),
                n => Err(format!("{n} of {ATTACKERS} connected")),
            })
        },
    )
    .await;

    // Four clients, 100 requests each, while the attackers are still trickling.
    let started = Instant::now();
    let legit: Vec<_> = (0..4)
        .map(|c| {
            let url = proxy.url("/");
            tokio::spawn(async move {
                let http = client();
                let mut errors = Vec::new();
                for i in 0..100 {
                    match http
                        .get(&url)
                        .header("x-user-id", format!("user-{c}-{i}"))
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 200 => {}
                        Ok(r) => errors.push(format!("status {}", r.status())),
                        Err(e) => errors.push(format!("{e}")),
                    }
                }
                errors
            })
        })
        .collect();
    let mut errors = Vec::new();
    for l in legit {
        errors.extend(l.await.expect("legit client"));
    }
    let legit_time = started.elapsed();

    let mut closed = 0;
    for a in attack {
        if a.await.expect("attacker") {
            closed += 1;
        }
    }
    eprintln!(
        "slowloris: {ATTACKERS} attackers, 400 legitimate requests in {legit_time:?}, {} errors, {closed} attackers closed by the deadline",
        errors.len()
    );
    assert!(errors.is_empty(), "legitimate requests failed: {errors:?}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 400);
    assert_eq!(
        closed, ATTACKERS,
        "some attacking connections outlived the header deadline"
    );
}
