//! The process's shared state: the published config snapshot and everything that changes it.
//!
//! Two inputs shape what requests see: the config file (loaded at start and on reload) and
//! each route's rollout state, moved only by the pure [`machine`](crate::rollout::machine).
//! Every change is applied under one mutex that the request path never touches: the
//! machine's step and its in-memory effects (a new [`Snapshot`] made live with a single
//! `ArcSwap::store`, the event kept, logged, counted and queued for the webhook) happen
//! inside it, so no two changes interleave; the state file is written after it, on the
//! persister's thread, in the same order. Requests load the snapshot once and never see
//! half a change.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde_json::Value;

use crate::config::{self, ConfigErrors, Route, Snapshot};
use crate::metrics::{family_head, sample, Metrics, RouteMetrics};
use crate::rollout::fleet::{Answer, Fleet, Reply};
use crate::rollout::machine::{
    self, Effect, Event, FleetRecord, Input, Refusal, RouteRollout, ShareMode, Spec,
};
use crate::rollout::phase::{now_ms, Phase, STATES};
use crate::rollout::store::{Persister, Store, Write};
use crate::rollout::webhook::Notifier;
use crate::split::{buckets_to_percent, weight_to_buckets};

pub use crate::rollout::machine::{Action, Verdict};

/// Events kept for the status API.
const EVENTS_KEPT: usize = 200;

/// The published config plus per-route metric handles, swapped as one.
pub struct Live {
    pub snapshot: Arc<Snapshot>,
    /// Parallel to `snapshot.routes`.
    pub route_metrics: Vec<Arc<RouteMetrics>>,
    /// Each route's `rollout_state` when published (parallel to `snapshot.routes`), for
    /// `kanaria_rollout_state`.
    pub states: Vec<&'static str>,
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

/// What publication needs under its lock.
struct Control {
    /// The last config compiled from the file, before rollout phases.
    file: Arc<Snapshot>,
    routes: HashMap<String, RouteRollout>,
    generation: u64,
    events: VecDeque<Event>,
    /// Who waits for the store's answer to the next shared change (an operator).
    reply: Option<Reply>,
}

/// Errors of operator actions, each mapped to an HTTP status by the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no route named {0:?}")]
    NoSuchRoute(String),
    #[error("{0}")]
    BadWeight(String),
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// Shared by the proxy, the admin API, the reloader and the rollout controller.
pub struct Shared {
    live: ArcSwap<Live>,
    pub metrics: Metrics,
    pub config_path: PathBuf,
    control: Mutex<Control>,
    last_reload: ArcSwap<ReloadStatus>,
    persister: Option<Persister>,
    notifier: Option<Notifier>,
    /// `[fleet]`: the link to the other replicas (`None`: this process decides alone).
    pub fleet: Option<Arc<Fleet>>,
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
    let tls_listen = |s: &Snapshot| s.proxy.tls.as_ref().map(|t| t.listen.clone());
    if tls_listen(running) != tls_listen(new) {
        keys.push("proxy.tls.listen".to_string());
    }
    if running.proxy.tls.as_ref().map(|t| t.http2) != new.proxy.tls.as_ref().map(|t| t.http2) {
        keys.push("proxy.tls.http2".to_string());
    }
    if running.proxy.h2c != new.proxy.h2c {
        keys.push("proxy.h2c".to_string());
    }
    if (
        running.edge.h2_max_concurrent_streams,
        running.edge.h2_max_header_list_size,
    ) != (
        new.edge.h2_max_concurrent_streams,
        new.edge.h2_max_header_list_size,
    ) {
        keys.push("edge.h2_max_concurrent_streams/h2_max_header_list_size".to_string());
    }
    if running.log != new.log {
        keys.push("log".to_string());
    }
    if running.admin.listen != new.admin.listen {
        keys.push("admin.listen".to_string());
    }
    if running.state.as_ref().map(|s| &s.dir) != new.state.as_ref().map(|s| &s.dir) {
        keys.push("state.dir".to_string());
    }
    let fleet = |s: &Snapshot| {
        s.fleet.as_ref().map(|f| {
            (
                f.url.clone(),
                f.cluster.clone(),
                f.instance.clone(),
                f.poll_interval,
                f.startup_timeout,
            )
        })
    };
    if fleet(running) != fleet(new) {
        keys.push("fleet".to_string());
    }
    keys
}

impl Shared {
    /// State for a config loaded at startup (generation 1). Persisted phases are restored.
    pub fn new(snapshot: Snapshot, config_path: PathBuf) -> anyhow::Result<Arc<Self>> {
        let metrics = Metrics::new()?;
        let persister = match &snapshot.state {
            Some(st) => Some(Persister::start(Store::new(&st.dir)?)?),
            None => None,
        };
        let notifier = snapshot.notify.clone().map(Notifier::start);
        let fleet = snapshot.fleet.clone().map(Fleet::new);
        let file = Arc::new(snapshot);
        let shared = Arc::new(Shared {
            live: ArcSwap::from_pointee(Live {
                snapshot: file.clone(),
                route_metrics: Vec::new(),
                states: Vec::new(),
            }),
            metrics,
            config_path,
            control: Mutex::new(Control {
                file: file.clone(),
                routes: HashMap::new(),
                generation: 0,
                events: VecDeque::new(),
                reply: None,
            }),
            last_reload: ArcSwap::from_pointee(ReloadStatus {
                at: SystemTime::now(),
                trigger: "startup",
                ok: true,
                errors: Vec::new(),
                restart_required: Vec::new(),
            }),
            persister,
            notifier,
            fleet,
        });
        {
            let mut ctl = shared.lock();
            shared.sync_routes(&mut ctl);
            shared.publish(&mut ctl);
        }
        shared.flush_state();
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

    /// Every route's rollout state. Read this *before* loading the snapshot: a change of
    /// phase is published inside the same critical section, so the snapshot loaded after
    /// is at least as new as these records.
    pub fn controls(&self) -> HashMap<String, RouteRollout> {
        self.lock().routes.clone()
    }

    /// A route's rollout state (for status and the controller).
    pub fn route_control(&self, route: &str) -> Option<RouteRollout> {
        self.lock().routes.get(route).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, Control> {
        // Every field of Control is replaced whole, so a panic elsewhere while the lock
        // was held cannot leave it torn: a poisoned lock is still usable.
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Steps one route's machine under the lock and carries out the effects that belong
    /// inside it (publication, events); state files are queued for the persister. Returns
    /// whether the weights may have changed (the caller publishes once for all routes).
    fn step(&self, ctl: &mut Control, route: &str, input: Input) -> Result<bool, Refusal> {
        let now = now_ms();
        let state = match ctl.routes.get(route) {
            Some(s) => s.clone(),
            None => match ctl.file.routes.iter().find(|r| r.name == route) {
                Some(r) => {
                    let mut s = machine::fresh(&Spec::of(r), now);
                    // A route added while the fleet store is unreachable must not advance.
                    s.fleet_down = self
                        .fleet
                        .as_ref()
                        .is_some_and(|f| !f.connected.load(std::sync::atomic::Ordering::Acquire));
                    s
                }
                None => return Ok(false),
            },
        };
        let outcome = machine::step(route, &state, input, now)?;
        match outcome.next {
            Some(next) => ctl.routes.insert(route.to_string(), next),
            None => ctl.routes.remove(route),
        };
        let mut publish = false;
        for effect in outcome.effects {
            match effect {
                Effect::Publish => publish = true,
                Effect::Emit(event) => self.emit(ctl, event),
                Effect::Persist(rec) => {
                    if let Some(p) = &self.persister {
                        p.queue(Write::Save(rec));
                    }
                }
                Effect::Forget => {
                    if let Some(p) = &self.persister {
                        p.queue(Write::Remove(route.to_string()));
                    }
                }
                Effect::Share(rec) => {
                    if let Some(f) = &self.fleet {
                        f.share(rec, ctl.reply.take());
                    }
                }
            }
        }
        Ok(publish)
    }

    /// Waits until the state files of every change so far are on disk. Called outside
    /// the lock.
    fn flush_state(&self) {
        if let Some(p) = &self.persister {
            p.flush();
        }
    }

    fn emit(&self, ctl: &mut Control, event: Event) {
        let line = serde_json::to_string(&event).unwrap_or_default();
        log::info!(target: "kanaria::event", "{line}");
        self.metrics
            .events
            .with_label_values(&[&event.route, &event.kind])
            .inc();
        if event.kind == "rollback" {
            self.metrics.rollback(&event.route, &event.reason);
            // Canary attempts still waiting for an answer go to stable now.
            if let Some(m) = self.metrics.known_route(&event.route) {
                m.canary_rollbacks.rolled_back();
            }
        }
        if let Some(n) = &self.notifier {
            n.send(line);
        }
        if ctl.events.len() >= EVENTS_KEPT {
            ctl.events.pop_front();
        }
        ctl.events.push_back(event);
    }

    /// Brings the routes' rollout states in line with the file config: routes that left
    /// are forgotten (with their state files), new ones restore what was saved for them,
    /// and every other one gets the reloaded config.
    fn sync_routes(&self, ctl: &mut Control) {
        let file = ctl.file.clone();
        let gone: Vec<String> = ctl
            .routes
            .keys()
            .filter(|name| !file.routes.iter().any(|r| &r.name == *name))
            .cloned()
            .collect();
        for name in gone {
            let _ = self.step(ctl, &name, Input::Removed);
        }
        for route in &file.routes {
            let input = if ctl.routes.contains_key(&route.name) {
                Input::Config(Spec::of(route))
            } else {
                Input::Restore(self.saved(route))
            };
            let _ = self.step(ctl, &route.name, input);
        }
    }

    /// What the state store holds for a route that appears. Read under the lock: it runs
    /// at start and on reload only, never on the request path.
    fn saved(&self, route: &Route) -> Result<Option<crate::rollout::phase::Record>, String> {
        let Some(p) = &self.persister else {
            return Ok(None);
        };
        p.store().load(&route.name).map_err(|e| {
            log::error!(
                "route {}: {e}; no canary traffic until the canary version changes or an operator resumes",
                route.name
            );
            e.to_string()
        })
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
                    let (buckets, source) = rc.weight();
                    route.split.canary_buckets = if route.canary.is_some() { buckets } else { 0 };
                    route.weight_source = source;
                }
                Arc::new(route)
            })
            .collect();
        let route_metrics = snap
            .routes
            .iter()
            .map(|r| self.metrics.route(&r.name, r.analysis.window))
            .collect();
        let states = snap
            .routes
            .iter()
            .map(|r| rollout_state(r, ctl.routes.get(&r.name).map(|c| &c.phase)))
            .collect();
        self.metrics.generation.set(snap.generation as i64);
        self.live.store(Arc::new(Live {
            snapshot: Arc::new(snap),
            route_metrics,
            states,
        }));
    }

    /// The Prometheus exposition: the metrics' own series and the gauges of the live
    /// config, read from it now (each would otherwise be a series of the `prometheus` crate,
    /// ~450 bytes apiece: ~11 per route): `kanaria_canary_weight_percent`,
    /// `kanaria_rollout_state` (as of the last publish, which every change of phase makes),
    /// `kanaria_pool_info` and `kanaria_endpoint_healthy` (the load balancers' health now).
    /// Routes, pools and endpoints that went away have no series.
    pub fn render_metrics(&self) -> String {
        let live = self.load();
        let mut routes: Vec<(&Route, &'static str)> = live
            .snapshot
            .routes
            .iter()
            .map(|r| &**r)
            .zip(live.states.iter().copied())
            .collect();
        routes.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let pools = |r: &'_ Route| {
            [
                ("stable", Some(r.stable.clone())),
                ("canary", r.canary.clone()),
            ]
            .into_iter()
            .filter_map(|(role, p)| p.map(|p| (role, p)))
            .collect::<Vec<_>>()
        };
        let weight = |out: &mut String| {
            let name = "kanaria_canary_weight_percent";
            if routes.is_empty() {
                return;
            }
            family_head(out, name, "Effective canary weight in percent.", "gauge");
            for (r, _) in &routes {
                sample(
                    out,
                    name,
                    &[("route", r.name.as_str())],
                    buckets_to_percent(r.split.canary_buckets),
                );
            }
        };
        let state = |out: &mut String| {
            let name = "kanaria_rollout_state";
            if routes.is_empty() {
                return;
            }
            family_head(
                out,
                name,
                "1 for the route's current rollout state.",
                "gauge",
            );
            let mut names = STATES;
            names.sort();
            for (r, current) in &routes {
                for st in names {
                    sample(
                        out,
                        name,
                        &[("route", r.name.as_str()), ("state", st)],
                        f64::from(u8::from(st == *current)),
                    );
                }
            }
        };
        let info = |out: &mut String| {
            let name = "kanaria_pool_info";
            // Sorted by label values, labels by name: release, route, version.
            let mut rows: Vec<(String, &str, &str)> = routes
                .iter()
                .flat_map(|(r, _)| {
                    pools(r)
                        .into_iter()
                        .map(move |(role, p)| (p.version.clone(), r.name.as_str(), role))
                })
                .collect();
            if rows.is_empty() {
                return;
            }
            rows.sort();
            family_head(
                out,
                name,
                "The release label each version of a route runs.",
                "gauge",
            );
            for (release, route, role) in &rows {
                sample(
                    out,
                    name,
                    &[
                        ("release", release.as_str()),
                        ("route", route),
                        ("version", role),
                    ],
                    1.0,
                );
            }
        };
        let healthy = |out: &mut String| {
            let name = "kanaria_endpoint_healthy";
            // Labels by name: endpoint, route, version.
            let mut rows: Vec<(String, &str, &str, bool)> = routes
                .iter()
                .flat_map(|(r, _)| {
                    pools(r).into_iter().flat_map(move |(role, p)| {
                        p.health()
                            .into_iter()
                            .map(move |(addr, up)| (addr.to_string(), r.name.as_str(), role, up))
                    })
                })
                .collect();
            if rows.is_empty() {
                return;
            }
            rows.sort();
            family_head(out, name, "1 when the endpoint is in rotation.", "gauge");
            for (endpoint, route, role, up) in &rows {
                sample(
                    out,
                    name,
                    &[
                        ("endpoint", endpoint.as_str()),
                        ("route", route),
                        ("version", role),
                    ],
                    f64::from(u8::from(*up)),
                );
            }
        };
        self.metrics.render_with(&[
            ("kanaria_canary_weight_percent", &weight),
            ("kanaria_endpoint_healthy", &healthy),
            ("kanaria_pool_info", &info),
            ("kanaria_rollout_state", &state),
        ])
    }

    /// Re-reads the config file. On success the new config is live before this returns;
    /// on error the old one keeps serving and every error is logged and kept for status.
    pub fn reload_from_file(&self, trigger: &'static str) -> Result<u64, ConfigErrors> {
        // Parsed and built before the lock is taken: nothing waits on the file.
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
                let generation = ctl.generation;
                drop(ctl);
                log::info!(
                    "config reloaded ({trigger}) from {}: generation {generation}",
                    self.config_path.display(),
                );
                Ok(generation)
            }
            Err(errors) => {
                drop(ctl);
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

    /// An operator's action (a weight in percent). Returns the new generation once the
    /// change is live and its state file is on disk.
    pub fn act(&self, route: &str, action: OperatorAction) -> Result<u64, ControlError> {
        let action = match action {
            OperatorAction::Weight(percent) => {
                Action::Weight(weight_to_buckets(percent).map_err(ControlError::BadWeight)?)
            }
            OperatorAction::Rollback => Action::Rollback,
            OperatorAction::Promote => Action::Promote,
            OperatorAction::Pause => Action::Pause,
            OperatorAction::Resume => Action::Resume,
        };
        // In a fleet, the action returns once the store has it (or refused it).
        let (reply, answer) = match &self.fleet {
            Some(_) => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let generation = {
            let mut ctl = self.lock();
            if !ctl.file.routes.iter().any(|r| r.name == route) {
                return Err(ControlError::NoSuchRoute(route.to_string()));
            }
            ctl.reply = reply;
            let stepped = self.step(&mut ctl, route, Input::Operator(action));
            // Nothing shared (a refusal, no change): nobody will answer.
            let shared = ctl.reply.take().is_none();
            if stepped? {
                self.publish(&mut ctl);
            }
            if !shared {
                return Ok(ctl.generation);
            }
            ctl.generation
        };
        self.flush_state();
        if let Some(answer) = answer {
            match answer.recv_timeout(std::time::Duration::from_secs(5)) {
                Ok(Answer::Written(_)) => {}
                // The fleet's record changed meanwhile and was adopted instead: this action
                // did not happen (a rollback is never refused unless the fleet already is
                // rolled back).
                Ok(Answer::Refused(msg)) if action != Action::Rollback => {
                    return Err(ControlError::Refused(Refusal::Conflict(msg)))
                }
                Ok(Answer::Refused(msg)) => log::info!("fleet: {msg}"),
                // Applied here, written when the store is back (the store going down is
                // noticed by this write: from now on only rollbacks apply).
                Ok(Answer::Unreachable(msg)) => log::warn!("fleet: {msg}"),
                Err(_) => log::warn!("fleet: no answer from the store within 5s"),
            }
        }
        Ok(self.snapshot().generation.max(generation))
    }

    /// The fleet's record for a route: applied when it is newer than what this replica
    /// applied (the machine decides).
    pub fn adopt(&self, record: FleetRecord) {
        let own = self
            .fleet
            .as_ref()
            .is_some_and(|f| f.writer_id == record.writer);
        let route = record.route.clone();
        let mut ctl = self.lock();
        if !ctl.routes.contains_key(&route) {
            return;
        }
        if matches!(
            self.step(&mut ctl, &route, Input::Adopt { record, own }),
            Ok(true)
        ) {
            self.publish(&mut ctl);
        }
        if let (Some(rc), Some(f)) = (ctl.routes.get(&route), &self.fleet) {
            self.metrics
                .fleet_generation
                .with_label_values(&[&f.settings.cluster, &route])
                .set(rc.fleet_generation as i64);
        }
    }

    /// The fleet store became reachable or unreachable.
    pub fn fleet_link(&self, up: bool) {
        let settle_ms = self.fleet.as_ref().map_or(0, |f| f.settle_ms());
        let mut ctl = self.lock();
        let names: Vec<String> = ctl.routes.keys().cloned().collect();
        for name in names {
            let _ = self.step(&mut ctl, &name, Input::FleetLink { up, settle_ms });
        }
    }

    /// Every route with a canary: (route, canary version, the record to seed the store
    /// with when it has none).
    pub fn fleet_routes(&self) -> Vec<(String, String, Option<FleetRecord>)> {
        let now = now_ms();
        self.lock()
            .routes
            .iter()
            .filter_map(|(name, rc)| {
                let version = rc.canary_version.clone()?;
                let seed = machine::share_record(
                    name,
                    rc,
                    "seed",
                    "state of the first replica",
                    now,
                    ShareMode::Seed,
                );
                Some((name.clone(), version, seed))
            })
            .collect()
    }

    /// The fleet generation applied per route (for the members' view and the gauge).
    pub fn fleet_generations(&self) -> HashMap<String, u64> {
        let gens: HashMap<String, u64> = self
            .lock()
            .routes
            .iter()
            .filter(|(_, rc)| rc.canary_version.is_some())
            .map(|(n, rc)| (n.clone(), rc.fleet_generation))
            .collect();
        if let Some(f) = &self.fleet {
            for (route, g) in &gens {
                self.metrics
                    .fleet_generation
                    .with_label_values(&[&f.settings.cluster, route])
                    .set(*g as i64);
            }
        }
        gens
    }

    /// Feeds one input from the controller (a verdict, a health change, a tick) to a
    /// route's machine. A verdict for an epoch that is no longer current is dropped there.
    pub fn observe(&self, route: &str, input: Input) {
        let mut ctl = self.lock();
        if matches!(self.step(&mut ctl, route, input), Ok(true)) {
            self.publish(&mut ctl);
        }
    }

    /// The controller's rollback when the canary pool has no healthy endpoint.
    pub fn canary_unhealthy(&self, route: &str, numbers: Value) {
        self.observe(route, Input::CanaryUnhealthy { numbers });
    }

    /// An evaluation's verdict, judged on data read at `epoch`.
    pub fn record_verdict(&self, route: &str, epoch: u64, verdict: Verdict) {
        self.observe(route, Input::Verdict { epoch, verdict });
    }
}

/// An operator's action as the admin API takes it (the weight in percent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OperatorAction {
    Weight(f64),
    Rollback,
    Promote,
    Pause,
    Resume,
}

/// The rollout state of a published route.
pub fn rollout_state(r: &Route, phase: Option<&Phase>) -> &'static str {
    match (r.canary.is_some(), phase) {
        (false, _) => "no_canary",
        (true, Some(p)) => p.name(),
        (true, None) => "manual",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[[routes]]
name = "app"
[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:1"]
[routes.canary]
version = "VERSION"
endpoints = ["127.0.0.1:2"]
[routes.rollout]
steps = [{ weight = 10, hold = "1h" }, { weight = 50, hold = "1h" }]
"#;

    fn write(dir: &std::path::Path, version: &str) -> PathBuf {
        let path = dir.join("kanaria.toml");
        let text = format!(
            "[state]\ndir = \"{}\"\n{}",
            dir.join("state").display(),
            CONFIG.replace("VERSION", version)
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(dir: &std::path::Path) -> Arc<Shared> {
        let path = write(dir, "v2");
        Shared::new(config::load_file(&path).unwrap(), path).unwrap()
    }

    fn fail() -> Verdict {
        Verdict::Fail {
            reason: "error_rate".into(),
            numbers: serde_json::json!({}),
        }
    }

    fn phase(shared: &Shared) -> &'static str {
        shared.route_control("app").unwrap().phase.name()
    }

    /// The controller reads a route's data and judges it outside the lock; an operator's
    /// pause and resume land in between. The old failure must not roll back the resumed
    /// rollout (before epochs, it did).
    #[test]
    fn a_verdict_judged_before_a_resume_is_not_applied_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let shared = start(dir.path());
        let read_at = shared.route_control("app").unwrap().epoch;
        shared.act("app", OperatorAction::Pause).unwrap();
        shared.act("app", OperatorAction::Resume).unwrap();
        shared.record_verdict("app", read_at, fail());
        assert_eq!(phase(&shared), "progressing");
        assert_eq!(shared.snapshot().routes[0].split.canary_buckets, 1_000);
        // A verdict on current data still rolls back, atomically with its publication.
        let now = shared.route_control("app").unwrap().epoch;
        shared.record_verdict("app", now, fail());
        assert_eq!(phase(&shared), "rolled_back");
        assert_eq!(shared.snapshot().routes[0].split.canary_buckets, 0);
    }

    /// The same with a new canary version deployed while the old one's data is judged.
    #[test]
    fn a_new_canary_version_does_not_inherit_the_old_ones_failure() {
        let dir = tempfile::tempdir().unwrap();
        let shared = start(dir.path());
        let read_at = shared.route_control("app").unwrap().epoch;
        write(dir.path(), "v3");
        shared.reload_from_file("test").unwrap();
        shared.record_verdict("app", read_at, fail());
        let state = shared.route_control("app").unwrap();
        assert_eq!(state.canary_version.as_deref(), Some("v3"));
        assert_eq!(state.phase.name(), "progressing");
    }

    /// A route removed from the config forgets its state file: re-added, it starts afresh.
    #[test]
    fn a_removed_route_forgets_its_state() {
        let dir = tempfile::tempdir().unwrap();
        let shared = start(dir.path());
        shared.act("app", OperatorAction::Rollback).unwrap();
        let file = dir.path().join("state/app.json");
        assert!(file.exists());
        let path = dir.path().join("kanaria.toml");
        let other = std::fs::read_to_string(&path)
            .unwrap()
            .replace("name = \"app\"", "name = \"other\"");
        std::fs::write(&path, other).unwrap();
        shared.reload_from_file("test").unwrap();
        shared.flush_state();
        assert!(
            !file.exists(),
            "the removed route's state file is still there"
        );
        write(dir.path(), "v2");
        shared.reload_from_file("test").unwrap();
        assert_eq!(phase(&shared), "progressing");
    }
}
