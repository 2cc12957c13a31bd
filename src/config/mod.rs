//! Configuration as settings: the TOML file, its validation, and the validated [`Config`].
//!
//! Two layers. [`file`](mod@file) holds serde structs that mirror the file (unknown keys denied,
//! defaults documented). [`validate`] checks them, collecting *every* error with its key
//! path, and returns a [`Config`]: plain data (parsed durations, addresses, header names,
//! endpoints as written), comparable with `==` so golden tests can pin a whole file. Nothing
//! here opens a socket, reads a certificate, resolves a name or holds a Pingora type: the
//! runtime layer builds the live snapshot (pools, load balancers, health checks, resolved
//! endpoints, certificates) from a `Config`, so `kanaria check` works offline.
//!
//! What only a restart can change is one struct, [`RestartSettings`]: a reload that changes
//! it is reported key by key ([`RestartSettings::changed_keys`]), never half applied.

pub mod errors;
pub mod file;
pub mod store_url;
pub mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use errors::ConfigErrors;

use crate::split::issued::IssuedCookie;
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

/// `[proxy]`, validated: what a reload can change (the listeners and the rest that only a
/// restart changes are in [`RestartSettings`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProxySettings {
    pub timeouts: Timeouts,
    /// `None` when `add_version_header = false`.
    pub version_header: Option<http::HeaderName>,
    pub request_id_header: http::HeaderName,
    /// `[proxy.tls]`: the certificates (re-read every `watch_interval`).
    pub tls: Option<TlsCertificates>,
    /// How often endpoints given by name are resolved again (`resolve_interval`), unless a
    /// pool sets its own.
    pub resolve_interval: Duration,
}

/// `[[proxy.tls.certificates]]`, paths resolved against the config file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[proxy.tls]`'s certificates, validated (read by the runtime layer, not here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCertificates {
    pub certificates: Vec<CertPaths>,
    pub watch_interval: Duration,
}

/// `[admin]`, validated (its listener is in [`RestartSettings`]).
#[derive(Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Bearer token for mutations; `None` disables them.
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("AdminSettings")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// `[edge]`, validated (the HTTP/2 limits are in [`RestartSettings`]).
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeSettings {
    pub header_timeout: Duration,
    /// Keep-alive idle timeout in whole seconds (Pingora's granularity), at least 1.
    pub idle_timeout_secs: u64,
    pub body_timeout: Duration,
    pub limits: HeaderLimits,
    pub max_connections: usize,
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// Pingora's own ceiling on a request header section; larger ones get its 400 (so
/// `edge.max_header_bytes` may not exceed it).
pub const PINGORA_MAX_HEADER_BYTES: usize = 1_048_575;
/// Pingora's own ceiling on the number of request headers; more get its 400.
pub const PINGORA_MAX_HEADERS: usize = 256;

/// Limits on one request header section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderLimits {
    /// Bytes of the whole header section, request line included.
    pub max_bytes: usize,
    /// Number of header fields.
    pub max_count: usize,
}

impl Default for HeaderLimits {
    fn default() -> Self {
        HeaderLimits {
            max_bytes: 64 * 1024,
            max_count: 100,
        }
    }
}

/// `[reload]`, validated (read once at start: restart-only).
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// With a shadow: the largest share of compared answers that may differ.
    pub max_diff_rate: Option<f64>,
    pub confidence: f64,
    pub failure_limit: u32,
    /// Bit `n` set: gRPC status `n` counts as an error (see [`grpc_code`]).
    pub grpc_error_codes: u32,
    /// What an answer's latency is measured to (`latency`).
    pub latency: LatencyTo,
    /// Media types (lowercase) whose answers are streams, judged by their head only
    /// (`stream_content_types`): an answer whose `Content-Type` is one of them, or one of
    /// them followed by `+` and a suffix (`application/grpc+proto`).
    pub stream_content_types: Vec<String>,
}

/// `[routes.analysis].latency`: what a request's latency runs to, for the analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyTo {
    /// The answer's last byte (its head for streams: upgrades and `stream_content_types`).
    Answer,
    /// The answer's head, for every answer of the route (long polls, downloads, streams).
    Head,
}

/// One rollout step, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Canary buckets (percent × 100); 0 for a shadow step.
    pub buckets: u32,
    pub hold: Duration,
    /// A shadow step (dark launch, no user on the canary): the share of stable's users
    /// mirrored meanwhile, in buckets; 0 for a weighted step.
    pub shadow: u32,
}

/// What to do when every stable endpoint is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StableDown {
    KeepStable,
    ServeCanary,
}

/// `[state]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateSettings {
    pub dir: std::path::PathBuf,
}

/// `[fleet]`, validated.
#[derive(Clone, PartialEq, Serialize)]
pub struct FleetSettings {
    /// The Redis URL as written (password included: never printed).
    pub url: String,
    pub cluster: String,
    pub instance: String,
    pub poll_interval: Duration,
    pub startup_timeout: Duration,
    /// How long a record of a version no replica serves stays in the store.
    pub record_ttl: Duration,
    /// `rediss://` or `rediss+sentinel://`: the PEM file of the authorities to trust
    /// (`None`: the system's store).
    pub ca: Option<PathBuf>,
    /// `redis+sentinel://`: the sentinels to ask for the primary (`None`: `url` is the
    /// primary itself). Derived from `url`, so not serialized twice.
    #[serde(skip)]
    pub sentinel: Option<store_url::SentinelUrl>,
    /// What a replica cut off from the store does.
    pub on_partition: PartitionPolicy,
    /// With [`PartitionPolicy::Stable`]: how long the store may not answer first.
    pub partition_timeout: Duration,
    /// How long a replica's file may disagree with the fleet's file decision before it is
    /// flagged.
    pub config_skew_warning: Duration,
}

/// `fleet.on_partition`: what a replica does while the fleet store does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionPolicy {
    /// Keep serving the last weight it knows (nothing advances; rollbacks still apply).
    Hold,
    /// After `fleet.partition_timeout`, every user to stable until the store answers: a
    /// canary never runs unsupervised for longer.
    Stable,
}

impl PartitionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionPolicy::Hold => "hold",
            PartitionPolicy::Stable => "stable",
        }
    }
}

impl FleetSettings {
    /// How long the store may not answer before this replica is cut off, in ms (`None`:
    /// `"hold"`, never).
    pub fn cut_off_after_ms(&self) -> Option<u64> {
        match self.on_partition {
            PartitionPolicy::Hold => None,
            PartitionPolicy::Stable => Some(self.partition_timeout.as_millis() as u64),
        }
    }
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
            .field("on_partition", &self.on_partition)
            .field("partition_timeout", &self.partition_timeout)
            .field("config_skew_warning", &self.config_skew_warning)
            .field(
                "tls",
                &(self.url.starts_with("rediss://") || self.url.starts_with("rediss+sentinel://")),
            )
            .field("sentinel", &self.sentinel)
            .finish()
    }
}

/// `[notify]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    /// `fleet.on_partition = "stable"`: this replica is cut off from the fleet store
    /// (weight 0 until it answers again).
    CutOff,
}

impl WeightSource {
    pub fn as_str(self) -> &'static str {
        match self {
            WeightSource::File => "file",
            WeightSource::Admin => "admin",
            WeightSource::Rollback => "rollback",
            WeightSource::Promote => "promote",
            WeightSource::Rollout => "rollout",
            WeightSource::CutOff => "cut_off",
        }
    }
}

/// An upstream endpoint as written: an address, or a name the runtime resolves (again
/// every `resolve_interval`, all the addresses it returns).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Addr(a) => write!(f, "{a}"),
            Endpoint::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// `[routes.stable]` or `[routes.canary]`, validated: one release's endpoints as written.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    /// The release label, e.g. `v2`.
    pub version: String,
    /// Sorted, without duplicates.
    pub endpoints: Vec<Endpoint>,
    /// Speak HTTP/2 with prior knowledge to the endpoints.
    pub h2c: bool,
    /// How often the names among `endpoints` are resolved again.
    pub resolve_interval: Duration,
}

/// What a route's pools have in common, whether settings or built: the release label.
pub trait Release {
    fn release(&self) -> &str;
}

impl Release for PoolSettings {
    fn release(&self) -> &str {
        &self.version
    }
}

impl<T: Release + ?Sized> Release for Arc<T> {
    fn release(&self) -> &str {
        (**self).release()
    }
}

/// One route, validated. `P` is how its pools are held: [`PoolSettings`] here, the built
/// pools in the runtime snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Route<P = PoolSettings> {
    pub name: String,
    pub hosts: Vec<String>,
    pub path_prefix: String,
    pub split: SplitRule,
    /// Set when `sticky_by` has `issued_cookie:NAME`.
    pub issued_cookie: Option<IssuedCookie>,
    pub timeouts: Timeouts,
    pub stable: P,
    pub canary: Option<P>,
    /// Who set `split.canary_buckets`.
    pub weight_source: WeightSource,
    /// `canary_weight` as written in the file, in buckets.
    pub file_buckets: u32,
    pub retry_on_stable: bool,
    /// How long a replayable canary attempt waits for its answer's head before it goes
    /// to stable (`canary_timeout`, resolved with its default).
    pub canary_timeout: Duration,
    /// At a rollback, upgraded canary connections are closed within this span
    /// (`rollback_drain`).
    pub rollback_drain: Duration,
    /// A lowered canary weight ends the streams of the users it moves to stable
    /// (`drain_on_weight_change`).
    pub drain_on_weight_change: bool,
    pub stable_down: StableDown,
    pub health: Option<HealthSettings>,
    pub analysis: AnalysisRules,
    /// Empty: no progressive rollout.
    pub steps: Vec<Step>,
    /// The dark launch (`[routes.shadow]`).
    pub shadow: Option<ShadowSettings>,
}

/// `[routes.shadow]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowSettings {
    /// Users whose bucket is below this are mirrored (of `split::BUCKETS`).
    pub share_buckets: u32,
    pub methods: Vec<http::Method>,
    pub amplify: u32,
    pub max_in_flight: usize,
    pub queue: usize,
    pub marker: http::HeaderName,
    pub body_limit: usize,
    pub compare_headers: Vec<http::HeaderName>,
    /// Mirrored requests whose id hashes below this (of `split::BUCKETS`) are also sent to
    /// stable again.
    pub noise_buckets: u32,
    /// Empty: the canary pool. Names are looked up when a copy connects (by the shadow's
    /// HTTP client), not by the pools' resolver.
    pub endpoints: Vec<Endpoint>,
    pub h2c: bool,
    pub timeout: Duration,
}

impl<P> Route<P> {
    /// The pool serving `v`. A route without a canary pool serves everything from stable.
    pub fn pool(&self, v: Track) -> &P {
        match (v, &self.canary) {
            (Track::Canary, Some(c)) => c,
            _ => &self.stable,
        }
    }

    /// The same route with its pools mapped (settings to built pools).
    pub fn with_pools<Q>(&self, mut f: impl FnMut(Track, &P) -> Q) -> Route<Q> {
        Route {
            name: self.name.clone(),
            hosts: self.hosts.clone(),
            path_prefix: self.path_prefix.clone(),
            split: self.split.clone(),
            issued_cookie: self.issued_cookie.clone(),
            timeouts: self.timeouts,
            stable: f(Track::Stable, &self.stable),
            canary: self.canary.as_ref().map(|c| f(Track::Canary, c)),
            weight_source: self.weight_source,
            file_buckets: self.file_buckets,
            retry_on_stable: self.retry_on_stable,
            canary_timeout: self.canary_timeout,
            rollback_drain: self.rollback_drain,
            drain_on_weight_change: self.drain_on_weight_change,
            stable_down: self.stable_down,
            health: self.health.clone(),
            analysis: self.analysis.clone(),
            steps: self.steps.clone(),
            shadow: self.shadow.clone(),
        }
    }
}

impl<P: Release> Route<P> {
    /// (stable label, canary label) for override matching.
    pub fn labels(&self) -> (&str, Option<&str>) {
        (
            self.stable.release(),
            self.canary.as_ref().map(|c| c.release()),
        )
    }
}

/// What only a restart changes, each field named by its key in the file. A reload that
/// changes one keeps the running value and reports the key ([`Self::changed_keys`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestartSettings {
    #[serde(rename = "proxy.listen")]
    pub listen: Vec<SocketAddr>,
    /// Worker threads; `None`: one per CPU.
    #[serde(rename = "proxy.threads")]
    pub threads: Option<usize>,
    #[serde(rename = "proxy.upgrade_sock")]
    pub upgrade_sock: String,
    /// h2c (HTTP/2 prior knowledge) on the plain listeners.
    #[serde(rename = "proxy.h2c")]
    pub h2c: bool,
    #[serde(rename = "proxy.shutdown_grace")]
    pub shutdown_grace: Duration,
    /// `[proxy.tls] listen` (empty without `[proxy.tls]`).
    #[serde(rename = "proxy.tls.listen")]
    pub tls_listen: Vec<SocketAddr>,
    /// Offer HTTP/2 through ALPN on the TLS listeners.
    #[serde(rename = "proxy.tls.http2")]
    pub tls_http2: bool,
    #[serde(rename = "edge.h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u32,
    #[serde(rename = "edge.h2_max_header_list_size")]
    pub h2_max_header_list_size: u32,
    #[serde(rename = "admin.listen")]
    pub admin_listen: SocketAddr,
    pub log: LogSettings,
    pub state: Option<StateSettings>,
    pub notify: Option<NotifySettings>,
    pub fleet: Option<FleetSettings>,
    /// The file watcher is set up once, at start.
    pub reload: ReloadSettings,
    /// `[resolver]` (`None`: the system's resolver).
    pub resolver: Option<ResolverSettings>,
}

/// `[resolver]`, validated: the nameservers endpoint names are asked of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolverSettings {
    /// In the order written, without duplicates.
    pub nameservers: Vec<SocketAddr>,
    /// The longest one lookup of a name may take.
    pub timeout: Duration,
}

impl RestartSettings {
    /// The keys whose values differ between `self` (running) and `new`, sorted:
    /// derived from the struct itself, so a new restart-only field is reported without a
    /// list to keep.
    pub fn changed_keys(&self, new: &RestartSettings) -> Vec<String> {
        let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
            (serde_json::to_value(self), serde_json::to_value(new))
        else {
            return Vec::new();
        };
        a.iter()
            .filter(|(k, v)| b.get(k.as_str()) != Some(v))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// Where the access log's lines go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum LogTarget {
    Off,
    Stdout,
    /// Absolute, or resolved against the config file's directory.
    File(PathBuf),
}

/// The access log's line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogFormat {
    Json,
    Combined,
}

/// `[log]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogSettings {
    pub access: LogTarget,
    pub format: LogFormat,
    /// Lines that may wait for the writer before new ones are dropped.
    pub queue: usize,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            access: LogTarget::Off,
            format: LogFormat::Json,
            queue: 16_384,
        }
    }
}

/// gRPC status code names (`grpc/status.proto`) and their numbers.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The number of a gRPC status code name (case-insensitive); `OK` is not an error code.
pub fn grpc_code(name: &str) -> Option<u32> {
    GRPC_CODES
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name.trim()))
        .filter(|&n| n > 0)
        .map(|n| n as u32)
}

/// The whole validated config: plain data, replaced whole on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub restart: RestartSettings,
    pub proxy: ProxySettings,
    pub admin: AdminSettings,
    pub edge: EdgeSettings,
    pub routes: Vec<Arc<Route>>,
    pub router: Router,
}

/// Parse and validate config text. `file` is the name used in error messages; relative
/// paths in it are resolved against `file`'s directory.
pub fn load_str(src: &str, file: &str) -> Result<Config, ConfigErrors> {
    validate::validate_str(src, file)
}

/// Read, parse and validate a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let src = read_file(path)?;
    load_str(&src, &name)
}

/// The text of a config file, or the error that names it.
pub fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::whole_file(
            &path.display().to_string(),
            format!("cannot read config: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_by_name() {
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_code("internal"), Some(13));
        assert_eq!(grpc_code("OK"), None);
        assert_eq!(grpc_code("NOPE"), None);
    }

    /// Every field of `RestartSettings` is reported by its key when it changes: the list
    /// follows from the struct.
    #[test]
    fn restart_keys_follow_from_the_struct() {
        let text = "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n";
        let a = load_str(text, "a.toml").unwrap().restart;
        let mut b = a.clone();
        assert!(a.changed_keys(&b).is_empty());
        b.threads = Some(3);
        b.tls_listen = vec!["127.0.0.1:8443".parse().unwrap()];
        b.admin_listen = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            a.changed_keys(&b),
            ["admin.listen", "proxy.threads", "proxy.tls.listen"]
        );
    }

    const ROUTE: &str = "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"app.test:8080\"]\n";

    /// `[resolver]`: an IP gets port 53, an IP:PORT keeps its own, IPv6 works; without the
    /// section the system's resolver is used. Nothing is asked of any nameserver here.
    #[test]
    fn resolver_nameservers_are_parsed() {
        let text = format!(
            "[resolver]\nnameservers = [\"10.0.0.2\", \"127.0.0.1:5353\", \"[::1]:53\"]\ntimeout = \"500ms\"\n{ROUTE}"
        );
        let r = load_str(&text, "a.toml").unwrap().restart.resolver.unwrap();
        assert_eq!(
            r.nameservers,
            [
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
            ]
        );
        assert_eq!(r.timeout, Duration::from_millis(500));
        let defaults = format!("[resolver]\nnameservers = [\"10.0.0.2\"]\n{ROUTE}");
        let r = load_str(&defaults, "a.toml")
            .unwrap()
            .restart
            .resolver
            .unwrap();
        assert_eq!(r.timeout, Duration::from_secs(2));
        assert_eq!(load_str(ROUTE, "a.toml").unwrap().restart.resolver, None);
    }

    /// Every bad `[resolver]` key is reported, each by its key path.
    #[test]
    fn resolver_errors_name_their_keys() {
        let text = format!(
            "[resolver]\nnameservers = [\"10.0.0.2\", \"dns.example:53\", \"10.0.0.2:53\", \"1.2.3.4:0\"]\ntimeout = \"soon\"\n{ROUTE}"
        );
        let errors = load_str(&text, "a.toml").unwrap_err().to_string();
        for key in [
            "resolver.nameservers[1]: \"dns.example:53\" is not an IP or IP:PORT",
            "resolver.nameservers[2]: 10.0.0.2:53 is listed twice",
            "resolver.nameservers[3]: \"1.2.3.4:0\": port 0",
            "resolver.timeout: \"soon\" is not a duration",
        ] {
            assert!(errors.contains(key), "{key:?} not in:\n{errors}");
        }
        let empty = format!("[resolver]\nnameservers = []\n{ROUTE}");
        let errors = load_str(&empty, "a.toml").unwrap_err().to_string();
        assert!(
            errors.contains("resolver.nameservers: at least one nameserver"),
            "{errors}"
        );
        let unknown = format!("[resolver]\nnameservers = [\"10.0.0.2\"]\nport = 53\n{ROUTE}");
        let errors = load_str(&unknown, "a.toml").unwrap_err().to_string();
        assert!(errors.contains("unknown field `port`"), "{errors}");
    }

    /// `resolve_interval`: `[proxy]`'s default, a pool's own, and a bad one named by its key.
    #[test]
    fn resolve_intervals() {
        let c = load_str(ROUTE, "a.toml").unwrap();
        assert_eq!(c.routes[0].stable.resolve_interval, Duration::from_secs(10));
        let text = format!(
            "[proxy]\nresolve_interval = \"3s\"\n{ROUTE}[routes.canary]\nversion = \"v2\"\nendpoints = [\"app.test:8081\"]\nresolve_interval = \"200ms\"\n"
        );
        let c = load_str(&text, "a.toml").unwrap();
        assert_eq!(c.routes[0].stable.resolve_interval, Duration::from_secs(3));
        let canary = c.routes[0].canary.as_ref().unwrap();
        assert_eq!(canary.resolve_interval, Duration::from_millis(200));
        let bad = format!("{ROUTE}resolve_interval = \"0s\"\n");
        let errors = load_str(&bad, "a.toml").unwrap_err().to_string();
        assert!(
            errors
                .contains("routes[app].stable.resolve_interval: \"0s\" must be greater than zero"),
            "{errors}"
        );
    }

    /// The resolver is read at start: a reload that changes it is reported by its key.
    #[test]
    fn the_resolver_needs_a_restart() {
        let a = load_str(ROUTE, "a.toml").unwrap().restart;
        let text = format!("[resolver]\nnameservers = [\"10.0.0.2\"]\n{ROUTE}");
        let b = load_str(&text, "a.toml").unwrap().restart;
        assert_eq!(a.changed_keys(&b), ["resolver"]);
    }
}
