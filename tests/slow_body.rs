//! A canary whose head comes at once and whose body crawls (a byte every 500 ms, 3 s an
//! answer) is slow for every user it serves: the analysis judges the time to the answer's
//! last byte, and a body still arriving past the latency limit counts as slow while it
//! arrives, so the canary is rolled back within interval + limit + 1 s. The same canary
//! answering a stream (`text/event-stream`), or on a route judged by the head (`latency =
//! "head"`), is not rolled back for its duration (issue 19).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, eventually_every, pool, Proxy, Upstream};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const INTERVAL: Duration = Duration::from_millis(200);
const LIMIT: Duration = Duration::from_millis(500);
const ANALYSIS: &str =
    "interval = \"200ms\"\nwindow = \"10s\"\nmin_requests = 10\nmax_p99_latency = \"500ms\"\n";
/// The crawling body: this many bytes, one every `BYTE_EVERY`.
const BODY: usize = 6;
const BYTE_EVERY: Duration = Duration::from_millis(500);

/// A keep-alive HTTP/1.1 server whose answers (200, `BODY` bytes of the given content type)
/// come at once, or, once `crawl` is set, with the head at once and a byte of the body
/// every `BYTE_EVERY`.
struct Crawler {
    addr: SocketAddr,
    crawl: Arc<AtomicBool>,
    /// Answers sent whole.
    answers: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Crawler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Crawler {
    async fn start(content_type: &'static str) -> Crawler {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let crawl = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(AtomicU64::new(0));
        let (c, a) = (crawl.clone(), answers.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(stream, content_type, c.clone(), a.clone()));
            }
        });
        Crawler {
            addr,
            crawl,
            answers,
            task,
        }
    }
}

async fn serve(
    mut stream: TcpStream,
    content_type: &str,
    crawl: Arc<AtomicBool>,
    answers: Arc<AtomicU64>,
) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // GETs only: a request is its head.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..end);
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {BODY}\r\nx-upstream: crawler\r\n\r\n"
        );
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        if crawl.load(SeqCst) {
            for _ in 0..BODY {
                tokio::time::sleep(BYTE_EVERY).await;
                if stream.write_all(b"x").await.is_err() {
                    return;
                }
            }
        } else if stream.write_all(&[b'x'; BODY]).await.is_err() {
            return;
        }
        answers.fetch_add(1, SeqCst);
    }
}

/// Open-loop users, as in `tests/hang.rs`: a new user's GET every `every` whether or not
/// earlier ones were answered, each answer read whole; at most `max`. Counts the failures.
struct Users {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    driver: tokio::task::JoinHandle<()>,
}

impl Users {
    fn start(url: String, every: Duration, max: u64) -> Users {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let (halt, f) = (stop.clone(), failed.clone());
        let driver = tokio::spawn(async move {
            let c = client();
            let mut tick = tokio::time::interval(every);
            let mut requests = tokio::task::JoinSet::new();
            for i in 0..max {
                tick.tick().await;
                if halt.load(SeqCst) {
                    break;
                }
                let (c, url, f) = (c.clone(), url.clone(), f.clone());
                requests.spawn(async move {
                    let r = c
                        .get(&url)
                        .header("x-user-id", format!("u-{i}"))
                        .send()
                        .await;
                    let whole = match r {
                        Ok(r) if r.status() == 200 => r
                            .bytes()
                            .await
                            .is_ok_and(|b| b.len() == BODY || b.len() > 20),
                        _ => false,
                    };
                    if !whole {
                        f.fetch_add(1, SeqCst);
                    }
                });
            }
            while requests.join_next().await.is_some() {}
        });
        Users {
            stop,
            failed,
            driver,
        }
    }

    /// Stops sending and waits for every request sent to be answered; returns the failures.
    async fn stop(self) -> u64 {
        self.stop.store(true, SeqCst);
        self.driver.await.expect("user traffic");
        self.failed.load(SeqCst)
    }
}

fn app(status: &Value) -> &Value {
    &status["routes"][0]
}

async fn start(
    route_keys: &str,
    analysis_keys: &str,
    canary: &Crawler,
    stable: &Upstream,
) -> Proxy {
    let routes = format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = 30\n{route_keys}\n[routes.analysis]\n{ANALYSIS}{analysis_keys}\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    );
    Proxy::builder().routes(&routes).start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_whose_body_crawls_is_rolled_back_within_interval_limit_and_a_second() {
    let stable = Upstream::start("stable").await;
    let canary = Crawler::start("text/plain").await;
    let proxy = start("", "", &canary, &stable).await;
    let users = Users::start(proxy.url("/"), Duration::from_millis(10), 3000);
    proxy
        .wait_status("canary traffic", |s| {
            app(s)["window"]["canary"]["requests"].as_u64() >= Some(30)
        })
        .await;
    assert_ne!(app(&proxy.status().await)["rollout_state"], "rolled_back");

    canary.crawl.store(true, SeqCst);
    let crawl_began = Instant::now();
    let bound = INTERVAL + LIMIT + Duration::from_secs(1);
    let proxy_ref = &proxy;
    let st = eventually_every(
        "the rollback within interval + limit + 1 s",
        bound,
        Duration::from_millis(50),
        move || async move {
            let s = proxy_ref.status().await;
            if app(&s)["rollout_state"] == "rolled_back" {
                Ok(s)
            } else {
                Err(format!("{:#}", app(&s)))
            }
        },
    )
    .await;
    let took = crawl_began.elapsed();
    let rollback = st["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["kind"] == "rollback")
        .cloned()
        .expect("a rollback event");
    println!(
        "crawling canary: rolled back {} ms after its bodies began to crawl (bound {} ms): {:#}",
        took.as_millis(),
        bound.as_millis(),
        rollback["numbers"]
    );
    assert_eq!(rollback["reason"], "latency", "{rollback:#}");
    // Judged while the bodies arrive: the slow answers were still in flight.
    let numbers = &rollback["numbers"];
    assert!(
        numbers["canary_in_flight_slow"].as_u64() >= Some(1),
        "{numbers:#}"
    );
    assert!(
        numbers["canary_p99_ms"].as_f64() > Some(500.0),
        "{numbers:#}"
    );
    // The crawling answers still reach their users whole: nothing is cut.
    assert_eq!(users.stop().await, 0, "users saw failures");
}

/// The same crawling canary, on a route whose answers are streams: until `answers` crawling
/// answers were delivered whole (each 3 s, so well past the limit), no rollback.
async fn not_judged_by_duration(content_type: &'static str, route_keys: &str, analysis: &str) {
    let stable = Upstream::start("stable").await;
    let canary = Crawler::start(content_type).await;
    canary.crawl.store(true, SeqCst);
    let proxy = start(route_keys, analysis, &canary, &stable).await;
    let users = Users::start(proxy.url("/"), Duration::from_millis(20), 1500);
    let answers = 30;
    let st = proxy
        .wait_status("crawling canary answers delivered", |s| {
            canary.answers.load(SeqCst) >= answers
                && app(s)["window"]["canary"]["requests"].as_u64() >= Some(answers)
        })
        .await;
    let failed = users.stop().await;
    let st_after = proxy.status().await;
    println!(
        "{content_type} {analysis:?}: {} crawling answers, canary window {:#}",
        canary.answers.load(SeqCst),
        app(&st_after)["window"]["canary"]
    );
    for s in [&st, &st_after] {
        assert_eq!(app(s)["rollout_state"], "manual", "{:#}", app(s));
    }
    // Judged by the head: the canary's latency is its head's (at once), not 3 s.
    let p99 = app(&st_after)["window"]["canary"]["p99_ms"]
        .as_f64()
        .unwrap();
    assert!(
        p99 < 500.0,
        "the canary was judged by its answers' duration: p99 {p99} ms"
    );
    assert_eq!(failed, 0, "users saw failures");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_are_judged_by_their_head() {
    not_judged_by_duration("text/event-stream; charset=utf-8", "", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_with_head_latency_is_judged_by_the_head() {
    not_judged_by_duration("text/plain", "", "latency = \"head\"\n").await;
}
