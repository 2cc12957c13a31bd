//! The request path: Pingora's [`ProxyHttp`] hooks for Kanaria.
//!
//! Each request loads the config snapshot once (`ArcSwap::load_full`) and decides everything
//! from it: the route, the version (sticky split or override), the pool and its endpoint,
//! the timeouts. A reload in the middle of a request therefore never mixes two configs.
//! Forwarding adds `X-Forwarded-For`, `X-Forwarded-Proto` and a request id; the response
//! says which version served it. Failures become short plain-text answers: 404 with no
//! route, 502 when the pool has no usable endpoint or the upstream fails, 504 on timeout.
//! A canary request that fails before any byte of an answer reached the client is retried
//! once on stable (connect errors for any method; resets, timeouts and 5xx answers for
//! idempotent requests without a body), so a dead canary costs users nothing while the
//! analysis still counts the failure against the canary. A canary that hangs is not waited
//! for either: a replayable canary attempt still without an answer's head after the route's
//! `canary_timeout`, or when the canary is rolled back, is cancelled inside Pingora (that
//! attempt alone: its HTTP/1 connection closed, or its HTTP/2 stream reset with the
//! connection's other streams untouched; see [`cancel_canary_attempt`]) and retried on
//! stable. An attempt whose answer's head arrived is never cancelled: it is forwarded whole.
//!
//! An attempt on a reused upstream connection that finds it closed before any byte of the
//! answer (the upstream closed it while it sat idle: a normal race) is retried once on a
//! fresh connection to the same version, for any method whose body is still whole in the
//! retry buffer, and is not counted against that version.
//!
//! For the analysis, each upstream attempt is measured on its own: from the moment the
//! request (body included) was handed to the upstream to the last byte of its answer (to
//! its head for streams: upgrades, the route's `stream_content_types`, or every answer of a
//! route with `latency = "head"`), and it is counted as *in flight* meanwhile (waiting for
//! its head, then for the rest of its body), so a canary that hangs or whose body crawls is
//! judged while it does. A client that hangs up before an answer is not the version's
//! failure and is not counted.
//! Nothing here may panic or block: errors are values, the hot path takes no lock.

// The data plane times requests, attempts, connection deadlines and log lines with the
// machine's clock, where they happen; the control plane judges what it recorded with its
// own `Clock` (the machine's too in production). So this module and its children may read it.
#![allow(clippy::disallowed_methods)]

pub mod access_log;
pub mod conn_guard;
pub mod drain;
pub mod edge;
pub mod edge_ctx;
pub mod h2;
pub mod headers;
pub mod shadow;
pub mod tls;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{
    FailToProxy, ProxyHttp, ProxyWarnLogContext, Session, UpstreamCancel, UpstreamWithdrawn,
    UPSTREAM_ATTEMPT_CANCELLED, UPSTREAM_WITHDRAWN, UPSTREAM_WITHDRAWN_ENDED,
};
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::config::{LatencyTo, StableDown};
use crate::metrics::{RouteMetrics, TrackMetrics, UpstreamErrorKind};
use crate::runtime::{AddedHeaders, Live, LiveHandle, Route};
use crate::split::Track;
use crate::stats::in_flight::Ticket;

/// Error type for "the chosen pool has no endpoint to send to" (all down or unhealthy).
pub const NO_HEALTHY_ENDPOINT: &str = "NoHealthyEndpoint";
/// Error type for "the chosen pool has no endpoint at all": its names never resolved.
pub const NO_RESOLVED_ENDPOINT: &str = "NoResolvedEndpoint";
/// Error type that abandons a canary's 5xx answer to retry on stable.
const CANARY_5XX_RETRY: &str = "Canary5xxRetriedOnStable";

/// Per-request state shared across the hooks.
pub struct Ctx {
    start: Instant,
    /// The config this request decided from (kept so every hook sees the same one).
    live: Option<Arc<Live>>,
    route: Option<usize>,
    version: Option<Track>,
    /// Set when Kanaria generated the id (the client sent none).
    generated_request_id: Option<HeaderValue>,
    /// Status of the upstream's answer, when one came.
    upstream_status: Option<u16>,
    /// The canary attempt failed and the request went to stable.
    retried: bool,
    /// Start of the current upstream attempt; from the end of the upload once the whole
    /// request was handed to the upstream (a slow upload is not the app's latency).
    attempt_start: Instant,
    /// The current attempt waits for its answer's head.
    awaiting_head: bool,
    /// The current attempt counted in its track's in-flight registry.
    in_flight: Option<(Track, Ticket)>,
    /// The answer judged whole whose body is still arriving, counted in its track's
    /// `answers_in_flight` (from the attempt's start) until its last byte.
    answer_in_flight: Option<(Track, Ticket)>,
    /// Latency of the attempt whose answer's head arrived: to the head, then, for an
    /// answer judged whole, to its last byte once that came.
    attempt_latency: Option<f64>,
    /// A fresh upstream connection after a reused one was found closed (once a request).
    fresh: Fresh,
    /// The last attempt failed on a reused connection before any answer and could not be
    /// retried (its body was no longer whole in the retry buffer): a 502 to the client,
    /// not the version's failure in the analysis.
    stale_connection: bool,
    /// The route's canary rollback generation when the request was split.
    rollback_generation: u64,
    /// The route's move generation when the request was split, and whether the split
    /// placed the user by its bucket (an override is not moved by a weight change).
    move_generation: u64,
    placed_by_bucket: bool,
    /// TLS, the issued key, the upstream's address (see [`edge_ctx`]).
    edge: edge_ctx::EdgeCtx,
    /// Which of the headers [`decorate_response`] adds the upstream's answer carries, from
    /// the scan in `upstream_response_filter` (`None`: not scanned).
    response_carries: Option<u32>,
    /// A request mirrored to the route's shadow: its copy and stable's answer so far.
    shadow: Option<Box<shadow::Capture>>,
}

impl Drop for Ctx {
    /// Whatever way a request ends (even cancelled mid-hook), its attempt leaves the
    /// in-flight registry: a leaked count would look like a request hanging forever.
    fn drop(&mut self) {
        self.attempt_over();
    }
}

impl Ctx {
    fn route(&self) -> Option<&Arc<Route>> {
        let (live, i) = (self.live.as_ref()?, self.route?);
        live.snapshot.routes.get(i)
    }

    fn route_metrics(&self) -> Option<&Arc<RouteMetrics>> {
        let (live, i) = (self.live.as_ref()?, self.route?);
        live.route_metrics.get(i)
    }

    fn track_metrics(&self, track: Track) -> Option<&TrackMetrics> {
        self.route_metrics().map(|m| m.version(track))
    }

    /// The current attempt ended (answer head, failure, or the request is gone): it leaves
    /// the in-flight registry. (Its cancel signal, if any, is Pingora's to drop: it is
    /// polled only while this attempt waits for its head.)
    fn attempt_over(&mut self) {
        self.awaiting_head = false;
        if let Some((track, ticket)) = self.in_flight.take() {
            if let Some(m) = self.track_metrics(track) {
                m.in_flight.finish(ticket);
            }
        }
        if let Some((track, ticket)) = self.answer_in_flight.take() {
            if let Some(m) = self.track_metrics(track) {
                m.answers_in_flight.finish(ticket);
            }
        }
    }

    /// The last byte of an answer judged whole came (`at`): its latency runs to here, and it
    /// leaves the registry of answers in flight.
    fn answer_done(&mut self, at: Instant) {
        if let Some((track, ticket)) = self.answer_in_flight.take() {
            let latency = at.saturating_duration_since(self.attempt_start);
            self.attempt_latency = Some(latency.as_secs_f64());
            if let Some(m) = self.track_metrics(track) {
                m.answers_in_flight.finish(ticket);
            }
        }
    }

    /// The gRPC status codes that count as errors on this request's route.
    fn grpc_codes(&self) -> u32 {
        self.route().map_or(0, |r| r.analysis.grpc_error_codes)
    }

    /// May this failed attempt be retried on stable?
    fn may_retry_on_stable(&self) -> bool {
        self.version == Some(Track::Canary)
            && !self.retried
            && self.route().is_some_and(|r| r.retry_on_stable)
    }

    /// Counts the failed canary attempt (against the canary, with its own duration; `None`:
    /// abandoned by Kanaria, a slow request rather than an error) and points the request at
    /// stable.
    fn switch_to_stable(&mut self, kind: Option<UpstreamErrorKind>) {
        self.attempt_over();
        if let Some(m) = self.route_metrics() {
            let waited = self.attempt_start.elapsed().as_secs_f64();
            let canary = m.version(Track::Canary);
            match kind {
                Some(kind) => canary.failed_attempt(kind, waited),
                None => canary.abandoned_attempt(waited),
            }
            m.retried_on_stable.inc();
        }
        self.version = Some(Track::Stable);
        self.retried = true;
        self.upstream_status = None;
    }
}

/// Where a request stands with fresh connections (see `error_while_proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fresh {
    /// Every attempt so far used what the pool had.
    Unused,
    /// A reused connection was found closed: the next attempt opens a new one.
    Next,
    /// The request had its fresh connection.
    Used,
}

/// The pool group of connections opened for a retry after a reused connection was found
/// closed. Pingora's pool keys idle connections by the peer's hash, which covers
/// `HttpPeer::group_key`, so an attempt in this group finds no idle connection of the
/// usual group and connects anew; and since it is released with an idle timeout of zero,
/// none of this group is ever handed out again either (the pool drops a connection past its
/// idle deadline instead of reusing it, and its sweeper closes it).
const FRESH_GROUP_KEY: u64 = 0x6b61_6e61_7269_6131;

/// Did the upstream connection turn out closed or broken before any byte of the answer's
/// head, the way an idle keep-alive connection the upstream closed fails? A reset, an end
/// of stream or a write error while sending the request or waiting for the head, and
/// HTTP/2's refusals Pingora deems safe to retry (GOAWAY without error, REFUSED_STREAM);
/// not a timeout (the app is slow), an unparsable head, or a head cut short (some of the
/// answer came).
fn lost_connection(e: &Error) -> bool {
    use pingora::RetryType;
    if e.esource() != &ErrorSource::Upstream {
        return false;
    }
    match e.etype() {
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => {
            // Pingora's head read says how much of the head it had (its wording, vendored).
            let context = e.context.as_ref().map_or("", |c| c.as_str());
            context
                .rsplit_once("bytes already read: ")
                .is_none_or(|(_, n)| n == "0")
        }
        ErrorType::H2Error => matches!(e.retry, RetryType::Decided(true)),
        _ => false,
    }
}

/// Is this answer a stream, judged by its head only: an upgrade (WebSocket), or a media
/// type of the route's `stream_content_types` (parameters ignored, `+suffix` allowed)?
pub(crate) fn is_stream(resp: &ResponseHeader, stream_types: &[String]) -> bool {
    if resp.status == http::StatusCode::SWITCHING_PROTOCOLS {
        return true;
    }
    if stream_types.is_empty() {
        return false;
    }
    let Some(value) = resp.headers.get(CONTENT_TYPE) else {
        return false;
    };
    let media = value.as_bytes();
    let media = media
        .iter()
        .position(|&b| b == b';')
        .map_or(media, |end| &media[..end]);
    let media = media.trim_ascii();
    stream_types.iter().any(|t| {
        let t = t.as_bytes();
        media.len() >= t.len()
            && media[..t.len()].eq_ignore_ascii_case(t)
            && (media.len() == t.len() || media[t.len()] == b'+')
    })
}

/// An answer Kanaria ended after its head (`upstream_withdrawn`), cleanly or not.
fn withdrawn(e: &Error) -> bool {
    e.etype() == &UPSTREAM_WITHDRAWN || e.etype() == &UPSTREAM_WITHDRAWN_ENDED
}

/// Idempotent and without a request body: safe to send twice.
fn replayable(session: &mut Session) -> bool {
    session.req_header().method.is_idempotent() && session.as_downstream_mut().is_body_empty()
}

/// The canary timeout when it is shorter than the read timeout (otherwise Pingora's own
/// read timeout comes first, and the attempt fails as a timeout).
fn canary_timeout(route: &Route) -> Option<Duration> {
    (route.canary_timeout < route.timeouts.read).then_some(route.canary_timeout)
}

/// The cancel signal of a canary attempt (Pingora's `upstream_cancel`,
/// vendor/patches/0017): it fires when `timeout` passes (from now, the attempt's start) or
/// when the canary is rolled back after `seen_generation`.
///
/// Pingora races it against the attempt's wait for its answer's head, in the task that reads
/// the answer: when it fires first, Pingora ends that attempt alone (an HTTP/1 connection
/// closed, an HTTP/2 stream reset with `CANCEL`, the connection's other streams untouched)
/// and `error_while_proxy` sees `UPSTREAM_ATTEMPT_CANCELLED` and retries on stable. When
/// the head comes first, Pingora drops the signal before passing the head on: the answer is
/// forwarded whole. One poll loop decides, so an attempt is never both retried and
/// forwarded, and nothing is spawned or duplicated per attempt (one box, for cancellable
/// canary attempts only).
fn cancel_canary_attempt(
    timeout: Option<Duration>,
    metrics: Arc<RouteMetrics>,
    seen_generation: u64,
) -> UpstreamCancel {
    // The deadline runs from the attempt's start, not from Pingora's first poll.
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    Box::pin(async move {
        let timeout = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = timeout => {}
            _ = metrics.canary_rollbacks.wait_after(seen_generation) => {}
        }
    })
}

/// Is this request a long-lived stream by its own head: an upgrade (WebSocket), a
/// server-sent events client (`Accept: text/event-stream`), or gRPC (`content-type:
/// application/grpc*`)? Such answers are ended at their own point of a rollback's drain;
/// any other answer gets the whole drain to finish (see [`withdraw_attempt`]).
fn announced_stream(req: &RequestHeader) -> bool {
    let h = &req.headers;
    h.contains_key(http::header::UPGRADE)
        || h.get(http::header::ACCEPT).is_some_and(|v| {
            v.as_bytes()
                .windows(b"text/event-stream".len())
                .any(|w| w.eq_ignore_ascii_case(b"text/event-stream"))
        })
        || is_grpc(req)
}

/// A gRPC request (`content-type: application/grpc`, `+proto` and the like).
fn is_grpc(req: &RequestHeader) -> bool {
    req.headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The trailers a withdrawn gRPC answer ends with: `grpc-status: 14` (UNAVAILABLE), the
/// status gRPC clients retry, so the call is re-issued and split anew, onto stable. Built
/// when a withdrawal fires, never on the request path.
fn grpc_unavailable() -> Box<http::HeaderMap> {
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
    let mut t = http::HeaderMap::with_capacity(2);
    t.insert(GRPC_STATUS, HeaderValue::from_static("14"));
    t.insert(
        GRPC_MESSAGE,
        HeaderValue::from_static("upstream withdrawn (rolled back or moved); retry"),
    );
    Box::new(t)
}

/// A point of `drain`, spread evenly over calls (RandomState: a fresh key per call, no
/// syscall), so the clients of many streams do not all reconnect in the same instant.
fn drain_point(drain: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    match drain.as_millis() as u64 {
        0 => Duration::ZERO,
        ms => {
            let h = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            Duration::from_millis(h % ms)
        }
    }
}

/// What ends an attempt's answer once its head went out ([`withdraw_attempt`]).
struct Withdrawal {
    /// The route's `rollback_drain`.
    drain: Duration,
    /// A stream by its request ([`announced_stream`], or a streaming route).
    announced: bool,
    grpc: bool,
    /// A canary attempt: the rollback generation it saw.
    rollback_seen: Option<u64>,
    /// An announced stream of a user placed by its bucket: the bucket, the version serving
    /// it and the move generation it saw.
    moved: Option<(u32, Track, u64)>,
}

/// The withdrawal signal of an attempt (Pingora's `upstream_withdrawn`,
/// vendor/patches/0018 and 0022), which Pingora polls only once the answer's head was
/// passed on. It fires:
/// - for a canary attempt, after the first rollback after the generation it saw: at the
///   attempt's own point of `drain` for an announced stream, at the end of `drain` for any
///   other answer. So an ordinary answer in flight at a rollback has the whole drain to
///   finish and is not cut by it; only a body still open after the drain (a long poll, a
///   stream not announced by its request) is ended;
/// - for an announced stream, at its own point of `drain` after a weight change moved its
///   user to the other version and asked for it (a lowered weight with the route's
///   `drain_on_weight_change`, a promotion with `drain`). Ordinary answers are never ended
///   by a weight change.
///
/// Its output: gRPC's UNAVAILABLE trailers for a gRPC call.
fn withdraw_attempt(w: Withdrawal, metrics: Arc<RouteMetrics>) -> UpstreamWithdrawn {
    let at = if w.announced {
        drain_point(w.drain)
    } else {
        w.drain
    };
    Box::pin(async move {
        let rollback = async {
            match w.rollback_seen {
                Some(seen) => metrics.canary_rollbacks.wait_after(seen).await,
                None => std::future::pending().await,
            }
        };
        let moved = async {
            match w.moved {
                Some((bucket, track, seen)) => metrics.moves.wait_moved(seen, bucket, track).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = rollback => {}
            _ = moved => {}
        }
        tokio::time::sleep(at).await;
        w.grpc.then(grpc_unavailable)
    })
}

/// Generates request ids: a random per-process prefix and a counter, so ids are unique
/// across restarts and instances without a syscall or a lock per request.
struct RequestIds {
    /// The prefix in hex, encoded once.
    prefix: [u8; 16],
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS once per process: enough entropy for a prefix.
        let prefix = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let mut hex = [0u8; 16];
        crate::split::issued::hex_into(&prefix.to_be_bytes(), &mut hex);
        RequestIds {
            prefix: hex,
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // Hex on the stack, no formatting; the counter's half only (the prefix's was
        // encoded once).
        let mut hex = [0u8; 32];
        hex[..16].copy_from_slice(&self.prefix);
        crate::split::issued::hex_into(&n.to_be_bytes(), &mut hex[16..]);
        // The array is the `Bytes` owner: one allocation per request, and the two clones
        // (upstream request, response) only count references. A `Vec`-backed value
        // allocates again on its first clone (`bytes` promotes it to a shared buffer).
        // Hex digits are always a valid header value.
        HeaderValue::from_maybe_shared(Bytes::from_owner(hex))
            .unwrap_or(HeaderValue::from_static("0"))
    }
}

/// The Kanaria proxy service.
pub struct KanariaProxy {
    shared: Arc<LiveHandle>,
    ids: RequestIds,
    issued_ids: crate::split::issued::IssuedIds,
    access_log: Option<Arc<access_log::AccessLog>>,
    mirror: Arc<shadow::Mirror>,
}

impl KanariaProxy {
    pub fn new(shared: Arc<LiveHandle>) -> Self {
        let mirror = Arc::new(shadow::Mirror::new(shared.metrics.shadows.clone()));
        KanariaProxy {
            shared,
            ids: RequestIds::new(),
            issued_ids: crate::split::issued::IssuedIds::new(),
            access_log: None,
            mirror,
        }
    }

    /// Starts a request's copy for the route's shadow when it is one the shadow mirrors
    /// (see [`shadow::chosen`]).
    fn capture_for_shadow(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        r: &Route,
        client: Option<std::net::IpAddr>,
    ) {
        let Some(s) = &r.shadow else {
            return;
        };
        let req = session.req_header();
        let bucket = r
            .split
            .bucket_of(&req.headers, client, ctx.edge.issued_key());
        if !shadow::chosen(s, &req.method, bucket) {
            return;
        }
        let id_name = ctx
            .live
            .as_ref()
            .map(|l| &l.snapshot.headers.request_id.name);
        let id = ctx
            .generated_request_id
            .as_ref()
            .or_else(|| id_name.and_then(|n| req.headers.get(n)))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        ctx.shadow = Some(Box::new(shadow::Capture::new(req, id, s)));
    }

    /// Writes one access log line per request to `log` (see [`access_log`]).
    pub fn with_access_log(mut self, log: Option<Arc<access_log::AccessLog>>) -> Self {
        self.access_log = log;
        self
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

/// Writes a short plain-text answer. Used for every response Kanaria makes itself.
async fn respond_text(session: &mut Session, ctx: &Ctx, code: u16, body: &str) -> Result<()> {
    let mut resp = ResponseHeader::build(code, Some(4))?;
    resp.insert_header(CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(CONTENT_LENGTH, body.len())?;
    // Built here: neither header is in it yet.
    decorate_response(&mut resp, ctx, Some(0))?;
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::copy_from_slice(body.as_bytes())), true)
        .await
}

/// Adds the version and request id headers to a response, replacing an upstream's. Wire
/// headers (vendor/patches/0012): written after the response's other headers, not inserted
/// into its maps. `carried` says which of the two the response has (bit 0 the version
/// header, bit 1 the request id, from [`response_watch`]'s scan); `None`, not known: each
/// replaces (a lookup) rather than appends.
fn decorate_response(resp: &mut ResponseHeader, ctx: &Ctx, carried: Option<u32>) -> Result<()> {
    let Some(live) = &ctx.live else {
        return Ok(());
    };
    let snap = &live.snapshot;
    let carried = carried.unwrap_or(u32::MAX);
    if let (Some(header), Some(v)) = (&snap.headers.version, ctx.version) {
        let value = HeaderValue::from_static(v.as_str());
        if carried & 1 != 0 {
            resp.insert_wire_header(&header.prepared, value)?;
        } else {
            resp.append_wire_header(&header.prepared, value)?;
        }
    }
    if let Some(id) = &ctx.generated_request_id {
        let name = &snap.headers.request_id.prepared;
        if carried & 2 != 0 {
            resp.insert_wire_header(name, id.clone())?;
        } else {
            resp.append_wire_header(name, id.clone())?;
        }
    }
    ctx.edge.decorate(resp, ctx.route().map(|r| r.as_ref()))
}

/// The names [`decorate_response`] adds, for the upstream response's scan to look for: the
/// version header (the request id's name again when there is none) and the request id.
fn response_watch(headers: &AddedHeaders) -> [&http::HeaderName; 2] {
    let id = &headers.request_id.name;
    [headers.version.as_ref().map_or(id, |h| &h.name), id]
}

#[async_trait]
impl ProxyHttp for KanariaProxy {
    /// Boxed: Pingora keeps the context inside the request's future, which it moves into a
    /// box of its own per request (a `memcpy` of the whole future); with a pointer there
    /// instead, the future is ~830 bytes smaller, which saves more than the allocation costs.
    type CTX = Box<Ctx>;

    /// A fresh context for one request.
    ///
    /// - **When**: once per request (per stream on an HTTP/2 connection), right after Pingora
    ///   has read the request head and before any other hook.
    /// - **Returns**: the context every later hook of this request is handed.
    /// - **Writes**: every [`Ctx`] field empty; `start` (the request's duration in
    ///   `kanaria_request_duration_seconds` runs from here, the head's reading excluded) and
    ///   `attempt_start` to now.
    fn new_ctx(&self) -> Box<Ctx> {
        // One clock read for both (the attempt's start is set again when it begins).
        let now = Instant::now();
        Box::new(Ctx {
            start: now,
            live: None,
            route: None,
            version: None,
            generated_request_id: None,
            upstream_status: None,
            retried: false,
            attempt_start: now,
            awaiting_head: false,
            in_flight: None,
            answer_in_flight: None,
            attempt_latency: None,
            fresh: Fresh::Unused,
            stale_connection: false,
            rollback_generation: 0,
            move_generation: 0,
            placed_by_bucket: false,
            edge: edge_ctx::EdgeCtx::default(),
            response_carries: None,
            shadow: None,
        })
    }

    /// Admits the request head, then decides everything the request will use: the config
    /// snapshot, the route and the version (sticky split or override).
    ///
    /// - **When**: after `new_ctx`, before any upstream is chosen (Pingora's
    ///   `early_request_filter` and downstream modules run before it; Kanaria uses neither).
    /// - **Returns**: `Ok(true)` when Kanaria answered itself: Pingora skips the upstream and
    ///   calls `logging` (with no error). That is 400 or 431 for a refused head (keep-alive
    ///   was turned off, so the connection closes), 400 for a path that climbs above the
    ///   root, 404 when no route matches. `Ok(false)`: a route and a version are decided and
    ///   Pingora goes on to `upstream_peer`. `Err` only when writing Kanaria's own answer
    ///   failed: Pingora calls `fail_to_proxy`, then `logging`.
    /// - **Reads**: the live handle, loaded once here ([`LiveHandle::load`]): every later
    ///   hook reads that same snapshot through `ctx.live`, so a reload mid-request never mixes
    ///   two configs. Its `[edge]` settings, router and the route's split rule; the request's
    ///   head and client address.
    /// - **Writes**: `ctx.live`, `route`, `version`, `edge` (client address, TLS, HTTP/2, a
    ///   key issued for an `issued_cookie:` route), `generated_request_id` (when the client
    ///   sent none), `rollback_generation` (the route's canary rollback generation now, which
    ///   the canary attempt's cancel signal compares against), `move_generation` and
    ///   `placed_by_bucket` (for the streams a weight change moves). Metrics:
    ///   `kanaria_rejected_requests_total{reason}` for a refused head,
    ///   `kanaria_overrides_total` for an honoured override. Through `headers::admit`: the
    ///   connection guard's header deadline stops ([`conn_guard::request_started`]) and
    ///   reads of the request body time out after `edge.body_timeout`.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Box<Ctx>) -> Result<bool> {
        let live = self.shared.load();
        let snap = &live.snapshot;
        if let Some(reject) = crate::proxy::headers::admit(session, &snap.config.edge) {
            self.shared.metrics.edge.rejected(reject.reason()).inc();
            log::debug!("refused a request head: {}", reject.message());
            let body = format!("kanaria: {}\n", reject.message());
            respond_text(session, ctx, reject.status(), &body).await?;
            return Ok(true);
        }
        let client = crate::proxy::headers::client_ip(session, &snap.config.edge.trusted_proxies);
        ctx.edge.client = client;
        let req = session.req_header();
        // HTTP/1.1 carries the host in `Host`; absolute-form and HTTP/2 in the URI. Looked
        // up only when a route lists hosts.
        let host = snap
            .config
            .router
            .matches_hosts()
            .then(|| {
                req.headers
                    .get(HOST)
                    .and_then(|v| v.to_str().ok())
                    .or_else(|| req.uri.host())
            })
            .flatten();
        // Matched on the normalized path (as nginx's `location`); forwarded as sent.
        let Some(path) = crate::split::router::normalize_path(req.uri.path()) else {
            ctx.live = Some(live);
            respond_text(
                session,
                ctx,
                400,
                "kanaria: the path climbs above the root\n",
            )
            .await?;
            return Ok(true);
        };
        let route = snap.config.router.find(host, &path);
        drop(path);
        let r = route.and_then(|i| snap.routes.get(i));
        ctx.edge
            .begin(session, r.map(|r| r.as_ref()), &self.issued_ids);
        if req.headers.get(&snap.headers.request_id.name).is_none() {
            ctx.generated_request_id = Some(self.ids.next());
        }
        let decision = r.map(|r| {
            r.split.decide_issued(
                &session.req_header().headers,
                client,
                r.labels(),
                ctx.edge.issued_key(),
            )
        });
        if let (Some((version, crate::split::Reason::Override)), Some(i)) = (decision, route) {
            if let Some(m) = live.route_metrics.get(i) {
                m.version(version).overrides.inc();
            }
            log::debug!(
                "override honoured: route {} version {} client {client:?}",
                snap.routes.get(i).map_or("?", |r| r.name.as_str()),
                version.as_str()
            );
        }
        let decision_full = decision;
        ctx.placed_by_bucket = decision.is_some_and(|d| d.1 == crate::split::Reason::Sticky);
        let decision = decision.map(|d| d.0);
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
        if let Some((rollbacks, moves)) = ctx
            .route_metrics()
            .map(|m| (m.canary_rollbacks.generation(), m.moves.generation()))
        {
            ctx.rollback_generation = rollbacks;
            ctx.move_generation = moves;
        }
        if let Some((Track::Stable, crate::split::Reason::Sticky)) = decision_full {
            // Only a route with a shadow pays for this (an `Arc` clone, a hash).
            if let Some(r) = ctx.route().filter(|r| r.shadow.is_some()).cloned() {
                self.capture_for_shadow(session, ctx, &r, client);
            }
        }
        Ok(false)
    }

    /// Picks this attempt's endpoint from the decided version's pool, and starts the attempt.
    ///
    /// - **When**: after `request_filter` returned `Ok(false)`, and again before every retry
    ///   (an error that `fail_to_connect` or `error_while_proxy` left retryable), up to
    ///   Pingora's `max_retries`. Kanaria itself marks at most one retry on a fresh
    ///   connection (a reused one found closed) and one from canary to stable; Pingora's
    ///   default policy may retry another failure on a reused upstream connection.
    /// - **Returns**: the peer, with the route's connect, read, write and idle timeouts (and
    ///   HTTP/2 with prior knowledge for an h2c pool): Pingora connects to it or reuses an idle
    ///   connection to it. `Err(NoHealthyEndpoint)` when the pool has no endpoint in rotation;
    ///   not retryable, so Pingora calls `fail_to_proxy` (502) and `logging`. A canary request
    ///   in that state is not sent to stable from here.
    /// - **Reads**: `ctx.route()` and `version`; the pool's readiness flags
    ///   ([`Pool::select`](crate::runtime::Pool::select), round robin); the route's
    ///   `stable_down`.
    /// - **Writes**: ends the previous attempt, if any (`attempt_over`: it leaves the in-flight
    ///   registry); after a reused connection was found closed (`ctx.fresh` is `Next`, then
    ///   `Used`), the peer's `group_key` and a zero idle timeout
    ///   that make Pingora connect anew and not keep the connection ([`FRESH_GROUP_KEY`]);
    ///   `ctx.edge.upstream_addr`, `attempt_start`,
    ///   `awaiting_head = true`, `attempt_latency = None`, `response_carries = None`. With
    ///   `stable_down = "serve_canary"` and no stable endpoint in rotation: `version = Canary`
    ///   and `retried = true`, so the request is never sent back to the dead stable pool.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Box<Ctx>,
    ) -> Result<Box<HttpPeer>> {
        // A retry starts a new attempt: the previous one is over.
        ctx.attempt_over();
        let (Some(route), Some(version)) = (ctx.route().cloned(), ctx.version) else {
            return Error::e_explain(ErrorType::InternalError, "no route decided");
        };
        let mut pool = route.pool(version);
        let mut backend = pool.select();
        // Every stable endpoint down: only an explicit `stable_down = "serve_canary"` sends
        // stable's users to the canary; by default they get a 502.
        if backend.is_none()
            && version == Track::Stable
            && route.stable_down == StableDown::ServeCanary
        {
            if let Some(canary) = &route.canary {
                backend = canary.select();
                if backend.is_some() {
                    pool = canary;
                    ctx.version = Some(Track::Canary);
                    // Never "retry" such a request back onto the dead stable pool.
                    ctx.retried = true;
                }
            }
        }
        let Some(backend) = backend else {
            // The status API says the same of the pool (`empty_reason`).
            if let Some(why) = pool.unresolved_reason() {
                return Error::e_explain(
                    ErrorType::Custom(NO_RESOLVED_ENDPOINT),
                    format!(
                        "route {} {} pool ({}) has {why}",
                        route.name,
                        version.as_str(),
                        pool.version
                    ),
                );
            }
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
        ctx.edge.upstream_addr = backend.addr.as_inet().copied();
        let mut peer = HttpPeer::new(backend.addr.clone(), false, String::new());
        let t = route.timeouts;
        peer.options.connection_timeout = Some(t.connect);
        peer.options.read_timeout = Some(t.read);
        peer.options.write_timeout = Some(t.write);
        peer.options.idle_timeout = Some(t.idle);
        if ctx.fresh == Fresh::Next {
            // A reused connection was found closed: this attempt connects anew, and its
            // connection is not kept (see FRESH_GROUP_KEY).
            peer.group_key = FRESH_GROUP_KEY;
            peer.options.idle_timeout = Some(Duration::ZERO);
            ctx.fresh = Fresh::Used;
        }
        h2::upstream_peer(&mut peer, pool);
        ctx.attempt_start = Instant::now();
        ctx.awaiting_head = true;
        ctx.attempt_latency = None;
        // Scanned again with this attempt's answer.
        ctx.response_carries = None;
        Ok(Box::new(peer))
    }

    /// Gives a canary attempt that could still go to stable its cancel signal
    /// ([`cancel_canary_attempt`]): the route's canary timeout or a rollback.
    ///
    /// - **When**: once per attempt, as soon as Pingora holds the upstream connection (new, or
    ///   reused from its pool) after `connected_to_upstream`, before the request head is
    ///   written (Pingora's hook from vendor/patches/0017). Not called when connecting failed
    ///   (`fail_to_connect` is).
    /// - **Returns**: `None` (nothing to poll) unless it is a canary attempt that may be
    ///   retried (`ctx.awaiting_head`, `version`, `retried`, the route's `retry_on_stable`)
    ///   of a replayable request (idempotent, no body); then the signal, which Pingora races
    ///   against the wait for the answer's head: when it fires first, the attempt fails with
    ///   `UPSTREAM_ATTEMPT_CANCELLED` (its HTTP/1 connection closed, its HTTP/2 stream reset)
    ///   and `error_while_proxy` retries on stable; once the head arrived it is dropped.
    /// - **Reads**: the route's `canary_timeout`, `ctx.rollback_generation` and the route's
    ///   `canary_rollbacks` signal. **Writes**: nothing.
    fn upstream_cancel(&self, session: &mut Session, ctx: &mut Box<Ctx>) -> Option<UpstreamCancel> {
        // Only attempts that can go to stable are worth cancelling.
        if !(ctx.awaiting_head && ctx.may_retry_on_stable() && replayable(session)) {
            return None;
        }
        let (route, m) = (ctx.route()?, ctx.route_metrics()?);
        Some(cancel_canary_attempt(
            canary_timeout(route),
            m.clone(),
            ctx.rollback_generation,
        ))
    }

    /// Gives a canary attempt its withdrawal signal ([`withdraw_attempt`]): a rollback moves
    /// long-lived answers off the canary too (WebSocket, server-sent events, long polls,
    /// gRPC streams), each within the route's `rollback_drain`.
    ///
    /// - **When**: once per attempt, right after `upstream_cancel` (vendor/patches/0018,
    ///   0022), HTTP/1 and HTTP/2 upstreams.
    /// - **Returns**: `None` unless the attempt goes to the canary; then the signal, which
    ///   Pingora polls only once the answer's head was passed on: when it fires while the
    ///   answer lasts, the answer ends (gRPC with `grpc-status: 14` to an HTTP/2 client, a
    ///   chunked or close-delimited body with its end, then the HTTP/1 connection closed; an
    ///   upgraded connection or a body of a declared length by closing the connection or
    ///   resetting the HTTP/2 stream) with `UPSTREAM_WITHDRAWN`: not retried, not counted
    ///   against the canary. The client's reconnect is split afresh, onto stable.
    /// - **Reads**: `ctx.version`, the request's head, the route's `rollback_drain`,
    ///   `ctx.rollback_generation`. **Writes**: nothing.
    fn upstream_withdrawn(
        &self,
        session: &mut Session,
        ctx: &mut Box<Ctx>,
    ) -> Option<UpstreamWithdrawn> {
        let version = ctx.version?;
        let (route, m) = (ctx.route()?, ctx.route_metrics()?);
        let req = session.req_header();
        let announced = route.analysis.latency == LatencyTo::Head || announced_stream(req);
        // Only a stream of a user the split placed by its bucket can be moved by a weight
        // change; the bucket is hashed for those only.
        let moved = (announced && ctx.placed_by_bucket && route.canary.is_some())
            .then(|| {
                route
                    .split
                    .bucket_of(&req.headers, ctx.edge.client, ctx.edge.issued_key())
            })
            .flatten()
            .map(|bucket| (bucket, version, ctx.move_generation));
        let rollback_seen = (version == Track::Canary).then_some(ctx.rollback_generation);
        if rollback_seen.is_none() && moved.is_none() {
            // A stable answer no weight change can move: nothing to poll, nothing allocated.
            return None;
        }
        let w = Withdrawal {
            drain: route.rollback_drain,
            announced,
            grpc: is_grpc(req),
            rollback_seen,
            moved,
        };
        Some(withdraw_attempt(w, m.clone()))
    }

    /// The whole request was handed to the upstream: from now on, the wait is the app's.
    ///
    /// - **When**: in every attempt, for each piece of the request body Pingora sends to the
    ///   upstream: the client's body as it arrives, the buffered body replayed on a retry, and
    ///   once with no data and `end_of_stream` for a request without a body. After
    ///   `upstream_request_filter` and the request head were written.
    /// - **Returns**: always `Ok(())`, the body untouched (an `Err` would fail the attempt).
    /// - **Reads**: `end_of_stream`, `ctx.awaiting_head`, `in_flight`, `version`.
    /// - **Writes**: at the end of the body of an attempt still waiting for its answer and not
    ///   yet counted: `ctx.attempt_start` (the attempt's latency runs from here, so a slow
    ///   upload is not the app's latency) and `ctx.in_flight` (the attempt enters its track's
    ///   in-flight registry, [`InFlight`](crate::stats::in_flight::InFlight), which the
    ///   analysis reads to see a canary that hangs while it hangs).
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        if let (Some(c), Some(b)) = (ctx.shadow.as_mut(), body.as_ref()) {
            c.request_body(b);
        }
        if end_of_stream && ctx.awaiting_head && ctx.in_flight.is_none() {
            let now = Instant::now();
            ctx.attempt_start = now;
            if let Some(track) = ctx.version {
                if let Some(m) = ctx.track_metrics(track) {
                    ctx.in_flight = Some((track, m.in_flight.start(now)));
                }
            }
        }
        Ok(())
    }

    /// Decides whether a canary attempt that could not connect goes to stable.
    ///
    /// - **When**: when Pingora could not get a connection to the peer `upstream_peer` chose
    ///   (refused, unreachable, connect timeout): nothing was sent. Neither
    ///   `connected_to_upstream` nor `error_while_proxy` runs for this attempt.
    /// - **Returns**: the error, made retryable when it is a canary attempt that may go to
    ///   stable (the route's `retry_on_stable`, not yet retried; any method, as long as its
    ///   body, if any, is still whole in the retry buffer): Pingora calls `upstream_peer`
    ///   again, which now picks from stable. Otherwise the error as Pingora made it, not
    ///   retryable: Pingora calls `fail_to_proxy` (504 for a connect timeout, else 502) and
    ///   `logging`.
    /// - **Reads**: `ctx.version`, `retried`, the route's `retry_on_stable`, `attempt_start`;
    ///   the error's type; the session's retry buffer.
    /// - **Writes**: ends the attempt (`attempt_over`). On a switch to stable
    ///   (`Ctx::switch_to_stable`): `version = Stable`, `retried = true`,
    ///   `upstream_status = None`; the canary's failed attempt is counted in
    ///   `kanaria_upstream_errors_total{kind="connect"|"timeout"}` and as an error in the
    ///   canary's analysis window, and the switch in `kanaria_retries_total`.
    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Box<Ctx>,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the upstream: any method may go to stable, if its body (if any)
        // is still fully buffered for a replay.
        ctx.attempt_over();
        if ctx.may_retry_on_stable() && !session.as_ref().retry_buffer_truncated() {
            let kind = if e.etype() == &ErrorType::ConnectTimedout {
                UpstreamErrorKind::Timeout
            } else {
                UpstreamErrorKind::Connect
            };
            ctx.switch_to_stable(Some(kind));
            e.set_retry(true);
        }
        e
    }

    /// Decides whether an attempt that failed after its connection was made is retried: on a
    /// fresh connection (a reused one found closed) or on stable.
    ///
    /// - **When**: when an attempt fails once Pingora had its upstream connection: writing the
    ///   request, waiting for or reading the answer (a reset, Pingora's `read_timeout`, a
    ///   canary attempt cancelled, `UPSTREAM_ATTEMPT_CANCELLED`), an `Err` from
    ///   `upstream_request_filter`, `upstream_response_filter` (a canary 5xx, an answer's
    ///   ambiguous framing) or
    ///   `response_filter`, or the client going away meanwhile.
    /// - **Returns**: the error, with the peer added to its context. It is made retryable on
    ///   a fresh connection to the same version when the attempt used a reused connection
    ///   that turned out closed before any byte of the answer ([`lost_connection`]: reset,
    ///   end of stream, write error, HTTP/2 refusal; not a cancelled attempt), for
    ///   any method, once a request, if the body (if any) is still whole in the retry buffer;
    ///   with the body gone, it is not retried (502). Otherwise it is made retryable
    ///   (Pingora calls `upstream_peer` again) when a canary attempt may go to stable: the
    ///   route's `retry_on_stable`, not yet retried, nothing sent to the client, the client
    ///   still there, and a replayable request (idempotent, no body). A canary 5xx that
    ///   `upstream_response_filter` already switched to stable passes through, still
    ///   retryable. Otherwise Pingora's default policy applies (no retry for a
    ///   non-idempotent method or a truncated retry buffer; an error Pingora marks as
    ///   retryable on a reused connection only is retried if this one was reused), and
    ///   without a retry Pingora calls `fail_to_proxy` and `logging`.
    /// - **Reads**: `client_reused`, `ctx.awaiting_head` and `fresh` (a reused connection
    ///   found closed before the head, not yet retried fresh), the retry buffer,
    ///   `attempt_start` (how long it waited), `version`, `retried`; the error's type and
    ///   source; whether a response head was written to the client.
    /// - **Writes**: ends the attempt (`attempt_over`). For a reused connection found
    ///   closed: `ctx.fresh = Next` and `kanaria_retries_total{from=to=version}`, or
    ///   `stale_connection` when it cannot be retried; nothing in the analysis either way.
    ///   On a switch to stable: as in
    ///   `fail_to_connect`, counted as `kind="timeout"`, `"connect"` or `"reset"` from the
    ///   error, except a cancelled attempt (`UPSTREAM_ATTEMPT_CANCELLED`: its `canary_timeout`
    ///   passed or the canary was rolled back while it waited for its head): a `timeout` in
    ///   `kanaria_upstream_errors_total`, and in the analysis a slow request of the time it
    ///   waited, not an error.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Box<Ctx>,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let before_head = ctx.awaiting_head;
        ctx.attempt_over();
        if e.etype() == &ErrorType::Custom(CANARY_5XX_RETRY) {
            // Decided in upstream_response_filter.
            return e;
        }
        if withdrawn(&e) {
            // Kanaria ended a canary answer at a rollback after its head went out (an
            // upgraded connection, a stream): the client reconnects; nothing to retry.
            e.set_retry(false);
            return e;
        }
        let nothing_sent = session.as_downstream().response_written().is_none();
        // The client hung up: not the canary's failure, and nobody to answer on stable.
        let client_gone = e.esource() == &ErrorSource::Downstream;
        // Kanaria's own cancel signal ended the attempt (canary timeout or rollback): it
        // gave up on a slow canary, the canary did not fail.
        let abandoned = e.etype() == &UPSTREAM_ATTEMPT_CANCELLED;
        // A keep-alive connection the upstream closed while it sat idle (or as it was taken
        // from the pool) fails the first attempt that uses it, with nothing of the answer
        // read: retried once on a new connection to the same version, for any method (the
        // upstream dropped the request unprocessed, as HAProxy's and Pingora's own retry of
        // a reused connection assume), and not the version's failure.
        if client_reused
            && before_head
            && nothing_sent
            && !abandoned
            && ctx.fresh == Fresh::Unused
            && lost_connection(&e)
        {
            if session.as_ref().retry_buffer_truncated() {
                // The body is no longer whole in the retry buffer: it cannot be sent again.
                // The client gets a 502; the analysis does not count it.
                ctx.stale_connection = true;
                e.set_retry(false);
                return e;
            }
            if let Some(m) = ctx.version.and_then(|v| ctx.track_metrics(v)) {
                m.reconnected();
            }
            ctx.fresh = Fresh::Next;
            e.set_retry(true);
            return e;
        }
        if ctx.may_retry_on_stable() && nothing_sent && !client_gone && replayable(session) {
            let kind = upstream_error_kind(&e).unwrap_or(UpstreamErrorKind::Reset);
            ctx.switch_to_stable((!abandoned).then_some(kind));
            e.set_retry(true);
            return e;
        }
        // Pingora's default policy otherwise.
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    /// A canary failure retried on stable is expected behaviour, counted in
    /// `kanaria_retries_total` and the analysis: one warning per retried request would
    /// flood the log exactly when a canary dies. It stays visible at debug level.
    ///
    /// - **When**: when an attempt failed with a retryable error, before Pingora logs its
    ///   warning for it (Pingora also asks for downstream errors ignored while filling its
    ///   cache, which Kanaria does not use).
    /// - **Returns**: `true` (no warning) once `ctx.retried` is set: the request was switched
    ///   from canary to stable, which also covers a later retryable failure of its stable
    ///   attempt (or it is a stable request served by the canary under
    ///   `stable_down = "serve_canary"`). `false` otherwise: Pingora warns.
    /// - **Reads**: `ctx.retried`. **Writes**: nothing (a debug line).
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &Box<Ctx>,
        error: &Error,
        _context: ProxyWarnLogContext,
    ) -> bool {
        if ctx.retried {
            log::debug!("canary attempt failed, retried on stable: {error}");
        } else if ctx.fresh != Fresh::Unused {
            log::debug!("reused upstream connection was closed, retried on a new one: {error}");
        }
        ctx.retried || ctx.fresh != Fresh::Unused
    }

    /// An answer Kanaria ended at a rollback (`upstream_withdrawn`) is expected: one error
    /// line per stream would flood the log at every rollback. It stays visible at debug
    /// level and in the access log.
    ///
    /// - **When**: once a request failed for good, before Pingora logs it at error level.
    /// - **Returns**: `true` (no error line) for `UPSTREAM_WITHDRAWN`/`_ENDED`.
    /// - **Reads**: the error. **Writes**: nothing (a debug line).
    fn suppress_error_log(&self, _session: &Session, _ctx: &Box<Ctx>, error: &Error) -> bool {
        let ours = withdrawn(error);
        if ours {
            log::debug!("answer ended at a rollback: {error}");
        }
        ours
    }

    /// Cleans the request head sent upstream and adds the forwarding headers.
    ///
    /// - **When**: in every attempt, after `connected_to_upstream`, on Pingora's copy of the
    ///   client's request head, just before it is written to the upstream.
    /// - **Returns**: `Ok(())` to send it; `Err` (a header that cannot be written) fails the
    ///   attempt through `error_while_proxy`.
    /// - **Reads**: `ctx.route()` (the override header and cookie to remove), `ctx.live`
    ///   (`edge.trusted_proxies`, the request id header's name), `ctx.edge` (the listener's
    ///   scheme), `generated_request_id`, `version` (is the pool h2c?); the client's address
    ///   and headers.
    /// - **Writes**: the upstream request only: hop-by-hop headers and the route's override
    ///   header and cookie removed; `X-Forwarded-For`, `X-Forwarded-Proto`, the request id when
    ///   Kanaria generated it, and `te: trailers` for an h2c pool when the client sent it. No
    ///   `Ctx` field, no metric.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        let upgrading = session.is_upgrade_req();
        let carried = crate::proxy::headers::clean_upstream_request(
            upstream_request,
            upgrading,
            ctx.route().map(|r| r.as_ref()),
        );
        // After the hop-by-hop cleanup: a client's `Connection` cannot remove ours.
        let trusted = ctx
            .live
            .as_ref()
            .map_or(&[][..], |l| &l.snapshot.config.edge.trusted_proxies[..]);
        crate::proxy::headers::set_forwarding(
            upstream_request,
            headers::peer_ip(session),
            trusted,
            ctx.edge.scheme(),
            carried,
        )?;
        // Generated only when the client sent none, so the upstream copy has none either:
        // appended without a lookup, as a wire header (vendor/patches/0012).
        if let (Some(id), Some(live)) = (&ctx.generated_request_id, &ctx.live) {
            upstream_request
                .append_wire_header(&live.snapshot.headers.request_id.prepared, id.clone())?;
        }
        let h2c = matches!((ctx.route(), ctx.version), (Some(r), Some(v)) if r.pool(v).h2c);
        h2::forward_te_trailers(&session.req_header().headers, upstream_request, h2c)
    }

    /// Checks the head of the upstream's answer and ends the attempt's wait; a canary's 5xx can
    /// still go to stable from here.
    ///
    /// - **When**: when an upstream answer's head arrives, before `response_filter`. Never for
    ///   Kanaria's own answers.
    /// - **Returns**: `Ok(())` to pass the answer on. `Err(InvalidHTTPHeader)`, an upstream
    ///   error, for ambiguous framing: the attempt fails through `error_while_proxy` (a
    ///   replayable canary attempt then goes to stable; otherwise 502). For a canary's 5xx
    ///   when the request may go to stable, `Err(Canary5xxRetriedOnStable)`, retryable: the
    ///   answer is dropped before the client sees any of it, `error_while_proxy` passes the
    ///   error through, and Pingora calls `upstream_peer` again.
    /// - **Reads**: `ctx.live` (the names of the headers Kanaria adds), `awaiting_head`,
    ///   `attempt_start`, `version`, `retried`, the route's `retry_on_stable` and
    ///   `grpc_error_codes`; the request's method and body.
    /// - **Writes**: the answer head (hop-by-hop headers removed); `ctx.response_carries`;
    ///   `attempt_latency` (the app's latency, from the end of the upload to this head) and
    ///   the end of the attempt's wait (`attempt_over`); `upstream_status`; for an answer
    ///   judged whole (the route's `latency = "answer"`, not a `101` nor one of its
    ///   `stream_content_types`), `answer_in_flight`: it enters the track's
    ///   `answers_in_flight`, from the attempt's start, until its last byte; `edge.grpc_failed` for an
    ///   HTTP/2 answer. Metrics: `kanaria_rejected_requests_total{reason="upstream_framing"}`;
    ///   for a canary 5xx sent to stable, as in `fail_to_connect` with `kind="5xx"`.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        if let Some(c) = ctx.shadow.as_mut() {
            c.answer_head(
                upstream_response.status.as_u16(),
                &upstream_response.headers,
            );
        }
        let cleaned = match ctx.live.as_ref() {
            Some(live) => crate::proxy::headers::clean_upstream_response(
                upstream_response,
                response_watch(&live.snapshot.headers),
            )
            .map(Some),
            None => {
                crate::proxy::headers::clean_upstream_response(upstream_response, []).map(|_| None)
            }
        };
        ctx.response_carries = cleaned.ok().flatten();
        if let Err(why) = cleaned {
            self.shared
                .metrics
                .edge
                .rejected(crate::metrics::RejectReason::UpstreamFraming)
                .inc();
            return Err(Error::explain(ErrorType::InvalidHTTPHeader, why).into_up());
        }
        let status = upstream_response.status.as_u16();
        // The head of the current attempt (not a retry's second pass over it).
        let head_at = ctx.awaiting_head.then(Instant::now);
        if let Some(now) = head_at {
            let latency = now.saturating_duration_since(ctx.attempt_start);
            ctx.attempt_latency = Some(latency.as_secs_f64());
            ctx.attempt_over();
        }
        if status >= 500 && ctx.may_retry_on_stable() && replayable(session) {
            ctx.switch_to_stable(Some(UpstreamErrorKind::Status5xx));
            let mut e = Error::explain(
                ErrorType::Custom(CANARY_5XX_RETRY),
                format!("canary answered {status}"),
            );
            e.set_retry(true);
            return Err(e);
        }
        ctx.upstream_status = Some(status);
        // Judged by the whole answer: it stays in flight until its last byte (or its end).
        if let Some(now) = head_at {
            if let (Some(route), Some(track)) = (ctx.route(), ctx.version) {
                let a = &route.analysis;
                if a.latency == LatencyTo::Answer
                    && !is_stream(upstream_response, &a.stream_content_types)
                {
                    let started = ctx.attempt_start;
                    ctx.answer_in_flight = ctx
                        .track_metrics(track)
                        .map(|m| (track, m.answers_in_flight.start_since(started, now)));
                }
            }
        }
        // gRPC runs over HTTP/2 only: an HTTP/1 answer (every pool but an h2c one) has no
        // `grpc-status` to look up.
        if upstream_response.version == http::Version::HTTP_2 {
            ctx.edge.grpc_failed = h2::grpc_failed(&upstream_response.headers, ctx.grpc_codes());
        }
        Ok(())
    }

    /// Ends the latency of an answer judged whole at its last byte.
    ///
    /// - **When**: for each piece of the upstream answer's body as it arrives (and of an
    ///   upgraded connection's stream), before `response_body_filter`; the last piece with
    ///   `end_of_stream`. Not for an answer without a body piece (`logging` ends those).
    /// - **Returns**: `Ok(None)`, the body untouched, no added delay.
    /// - **Reads**: `end_of_stream`, `ctx.answer_in_flight`, `attempt_start`.
    /// - **Writes**: at the end of an answer judged whole (`[routes.analysis] latency =
    ///   "answer"`, not a stream): `ctx.attempt_latency` (from the end of the upload to this
    ///   last byte) and its end in the track's `answers_in_flight`.
    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<Ctx>,
    ) -> Result<Option<Duration>> {
        if let (Some(c), Some(b)) = (ctx.shadow.as_mut(), body.as_ref()) {
            c.answer_body(b);
        }
        if end_of_stream && ctx.answer_in_flight.is_some() {
            ctx.answer_done(Instant::now());
        }
        Ok(None)
    }

    /// gRPC sends its status in trailers after the body.
    ///
    /// - **When**: when an upstream answer ends with trailers, after its body. Only HTTP/2
    ///   answers (h2c pools) carry them: Pingora's HTTP/1 client does not pass trailers on.
    /// - **Returns**: always `Ok(())`, the trailers untouched.
    /// - **Reads**: the trailers' `grpc-status`, the route's `grpc_error_codes`.
    /// - **Writes**: `ctx.edge.grpc_failed`, or-ed with what the head said, which `logging`
    ///   counts as an error of the version in the analysis (the answer itself stays a 2xx in
    ///   `kanaria_requests_total`).
    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        upstream_trailers: &mut http::HeaderMap,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        ctx.edge.grpc_failed |= h2::grpc_failed(upstream_trailers, ctx.grpc_codes());
        Ok(())
    }

    /// Adds Kanaria's headers to the upstream's answer.
    ///
    /// - **When**: after `upstream_response_filter` accepted the head, just before it is
    ///   written to the client. Kanaria's own answers do not pass here: `respond_text` adds
    ///   the same headers to them.
    /// - **Returns**: `Ok(())` to send the head; `Err` (a header that cannot be added) fails
    ///   the attempt through `error_while_proxy`.
    /// - **Reads**: `ctx.live` (header names), `version`, `generated_request_id`,
    ///   `response_carries` (which of the headers the answer already has), `edge.issued` and
    ///   the route's issued cookie settings.
    /// - **Writes**: the answer head: the version header, the request id when Kanaria
    ///   generated it, `Set-Cookie` for an issued key. No `Ctx` field, no metric.
    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        decorate_response(upstream_response, ctx, ctx.response_carries)
    }

    /// Answers a request that ended in an error, if nothing was sent to the client yet.
    ///
    /// - **When**: at most once per request, before `logging`: after an `Err` from
    ///   `request_filter`, or when the last attempt's error will not be retried (from
    ///   `upstream_peer`, `fail_to_connect` or `error_while_proxy`).
    /// - **Returns**: `error_code`, the status for Pingora's error log line (0 when the client
    ///   is gone), and `can_reuse_downstream: false`: the client connection is closed. The
    ///   status: 502 for no healthy endpoint, an upstream failure or ambiguous upstream
    ///   framing; 504 for an upstream connect, read or write timeout; 400 for a client error;
    ///   500 for an internal one; an `HTTPStatus` error's own code.
    /// - **Reads**: the error's type and source; whether a response head went out already
    ///   (then nothing is written: a second answer would corrupt the stream).
    /// - **Writes**: Kanaria's plain-text answer through `respond_text` (version header,
    ///   request id, issued cookie), with keep-alive off so it says `Connection: close`. No
    ///   `Ctx` field, no metric: `logging` counts the request.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Box<Ctx>,
    ) -> FailToProxy {
        use ErrorType::*;
        let (code, body) = match e.etype() {
            HTTPStatus(code) => (*code, "kanaria: request failed\n"),
            Custom(NO_HEALTHY_ENDPOINT) => (502, "kanaria: no healthy upstream endpoint\n"),
            // The name itself stays in the log and the status API, not in a public answer.
            Custom(NO_RESOLVED_ENDPOINT) => (
                502,
                "kanaria: no upstream endpoint: the pool's endpoint names do not resolve\n",
            ),
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
        // A withdrawn answer that ended by its own framing (the last chunk): the client's
        // connection is whole, and kept. Closing it would race the client's reconnect,
        // which reuses it as soon as it read the end (measured in tests/streams.rs: 8 of
        // 15 SSE reconnects failed with a reset); its next request is split afresh.
        if e.etype() == &UPSTREAM_WITHDRAWN_ENDED {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: true,
            };
        }
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
    ///
    /// - **When**: last, once for every request Pingora made a context for, whatever
    ///   happened: after the answer was sent, after `fail_to_proxy`, or right after a
    ///   `request_filter` that answered itself (`e` is `None` then, as for a success). A
    ///   head Pingora's own parser refused reaches no hook at all.
    /// - **Returns**: nothing.
    /// - **Reads**: the status written to the client, `e` (its source and type), `ctx.start`,
    ///   `version`, `upstream_status`, `attempt_latency`, `attempt_start`, `edge.grpc_failed`;
    ///   the access log reads most of [`Ctx`].
    /// - **Writes**: the connection guard's idle phase ([`conn_guard::request_finished`]: the
    ///   next byte on the connection starts the next header deadline); one access log line
    ///   (with `[log]`; `kanaria_access_log_dropped_total` when its queue is full); the end of
    ///   the attempt (`attempt_over`). For a request with a version (the one that answered,
    ///   stable after a switch): `kanaria_requests_total{code_class}` and
    ///   `kanaria_request_duration_seconds` (from `new_ctx`), `kanaria_upstream_errors_total`
    ///   for an upstream failure or a 5xx, and one outcome in that version's analysis window:
    ///   the last attempt's latency to its answer's last byte (to its head for a stream or a
    ///   route with `latency = "head"`; to now for an answer judged whole whose last body
    ///   piece did not pass `upstream_response_body_filter`), an error for a 5xx, an upstream
    ///   failure or a failing gRPC status. Without an answer head: the time the last attempt
    ///   waited, an error unless a status below 500 was sent; nothing when the client hung
    ///   up, nor for a reused connection found closed that could not be retried.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Box<Ctx>) {
        crate::proxy::conn_guard::request_finished(session.as_downstream());
        if let Some(log) = &self.access_log {
            log.log(session, ctx);
        }
        let now = Instant::now();
        // An answer judged whole that ended without a last body piece (no body, a failure or
        // the client gone mid-body): its latency runs to now.
        ctx.answer_done(now);
        ctx.attempt_over();
        let Some(version) = ctx.version else {
            return;
        };
        // Mirrored once the user's answer went out whole from stable.
        if let Some(c) = ctx.shadow.take() {
            if e.is_none() && version == Track::Stable && ctx.upstream_status.is_some() {
                if let Some(r) = ctx.route().cloned() {
                    let stable_seconds = ctx.attempt_latency.unwrap_or(0.0);
                    let metrics = ctx.route_metrics().cloned();
                    self.mirror.offer(r, metrics, *c, stable_seconds);
                }
            }
        }
        let Some(m) = ctx.track_metrics(version) else {
            return;
        };
        let status = session
            .as_downstream()
            .response_written()
            .map(|r| r.status.as_u16());
        m.record(
            status,
            now.saturating_duration_since(ctx.start).as_secs_f64(),
        );
        // A canary answer Kanaria ended at a rollback: not the canary's failure (nor is the
        // `grpc-status: 14` it ended a gRPC stream with).
        let ended_here = e.is_some_and(withdrawn);
        let upstream_failed =
            !ended_here && e.is_some_and(|e| e.esource() == &ErrorSource::Upstream);
        if let Some(kind) = e.filter(|_| !ended_here).and_then(upstream_error_kind) {
            m.upstream_error(kind);
        } else if ctx.upstream_status.is_some_and(|s| s >= 500) {
            m.upstream_error(UpstreamErrorKind::Status5xx);
        }
        // A reused connection found closed, not retried: Kanaria's pool, not the version.
        if ctx.stale_connection {
            return;
        }
        // The analysis judges the last attempt by its own latency: to its answer's last byte,
        // or to its head for a stream or a route with `latency = "head"`.
        match ctx.attempt_latency {
            Some(latency) => {
                let is_error = ctx.upstream_status.is_some_and(|s| s >= 500)
                    || upstream_failed
                    || (ctx.edge.grpc_failed && !ended_here);
                m.observe(is_error, latency);
            }
            // The client hung up before any answer: not the version's failure.
            None if e.is_some_and(|e| e.esource() == &ErrorSource::Downstream) => {}
            // No answer: refused, reset, timed out, no endpoint, or an internal error.
            None => {
                let waited = now
                    .saturating_duration_since(ctx.attempt_start)
                    .as_secs_f64();
                m.observe(status.is_none_or(|s| s >= 500), waited)
            }
        }
    }
}
