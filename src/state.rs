//! The process's shared state: the published config snapshot and everything that changes it.
//!
//! Two inputs shape what requests see: the config file (loaded at start and on reload) and
//! operators' runtime decisions (a weight set through the admin API, a rollback, a
//! promote). [`Shared::publish`] merges them into one new [`Snapshot`] and makes it live
//! with a single `ArcSwap::store`; requests load it once and never see half a change.
//! Publishing is serialized by one mutex that the request path never touches. An operator's
//! weight holds until the file changes that route again (its weight or its versions).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::{self, ConfigErrors, Route, Snapshot, WeightSource};
use crate::metrics::{Metrics, RouteMetrics};
use crate::split::{buckets_to_percent, weight_to_buckets};

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

/// An operator's weight for one route.
#[derive(Debug, Clone)]
struct WeightOverride {
    buckets: u32,
    source: WeightSource,
    /// What the file said about the route when the override was set.
    file_fingerprint: (u32, String, Option<String>),
}

/// What publication needs under its lock.
struct Control {
    /// The last config compiled from the file, before operator overrides.
    file: Arc<Snapshot>,
    overrides: HashMap<String, WeightOverride>,
    generation: u64,
}

/// Errors of runtime weight changes, each mapped to an HTTP status by the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no route named {0:?}")]
    NoSuchRoute(String),
    #[error("{0}")]
    BadWeight(String),
    #[error("route {0:?} has no canary pool: add [routes.canary] to the config first")]
    NoCanary(String),
}

/// Shared by the proxy, the admin API and the reloader.
pub struct Shared {
    live: ArcSwap<Live>,
    pub metrics: Metrics,
    pub config_path: PathBuf,
    control: Mutex<Control>,
    last_reload: ArcSwap<ReloadStatus>,
}

fn fingerprint(r: &Route) -> (u32, String, Option<String>) {
    (
        r.split.canary_buckets,
        r.stable.version.clone(),
        r.canary.as_ref().map(|c| c.version.clone()),
    )
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
    keys
}

impl Shared {
    /// State for a config loaded at startup (generation 1).
    pub fn new(snapshot: Snapshot, config_path: PathBuf) -> Result<Arc<Self>, prometheus::Error> {
        let metrics = Metrics::new()?;
        let file = Arc::new(snapshot);
        let shared = Arc::new(Shared {
            live: ArcSwap::from_pointee(Live {
                snapshot: file.clone(),
                route_metrics: Vec::new(),
            }),
            metrics,
            config_path,
            control: Mutex::new(Control {
                file,
                overrides: HashMap::new(),
                generation: 0,
            }),
            last_reload: ArcSwap::from_pointee(ReloadStatus {
                at: SystemTime::now(),
                trigger: "startup",
                ok: true,
                errors: Vec::new(),
                restart_required: Vec::new(),
            }),
        });
        {
            let mut ctl = shared.lock();
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

    /// The file's own weight for a route, in buckets (status shows it beside the effective one).
    pub fn configured_buckets(&self, route: &str) -> Option<u32> {
        self.lock()
            .file
            .routes
            .iter()
            .find(|r| r.name == route)
            .map(|r| r.split.canary_buckets)
    }

    fn lock(&self) -> MutexGuard<'_, Control> {
        // A panic while publishing cannot leave Control half-written in a way that matters
        // (every field is replaced whole), so a poisoned lock is still usable.
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds the snapshot to serve from the file config and the overrides, and stores it.
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
                    {
                        route.stable = prev.stable.clone();
                    }
                    if let (Some(p), Some(n)) = (&prev.canary, &route.canary) {
                        if p.version == n.version && p.endpoints == n.endpoints {
                            route.canary = Some(p.clone());
                        }
                    }
                }
                if let Some(o) = ctl.overrides.get(&r.name) {
                    route.split.canary_buckets = o.buckets;
                    route.weight_source = o.source;
                }
                Arc::new(route)
            })
            .collect();
        let route_metrics = snap
            .routes
            .iter()
            .map(|r| self.metrics.route(&r.name))
            .collect();
        self.update_gauges(&old.snapshot, &snap);
        self.live.store(Arc::new(Live {
            snapshot: Arc::new(snap),
            route_metrics,
        }));
    }

    fn update_gauges(&self, old: &Snapshot, new: &Snapshot) {
        let m = &self.metrics;
        // Series of routes, pools and endpoints that went away must not linger.
        for r in &old.routes {
            let _ = m.canary_weight.remove_label_values(&[&r.name]);
            for st in ROLLOUT_STATES {
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
            let state = rollout_state(r);
            for st in ROLLOUT_STATES {
                m.rollout_state
                    .with_label_values(&[&r.name, st])
                    .set(i64::from(st == state));
            }
            for (role, pool) in [("stable", Some(&r.stable)), ("canary", r.canary.as_ref())] {
                if let Some(p) = pool {
                    m.pool_info
                        .with_label_values(&[&r.name, role, &p.version])
                        .set(1);
                    for e in &p.endpoints {
                        let healthy =
                            p.lb.backends()
                                .get_backend()
                                .iter()
                                .find(|b| b.addr.as_inet() == Some(e))
                                .is_some_and(|b| p.lb.backends().ready(b));
                        m.endpoint_healthy
                            .with_label_values(&[&r.name, role, &e.to_string()])
                            .set(i64::from(healthy));
                    }
                }
            }
        }
        m.generation.set(new.generation as i64);
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
                // An operator's weight holds until the file changes that route again.
                ctl.overrides.retain(|name, o| {
                    let keep = new
                        .routes
                        .iter()
                        .find(|r| &r.name == name)
                        .is_some_and(|r| fingerprint(r) == o.file_fingerprint);
                    if !keep {
                        log::info!("route {name}: the file changed it; the operator's weight no longer applies");
                    }
                    keep
                });
                ctl.file = Arc::new(new);
                self.publish(&mut ctl);
                self.metrics.reloads.with_label_values(&["success"]).inc();
                log::info!(
                    "config reloaded ({trigger}) from {}: generation {}",
                    self.config_path.display(),
                    ctl.generation
                );
                self.last_reload.store(Arc::new(ReloadStatus {
                    at: SystemTime::now(),
                    trigger,
                    ok: true,
                    errors: Vec::new(),
                    restart_required,
                }));
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

    /// Sets a route's effective canary weight (operator action). Returns the new generation.
    pub fn set_weight(
        &self,
        route: &str,
        percent: f64,
        source: WeightSource,
    ) -> Result<u64, ControlError> {
        let buckets = weight_to_buckets(percent).map_err(ControlError::BadWeight)?;
        let mut ctl = self.lock();
        let file_route = ctl
            .file
            .routes
            .iter()
            .find(|r| r.name == route)
            .ok_or_else(|| ControlError::NoSuchRoute(route.to_string()))?;
        if buckets > 0 && file_route.canary.is_none() {
            return Err(ControlError::NoCanary(route.to_string()));
        }
        let file_fingerprint = fingerprint(file_route);
        ctl.overrides.insert(
            route.to_string(),
            WeightOverride {
                buckets,
                source,
                file_fingerprint,
            },
        );
        self.publish(&mut ctl);
        if source == WeightSource::Rollback {
            self.metrics
                .rollbacks
                .with_label_values(&[route, "manual"])
                .inc();
        }
        log::info!(
            "route {route}: canary weight set to {percent}% by {}",
            source.as_str()
        );
        Ok(ctl.generation)
    }
}

/// States shown by `kanaria_rollout_state` and the status API.
pub const ROLLOUT_STATES: [&str; 4] = ["manual", "promoted", "rolled_back", "no_canary"];

/// The rollout state of a route as published.
pub fn rollout_state(r: &Route) -> &'static str {
    match (r.canary.is_some(), r.weight_source) {
        (false, _) => "no_canary",
        (true, WeightSource::Rollback) => "rolled_back",
        (true, WeightSource::Promote) => "promoted",
        _ => "manual",
    }
}
