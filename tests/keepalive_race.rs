//! A healthy canary that closes its kept-alive connections a few milliseconds after each
//! answer (an app server with a short idle timeout racing the next request): the attempt
//! that finds its reused connection closed is retried on a fresh connection to the canary,
//! GETs and POSTs alike, so users see no error, the canary is charged no error and is not
//! rolled back (issue 19).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::{client, metric, pool, Proxy, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/1.1 server that answers one request per connection, says nothing of closing
/// (`Connection: keep-alive` implied), and closes the connection `1..=4` ms after its answer
/// without reading what arrived meanwhile: every reuse of its connection by a proxy within
/// those milliseconds finds it closed before any byte of an answer. Its answer echoes the
/// request's method and body length, so a replayed POST can be checked whole.
struct Closer {
    addr: SocketAddr,
    answers: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Closer {
    async fn start() -> Closer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answers = Arc::new(AtomicU64::new(0));
        let counted = answers.clone();
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                n += 1;
                let close_after = Duration::from_millis(1 + n % 4);
                tokio::spawn(serve_one(stream, close_after, counted.clone()));
            }
        });
        Closer {
            addr,
            answers,
            task,
        }
    }
}

async fn serve_one(mut stream: TcpStream, close_after: Duration, answers: Arc<AtomicU64>) {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let method = head.split(' ').next().unwrap_or("").to_uppercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = format!("{method} {length}");
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-upstream: closer\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    answers.fetch_add(1, SeqCst);
    // The idle timeout: whatever arrives meanwhile is not read, and the close resets it.
    tokio::time::sleep(close_after).await;
}

/// What the users saw.
#[derive(Debug, Default)]
struct Seen {
    ok: u64,
    failed: Vec<String>,
}

/// `workers` clients, each sending `per_worker` requests in turn for distinct users,
/// every other one a POST with a body of 1 to 4 KiB; each answer is checked (the canary
/// echoes the body's length, stable's echo carries it).
async fn users(url: String, workers: u64, per_worker: u64) -> Seen {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let url = url.clone();
        tasks.spawn(async move {
            let c = client();
            let mut seen = Seen::default();
            for i in 0..per_worker {
                let user = format!("user-{w}-{}", i % 50);
                let post = i % 2 == 1;
                let len = 1024 * (1 + (i % 4) as usize);
                let req = if post {
                    c.post(&url).body(vec![b'k'; len])
                } else {
                    c.get(&url)
                };
                match req.header("x-user-id", &user).send().await {
                    Ok(r) if r.status() == 200 => {
                        let from = r
                            .headers()
                            .get("x-upstream")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let body = r.text().await.unwrap_or_default();
                        let whole = match (from.as_str(), post) {
                            ("closer", true) => body == format!("POST {len}"),
                            ("closer", false) => body == "GET 0",
                            _ => true,
                        };
                        if whole {
                            seen.ok += 1;
                        } else {
                            seen.failed
                                .push(format!("{user}: {from} answered {body:?}"));
                        }
                    }
                    Ok(r) => seen.failed.push(format!("{user}: status {}", r.status())),
                    Err(e) => seen.failed.push(format!("{user}: {e}")),
                }
            }
            seen
        });
    }
    let mut all = Seen::default();
    while let Some(s) = tasks.join_next().await {
        let s = s.expect("user task");
        all.ok += s.ok;
        all.failed.extend(s.failed);
    }
    all
}

async fn race(analysis: &str) {
    let stable = Upstream::start("stable").await;
    let canary = Closer::start().await;
    let routes = format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = 50\n{analysis}\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    );
    let proxy = Proxy::builder().routes(&routes).start().await;
    let seen = users(proxy.url("/"), 8, 150).await;
    let m = proxy.metrics().await;
    let series = |s: &str| metric(&m, s);
    let reconnects = series("kanaria_retries_total{from=\"canary\",route=\"app\",to=\"canary\"}");
    let to_stable = series("kanaria_retries_total{from=\"canary\",route=\"app\",to=\"stable\"}");
    let canary_errors: f64 = ["connect", "reset", "timeout", "5xx"]
        .iter()
        .map(|k| {
            series(&format!(
                "kanaria_upstream_errors_total{{kind=\"{k}\",route=\"app\",version=\"canary\"}}"
            ))
        })
        .sum();
    let st = proxy.status().await;
    let app = &st["routes"][0];
    println!(
        "{analysis:?}: {} ok, {} failed, canary answers {}, reconnects {reconnects}, to stable {to_stable}",
        seen.ok,
        seen.failed.len(),
        canary.answers.load(SeqCst)
    );
    // A failure seen here has been rare (about once in many full runs): the proxy's
    // warnings say which attempt failed how, so they go with it.
    assert!(
        seen.failed.is_empty(),
        "users saw failures: {:?}\nthe proxy's warnings and errors:\n{}",
        seen.failed,
        proxy
            .log()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(seen.ok, 8 * 150);
    // The race happened (else this test proves nothing), and cost the canary nothing.
    assert!(
        reconnects > 0.0,
        "no reused connection was found closed:\n{m}"
    );
    assert_eq!(to_stable, 0.0, "{m}");
    assert_eq!(canary_errors, 0.0, "{m}");
    assert_eq!(app["window"]["canary"]["errors"], 0, "{:#}", app["window"]);
    assert!(
        app["window"]["canary"]["requests"].as_u64() > Some(100),
        "{app:#}"
    );
    assert_ne!(app["rollout_state"], "rolled_back", "{st:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_closing_idle_connections_is_not_charged_with_default_analysis() {
    race("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_closing_idle_connections_is_not_charged_with_strict_analysis() {
    race("[routes.analysis]\ninterval = \"200ms\"\nmin_requests = 10\nmax_error_rate = 0.001\nmax_error_rate_ratio = 1.0").await;
}

/// A body larger than Pingora's retry buffer (64 KiB) cannot be sent again: a POST whose
/// reused connection turns out closed gets a 502 (the safe thing: nothing is replayed
/// half), and the analysis does not count it against the canary either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_beyond_the_retry_buffer_is_not_replayed_nor_charged() {
    let stable = Upstream::start("stable").await;
    let canary = Closer::start().await;
    let routes = format!(
        "[[routes]]\nname = \"app\"\ncanary_weight = 100\n[routes.analysis]\ninterval = \"200ms\"\nmin_requests = 5\nmax_error_rate = 0.001\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    );
    let proxy = Proxy::builder().routes(&routes).start().await;
    let c = client();
    let len = 100 * 1024;
    let (mut ok, mut bad_gateway) = (0, 0);
    for _ in 0..40 {
        let r = c
            .post(proxy.url("/"))
            .body(vec![b'k'; len])
            .send()
            .await
            .expect("an answer");
        match r.status().as_u16() {
            200 => {
                assert_eq!(r.text().await.unwrap(), format!("POST {len}"));
                ok += 1;
            }
            502 => bad_gateway += 1,
            s => panic!("status {s}"),
        }
    }
    let st = proxy.status().await;
    let app = &st["routes"][0];
    println!("100 KiB POSTs: {ok} answered, {bad_gateway} 502 (reused connection found closed)");
    assert!(
        ok > 0 && bad_gateway > 0,
        "{ok} answered, {bad_gateway} 502"
    );
    assert_eq!(app["window"]["canary"]["errors"], 0, "{:#}", app["window"]);
    assert_ne!(app["rollout_state"], "rolled_back", "{st:#}");
}
