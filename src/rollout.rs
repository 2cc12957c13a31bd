//! Rollout state per route: the phase machine, its persistence, and rollout events.
//!
//! A route with a canary is in one [`Phase`]: `manual` (the file's weight), an operator's
//! `weight`, `progressing` through `[routes.rollout]` steps, `paused`, `promoted` (every
//! user on the canary) or `rolled_back` (every user on stable). The phase decides the
//! effective canary weight; `state::Shared` publishes it. Each route's phase is saved,
//! keyed by the canary's version label, to `<state.dir>/<route>.json`, atomically
//! (temp file, fsync, rename, fsync of the directory), so a restart or a crash resumes
//! where it was: a rolled-back version stays rolled back, a rollout resumes at its step.
//! An unreadable state file puts the route on the safe side (rolled back) until the
//! version changes or an operator resumes it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{Route, WeightSource};
use crate::split::BUCKETS;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where a route's rollout is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Phase {
    /// The file's `canary_weight` applies.
    Manual,
    /// An operator set the weight (admin API); holds until the file changes the route.
    Weight { buckets: u32 },
    /// At `step` of `[routes.rollout]` since `since_ms`.
    Progressing { step: usize, since_ms: u64 },
    /// Held at `step`: no progression (a failing analysis still rolls back).
    Paused { step: usize },
    /// Every user on the canary.
    Promoted,
    /// Every user on stable.
    RolledBack { reason: String },
}

impl Phase {
    /// The first phase of a route (a new canary version starts here).
    pub fn initial(route: &Route) -> Phase {
        if route.steps.is_empty() {
            Phase::Manual
        } else {
            Phase::Progressing {
                step: 0,
                since_ms: now_ms(),
            }
        }
    }

    /// The name shown in status and `kanaria_rollout_state`.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Manual | Phase::Weight { .. } => "manual",
            Phase::Progressing { .. } => "progressing",
            Phase::Paused { .. } => "paused",
            Phase::Promoted => "promoted",
            Phase::RolledBack { .. } => "rolled_back",
        }
    }

    /// The effective canary weight (buckets) of `route` in this phase, and who set it.
    pub fn weight(&self, route: &Route) -> (u32, WeightSource) {
        let step = |i: usize| {
            route
                .steps
                .get(i.min(route.steps.len().saturating_sub(1)))
                .map_or(0, |s| s.buckets)
        };
        match self {
            Phase::Manual => (route.file_buckets, WeightSource::File),
            Phase::Weight { buckets } => (*buckets, WeightSource::Admin),
            Phase::Progressing { step: i, .. } | Phase::Paused { step: i } => {
                (step(*i), WeightSource::Rollout)
            }
            Phase::Promoted => (BUCKETS, WeightSource::Promote),
            Phase::RolledBack { .. } => (0, WeightSource::Rollback),
        }
    }

    /// The step index, for progressing and paused rollouts.
    pub fn step(&self) -> Option<usize> {
        match self {
            Phase::Progressing { step, .. } | Phase::Paused { step } => Some(*step),
            _ => None,
        }
    }
}

/// States of `kanaria_rollout_state`, plus `no_canary` for routes without one.
pub const STATES: [&str; 6] = [
    "manual",
    "progressing",
    "paused",
    "promoted",
    "rolled_back",
    "no_canary",
];

/// What is saved per route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub route: String,
    /// The canary version this phase belongs to: another version starts afresh.
    pub canary_version: String,
    pub phase: Phase,
    pub updated_ms: u64,
}

/// One transition, with the reason and the numbers behind it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub at_ms: u64,
    pub route: String,
    /// `rollback`, `step`, `promoted`, `paused`, `resumed`, `weight`, `reset`, `restored`,
    /// `state_error`.
    pub kind: &'static str,
    pub from: String,
    pub to: String,
    pub weight_percent: f64,
    pub reason: String,
    pub numbers: Value,
}

/// Errors of the state store, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a Kanaria state file: {msg}")]
    Corrupt { path: String, msg: String },
}

/// The directory of state files.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, route: &str) -> PathBuf {
        self.dir.join(format!("{route}.json"))
    }

    /// The saved record of a route: `Ok(None)` when there is none.
    pub fn load(&self, route: &str) -> Result<Option<Record>, StoreError> {
        let path = self.path(route);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let rec: Record = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        if rec.route != route {
            return Err(StoreError::Corrupt {
                path: path.display().to_string(),
                msg: format!("it is for route {:?}", rec.route),
            });
        }
        Ok(Some(rec))
    }

    /// Saves atomically: a crash leaves the old file or the new one, never a torn one.
    pub fn save(&self, rec: &Record) -> Result<(), StoreError> {
        let path = self.path(&rec.route);
        let tmp = self.dir.join(format!(".{}.json.tmp", rec.route));
        let io = |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        let body = serde_json::to_vec_pretty(rec).map_err(|e| io(std::io::Error::other(e)))?;
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io)?;
        // The rename is durable only once the directory is.
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).unwrap();
        assert!(store.load("app").unwrap().is_none());
        let rec = Record {
            route: "app".into(),
            canary_version: "v2".into(),
            phase: Phase::Progressing {
                step: 2,
                since_ms: 42,
            },
            updated_ms: 43,
        };
        store.save(&rec).unwrap();
        assert_eq!(store.load("app").unwrap(), Some(rec));
        std::fs::write(store.path("app"), "{ not json").unwrap();
        let err = store.load("app").unwrap_err().to_string();
        assert!(err.contains("app.json: not a Kanaria state file"), "{err}");
    }
}
