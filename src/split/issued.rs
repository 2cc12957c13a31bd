//! Keys Kanaria issues itself: the `issued_cookie:NAME` user key source.
//!
//! Users without an id (anonymous visitors, a whole school behind one NAT address) would
//! otherwise be keyed by client IP and move between versions in blocks. With an issued
//! cookie, a request carrying no key gets a fresh random id, is split on it like any other
//! key, and its response sets the cookie (`HttpOnly`, `SameSite=Lax`, `Secure` on TLS
//! listeners, `Max-Age` from the route). Later requests send the cookie back and hash to
//! the same bucket on every replica: nothing is stored server-side.
//!
//! Ids are 128 bits, hex: a random per-process seed hashed with a counter (xxh3-128), so
//! ids are unique across processes and restarts without a syscall or a lock per request,
//! and uniformly spread over the buckets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderValue;
use xxhash_rust::xxh3::xxh3_128_with_seed;

/// How a route sets its issued cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCookie {
    pub name: String,
    /// `Max-Age` of the cookie.
    pub max_age: Duration,
}

impl IssuedCookie {
    /// The `Set-Cookie` value carrying `id`. `secure` on TLS listeners.
    pub fn set_cookie(&self, id: &IssuedId, secure: bool) -> Option<HeaderValue> {
        let mut v = String::with_capacity(self.name.len() + 96);
        v.push_str(&self.name);
        v.push('=');
        v.push_str(id.as_str());
        v.push_str("; Path=/; Max-Age=");
        v.push_str(&self.max_age.as_secs().to_string());
        v.push_str("; HttpOnly; SameSite=Lax");
        if secure {
            v.push_str("; Secure");
        }
        HeaderValue::from_str(&v).ok()
    }
}

/// One issued user id: 32 lower-case hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IssuedId([u8; 32]);

impl IssuedId {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        // Hex digits only (see `hex32`).
        std::str::from_utf8(&self.0).unwrap_or("0")
    }
}

/// The id generator of one process.
pub struct IssuedIds {
    seed: u64,
    counter: AtomicU64,
}

impl Default for IssuedIds {
    fn default() -> Self {
        Self::new()
    }
}

impl IssuedIds {
    // The machine's clock only seeds the ids (with the OS's randomness): no time is judged.
    #[allow(clippy::disallowed_methods)]
    pub fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS once per process.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        IssuedIds {
            seed: h.finish(),
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> IssuedId {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        IssuedId(hex32(
            xxh3_128_with_seed(&n.to_le_bytes(), self.seed).to_be_bytes(),
        ))
    }
}

/// 16 bytes as 32 lower-case hex digits, on the stack (issued ids and request ids).
pub(crate) fn hex32(bytes: [u8; 16]) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex_into(&bytes, &mut out);
    out
}

/// Lower-case hex of `bytes` into the first `2 * bytes.len()` bytes of `out`.
pub(crate) fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (byte, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_hex_and_cookies_carry_the_attributes() {
        let ids = IssuedIds::new();
        let set: std::collections::HashSet<_> = (0..10_000).map(|_| ids.next()).collect();
        assert_eq!(set.len(), 10_000);
        let id = ids.next();
        assert!(id.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        let c = IssuedCookie {
            name: "kanaria_uid".into(),
            max_age: Duration::from_secs(3600),
        };
        let plain = c.set_cookie(&id, false).unwrap();
        assert_eq!(
            plain.to_str().unwrap(),
            format!(
                "kanaria_uid={}; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax",
                id.as_str()
            )
        );
        assert!(c
            .set_cookie(&id, true)
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("; Secure"));
    }

    #[test]
    fn issued_ids_spread_evenly_over_buckets() {
        let ids = IssuedIds::new();
        let seed = super::super::seed_for("app");
        let canary = (0..20_000)
            .filter(|_| super::super::bucket(seed, ids.next().as_bytes()) < 2_000)
            .count();
        // 20 % of 20,000 = 4,000; binomial sd ≈ 57.
        assert!((3_700..4_300).contains(&canary), "{canary}");
    }
}
