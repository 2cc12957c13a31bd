//! Draining client keep-alive connections on shutdown and binary upgrade.
//!
//! When Pingora stops a service (SIGTERM, or SIGQUIT after handing the listeners to a new
//! process) it stops accepting and, at once, closes every client connection that sits idle
//! between two requests. A client that is sending its next request on such a connection at
//! that moment gets a reset: a failed request during a "zero-downtime" upgrade (the fault
//! tests saw it in four upgrades out of six under load). [`linger`] delays that close by
//! a linger period instead: a request arriving on an idle connection meanwhile is still
//! served, with `Connection: close` (Pingora marks every request after shutdown began), so
//! the client opens a new connection, which the new process (or nobody, on SIGTERM)
//! accepts. After the linger the connections still idle are closed as before.

use std::time::Duration;

/// How long idle connections stay open after shutdown began: half the grace period, so
/// requests that arrive late still have the other half to finish.
pub fn linger_for(shutdown_grace: Duration) -> Duration {
    shutdown_grace / 2
}

/// Waits out the linger before the proxy's shutdown cleanup closes the idle connections.
/// Run by [`crate::proxy::conn_guard::GuardedApp::cleanup`]: the guard already wraps the
/// proxy app, and a wrapper of its own would add one more boxed future to every connection
/// and one more layer to every poll of it.
pub async fn linger(linger: Duration) {
    log::info!("draining: idle client connections close in {linger:?}");
    tokio::time::sleep(linger).await;
}
