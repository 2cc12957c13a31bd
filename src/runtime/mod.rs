//! The runtime: what the data plane serves from, built from settings.
//!
//! A [`Snapshot`] is one immutable view of the config as served: the validated
//! [`Config`], each route with its pools built (resolved endpoints,
//! Pingora's load balancers and health checks), and the header names the proxy adds,
//! prepared once. [`Live`] pairs a snapshot with the metric handles of its routes and their
//! rollout states; [`LiveHandle`] holds the current `Live` in one `ArcSwap` and the metrics:
//! the data plane loads it once per request (no lock) and the control plane stores a new one
//! whole. Building ([`build`]), endpoint names and their answers ([`resolve`]) and
//! certificates ([`certs`]) live here too; nothing here decides a rollout.

pub mod build;
pub mod certs;
pub mod exposition;
pub mod pool;
pub mod resolve;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{self, Config};
use crate::metrics::{Metrics, RouteMetrics};

pub use pool::Pool;

/// A route as served: its settings with its pools built.
pub type Route = config::Route<Arc<Pool>>;

/// A header Kanaria adds to messages: its name for lookups, and the name Pingora inserts,
/// parsed once with its wire case (the vendored Pingora's `PreparedHeaderName`: an insert
/// then neither parses the name nor allocates; see vendor/patches/0001).
#[derive(Debug, Clone)]
pub struct AddedHeader {
    pub name: http::HeaderName,
    pub prepared: pingora::http::PreparedHeaderName,
}

impl AddedHeader {
    pub fn new(name: http::HeaderName) -> Self {
        // The case Pingora would give the name per call (title case for the names it
        // knows, as written otherwise).
        let prepared = pingora::http::PreparedHeaderName::new(name.clone());
        AddedHeader { name, prepared }
    }
}

/// The headers of `[proxy]` that the proxy adds, prepared.
#[derive(Debug, Clone)]
pub struct AddedHeaders {
    /// `None` when `add_version_header = false`.
    pub version: Option<AddedHeader>,
    pub request_id: AddedHeader,
}

impl AddedHeaders {
    pub fn new(proxy: &config::ProxySettings) -> Self {
        AddedHeaders {
            version: proxy.version_header.clone().map(AddedHeader::new),
            request_id: AddedHeader::new(proxy.request_id_header.clone()),
        }
    }
}

/// The config as served. Immutable; shared by `Arc`, replaced whole.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// 0 until published; then 1, 2, ... per publication.
    pub generation: u64,
    /// The settings as validated (their routes carry the file's weights).
    pub config: Arc<Config>,
    /// Parallel to `config.routes` (and so to `config.router`'s indexes), with the weights
    /// the rollout decided.
    pub routes: Vec<Arc<Route>>,
    pub headers: AddedHeaders,
}

/// The published snapshot plus per-route metric handles, swapped as one.
pub struct Live {
    pub snapshot: Arc<Snapshot>,
    /// Parallel to `snapshot.routes`.
    pub route_metrics: Vec<Arc<RouteMetrics>>,
    /// Each route's `rollout_state` when published (parallel to `snapshot.routes`), for
    /// `kanaria_rollout_state`.
    pub states: Vec<&'static str>,
}

/// What the data plane reads: the current [`Live`] and the metrics it records into.
pub struct LiveHandle {
    live: ArcSwap<Live>,
    pub metrics: Metrics,
}

impl LiveHandle {
    /// A handle serving `snapshot` (no route metrics yet: the control plane publishes).
    pub fn new(snapshot: Arc<Snapshot>, metrics: Metrics) -> Self {
        LiveHandle {
            live: ArcSwap::from_pointee(Live {
                snapshot,
                route_metrics: Vec::new(),
                states: Vec::new(),
            }),
            metrics,
        }
    }

    /// What a request decides from. One atomic load; no lock.
    #[inline]
    pub fn load(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// The current snapshot (for status and tests).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.live.load().snapshot.clone()
    }

    /// Makes `live` what every request from now on decides from. Only the control plane
    /// calls this, under its lock, so publications never interleave.
    pub fn store(&self, live: Live) {
        self.metrics.generation.set(live.snapshot.generation as i64);
        self.live.store(Arc::new(live));
    }
}
