//! Client connections of the proxy listeners: a cap per listener and a deadline for every
//! whole request header.
//!
//! Pingora times out each *read* of a request header, not the header as a whole
//! (pingora#447): a client sending one byte just inside the read timeout keeps a connection
//! and a task forever (slowloris). Pingora has no hook between accept and the first read,
//! so Kanaria wraps the proxy app: [`GuardedApp`] receives each accepted stream, refuses it
//! when its listener is at `edge.max_connections`, and hands Pingora a [`GuardedStream`]
//! whose reads fail once `edge.header_timeout` has passed while a request header is still
//! being read. The deadline runs from accept for the first request and from the first byte
//! for each later one on a kept-alive connection; the proxy hooks tell the stream when a
//! header is complete ([`request_started`]) and when the request is over
//! ([`request_finished`]). Between requests the same timer bounds the wait for the next
//! request's first byte (`edge.idle_timeout`): once it passes, the stream reads as closed
//! and Pingora ends the connection as a client that hung up. (Pingora's own keep-alive
//! timeout would do the same with a new timer for every request; this one timer per
//! connection is moved instead.) Everything is atomics: no lock per connection or read.
//!
//! The header deadline is HTTP/1-specific: an HTTP/2 connection (its first bytes are the
//! client preface, on h2c or after TLS with ALPN `h2`) interleaves the frames of many
//! requests, so the deadline is disarmed for it; `[edge] h2_max_concurrent_streams` and
//! `h2_max_header_list_size` bound such a connection instead.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::protocols::{SocketDigest, TimingDigest};
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::proxy::edge::RejectReason;
use crate::rollout::control::Shared;

const PHASE_HEADER: u8 = 0;
const PHASE_REQUEST: u8 = 1;
const PHASE_IDLE: u8 = 2;
/// An HTTP/2 connection: no header deadline.
const PHASE_H2: u8 = 3;

/// The start of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";
const NOT_H2: u8 = u8::MAX;

/// A client connection whose request headers must arrive within a deadline.
pub struct GuardedStream {
    inner: Stream,
    /// `PHASE_*`: reading a header (deadline armed), in a request, or idle between requests.
    phase: AtomicU8,
    header_timeout: Duration,
    /// Bytes of the HTTP/2 preface matched by the first bytes read so far; `NOT_H2` once
    /// they differ. Decided only on the whole start, so a slow "P" does not disarm anything.
    preface: u8,
    /// Fires at the header deadline. On a kept-alive connection the next request's
    /// deadline is only written to `header_deadline`; the timer is moved there (a timer
    /// wheel update) the first time a read of that header has to wait, which a header
    /// arriving in one read (the common case) never does.
    deadline: Pin<Box<Sleep>>,
    /// The current header's deadline, when `deadline` still points at an earlier one.
    header_deadline: Option<Instant>,
    /// `edge.idle_timeout` in seconds, as of the last request (a reload applies to the
    /// next wait).
    idle_secs: AtomicU64,
    /// The end of the current idle wait, once it began. `deadline` fires by then, maybe
    /// earlier (a previous wait's end): it is moved on when it fires early.
    idle_deadline: Option<Instant>,
    timeouts: IntCounter,
    /// Holds the listener's connection count; released when the connection closes.
    _slot: Option<Slot>,
}

impl fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedStream")
            .field("inner", &self.inner)
            .field("phase", &self.phase.load(Ordering::Relaxed))
            .finish()
    }
}

impl GuardedStream {
    /// Wraps a freshly accepted stream: the first header's deadline starts now.
    pub fn new(
        inner: Stream,
        header_timeout: Duration,
        idle_secs: u64,
        timeouts: IntCounter,
    ) -> Self {
        GuardedStream {
            inner,
            phase: AtomicU8::new(PHASE_HEADER),
            header_timeout,
            preface: 0,
            deadline: Box::pin(tokio::time::sleep(header_timeout)),
            header_deadline: None,
            idle_secs: AtomicU64::new(idle_secs),
            idle_deadline: None,
            timeouts,
            _slot: None,
        }
    }
}

fn guarded(session: &pingora::protocols::http::ServerSession) -> Option<&GuardedStream> {
    session.stream()?.as_any().downcast_ref::<GuardedStream>()
}

/// The request header on this connection is complete: stop its deadline. `idle_secs`
/// (`edge.idle_timeout` of the config the request runs with) bounds the wait after it.
pub fn request_started(session: &pingora::protocols::http::ServerSession, idle_secs: u64) {
    if let Some(g) = guarded(session) {
        g.phase.store(PHASE_REQUEST, Ordering::Relaxed);
        g.idle_secs.store(idle_secs, Ordering::Relaxed);
    }
}

/// The request is over: the next byte on this connection starts the next header deadline.
pub fn request_finished(session: &pingora::protocols::http::ServerSession) {
    if let Some(g) = guarded(session) {
        g.phase.store(PHASE_IDLE, Ordering::Relaxed);
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let phase = this.phase.load(Ordering::Relaxed);
        if phase == PHASE_HEADER {
            if let Some(at) = this.header_deadline.take() {
                this.deadline.as_mut().reset(at);
            }
        }
        if phase == PHASE_HEADER && this.deadline.as_mut().poll(cx).is_ready() {
            // Counted once: Pingora does not read again after an error.
            this.timeouts.inc();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request header deadline (edge.header_timeout) passed",
            )));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if phase == PHASE_IDLE && res.is_pending() {
            // Waiting for the next request: bounded by the idle timeout, from the first
            // wait after the last request.
            if this.idle_deadline.is_none() {
                let idle = Duration::from_secs(this.idle_secs.load(Ordering::Relaxed));
                let at = Instant::now() + idle;
                this.idle_deadline = Some(at);
                // The timer only has to fire by `at`. One still pending for earlier (the
                // previous wait's end, when requests follow each other) is kept and moved
                // on when it fires: a timer wheel update per request costs more than the
                // comparison.
                if this.deadline.is_elapsed() || this.deadline.deadline() > at {
                    this.deadline.as_mut().reset(at);
                }
            }
            while this.deadline.as_mut().poll(cx).is_ready() {
                match this.idle_deadline {
                    // Fired for an earlier wait's end: on to this one's.
                    Some(at) if this.deadline.deadline() < at => this.deadline.as_mut().reset(at),
                    // Nothing read: the end of the stream, which Pingora takes as a client
                    // that closed its idle connection (what its keep-alive timeout did).
                    _ => return Poll::Ready(Ok(())),
                }
            }
        }
        if usize::from(this.preface) < H2_PREFACE_START.len() && matches!(res, Poll::Ready(Ok(())))
        {
            for &b in &buf.filled()[before..] {
                if H2_PREFACE_START.get(usize::from(this.preface)) != Some(&b) {
                    this.preface = NOT_H2;
                    break;
                }
                this.preface += 1;
                if usize::from(this.preface) == H2_PREFACE_START.len() {
                    this.phase.store(PHASE_H2, Ordering::Relaxed);
                    return res;
                }
            }
        }
        if phase == PHASE_IDLE && matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before
        {
            // First byte of the next request on a kept-alive connection.
            this.phase.store(PHASE_HEADER, Ordering::Relaxed);
            this.idle_deadline = None;
            this.header_deadline = Some(Instant::now() + this.header_timeout);
        }
        res
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// One connection counted against a listener's cap; released on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Open connections of one listener address.
struct ListenerCount {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
}

/// Wraps the proxy app: connection caps and header deadlines (see the module docs).
pub struct GuardedApp<A> {
    inner: Arc<A>,
    shared: Arc<Shared>,
    listeners: Vec<ListenerCount>,
    /// Connections accepted on an address no listener entry matches (not expected).
    other: Arc<AtomicUsize>,
    /// How long idle connections stay open once shutdown began (see [`crate::proxy::drain`]).
    linger: Duration,
}

impl<A> GuardedApp<A> {
    /// `listen` are the proxy's listener addresses (fixed until restart); `linger`, how long
    /// idle client connections stay open after shutdown began ([`crate::proxy::drain`]).
    pub fn new(inner: A, shared: Arc<Shared>, listen: &[SocketAddr], linger: Duration) -> Self {
        GuardedApp {
            inner: Arc::new(inner),
            shared,
            listeners: listen
                .iter()
                .map(|a| ListenerCount {
                    addr: *a,
                    open: Arc::new(AtomicUsize::new(0)),
                })
                .collect(),
            other: Arc::new(AtomicUsize::new(0)),
            linger,
        }
    }

    /// The counter of the listener a connection came in on (by its local address).
    fn counter(&self, stream: &Stream) -> &Arc<AtomicUsize> {
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let Some(local) = local else {
            return &self.other;
        };
        self.listeners
            .iter()
            .find(|l| {
                l.addr.port() == local.port()
                    && (l.addr.ip() == local.ip() || l.addr.ip().is_unspecified())
            })
            .map(|l| &l.open)
            .unwrap_or(&self.other)
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for GuardedApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let snap = self.shared.snapshot();
        let edge = &snap.edge;
        let counter = self.counter(&stream).clone();
        let open = counter.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = Slot(counter);
        let metrics = &self.shared.metrics.edge;
        if open > edge.max_connections {
            // Closing at once costs the least; the client sees a reset or EOF and may retry.
            metrics.rejected(RejectReason::ConnectionLimit).inc();
            log::debug!(
                "connection refused: listener at edge.max_connections = {}",
                edge.max_connections
            );
            drop(slot);
            return None;
        }
        let mut guarded = GuardedStream::new(
            stream,
            edge.header_timeout,
            edge.idle_timeout_secs,
            metrics.rejected(RejectReason::HeaderTimeout).clone(),
        );
        guarded._slot = Some(slot);
        self.inner.process_new(Box::new(guarded), shutdown).await
    }

    /// Called once the listeners stopped. The proxy's own cleanup is what wakes the idle
    /// connections to close them; it runs after the linger ([`crate::proxy::drain`]).
    async fn cleanup(&self) {
        crate::proxy::drain::linger(self.linger).await;
        self.inner.cleanup().await
    }
}
