//! Configuration: the TOML file, its validation, and the immutable runtime [`Snapshot`].
//!
//! Two layers. [`file`] holds serde structs that mirror the file (unknown keys denied,
//! defaults documented). [`compile`] validates them, collecting *every* error with its key
//! path, and builds a [`Snapshot`]: routes, router, pools with their load balancers, parsed
//! durations. A snapshot never changes; a reload builds a new one and publishes it whole.

pub mod compile;
pub mod errors;
pub mod file;
pub mod reload;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, LoadBalancer};

pub use errors::ConfigErrors;

use crate::split::router::Router;
use crate::split::{SplitRule, Track};

/// Upstream timeouts of one route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    pub idle: Duration,
}

/// A header Kanaria adds to messages: its name for lookups, and the name Pingora inserts,
/// parsed once with its wire case (the vendored Pingora's `PreparedHeaderName`: an insert
/// then neither parses the name nor allocates; see vendor/patches/0001).
#[derive(Debug, Clone)]
pub struct AddedHeader {
    pub name: http::HeaderName,
    pub prepared: pingora::http::PreparedHeaderName,
}

impl AddedHeader {
    pub fn new(name: http::HeaderName) -> Self {
        // The case Pingora would give the name per call (title case for the names it
        // knows, as written otherwise).
        let prepared = pingora::http::PreparedHeaderName::new(name.clone());
        AddedHeader { name, prepared }
    }
}

/// `[proxy]`, validated.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: Vec<SocketAddr>,
    pub threads: Option<usize>,
    pub timeouts: Timeouts,
    /// `None` when `add_version_header = false`.
    pub version_header: Option<AddedHeader>,
    pub request_id_header: AddedHeader,
    pub shutdown_grace: Duration,
    pub upgrade_sock: String,
    /// h2c (HTTP/2 prior knowledge) on the plain listeners.
    pub h2c: bool,
    pub tls: Option<crate::proxy::tls::TlsSettings>,
}

/// `[admin]`, validated.
#[derive(Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// Bearer token for mutations; `None` disables them.
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("AdminSettings")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// `[edge]`, validated.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    pub header_timeout: Duration,
    /// Keep-alive idle timeout in whole seconds (Pingora's granularity), at least 1.
    pub idle_timeout_secs: u64,
    pub body_timeout: Duration,
    pub limits: crate::proxy::edge::HeaderLimits,
    pub max_connections: usize,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_size: u32,
}

/// `[reload]`, validated.
#[derive(Debug, Clone)]
pub struct ReloadSettings {
    pub watch: bool,
    pub debounce: Duration,
}

/// `[routes.health]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSettings {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: usize,
    pub unhealthy_threshold: usize,
    pub expected_status: u16,
}

/// `[routes.analysis]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisRules {
    pub enabled: bool,
    pub interval: Duration,
    pub window: Duration,
    pub min_requests: u64,
    pub max_error_rate: Option<f64>,
    pub max_p99_latency: Option<Duration>,
    pub max_error_rate_ratio: Option<f64>,
    pub max_p99_latency_ratio: Option<f64>,
    pub confidence: f64,
    pub failure_limit: u32,
    /// Bit `n` set: gRPC status `n` counts as an error (see [`crate::proxy::h2`]).
    pub grpc_error_codes: u32,
}

/// One rollout step, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Canary buckets (percent × 100).
    pub buckets: u32,
    pub hold: Duration,
}

/// What to do when every stable endpoint is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StableDown {
    KeepStable,
    ServeCanary,
}

/// `[state]`, validated.
#[derive(Debug, Clone)]
pub struct StateSettings {
    pub dir: std::path::PathBuf,
}

/// `[fleet]`, validated.
#[derive(Clone)]
pub struct FleetSettings {
    /// The Redis URL as written (password included: never printed).
    pub url: String,
    pub cluster: String,
    pub instance: String,
    pub poll_interval: Duration,
    pub startup_timeout: Duration,
    /// How long a record of a version no replica serves stays in the store.
    pub record_ttl: Duration,
    /// `rediss://`: the PEM of the authorities to trust (`None`: the system's store).
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for FleetSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("FleetSettings")
            .field("cluster", &self.cluster)
            .field("instance", &self.instance)
            .field("poll_interval", &self.poll_interval)
            .field("startup_timeout", &self.startup_timeout)
            .field("record_ttl", &self.record_ttl)
            .field("tls", &self.url.starts_with("rediss://"))
            .finish()
    }
}

/// `[notify]`, validated.
#[derive(Debug, Clone)]
pub struct NotifySettings {
    /// The `http://` URL events are POSTed to.
    pub url: String,
    pub timeout: Duration,
}

/// Who set a route's effective canary weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightSource {
    /// `canary_weight` in the config file.
    File,
    /// `POST /api/v1/routes/{route}/weight`.
    Admin,
    /// An operator's rollback (weight 0).
    Rollback,
    /// An operator's promote (weight 100).
    Promote,
    /// The current step of `[routes.rollout]`.
    Rollout,
}

impl WeightSource {
    pub fn as_str(self) -> &'static str {
        match self {
            WeightSource::File => "file",
            WeightSource::Admin => "admin",
            WeightSource::Rollback => "rollback",
            WeightSource::Promote => "promote",
            WeightSource::Rollout => "rollout",
        }
    }
}

/// One version's endpoints, with the load balancer that health-checks them.
pub struct Pool {
    /// The release label, e.g. `v2`.
    pub version: String,
    pub endpoints: Vec<SocketAddr>,
    pub lb: Arc<LoadBalancer<RoundRobin>>,
    /// Speak HTTP/2 with prior knowledge to the endpoints.
    pub h2c: bool,
    /// The load balancer's backends (in its order), each with whether it was ready (healthy
    /// and enabled) after the last health check round: what the request path picks from.
    picks: Box<[(Backend, AtomicBool)]>,
    /// Round-robin position.
    next: AtomicUsize,
}

impl Pool {
    pub fn new(
        version: String,
        endpoints: Vec<SocketAddr>,
        lb: Arc<LoadBalancer<RoundRobin>>,
        h2c: bool,
    ) -> Self {
        let backends = lb.backends();
        let picks = backends
            .get_backend()
            .iter()
            .map(|b| (b.clone(), AtomicBool::new(backends.ready(b))))
            .collect();
        Pool {
            version,
            endpoints,
            lb,
            h2c,
            picks,
            next: AtomicUsize::new(0),
        }
    }

    /// Copies the load balancer's readiness into the request path's flags. Readiness
    /// changes only in a health check round, so the controller calls this after each.
    pub fn refresh_ready(&self) {
        let backends = self.lb.backends();
        for (b, ready) in self.picks.iter() {
            ready.store(backends.ready(b), Ordering::Relaxed);
        }
    }

    /// The next ready endpoint, round robin, as `LoadBalancer::select` picks it; `None`
    /// when none is ready. One atomic add and a scan of flags: Pingora's `select` builds a
    /// hash set and hashes every candidate on each call.
    pub fn select(&self) -> Option<&Backend> {
        let n = self.picks.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &self.picks[start.wrapping_add(k) % n])
            .find(|(_, ready)| ready.load(Ordering::Relaxed))
            .map(|(b, _)| b)
    }

    /// Each endpoint with whether it is in rotation (healthy per the health checks).
    pub fn health(&self) -> Vec<(SocketAddr, bool)> {
        let backends = self.lb.backends();
        let set = backends.get_backend();
        self.endpoints
            .iter()
            .map(|e| {
                let healthy = set
                    .iter()
                    .find(|b| b.addr.as_inet() == Some(e))
                    .is_some_and(|b| backends.ready(b));
                (*e, healthy)
            })
            .collect()
    }

    pub fn healthy_count(&self) -> usize {
        self.health().iter().filter(|(_, h)| *h).count()
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("version", &self.version)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

/// One route, validated.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub hosts: Vec<String>,
    pub path_prefix: String,
    pub split: SplitRule,
    /// Set when `sticky_by` has `issued_cookie:NAME`.
    pub issued_cookie: Option<crate::split::issued::IssuedCookie>,
    pub timeouts: Timeouts,
    pub stable: Arc<Pool>,
    pub canary: Option<Arc<Pool>>,
    /// Who set `split.canary_buckets`.
    pub weight_source: WeightSource,
    /// `canary_weight` as written in the file, in buckets.
    pub file_buckets: u32,
    pub retry_on_stable: bool,
    /// How long a replayable canary attempt waits for its answer's head before it goes
    /// to stable (`canary_timeout`, resolved with its default).
    pub canary_timeout: Duration,
    pub stable_down: StableDown,
    pub health: Option<HealthSettings>,
    pub analysis: AnalysisRules,
    /// Empty: no progressive rollout.
    pub steps: Vec<Step>,
}

impl Route {
    /// The pool serving `v`. A route without a canary pool serves everything from stable.
    pub fn pool(&self, v: Track) -> &Arc<Pool> {
        match (v, &self.canary) {
            (Track::Canary, Some(c)) => c,
            _ => &self.stable,
        }
    }

    /// (stable label, canary label) for override matching.
    pub fn labels(&self) -> (&str, Option<&str>) {
        (
            self.stable.version.as_str(),
            self.canary.as_deref().map(|c| c.version.as_str()),
        )
    }
}

/// The whole validated config. Immutable; shared by `Arc`, replaced whole on reload.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// 0 until published; then 1, 2, ... per publication.
    pub generation: u64,
    pub proxy: ProxySettings,
    pub admin: AdminSettings,
    pub reload: ReloadSettings,
    pub state: Option<StateSettings>,
    pub notify: Option<NotifySettings>,
    pub fleet: Option<FleetSettings>,
    pub edge: EdgeSettings,
    /// `[log]` (read at start only).
    pub log: crate::proxy::access_log::LogSettings,
    pub routes: Vec<Arc<Route>>,
    pub router: Router,
}

/// Parse and validate config text. `file` is the name used in error messages.
pub fn load_str(src: &str, file: &str) -> Result<Snapshot, ConfigErrors> {
    compile::compile_str(src, file)
}

/// Read, parse and validate a config file.
pub fn load_file(path: &Path) -> Result<Snapshot, ConfigErrors> {
    let name = path.display().to_string();
    let src = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::whole_file(&name, format!("cannot read config: {e}")))?;
    load_str(&src, &name)
}
