//! The bodies of the fuzz targets, in the library so that `cargo fuzz` (nightly, `fuzz/`)
//! and the stable regression test (`tests/fuzz_corpus.rs`, which replays the committed
//! corpus) run exactly the same code. Each target panics only when an invariant breaks.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use crate::config::HeaderLimits;
use crate::proxy::edge::{check_request_head, check_request_head_in_full, plain_head};
use crate::split::override_token::OverrideKey;
use crate::split::router::{host_without_port, normalize_path, prefix_matches, Router};
use crate::split::{
    bucket, seed_for, OverrideRule, Reason, SplitRule, StickySource, Track, BUCKETS,
};

/// The config parser and validator: any text gives a config or errors, never a panic
/// (and never a DNS query: validation resolves no name).
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(errors) = crate::config::load_str(text, "fuzz.toml") {
            assert!(!errors.0.is_empty(), "a refused config must say why");
        }
    }
}

fn key() -> &'static OverrideKey {
    static KEY: OnceLock<Option<OverrideKey>> = OnceLock::new();
    KEY.get_or_init(|| OverrideKey::new(b"fuzz-secret-fuzz-secret-fuzz-secret!", "app"))
        .as_ref()
        .unwrap_or_else(|| unreachable!("HMAC accepts any key length"))
}

/// The override-token verifier: arbitrary bytes never verify unless they are exactly a
/// token this key signed; whatever verifies re-signs to the same token.
pub fn override_token(data: &[u8]) {
    let now = 1_700_000_000;
    if let Ok(version) = key().verify(data, now) {
        let s = std::str::from_utf8(data).unwrap_or_default();
        let expires: u64 = s
            .split(':')
            .nth(2)
            .and_then(|e| e.parse().ok())
            .unwrap_or(0);
        assert!(expires > now);
        assert_eq!(
            key().sign(version, expires),
            s,
            "a token verified that we did not sign"
        );
    }
    // Round trip: a label-like input signs and verifies.
    if let Ok(label) = std::str::from_utf8(data) {
        if !label.is_empty() && label.len() < 64 && !label.contains(':') {
            let t = key().sign(label, now + 60);
            assert_eq!(key().verify(t.as_bytes(), now), Ok(label));
            assert!(key().verify(t.as_bytes(), now + 60).is_err());
        }
    }
}

/// The route and split decision against independent statements of what they must do:
/// the route found is the longest whole-segment prefix match of the normalized path, and
/// no other route matches longer; the split sends a user to the canary exactly when their
/// bucket is below the weight, so raising the weight never moves a user back to stable;
/// weight 0 with a signed-override key picks the canary only for a valid token.
pub fn route_split(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let host = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let user = parts.next().unwrap_or_default();
    let over = parts.next().unwrap_or_default();
    let hosts = [vec!["a.example".to_string()], vec![], vec![]];
    let prefixes = ["/", "/api", "/api/v1/"];
    let router = Router::new(hosts.iter().map(Vec::as_slice).zip(prefixes));
    if let Some(norm) = normalize_path(path) {
        assert!(!norm.contains("//") && !norm.contains("/./") && !norm.ends_with("/."));
        assert!(!norm.split('/').any(|seg| seg == ".."));
        let host_is_a = host_without_port(host).eq_ignore_ascii_case("a.example");
        let matching = |i: usize| prefix_matches(prefixes[i], &norm);
        match router.find(Some(host), &norm) {
            Some(i) => {
                assert!(matching(i), "route {i} does not match {norm:?}");
                // Same host group: nothing longer matches.
                let same_group = |j: usize| (j == 0) == (i == 0);
                for j in 0..prefixes.len() {
                    if same_group(j) && matching(j) {
                        assert!(prefixes[j].len() <= prefixes[i].len());
                    }
                }
                // A host route wins only for its host, and always does when it matches.
                assert!(i != 0 || host_is_a);
                assert!(i == 0 || !(host_is_a && matching(0)));
            }
            None => assert!(!(matching(1) || matching(2) || (host_is_a && matching(0)))),
        }
    }
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(user) {
        headers.insert("x-user-id", v);
    }
    if let Ok(v) = http::HeaderValue::from_str(over) {
        headers.insert("x-kanaria-version", v);
    }
    let weight = data.first().map_or(0, |b| u32::from(*b) * BUCKETS / 255);
    let rule = |canary_buckets, key: Option<OverrideKey>| SplitRule {
        sticky: vec![StickySource::Header(http::HeaderName::from_static(
            "x-user-id",
        ))],
        seed: seed_for("app"),
        canary_buckets,
        overrides: OverrideRule {
            header: Some(http::HeaderName::from_static("x-kanaria-version")),
            cookie: None,
            trusted: Vec::new(),
            key,
        },
    };
    let client = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    let labels = ("v1", Some("v2"));
    let (track, reason) = rule(weight, None).decide(&headers, client, labels);
    if reason == Reason::Sticky && weight > 0 {
        let mut buf = [0u8; 16];
        let key = rule(weight, None)
            .user_key(&headers, client, &mut buf)
            .map(<[u8]>::to_vec);
        let expected = key.is_some_and(|k| bucket(seed_for("app"), &k) < weight);
        assert_eq!(track == Track::Canary, expected);
        if track == Track::Canary {
            // Monotone: a higher weight keeps this user on the canary.
            let more = rule(BUCKETS, None).decide(&headers, client, labels);
            assert_eq!(more.0, Track::Canary);
        }
    }
    let (v, _) = rule(0, Some(key().clone())).decide(&headers, client, labels);
    // Weight 0 with a signed-override key: only a valid token can pick the canary.
    if v == Track::Canary {
        let token = headers
            .get("x-kanaria-version")
            .map(|h| h.as_bytes())
            .unwrap_or_default();
        assert!(key()
            .verify(token.trim_ascii(), crate::split::override_token::unix_now())
            .is_ok());
    }
    assert_eq!(
        rule(weight, None).decide(&headers, client, ("v1", None)).0,
        Track::Stable
    );
}

/// The strict request-head check: never panics; whatever passes has CRLF line ends only
/// and at most one framing header.
pub fn request_head(data: &[u8]) {
    let limits = HeaderLimits::default();
    // The one-pass recognition of a plain head never passes what the full check refuses.
    if plain_head(data, &limits) {
        assert_eq!(check_request_head_in_full(data, &limits), Ok(()));
    }
    if check_request_head(data, &limits).is_ok() {
        assert!(data.len() <= limits.max_bytes);
        for (i, b) in data.iter().enumerate() {
            if *b == b'\n' {
                assert!(i > 0 && data[i - 1] == b'\r', "bare LF passed");
            }
        }
    }
}
