//! The in-process tier: the control plane driven by hand, on a clock that moves only when
//! told to.
//!
//! Each test builds the real [`Control`] from a config string, with the real rollout
//! machine, the real analysis loop and real state files (in a temporary directory), on a
//! [`ManualClock`]. No request is proxied and nothing touches the network: the endpoints
//! are addresses of TEST-NET-1 that nobody listens on, health checks are off, and the
//! outcomes the analysis judges are recorded into the route's windows by the test, at the
//! clock's readings. The test advances the clock and runs one pass of the analysis loop
//! ([`AnalysisLoop::tick`]); so a rollout whose steps hold for an hour finishes in
//! milliseconds, and no assertion waits for a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use kanaria::clock::{Clock, ManualClock};
use kanaria::control::analysis_loop::AnalysisLoop;
use kanaria::control::fleet::Replica;
use kanaria::control::{Control, ControlError, OperatorAction};
use kanaria::rollout::machine::{FleetRecord, ShareMode};
use kanaria::rollout::phase::Phase;
use kanaria::runtime::build::SystemResolver;
use kanaria::split::Track;

const HOUR: Duration = Duration::from_secs(3600);
const HALF_HOUR: Duration = Duration::from_secs(1800);

/// Canary buckets (of 10,000) of each step, and each step's hold.
const STEPS: [u32; 3] = [1_000, 5_000, 10_000];
const HOLDS: [Duration; 3] = [HOUR, HOUR, Duration::ZERO];

/// One route with a three-step rollout; `STATE` is replaced by a state directory (or the
/// `[state]` table dropped).
const CONFIG: &str = r#"
[state]
dir = "STATE"

[[routes]]
name = "app"
[routes.stable]
version = "v1"
endpoints = ["192.0.2.1:8080"]
[routes.canary]
version = "v2"
endpoints = ["192.0.2.2:8080"]
[routes.analysis]
max_error_rate = 0.1
[routes.rollout]
steps = [{ weight = 10, hold = "1h" }, { weight = 50, hold = "1h" }, { weight = 100 }]
"#;

fn config_with_state(dir: &Path) -> String {
    CONFIG.replace("STATE", &dir.join("state").display().to_string())
}

fn config_in_memory() -> String {
    CONFIG.replace("[state]\ndir = \"STATE\"\n", "")
}

/// A control plane on `clock`, from a config string.
struct Plane {
    clock: Arc<ManualClock>,
    control: Arc<Control>,
    analysis: AnalysisLoop,
}

impl Plane {
    fn start(src: &str, clock: &Arc<ManualClock>) -> Plane {
        let config = kanaria::config::load_str(src, "control_plane.toml").expect("config");
        let control = Control::with(
            config,
            PathBuf::from("control_plane.toml"),
            clock.clone(),
            Box::new(SystemResolver),
        )
        .expect("control");
        let analysis = AnalysisLoop::new(control.clone());
        Plane {
            clock: clock.clone(),
            control,
            analysis,
        }
    }

    /// `requests` finished attempts of `track`, `errors` of them failed, recorded now (by
    /// the manual clock), as the request path would have recorded them.
    fn record(&self, track: Track, requests: u64, errors: u64) {
        let live = self.control.live.load();
        let window = &live.route_metrics[0].version(track).window;
        let now = self.clock.now();
        for i in 0..requests {
            window.record(now, i < errors, 0.010);
        }
    }

    /// `by` passes; then both versions answer 40 requests, `canary_errors` of the canary's
    /// failing, and the analysis loop runs once.
    fn after(&self, by: Duration, canary_errors: u64) {
        self.clock.advance(by);
        self.record(Track::Stable, 40, 0);
        self.record(Track::Canary, 40, canary_errors);
        self.analysis.tick();
    }

    /// The canary buckets requests see now.
    fn weight(&self) -> u32 {
        self.control.snapshot().routes[0].split.canary_buckets
    }

    fn phase(&self) -> Phase {
        self.control.route_control("app").expect("route").phase
    }

    /// (state, step, published weight).
    fn stage(&self) -> (&'static str, Option<usize>, u32) {
        let phase = self.phase();
        (phase.name(), phase.step(), self.weight())
    }

    /// The events after the start, as (kind, weight %, reason).
    fn events(&self) -> Vec<(String, f64, String)> {
        self.control
            .events()
            .into_iter()
            .skip(1)
            .map(|e| (e.kind, e.weight_percent, e.reason))
            .collect()
    }
}

/// (a) Steps held for an hour each: the rollout advances as the clock does, one step per
/// hour of passing analysis, and is promoted two hours in, in milliseconds of real time.
#[test]
fn an_hour_long_rollout_finishes_in_milliseconds() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let p = Plane::start(&config_with_state(dir.path()), &clock);
    let t0 = clock.now_ms();
    assert_eq!(p.stage(), ("progressing", Some(0), STEPS[0]));

    // Half the hold: the analysis passes, the step stays.
    p.after(HALF_HOUR, 0);
    let state = p.control.route_control("app").unwrap();
    assert_eq!(state.last_verdict, "pass");
    assert_eq!(p.stage(), ("progressing", Some(0), STEPS[0]));
    // The whole hold with a passing evaluation in it: the next step.
    p.after(HALF_HOUR, 0);
    assert_eq!(p.stage(), ("progressing", Some(1), STEPS[1]));
    p.after(HALF_HOUR, 0);
    assert_eq!(p.stage(), ("progressing", Some(1), STEPS[1]));
    // The second hold: the last step has none, so the same pass promotes.
    p.after(HALF_HOUR, 0);
    assert_eq!(p.stage(), ("promoted", None, STEPS[2]));

    let at: Vec<(String, u64)> = p
        .control
        .events()
        .into_iter()
        .skip(1)
        .map(|e| (e.kind, e.at_ms - t0))
        .collect();
    let hours = |h: u64| h * 3_600_000;
    assert_eq!(
        at,
        [
            ("step".to_string(), hours(1)),
            ("step".to_string(), hours(2)),
            ("promoted".to_string(), hours(2)),
        ]
    );
    let weights: Vec<f64> = p.events().iter().map(|e| e.1).collect();
    assert_eq!(weights, [50.0, 100.0, 100.0]);
    // Two hours of rollout; the bound only says no step waited for the real clock.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// (b) Failing canary requests recorded at the clock's now fail the next evaluation, and
/// the rollback is one publication: the state, the snapshot's weight and the published
/// state change together, and the state file says so.
#[test]
fn canary_errors_roll_back_in_one_publication() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let p = Plane::start(&config_with_state(dir.path()), &clock);
    let before = p.control.live.load();
    assert_eq!(before.snapshot.routes[0].split.canary_buckets, STEPS[0]);

    // 20 of 40 canary requests fail; stable's all pass.
    p.after(Duration::from_secs(600), 20);

    let state = p.control.route_control("app").unwrap();
    let live = p.control.live.load();
    assert_eq!(
        state.phase,
        Phase::RolledBack {
            reason: "error_rate".into()
        }
    );
    assert_eq!(live.snapshot.routes[0].split.canary_buckets, 0);
    assert_eq!(live.states[0], "rolled_back");
    assert_eq!(
        live.snapshot.generation,
        before.snapshot.generation + 1,
        "the rollback is published once"
    );
    let event = p.control.events().pop().unwrap();
    assert_eq!(
        (event.kind.as_str(), event.reason.as_str()),
        ("rollback", "error_rate")
    );
    assert_eq!(event.at_ms, clock.now_ms());
    assert_eq!(event.numbers["canary_errors"], 20);
    assert_eq!(event.numbers["stable_errors"], 0);
    p.control.flush_state();
    let saved = std::fs::read_to_string(dir.path().join("state/app.json")).unwrap();
    assert!(saved.contains("rolled_back"), "{saved}");

    // A latch: hours of healthy canary traffic later, nobody is back on the canary.
    for _ in 0..4 {
        p.after(HOUR, 0);
        assert_eq!(p.stage(), ("rolled_back", None, 0));
    }
}

/// (c) A paused rollout holds its step however long passes; resumed, its hold starts
/// again; paused, it still rolls back on failure.
#[test]
fn a_paused_rollout_does_not_advance() {
    let clock = Arc::new(ManualClock::new());
    let p = Plane::start(&config_in_memory(), &clock);
    p.after(HALF_HOUR, 0);
    p.control.act("app", OperatorAction::Pause).unwrap();
    for _ in 0..24 {
        p.after(HOUR, 0);
        assert_eq!(p.stage(), ("paused", Some(0), STEPS[0]));
    }
    // Resumed: a whole hold again from now, not from when the step began.
    p.control.act("app", OperatorAction::Resume).unwrap();
    p.after(HALF_HOUR, 0);
    assert_eq!(p.stage(), ("progressing", Some(0), STEPS[0]));
    p.after(HALF_HOUR, 0);
    assert_eq!(p.stage(), ("progressing", Some(1), STEPS[1]));
    // Paused does not mean unwatched.
    p.control.act("app", OperatorAction::Pause).unwrap();
    p.after(Duration::from_secs(60), 30);
    assert_eq!(p.stage(), ("rolled_back", None, 0));
}

/// (d) A restart (a new `Control` from the same state directory, the same clock) goes on
/// where the last one was: the step and its hold, and a rollback's latch.
#[test]
fn rollout_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let src = config_with_state(dir.path());
    let clock = Arc::new(ManualClock::new());

    let p = Plane::start(&src, &clock);
    p.after(HALF_HOUR, 0);
    p.after(HALF_HOUR, 0);
    p.after(HALF_HOUR, 0);
    assert_eq!(p.stage(), ("progressing", Some(1), STEPS[1]));
    p.control.flush_state();
    drop(p);

    // Half an hour into step 1, restored with its weight before any tick.
    let p = Plane::start(&src, &clock);
    assert_eq!(p.stage(), ("progressing", Some(1), STEPS[1]));
    assert_eq!(p.control.events()[0].kind, "restored");
    // The hold counts from when the step began, before the restart; the analysis must
    // pass again after it (it does, with the hold already over: the last step).
    p.after(HALF_HOUR, 0);
    assert_eq!(p.stage(), ("progressing", Some(2), STEPS[2]));
    p.analysis.tick();
    assert_eq!(p.stage(), ("promoted", None, STEPS[2]));

    // A rollback is kept too (alone, nothing waits to be shared).
    p.control.act("app", OperatorAction::Rollback).unwrap();
    let saved = std::fs::read_to_string(dir.path().join("state/app.json")).unwrap();
    assert!(
        saved.contains("rolled_back") && !saved.contains("unshared"),
        "{saved}"
    );
    drop(p);
    let p = Plane::start(&src, &clock);
    assert_eq!(p.stage(), ("rolled_back", None, 0));
    p.after(HOUR, 0);
    assert_eq!(p.stage(), ("rolled_back", None, 0));
}

/// A `[fleet]` section whose store is never reached: no fleet service runs in process, so
/// the link is down from the start until the test says otherwise ([`Replica::fleet_link`]),
/// and the fleet's records arrive only when the test hands them over ([`Replica::adopt`]).
fn with_fleet(src: &str, on_partition: &str) -> String {
    format!(
        "{src}\n[fleet]\nurl = \"redis://192.0.2.1:6379/0\"\ncluster = \"test\"\ninstance = \"a\"\non_partition = \"{on_partition}\"\npartition_timeout = \"30s\"\n"
    )
}

/// A record of route `app` as another replica (or this one, `writer`) wrote it.
fn fleet_record(phase: Phase, generation: u64, writer: &str) -> FleetRecord {
    FleetRecord {
        route: "app".into(),
        canary_version: "v2".into(),
        rolled_back: matches!(phase, Phase::RolledBack { .. }),
        step: phase.step(),
        paused: false,
        phase,
        generation,
        weight_percent: 0.0,
        kind: "test".into(),
        reason: "test".into(),
        by: "b".into(),
        writer: writer.into(),
        at_ms: 0,
        mode: ShareMode::Cas,
        incarnation: String::new(),
        resumes: 0,
        unheard: false,
        file: None,
    }
}

/// The store answers for 3 s, longer than `poll_interval` + 250 ms: the phase a process
/// started with is confirmed, and it sends users to the canary from then on.
fn confirmed(p: &Plane) {
    p.control.fleet_link(true);
    p.clock.advance(Duration::from_secs(3));
    p.analysis.tick();
}

/// (e) `fleet.on_partition = "stable"`: 30 s without the store and every user goes to
/// stable, the phase kept; the link back, the phase's weight (or the fleet's newer record)
/// applies again; a rollback decided while cut off stays when the link returns.
#[test]
fn a_replica_cut_off_from_the_fleet_sends_everyone_to_stable_after_the_timeout() {
    let clock = Arc::new(ManualClock::new());
    let p = Plane::start(&with_fleet(&config_in_memory(), "stable"), &clock);
    let cut_off = |p: &Plane| p.control.route_control("app").unwrap().cut_off;
    // Started without a saved state while the store does not answer, it cannot know what
    // the fleet decided: nobody to the canary until the store has answered for a while.
    assert_eq!(p.stage(), ("progressing", Some(0), 0));
    assert!(cut_off(&p));
    confirmed(&p);
    assert!(!cut_off(&p));
    p.control.fleet_link(false);
    assert_eq!(p.stage(), ("progressing", Some(0), STEPS[0]));

    p.clock.advance(Duration::from_secs(29));
    p.analysis.tick();
    assert_eq!(p.stage(), ("progressing", Some(0), STEPS[0]));
    p.clock.advance(Duration::from_secs(1));
    p.analysis.tick();
    assert_eq!(
        p.stage(),
        ("progressing", Some(0), 0),
        "still on the canary, cut off for 30 s"
    );
    assert!(cut_off(&p));
    assert_eq!(
        p.control.snapshot().routes[0].weight_source.as_str(),
        "cut_off"
    );
    let event = p.control.events().pop().unwrap();
    assert_eq!(event.kind, "cut_off");
    assert!(event.reason.contains("30s"), "{}", event.reason);

    // Back in touch: the phase's weight, then the fleet's newer record.
    p.control.fleet_link(true);
    assert_eq!(p.stage(), ("progressing", Some(0), STEPS[0]));
    assert!(!cut_off(&p));
    assert_eq!(p.control.events().pop().unwrap().kind, "rejoined");
    p.control.fleet_link(false);
    p.control
        .adopt(fleet_record(Phase::Weight { buckets: 3_000 }, 4, "b/1/1"));
    assert_eq!(p.weight(), 3_000);

    // Cut off again; an operator's rollback meanwhile applies here, is not shared yet, and
    // stays when the link returns (the fleet's older view does not undo it).
    p.clock.advance(Duration::from_secs(30));
    p.analysis.tick();
    assert_eq!(p.weight(), 0);
    let answer = p.control.act("app", OperatorAction::Rollback);
    assert!(
        matches!(&answer, Err(ControlError::NotShared(_))),
        "{answer:?}"
    );
    assert!(answer
        .unwrap_err()
        .to_string()
        .starts_with("applied locally, not yet shared"));
    p.control.fleet_link(true);
    p.control
        .adopt(fleet_record(Phase::Weight { buckets: 3_000 }, 5, "b/1/1"));
    assert_eq!(p.stage(), ("rolled_back", None, 0));
    assert!(p.control.route_control("app").unwrap().unshared_rollback);
}

/// With `"hold"` (the default), a replica cut off for hours keeps its weight.
#[test]
fn a_replica_cut_off_with_hold_keeps_its_weight() {
    let clock = Arc::new(ManualClock::new());
    let p = Plane::start(&with_fleet(&config_in_memory(), "hold"), &clock);
    // The store answered (see the test above), then not for hours.
    confirmed(&p);
    p.control.fleet_link(false);
    for _ in 0..4 {
        p.after(HOUR, 0);
        assert_eq!(p.stage(), ("progressing", Some(0), STEPS[0]));
    }
    assert!(!p.control.route_control("app").unwrap().cut_off);
}

/// (f) A rollback applied while the store does not answer is in the state file as not yet
/// shared; a restart restores it as such, the fleet's records do not undo it, and once
/// the fleet has it the file says so (a later restart follows the fleet's record of an
/// operator's resume).
#[test]
fn a_rollback_not_yet_shared_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let src = with_fleet(&config_with_state(dir.path()), "hold");
    let file = dir.path().join("state/app.json");
    let clock = Arc::new(ManualClock::new());

    let p = Plane::start(&src, &clock);
    let answer = p.control.act("app", OperatorAction::Rollback);
    assert!(
        matches!(&answer, Err(ControlError::NotShared(_))),
        "{answer:?}"
    );
    assert_eq!(p.stage(), ("rolled_back", None, 0));
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(saved.contains("\"unshared\": true"), "{saved}");
    drop(p);

    // kill -9 and back: the fleet's newer, progressing record does not undo it.
    let p = Plane::start(&src, &clock);
    assert_eq!(p.stage(), ("rolled_back", None, 0));
    assert!(p.control.route_control("app").unwrap().unshared_rollback);
    p.control.fleet_link(true);
    let progressing = Phase::Progressing {
        step: 1,
        since_ms: 0,
    };
    p.control
        .adopt(fleet_record(progressing.clone(), 7, "b/1/1"));
    assert_eq!(p.stage(), ("rolled_back", None, 0));
    // The store took it (its answer is this process's own record): nothing waits.
    let me = p.control.fleet.as_ref().unwrap().writer_id.clone();
    let rollback = Phase::RolledBack {
        reason: "manual".into(),
    };
    p.control.adopt(fleet_record(rollback, 8, &me));
    assert!(!p.control.route_control("app").unwrap().unshared_rollback);
    p.control.flush_state();
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(!saved.contains("unshared"), "{saved}");
    drop(p);

    // Shared: after a restart a record that does not count an operator's resume does not
    // undo it (a fresh replica's seed into a store that lost its data); the fleet's record
    // of an operator's resume applies.
    let p = Plane::start(&src, &clock);
    assert_eq!(p.stage(), ("rolled_back", None, 0));
    p.control
        .adopt(fleet_record(progressing.clone(), 9, "b/1/1"));
    assert_eq!(p.stage(), ("rolled_back", None, 0));
    let mut resumed = fleet_record(progressing, 10, "b/1/1");
    resumed.resumes = 1;
    p.control.adopt(resumed);
    assert_eq!(p.stage(), ("progressing", Some(1), STEPS[1]));
}

/// What a property test does to the control plane.
#[derive(Debug, Clone)]
enum Op {
    /// The clock moves (minutes).
    Advance(u64),
    /// Both versions answer 40 requests, this many of the canary's failing.
    Traffic(u64),
    /// One pass of the analysis loop.
    Tick,
    Pause,
    Resume,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..=90).prop_map(Op::Advance),
        4 => prop_oneof![4 => Just(0u64), 1 => 0u64..=40].prop_map(Op::Traffic),
        6 => Just(Op::Tick),
        1 => Just(Op::Pause),
        1 => Just(Op::Resume),
    ]
}

proptest! {
    // Failures are shrunk and printed; a case worth keeping becomes a named test above.
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Whatever the clock, the traffic and the operator do: what is published is the
    /// phase's weight, the current step's and never more; the weight only goes down by a
    /// rollback; and a step is left only from a progressing rollout whose hold has passed
    /// by the clock since it was entered.
    #[test]
    fn the_weight_follows_the_steps_and_the_clock(ops in prop::collection::vec(op(), 1..80)) {
        let clock = Arc::new(ManualClock::new());
        let p = Plane::start(&config_in_memory(), &clock);
        let mut last = p.phase();
        let mut last_weight = p.weight();
        let mut entered_ms = clock.now_ms();
        for op in ops {
            match op {
                Op::Advance(minutes) => clock.advance(Duration::from_secs(minutes * 60)),
                Op::Traffic(errors) => {
                    p.record(Track::Stable, 40, 0);
                    p.record(Track::Canary, 40, errors);
                }
                Op::Tick => p.analysis.tick(),
                // Refused when they do not apply (pausing what is not progressing).
                Op::Pause => { let _ = p.control.act("app", OperatorAction::Pause); }
                Op::Resume => { let _ = p.control.act("app", OperatorAction::Resume); }
            }
            // The state first, then the snapshot (at least as new: `Control::controls`).
            let phase = p.phase();
            let live = p.control.live.load();
            let weight = live.snapshot.routes[0].split.canary_buckets;
            prop_assert_eq!(live.states[0], phase.name());
            let expected = match &phase {
                Phase::Progressing { step, .. } | Phase::Paused { step } => STEPS[*step],
                Phase::Promoted => 10_000,
                Phase::RolledBack { .. } => 0,
                other => return Err(TestCaseError::fail(format!("unexpected phase {other:?}"))),
            };
            prop_assert_eq!(weight, expected, "{:?}", phase);
            if weight < last_weight {
                prop_assert!(matches!(phase, Phase::RolledBack { .. }), "{:?} → {:?}", last, phase);
            }
            let forward = match (&last, &phase) {
                (Phase::Progressing { step: a, .. } | Phase::Paused { step: a }, Phase::Progressing { step: b, .. } | Phase::Paused { step: b }) => b > a,
                (Phase::Progressing { .. } | Phase::Paused { .. }, Phase::Promoted) => true,
                _ => false,
            };
            if forward {
                let Phase::Progressing { step, .. } = last else {
                    return Err(TestCaseError::fail(format!("{last:?} moved on to {phase:?}")));
                };
                let held = clock.now_ms() - entered_ms;
                prop_assert!(
                    held >= HOLDS[step].as_millis() as u64,
                    "step {} left after {} ms", step, held
                );
            }
            if (phase.name(), phase.step()) != (last.name(), last.step()) {
                entered_ms = clock.now_ms();
            }
            last = phase;
            last_weight = weight;
        }
    }
}
