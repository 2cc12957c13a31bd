//! Rollout events to a webhook: JSON POSTs, retried with backoff, never blocking the proxy.
//!
//! Events go into a bounded queue (`try_send`: when the webhook is down long enough for
//! the queue to fill, new events are dropped and counted in the log, the proxy carries on).
//! One task sends them in order, each retried with exponential backoff.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::NotifySettings;

/// Events queued at most before new ones are dropped.
const QUEUE: usize = 1024;
/// Attempts per event.
const ATTEMPTS: u32 = 5;

/// Handle to the sender task.
pub struct Notifier {
    tx: mpsc::Sender<String>,
}

impl Notifier {
    /// Starts the sender on its own thread and runtime: the state may be created before
    /// Pingora's runtimes exist, and webhook I/O must never compete with proxying.
    pub fn start(settings: NotifySettings) -> Notifier {
        let (tx, rx) = mpsc::channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("kanaria-notify".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(run(settings, rx)),
                    Err(e) => log::error!("webhook notifier: no runtime: {e}"),
                }
            });
        if let Err(e) = spawned {
            log::error!("webhook notifier: cannot start: {e}");
        }
        Notifier { tx }
    }

    /// Queues one event (a JSON line). Never blocks.
    pub fn send(&self, event: String) {
        if self.tx.try_send(event).is_err() {
            log::warn!("webhook queue full or closed: an event was not sent");
        }
    }
}

async fn run(settings: NotifySettings, mut rx: mpsc::Receiver<String>) {
    while let Some(event) = rx.recv().await {
        let mut backoff = Duration::from_millis(250);
        for attempt in 1..=ATTEMPTS {
            match tokio::time::timeout(settings.timeout, post(&settings, &event)).await {
                Ok(Ok(status)) if (200..300).contains(&status) => break,
                Ok(Ok(status)) => log::warn!(
                    "webhook http://{}{} answered {status} (attempt {attempt}/{ATTEMPTS})",
                    settings.authority,
                    settings.path
                ),
                Ok(Err(e)) => log::warn!(
                    "webhook http://{}{}: {e} (attempt {attempt}/{ATTEMPTS})",
                    settings.authority,
                    settings.path
                ),
                Err(_) => log::warn!(
                    "webhook http://{}{} timed out (attempt {attempt}/{ATTEMPTS})",
                    settings.authority,
                    settings.path
                ),
            }
            if attempt == ATTEMPTS {
                log::error!("webhook: giving up on an event after {ATTEMPTS} attempts");
            } else {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
}

/// One HTTP/1.1 POST; returns the status code.
async fn post(s: &NotifySettings, body: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(&s.authority).await?;
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: kanaria/{}\r\n\r\n{body}",
        s.path,
        s.authority,
        body.len(),
        env!("CARGO_PKG_VERSION"),
    );
    stream.write_all(req.as_bytes()).await?;
    let mut head = vec![0u8; 1024];
    let n = stream.read(&mut head).await?;
    let text = String::from_utf8_lossy(&head[..n]);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status in the webhook's answer"))
}
