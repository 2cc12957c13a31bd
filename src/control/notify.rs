//! Rollout events to a webhook: JSON POSTs, retried with backoff, never blocking the proxy.
//!
//! Events go into a bounded queue (`try_send`: when the webhook is down long enough for
//! the queue to fill, new events are dropped and counted in the log, the proxy carries on).
//! One task sends them in order, each retried with exponential backoff.

use std::time::Duration;

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
    let url = settings.url.clone();
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(settings.timeout)
        .user_agent(concat!("kanaria/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            log::error!("webhook notifier: no HTTP client: {e}");
            return;
        }
    };
    while let Some(event) = rx.recv().await {
        let mut backoff = Duration::from_millis(250);
        for attempt in 1..=ATTEMPTS {
            let sent = client
                .post(&url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(event.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => log::warn!(
                    "webhook {url} answered {} (attempt {attempt}/{ATTEMPTS})",
                    r.status().as_u16()
                ),
                Err(e) => log::warn!("webhook {url}: {e} (attempt {attempt}/{ATTEMPTS})"),
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
