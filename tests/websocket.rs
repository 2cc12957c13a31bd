//! WebSocket connections follow a rollback: real WebSocket servers (stable and canary, each
//! answering every message with its name) behind Kanaria, real clients that keep their
//! connection open and reconnect when it closes. At an operator's rollback, every client on
//! the canary is closed within the route's `rollback_drain` and reconnects onto stable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{eventually, pool, Proxy};

const TOKEN: &str = "ws-secret";
const CLIENTS: usize = 40;

/// A WebSocket server that answers each text message with `<name>:<message>`, and counts
/// its open connections.
struct WsServer {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WsServer {
    async fn start(name: &'static str) -> WsServer {
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
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    open.fetch_add(1, Ordering::SeqCst);
                    while let Some(Ok(msg)) = ws.next().await {
                        if let Message::Text(t) = msg {
                            if ws.send(Message::text(format!("{name}:{t}"))).await.is_err() {
                                break;
                            }
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        WsServer { addr, open, task }
    }
}

/// One user's client: connected through Kanaria, a message a round trip at a time; when its
/// connection ends it reconnects (as a browser's WebSocket code does). Keeps which server
/// answered last and how many times it reconnected.
struct Client {
    last: Arc<Mutex<String>>,
    reconnects: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
}

fn start_client(port: u16, user: String, stop: Arc<AtomicBool>) -> Client {
    let last = Arc::new(Mutex::new(String::new()));
    let reconnects = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let (l, r, f) = (last.clone(), reconnects.clone(), failures.clone());
    tokio::spawn(async move {
        let mut first = true;
        // Bounded: a forgotten client cannot run away.
        for _ in 0..1_000 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            if !first {
                r.fetch_add(1, Ordering::SeqCst);
            }
            first = false;
            let mut req = format!("ws://127.0.0.1:{port}/live")
                .into_client_request()
                .expect("request");
            req.headers_mut()
                .insert("x-user-id", user.parse().expect("header"));
            let Ok(tcp) = TcpStream::connect(("127.0.0.1", port)).await else {
                f.fetch_add(1, Ordering::SeqCst);
                continue;
            };
            let Ok((mut ws, _)) = tokio_tungstenite::client_async(req, tcp).await else {
                f.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            loop {
                if stop.load(Ordering::SeqCst) {
                    let _ = ws.close(None).await;
                    return;
                }
                if ws.send(Message::text("ping")).await.is_err() {
                    break;
                }
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        *l.lock().unwrap() = t.split(':').next().unwrap_or("").to_string();
                    }
                    Some(Ok(_)) => {}
                    // Closed: reconnect.
                    _ => break,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    Client {
        last,
        reconnects,
        failures,
    }
}

/// 40 users, half of them on the canary, each with an open WebSocket; an operator rolls
/// back: within `rollback_drain` (1 s here) every canary connection is closed by Kanaria,
/// its client reconnects and lands on stable; stable's connections are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websockets_on_the_canary_move_to_stable_within_the_drain_after_a_rollback() {
    let stable = WsServer::start("stable").await;
    let canary = WsServer::start("canary").await;
    let routes = format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = 50\nrollback_drain = \"1s\"\n{}{}[routes.analysis]\nenabled = false\n",
        pool("routes.stable", "stable", &[stable.addr]),
        pool("routes.canary", "canary", &[canary.addr]),
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .env("KANARIA_ADMIN_TOKEN", TOKEN)
        .start()
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<Client> = (0..CLIENTS)
        .map(|i| start_client(proxy.port, format!("user-{i}"), stop.clone()))
        .collect();
    let (s, c) = (stable.open.clone(), canary.open.clone());
    eventually("every client connected", Duration::from_secs(20), || {
        let n = s.load(Ordering::SeqCst) + c.load(Ordering::SeqCst);
        let answered = clients
            .iter()
            .filter(|cl| !cl.last.lock().unwrap().is_empty())
            .count();
        async move {
            if n == CLIENTS && answered == CLIENTS {
                Ok(())
            } else {
                Err(format!("{n} open, {answered} answered"))
            }
        }
    })
    .await;
    let on_canary = canary.open.load(Ordering::SeqCst);
    assert!(on_canary > 0, "no user on the canary at 50 %");
    // Each client's server and reconnect count before the rollback.
    let before: Vec<(String, u64)> = clients
        .iter()
        .map(|cl| {
            (
                cl.last.lock().unwrap().clone(),
                cl.reconnects.load(Ordering::SeqCst),
            )
        })
        .collect();

    let rolled_back = Instant::now();
    assert_eq!(proxy.act("rollback", TOKEN).await, 200);
    let c = canary.open.clone();
    eventually(
        "no connection left on the canary",
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
    let drained = rolled_back.elapsed();
    eventually(
        "every client answered by stable",
        Duration::from_secs(5),
        || {
            let on: Vec<String> = clients
                .iter()
                .map(|cl| cl.last.lock().unwrap().clone())
                .collect();
            let open = stable.open.load(Ordering::SeqCst);
            async move {
                if on.iter().all(|v| v == "stable") && open == CLIENTS {
                    Ok(())
                } else {
                    Err(format!("{open} open on stable, last answers {on:?}"))
                }
            }
        },
    )
    .await;
    // Stable's connections were not touched: only the canary's reconnected.
    for (i, (cl, (was, n))) in clients.iter().zip(&before).enumerate() {
        let now = cl.reconnects.load(Ordering::SeqCst);
        if was == "stable" {
            assert_eq!(now, *n, "user-{i}, on stable, reconnected");
        } else {
            assert!(now > *n, "user-{i}, on the canary, did not reconnect");
        }
    }
    let failures: u64 = clients
        .iter()
        .map(|cl| cl.failures.load(Ordering::SeqCst))
        .sum();
    assert_eq!(failures, 0, "a reconnect failed");
    // Ended by Kanaria, not the canary's failure.
    let m = proxy.metrics().await;
    assert_eq!(
        common::metric(
            &m,
            "kanaria_upstream_errors_total{route=\"app\",version=\"canary\",kind=\"reset\"}"
        ),
        0.0,
        "{m}"
    );
    stop.store(true, Ordering::SeqCst);
    eprintln!(
        "{on_canary} of {CLIENTS} WebSocket clients on the canary; all on stable {drained:?} after the rollback (rollback_drain 1s)"
    );
}
