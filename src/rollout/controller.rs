//! The rollout controller: runs the active health checks and the canary analysis on their
//! schedules, and turns what they find into rollbacks and rollout steps.
//!
//! It ticks every 100 ms, off the request path, on Pingora's background runtime. For each
//! route: probes each pool when its `health.interval` is due (a probe pass runs in its own
//! task, so a hanging endpoint delays nothing else); rolls back at once when the canary
//! pool has no healthy endpoint; and, when `analysis.interval` is due, judges the canary
//! against stable over the window and over the last two seconds (a sudden failure shows in
//! the short span long before it moves a 30-second average), counting the attempts still
//! waiting for an answer past the latency limit as slow (a hanging canary is seen while it
//! hangs, not when its requests finally time out), then hands the verdict to
//! the route's state machine with the epoch its data was read at: if anything changed the
//! phase or the canary version while it judged (an operator's resume, a new version), the
//! machine drops the verdict instead of letting the new phase inherit an old failure.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::json;

use crate::config::{Pool, Route, WeightSource};
use crate::metrics::RouteMetrics;
use crate::rollout::analysis::{evaluate, Verdict, WindowStats};
use crate::rollout::control::Shared;
use crate::rollout::machine::{self, Input};
use crate::rollout::phase::now_ms;
use crate::split::Track;

const TICK: Duration = Duration::from_millis(100);
/// The short span judged beside the window.
const FAST_SPAN: Duration = Duration::from_secs(2);

/// The background service.
pub struct Controller {
    shared: Arc<Shared>,
}

impl Controller {
    pub fn new(shared: Arc<Shared>) -> Self {
        Controller { shared }
    }
}

/// Per-pool probe schedule, keyed by the pool's address (pools live as long as a config
/// that uses them; a reload that keeps a pool keeps its schedule).
#[derive(Default)]
struct Probes {
    pools: HashMap<usize, (Instant, Arc<AtomicBool>)>,
}

impl Probes {
    fn run_if_due(&mut self, pool: &Arc<Pool>, interval: Duration, now: Instant) {
        let key = Arc::as_ptr(pool) as usize;
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
        tokio::spawn(async move {
            pool.lb.backends().run_health_check(true).await;
            running.store(false, Ordering::Release);
        });
    }

    /// Forgets pools no longer in the config.
    fn retain(&mut self, live: &[usize]) {
        self.pools.retain(|k, _| live.contains(k));
    }
}

/// One track's numbers over `span` since `since`: the finished attempts, plus the attempts
/// still waiting past the latency limit (slow) or the read timeout (failed). Without a
/// latency limit only the read timeout makes a waiting attempt count.
fn sample(
    route: &Route,
    m: &RouteMetrics,
    track: Track,
    span: Duration,
    since: Instant,
    now: Instant,
) -> WindowStats {
    let tm = m.version(track);
    let mut totals = tm.window.totals_since(now, span, Some(since));
    let read = route.timeouts.read;
    let slow_after = route.analysis.max_p99_latency.unwrap_or(read);
    tm.in_flight
        .add_pending(now, slow_after, read, Some(since), &mut totals);
    totals.stats()
}

fn judge(route: &Route, m: &RouteMetrics, since: Instant, now: Instant) -> Verdict {
    let rules = &route.analysis;
    let pair = |span: Duration| {
        evaluate(
            rules,
            &sample(route, m, Track::Canary, span, since, now),
            &sample(route, m, Track::Stable, span, since, now),
        )
    };
    let full = pair(rules.window);
    let fast = pair(FAST_SPAN.min(rules.window));
    match (full, fast) {
        (f @ Verdict::Fail { .. }, _) | (_, f @ Verdict::Fail { .. }) => f,
        (Verdict::Pass, _) | (_, Verdict::Pass) => Verdict::Pass,
        _ => Verdict::Inconclusive,
    }
}

impl Controller {
    fn tick(&self, probes: &mut Probes, last_eval: &mut HashMap<String, Instant>) {
        let now = Instant::now();
        let live = self.shared.load();
        let mut pools_seen = Vec::new();
        for (i, route) in live.snapshot.routes.iter().enumerate() {
            if let Some(h) = &route.health {
                for pool in [Some(&route.stable), route.canary.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    pools_seen.push(Arc::as_ptr(pool) as usize);
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
            // A rollout step's hold may elapse between evaluations (or without analysis).
            if route.weight_source == WeightSource::Rollout {
                self.shared.observe(&route.name, Input::Tick);
            }
            if !route.analysis.enabled || route.canary.is_none() || route.split.canary_buckets == 0
            {
                continue;
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
            let since =
                now - Duration::from_millis(now_ms().saturating_sub(control.judged_since_ms));
            let verdict = match judge(route, m, since, now) {
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
        self.shared.update_health_gauges(&live.snapshot);
    }
}

#[async_trait]
impl BackgroundService for Controller {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut probes = Probes::default();
        let mut last_eval = HashMap::new();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticker.tick() => self.tick(&mut probes, &mut last_eval),
            }
        }
    }
}
