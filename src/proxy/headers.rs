//! The edge checks as the proxy hooks run them: admitting a request head, choosing the
//! client address, and cleaning the messages Kanaria forwards. Every forwarding header
//! (`X-Forwarded-For`, `X-Forwarded-Proto`) is set here, in [`set_forwarding`].
//!
//! The decisions themselves are in [`crate::proxy::edge`] (pure functions); this module applies
//! them to Pingora sessions so the hooks only call one function each.

use std::fmt::Write as _;
use std::net::IpAddr;

use http::header::{HeaderName, COOKIE};
use http::HeaderValue;
use ipnet::IpNet;
use pingora::http::{PreparedHeaderName, RequestHeader, ResponseHeader};
use pingora::proxy::Session;

use crate::config::EdgeSettings;
use crate::proxy::edge::{check_request_head, Reject};
use crate::runtime::Route;

/// Checks a request head just read and applies the per-connection settings. `Some` means
/// refuse: the caller answers `reject.status()` and closes the connection.
pub fn admit(session: &mut Session, edge: &EdgeSettings) -> Option<Reject> {
    let downstream = session.as_downstream_mut();
    // The guard also bounds the idle wait before the next request (`edge.idle_timeout`), so
    // Pingora's keep-alive stays as the client asked (on, without a timeout of its own; or
    // off for `Connection: close`).
    crate::proxy::conn_guard::request_started(downstream, edge.idle_timeout_secs);
    // HTTP/1 only: an HTTP/2 head has no raw bytes, and h2 framing is not length-ambiguous.
    let raw = downstream.as_http1().map(|h1| h1.get_headers_raw_bytes());
    if let Some(raw) = raw {
        if let Err(reject) = check_request_head(&raw, &edge.limits) {
            downstream.set_keepalive(None);
            return Some(reject);
        }
    }
    downstream.set_read_timeout(Some(edge.body_timeout));
    // Requests a client pipelines on one HTTP/1.1 connection are answered one after the
    // other, in order (RFC 9112 §9.3.2). Without this Pingora answers the first and closes
    // the connection, dropping the others although its answer said `keep-alive`. Kept
    // for the connection's later requests; a no-op on HTTP/2.
    downstream.set_pipelining_enabled(true);
    None
}

/// The socket peer's address: what `X-Forwarded-For` appends.
pub fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// The client's address for stickiness and override allow-lists: the socket peer, unless
/// the peer is a trusted proxy; then the right-most `X-Forwarded-For` entry that is not a
/// trusted proxy (entries further left are the client's own claims and are ignored).
pub fn client_ip(session: &Session, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = peer_ip(session)?;
    // Most peers are not trusted proxies (none are by default): no header lookup for them.
    if !trusted.iter().any(|n| n.contains(&peer)) {
        return Some(peer);
    }
    Some(forwarded_client(
        peer,
        session.req_header().headers.get_all(&XFF_NAME).iter(),
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

/// Which forwarding headers a request about to go upstream carried from the client (or an
/// earlier proxy): [`set_forwarding`] replaces those and appends the others, without a
/// lookup of its own. `true` may also mean "carried, and removed since" (a hop-by-hop
/// name): then the header is replaced where it could have been appended, which is right
/// too. It is never `false` for a header the request has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub x_forwarded_for: bool,
    pub x_forwarded_proto: bool,
}

/// Removes hop-by-hop headers and the route's override header and cookie from a request
/// about to be forwarded. The override is Kanaria's business: the app never sees a token.
/// The same pass over the names finds the forwarding headers the request carries.
pub fn clean_upstream_request(
    upstream_request: &mut RequestHeader,
    upgrading: bool,
    route: Option<&Route>,
) -> Carried {
    let scan = crate::proxy::edge::scan::<false, 2>(
        &upstream_request.headers,
        upgrading,
        false,
        [&XFF_NAME, &XFP_NAME],
    );
    let carried = Carried {
        x_forwarded_for: scan.present & 1 != 0,
        x_forwarded_proto: scan.present & 2 != 0,
    };
    for name in scan.hop_by_hop {
        upstream_request.remove_header(&name);
    }
    if upgrading {
        // `Connection` was removed with the rest; an upgrade still needs it.
        let _ = upstream_request.insert_header(http::header::CONNECTION, "upgrade");
    }
    let Some(rule) = route.map(|r| &r.split.overrides) else {
        return carried;
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
    carried
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

// Parsed once, with their wire case: looked up by the name, inserted with no parse and no
// allocation per request (the vendored Pingora's `PreparedHeaderName`, vendor/patches/0001).
const X_FORWARDED_FOR: PreparedHeaderName = PreparedHeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: PreparedHeaderName = PreparedHeaderName::from_static("x-forwarded-proto");
const XFF_NAME: HeaderName = HeaderName::from_static("x-forwarded-for");
const XFP_NAME: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Appends `ip` as text. IPv4 (the common case) by [`ipv4_text`]: `write!` through the
/// formatting machinery costs more than the rest of a header (or of an access log line's
/// other fields). Used by both.
pub(crate) fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut buf = [0u8; 15];
            let len = ipv4_text(v4, &mut buf);
            // Digits and dots: always UTF-8.
            out.push_str(std::str::from_utf8(&buf[..len]).unwrap_or_default());
        }
        // Writing to a String cannot fail.
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// Sets the forwarding headers of a request about to go upstream. `X-Forwarded-For` gets
/// the socket peer appended to what earlier proxies wrote. `X-Forwarded-Proto` keeps what a
/// trusted proxy sent (it terminated the client's connection and knows its scheme) and is
/// otherwise the scheme of the listener the request came in on: a client cannot claim
/// `https` on a plain connection. `carried` (from [`clean_upstream_request`]) says which of
/// the two the request already has: those are replaced, the others appended.
///
/// Both are wire headers (the vendored Pingora's `insert_wire_header`, vendor/patches/0012):
/// written after the request's other headers when it is sent, not inserted into its header
/// maps; `headers.get` does not see them (`forwarded_headers` in the tests does).
pub fn set_forwarding(
    upstream_request: &mut RequestHeader,
    peer: Option<IpAddr>,
    trusted: &[IpNet],
    listener_scheme: &'static str,
    carried: Carried,
) -> pingora::Result<()> {
    if let Some(ip) = peer {
        if !carried.x_forwarded_for {
            // The common case: no earlier proxy, so the value is the peer's address alone,
            // appended without a lookup.
            upstream_request.append_wire_header(X_FORWARDED_FOR, peer_value(ip))?;
        } else {
            // Several XFF headers fold into one list, built in one buffer sized up front,
            // which replaces them.
            let earlier = upstream_request.headers.get_all(&XFF_NAME);
            let mut xff =
                String::with_capacity(earlier.iter().map(|v| v.len() + 2).sum::<usize>() + 39);
            for v in earlier {
                if let Ok(text) = v.to_str() {
                    xff.push_str(text);
                    xff.push_str(", ");
                }
            }
            push_ip(&mut xff, ip);
            upstream_request.insert_wire_header(X_FORWARDED_FOR, xff)?;
        }
    }
    let from_trusted = peer.is_some_and(|ip| trusted.iter().any(|n| n.contains(&ip)));
    // Looked up only when it would be believed (no peer is trusted by default).
    let proto = (from_trusted && carried.x_forwarded_proto)
        .then(|| upstream_request.headers.get(&XFP_NAME))
        .flatten()
        .and_then(|v| forwarded_scheme(v.as_bytes()));
    // A static value: no copy, no allocation (a `&str` value is copied into a new buffer).
    let proto = HeaderValue::from_static(proto.unwrap_or(listener_scheme));
    if carried.x_forwarded_proto {
        // A client's own `X-Forwarded-Proto` is replaced.
        upstream_request.insert_wire_header(X_FORWARDED_PROTO, proto)?;
    } else {
        upstream_request.append_wire_header(X_FORWARDED_PROTO, proto)?;
    }
    Ok(())
}

/// The peer's address as text in a shared buffer: a clone counts a reference.
struct IpText {
    buf: [u8; 39],
    len: usize,
}

impl AsRef<[u8]> for IpText {
    fn as_ref(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

thread_local! {
    /// The last peer address a worker thread wrote an `X-Forwarded-For` for, and the value:
    /// the requests of a kept-alive connection (and, behind a load balancer, of its few
    /// addresses) repeat it, and the text is then neither written nor allocated again.
    static PEER_VALUE: std::cell::Cell<Option<(IpAddr, HeaderValue)>> =
        const { std::cell::Cell::new(None) };
}

/// The `X-Forwarded-For` value of a request without an earlier proxy: `ip` as text.
fn peer_value(ip: IpAddr) -> HeaderValue {
    PEER_VALUE.with(|last| {
        let value = match last.take() {
            Some((seen, value)) if seen == ip => value,
            _ => {
                let mut text = IpText {
                    buf: [0; 39],
                    len: 0,
                };
                match ip {
                    IpAddr::V4(v4) => {
                        // Written in place: the first 15 bytes of the buffer.
                        if let Some((first, _)) = text.buf.split_first_chunk_mut::<15>() {
                            text.len = ipv4_text(v4, first);
                        }
                    }
                    IpAddr::V6(_) => {
                        let mut s = String::with_capacity(39);
                        push_ip(&mut s, ip);
                        // An IPv6 address is at most 39 characters (eight groups of four
                        // and seven colons); `get_mut` keeps a longer one from panicking.
                        if let Some(dst) = text.buf.get_mut(..s.len()) {
                            dst.copy_from_slice(s.as_bytes());
                            text.len = s.len();
                        }
                    }
                }
                // An address's text is always a valid header value.
                HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text))
                    .unwrap_or(HeaderValue::from_static("unknown"))
            }
        };
        last.set(Some((ip, value.clone())));
        value
    })
}

/// Writes `ip` as dotted-quad text into `buf`; returns its length. 15 bytes always suffice
/// (four octets of at most three digits, three dots), so the indexing cannot go out of
/// bounds.
fn ipv4_text(ip: std::net::Ipv4Addr, buf: &mut [u8; 15]) -> usize {
    let mut len = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        // At most three digits, without leading zeros.
        if octet >= 100 {
            buf[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            buf[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        buf[len] = b'0' + octet % 10;
        len += 1;
    }
    len
}

/// The scheme a trusted proxy forwarded: only `http` or `https` (the first of a list).
fn forwarded_scheme(value: &[u8]) -> Option<&'static str> {
    let first = value.split(|b| *b == b',').next()?.trim_ascii();
    if first.eq_ignore_ascii_case(b"https") {
        Some("https")
    } else if first.eq_ignore_ascii_case(b"http") {
        Some("http")
    } else {
        None
    }
}

/// Checks and cleans an upstream response head. `Err` means the framing is ambiguous:
/// the caller turns it into a 502. `Ok` has bit `i` set when the response carries
/// `watch[i]` (the headers Kanaria adds to it: replaced when there, appended otherwise).
pub fn clean_upstream_response<const W: usize>(
    resp: &mut ResponseHeader,
    watch: [&HeaderName; W],
) -> Result<u32, &'static str> {
    let upgrading = resp.status.as_u16() == 101;
    // Pingora writes its own `Connection` for the client connection.
    let scan = crate::proxy::edge::scan::<true, W>(&resp.headers, upgrading, true, watch);
    scan.framing?;
    for name in scan.hop_by_hop {
        resp.remove_header(&name);
    }
    Ok(scan.present)
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
    fn forwarded_proto_is_believed_only_from_trusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let forwarded = |peer: &str, sent: Option<&str>| {
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            if let Some(v) = sent {
                req.insert_header(X_FORWARDED_PROTO, v).unwrap();
            }
            forward(&mut req, peer.parse().ok(), &trusted, "http").unwrap();
            let wire = forwarded_headers(&req);
            (wire[&XFP_NAME].clone(), wire[&XFF_NAME].clone())
        };
        assert_eq!(forwarded("10.0.0.1", Some("https")).0, "https");
        assert_eq!(forwarded("10.0.0.1", Some("HTTPS, http")).0, "https");
        assert_eq!(forwarded("10.0.0.1", Some("gopher")).0, "http");
        assert_eq!(forwarded("10.0.0.1", None).0, "http");
        // A client cannot claim https on a plain connection.
        assert_eq!(forwarded("192.0.2.9", Some("https")).0, "http");
        assert_eq!(forwarded("192.0.2.9", None).1, "192.0.2.9");
    }

    /// As the proxy does: the request cleaned, then its forwarding headers set.
    fn forward(
        req: &mut RequestHeader,
        peer: Option<IpAddr>,
        trusted: &[IpNet],
        scheme: &'static str,
    ) -> pingora::Result<()> {
        let carried = clean_upstream_request(req, false, None);
        set_forwarding(req, peer, trusted, scheme, carried)
    }

    #[test]
    fn forwarded_for_of_each_peer_on_one_thread() {
        // The per-thread value of the last peer: reused for the same peer, rebuilt for
        // another, and never the wrong one.
        for peer in [
            "192.0.2.1",
            "192.0.2.1",
            "198.51.100.20",
            "2001:db8::7",
            "192.0.2.1",
        ] {
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            forward(&mut req, peer.parse().ok(), &[], "http").unwrap();
            assert_eq!(forwarded_headers(&req)[&XFF_NAME], peer);
        }
    }

    #[test]
    fn carried_headers_are_found_and_replaced_once() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("X-Forwarded-Proto", "https").unwrap();
        let carried = clean_upstream_request(&mut req, false, None);
        assert_eq!(
            carried,
            Carried {
                x_forwarded_for: false,
                x_forwarded_proto: true
            }
        );
        // A client's `Connection` naming its `X-Forwarded-For` removes it: "carried" then
        // means replaced by the peer alone, sent once.
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("x-forwarded-for", "203.0.113.9").unwrap();
        req.append_header("connection", "x-forwarded-for").unwrap();
        forward(&mut req, "192.0.2.5".parse().ok(), &[], "http").unwrap();
        let wire = forwarded_headers(&req);
        assert_eq!(wire[&XFF_NAME], "192.0.2.5");
        assert_eq!(wire[&XFP_NAME], "http");
    }

    /// The headers as the upstream receives them (the request serialized and its names
    /// and values read back), one value per name.
    fn forwarded_headers(req: &RequestHeader) -> std::collections::HashMap<HeaderName, String> {
        let mut wire = Vec::new();
        req.header_to_h1_wire(&mut wire);
        let text = String::from_utf8(wire).unwrap();
        let mut seen = std::collections::HashMap::new();
        for line in text.split_terminator("\r\n") {
            let (name, value) = line.split_once(": ").unwrap();
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert!(seen.insert(name, value.to_string()).is_none(), "{text}");
        }
        seen
    }

    #[test]
    fn forwarded_for_appends_to_earlier_proxies_and_replaces_their_headers() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("x-forwarded-for", "203.0.113.9").unwrap();
        req.append_header("X-Forwarded-For", "198.51.100.1, 10.0.0.2")
            .unwrap();
        req.append_header("x-forwarded-proto", "https").unwrap();
        forward(&mut req, "192.0.2.77".parse().ok(), &[], "http").unwrap();
        let wire = forwarded_headers(&req);
        assert_eq!(
            wire[&XFF_NAME],
            "203.0.113.9, 198.51.100.1, 10.0.0.2, 192.0.2.77"
        );
        assert_eq!(wire[&XFP_NAME], "http");
        assert_eq!(wire.len(), 2);
        // IPv6 peers, with and without earlier proxies.
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        forward(&mut req, "2001:db8::1".parse().ok(), &[], "https").unwrap();
        assert_eq!(forwarded_headers(&req)[&XFF_NAME], "2001:db8::1");
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("x-forwarded-for", "192.0.2.1").unwrap();
        forward(&mut req, "::1".parse().ok(), &[], "https").unwrap();
        assert_eq!(forwarded_headers(&req)[&XFF_NAME], "192.0.2.1, ::1");
    }

    #[test]
    fn ipv4_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "1.20.201.5",
        ] {
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            let mut buf = [0u8; 15];
            let len = ipv4_text(ip, &mut buf);
            assert_eq!(std::str::from_utf8(&buf[..len]).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn ip_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.255.9",
            "192.168.100.99",
            "255.255.255.255",
            "::1",
            "2001:db8::ff00:42:8329",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut buf = String::new();
            push_ip(&mut buf, ip);
            assert_eq!(buf, ip.to_string());
        }
    }

    #[test]
    fn override_cookie_is_cut_out() {
        let mut h = http::HeaderMap::new();
        h.append(COOKIE, hv("a=1; kv=k1:canary:1:x; b=2"));
        assert_eq!(without_cookie(&h, "kv").as_deref(), Some("a=1; b=2"));
        assert_eq!(without_cookie(&h, "zz"), None);
    }
}
