//! The edge checks as the proxy hooks run them: admitting a request head, choosing the
//! client address, and cleaning the messages Kanaria forwards.
//!
//! The decisions themselves are in [`crate::edge`] (pure functions); this module applies
//! them to Pingora sessions so `proxy.rs` only calls one function per hook.

use std::net::IpAddr;

use http::header::COOKIE;
use http::HeaderValue;
use ipnet::IpNet;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;

use crate::config::{EdgeSettings, Route};
use crate::edge::{check_request_head, check_response_framing, hop_by_hop_names, Reject};

/// Checks a request head just read and applies the per-connection settings. `Some` means
/// refuse: the caller answers `reject.status()` and closes the connection.
pub fn admit(session: &mut Session, edge: &EdgeSettings) -> Option<Reject> {
    let downstream = session.as_downstream_mut();
    crate::conn_guard::request_started(downstream);
    // HTTP/1 only: an HTTP/2 head has no raw bytes, and h2 framing is not length-ambiguous.
    let raw = downstream.as_http1().map(|h1| h1.get_headers_raw_bytes());
    if let Some(raw) = raw {
        if let Err(reject) = check_request_head(&raw, &edge.limits) {
            downstream.set_keepalive(None);
            return Some(reject);
        }
    }
    downstream.set_read_timeout(Some(edge.body_timeout));
    // Keep the client's `Connection: close` (None); otherwise our idle timeout.
    if downstream.get_keepalive().is_some() {
        downstream.set_keepalive(Some(edge.idle_timeout_secs));
    }
    None
}

/// The client's address for stickiness and override allow-lists: the socket peer, unless
/// the peer is a trusted proxy; then the right-most `X-Forwarded-For` entry that is not a
/// trusted proxy (entries further left are the client's own claims and are ignored).
pub fn client_ip(session: &Session, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())?;
    Some(forwarded_client(
        peer,
        session
            .req_header()
            .headers
            .get_all("x-forwarded-for")
            .iter(),
        trusted,
    ))
}

/// See [`client_ip`]: `xff` are the `X-Forwarded-For` header values in order.
pub fn forwarded_client<'a>(
    peer: IpAddr,
    xff: impl DoubleEndedIterator<Item = &'a HeaderValue>,
    trusted: &[IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for value in xff.rev() {
        let Ok(list) = value.to_str() else {
            return client;
        };
        for entry in list.rsplit(',') {
            let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                // Garbage from an untrusted hop: stop at the last address we can vouch for.
                return client;
            };
            client = ip;
            if !is_trusted(&ip) {
                return client;
            }
        }
    }
    client
}

/// Removes hop-by-hop headers and the route's override header and cookie from a request
/// about to be forwarded. The override is Kanaria's business: the app never sees a token.
pub fn clean_upstream_request(
    upstream_request: &mut RequestHeader,
    upgrading: bool,
    route: Option<&Route>,
) {
    for name in hop_by_hop_names(&upstream_request.headers, upgrading) {
        upstream_request.remove_header(&name);
    }
    if upgrading {
        // `Connection` was removed with the rest; an upgrade still needs it.
        let _ = upstream_request.insert_header(http::header::CONNECTION, "upgrade");
    }
    let Some(rule) = route.map(|r| &r.split.overrides) else {
        return;
    };
    if let Some(h) = &rule.header {
        upstream_request.remove_header(h);
    }
    if let Some(name) = &rule.cookie {
        if let Some(kept) = without_cookie(&upstream_request.headers, name) {
            upstream_request.remove_header(&COOKIE);
            if !kept.is_empty() {
                let _ = upstream_request.insert_header(COOKIE, kept);
            }
        }
    }
}

/// The `Cookie` header without cookie `name`, or `None` when it is not there.
pub fn without_cookie(headers: &http::HeaderMap, name: &str) -> Option<String> {
    let mut found = false;
    let mut kept: Vec<&[u8]> = Vec::new();
    for v in headers.get_all(COOKIE) {
        for pair in v.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            if pair.is_empty() {
                continue;
            }
            let key = pair.split(|b| *b == b'=').next().unwrap_or_default();
            if key.trim_ascii() == name.as_bytes() {
                found = true;
            } else {
                kept.push(pair);
            }
        }
    }
    found.then(|| {
        kept.iter()
            .map(|p| String::from_utf8_lossy(p))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// Checks and cleans an upstream response head. `Err` means the framing is ambiguous:
/// the caller turns it into a 502.
pub fn clean_upstream_response(resp: &mut ResponseHeader) -> Result<(), &'static str> {
    check_response_framing(&resp.headers)?;
    let upgrading = resp.status.as_u16() == 101;
    for name in hop_by_hop_names(&resp.headers, upgrading) {
        // Pingora writes its own `Connection` for the client connection.
        if name != http::header::CONNECTION {
            resp.remove_header(&name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn xff_is_believed_only_from_trusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let lb: IpAddr = "10.0.0.1".parse().unwrap();
        let outsider: IpAddr = "192.0.2.9".parse().unwrap();
        let xff = [hv("1.1.1.1, 203.0.113.5, 10.0.0.7")];
        assert_eq!(forwarded_client(outsider, xff.iter(), &trusted), outsider);
        assert_eq!(
            forwarded_client(lb, xff.iter(), &trusted),
            "203.0.113.5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(forwarded_client(lb, [].iter(), &trusted), lb);
        let garbage = [hv("1.1.1.1, nonsense")];
        assert_eq!(forwarded_client(lb, garbage.iter(), &trusted), lb);
    }

    #[test]
    fn override_cookie_is_cut_out() {
        let mut h = http::HeaderMap::new();
        h.append(COOKIE, hv("a=1; kv=k1:canary:1:x; b=2"));
        assert_eq!(without_cookie(&h, "kv").as_deref(), Some("a=1; b=2"));
        assert_eq!(without_cookie(&h, "zz"), None);
    }
}
