//! Prometheus metrics: the registry, every metric Kanaria exports, and per-route handles.
//!
//! Label values are bounded: `route` comes from the config, `version` is `stable` or
//! `canary`, `code_class` and `kind` are fixed sets. The request path never looks a label
//! up: each route gets a [`RouteMetrics`] with its counters and histograms resolved once
//! (when a config is published), so recording is a few atomic adds, no lock, no hashing.
//!
//! The series of each route that do not change with its config (`kanaria_requests_total`,
//! `kanaria_request_duration_seconds`, `kanaria_upstream_errors_total`,
//! `kanaria_overrides_total`, `kanaria_retries_total`, `kanaria_rollbacks_total`) are plain
//! atomics in [`RouteSeries`], turned into metric families only when scraped (by
//! [`RouteCollector`]): the `prometheus` crate's labelled children cost ~450 bytes each
//! (their own copy of the name, help and labels), 33 of them ~15 KB a route, where these
//! atomics take ~550 bytes. The exposition is the same.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
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

/// Reasons of `kanaria_rollbacks_total`, at 0 for every route from the start ([`RouteSeries`]).
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

/// The series of every route, by name (kept across reloads), and rollbacks for reasons
/// outside [`ROLLBACK_REASONS`] (none today; counted all the same), by (route, reason).
#[derive(Default)]
struct AllSeries {
    routes: BTreeMap<String, Arc<RouteSeries>>,
    other_rollbacks: BTreeMap<(String, String), u64>,
}

/// Every metric of the process.
pub struct Metrics {
    pub registry: Registry,
    series: Arc<Mutex<AllSeries>>,
    pub canary_weight: prometheus::GaugeVec,
    pub rollout_state: IntGaugeVec,
    pub events: IntCounterVec,
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
    /// Edge rejections (framing, limits, deadlines), handles resolved at start.
    pub edge: EdgeMetrics,
    /// Per-route handles by name, so counters and analysis windows outlive reloads.
    /// Locked only when a config is published.
    routes: Mutex<HashMap<String, Arc<RouteMetrics>>>,
}

/// A counter: one atomic word (what `kanaria_*_total` series of a route hold).
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// `kanaria_request_duration_seconds` of one route and version: counts per bucket (not
/// cumulative; the scrape adds them up), the count and the sum (f64 bits).
#[derive(Default)]
struct DurationHistogram {
    buckets: [AtomicU64; DURATION_BUCKETS.len()],
    count: AtomicU64,
    sum: AtomicU64,
}

impl DurationHistogram {
    #[inline]
    fn observe(&self, seconds: f64) {
        // `le` is inclusive, as in the `prometheus` crate; past the last bound only +Inf.
        if let Some(i) = DURATION_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        let mut old = self.sum.load(Relaxed);
        loop {
            let new = (f64::from_bits(old) + seconds).to_bits();
            match self.sum.compare_exchange_weak(old, new, Relaxed, Relaxed) {
                Ok(_) => break,
                Err(v) => old = v,
            }
        }
    }
}

/// The per-request series of one version of a route.
#[derive(Default)]
pub struct TrackSeries {
    requests: [Counter; 6],
    duration: DurationHistogram,
    upstream_errors: [Counter; 4],
    /// Honoured overrides that chose this version.
    pub overrides: Counter,
}

/// The per-request series of a route: created with the route, kept across reloads (also
/// when its windows are made anew), scraped by [`RouteCollector`].
#[derive(Default)]
pub struct RouteSeries {
    stable: TrackSeries,
    canary: TrackSeries,
    /// `kanaria_retries_total{from="canary",to="stable"}`.
    retried_on_stable: Counter,
    /// `kanaria_rollbacks_total` by [`ROLLBACK_REASONS`]: they exist at 0 from the start (a
    /// series born at 1 shows no `increase()`, so dashboards and alerts would miss each
    /// route's first rollback).
    rollbacks: [Counter; ROLLBACK_REASONS.len()],
}

/// A handle on one counter of a route's series (for the rarer ones: an override, a retry).
pub struct CounterHandle {
    series: Arc<RouteSeries>,
    pick: fn(&RouteSeries) -> &Counter,
}

impl CounterHandle {
    #[inline]
    pub fn inc(&self) {
        (self.pick)(&self.series).inc();
    }

    pub fn get(&self) -> u64 {
        (self.pick)(&self.series).get()
    }
}

/// One version's handles within a route.
pub struct TrackMetrics {
    series: Arc<RouteSeries>,
    track: Track,
    /// `kanaria_overrides_total`: honoured overrides that chose this version.
    pub overrides: CounterHandle,
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
    pub retried_on_stable: CounterHandle,
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
    #[inline]
    fn series(&self) -> &TrackSeries {
        match self.track {
            Track::Stable => &self.series.stable,
            Track::Canary => &self.series.canary,
        }
    }

    /// Records a finished request in the Prometheus series: its status (or `None` when
    /// none was sent) and its whole duration.
    #[inline]
    pub fn record(&self, status: Option<u16>, seconds: f64) {
        let class = match status {
            Some(s @ 100..=599) => usize::from(s / 100) - 1,
            _ => 5,
        };
        let series = self.series();
        series.requests[class].inc();
        series.duration.observe(seconds);
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
        let requests = &self.series().requests;
        let all = requests.iter().map(|c| c.get()).sum();
        let errors = requests[4].get() + requests[5].get();
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
        self.series().upstream_errors[kind as usize].inc();
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
        let series = Arc::new(Mutex::new(AllSeries::default()));
        r.register(Box::new(RouteCollector::new(series.clone())?))?;
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
            series,
            canary_weight,
            rollout_state,
            events,
            reloads,
            fleet_connected,
            fleet_members,
            fleet_generation,
            generation,
            endpoint_healthy,
            pool_info,
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
        let series = self
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .routes
            .entry(route.to_string())
            .or_default()
            .clone();
        let version = |track: Track| TrackMetrics {
            series: series.clone(),
            track,
            overrides: CounterHandle {
                series: series.clone(),
                pick: match track {
                    Track::Stable => |s| &s.stable.overrides,
                    Track::Canary => |s| &s.canary.overrides,
                },
            },
            window: Window::with_span(span),
            in_flight: InFlight::new(),
        };
        let m = Arc::new(RouteMetrics {
            stable: version(Track::Stable),
            canary: version(Track::Canary),
            retried_on_stable: CounterHandle {
                series: series.clone(),
                pick: |s| &s.retried_on_stable,
            },
            canary_rollbacks: RollbackSignal::default(),
        });
        cache.insert(route.to_string(), m.clone());
        m
    }

    /// Counts a rollback of `route` for `reason` in `kanaria_rollbacks_total`.
    pub fn rollback(&self, route: &str, reason: &str) {
        let mut all = self.series.lock().unwrap_or_else(|p| p.into_inner());
        match ROLLBACK_REASONS.iter().position(|r| *r == reason) {
            Some(i) => all.routes.entry(route.to_string()).or_default().rollbacks[i].inc(),
            None => {
                *all.other_rollbacks
                    .entry((route.to_string(), reason.to_string()))
                    .or_default() += 1
            }
        }
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

/// Scrapes the per-request series of every route ([`RouteSeries`]) as the metric families
/// the `prometheus` crate's vectors made of them before: same names, help, types, labels
/// (sorted by name) and order.
struct RouteCollector {
    series: Arc<Mutex<AllSeries>>,
    descs: Vec<Desc>,
}

const REQUESTS: (&str, &str) = (
    "kanaria_requests_total",
    "Requests answered, by route, version and status class.",
);
const DURATION: (&str, &str) = (
    "kanaria_request_duration_seconds",
    "Time from request start to the end of the answer.",
);
const UPSTREAM_ERRORS: (&str, &str) = (
    "kanaria_upstream_errors_total",
    "Upstream failures: connect, timeout, reset, 5xx.",
);
const OVERRIDES: (&str, &str) = (
    "kanaria_overrides_total",
    "Requests whose version was forced by an honoured override.",
);
const ROLLBACKS: (&str, &str) = (
    "kanaria_rollbacks_total",
    "Rollbacks of the canary, by reason.",
);
const RETRIES: (&str, &str) = (
    "kanaria_retries_total",
    "Requests retried on another version.",
);

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

/// A metric with these labels, sorted by name as the `prometheus` crate sorts them.
fn metric(mut labels: Vec<LabelPair>) -> proto::Metric {
    labels.sort_by(|a, b| a.name().cmp(b.name()));
    proto::Metric::from_label(labels)
}

fn counter(labels: Vec<LabelPair>, value: u64) -> proto::Metric {
    let mut m = metric(labels);
    let mut c = proto::Counter::default();
    c.set_value(value as f64);
    m.set_counter(c);
    m
}

fn family(
    (name, help): (&str, &str),
    kind: MetricType,
    metrics: Vec<proto::Metric>,
) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

impl RouteCollector {
    fn new(series: Arc<Mutex<AllSeries>>) -> prometheus::Result<Self> {
        let desc = |(name, help): (&str, &str), labels: &[&str]| {
            Desc::new(
                name.to_string(),
                help.to_string(),
                labels.iter().map(|l| l.to_string()).collect(),
                HashMap::new(),
            )
        };
        Ok(RouteCollector {
            series,
            descs: vec![
                desc(REQUESTS, &["route", "version", "code_class"])?,
                desc(DURATION, &["route", "version"])?,
                desc(UPSTREAM_ERRORS, &["route", "version", "kind"])?,
                desc(OVERRIDES, &["route", "version"])?,
                desc(RETRIES, &["route", "from", "to"])?,
                desc(ROLLBACKS, &["route", "reason"])?,
            ],
        })
    }
}

impl Collector for RouteCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // A snapshot of the handles: the scrape reads the atomics without the lock.
        let (routes, other_rollbacks): (Vec<(String, Arc<RouteSeries>)>, Vec<_>) = {
            let all = self.series.lock().unwrap_or_else(|p| p.into_inner());
            (
                all.routes
                    .iter()
                    .map(|(n, s)| (n.clone(), s.clone()))
                    .collect(),
                all.other_rollbacks
                    .iter()
                    .map(|(k, n)| (k.clone(), *n))
                    .collect(),
            )
        };
        let (mut requests, mut duration, mut errors, mut overrides, mut retries) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut rollbacks = Vec::new();
        for ((route, reason), n) in other_rollbacks {
            rollbacks.push(counter(
                vec![label("route", &route), label("reason", &reason)],
                n,
            ));
        }
        for (route, s) in &routes {
            for (version, t) in [("stable", &s.stable), ("canary", &s.canary)] {
                let base = || vec![label("route", route), label("version", version)];
                for (class, c) in CODE_CLASSES.iter().zip(&t.requests) {
                    let mut l = base();
                    l.push(label("code_class", class));
                    requests.push(counter(l, c.get()));
                }
                for (kind, c) in UpstreamErrorKind::ALL.iter().zip(&t.upstream_errors) {
                    let mut l = base();
                    l.push(label("kind", kind.as_str()));
                    errors.push(counter(l, c.get()));
                }
                overrides.push(counter(base(), t.overrides.get()));
                let mut h = proto::Histogram::default();
                let mut cumulative = 0;
                h.set_bucket(
                    DURATION_BUCKETS
                        .iter()
                        .zip(&t.duration.buckets)
                        .map(|(bound, n)| {
                            cumulative += n.load(Relaxed);
                            let mut b = proto::Bucket::default();
                            b.set_cumulative_count(cumulative);
                            b.set_upper_bound(*bound);
                            b
                        })
                        .collect(),
                );
                // Read after the buckets: the count is never below their sum.
                h.set_sample_count(t.duration.count.load(Relaxed).max(cumulative));
                h.set_sample_sum(f64::from_bits(t.duration.sum.load(Relaxed)));
                let mut m = metric(base());
                m.set_histogram(h);
                duration.push(m);
            }
            retries.push(counter(
                vec![
                    label("route", route),
                    label("from", "canary"),
                    label("to", "stable"),
                ],
                s.retried_on_stable.get(),
            ));
            for (reason, c) in ROLLBACK_REASONS.iter().zip(&s.rollbacks) {
                rollbacks.push(counter(
                    vec![label("route", route), label("reason", reason)],
                    c.get(),
                ));
            }
        }
        vec![
            family(REQUESTS, MetricType::COUNTER, requests),
            family(DURATION, MetricType::HISTOGRAM, duration),
            family(UPSTREAM_ERRORS, MetricType::COUNTER, errors),
            family(OVERRIDES, MetricType::COUNTER, overrides),
            family(RETRIES, MetricType::COUNTER, retries),
            family(ROLLBACKS, MetricType::COUNTER, rollbacks),
        ]
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

    /// The per-request series are scraped from plain atomics exactly as the `prometheus`
    /// crate's vectors rendered them: help, type, sorted labels, series order, cumulative
    /// buckets with `+Inf`, sum and count; and they outlive a route's windows.
    #[test]
    fn route_series_render_as_the_crate_did() {
        let m = Metrics::new().unwrap();
        let b = m.route("b", Duration::from_secs(30));
        let a = m.route("a", Duration::from_secs(30));
        let s = a.version(Track::Stable);
        s.record(Some(200), 0.001);
        s.record(Some(204), 0.003);
        s.record(Some(503), 20.0);
        s.overrides.inc();
        a.version(Track::Canary)
            .upstream_error(UpstreamErrorKind::Reset);
        a.retried_on_stable.inc();
        b.version(Track::Canary).record(Some(100), 0.5);
        m.rollback("a", "latency");
        m.rollback("a", "something_new");
        // New windows for a new span keep the series.
        let a = m.route("a", Duration::from_secs(60));
        assert_eq!(a.version(Track::Stable).totals(), (3, 1));
        assert_eq!(a.retried_on_stable.get(), 1);
        let text = m.render();
        let family = |name: &str| -> Vec<&str> {
            text.lines()
                .filter(|l| {
                    l.starts_with(name)
                        || l.starts_with(&format!("# HELP {name} "))
                        || l.starts_with(&format!("# TYPE {name} "))
                })
                .collect()
        };
        let stable = "route=\"a\",version=\"stable\"";
        let mut want = vec![
            "# HELP kanaria_request_duration_seconds Time from request start to the end of the answer.".to_string(),
            "# TYPE kanaria_request_duration_seconds histogram".to_string(),
        ];
        let cumulative = [1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2];
        let les = [
            "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5",
            "5", "10",
        ];
        let canary_a = "route=\"a\",version=\"canary\"";
        for le in les {
            want.push(format!(
                "kanaria_request_duration_seconds_bucket{{{canary_a},le=\"{le}\"}} 0"
            ));
        }
        want.push(format!(
            "kanaria_request_duration_seconds_bucket{{{canary_a},le=\"+Inf\"}} 0"
        ));
        want.push(format!(
            "kanaria_request_duration_seconds_sum{{{canary_a}}} 0"
        ));
        want.push(format!(
            "kanaria_request_duration_seconds_count{{{canary_a}}} 0"
        ));
        for (le, n) in les.iter().zip(cumulative) {
            want.push(format!(
                "kanaria_request_duration_seconds_bucket{{{stable},le=\"{le}\"}} {n}"
            ));
        }
        want.push(format!(
            "kanaria_request_duration_seconds_bucket{{{stable},le=\"+Inf\"}} 3"
        ));
        want.push(format!(
            "kanaria_request_duration_seconds_sum{{{stable}}} 20.004"
        ));
        want.push(format!(
            "kanaria_request_duration_seconds_count{{{stable}}} 3"
        ));
        let got = family("kanaria_request_duration_seconds");
        assert_eq!(
            &got[..want.len()],
            want.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .as_slice()
        );
        // Then route b's, canary before stable.
        assert_eq!(got.len(), 2 + 4 * 16);
        assert!(
            got[2 + 2 * 16].contains("route=\"b\",version=\"canary\",le=\"0.001\""),
            "{}",
            got[34]
        );

        let requests = family("kanaria_requests_total");
        assert_eq!(
            requests[0],
            "# HELP kanaria_requests_total Requests answered, by route, version and status class."
        );
        assert_eq!(requests[1], "# TYPE kanaria_requests_total counter");
        assert_eq!(requests.len(), 2 + 24);
        assert_eq!(
            requests[2],
            "kanaria_requests_total{code_class=\"1xx\",route=\"a\",version=\"canary\"} 0"
        );
        assert_eq!(
            requests[3],
            "kanaria_requests_total{code_class=\"1xx\",route=\"a\",version=\"stable\"} 0"
        );
        assert_eq!(
            requests[4],
            "kanaria_requests_total{code_class=\"1xx\",route=\"b\",version=\"canary\"} 1"
        );
        assert!(requests.contains(
            &"kanaria_requests_total{code_class=\"2xx\",route=\"a\",version=\"stable\"} 2"
        ));
        assert!(requests.contains(
            &"kanaria_requests_total{code_class=\"5xx\",route=\"a\",version=\"stable\"} 1"
        ));
        assert_eq!(
            family("kanaria_upstream_errors_total")[2..6],
            [
                "kanaria_upstream_errors_total{kind=\"5xx\",route=\"a\",version=\"canary\"} 0",
                "kanaria_upstream_errors_total{kind=\"5xx\",route=\"a\",version=\"stable\"} 0",
                "kanaria_upstream_errors_total{kind=\"5xx\",route=\"b\",version=\"canary\"} 0",
                "kanaria_upstream_errors_total{kind=\"5xx\",route=\"b\",version=\"stable\"} 0",
            ]
        );
        assert!(text.contains(
            "kanaria_upstream_errors_total{kind=\"reset\",route=\"a\",version=\"canary\"} 1"
        ));
        assert_eq!(
            family("kanaria_overrides_total"),
            [
                "# HELP kanaria_overrides_total Requests whose version was forced by an honoured override.",
                "# TYPE kanaria_overrides_total counter",
                "kanaria_overrides_total{route=\"a\",version=\"canary\"} 0",
                "kanaria_overrides_total{route=\"a\",version=\"stable\"} 1",
                "kanaria_overrides_total{route=\"b\",version=\"canary\"} 0",
                "kanaria_overrides_total{route=\"b\",version=\"stable\"} 0",
            ]
        );
        assert_eq!(
            family("kanaria_retries_total"),
            [
                "# HELP kanaria_retries_total Requests retried on another version.",
                "# TYPE kanaria_retries_total counter",
                "kanaria_retries_total{from=\"canary\",route=\"a\",to=\"stable\"} 1",
                "kanaria_retries_total{from=\"canary\",route=\"b\",to=\"stable\"} 0",
            ]
        );
        let rollbacks = family("kanaria_rollbacks_total");
        assert_eq!(rollbacks.len(), 2 + 2 * ROLLBACK_REASONS.len() + 1);
        assert_eq!(
            rollbacks[0],
            "# HELP kanaria_rollbacks_total Rollbacks of the canary, by reason."
        );
        assert_eq!(rollbacks[1], "# TYPE kanaria_rollbacks_total counter");
        assert_eq!(
            rollbacks[2],
            "kanaria_rollbacks_total{reason=\"error_rate\",route=\"a\"} 0"
        );
        assert!(rollbacks.contains(&"kanaria_rollbacks_total{reason=\"latency\",route=\"a\"} 1"));
        assert!(rollbacks.contains(&"kanaria_rollbacks_total{reason=\"manual\",route=\"b\"} 0"));
        assert!(
            rollbacks.contains(&"kanaria_rollbacks_total{reason=\"something_new\",route=\"a\"} 1")
        );
    }
}
