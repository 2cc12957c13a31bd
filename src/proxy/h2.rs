//! HTTP/2 towards clients: the limits of each connection, from `[edge]`.
//!
//! HTTP/2 is offered through ALPN on TLS listeners (`[proxy.tls] http2`) and, with
//! `[proxy] h2c = true`, with prior knowledge on the plain ones. The HTTP/1-specific edge
//! checks (request smuggling through `Content-Length`/`Transfer-Encoding`, the header
//! deadline against slowloris) do not apply to HTTP/2 frames; there, `h2` enforces the
//! framing and these limits bound what one connection may hold.

use pingora::protocols::http::v2::server::H2Options;

use crate::config::RestartSettings;
use crate::runtime::Pool;

/// The HTTP/2 server settings: concurrent streams and decoded header list size.
pub fn options(restart: &RestartSettings) -> H2Options {
    let mut o = pingora::protocols::http::v2::server::default_h2_options();
    o.max_concurrent_streams(restart.h2_max_concurrent_streams);
    o.max_header_list_size(restart.h2_max_header_list_size);
    o
}

/// Does this header block (response headers of a Trailers-Only answer, or trailers) carry
/// a `grpc-status` whose bit is set in `codes`?
pub fn grpc_failed(headers: &http::HeaderMap, codes: u32) -> bool {
    // Looked up by a prebuilt name: a `&str` key is parsed (lower-cased, matched against
    // the standard names) on every lookup, and this runs on every response.
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    headers
        .get(&GRPC_STATUS)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .is_some_and(|n| n < 32 && codes & (1 << n) != 0)
}

/// An upstream peer of an h2c pool speaks HTTP/2 with prior knowledge, many streams on
/// one connection.
pub fn upstream_peer(peer: &mut pingora::prelude::HttpPeer, pool: &Pool) {
    if pool.h2c {
        peer.options.set_http_version(2, 2);
        peer.options.max_h2_streams = 100;
    }
}

/// `TE` is hop-by-hop and removed with the rest; gRPC needs `te: trailers` to reach an
/// HTTP/2 upstream, so it is put back for h2c pools when the client sent it.
pub fn forward_te_trailers(
    client: &http::HeaderMap,
    upstream: &mut pingora::http::RequestHeader,
    h2c: bool,
) -> pingora::Result<()> {
    // Only an h2c pool needs it: no lookup for the others.
    if !h2c {
        return Ok(());
    }
    let wants = client
        .get_all(http::header::TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if wants {
        upstream.insert_header(http::header::TE, "trailers")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_headers() {
        let mask = (1 << 14) | (1 << 13);
        let mut h = http::HeaderMap::new();
        assert!(!grpc_failed(&h, mask));
        h.insert("grpc-status", "0".parse().unwrap());
        assert!(!grpc_failed(&h, mask));
        h.insert("grpc-status", "14".parse().unwrap());
        assert!(grpc_failed(&h, mask));
        h.insert("grpc-status", "5".parse().unwrap());
        assert!(!grpc_failed(&h, mask));
        h.insert("grpc-status", "99".parse().unwrap());
        assert!(!grpc_failed(&h, mask));
    }
}
