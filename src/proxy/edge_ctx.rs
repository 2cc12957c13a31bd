//! Per-request facts of the client side that later hooks need: whether the connection is
//! TLS, the user key Kanaria issued (the issued cookie), the upstream that answered (its
//! latency is the attempt's, kept beside the in-flight bookkeeping in `Ctx`). The hooks in `proxy/mod.rs` call in here with one line each; the issued
//! cookie's logic lives in [`crate::split::issued`], the access log in
//! [`crate::proxy::access_log`].

use std::net::SocketAddr;

use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::runtime::Route;
use crate::split::issued::{IssuedId, IssuedIds};

/// See the module docs.
#[derive(Debug, Default)]
pub struct EdgeCtx {
    /// The client connection is TLS (the scheme is `https`).
    pub tls: bool,
    /// The client connection speaks HTTP/2.
    pub h2: bool,
    /// A key issued to this request (it carried none); the response sets the cookie.
    pub issued: Option<IssuedId>,
    /// The upstream of the last attempt.
    pub upstream_addr: Option<SocketAddr>,
    /// The answer carried a gRPC status that counts as an error (headers or trailers).
    pub grpc_failed: bool,
    /// The client's address as the split saw it (the access log reuses it).
    pub client: Option<std::net::IpAddr>,
}

impl EdgeCtx {
    /// Fills the connection facts and, when `route` issues keys and the request has none,
    /// issues one. Returns the issued key's bytes for the split.
    pub fn begin(&mut self, session: &Session, route: Option<&Route>, ids: &IssuedIds) {
        let down = session.as_downstream();
        self.tls = down
            .digest()
            .is_some_and(|d| d.ssl_digest.as_ref().is_some());
        self.h2 = down.is_http2();
        self.issued = route
            .filter(|r| r.split.needs_issued_key(&session.req_header().headers))
            .map(|_| ids.next());
    }

    /// The issued key, as the split wants it.
    pub fn issued_key(&self) -> Option<&[u8]> {
        self.issued.as_ref().map(IssuedId::as_bytes)
    }

    /// The scheme the client used, for `X-Forwarded-Proto`.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// Adds `Set-Cookie` for an issued key to any response of the request.
    pub fn decorate(&self, resp: &mut ResponseHeader, route: Option<&Route>) -> Result<()> {
        let (Some(id), Some(cookie)) = (&self.issued, route.and_then(|r| r.issued_cookie.as_ref()))
        else {
            return Ok(());
        };
        // Beside the upstream's own cookies, written after them (a wire header,
        // vendor/patches/0012: not inserted into the response's maps).
        if let Some(v) = cookie.set_cookie(id, self.tls) {
            resp.append_wire_header(http::header::SET_COOKIE, v)?;
        }
        Ok(())
    }
}
