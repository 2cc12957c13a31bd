//! Validation: config text → [`Config`], or every error found, each with its place. No I/O
//! beyond reading `admin.token_file` (and `KANARIA_ADMIN_TOKEN`): endpoints are checked for
//! their shape, not resolved; certificate files are read by the runtime layer's build.
//!
//! Structural errors (TOML syntax, wrong types, unknown keys) come from serde. To report
//! all of them at once rather than only the first, the offending entry is removed from the
//! spanned TOML tree and the tree is deserialized again, up to a bound. Semantic errors
//! (ranges, references, duplicates, unparseable values) are collected by walking the file
//! structs. Positions come from the original tree, so they point into the file as written.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::de::DeTable;

use super::errors::{remove_at, span_of, ConfigError, ConfigErrors, KeyPath, Position};
use super::file::{
    AnalysisFile, EdgeFile, FileConfig, HealthFile, PoolFile, ProxyFile, RolloutFile, RouteFile,
};
use super::{
    grpc_code, AdminSettings, AnalysisRules, CertPaths, Config, EdgeSettings, Endpoint,
    FleetSettings, HeaderLimits, HealthSettings, LogFormat, LogSettings, LogTarget, NotifySettings,
    PoolSettings, ProxySettings, ReloadSettings, RestartSettings, Route, StableDown, StateSettings,
    Step, Timeouts, TlsCertificates, WeightSource, PINGORA_MAX_HEADERS, PINGORA_MAX_HEADER_BYTES,
};
use crate::split::issued::IssuedCookie;
use crate::split::router::Router;
use crate::split::{seed_for, weight_to_buckets, OverrideRule, SplitRule, StickySource};

/// How many structural errors are reported before giving up on finding more.
const MAX_STRUCTURAL_ERRORS: usize = 50;

/// Parse and validate. See the module docs.
pub fn validate_str(src: &str, file: &str) -> Result<Config, ConfigErrors> {
    let at = |span: Option<std::ops::Range<usize>>, path: KeyPath, message: String| ConfigError {
        file: file.to_string(),
        position: span.map(|s| Position::of_offset(src, s.start)),
        path,
        message,
    };

    let (mut doc, syntax) = DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        let errs = syntax
            .iter()
            .map(|e| at(e.span(), KeyPath::root(), e.message().to_string()))
            .collect();
        return Err(ConfigErrors(errs));
    }
    let original = doc.get_ref().clone();

    let mut errors = Vec::new();
    let mut parsed = None;
    for _ in 0..MAX_STRUCTURAL_ERRORS {
        match FileConfig::deserialize(toml::de::Deserializer::from(doc.clone())) {
            Ok(cfg) => {
                parsed = Some(cfg);
                break;
            }
            Err(e) => {
                let span = e.span();
                let removed = span
                    .as_ref()
                    .and_then(|s| remove_at(doc.get_mut(), s, &KeyPath::root()));
                let stop = removed.is_none();
                errors.push(at(
                    span,
                    removed.unwrap_or_default(),
                    e.message().to_string(),
                ));
                if stop {
                    break;
                }
            }
        }
    }

    if let Some(cfg) = parsed {
        // Routes dropped for structural errors are already reported; "no routes" would be noise.
        let routes_in_file = original.iter().any(|(k, _)| k.get_ref() == "routes");
        let base = std::path::Path::new(file)
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        match validate(&cfg, routes_in_file, &base) {
            Ok(config) if errors.is_empty() => return Ok(config),
            Ok(_) => {}
            Err(semantic) => {
                for (path, message) in semantic {
                    errors.push(at(span_of(&original, &path), path, message));
                }
            }
        }
    }
    errors.sort_by_key(|e| e.position.map(|p| (p.line, p.col)));
    Err(ConfigErrors(errors))
}

/// Collects semantic errors while building runtime values.
#[derive(Default)]
struct Check {
    errors: Vec<(KeyPath, String)>,
}

impl Check {
    fn err(&mut self, path: KeyPath, msg: impl Into<String>) {
        self.errors.push((path, msg.into()));
    }

    /// A positive duration like `"10s"`, `"500ms"`, `"1m 30s"`.
    fn duration(&mut self, path: KeyPath, s: &str) -> Option<Duration> {
        match humantime::parse_duration(s) {
            Ok(d) if d > Duration::ZERO => Some(d),
            Ok(_) => {
                self.err(path, format!("{s:?} must be greater than zero"));
                None
            }
            Err(e) => {
                self.err(
                    path,
                    format!("{s:?} is not a duration ({e}); write e.g. \"10s\" or \"500ms\""),
                );
                None
            }
        }
    }

    fn header_name(&mut self, path: KeyPath, s: &str) -> Option<http::HeaderName> {
        match http::HeaderName::from_bytes(s.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(path, format!("{s:?} is not a valid header name"));
                None
            }
        }
    }

    fn socket_addr(&mut self, path: KeyPath, s: &str) -> Option<SocketAddr> {
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    path,
                    format!(
                        "{s:?} is not an IP:PORT address (e.g. \"0.0.0.0:8080\", \"[::]:8080\")"
                    ),
                );
                None
            }
        }
    }
}

/// `IP:PORT` or `HOST:PORT`, by its shape only: a name is resolved by the runtime layer
/// (at start and every `resolve_interval`), never here, so validation works offline.
pub fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Endpoint::Addr(a));
    }
    let shape_err = || format!("{s:?} is not HOST:PORT (e.g. \"10.0.0.1:8080\", \"app.svc:8080\")");
    let (host, port) = s.rsplit_once(':').ok_or_else(shape_err)?;
    let port: u16 = port.parse().map_err(|_| shape_err())?;
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 || port == 0 || !name.split('.').all(label_ok) {
        return Err(shape_err());
    }
    Ok(Endpoint::Name {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A path from the config: absolute, or relative to the config file's directory `base`.
pub fn relative_to(base: &std::path::Path, p: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn log_settings(
    c: &mut Check,
    l: &super::file::LogFile,
    base: &std::path::Path,
) -> Option<LogSettings> {
    use LogFormat as Format;
    use LogTarget as Target;
    let path = KeyPath::root().key("log");
    let mut ok = true;
    let access = match l.access.trim() {
        "off" => Target::Off,
        "stdout" => Target::Stdout,
        "" => {
            c.err(
                path.key("access"),
                "empty: use \"off\", \"stdout\" or a file path",
            );
            ok = false;
            Target::Off
        }
        // Opened at start (its directory may exist only where Kanaria is deployed).
        p => Target::File(relative_to(base, p)),
    };
    let format = match l.format.as_str() {
        "json" => Format::Json,
        "combined" => Format::Combined,
        other => {
            c.err(
                path.key("format"),
                format!("{other:?} is not \"json\" or \"combined\""),
            );
            ok = false;
            Format::Json
        }
    };
    if l.queue == 0 {
        c.err(path.key("queue"), "must be at least 1");
        ok = false;
    }
    ok.then_some(LogSettings {
        access,
        format,
        queue: l.queue,
    })
}

/// The host name, the default `fleet.instance` (read from the kernel: no network I/O).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kanaria".to_string())
}

fn fleet_settings(
    c: &mut Check,
    f: &super::file::FleetFile,
    base: &std::path::Path,
) -> Option<FleetSettings> {
    let path = KeyPath::root().key("fleet");
    let mut ok = true;
    if f.backend != "redis" {
        c.err(
            path.key("backend"),
            format!(
                "{:?} is not a fleet backend: the only one is \"redis\"",
                f.backend
            ),
        );
        ok = false;
    }
    let tls = f.url.starts_with("rediss://");
    let url_ok = match redis::IntoConnectionInfo::into_connection_info(f.url.as_str()) {
        Ok(_) if f.url.starts_with("redis://") || tls => true,
        Ok(_) => {
            c.err(
                path.key("url"),
                "only redis:// and rediss:// URLs are supported (e.g. \"redis://127.0.0.1:6379/0\")",
            );
            false
        }
        Err(e) => {
            c.err(
                path.key("url"),
                format!("not a Redis URL ({e}); write e.g. \"redis://127.0.0.1:6379/0\""),
            );
            false
        }
    };
    let ca = match &f.ca {
        None => None,
        Some(_) if !tls => {
            c.err(
                path.key("ca"),
                "only applies to a rediss:// url (TLS to Redis)",
            );
            ok = false;
            None
        }
        // Read (and its certificates checked) by the runtime layer's build.
        Some(ca) => Some(relative_to(base, ca)),
    };
    if !valid_name(&f.cluster) {
        c.err(
            path.key("cluster"),
            format!(
                "{:?} is not a valid fleet name (1 to 64 of A-Z a-z 0-9 - _ .)",
                f.cluster
            ),
        );
        ok = false;
    }
    let instance = f.instance.clone().unwrap_or_else(hostname);
    if instance.is_empty() || instance.len() > 253 || instance.chars().any(char::is_whitespace) {
        c.err(
            path.key("instance"),
            format!("{instance:?} must be 1 to 253 characters without spaces"),
        );
        ok = false;
    }
    let poll = c.duration(path.key("poll_interval"), &f.poll_interval);
    let startup = c.duration(path.key("startup_timeout"), &f.startup_timeout);
    let record_ttl = c.duration(path.key("record_ttl"), &f.record_ttl);
    if let (Some(ttl), Some(poll)) = (record_ttl, poll) {
        // Renewed at every poll: a TTL within a few polls could lapse between two.
        if ttl < poll * 10 {
            c.err(
                path.key("record_ttl"),
                format!(
                    "{:?} must be at least 10 × poll_interval ({})",
                    f.record_ttl,
                    humantime::format_duration(poll * 10)
                ),
            );
            ok = false;
        }
    }
    if !(ok && url_ok) {
        return None;
    }
    Some(FleetSettings {
        url: f.url.clone(),
        cluster: f.cluster.clone(),
        instance,
        poll_interval: poll?,
        startup_timeout: startup?,
        record_ttl: record_ttl?,
        ca,
    })
}

fn validate(
    cfg: &FileConfig,
    routes_in_file: bool,
    base: &std::path::Path,
) -> Result<Config, Vec<(KeyPath, String)>> {
    let mut c = Check::default();
    let log = log_settings(&mut c, &cfg.log, base);
    let proxy = proxy_settings(&mut c, &cfg.proxy, base);

    let admin_path = KeyPath::root().key("admin").key("listen");
    let admin_listen = c.socket_addr(admin_path.clone(), &cfg.admin.listen);
    if let (Some(a), Some(p)) = (admin_listen, &proxy) {
        if p.listen.contains(&a) {
            c.err(admin_path.clone(), format!("{a} is also a proxy listener"));
        }
    }
    let token = admin_token(&mut c, cfg.admin.token_file.as_deref());
    if let Some(a) = admin_listen {
        if !a.ip().is_loopback() && token.is_none() {
            c.err(
                admin_path,
                format!(
                    "{a} is reachable from other hosts but no admin token is set: set admin.token_file or KANARIA_ADMIN_TOKEN, or listen on 127.0.0.1"
                ),
            );
        }
    }
    let reload_path = KeyPath::root().key("reload");
    let debounce = c.duration(reload_path.key("debounce"), &cfg.reload.debounce);
    let state = cfg.state.as_ref().and_then(|st| {
        if st.dir.trim().is_empty() {
            c.err(
                KeyPath::root().key("state").key("dir"),
                "must name a directory",
            );
            return None;
        }
        Some(StateSettings {
            dir: st.dir.clone().into(),
        })
    });
    let notify = cfg.notify.as_ref().and_then(|n| {
        let path = KeyPath::root().key("notify");
        let timeout = c.duration(path.key("timeout"), &n.timeout);
        let url = webhook_url(&n.webhook_url);
        if let Err(e) = &url {
            c.err(path.key("webhook_url"), e.clone());
        }
        Some(NotifySettings {
            url: url.ok()?,
            timeout: timeout?,
        })
    });
    let fleet = cfg
        .fleet
        .as_ref()
        .and_then(|f| fleet_settings(&mut c, f, base));
    let edge = edge_settings(&mut c, &cfg.edge);

    let routes_path = KeyPath::root().key("routes");
    if cfg.routes.is_empty() && !routes_in_file {
        c.err(routes_path.clone(), "at least one [[routes]] is required");
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut places: HashMap<(String, &str), &str> = HashMap::new();
    let mut routes = Vec::new();
    for (i, r) in cfg.routes.iter().enumerate() {
        let path = routes_path.named(i, Some(r.name.as_str()).filter(|n| !n.is_empty()));
        if !valid_name(&r.name) {
            c.err(
                path.key("name"),
                format!(
                    "{:?} is not a valid route name (1 to 64 of A-Z a-z 0-9 - _ .)",
                    r.name
                ),
            );
        } else if let Some(first) = names.insert(&r.name, i) {
            c.err(
                path.key("name"),
                format!(
                    "duplicate route name {:?} (first used by routes[{first}])",
                    r.name
                ),
            );
        }
        // Two routes serving the same host and prefix: the second could never match.
        let hosts: Vec<String> = if r.hosts.is_empty() {
            vec![String::new()]
        } else {
            r.hosts.iter().map(|h| h.to_ascii_lowercase()).collect()
        };
        for h in hosts {
            if let Some(other) = places.insert((h.clone(), r.path_prefix.as_str()), &r.name) {
                let host = if h.is_empty() {
                    "any host".to_string()
                } else {
                    format!("host {h:?}")
                };
                c.err(
                    path.key("path_prefix"),
                    format!(
                        "{:?} on {host} is already served by route {other:?}",
                        r.path_prefix
                    ),
                );
            }
        }
        if let Some(route) = route(&mut c, &path, r, proxy.as_ref().map(|p| &p.settings)) {
            routes.push(Arc::new(route));
        }
    }

    match (proxy, admin_listen, debounce, edge, log) {
        (Some(proxy), Some(admin_listen), Some(debounce), Some((edge, h2)), Some(log))
            if c.errors.is_empty() =>
        {
            let router = Router::new(
                routes
                    .iter()
                    .map(|r| (r.hosts.as_slice(), r.path_prefix.as_str())),
            );
            Ok(Config {
                restart: RestartSettings {
                    listen: proxy.listen,
                    threads: proxy.threads,
                    upgrade_sock: proxy.upgrade_sock,
                    h2c: proxy.h2c,
                    shutdown_grace: proxy.shutdown_grace,
                    tls_listen: proxy.tls_listen,
                    tls_http2: proxy.tls_http2,
                    h2_max_concurrent_streams: h2.0,
                    h2_max_header_list_size: h2.1,
                    admin_listen,
                    log,
                    state,
                    notify,
                    fleet,
                },
                proxy: proxy.settings,
                admin: AdminSettings { token },
                reload: ReloadSettings {
                    watch: cfg.reload.watch,
                    debounce,
                },
                edge,
                routes,
                router,
            })
        }
        _ => Err(c.errors),
    }
}

/// Parses an IP network or a single address (as a /32 or /128).
fn ip_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .ok()
}

/// `[edge]`, and its HTTP/2 limits (concurrent streams, header list size: restart-only).
fn edge_settings(c: &mut Check, e: &EdgeFile) -> Option<(EdgeSettings, (u32, u32))> {
    let path = KeyPath::root().key("edge");
    let header_timeout = c.duration(path.key("header_timeout"), &e.header_timeout);
    let idle = c.duration(path.key("idle_timeout"), &e.idle_timeout);
    let body_timeout = c.duration(path.key("body_timeout"), &e.body_timeout);
    let mut ok = true;
    if !(1024..=PINGORA_MAX_HEADER_BYTES).contains(&e.max_header_bytes) {
        c.err(
            path.key("max_header_bytes"),
            format!(
                "{} is not in 1024..={PINGORA_MAX_HEADER_BYTES} (Pingora refuses larger headers itself)",
                e.max_header_bytes
            ),
        );
        ok = false;
    }
    if !(1..=PINGORA_MAX_HEADERS).contains(&e.max_headers) {
        c.err(
            path.key("max_headers"),
            format!(
                "{} is not in 1..={PINGORA_MAX_HEADERS} (Pingora refuses more headers itself)",
                e.max_headers
            ),
        );
        ok = false;
    }
    if !(1..=10_000).contains(&e.h2_max_concurrent_streams) {
        c.err(
            path.key("h2_max_concurrent_streams"),
            format!("{} is not in 1..=10000", e.h2_max_concurrent_streams),
        );
        ok = false;
    }
    if !(1024..=1 << 20).contains(&e.h2_max_header_list_size) {
        c.err(
            path.key("h2_max_header_list_size"),
            format!("{} is not in 1024..=1048576", e.h2_max_header_list_size),
        );
        ok = false;
    }
    if e.max_connections == 0 {
        c.err(
            path.key("max_connections"),
            "0 would refuse every connection; use at least 1",
        );
        ok = false;
    }
    let mut trusted_proxies = Vec::new();
    for (i, s) in e.trusted_proxies.iter().enumerate() {
        match ip_net(s) {
            Some(n) => trusted_proxies.push(n),
            None => {
                c.err(
                    path.key("trusted_proxies").index(i),
                    format!("{s:?} is not a CIDR (e.g. \"10.0.0.0/8\") or IP address"),
                );
                ok = false;
            }
        }
    }
    if !ok {
        return None;
    }
    Some((
        EdgeSettings {
            header_timeout: header_timeout?,
            idle_timeout_secs: idle?.as_millis().div_ceil(1000).max(1) as u64,
            body_timeout: body_timeout?,
            limits: HeaderLimits {
                max_bytes: e.max_header_bytes,
                max_count: e.max_headers,
            },
            max_connections: e.max_connections,
            trusted_proxies,
        },
        (e.h2_max_concurrent_streams, e.h2_max_header_list_size),
    ))
}

/// The admin token: from `token_file` when set, else `KANARIA_ADMIN_TOKEN`, else none.
fn admin_token(c: &mut Check, token_file: Option<&str>) -> Option<String> {
    let path = KeyPath::root().key("admin").key("token_file");
    let token = match token_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) => t.trim().to_string(),
            Err(e) => {
                c.err(path, format!("cannot read {f:?}: {e}"));
                return None;
            }
        },
        None => std::env::var("KANARIA_ADMIN_TOKEN")
            .unwrap_or_default()
            .trim()
            .to_string(),
    };
    if token.is_empty() {
        if token_file.is_some() {
            c.err(path, "the token file is empty");
        }
        return None;
    }
    Some(token)
}

/// `[proxy.tls]`: its listeners, whether it offers HTTP/2, and its certificates (their
/// files are read by the runtime layer's build, which names the key of a bad one).
fn tls_settings(
    c: &mut Check,
    t: &super::file::TlsFile,
    base: &std::path::Path,
) -> Option<(Vec<SocketAddr>, bool, TlsCertificates)> {
    let path = KeyPath::root().key("proxy").key("tls");
    let mut ok = true;
    let listen_strs = t.listen.to_vec();
    if listen_strs.is_empty() {
        c.err(
            path.key("listen"),
            "at least one listen address is required",
        );
        ok = false;
    }
    let listen: Vec<_> = listen_strs
        .iter()
        .enumerate()
        .map(|(i, s)| c.socket_addr(path.key("listen").index(i), s))
        .collect();
    let watch = c.duration(path.key("watch_interval"), &t.watch_interval);
    if t.certificates.is_empty() {
        c.err(
            path.key("certificates"),
            "at least one [[proxy.tls.certificates]] (cert and key) is required",
        );
        ok = false;
    }
    let certificates = t
        .certificates
        .iter()
        .map(|f| CertPaths {
            cert: relative_to(base, &f.cert),
            key: relative_to(base, &f.key),
        })
        .collect();
    if !ok {
        return None;
    }
    Some((
        listen.into_iter().collect::<Option<Vec<_>>>()?,
        t.http2,
        TlsCertificates {
            certificates,
            watch_interval: watch?,
        },
    ))
}

/// `[proxy]`: the reloadable settings and the restart-only ones.
struct ProxyParts {
    settings: ProxySettings,
    listen: Vec<SocketAddr>,
    threads: Option<usize>,
    upgrade_sock: String,
    h2c: bool,
    shutdown_grace: Duration,
    tls_listen: Vec<SocketAddr>,
    tls_http2: bool,
}

fn proxy_settings(c: &mut Check, p: &ProxyFile, base: &std::path::Path) -> Option<ProxyParts> {
    let path = KeyPath::root().key("proxy");
    let listen_strs = p.listen.to_vec();
    if listen_strs.is_empty() {
        c.err(
            path.key("listen"),
            "at least one listen address is required",
        );
    }
    let listen: Vec<_> = listen_strs
        .iter()
        .enumerate()
        .map(|(i, s)| c.socket_addr(path.key("listen").index(i), s))
        .collect();
    if p.threads == Some(0) {
        c.err(
            path.key("threads"),
            "0 threads: use at least 1, or leave it out for one per CPU",
        );
    }
    let connect = c.duration(path.key("connect_timeout"), &p.connect_timeout);
    let read = c.duration(path.key("read_timeout"), &p.read_timeout);
    let write = c.duration(path.key("write_timeout"), &p.write_timeout);
    let idle = c.duration(path.key("idle_timeout"), &p.idle_timeout);
    let grace = c.duration(path.key("shutdown_grace"), &p.shutdown_grace);
    let resolve_interval = c.duration(path.key("resolve_interval"), &p.resolve_interval);
    let version_header = c.header_name(path.key("version_header"), &p.version_header);
    let request_id_header = c.header_name(path.key("request_id_header"), &p.request_id_header);
    let tls = p.tls.as_ref().map(|t| tls_settings(c, t, base));
    if let Some(Some((tls_listen, _, _))) = &tls {
        for (i, a) in tls_listen.iter().enumerate() {
            if listen.contains(&Some(*a)) {
                c.err(
                    path.key("tls").key("listen").index(i),
                    format!("{a} is also a plain proxy listener"),
                );
            }
        }
    }
    let (tls_listen, tls_http2, certificates) = match tls {
        Some(t) => {
            let (listen, http2, certs) = t?;
            (listen, http2, Some(certs))
        }
        None => (Vec::new(), false, None),
    };
    Some(ProxyParts {
        settings: ProxySettings {
            timeouts: Timeouts {
                connect: connect?,
                read: read?,
                write: write?,
                idle: idle?,
            },
            version_header: if p.add_version_header {
                Some(version_header?)
            } else {
                None
            },
            request_id_header: request_id_header?,
            tls: certificates,
            resolve_interval: resolve_interval?,
        },
        listen: listen.into_iter().collect::<Option<Vec<_>>>()?,
        threads: p.threads,
        upgrade_sock: p.upgrade_sock.clone(),
        h2c: p.h2c,
        shutdown_grace: grace?,
        tls_listen,
        tls_http2,
    })
}

fn route(
    c: &mut Check,
    path: &KeyPath,
    r: &RouteFile,
    proxy: Option<&ProxySettings>,
) -> Option<Route> {
    let mut ok = true;
    for (i, h) in r.hosts.iter().enumerate() {
        if h.is_empty() || h.contains(['/', ' ', ':']) {
            c.err(
                path.key("hosts").index(i),
                format!("{h:?} is not a host name (no scheme, port or path)"),
            );
            ok = false;
        }
    }
    if !r.path_prefix.starts_with('/') {
        c.err(
            path.key("path_prefix"),
            format!("{:?} must start with \"/\"", r.path_prefix),
        );
        ok = false;
    }
    let mut sticky = Vec::new();
    for (i, s) in r.sticky_by.iter().enumerate() {
        match StickySource::parse(s) {
            Ok(src) => {
                // Issuing gives every request a key: what follows is never reached, and an
                // issued cookie after client_ip would never be issued.
                let blocked = if sticky
                    .iter()
                    .any(|p| matches!(p, StickySource::IssuedCookie(_)))
                {
                    Some("an issued_cookie (every request has a key from it)")
                } else if matches!(src, StickySource::IssuedCookie(_))
                    && sticky.contains(&StickySource::ClientIp)
                {
                    Some("client_ip (every request has a client address)")
                } else {
                    None
                };
                if let Some(prev) = blocked {
                    c.err(
                        path.key("sticky_by").index(i),
                        format!("{s:?} is never reached: it comes after {prev}"),
                    );
                    ok = false;
                }
                sticky.push(src)
            }
            Err(e) => {
                c.err(path.key("sticky_by").index(i), e);
                ok = false;
            }
        }
    }
    let issued_max_age = c.duration(path.key("issued_cookie_max_age"), &r.issued_cookie_max_age);
    let weight = match weight_to_buckets(r.canary_weight) {
        Ok(w) => Some(w),
        Err(e) => {
            c.err(path.key("canary_weight"), e);
            None
        }
    };
    if r.canary_weight > 0.0 && r.canary.is_none() {
        c.err(
            path.key("canary_weight"),
            format!("{} needs a [routes.canary] pool", r.canary_weight),
        );
        ok = false;
    }
    let header = r
        .override_header
        .as_deref()
        .map(|h| c.header_name(path.key("override_header"), h));
    if let Some(cookie) = &r.override_cookie {
        if !valid_name(cookie) {
            c.err(
                path.key("override_cookie"),
                format!("{cookie:?} is not a valid cookie name"),
            );
            ok = false;
        }
    }
    let mut trusted = Vec::new();
    for (i, s) in r.override_trusted_cidrs.iter().enumerate() {
        let parsed = s
            .parse::<IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(n) => trusted.push(n),
            Err(_) => {
                c.err(
                    path.key("override_trusted_cidrs").index(i),
                    format!("{s:?} is not a CIDR (e.g. \"10.0.0.0/8\") or IP address"),
                );
                ok = false;
            }
        }
    }
    let mut key = None;
    if let Some(secret) = &r.override_secret {
        let secret = secret.trim();
        if secret.len() < crate::split::override_token::MIN_SECRET_LEN {
            c.err(
                path.key("override_secret"),
                format!(
                    "{} bytes is too short: use at least {} random bytes (e.g. `openssl rand -hex 32`)",
                    secret.len(),
                    crate::split::override_token::MIN_SECRET_LEN
                ),
            );
            ok = false;
        } else if r.override_header.is_none() && r.override_cookie.is_none() {
            c.err(
                path.key("override_secret"),
                "set override_header or override_cookie too: the secret signs their values",
            );
            ok = false;
        } else {
            key = crate::split::override_token::OverrideKey::new(secret.as_bytes(), &r.name);
        }
    }
    let defaults = proxy.map(|p| p.timeouts);
    let connect = r
        .connect_timeout
        .as_deref()
        .map(|s| c.duration(path.key("connect_timeout"), s));
    let read = r
        .read_timeout
        .as_deref()
        .map(|s| c.duration(path.key("read_timeout"), s));
    let canary_timeout = r
        .canary_timeout
        .as_deref()
        .map(|s| c.duration(path.key("canary_timeout"), s));

    let stable_down = match r.stable_down.as_str() {
        "keep_stable" => StableDown::KeepStable,
        "serve_canary" => StableDown::ServeCanary,
        other => {
            c.err(
                path.key("stable_down"),
                format!("{other:?} is not \"keep_stable\" or \"serve_canary\""),
            );
            ok = false;
            StableDown::KeepStable
        }
    };
    let health = r.health.as_ref().map(|h| health(c, &path.key("health"), h));
    let default_analysis = AnalysisFile::default();
    let analysis = analysis(
        c,
        &path.key("analysis"),
        r.analysis.as_ref().unwrap_or(&default_analysis),
    );
    let steps = match &r.rollout {
        Some(ro) => {
            if r.canary.is_none() {
                c.err(
                    path.key("rollout"),
                    "a rollout needs a [routes.canary] pool",
                );
                ok = false;
            }
            if r.canary_weight > 0.0 {
                c.err(
                    path.key("canary_weight"),
                    "set either canary_weight or [routes.rollout], not both: the rollout's steps set the weight",
                );
                ok = false;
            }
            rollout(c, &path.key("rollout"), ro)
        }
        None => Some(Vec::new()),
    };

    let health = match health {
        Some(Some(h)) => Some(h),
        Some(None) => return None,
        None => None,
    };
    let resolve_default = proxy.map(|p| p.resolve_interval);
    let stable = pool(c, &path.key("stable"), &r.stable, resolve_default);
    let canary = r
        .canary
        .as_ref()
        .map(|p| pool(c, &path.key("canary"), p, resolve_default));
    if let Some(cp) = &r.canary {
        if cp.version == r.stable.version && !cp.version.is_empty() {
            c.err(
                path.key("canary").key("version"),
                format!(
                    "{:?} is also the stable version; the canary must be another release",
                    cp.version
                ),
            );
            ok = false;
        }
    }

    let defaults = defaults?;
    let timeouts = Timeouts {
        connect: connect.unwrap_or(Some(defaults.connect))?,
        read: read.unwrap_or(Some(defaults.read))?,
        ..defaults
    };
    let analysis = analysis?;
    // A canary twice as slow as its latency limit is not worth waiting for: stable answers.
    let canary_timeout = match canary_timeout {
        Some(d) => d?,
        None => analysis
            .max_p99_latency
            .map_or(timeouts.read, |l| (2 * l).min(timeouts.read)),
    };
    let header = header.unwrap_or(None);
    if !ok || (r.override_header.is_some() && header.is_none()) {
        return None;
    }
    Some(Route {
        name: r.name.clone(),
        hosts: r.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        path_prefix: r.path_prefix.clone(),
        file_buckets: weight?,
        retry_on_stable: r.retry_on_stable,
        canary_timeout,
        stable_down,
        health,
        analysis,
        steps: steps?,
        issued_cookie: match sticky.iter().find_map(|s| match s {
            StickySource::IssuedCookie(name) => Some(name.clone()),
            _ => None,
        }) {
            Some(name) => Some(IssuedCookie {
                name,
                max_age: issued_max_age?,
            }),
            None => None,
        },
        split: SplitRule {
            sticky,
            seed: seed_for(r.hash_salt.as_deref().unwrap_or(&r.name)),
            canary_buckets: weight?,
            overrides: OverrideRule {
                header,
                cookie: r.override_cookie.clone(),
                trusted,
                key,
            },
        },
        timeouts,
        stable: stable?,
        canary: match canary {
            Some(p) => Some(p?),
            None => None,
        },
        weight_source: WeightSource::File,
    })
}

fn pool(
    c: &mut Check,
    path: &KeyPath,
    p: &PoolFile,
    resolve_default: Option<Duration>,
) -> Option<PoolSettings> {
    let mut ok = true;
    if !valid_name(&p.version) {
        c.err(
            path.key("version"),
            format!(
                "{:?} is not a valid version label (1 to 64 of A-Z a-z 0-9 - _ .)",
                p.version
            ),
        );
        ok = false;
    }
    if p.endpoints.is_empty() {
        c.err(
            path.key("endpoints"),
            "no endpoints: a pool needs at least one HOST:PORT",
        );
        ok = false;
    }
    let h2c = match p.protocol.as_str() {
        "http1" => false,
        "h2c" => true,
        other => {
            c.err(
                path.key("protocol"),
                format!("{other:?} is not \"http1\" or \"h2c\""),
            );
            ok = false;
            false
        }
    };
    let resolve_interval = match &p.resolve_interval {
        Some(s) => c.duration(path.key("resolve_interval"), s),
        None => resolve_default,
    };
    let mut endpoints = Vec::new();
    for (i, e) in p.endpoints.iter().enumerate() {
        match parse_endpoint(e) {
            Ok(endpoint) => endpoints.push(endpoint),
            Err(msg) => {
                c.err(path.key("endpoints").index(i), msg);
                ok = false;
            }
        }
    }
    if !ok {
        return None;
    }
    endpoints.sort();
    endpoints.dedup();
    Some(PoolSettings {
        version: p.version.clone(),
        endpoints,
        h2c,
        resolve_interval: resolve_interval?,
    })
}

fn health(c: &mut Check, path: &KeyPath, h: &HealthFile) -> Option<HealthSettings> {
    let mut ok = true;
    if !h.path.starts_with('/') {
        c.err(
            path.key("path"),
            format!("{:?} must start with \"/\"", h.path),
        );
        ok = false;
    }
    for (key, v) in [
        ("healthy_threshold", h.healthy_threshold),
        ("unhealthy_threshold", h.unhealthy_threshold),
    ] {
        if v == 0 {
            c.err(path.key(key), "must be at least 1");
            ok = false;
        }
    }
    if !(100..=599).contains(&h.expected_status) {
        c.err(
            path.key("expected_status"),
            format!("{} is not an HTTP status", h.expected_status),
        );
        ok = false;
    }
    let interval = c.duration(path.key("interval"), &h.interval);
    let timeout = c.duration(path.key("timeout"), &h.timeout);
    if !ok {
        return None;
    }
    Some(HealthSettings {
        path: h.path.clone(),
        interval: interval?,
        timeout: timeout?,
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
        expected_status: h.expected_status,
    })
}

fn analysis(c: &mut Check, path: &KeyPath, a: &AnalysisFile) -> Option<AnalysisRules> {
    let mut ok = true;
    let interval = c.duration(path.key("interval"), &a.interval);
    let window = c.duration(path.key("window"), &a.window);
    if let Some(w) = window {
        if w.as_secs() > crate::stats::window::MAX_WINDOW_SECS
            || w < std::time::Duration::from_secs(1)
        {
            c.err(
                path.key("window"),
                format!(
                    "{:?} must be between 1s and {}s",
                    a.window,
                    crate::stats::window::MAX_WINDOW_SECS
                ),
            );
            ok = false;
        }
    }
    let max_p99 = a
        .max_p99_latency
        .as_deref()
        .map(|s| c.duration(path.key("max_p99_latency"), s));
    if let Some(r) = a.max_error_rate {
        if !(0.0..=1.0).contains(&r) {
            c.err(
                path.key("max_error_rate"),
                format!("{r} is not a rate in 0..=1"),
            );
            ok = false;
        }
    }
    for (key, v) in [
        ("max_error_rate_ratio", a.max_error_rate_ratio),
        ("max_p99_latency_ratio", a.max_p99_latency_ratio),
    ] {
        if let Some(v) = v {
            if !(v.is_finite() && v >= 1.0) {
                c.err(path.key(key), format!("{v} must be at least 1.0"));
                ok = false;
            }
        }
    }
    if !(a.confidence > 0.5 && a.confidence < 1.0) {
        c.err(
            path.key("confidence"),
            format!("{} must be between 0.5 and 1 (e.g. 0.99)", a.confidence),
        );
        ok = false;
    }
    if a.failure_limit == 0 {
        c.err(path.key("failure_limit"), "must be at least 1");
        ok = false;
    }
    let mut grpc_error_codes = 0u32;
    for (i, name) in a.grpc_error_codes.iter().enumerate() {
        match grpc_code(name) {
            Some(code) => grpc_error_codes |= 1 << code,
            None => {
                c.err(
                    path.key("grpc_error_codes").index(i),
                    format!(
                        "{name:?} is not a gRPC status code name (e.g. \"UNAVAILABLE\", \"INTERNAL\")"
                    ),
                );
                ok = false;
            }
        }
    }
    if !ok {
        return None;
    }
    Some(AnalysisRules {
        enabled: a.enabled,
        interval: interval?,
        window: window?,
        min_requests: a.min_requests,
        max_error_rate: a.max_error_rate,
        max_p99_latency: match max_p99 {
            Some(d) => Some(d?),
            None => None,
        },
        max_error_rate_ratio: a.max_error_rate_ratio,
        max_p99_latency_ratio: a.max_p99_latency_ratio,
        confidence: a.confidence,
        failure_limit: a.failure_limit,
        grpc_error_codes,
    })
}

fn rollout(c: &mut Check, path: &KeyPath, r: &RolloutFile) -> Option<Vec<Step>> {
    if r.steps.is_empty() {
        c.err(path.key("steps"), "at least one step is required");
        return None;
    }
    let mut steps = Vec::new();
    let mut ok = true;
    let mut last = 0;
    for (i, st) in r.steps.iter().enumerate() {
        let p = path.key("steps").index(i);
        let buckets = match weight_to_buckets(st.weight) {
            Ok(0) => {
                c.err(p.key("weight"), "a step's weight must be above 0");
                None
            }
            Ok(b) if b < last => {
                c.err(
                    p.key("weight"),
                    format!("{} is below the previous step's", st.weight),
                );
                None
            }
            Ok(b) => Some(b),
            Err(e) => {
                c.err(p.key("weight"), e);
                None
            }
        };
        let hold = match &st.hold {
            Some(h) => c.duration(p.key("hold"), h),
            None => Some(std::time::Duration::ZERO),
        };
        match (buckets, hold) {
            (Some(b), Some(h)) => {
                last = b;
                steps.push(Step {
                    buckets: b,
                    hold: h,
                });
            }
            _ => ok = false,
        }
    }
    ok.then_some(steps)
}

/// A webhook URL: plain `http://` with a host (webhooks go to a local relay or an
/// in-cluster service; the HTTP client is built without TLS).
fn webhook_url(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if parsed.scheme() != "http" {
        return Err(format!(
            "{url:?} must start with http:// (https is not supported)"
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(parsed.to_string())
}

/// Errors found after validation (by the runtime layer's checks of the files the config
/// names), each placed in the text as written.
pub fn locate(src: &str, file: &str, found: Vec<(KeyPath, String)>) -> ConfigErrors {
    let (doc, _) = DeTable::parse_recoverable(src);
    let root = doc.get_ref();
    ConfigErrors(
        found
            .into_iter()
            .map(|(path, message)| ConfigError {
                file: file.to_string(),
                position: span_of(root, &path).map(|s| Position::of_offset(src, s.start)),
                path,
                message,
            })
            .collect(),
    )
}

/// The files a config names that the runtime layer reads: the TLS certificate pairs and
/// the fleet's CA, taken from the file as written (so they are checked, and their errors
/// reported, beside the validation errors of a file that does not validate).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NamedFiles {
    pub certificates: Vec<CertPaths>,
    /// `fleet.ca` of a `rediss://` fleet.
    pub fleet_ca: Option<std::path::PathBuf>,
}

/// [`NamedFiles`] of config text (none when it does not parse).
pub fn named_files(src: &str, file: &str) -> NamedFiles {
    let Ok(cfg) = toml::from_str::<FileConfig>(src) else {
        return NamedFiles::default();
    };
    let base = std::path::Path::new(file)
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    NamedFiles {
        certificates: cfg
            .proxy
            .tls
            .iter()
            .flat_map(|t| &t.certificates)
            .map(|f| CertPaths {
                cert: relative_to(&base, &f.cert),
                key: relative_to(&base, &f.key),
            })
            .collect(),
        fleet_ca: cfg
            .fleet
            .as_ref()
            .filter(|f| f.url.starts_with("rediss://"))
            .and_then(|f| f.ca.as_deref())
            .map(|ca| relative_to(&base, ca)),
    }
}
