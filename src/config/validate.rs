//! Validation: config text → [`Config`], or every error found, each with its place. No I/O
//! beyond reading `admin.token_file` (and `KANARIA_ADMIN_TOKEN`): endpoints are checked for
//! their shape, not resolved; certificate files are read by the runtime layer's build.
//!
//! Structural errors (TOML syntax, wrong types, unknown keys) come from serde. To report
//! all of them at once rather than only the first, the offending entry is removed from the
//! spanned TOML tree and the tree is deserialized again, up to a bound. Semantic errors
//! (ranges, references, duplicates, unparseable values) are collected by walking the file
//! structs. Positions come from the original tree, so they point into the file as written.

mod check;
mod routes;
mod sections;

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use toml::de::DeTable;

pub use check::{parse_endpoint, relative_to};

use super::errors::{remove_at, span_of, ConfigError, ConfigErrors, KeyPath, Position};
use super::file::FileConfig;
use super::{
    AdminSettings, CertPaths, Config, NotifySettings, ReloadSettings, RestartSettings,
    StateSettings,
};
use crate::split::router::Router;
use check::{valid_name, Check};
use routes::route;
use sections::{
    admin_token, edge_settings, fleet_settings, log_settings, proxy_settings, resolver_settings,
    webhook_url,
};

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
    let resolver = cfg
        .resolver
        .as_ref()
        .and_then(|r| resolver_settings(&mut c, r));

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
                    reload: ReloadSettings {
                        watch: cfg.reload.watch,
                        debounce,
                    },
                    resolver,
                },
                proxy: proxy.settings,
                admin: AdminSettings { token },
                edge,
                routes,
                router,
            })
        }
        _ => Err(c.errors),
    }
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
