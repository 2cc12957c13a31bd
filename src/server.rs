//! Process wiring: builds the Pingora server (threads, graceful shutdown, upgrade socket),
//! the control plane and the data plane around one live handle, adds the listeners and
//! runs until a signal.
//!
//! Pingora owns the signals: SIGTERM drains gracefully (listeners close, in-flight requests
//! get `shutdown_grace`), SIGINT exits at once, SIGQUIT hands the listeners to a new binary
//! started with `--upgrade` (zero-downtime upgrade).

use std::path::Path;
use std::sync::Arc;

use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::modules::http::HttpModules;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::config::{self, Config};
use crate::control::analysis_loop::AnalysisLoop;
use crate::control::reload::Reloader;
use crate::control::resolve::EndpointResolver;
use crate::control::Control;
use crate::proxy::drain;
use crate::proxy::KanariaProxy;
use crate::runtime::build;

/// The Pingora settings Kanaria chooses for its proxy service, where they differ from
/// Pingora's defaults. Shared with the benchmark's bare-Pingora floor
/// (`examples/bare_pingora.rs`), so the floor runs exactly the Pingora Kanaria runs; each
/// field was measured with A/B runs (bench/README.md, "Pingora's settings").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingoraTuning {
    /// Tokio work stealing between the proxy's worker threads (`ServerConf::work_stealing`).
    pub work_stealing: bool,
    /// Keep the response-compression module Pingora registers (disabled) on every proxy.
    pub compression_module: bool,
    /// Read buffer of each accepted client connection in bytes; `None`: Pingora's 64 KiB.
    pub l4_read_buffer: Option<usize>,
    /// Idle upstream keep-alive connections kept per worker thread
    /// (`ServerConf::upstream_keepalive_pool_size`).
    pub upstream_keepalive_pool_size: usize,
    /// Arm I/O timeouts on Tokio's timer of the worker's runtime instead of Pingora's
    /// shared fast timer (`ServerConf::fast_timeout_to_tokio_threshold_seconds = 0`).
    pub tokio_timers: bool,
}

impl PingoraTuning {
    /// Pingora 0.9's own defaults (the "before" of every A/B run).
    pub const PINGORA_DEFAULTS: PingoraTuning = PingoraTuning {
        work_stealing: true,
        compression_module: true,
        l4_read_buffer: None,
        upstream_keepalive_pool_size: 128,
        tokio_timers: false,
    };

    /// What Kanaria runs (before [`PingoraTuning::with_pool_for`]). Each change from
    /// Pingora's defaults, measured in user-space instructions per request on the bare
    /// floor (bench/README.md): no compression module -0.7%, unbuffered client reads -0.5%
    /// and 64 KiB less memory per client connection, Tokio's timers -2.4% (and no timer
    /// thread). Work stealing stays on although turning it off saved 1.0% on HTTP/1: with
    /// one runtime per worker, the streams of one HTTP/2 client connection are spread over
    /// the runtimes, each with its own upstream pool, and a steady h2 client opened a new
    /// upstream connection every few requests (`tests/http2.rs`).
    pub const KANARIA: PingoraTuning = PingoraTuning {
        work_stealing: true,
        compression_module: false,
        l4_read_buffer: Some(0),
        upstream_keepalive_pool_size: 128,
        tokio_timers: true,
    };

    /// Sizes the upstream keep-alive pool so that every client connection can keep its
    /// upstream connection: with fewer idle slots than busy client connections, Pingora
    /// closes upstream connections on release and opens new ones under steady load (200
    /// client connections over a pool of 128: thousands of new upstream connections per
    /// run, bench/README.md). The pool only holds idle connections, so its cap costs
    /// nothing until they exist. Pingora's setting is per worker thread.
    pub fn with_pool_for(mut self, client_connections: usize, threads: usize) -> Self {
        let per_thread = client_connections.div_ceil(threads.max(1));
        self.upstream_keepalive_pool_size = self.upstream_keepalive_pool_size.max(per_thread);
        self
    }

    /// Applies the server-wide settings to Pingora's configuration.
    pub fn apply_conf(&self, conf: &mut ServerConf) {
        conf.work_stealing = self.work_stealing;
        conf.upstream_keepalive_pool_size = self.upstream_keepalive_pool_size;
        if self.tokio_timers {
            conf.fast_timeout_to_tokio_threshold_seconds = Some(0);
        }
    }

    /// A proxy listener on `addr` with these settings.
    pub fn listener(&self, addr: &str) -> ListenerConfig {
        let listener = ListenerConfig::tcp(addr);
        match self.l4_read_buffer {
            Some(read) => listener.l4_buffer(L4BufferSettings::default().read(read)),
            None => listener,
        }
    }

    /// Applies the per-proxy settings to a proxy built with `pingora::proxy::http_proxy`.
    pub fn apply_proxy<SV>(&self, proxy: &mut HttpProxy<SV>) {
        if !self.compression_module {
            // Kanaria never compresses: the module Pingora adds by default would only
            // build a context and run its filters on every request.
            proxy.downstream_modules = HttpModules::new();
        }
    }
}

/// Pingora's server configuration derived from ours.
fn server_conf(config: &Config) -> ServerConf {
    let restart = &config.restart;
    let threads = restart.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let mut conf = ServerConf {
        threads,
        // Round up: a grace of 500ms must not become 0.
        grace_period_seconds: Some(restart.shutdown_grace.as_millis().div_ceil(1000) as u64),
        graceful_shutdown_timeout_seconds: Some(5),
        upgrade_sock: restart.upgrade_sock.clone(),
        ..ServerConf::default()
    };
    tuning(config, threads).apply_conf(&mut conf);
    conf
}

/// Kanaria's Pingora settings for this config: [`PingoraTuning::KANARIA`], the upstream pool
/// sized for `edge.max_connections` on every proxy listener.
fn tuning(config: &Config, threads: usize) -> PingoraTuning {
    let clients = config
        .edge
        .max_connections
        .saturating_mul(config.restart.listen.len().max(1));
    PingoraTuning::KANARIA.with_pool_for(clients, threads)
}

/// A Kanaria server ready to run: Pingora's server with the proxy, admin, reload and
/// analysis services added, and the control plane (the demo adds its own services).
pub struct Built {
    pub server: Server,
    pub shared: Arc<Control>,
}

/// Loads the config and builds every service. Config errors are returned, all of them,
/// before anything listens.
pub fn build(config_path: &Path, upgrade: bool) -> anyhow::Result<Built> {
    let config = build::load(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let conf = server_conf(&config);
    let tuning = tuning(&config, conf.threads);
    let restart = config.restart.clone();
    let tls = config.proxy.tls.clone();
    let listen = restart.listen.clone();
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    if !upgrade {
        check_free(config_path, &restart)?;
    }
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let admin_listen = restart.admin_listen;
    let linger = drain::linger_for(restart.shutdown_grace);
    let shared = Control::new(config, config_path.to_path_buf())?;
    let live = shared.live.clone();
    let access_log =
        crate::proxy::access_log::AccessLog::start(&restart.log, &live.metrics.registry)?;
    let mut all_listeners = listen.clone();
    all_listeners.extend(restart.tls_listen.iter().copied());
    let mut http = pingora::proxy::http_proxy(
        &server.configuration,
        KanariaProxy::new(live.clone()).with_access_log(access_log),
    );
    http.server_options = Some({
        let mut o = pingora::apps::HttpServerOptions::default();
        o.h2c = restart.h2c;
        o
    });
    http.h2_options = Some(crate::proxy::h2::options(&restart));
    tuning.apply_proxy(&mut http);
    // The proxy app behind the connection guard (header deadline, connection caps), which
    // lets idle connections linger on shutdown so clients reusing them are not reset.
    let app = crate::proxy::conn_guard::GuardedApp::new(http, live.clone(), &all_listeners, linger);
    let mut proxy = Service::new("kanaria proxy".to_string(), app);
    for addr in &listen {
        proxy.add_listener(tuning.listener(&addr.to_string()));
    }
    if let Some(t) = &tls {
        let store = crate::runtime::certs::CertStore::new(&t.certificates, &live.metrics.registry)?;
        for addr in &restart.tls_listen {
            let settings = crate::proxy::tls::listener_settings(&store, restart.tls_http2)
                .map_err(|e| anyhow::anyhow!("proxy.tls: {e}"))?;
            proxy.add_tls_with_settings(&addr.to_string(), None, settings);
        }
        server.add_service(background_service(
            "certificate reload",
            crate::proxy::tls::CertWatcher::new(store, live.clone()),
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
        "rollout analysis",
        AnalysisLoop::new(shared.clone()),
    ));
    server.add_service(background_service(
        "endpoint names",
        EndpointResolver::new(shared.clone()),
    ));
    if let Some(fleet) = &shared.fleet {
        log::info!(
            "fleet {:?}: this replica is {:?}; rollout state is shared through Redis",
            fleet.settings.cluster,
            fleet.settings.instance
        );
        server.add_service(background_service(
            "fleet",
            crate::control::fleet::FleetService::new(shared.clone(), fleet.clone()),
        ));
    }
    log::info!(
        "kanaria {} listening on {:?}{} (admin {admin_listen}) with {}",
        env!("CARGO_PKG_VERSION"),
        listen,
        if restart.tls_listen.is_empty() {
            String::new()
        } else {
            format!(", TLS on {:?}", restart.tls_listen)
        },
        config_path.display()
    );
    Ok(Built { server, shared })
}

/// Fails fast, naming the key, when a listen address is taken. Pingora would retry the bind
/// for a while and then run on without that listener; an operator wants the error now.
/// Skipped for `--upgrade`, where the old process holds the sockets on purpose.
fn check_free(config_path: &Path, restart: &config::RestartSettings) -> anyhow::Result<()> {
    let keys = restart
        .listen
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("proxy.listen[{i}]"), *a))
        .chain(
            restart
                .tls_listen
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("proxy.tls.listen[{i}]"), *a)),
        )
        .chain(std::iter::once((
            "admin.listen".to_string(),
            restart.admin_listen,
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

/// `kanaria check`: validates a file and checks the files it names, offline (no name is
/// resolved), returning a one-line summary.
pub fn check(config_path: &Path) -> Result<String, config::ConfigErrors> {
    let snap = build::load(config_path)?;
    Ok(format!(
        "{}: ok ({} route{})",
        config_path.display(),
        snap.routes.len(),
        if snap.routes.len() == 1 { "" } else { "s" }
    ))
}

#[cfg(test)]
mod tests {
    use super::PingoraTuning;

    #[test]
    fn upstream_pool_holds_one_connection_per_client_connection() {
        let t = PingoraTuning::KANARIA;
        // 10,000 client connections over 2 workers: 5,000 idle slots each.
        assert_eq!(
            t.with_pool_for(10_000, 2).upstream_keepalive_pool_size,
            5_000
        );
        assert_eq!(
            t.with_pool_for(10_001, 2).upstream_keepalive_pool_size,
            5_001
        );
        // Never below Pingora's default.
        assert_eq!(t.with_pool_for(50, 1).upstream_keepalive_pool_size, 128);
        assert_eq!(t.with_pool_for(50, 0).upstream_keepalive_pool_size, 128);
    }
}
