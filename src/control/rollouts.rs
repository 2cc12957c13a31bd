//! The control plane's state: each route's rollout, and every change to what is served.
//!
//! Two inputs shape what requests see: the config file (loaded at start and on reload) and
//! each route's rollout state, moved only by the pure [`machine`].
//! Every change is applied under one mutex that the request path never touches: the
//! machine's step and its in-memory effects (a new [`Snapshot`] made live with a single
//! [`LiveHandle::store`], the event kept, logged, counted and queued for the webhook) happen
//! inside it, so no two changes interleave; the state file is written after it, on the
//! persister's thread, in the same order. Requests load the snapshot once and never see
//! half a change.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde_json::Value;

use super::fleet::{Answer, Fleet, Replica, Reply};
use super::notify::Notifier;
use super::persist::{Persister, Store, Write};
use crate::clock::Clock;
use crate::config::{Config, ConfigErrors};
use crate::metrics::Metrics;
use crate::rollout::machine::{
    self, Effect, Event, FleetRecord, Input, Refusal, RouteRollout, ShareMode, Spec,
};
use crate::rollout::phase::Phase;
use crate::runtime::build;
use crate::runtime::resolve::{self, Names, Resolve};
use crate::runtime::{Live, LiveHandle, Route, Snapshot};
use crate::split::{weight_to_buckets, Track};

pub use crate::rollout::machine::{Action, Verdict};

/// Events kept for the status API.
const EVENTS_KEPT: usize = 200;

/// How long an operator's action waits for the fleet store's answer.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
struct Ledger {
    /// The last config built from the file, before rollout phases.
    file: Arc<Snapshot>,
    routes: HashMap<String, RouteRollout>,
    generation: u64,
    events: VecDeque<Event>,
    /// Who waits for the store's answer to the next shared change (an operator).
    reply: Option<Reply>,
    /// Routes rolled back since the last publication: their waiting canary attempts are
    /// told once the snapshot without the canary is live (not before, or a request that
    /// loads the old snapshot in between would go to the canary unwatched).
    rolled_back: Vec<String>,
    /// Routes an operator promoted asking to drain (`promote` with `{"drain": true}`): the
    /// streams of the stable users the promotion moves to the canary are told once it is live.
    promote_drain: Vec<String>,
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
    /// The fleet store refused the change: the fleet's record changed meanwhile. The
    /// change is undone here (the fleet's record, `current`, is adopted instead).
    #[error("{message}")]
    FleetRefused {
        message: String,
        current: Option<Box<FleetRecord>>,
    },
    /// Applied on this replica, but the fleet store did not answer in time: it is written
    /// when the store answers (where a rollback wins; anything else may still be refused).
    #[error("applied locally, not yet shared: {0}")]
    NotShared(String),
}

/// The control plane: the only writer of the [`LiveHandle`]. Shared by the admin API, the
/// reloader, the analysis loop and the fleet service.
pub struct Control {
    /// What the data plane reads.
    pub live: Arc<LiveHandle>,
    pub config_path: PathBuf,
    ledger: Mutex<Ledger>,
    last_reload: ArcSwap<ReloadStatus>,
    persister: Option<Persister>,
    notifier: Option<Notifier>,
    /// `[fleet]`: the link to the other replicas (`None`: this process decides alone).
    pub fleet: Option<Arc<Fleet>>,
    /// Where every decision takes its time from.
    pub clock: Arc<dyn Clock>,
    /// The endpoint names of the pools and their answers (the background lookups in
    /// [`resolve`](super::resolve) keep them current).
    pub names: Arc<Names>,
}

impl Control {
    /// State for a config loaded at startup (generation 1), on the real clock and the
    /// resolver the config names (`[resolver]`, else the system's). Persisted phases are
    /// restored.
    pub fn new(config: Config, config_path: PathBuf) -> anyhow::Result<Arc<Self>> {
        let resolver =
            resolve::resolver_for(config.restart.resolver.as_ref()).map_err(anyhow::Error::msg)?;
        Self::with(
            config,
            config_path,
            Arc::new(crate::clock::SystemClock),
            resolver,
        )
    }

    /// [`Control::new`] with the clock and the resolver given (tests drive time by hand).
    pub fn with(
        config: Config,
        config_path: PathBuf,
        clock: Arc<dyn Clock>,
        resolver: Box<dyn Resolve>,
    ) -> anyhow::Result<Arc<Self>> {
        // The windows count from this clock's now: the analysis reads them at its readings.
        let metrics = Metrics::new(clock.now())?;
        let started = clock.system_time();
        let restart = &config.restart;
        let persister = match &restart.state {
            Some(st) => Some(Persister::start(Store::new(&st.dir)?)?),
            None => None,
        };
        let notifier = restart.notify.clone().map(Notifier::start);
        let fleet = match &restart.fleet {
            Some(f) => Some(Fleet::new(f.clone(), clock.clone())?),
            None => None,
        };
        let names = Arc::new(Names::new(resolver));
        let file = Arc::new(build::build(Arc::new(config), None, &names, clock.now_ms()));
        let shared = Arc::new(Control {
            live: Arc::new(LiveHandle::new(file.clone(), metrics)),
            config_path,
            clock,
            names,
            ledger: Mutex::new(Ledger {
                file: file.clone(),
                routes: HashMap::new(),
                generation: 0,
                events: VecDeque::new(),
                reply: None,
                rolled_back: Vec::new(),
                promote_drain: Vec::new(),
            }),
            last_reload: ArcSwap::from_pointee(ReloadStatus {
                at: started,
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
        shared
            .metrics()
            .reloads
            .with_label_values(&["success"])
            .inc();
        Ok(shared)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.live.metrics
    }

    /// The current snapshot (for status and tests).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.live.snapshot()
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

    /// Whether a route is cut off because nothing from the fleet has confirmed the phase
    /// this process started with yet (`RouteRollout::fleet_unconfirmed`): `/readyz` waits.
    pub fn awaits_fleet_confirmation(&self) -> bool {
        self.lock()
            .routes
            .values()
            .any(|r| r.fleet_unconfirmed && r.cut_off)
    }

    /// A route's rollout state (for status and the analysis loop).
    pub fn route_control(&self, route: &str) -> Option<RouteRollout> {
        self.lock().routes.get(route).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        // Every field of Ledger is replaced whole, so a panic elsewhere while the lock
        // was held cannot leave it torn: a poisoned lock is still usable.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Steps one route's machine under the lock and carries out the effects that belong
    /// inside it (publication, events); state files are queued for the persister. Returns
    /// whether the weights may have changed (the caller publishes once for all routes).
    fn step(&self, ctl: &mut Ledger, route: &str, input: Input) -> Result<bool, Refusal> {
        let now = self.clock.now_ms();
        let state = match ctl.routes.get(route) {
            Some(s) => s.clone(),
            None => match ctl.file.routes.iter().find(|r| r.name == route) {
                Some(r) => {
                    let s = machine::fresh(&Spec::of(r), now);
                    // A route added while the fleet store is unreachable must not advance
                    // (and counts towards fleet.partition_timeout from now).
                    match &self.fleet {
                        Some(f) => {
                            let mut s = s.in_fleet(
                                f.connected.load(std::sync::atomic::Ordering::Acquire),
                                f.settings.cut_off_after_ms(),
                                now,
                            );
                            s.fleet_confirm_ms = f.confirm_ms();
                            s
                        }
                        None => s,
                    }
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

    /// Waits until the state files of every change so far are on disk (an operator's
    /// action does before it answers; a test does before it restarts from them). Takes no
    /// lock.
    pub fn flush_state(&self) {
        if let Some(p) = &self.persister {
            p.flush();
        }
    }

    fn emit(&self, ctl: &mut Ledger, event: Event) {
        let line = serde_json::to_string(&event).unwrap_or_default();
        log::info!(target: "kanaria::event", "{line}");
        let metrics = self.metrics();
        metrics
            .events
            .with_label_values(&[&event.route, &event.kind])
            .inc();
        if event.kind == "rollback" {
            metrics.rollback(&event.route, &event.reason);
            // Canary attempts still waiting for an answer go to stable once it is published.
            ctl.rolled_back.push(event.route.clone());
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
    fn sync_routes(&self, ctl: &mut Ledger) {
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

    /// Builds the snapshot to serve from the file's and the phases, and stores it.
    fn publish(&self, ctl: &mut Ledger) {
        let mut snap = (*ctl.file).clone();
        ctl.generation += 1;
        snap.generation = ctl.generation;
        snap.routes = ctl
            .file
            .routes
            .iter()
            .map(|r| match ctl.routes.get(&r.name) {
                Some(rc) => {
                    let mut route = (**r).clone();
                    let (buckets, source) = rc.weight();
                    route.split.canary_buckets = if route.canary.is_some() { buckets } else { 0 };
                    route.weight_source = source;
                    // The dark launch: during a shadow step, that step's share; none while
                    // rolled back or cut off, or outside the shadow steps of a rollout that
                    // has some.
                    let step_share = rc
                        .shadow_step()
                        .and_then(|i| route.steps.get(i))
                        .map(|s| s.shadow)
                        .filter(|b| *b > 0);
                    let mirrors = rc.mirrors();
                    if let Some(sh) = route.shadow.as_mut() {
                        sh.share_buckets = match (mirrors, step_share) {
                            (false, _) => 0,
                            (true, Some(b)) => b,
                            (true, None) => sh.share_buckets,
                        };
                    }
                    Arc::new(route)
                }
                None => r.clone(),
            })
            .collect();
        let metrics = self.metrics();
        if let Some(f) = &self.fleet {
            for (name, rc) in &ctl.routes {
                metrics
                    .fleet_cut_off
                    .with_label_values(&[&f.settings.cluster, name])
                    .set(i64::from(rc.cut_off));
            }
        }
        let route_metrics = snap
            .routes
            .iter()
            .map(|r| metrics.route(&r.name, r.analysis.window))
            .collect();
        // Routes no longer configured: their metrics go (also their fleet gauges).
        let configured = |name: &str| snap.routes.iter().any(|r| r.name == name);
        if metrics.routes_held().1 > snap.routes.len() {
            let gone = metrics.retain_routes(configured);
            if let Some(f) = &self.fleet {
                f.forget_routes(metrics, &gone);
            }
        }
        let states = snap
            .routes
            .iter()
            .map(|r| rollout_state(r, ctl.routes.get(&r.name).map(|c| &c.phase)))
            .collect();
        // The weights before this publication, for the streams of the users it moves.
        let before = self.live.snapshot();
        let moves: Vec<(String, u32, Track)> = snap
            .routes
            .iter()
            .filter_map(|r| {
                let old = before.routes.iter().find(|o| o.name == r.name)?;
                let (was, now) = (old.split.canary_buckets, r.split.canary_buckets);
                // A rollback ends every canary stream through `canary_rollbacks`.
                if ctl.rolled_back.contains(&r.name) {
                    return None;
                }
                if now < was && r.drain_on_weight_change {
                    Some((r.name.clone(), now, Track::Canary))
                } else if now > was && ctl.promote_drain.contains(&r.name) {
                    Some((r.name.clone(), now, Track::Stable))
                } else {
                    None
                }
            })
            .collect();
        self.live.store(Live {
            snapshot: Arc::new(snap),
            route_metrics,
            states,
        });
        // After the store: a request that read the generation before this saw the canary in
        // the old snapshot and is watched; one that reads it after loads the new snapshot.
        for route in ctl.rolled_back.drain(..) {
            if let Some(m) = metrics.known_route(&route) {
                m.canary_rollbacks.rolled_back();
            }
        }
        for (route, buckets, from) in moves {
            if let Some(m) = metrics.known_route(&route) {
                m.moves.moved(buckets, from);
            }
        }
        ctl.promote_drain.clear();
    }

    /// Re-reads the config file. On success the new config is live before this returns;
    /// on error the old one keeps serving and every error is logged and kept for status.
    /// Whether the config file now says something else than the running config was built
    /// from (`false` when it does not load: a reload would only report the same errors).
    /// For the watcher's start: a change made after this process read its file and before
    /// the watcher began (an upgrade's new process waits for its listeners in between)
    /// raises no event.
    pub fn file_differs(&self) -> bool {
        let Ok(config) = build::load(&self.config_path) else {
            return false;
        };
        let ctl = self.lock();
        let running = &ctl.file.config;
        config != **running
    }

    pub fn reload_from_file(&self, trigger: &'static str) -> Result<u64, ConfigErrors> {
        // Parsed and built before the lock is taken: nothing waits on the file or a name
        // (only names new to this config are looked up; known ones keep their answers).
        let result = build::load(&self.config_path).map(|config| {
            let prev = self.live.snapshot();
            build::build(
                Arc::new(config),
                Some(&prev),
                &self.names,
                self.clock.now_ms(),
            )
        });
        let mut ctl = self.lock();
        match result {
            Ok(mut new) => {
                let restart_required = ctl.file.config.restart.changed_keys(&new.config.restart);
                for key in &restart_required {
                    log::warn!(
                        "config reload ({trigger}): {key} changed; it takes effect after a restart, the running value stays"
                    );
                }
                // The running restart-only settings stay (what was reported above).
                if !restart_required.is_empty() {
                    let mut config = (*new.config).clone();
                    config.restart = ctl.file.config.restart.clone();
                    new.config = Arc::new(config);
                }
                ctl.file = Arc::new(new);
                // Before publishing: whoever sees the new generation sees this result too.
                self.last_reload.store(Arc::new(ReloadStatus {
                    at: self.clock.system_time(),
                    trigger,
                    ok: true,
                    errors: Vec::new(),
                    restart_required,
                }));
                self.metrics().reloads.with_label_values(&["success"]).inc();
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
                self.metrics().reloads.with_label_values(&["error"]).inc();
                for e in &errors.0 {
                    log::error!(
                        "config reload ({trigger}) rejected, old config keeps serving: {e}"
                    );
                }
                self.last_reload.store(Arc::new(ReloadStatus {
                    at: self.clock.system_time(),
                    trigger,
                    ok: false,
                    errors: errors.0.iter().map(|e| e.to_string()).collect(),
                    restart_required: Vec::new(),
                }));
                Err(errors)
            }
        }
    }

    /// Serves every pool over its names' current answers: a pool whose names now resolve to
    /// other addresses is replaced by one over the new addresses (sharing its endpoints'
    /// health), and the snapshot is published once. The new pools are made outside the
    /// lock; one whose pool was replaced meanwhile (a reload) is dropped, the next call
    /// looks again. Requests in flight keep the pools they picked from. Returns how many
    /// pools changed.
    pub fn refresh_endpoints(&self) -> usize {
        let file = self.lock().file.clone();
        let mut fresh = Vec::new();
        for route in &file.routes {
            for (track, pool) in [
                (Track::Stable, Some(&route.stable)),
                (Track::Canary, route.canary.as_ref()),
            ] {
                if let Some(new) = pool.and_then(|p| build::reresolved(p)) {
                    if let Some(p) = pool {
                        fresh.push((route.name.clone(), track, p.clone(), Arc::new(new)));
                    }
                }
            }
        }
        if fresh.is_empty() {
            return 0;
        }
        let mut ctl = self.lock();
        let mut snap = (*ctl.file).clone();
        let mut changed = 0;
        for (name, track, old, new) in fresh {
            let Some(route) = snap.routes.iter_mut().find(|r| r.name == name) else {
                continue;
            };
            let slot = match track {
                Track::Stable => Some(&route.stable),
                Track::Canary => route.canary.as_ref(),
            };
            if !slot.is_some_and(|p| Arc::ptr_eq(p, &old)) {
                continue;
            }
            log::info!(
                "route {name}: {} pool {} now serves {:?} (was {:?})",
                track.as_str(),
                new.version,
                new.endpoints,
                old.endpoints
            );
            let mut r = (**route).clone();
            match track {
                Track::Stable => r.stable = new,
                Track::Canary => r.canary = Some(new),
            }
            *route = Arc::new(r);
            changed += 1;
        }
        if changed > 0 {
            ctl.file = Arc::new(snap);
            self.publish(&mut ctl);
        }
        changed
    }

    /// An operator's action (a weight in percent). Returns the new generation once the
    /// change is live and its state file is on disk, and, in a fleet, once the fleet's
    /// store has it: [`ControlError::FleetRefused`] when the store refused it (undone here),
    /// [`ControlError::NotShared`] when the store did not answer in time (applied here,
    /// written when it answers).
    pub fn act(&self, route: &str, action: OperatorAction) -> Result<u64, ControlError> {
        let operator = action;
        let action = match action {
            OperatorAction::Weight(percent) => {
                Action::Weight(weight_to_buckets(percent).map_err(ControlError::BadWeight)?)
            }
            OperatorAction::Rollback => Action::Rollback,
            OperatorAction::Promote { .. } => Action::Promote,
            OperatorAction::Pause => Action::Pause,
            OperatorAction::Resume => Action::Resume,
        };
        // In a fleet, the action returns once the store has it (or refused it). Whether
        // the store is known to answer is read before the change is queued: the writer
        // may mark the link down while writing it, and then its answer says so.
        let connected = self
            .fleet
            .as_ref()
            .is_some_and(|f| f.connected.load(std::sync::atomic::Ordering::Acquire));
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
            if let OperatorAction::Promote { drain: true } = operator {
                ctl.promote_drain.push(route.to_string());
            }
            let stepped = self.step(&mut ctl, route, Input::Operator(action));
            // Nothing shared (a refusal, no change): nobody will answer.
            let shared = ctl.reply.take().is_none();
            let stepped = stepped.inspect_err(|_| ctl.promote_drain.clear())?;
            if stepped {
                self.publish(&mut ctl);
            }
            ctl.promote_drain.clear();
            if !shared {
                return Ok(ctl.generation);
            }
            ctl.generation
        };
        self.flush_state();
        if let Some(answer) = answer {
            // Known to be down: nothing to wait for (the writer keeps the change and
            // writes it when the store answers).
            let answer = if connected {
                answer.recv_timeout(ANSWER_TIMEOUT).unwrap_or_else(|_| {
                    Answer::Unreachable(format!(
                        "the fleet store did not answer within {}s; the change is written when it does",
                        ANSWER_TIMEOUT.as_secs()
                    ))
                })
            } else {
                Answer::Unreachable(
                    "the fleet store is unreachable; the change is written when it answers"
                        .to_string(),
                )
            };
            match answer {
                Answer::Written(_) => {}
                // A rollback is refused only when the fleet is rolled back already: the
                // fleet has the change.
                Answer::Refused { current, .. }
                    if action == Action::Rollback
                        && current.as_ref().is_some_and(|c| c.rolled_back) => {}
                // The fleet's record changed meanwhile and was adopted instead: this
                // action did not happen.
                Answer::Refused { message, current } => {
                    log::info!("fleet: {message}");
                    return Err(ControlError::FleetRefused { message, current });
                }
                Answer::Unreachable(msg) => {
                    log::warn!("fleet: {msg}");
                    return Err(ControlError::NotShared(msg));
                }
            }
        }
        Ok(self.snapshot().generation.max(generation))
    }

    /// Feeds one input from the analysis loop (a verdict, a health change, a tick) to a
    /// route's machine. A verdict for an epoch that is no longer current is dropped there.
    pub fn observe(&self, route: &str, input: Input) {
        let mut ctl = self.lock();
        if matches!(self.step(&mut ctl, route, input), Ok(true)) {
            self.publish(&mut ctl);
        }
    }

    /// The analysis loop's rollback when the canary pool has no healthy endpoint.
    pub fn canary_unhealthy(&self, route: &str, numbers: Value) {
        self.observe(route, Input::CanaryUnhealthy { numbers });
    }

    /// An evaluation's verdict, judged on data read at `epoch`.
    pub fn record_verdict(&self, route: &str, epoch: u64, verdict: Verdict) {
        self.observe(route, Input::Verdict { epoch, verdict });
    }

    /// A fleet record handed to the route's machine (`own`: this process wrote it, and
    /// what it says is applied here already).
    fn adopt_record(&self, record: FleetRecord, own: bool) {
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
            self.metrics()
                .fleet_generation
                .with_label_values(&[&f.settings.cluster, &route])
                .set(rc.fleet_generation as i64);
        }
    }
}

impl Replica for Control {
    /// The fleet's record for a route: applied when it is newer than what this replica
    /// applied (the machine decides).
    fn adopt(&self, record: FleetRecord) {
        let own = self
            .fleet
            .as_ref()
            .is_some_and(|f| f.writer_id == record.writer);
        self.adopt_record(record, own);
    }

    /// The store's record that refused a change of this replica's: the fleet's, even when
    /// this process wrote it (what is applied here is the refused change, to be undone).
    fn adopt_refusal(&self, record: FleetRecord) {
        self.adopt_record(record, false);
    }

    /// The fleet store became reachable or unreachable.
    fn fleet_link(&self, up: bool) {
        let settle_ms = self.fleet.as_ref().map_or(0, |f| f.settle_ms());
        let mut ctl = self.lock();
        let names: Vec<String> = ctl.routes.keys().cloned().collect();
        let mut publish = false;
        for name in names {
            // Back in touch, a route cut off from the fleet serves its phase's weight again.
            publish |= matches!(
                self.step(&mut ctl, &name, Input::FleetLink { up, settle_ms }),
                Ok(true)
            );
        }
        if publish {
            self.publish(&mut ctl);
        }
    }

    /// The store's incarnation, every poll: a route whose machine knew another re-seeds
    /// the store (and says so).
    fn incarnation(&self, incarnation: &str) {
        let mut ctl = self.lock();
        let names: Vec<String> = ctl.routes.keys().cloned().collect();
        let mut publish = false;
        for name in names {
            let input = Input::Incarnation(incarnation.to_string());
            publish |= matches!(self.step(&mut ctl, &name, input), Ok(true));
        }
        if publish {
            self.publish(&mut ctl);
        }
    }

    /// Every route with a canary: (route, canary version, the record to seed the store
    /// with when it has none).
    fn fleet_routes(&self) -> Vec<(String, String, Option<FleetRecord>)> {
        let now = self.clock.now_ms();
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

    fn fleet_files(&self) -> HashMap<String, (String, Option<u64>)> {
        self.lock()
            .routes
            .iter()
            .filter(|(_, rc)| rc.canary_version.is_some())
            .map(|(n, rc)| (n.clone(), (rc.file_hashes().0, rc.file_skew_since_ms)))
            .collect()
    }

    /// The fleet generation applied per route (for the members' view and the gauge).
    fn fleet_generations(&self) -> HashMap<String, u64> {
        let gens: HashMap<String, u64> = self
            .lock()
            .routes
            .iter()
            .filter(|(_, rc)| rc.canary_version.is_some())
            .map(|(n, rc)| (n.clone(), rc.fleet_generation))
            .collect();
        if let Some(f) = &self.fleet {
            for (route, g) in &gens {
                self.metrics()
                    .fleet_generation
                    .with_label_values(&[&f.settings.cluster, route])
                    .set(*g as i64);
            }
        }
        gens
    }

    fn metrics(&self) -> &Metrics {
        &self.live.metrics
    }
}

/// An operator's action as the admin API takes it (the weight in percent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OperatorAction {
    Weight(f64),
    Rollback,
    /// `drain`: the promotion also ends the streams of the stable users it moves to the
    /// canary (the admin API's `{"drain": true}`).
    Promote {
        drain: bool,
    },
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

    fn start(dir: &std::path::Path) -> Arc<Control> {
        let path = write(dir, "v2");
        Control::new(build::load(&path).unwrap(), path).unwrap()
    }

    fn fail() -> Verdict {
        Verdict::Fail {
            reason: "error_rate".into(),
            numbers: serde_json::json!({}),
        }
    }

    fn phase(shared: &Control) -> &'static str {
        shared.route_control("app").unwrap().phase.name()
    }

    /// The analysis loop reads a route's data and judges it outside the lock; an operator's
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
