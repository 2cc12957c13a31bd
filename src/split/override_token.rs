//! Signed override tokens: a tester's proof that they may force a version of one route.
//!
//! With `override_secret` set on a route, the override header or cookie must carry
//!
//! ```text
//! k1:VERSION:EXPIRES:SIGNATURE
//! SIGNATURE = base64url_nopad(HMAC-SHA256(secret, "kanaria-override-v1\n" ROUTE "\n" VERSION "\n" EXPIRES))
//! ```
//!
//! where `VERSION` is `canary`, `stable` or a pool's label, `EXPIRES` the Unix time in
//! seconds after which the token is refused, and `ROUTE` the route's name: a token for one
//! route is worthless on another, and nobody can change the version or the expiry without
//! the secret. The signature is checked with the `hmac` crate's constant-time comparison.
//! `kanaria sign-override` makes tokens.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Token scheme tag, first field of every token.
const SCHEME: &str = "k1";
/// Longest token considered; longer values are refused before any hashing.
pub const MAX_TOKEN_LEN: usize = 256;
/// Shortest accepted secret, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a k1:VERSION:EXPIRES:SIGNATURE token")]
    Malformed,
    #[error("bad signature")]
    BadSignature,
    #[error("expired")]
    Expired,
}

/// A route's override key: the secret and the route name every token is bound to.
#[derive(Clone)]
pub struct OverrideKey {
    mac: HmacSha256,
    route: String,
    /// Tells two keys apart without keeping the secret: the MAC of a fixed label.
    fingerprint: [u8; 32],
}

impl PartialEq for OverrideKey {
    fn eq(&self, other: &Self) -> bool {
        self.route == other.route && self.fingerprint == other.fingerprint
    }
}

impl Eq for OverrideKey {}

impl std::fmt::Debug for OverrideKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("OverrideKey")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl OverrideKey {
    /// `None` only if HMAC refused the key, which it does for no length (kept as a value
    /// rather than a panic: this runs during reloads).
    pub fn new(secret: &[u8], route: &str) -> Option<Self> {
        let mac = <HmacSha256 as Mac>::new_from_slice(secret).ok()?;
        let mut label = mac.clone();
        label.update(b"kanaria-override-key-fingerprint");
        Some(OverrideKey {
            fingerprint: label.finalize().into_bytes().into(),
            mac,
            route: route.to_string(),
        })
    }

    fn mac_for(&self, version: &str, expires: &str) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(b"kanaria-override-v1\n");
        mac.update(self.route.as_bytes());
        mac.update(b"\n");
        mac.update(version.as_bytes());
        mac.update(b"\n");
        mac.update(expires.as_bytes());
        mac
    }

    /// A token for `version` valid until `expires` (Unix seconds).
    pub fn sign(&self, version: &str, expires: u64) -> String {
        let expires = expires.to_string();
        let sig = self.mac_for(version, &expires).finalize().into_bytes();
        format!(
            "{SCHEME}:{version}:{expires}:{}",
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    /// The version a token grants, if its signature is right and it has not expired at `now`
    /// (Unix seconds).
    pub fn verify<'t>(&self, token: &'t [u8], now: u64) -> Result<&'t str, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let token = std::str::from_utf8(token).map_err(|_| TokenError::Malformed)?;
        let mut parts = token.split(':');
        let (Some(SCHEME), Some(version), Some(expires), Some(sig), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        if version.is_empty() || expires.is_empty() || !expires.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(TokenError::Malformed);
        }
        let exp: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        // Constant time (the hmac crate compares with `subtle`).
        self.mac_for(version, expires)
            .verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        if now >= exp {
            return Err(TokenError::Expired);
        }
        Ok(version)
    }
}

/// Now, in Unix seconds (0 if the clock is before 1970).
// A token's expiry is checked on the request path, and signed by `kanaria sign-override`,
// against the machine's clock: the time QA and every replica share.
#[allow(clippy::disallowed_methods)]
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `kanaria sign-override`: a token for `version` on `route`, valid for `ttl`. The secret
/// is the route's `override_secret` in `config`, or `KANARIA_OVERRIDE_SECRET`.
pub fn sign_command(
    version: &str,
    ttl: &str,
    route: &str,
    config: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    let ttl = humantime::parse_duration(ttl)
        .map_err(|e| anyhow::anyhow!("--ttl {ttl:?}: {e} (write e.g. \"1h\" or \"30m\")"))?;
    if ttl.is_zero() {
        anyhow::bail!("--ttl must be greater than zero");
    }
    if version.is_empty() || version.contains(':') {
        anyhow::bail!("--version {version:?}: use canary, stable or a version label");
    }
    let secret = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let file: toml::Value =
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            file.get("routes")
                .and_then(|r| r.as_array())
                .and_then(|routes| {
                    routes
                        .iter()
                        .find(|r| r.get("name").and_then(|n| n.as_str()) == Some(route))
                })
                .ok_or_else(|| anyhow::anyhow!("{}: no route {route:?}", path.display()))?
                .get("override_secret")
                .and_then(|s| s.as_str())
                .map(|s| s.trim().to_string())
                .ok_or_else(|| {
                    anyhow::anyhow!("{}: route {route:?} has no override_secret", path.display())
                })?
        }
        None => std::env::var("KANARIA_OVERRIDE_SECRET")
            .map(|s| s.trim().to_string())
            .map_err(|_| anyhow::anyhow!("give -c CONFIG, or set KANARIA_OVERRIDE_SECRET"))?,
    };
    if secret.len() < MIN_SECRET_LEN {
        anyhow::bail!("the override secret must be at least {MIN_SECRET_LEN} bytes");
    }
    let key = OverrideKey::new(secret.as_bytes(), route)
        .ok_or_else(|| anyhow::anyhow!("unusable override secret"))?;
    Ok(key.sign(version, unix_now().saturating_add(ttl.as_secs())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let key = OverrideKey::new(SECRET, "app").unwrap();
        let t = key.sign("canary", 1000);
        assert_eq!(key.verify(t.as_bytes(), 999), Ok("canary"));
        assert_eq!(key.verify(t.as_bytes(), 1000), Err(TokenError::Expired));
    }

    #[test]
    fn tampering_route_secret_or_fields_fails() {
        let key = OverrideKey::new(SECRET, "app").unwrap();
        let t = key.sign("canary", 1000);
        let other_route = OverrideKey::new(SECRET, "other").unwrap();
        assert_eq!(
            other_route.verify(t.as_bytes(), 1),
            Err(TokenError::BadSignature)
        );
        let other_secret = OverrideKey::new(b"another secret of thirty-two bytes!", "app").unwrap();
        assert_eq!(
            other_secret.verify(t.as_bytes(), 1),
            Err(TokenError::BadSignature)
        );
        let forged = t.replace(":canary:", ":stable:");
        assert_eq!(
            key.verify(forged.as_bytes(), 1),
            Err(TokenError::BadSignature)
        );
        let later = t.replace(":1000:", ":9999:");
        assert_eq!(
            key.verify(later.as_bytes(), 1),
            Err(TokenError::BadSignature)
        );
        for bad in [
            "canary",
            "k1:canary:1000",
            "k1:canary:+1000:AAAA",
            "k2:canary:1000:AAAA",
            "",
        ] {
            assert_eq!(
                key.verify(bad.as_bytes(), 1),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }
}
