//! Cancelling one canary attempt, not a connection (issue 19), with real clients and real
//! upstreams: a canary attempt that waits for its answer's head past `canary_timeout`, or
//! at a rollback, is ended alone (its HTTP/2 stream reset, its HTTP/1 connection closed) and
//! retried on stable, while the other streams of the same h2c upstream connection go on.
//!
//! - h2load, many streams per connection, h2c upstreams: an operator rollback and a canary
//!   timeout each fail 0 requests, though canary answers are mid-body on the connections
//!   whose waiting streams are cancelled, and no upstream connection is closed.
//! - A POST with a body on the same h2c connection as a cancelled GET completes.
//! - The head-arrival race: a canary answering about at its timeout, a few hundred times on
//!   HTTP/1 and on h2c: every answer is either retried on stable or delivered whole.
//!
//! The upstreams are hyper servers (HTTP/1.1 or h2c with prior knowledge) whose answers a
//! test holds at a gate, so what is in flight at the moment of a rollback is known without
//! sleeping for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use common::{client, eventually, Proxy};

/// The size of a `/big` answer, and how much of it goes out before the gate.
const BIG: usize = 128 * 1024;
const BEFORE_GATE: usize = 32 * 1024;
/// The size of a `/race` answer, sent in `RACE_CHUNKS` pieces a little apart, so an answer
/// cut after its head would show.
const RACE: usize = 64 * 1024;
const RACE_CHUNKS: usize = 16;

/// The byte at `i` of every answer body: a pattern, so a cut or a mix-up shows.
fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>().into()
}

/// What the upstream saw, and the gate its held answers wait at.
struct Seen {
    /// Requests to `/hold` waiting now (they never get an answer).
    held: AtomicU64,
    /// Answers whose handler was dropped before it answered: the stream was reset (HTTP/2)
    /// or the connection closed (HTTP/1).
    cancelled: AtomicU64,
    /// `/big` answers waiting at the gate, part of their body sent.
    gated: AtomicU64,
    /// `POST /echo` bodies read whole, their answer waiting at the gate.
    posts: AtomicU64,
    connections: AtomicU64,
    /// Connections that ended (closed by Kanaria, or broken).
    closed: AtomicU64,
    /// `/race` requests the canary received (each answered after its delay).
    races: AtomicU64,
    /// `true` once the test opens the gate.
    gate: tokio::sync::watch::Sender<bool>,
}

impl Seen {
    async fn gate_open(&self) {
        let mut rx = self.gate.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// Counts a handler dropped before it answered.
struct Unanswered(Arc<Seen>, bool);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, SeqCst);
        }
    }
}

/// Keeps a `/hold` request counted as held while its handler lives.
struct Held(Arc<Seen>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, SeqCst);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    H1,
    H2c,
}

/// A real upstream: `GET /hold` (the canary never answers it; stable answers at once),
/// `GET /big` (the canary sends `BEFORE_GATE` bytes, then waits for the gate), `POST /echo`
/// (the canary waits for the gate once the body is read), `GET /race` (the canary answers
/// after a delay that varies around 100 ms per request).
struct Gated {
    addr: SocketAddr,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gated {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(b: Bytes) -> Body {
    Full::new(b).boxed()
}

impl Gated {
    async fn start(name: &'static str, proto: Proto) -> Gated {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Seen {
            held: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            gated: AtomicU64::new(0),
            posts: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            races: AtomicU64::new(0),
            gate: tokio::sync::watch::channel(false).0,
        });
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                shared.connections.fetch_add(1, SeqCst);
                let seen = shared.clone();
                tokio::spawn(async move {
                    let s = seen.clone();
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = s.clone();
                        async move { Ok::<_, Infallible>(answer(name, req, seen).await) }
                    });
                    let io = TokioIo::new(stream);
                    let _ = match proto {
                        Proto::H1 => {
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, svc)
                                .await
                        }
                        Proto::H2c => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await
                        }
                    };
                    seen.closed.fetch_add(1, SeqCst);
                });
            }
        });
        Gated { addr, seen, task }
    }

    fn open_gate(&self) {
        self.seen.gate.send_replace(true);
    }

    fn get(&self, what: fn(&Seen) -> &AtomicU64) -> u64 {
        what(&self.seen).load(SeqCst)
    }
}

async fn answer(name: &'static str, req: Request<Incoming>, seen: Arc<Seen>) -> Response<Body> {
    let canary = name == "canary";
    let mut unanswered = Unanswered(seen.clone(), false);
    let path = req.uri().path().to_string();
    let body = match (req.method().as_str(), path.as_str()) {
        ("GET", "/hold") if canary => {
            seen.held.fetch_add(1, SeqCst);
            let _held = Held(seen.clone());
            // Never answered: Kanaria has to cancel it (the handler is dropped then).
            std::future::pending::<Body>().await
        }
        ("GET", "/big") if canary => {
            let (first, rest) = {
                let all = pattern(BIG);
                (all.slice(..BEFORE_GATE), all.slice(BEFORE_GATE..))
            };
            let seen = seen.clone();
            // The first part at once, the rest once the gate is open.
            let chunks = futures::stream::unfold(0u8, move |step| {
                let (first, rest, seen) = (first.clone(), rest.clone(), seen.clone());
                async move {
                    match step {
                        0 => Some((Ok(Frame::data(first)), 1)),
                        1 => {
                            seen.gated.fetch_add(1, SeqCst);
                            seen.gate_open().await;
                            seen.gated.fetch_sub(1, SeqCst);
                            Some((Ok(Frame::data(rest)), 2))
                        }
                        _ => None,
                    }
                }
            });
            StreamBody::new(chunks).boxed()
        }
        ("GET", "/race") if canary => {
            // 40..160 ms, varying per request around a 100 ms canary timeout.
            let n = seen.races.fetch_add(1, SeqCst);
            let delay = 40 + (n * 37) % 121;
            tokio::time::sleep(Duration::from_millis(delay)).await;
            race_body()
        }
        ("GET", "/race") => race_body(),
        ("POST", "/echo") => {
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            let body = body.unwrap_or_default();
            if canary {
                seen.posts.fetch_add(1, SeqCst);
                seen.gate_open().await;
                seen.posts.fetch_sub(1, SeqCst);
            }
            full(body)
        }
        (_, "/big") => full(pattern(BIG)),
        _ => full(Bytes::from_static(b"stable holds nothing\n")),
    };
    unanswered.1 = true;
    Response::builder()
        .header("x-upstream", name)
        .body(body)
        .expect("response")
}

/// A `/race` answer: `RACE` bytes in `RACE_CHUNKS` pieces, 2 ms apart.
fn race_body() -> Body {
    let all = pattern(RACE);
    let step = RACE / RACE_CHUNKS;
    let chunks = futures::stream::unfold(0usize, move |i| {
        let all = all.clone();
        async move {
            if i == RACE_CHUNKS {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Some((
                Ok::<_, Infallible>(Frame::data(all.slice(i * step..(i + 1) * step))),
                i + 1,
            ))
        }
    });
    StreamBody::new(chunks).boxed()
}

fn pool(section: &str, version: &str, addr: SocketAddr, proto: Proto) -> String {
    let protocol = match proto {
        Proto::H1 => "",
        Proto::H2c => "protocol = \"h2c\"\n",
    };
    format!("[{section}]\nversion = \"{version}\"\n{protocol}endpoints = [\"{addr}\"]\n")
}

/// A route split by an issued cookie (each h2load request is a new user, so the requests
/// spread over both versions), with `keys` added; analysis lenient enough that it does not
/// roll back on its own during a test.
fn route(keys: &str, stable: &Gated, canary: &Gated, proto: Proto) -> String {
    format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"issued_cookie:uid\"]\nread_timeout = \"60s\"\n{keys}\n\
         [routes.analysis]\nmax_p99_latency = \"30s\"\n{}\n{}",
        pool("routes.stable", "v1", stable.addr, proto),
        pool("routes.canary", "v2", canary.addr, proto),
    )
}

/// h2load over h2c: `n` requests on 4 connections × 20 streams, alternating `/big` and
/// `/hold`.
fn h2load(proxy: &Proxy, n: usize) -> tokio::task::JoinHandle<String> {
    let (big, hold, n) = (proxy.url("/big"), proxy.url("/hold"), n.to_string());
    tokio::task::spawn_blocking(move || {
        common::h2load::run(&["-n", &n, "-c", "4", "-m", "20", &big, &hold])
    })
}

/// The measurement: with the duplicate-descriptor watcher, an operator rollback
/// under h2load failed 34 of 40,000 requests, because shutting the canary socket down
/// failed every stream on it. Here, at the moment of the rollback, the canary's h2c
/// connections carry both streams waiting for a head (cancelled, retried on stable) and
/// answers mid-body (they finish): 0 failures, no upstream connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_rollback_under_load_fails_no_request() {
    let stable = Gated::start("stable", Proto::H2c).await;
    let canary = Gated::start("canary", Proto::H2c).await;
    let routes = route(
        "canary_weight = 50\ncanary_timeout = \"30s\"\n",
        &stable,
        &canary,
        Proto::H2c,
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .proxy("h2c = true")
        .env("KANARIA_ADMIN_TOKEN", "tok")
        .start()
        .await;
    let load = h2load(&proxy, 2000);
    // Held streams and answers stopped mid-body pile up on the canary's connections (they
    // take h2load's stream slots, so it waits for the rollback). Once all 80 slots are
    // stuck there, no request is left that could open another canary connection, so the
    // count below is final.
    eventually(
        "all of h2load's streams held or mid-body at the canary",
        Duration::from_secs(30),
        || async {
            let (held, gated) = (canary.get(|s| &s.held), canary.get(|s| &s.gated));
            if held >= 10 && gated >= 10 && held + gated == 80 {
                Ok((held, gated))
            } else {
                Err(format!("held {held}, mid-body {gated}"))
            }
        },
    )
    .await;
    let connections = canary.get(|s| &s.connections);
    assert_eq!(proxy.act("rollback", "tok").await, 200);
    // Every held stream is cancelled at the rollback, before any answer moves on.
    eventually(
        "held streams cancelled",
        Duration::from_secs(10),
        || async {
            match canary.get(|s| &s.held) {
                0 => Ok(()),
                n => Err(format!("{n} still held")),
            }
        },
    )
    .await;
    canary.open_gate();
    let out = load.await.unwrap();
    assert_eq!(common::h2load::counts(&out), (2000, 0, 0), "h2load:\n{out}");
    assert!(canary.get(|s| &s.cancelled) >= 10);
    // Streams were reset, the connections kept: none closed, none opened since.
    assert_eq!(canary.get(|s| &s.closed), 0);
    assert_eq!(canary.get(|s| &s.connections), connections);
    let st = proxy.status().await;
    assert!(
        st["routes"][0]["totals"]["retried_on_stable"].as_u64() >= Some(10),
        "{st:#}"
    );
}

/// The same load with the canary's heads never coming: each waiting stream is cancelled at
/// `canary_timeout` and retried on stable while other canary answers stream on the same
/// connections: 0 failures, no upstream connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_canary_timeout_under_load_fails_no_request() {
    let stable = Gated::start("stable", Proto::H2c).await;
    let canary = Gated::start("canary", Proto::H2c).await;
    let routes = route(
        "canary_weight = 50\ncanary_timeout = \"300ms\"\n",
        &stable,
        &canary,
        Proto::H2c,
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .proxy("h2c = true")
        .start()
        .await;
    let load = h2load(&proxy, 1000);
    eventually(
        "canary streams cancelled while others are mid-body",
        Duration::from_secs(30),
        || async {
            let (cancelled, gated) = (canary.get(|s| &s.cancelled), canary.get(|s| &s.gated));
            if cancelled >= 10 && gated >= 5 {
                Ok(())
            } else {
                Err(format!("cancelled {cancelled}, mid-body {gated}"))
            }
        },
    )
    .await;
    canary.open_gate();
    let out = load.await.unwrap();
    assert_eq!(common::h2load::counts(&out), (1000, 0, 0), "h2load:\n{out}");
    assert_eq!(canary.get(|s| &s.closed), 0);
}

/// A GET cancelled at a rollback resets its own stream only: a POST with a body in flight
/// on the same h2c connection (not replayable, so never cancelled) completes on the canary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_on_the_connection_of_a_cancelled_get_completes() {
    let stable = Gated::start("stable", Proto::H2c).await;
    let canary = Gated::start("canary", Proto::H2c).await;
    let routes = route(
        "canary_weight = 100\ncanary_timeout = \"30s\"\n",
        &stable,
        &canary,
        Proto::H2c,
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .env("KANARIA_ADMIN_TOKEN", "tok")
        .start()
        .await;
    let c = client();
    let get = tokio::spawn(c.get(proxy.url("/hold")).send());
    eventually("the GET held", Duration::from_secs(10), || async {
        match canary.get(|s| &s.held) {
            1 => Ok(()),
            n => Err(format!("{n} held")),
        }
    })
    .await;
    let sent = pattern(100 * 1024);
    let post = tokio::spawn(c.post(proxy.url("/echo")).body(sent.clone()).send());
    eventually("the POST's body read", Duration::from_secs(10), || async {
        match canary.get(|s| &s.posts) {
            1 => Ok(()),
            n => Err(format!("{n} posts waiting")),
        }
    })
    .await;
    // Both streams on one h2c connection.
    assert_eq!(canary.get(|s| &s.connections), 1);
    assert_eq!(proxy.act("rollback", "tok").await, 200);
    let got = get.await.unwrap().expect("the GET");
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["x-upstream"], "stable");
    assert_eq!(canary.get(|s| &s.cancelled), 1);
    canary.open_gate();
    let answer = post.await.unwrap().expect("the POST");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["x-upstream"], "canary");
    assert_eq!(answer.bytes().await.expect("the POST's answer"), sent);
    assert_eq!(canary.get(|s| &s.closed), 0);
    assert_eq!(canary.get(|s| &s.connections), 1);
}

/// `requests` GETs of `/race`, 30 at a time, through a canary that answers about at its
/// 100 ms `canary_timeout`: each answer must be whole, from the canary (its head won) or
/// from stable (the timeout won). Returns how many each served.
async fn race(proto: Proto, requests: usize) -> (usize, usize) {
    let stable = Gated::start("stable", proto).await;
    let canary = Gated::start("canary", proto).await;
    let routes = route(
        "canary_weight = 100\ncanary_timeout = \"100ms\"\n",
        &stable,
        &canary,
        proto,
    );
    let proxy = Proxy::builder().routes(&routes).start().await;
    let c = client();
    let want = pattern(RACE);
    let gate = Arc::new(tokio::sync::Semaphore::new(30));
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..requests {
        let (c, url, gate) = (c.clone(), proxy.url("/race"), gate.clone());
        all.spawn(async move {
            let _slot = gate.acquire_owned().await.unwrap();
            let r = c.get(url).send().await.expect("an answer");
            let status = r.status().as_u16();
            let from = r.headers()["x-upstream"].to_str().unwrap().to_string();
            let version = r.headers()["x-kanaria-version"]
                .to_str()
                .unwrap()
                .to_string();
            let body = r.bytes().await;
            (status, from, version, body)
        });
    }
    let (mut from_canary, mut from_stable) = (0, 0);
    while let Some(r) = all.join_next().await {
        let (status, from, version, body) = r.unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            from, version,
            "the version header names the upstream that answered"
        );
        let body = body.unwrap_or_else(|e| panic!("an answer from {from} was cut: {e}"));
        assert_eq!(body.len(), RACE, "an answer from {from} was cut");
        assert!(body == want, "an answer from {from} is not what was sent");
        match from.as_str() {
            "canary" => from_canary += 1,
            _ => from_stable += 1,
        }
    }
    assert_eq!(canary.get(|s| &s.races) as usize, requests);
    (from_canary, from_stable)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_at_the_canary_timeout_is_retried_or_whole_http1() {
    let (canary, stable) = race(Proto::H1, 300).await;
    println!("HTTP/1: {canary} answers whole from the canary, {stable} retried on stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_at_the_canary_timeout_is_retried_or_whole_h2c() {
    let (canary, stable) = race(Proto::H2c, 300).await;
    println!("h2c: {canary} answers whole from the canary, {stable} retried on stable");
}
