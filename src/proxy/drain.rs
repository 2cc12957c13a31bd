//! Draining client keep-alive connections on shutdown and binary upgrade.
//!
//! When Pingora stops a service (SIGTERM, or SIGQUIT after handing the listeners to a new
//! process) it stops accepting and, at once, closes every client connection that sits idle
//! between two requests. A client that is sending its next request on such a connection at
//! that moment gets a reset: a failed request during a "zero-downtime" upgrade (the fault
//! tests saw it in four upgrades out of six under load). [`Draining`] delays that close by
//! a linger period instead: a request arriving on an idle connection meanwhile is still
//! served, with `Connection: close` (Pingora marks every request after shutdown began), so
//! the client opens a new connection, which the new process (or nobody, on SIGTERM)
//! accepts. After the linger the connections still idle are closed as before.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

/// Wraps a Pingora app (the HTTP proxy) and lingers before its shutdown cleanup.
pub struct Draining<A> {
    inner: Arc<A>,
    linger: Duration,
}

impl<A> Draining<A> {
    pub fn new(inner: A, linger: Duration) -> Self {
        Draining {
            inner: Arc::new(inner),
            linger,
        }
    }
}

/// How long idle connections stay open after shutdown began: half the grace period, so
/// requests that arrive late still have the other half to finish.
pub fn linger_for(shutdown_grace: Duration) -> Duration {
    shutdown_grace / 2
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Draining<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.inner.process_new(session, shutdown).await
    }

    /// Called once the listeners stopped. The proxy's own cleanup is what wakes the idle
    /// connections to close them; it runs after the linger.
    async fn cleanup(&self) {
        log::info!(
            "draining: idle client connections close in {:?}",
            self.linger
        );
        tokio::time::sleep(self.linger).await;
        self.inner.cleanup().await;
    }
}
