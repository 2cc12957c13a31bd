//! Where a route's rollout is: the [`Phase`], the weight each phase means, and the
//! [`Record`] saved per route and canary version.
//!
//! A route with a canary is in one phase: `manual` (the file's weight), an operator's
//! `weight`, `progressing` through `[routes.rollout]` steps, `paused`, `promoted` (every
//! user on the canary) or `rolled_back` (every user on stable). The transitions between
//! them are decided by [`crate::rollout::machine`].

use serde::{Deserialize, Serialize};

use crate::config::WeightSource;
use crate::rollout::spec::Spec;
use crate::split::BUCKETS;

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

    /// The effective canary weight (buckets, `0..=BUCKETS`) of a route in this phase, and
    /// who set it. A route without a canary sends nobody there, whatever the phase.
    pub fn weight(&self, spec: &Spec) -> (u32, WeightSource) {
        let step = |i: usize| {
            spec.steps
                .get(i.min(spec.steps.len().saturating_sub(1)))
                .map_or(0, |s| s.buckets)
        };
        let (buckets, source) = match self {
            Phase::Manual => (spec.file_buckets, WeightSource::File),
            Phase::Weight { buckets } => (*buckets, WeightSource::Admin),
            Phase::Progressing { step: i, .. } | Phase::Paused { step: i } => {
                (step(*i), WeightSource::Rollout)
            }
            Phase::Promoted => (BUCKETS, WeightSource::Promote),
            Phase::RolledBack { .. } => (0, WeightSource::Rollback),
        };
        let buckets = if spec.canary_version.is_some() {
            buckets.min(BUCKETS)
        } else {
            0
        };
        (buckets, source)
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
    /// A rollback decided here that the fleet has not accepted yet (`[fleet]`): after a
    /// restart it is shared first, and no older view of the fleet undoes it. Absent
    /// (`false`) in files written before it existed and whenever nothing waits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unshared: bool,
    /// Operator resumes after a rollback of this canary version, as far as the replica
    /// knew (see `RouteRollout::resumes`): kept so that after a restart a fleet record
    /// counting no newer resume still cannot undo a rollback. Absent (0) in older files.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resumes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
