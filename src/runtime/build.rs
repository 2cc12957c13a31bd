//! Settings to runtime: the files a config names are checked ([`check_files`], no network
//! I/O, so `kanaria check` works offline), and a validated [`Config`] is built into a
//! [`Snapshot`] ([`build`]): each pool's names resolved, its load balancer and health check
//! created. A pool whose settings did not change keeps the one built before (and so the
//! health its endpoints earned).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;

use pingora::lb::LoadBalancer;

use super::certs;
use super::pool::Pool;
use super::{AddedHeaders, Route, Snapshot};
use crate::config::errors::KeyPath;
use crate::config::validate::NamedFiles;
use crate::config::{self, Config, ConfigErrors, Endpoint, HealthSettings, PoolSettings};

/// Looks up a name's addresses (the system resolver in production).
pub trait Resolve: Send + Sync {
    /// Every address of `host`, with `port`; `Err` says why there is none.
    fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String>;
}

/// The system's resolver (`getaddrinfo`: `/etc/hosts`, then DNS per `/etc/resolv.conf`).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let mut addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("{host}:{port} does not resolve: {e}"))?
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(format!("{host}:{port} resolves to no address"));
        }
        Ok(addrs)
    }
}

/// Reads and validates a config file, and checks the files it names (certificates, the
/// fleet's CA). No name is resolved: this is what `kanaria check`, start and reload run.
/// Every error is reported, those of the files beside those of validation.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let src = config::read_file(path)?;
    let found = check_files(&config::validate::named_files(&src, &name));
    let found = (!found.is_empty()).then(|| config::validate::locate(&src, &name, found));
    match (config::load_str(&src, &name), found) {
        (Ok(config), None) => Ok(config),
        (Ok(_), Some(errors)) => Err(errors),
        (Err(mut errors), found) => {
            errors.0.extend(found.into_iter().flat_map(|f| f.0));
            errors
                .0
                .sort_by_key(|e| e.position.map(|p| (p.line, p.col)));
            Err(errors)
        }
    }
}

/// The certificate pairs of `[proxy.tls]` and `fleet.ca`: each readable and valid now, or
/// an error naming its key. Read now, so a check, a start or a reload refuses what would
/// not serve.
pub fn check_files(named: &NamedFiles) -> Vec<(KeyPath, String)> {
    let mut found = Vec::new();
    let now = certs::unix_now();
    for (i, p) in named.certificates.iter().enumerate() {
        if let Err(e) = certs::load(p, now) {
            let key = if e.on_key { "key" } else { "cert" };
            let path = KeyPath::root()
                .key("proxy")
                .key("tls")
                .key("certificates")
                .index(i)
                .key(key);
            found.push((path, e.message));
        }
    }
    if let Some(ca) = &named.fleet_ca {
        if let Err(e) = certs::read_ca(ca) {
            found.push((KeyPath::root().key("fleet").key("ca"), e));
        }
    }
    found
}

/// Builds the snapshot to serve from `config` (generation 0, the file's weights). Pools
/// equal to one in `prev` are reused.
pub fn build(config: Arc<Config>, prev: Option<&Snapshot>, resolver: &dyn Resolve) -> Snapshot {
    let routes = config
        .routes
        .iter()
        .map(|r| {
            let before = prev.and_then(|p| p.routes.iter().find(|o| o.name == r.name));
            Arc::new(r.with_pools(|track, settings| {
                let old = before
                    .map(|b| b.pool(track))
                    .filter(|p| p.settings == *settings && p.health_settings == r.health);
                match old {
                    Some(p) => p.clone(),
                    None => Arc::new(pool(settings, r.health.as_ref(), resolver)),
                }
            }))
        })
        .collect::<Vec<Arc<Route>>>();
    Snapshot {
        generation: 0,
        headers: AddedHeaders::new(&config.proxy),
        config,
        routes,
    }
}

/// One pool: its names resolved (a name that does not resolve adds no endpoint and is
/// kept in `unresolved` with why), a load balancer over the addresses, its health check.
pub fn pool(
    settings: &PoolSettings,
    health: Option<&HealthSettings>,
    resolver: &dyn Resolve,
) -> Pool {
    let mut endpoints = Vec::new();
    let mut unresolved = Vec::new();
    for e in &settings.endpoints {
        match e {
            Endpoint::Addr(a) => endpoints.push(*a),
            Endpoint::Name { host, port } => match resolver.lookup(host, *port) {
                Ok(addrs) => endpoints.extend(addrs),
                Err(why) => unresolved.push((e.to_string(), why)),
            },
        }
    }
    pool_of(settings, health, endpoints, unresolved)
}

/// A pool over given addresses.
pub fn pool_of(
    settings: &PoolSettings,
    health: Option<&HealthSettings>,
    mut endpoints: Vec<SocketAddr>,
    unresolved: Vec<(String, String)>,
) -> Pool {
    endpoints.sort();
    endpoints.dedup();
    for (name, why) in &unresolved {
        log::warn!(
            "pool {:?}: endpoint {name} has no address ({why}); the pool serves without it",
            settings.version
        );
    }
    // Building from socket addresses cannot fail (only a bad address text could).
    let mut lb = LoadBalancer::try_from_iter(endpoints.iter().copied()).unwrap_or_else(|_| {
        LoadBalancer::from_backends(pingora::lb::Backends::new(
            pingora::lb::discovery::Static::new(Default::default()),
        ))
    });
    if let Some(h) = health {
        match health_check(h, settings.h2c) {
            Ok(hc) => lb.set_health_check(Box::new(hc)),
            Err(e) => log::error!("pool {:?}: health checks off: {e}", settings.version),
        }
    }
    Pool::new(
        settings.clone(),
        health.cloned(),
        endpoints,
        unresolved,
        Arc::new(lb),
    )
}

/// Pingora's HTTP health check for `[routes.health]`.
fn health_check(
    h: &HealthSettings,
    h2c: bool,
) -> pingora::Result<pingora::lb::health_check::HttpHealthCheck> {
    use pingora::lb::health_check::HttpHealthCheck;
    let mut hc = HttpHealthCheck::new("kanaria-health-check", false);
    hc.req = pingora::http::RequestHeader::build("GET", h.path.as_bytes(), None)?;
    hc.req.insert_header("Host", "kanaria-health-check")?;
    hc.req.insert_header("User-Agent", "kanaria-health-check")?;
    hc.consecutive_success = h.healthy_threshold;
    hc.consecutive_failure = h.unhealthy_threshold;
    hc.peer_template.options.connection_timeout = Some(h.timeout);
    hc.peer_template.options.read_timeout = Some(h.timeout);
    if h2c {
        hc.peer_template.options.set_http_version(2, 2);
    }
    let expected = h.expected_status;
    hc.validator = Some(Box::new(move |resp: &pingora::http::ResponseHeader| {
        if resp.status.as_u16() == expected {
            Ok(())
        } else {
            pingora::Error::e_explain(
                pingora::ErrorType::Custom("UnexpectedHealthStatus"),
                format!("status {} (expected {expected})", resp.status.as_u16()),
            )
        }
    }));
    Ok(hc)
}
