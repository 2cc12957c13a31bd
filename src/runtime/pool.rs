//! One release's endpoints as the request path uses them: resolved addresses, Pingora's
//! load balancer with its health checks, and the readiness flags the request path picks
//! from.
//!
//! A pool is immutable. When its names resolve to other addresses, the control plane makes
//! a new pool over the new addresses whose load balancer is another view of the same
//! [`HealthRegistry`] (Pingora's shared health state): endpoints that stay keep the health
//! they earned, requests in flight keep the pool they picked from.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, HealthRegistry, LoadBalancer};

use super::resolve::NameEntry;
use crate::config::{HealthSettings, PoolSettings, Release};

/// One version's endpoints, with the load balancer that health-checks them.
pub struct Pool {
    /// The release label, e.g. `v2`.
    pub version: String,
    /// The addresses served: the IP endpoints and every address the names resolved to.
    pub endpoints: Vec<SocketAddr>,
    pub lb: Arc<LoadBalancer<RoundRobin>>,
    /// Speak HTTP/2 with prior knowledge to the endpoints.
    pub h2c: bool,
    /// What the pool was built from: an equal pool in a new config keeps this one (and so
    /// its endpoints' health).
    pub settings: PoolSettings,
    pub health_settings: Option<HealthSettings>,
    /// Names without any address when the pool was made (never resolved), with why.
    pub unresolved: Vec<(String, String)>,
    /// The pool's endpoint names and their answers (shared with every pool listing them).
    pub names: Vec<Arc<NameEntry>>,
    /// The health of the endpoints, shared by the pools that follow this one when its
    /// names resolve to other addresses.
    pub registry: Arc<HealthRegistry>,
    /// The load balancer's backends (in its order), each with whether it was ready (healthy
    /// and enabled) after the last health check round: what the request path picks from.
    picks: Box<[(Backend, AtomicBool)]>,
    /// Round-robin position.
    next: AtomicUsize,
}

impl Release for Pool {
    fn release(&self) -> &str {
        &self.version
    }
}

impl Pool {
    pub fn new(
        settings: PoolSettings,
        health_settings: Option<HealthSettings>,
        endpoints: Vec<SocketAddr>,
        unresolved: Vec<(String, String)>,
        names: Vec<Arc<NameEntry>>,
        registry: Arc<HealthRegistry>,
        lb: Arc<LoadBalancer<RoundRobin>>,
    ) -> Self {
        let backends = lb.backends();
        let picks = backends
            .get_backend()
            .iter()
            .map(|b| (b.clone(), AtomicBool::new(backends.ready(b))))
            .collect();
        Pool {
            version: settings.version.clone(),
            h2c: settings.h2c,
            settings,
            health_settings,
            endpoints,
            unresolved,
            names,
            registry,
            lb,
            picks,
            next: AtomicUsize::new(0),
        }
    }

    /// Copies the load balancer's readiness into the request path's flags. Readiness
    /// changes only in a health check round, so the analysis loop calls this after each.
    pub fn refresh_ready(&self) {
        let backends = self.lb.backends();
        for (b, ready) in self.picks.iter() {
            ready.store(backends.ready(b), Ordering::Relaxed);
        }
    }

    /// The next ready endpoint, round robin, as `LoadBalancer::select` picks it; `None`
    /// when none is ready. One atomic add and a scan of flags: Pingora's `select` builds a
    /// hash set and hashes every candidate on each call.
    pub fn select(&self) -> Option<&Backend> {
        let n = self.picks.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &self.picks[start.wrapping_add(k) % n])
            .find(|(_, ready)| ready.load(Ordering::Relaxed))
            .map(|(b, _)| b)
    }

    /// Each endpoint with whether it is in rotation (healthy per the health checks).
    pub fn health(&self) -> Vec<(SocketAddr, bool)> {
        let backends = self.lb.backends();
        let set = backends.get_backend();
        self.endpoints
            .iter()
            .map(|e| {
                let healthy = set
                    .iter()
                    .find(|b| b.addr.as_inet() == Some(e))
                    .is_some_and(|b| backends.ready(b));
                (*e, healthy)
            })
            .collect()
    }

    pub fn healthy_count(&self) -> usize {
        self.health().iter().filter(|(_, h)| *h).count()
    }

    /// Why the pool has no endpoint at all, when that is because its names never resolved.
    pub fn unresolved_reason(&self) -> Option<String> {
        if !self.endpoints.is_empty() || self.unresolved.is_empty() {
            return None;
        }
        let whys: Vec<String> = self
            .unresolved
            .iter()
            .map(|(name, why)| format!("{name}: {why}"))
            .collect();
        Some(format!("no endpoint: {}", whys.join("; ")))
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("version", &self.version)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}
