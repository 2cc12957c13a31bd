//! The rollout state machine of one route: a pure function from (state, event) to
//! (next state, effects).
//!
//! Everything that moves a canary goes through [`step`]: operator actions, analysis
//! verdicts, health changes, hold timers, config changes, the restore after a restart. It
//! reads no clock (the time comes with the event), takes no lock and does no I/O; it
//! returns the effects for its caller to carry out: publish the new weight, persist the
//! record, emit an event, forget the route. So the rules below are checked by property
//! tests over long random event sequences (`tests` at the end of this file), not only by
//! end-to-end tests where timing hides races:
//! - a rollback is a latch for its canary version: only an explicit resume or a new canary
//!   version leaves it;
//! - a verdict judged at an older *epoch* (the phase or the canary version changed since
//!   its data was read) is never applied: every transition starts a new epoch;
//! - the published weight is always the phase's weight, within `0..=BUCKETS`;
//! - a rollout whose steps shrink on reload continues from the last valid step and can
//!   still finish;
//! - a route removed from the config is forgotten (its state file too);
//! - in a fleet, adopted generations only increase, a rollback always wins a race against
//!   a raise or a promote, a local rollback not yet shared is never undone by an older
//!   view of the fleet (not even after a restart: it is persisted as not yet shared), and
//!   nothing but a rollback happens while the fleet is unreachable;
//! - when the store loses its data (restarted empty, failed over to a replica that never
//!   had it: its *incarnation* changed), each replica re-seeds it with its own state and
//!   the store merges them ([`ShareMode::Reseed`]): a rollback always wins, otherwise the
//!   highest generation; and a replica never adopts a record that would undo a rollback it
//!   applied unless the record says an operator resumed since (`resumes`) — it writes its
//!   rollback again instead. A new canary version is a new record, and starts afresh;
//! - with `fleet.on_partition = "stable"`, a replica cut off from the fleet store for
//!   longer than its timeout sends every user to stable until the store answers again, and
//!   keeps its phase meanwhile (a rollback decided then included), so the fleet's record
//!   applies again once it is back.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::WeightSource;
use crate::rollout::phase::{Phase, Record};
pub use crate::rollout::spec::{FileDecision, Spec, StepSpec, FILE_PAST};
use crate::split::{buckets_to_percent, BUCKETS};

/// Everything the machine remembers about one route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRollout {
    pub phase: Phase,
    /// The canary version the phase belongs to.
    pub canary_version: Option<String>,
    /// The spec the state was last brought in line with.
    spec: Spec,
    /// Bumped by every transition and every change of canary version: a verdict carries
    /// the epoch its data was read at, and is dropped when that is no longer current.
    pub epoch: u64,
    /// Analysis only counts outcomes after this instant (ms since the Unix epoch): a new
    /// phase or version must not be judged by what happened before it.
    pub judged_since_ms: u64,
    /// Consecutive failing evaluations.
    pub failures: u32,
    /// Whether an evaluation passed since the current step (or hold) began.
    pub passed_in_hold: bool,
    /// Evaluations applied since start.
    pub evaluations: u64,
    /// `none`, `pass`, `fail` or `inconclusive`.
    pub last_verdict: &'static str,
    /// The newest fleet generation of this route's record applied here (0: none yet).
    pub fleet_generation: u64,
    /// The store incarnation of the record `fleet_generation` was applied from (empty:
    /// none, or a record without one). A record of another incarnation is not ordered by
    /// generation against it: after Sentinel flapped between two primaries, a replica
    /// ignored the other primary's record at the same generation as its own and kept
    /// another weight than the fleet (`make chaos` seed 727183).
    pub generation_incarnation: String,
    /// The fleet store is unreachable: nothing advances, only rollbacks apply.
    pub fleet_down: bool,
    /// After the store came back, no step or promotion before this instant (ms since the
    /// Unix epoch): a rollback another replica decided during the outage is written when
    /// that replica reconnects, and must reach this one before it moves on.
    pub fleet_settle_until_ms: u64,
    /// A rollback decided here that the fleet has not accepted yet: no older view of the
    /// fleet may undo it.
    pub unshared_rollback: bool,
    /// This process has applied a record another replica wrote since it started, so
    /// `resumes` is the fleet's count (not persisted: a restarted process, with or without its state
    /// file, learns again how many resumes happened while it was away).
    pub fleet_heard: bool,
    /// The route belongs to a fleet (`[fleet]`): only then does a rollback wait to be shared.
    pub fleet: bool,
    /// `fleet.on_partition = "stable"`: how long the store may stay unreachable before this
    /// replica sends every user to stable, in ms (`None`: `"hold"`, the last weight stays).
    pub cut_off_after_ms: Option<u64>,
    /// Since when the store has been unreachable (ms since the Unix epoch; read while
    /// `fleet_down`).
    pub fleet_down_since_ms: u64,
    /// Cut off from the fleet past `cut_off_after_ms`: every user goes to stable whatever
    /// the phase. The phase is kept (and may still roll back), so once the store answers
    /// the weight is the phase's again, or the fleet's newer record.
    pub cut_off: bool,
    /// Since this process started, nothing from the fleet has confirmed the phase it
    /// serves: set when it restores a phase that sends users to the canary, cleared once it
    /// applies a record another replica wrote, or once the store has answered for
    /// `fleet_confirm_ms` (replicas that knew a store that lost its data re-seed it at
    /// their next poll, a rollback included). Until then it is cut off, whatever `fleet.on_partition`
    /// says: after the store answers (its own seed of an empty store confirms nothing:
    /// `make chaos` seed 773287), and already while it does not answer when it started
    /// without a saved state of the version (`fleet_blind`; with a state file it serves
    /// that, as `"hold"` does).
    pub fleet_unconfirmed: bool,
    /// Started without a saved state of its canary version: it cannot know whether the
    /// fleet rolled that version back (the rollback may live only in the other replicas
    /// and the store). Cleared with `fleet_unconfirmed`.
    pub fleet_blind: bool,
    /// How long the store must have answered before a restarted process's own phase is
    /// confirmed without another replica's record (a poll interval and a margin).
    pub fleet_confirm_ms: u64,
    /// Since when the store has answered (ms since the Unix epoch; read while not
    /// `fleet_down`).
    pub fleet_up_since_ms: u64,
    /// How many times an operator resumed this canary version after a rollback, as far as
    /// this replica knows (its own resumes and the fleet's records): a record that is not a
    /// rollback undoes this replica's rollback only with a higher count.
    pub resumes: u64,
    /// The fleet store's incarnation `fleet_generation` belongs to (empty: none known yet).
    /// Generations of another incarnation are not comparable: its records wait for the
    /// poll to say which incarnation the store has now ([`Input::Incarnation`]).
    pub fleet_incarnation: String,
    /// The spec of this replica's own config file (`spec` is what runs: in a fleet, the
    /// file's weight and steps may be the fleet's decision instead, [`FileDecision`]).
    pub file_spec: Spec,
    /// In a fleet: the file decision the fleet runs (`None`: this file's own, nothing
    /// shared yet).
    pub fleet_file: Option<FileDecision>,
    /// Since when this replica's file decides otherwise than the fleet (ms since the Unix
    /// epoch; `None`: it agrees): a copy of the file that has not arrived yet, or one left
    /// behind.
    pub file_skew_since_ms: Option<u64>,
}

impl RouteRollout {
    /// The hash of what this replica's file decides, and of what the fleet runs.
    pub fn file_hashes(&self) -> (String, Option<String>) {
        let own = self.file_spec.decision().hash;
        (own, self.fleet_file.as_ref().map(|d| d.hash.clone()))
    }

    /// The effective canary weight (buckets) and who set it.
    pub fn weight(&self) -> (u32, WeightSource) {
        if self.cut_off {
            return (0, WeightSource::CutOff);
        }
        self.phase.weight(&self.spec)
    }

    /// Whether the phase is a shadow step of the rollout (no user on the canary; requests
    /// mirrored to it): its index.
    pub fn shadow_step(&self) -> Option<usize> {
        match self.phase {
            Phase::Progressing { step, .. } | Phase::Paused { step }
                if self.spec.steps.get(step).is_some_and(|s| s.buckets == 0) =>
            {
                Some(step)
            }
            _ => None,
        }
    }

    /// Whether the route mirrors to its shadow now: not rolled back, not cut off from the
    /// fleet (a canary never takes traffic unsupervised), and, for a rollout with shadow
    /// steps, only during them.
    pub fn mirrors(&self) -> bool {
        !self.cut_off
            && !matches!(self.phase, Phase::RolledBack { .. })
            && (self.shadow_step().is_some() || !self.spec.steps.iter().any(|s| s.buckets == 0))
    }

    /// The weight of the phase alone (buckets): what the fleet's record says, and what
    /// this replica serves again once it is no longer cut off.
    pub fn phase_weight(&self) -> u32 {
        self.phase.weight(&self.spec).0
    }

    /// A route's state in a fleet, as it appears: whether the store answers now (`false`:
    /// unreachable since `now_ms`) and `fleet.on_partition`'s timeout (`None`: `"hold"`).
    pub fn in_fleet(mut self, connected: bool, cut_off_after_ms: Option<u64>, now_ms: u64) -> Self {
        self.fleet = true;
        self.fleet_down = !connected;
        self.fleet_down_since_ms = now_ms;
        self.fleet_up_since_ms = now_ms;
        self.cut_off_after_ms = cut_off_after_ms;
        self
    }
}

/// An operator's action on a route.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Canary buckets, `0..=BUCKETS` (the caller has validated the percent).
    Weight(u32),
    Rollback,
    Promote,
    Pause,
    Resume,
}

/// The analysis' verdict over one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    Inconclusive,
    Fail { reason: String, numbers: Value },
}

/// What happens to a route.
// An input lives for one step, one at a time: a boxed record would only cost an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The route appears (at start or in a reloaded config): restore what the state store
    /// holds for it. `Err` is an unreadable state file (the message names it).
    Restore(Result<Option<Record>, String>),
    /// The route's config was reloaded (possibly unchanged).
    Config(Spec),
    Operator(Action),
    /// An evaluation, judged on data read at `epoch`.
    Verdict {
        epoch: u64,
        verdict: Verdict,
    },
    /// The canary pool has no healthy endpoint left.
    CanaryUnhealthy {
        numbers: Value,
    },
    /// Time passed: a step's hold may have elapsed, or the fleet store been unreachable
    /// for longer than `fleet.partition_timeout`.
    Tick,
    /// The route is gone from the config.
    Removed,
    /// The fleet's record for this route (from the store: a poll, a message, the answer to
    /// a write). `own`: this process wrote it, so it is already applied here.
    Adopt {
        record: FleetRecord,
        own: bool,
    },
    /// The fleet store became reachable (`up`) or unreachable. When it comes back, steps
    /// wait `settle_ms` (see [`RouteRollout::fleet_settle_until_ms`]). Like a tick, it
    /// also decides whether the replica is cut off ([`RouteRollout::cut_off`]).
    FleetLink {
        up: bool,
        settle_ms: u64,
    },
    /// The fleet store's incarnation as a poll read it (with the records). A change from
    /// the one known here means the store restarted empty or failed over to a replica
    /// that never had this fleet's data: this replica's state re-seeds it.
    Incarnation(String),
}

/// How a shared record is written to the fleet store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareMode {
    /// Compare-and-set on `generation` (a rollback is written whatever the generation).
    Cas,
    /// Only if the store holds no record yet (a restored or reset state: the fleet's
    /// record, when there is one, wins and is adopted instead).
    Seed,
    /// After the store lost its data: this replica's state, merged with what another
    /// replica re-seeded first. A rollback wins over a record that is not one (unless that
    /// record counts more operator resumes); otherwise the higher generation wins, never
    /// undoing a rollback. See [`decide`].
    Reseed,
}

/// A route's rollout as the fleet shares it: one record per route and canary version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetRecord {
    pub route: String,
    pub canary_version: String,
    pub phase: Phase,
    /// Set by the store on every accepted write; a replica applies only a newer one. In a
    /// record to be written: the generation it was decided on (the compare-and-set's).
    pub generation: u64,
    /// The latch, spelled out for readers of the store (`phase` says it too).
    pub rolled_back: bool,
    pub weight_percent: f64,
    pub step: Option<usize>,
    pub paused: bool,
    /// The event's kind and reason.
    pub kind: String,
    pub reason: String,
    /// The instance that decided it (filled in by the control module).
    pub by: String,
    /// The writing process (instance, pid and start): tells a replica its own records.
    pub writer: String,
    pub at_ms: u64,
    pub mode: ShareMode,
    /// The incarnation of the store that holds the record, stamped by the write script
    /// (empty in a record to be written, and in records written before incarnations
    /// existed: comparable with any).
    #[serde(default)]
    pub incarnation: String,
    /// Operator resumes after a rollback of this canary version in the record's history
    /// (see [`RouteRollout::resumes`]; 0 in records written before it existed).
    #[serde(default)]
    pub resumes: u64,
    /// A rollback decided by a process that had not heard from the fleet since it started
    /// (restarted, with or without its state file) and never shared: its `resumes` is only
    /// a lower bound, and no operator can have resumed it. So it orders as late as any
    /// history it meets that did not see it ([`decide`]); a replica that adopts it writes
    /// its own higher count back ([`RouteRollout::resumes`]). `make chaos` seed 691889.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unheard: bool,
    /// In a fleet: the file decision the fleet runs (weight and steps; absent in records
    /// written before it existed, which leave each replica its own file's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileDecision>,
}

/// One transition, with the reason and the numbers behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub route: String,
    /// `rollback`, `step`, `promoted`, `paused`, `resumed`, `weight`, `reset`, `restored`,
    /// `state_error`.
    pub kind: String,
    pub from: String,
    pub to: String,
    pub weight_percent: f64,
    pub reason: String,
    pub numbers: Value,
}

/// What the caller must do after a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// The effective weight may have changed: publish a new snapshot.
    Publish,
    /// Save this record (after the lock is released).
    Persist(Record),
    /// Log, count, keep and send this event.
    Emit(Event),
    /// Remove the route's saved state.
    Forget,
    /// Write this record to the fleet store (ignored without `[fleet]`).
    Share(FleetRecord),
}

/// Why an operator's action was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("route {0:?} has no canary pool: add [routes.canary] to the config first")]
    NoCanary(String),
    #[error("{0}")]
    Conflict(String),
}

/// The result of one step: the next state (`None` once the route is forgotten) and the
/// effects, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub next: Option<RouteRollout>,
    pub effects: Vec<Effect>,
}

/// The record the fleet is offered for a route's current state (`None` without a canary).
pub fn share_record(
    route: &str,
    s: &RouteRollout,
    kind: &str,
    reason: &str,
    now_ms: u64,
    mode: ShareMode,
) -> Option<FleetRecord> {
    let version = s.canary_version.as_ref()?;
    Some(FleetRecord {
        route: route.to_string(),
        canary_version: version.clone(),
        phase: s.phase.clone(),
        generation: s.fleet_generation,
        rolled_back: matches!(s.phase, Phase::RolledBack { .. }),
        // The phase's: being cut off is this replica's state, not the fleet's.
        weight_percent: buckets_to_percent(s.phase_weight()),
        step: s.phase.step(),
        paused: matches!(s.phase, Phase::Paused { .. }),
        kind: kind.to_string(),
        reason: reason.to_string(),
        by: String::new(),
        writer: String::new(),
        at_ms: now_ms,
        mode,
        // The store incarnation the decision was made against: a compare-and-set on a
        // store that since lost its data compares generations of another history.
        incarnation: s.fleet_incarnation.clone(),
        resumes: s.resumes,
        unheard: rolled_back_unheard(s),
        file: s.fleet.then(|| {
            s.fleet_file
                .clone()
                .unwrap_or_else(|| s.file_spec.decision())
        }),
    })
}

/// A rollback decided here, not shared yet, by a process that has not heard from the
/// fleet since it started (see [`FleetRecord::unheard`]).
fn rolled_back_unheard(s: &RouteRollout) -> bool {
    s.unshared_rollback && !s.fleet_heard && matches!(s.phase, Phase::RolledBack { .. })
}

/// The first phase of a canary version (manual without steps or without a canary).
pub fn initial_phase(spec: &Spec, now_ms: u64) -> Phase {
    if spec.steps.is_empty() || spec.canary_version.is_none() {
        Phase::Manual
    } else {
        Phase::Progressing {
            step: 0,
            since_ms: now_ms,
        }
    }
}

/// The state of a route that has just appeared, before its [`Input::Restore`].
pub fn fresh(spec: &Spec, now_ms: u64) -> RouteRollout {
    RouteRollout {
        phase: Phase::Manual,
        canary_version: spec.canary_version.clone(),
        spec: spec.clone(),
        epoch: 0,
        judged_since_ms: now_ms,
        failures: 0,
        passed_in_hold: false,
        evaluations: 0,
        last_verdict: "none",
        fleet_generation: 0,
        generation_incarnation: String::new(),
        fleet_down: false,
        fleet_settle_until_ms: 0,
        unshared_rollback: false,
        fleet_heard: false,
        fleet: false,
        cut_off_after_ms: None,
        fleet_down_since_ms: 0,
        cut_off: false,
        fleet_unconfirmed: false,
        fleet_blind: false,
        fleet_confirm_ms: 0,
        fleet_up_since_ms: 0,
        resumes: 0,
        fleet_incarnation: String::new(),
        file_spec: spec.clone(),
        fleet_file: None,
        file_skew_since_ms: None,
    }
}

/// Applies one input to a route's state at time `now_ms`.
pub fn step(
    route: &str,
    state: &RouteRollout,
    input: Input,
    now_ms: u64,
) -> Result<Outcome, Refusal> {
    let mut t = Step {
        route,
        now_ms,
        next: state.clone(),
        effects: Vec::new(),
    };
    match input {
        Input::Restore(saved) => t.restore(saved),
        Input::Config(spec) => t.config(spec),
        Input::Operator(action) => t.operator(action)?,
        Input::Verdict { epoch, verdict } => t.verdict(epoch, verdict),
        Input::CanaryUnhealthy { numbers } => t.rollback("health_check", numbers),
        Input::Tick => {
            t.hold_elapsed();
            t.partition();
        }
        Input::Removed => {
            return Ok(Outcome {
                next: None,
                effects: vec![Effect::Forget, Effect::Publish],
            })
        }
        Input::Adopt { record, own } => {
            let heard = t.next.fleet_heard;
            t.adopt(record, own);
            // The first record of another replica confirms a restarted process's phase.
            if t.next.fleet_heard != heard {
                t.partition();
            }
        }
        Input::FleetLink { up, settle_ms } => {
            if up && t.next.fleet_down {
                t.next.fleet_up_since_ms = now_ms;
                t.next.fleet_settle_until_ms = now_ms.saturating_add(settle_ms);
            }
            if !up && !t.next.fleet_down {
                t.next.fleet_down_since_ms = now_ms;
            }
            t.next.fleet_down = !up;
            t.partition();
        }
        Input::Incarnation(incarnation) => t.incarnation(incarnation),
    }
    Ok(Outcome {
        next: Some(t.next),
        effects: t.effects,
    })
}

/// One step in progress.
struct Step<'a> {
    route: &'a str,
    now_ms: u64,
    next: RouteRollout,
    effects: Vec<Effect>,
}

impl Step<'_> {
    fn spec(&self) -> &Spec {
        &self.next.spec
    }

    /// Moves to `phase`: a new epoch, a fresh analysis span, and every effect; decided
    /// here, so shared with the fleet by compare-and-set.
    fn transition(&mut self, kind: &str, phase: Phase, reason: &str, numbers: Value) {
        self.transition_shared(kind, phase, reason, numbers, Some(ShareMode::Cas));
    }

    fn transition_shared(
        &mut self,
        kind: &str,
        phase: Phase,
        reason: &str,
        numbers: Value,
        share: Option<ShareMode>,
    ) {
        let from = self.next.phase.name();
        let s = &mut self.next;
        s.phase = phase;
        s.epoch += 1;
        s.failures = 0;
        s.passed_in_hold = false;
        s.judged_since_ms = self.now_ms;
        let (buckets, _) = s.weight();
        let event = Event {
            at_ms: self.now_ms,
            route: self.route.to_string(),
            kind: kind.to_string(),
            from: from.to_string(),
            to: s.phase.name().to_string(),
            weight_percent: buckets_to_percent(buckets),
            reason: reason.to_string(),
            numbers,
        };
        self.effects.push(Effect::Publish);
        if s.canary_version.is_some() {
            let rolled_back = matches!(s.phase, Phase::RolledBack { .. });
            // A rollback decided here holds until the fleet has it, also across a restart:
            // the state file says it is not shared yet.
            s.unshared_rollback = s.fleet && rolled_back && share == Some(ShareMode::Cas);
            self.persist();
            if let Some(mode) = share {
                let s = &self.next;
                if let Some(rec) = share_record(self.route, s, kind, reason, self.now_ms, mode) {
                    self.effects.push(Effect::Share(rec));
                }
            }
        }
        self.effects.push(Effect::Emit(event));
    }

    /// Saves the route's phase (with a canary), and whether a rollback waits to be shared.
    fn persist(&mut self) {
        let s = &self.next;
        if let Some(version) = &s.canary_version {
            self.effects.push(Effect::Persist(Record {
                route: self.route.to_string(),
                canary_version: version.clone(),
                phase: s.phase.clone(),
                updated_ms: self.now_ms,
                unshared: s.unshared_rollback,
                resumes: s.resumes,
            }));
        }
    }

    /// `fleet.on_partition = "stable"`: cut off once the store has been unreachable for
    /// the timeout, and back as soon as it answers. The phase is left alone: it is the
    /// fleet's last record (or a local rollback waiting to be shared), which applies again
    /// when the store is back. Also cut off while [`RouteRollout::fleet_unconfirmed`].
    fn partition(&mut self) {
        let s = &self.next;
        let confirmed = s.fleet_heard
            || (!s.fleet_down
                && self.now_ms >= s.fleet_up_since_ms.saturating_add(s.fleet_confirm_ms));
        if s.fleet_unconfirmed && confirmed {
            self.next.fleet_unconfirmed = false;
            self.next.fleet_blind = false;
        }
        let s = &self.next;
        let after = s.cut_off_after_ms;
        let unconfirmed = s.fleet_unconfirmed && (s.fleet_blind || !s.fleet_down);
        let due = unconfirmed
            || (s.fleet_down
                && after.is_some_and(|t| self.now_ms.saturating_sub(s.fleet_down_since_ms) >= t));
        if due == s.cut_off {
            return;
        }
        self.next.cut_off = due;
        self.effects.push(Effect::Publish);
        // A route without a canary sends nobody there either way: nothing to say.
        if self.next.canary_version.is_none() {
            return;
        }
        let (kind, reason) = if due && unconfirmed {
            (
                "cut_off",
                "this process started and nothing from the fleet has confirmed its phase yet (the fleet may have rolled the canary version back): every user to stable until a record of another replica arrives, or the store has answered for a poll interval".to_string(),
            )
        } else if due {
            (
                "cut_off",
                format!(
                    "the fleet store has not answered for {}s (fleet.on_partition = \"stable\"): every user to stable until it answers",
                    after.unwrap_or(0) as f64 / 1000.0
                ),
            )
        } else {
            (
                "rejoined",
                "the fleet store answers again: the fleet's record applies".to_string(),
            )
        };
        let name = self.next.phase.name();
        self.effects.push(Effect::Emit(Event {
            at_ms: self.now_ms,
            route: self.route.to_string(),
            kind: kind.to_string(),
            from: name.to_string(),
            to: name.to_string(),
            weight_percent: buckets_to_percent(self.next.weight().0),
            reason,
            numbers: json!({ "phase_weight_percent": buckets_to_percent(self.next.phase_weight()) }),
        }));
    }

    /// The fleet's record: applied when it is newer than what was applied here and for
    /// this canary version. A local rollback the fleet has not accepted yet is not undone
    /// (it is being written, and a rollback always wins in the store).
    fn adopt(&mut self, rec: FleetRecord, own: bool) {
        let s = &self.next;
        // A record of another incarnation of the store: late from before it lost its data,
        // or early from after (the poll says so, and this replica re-seeds first).
        let other_store = !rec.incarnation.is_empty()
            && !s.fleet_incarnation.is_empty()
            && rec.incarnation != s.fleet_incarnation;
        if s.canary_version.as_deref() != Some(rec.canary_version.as_str()) || other_store {
            return;
        }
        let rolled_back = matches!(rec.phase, Phase::RolledBack { .. });
        let here_rolled_back = matches!(s.phase, Phase::RolledBack { .. });
        // A process that had not heard from the fleet since it started did not know how
        // many resumes the fleet had counted (none at all without its state file): no
        // operator can have resumed a rollback it decided and never shared, so that
        // rollback is later than every resume the record counts, and is written over it
        // (`make chaos` seed 691889: a replica restarted without its state took an
        // operator's rollback while the store was down).
        let unheard_rollback = rolled_back_unheard(s) && !rolled_back && rec.resumes > s.resumes;
        let resumes_here = if unheard_rollback {
            rec.resumes
        } else {
            s.resumes
        };
        // The same for such a rollback in the fleet's record (it seeded an emptied store):
        // later than the resumes counted here, and given that count back (below), so that
        // an operator's resume of it wins over this replica's history.
        let unheard_record = !own && rolled_back && rec.unheard && s.resumes > rec.resumes;
        let resumes_there = if unheard_record {
            s.resumes
        } else {
            rec.resumes
        };
        // Histories order by operator resumes, then a rollback over anything else; only
        // records of the same kind are ordered by generation. So a rollback no resume has
        // overtaken applies whatever its generation (after the store lost its data, this
        // replica's generation may be ahead of the store's), and a rollback from before a
        // resume known here does not.
        let order = supersedes(resumes_there, rolled_back, resumes_here, here_rolled_back);
        let comparable = rec.incarnation.is_empty()
            || s.generation_incarnation.is_empty()
            || rec.incarnation == s.generation_incarnation;
        let newer = order.unwrap_or(!comparable || rec.generation > s.fleet_generation);
        if !newer {
            // A newer record that would undo the rollback applied here (or one not yet
            // shared) without an operator's resume since: only a store that lost its data
            // lets one through (a seed of a replica that never saw the rollback). The
            // rollback is written again; it wins in the store.
            // The same for an operator's resume this replica knows and the fleet's newer
            // record does not (the store lost it: a failover to a replica without it):
            // else this replica would never follow the fleet, nor the fleet it.
            if !own
                && order == Some(false)
                && rec.generation > s.fleet_generation
                && ((here_rolled_back && !rolled_back) || s.resumes > rec.resumes)
            {
                self.rewrite_over(&rec);
            }
            return;
        }
        if s.fleet_incarnation.is_empty() {
            self.next.fleet_incarnation = rec.incarnation.clone();
        }
        // Its own write taken by the store says nothing of the fleet's resumes (a seed of an
        // empty store carries this process's own count; seed 691889 replayed).
        if !own {
            self.next.fleet_heard = true;
        }
        let s = &self.next;
        let resumes = rec.resumes.max(s.resumes);
        let resumes_grew = resumes > s.resumes;
        self.next.fleet_generation = rec.generation.max(s.fleet_generation);
        self.next.generation_incarnation = rec.incarnation.clone();
        // The fleet's count (an operator's resume the store refused counted here too), but
        // never lower: what was counted here happened.
        self.next.resumes = resumes;
        if unheard_record {
            // The fleet's record, decided on and with this replica's count.
            let mut share = rec.clone();
            share.resumes = resumes;
            share.unheard = false;
            share.mode = ShareMode::Cas;
            share.kind = "resumes_counted".to_string();
            share.reason = format!(
                "{} (a rollback decided before its replica heard from the fleet; {resumes} operator resumes counted before it)",
                rec.reason
            );
            share.at_ms = self.now_ms;
            self.effects.push(Effect::Share(share));
        }
        let mut persisted = false;
        if rolled_back && matches!(self.next.phase, Phase::RolledBack { .. }) {
            // The fleet has a rollback: nothing waits any more, after a restart either.
            if std::mem::take(&mut self.next.unshared_rollback) {
                self.persist();
                persisted = true;
            }
        }
        // A resume learned with a phase already applied here (a rollback adopted over a
        // rollback, the resume between them missed) is kept across a restart too: else
        // a record counting that same resume would undo this rollback after one.
        if resumes_grew && !persisted {
            self.persist();
        }
        let file_news = match (&rec.file, self.next.fleet) {
            (Some(d), true) => self.adopt_file(d),
            _ => false,
        };
        let phase = clamp_steps(rec.phase.clone(), self.spec(), self.now_ms);
        let share_news = file_news && !own;
        if own || stage(&phase) == stage(&self.next.phase) {
            if share_news {
                self.share_file_news();
            }
            return;
        }
        let kind = if rolled_back { "rollback" } else { "adopted" };
        let reason = format!(
            "fleet: {} (generation {}, by {})",
            rec.reason, rec.generation, rec.by
        );
        let reason = match &phase {
            Phase::RolledBack { reason: r } => r.clone(),
            _ => reason,
        };
        self.transition_shared(
            kind,
            phase,
            &reason,
            json!({ "fleet_generation": rec.generation, "by": rec.by, "fleet_reason": rec.reason }),
            None,
        );
        if share_news {
            self.share_file_news();
        }
    }

    /// Shares the state adopted, with this replica's file decision as the fleet's news
    /// (on the generation just adopted: the phase is the fleet's).
    fn share_file_news(&mut self) {
        if let Some(share) = share_record(
            self.route,
            &self.next,
            "config",
            "this replica's config file decides a weight or steps the fleet has not seen",
            self.now_ms,
            ShareMode::Cas,
        ) {
            self.effects.push(Effect::Share(share));
        }
    }

    /// Writes this replica's state again over a newer fleet record from an earlier
    /// history: one that would undo its rollback, or one from before an operator's resume
    /// it knows (the store lost it). Decided on that record's generation: a later history
    /// wins whatever the generation.
    fn rewrite_over(&mut self, rec: &FleetRecord) {
        let s = &self.next;
        let (kind, event, why) = if matches!(s.phase, Phase::RolledBack { .. }) && !rec.rolled_back
        {
            (
                "rollback",
                "rollback_rewritten",
                "would undo this rollback without an operator's resume",
            )
        } else {
            (
                "history_rewritten",
                "history_rewritten",
                "predates an operator's resume this replica knows",
            )
        };
        let reason = format!(
            "fleet: a record that {why} ({} at generation {}, by {}) was refused; this replica's state is written again",
            rec.phase.name(),
            rec.generation,
            rec.by
        );
        let Some(mut share) =
            share_record(self.route, s, kind, &reason, self.now_ms, ShareMode::Cas)
        else {
            return;
        };
        share.generation = share.generation.max(rec.generation);
        // Never fewer resumes than the record it is written over (a rollback this process
        // decided before it heard from the fleet counts the fleet's, see `adopt`).
        share.resumes = share.resumes.max(rec.resumes);
        self.effects.push(Effect::Share(share));
        let name = s.phase.name();
        self.effects.push(Effect::Emit(Event {
            at_ms: self.now_ms,
            route: self.route.to_string(),
            kind: event.to_string(),
            from: name.to_string(),
            to: name.to_string(),
            weight_percent: buckets_to_percent(s.weight().0),
            reason,
            numbers: json!({ "fleet_generation": rec.generation, "by": rec.by, "fleet_phase": rec.phase.name() }),
        }));
    }

    /// The store's incarnation as a poll read it. A change: the store lost its data, and
    /// this replica's state re-seeds it at the generation it knows (the store keeps the
    /// highest, and a rollback over anything else).
    fn incarnation(&mut self, incarnation: String) {
        let known = std::mem::replace(&mut self.next.fleet_incarnation, incarnation.clone());
        if known.is_empty() || known == incarnation || !self.next.fleet {
            return;
        }
        let incarnation = incarnation.as_str();
        let s = &self.next;
        let reason = format!(
            "the fleet store's incarnation changed (now {incarnation}): it restarted empty or failed over to a replica without this fleet's data; this replica's state re-seeds it"
        );
        let Some(share) = share_record(
            self.route,
            s,
            "store_reset",
            &reason,
            self.now_ms,
            ShareMode::Reseed,
        ) else {
            return;
        };
        self.effects.push(Effect::Share(share));
        let name = s.phase.name();
        self.effects.push(Effect::Emit(Event {
            at_ms: self.now_ms,
            route: self.route.to_string(),
            kind: "store_reset".to_string(),
            from: name.to_string(),
            to: name.to_string(),
            weight_percent: buckets_to_percent(s.weight().0),
            reason,
            numbers: json!({ "fleet_generation": s.fleet_generation, "incarnation": incarnation }),
        }));
    }

    fn restore(&mut self, saved: Result<Option<Record>, String>) {
        let spec = self.spec().clone();
        // A rollback decided before the restart and never shared: shared first, and it
        // wins in the store like any rollback; anything else is only a proposal.
        let mut mode = ShareMode::Seed;
        let (kind, phase, reason) = match (&spec.canary_version, saved) {
            (Some(version), Ok(Some(rec))) if &rec.canary_version == version => {
                if rec.unshared && matches!(rec.phase, Phase::RolledBack { .. }) {
                    mode = ShareMode::Cas;
                }
                self.next.resumes = rec.resumes;
                (
                    "restored",
                    clamp_steps(rec.phase, &spec, self.now_ms),
                    "saved state".to_string(),
                )
            }
            (Some(version), Ok(_)) => {
                self.next.fleet_blind = self.next.fleet;
                (
                    "reset",
                    initial_phase(&spec, self.now_ms),
                    format!("canary version {version} starts"),
                )
            }
            (Some(_), Err(e)) => (
                "state_error",
                Phase::RolledBack {
                    reason: "state_unreadable".into(),
                },
                e,
            ),
            (None, _) => ("reset", initial_phase(&spec, self.now_ms), "start".into()),
        };
        self.transition_shared(kind, phase, &reason, json!({}), Some(mode));
        let s = &mut self.next;
        s.fleet_unconfirmed = s.fleet && s.canary_version.is_some() && s.phase_weight() > 0;
        s.fleet_blind &= s.fleet_unconfirmed;
        self.partition();
    }

    fn config(&mut self, file: Spec) {
        // In a fleet, what the file decides may be news for the whole fleet, or a copy
        // behind the fleet's decision.
        let (spec, news) = if self.next.fleet {
            self.file_changed(file)
        } else {
            self.next.file_spec = file.clone();
            (file, false)
        };
        self.config_spec(spec);
        if news && !self.effects.iter().any(|e| matches!(e, Effect::Share(_))) {
            // The phase stays (a new file weight in `manual`, a step's hold): the record
            // carries the decision all the same.
            let s = &self.next;
            if let Some(rec) = share_record(
                self.route,
                s,
                "config",
                "the config file changed the route's weight or steps",
                self.now_ms,
                ShareMode::Cas,
            ) {
                self.effects.push(Effect::Share(rec));
            }
        }
        self.note_skew();
    }

    /// This replica loaded a config file: returns the spec to run and whether the file's
    /// decision is news the fleet must get. A file whose decision did not change, or one
    /// catching up to a decision the fleet moved past (this replica lagged), runs the
    /// fleet's; otherwise the file's decision becomes the fleet's.
    fn file_changed(&mut self, file: Spec) -> (Spec, bool) {
        let old = std::mem::replace(&mut self.next.file_spec, file.clone()).decision();
        let old_own = old.hash.clone();
        if file.canary_version != self.next.canary_version {
            // A new canary version starts afresh, from this file.
            self.next.fleet_file = None;
            return (file, false);
        }
        let new = file.decision();
        // Nothing shared yet: the fleet runs what this replica's file decided so far.
        let fleet = self.next.fleet_file.clone().unwrap_or(old);
        if new.hash == fleet.hash {
            self.next.fleet_file = Some(FileDecision {
                past: fleet.past,
                ..new
            });
            return (file, false);
        }
        let lagging = old_own != fleet.hash && fleet.past.contains(&new.hash);
        if new.hash == old_own || lagging {
            let spec = match &self.next.fleet_file {
                Some(d) => file.overlay(d),
                None => file,
            };
            return (spec, false);
        }
        self.next.fleet_file = Some(fleet.followed_by(new));
        (file, true)
    }

    /// Keeps `file_skew_since_ms` in line: set when this replica's file and the fleet's
    /// decision part, cleared when they agree.
    fn note_skew(&mut self) {
        let (own, fleet) = self.next.file_hashes();
        let skewed = fleet.is_some_and(|f| f != own);
        self.next.file_skew_since_ms = match (skewed, self.next.file_skew_since_ms) {
            (false, _) => None,
            (true, Some(since)) => Some(since),
            (true, None) => Some(self.now_ms),
        };
    }

    /// The fleet's file decision in an adopted record: run it, unless this replica's file
    /// decides something the fleet has not seen (edited while this replica was away, or a
    /// newer copy it restarted with): then that is the news, shared after the adoption.
    fn adopt_file(&mut self, d: &FileDecision) -> bool {
        let own = self.next.file_spec.decision();
        let news = own.hash != d.hash && !d.past.contains(&own.hash);
        let before = self.next.spec.clone();
        if news {
            self.next.fleet_file = Some(d.followed_by(own));
            self.next.spec = self.next.file_spec.clone();
        } else {
            self.next.fleet_file = Some(d.clone());
            self.next.spec = self.next.file_spec.overlay(d);
        }
        self.note_skew();
        if self.next.spec != before {
            self.effects.push(Effect::Publish);
        }
        news
    }

    fn config_spec(&mut self, spec: Spec) {
        let old = std::mem::replace(&mut self.next.spec, spec.clone());
        if spec.canary_version != self.next.canary_version {
            self.next.canary_version = spec.canary_version.clone();
            let reason = match &spec.canary_version {
                Some(v) => format!("canary version {v}: a fresh rollout"),
                None => "the canary was removed".to_string(),
            };
            self.next.fleet_generation = 0;
            self.next.generation_incarnation = String::new();
            self.next.unshared_rollback = false;
            self.next.resumes = 0;
            self.next.fleet_incarnation = String::new();
            self.transition_shared(
                "reset",
                initial_phase(&spec, self.now_ms),
                &reason,
                json!({}),
                Some(ShareMode::Seed),
            );
            return;
        }
        let changed = old.fingerprint() != spec.fingerprint();
        let next = match &self.next.phase {
            Phase::Weight { .. } if changed => Some((
                initial_phase(&spec, self.now_ms),
                "the file changed the route: the operator's weight no longer applies",
            )),
            Phase::Manual if !spec.steps.is_empty() && spec.canary_version.is_some() => {
                Some((initial_phase(&spec, self.now_ms), "a rollout was added"))
            }
            Phase::Progressing { .. } | Phase::Paused { .. } if spec.steps.is_empty() => {
                Some((Phase::Manual, "the rollout was removed"))
            }
            p @ (Phase::Progressing { .. } | Phase::Paused { .. }) => {
                let clamped = clamp_steps(p.clone(), &spec, self.now_ms);
                (&clamped != p).then_some((clamped, "the rollout's steps changed"))
            }
            _ => None,
        };
        match next {
            Some((phase, reason)) => self.transition("reset", phase, reason, json!({})),
            // The steps' weights or the file's weight may have changed all the same.
            None if old != spec => self.effects.push(Effect::Publish),
            None => {}
        }
    }

    fn operator(&mut self, action: Action) -> Result<(), Refusal> {
        let spec = self.spec().clone();
        if spec.canary_version.is_none() {
            return Err(Refusal::NoCanary(self.route.to_string()));
        }
        let phase = self.next.phase.clone();
        if self.next.fleet_down && action != Action::Rollback {
            return Err(Refusal::Conflict(format!(
                "route {:?}: the fleet store is unreachable: only a rollback applies until it is back",
                self.route
            )));
        }
        if let (Phase::RolledBack { .. }, Action::Weight(_) | Action::Promote | Action::Pause) =
            (&phase, action)
        {
            if latch_off() && matches!(action, Action::Weight(_)) {
                self.next.resumes += 1;
            } else {
                return Err(Refusal::Conflict(format!(
                    "route {:?} is rolled back: resume it first (a rollback holds until an operator resumes or a new canary version is deployed)",
                    self.route
                )));
            }
        }
        let (kind, next, reason) = match action {
            Action::Weight(buckets) => (
                "weight",
                Phase::Weight {
                    buckets: buckets.min(BUCKETS),
                },
                format!("operator set {}%", buckets_to_percent(buckets.min(BUCKETS))),
            ),
            Action::Rollback => (
                "rollback",
                Phase::RolledBack {
                    reason: "manual".into(),
                },
                "manual".to_string(),
            ),
            Action::Promote => match phase.step() {
                Some(step) if step + 1 < spec.steps.len() => (
                    "step",
                    Phase::Progressing {
                        step: step + 1,
                        since_ms: self.now_ms,
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
                    return Err(Refusal::Conflict(format!(
                        "route {:?} is {}: only a progressing rollout can be paused",
                        self.route,
                        other.name()
                    )))
                }
            },
            Action::Resume => match phase {
                Phase::Paused { step } => (
                    "resumed",
                    Phase::Progressing {
                        step,
                        since_ms: self.now_ms,
                    },
                    "operator resumed".to_string(),
                ),
                Phase::RolledBack { .. } => {
                    // Counted before the transition, so the shared record carries it: the
                    // other replicas leave their rollback for this record only.
                    self.next.resumes += 1;
                    (
                        "resumed",
                        initial_phase(&spec, self.now_ms),
                        "operator resumed after a rollback".to_string(),
                    )
                }
                other => {
                    return Err(Refusal::Conflict(format!(
                        "route {:?} is {}: only a paused or rolled-back route can be resumed",
                        self.route,
                        other.name()
                    )))
                }
            },
        };
        self.transition(kind, next, &reason, json!({}));
        Ok(())
    }

    /// Every user to stable, unless none is on the canary already (by the phase: a replica
    /// cut off from the fleet still rolls back, or the canary would return with the link).
    fn rollback(&mut self, reason: &str, numbers: Value) {
        if matches!(self.next.phase, Phase::RolledBack { .. })
            || self.next.canary_version.is_none()
            || (self.next.phase_weight() == 0 && !self.next.spec.shadows_canary)
        {
            return;
        }
        let phase = Phase::RolledBack {
            reason: reason.to_string(),
        };
        self.transition("rollback", phase, reason, numbers);
    }

    fn verdict(&mut self, epoch: u64, verdict: Verdict) {
        // Judged on data from before the last transition: it says nothing of the present.
        if epoch != self.next.epoch || self.next.canary_version.is_none() {
            return;
        }
        let s = &mut self.next;
        s.evaluations += 1;
        match verdict {
            Verdict::Fail { reason, numbers } => {
                s.last_verdict = "fail";
                s.failures += 1;
                s.passed_in_hold = false;
                // A failing evaluation restarts the hold: a step needs a whole passing hold.
                if let Phase::Progressing { since_ms, .. } = &mut s.phase {
                    *since_ms = self.now_ms;
                }
                if s.failures >= s.spec.failure_limit {
                    self.rollback(&reason, numbers);
                }
            }
            Verdict::Pass => {
                s.last_verdict = "pass";
                s.failures = 0;
                s.passed_in_hold = true;
                self.hold_elapsed();
            }
            Verdict::Inconclusive => {
                s.last_verdict = "inconclusive";
                s.failures = 0;
                self.hold_elapsed();
            }
        }
    }

    /// The next step (or promotion) once the current step's hold has passed with a
    /// passing evaluation in it. A step without hold, or a route without analysis, needs
    /// no passing evaluation.
    fn hold_elapsed(&mut self) {
        let s = &self.next;
        let Phase::Progressing { step, since_ms } = s.phase else {
            return;
        };
        // Without the fleet, no replica may advance on what it alone sees; just after it
        // is back, what the others decided meanwhile arrives first.
        if s.fleet_down || self.now_ms < s.fleet_settle_until_ms {
            return;
        }
        if s.canary_version.is_none() {
            return;
        }
        let Some(hold_ms) = s.spec.steps.get(step).map(|st| st.hold_ms) else {
            return;
        };
        let held = self.now_ms.saturating_sub(since_ms) >= hold_ms;
        let judged = s.passed_in_hold || hold_ms == 0 || !s.spec.analysis_enabled;
        if !(held && judged) {
            return;
        }
        let (kind, next) = if step + 1 < s.spec.steps.len() {
            (
                "step",
                Phase::Progressing {
                    step: step + 1,
                    since_ms: self.now_ms,
                },
            )
        } else {
            ("promoted", Phase::Promoted)
        };
        let reason = if s.spec.analysis_enabled {
            format!("analysis passed for the {}s hold", hold_ms as f64 / 1000.0)
        } else {
            format!(
                "the {}s hold elapsed (no analysis)",
                hold_ms as f64 / 1000.0
            )
        };
        self.transition(kind, next, &reason, json!({}));
    }
}

/// A phase without its start time.
fn stage(p: &Phase) -> Phase {
    match p {
        Phase::Progressing { step, .. } => Phase::Progressing {
            step: *step,
            since_ms: 0,
        },
        other => other.clone(),
    }
}

/// A step index that the (possibly shorter) steps still have; a phase with steps on a
/// route that has none left is manual.
fn clamp_steps(phase: Phase, spec: &Spec, now_ms: u64) -> Phase {
    let last = spec.steps.len().checked_sub(1);
    match (phase, last) {
        (Phase::Progressing { .. } | Phase::Paused { .. }, None) => Phase::Manual,
        (Phase::Progressing { step, since_ms }, Some(last)) if step > last => Phase::Progressing {
            step: last,
            since_ms: since_ms.min(now_ms),
        },
        (Phase::Paused { step }, Some(last)) if step > last => Phase::Paused { step: last },
        (p, _) => p,
    }
}

/// How one record's history orders against another's, apart from generations: more
/// operator resumes is later; with as many, a rollback wins over anything else; `None`:
/// the same kind, ordered by generation (compare-and-set).
pub fn supersedes(
    resumes: u64,
    rolled_back: bool,
    other_resumes: u64,
    other_rolled_back: bool,
) -> Option<bool> {
    match resumes.cmp(&other_resumes) {
        std::cmp::Ordering::Greater => Some(true),
        std::cmp::Ordering::Less => Some(false),
        std::cmp::Ordering::Equal if rolled_back != other_rolled_back => Some(rolled_back),
        std::cmp::Ordering::Equal => None,
    }
}

/// What the fleet store decides of a write: the compare-and-set rule, stated once in Rust
/// (the in-memory store of the tests runs it; Redis runs the same rule as a Lua script,
/// `control::fleet::redis_store`): `(true, written)` or `(false, current)`.
pub fn decide(
    current: Option<&FleetRecord>,
    new: &FleetRecord,
    store_incarnation: &str,
) -> (bool, FleetRecord) {
    let mut gen = 0;
    let mut resumes = new.resumes;
    if let Some(c) = current {
        gen = c.generation;
        let stale = !new.incarnation.is_empty() && new.incarnation != store_incarnation;
        // A rollback whose process had not heard from the fleet is as late as any history
        // that did not see it: the stored one against a write not decided on it, a new one
        // against the stored record. Only a write decided on it (an operator's resume of
        // it) compares its count as it is.
        let saw_current = new.mode == ShareMode::Cas && !stale && new.generation == gen;
        let mut current_resumes = c.resumes;
        if c.unheard && c.rolled_back && !saw_current {
            current_resumes = current_resumes.max(new.resumes);
        }
        if new.unheard && new.rolled_back {
            resumes = resumes.max(c.resumes);
        }
        let order = supersedes(resumes, new.rolled_back, current_resumes, c.rolled_back);
        match new.mode {
            ShareMode::Seed => return (false, c.clone()),
            // This replica's state after the store lost its data: a later history wins,
            // the same kind by the higher generation.
            ShareMode::Reseed => {
                if !order.unwrap_or(new.generation > gen) {
                    return (false, c.clone());
                }
            }
            ShareMode::Cas => {
                // Decided against another incarnation of the store: its generation says
                // nothing about this one's. A later history (a rollback, an operator's
                // resume) lands whatever the generation.
                if !order.unwrap_or(gen == new.generation && !stale) {
                    return (false, c.clone());
                }
            }
        }
    }
    let mut out = new.clone();
    out.generation = gen.max(new.generation) + 1;
    out.incarnation = store_incarnation.to_string();
    // An unheard rollback takes the count of the history it is written over.
    out.resumes = resumes;
    (true, out)
}

/// A bug planted on purpose, to show that `make chaos` catches a broken rollback latch
/// (tests/chaos.rs, `chaos_catches_the_latch_switched_off`): built only with the
/// `chaos-plants` feature (the tests build with every feature) and on only with
/// `KANARIA_CHAOS_PLANT=latch_off` in the environment, an operator's weight leaves a
/// rollback as a resume would. Without the feature it is `false` and compiled away.
#[cfg(feature = "chaos-plants")]
fn latch_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("KANARIA_CHAOS_PLANT").is_ok_and(|v| v == "latch_off"))
}

#[cfg(not(feature = "chaos-plants"))]
const fn latch_off() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(version: Option<&str>, steps: &[(u32, u64)]) -> Spec {
        Spec {
            canary_version: version.map(str::to_string),
            stable_version: "v1".into(),
            file_buckets: 1_000,
            steps: steps
                .iter()
                .map(|&(buckets, hold_ms)| StepSpec { buckets, hold_ms })
                .collect(),
            failure_limit: 1,
            analysis_enabled: true,
            shadows_canary: false,
        }
    }

    /// A file weight (manual phase) in percent.
    fn weighted(percent: u32) -> Spec {
        Spec {
            file_buckets: percent * 100,
            ..spec(Some("v2"), &[])
        }
    }

    /// Loads `file` on replica `s`: the next state and the record it shares, if any.
    fn load(s: &RouteRollout, file: Spec, now: u64) -> (RouteRollout, Option<FleetRecord>) {
        let out = step("app", s, Input::Config(file), now).unwrap();
        let shared = out.effects.iter().find_map(|e| match e {
            Effect::Share(r) => Some(r.clone()),
            _ => None,
        });
        (out.next.unwrap(), shared)
    }

    /// Hands `rec` as the store accepted it (stamped with a generation from `now`, which
    /// only grows here) to replica `s`.
    fn deliver(
        s: &RouteRollout,
        rec: &FleetRecord,
        now: u64,
    ) -> (RouteRollout, Option<FleetRecord>) {
        let mut rec = rec.clone();
        rec.generation = now;
        let out = step(
            "app",
            s,
            Input::Adopt {
                record: rec,
                own: false,
            },
            now,
        )
        .unwrap();
        let shared = out.effects.iter().find_map(|e| match e {
            Effect::Share(r) => Some(r.clone()),
            _ => None,
        });
        (out.next.unwrap(), shared)
    }

    /// A weight edited in one replica's file is the fleet's at once; a replica whose copy
    /// of the file arrives later changes nothing; a replica catching up to a decision the
    /// fleet moved past does not undo the newer one; a revert on a replica that agreed
    /// with the fleet is news again; without a fleet, the file is the replica's alone.
    #[test]
    fn file_decisions_are_the_fleets() {
        let (a, b, c) = (
            started(&weighted(10)),
            started(&weighted(10)),
            started(&weighted(10)),
        );
        // A's file says 30 %: shared; B and C run 30 % before their files change.
        let (a, rec) = load(&a, weighted(30), 10);
        let rec = rec.expect("a file decision is shared");
        assert_eq!(a.weight().0, 3_000);
        let (b, none) = deliver(&b, &rec, 11);
        assert!(none.is_none());
        assert_eq!(b.weight().0, 3_000);
        assert!(b.file_skew_since_ms.is_some(), "B's file says 10 % still");
        let (c, _) = deliver(&c, &rec, 11);
        assert_eq!(c.weight().0, 3_000);
        // B's copy arrives: nothing new, and no skew any more.
        let (b, none) = load(&b, weighted(30), 20);
        assert!(none.is_none());
        assert_eq!((b.weight().0, b.file_skew_since_ms), (3_000, None));
        // A moves on to 50 %; C, still at 10 %, catches up to 30 % only: it stays at 50 %.
        let (a, rec) = load(&a, weighted(50), 30);
        let rec = rec.expect("shared");
        let (c, _) = deliver(&c, &rec, 31);
        assert_eq!(c.weight().0, 5_000);
        let (c, none) = load(&c, weighted(30), 40);
        assert!(
            none.is_none(),
            "a copy behind the fleet is not news: {none:?}"
        );
        assert_eq!(c.weight().0, 5_000);
        // A (which agrees with the fleet) reverts to 30 %: news again.
        let (a, rec) = load(&a, weighted(30), 50);
        let rec = rec.expect("a revert is shared");
        assert_eq!(a.weight().0, 3_000);
        let (c, _) = deliver(&c, &rec, 51);
        assert_eq!((c.weight().0, c.file_skew_since_ms), (3_000, None));
        // A replica that restarts with a file the fleet has not seen brings it as news.
        let d = started(&weighted(70));
        let (d, news) = deliver(&d, &rec, 60);
        let news = news.expect("a newer file is news");
        assert_eq!(d.weight().0, 7_000);
        assert_eq!(news.file.as_ref().map(|f| f.file_buckets), Some(7_000));
        // One that restarts with a file the fleet moved past follows the fleet.
        let e = started(&weighted(50));
        let (e, none) = deliver(&e, &news, 61);
        assert!(none.is_none());
        assert_eq!(e.weight().0, 7_000);
        // Without a fleet the file decides alone.
        let solo = fresh(&weighted(10), 0);
        let (solo, none) = load(&solo, weighted(30), 70);
        assert!(none.is_none());
        assert_eq!(solo.weight().0, 3_000);
    }

    /// A route of a fleet whose store answers, after its start.
    fn started(spec: &Spec) -> RouteRollout {
        let s = fresh(spec, 0).in_fleet(true, None, 0);
        step("app", &s, Input::Restore(Ok(None)), 0)
            .unwrap()
            .next
            .unwrap()
    }

    fn apply(s: &RouteRollout, input: Input, now: u64) -> RouteRollout {
        step("app", s, input, now).unwrap().next.unwrap()
    }

    fn fail() -> Verdict {
        Verdict::Fail {
            reason: "error_rate".into(),
            numbers: json!({"canary_errors": 9}),
        }
    }

    #[test]
    fn a_stale_verdict_is_dropped() {
        let sp = spec(Some("v2"), &[(500, 1_000), (5_000, 1_000)]);
        let s = started(&sp);
        let judged_at = s.epoch;
        // An operator resumes... no: an operator skips a step while the data is judged.
        let s = apply(&s, Input::Operator(Action::Promote), 10);
        let out = step(
            "app",
            &s,
            Input::Verdict {
                epoch: judged_at,
                verdict: fail(),
            },
            20,
        )
        .unwrap();
        assert!(out.effects.is_empty());
        assert_eq!(out.next.unwrap().phase.name(), "progressing");
    }

    #[test]
    fn steps_shrinking_on_reload_continue_from_the_last_step_and_finish() {
        let sp = spec(Some("v2"), &[(100, 0), (500, 0), (2_000, 0), (5_000, 0)]);
        let mut s = started(&sp);
        for _ in 0..3 {
            let e = s.epoch;
            s = apply(
                &s,
                Input::Verdict {
                    epoch: e,
                    verdict: Verdict::Pass,
                },
                1,
            );
        }
        assert_eq!(s.phase.step(), Some(3));
        s = apply(
            &s,
            Input::Config(spec(Some("v2"), &[(100, 0), (500, 0)])),
            2,
        );
        assert_eq!(s.phase.step(), Some(1));
        let e = s.epoch;
        s = apply(
            &s,
            Input::Verdict {
                epoch: e,
                verdict: Verdict::Pass,
            },
            3,
        );
        assert_eq!(s.phase, Phase::Promoted);
    }

    #[test]
    fn a_restored_state_of_another_version_starts_afresh_and_an_unreadable_one_is_safe() {
        let sp = spec(Some("v3"), &[]);
        let rec = Record {
            route: "app".into(),
            canary_version: "v2".into(),
            phase: Phase::RolledBack {
                reason: "latency".into(),
            },
            updated_ms: 1,
            unshared: false,
            resumes: 0,
        };
        let s = apply(&fresh(&sp, 0), Input::Restore(Ok(Some(rec))), 5);
        assert_eq!(s.phase, Phase::Manual);
        let s = apply(
            &fresh(&sp, 0),
            Input::Restore(Err("app.json: torn".into())),
            5,
        );
        assert_eq!(s.weight().0, 0);
        assert!(matches!(s.phase, Phase::RolledBack { .. }));
    }

    #[test]
    fn a_removed_route_is_forgotten() {
        let s = started(&spec(Some("v2"), &[]));
        let out = step("app", &s, Input::Removed, 1).unwrap();
        assert_eq!(out.next, None);
        assert!(out.effects.contains(&Effect::Forget));
    }

    #[test]
    fn after_the_fleet_is_back_a_rollback_decided_elsewhere_arrives_before_a_step() {
        // A step whose hold (1 s, no analysis) elapses while the store is down.
        let mut sp = spec(Some("v2"), &[(500, 1_000), (5_000, 1_000)]);
        sp.analysis_enabled = false;
        let s = started(&sp);
        assert_eq!(s.phase.step(), Some(0));
        let s = apply(
            &s,
            Input::FleetLink {
                up: false,
                settle_ms: 2_000,
            },
            100,
        );
        let s = apply(&s, Input::Tick, 5_000);
        assert_eq!(s.phase.step(), Some(0), "stepped with the store down");
        // Back at 6 s: the hold elapsed long ago, but nothing moves for 2 s...
        let s = apply(
            &s,
            Input::FleetLink {
                up: true,
                settle_ms: 2_000,
            },
            6_000,
        );
        let held = apply(&s, Input::Tick, 7_999);
        assert_eq!(held.phase.step(), Some(0), "stepped within the settle");
        // ...in which the rollback another replica decided during the outage arrives.
        let rec = record(
            "v2",
            Phase::RolledBack {
                reason: "manual".into(),
            },
            s.fleet_generation + 1,
        );
        let rolled = apply(
            &held,
            Input::Adopt {
                record: rec,
                own: false,
            },
            6_300,
        );
        assert!(matches!(rolled.phase, Phase::RolledBack { .. }));
        // Without one, the step is taken once the settle is over.
        let stepped = apply(&held, Input::Tick, 8_000);
        assert_eq!(stepped.phase.step(), Some(1));
    }

    /// `make chaos` seed 691889: a replica restarted without its state file takes an
    /// operator's rollback while the store does not answer; its first poll finds the
    /// fleet's record, which counts resumes made before (this replica knows none). The
    /// rollback is written over it. A process that had heard from the fleet before the
    /// outage keeps the rule that an operator's resume it did not see wins.
    #[test]
    fn a_rollback_taken_before_the_first_poll_is_written_over_the_fleets_record() {
        let sp = spec(Some("v2"), &[]);
        let down = link(false, 0);
        let up = link(true, 0);
        let resumed = |generation| FleetRecord {
            resumes: 3,
            ..record("v2", Phase::Manual, generation)
        };
        let rollback_then_poll = |s: &RouteRollout| {
            let s = apply(s, down.clone(), 10);
            let s = apply(&s, Input::Operator(Action::Rollback), 20);
            assert!(s.unshared_rollback);
            let s = apply(&s, up.clone(), 30);
            step("app", &s, adopt(resumed(6), false), 40).unwrap()
        };
        // Its own seed taken by an empty store first does not count as hearing from it.
        let seeded = apply(
            &started(&sp),
            adopt(record("v2", Phase::Manual, 1), true),
            5,
        );
        assert!(!seeded.fleet_heard);
        let out = rollback_then_poll(&seeded);
        let next = out.next.clone().unwrap();
        assert!(matches!(next.phase, Phase::RolledBack { .. }), "{next:?}");
        let share = shares(&out).into_iter().next();
        let share = share.expect("the rollback written again");
        assert!(share.rolled_back && share.resumes == 3 && share.generation >= 6);
        // The store takes it (a rollback over the same history), and every replica follows.
        let (written, _) = decide(Some(&resumed(6)), &share, "");
        assert!(written);
        // Heard from the fleet first: the resume it did not see wins, as before.
        let heard = apply(
            &started(&sp),
            adopt(record("v2", Phase::Manual, 1), false),
            5,
        );
        assert!(heard.fleet_heard);
        let out = rollback_then_poll(&heard);
        assert_eq!(out.next.unwrap().phase, Phase::Manual);
    }

    /// `make chaos` seed 691889 as it played: the unheard rollback seeds a store that came
    /// back empty, and another replica's re-seed, counting 3 resumes, reaches it next. The
    /// store keeps the rollback; that replica adopts it and writes its count back, so an
    /// operator's resume on any replica wins afterwards (also one decided on the unheard
    /// record itself).
    #[test]
    fn an_unheard_rollback_that_seeded_an_emptied_store_holds_against_a_reseed() {
        let sp = spec(Some("v2"), &[]);
        // c: restarted without state, an operator's rollback while the store is down.
        let down = link(false, 0);
        let c = apply(&started(&sp), down, 10);
        let out = step("app", &c, Input::Operator(Action::Rollback), 20).unwrap();
        let c = out.next.clone().unwrap();
        let rollback = shares(&out).pop().expect("the rollback shared");
        assert!(rollback.unheard && rollback.rolled_back && rollback.resumes == 0);
        let (written, stored) = decide(None, &rollback, "i2");
        assert!(written && stored.unheard);
        // a: heard 3 resumes from the fleet; its re-seed of the emptied store is refused.
        let a = apply(
            &started(&sp),
            adopt(
                FleetRecord {
                    resumes: 3,
                    ..record("v2", Phase::Manual, 9)
                },
                false,
            ),
            5,
        );
        let reseed = share_record("app", &a, "store_reset", "", 30, ShareMode::Reseed).unwrap();
        assert!(!reseed.unheard);
        let (written, current) = decide(Some(&stored), &reseed, "i2");
        assert!(!written && current == stored);
        // A write from before that never saw it is refused too, whatever its count.
        let cas = FleetRecord {
            generation: 9,
            ..reseed.clone()
        };
        assert!(!decide(Some(&stored), &cas, "i2").0);
        // a adopts the rollback and writes its count back.
        let out = step("app", &a, adopt(stored.clone(), false), 40).unwrap();
        let a = out.next.clone().unwrap();
        assert!(matches!(a.phase, Phase::RolledBack { .. }) && a.resumes == 3);
        let counted = shares(&out).pop().expect("the count written back");
        assert!(counted.rolled_back && !counted.unheard && counted.resumes == 3);
        let (written, counted) = decide(Some(&stored), &counted, "i2");
        assert!(written && counted.resumes == 3);
        // An operator's resume on a wins; so does one on c, decided on the unheard record.
        let resumed = step("app", &a, Input::Operator(Action::Resume), 50).unwrap();
        let resume = shares(&resumed).pop().expect("the resume shared");
        assert!(decide(Some(&counted), &resume, "i2").0);
        let up = link(true, 0);
        let c = apply(&apply(&c, up, 44), adopt(stored.clone(), true), 45);
        let resumed = step("app", &c, Input::Operator(Action::Resume), 50).unwrap();
        let resume = shares(&resumed).pop().expect("the resume shared");
        assert!(!resume.unheard && resume.resumes == 1);
        assert!(decide(Some(&stored), &resume, "i2").0);
    }

    /// `make chaos` seeds 691889 and 773287: a process that starts cannot know whether the
    /// fleet rolled its canary version back while it was away (a store that lost its data
    /// may not say). Without a saved state it sends nobody to the canary while the store
    /// does not answer; with one it serves that (`"hold"`). After the store answers, nobody
    /// either until a record another replica wrote arrives (its own seed of an empty store
    /// is not one) or the store has answered for `fleet_confirm_ms`.
    #[test]
    fn a_restarted_process_sends_nobody_to_the_canary_until_the_fleet_confirms_its_phase() {
        let sp = weighted(5);
        let down = || RouteRollout {
            fleet_confirm_ms: 2_000,
            ..fresh(&sp, 0).in_fleet(false, None, 0)
        };
        let up = link(true, 2_000);
        let blind = apply(&down(), Input::Restore(Ok(None)), 0);
        assert!(blind.fleet_blind && blind.fleet_unconfirmed && blind.cut_off);
        assert_eq!(blind.weight().0, 0);
        let ticked = apply(&blind, Input::Tick, 60_000);
        assert_eq!(ticked.weight().0, 0);
        // The store answers: still nobody, also after its own seed is taken.
        let back = apply(&ticked, up.clone(), 60_000);
        assert!(back.cut_off);
        let seeded = apply(&back, adopt(record("v2", Phase::Manual, 1), true), 60_100);
        assert!(seeded.cut_off);
        // Another replica's record confirms it (a rollback would apply here)...
        let heard = apply(
            &seeded,
            adopt(record("v2", Phase::Manual, 2), false),
            60_200,
        );
        assert!(!heard.fleet_unconfirmed && !heard.cut_off);
        assert_eq!(heard.weight().0, 500);
        // ... or the store answering for `fleet_confirm_ms`.
        let settled = apply(&seeded, Input::Tick, 62_000);
        assert!(!settled.fleet_unconfirmed && !settled.cut_off);
        assert_eq!(settled.weight().0, 500);
        // With a saved state: served while the store does not answer, then as above.
        let saved = Record {
            route: "app".into(),
            canary_version: "v2".into(),
            phase: Phase::Manual,
            updated_ms: 0,
            unshared: false,
            resumes: 0,
        };
        let restored = apply(&down(), Input::Restore(Ok(Some(saved.clone()))), 0);
        assert!(restored.fleet_unconfirmed && !restored.fleet_blind && !restored.cut_off);
        assert_eq!(restored.weight().0, 500);
        let back = apply(&restored, up, 1_000);
        assert!(back.cut_off);
        // A rolled-back phase sends nobody anyway: nothing to confirm.
        let saved = Record {
            phase: Phase::RolledBack {
                reason: "manual".into(),
            },
            ..saved
        };
        let rolled_back = apply(&down(), Input::Restore(Ok(Some(saved))), 0);
        assert!(!rolled_back.fleet_unconfirmed && !rolled_back.cut_off);
    }

    /// `make chaos` seed 727183: Sentinel flapped between two primaries, each with its own
    /// incarnation of the fleet's records. A replica that applied generation 6 on one
    /// ignored the other's generation 6 (another weight) after it moved there: generations
    /// of two incarnations are not ordered.
    #[test]
    fn a_record_of_another_incarnation_is_not_ordered_by_generation() {
        let sp = weighted(5);
        let at = |incarnation: &str, buckets, generation| FleetRecord {
            incarnation: incarnation.into(),
            ..record("v2", Phase::Weight { buckets }, generation)
        };
        let s = apply(&started(&sp), Input::Incarnation("x".into()), 1);
        let s = apply(&s, adopt(at("x", 500, 6), false), 2);
        assert_eq!((s.weight().0, s.fleet_generation), (500, 6));
        let s = apply(&s, Input::Incarnation("y".into()), 3);
        let s = apply(&s, adopt(at("y", 5_000, 6), false), 4);
        assert_eq!(s.weight().0, 5_000);
        // Within one incarnation, generations order as before.
        let s = apply(&s, adopt(at("y", 700, 6), false), 5);
        assert_eq!(s.weight().0, 5_000);
    }

    /// The records a step shares, in order.
    fn shares(out: &Outcome) -> Vec<FleetRecord> {
        out.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Share(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// The fleet store answering (`up`) or not.
    fn link(up: bool, settle_ms: u64) -> Input {
        Input::FleetLink { up, settle_ms }
    }

    /// A fleet record reaching this replica: its own write (`own`) or another's.
    fn adopt(record: FleetRecord, own: bool) -> Input {
        Input::Adopt { record, own }
    }

    /// A fleet record of route `app`.
    fn record(version: &str, phase: Phase, generation: u64) -> FleetRecord {
        FleetRecord {
            route: "app".into(),
            canary_version: version.into(),
            rolled_back: matches!(phase, Phase::RolledBack { .. }),
            step: phase.step(),
            paused: matches!(phase, Phase::Paused { .. }),
            phase,
            generation,
            weight_percent: 0.0,
            kind: "test".into(),
            reason: "test".into(),
            by: "other".into(),
            writer: "other/1/1".into(),
            at_ms: 0,
            mode: ShareMode::Cas,
            incarnation: String::new(),
            resumes: 0,
            unheard: false,
            file: None,
        }
    }

    /// Inputs for the property tests, with the time advancing between them.
    fn input() -> impl Strategy<Value = (u64, Input)> {
        let version = prop_oneof![Just(None), Just(Some("v2")), Just(Some("v3"))];
        let steps = prop::collection::vec((0u32..=BUCKETS, 0u64..3_000), 0..5);
        let spec_s = (version, steps, 1u32..4, any::<bool>()).prop_map(|(v, st, limit, an)| {
            let mut sp = spec(v, &st);
            sp.failure_limit = limit;
            sp.analysis_enabled = an;
            sp
        });
        let action = prop_oneof![
            (0u32..=BUCKETS).prop_map(Action::Weight),
            Just(Action::Rollback),
            Just(Action::Promote),
            Just(Action::Pause),
            Just(Action::Resume),
        ];
        let verdict = prop_oneof![
            Just(Verdict::Pass),
            Just(Verdict::Inconclusive),
            Just(fail())
        ];
        let phase = prop_oneof![
            Just(Phase::Manual),
            (0u32..=BUCKETS).prop_map(|buckets| Phase::Weight { buckets }),
            (0usize..6).prop_map(|step| Phase::Progressing { step, since_ms: 0 }),
            (0usize..6).prop_map(|step| Phase::Paused { step }),
            Just(Phase::Promoted),
            Just(Phase::RolledBack {
                reason: "latency".into()
            }),
        ];
        let saved = prop_oneof![
            Just(Ok(None)),
            Just(Err("app.json: not a Kanaria state file".to_string())),
            (
                prop_oneof![Just("v2"), Just("v3")],
                phase.clone(),
                any::<bool>()
            )
                .prop_map(|(v, phase, unshared)| Ok(Some(Record {
                    route: "app".into(),
                    canary_version: v.into(),
                    phase,
                    updated_ms: 0,
                    unshared,
                    resumes: 0,
                }))),
        ];
        let input = prop_oneof![
            3 => spec_s.prop_map(Input::Config),
            6 => action.prop_map(Input::Operator),
            // The epoch offset: 0 is current, others are stale.
            8 => (verdict, 0u64..3).prop_map(|(verdict, stale)| Input::Verdict { epoch: stale, verdict }),
            2 => Just(Input::CanaryUnhealthy { numbers: json!({"healthy_endpoints": 0}) }),
            4 => Just(Input::Tick),
            1 => Just(Input::Removed),
            1 => saved.prop_map(Input::Restore),
            // Generations are offsets from the current one, resolved in the test.
            3 => (prop_oneof![Just("v2"), Just("v3")], phase.clone(), 0u64..5, any::<bool>())
                .prop_map(|(v, phase, g, own)| Input::Adopt { record: record(v, phase, g), own }),
            2 => (any::<bool>(), 0u64..3_000).prop_map(|(up, settle_ms)| Input::FleetLink { up, settle_ms }),
        ];
        (0u64..2_000, input)
    }

    proptest! {
        // Failures are shrunk and printed; a case worth keeping becomes a named unit test
        // above (no regression files in the tree).
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn invariants_hold_over_long_event_sequences(
            first in prop_oneof![Just(None), Just(Some("v2"))],
            // fleet.on_partition: "hold", or "stable" after this many ms.
            cut_off_after in prop_oneof![Just(None), (0u64..3_000).prop_map(Some)],
            inputs in prop::collection::vec(input(), 1..200),
        ) {
            let sp = spec(first, &[(100, 500), (1_000, 0), (5_000, 1_000)]);
            let mut state = Some(started(&sp).in_fleet(true, cut_off_after, 0));
            let mut now = 0u64;
            for (dt, input) in inputs {
                now += dt;
                let s = match state.take() {
                    Some(s) => s,
                    // Re-added after removal: starts afresh, nothing remembered (the
                    // control module tells it whether the store answers).
                    None => {
                        let s = fresh(&sp, now).in_fleet(true, cut_off_after, now);
                        prop_assert_eq!(s.epoch, 0);
                        prop_assert_eq!(s.phase.clone(), Phase::Manual);
                        apply(&s, Input::Restore(Ok(None)), now)
                    }
                };
                // Verdicts name an epoch: the current one, or one before it.
                let input = match input {
                    Input::Verdict { epoch: back, verdict } => Input::Verdict {
                        epoch: s.epoch.saturating_sub(back),
                        verdict,
                    },
                    // Fleet generations around the one applied: older, equal, newer.
                    Input::Adopt { mut record, own } => {
                        record.generation = (s.fleet_generation + record.generation).saturating_sub(2);
                        Input::Adopt { record, own }
                    }
                    other => other,
                };
                let adopt = match &input {
                    Input::Adopt { record, .. } => Some(record.clone()),
                    _ => None,
                };
                let own_adopt = matches!(&input, Input::Adopt { own: true, .. });
                let advancing = matches!(
                    &input,
                    Input::Tick | Input::Verdict { .. } | Input::Operator(Action::Weight(_) | Action::Promote | Action::Pause | Action::Resume)
                );
                let stale = matches!(&input, Input::Verdict { epoch, .. } if *epoch != s.epoch);
                let version_changes = matches!(&input, Input::Config(sp) if sp.canary_version != s.canary_version);
                let resume = input == Input::Operator(Action::Resume);
                let tick = input == Input::Tick;
                let removed = input == Input::Removed;
                let restore = matches!(input, Input::Restore(_));
                let link = matches!(input, Input::FleetLink { .. });
                // A saved rollback of this version that the fleet never got.
                let pending = matches!(
                    &input,
                    Input::Restore(Ok(Some(r))) if r.unshared
                        && matches!(r.phase, Phase::RolledBack { .. })
                        && Some(&r.canary_version) == s.canary_version.as_ref()
                );
                let out = match step("app", &s, input, now) {
                    Ok(out) => out,
                    Err(_) => {
                        // A refusal changes nothing.
                        state = Some(s);
                        continue;
                    }
                };
                if removed {
                    prop_assert_eq!(out.next.as_ref(), None);
                    prop_assert!(out.effects.contains(&Effect::Forget));
                    continue;
                }
                let next = out.next.clone().expect("a state unless removed");
                // Adopted generations only increase (a new canary version starts at 0);
                // an older or equal one changes nothing; adopting shares back only a
                // rollback over a record that would undo it, or this replica's state over
                // a record that predates a resume it knows, and then changes nothing.
                if !version_changes {
                    prop_assert!(next.fleet_generation >= s.fleet_generation);
                }
                if let Some(rec) = &adopt {
                    let shares: Vec<&FleetRecord> = out.effects.iter().filter_map(|e| match e {
                        Effect::Share(r) => Some(r),
                        _ => None,
                    }).collect();
                    if !shares.is_empty() {
                        prop_assert_eq!(shares.len(), 1);
                        let latched = matches!(s.phase, Phase::RolledBack { .. });
                        let rollback_over = shares[0].rolled_back && !rec.rolled_back && latched;
                        let later_history = s.resumes > rec.resumes && shares[0].resumes == s.resumes;
                        prop_assert!(rollback_over || later_history);
                        prop_assert_eq!(&next, &s);
                    }
                    // (A later history, a rollback or an operator's resume not seen here,
                    // applies whatever its generation.)
                    let later = supersedes(rec.resumes, rec.rolled_back, s.resumes, matches!(s.phase, Phase::RolledBack { .. })) == Some(true);
                    let comparable = rec.incarnation.is_empty()
                        || s.generation_incarnation.is_empty()
                        || rec.incarnation == s.generation_incarnation;
                    if (rec.generation <= s.fleet_generation && !later && comparable)
                        || s.canary_version.as_deref() != Some(rec.canary_version.as_str())
                    {
                        prop_assert_eq!(&next, &s);
                        prop_assert!(out.effects.is_empty());
                    }
                    // A local rollback the fleet has not accepted is not undone (but by an
                    // operator's resume this replica has not seen).
                    if s.unshared_rollback && rec.resumes <= s.resumes {
                        let kept = matches!(next.phase, Phase::RolledBack { .. });
                        prop_assert!(kept, "a local rollback undone by {:?}", rec);
                    }
                }
                // Just after the fleet is back, a hold elapsing moves nothing.
                if tick && now < s.fleet_settle_until_ms {
                    prop_assert_eq!(stage(&next.phase), stage(&s.phase), "stepped within the settle after the fleet came back");
                }
                // With the fleet unreachable, nothing advances: only a rollback applies.
                if s.fleet_down && advancing {
                    let held = stage(&next.phase) == stage(&s.phase)
                        || matches!(next.phase, Phase::RolledBack { .. });
                    prop_assert!(held, "advanced with the fleet down: {:?} -> {:?}", s.phase, next.phase);
                }
                // Cut off only while the store is unreachable, past the timeout, and then
                // nobody goes to the canary; a tick or a change of the link decides it.
                // A record of another replica confirms a restarted process's phase.
                if next.fleet_heard {
                    prop_assert!(!next.fleet_unconfirmed);
                }
                if next.cut_off {
                    prop_assert!(next.fleet_unconfirmed || (next.fleet_down && next.cut_off_after_ms.is_some()));
                    prop_assert_eq!(next.weight().0, 0);
                }
                if tick || link {
                    let due = (next.fleet_unconfirmed && (next.fleet_blind || !next.fleet_down))
                        || (next.fleet_down
                            && cut_off_after.is_some_and(|t| now.saturating_sub(next.fleet_down_since_ms) >= t));
                    prop_assert_eq!(next.cut_off, due);
                }
                // The link never moves a phase nor shares anything: what the fleet decided
                // (or a local rollback) applies again when it is back.
                if link {
                    prop_assert_eq!(&next.phase, &s.phase);
                    prop_assert!(!out.effects.iter().any(|e| matches!(e, Effect::Share(_) | Effect::Persist(_))));
                }
                // A restored rollback that was never shared is shared first, by
                // compare-and-set (so it wins), and held against older views meanwhile.
                if pending {
                    prop_assert!(next.unshared_rollback);
                    let cas = out.effects.iter().any(|e| matches!(e, Effect::Share(r) if r.rolled_back && r.mode == ShareMode::Cas));
                    prop_assert!(cas, "a pending rollback restored without a share: {:?}", out.effects);
                }
                // What is persisted says whether a rollback waits to be shared.
                for e in &out.effects {
                    if let Effect::Persist(r) = e {
                        prop_assert_eq!(r.unshared, next.unshared_rollback);
                        let rolled = matches!(r.phase, Phase::RolledBack { .. });
                        prop_assert!(rolled || !r.unshared);
                    }
                }
                // A stale verdict is never applied.
                if stale {
                    prop_assert_eq!(&next, &s);
                    prop_assert!(out.effects.is_empty());
                }
                // The rollback latch.
                // An adopted record leaves it only if this process wrote it or it counts an
                // operator's resume this replica has not seen (the generated records count
                // none).
                let adopt_may_leave = adopt.as_ref().is_some_and(|_| own_adopt);
                if matches!(s.phase, Phase::RolledBack { .. }) && !(resume || version_changes || restore || adopt_may_leave) {
                    let latched = matches!(next.phase, Phase::RolledBack { .. });
                    prop_assert!(latched, "left the latch: {:?}", next.phase);
                    prop_assert_eq!(next.weight().0, 0);
                }
                // The weight is the phase's (0 while cut off), in range; a change of phase
                // is a new epoch and is published, persisted (with a canary) and emitted.
                let (w, _) = next.weight();
                prop_assert!(w <= BUCKETS);
                let phase_w = if next.cut_off { 0 } else { next.phase.weight(&next.spec).0 };
                prop_assert_eq!(w, phase_w);
                if next.canary_version.is_none() {
                    let sends_users = matches!(next.phase, Phase::Weight { .. } | Phase::Promoted);
                    prop_assert!(!sends_users, "no canary, yet {:?}", next.phase);
                }
                // (A failing evaluation restarts a step's hold: the same stage, no new epoch.)
                if stage(&next.phase) != stage(&s.phase) || next.canary_version != s.canary_version {
                    prop_assert!(next.epoch > s.epoch);
                    prop_assert!(out.effects.contains(&Effect::Publish));
                    prop_assert!(out.effects.iter().any(|e| matches!(e, Effect::Emit(_))));
                    if let Some(v) = &next.canary_version {
                        let persisted = out.effects.iter().any(
                            |e| matches!(e, Effect::Persist(r) if &r.canary_version == v && r.phase == next.phase),
                        );
                        prop_assert!(persisted);
                    }
                }
                // A rollout's step always exists in its steps.
                if let Some(i) = next.phase.step() {
                    prop_assert!(i < next.spec.steps.len(), "step {} of {}", i, next.spec.steps.len());
                }
                state = Some(next);
            }
        }

        /// Two replicas decide at once on the same fleet generation: one rolls back (an
        /// operator, a failing verdict, an unhealthy pool), the other raises, promotes or
        /// steps on. Whatever order the store sees the writes in, and however the
        /// records reach the replicas (late, twice, out of order), the fleet ends rolled
        /// back, and each replica's adopted generation only ever increases.
        #[test]
        fn a_rollback_always_wins_a_race(
            rollback in 0usize..3,
            raise in 0usize..3,
            writes_first in any::<bool>(),
            deliveries in prop::collection::vec((any::<bool>(), 0usize..8), 0..12),
        ) {
            let sp = spec(Some("v2"), &[(100, 0), (1_000, 0), (5_000, 0)]);
            let start = started(&sp);
            // The store holds the first replica's seed.
            let mut store = None;
            for r in shares(&step("app", &fresh(&sp, 0), Input::Restore(Ok(None)), 0).unwrap()) {
                let (written, rec) = decide(store.as_ref(), &r, "");
                if written {
                    store = Some(rec);
                }
            }
            let seeded = store.clone().unwrap();
            let a0 = apply(&start, Input::Adopt { record: seeded.clone(), own: false }, 1);
            let b0 = a0.clone();
            let down = match rollback {
                0 => Input::Operator(Action::Rollback),
                1 => Input::Verdict { epoch: a0.epoch, verdict: fail() },
                _ => Input::CanaryUnhealthy { numbers: json!({}) },
            };
            let up = match raise {
                0 => Input::Operator(Action::Weight(9_000)),
                1 => Input::Operator(Action::Promote),
                _ => Input::Verdict { epoch: b0.epoch, verdict: Verdict::Pass },
            };
            let out_a = step("app", &a0, down, 2).unwrap();
            let out_b = step("app", &b0, up, 2).unwrap();
            let mut a = out_a.next.clone().unwrap();
            let mut b = out_b.next.clone().unwrap();
            let rolled = matches!(a.phase, Phase::RolledBack { .. });
            prop_assert!(rolled);
            let (wa, wb) = (shares(&out_a), shares(&out_b));
            prop_assert_eq!(wa.len(), 1);
            let order: Vec<(bool, FleetRecord)> = if writes_first {
                wa.into_iter().map(|r| (true, r)).chain(wb.into_iter().map(|r| (false, r))).collect()
            } else {
                wb.into_iter().map(|r| (false, r)).chain(wa.into_iter().map(|r| (true, r))).collect()
            };
            // Every record the store answers with, as the replicas may receive it.
            let mut published = vec![seeded];
            for (from_a, mut r) in order {
                // The control module names the writing process.
                r.writer = if from_a { "a/1/1".into() } else { "b/1/1".into() };
                let (written, answer) = decide(store.as_ref(), &r, "");
                if written {
                    store = Some(answer.clone());
                }
                published.push(answer.clone());
                // The writer adopts the answer at once.
                let own = answer.writer == r.writer;
                let target = if from_a { &mut a } else { &mut b };
                let before = target.fleet_generation;
                *target = apply(target, Input::Adopt { record: answer, own }, 3);
                prop_assert!(target.fleet_generation >= before);
            }
            for (to_a, i) in deliveries {
                let rec = published[i % published.len()].clone();
                let target = if to_a { &mut a } else { &mut b };
                let before = target.fleet_generation;
                *target = apply(target, Input::Adopt { record: rec, own: false }, 4);
                prop_assert!(target.fleet_generation >= before);
            }
            // The poll: the store's record reaches both.
            let last = store.clone().unwrap();
            prop_assert!(last.rolled_back, "the store ended {:?}", last.phase);
            a = apply(&a, Input::Adopt { record: last.clone(), own: false }, 5);
            b = apply(&b, Input::Adopt { record: last, own: false }, 5);
            prop_assert!(matches!(a.phase, Phase::RolledBack { .. }), "a: {:?}", a.phase);
            prop_assert!(matches!(b.phase, Phase::RolledBack { .. }), "b: {:?}", b.phase);
            prop_assert_eq!(a.weight().0, 0);
            prop_assert_eq!(b.weight().0, 0);
        }

        /// A rollback decided while the store was unreachable, then a crash before it was
        /// shared: the state file says so, the restarted replica shares it first (by
        /// compare-and-set) and holds it against whatever the fleet's records say
        /// meanwhile, and the store takes it whatever the fleet did (or already has a
        /// rollback). Once the fleet has it, the state file no longer says it waits.
        #[test]
        fn a_rollback_not_yet_shared_survives_a_restart_and_wins(
            fleet_phase in prop_oneof![
                Just(Phase::Manual),
                (1u32..=BUCKETS).prop_map(|buckets| Phase::Weight { buckets }),
                (0usize..3).prop_map(|step| Phase::Progressing { step, since_ms: 0 }),
                Just(Phase::Promoted),
                Just(Phase::RolledBack { reason: "latency".into() }),
            ],
            fleet_generation in 1u64..20,
            // Records of the fleet that reach the restarted replica before its write lands.
            early in prop::collection::vec((0u64..25, 0u32..=BUCKETS), 0..6),
        ) {
            let sp = spec(Some("v2"), &[(2_000, 0), (5_000, 0)]);
            // Before the crash: the store unreachable, an operator's rollback.
            let s = started(&sp).in_fleet(true, None, 0);
            let s = apply(&s, Input::FleetLink { up: false, settle_ms: 0 }, 1);
            let out = step("app", &s, Input::Operator(Action::Rollback), 2).unwrap();
            let saved = out.effects.iter().rev().find_map(|e| match e {
                Effect::Persist(r) => Some(r.clone()),
                _ => None,
            }).expect("persisted");
            prop_assert!(saved.unshared);
            // The file goes through JSON like the real one.
            let saved: Record = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
            // After the restart.
            let out = step("app", &fresh(&sp, 10).in_fleet(false, None, 10), Input::Restore(Ok(Some(saved))), 10).unwrap();
            let mut r = out.next.clone().unwrap();
            let rolled = matches!(r.phase, Phase::RolledBack { .. });
            prop_assert!(rolled);
            prop_assert_eq!(r.weight().0, 0);
            let shares = shares(&out);
            prop_assert_eq!(shares.len(), 1);
            let mut share = shares[0].clone();
            prop_assert!(share.rolled_back && share.mode == ShareMode::Cas);
            r = apply(&r, Input::FleetLink { up: true, settle_ms: 0 }, 11);
            for (g, buckets) in early {
                r = apply(&r, Input::Adopt { record: record("v2", Phase::Weight { buckets }, g), own: false }, 12);
                prop_assert!(matches!(r.phase, Phase::RolledBack { .. }), "undone by an early record: {:?}", r.phase);
            }
            // The store holds what the fleet did meanwhile.
            let current = record("v2", fleet_phase, fleet_generation);
            share.writer = "me/1/1".into();
            let (written, answer) = decide(Some(&current), &share, "");
            prop_assert!(written || current.rolled_back);
            prop_assert!(answer.rolled_back);
            let own = answer.writer == share.writer;
            let out = step("app", &r, Input::Adopt { record: answer, own }, 13).unwrap();
            let r = out.next.unwrap();
            let rolled = matches!(r.phase, Phase::RolledBack { .. });
            prop_assert!(rolled);
            prop_assert!(!r.unshared_rollback);
            let last = out.effects.iter().rev().find_map(|e| match e {
                Effect::Persist(rec) => Some(rec.clone()),
                _ => None,
            });
            prop_assert!(last.is_some_and(|rec| !rec.unshared), "the state file still says the rollback waits");
        }

        /// `fleet.on_partition = "stable"`: whatever happens while the store is unreachable
        /// (ticks, the fleet's old records, an operator's rollback), the replica sends
        /// nobody to the canary once the timeout has passed, keeps its phase, and when the
        /// store answers the phase's weight applies again; a rollback decided meanwhile
        /// stays and is shared. With `"hold"`, the weight never moves with the link.
        #[test]
        fn a_replica_cut_off_sends_everyone_to_stable_until_the_store_answers(
            stable_policy in any::<bool>(),
            timeout in 1u64..5_000,
            ticks in prop::collection::vec(1u64..2_000, 1..20),
            rollback_at in prop::option::of(0usize..20),
        ) {
            let sp = spec(Some("v2"), &[(3_000, 600_000), (5_000, 0)]);
            let policy = stable_policy.then_some(timeout);
            let s = started(&sp).in_fleet(true, policy, 0);
            let before = s.weight().0;
            let mut s = apply(&s, Input::FleetLink { up: false, settle_ms: 0 }, 100);
            let mut now = 100;
            let mut rolled = false;
            for (i, dt) in ticks.iter().enumerate() {
                now += dt;
                if rollback_at == Some(i) {
                    let out = step("app", &s, Input::Operator(Action::Rollback), now).unwrap();
                    let shared = out.effects.iter().any(|e| matches!(e, Effect::Share(r) if r.rolled_back));
                    prop_assert!(shared);
                    s = out.next.unwrap();
                    rolled = true;
                }
                s = apply(&s, Input::Tick, now);
                let cut = stable_policy && now - 100 >= timeout;
                prop_assert_eq!(s.cut_off, cut);
                let expected = if cut || rolled { 0 } else { before };
                prop_assert_eq!(s.weight().0, expected);
                prop_assert_eq!(s.phase.name(), if rolled { "rolled_back" } else { "progressing" });
            }
            now += 1;
            let out = step("app", &s, Input::FleetLink { up: true, settle_ms: 0 }, now).unwrap();
            let back = out.next.unwrap();
            prop_assert!(!back.cut_off);
            prop_assert_eq!(back.weight().0, if rolled { 0 } else { before });
            prop_assert_eq!(back.unshared_rollback, rolled);
            let said = out.effects.iter().any(|e| matches!(e, Effect::Emit(ev) if ev.kind == "rejoined"));
            prop_assert_eq!(said, s.cut_off);
        }

        /// Three replicas and a model of the store ([`decide`]) over random interleavings
        /// of operators' actions, writes landing late, records delivered late, twice or
        /// out of order, polls (which re-seed an empty store and report a changed
        /// incarnation), the store losing its data, and replicas restarting with or
        /// without their state file. After every step: a replica leaves a rollback only by
        /// an operator's resume (its own, or a record counting one it has not seen), and
        /// the generation a replica applies never goes down (a replica restarted without
        /// its state starts over, as a new one). Once the writes have landed and everyone
        /// has polled, a rollback any replica still holds is the whole fleet's.
        #[test]
        fn a_rollback_survives_store_resets_and_replicas_without_state(
            ops in prop::collection::vec((0u8..10, 0usize..3, 0usize..64), 1..120),
        ) {
            let sp = spec(Some("v2"), &[(1_000, 0), (3_000, 0), (6_000, 0)]);
            struct Replica {
                s: RouteRollout,
                saved: Option<Record>,
                life: u64,
            }
            let boot = |saved: Option<Record>, now: u64| -> (RouteRollout, Vec<Effect>) {
                let s = fresh(&sp, now).in_fleet(true, None, now);
                let out = step("app", &s, Input::Restore(Ok(saved)), now).unwrap();
                (out.next.unwrap(), out.effects)
            };
            let mut store: Option<FleetRecord> = None;
            let mut incarnation: Option<u64> = None;
            let mut incarnations = 0u64;
            // Writes in flight: (replica, its life, the record); records published.
            let mut queue: Vec<(usize, u64, FleetRecord)> = Vec::new();
            let mut published: Vec<FleetRecord> = Vec::new();
            let mut resumes_issued = 0u64;
            let mut reps: Vec<Replica> = Vec::new();
            let mut now = 0u64;
            for _ in 0..3 {
                let (s, _) = boot(None, now);
                reps.push(Replica { s, saved: None, life: 0 });
            }
            // Carries out a replica's effects: its writes queue, its state file is kept.
            fn effects(r: &mut Replica, i: usize, effects: Vec<Effect>, queue: &mut Vec<(usize, u64, FleetRecord)>) {
                for e in effects {
                    match e {
                        Effect::Share(mut rec) => {
                            rec.writer = format!("{i}/{}", r.life);
                            queue.push((i, r.life, rec));
                        }
                        Effect::Persist(rec) => r.saved = Some(rec),
                        _ => {}
                    }
                }
            }
            // A poll of replica `i`: the incarnation (set if absent), then the record, or a
            // seed when the store has none.
            let poll = |r: &mut Replica, i: usize, now: u64, store: &Option<FleetRecord>, incarnation: &mut Option<u64>, incarnations: &mut u64, queue: &mut Vec<(usize, u64, FleetRecord)>| {
                let inc = *incarnation.get_or_insert_with(|| { *incarnations += 1; *incarnations });
                let mut fx = Vec::new();
                let out = step("app", &r.s, Input::Incarnation(inc.to_string()), now).unwrap();
                r.s = out.next.unwrap();
                fx.extend(out.effects);
                match store {
                    Some(rec) => {
                        let out = step("app", &r.s, Input::Adopt { record: rec.clone(), own: false }, now).unwrap();
                        r.s = out.next.unwrap();
                        fx.extend(out.effects);
                    }
                    None => fx.extend(share_record("app", &r.s, "seed", "seed", now, ShareMode::Seed).map(Effect::Share)),
                }
                effects(r, i, fx, queue);
            };
            // The store takes the oldest write in flight; its writer adopts the answer.
            let land = |k: usize, store: &mut Option<FleetRecord>, incarnation: &mut Option<u64>, incarnations: &mut u64, queue: &mut Vec<(usize, u64, FleetRecord)>, published: &mut Vec<FleetRecord>, reps: &mut Vec<Replica>, now: u64| {
                if queue.is_empty() {
                    return;
                }
                let (i, life, rec) = queue.remove(k % queue.len());
                // The script stamps the store's incarnation (set if it has none).
                let inc = incarnation.get_or_insert_with(|| { *incarnations += 1; *incarnations }).to_string();
                let (written, answer) = decide(store.as_ref(), &rec, &inc);
                if written {
                    *store = Some(answer.clone());
                    published.push(answer.clone());
                }
                let r = &mut reps[i];
                if r.life == life {
                    let own = answer.writer == rec.writer;
                    let out = step("app", &r.s, Input::Adopt { record: answer, own }, now).unwrap();
                    r.s = out.next.unwrap();
                    effects(r, i, out.effects, queue);
                }
            };
            for (op, i, k) in ops {
                now += 10;
                let before: Vec<(RouteRollout, u64)> = reps.iter().map(|r| (r.s.clone(), r.life)).collect();
                let mut resumed = None;
                let mut kept_state = false;
                match op {
                    0 => {
                        let out = step("app", &reps[i].s, Input::Operator(Action::Rollback), now);
                        if let Ok(out) = out {
                            reps[i].s = out.next.unwrap();
                            effects(&mut reps[i], i, out.effects, &mut queue);
                        }
                    }
                    1 => {
                        let action = match k % 3 {
                            0 => Action::Weight((k as u32 * 150).min(BUCKETS)),
                            1 => Action::Promote,
                            _ => Action::Resume,
                        };
                        if let Ok(out) = step("app", &reps[i].s, Input::Operator(action), now) {
                            if action == Action::Resume && matches!(reps[i].s.phase, Phase::RolledBack { .. }) {
                                resumes_issued += 1;
                                resumed = Some(i);
                            }
                            reps[i].s = out.next.unwrap();
                            effects(&mut reps[i], i, out.effects, &mut queue);
                        }
                    }
                    2 | 3 => land(k, &mut store, &mut incarnation, &mut incarnations, &mut queue, &mut published, &mut reps, now),
                    4 => {
                        // A published record delivered (again, late or out of order).
                        if !published.is_empty() {
                            let rec = published[k % published.len()].clone();
                            let out = step("app", &reps[i].s, Input::Adopt { record: rec, own: false }, now).unwrap();
                            reps[i].s = out.next.unwrap();
                            effects(&mut reps[i], i, out.effects, &mut queue);
                        }
                    }
                    5 | 6 => poll(&mut reps[i], i, now, &store, &mut incarnation, &mut incarnations, &mut queue),
                    7 => {
                        // The store restarts empty, or fails over to a replica that never
                        // had the data.
                        store = None;
                        incarnation = None;
                    }
                    8 => {
                        // A restart, with the state file or (one time in three) without.
                        let saved = if k % 3 == 0 { None } else { reps[i].saved.clone() };
                        kept_state = saved.is_some();
                        let r = &mut reps[i];
                        r.life += 1;
                        r.saved = saved.clone();
                        let (s, fx) = boot(saved, now);
                        r.s = s;
                        effects(r, i, fx, &mut queue);
                    }
                    _ => {
                        let e = reps[i].s.epoch;
                        let v = if k % 2 == 0 { Verdict::Pass } else { fail() };
                        let out = step("app", &reps[i].s, Input::Verdict { epoch: e, verdict: v }, now).unwrap();
                        reps[i].s = out.next.unwrap();
                        effects(&mut reps[i], i, out.effects, &mut queue);
                    }
                }
                for (j, (b, life)) in before.iter().enumerate() {
                    let a = &reps[j].s;
                    if reps[j].life != *life {
                        // Restarted: with its state file it keeps its rollback.
                        if matches!(b.phase, Phase::RolledBack { .. }) && kept_state {
                            let rolled = matches!(a.phase, Phase::RolledBack { .. });
                            prop_assert!(rolled, "replica {} lost its rollback in a restart: {:?}", j, a.phase);
                        }
                        continue;
                    }
                    prop_assert!(a.fleet_generation >= b.fleet_generation, "replica {}: generation {} -> {}", j, b.fleet_generation, a.fleet_generation);
                    if matches!(b.phase, Phase::RolledBack { .. }) && !matches!(a.phase, Phase::RolledBack { .. }) {
                        // Left the latch: its own resume, or a record counting one.
                        let by_operator = resumed == Some(j) || (a.resumes > b.resumes && a.resumes <= resumes_issued);
                        prop_assert!(by_operator, "replica {} left its rollback without an operator: {:?}", j, a.phase);
                    }
                }
            }
            // Quiet: every write lands, everyone polls, until nothing is left in flight.
            // (A rollback an operator's resume has not yet overtaken: one decided after the
            // newest resume anywhere.)
            let newest_resume = reps.iter().map(|r| r.s.resumes)
                .chain(queue.iter().map(|(_, _, r)| r.resumes))
                .chain(store.iter().map(|r| r.resumes))
                .max().unwrap_or(0);
            let holds = reps.iter().any(|r| matches!(r.s.phase, Phase::RolledBack { .. }) && r.s.resumes >= newest_resume);
            for _ in 0..20 {
                now += 10;
                while !queue.is_empty() {
                    land(0, &mut store, &mut incarnation, &mut incarnations, &mut queue, &mut published, &mut reps, now);
                }
                for (i, r) in reps.iter_mut().enumerate() {
                    poll(r, i, now, &store, &mut incarnation, &mut incarnations, &mut queue);
                }
                if queue.is_empty() {
                    break;
                }
            }
            prop_assert!(queue.is_empty(), "writes still in flight");
            if holds {
                for (i, r) in reps.iter().enumerate() {
                    let rolled = matches!(r.s.phase, Phase::RolledBack { .. });
                    prop_assert!(rolled, "replica {} ends {:?} after a rollback", i, r.s.phase);
                    prop_assert_eq!(r.s.weight().0, 0);
                }
                prop_assert!(store.as_ref().is_some_and(|s| s.rolled_back));
            }
        }

        /// Whatever the steps became, passing evaluations finish the rollout.
        #[test]
        fn a_rollout_can_always_finish(
            before in prop::collection::vec((0u32..=BUCKETS, 0u64..2_000), 1..6),
            after in prop::collection::vec((0u32..=BUCKETS, 0u64..2_000), 1..6),
            passes in 0usize..6,
        ) {
            let mut s = started(&spec(Some("v2"), &before));
            let mut now = 0;
            for _ in 0..passes {
                now += 2_000;
                let e = s.epoch;
                s = apply(&s, Input::Verdict { epoch: e, verdict: Verdict::Pass }, now);
            }
            s = apply(&s, Input::Config(spec(Some("v2"), &after)), now);
            for _ in 0..=after.len() * 2 {
                now += 2_000;
                let e = s.epoch;
                s = apply(&s, Input::Verdict { epoch: e, verdict: Verdict::Pass }, now);
            }
            prop_assert_eq!(s.phase, Phase::Promoted);
        }
    }
}
