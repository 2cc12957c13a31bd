//! Validation of the process-wide sections: `[proxy]` (with `[proxy.tls]`), `[admin]`,
//! `[edge]`, `[log]`, `[fleet]`, `[resolver]` and `[notify]`'s URL.

use std::net::SocketAddr;
use std::time::Duration;

use super::check::{relative_to, valid_name, Check};
use crate::config::errors::KeyPath;
use crate::config::file::{EdgeFile, ProxyFile};
use crate::config::{
    CertPaths, EdgeSettings, FleetSettings, HeaderLimits, LogFormat, LogSettings, LogTarget,
    PartitionPolicy, ProxySettings, ResolverSettings, Timeouts, TlsCertificates,
    PINGORA_MAX_HEADERS, PINGORA_MAX_HEADER_BYTES,
};

pub(super) fn log_settings(
    c: &mut Check,
    l: &crate::config::file::LogFile,
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

pub(super) fn fleet_settings(
    c: &mut Check,
    f: &crate::config::file::FleetFile,
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
    let sentinel = match crate::config::store_url::parse_sentinel_url(&f.url) {
        Ok(s) => s,
        Err(e) => {
            c.err(path.key("url"), format!("not a Redis Sentinel URL: {e}"));
            ok = false;
            None
        }
    };
    let is_sentinel =
        f.url.starts_with("redis+sentinel://") || f.url.starts_with("rediss+sentinel://");
    let tls = f.url.starts_with("rediss://") || f.url.starts_with("rediss+sentinel://");
    let url_ok = is_sentinel
        || match redis::IntoConnectionInfo::into_connection_info(f.url.as_str()) {
            Ok(_) if f.url.starts_with("redis://") || tls => true,
            Ok(_) => {
                c.err(
                    path.key("url"),
                    "only redis://, rediss://, redis+sentinel:// and rediss+sentinel:// URLs are supported (e.g. \"redis://127.0.0.1:6379/0\")",
                );
                false
            }
            Err(e) => {
                c.err(
                    path.key("url"),
                    format!("not a Redis URL ({e}); write e.g. \"redis://127.0.0.1:6379/0\" or \"redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0\""),
                );
                false
            }
        };
    let ca = match &f.ca {
        None => None,
        Some(_) if !tls => {
            c.err(
                path.key("ca"),
                "only applies to a rediss:// or rediss+sentinel:// url (TLS to Redis)",
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
    let partition_timeout = c.duration(path.key("partition_timeout"), &f.partition_timeout);
    let config_skew_warning = c.duration(path.key("config_skew_warning"), &f.config_skew_warning);
    let on_partition = match f.on_partition.as_str() {
        "hold" => Some(PartitionPolicy::Hold),
        "stable" => Some(PartitionPolicy::Stable),
        other => {
            c.err(
                path.key("on_partition"),
                format!("{other:?} is not a policy: \"hold\" (keep the last weight) or \"stable\" (every user to stable after partition_timeout)"),
            );
            None
        }
    };
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
        sentinel,
        on_partition: on_partition?,
        partition_timeout: partition_timeout?,
        config_skew_warning: config_skew_warning?,
    })
}

/// `[resolver]`: each nameserver an `IP` or `IP:PORT` (53 by default), parsed here, never
/// asked anything (validation works offline).
pub(super) fn resolver_settings(
    c: &mut Check,
    r: &crate::config::file::ResolverFile,
) -> Option<ResolverSettings> {
    let path = KeyPath::root().key("resolver");
    let mut ok = true;
    if r.nameservers.is_empty() {
        c.err(
            path.key("nameservers"),
            "at least one nameserver is required (e.g. [\"10.0.0.2\", \"127.0.0.1:5353\"]); leave [resolver] out to use the system's resolver",
        );
        ok = false;
    }
    let mut nameservers: Vec<SocketAddr> = Vec::new();
    for (i, s) in r.nameservers.iter().enumerate() {
        let parsed = s.trim().parse::<SocketAddr>().or_else(|_| {
            s.trim()
                .parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        });
        match parsed {
            Ok(a) if a.port() == 0 => {
                c.err(
                    path.key("nameservers").index(i),
                    format!("{s:?}: port 0 is not a nameserver's port"),
                );
                ok = false;
            }
            Ok(a) if nameservers.contains(&a) => {
                c.err(
                    path.key("nameservers").index(i),
                    format!("{a} is listed twice"),
                );
                ok = false;
            }
            Ok(a) => nameservers.push(a),
            Err(_) => {
                c.err(
                    path.key("nameservers").index(i),
                    format!(
                        "{s:?} is not an IP or IP:PORT (e.g. \"10.0.0.2\", \"127.0.0.1:5353\", \"[::1]:53\"); a nameserver is given by address, not by name"
                    ),
                );
                ok = false;
            }
        }
    }
    let timeout = c.duration(path.key("timeout"), &r.timeout);
    if !ok {
        return None;
    }
    Some(ResolverSettings {
        nameservers,
        timeout: timeout?,
    })
}

/// `[edge]`, and its HTTP/2 limits (concurrent streams, header list size: restart-only).
pub(super) fn edge_settings(c: &mut Check, e: &EdgeFile) -> Option<(EdgeSettings, (u32, u32))> {
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
    let trusted_proxies = c
        .ip_nets(path.key("trusted_proxies"), &e.trusted_proxies)
        .unwrap_or_else(|| {
            ok = false;
            Vec::new()
        });
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
pub(super) fn admin_token(c: &mut Check, token_file: Option<&str>) -> Option<String> {
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
pub(super) fn tls_settings(
    c: &mut Check,
    t: &crate::config::file::TlsFile,
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
pub(super) struct ProxyParts {
    pub(super) settings: ProxySettings,
    pub(super) listen: Vec<SocketAddr>,
    pub(super) threads: Option<usize>,
    pub(super) upgrade_sock: String,
    pub(super) h2c: bool,
    pub(super) shutdown_grace: Duration,
    pub(super) tls_listen: Vec<SocketAddr>,
    pub(super) tls_http2: bool,
}

pub(super) fn proxy_settings(
    c: &mut Check,
    p: &ProxyFile,
    base: &std::path::Path,
) -> Option<ProxyParts> {
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

/// A webhook URL: plain `http://` with a host (webhooks go to a local relay or an
/// in-cluster service; the HTTP client is built without TLS).
pub(super) fn webhook_url(url: &str) -> Result<String, String> {
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
