//! Route matching: which configured route serves a request, by host and path prefix.
//!
//! Routes that list the request's host are tried first, then routes with no `hosts`
//! (any host). Within each group the longest matching `path_prefix` wins. A prefix matches
//! whole path segments: `/api` matches `/api`, `/api/x` and `/api?q`, not `/apix`; a prefix
//! ending in `/` matches everything below it. Host names compare case-insensitively, and a
//! port in the `Host` header is ignored.
//!
//! The path is matched the way nginx matches `location`: after [`normalize_path`] has
//! decoded percent escapes, merged repeated slashes and resolved `.` and `..` segments, so
//! `/api/../admin` is matched as `/admin`, never by the `/api` route. The request is still
//! forwarded with the path the client sent.

use std::borrow::Cow;
use std::collections::HashMap;

/// Index of routes for matching. Built once per config snapshot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Router {
    /// Lower-cased host → (prefix, route index), longest prefix first.
    by_host: HashMap<String, Vec<(String, usize)>>,
    /// Routes without hosts, longest prefix first.
    any_host: Vec<(String, usize)>,
}

/// Does `prefix` match `path` on a segment boundary?
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => {
            prefix.ends_with('/')
                || rest.is_empty()
                || rest.starts_with('/')
                || rest.starts_with('?')
                || rest.starts_with('#')
        }
    }
}

/// The host part of a `Host` header or URI authority, without port.
pub fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    // The last colon, by a plain byte scan (`rsplit_once` sets up a pattern searcher,
    // several times the cost for a host this short; this runs on every request).
    match host.bytes().rposition(|b| b == b':') {
        Some(i) if host.as_bytes()[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
        _ => host,
    }
}

/// The path used for routing: the part before `?`, percent-decoded, with repeated slashes
/// merged and dot segments resolved. `None` when `..` climbs above the root (nginx answers
/// 400 for such a request). Paths that need none of this are borrowed, not copied.
pub fn normalize_path(path: &str) -> Option<Cow<'_, str>> {
    // One pass, on every request: where the path ends (`?` or `#`), and whether it has a
    // percent escape, a repeated slash or a dot segment to resolve.
    let bytes = path.as_bytes();
    let mut end = bytes.len();
    let mut needs_work = false;
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'?' | b'#' => {
                end = i;
                break;
            }
            b'%' => needs_work = true,
            b'/' => needs_work |= matches!(bytes.get(i + 1), Some(b'/' | b'.')),
            _ => {}
        }
    }
    let path = path.get(..end).unwrap_or(path);
    if !needs_work {
        return Some(Cow::Borrowed(path));
    }
    let decoded = percent_decode(path.as_bytes());
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded.split(|b| *b == b'/') {
        trailing_slash = false;
        match seg {
            b"" | b"." => trailing_slash = true,
            b".." => {
                segments.pop()?;
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for seg in &segments {
        out.push(b'/');
        out.extend_from_slice(seg);
    }
    if out.is_empty() || trailing_slash {
        out.push(b'/');
    }
    Some(Cow::Owned(String::from_utf8_lossy(&out).into_owned()))
}

fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

impl Router {
    /// `routes` yields (hosts, path_prefix) per route, in config order.
    pub fn new<'a>(routes: impl IntoIterator<Item = (&'a [String], &'a str)>) -> Self {
        let mut r = Router::default();
        for (i, (hosts, prefix)) in routes.into_iter().enumerate() {
            if hosts.is_empty() {
                r.any_host.push((prefix.to_string(), i));
            }
            for h in hosts {
                r.by_host
                    .entry(h.to_ascii_lowercase())
                    .or_default()
                    .push((prefix.to_string(), i));
            }
        }
        // Stable sort: among equal prefixes the first route in the file wins.
        let by_len = |a: &(String, usize), b: &(String, usize)| b.0.len().cmp(&a.0.len());
        r.any_host.sort_by(by_len);
        for v in r.by_host.values_mut() {
            v.sort_by(by_len);
        }
        r
    }

    /// Whether any route lists hosts: without, the `Host` is not looked at (nor looked up
    /// by the proxy).
    pub fn matches_hosts(&self) -> bool {
        !self.by_host.is_empty()
    }

    /// The route index for a request, if any.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
        let first = |list: &[(String, usize)]| {
            list.iter()
                .find(|(p, _)| prefix_matches(p, path))
                .map(|(_, i)| *i)
        };
        let host_match = host
            .filter(|_| self.matches_hosts())
            .map(host_without_port)
            .and_then(|h| {
                // Host names are nearly always lower case already: avoid allocating for them.
                if h.bytes().any(|b| b.is_ascii_uppercase()) {
                    self.by_host.get(&h.to_ascii_lowercase())
                } else {
                    self.by_host.get(h)
                }
            });
        host_match
            .and_then(|list| first(list))
            .or_else(|| first(&self.any_host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_and_longest_prefix() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(prefix_matches("/api", "/api?x=1"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api/", "/api/x"));

        let hosts_a = ["Lessons.example.com".to_string()];
        let none: Vec<String> = vec![];
        let r = Router::new([
            (&none[..], "/"),
            (&none[..], "/api"),
            (&hosts_a[..], "/"),
            (&hosts_a[..], "/video"),
        ]);
        assert_eq!(r.find(None, "/x"), Some(0));
        assert_eq!(r.find(Some("other"), "/api/v1"), Some(1));
        assert_eq!(r.find(Some("lessons.example.com:8080"), "/api"), Some(2));
        assert_eq!(r.find(Some("LESSONS.example.com"), "/video/1"), Some(3));
        assert_eq!(host_without_port("[::1]:80"), "::1");
        assert_eq!(host_without_port("a.b"), "a.b");

        let only_api = Router::new([(&none[..], "/api")]);
        assert_eq!(only_api.find(None, "/"), None);
    }

    #[test]
    fn paths_are_normalized_like_nginx_location() {
        let n = |p: &str| normalize_path(p).map(|c| c.into_owned());
        assert_eq!(n("/api/v1?x=/../y").as_deref(), Some("/api/v1"));
        assert_eq!(n("/api/../admin").as_deref(), Some("/admin"));
        assert_eq!(n("/api/%2e%2e/admin").as_deref(), Some("/admin"));
        assert_eq!(n("//api///v1/./x/").as_deref(), Some("/api/v1/x/"));
        assert_eq!(n("/api/..").as_deref(), Some("/"));
        assert_eq!(n("/a/b/..").as_deref(), Some("/a/"));
        assert_eq!(n("/%41pi").as_deref(), Some("/Api"));
        assert_eq!(n("/bad%zz").as_deref(), Some("/bad%zz"));
        assert_eq!(n("/../etc"), None);
        assert_eq!(n(""), Some(String::new()));
        assert!(matches!(
            normalize_path("/plain/path"),
            Some(Cow::Borrowed(_))
        ));

        let none: Vec<String> = vec![];
        let r = Router::new([(&none[..], "/"), (&none[..], "/api")]);
        let route_of = |p: &str| r.find(None, &normalize_path(p).unwrap());
        assert_eq!(route_of("/api/../admin"), Some(0));
        assert_eq!(route_of("//api//x"), Some(1));
    }

    /// The one-pass scan decides as the three searches it replaced did, on every path of
    /// up to six characters from the characters that matter.
    #[test]
    fn the_one_pass_scan_agrees_with_the_searches() {
        let reference = |path: &str| -> (String, bool) {
            let path = path.split(['?', '#']).next().unwrap_or_default();
            let needs_work = path.contains("//") || path.contains("/.") || path.contains('%');
            (path.to_string(), needs_work)
        };
        let alphabet = ['/', '.', '%', '?', '#', 'a'];
        let mut paths = vec![String::new()];
        for _ in 0..6 {
            let longer: Vec<String> = paths
                .iter()
                .filter(|p| p.len() == paths.last().map_or(0, |l| l.len()))
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            paths.extend(longer);
        }
        for p in &paths {
            let (cut, needs_work) = reference(p);
            match normalize_path(p) {
                Some(Cow::Borrowed(b)) => assert!(!needs_work && b == cut, "{p:?}"),
                // Worked on: only when the searches said so (the result is the same code).
                Some(Cow::Owned(_)) | None => assert!(needs_work, "{p:?}"),
            }
        }
    }
}
