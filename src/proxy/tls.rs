//! TLS termination on the proxy's listeners: Pingora's settings of each TLS listener, with
//! the [`CertStore`] choosing a certificate by SNI in each handshake, and the
//! [`CertWatcher`] that re-reads the certificate files of the live config (loading and
//! checking them is the runtime layer's: [`crate::runtime::certs`]).

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::runtime::certs::CertStore;
use crate::runtime::LiveHandle;

/// Pingora's TLS settings of one listener, with `store` choosing certificates.
pub fn listener_settings(
    store: &Arc<CertStore>,
    http2: bool,
) -> pingora::Result<pingora::listeners::tls::TlsSettings> {
    let mut s = pingora::listeners::tls::TlsSettings::intermediate("", "")?;
    s.set_cert_resolver(store.clone());
    if http2 {
        s.enable_h2();
    }
    Ok(s)
}

/// Re-reads the certificate files of the current config every `watch_interval`.
pub struct CertWatcher {
    store: Arc<CertStore>,
    live: Arc<LiveHandle>,
}

impl CertWatcher {
    pub fn new(store: Arc<CertStore>, live: Arc<LiveHandle>) -> Self {
        CertWatcher { store, live }
    }
}

#[async_trait]
impl BackgroundService for CertWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let snap = self.live.snapshot();
            let Some(tls) = snap.config.proxy.tls.as_ref() else {
                return;
            };
            let interval = tls.watch_interval;
            let paths = tls.certificates.clone();
            drop(snap);
            let store = self.store.clone();
            // File reads and key parsing off the async workers.
            let _ = tokio::task::spawn_blocking(move || store.refresh(&paths)).await;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
