//! The request path: Pingora's [`ProxyHttp`] hooks for Kanaria.
//!
//! Each request loads the config snapshot once (`ArcSwap::load_full`) and decides everything
//! from it: the route, the version (sticky split or override), the pool and its endpoint,
//! the timeouts. A reload in the middle of a request therefore never mixes two configs.
//! Forwarding adds `X-Forwarded-For`, `X-Forwarded-Proto` and a request id; the response
//! says which version served it. Failures become short plain-text answers: 404 with no
//! route, 502 when the pool has no usable endpoint or the upstream fails, 504 on timeout.
//! Nothing here may panic or block: errors are values, the hot path takes no lock.

use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::config::Route;
use crate::metrics::UpstreamErrorKind;
use crate::split::Version;
use crate::state::{Live, Shared};

/// Error type for "the chosen pool has no endpoint to send to" (all down or unhealthy).
pub const NO_HEALTHY_ENDPOINT: &str = "NoHealthyEndpoint";

const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";

/// Per-request state shared across the hooks.
pub struct Ctx {
    start: Instant,
    /// The config this request decided from (kept so every hook sees the same one).
    live: Option<Arc<Live>>,
    route: Option<usize>,
    version: Option<Version>,
    /// Set when Kanaria generated the id (the client sent none).
    generated_request_id: Option<HeaderValue>,
    /// Status of the upstream's answer, when one came.
    upstream_status: Option<u16>,
}

impl Ctx {
    fn route(&self) -> Option<&Arc<Route>> {
        let (live, i) = (self.live.as_ref()?, self.route?);
        live.snapshot.routes.get(i)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Generates request ids: a random per-process prefix and a counter, so ids are unique
/// across restarts and instances without a syscall or a lock per request.
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS once per process: enough entropy for a prefix.
        let prefix = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        RequestIds {
            prefix,
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // Hex on the stack: one allocation (the header value) per request, no formatting.
        let mut hex = [0u8; 32];
        for (i, byte) in self
            .prefix
            .to_be_bytes()
            .into_iter()
            .chain(n.to_be_bytes())
            .enumerate()
        {
            hex[2 * i] = HEX[usize::from(byte >> 4)];
            hex[2 * i + 1] = HEX[usize::from(byte & 0xf)];
        }
        // Hex digits are always a valid header value.
        HeaderValue::from_bytes(&hex).unwrap_or(HeaderValue::from_static("0"))
    }
}

/// The Kanaria proxy service.
pub struct KanariaProxy {
    shared: Arc<Shared>,
    ids: RequestIds,
}

impl KanariaProxy {
    pub fn new(shared: Arc<Shared>) -> Self {
        KanariaProxy {
            shared,
            ids: RequestIds::new(),
        }
    }
}

/// Classifies an upstream failure for `kanaria_upstream_errors_total`.
fn upstream_error_kind(e: &Error) -> Option<UpstreamErrorKind> {
    use ErrorType::*;
    if e.esource() != &ErrorSource::Upstream {
        return None;
    }
    Some(match e.etype() {
        ConnectTimedout | ReadTimedout | WriteTimedout => UpstreamErrorKind::Timeout,
        ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure | BindError
        | SocketError => UpstreamErrorKind::Connect,
        _ => UpstreamErrorKind::Reset,
    })
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// Writes a short plain-text answer. Used for every response Kanaria makes itself.
async fn respond_text(session: &mut Session, ctx: &Ctx, code: u16, body: &str) -> Result<()> {
    let mut resp = ResponseHeader::build(code, Some(4))?;
    resp.insert_header(CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(CONTENT_LENGTH, body.len())?;
    decorate_response(&mut resp, ctx)?;
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::copy_from_slice(body.as_bytes())), true)
        .await
}

/// Adds the version and request id headers to a response.
fn decorate_response(resp: &mut ResponseHeader, ctx: &Ctx) -> Result<()> {
    let Some(live) = &ctx.live else {
        return Ok(());
    };
    let snap = &live.snapshot;
    if let (Some(name), Some(v)) = (&snap.proxy.version_header, ctx.version) {
        resp.insert_header(name.clone(), v.as_str())?;
    }
    if let Some(id) = &ctx.generated_request_id {
        resp.insert_header(snap.proxy.request_id_header.clone(), id.clone())?;
    }
    Ok(())
}

#[async_trait]
impl ProxyHttp for KanariaProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            live: None,
            route: None,
            version: None,
            generated_request_id: None,
            upstream_status: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let live = self.shared.load();
        let snap = &live.snapshot;
        let req = session.req_header();
        // HTTP/1.1 carries the host in `Host`; absolute-form and HTTP/2 in the URI.
        let host = req
            .headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri.host());
        let route = snap.router.find(host, req.uri.path());
        if req.headers.get(&snap.proxy.request_id_header).is_none() {
            ctx.generated_request_id = Some(self.ids.next());
        }
        let decision = route.and_then(|i| snap.routes.get(i)).map(|r| {
            r.split
                .decide(
                    &session.req_header().headers,
                    client_ip(session),
                    r.labels(),
                )
                .0
        });
        ctx.live = Some(live);
        ctx.route = route;
        let Some(version) = decision else {
            respond_text(
                session,
                ctx,
                404,
                "kanaria: no route for this host and path\n",
            )
            .await?;
            return Ok(true);
        };
        ctx.version = Some(version);
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let (Some(route), Some(version)) = (ctx.route(), ctx.version) else {
            return Error::e_explain(ErrorType::InternalError, "no route decided");
        };
        let pool = route.pool(version);
        let Some(backend) = pool.lb.select(b"", 256) else {
            return Error::e_explain(
                ErrorType::Custom(NO_HEALTHY_ENDPOINT),
                format!(
                    "route {} has no healthy {} endpoint ({})",
                    route.name,
                    version.as_str(),
                    pool.version
                ),
            );
        };
        let mut peer = HttpPeer::new(backend.addr, false, String::new());
        let t = route.timeouts;
        peer.options.connection_timeout = Some(t.connect);
        peer.options.read_timeout = Some(t.read);
        peer.options.write_timeout = Some(t.write);
        peer.options.idle_timeout = Some(t.idle);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(ip) = client_ip(session) {
            // Append to what earlier proxies wrote; several XFF headers fold into one list.
            // Built in one buffer sized up front: one allocation, no temporary strings.
            let earlier = upstream_request.headers.get_all(X_FORWARDED_FOR);
            let mut xff =
                Vec::with_capacity(earlier.iter().map(|v| v.len() + 2).sum::<usize>() + 39);
            for v in earlier {
                if v.to_str().is_ok() {
                    xff.extend_from_slice(v.as_bytes());
                    xff.extend_from_slice(b", ");
                }
            }
            // Writing to a Vec cannot fail.
            let _ = write!(xff, "{ip}");
            upstream_request.insert_header(X_FORWARDED_FOR, xff)?;
        }
        upstream_request.insert_header(X_FORWARDED_PROTO, "http")?;
        if let (Some(id), Some(live)) = (&ctx.generated_request_id, &ctx.live) {
            upstream_request
                .insert_header(live.snapshot.proxy.request_id_header.clone(), id.clone())?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_status = Some(upstream_response.status.as_u16());
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        decorate_response(upstream_response, ctx)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        use ErrorType::*;
        let (code, body) = match e.etype() {
            HTTPStatus(code) => (*code, "kanaria: request failed\n"),
            Custom(NO_HEALTHY_ENDPOINT) => (502, "kanaria: no healthy upstream endpoint\n"),
            ConnectTimedout | ReadTimedout | WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                (504, "kanaria: upstream timed out\n")
            }
            _ => match e.esource() {
                ErrorSource::Upstream => (502, "kanaria: upstream failed\n"),
                ErrorSource::Downstream => match e.etype() {
                    // The client is gone: nobody to answer.
                    WriteError | ReadError | ConnectionClosed => (0, ""),
                    _ => (400, "kanaria: bad request\n"),
                },
                ErrorSource::Internal | ErrorSource::Unset => (500, "kanaria: internal error\n"),
            },
        };
        // Once the upstream's header went out, a second response would corrupt the stream:
        // the connection is closed instead (can_reuse_downstream = false).
        if code > 0 && session.as_downstream().response_written().is_none() {
            // Pingora closes the connection after a failed proxy attempt; say so in the
            // answer (`Connection: close`) so the client does not reuse a dying connection.
            session.as_downstream_mut().set_keepalive(None);
            if let Err(err) = respond_text(session, ctx, code, body).await {
                log::debug!("could not send the {code} answer: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Records the outcome of every request that matched a route.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let (Some(live), Some(i), Some(version)) = (&ctx.live, ctx.route, ctx.version) else {
            return;
        };
        let Some(m) = live.route_metrics.get(i) else {
            return;
        };
        let m = m.version(version);
        let status = session
            .as_downstream()
            .response_written()
            .map(|r| r.status.as_u16());
        m.record(status, ctx.start.elapsed().as_secs_f64());
        if let Some(kind) = e.and_then(upstream_error_kind) {
            m.upstream_error(kind);
        } else if ctx.upstream_status.is_some_and(|s| s >= 500) {
            m.upstream_error(UpstreamErrorKind::Status5xx);
        }
    }
}
