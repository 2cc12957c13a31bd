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
//! The guard is on every read and write, so it is kept cheap: a read that completes at once
//! only looks whether the timer has fired; the timer is polled (to be woken by it) only when
//! a read has to wait and it does not hold this task's waker yet. A kept-alive header's
//! deadline is taken (a clock read) only when its first read did not complete it, at the
//! next read, which Pingora makes at once after parsing those first bytes. Plain TCP is
//! held by its concrete type (see [`Inner`]), so that the guard's reads and writes do not
//! pass through a second `dyn IO`.
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
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN, IO,
};
use pingora::protocols::{SocketDigest, TimingDigest};
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::RejectReason;
use crate::runtime::LiveHandle;

const PHASE_HEADER: u8 = 0;
const PHASE_REQUEST: u8 = 1;
const PHASE_IDLE: u8 = 2;
/// An HTTP/2 connection: no header deadline.
const PHASE_H2: u8 = 3;

/// The start of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";
const NOT_H2: u8 = u8::MAX;

/// The accepted stream under the guard. Plain TCP is held by its concrete type, so that the
/// guard's reads and writes call it directly: Pingora calls the guard through its
/// `Box<dyn IO>`, and a `Box<dyn IO>` inside would be a second dynamic dispatch on every
/// read, write and flush. Any other stream (TLS) stays as Pingora handed it.
#[derive(Debug)]
enum Inner {
    Tcp(Box<TcpStream>),
    Boxed(Stream),
}

/// `$e` with `$s` bound to the inner stream of either kind (each arm a static call).
macro_rules! on_inner {
    ($inner:expr, $s:ident => $e:expr) => {
        match $inner {
            Inner::Tcp($s) => $e,
            Inner::Boxed($s) => $e,
        }
    };
}

impl Inner {
    /// Takes a plain TCP stream out of `dyn IO`; `None` only if the downcast fails although
    /// the type check before it passed (not expected: the connection is then closed).
    fn new(stream: Stream) -> Option<Inner> {
        if !stream.as_any().is::<TcpStream>() {
            return Some(Inner::Boxed(stream));
        }
        stream
            .into_any()
            .downcast::<TcpStream>()
            .ok()
            .map(Inner::Tcp)
    }

    /// For the calls made once per connection (set a digest, shutdown, peek): one dispatch.
    fn io_mut(&mut self) -> &mut dyn IO {
        match self {
            Inner::Tcp(s) => &mut **s,
            Inner::Boxed(s) => &mut **s,
        }
    }
}

/// A client connection whose request headers must arrive within a deadline.
pub struct GuardedStream {
    inner: Inner,
    /// `PHASE_*`: reading a header (deadline armed), in a request, or idle between requests.
    phase: AtomicU8,
    header_timeout: Duration,
    /// Bytes of the HTTP/2 preface matched by the first bytes read so far; `NOT_H2` once
    /// they differ. Decided only on the whole start, so a slow "P" does not disarm anything.
    preface: u8,
    /// Fires at the header deadline. On a kept-alive connection the timer is moved to the
    /// next request's deadline only when a read of that header has to go on after its
    /// first bytes, which a header arriving in one read (the common case) never does.
    deadline: Pin<Box<Sleep>>,
    /// The task waker `deadline` was last polled with, while it has not fired since: the
    /// timer will wake the task, so a read that waits need not poll it again (a poll costs
    /// more than the comparison). Cleared when the timer is moved.
    armed: Option<Waker>,
    /// The first bytes of a kept-alive connection's next header were read: its deadline
    /// starts with the next read of that header, if it needs one (see `poll_read`).
    header_next: bool,
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
    /// Wraps a freshly accepted stream: the first header's deadline starts now. `None` as
    /// [`Inner::new`].
    fn new(
        inner: Stream,
        header_timeout: Duration,
        idle_secs: u64,
        timeouts: IntCounter,
    ) -> Option<Self> {
        Some(GuardedStream {
            inner: Inner::new(inner)?,
            phase: AtomicU8::new(PHASE_HEADER),
            header_timeout,
            preface: 0,
            deadline: Box::pin(tokio::time::sleep(header_timeout)),
            armed: None,
            header_next: false,
            idle_secs: AtomicU64::new(idle_secs),
            idle_deadline: None,
            timeouts,
            _slot: None,
        })
    }
}

fn guarded(session: &pingora::protocols::http::ServerSession) -> Option<&GuardedStream> {
    session.stream()?.as_any().downcast_ref::<GuardedStream>()
}

/// The request header on this connection is complete: stop its deadline. `idle_secs`
/// (`edge.idle_timeout` of the config the request runs with) bounds the wait after it.
/// Called by the proxy's `request_filter` (through `headers::admit`), the first hook with
/// the request's head.
pub fn request_started(session: &pingora::protocols::http::ServerSession, idle_secs: u64) {
    if let Some(g) = guarded(session) {
        g.phase.store(PHASE_REQUEST, Ordering::Relaxed);
        g.idle_secs.store(idle_secs, Ordering::Relaxed);
    }
}

/// The request is over: the next byte on this connection starts the next header deadline.
/// Called by the proxy's `logging` hook, which Pingora runs once at the end of every
/// request.
pub fn request_finished(session: &pingora::protocols::http::ServerSession) {
    if let Some(g) = guarded(session) {
        g.phase.store(PHASE_IDLE, Ordering::Relaxed);
    }
}

impl GuardedStream {
    /// Moves the timer to `at`; the next wait polls it again.
    fn set_timer(&mut self, at: Instant) {
        self.deadline.as_mut().reset(at);
        self.armed = None;
    }

    /// A read is about to return `Pending`: makes sure the timer wakes this task when it
    /// fires. `Ready` when it has fired.
    fn wait_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.deadline.is_elapsed() {
            return Poll::Ready(());
        }
        if self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        // Without budget left the poll returns `Pending` without registering the waker
        // (and the task is woken at once): only a poll with budget arms the timer.
        let registers = tokio::task::coop::has_budget_remaining();
        let res = self.deadline.as_mut().poll(cx);
        if res.is_pending() && registers {
            self.armed = Some(cx.waker().clone());
        }
        res
    }

    fn header_timed_out(&self) -> Poll<io::Result<()>> {
        // Counted once: Pingora does not read again after an error.
        self.timeouts.inc();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "request header deadline (edge.header_timeout) passed",
        )))
    }
}

impl AsyncRead for GuardedStream {
    /// The timer is only compared on reads that complete at once; it is polled (so that it
    /// wakes the task) only when a read waits and it is not armed yet.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let phase = this.phase.load(Ordering::Relaxed);
        if phase == PHASE_HEADER {
            if this.header_next {
                // The kept-alive header's first read did not complete it: its deadline
                // runs from now, which is within that read's parsing of its first bytes
                // (Pingora reads on at once), and the timer is moved there.
                this.header_next = false;
                let at = Instant::now() + this.header_timeout;
                this.set_timer(at);
            }
            // A fired timer is the deadline passed (as a poll would say, without the poll).
            if this.deadline.is_elapsed() {
                return this.header_timed_out();
            }
        }
        let before = buf.filled().len();
        let res = on_inner!(&mut this.inner, s => Pin::new(s).poll_read(cx, buf));
        if res.is_pending() {
            if phase == PHASE_HEADER {
                if this.wait_timer(cx).is_ready() {
                    return this.header_timed_out();
                }
            } else if phase == PHASE_IDLE {
                return this.idle_wait(cx);
            }
            return res;
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
            // First bytes of the next request on a kept-alive connection. No clock read
            // here: most headers arrive whole in this read.
            this.phase.store(PHASE_HEADER, Ordering::Relaxed);
            this.idle_deadline = None;
            this.header_next = true;
        }
        res
    }
}

impl GuardedStream {
    /// Waiting for the next request, nothing read: bounded by the idle timeout, from the
    /// first wait after the last request. `Ready(Ok)` (end of stream) once it passed.
    fn idle_wait(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.idle_deadline.is_none() {
            let idle = Duration::from_secs(self.idle_secs.load(Ordering::Relaxed));
            let at = Instant::now() + idle;
            self.idle_deadline = Some(at);
            // The timer only has to fire by `at`. One still pending for earlier (the
            // previous wait's end, when requests follow each other) is kept and moved
            // on when it fires: a timer wheel update per request costs more than the
            // comparison.
            if self.deadline.is_elapsed() || self.deadline.deadline() > at {
                self.set_timer(at);
            }
        }
        while self.wait_timer(cx).is_ready() {
            match self.idle_deadline {
                // Fired for an earlier wait's end: on to this one's.
                Some(at) if self.deadline.deadline() < at => self.set_timer(at),
                // Nothing read: the end of the stream, which Pingora takes as a client
                // that closed its idle connection (what its keep-alive timeout did).
                _ => return Poll::Ready(Ok(())),
            }
        }
        Poll::Pending
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_inner!(&mut self.get_mut().inner, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_inner!(&mut self.get_mut().inner, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_inner!(&mut self.get_mut().inner, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_inner!(&mut self.get_mut().inner, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        on_inner!(&self.inner, s => s.is_write_vectored())
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        self.inner.io_mut().shutdown().await
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        on_inner!(&self.inner, s => s.id())
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        on_inner!(&self.inner, s => s.get_ssl())
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        on_inner!(&self.inner, s => s.get_ssl_digest())
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        on_inner!(&self.inner, s => s.selected_alpn_proto())
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        on_inner!(&self.inner, s => s.get_timing_digest())
    }

    fn get_read_pending_time(&self) -> Duration {
        on_inner!(&self.inner, s => s.get_read_pending_time())
    }

    fn get_write_pending_time(&self) -> Duration {
        on_inner!(&self.inner, s => s.get_write_pending_time())
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        on_inner!(&self.inner, s => s.get_proxy_digest())
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.io_mut().set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        on_inner!(&self.inner, s => s.get_socket_digest())
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.io_mut().set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.io_mut().try_peek(buf).await
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
    shared: Arc<LiveHandle>,
    listeners: Vec<ListenerCount>,
    /// Connections accepted on an address no listener entry matches (not expected).
    other: Arc<AtomicUsize>,
    /// How long idle connections stay open once shutdown began (see [`crate::proxy::drain`]).
    linger: Duration,
}

impl<A> GuardedApp<A> {
    /// `listen` are the proxy's listener addresses (fixed until restart); `linger`, how long
    /// idle client connections stay open after shutdown began ([`crate::proxy::drain`]).
    pub fn new(inner: A, shared: Arc<LiveHandle>, listen: &[SocketAddr], linger: Duration) -> Self {
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
    /// Guards one accepted client connection of a proxy listener, then hands it to the proxy.
    ///
    /// - **When**: Pingora calls it once per accepted connection, before any byte of a
    ///   request is read; on a TLS listener after the handshake (which Pingora bounds by
    ///   60 s of its own), so the cap and the header deadline start there.
    /// - **Returns**: the proxy app's future over a [`GuardedStream`]: Pingora's HTTP/1
    ///   keep-alive loop, or the HTTP/2 connection, runs inside it, request after request,
    ///   and ends with `None` (the connection is closed, never handed back). A ready `None`
    ///   closes the connection at once, before anything is read: its listener already holds
    ///   `edge.max_connections`, or the stream could not be unboxed.
    /// - **Reads**: the live snapshot's `[edge]` (`max_connections`, `header_timeout`,
    ///   `idle_timeout`), loaded per connection: a reload applies to new connections.
    /// - **Writes**: the listener's open-connection count (released when the stream is
    ///   dropped); `kanaria_rejected_requests_total{reason="connection_limit"}` for a refused
    ///   connection (the stream counts `reason="header_timeout"` itself).
    ///
    /// Not an `async fn`: the checks run at once and the inner app's future is returned as
    /// it is, so that every poll of the connection's task does not pass through a future of
    /// the guard first.
    fn process_new<'life0, 'life1, 'async_trait>(
        self: &'life0 Arc<Self>,
        stream: Stream,
        shutdown: &'life1 ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<Stream>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        let snap = self.shared.snapshot();
        let edge = &snap.config.edge;
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
            return Box::pin(std::future::ready(None));
        }
        let Some(mut guarded) = GuardedStream::new(
            stream,
            edge.header_timeout,
            edge.idle_timeout_secs,
            metrics.rejected(RejectReason::HeaderTimeout).clone(),
        ) else {
            log::warn!("connection closed: its stream could not be unboxed");
            return Box::pin(std::future::ready(None));
        };
        guarded._slot = Some(slot);
        self.inner.process_new(Box::new(guarded), shutdown)
    }

    /// Called once the listeners stopped. The proxy's own cleanup is what wakes the idle
    /// connections to close them; it runs after the linger ([`crate::proxy::drain`]).
    ///
    /// - **When**: once per service, after Pingora stopped accepting on its listeners
    ///   (SIGTERM, or SIGQUIT once the listeners were handed to a new process).
    /// - **Returns**: once the linger has passed and the proxy app's cleanup returned.
    /// - **Reads**: the linger (half of `proxy.shutdown_grace`, fixed at start).
    /// - **Writes**: nothing of Kanaria's; Pingora's cleanup marks the proxy as shutting
    ///   down and wakes the connections waiting idle for a next request, which then close.
    async fn cleanup(&self) {
        crate::proxy::drain::linger(self.linger).await;
        self.inner.cleanup().await
    }
}
