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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

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
struct Upstream {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    async fn start(name: &'static str, h2c: bool) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let open = counter.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let open = open.clone();
                        async move { Ok::<_, Infallible>(answer(name, req, &open).await) }
                    });
                    let io = TokioIo::new(tcp);
                    if h2c {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
        Upstream { addr, open, task }
    }
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
/// times it reconnected, and how many streams ended uncleanly (an error instead of the
/// body's end).
struct SseClient {
    on: Arc<Mutex<String>>,
    reconnects: Arc<AtomicU64>,
    unclean: Arc<AtomicU64>,
}

fn start_sse_client(port: u16, user: String, stop: Arc<AtomicBool>) -> SseClient {
    let on = Arc::new(Mutex::new(String::new()));
    let reconnects = Arc::new(AtomicU64::new(0));
    let unclean = Arc::new(AtomicU64::new(0));
    let (o, r, u) = (on.clone(), reconnects.clone(), unclean.clone());
    tokio::spawn(async move {
        let c = reqwest::Client::builder().no_proxy().build().unwrap();
        // Bounded: a forgotten client cannot run away.
        for attempt in 0..1_000 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            if attempt > 0 {
                r.fetch_add(1, Ordering::SeqCst);
            }
            let resp = c
                .get(format!("http://127.0.0.1:{port}/events"))
                .header("accept", "text/event-stream")
                .header("x-user-id", &user)
                .send()
                .await;
            let Ok(mut resp) = resp.map_err(|e| eprintln!("{user}: connect error: {e:?}")) else {
                u.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            loop {
                match resp.chunk().await {
                    Ok(Some(b)) => {
                        let text = String::from_utf8_lossy(&b);
                        if let Some(n) = text.strip_prefix("data: ") {
                            *o.lock().unwrap() = n.trim().to_string();
                        }
                    }
                    // The body's clean end: reconnect.
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("{user}: stream error: {e:?}");
                        u.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                }
                if stop.load(Ordering::SeqCst) {
                    return;
                }
            }
            o.lock().unwrap().clear();
        }
    });
    SseClient {
        on,
        reconnects,
        unclean,
    }
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
    let stable = Upstream::start("stable", false).await;
    let canary = Upstream::start("canary", false).await;
    let proxy = Proxy::builder()
        .routes(&routes(stable.addr, canary.addr, ""))
        .env("KANARIA_ADMIN_TOKEN", TOKEN)
        .start()
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<SseClient> = (0..CLIENTS)
        .map(|i| start_sse_client(proxy.port, format!("user-{i}"), stop.clone()))
        .collect();
    let (s, c) = (stable.open.clone(), canary.open.clone());
    eventually("every client streaming", Duration::from_secs(20), || {
        let n = s.load(Ordering::SeqCst) + c.load(Ordering::SeqCst);
        let on = clients
            .iter()
            .filter(|cl| !cl.on.lock().unwrap().is_empty())
            .count();
        async move {
            if n == CLIENTS && on == CLIENTS {
                Ok(())
            } else {
                Err(format!("{n} open, {on} streaming"))
            }
        }
    })
    .await;
    let on_canary = canary.open.load(Ordering::SeqCst);
    assert!(on_canary > 0, "no user on the canary at 50 %");
    let before: Vec<(String, u64)> = clients
        .iter()
        .map(|cl| {
            (
                cl.on.lock().unwrap().clone(),
                cl.reconnects.load(Ordering::SeqCst),
            )
        })
        .collect();

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
    eventually("every client on stable", Duration::from_secs(5), || {
        let on: Vec<String> = clients
            .iter()
            .map(|cl| cl.on.lock().unwrap().clone())
            .collect();
        async move {
            if on.iter().all(|v| v == "stable") {
                Ok(())
            } else {
                Err(format!("streams now on {on:?}"))
            }
        }
    })
    .await;
    let moved = rolled_back.elapsed();
    assert!(moved < Duration::from_millis(1_800), "took {moved:?}");
    let c = canary.open.clone();
    eventually(
        "no stream left on the canary",
        Duration::from_secs(5),
        || {
            let n = c.load(Ordering::SeqCst);
            async move {
                if n == 0 {
                    Ok(())
                } else {
                    Err(format!("{n} still open"))
                }
            }
        },
    )
    .await;
    for (i, (cl, (was, n))) in clients.iter().zip(&before).enumerate() {
        let now = cl.reconnects.load(Ordering::SeqCst);
        if was == "stable" {
            assert_eq!(now, *n, "user-{i}, on stable, reconnected");
        } else {
            assert!(now > *n, "user-{i}, on the canary, did not reconnect");
        }
    }
    let unclean: u64 = clients
        .iter()
        .map(|cl| cl.unclean.load(Ordering::SeqCst))
        .sum();
    assert_eq!(
        unclean, 0,
        "a stream ended with an error, not its last chunk"
    );
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
    let stable = Upstream::start("stable", true).await;
    let canary = Upstream::start("canary", true).await;
    let routes =
        routes(stable.addr, canary.addr, "").replace("endpoints", "protocol = \"h2c\"\nendpoints");
    let proxy = Proxy::builder()
        .routes(&routes)
        .proxy("h2c = true")
        .env("KANARIA_ADMIN_TOKEN", TOKEN)
        .start()
        .await;
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
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await
                    .unwrap();
            let conn = tokio::spawn(conn);
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
    let (s, c) = (stable.open.clone(), canary.open.clone());
    eventually("every call streaming", Duration::from_secs(20), || {
        let n = s.load(Ordering::SeqCst) + c.load(Ordering::SeqCst);
        let on = firsts
            .iter()
            .filter(|f| !f.lock().unwrap().is_empty())
            .count();
        async move {
            if n == CALLERS && on == CALLERS {
                Ok(())
            } else {
                Err(format!("{n} open, {on} streaming"))
            }
        }
    })
    .await;
    let on_canary: Vec<usize> = (0..CALLERS)
        .filter(|&i| *firsts[i].lock().unwrap() == "canary")
        .collect();
    assert!(!on_canary.is_empty(), "no caller on the canary at 50 %");

    let rolled_back = Instant::now();
    assert_eq!(proxy.act("rollback", TOKEN).await, 200);
    eventually("every call on stable", Duration::from_secs(5), || {
        let on: Vec<String> = firsts.iter().map(|f| f.lock().unwrap().clone()).collect();
        async move {
            if on.iter().all(|v| v == "stable") {
                Ok(())
            } else {
                Err(format!("calls now on {on:?}"))
            }
        }
    })
    .await;
    let moved = rolled_back.elapsed();
    assert!(moved < Duration::from_millis(1_800), "took {moved:?}");
    let c = canary.open.clone();
    eventually(
        "no stream left on the canary",
        Duration::from_secs(5),
        || {
            let n = c.load(Ordering::SeqCst);
            async move {
                if n == 0 {
                    Ok(())
                } else {
                    Err(format!("{n} still open"))
                }
            }
        },
    )
    .await;
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
