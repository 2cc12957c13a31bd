//! Process wiring: builds the Pingora server (threads, graceful shutdown, upgrade socket)
//! around one shared config snapshot, adds the proxy listeners and runs until a signal.
//!
//! Pingora owns the signals: SIGTERM drains gracefully (listeners close, in-flight requests
//! get `shutdown_grace`), SIGINT exits at once, SIGQUIT hands the listeners to a new binary
//! started with `--upgrade` (zero-downtime upgrade).

use std::path::Path;
use std::sync::Arc;

use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::config::reload::Reloader;
use crate::config::{self, Snapshot};
use crate::proxy::drain::{self, Draining};
use crate::proxy::KanariaProxy;
use crate::rollout::control::Shared;
use crate::rollout::controller::Controller;

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

/// A Kanaria server ready to run: Pingora's server with the proxy, admin, reload and
/// controller services added, and the shared state (the demo adds its own services).
pub struct Built {
    pub server: Server,
    pub shared: Arc<Shared>,
}

/// Loads the config and builds every service. Config errors are returned, all of them,
/// before anything listens.
pub fn build(config_path: &Path, upgrade: bool) -> anyhow::Result<Built> {
    let snapshot = config::load_file(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let conf = server_conf(&snapshot);
    let listen = snapshot.proxy.listen.clone();
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    if !upgrade {
        check_free(config_path, &snapshot)?;
    }
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let admin_listen = snapshot.admin.listen;
    let linger = drain::linger_for(snapshot.proxy.shutdown_grace);
    let log_settings = snapshot.log.clone();
    let shared = Shared::new(snapshot, config_path.to_path_buf())?;
    let access_log =
        crate::proxy::access_log::AccessLog::start(&log_settings, &shared.metrics.registry)?;
    let tls = shared.snapshot().proxy.tls.clone();
    let h2c = shared.snapshot().proxy.h2c;
    let edge = shared.snapshot().edge.clone();
    let mut all_listeners = listen.clone();
    if let Some(t) = &tls {
        all_listeners.extend(t.listen.iter().copied());
    }
    let mut http = pingora::proxy::http_proxy(
        &server.configuration,
        KanariaProxy::new(shared.clone()).with_access_log(access_log),
    );
    http.server_options = Some({
        let mut o = pingora::apps::HttpServerOptions::default();
        o.h2c = h2c;
        o
    });
    http.h2_options = Some(crate::proxy::h2::options(&edge));
    // The proxy app behind the connection guard (header deadline, connection caps), which
    // lets idle connections linger on shutdown so clients reusing them are not reset.
    let app = Draining::new(
        crate::proxy::conn_guard::GuardedApp::new(http, shared.clone(), &all_listeners),
        linger,
    );
    let mut proxy = Service::new("kanaria proxy".to_string(), app);
    for addr in &listen {
        proxy.add_tcp(&addr.to_string());
    }
    if let Some(t) = &tls {
        let store = crate::proxy::tls::CertStore::new(t, &shared.metrics.registry)?;
        for addr in &t.listen {
            let settings = crate::proxy::tls::listener_settings(&store, t.http2)
                .map_err(|e| anyhow::anyhow!("proxy.tls: {e}"))?;
            proxy.add_tls_with_settings(&addr.to_string(), None, settings);
        }
        server.add_service(background_service(
            "certificate reload",
            crate::proxy::tls::CertWatcher::new(store, shared.clone()),
        ));
    }
    let mut admin = Service::new("kanaria admin".to_string(), AdminApp::new(shared.clone()));
    admin.add_tcp(&admin_listen.to_string());
    // One thread is plenty for the admin API and keeps it off the proxy's workers.
    admin.threads = Some(1);
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(background_service(
        "config reload",
        Reloader::new(shared.clone()),
    ));
    server.add_service(background_service(
        "rollout controller",
        Controller::new(shared.clone()),
    ));
    if let Some(fleet) = &shared.fleet {
        log::info!(
            "fleet {:?}: this replica is {:?}; rollout state is shared through Redis",
            fleet.settings.cluster,
            fleet.settings.instance
        );
        server.add_service(background_service(
            "fleet",
            crate::rollout::fleet::FleetService::new(shared.clone(), fleet.clone()),
        ));
    }
    log::info!(
        "kanaria {} listening on {:?}{} (admin {admin_listen}) with {}",
        env!("CARGO_PKG_VERSION"),
        listen,
        tls.as_ref()
            .map_or(String::new(), |t| format!(", TLS on {:?}", t.listen)),
        config_path.display()
    );
    Ok(Built { server, shared })
}

/// Fails fast, naming the key, when a listen address is taken. Pingora would retry the bind
/// for a while and then run on without that listener; an operator wants the error now.
/// Skipped for `--upgrade`, where the old process holds the sockets on purpose.
fn check_free(config_path: &Path, snap: &Snapshot) -> anyhow::Result<()> {
    let keys = snap
        .proxy
        .listen
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("proxy.listen[{i}]"), *a))
        .chain(snap.proxy.tls.iter().flat_map(|t| {
            t.listen
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("proxy.tls.listen[{i}]"), *a))
        }))
        .chain(std::iter::once((
            "admin.listen".to_string(),
            snap.admin.listen,
        )));
    for (key, addr) in keys {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            anyhow::bail!(
                "{}: {key}: cannot listen on {addr}: {e} (another process has it? `kanaria run --upgrade` takes over from a running Kanaria)",
                config_path.display()
            );
        }
    }
    Ok(())
}

/// Loads the config and runs the proxy until shutdown.
pub fn run(config_path: &Path, upgrade: bool) -> anyhow::Result<()> {
    build(config_path, upgrade)?.server.run_forever()
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
