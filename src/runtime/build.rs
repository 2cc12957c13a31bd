//! Settings to runtime: the files a config names are checked ([`check_files`], no network
//! I/O, so `kanaria check` works offline), and a validated [`Config`] is built into a
//! [`Snapshot`] ([`build`]): each pool's names answered from [`Names`] (looked up there
//! when new), its load balancer and health check created. A pool whose settings did not
//! change keeps the one built before (and so the health its endpoints earned), or, when its
//! names' answers changed since, a pool over the new addresses that shares its health
//! ([`reresolved`]).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use futures::FutureExt;
use pingora::lb::{discovery, Backend, Backends, HealthRegistry, LoadBalancer};

use super::certs;
use super::pool::Pool;
use super::resolve::{NameEntry, Names};
use super::{AddedHeaders, Route, Snapshot};
use crate::config::errors::KeyPath;
use crate::config::validate::NamedFiles;
use crate::config::{self, Config, ConfigErrors, Endpoint, HealthSettings, PoolSettings};

pub use super::resolve::{Resolve, SystemResolver};

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
/// equal to one in `prev` are reused (over their names' current answers); names never
/// looked up are looked up now (blocking), stamped `now_ms`.
pub fn build(config: Arc<Config>, prev: Option<&Snapshot>, names: &Names, now_ms: u64) -> Snapshot {
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
                    Some(p) => reresolved(p).map_or_else(|| p.clone(), Arc::new),
                    None => Arc::new(pool(settings, r.health.as_ref(), names, now_ms)),
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

/// A new pool: its names' entries (each looked up now if it never was), a health registry
/// with `[routes.health]`'s check, a load balancer over the addresses.
pub fn pool(
    settings: &PoolSettings,
    health: Option<&HealthSettings>,
    names: &Names,
    now_ms: u64,
) -> Pool {
    let entries = settings
        .endpoints
        .iter()
        .filter_map(|e| match e {
            Endpoint::Addr(_) => None,
            Endpoint::Name { host, port } => Some(names.entry(host, *port, now_ms)),
        })
        .collect();
    let registry = Arc::new(HealthRegistry::new());
    if let Some(h) = health {
        match health_check(h, settings.h2c) {
            Ok(hc) => registry.set_health_check(Box::new(hc)),
            Err(e) => log::error!("pool {:?}: health checks off: {e}", settings.version),
        }
    }
    view(settings, health, entries, registry)
}

/// `p` over its names' current answers, when they differ from the addresses it serves:
/// a new pool whose load balancer is another view of `p`'s health registry, so the
/// endpoints that stay keep their health (new ones are in rotation until their probes say
/// otherwise, as in a new config). `None`: `p` is current.
pub fn reresolved(p: &Pool) -> Option<Pool> {
    let (endpoints, _) = addresses(&p.settings, &p.names);
    if endpoints == p.endpoints {
        return None;
    }
    Some(view(
        &p.settings,
        p.health_settings.as_ref(),
        p.names.clone(),
        p.registry.clone(),
    ))
}

/// The addresses a pool serves (its IP endpoints and its names' last good answers, sorted)
/// and the names without any address, with why.
fn addresses(
    settings: &PoolSettings,
    entries: &[Arc<NameEntry>],
) -> (Vec<SocketAddr>, Vec<(String, String)>) {
    let mut endpoints: Vec<SocketAddr> = settings
        .endpoints
        .iter()
        .filter_map(|e| match e {
            Endpoint::Addr(a) => Some(*a),
            Endpoint::Name { .. } => None,
        })
        .collect();
    let mut unresolved = Vec::new();
    for entry in entries {
        let state = entry.state();
        if state.addrs.is_empty() {
            let why = state
                .last_error
                .unwrap_or_else(|| "not looked up yet".to_string());
            unresolved.push((entry.name(), why));
        }
        endpoints.extend(state.addrs);
    }
    endpoints.sort();
    endpoints.dedup();
    (endpoints, unresolved)
}

/// A pool over its names' current answers, its load balancer a view of `registry`.
fn view(
    settings: &PoolSettings,
    health: Option<&HealthSettings>,
    entries: Vec<Arc<NameEntry>>,
    registry: Arc<HealthRegistry>,
) -> Pool {
    let (endpoints, unresolved) = addresses(settings, &entries);
    for (name, why) in &unresolved {
        log::warn!(
            "pool {:?}: endpoint {name} has no address ({why}); the pool serves without it",
            settings.version
        );
    }
    let backends: BTreeSet<Backend> = endpoints
        .iter()
        .map(|a| Backend {
            addr: pingora::protocols::l4::socket::SocketAddr::Inet(*a),
            weight: 1,
            ext: http::Extensions::new(),
        })
        .collect();
    let lb = LoadBalancer::from_backends(Backends::new_with_health_registry(
        Box::new(Given(std::sync::Mutex::new(Some(backends)))),
        registry.clone(),
    ));
    // The given set answers at once: the update completes on its first poll (as a static
    // discovery does in Pingora's own `LoadBalancer::try_from_iter`).
    match lb.update().now_or_never() {
        Some(Ok(())) => {}
        Some(Err(e)) => log::error!("pool {:?}: {e}", settings.version),
        None => log::error!(
            "pool {:?}: its load balancer did not take the endpoints",
            settings.version
        ),
    }
    Pool::new(
        settings.clone(),
        health.cloned(),
        endpoints,
        unresolved,
        entries,
        registry,
        Arc::new(lb),
    )
}

/// The endpoints of a pool, handed to its load balancer once. Pingora's
/// `discovery::Static` keeps its own copy of the set for later updates, beside the copy the
/// load balancer keeps: a pool is never updated again (new addresses make a new pool), so
/// that copy was a B-tree leaf of 11 backends (1.5 KB) per pool for nothing. A second
/// `discover` is refused, which Pingora's update answers by keeping the backends it has.
struct Given(std::sync::Mutex<Option<BTreeSet<Backend>>>);

#[async_trait::async_trait]
impl discovery::ServiceDiscovery for Given {
    async fn discover(
        &self,
    ) -> pingora::Result<(BTreeSet<Backend>, std::collections::HashMap<u64, bool>)> {
        let given = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        match given {
            Some(set) => Ok((set, std::collections::HashMap::new())),
            None => pingora::Error::e_explain(
                pingora::ErrorType::InternalError,
                "a pool's endpoints are given once",
            ),
        }
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A resolver whose answer the test sets, counting its lookups.
    #[derive(Default)]
    struct Fake {
        answer: Mutex<Option<Result<Vec<SocketAddr>, String>>>,
        lookups: Mutex<u32>,
    }

    impl Resolve for Arc<Fake> {
        fn lookup(&self, _: &str, _: u16) -> Result<Vec<SocketAddr>, String> {
            *self.lookups.lock().unwrap() += 1;
            self.answer
                .lock()
                .unwrap()
                .clone()
                .unwrap_or(Err("unset".into()))
        }
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn config() -> Arc<Config> {
        let text = "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"app.test:1\", \"127.0.0.9:1\"]\n";
        Arc::new(config::load_str(text, "t.toml").unwrap())
    }

    /// A new answer makes a new pool sharing the health registry; a reload (a build from
    /// the last snapshot) serves the current answer without asking again; a failed lookup
    /// keeps the addresses.
    #[test]
    fn pools_follow_their_names_answers() {
        let fake = Arc::new(Fake::default());
        *fake.answer.lock().unwrap() = Some(Ok(vec![a("127.0.0.2:1")]));
        let names = Names::new(Box::new(fake.clone()));
        let first = build(config(), None, &names, 1);
        let pool = first.routes[0].stable.clone();
        assert_eq!(pool.endpoints, [a("127.0.0.2:1"), a("127.0.0.9:1")]);
        assert!(reresolved(&pool).is_none(), "nothing changed");

        *fake.answer.lock().unwrap() = Some(Ok(vec![a("127.0.0.2:1"), a("127.0.0.3:1")]));
        assert!(names.look_up(&pool.names[0], 2).changed);
        let next = reresolved(&pool).expect("a pool over the new answer");
        assert_eq!(
            next.endpoints,
            [a("127.0.0.2:1"), a("127.0.0.3:1"), a("127.0.0.9:1")]
        );
        assert!(Arc::ptr_eq(&next.registry, &pool.registry));
        assert_eq!(next.lb.backends().get_backend().len(), 3);

        // A reload from the snapshot that still had the old pool: the current addresses,
        // no new lookup.
        let lookups = *fake.lookups.lock().unwrap();
        let reloaded = build(config(), Some(&first), &names, 3);
        assert_eq!(reloaded.routes[0].stable.endpoints, next.endpoints);
        assert_eq!(*fake.lookups.lock().unwrap(), lookups);

        *fake.answer.lock().unwrap() = Some(Err("SERVFAIL".into()));
        assert!(!names.look_up(&pool.names[0], 4).changed);
        assert!(reresolved(&reloaded.routes[0].stable).is_none());
        assert!(reloaded.routes[0].stable.unresolved_reason().is_none());
    }

    /// A name that never resolved: the pool has only its other endpoints, or none, and
    /// says why.
    #[test]
    fn a_pool_of_names_that_never_resolved_is_empty_and_says_why() {
        let fake = Arc::new(Fake::default());
        *fake.answer.lock().unwrap() = Some(Err("NXDOMAIN".into()));
        let names = Names::new(Box::new(fake));
        let text = "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"ghost.test:1\"]\n";
        let snap = build(
            Arc::new(config::load_str(text, "t.toml").unwrap()),
            None,
            &names,
            1,
        );
        let pool = &snap.routes[0].stable;
        assert!(pool.endpoints.is_empty() && pool.select().is_none());
        assert_eq!(
            pool.unresolved_reason().as_deref(),
            Some("no endpoint: ghost.test:1: NXDOMAIN")
        );
    }

    /// Pingora's shared health registry: an endpoint that failed its probe is still out of
    /// rotation in the pool that follows a new answer; the new endpoint starts in rotation.
    #[tokio::test]
    async fn an_endpoint_that_stays_keeps_its_health() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let fake = Arc::new(Fake::default());
        *fake.answer.lock().unwrap() = Some(Ok(vec![dead]));
        let names = Names::new(Box::new(fake.clone()));
        let text = format!(
            "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"app.test:{}\"]\n[routes.health]\nunhealthy_threshold = 1\ntimeout = \"500ms\"\n",
            dead.port()
        );
        let snap = build(
            Arc::new(config::load_str(&text, "t.toml").unwrap()),
            None,
            &names,
            1,
        );
        let pool = snap.routes[0].stable.clone();
        pool.lb.backends().run_health_check(false).await;
        pool.refresh_ready();
        assert_eq!(pool.health(), [(dead, false)]);
        let other = SocketAddr::new("127.0.0.2".parse().unwrap(), dead.port());
        *fake.answer.lock().unwrap() = Some(Ok(vec![dead, other]));
        names.look_up(&pool.names[0], 2);
        let next = reresolved(&pool).unwrap();
        assert_eq!(next.health(), [(dead, false), (other, true)]);
        assert_eq!(
            next.select().map(|b| b.addr.as_inet().copied()),
            Some(Some(other))
        );
    }
}
