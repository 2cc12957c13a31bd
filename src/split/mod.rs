//! The user split: which version (stable or canary) one request goes to.
//!
//! The decision is sticky per *user*, not per request: the user key (a header, a cookie or
//! the client IP, first present wins) is hashed into one of [`BUCKETS`] buckets with
//! `xxh3_64_with_seed(key, seed)`, where `seed = xxh3_64(salt)` and the salt is the route
//! name unless `hash_salt` is set. Bucket `b` goes to the canary when `b < weight × 100`
//! (weight in percent, 0.01 steps). So the same user lands on the same version on every
//! request, after a restart and on every proxy instance, and raising the weight only ever
//! moves users from stable to canary. Overrides (header or cookie, optionally only from
//! trusted CIDRs) force a version for testers. A route may also let Kanaria *issue* the
//! key (`issued_cookie:NAME`, see [`issued`]): a request without any key gets a fresh random
//! id, is split on it, and the response sets the cookie, so anonymous users behind one NAT
//! address are spread like users with ids instead of moving as one block.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

pub mod issued;
pub mod override_token;
pub mod router;

/// Number of buckets: weights have 0.01 % resolution.
pub const BUCKETS: u32 = 10_000;

/// Which pool of a route serves a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Track {
    Stable,
    Canary,
}

impl Track {
    pub fn as_str(self) -> &'static str {
        match self {
            Track::Stable => "stable",
            Track::Canary => "canary",
        }
    }
}

/// Where a user key is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickySource {
    /// A request header, lower-cased name.
    Header(http::HeaderName),
    /// A cookie by name.
    Cookie(String),
    /// A cookie Kanaria sets itself when a request has no key yet (see [`issued`]).
    IssuedCookie(String),
    /// The client's IP address: 4 octets for IPv4, 16 for IPv6.
    ClientIp,
}

impl StickySource {
    /// Parses `header:NAME`, `cookie:NAME`, `issued_cookie:NAME` or `client_ip`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "client_ip" {
            return Ok(StickySource::ClientIp);
        }
        if let Some(name) = s.strip_prefix("header:") {
            return http::HeaderName::from_bytes(name.trim().as_bytes())
                .map(StickySource::Header)
                .map_err(|_| format!("{name:?} is not a valid header name"));
        }
        if let Some(name) = s.strip_prefix("cookie:") {
            return cookie_name(name).map(StickySource::Cookie);
        }
        if let Some(name) = s.strip_prefix("issued_cookie:") {
            return cookie_name(name).map(StickySource::IssuedCookie);
        }
        Err(format!(
            "{s:?} is not a user key source; use \"header:NAME\", \"cookie:NAME\", \"issued_cookie:NAME\" or \"client_ip\""
        ))
    }
}

/// A cookie name: an RFC 6265 token (no separators, controls or spaces).
fn cookie_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    let token = |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("{name:?} is not a valid cookie name"));
    }
    Ok(name.to_string())
}

/// The per-route seed of the user hash.
pub fn seed_for(salt: &str) -> u64 {
    xxh3_64(salt.as_bytes())
}

/// The bucket, `0..BUCKETS`, of one user key.
#[inline]
pub fn bucket(seed: u64, key: &[u8]) -> u32 {
    (xxh3_64_with_seed(key, seed) % u64::from(BUCKETS)) as u32
}

/// Converts a percentage (0..=100, 0.01 steps) into canary buckets, or says why not.
pub fn weight_to_buckets(percent: f64) -> Result<u32, String> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return Err(format!("{percent} is not in 0..=100"));
    }
    let scaled = percent * 100.0;
    let rounded = scaled.round();
    if (scaled - rounded).abs() > 1e-6 {
        return Err(format!("{percent} has more than two decimals (0.01 steps)"));
    }
    Ok(rounded as u32)
}

/// Buckets back to percent, for display.
pub fn buckets_to_percent(buckets: u32) -> f64 {
    f64::from(buckets) / 100.0
}

/// Finds the value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            let (k, v) = (&pair[..eq], &pair[eq + 1..]);
            (k.trim_ascii() == name.as_bytes()).then(|| v.trim_ascii())
        })
        .filter(|v| !v.is_empty())
}

/// How the version of a request was chosen (logged and, later, counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Bucket of the user key against the weight.
    Sticky,
    /// No user key at all (no client address either): stable.
    NoKey,
    /// An override header or cookie.
    Override,
}

/// Override settings of one route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverrideRule {
    pub header: Option<http::HeaderName>,
    pub cookie: Option<String>,
    /// Empty: anyone may override.
    pub trusted: Vec<IpNet>,
    /// With a key, only signed unexpired tokens count (see [`crate::split::override_token`]).
    pub key: Option<crate::split::override_token::OverrideKey>,
}

impl OverrideRule {
    pub fn is_enabled(&self) -> bool {
        self.header.is_some() || self.cookie.is_some()
    }

    fn allowed(&self, client: Option<IpAddr>) -> bool {
        self.trusted.is_empty()
            || client.is_some_and(|ip| self.trusted.iter().any(|n| n.contains(&ip)))
    }

    /// The forced version, if the request carries a valid override and may use it.
    pub fn forced(
        &self,
        headers: &HeaderMap,
        client: Option<IpAddr>,
        labels: (&str, Option<&str>),
    ) -> Option<Track> {
        if !self.is_enabled() {
            return None;
        }
        let value = self
            .header
            .as_ref()
            .and_then(|h| headers.get(h))
            .map(|v| v.as_bytes())
            .or_else(|| self.cookie.as_deref().and_then(|c| cookie(headers, c)))?;
        // The trusted networks are checked only for requests that do ask for a version:
        // nearly all requests carry no override, and skip the CIDR scan.
        if !self.allowed(client) {
            return None;
        }
        let value = value.trim_ascii();
        let value = match &self.key {
            Some(key) => match key.verify(value, crate::split::override_token::unix_now()) {
                Ok(version) => version.as_bytes(),
                Err(e) => {
                    log::debug!("override token refused: {e}");
                    return None;
                }
            },
            None => value,
        };
        if value.eq_ignore_ascii_case(b"stable") || value == labels.0.as_bytes() {
            Some(Track::Stable)
        } else if value.eq_ignore_ascii_case(b"canary")
            || Some(value) == labels.1.map(str::as_bytes)
        {
            Some(Track::Canary)
        } else {
            None
        }
    }
}

/// Everything the split needs to know about one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitRule {
    pub sticky: Vec<StickySource>,
    pub seed: u64,
    /// Canary buckets: `0..=BUCKETS`.
    pub canary_buckets: u32,
    pub overrides: OverrideRule,
}

impl SplitRule {
    /// The user key of a request: the first configured source that is present, else the
    /// client IP. Returns the bytes to hash, borrowed where possible.
    pub fn user_key<'a>(
        &self,
        headers: &'a HeaderMap,
        client: Option<IpAddr>,
        ip_buf: &'a mut [u8; 16],
    ) -> Option<&'a [u8]> {
        self.user_key_issued(headers, client, ip_buf, None)
    }

    /// The issued cookie's name, when this route issues user keys.
    pub fn issued_cookie(&self) -> Option<&str> {
        self.sticky.iter().find_map(|s| match s {
            StickySource::IssuedCookie(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// Whether a request needs a freshly issued key: the route issues keys and no source
    /// up to the issued cookie (included) is present. Sources after it are never reached.
    pub fn needs_issued_key(&self, headers: &HeaderMap) -> bool {
        // Only a rule with an issued cookie issues keys: every other rule answers `false`
        // below, after looking its sources up (which `decide` does again).
        if !self
            .sticky
            .iter()
            .any(|s| matches!(s, StickySource::IssuedCookie(_)))
        {
            return false;
        }
        for src in &self.sticky {
            match src {
                StickySource::Header(h) => {
                    if headers
                        .get(h)
                        .is_some_and(|v| !v.as_bytes().trim_ascii().is_empty())
                    {
                        return false;
                    }
                }
                StickySource::Cookie(c) => {
                    if cookie(headers, c).is_some() {
                        return false;
                    }
                }
                StickySource::IssuedCookie(c) => return cookie(headers, c).is_none(),
                StickySource::ClientIp => return false,
            }
        }
        false
    }

    /// [`Self::user_key`], with `issued` standing in for an absent issued cookie.
    pub fn user_key_issued<'a>(
        &self,
        headers: &'a HeaderMap,
        client: Option<IpAddr>,
        ip_buf: &'a mut [u8; 16],
        issued: Option<&'a [u8]>,
    ) -> Option<&'a [u8]> {
        for src in &self.sticky {
            let found = match src {
                StickySource::Header(h) => headers
                    .get(h)
                    .map(|v| v.as_bytes().trim_ascii())
                    .filter(|v| !v.is_empty()),
                StickySource::Cookie(c) => cookie(headers, c),
                StickySource::IssuedCookie(c) => cookie(headers, c).or(issued),
                StickySource::ClientIp => None,
            };
            if found.is_some() {
                return found;
            }
            if *src == StickySource::ClientIp {
                break;
            }
        }
        match client? {
            IpAddr::V4(v4) => {
                ip_buf[..4].copy_from_slice(&v4.octets());
                Some(&ip_buf[..4])
            }
            IpAddr::V6(v6) => {
                *ip_buf = v6.octets();
                Some(&ip_buf[..])
            }
        }
    }

    /// The user's bucket, for the access log (`None` without any key).
    pub fn bucket_of(
        &self,
        headers: &HeaderMap,
        client: Option<IpAddr>,
        issued: Option<&[u8]>,
    ) -> Option<u32> {
        let mut buf = [0u8; 16];
        self.user_key_issued(headers, client, &mut buf, issued)
            .map(|k| bucket(self.seed, k))
    }

    /// The version for one request. `has_canary` is false when the route has no canary
    /// pool; then every request is stable whatever the weight or an override says.
    pub fn decide(
        &self,
        headers: &HeaderMap,
        client: Option<IpAddr>,
        labels: (&str, Option<&str>),
    ) -> (Track, Reason) {
        self.decide_issued(headers, client, labels, None)
    }

    /// [`Self::decide`] for a request that was just issued the key `issued` (it carries
    /// no key of its own; see [`Self::needs_issued_key`]).
    pub fn decide_issued(
        &self,
        headers: &HeaderMap,
        client: Option<IpAddr>,
        labels: (&str, Option<&str>),
        issued: Option<&[u8]>,
    ) -> (Track, Reason) {
        if labels.1.is_none() {
            return (Track::Stable, Reason::Sticky);
        }
        if let Some(v) = self.overrides.forced(headers, client, labels) {
            return (v, Reason::Override);
        }
        if self.canary_buckets == 0 {
            return (Track::Stable, Reason::Sticky);
        }
        let mut buf = [0u8; 16];
        match self.user_key_issued(headers, client, &mut buf, issued) {
            Some(key) if bucket(self.seed, key) < self.canary_buckets => {
                (Track::Canary, Reason::Sticky)
            }
            Some(_) => (Track::Stable, Reason::Sticky),
            None => (Track::Stable, Reason::NoKey),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(sticky: &[&str], pct: f64) -> SplitRule {
        SplitRule {
            sticky: sticky
                .iter()
                .map(|s| StickySource::parse(s).unwrap())
                .collect(),
            seed: seed_for("app"),
            canary_buckets: weight_to_buckets(pct).unwrap(),
            overrides: OverrideRule::default(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    /// Computed independently with Python's `xxhash` package:
    /// `xxh3_64_intdigest(key, seed=xxh3_64_intdigest(salt)) % 10000`.
    const PINNED_APP: [u32; 4] = [6573, 3893, 5207, 9035];
    const PINNED_OTHER: u32 = 3736;

    #[test]
    fn bucket_is_stable_across_builds() {
        // Pinned values: a change of the hash or the seeding would move every user of every
        // running rollout, and must fail here first.
        let pinned: Vec<u32> = ["user-1", "user-2", "alice", ""]
            .iter()
            .map(|k| bucket(seed_for("app"), k.as_bytes()))
            .collect();
        assert_eq!(pinned, PINNED_APP);
        assert_eq!(bucket(seed_for("other"), b"user-1"), PINNED_OTHER);
    }

    #[test]
    fn weights_parse_in_hundredths() {
        assert_eq!(weight_to_buckets(5.0), Ok(500));
        assert_eq!(weight_to_buckets(0.01), Ok(1));
        assert_eq!(weight_to_buckets(100.0), Ok(10_000));
        assert!(weight_to_buckets(100.5).is_err());
        assert!(weight_to_buckets(-1.0).is_err());
        assert!(weight_to_buckets(1.234).is_err());
        assert!(weight_to_buckets(f64::NAN).is_err());
    }

    #[test]
    fn raising_the_weight_never_moves_a_canary_user_back() {
        let low = rule(&["header:x-user-id"], 10.0);
        let high = rule(&["header:x-user-id"], 30.0);
        let labels = ("v1", Some("v2"));
        let mut canary_low = 0;
        for i in 0..5000 {
            let h = headers(&[("x-user-id", &format!("user-{i}"))]);
            let (a, _) = low.decide(&h, None, labels);
            let (b, _) = high.decide(&h, None, labels);
            if a == Track::Canary {
                canary_low += 1;
                assert_eq!(b, Track::Canary, "user-{i} moved back to stable");
            }
        }
        assert!(
            (400..600).contains(&canary_low),
            "{canary_low} of 5000 at 10%"
        );
    }

    #[test]
    fn first_present_source_wins_then_client_ip() {
        let r = rule(&["header:x-user-id", "cookie:session"], 50.0);
        let mut buf = [0u8; 16];
        let h = headers(&[("cookie", "a=1; session=abc ; b=2")]);
        assert_eq!(r.user_key(&h, None, &mut buf), Some(&b"abc"[..]));
        let h = headers(&[("x-user-id", "u7"), ("cookie", "session=abc")]);
        assert_eq!(r.user_key(&h, None, &mut buf), Some(&b"u7"[..]));
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            r.user_key(&HeaderMap::new(), Some(ip), &mut buf),
            Some(&[10u8, 1, 2, 3][..])
        );
        assert_eq!(r.user_key(&HeaderMap::new(), None, &mut buf), None);
    }

    #[test]
    fn issued_keys_only_for_requests_without_a_key() {
        let r = rule(&["header:x-user-id", "issued_cookie:uid"], 50.0);
        assert_eq!(r.issued_cookie(), Some("uid"));
        assert!(r.needs_issued_key(&HeaderMap::new()));
        assert!(!r.needs_issued_key(&headers(&[("x-user-id", "u1")])));
        assert!(!r.needs_issued_key(&headers(&[("cookie", "a=1; uid=abc")])));
        let mut buf = [0u8; 16];
        let h = headers(&[("cookie", "uid=abc")]);
        assert_eq!(
            r.user_key_issued(&h, None, &mut buf, Some(b"new")),
            Some(&b"abc"[..])
        );
        assert_eq!(
            r.user_key_issued(&HeaderMap::new(), None, &mut buf, Some(b"new")),
            Some(&b"new"[..])
        );
        // The issued key and the cookie carrying it later hash alike.
        let labels = ("v1", Some("v2"));
        let h = headers(&[("cookie", "uid=k1")]);
        assert_eq!(
            r.decide(&h, None, labels),
            r.decide_issued(&HeaderMap::new(), None, labels, Some(b"k1"))
        );
        assert!(!rule(&["client_ip"], 5.0).needs_issued_key(&HeaderMap::new()));
    }

    #[test]
    fn overrides_respect_trusted_cidrs_and_labels() {
        let mut r = rule(&["header:x-user-id"], 0.0);
        r.overrides = OverrideRule {
            header: Some(http::HeaderName::from_static("x-kanaria-version")),
            cookie: Some("kv".into()),
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
            key: None,
        };
        let labels = ("v1", Some("v2"));
        let inside: IpAddr = "10.9.9.9".parse().unwrap();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        let h = headers(&[("x-kanaria-version", "canary")]);
        assert_eq!(r.decide(&h, Some(inside), labels).0, Track::Canary);
        assert_eq!(r.decide(&h, Some(outside), labels).0, Track::Stable);
        let h = headers(&[("cookie", "kv=v2")]);
        assert_eq!(
            r.decide(&h, Some(inside), labels),
            (Track::Canary, Reason::Override)
        );
        let h = headers(&[("x-kanaria-version", "bogus")]);
        assert_eq!(r.decide(&h, Some(inside), labels).1, Reason::Sticky);
        // No canary pool: nothing can force one.
        let h = headers(&[("x-kanaria-version", "canary")]);
        assert_eq!(r.decide(&h, Some(inside), ("v1", None)).0, Track::Stable);
    }

    #[test]
    fn sticky_source_parse_errors_say_what_is_allowed() {
        assert!(StickySource::parse("query:u")
            .unwrap_err()
            .contains("header:NAME"));
        assert!(StickySource::parse("header:bad name").is_err());
        assert!(StickySource::parse("cookie:").is_err());
    }
}
