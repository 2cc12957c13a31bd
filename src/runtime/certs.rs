//! TLS certificates: loaded and checked, held for selection by SNI, and reloaded.
//!
//! `[proxy.tls]` adds TLS listeners (Pingora's `rustls` backend, no OpenSSL). Each
//! `[[proxy.tls.certificates]]` is a PEM chain and key; a certificate serves the DNS names
//! of its subjectAltName (the subject CN when it has none), `*.example.com` covering one
//! label; the first certificate is the default for clients without SNI or with an unknown
//! name. A pair is refused, with its key named, when the key does not match the
//! certificate, or when the certificate is expired or not yet valid: at `kanaria check`,
//! at start, and on reload.
//!
//! Pingora asks [`CertStore`] for a certificate in each handshake; the store holds the
//! certificates in one `ArcSwap`, so a rotation replaces them for new handshakes while open
//! connections keep theirs: nothing is dropped. `proxy::tls::CertWatcher` (a background service)
//! re-reads the files every `watch_interval` and swaps in what changed; cert-manager and
//! certbot write in place or swap a symlink, and both change what a read returns. A new
//! pair that fails to load keeps the old one serving; the reason is logged, shown under
//! `tls` in `/api/v1/status`, and counted in `kanaria_tls_reload_failures_total`.

use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::CertPaths;

/// One loaded certificate: its names and the chain with its signing key.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    /// Lower-case DNS names; `*.example.com` for wildcards.
    pub names: Vec<String>,
    /// Seconds since the epoch after which the certificate is expired.
    pub not_after: i64,
    pub key: Arc<CertifiedKey>,
    /// The bytes read, to notice a change.
    source: (Vec<u8>, Vec<u8>),
}

/// Why a pair cannot serve: the message names what is wrong, and `on_key` says whether
/// the key file (rather than the certificate file) is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertError {
    pub on_key: bool,
    pub message: String,
}

fn cert_err(message: String) -> CertError {
    CertError {
        on_key: false,
        message,
    }
}

fn key_err(message: String) -> CertError {
    CertError {
        on_key: true,
        message,
    }
}

/// Reads and checks one pair. `now` in seconds since the epoch.
pub fn load(paths: &CertPaths, now: i64) -> Result<LoadedCert, CertError> {
    let cert_pem = std::fs::read(&paths.cert)
        .map_err(|e| cert_err(format!("cannot read {}: {e}", paths.cert.display())))?;
    let key_pem = std::fs::read(&paths.key)
        .map_err(|e| key_err(format!("cannot read {}: {e}", paths.key.display())))?;
    parse(cert_pem, key_pem, &paths.cert, now)
}

fn parse(
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    cert_path: &std::path::Path,
    now: i64,
) -> Result<LoadedCert, CertError> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(format!("{}: bad PEM: {e}", cert_path.display())))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_err(format!(
            "{}: no CERTIFICATE in the file",
            cert_path.display()
        )));
    };
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| key_err(format!("bad PEM: {e}")))?
        .ok_or_else(|| key_err("no PRIVATE KEY in the file".to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| key_err(format!("unusable private key: {e}")))?;
    let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| {
        cert_err(format!(
            "{}: not an X.509 certificate: {e}",
            cert_path.display()
        ))
    })?;
    let validity = x509.validity();
    let not_after = validity.not_after.timestamp();
    if not_after < now {
        return Err(cert_err(format!(
            "{}: the certificate expired on {}",
            cert_path.display(),
            validity.not_after
        )));
    }
    if validity.not_before.timestamp() > now {
        return Err(cert_err(format!(
            "{}: the certificate is not valid before {}",
            cert_path.display(),
            validity.not_before
        )));
    }
    let mut names: Vec<String> = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(
            x509.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        key_err(format!(
            "the key does not match the certificate {} ({e})",
            cert_path.display()
        ))
    })?;
    Ok(LoadedCert {
        names,
        not_after,
        key: Arc::new(certified),
        source: (cert_pem, key_pem),
    })
}

/// Seconds since the epoch.
// Certificates expire in the world's time: `kanaria check`, start, reload and the TLS
// listeners check their validity against the machine's clock, not the control plane's.
#[allow(clippy::disallowed_methods)]
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Does certificate name `pattern` (lower-case) cover `host` (any case)?
fn covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// `fleet.ca`: the PEM of the authorities to trust for `rediss://`, with at least one
/// certificate in it.
pub fn read_ca(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_default();
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(pem)
}

/// The certificates of the TLS listeners, chosen by SNI in each handshake.
pub struct CertStore {
    certs: ArcSwap<Vec<LoadedCert>>,
    /// Why the last reload of each pair failed (`None`: it is current).
    errors: Mutex<Vec<Option<String>>>,
    failures: prometheus::IntCounter,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").finish_non_exhaustive()
    }
}

static STORE: OnceLock<Arc<CertStore>> = OnceLock::new();

impl CertStore {
    /// Loads every pair (an error names the pair's index) and registers the metric.
    pub fn new(
        certificates: &[CertPaths],
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Arc<CertStore>> {
        let now = unix_now();
        let mut certs = Vec::new();
        for (i, p) in certificates.iter().enumerate() {
            let c = load(p, now).map_err(|e| {
                let key = if e.on_key { "key" } else { "cert" };
                anyhow::anyhow!("proxy.tls.certificates[{i}].{key}: {}", e.message)
            })?;
            certs.push(c);
        }
        let failures = prometheus::IntCounter::new(
            "kanaria_tls_reload_failures_total",
            "Certificate reloads refused (bad, expired or mismatched); the old one kept serving.",
        )?;
        registry.register(Box::new(failures.clone()))?;
        let store = Arc::new(CertStore {
            errors: Mutex::new(vec![None; certs.len()]),
            certs: ArcSwap::from_pointee(certs),
            failures,
        });
        let _ = STORE.set(store.clone());
        Ok(store)
    }

    /// Re-reads every pair; swaps in those that changed and load, keeps the others.
    pub fn refresh(&self, paths: &[CertPaths]) {
        let now = unix_now();
        let current = self.certs.load();
        let mut next: Vec<LoadedCert> = Vec::with_capacity(paths.len());
        let mut changed = paths.len() != current.len();
        let mut errors = Vec::with_capacity(paths.len());
        for (i, p) in paths.iter().enumerate() {
            let old = current.get(i);
            let read = std::fs::read(&p.cert).and_then(|c| Ok((c, std::fs::read(&p.key)?)));
            let same = matches!((&read, old), (Ok(src), Some(o)) if *src == o.source);
            if same {
                if let Some(o) = old {
                    next.push(o.clone());
                }
                errors.push(None);
                continue;
            }
            let loaded = match read {
                Ok((c, k)) => parse(c, k, &p.cert, now),
                Err(e) => Err(cert_err(format!(
                    "cannot read {} or {}: {e}",
                    p.cert.display(),
                    p.key.display()
                ))),
            };
            match loaded {
                Ok(c) => {
                    log::info!(
                        "TLS certificate {} reloaded (names {:?})",
                        p.cert.display(),
                        c.names
                    );
                    next.push(c);
                    changed = true;
                    errors.push(None);
                }
                Err(e) => {
                    let which = if e.on_key { "key" } else { "cert" };
                    let msg = format!("proxy.tls.certificates[{i}].{which}: {}", e.message);
                    let last = self.errors.lock().unwrap_or_else(|p| p.into_inner());
                    // Said once per bad version of the files, not every interval.
                    if last.get(i).and_then(|m| m.as_ref()) != Some(&msg) {
                        log::warn!("certificate reload refused, the old one keeps serving: {msg}");
                        self.failures.inc();
                    }
                    drop(last);
                    errors.push(Some(msg));
                    if let Some(o) = old {
                        next.push(o.clone());
                    }
                }
            }
        }
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()) = errors;
        if changed && !next.is_empty() {
            self.certs.store(Arc::new(next));
        }
    }

    /// `tls` in `/api/v1/status`: each certificate's names, expiry and last reload error.
    pub fn status(&self) -> serde_json::Value {
        let certs = self.certs.load();
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let list: Vec<serde_json::Value> = certs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                serde_json::json!({
                    "names": c.names,
                    "not_after": c.not_after,
                    "reload_error": errors.get(i).cloned().flatten(),
                })
            })
            .collect();
        serde_json::json!({ "certificates": list })
    }
}

/// The process's certificate store, once TLS listeners are set up.
pub fn store() -> Option<&'static Arc<CertStore>> {
    STORE.get()
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        if let Some(sni) = hello.server_name() {
            // Compared without allocating: the handshake path stays cheap.
            if let Some(c) = certs
                .iter()
                .find(|c| c.names.iter().any(|n| covers(n, sni)))
            {
                return Some(c.key.clone());
            }
        }
        certs.first().map(|c| c.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(covers("a.test", "a.test"));
        assert!(!covers("a.test", "b.test"));
        assert!(covers("*.example.com", "www.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("*.example.com", "a.b.example.com"));
        assert!(covers("a.test", "A.Test"));
    }
}
