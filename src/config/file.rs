//! The config file as written: serde structs that mirror the TOML one to one.
//!
//! Nothing here is validated beyond its TOML type; [`validate`](super::validate) turns these
//! into a [`Config`](super::Config). Every struct denies unknown keys, and every default is
//! stated here, next to the key, so the README's config reference can be checked against it.

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listener and upstream defaults. Optional: every key has a default.
    #[serde(default)]
    pub proxy: ProxyFile,
    /// The admin listener (status, metrics, mutations).
    #[serde(default)]
    pub admin: AdminFile,
    /// Hot reload of this file.
    #[serde(default)]
    pub reload: ReloadFile,
    /// Where rollout state is persisted. Optional: without it, state lives in memory only.
    pub state: Option<StateFile>,
    /// Where rollout events are sent. Optional.
    pub notify: Option<NotifyFile>,
    /// Shared rollout state and analysis of a fleet of replicas. Optional: without it,
    /// this process decides alone (single node).
    pub fleet: Option<FleetFile>,
    /// Client-facing deadlines and limits.
    #[serde(default)]
    pub edge: EdgeFile,
    /// The access log. Optional: off by default.
    #[serde(default)]
    pub log: LogFile,
    /// The nameservers endpoint names are asked of. Optional: without it, the system's
    /// resolver (`/etc/hosts`, then the nameservers of `/etc/resolv.conf`).
    pub resolver: Option<ResolverFile>,
    /// At least one route is required (checked in `compile`, so the message names the key).
    #[serde(default)]
    pub routes: Vec<RouteFile>,
}

/// One string or a list of strings: `listen = "0.0.0.0:8080"` or `listen = ["a", "b"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// `[proxy]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyFile {
    /// Default `"0.0.0.0:8080"`. Needs a restart to change.
    pub listen: OneOrMany,
    /// Worker threads of the proxy service. Default: the number of CPUs. Needs a restart.
    pub threads: Option<usize>,
    /// Upstream TCP connect timeout. Default `"2s"`.
    pub connect_timeout: String,
    /// Upstream read timeout (time to wait for each read of the response). Default `"30s"`.
    pub read_timeout: String,
    /// Upstream write timeout. Default `"30s"`.
    pub write_timeout: String,
    /// How long an idle upstream keep-alive connection is kept. Default `"60s"`.
    pub idle_timeout: String,
    /// Response header telling the client which version served it. Default `"x-kanaria-version"`.
    pub version_header: String,
    /// Whether to add `version_header` to responses. Default `true`.
    pub add_version_header: bool,
    /// Request id header added to upstream requests when absent. Default `"x-request-id"`.
    pub request_id_header: String,
    /// How long a graceful shutdown (SIGTERM) waits for in-flight requests. Default `"30s"`.
    pub shutdown_grace: String,
    /// Pingora's graceful-upgrade socket. Default `"/tmp/kanaria_upgrade.sock"`. Needs a restart.
    pub upgrade_sock: String,
    /// Accept HTTP/2 with prior knowledge (h2c) on the plain listeners, beside HTTP/1.1.
    /// Default `false`. Needs a restart.
    pub h2c: bool,
    /// How often endpoints given by name (`HOST:PORT`) are resolved again; a pool may set
    /// its own. Default `"10s"`.
    pub resolve_interval: String,
    /// TLS listeners. Default: none.
    pub tls: Option<TlsFile>,
}

/// `[proxy.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// TLS listener addresses, e.g. `["0.0.0.0:8443"]`. Needs a restart to change.
    pub listen: OneOrMany,
    /// Offer HTTP/2 through ALPN (else HTTP/1.1 only). Default `true`.
    #[serde(default = "default_true")]
    pub http2: bool,
    /// How often the certificate files are re-read for changes. Default `"2s"`.
    #[serde(default = "default_tls_watch_interval")]
    pub watch_interval: String,
    /// At least one; the first is the default for unknown or absent SNI.
    #[serde(default)]
    pub certificates: Vec<CertificateFile>,
}

fn default_tls_watch_interval() -> String {
    "2s".into()
}

/// `[[proxy.tls.certificates]]`: paths relative to the config file's directory.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFile {
    /// PEM certificate chain, leaf first. It serves the DNS names of its subjectAltName.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) matching the certificate.
    pub key: String,
}

impl Default for ProxyFile {
    fn default() -> Self {
        ProxyFile {
            listen: OneOrMany::One("0.0.0.0:8080".into()),
            threads: None,
            connect_timeout: "2s".into(),
            read_timeout: "30s".into(),
            write_timeout: "30s".into(),
            idle_timeout: "60s".into(),
            version_header: "x-kanaria-version".into(),
            add_version_header: true,
            request_id_header: "x-request-id".into(),
            shutdown_grace: "30s".into(),
            upgrade_sock: "/tmp/kanaria_upgrade.sock".into(),
            h2c: false,
            resolve_interval: "10s".into(),
            tls: None,
        }
    }
}

/// `[resolver]`: where endpoint names (`HOST:PORT`) are looked up, like nginx's
/// `resolver`. Needs a restart to change.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverFile {
    /// `IP` or `IP:PORT` (port 53 when left out), asked over UDP (TCP when an answer is
    /// truncated or UDP fails). At least one.
    pub nameservers: Vec<String>,
    /// How long one lookup of a name may take, all its queries included. Default `"2s"`.
    #[serde(default = "default_resolver_timeout")]
    pub timeout: String,
}

fn default_resolver_timeout() -> String {
    "2s".into()
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminFile {
    /// Default `"127.0.0.1:9901"`. Needs a restart to change.
    pub listen: String,
    /// File holding the bearer token for mutations (trimmed). Default: none; then the
    /// `KANARIA_ADMIN_TOKEN` environment variable, else mutations are disabled.
    pub token_file: Option<String>,
}

impl Default for AdminFile {
    fn default() -> Self {
        AdminFile {
            listen: "127.0.0.1:9901".into(),
            token_file: None,
        }
    }
}

/// `[reload]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadFile {
    /// Watch the config file's directory and reload on change. Default `true`.
    pub watch: bool,
    /// Quiet time after the last file event before reloading. Default `"200ms"`.
    pub debounce: String,
}

impl Default for ReloadFile {
    fn default() -> Self {
        ReloadFile {
            watch: true,
            debounce: "200ms".into(),
        }
    }
}

/// `[log]`: the access log. Read at start: changing it needs a restart.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogFile {
    /// `"off"` (default), `"stdout"`, or a file path (relative to the config file's
    /// directory), reopened on SIGUSR1.
    pub access: String,
    /// `"json"` (default: one JSON object per line) or `"combined"` (nginx's combined
    /// format with route, track, upstream time and request id appended).
    pub format: String,
    /// Lines that may wait for the writer; more are dropped and counted in
    /// `kanaria_access_log_dropped_total`. Default `16384`.
    pub queue: usize,
}

impl Default for LogFile {
    fn default() -> Self {
        LogFile {
            access: "off".into(),
            format: "json".into(),
            queue: 16_384,
        }
    }
}

/// `[edge]`: what a client connection may cost before Kanaria closes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeFile {
    /// Deadline for a whole request header, from accept (first request) or from its first
    /// byte (later requests on a kept-alive connection). Default `"10s"`.
    pub header_timeout: String,
    /// How long a kept-alive client connection may sit idle between requests. Whole
    /// seconds (rounded up). Default `"60s"`.
    pub idle_timeout: String,
    /// Timeout of each read of a request body. Default `"30s"`.
    pub body_timeout: String,
    /// Largest request header section in bytes, request line included (431 above).
    /// Default `65536`; at most 1048575 (Pingora's own ceiling).
    pub max_header_bytes: usize,
    /// Most request header fields (431 above). Default `100`; at most 256 (Pingora's ceiling).
    pub max_headers: usize,
    /// Open client connections per proxy listener; more are closed at accept. Default `10000`.
    /// Also sizes the upstream keep-alive pool at start (`server::PingoraTuning::with_pool_for`).
    pub max_connections: usize,
    /// Peers (CIDRs or IPs) whose `X-Forwarded-For` is believed for the client address.
    /// Default `[]`: the socket peer is the client.
    pub trusted_proxies: Vec<String>,
    /// HTTP/2: most concurrent streams per client connection. Default `100`.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: largest request header list (HPACK-decoded bytes). Default `65536`.
    pub h2_max_header_list_size: u32,
}

impl Default for EdgeFile {
    fn default() -> Self {
        EdgeFile {
            header_timeout: "10s".into(),
            idle_timeout: "60s".into(),
            body_timeout: "30s".into(),
            max_header_bytes: 65536,
            max_headers: 100,
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
            h2_max_concurrent_streams: 100,
            h2_max_header_list_size: 65536,
        }
    }
}

fn default_path_prefix() -> String {
    "/".into()
}

fn default_sticky_by() -> Vec<String> {
    vec!["client_ip".into()]
}

fn default_issued_cookie_max_age() -> String {
    "365d".into()
}

fn default_true() -> bool {
    true
}

fn default_stable_down() -> String {
    "keep_stable".into()
}

/// `[fleet]`: replicas sharing rollout state and analysis through Redis. Every key needs
/// a restart to change.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// The store. Only `"redis"` for now. Default `"redis"`.
    #[serde(default = "default_fleet_backend")]
    pub backend: String,
    /// `redis://[:PASSWORD@]HOST[:PORT][/DB]`, or `rediss://` for TLS (also Valkey,
    /// ElastiCache); or Redis Sentinel:
    /// `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]` (the sentinels,
    /// the name they monitor the primary under, the database; `rediss+sentinel://` for TLS).
    /// Required. Without a password in the URL, `KANARIA_FLEET_PASSWORD` from the
    /// environment is used if set (for the primary).
    pub url: String,
    /// With `rediss://`: a PEM file of the certificate authorities to trust for the Redis
    /// server (relative to the config file's directory). Default: the system's trust store.
    pub ca: Option<String>,
    /// The fleet's name, the prefix of every key: several fleets may share one Redis.
    /// Required (1 to 64 of A-Z a-z 0-9 - _ .).
    pub cluster: String,
    /// This replica's name, unique in the fleet. Default: the host name.
    pub instance: Option<String>,
    /// How often each replica re-reads the fleet's records and says it is alive (pub/sub
    /// is at-most-once; this bounds how long a missed message matters). Default `"1s"`.
    #[serde(default = "default_fleet_poll")]
    pub poll_interval: String,
    /// How long a starting replica waits to adopt the fleet's records before it reports
    /// ready with its local state. Default `"5s"`.
    #[serde(default = "default_fleet_startup")]
    pub startup_timeout: String,
    /// How long the store keeps a route's record for a canary version no replica serves
    /// any more. Every replica renews the records of the versions it serves at each poll,
    /// so this only clears records of finished releases. At least 10 × `poll_interval`.
    /// Default `"7d"`.
    #[serde(default = "default_fleet_record_ttl")]
    pub record_ttl: String,
    /// What a replica cut off from the store does: `"hold"` keeps the last weight it
    /// knows; `"stable"` sends every user to stable once the store has not answered for
    /// `partition_timeout`, until it answers again. Default `"hold"`.
    #[serde(default = "default_fleet_on_partition")]
    pub on_partition: String,
    /// With `on_partition = "stable"`: how long the store may not answer before the
    /// replica sends every user to stable. Default `"30s"`.
    #[serde(default = "default_fleet_partition_timeout")]
    pub partition_timeout: String,
    /// How long a replica's config file may decide a route's weight or steps otherwise
    /// than the fleet (the fleet runs the newest file decision any replica loaded) before
    /// status and `kanaria_fleet_config_skew` flag it. Default `"2m"` (a Kubernetes
    /// ConfigMap reaches pods up to about a minute apart).
    #[serde(default = "default_fleet_config_skew_warning")]
    pub config_skew_warning: String,
}

fn default_fleet_backend() -> String {
    "redis".into()
}

fn default_fleet_poll() -> String {
    "1s".into()
}

fn default_fleet_startup() -> String {
    "5s".into()
}

fn default_fleet_record_ttl() -> String {
    "7d".into()
}

fn default_fleet_on_partition() -> String {
    "hold".into()
}

fn default_fleet_partition_timeout() -> String {
    "30s".into()
}

fn default_fleet_config_skew_warning() -> String {
    "2m".into()
}

/// `[state]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// Directory for one JSON file per route (created if missing). Needs a restart to change.
    pub dir: String,
}

/// `[notify]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyFile {
    /// `http://HOST:PORT/PATH` receiving every rollout event as a JSON POST.
    pub webhook_url: String,
    /// Timeout of one POST. Default `"2s"`.
    #[serde(default = "default_notify_timeout")]
    pub timeout: String,
}

fn default_notify_timeout() -> String {
    "2s".into()
}

/// `[routes.health]`: active HTTP probes of every endpoint of both pools.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthFile {
    /// Default `"/healthz"`.
    pub path: String,
    /// Default `"1s"`.
    pub interval: String,
    /// Default `"1s"`.
    pub timeout: String,
    /// Consecutive successes to come back. Default 2.
    pub healthy_threshold: usize,
    /// Consecutive failures to leave the rotation. Default 2.
    pub unhealthy_threshold: usize,
    /// Default 200.
    pub expected_status: u16,
}

impl Default for HealthFile {
    fn default() -> Self {
        HealthFile {
            path: "/healthz".into(),
            interval: "1s".into(),
            timeout: "1s".into(),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            expected_status: 200,
        }
    }
}

/// `[routes.analysis]`: when is the canary worse than stable. On by default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalysisFile {
    /// Default `true`. `false`: no automatic rollback from traffic (health still applies).
    pub enabled: bool,
    /// How often the analysis runs. Default `"1s"`.
    pub interval: String,
    /// The sliding window evaluated. Default `"30s"` (at most 120s).
    pub window: String,
    /// Canary requests needed in a window before any verdict. Default 20.
    pub min_requests: u64,
    /// Absolute canary error-rate limit, 0..1. Default none.
    pub max_error_rate: Option<f64>,
    /// Absolute canary p99 limit. Default none.
    pub max_p99_latency: Option<String>,
    /// Canary error rate may be at most this times stable's (and significantly higher).
    /// Default 2.0.
    pub max_error_rate_ratio: Option<f64>,
    /// Canary p99 may be at most this times stable's. Default none.
    pub max_p99_latency_ratio: Option<f64>,
    /// With `[routes.shadow]`: the share of compared answers (since the phase began) that
    /// may differ from stable's in a field that is not noise, 0..1. Default none.
    pub max_diff_rate: Option<f64>,
    /// Confidence that the canary's error rate is higher than stable's before a relative
    /// verdict (one-sided Fisher exact test). Default 0.99.
    pub confidence: f64,
    /// Consecutive failing evaluations before a rollback. Default 1.
    pub failure_limit: u32,
    /// gRPC status codes (names, as `"UNAVAILABLE"`) that count as errors of a version when
    /// an answer carries them in `grpc-status` (headers or trailers). Default the server
    /// faults: `UNKNOWN`, `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS`, `DEADLINE_EXCEEDED`.
    pub grpc_error_codes: Vec<String>,
    /// What a request's latency runs to: `"answer"` (default), the last byte of the
    /// answer, so a body that crawls is as slow as a head that does; or `"head"`, the
    /// answer's head, for routes whose answers last as long as the client wants (long
    /// polls, large downloads). Upgrades (WebSocket) and the `stream_content_types` are
    /// judged by their head either way.
    pub latency: String,
    /// Answers that are streams, judged by their head only (their duration is the
    /// client's, not the app's latency): a `Content-Type` equal to one of these media
    /// types, or one of them followed by `+suffix` (case-insensitive, parameters ignored).
    /// Default `["text/event-stream", "application/grpc"]` (server-sent events; gRPC, whose
    /// server streams cannot be told from unary calls by their head).
    pub stream_content_types: Vec<String>,
}

impl Default for AnalysisFile {
    fn default() -> Self {
        AnalysisFile {
            enabled: true,
            interval: "1s".into(),
            window: "30s".into(),
            min_requests: 20,
            max_error_rate: None,
            max_p99_latency: None,
            max_error_rate_ratio: Some(2.0),
            max_p99_latency_ratio: None,
            max_diff_rate: None,
            confidence: 0.99,
            failure_limit: 1,
            grpc_error_codes: [
                "UNKNOWN",
                "INTERNAL",
                "UNAVAILABLE",
                "DATA_LOSS",
                "DEADLINE_EXCEEDED",
            ]
            .map(String::from)
            .to_vec(),
            latency: "answer".into(),
            stream_content_types: ["text/event-stream", "application/grpc"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// `[routes.rollout]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutFile {
    /// Weights in percent, each held for `hold` while analysis passes.
    pub steps: Vec<StepFile>,
}

/// One step of a rollout.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepFile {
    /// Percent of users on the canary at this step (above 0), unless it is a shadow step.
    #[serde(default)]
    pub weight: f64,
    /// A shadow step instead (dark launch): no user on the canary, this percent of stable's
    /// users mirrored to it (`[routes.shadow]` required). Shadow steps come first.
    pub shadow: Option<f64>,
    /// How long analysis must pass at this weight. Default: none (next step at once).
    pub hold: Option<String>,
}

/// `[[routes]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// Unique; used in metrics labels, the admin API and as the default hash salt.
    pub name: String,
    /// Host names this route serves (port ignored, case-insensitive). Empty: any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Default `"/"`. Matches whole path segments; the longest matching prefix wins.
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// Where the user key comes from, first present wins: `header:NAME`, `cookie:NAME`,
    /// `issued_cookie:NAME`, `client_ip`. Default `["client_ip"]`; the client IP is always
    /// the last resort. `issued_cookie:NAME`: a request with no key gets a random id, split
    /// on it, and its response sets cookie NAME to it (later sources are never reached).
    #[serde(default = "default_sticky_by")]
    pub sticky_by: Vec<String>,
    /// `Max-Age` of the issued cookie (with `issued_cookie:NAME` in `sticky_by`).
    /// Default `"365d"`.
    #[serde(default = "default_issued_cookie_max_age")]
    pub issued_cookie_max_age: String,
    /// Percent of users sent to the canary, `0..=100` in steps of 0.01. Default `0`.
    #[serde(default)]
    pub canary_weight: f64,
    /// Salt of the user hash. Default: the route name. Changing it reshuffles users.
    pub hash_salt: Option<String>,
    /// Request header forcing a version: `canary`, `stable` or a pool's version label.
    pub override_header: Option<String>,
    /// Cookie forcing a version, same values as `override_header`.
    pub override_cookie: Option<String>,
    /// When non-empty, overrides are honoured only from client addresses in these CIDRs.
    #[serde(default)]
    pub override_trusted_cidrs: Vec<String>,
    /// When set (at least 32 bytes), only signed, unexpired override tokens are honoured
    /// (`kanaria sign-override`); plain `canary`/`stable` values are ignored.
    pub override_secret: Option<String>,
    /// Per-route upstream connect timeout; default `[proxy].connect_timeout`.
    pub connect_timeout: Option<String>,
    /// Per-route upstream read timeout; default `[proxy].read_timeout`.
    pub read_timeout: Option<String>,
    /// How long a canary attempt of an idempotent request without a body may wait for the
    /// answer's head before it is abandoned and retried on stable (with `retry_on_stable`).
    /// Default: twice `[routes.analysis].max_p99_latency` when set, else the read timeout.
    pub canary_timeout: Option<String>,
    /// At a rollback, upgraded connections to the canary (WebSocket) are closed within this
    /// span, each at its own point of it (so their clients do not all reconnect at once),
    /// and reconnect to stable. `"0s"`: at once. Default `"5s"`.
    pub rollback_drain: Option<String>,
    /// When an operator or a rollout lowers the canary weight, the long-lived answers
    /// (WebSocket, server-sent events, gRPC: streams announced by their request) of the
    /// users it moves to stable end too, within `rollback_drain`, and reconnect onto
    /// stable. Default `false`: a weight change touches no open connection.
    #[serde(default)]
    pub drain_on_weight_change: bool,
    /// Retry a canary request that failed before any answer reached the client once on
    /// stable (connect errors always; resets, timeouts and 5xx for idempotent requests
    /// without a body). Default `true`.
    #[serde(default = "default_true")]
    pub retry_on_stable: bool,
    /// When every stable endpoint is down: `"keep_stable"` (answer 502, default) or
    /// `"serve_canary"`.
    #[serde(default = "default_stable_down")]
    pub stable_down: String,
    /// Active health checks. Default: none (endpoints are always in rotation).
    pub health: Option<HealthFile>,
    /// Canary analysis. Default: on, with the defaults of [`AnalysisFile`].
    pub analysis: Option<AnalysisFile>,
    /// Progressive rollout. Default: none (the weight is `canary_weight`).
    pub rollout: Option<RolloutFile>,
    /// Dark launch: mirror a share of stable's users' requests to the canary (or to
    /// `endpoints`) off the request path and compare the answers. Default: none.
    pub shadow: Option<ShadowFile>,
    /// The version most users get. Required, with at least one endpoint.
    pub stable: PoolFile,
    /// The version under test. Optional; required when `canary_weight > 0`.
    pub canary: Option<PoolFile>,
}

/// `[routes.shadow]`: a dark launch. Requests of a share of stable's users are copied to
/// the shadow after the user's answer went out, and the two answers compared.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowFile {
    /// Percent of users (by the route's sticky hash, so a user's whole session) whose
    /// requests to stable are mirrored, `0..=100`. Default `100`.
    #[serde(default = "default_shadow_share")]
    pub share: f64,
    /// Methods mirrored. Default `["GET", "HEAD"]`: only requests without side effects.
    #[serde(default = "default_shadow_methods")]
    pub methods: Vec<String>,
    /// Each mirrored request is sent this many times (load the shadow to N× the mirrored
    /// traffic), `1..=20`; only the first copy's answer is compared. Default `1`.
    #[serde(default = "default_one")]
    pub amplify: u32,
    /// Copies at the shadow at once, per process. Default `64`.
    #[serde(default = "default_shadow_in_flight")]
    pub max_in_flight: usize,
    /// Mirrored requests waiting for a free slot; past it they are dropped (counted).
    /// Default `1000`.
    #[serde(default = "default_shadow_queue")]
    pub queue: usize,
    /// Header set to `1` on every copy, so the app can avoid side effects. Default
    /// `"x-kanaria-shadow"`.
    #[serde(default = "default_shadow_marker")]
    pub marker_header: String,
    /// How much of a request's body, and of each answer's body, is kept: a request with a
    /// larger body is not mirrored; answers past it are compared by their first bytes.
    /// Default `"64KiB"`.
    pub compare_body_limit: Option<String>,
    /// Answer headers compared. Default `["content-type"]`.
    #[serde(default = "default_compare_headers")]
    pub compare_headers: Vec<String>,
    /// Percent of mirrored requests also sent to stable a second time, so the fields in
    /// which stable differs from itself (timestamps, ids) are known as noise. The first 3
    /// requests of each path template are always probed. Default `10`.
    #[serde(default = "default_noise_share")]
    pub noise_share: f64,
    /// `IP:PORT` of a separate shadow pool. Default: the canary pool.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// `"http1"` (default) or `"h2c"`, for `endpoints`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// How long a copy may take at the shadow. Default `"5s"`.
    pub timeout: Option<String>,
}

fn default_shadow_share() -> f64 {
    100.0
}

fn default_shadow_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into()]
}

fn default_one() -> u32 {
    1
}

fn default_shadow_in_flight() -> usize {
    64
}

fn default_shadow_queue() -> usize {
    1000
}

fn default_shadow_marker() -> String {
    "x-kanaria-shadow".into()
}

fn default_compare_headers() -> Vec<String> {
    vec!["content-type".into()]
}

fn default_noise_share() -> f64 {
    10.0
}

/// `[routes.stable]` / `[routes.canary]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    /// A label naming the release this pool runs, e.g. `"v1"`. Shown in status and metrics.
    pub version: String,
    /// `IP:PORT` or `HOST:PORT`. A name is resolved when the config is loaded and again
    /// every `resolve_interval`; every address it returns is an endpoint (health-checked).
    pub endpoints: Vec<String>,
    /// How Kanaria talks to the endpoints: `"http1"` (default) or `"h2c"` (HTTP/2 with
    /// prior knowledge, e.g. gRPC services). Health checks use the same protocol.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// How often the names among `endpoints` are resolved again. Default: `[proxy]
    /// resolve_interval`.
    pub resolve_interval: Option<String>,
}

fn default_protocol() -> String {
    "http1".into()
}
