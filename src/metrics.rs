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
//! atomics in [`RouteSeries`], written straight into the text exposition when scraped
//! ([`Metrics::render`]): the `prometheus` crate's labelled children cost ~450 bytes each
//! (their own copy of the name, help and labels), 33 of them ~15 KB a route, where these
//! atomics take ~550 bytes; and its scrape built a record per sample before the text
//! (~30 MB at once for 1,000 routes). The exposition is the same.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::split::Track;
use crate::stats::in_flight::InFlight;
use crate::stats::window::{Window, STATUS_SPAN};

/// Reasons of `kanaria_rejected_requests_total`: a fixed set, so the label stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Framing = 0,
    HeaderTooLarge = 1,
    TooManyHeaders = 2,
    HeaderTimeout = 3,
    ConnectionLimit = 4,
    UpstreamFraming = 5,
}

impl RejectReason {
    pub const ALL: [RejectReason; 6] = [
        RejectReason::Framing,
        RejectReason::HeaderTooLarge,
        RejectReason::TooManyHeaders,
        RejectReason::HeaderTimeout,
        RejectReason::ConnectionLimit,
        RejectReason::UpstreamFraming,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Framing => "framing",
            RejectReason::HeaderTooLarge => "header_too_large",
            RejectReason::TooManyHeaders => "too_many_headers",
            RejectReason::HeaderTimeout => "header_timeout",
            RejectReason::ConnectionLimit => "connection_limit",
            RejectReason::UpstreamFraming => "upstream_framing",
        }
    }
}

/// Request duration buckets, 1 ms to 10 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Status classes of `kanaria_requests_total`; `error` is a request that got no status
/// (the client went away, or the connection broke mid-answer).
pub const CODE_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// Reasons of `kanaria_rollbacks_total`, at 0 for every route from the start ([`RouteSeries`]).
pub const ROLLBACK_REASONS: [&str; 7] = [
    "manual",
    "health_check",
    "error_rate",
    "error_rate_ratio",
    "latency",
    "latency_ratio",
    "diff_rate",
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
    pub events: IntCounterVec,
    pub reloads: IntCounterVec,
    pub generation: IntGauge,
    /// `[fleet]` only (no series without it): 1 while the fleet store answers.
    pub fleet_connected: IntGaugeVec,
    /// `[fleet]` only: replicas seen alive in the fleet (this one included).
    pub fleet_members: IntGaugeVec,
    /// `[fleet]` only: the fleet generation of each route's record applied here.
    pub fleet_generation: IntGaugeVec,
    /// `[fleet]` only: 1 while a route sends every user to stable because this replica is
    /// cut off from the store (`fleet.on_partition = "stable"`).
    pub fleet_cut_off: IntGaugeVec,
    /// `[fleet]` only: times the fleet store's incarnation changed (it lost its data).
    pub fleet_store_resets: IntCounterVec,
    /// `[fleet]` only: 1 while this replica's config file has decided a route's weight or
    /// steps otherwise than the fleet for longer than `fleet.config_skew_warning`.
    pub fleet_config_skew: IntGaugeVec,
    /// Edge rejections (framing, limits, deadlines), handles resolved at start.
    pub edge: EdgeMetrics,
    /// What each route's shadow (dark launch) saw; rendered at scrape.
    pub shadows: Arc<crate::stats::shadow::Shadows>,
    /// Per-route handles by name, so counters and analysis windows outlive reloads.
    /// Locked only when a config is published.
    routes: Mutex<HashMap<String, Arc<RouteMetrics>>>,
    /// Where every route's windows and in-flight counts start counting: a reading of the
    /// clock that judges them (the control plane's), so its later readings fall in them.
    epoch: Instant,
}

/// The request path's now, for the outcomes it records: the machine's clock, read once per
/// outcome where it happens. The control plane judges the windows at its own
/// [`Clock`](crate::clock::Clock)'s readings; in production that is the same clock, and a
/// test that drives time by hand records at its clock's readings itself
/// ([`Window::record`]).
#[allow(clippy::disallowed_methods)]
#[inline]
fn request_now() -> Instant {
    Instant::now()
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
    /// `kanaria_retries_total{from=to=version}`: attempts retried on a fresh connection to
    /// this version after the reused one was found closed before any answer.
    reconnects: Counter,
}

/// The per-request series of a route: created with the route, kept across reloads (also
/// when its windows are made anew), written by [`Metrics::render`].
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
    /// Upstream answers whose head came and whose body is still arriving (judged by the
    /// whole answer: `[routes.analysis] latency = "answer"`), by their attempt's start.
    pub answers_in_flight: InFlight,
}

/// A route's handles, resolved once per published config.
pub struct RouteMetrics {
    stable: TrackMetrics,
    canary: TrackMetrics,
    /// `kanaria_retries_total{from="canary",to="stable"}`.
    pub retried_on_stable: CounterHandle,
    /// Wakes the canary attempts still waiting for an answer when the canary is rolled back.
    pub canary_rollbacks: RollbackSignal,
    /// Wakes the long-lived answers whose users a weight change moved to the other version
    /// (a lowered weight with `drain_on_weight_change`, a promotion with `drain`).
    pub moves: MoveSignal,
}

/// A weight change that moves users, for the streams that should follow them: the route's
/// canary buckets after it, and which version's streams it ends (the users of buckets
/// `>= buckets` left the canary; those of buckets `< buckets` left stable). Only the last
/// move is kept: a stream compares its user's bucket with the latest split.
#[derive(Default)]
pub struct MoveSignal {
    generation: AtomicU64,
    /// `buckets | ENDS_CANARY | ENDS_STABLE`.
    last: AtomicU64,
    notify: tokio::sync::Notify,
}

impl MoveSignal {
    const ENDS_CANARY: u64 = 1 << 32;
    const ENDS_STABLE: u64 = 1 << 33;

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The route's canary now has `buckets`, and the streams of the users that left `from`
    /// for the other version end.
    pub fn moved(&self, buckets: u32, from: Track) {
        let ends = match from {
            Track::Canary => Self::ENDS_CANARY,
            Track::Stable => Self::ENDS_STABLE,
        };
        // Stored before the generation moves: a waiter that sees the new generation reads
        // this move or a later one.
        self.last.store(
            u64::from(buckets) | ends,
            std::sync::atomic::Ordering::Release,
        );
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// Resolves once a move after `seen` (a [`Self::generation`]) takes the user of `bucket`,
    /// served by `track`, off `track`.
    pub async fn wait_moved(&self, mut seen: u64, bucket: u32, track: Track) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check: a move in between still wakes us.
            notified.as_mut().enable();
            let now = self.generation();
            if now != seen {
                seen = now;
                let last = self.last.load(std::sync::atomic::Ordering::Acquire);
                let buckets = (last & u64::from(u32::MAX)) as u32;
                let moved = match track {
                    Track::Canary => last & Self::ENDS_CANARY != 0 && bucket >= buckets,
                    Track::Stable => last & Self::ENDS_STABLE != 0 && bucket < buckets,
                };
                if moved {
                    return;
                }
                continue;
            }
            notified.await;
        }
    }
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
        self.window.record(request_now(), is_error, seconds);
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
        self.window.record(request_now(), true, seconds);
    }

    /// An attempt Kanaria gave up on (the canary timeout, or a rollback) and retried
    /// elsewhere: a timeout in the metrics, and in the analysis a slow request of the time
    /// it waited, not an error: the version did not fail, it was too slow to wait for.
    #[inline]
    pub fn abandoned_attempt(&self, seconds: f64) {
        self.upstream_error(UpstreamErrorKind::Timeout);
        self.window.record(request_now(), false, seconds);
    }

    /// An attempt on a reused connection found it closed before any answer and is retried
    /// on a fresh connection to this version: counted here only (not an error of the
    /// version: the connection was idle, the app did not fail).
    #[inline]
    pub fn reconnected(&self) {
        self.series().reconnects.inc();
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
    pub fn rejected(&self, reason: RejectReason) -> &IntCounter {
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
    /// The registry, with route windows counting from `epoch` (a reading of the control
    /// plane's clock). Fails only on a bad metric definition (a bug caught by the unit test
    /// below).
    pub fn new(epoch: Instant) -> prometheus::Result<Self> {
        let r = Registry::new();
        let series = Arc::new(Mutex::new(AllSeries::default()));
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
        let fleet_cut_off = build(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "kanaria_fleet_cut_off",
                    "1 while the route sends every user to stable because this replica is cut off from the fleet store (fleet.on_partition = \"stable\"); 0 otherwise ([fleet] only).",
                ),
                &["cluster", "route"],
            ),
        )?;
        let fleet_store_resets = build(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "kanaria_fleet_store_resets_total",
                    "Times this replica saw the fleet store's incarnation change (Redis restarted empty or failed over to a replica without the fleet's data); each time its state re-seeded the store ([fleet] only).",
                ),
                &["cluster"],
            ),
        )?;
        let fleet_config_skew = build(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "kanaria_fleet_config_skew",
                    "1 while this replica's config file has decided the route's weight or steps otherwise than the fleet for longer than fleet.config_skew_warning (its copy of the file lags, or was left behind) ([fleet] only).",
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
            rejected: RejectReason::ALL.map(|r| rejected.with_label_values(&[r.as_str()])),
        };
        // Make both results visible from the start, so rate() works on the first reload.
        for result in ["success", "error"] {
            reloads.with_label_values(&[result]);
        }
        Ok(Metrics {
            registry: r,
            series,
            shadows: Arc::default(),
            events,
            reloads,
            fleet_connected,
            fleet_members,
            fleet_generation,
            fleet_cut_off,
            fleet_store_resets,
            fleet_config_skew,
            generation,
            edge,
            routes: Mutex::new(HashMap::new()),
            epoch,
        })
    }

    /// Forgets the routes `keep` says no: their handles, windows and series (a route
    /// removed from the config stops being exported; re-added, it counts from zero, which
    /// Prometheus reads as a reset). Without this, every route ever configured stays.
    /// Returns the names forgotten.
    pub fn retain_routes(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| keep(name));
        self.shadows.retain(&keep);
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<String> = series
            .routes
            .keys()
            .filter(|name| !keep(name))
            .cloned()
            .collect();
        series.routes.retain(|name, _| keep(name));
        series.other_rollbacks.retain(|(name, _), _| keep(name));
        drop(series);
        // Event counts, by (route, kind): the kinds a gone route has are read back.
        use prometheus::core::Collector;
        for family in self.events.collect() {
            for m in family.get_metric() {
                let label = |n: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == n)
                        .map(|l| l.value().to_string())
                };
                if let (Some(route), Some(kind)) = (label("route"), label("kind")) {
                    if !keep(&route) {
                        let _ = self.events.remove_label_values(&[&route, &kind]);
                    }
                }
            }
        }
        gone
    }

    /// How many routes the metrics hold (handles, series), for tests of the above.
    pub fn routes_held(&self) -> (usize, usize) {
        let handles = self.routes.lock().unwrap_or_else(|p| p.into_inner()).len();
        let series = self
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .routes
            .len();
        (handles, series)
    }

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
            window: Window::with_span(span, self.epoch),
            in_flight: InFlight::new(self.epoch),
            answers_in_flight: InFlight::new(self.epoch),
        };
        let m = Arc::new(RouteMetrics {
            stable: version(Track::Stable),
            canary: version(Track::Canary),
            retried_on_stable: CounterHandle {
                series: series.clone(),
                pick: |s| &s.retried_on_stable,
            },
            canary_rollbacks: RollbackSignal::default(),
            moves: MoveSignal::default(),
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

    /// Prometheus text exposition of everything: the registry's families and the routes'
    /// series, merged in name order as one registry would have sorted them.
    pub fn render(&self) -> String {
        self.render_with(&[])
    }

    /// [`Self::render`] with more families written by the caller (`(name, writer)`; the
    /// writer uses [`family_head`] and [`sample`]): the control module's gauges, read from
    /// the live config when scraped rather than kept as series.
    pub fn render_with(&self, extra: &[(&str, &WriteText<'_>)]) -> String {
        enum Family<'a> {
            Registry(&'a prometheus::proto::MetricFamily),
            Route(WriteFamily),
            Extra(&'a WriteText<'a>),
        }
        let families = self.registry.gather();
        let routes = RouteSnapshot::take(&self.series);
        let mut all: Vec<(&str, Family)> = families
            .iter()
            .map(|mf| (mf.name(), Family::Registry(mf)))
            .chain(ROUTE_FAMILIES.iter().map(|(n, w)| (*n, Family::Route(*w))))
            .chain(extra.iter().map(|(n, w)| (*n, Family::Extra(*w))))
            .collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        // ~5.4 KB of text a route (measured): one allocation for the whole answer.
        let mut out = String::with_capacity(8192 + routes.routes.len() * 6000);
        let encoder = TextEncoder::new();
        for (name, family) in all {
            match family {
                Family::Registry(mf) => {
                    if let Err(e) = encoder.encode_utf8(std::slice::from_ref(mf), &mut out) {
                        log::error!("encoding metrics: {e}");
                    }
                }
                Family::Route(write) => write(&routes, name, &mut out),
                Family::Extra(write) => write(&mut out),
            }
        }
        out
    }
}

/// The routes' series at a scrape: the handles, taken under the lock and read without it.
struct RouteSnapshot {
    routes: Vec<(String, Arc<RouteSeries>)>,
    /// (reason, route, count) of every rollback series, sorted.
    rollbacks: Vec<(String, String, u64)>,
}

impl RouteSnapshot {
    fn take(series: &Mutex<AllSeries>) -> Self {
        let all = series.lock().unwrap_or_else(|p| p.into_inner());
        let routes: Vec<(String, Arc<RouteSeries>)> = all
            .routes
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let mut rollbacks: Vec<(String, String, u64)> = all
            .other_rollbacks
            .iter()
            .map(|((route, reason), n)| (reason.clone(), route.clone(), *n))
            .collect();
        drop(all);
        for (route, s) in &routes {
            for (reason, c) in ROLLBACK_REASONS.iter().zip(&s.rollbacks) {
                rollbacks.push((reason.to_string(), route.clone(), c.get()));
            }
        }
        rollbacks.sort();
        RouteSnapshot { routes, rollbacks }
    }

    /// Each route's two tracks, in the order of their labels' values.
    fn tracks(&self) -> impl Iterator<Item = (&str, &'static str, &TrackSeries)> {
        self.routes.iter().flat_map(|(route, s)| {
            [("canary", &s.canary), ("stable", &s.stable)]
                .into_iter()
                .map(move |(version, t)| (route.as_str(), version, t))
        })
    }
}

type WriteFamily = fn(&RouteSnapshot, &str, &mut String);

/// Writes one family of samples into the exposition (see [`Metrics::render_with`]).
pub type WriteText<'a> = dyn Fn(&mut String) + 'a;

/// The routes' families, by name, each written as the `prometheus` crate's text encoder
/// writes a family whose samples are sorted by their labels' values (labels by name).
const ROUTE_FAMILIES: [(&str, WriteFamily); 6] = [
    ("kanaria_overrides_total", write_overrides),
    ("kanaria_request_duration_seconds", write_duration),
    ("kanaria_requests_total", write_requests),
    ("kanaria_retries_total", write_retries),
    ("kanaria_rollbacks_total", write_rollbacks),
    ("kanaria_upstream_errors_total", write_upstream_errors),
];

/// `# HELP` and `# TYPE` of a family, as the `prometheus` crate's text encoder writes them.
pub fn family_head(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The head, unless there is no sample (the registry drops empty families).
fn head(out: &mut String, name: &str, help: &str, kind: &str, empty: bool) -> bool {
    if !empty {
        family_head(out, name, help, kind);
    }
    !empty
}

/// A label value as the text format escapes it.
fn escaped(v: &str) -> Cow<'_, str> {
    if v.contains(['\\', '\n', '"']) {
        Cow::Owned(
            v.replace('\\', "\\\\")
                .replace('\n', "\\n")
                .replace('"', "\\\""),
        )
    } else {
        Cow::Borrowed(v)
    }
}

/// One sample line: `name{labels} value`, labels already sorted by name; values as the
/// encoder prints them (as f64).
pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    let mut sep = '{';
    for (k, v) in labels {
        let _ = write!(out, "{sep}{k}=\"{}\"", escaped(v));
        sep = ',';
    }
    if !labels.is_empty() {
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn write_overrides(r: &RouteSnapshot, name: &str, out: &mut String) {
    if head(
        out,
        name,
        "Requests whose version was forced by an honoured override.",
        "counter",
        r.routes.is_empty(),
    ) {
        for (route, version, t) in r.tracks() {
            sample(
                out,
                name,
                &[("route", route), ("version", version)],
                t.overrides.get() as f64,
            );
        }
    }
}

fn write_duration(r: &RouteSnapshot, name: &str, out: &mut String) {
    if !head(
        out,
        name,
        "Time from request start to the end of the answer.",
        "histogram",
        r.routes.is_empty(),
    ) {
        return;
    }
    let (bucket, sum, count) = (
        format!("{name}_bucket"),
        format!("{name}_sum"),
        format!("{name}_count"),
    );
    for (route, version, t) in r.tracks() {
        let h = &t.duration;
        let mut cumulative = 0;
        for (bound, n) in DURATION_BUCKETS.iter().zip(&h.buckets) {
            cumulative += n.load(Relaxed);
            let le = bound.to_string();
            sample(
                out,
                &bucket,
                &[("route", route), ("version", version), ("le", le.as_str())],
                cumulative as f64,
            );
        }
        // Read after the buckets: the count is never below their sum.
        let total = h.count.load(Relaxed).max(cumulative);
        sample(
            out,
            &bucket,
            &[("route", route), ("version", version), ("le", "+Inf")],
            total as f64,
        );
        sample(
            out,
            &sum,
            &[("route", route), ("version", version)],
            f64::from_bits(h.sum.load(Relaxed)),
        );
        sample(
            out,
            &count,
            &[("route", route), ("version", version)],
            total as f64,
        );
    }
}

fn write_requests(r: &RouteSnapshot, name: &str, out: &mut String) {
    if head(
        out,
        name,
        "Requests answered, by route, version and status class.",
        "counter",
        r.routes.is_empty(),
    ) {
        for (i, class) in CODE_CLASSES.iter().enumerate() {
            for (route, version, t) in r.tracks() {
                sample(
                    out,
                    name,
                    &[
                        ("code_class", *class),
                        ("route", route),
                        ("version", version),
                    ],
                    t.requests[i].get() as f64,
                );
            }
        }
    }
}

fn write_retries(r: &RouteSnapshot, name: &str, out: &mut String) {
    if head(
        out,
        name,
        "Requests retried: on stable after a canary failure, or on a fresh connection to the same version (from = to) after a reused one was found closed.",
        "counter",
        r.routes.is_empty(),
    ) {
        // Sorted by the labels' values: from, route, to.
        for (route, s) in &r.routes {
            let route = route.as_str();
            sample(
                out,
                name,
                &[("from", "canary"), ("route", route), ("to", "canary")],
                s.canary.reconnects.get() as f64,
            );
            sample(
                out,
                name,
                &[("from", "canary"), ("route", route), ("to", "stable")],
                s.retried_on_stable.get() as f64,
            );
        }
        for (route, s) in &r.routes {
            sample(
                out,
                name,
                &[("from", "stable"), ("route", route.as_str()), ("to", "stable")],
                s.stable.reconnects.get() as f64,
            );
        }
    }
}

fn write_rollbacks(r: &RouteSnapshot, name: &str, out: &mut String) {
    if head(
        out,
        name,
        "Rollbacks of the canary, by reason.",
        "counter",
        r.rollbacks.is_empty(),
    ) {
        for (reason, route, n) in &r.rollbacks {
            sample(
                out,
                name,
                &[("reason", reason.as_str()), ("route", route.as_str())],
                *n as f64,
            );
        }
    }
}

fn write_upstream_errors(r: &RouteSnapshot, name: &str, out: &mut String) {
    if !head(
        out,
        name,
        "Upstream failures: connect, timeout, reset, 5xx.",
        "counter",
        r.routes.is_empty(),
    ) {
        return;
    }
    // Kinds in the order of their names.
    let mut kinds = UpstreamErrorKind::ALL;
    kinds.sort_by_key(|k| k.as_str());
    for kind in kinds {
        for (route, version, t) in r.tracks() {
            sample(
                out,
                name,
                &[
                    ("kind", kind.as_str()),
                    ("route", route),
                    ("version", version),
                ],
                t.upstream_errors[kind as usize].get() as f64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A move wakes the streams of the users it moved off their version (and those only),
    /// also when it came between the stream's start and its wait.
    #[tokio::test]
    async fn a_move_ends_only_the_streams_of_the_users_it_moved() {
        use std::time::Duration;
        let m = MoveSignal::default();
        let seen = m.generation();
        // 50 % -> 20 % with drain: buckets 2,000.. left the canary.
        m.moved(2_000, Track::Canary);
        let ends = |bucket, track| {
            let w = m.wait_moved(seen, bucket, track);
            async move {
                tokio::time::timeout(Duration::from_millis(50), w)
                    .await
                    .is_ok()
            }
        };
        assert!(ends(3_000, Track::Canary).await, "a moved canary user");
        assert!(!ends(1_000, Track::Canary).await, "a canary user who stays");
        assert!(
            !ends(3_000, Track::Stable).await,
            "stable's users are not ended"
        );
        // A stream already waiting is woken by a later promotion with drain to 100 %.
        let m = std::sync::Arc::new(MoveSignal::default());
        let g = m.generation();
        let waiting = tokio::spawn({
            let m = m.clone();
            async move { m.wait_moved(g, 9_999, Track::Stable).await }
        });
        tokio::task::yield_now().await;
        m.moved(crate::split::BUCKETS, Track::Stable);
        assert!(tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .is_ok());
    }

    #[test]
    fn all_metrics_register_and_render() {
        let m = Metrics::new(request_now()).unwrap();
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
        let m = Metrics::new(request_now()).unwrap();
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
        a.version(Track::Stable).reconnected();
        b.version(Track::Canary).record(Some(100), 0.5);
        m.rollback("a", "latency");
        m.rollback("a", "something_new");
        // New windows for a new span keep the series.
        let a = m.route("a", Duration::from_secs(60));
        assert_eq!(a.version(Track::Stable).totals(), (3, 1));
        assert_eq!(a.retried_on_stable.get(), 1);
        let text = m.render();
        // Families in name order, the routes' among the registry's, as one registry sorts.
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(names.len() > ROUTE_FAMILIES.len(), "{names:?}");
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
                "# HELP kanaria_retries_total Requests retried: on stable after a canary failure, or on a fresh connection to the same version (from = to) after a reused one was found closed.",
                "# TYPE kanaria_retries_total counter",
                "kanaria_retries_total{from=\"canary\",route=\"a\",to=\"canary\"} 0",
                "kanaria_retries_total{from=\"canary\",route=\"a\",to=\"stable\"} 1",
                "kanaria_retries_total{from=\"canary\",route=\"b\",to=\"canary\"} 0",
                "kanaria_retries_total{from=\"canary\",route=\"b\",to=\"stable\"} 0",
                "kanaria_retries_total{from=\"stable\",route=\"a\",to=\"stable\"} 1",
                "kanaria_retries_total{from=\"stable\",route=\"b\",to=\"stable\"} 0",
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
            "kanaria_rollbacks_total{reason=\"diff_rate\",route=\"a\"} 0"
        );
        assert!(rollbacks.contains(&"kanaria_rollbacks_total{reason=\"latency\",route=\"a\"} 1"));
        assert!(rollbacks.contains(&"kanaria_rollbacks_total{reason=\"manual\",route=\"b\"} 0"));
        assert!(
            rollbacks.contains(&"kanaria_rollbacks_total{reason=\"something_new\",route=\"a\"} 1")
        );
    }
}
