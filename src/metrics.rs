//! Prometheus metrics: the registry, every metric Kanaria exports, and per-route handles.
//!
//! Label values are bounded: `route` comes from the config, `version` is `stable` or
//! `canary`, `code_class` and `kind` are fixed sets. The request path never looks a label
//! up: each route gets a [`RouteMetrics`] with its counters and histograms resolved once
//! (when a config is published), so recording is a few atomic adds, no lock, no hashing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::rollout::analysis::{InFlight, Window, STATUS_SPAN};
use crate::split::Track;

/// Request duration buckets, 1 ms to 10 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Status classes of `kanaria_requests_total`; `error` is a request that got no status
/// (the client went away, or the connection broke mid-answer).
pub const CODE_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// Reasons of `kanaria_rollbacks_total`, created at 0 for every route (see [`Metrics::route`]).
pub const ROLLBACK_REASONS: [&str; 6] = [
    "manual",
    "health_check",
    "error_rate",
    "error_rate_ratio",
    "latency",
    "latency_ratio",
];

/// Kinds of `kanaria_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect = 0,
    Timeout = 1,
    Reset = 2,
    Status5xx = 3,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 4] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Status5xx,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Status5xx => "5xx",
        }
    }
}

/// Every metric of the process.
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_errors: IntCounterVec,
    pub canary_weight: prometheus::GaugeVec,
    pub rollout_state: IntGaugeVec,
    pub rollbacks: IntCounterVec,
    pub events: IntCounterVec,
    pub retries: IntCounterVec,
    pub reloads: IntCounterVec,
    pub generation: IntGauge,
    pub endpoint_healthy: IntGaugeVec,
    pub pool_info: IntGaugeVec,
    /// `[fleet]` only (no series without it): 1 while the fleet store answers.
    pub fleet_connected: IntGaugeVec,
    /// `[fleet]` only: replicas seen alive in the fleet (this one included).
    pub fleet_members: IntGaugeVec,
    /// `[fleet]` only: the fleet generation of each route's record applied here.
    pub fleet_generation: IntGaugeVec,
    overrides: IntCounterVec,
    /// Edge rejections (framing, limits, deadlines), handles resolved at start.
    pub edge: EdgeMetrics,
    /// Per-route handles by name, so counters and analysis windows outlive reloads.
    /// Locked only when a config is published.
    routes: Mutex<HashMap<String, Arc<RouteMetrics>>>,
}

/// One version's handles within a route.
pub struct TrackMetrics {
    requests: [IntCounter; 6],
    duration: Histogram,
    upstream_errors: [IntCounter; 4],
    /// Honoured overrides that chose this version.
    pub overrides: IntCounter,
    /// Recent outcomes of upstream attempts, for the status API and the canary analysis.
    pub window: Window,
    /// Upstream attempts waiting for their answer's head, for the analysis.
    pub in_flight: InFlight,
}

/// A route's handles, resolved once per published config.
pub struct RouteMetrics {
    stable: TrackMetrics,
    canary: TrackMetrics,
    /// `kanaria_retries_total{from="canary",to="stable"}`.
    pub retried_on_stable: IntCounter,
    /// Wakes the canary attempts still waiting for an answer when the canary is rolled back.
    pub canary_rollbacks: RollbackSignal,
}

/// Tells waiting canary attempts that their canary was rolled back: a generation counter
/// (an attempt compares it with the one it saw when it started, so a rollback between its
/// start and its wait is not missed) and a [`tokio::sync::Notify`] to wake the waiters.
#[derive(Default)]
pub struct RollbackSignal {
    generation: std::sync::atomic::AtomicU64,
    notify: tokio::sync::Notify,
}

impl RollbackSignal {
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A rollback happened: every attempt waiting now, or checking later, sees it.
    pub fn rolled_back(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// Resolves once a rollback after `seen` (a [`Self::generation`]) happened.
    pub async fn wait_after(&self, seen: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check: a rollback in between still wakes us.
            notified.as_mut().enable();
            if self.generation() != seen {
                return;
            }
            notified.await;
        }
    }
}

impl RouteMetrics {
    pub fn version(&self, v: Track) -> &TrackMetrics {
        match v {
            Track::Stable => &self.stable,
            Track::Canary => &self.canary,
        }
    }
}

impl TrackMetrics {
    /// Records a finished request in the Prometheus series: its status (or `None` when
    /// none was sent) and its whole duration.
    #[inline]
    pub fn record(&self, status: Option<u16>, seconds: f64) {
        let class = match status {
            Some(s @ 100..=599) => usize::from(s / 100) - 1,
            _ => 5,
        };
        self.requests[class].inc();
        self.duration.observe(seconds);
    }

    /// Records the outcome of the upstream attempt that answered (or failed) a request, for
    /// the analysis: `seconds` is that attempt's latency to the answer's head; `is_error`
    /// covers 5xx, no answer and a gRPC error status.
    #[inline]
    pub fn observe(&self, is_error: bool, seconds: f64) {
        self.window.record(Instant::now(), is_error, seconds);
    }

    /// Answers counted so far: (all, errors = 5xx or no answer).
    pub fn totals(&self) -> (u64, u64) {
        let all = self.requests.iter().map(|c| c.get()).sum();
        let errors = self.requests[4].get() + self.requests[5].get();
        (all, errors)
    }

    /// A failed attempt that was retried elsewhere: an upstream error and an error in the
    /// analysis window (the user did not see it, but the version failed).
    #[inline]
    pub fn failed_attempt(&self, kind: UpstreamErrorKind, seconds: f64) {
        self.upstream_error(kind);
        self.window.record(Instant::now(), true, seconds);
    }

    /// An attempt Kanaria gave up on (the canary timeout, or a rollback) and retried
    /// elsewhere: a timeout in the metrics, and in the analysis a slow request of the time
    /// it waited, not an error: the version did not fail, it was too slow to wait for.
    #[inline]
    pub fn abandoned_attempt(&self, seconds: f64) {
        self.upstream_error(UpstreamErrorKind::Timeout);
        self.window.record(Instant::now(), false, seconds);
    }

    #[inline]
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].inc();
    }
}

/// `kanaria_rejected_requests_total{reason}`, one handle per reason.
pub struct EdgeMetrics {
    rejected: [IntCounter; 6],
}

impl EdgeMetrics {
    #[inline]
    pub fn rejected(&self, reason: crate::proxy::edge::RejectReason) -> &IntCounter {
        &self.rejected[reason as usize]
    }
}

fn build<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<T>,
) -> prometheus::Result<T> {
    let metric = metric?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl Metrics {
    /// Fails only on a bad metric definition (a bug caught by the unit test below).
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let requests = build(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "kanaria_requests_total",
                    "Requests answered, by route, version and status class.",
                ),
                &["route", "version", "code_class"],
            ),
        )?;
        let duration = build(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "kanaria_request_duration_seconds",
                    "Time from request start to the end of the answer.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["route", "version"],
            ),
        )?;
        let upstream_errors = build(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "kanaria_upstream_errors_total",
                    "Upstream failures: connect, timeout, reset, 5xx.",
                ),
                &["route", "version", "kind"],
            ),
        )?;
        let canary_weight = build(
            &r,
            prometheus::GaugeVec::new(
                Opts::new(
                    "kanaria_canary_weight_percent",
                    "Effective canary weight in percent.",
                ),
                &["route"],
            ),
        )?;
        let rollout_state = build(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "kanaria_rollout_state",
                    "1 for the route's current rollout state.",
                ),
                &["route", "state"],
            ),
        )?;
        let rollbacks = build(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "kanaria_rollbacks_total",
                    "Rollbacks of the canary, by reason.",
                ),
                &["route", "reason"],
            ),
        )?;
        let events = build(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "kanaria_rollout_events_total",
                    "Rollout transitions, by kind.",
                ),
                &["route", "kind"],
            ),
        )?;
        let retries = build(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "kanaria_retries_total",
                    "Requests retried on another version.",
                ),
                &["route", "from", "to"],
            ),
        )?;
        let reloads = build(
            &r,
            IntCounterVec::new(
                Opts::new("kanaria_config_reloads_total", "Config reloads, by result."),
                &["result"],
            ),
        )?;
        let generation = build(
            &r,
            IntGauge::new(
                "kanaria_config_generation",
                "Generation of the config in use.",
            ),
        )?;
        let endpoint_healthy = build(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "kanaria_endpoint_healthy",
                    "1 when the endpoint is in rotation.",
                ),
                &["route", "version", "endpoint"],
            ),
        )?;
        let pool_info = build(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "kanaria_pool_info",
                    "The release label each version of a route runs.",
                ),
                &["route", "version", "release"],
            ),
        )?;
        // Labelled by the fleet's name: a process without [fleet] exports no series, so
        // alerts on them never fire for a single node.
        let fleet_connected = build(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "kanaria_fleet_connected",
                    "1 while the fleet store (Redis) answers; 0 when it does not ([fleet] only).",
                ),
                &["cluster"],
            ),
        )?;
        let fleet_members = build(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "kanaria_fleet_members",
                    "Replicas of the fleet seen alive, this one included ([fleet] only).",
                ),
                &["cluster"],
            ),
        )?;
        let fleet_generation = build(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "kanaria_fleet_generation",
                    "Fleet generation of the route's shared record applied by this replica ([fleet] only).",
                ),
                &["cluster", "route"],
            ),
        )?;
        let overrides = build(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "kanaria_overrides_total",
                    "Requests whose version was forced by an honoured override.",
                ),
                &["route", "version"],
            ),
        )?;
        let rejected = build(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "kanaria_rejected_requests_total",
                    "Requests and connections refused at the edge, by reason.",
                ),
                &["reason"],
            ),
        )?;
        let edge = EdgeMetrics {
            rejected: crate::proxy::edge::RejectReason::ALL
                .map(|r| rejected.with_label_values(&[r.as_str()])),
        };
        // Make both results visible from the start, so rate() works on the first reload.
        for result in ["success", "error"] {
            reloads.with_label_values(&[result]);
        }
        Ok(Metrics {
            registry: r,
            requests,
            duration,
            upstream_errors,
            canary_weight,
            rollout_state,
            rollbacks,
            events,
            retries,
            reloads,
            fleet_connected,
            fleet_members,
            fleet_generation,
            generation,
            endpoint_healthy,
            pool_info,
            overrides,
            edge,
            routes: Mutex::new(HashMap::new()),
        })
    }

    /// The handles of one route: created on first use, then the same across reloads.
    /// The handles of a route already published, if any.
    pub fn known_route(&self, route: &str) -> Option<Arc<RouteMetrics>> {
        let cache = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(route).cloned()
    }

    /// The handles of a route whose windows must answer for spans up to `span`. A route
    /// whose span changed gets new windows (and starts counting afresh).
    pub fn route(&self, route: &str, span: Duration) -> Arc<RouteMetrics> {
        let span = span.max(STATUS_SPAN);
        let mut cache = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = cache.get(route) {
            if m.stable.window.span_secs() == Window::span_secs_for(span) {
                return m.clone();
            }
        }
        let version = |v: &str| TrackMetrics {
            requests: CODE_CLASSES.map(|c| self.requests.with_label_values(&[route, v, c])),
            duration: self.duration.with_label_values(&[route, v]),
            upstream_errors: UpstreamErrorKind::ALL.map(|k| {
                self.upstream_errors
                    .with_label_values(&[route, v, k.as_str()])
            }),
            overrides: self.overrides.with_label_values(&[route, v]),
            window: Window::with_span(span),
            in_flight: InFlight::new(),
        };
        let m = Arc::new(RouteMetrics {
            stable: version("stable"),
            canary: version("canary"),
            retried_on_stable: self.retries.with_label_values(&[route, "canary", "stable"]),
            canary_rollbacks: RollbackSignal::default(),
        });
        // Rollback counters exist at 0 from the start: a series born at 1 shows no
        // `increase()`, so dashboards and alerts would miss each route's first rollback.
        for reason in ROLLBACK_REASONS {
            self.rollbacks.with_label_values(&[route, reason]);
        }
        cache.insert(route.to_string(), m.clone());
        m
    }

    /// Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            log::error!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_metrics_register_and_render() {
        let m = Metrics::new().unwrap();
        let r = m.route("app", std::time::Duration::from_secs(30));
        r.version(Track::Canary).record(Some(503), 0.002);
        r.version(Track::Canary)
            .upstream_error(UpstreamErrorKind::Status5xx);
        r.version(Track::Stable).record(None, 0.5);
        let text = m.render();
        assert!(text.contains(
            "kanaria_requests_total{code_class=\"5xx\",route=\"app\",version=\"canary\"} 1"
        ));
        assert!(text.contains(
            "kanaria_requests_total{code_class=\"error\",route=\"app\",version=\"stable\"} 1"
        ));
        assert!(text.contains(
            "kanaria_upstream_errors_total{kind=\"5xx\",route=\"app\",version=\"canary\"} 1"
        ));
        assert!(text.contains("kanaria_request_duration_seconds_bucket{route=\"app\",version=\"canary\",le=\"0.0025\"} 1"));
        assert!(text.contains("kanaria_config_reloads_total{result=\"error\"} 0"));
    }
}
