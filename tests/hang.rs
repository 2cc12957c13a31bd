//! A canary that hangs (accepts requests and never answers) with real upstreams and real
//! clients: it is rolled back for its latency while it hangs, its users do not wait for the
//! read timeout, and clients that hang up are not counted against a version.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, pool, Mode, Proxy, Upstream};
use serde_json::Value;

/// The analysis interval of these tests (200 ms) and the latency limit (500 ms).
const ANALYSIS: &str = "[routes.analysis]\ninterval = \"200ms\"\nwindow = \"10s\"\nmin_requests = 20\nmax_p99_latency = \"500ms\"\n";
const INTERVAL: Duration = Duration::from_millis(200);
const LIMIT: Duration = Duration::from_millis(500);
const READ_TIMEOUT: Duration = Duration::from_secs(30);

fn route(keys: &str, tables: &str, stable: &Upstream, canary: &Upstream) -> String {
    format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\nread_timeout = \"30s\"\n{keys}\n{tables}\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    )
}

fn app(status: &Value) -> &Value {
    &status["routes"][0]
}

/// What one user request saw: how long it waited, its status (0: no answer) and the
/// version that answered.
#[derive(Debug)]
struct Seen {
    waited: Duration,
    status: u16,
    version: String,
}

/// Open-loop traffic, as many independent users make it: a new user's GET every `every`,
/// whether or not earlier ones were answered (a closed loop of a few clients would stop
/// sending the moment they all hang). Bounded: at most `max` requests.
struct Users {
    stop: Arc<AtomicBool>,
    driver: tokio::task::JoinHandle<Vec<Seen>>,
}

impl Users {
    fn start(url: String, every: Duration, max: u64) -> Users {
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let driver = tokio::spawn(async move {
            let c = client();
            let mut tick = tokio::time::interval(every);
            let mut requests = tokio::task::JoinSet::new();
            for i in 0..max {
                tick.tick().await;
                if halt.load(SeqCst) {
                    break;
                }
                let (c, url) = (c.clone(), url.clone());
                requests.spawn(async move {
                    let start = Instant::now();
                    let r = c
                        .get(&url)
                        .header("x-user-id", format!("u-{i}"))
                        .send()
                        .await;
                    let (status, version) = match r {
                        Ok(r) => (
                            r.status().as_u16(),
                            r.headers()
                                .get("x-kanaria-version")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string(),
                        ),
                        Err(_) => (0, String::new()),
                    };
                    Seen {
                        waited: start.elapsed(),
                        status,
                        version,
                    }
                });
            }
            let mut seen = Vec::new();
            while let Some(r) = requests.join_next().await {
                if let Ok(s) = r {
                    seen.push(s);
                }
            }
            seen
        });
        Users { stop, driver }
    }

    /// Stops sending and waits for every request sent to be answered.
    async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, SeqCst);
        self.driver.await.expect("user traffic")
    }
}

/// Runs the story of issue 10: canary at 30%, `max_p99_latency = "500ms"`, the canary
/// starts hanging. Returns (time from the hang to the rollback, everything users saw).
async fn hang_story(extra_keys: &str) -> (Duration, Value, Vec<Seen>, Value) {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let keys = format!("canary_weight = 30\n{extra_keys}");
    let proxy = Proxy::builder()
        .routes(&route(&keys, ANALYSIS, &stable, &canary))
        .start()
        .await;
    let users = Users::start(proxy.url("/"), Duration::from_millis(10), 3000);
    proxy
        .wait_status("canary traffic", |s| {
            app(s)["window"]["canary"]["requests"].as_u64() >= Some(60)
        })
        .await;

    canary.set_mode(Mode::Hang);
    let hung_at = Instant::now();
    let st = proxy
        .wait_status("the rollback", |s| app(s)["rollout_state"] == "rolled_back")
        .await;
    let took = hung_at.elapsed();
    let events: Vec<Value> = st["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "rollback")
        .cloned()
        .collect();
    assert_eq!(events.len(), 1, "{:#}", st["events"]);
    // Traffic goes on a little after the rollback: every request sent meanwhile must still
    // be answered promptly.
    let after = Instant::now();
    let later = proxy
        .wait_status("stable traffic after the rollback", |s| {
            after.elapsed() > Duration::from_millis(300)
                && app(s)["in_flight"]["canary"].as_u64() == Some(0)
        })
        .await;
    let seen = users.stop().await;
    (took, events[0].clone(), seen, later)
}

fn longest_wait(seen: &[Seen]) -> Duration {
    seen.iter().map(|s| s.waited).max().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_canary_is_rolled_back_for_latency_and_users_do_not_wait() {
    let (took, rollback, seen, later) = hang_story("").await;
    let longest = longest_wait(&seen);
    println!(
        "hanging canary: rollback {} ms after the hang began (bound: interval {} ms + max_p99_latency {} ms + 1 s); longest user wait {} ms of {} requests (read_timeout {} s)",
        took.as_millis(),
        INTERVAL.as_millis(),
        LIMIT.as_millis(),
        longest.as_millis(),
        seen.len(),
        READ_TIMEOUT.as_secs()
    );
    assert_eq!(rollback["reason"], "latency", "{rollback:#}");
    let numbers = &rollback["numbers"];
    assert!(
        numbers["canary_p99_ms"].as_f64().unwrap() > 500.0,
        "{numbers:#}"
    );
    assert!(
        numbers["canary_in_flight_slow"].as_u64().unwrap() >= 1,
        "{numbers:#}"
    );
    // interval + max_p99_latency + 1 s, plus a generous margin for a loaded CI machine.
    let bound = INTERVAL + LIMIT + Duration::from_secs(1) + Duration::from_secs(4);
    assert!(took < bound, "rollback took {took:?}");
    // The default canary timeout (2 × 500 ms) sends waiting users to stable: nobody waits
    // anywhere near the read timeout, and nobody sees an error.
    assert!(longest < READ_TIMEOUT / 3, "a user waited {longest:?}");
    let failed: Vec<&Seen> = seen.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "users saw errors: {failed:?}");
    assert!(
        seen.iter().any(|s| s.version == "canary"),
        "no canary traffic"
    );
    // The requests that waited on the canary and were answered by stable are not charged
    // to stable: its latency is its own attempts' (a few ms), not the user's whole wait.
    let stable_p99 = app(&later)["window"]["stable"]["p99_ms"].as_f64().unwrap();
    assert!(
        stable_p99 < 500.0,
        "stable charged with the canary's wait: p99 {stable_p99} ms"
    );
}

/// With a canary timeout far above the rollback time, the requests still waiting on the
/// hanging canary are released by the rollback itself, not by a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_the_canary_go_to_stable_at_the_rollback() {
    let canary_timeout = Duration::from_secs(15);
    let (took, rollback, seen, _) = hang_story("canary_timeout = \"15s\"\n").await;
    let longest = longest_wait(&seen);
    println!(
        "canary_timeout 15 s: rollback {} ms after the hang began; longest user wait {} ms",
        took.as_millis(),
        longest.as_millis()
    );
    assert_eq!(rollback["reason"], "latency", "{rollback:#}");
    // Released at the rollback (a second or so), far from the 15 s canary timeout.
    assert!(
        longest < canary_timeout / 2,
        "a user waited {longest:?}: the rollback did not release the waiting requests"
    );
    let failed: Vec<&Seen> = seen.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "users saw errors: {failed:?}");
}

/// Clients that give up on a hanging canary are not its errors: they hang up, the proxy
/// notices, and the analysis counts nothing against the version (before, each counted as
/// a request without an answer: an error, and this route would have rolled back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_hanging_up_are_not_errors_of_the_version() {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let tables = "[routes.analysis]\ninterval = \"200ms\"\nwindow = \"10s\"\nmin_requests = 5\nmax_error_rate = 0.01\n";
    let proxy = Proxy::builder()
        .routes(&route("canary_weight = 100", tables, &stable, &canary))
        .start()
        .await;
    canary.set_mode(Mode::Hang);
    const USERS: usize = 10;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let mut gave_up = 0;
    for i in 0..USERS {
        let r = impatient
            .get(proxy.url("/"))
            .header("x-user-id", format!("impatient-{i}"))
            .send()
            .await;
        match r {
            Err(_) => gave_up += 1,
            Ok(r) => panic!("a hanging canary answered: {}", r.status()),
        }
    }
    assert_eq!(gave_up, USERS, "the canary was supposed to hang");
    // The proxy saw every one of them end (the client closed), and none is still waiting.
    let st = proxy
        .wait_status("the hang-ups to be noticed", |s| {
            app(s)["totals"]["canary"]["requests"].as_u64() >= Some(USERS as u64)
                && app(s)["in_flight"]["canary"].as_u64() == Some(0)
        })
        .await;
    let window = &app(&st)["window"]["canary"];
    assert_eq!(window["errors"], 0, "{window:#}");
    assert_eq!(window["requests"], 0, "{window:#}");
    assert_ne!(app(&st)["rollout_state"], "rolled_back");
    // And a real failure still counts: the same route rolls back once the canary errs.
    canary.set_status(500);
    let c = client();
    for i in 0..10 {
        let _ = c
            .get(proxy.url("/"))
            .header("x-user-id", format!("patient-{i}"))
            .send()
            .await;
    }
    let st = proxy
        .wait_status("the error rollback", |s| {
            app(s)["rollout_state"] == "rolled_back"
        })
        .await;
    assert!(app(&st)["window"]["canary"]["errors"].as_u64() >= Some(5));
}

/// Latency is the app's: a client that takes a second to upload its body does not make
/// the version look slow (the analysis measures each upstream attempt up to its answer's
/// head, while `kanaria_request_duration_seconds` still shows the whole request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_the_apps_latency() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (stable, _server) = body_reading_upstream().await;
    let proxy = Proxy::builder()
        .routes(&format!(
            "[[routes]]\nname = \"app\"\n{}",
            pool("routes.stable", "v1", &[stable])
        ))
        .start()
        .await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .expect("connect to the proxy");
    let started = Instant::now();
    conn.write_all(
        b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 8\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("request head");
    // The body, one byte every 150 ms: a 1 s upload, paced on purpose.
    for b in b"12345678" {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if let Err(e) = conn.write_all(&[*b]).await {
            let mut answer = Vec::new();
            let _ = conn.read_to_end(&mut answer).await;
            panic!("{e}: {}", String::from_utf8_lossy(&answer));
        }
    }
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.expect("answer");
    let took = started.elapsed();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(took >= Duration::from_millis(1000), "{took:?}");
    let st = proxy
        .wait_status("the request in the window", |s| {
            app(s)["window"]["stable"]["requests"].as_u64() >= Some(1)
        })
        .await;
    let p99 = app(&st)["window"]["stable"]["p99_ms"].as_f64().unwrap();
    assert!(
        p99 < 500.0,
        "the upload's {took:?} was counted as the app's latency: p99 {p99} ms"
    );
}

/// An upstream that reads the whole request body before it answers, as most apps do.
async fn body_reading_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use http_body_util::{BodyExt, Full};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(body)))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}
