//! The process's shared state: the published config snapshot and everything that changes it.
//!
//! Two inputs shape what requests see: the config file (loaded at start and on reload) and
//! each route's rollout [`Phase`] (an operator's weight, a rollback, a promote, a rollout
//! step, an automatic rollback). [`Shared::publish`] merges them into one new [`Snapshot`]
//! and makes it live with a single `ArcSwap::store`; requests load it once and never see
//! half a change. Publishing is serialized by one mutex that the request path never
//! touches. Every phase change is persisted (when `[state]` is set) and becomes an
//! [`Event`]: logged as one JSON line, kept for the status API, counted, and sent to the
//! webhook.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use serde_json::{json, Value};

use crate::config::{self, ConfigErrors, Route, Snapshot};
use crate::metrics::{Metrics, RouteMetrics};
use crate::notify::Notifier;
use crate::rollout::{now_ms, Event, Phase, Record, Store, STATES};
use crate::split::{buckets_to_percent, weight_to_buckets};

/// Events kept for the status API.
const EVENTS_KEPT: usize = 200;

/// The published config plus per-route metric handles, swapped as one.
pub struct Live {
    pub snapshot: Arc<Snapshot>,
    /// Parallel to `snapshot.routes`.
    pub route_metrics: Vec<Arc<RouteMetrics>>,
}

/// The result of the last reload attempt, for the status API.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    pub at: SystemTime,
    /// `startup`, `watch`, `sighup`.
    pub trigger: &'static str,
    pub ok: bool,
    pub errors: Vec<String>,
    /// Keys that changed in the file but only take effect after a restart.
    pub restart_required: Vec<String>,
}

/// What the file said about a route that an operator's weight depends on.
type Fingerprint = (u32, String, Option<String>);

fn fingerprint(r: &Route) -> Fingerprint {
    (
        r.file_buckets,
        r.stable.version.clone(),
        r.canary.as_ref().map(|c| c.version.clone()),
    )
}

/// Rollout bookkeeping of one route.
#[derive(Debug, Clone)]
pub struct RouteControl {
    pub phase: Phase,
    /// The canary version the phase belongs to.
    canary_version: Option<String>,
    fingerprint: Fingerprint,
    /// Consecutive failing evaluations.
    pub failures: u32,
    /// Whether an evaluation passed since the current step (or hold) began.
    pub passed_in_hold: bool,
    /// Analysis only looks at outcomes after this instant (a new phase or version must
    /// not be judged by what happened before it).
    pub judged_since: Instant,
    /// Evaluations run for this route since start.
    pub evaluations: u64,
    /// `pass`, `fail:REASON` or `inconclusive`.
    pub last_verdict: &'static str,
}

/// What publication needs under its lock.
struct Control {
    /// The last config compiled from the file, before rollout phases.
    file: Arc<Snapshot>,
    routes: HashMap<String, RouteControl>,
    generation: u64,
    events: VecDeque<Event>,
}

/// Errors of operator actions, each mapped to an HTTP status by the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no route named {0:?}")]
    NoSuchRoute(String),
    #[error("{0}")]
    BadWeight(String),
    #[error("route {0:?} has no canary pool: add [routes.canary] to the config first")]
    NoCanary(String),
    #[error("{0}")]
    Conflict(String),
}

/// An operator's action on a route.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    Weight(f64),
    Rollback,
    Promote,
    Pause,
    Resume,
}

/// Shared by the proxy, the admin API, the reloader and the rollout controller.
pub struct Shared {
    live: ArcSwap<Live>,
    pub metrics: Metrics,
    pub config_path: PathBuf,
    control: Mutex<Control>,
    last_reload: ArcSwap<ReloadStatus>,
    store: Option<Store>,
    notifier: Option<Notifier>,
}

/// Restart-only settings that differ between two configs, by key.
fn restart_keys(running: &Snapshot, new: &Snapshot) -> Vec<String> {
    let mut keys = Vec::new();
    if running.proxy.listen != new.proxy.listen {
        keys.push("proxy.listen".to_string());
    }
    if running.proxy.threads != new.proxy.threads {
        keys.push("proxy.threads".to_string());
    }
    if running.proxy.upgrade_sock != new.proxy.upgrade_sock {
        keys.push("proxy.upgrade_sock".to_string());
    }
    if running.admin.listen != new.admin.listen {
        keys.push("admin.listen".to_string());
    }
    if running.state.as_ref().map(|s| &s.dir) != new.state.as_ref().map(|s| &s.dir) {
        keys.push("state.dir".to_string());
    }
    keys
}

impl Shared {
    /// State for a config loaded at startup (generation 1). Persisted phases are restored.
    pub fn new(snapshot: Snapshot, config_path: PathBuf) -> anyhow::Result<Arc<Self>> {
        let metrics = Metrics::new()?;
        let store = match &snapshot.state {
            Some(st) => Some(Store::new(&st.dir)?),
            None => None,
        };
        let notifier = snapshot.notify.clone().map(Notifier::start);
        let file = Arc::new(snapshot);
        let shared = Arc::new(Shared {
            live: ArcSwap::from_pointee(Live {
                snapshot: file.clone(),
                route_metrics: Vec::new(),
            }),
            metrics,
            config_path,
            control: Mutex::new(Control {
                file: file.clone(),
                routes: HashMap::new(),
                generation: 0,
                events: VecDeque::new(),
            }),
            last_reload: ArcSwap::from_pointee(ReloadStatus {
                at: SystemTime::now(),
                trigger: "startup",
                ok: true,
                errors: Vec::new(),
                restart_required: Vec::new(),
            }),
            store,
            notifier,
        });
        {
            let mut ctl = shared.lock();
            shared.sync_routes(&mut ctl);
            shared.publish(&mut ctl);
        }
        shared.metrics.reloads.with_label_values(&["success"]).inc();
        Ok(shared)
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

    pub fn last_reload(&self) -> Arc<ReloadStatus> {
        self.last_reload.load_full()
    }

    /// The most recent events, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.iter().cloned().collect()
    }

    /// Every route's control record. Read this *before* loading the snapshot: a change of
    /// phase is published inside the same critical section, so the snapshot loaded after
    /// is at least as new as these records.
    pub fn controls(&self) -> HashMap<String, RouteControl> {
        self.lock().routes.clone()
    }

    /// A route's control record (for status and the controller).
    pub fn route_control(&self, route: &str) -> Option<RouteControl> {
        self.lock().routes.get(route).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, Control> {
        // Every field of Control is replaced whole, so a panic elsewhere while the lock
        // was held cannot leave it torn: a poisoned lock is still usable.
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a transition: event list, log line, metrics, webhook, state file.
    fn transition(
        &self,
        ctl: &mut Control,
        route: &Route,
        kind: &'static str,
        new_phase: Phase,
        reason: &str,
        numbers: Value,
    ) {
        let Some(rc) = ctl.routes.get_mut(&route.name) else {
            return;
        };
        let from = rc.phase.name().to_string();
        rc.phase = new_phase;
        rc.failures = 0;
        rc.passed_in_hold = false;
        rc.judged_since = Instant::now();
        let (buckets, _) = rc.phase.weight(route);
        let event = Event {
            at_ms: now_ms(),
            route: route.name.clone(),
            kind,
            from,
            to: rc.phase.name().to_string(),
            weight_percent: buckets_to_percent(buckets),
            reason: reason.to_string(),
            numbers,
        };
        let record = rc.canary_version.clone().map(|v| Record {
            route: route.name.clone(),
            canary_version: v,
            phase: rc.phase.clone(),
            updated_ms: event.at_ms,
        });
        self.emit(ctl, event);
        if let (Some(store), Some(rec)) = (&self.store, record) {
            if let Err(e) = store.save(&rec) {
                log::error!("route {}: cannot persist rollout state: {e}", route.name);
            }
        }
    }

    fn emit(&self, ctl: &mut Control, event: Event) {
        let line = serde_json::to_string(&event).unwrap_or_default();
        log::info!(target: "kanaria::event", "{line}");
        self.metrics
            .events
            .with_label_values(&[&event.route, event.kind])
            .inc();
        if event.kind == "rollback" {
            self.metrics
                .rollbacks
                .with_label_values(&[&event.route, &event.reason])
                .inc();
        }
        if let Some(n) = &self.notifier {
            n.send(line);
        }
        if ctl.events.len() >= EVENTS_KEPT {
            ctl.events.pop_front();
        }
        ctl.events.push_back(event);
    }

    /// Brings the per-route controls in line with the file config: new routes and new
    /// canary versions start (or resume from their state file), operator weights end when
    /// the file changes their route, rollouts adapt to changed steps.
    fn sync_routes(&self, ctl: &mut Control) {
        let file = ctl.file.clone();
        ctl.routes
            .retain(|name, _| file.routes.iter().any(|r| &r.name == name));
        for route in &file.routes {
            let version = route.canary.as_ref().map(|c| c.version.clone());
            let fp = fingerprint(route);
            match ctl.routes.get_mut(&route.name) {
                Some(rc) if rc.canary_version == version => {
                    let changed = rc.fingerprint != fp;
                    rc.fingerprint = fp;
                    let next = match &rc.phase {
                        Phase::Weight { .. } if changed => Some((
                            Phase::initial(route),
                            "the file changed the route: the operator's weight no longer applies",
                        )),
                        Phase::Manual if !route.steps.is_empty() => {
                            Some((Phase::initial(route), "a rollout was added"))
                        }
                        Phase::Progressing { .. } | Phase::Paused { .. }
                            if route.steps.is_empty() =>
                        {
                            Some((Phase::Manual, "the rollout was removed"))
                        }
                        _ => None,
                    };
                    if let Some((phase, reason)) = next {
                        self.transition(ctl, route, "reset", phase, reason, json!({}));
                    }
                }
                existing => {
                    let fresh = existing.is_some();
                    let (phase, kind, reason) = self.starting_phase(route, version.as_deref());
                    ctl.routes.insert(
                        route.name.clone(),
                        RouteControl {
                            phase: Phase::Manual,
                            canary_version: version,
                            fingerprint: fp,
                            failures: 0,
                            passed_in_hold: false,
                            judged_since: Instant::now(),
                            evaluations: 0,
                            last_verdict: "none",
                        },
                    );
                    let reason = if fresh {
                        "a new canary version starts a fresh rollout".to_string()
                    } else {
                        reason
                    };
                    self.transition(ctl, route, kind, phase, &reason, json!({}));
                }
            }
        }
    }

    /// The phase a route starts in: its saved phase for this canary version, a fresh one,
    /// or the safe side when the state file cannot be read.
    fn starting_phase(
        &self,
        route: &Route,
        version: Option<&str>,
    ) -> (Phase, &'static str, String) {
        let (Some(store), Some(version)) = (&self.store, version) else {
            return (Phase::initial(route), "reset", "start".into());
        };
        match store.load(&route.name) {
            Ok(Some(rec)) if rec.canary_version == version => (
                rec.phase,
                "restored",
                format!("state file {}", store.path(&route.name).display()),
            ),
            Ok(_) => (
                Phase::initial(route),
                "reset",
                format!("canary version {version} starts"),
            ),
            Err(e) => {
                log::error!(
                    "route {}: {e}; no canary traffic until the canary version changes or an operator resumes",
                    route.name
                );
                (
                    Phase::RolledBack {
                        reason: "state_unreadable".into(),
                    },
                    "state_error",
                    e.to_string(),
                )
            }
        }
    }

    /// Builds the snapshot to serve from the file config and the phases, and stores it.
    fn publish(&self, ctl: &mut Control) {
        let old = self.live.load();
        let mut snap = (*ctl.file).clone();
        ctl.generation += 1;
        snap.generation = ctl.generation;
        snap.routes = ctl
            .file
            .routes
            .iter()
            .map(|r| {
                let mut route = (**r).clone();
                // Unchanged pools keep their load balancer (and so their endpoint health).
                if let Some(prev) = old.snapshot.routes.iter().find(|o| o.name == r.name) {
                    if prev.stable.version == route.stable.version
                        && prev.stable.endpoints == route.stable.endpoints
                        && prev.health == route.health
                    {
                        route.stable = prev.stable.clone();
                    }
                    if let (Some(p), Some(n)) = (&prev.canary, &route.canary) {
                        if p.version == n.version
                            && p.endpoints == n.endpoints
                            && prev.health == route.health
                        {
                            route.canary = Some(p.clone());
                        }
                    }
                }
                if let Some(rc) = ctl.routes.get(&r.name) {
                    let (buckets, source) = rc.phase.weight(r);
                    route.split.canary_buckets = if route.canary.is_some() { buckets } else { 0 };
                    route.weight_source = source;
                }
                Arc::new(route)
            })
            .collect();
        let route_metrics = snap
            .routes
            .iter()
            .map(|r| self.metrics.route(&r.name))
            .collect();
        self.update_gauges(&old.snapshot, &snap, ctl);
        self.live.store(Arc::new(Live {
            snapshot: Arc::new(snap),
            route_metrics,
        }));
    }

    fn update_gauges(&self, old: &Snapshot, new: &Snapshot, ctl: &Control) {
        let m = &self.metrics;
        // Series of routes, pools and endpoints that went away must not linger.
        for r in &old.routes {
            let _ = m.canary_weight.remove_label_values(&[&r.name]);
            for st in STATES {
                let _ = m.rollout_state.remove_label_values(&[&r.name, st]);
            }
            for (role, pool) in [("stable", Some(&r.stable)), ("canary", r.canary.as_ref())] {
                if let Some(p) = pool {
                    let _ = m
                        .pool_info
                        .remove_label_values(&[&r.name, role, &p.version]);
                    for e in &p.endpoints {
                        let _ = m.endpoint_healthy.remove_label_values(&[
                            &r.name,
                            role,
                            &e.to_string(),
                        ]);
                    }
                }
            }
        }
        for r in &new.routes {
            m.canary_weight
                .with_label_values(&[&r.name])
                .set(buckets_to_percent(r.split.canary_buckets));
            let state = rollout_state(r, ctl.routes.get(&r.name).map(|c| &c.phase));
            for st in STATES {
                m.rollout_state
                    .with_label_values(&[&r.name, st])
                    .set(i64::from(st == state));
            }
            for (role, pool) in [("stable", Some(&r.stable)), ("canary", r.canary.as_ref())] {
                if let Some(p) = pool {
                    m.pool_info
                        .with_label_values(&[&r.name, role, &p.version])
                        .set(1);
                }
            }
        }
        self.update_health_gauges(new);
        m.generation.set(new.generation as i64);
    }

    /// `kanaria_endpoint_healthy` from the load balancers' current health.
    pub fn update_health_gauges(&self, snap: &Snapshot) {
        for r in &snap.routes {
            for (role, pool) in [("stable", Some(&r.stable)), ("canary", r.canary.as_ref())] {
                if let Some(p) = pool {
                    for (addr, healthy) in p.health() {
                        self.metrics
                            .endpoint_healthy
                            .with_label_values(&[&r.name, role, &addr.to_string()])
                            .set(i64::from(healthy));
                    }
                }
            }
        }
    }

    /// Re-reads the config file. On success the new config is live before this returns;
    /// on error the old one keeps serving and every error is logged and kept for status.
    pub fn reload_from_file(&self, trigger: &'static str) -> Result<u64, ConfigErrors> {
        let result = config::load_file(&self.config_path);
        let mut ctl = self.lock();
        match result {
            Ok(new) => {
                let restart_required = restart_keys(&ctl.file, &new);
                for key in &restart_required {
                    log::warn!(
                        "config reload ({trigger}): {key} changed; it takes effect after a restart, the running value stays"
                    );
                }
                ctl.file = Arc::new(new);
                // Before publishing: whoever sees the new generation sees this result too.
                self.last_reload.store(Arc::new(ReloadStatus {
                    at: SystemTime::now(),
                    trigger,
                    ok: true,
                    errors: Vec::new(),
                    restart_required,
                }));
                self.metrics.reloads.with_label_values(&["success"]).inc();
                self.sync_routes(&mut ctl);
                self.publish(&mut ctl);
                log::info!(
                    "config reloaded ({trigger}) from {}: generation {}",
                    self.config_path.display(),
                    ctl.generation
                );
                Ok(ctl.generation)
            }
            Err(errors) => {
                self.metrics.reloads.with_label_values(&["error"]).inc();
                for e in &errors.0 {
                    log::error!(
                        "config reload ({trigger}) rejected, old config keeps serving: {e}"
                    );
                }
                self.last_reload.store(Arc::new(ReloadStatus {
                    at: SystemTime::now(),
                    trigger,
                    ok: false,
                    errors: errors.0.iter().map(|e| e.to_string()).collect(),
                    restart_required: Vec::new(),
                }));
                Err(errors)
            }
        }
    }

    /// An operator's action. Returns the new generation.
    pub fn act(&self, route: &str, action: Action) -> Result<u64, ControlError> {
        let mut ctl = self.lock();
        let file_route = ctl
            .file
            .routes
            .iter()
            .find(|r| r.name == route)
            .cloned()
            .ok_or_else(|| ControlError::NoSuchRoute(route.to_string()))?;
        if file_route.canary.is_none() {
            return Err(ControlError::NoCanary(route.to_string()));
        }
        let phase = ctl
            .routes
            .get(route)
            .map(|c| c.phase.clone())
            .unwrap_or(Phase::Manual);
        let (kind, next, reason) = match action {
            Action::Weight(percent) => {
                let buckets = weight_to_buckets(percent).map_err(ControlError::BadWeight)?;
                (
                    "weight",
                    Phase::Weight { buckets },
                    format!("operator set {percent}%"),
                )
            }
            Action::Rollback => (
                "rollback",
                Phase::RolledBack {
                    reason: "manual".into(),
                },
                "manual".to_string(),
            ),
            Action::Promote => match phase.step() {
                Some(step) if step + 1 < file_route.steps.len() => (
                    "step",
                    Phase::Progressing {
                        step: step + 1,
                        since_ms: now_ms(),
                    },
                    "operator skipped to the next step".to_string(),
                ),
                _ => ("promoted", Phase::Promoted, "operator promoted".to_string()),
            },
            Action::Pause => match phase {
                Phase::Progressing { step, .. } => (
                    "paused",
                    Phase::Paused { step },
                    "operator paused".to_string(),
                ),
                other => {
                    return Err(ControlError::Conflict(format!(
                        "route {route:?} is {}: only a progressing rollout can be paused",
                        other.name()
                    )))
                }
            },
            Action::Resume => match phase {
                Phase::Paused { step } => (
                    "resumed",
                    Phase::Progressing {
                        step,
                        since_ms: now_ms(),
                    },
                    "operator resumed".to_string(),
                ),
                Phase::RolledBack { .. } => (
                    "resumed",
                    Phase::initial(&file_route),
                    "operator resumed after a rollback".to_string(),
                ),
                other => {
                    return Err(ControlError::Conflict(format!(
                        "route {route:?} is {}: only a paused or rolled-back route can be resumed",
                        other.name()
                    )))
                }
            },
        };
        self.transition(&mut ctl, &file_route, kind, next, &reason, json!({}));
        self.publish(&mut ctl);
        Ok(ctl.generation)
    }

    /// The controller's automatic rollback. Does nothing if the route already sends no
    /// users to the canary. Returns whether it rolled back.
    pub fn auto_rollback(&self, route: &str, reason: &str, numbers: Value) -> bool {
        let mut ctl = self.lock();
        let Some(file_route) = ctl.file.routes.iter().find(|r| r.name == route).cloned() else {
            return false;
        };
        let Some(rc) = ctl.routes.get(route) else {
            return false;
        };
        if matches!(rc.phase, Phase::RolledBack { .. }) || rc.phase.weight(&file_route).0 == 0 {
            return false;
        }
        self.transition(
            &mut ctl,
            &file_route,
            "rollback",
            Phase::RolledBack {
                reason: reason.to_string(),
            },
            reason,
            numbers,
        );
        self.publish(&mut ctl);
        true
    }

    /// Records an evaluation's outcome for a route and applies what follows from it:
    /// rollback after `failure_limit` consecutive failures, the next step after a passing
    /// hold. `failed` is `Some((reason, numbers))` for a failing verdict, `passed` tells a
    /// pass from an inconclusive evaluation.
    pub fn record_verdict(&self, route: &str, failed: Option<(&'static str, Value)>, passed: bool) {
        let mut ctl = self.lock();
        let Some(file_route) = ctl.file.routes.iter().find(|r| r.name == route).cloned() else {
            return;
        };
        let Some(rc) = ctl.routes.get_mut(route) else {
            return;
        };
        rc.evaluations += 1;
        rc.last_verdict = match (&failed, passed) {
            (Some(_), _) => "fail",
            (None, true) => "pass",
            (None, false) => "inconclusive",
        };
        if let Some((reason, numbers)) = failed {
            rc.failures += 1;
            rc.passed_in_hold = false;
            // A failing evaluation restarts the hold: a step needs a whole passing hold.
            if let Phase::Progressing { since_ms, .. } = &mut rc.phase {
                *since_ms = now_ms();
            }
            if rc.failures >= file_route.analysis.failure_limit {
                drop(ctl);
                self.auto_rollback(route, reason, numbers);
            }
            return;
        }
        rc.failures = 0;
        rc.passed_in_hold |= passed;
        let Phase::Progressing { step, since_ms } = rc.phase.clone() else {
            return;
        };
        let Some(hold) = file_route.steps.get(step).map(|s| s.hold) else {
            return;
        };
        let held = now_ms().saturating_sub(since_ms) >= hold.as_millis() as u64;
        // A step without hold moves on at once; others need a pass during the hold.
        if !(held && (rc.passed_in_hold || hold.is_zero())) {
            return;
        }
        let (kind, next) = if step + 1 < file_route.steps.len() {
            (
                "step",
                Phase::Progressing {
                    step: step + 1,
                    since_ms: now_ms(),
                },
            )
        } else {
            ("promoted", Phase::Promoted)
        };
        let reason = format!("analysis passed for the {}s hold", hold.as_secs_f64());
        self.transition(&mut ctl, &file_route, kind, next, &reason, json!({}));
        self.publish(&mut ctl);
    }
}

/// The rollout state of a published route.
pub fn rollout_state(r: &Route, phase: Option<&Phase>) -> &'static str {
    match (r.canary.is_some(), phase) {
        (false, _) => "no_canary",
        (true, Some(p)) => p.name(),
        (true, None) => "manual",
    }
}
