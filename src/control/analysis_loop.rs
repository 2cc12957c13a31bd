//! The analysis loop: runs the active health checks and the canary analysis on their
//! schedules, and turns what they find into rollbacks and rollout steps.
//!
//! It ticks every 100 ms, off the request path, on Pingora's background runtime. For each
//! route: probes each pool when its `health.interval` is due (a probe pass runs in its own
//! task, so a hanging endpoint delays nothing else); rolls back at once when the canary
//! pool has no healthy endpoint; and, when `analysis.interval` is due, judges the canary
//! against stable over the window and over the last two seconds (a sudden failure shows in
//! the short span long before it moves a 30-second average; the window is judged by whole
//! slots of a fifth of it, the short span by the second), counting the attempts still
//! waiting for an answer past the latency limit as slow (a hanging canary is seen while it
//! hangs, not when its requests finally time out), then hands the verdict to
//! the route's state machine with the epoch its data was read at: if anything changed the
//! phase or the canary version while it judged (an operator's resume, a new version), the
//! machine drops the verdict instead of letting the new phase inherit an old failure.
//!
//! With `[fleet]`, the counts judged are the sum of every replica's (exchanged through the
//! fleet module); this replica's own counts alone may only fail the canary, never pass it.
//!
//! Every pass reads the time from the control's [`Clock`](crate::clock::Clock), and one
//! pass is [`AnalysisLoop::tick`]: a test with a
//! [`ManualClock`](crate::clock::ManualClock) advances the clock and ticks, so a rollout
//! whose steps hold for an hour runs in milliseconds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::json;

use super::fleet::{Contribution, Fleet, Spans};
use super::Control;
use crate::config::WeightSource;
use crate::metrics::RouteMetrics;
use crate::rollout::machine::{self, Input};
use crate::rollout::verdict::{evaluate, Verdict};
use crate::runtime::{Pool, Route};
use crate::split::Track;
use crate::stats::window::{Totals, FINE_SECS};

const TICK: Duration = Duration::from_millis(100);
/// The short span judged beside the window: the one the windows keep by the second (the
/// window itself is judged by whole coarse slots, see `analysis`).
const FAST_SPAN: Duration = Duration::from_secs(FINE_SECS);

/// The background service.
pub struct AnalysisLoop {
    shared: Arc<Control>,
    /// When each pool was probed and each route judged last. Locked by one pass at a time
    /// (the service's ticker, or a test's call), never across I/O.
    schedule: Mutex<Schedule>,
}

#[derive(Default)]
struct Schedule {
    probes: Probes,
    /// Each route's last evaluation, by name.
    last_eval: HashMap<String, Instant>,
    /// Each route's shadow counts (compared, differing) when its phase (by its start) was
    /// first judged: the dark launch's answers are judged from there.
    diff_base: HashMap<String, (u64, u64, u64)>,
}

impl AnalysisLoop {
    pub fn new(shared: Arc<Control>) -> Self {
        AnalysisLoop {
            shared,
            schedule: Mutex::new(Schedule::default()),
        }
    }

    /// One pass at the control clock's now: the probes that are due, the rollback of a
    /// canary without a healthy endpoint, the rollout holds that elapsed, and the
    /// evaluations that are due, each verdict handed to its route's machine. The service
    /// runs it every 100 ms; a test drives it by hand. Probes run on the current Tokio
    /// runtime (without one, none is started).
    pub fn tick(&self) {
        // A pass that panicked left nothing half-done that matters: at worst a schedule
        // entry, which only moves the next probe or evaluation.
        let mut schedule = self.schedule.lock().unwrap_or_else(|p| p.into_inner());
        let Schedule {
            probes,
            last_eval,
            diff_base,
        } = &mut *schedule;
        self.pass(probes, last_eval, diff_base);
    }
}

/// Per-pool probe schedule, keyed by the pool's health registry (a reload that keeps a
/// pool keeps its schedule, and so does a pool whose names resolved to new addresses: the
/// pool that follows shares the registry, so its endpoints are not probed twice as often).
#[derive(Default)]
struct Probes {
    pools: HashMap<usize, (Instant, Arc<AtomicBool>)>,
}

impl Probes {
    fn run_if_due(&mut self, pool: &Arc<Pool>, interval: Duration, now: Instant) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            log::warn!("health checks need a Tokio runtime: no probe started");
            return;
        };
        let key = Arc::as_ptr(&pool.registry) as usize;
        let entry = self
            .pools
            .entry(key)
            .or_insert_with(|| (now - interval, Arc::new(AtomicBool::new(false))));
        if now.duration_since(entry.0) < interval || entry.1.load(Ordering::Acquire) {
            return;
        }
        entry.0 = now;
        entry.1.store(true, Ordering::Release);
        let (pool, running) = (pool.clone(), entry.1.clone());
        runtime.spawn(async move {
            pool.lb.backends().run_health_check(true).await;
            pool.refresh_ready();
            running.store(false, Ordering::Release);
        });
    }

    /// Forgets pools no longer in the config.
    fn retain(&mut self, live: &[usize]) {
        self.pools.retain(|k, _| live.contains(k));
    }
}

/// One track's numbers over `span` since `since`: the finished attempts, plus the attempts
/// still waiting past the latency limit (slow) or the read timeout (failed), and the answers
/// judged whole whose body is still arriving past the latency limit (slow). Without a
/// latency limit only the read timeout makes a waiting attempt count.
fn totals(
    route: &Route,
    m: &RouteMetrics,
    track: Track,
    span: Duration,
    since: Instant,
    now: Instant,
) -> Totals {
    let tm = m.version(track);
    let mut totals = tm.window.totals_since(now, span, Some(since));
    let read = route.timeouts.read;
    let slow_after = route.analysis.max_p99_latency.unwrap_or(read);
    tm.in_flight
        .add_pending(now, slow_after, read, Some(since), &mut totals);
    // Answers whose body is still arriving are slow past the limit, never failed: a body
    // that stalls is ended by the read timeout, and then counted as failed.
    tm.answers_in_flight.add_pending(
        now,
        slow_after,
        Duration::from_millis(u64::MAX),
        Some(since),
        &mut totals,
    );
    totals
}

/// This replica's numbers for a route: over the analysis window and the short span.
fn own_counts(route: &Route, m: &RouteMetrics, at: At, version: &str) -> Contribution {
    let At {
        since,
        now,
        now_ms,
        since_ms,
    } = at;
    let span = FAST_SPAN.min(route.analysis.window);
    let spans = |d: Duration| Spans {
        canary: totals(route, m, Track::Canary, d, since, now),
        stable: totals(route, m, Track::Stable, d, since, now),
    };
    Contribution {
        at_ms: now_ms,
        since_ms,
        canary_version: version.to_string(),
        window: spans(route.analysis.window),
        fast: spans(span),
        shadow: (0, 0),
        differences: Vec::new(),
    }
}

/// When an evaluation reads: outcomes since `since` up to `now` (monotonic), at `now_ms`
/// (wall clock, stamped on the counts shared with the fleet).
#[derive(Debug, Clone, Copy)]
struct At {
    since: Instant,
    now: Instant,
    now_ms: u64,
    /// `since` on the wall clock (the current phase's start, shared with the counts).
    since_ms: u64,
}

impl AnalysisLoop {
    /// The dark launch's answers this replica's shadow compared since the route's phase
    /// (that began at `phase_since_ms`) was first seen here, and how many differed
    /// (beyond noise). Keyed by the phase's start, not the verdict epoch: in a fleet the
    /// epoch moves with every record adopted.
    fn diff_counts(
        &self,
        route: &Route,
        phase_since_ms: u64,
        base: &mut HashMap<String, (u64, u64, u64)>,
    ) -> (u64, u64) {
        // Routes without a shadow keep no baseline (nor an entry here once removed).
        if route.shadow.is_none() {
            base.remove(&route.name);
            return (0, 0);
        }
        // Before the first copy the route has no shadow counts yet: zero, and the
        // baseline is taken all the same (or the first answers would be its baseline).
        let now = self
            .shared
            .live
            .metrics
            .shadows
            .get(&route.name)
            .map_or((0, 0), |stats| {
                (
                    stats.compared.load(Ordering::Relaxed),
                    stats.differing.load(Ordering::Relaxed),
                )
            });
        let b = base
            .entry(route.name.clone())
            .or_insert((phase_since_ms, now.0, now.1));
        if b.0 != phase_since_ms {
            *b = (phase_since_ms, now.0, now.1);
        }
        (now.0.saturating_sub(b.1), now.1.saturating_sub(b.2))
    }
}

/// This replica's most frequent shadow differences of `route`, to share with its counts.
fn top_differences(
    stats: Option<&crate::stats::shadow::ShadowStats>,
) -> Vec<(String, String, u64)> {
    let Some(stats) = stats else {
        return Vec::new();
    };
    let mut d: Vec<(String, String, u64)> = stats
        .report()
        .entries
        .into_iter()
        .filter(|(_, _, e)| e.differences > 0)
        .map(|(p, f, e)| (p, f, e.differences))
        .collect();
    d.sort_by_key(|e| std::cmp::Reverse(e.2));
    d.truncate(super::fleet::store::SHARED_DIFFERENCES);
    d
}

fn judge(route: &Route, m: &RouteMetrics, at: At) -> Verdict {
    verdict_of(route, &own_counts(route, m, at, ""))
}

/// A verdict on one replica's counts or the fleet's sum: the window and the short span.
fn verdict_of(route: &Route, c: &Contribution) -> Verdict {
    let rules = &route.analysis;
    let full = evaluate(rules, &c.window.canary.stats(), &c.window.stable.stats());
    let fast = evaluate(rules, &c.fast.canary.stats(), &c.fast.stable.stats());
    match (full, fast) {
        (f @ Verdict::Fail { .. }, _) | (_, f @ Verdict::Fail { .. }) => f,
        (Verdict::Pass, _) | (_, Verdict::Pass) => Verdict::Pass,
        _ => Verdict::Inconclusive,
    }
}

/// Adds where the numbers come from to a failing verdict.
fn scoped(v: Verdict, scope: serde_json::Value) -> Verdict {
    match v {
        Verdict::Fail {
            reason,
            mut numbers,
        } => {
            if let Some(o) = numbers.as_object_mut() {
                o.insert("scope".into(), scope);
            }
            Verdict::Fail { reason, numbers }
        }
        other => other,
    }
}

/// How much earlier than this replica's phase another replica's counts may start and
/// still be summed with its own (see [`judge_fleet`]).
const PHASE_SLACK_MS: u64 = 1_000;

/// In a fleet: this replica's counts go to the fleet; the verdict is taken on the sum of
/// every replica's recent counts. A replica that sees the canary fail on its own traffic
/// still rolls the fleet back (always safe); without the fleet's data (the store down or
/// the view stale) nothing passes, so nothing is promoted on one replica's data.
/// The verdict on the fleet's summed counts, and the dark launch's compared and differing
/// answers summed the same way (this replica's `shadow` alone when the fleet's are not
/// to be trusted).
fn judge_fleet(
    route: &Route,
    m: &RouteMetrics,
    at: At,
    fleet: &Fleet,
    version: &str,
    shadow: (u64, u64),
    differences: Vec<(String, String, u64)>,
) -> (Verdict, (u64, u64)) {
    let mut mine = own_counts(route, m, at, version);
    mine.shadow = shadow;
    mine.differences = differences;
    fleet.contribute(&route.name, mine.clone());
    let me = fleet.settings.instance.clone();
    let local = verdict_of(route, &mine);
    if matches!(local, Verdict::Fail { .. }) {
        return (scoped(local, json!({ "replica": me })), shadow);
    }
    if fleet.stale() || !fleet.connected.load(Ordering::Acquire) {
        return (Verdict::Inconclusive, shadow);
    }
    // Only counts from this phase: another replica's counts that start more than
    // PHASE_SLACK_MS before this replica's phase began are from an earlier phase (a
    // resume, a new weight), still fresh by their age, and must not judge this one. The
    // slack covers the few ms a change takes to reach every replica, and clock skew.
    let others: Vec<(String, Contribution)> = fleet
        .others(&route.name, version)
        .into_iter()
        .filter(|(_, c)| c.since_ms.saturating_add(PHASE_SLACK_MS) >= at.since_ms)
        .collect();
    let mut sum = mine.clone();
    let mut by_replica = serde_json::Map::new();
    by_replica.insert(me, json!(mine.window.canary.requests));
    for (inst, c) in &others {
        sum.window.add(&c.window);
        sum.fast.add(&c.fast);
        sum.shadow.0 += c.shadow.0;
        sum.shadow.1 += c.shadow.1;
        by_replica.insert(inst.clone(), json!(c.window.canary.requests));
    }
    (
        scoped(
            verdict_of(route, &sum),
            json!({ "fleet": others.len() + 1, "canary_requests_by_replica": by_replica }),
        ),
        sum.shadow,
    )
}

impl AnalysisLoop {
    fn pass(
        &self,
        probes: &mut Probes,
        last_eval: &mut HashMap<String, Instant>,
        diff_base: &mut HashMap<String, (u64, u64, u64)>,
    ) {
        let now = self.shared.clock.now();
        let now_ms = self.shared.clock.now_ms();
        let live = self.shared.live.load();
        let mut pools_seen = Vec::new();
        // While the fleet store does not answer, fleet.partition_timeout may run out.
        let fleet_down = self
            .shared
            .fleet
            .as_ref()
            .is_some_and(|f| !f.connected.load(Ordering::Acquire));
        for (i, route) in live.snapshot.routes.iter().enumerate() {
            if let Some(h) = &route.health {
                for pool in [Some(&route.stable), route.canary.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    pools_seen.push(Arc::as_ptr(&pool.registry) as usize);
                    probes.run_if_due(pool, h.interval, now);
                }
                if let Some(canary) = &route.canary {
                    if route.split.canary_buckets > 0 && canary.healthy_count() == 0 {
                        let endpoints: Vec<String> =
                            canary.endpoints.iter().map(|e| e.to_string()).collect();
                        self.shared.canary_unhealthy(
                            &route.name,
                            json!({ "healthy_endpoints": 0, "endpoints": endpoints }),
                        );
                    }
                }
            }
            // A rollout step's hold may elapse between evaluations (or without analysis);
            // a route cut off from the fleet may be due back (a restarted process's phase
            // confirmed once the store has answered for `fleet_confirm_ms`).
            if route.weight_source == WeightSource::Rollout
                || route.weight_source == WeightSource::CutOff
                || (fleet_down && route.canary.is_some())
            {
                self.shared.observe(&route.name, Input::Tick);
            }
            // A canary with no user is judged while the route mirrors to it (the dark
            // launch: its copies' outcomes are in the canary's window).
            let shadowed = route
                .shadow
                .as_ref()
                .is_some_and(|s| s.share_buckets > 0 && s.endpoints.is_empty());
            if !route.analysis.enabled
                || route.canary.is_none()
                || (route.split.canary_buckets == 0 && !shadowed)
            {
                continue;
            }
            // A new phase takes its shadow baseline at the first pass that sees it (every
            // tick, not only when an evaluation is due), so the copies compared early in
            // the phase count in it.
            if route.shadow.is_some() {
                if let Some(control) = self.shared.route_control(&route.name) {
                    self.diff_counts(route, control.judged_since_ms, diff_base);
                }
            }
            let due = last_eval
                .get(&route.name)
                .is_none_or(|t| now.duration_since(*t) >= route.analysis.interval);
            if !due {
                continue;
            }
            last_eval.insert(route.name.clone(), now);
            let (Some(m), Some(control)) = (
                live.route_metrics.get(i),
                self.shared.route_control(&route.name),
            ) else {
                continue;
            };
            // Outcomes since the current phase began, as an instant of this clock.
            let since = now
                .checked_sub(Duration::from_millis(
                    now_ms.saturating_sub(control.judged_since_ms),
                ))
                .unwrap_or(now);
            let at = At {
                since,
                now,
                now_ms,
                since_ms: control.judged_since_ms,
            };
            // The dark launch's answers: judged since the phase began (a baseline of the
            // shadow's counts taken at the first evaluation of each phase), summed over the
            // fleet like the outcomes.
            let shadow = self.diff_counts(route, control.judged_since_ms, diff_base);
            let (judged, shadow) = match (&self.shared.fleet, &route.canary) {
                (Some(fleet), Some(canary)) => {
                    let stats = route
                        .shadow
                        .as_ref()
                        .and_then(|_| self.shared.live.metrics.shadows.get(&route.name));
                    let differences = top_differences(stats.as_deref());
                    judge_fleet(route, m, at, fleet, &canary.version, shadow, differences)
                }
                _ => (judge(route, m, at), shadow),
            };
            let diff = crate::rollout::verdict::diff_rate(&route.analysis, shadow.0, shadow.1);
            let judged = match (judged, diff) {
                (Verdict::Fail { reason, numbers }, _) => Verdict::Fail { reason, numbers },
                (_, Some(fail)) => fail,
                (other, None) => other,
            };
            let verdict = match judged {
                Verdict::Fail { reason, numbers } => machine::Verdict::Fail {
                    reason: reason.to_string(),
                    numbers,
                },
                Verdict::Pass => machine::Verdict::Pass,
                Verdict::Inconclusive => machine::Verdict::Inconclusive,
            };
            self.shared
                .record_verdict(&route.name, control.epoch, verdict);
        }
        probes.retain(&pools_seen);
    }
}

#[async_trait]
impl BackgroundService for AnalysisLoop {
    async fn start(&self, shutdown: ShutdownWatch) {
        super::every(TICK, shutdown, || self.tick()).await;
    }
}
