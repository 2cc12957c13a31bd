//! WebSocket connections follow a rollback: real WebSocket servers (stable and canary, each
//! answering every message with its name) behind Kanaria, real clients that keep their
//! connection open and reconnect when it closes. At an operator's rollback, every client on
//! the canary is closed within the route's `rollback_drain` and reconnects onto stable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{eventually, pool, Proxy};

const TOKEN: &str = "ws-secret";
const CLIENTS: usize = 40;

/// A WebSocket server that answers each text message with `<name>:<message>`, and counts
/// its open connections.
async fn ws_server(name: &'static str) -> common::CountingServer {
    common::CountingServer::start(move |tcp, open| async move {
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
    })
    .await
}

/// One user's client: connected through Kanaria, a message a round trip at a time; when its
/// connection ends it reconnects (as a browser's WebSocket code does). Keeps which server
/// answered last and how many times it reconnected.
type Client = common::Reconnecting;

fn start_client(port: u16, user: String, stop: Arc<AtomicBool>) -> Client {
    Client::spawn(stop, move |me, stop| {
        let user = user.clone();
        async move {
            let mut req = format!("ws://127.0.0.1:{port}/live")
                .into_client_request()
                .expect("request");
            req.headers_mut()
                .insert("x-user-id", user.parse().expect("header"));
            let Ok(tcp) = TcpStream::connect(("127.0.0.1", port)).await else {
                me.failures.fetch_add(1, Ordering::SeqCst);
                return;
            };
            let Ok((mut ws, _)) = tokio_tungstenite::client_async(req, tcp).await else {
                me.failures.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
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
                        *me.on.lock().unwrap() = t.split(':').next().unwrap_or("").to_string();
                    }
                    Some(Ok(_)) => {}
                    // Closed: reconnect.
                    _ => break,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
}

/// 40 users, half of them on the canary, each with an open WebSocket; an operator rolls
/// back: within `rollback_drain` (1 s here) every canary connection is closed by Kanaria,
/// its client reconnects and lands on stable; stable's connections are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websockets_on_the_canary_move_to_stable_within_the_drain_after_a_rollback() {
    let stable = ws_server("stable").await;
    let canary = ws_server("canary").await;
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
    let on: Vec<_> = clients.iter().map(|cl| cl.on.clone()).collect();
    common::all_connected(&on, (&stable, &canary)).await;
    let on_canary = canary.open.load(Ordering::SeqCst);
    assert!(on_canary > 0, "no user on the canary at 50 %");
    // Each client's server and reconnect count before the rollback.
    let before = common::seen(&clients);

    let rolled_back = Instant::now();
    assert_eq!(proxy.act("rollback", TOKEN).await, 200);
    common::none_open(&canary).await;
    let drained = rolled_back.elapsed();
    eventually(
        "every client answered by stable",
        Duration::from_secs(5),
        || {
            let on: Vec<String> = clients
                .iter()
                .map(|cl| cl.on.lock().unwrap().clone())
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
    common::assert_only_moved(&clients, &before, "canary");
    assert_eq!(common::failures(&clients), 0, "a reconnect failed");
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
