//! What every section's validation shares: the collector of errors with their key paths,
//! and the checks of values that recur (durations, header names, addresses, names, paths).

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::config::errors::KeyPath;
use crate::config::Endpoint;

/// Collects semantic errors while building runtime values.
#[derive(Default)]
pub struct Check {
    pub errors: Vec<(KeyPath, String)>,
}

impl Check {
    pub fn err(&mut self, path: KeyPath, msg: impl Into<String>) {
        self.errors.push((path, msg.into()));
    }

    /// A positive duration like `"10s"`, `"500ms"`, `"1m 30s"`.
    pub fn duration(&mut self, path: KeyPath, s: &str) -> Option<Duration> {
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

    /// `"http1"` or `"h2c"` (`Some(true)`: h2c).
    pub fn protocol(&mut self, path: KeyPath, s: &str) -> Option<bool> {
        match s {
            "http1" => Some(false),
            "h2c" => Some(true),
            other => {
                self.err(path, format!("{other:?} is not \"http1\" or \"h2c\""));
                None
            }
        }
    }

    /// A list of `HOST:PORT` / `IP:PORT`; each bad entry reported at its index and left out.
    pub fn endpoints(&mut self, path: &KeyPath, list: &[String]) -> Vec<Endpoint> {
        list.iter()
            .enumerate()
            .filter_map(|(i, e)| match parse_endpoint(e) {
                Ok(ep) => Some(ep),
                Err(msg) => {
                    self.err(path.index(i), msg);
                    None
                }
            })
            .collect()
    }

    pub fn header_name(&mut self, path: KeyPath, s: &str) -> Option<http::HeaderName> {
        match http::HeaderName::from_bytes(s.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(path, format!("{s:?} is not a valid header name"));
                None
            }
        }
    }

    /// A list of CIDRs or single addresses (each as a /32 or /128); `None` when one is
    /// neither (each such entry reported at its index).
    pub fn ip_nets(&mut self, path: KeyPath, list: &[String]) -> Option<Vec<IpNet>> {
        let mut nets = Vec::with_capacity(list.len());
        let mut ok = true;
        for (i, s) in list.iter().enumerate() {
            let parsed = s
                .parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => nets.push(n),
                Err(_) => {
                    self.err(
                        path.index(i),
                        format!("{s:?} is not a CIDR (e.g. \"10.0.0.0/8\") or IP address"),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(nets)
    }

    pub fn socket_addr(&mut self, path: KeyPath, s: &str) -> Option<SocketAddr> {
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

pub fn valid_name(s: &str) -> bool {
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
