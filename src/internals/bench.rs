//! Entry points for the criterion benchmarks (`benches/hot_path.rs`) into request-path code
//! that is otherwise private to the crate: the pure part of the request filter (path
//! normalization, route match, split decision) on a real config snapshot, and the header
//! work on the messages Kanaria forwards. Thin wrappers that call exactly what the proxy
//! hooks call, so later trims of that code can be measured. Not a stable API.

use std::borrow::Cow;
use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::HeaderLimits;
use crate::proxy::edge::check_request_head;
use crate::split::router::normalize_path;
use crate::split::Track;

/// A validated config from TOML text (its routes' split rules and router are what the
/// request filter decides from).
pub struct Config(crate::config::Config);

impl Config {
    /// Parses and validates `toml`.
    pub fn parse(toml: &str) -> Result<Config, String> {
        crate::config::load_str(toml, "bench.toml")
            .map(Config)
            .map_err(|e| e.to_string())
    }

    /// What the request filter decides from the head: the path normalized for routing,
    /// the route matched on host and path, and the version from the route's split rule
    /// (`None`: no route, or a path that climbs above the root).
    pub fn decide(
        &self,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
        client: Option<IpAddr>,
    ) -> Option<Track> {
        let normalized: Cow<'_, str> = normalize_path(path)?;
        let i = self.0.router.find(host, &normalized)?;
        let route = self.0.routes.get(i)?;
        Some(route.split.decide(headers, client, route.labels()).0)
    }
}

/// The strict check of a raw request head with the default limits.
pub fn check_head(raw: &[u8]) -> bool {
    check_request_head(raw, &HeaderLimits::default()).is_ok()
}

/// Hop-by-hop cleanup of a request about to be forwarded (a route without override rules).
pub fn clean_upstream_request(req: &mut RequestHeader) {
    crate::proxy::headers::clean_upstream_request(req, false, None);
}

/// `X-Forwarded-For` and `X-Forwarded-Proto` on a request about to be forwarded, after
/// its cleanup (which finds the forwarding headers it carries), as the proxy does.
pub fn set_forwarding(
    req: &mut RequestHeader,
    peer: Option<IpAddr>,
    trusted: &[IpNet],
) -> pingora::Result<()> {
    let carried = crate::proxy::headers::clean_upstream_request(req, false, None);
    crate::proxy::headers::set_forwarding(req, peer, trusted, "http", carried)
}

/// Framing check and hop-by-hop cleanup of an upstream response.
pub fn clean_upstream_response(resp: &mut ResponseHeader) -> bool {
    crate::proxy::headers::clean_upstream_response(resp, []).is_ok()
}

/// `upstream_response_filter`'s check of an answer's head: is it a stream, judged by its
/// head only (a `101`, or a `Content-Type` among the route's `stream_content_types`)?
pub fn is_stream(resp: &ResponseHeader, stream_content_types: &[String]) -> bool {
    crate::proxy::is_stream(resp, stream_content_types)
}
