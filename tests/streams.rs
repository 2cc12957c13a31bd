//! Long-lived answers that are not upgrades follow a rollback: server-sent events over
//! HTTP/1 (a chunked body that sits idle between events) and gRPC server streams over an
//! h2c upstream to an HTTP/2 client. Real hyper upstreams, real clients (reqwest, hyper's
//! HTTP/2 client) that reconnect or re-issue their call when the stream ends. At an
//! operator's rollback, every stream on the canary is ended within the route's
//! `rollback_drain` (SSE with the body's last chunk, gRPC with `grpc-status: 14`) and
//! reconnects onto stable, while ordinary answers in flight complete whole.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use common::grpc::frame;
use common::{eventually, pool, Proxy};

const TOKEN: &str = "streams-secret";
const CLIENTS: usize = 30;
/// Longer than the drain: the streams sit idle while they are ended.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// The ordinary answer: this many pieces, `PIECE` apart (600 ms in all, within the drain).
const PIECES: usize = 6;
const PIECE: Duration = Duration::from_millis(100);

/// Counts an open stream while it lives (dropped with the body hyper drops at a close).
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(n: &Arc<AtomicUsize>) -> Open {
        n.fetch_add(1, Ordering::SeqCst);
        Open(n.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A stream body: `first`, then `beat` every [`HEARTBEAT`], forever; `open` counts it.
fn endless(first: Bytes, beat: Option<Bytes>, open: Open) -> Body {
    let s = futures::stream::unfold((true, open), move |(first_one, open)| {
        let (first, beat) = (first.clone(), beat.clone());
        async move {
            if first_one {
                return Some((Ok(Frame::data(first)), (false, open)));
            }
            tokio::time::sleep(HEARTBEAT).await;
            match beat {
                Some(b) => Some((Ok(Frame::data(b)), (false, open))),
                // Nothing more, ever: the stream stays open and idle.
                None => {
                    std::future::pending::<()>().await;
                    None
                }
            }
        }
    });
    BodyExt::boxed(StreamBody::new(s))
}

/// An upstream (HTTP/1 or h2c) with `name`: `/events` an endless SSE stream, `/slow` an
/// ordinary answer in [`PIECES`] pieces, `/svc.Feed/Watch` a gRPC server stream (one message,
/// then idle).
type Upstream = common::CountingServer;

async fn upstream(name: &'static str, h2c: bool) -> Upstream {
    Upstream::start(move |tcp, open| async move {
        let svc = service_fn(move |req: Request<Incoming>| {
            let open = open.clone();
            async move { Ok::<_, Infallible>(answer(name, req, &open).await) }
        });
        common::serve_hyper(tcp, svc, h2c).await;
    })
    .await
}

async fn answer(
    name: &'static str,
    req: Request<Incoming>,
    open: &Arc<AtomicUsize>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let _ = req.into_body().collect().await;
    let r = Response::builder().header("x-upstream", name);
    match path.as_str() {
        "/events" => r
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(endless(
                Bytes::from(format!("data: {name}\n\n")),
                Some(Bytes::from_static(b": heartbeat\n\n")),
                Open::new(open),
            ))
            .unwrap(),
        // A stream of a declared length it never reaches: it cannot be ended cleanly.
        "/sized-events" => r
            .header("content-type", "text/event-stream")
            .header("content-length", "1000000")
            .body(endless(
                Bytes::from(format!("data: {name}\n\n")),
                None,
                Open::new(open),
            ))
            .unwrap(),
        "/svc.Feed/Watch" => r
            .header("content-type", "application/grpc")
            .body(endless(
                Bytes::from(frame(name.as_bytes())),
                None,
                Open::new(open),
            ))
            .unwrap(),
        _ => {
            let s = futures::stream::unfold(0usize, |i| async move {
                if i == PIECES {
                    return None;
                }
                tokio::time::sleep(PIECE).await;
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"0123456789"))),
                    i + 1,
                ))
            });
            r.header("content-type", "text/plain")
                .body(BodyExt::boxed(StreamBody::new(s)))
                .unwrap()
        }
    }
}

/// One SSE client: `GET /events` with `Accept: text/event-stream`; whenever its stream ends
/// it reconnects, as `EventSource` does. Keeps the upstream of its current stream, how many
/// times it reconnected, and how many streams ended uncleanly (`failures`: an error instead
/// of the body's end).
type SseClient = common::Reconnecting;

fn start_sse_client(port: u16, user: String, stop: Arc<AtomicBool>) -> SseClient {
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    SseClient::spawn(stop, move |me, stop| {
        let (c, user) = (c.clone(), user.clone());
        async move {
            let resp = c
                .get(format!("http://127.0.0.1:{port}/events"))
                .header("accept", "text/event-stream")
                .header("x-user-id", &user)
                .send()
                .await;
            let Ok(mut resp) = resp.map_err(|e| eprintln!("{user}: connect error: {e:?}")) else {
                me.failures.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            };
            while !stop.load(Ordering::SeqCst) {
                match resp.chunk().await {
                    Ok(Some(b)) => {
                        let text = String::from_utf8_lossy(&b);
                        if let Some(n) = text.strip_prefix("data: ") {
                            *me.on.lock().unwrap() = n.trim().to_string();
                        }
                    }
                    // The body's clean end: reconnect.
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("{user}: stream error: {e:?}");
                        me.failures.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                }
            }
            me.on.lock().unwrap().clear();
        }
    })
}

/// Kanaria with `routes`, the admin token set, and HTTP/2 with prior knowledge on its plain
/// listener when `h2c`.
async fn start_proxy(routes: &str, h2c: bool) -> Proxy {
    let mut b = Proxy::builder()
        .routes(routes)
        .env("KANARIA_ADMIN_TOKEN", TOKEN);
    if h2c {
        b = b.proxy("h2c = true");
    }
    b.start().await
}

/// An HTTP/2 (h2c) client connection to Kanaria: its sender and its connection task.
async fn h2_connect(
    port: u16,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    (sender, tokio::spawn(conn))
}

fn routes(stable: SocketAddr, canary: SocketAddr, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = 50\nrollback_drain = \"1s\"\n{extra}{}{}[routes.analysis]\nenabled = false\n",
        pool("routes.stable", "stable", &[stable]),
        pool("routes.canary", "canary", &[canary]),
    )
}

/// 30 users, about half on the canary, each with an open SSE stream that sits idle (a
/// heartbeat every 2 s); meanwhile ordinary requests (600 ms answers, chunked) are in
/// flight on both versions. An operator rolls back: within `rollback_drain` (1 s) every
/// canary stream ends cleanly (the last chunk), its client reconnects and lands on stable;
/// stable's streams are left alone; every ordinary answer in flight completes whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_streams_on_the_canary_move_to_stable_within_the_drain_after_a_rollback() {
    let stable = upstream("stable", false).await;
    let canary = upstream("canary", false).await;
    let routes = routes(stable.addr, canary.addr, "");
    let (proxy, stop, clients, before) = sse_setup(&routes, (&stable, &canary)).await;
    let on_canary = canary.open.load(Ordering::SeqCst);
    assert!(on_canary > 0, "no user on the canary at 50 %");

    // Ordinary answers in flight across the rollback, on both versions.
    let ordinary: Vec<_> = (0..20)
        .map(|i| {
            let url = proxy.url("/slow");
            tokio::spawn(async move {
                let r = common::client()
                    .get(url)
                    .header("x-user-id", format!("plain-{i}"))
                    .send()
                    .await?;
                let by = r.headers().get("x-upstream").cloned();
                let body = r.bytes().await?;
                Ok::<_, reqwest::Error>((by, body.len()))
            })
        })
        .collect();
    tokio::time::sleep(PIECE).await;

    let rolled_back = Instant::now();
    assert_eq!(proxy.act("rollback", TOKEN).await, 200);
    let on: Vec<_> = clients.iter().map(|cl| cl.on.clone()).collect();
    let moved = all_on(&on, "stable", rolled_back).await;
    common::none_open(&canary).await;
    common::assert_only_moved(&clients, &before, "canary");
    assert_clean(&clients);
    let mut whole = (0, 0);
    for o in ordinary {
        let (by, len) = o.await.unwrap().expect("an ordinary request failed");
        assert_eq!(len, PIECES * 10, "an ordinary answer of {by:?} was cut");
        if by.is_some_and(|b| b == "canary") {
            whole.1 += 1;
        } else {
            whole.0 += 1;
        }
    }
    assert!(whole.1 > 0, "no ordinary request in flight on the canary");
    // Ended by Kanaria, not the canary's failure.
    let m = proxy.metrics().await;
    for kind in ["reset", "timeout"] {
        let series = format!(
            "kanaria_upstream_errors_total{{route=\"app\",version=\"canary\",kind=\"{kind}\"}}"
        );
        assert_eq!(common::metric(&m, &series), 0.0, "{m}");
    }
    stop.store(true, Ordering::SeqCst);
    eprintln!(
        "{on_canary} of {CLIENTS} SSE clients on the canary; all on stable {moved:?} after the rollback (rollback_drain 1s); ordinary answers whole: {} stable, {} canary",
        whole.0, whole.1
    );
}

/// What one gRPC call saw: the upstream of its first message and the `grpc-status` of its
/// trailers (`None`: the stream ended without trailers, or failed).
async fn grpc_call(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    port: u16,
    user: &str,
    first: Arc<Mutex<String>>,
) -> Option<String> {
    let req = Request::post(format!("http://127.0.0.1:{port}/svc.Feed/Watch"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-user-id", user)
        .body(Full::new(Bytes::from(frame(b"watch"))))
        .unwrap();
    let resp = sender.send_request(req).await.ok()?;
    let mut body = resp.into_body();
    while let Some(f) = body.frame().await {
        let f = f.ok()?;
        if let Some(d) = f.data_ref() {
            // One length-prefixed message: the upstream's name.
            *first.lock().unwrap() = String::from_utf8_lossy(&d[5..]).to_string();
        } else if let Some(t) = f.trailers_ref() {
            return t
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_string());
        }
    }
    None
}

/// gRPC server streams to the canary over an h2c upstream, from HTTP/2 clients (h2c to
/// Kanaria, one connection per client): at a rollback each stream ends within the drain
/// with `grpc-status: 14` (UNAVAILABLE), and the call each client re-issues lands on
/// stable; stable's streams are left alone; the upstream connection's streams are reset
/// one by one (the canary sees its streams end).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_streams_on_the_canary_end_unavailable_and_reissue_on_stable_after_a_rollback() {
    let stable = upstream("stable", true).await;
    let canary = upstream("canary", true).await;
    let routes =
        routes(stable.addr, canary.addr, "").replace("endpoints", "protocol = \"h2c\"\nendpoints");
    let proxy = start_proxy(&routes, true).await;
    const CALLERS: usize = 16;
    let statuses = Arc::new(Mutex::new(Vec::<(usize, Option<String>)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut firsts = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..CALLERS {
        let first = Arc::new(Mutex::new(String::new()));
        firsts.push(first.clone());
        let (statuses, stop, port) = (statuses.clone(), stop.clone(), proxy.port);
        tasks.push(tokio::spawn(async move {
            let (mut sender, conn) = h2_connect(port).await;
            let user = format!("caller-{i}");
            // Bounded: a forgotten caller cannot run away.
            for _ in 0..100 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                first.lock().unwrap().clear();
                let status = grpc_call(&mut sender, port, &user, first.clone()).await;
                statuses.lock().unwrap().push((i, status));
            }
            conn.abort();
        }));
    }
    common::all_connected(&firsts, (&stable, &canary)).await;
    let on_canary: Vec<usize> = (0..CALLERS)
        .filter(|&i| *firsts[i].lock().unwrap() == "canary")
        .collect();
    assert!(!on_canary.is_empty(), "no caller on the canary at 50 %");

    let rolled_back = Instant::now();
    assert_eq!(proxy.act("rollback", TOKEN).await, 200);
    let moved = all_on(&firsts, "stable", rolled_back).await;
    common::none_open(&canary).await;
    // Each canary caller's call ended with UNAVAILABLE; no stable call ended at all.
    let ended = statuses.lock().unwrap().clone();
    for &i in &on_canary {
        let mine: Vec<_> = ended.iter().filter(|(c, _)| *c == i).collect();
        assert_eq!(mine.len(), 1, "caller-{i}: {mine:?}");
        assert_eq!(mine[0].1.as_deref(), Some("14"), "caller-{i}: {mine:?}");
    }
    assert_eq!(
        ended.len(),
        on_canary.len(),
        "a stable call ended: {ended:?}"
    );
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.abort();
    }
    eprintln!(
        "{} of {CALLERS} gRPC streams on the canary ended with grpc-status 14 and re-issued on stable {moved:?} after the rollback (rollback_drain 1s)",
        on_canary.len()
    );
}

/// POSTs an operator action on route `app` with a JSON `body`; returns the status.
async fn act_with(proxy: &Proxy, action: &str, body: &str) -> u16 {
    common::client()
        .post(proxy.admin_url(&format!("/api/v1/routes/app/{action}")))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("admin action")
        .status()
        .as_u16()
}

/// Kanaria with `routes` in front of `ups`, and [`CLIENTS`] SSE clients streaming through
/// it: the proxy, the clients' stop flag, the clients and where each one streams from.
type SseSetup = (Proxy, Arc<AtomicBool>, Vec<SseClient>, Vec<(String, u64)>);

async fn sse_setup(routes: &str, ups: (&Upstream, &Upstream)) -> SseSetup {
    let proxy = start_proxy(routes, false).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = streaming(&proxy, CLIENTS, &stop, ups).await;
    let before = common::seen(&clients);
    (proxy, stop, clients, before)
}

/// `n` SSE clients, once every one of them streams: the clients, and each one's upstream.
async fn streaming(
    proxy: &Proxy,
    n: usize,
    stop: &Arc<AtomicBool>,
    ups: (&Upstream, &Upstream),
) -> Vec<SseClient> {
    let clients: Vec<SseClient> = (0..n)
        .map(|i| start_sse_client(proxy.port, format!("user-{i}"), stop.clone()))
        .collect();
    let on: Vec<_> = clients.iter().map(|cl| cl.on.clone()).collect();
    common::all_connected(&on, ups).await;
    clients
}

/// Waits until every stream of `on` is from `to`; that must come within the drain (1 s,
/// and slack) of `since`, which is returned.
async fn all_on(on: &[Arc<Mutex<String>>], to: &str, since: Instant) -> Duration {
    eventually("every stream moved", Duration::from_secs(5), || {
        let now: Vec<String> = on.iter().map(|o| o.lock().unwrap().clone()).collect();
        async move {
            if now.iter().all(|v| v == to) {
                Ok(())
            } else {
                Err(format!("streams now on {now:?}"))
            }
        }
    })
    .await;
    let took = since.elapsed();
    assert!(took < Duration::from_millis(1_800), "took {took:?}");
    took
}

/// Every stream that ended, ended by its body's end (the last chunk), not an error.
fn assert_clean(clients: &[SseClient]) {
    assert_eq!(
        common::failures(clients),
        0,
        "a stream ended with an error, not its last chunk"
    );
}

/// Waits until the clients `moving` (indices) reconnected and stream from `to` (5 s at
/// most); returns how long it took.
async fn moved_to(
    clients: &[SseClient],
    moving: &[usize],
    before: &[(String, u64)],
    to: &str,
) -> Duration {
    let start = Instant::now();
    eventually(
        "the moved users' streams reconnected",
        Duration::from_secs(5),
        || {
            let pending: Vec<String> = moving
                .iter()
                .filter(|&&i| {
                    clients[i].reconnects.load(Ordering::SeqCst) == before[i].1
                        || *clients[i].on.lock().unwrap() != to
                })
                .map(|i| format!("user-{i}"))
                .collect();
            async move {
                if pending.is_empty() {
                    Ok(())
                } else {
                    Err(format!("still waiting for {pending:?}"))
                }
            }
        },
    )
    .await;
    start.elapsed()
}

/// How long an absence is watched for: the whole drain (1 s) and some slack. Nothing can
/// say "nothing will happen" sooner than the drain would have made it happen.
const QUIET: Duration = Duration::from_millis(1_600);

/// A rollout at 25 %, then 50 %, then 100 %, each step held for an hour, so only the
/// operator promotes. Promoting without `drain` (25 -> 50 %) touches no stream: the stable
/// users it moves to the canary keep their stable streams. Promoting with `{"drain": true}`
/// (`kanaria promote --drain`, 50 -> 100 %) ends every remaining stable stream within `rollback_drain`, and each client
/// reconnects onto the canary; the canary's streams are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promotion_ends_stables_streams_only_when_the_operator_asks() {
    let stable = upstream("stable", false).await;
    let canary = upstream("canary", false).await;
    let rollout =
        "[routes.rollout]\nsteps = [{ weight = 25, hold = \"1h\" }, { weight = 50, hold = \"1h\" }, { weight = 100 }]\n";
    let routes = routes(stable.addr, canary.addr, "")
        .replace("canary_weight = 50\n", "")
        .replace("[routes.analysis]", &format!("{rollout}[routes.analysis]"));
    let (proxy, stop, clients, before) = sse_setup(&routes, (&stable, &canary)).await;
    assert!(before.iter().any(|(on, _)| on == "canary"), "{before:?}");

    // Without drain: nothing reconnects.
    assert_eq!(proxy.act("promote", TOKEN).await, 200);
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        common::seen(&clients),
        before,
        "a promotion without drain moved a stream"
    );

    // With drain: every stable stream ends and lands on the canary; the canary's stay.
    let on_stable: Vec<usize> = (0..CLIENTS).filter(|&i| before[i].0 == "stable").collect();
    // Through the command line, as an operator would: `kanaria promote app --drain`.
    let admin = format!("127.0.0.1:{}", proxy.admin_port);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::kanaria_bin())
            .args(["promote", "app", "--drain", "--admin", &admin])
            .env("KANARIA_ADMIN_TOKEN", TOKEN)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = moved_to(&clients, &on_stable, &before, "canary").await;
    assert!(took < Duration::from_millis(1_800), "took {took:?}");
    for (i, (was, n)) in before.iter().enumerate() {
        if was == "canary" {
            assert_eq!(clients[i].reconnects.load(Ordering::SeqCst), *n, "user-{i}");
        }
    }
    assert_clean(&clients);
    // A body the admin API does not know is refused.
    assert_eq!(act_with(&proxy, "promote", r#"{"drain": 1}"#).await, 400);
    stop.store(true, Ordering::SeqCst);
    eprintln!(
        "promotion with drain: {} stable streams on the canary {took:?} after it (rollback_drain 1s); without drain: none moved",
        on_stable.len()
    );
}

/// The canary weight lowered from 50 % to 20 % moves the users of buckets 20..50 % to
/// stable. With the route's `drain_on_weight_change = true`, their canary streams end
/// within `rollback_drain` and reconnect onto stable, while the users still on the canary
/// and stable's keep theirs; by default (`false`), no stream moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lowered_weight_ends_the_moved_users_streams_only_with_drain_on_weight_change() {
    for drain in [false, true] {
        let stable = upstream("stable", false).await;
        let canary = upstream("canary", false).await;
        let extra = format!("drain_on_weight_change = {drain}\n");
        let routes = routes(stable.addr, canary.addr, &extra);
        let (proxy, stop, clients, before) = sse_setup(&routes, (&stable, &canary)).await;
        assert_eq!(act_with(&proxy, "weight", r#"{"percent": 20}"#).await, 200);
        // Which users the new weight sends to stable: a fresh request of each says.
        let mut moving = Vec::new();
        for (i, (was, _)) in before.iter().enumerate() {
            let now = common::served_by(&proxy, &[("x-user-id", &format!("user-{i}"))]).await;
            if was == "canary" && now == "stable" {
                moving.push(i);
            }
        }
        assert!(
            !moving.is_empty(),
            "the weight change moved nobody: {before:?}"
        );
        if drain {
            let took = moved_to(&clients, &moving, &before, "stable").await;
            assert!(took < Duration::from_millis(1_800), "took {took:?}");
            tokio::time::sleep(QUIET).await;
            for (i, (was, n)) in before.iter().enumerate() {
                if !moving.contains(&i) {
                    let now = clients[i].reconnects.load(Ordering::SeqCst);
                    assert_eq!(now, *n, "user-{i} ({was}) was not moved, yet reconnected");
                }
            }
            eprintln!(
                "drain_on_weight_change: {} moved users' canary streams on stable {took:?} after the weight change",
                moving.len()
            );
        } else {
            tokio::time::sleep(QUIET).await;
            assert_eq!(
                common::seen(&clients),
                before,
                "a weight change moved a stream by default"
            );
        }
        assert_clean(&clients);
        stop.store(true, Ordering::SeqCst);
    }
}

/// A stream whose answer declared a length (`Content-Length`) cannot end cleanly: at a
/// rollback, an HTTP/2 client sees its stream reset with `CANCEL` (not `REFUSED_STREAM`: its
/// head and part of its body went out) within the drain; its connection stays usable, and
/// the next stream on it lands on stable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sized_stream_on_the_canary_is_reset_with_cancel_at_a_rollback() {
    let stable = upstream("stable", false).await;
    let canary = upstream("canary", false).await;
    let routes =
        routes(stable.addr, canary.addr, "").replace("canary_weight = 50", "canary_weight = 100");
    let proxy = start_proxy(&routes, true).await;
    let port = proxy.port;
    let get = || {
        Request::get(format!("http://127.0.0.1:{port}/sized-events"))
            .header("accept", "text/event-stream")
            .header("x-user-id", "one")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let (mut h2, conn) = h2_connect(port).await;
    let first = Arc::new(Mutex::new(String::new()));
    let end = tokio::spawn({
        let (req, first) = (h2.send_request(get()), first.clone());
        async move {
            let mut body = req.await.map_err(|e| format!("{e:?}"))?.into_body();
            while let Some(f) = body.frame().await {
                let f = f.map_err(|e| format!("{e:?}"))?;
                if let Some(d) = f.data_ref() {
                    *first.lock().unwrap() = String::from_utf8_lossy(d).trim().to_string();
                }
            }
            Ok::<_, String>(())
        }
    });
    common::all_connected(std::slice::from_ref(&first), (&stable, &canary)).await;
    assert_eq!(*first.lock().unwrap(), "data: canary");

    let rolled_back = Instant::now();
    assert_eq!(proxy.act("rollback", TOKEN).await, 200);
    let err = end
        .await
        .unwrap()
        .expect_err("the sized stream ended as if whole");
    let took = rolled_back.elapsed();
    assert!(took < Duration::from_millis(1_800), "took {took:?}");
    assert!(err.contains("CANCEL"), "{err}");
    common::none_open(&canary).await;
    // The connection is still usable, and its next stream goes to stable.
    let again = h2
        .send_request(get())
        .await
        .expect("a new stream on the same connection");
    assert_eq!(again.headers()["x-upstream"], "stable");
    conn.abort();
    eprintln!("a sized HTTP/2 stream reset {took:?} after the rollback: {err}");
}
