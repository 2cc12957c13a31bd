//! Process wiring: builds the Pingora server (threads, graceful shutdown, upgrade socket)
//! around one shared config snapshot, adds the proxy listeners and runs until a signal.
//!
//! Pingora owns the signals: SIGTERM drains gracefully (listeners close, in-flight requests
//! get `shutdown_grace`), SIGINT exits at once, SIGQUIT hands the listeners to a new binary
//! started with `--upgrade` (zero-downtime upgrade).

use std::path::Path;

use anyhow::Context;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::config::{self, Snapshot};
use crate::drain::{self, Draining};
use crate::proxy::KanariaProxy;
use crate::reload::Reloader;
use crate::state::Shared;

/// Pingora's server configuration derived from ours.
fn server_conf(snap: &Snapshot) -> ServerConf {
    let threads = snap.proxy.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    ServerConf {
        threads,
        // Round up: a grace of 500ms must not become 0.
        grace_period_seconds: Some(snap.proxy.shutdown_grace.as_millis().div_ceil(1000) as u64),
        graceful_shutdown_timeout_seconds: Some(5),
        upgrade_sock: snap.proxy.upgrade_sock.clone(),
        ..ServerConf::default()
    }
}

/// Loads the config and runs the proxy until shutdown. Config errors are returned, all of
/// them, before anything listens.
pub fn run(config_path: &Path, upgrade: bool) -> anyhow::Result<()> {
    let snapshot = config::load_file(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let conf = server_conf(&snapshot);
    let listen = snapshot.proxy.listen.clone();
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let admin_listen = snapshot.admin.listen;
    let snapshot_grace = snapshot.proxy.shutdown_grace;
    let shared = Shared::new(snapshot, config_path.to_path_buf())
        .map_err(|e| anyhow::anyhow!("metrics registry: {e}"))?;
    let linger = drain::linger_for(snapshot_grace);
    let mut proxy = Service::new(
        "kanaria proxy".to_string(),
        Draining::new(
            pingora::proxy::http_proxy(&server.configuration, KanariaProxy::new(shared.clone())),
            linger,
        ),
    );
    for addr in &listen {
        proxy.add_tcp(&addr.to_string());
    }
    let mut admin = Service::new("kanaria admin".to_string(), AdminApp::new(shared.clone()));
    admin.add_tcp(&admin_listen.to_string());
    // One thread is plenty for the admin API and keeps it off the proxy's workers.
    admin.threads = Some(1);
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(background_service("config reload", Reloader::new(shared)));
    log::info!(
        "kanaria {} listening on {:?} with {}",
        env!("CARGO_PKG_VERSION"),
        listen,
        config_path.display()
    );
    server.run_forever()
}

/// `kanaria check`: validates a file, returning a one-line summary.
pub fn check(config_path: &Path) -> Result<String, config::ConfigErrors> {
    let snap = config::load_file(config_path)?;
    Ok(format!(
        "{}: ok ({} route{})",
        config_path.display(),
        snap.routes.len(),
        if snap.routes.len() == 1 { "" } else { "s" }
    ))
}

/// Context for errors of the binary.
pub fn with_path<T>(r: std::io::Result<T>, path: &Path) -> anyhow::Result<T> {
    r.with_context(|| path.display().to_string())
}
