//! HTTP/2 towards clients: the limits of each connection, from `[edge]`.
//!
//! HTTP/2 is offered through ALPN on TLS listeners (`[proxy.tls] http2`) and, with
//! `[proxy] h2c = true`, with prior knowledge on the plain ones. The HTTP/1-specific edge
//! checks (request smuggling through `Content-Length`/`Transfer-Encoding`, the header
//! deadline against slowloris) do not apply to HTTP/2 frames; there, `h2` enforces the
//! framing and these limits bound what one connection may hold.

use pingora::protocols::http::v2::server::H2Options;

use crate::config::EdgeSettings;

/// The HTTP/2 server settings: concurrent streams and decoded header list size.
pub fn options(edge: &EdgeSettings) -> H2Options {
    let mut o = pingora::protocols::http::v2::server::default_h2_options();
    o.max_concurrent_streams(edge.h2_max_concurrent_streams);
    o.max_header_list_size(edge.h2_max_header_list_size);
    o
}
