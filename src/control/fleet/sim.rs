//! The fleet simulated (tests only), after TigerBeetle's VOPR: N replicas' real control
//! planes ([`Control`], the rollout machine, the analysis loop, state files) and the real
//! fleet decisions ([`FleetService::poll`], [`FleetService::write_one`], the subscription's
//! adoption) over the seeded [`MemoryStore`], on one [`ManualClock`]. One seed decides
//! everything: the interleaving of operator actions (rollback, resume, weight, promote,
//! pause, a new canary version whose file reaches each replica at its own time), analysis
//! verdicts on good or failing traffic, polls, writes, deliveries, store faults (restart
//! empty, restart older, a replica cut off and healed, publications dropped, delayed and
//! reordered) and replica crashes (with or without the state dir).
//!
//! After every step: a rollback applied on a replica is never undone there without an
//! operator's resume (a new canary version is another record), no replica counts more
//! resumes than operators gave, a replica's generation for a record never goes down, and
//! the store never replaces a rollback by an earlier history while it holds the record.
//! After the last step every fault heals and a few rounds of polls run: every replica then
//! serves the store's record. A failure prints the seed and the step log;
//! `SEED=<seed> cargo test --all-features --lib fleet::sim` replays it exactly.
//! `SIM_SEEDS` (default 100) and `SIM_STEPS` (default 300) size a run.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use futures::executor::block_on;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;

use super::memory_store::{Handle, MemoryStore, Rng};
use super::store::Store;
use super::{FleetService, Job, Replica, Writes};
use crate::clock::{Clock, ManualClock};
use crate::control::analysis_loop::AnalysisLoop;
use crate::control::{Control, OperatorAction};
use crate::rollout::machine::FleetRecord;
use crate::rollout::phase::Phase;
use crate::runtime::build::SystemResolver;
use crate::split::Track;

const ROUTE: &str = "app";

/// Replica `instance`'s config file: canary `v<version>`, state in `state`.
fn config(state: &Path, instance: usize, version: u64, on_partition: &str) -> String {
    format!(
        r#"
[state]
dir = "{state}"

[fleet]
url = "redis://192.0.2.1:6379/0"
cluster = "sim"
instance = "r{instance}"
poll_interval = "1s"
on_partition = "{on_partition}"
partition_timeout = "30s"

[[routes]]
name = "app"
stable = {{ version = "v1", endpoints = ["192.0.2.1:8080"] }}
canary = {{ version = "v{version}", endpoints = ["192.0.2.2:8080"] }}
analysis = {{ max_error_rate = 0.1 }}
rollout = {{ steps = [{{ weight = 10, hold = "20s" }}, {{ weight = 50, hold = "20s" }}, {{ weight = 100 }}] }}
"#,
        state = state.display()
    )
}

/// A replica while its process runs.
struct Up {
    control: Arc<Control>,
    service: FleetService,
    analysis: AnalysisLoop,
    store: Arc<Handle>,
    /// The writer's queue as the control plane fills it, and what the simulation took
    /// from it and has not written yet (in order).
    jobs: mpsc::UnboundedReceiver<Job>,
    backlog: VecDeque<Job>,
    writes: Writes,
    subscription: Option<BoxStream<'static, FleetRecord>>,
}

impl Up {
    /// Moves what the control plane queued into the backlog.
    fn pull(&mut self) {
        while let Ok(job) = self.jobs.try_recv() {
            self.backlog.push_back(job);
        }
    }

    /// Writes the oldest queued record. Returns whether there was one.
    fn write_next(&mut self) -> bool {
        self.pull();
        let Some(job) = self.backlog.pop_front() else {
            return false;
        };
        block_on(self.service.write_one(&*self.store, job, &mut self.writes));
        true
    }

    /// One poll, as the poller runs it.
    fn poll(&self) -> bool {
        let answered = block_on(self.service.poll(&*self.store)).is_ok();
        self.service.polled(answered);
        answered
    }

    /// Adopts what the subscription has brought; subscribes again when it ended.
    fn receive(&mut self) -> usize {
        let mut adopted = 0;
        if self.subscription.is_none() {
            self.subscription = block_on(self.store.subscribe()).ok();
        }
        while let Some(records) = &mut self.subscription {
            match records.next().now_or_never() {
                Some(Some(rec)) => {
                    self.control.adopt(rec);
                    adopted += 1;
                }
                Some(None) => self.subscription = None,
                None => break,
            }
        }
        adopted
    }

    /// An operator's action, answered as the admin API's: while the store is known to
    /// answer, the action waits for its write, which this thread carries out once the
    /// records queued before it are written.
    fn act(&mut self, action: OperatorAction) -> String {
        self.pull();
        let control = self.control.clone();
        let connected = control
            .fleet
            .as_ref()
            .is_some_and(|f| f.connected.load(Ordering::Acquire));
        if !connected {
            // Nothing is waited for: the write stays queued.
            let answer = control.act(ROUTE, action);
            self.pull();
            return format!("{answer:?}");
        }
        let answer = std::thread::scope(|s| {
            let acting = s.spawn(move || control.act(ROUTE, action));
            loop {
                match self.jobs.try_recv() {
                    Ok(job) if job.reply.is_some() => {
                        while let Some(before) = self.backlog.pop_front() {
                            block_on(self.service.write_one(
                                &*self.store,
                                before,
                                &mut self.writes,
                            ));
                        }
                        block_on(self.service.write_one(&*self.store, job, &mut self.writes));
                        break;
                    }
                    Ok(job) => self.backlog.push_back(job),
                    // It waits for nothing (refused, unchanged): whatever it queued is
                    // in the queue once it is done.
                    Err(_) if acting.is_finished() => break,
                    Err(_) => std::thread::yield_now(),
                }
            }
            acting.join()
        });
        self.pull();
        match answer {
            Ok(a) => format!("{a:?}"),
            Err(_) => "the action panicked".to_string(),
        }
    }
}

/// A replica: its files, and its process when it runs.
struct Node {
    dir: PathBuf,
    /// The canary version its config file names.
    version: u64,
    up: Option<Up>,
}

impl Node {
    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("kanaria.toml")
    }
}

/// One simulated run.
struct Sim {
    rng: Rng,
    clock: Arc<ManualClock>,
    store: Arc<MemoryStore>,
    nodes: Vec<Node>,
    on_partition: &'static str,
    /// The newest canary version released.
    version: u64,
    log: Vec<String>,
    /// Per replica: per canary version, the resumes it counted when it last applied a
    /// rollback of it.
    latched: Vec<BTreeMap<String, u64>>,
    /// Per replica: per canary version, the newest generation it applied.
    generations: Vec<BTreeMap<String, u64>>,
    /// Per canary version: the resumes operators gave.
    resumes_given: BTreeMap<String, u64>,
    /// Per record key: the resumes the store's record counted when it last held a
    /// rollback (forgotten when the store loses data).
    store_latched: BTreeMap<String, u64>,
    _root: tempfile::TempDir,
}

/// Where the state dirs go: memory when the machine has it (every state file is synced).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let builder = || {
        let mut b = tempfile::Builder::new();
        b.prefix("kanaria-sim");
        b
    };
    if shm.is_dir() {
        if let Ok(d) = builder().tempdir_in(shm) {
            return d;
        }
    }
    builder().tempdir().expect("a temporary directory")
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng::new(seed);
        let replicas = 3 + rng.below(2) as usize;
        let drop_per_mille = [0, 50, 200][rng.below(3) as usize];
        let on_partition = if rng.chance(500) { "hold" } else { "stable" };
        let root = scratch();
        let clock = Arc::new(ManualClock::starting_at(
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        ));
        let mut sim = Sim {
            store: MemoryStore::new(rng.next(), drop_per_mille),
            rng,
            clock,
            nodes: Vec::new(),
            on_partition,
            version: 2,
            log: Vec::new(),
            latched: vec![BTreeMap::new(); replicas],
            generations: vec![BTreeMap::new(); replicas],
            resumes_given: BTreeMap::new(),
            store_latched: BTreeMap::new(),
            _root: root,
        };
        sim.note(format!(
            "seed {seed}: {replicas} replicas, {drop_per_mille}/1000 publications dropped, on_partition = {on_partition}"
        ));
        for i in 0..replicas {
            let dir = sim._root.path().join(format!("r{i}"));
            std::fs::create_dir_all(&dir).expect("replica dir");
            sim.nodes.push(Node {
                dir,
                version: 2,
                up: None,
            });
            sim.write_config(i);
            sim.start(i);
        }
        sim
    }

    /// Logs a step, with each replica's state after it (`-`: down): canary version,
    /// phase, step, the generation applied, `cut` when cut off from the store.
    fn note(&mut self, line: String) {
        let t = self.clock.now_ms() - 1_800_000_000_000;
        let states: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let Some(rc) = n.up.as_ref().and_then(|u| u.control.route_control(ROUTE)) else {
                    return "-".to_string();
                };
                let step = rc.phase.step().map(|s| format!("/{s}")).unwrap_or_default();
                format!(
                    "{}:{}{step}@{}{}",
                    rc.canary_version.unwrap_or_default(),
                    rc.phase.name(),
                    rc.fleet_generation,
                    if rc.fleet_down { " cut" } else { "" }
                )
            })
            .collect();
        self.log.push(format!(
            "[{:>3}] t={t:>7}ms {line}  | {}",
            self.log.len(),
            states.join(" | ")
        ));
    }

    fn write_config(&self, i: usize) {
        let n = &self.nodes[i];
        let src = config(&n.state_dir(), i, n.version, self.on_partition);
        std::fs::write(n.config_path(), src).expect("config file");
    }

    /// Starts replica `i`'s process from its files.
    fn start(&mut self, i: usize) {
        let path = self.nodes[i].config_path();
        let config = crate::runtime::build::load(&path).expect("the simulation's config");
        let control = Control::with(config, path, self.clock.clone(), Box::new(SystemResolver))
            .expect("control");
        let fleet = control.fleet.clone().expect("[fleet]");
        let jobs = fleet
            .rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("the writer's queue");
        let store = self.store.handle(i);
        let service = FleetService::with_store(control.clone(), fleet, store.clone());
        service.begin();
        self.nodes[i].up = Some(Up {
            analysis: AnalysisLoop::new(control.clone()),
            control,
            service,
            store,
            jobs,
            backlog: VecDeque::new(),
            writes: Writes::default(),
            subscription: None,
        });
    }

    /// Stops replica `i` as kill -9 would, its state files as last written (`keep`) or gone.
    fn crash(&mut self, i: usize, keep: bool) {
        let Some(up) = self.nodes[i].up.take() else {
            return;
        };
        // What the persister had queued is on disk: its thread's timing must not decide.
        up.control.flush_state();
        drop(up);
        if !keep {
            let _ = std::fs::remove_dir_all(self.nodes[i].state_dir());
            self.latched[i].clear();
        }
        // The generation applied is not kept across a restart.
        self.generations[i].clear();
    }

    fn pick(&mut self, n: usize) -> usize {
        self.rng.below(n as u64) as usize
    }

    /// A running replica, chosen by the seed.
    fn pick_up(&mut self) -> Option<usize> {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up.is_some())
            .collect();
        if up.is_empty() {
            return None;
        }
        let k = self.pick(up.len());
        Some(up[k])
    }

    /// `requests` of each track on replica `i`, `errors` of the canary's failing, then one
    /// pass of the analysis loop.
    fn traffic(&mut self, i: usize, errors: u64) {
        let Some(up) = &self.nodes[i].up else {
            return;
        };
        let live = up.control.live.load();
        let now = self.clock.now();
        for track in [Track::Stable, Track::Canary] {
            let window = &live.route_metrics[0].version(track).window;
            for k in 0..40 {
                window.record(now, track == Track::Canary && k < errors, 0.010);
            }
        }
        up.analysis.tick();
    }

    /// One step chosen by the seed.
    fn step(&mut self) {
        let advance = 1 + self.rng.below(2_000);
        self.clock.advance(Duration::from_millis(advance));
        let roll = self.rng.below(1_000);
        let Some(i) = self.pick_up() else {
            let i = self.pick(self.nodes.len());
            self.start(i);
            self.note(format!("r{i} restarts (every replica was down)"));
            return;
        };
        match roll {
            0..=179 => {
                let ok = self.up(i).poll();
                self.note(format!(
                    "r{i} polls: {}",
                    if ok { "answered" } else { "no answer" }
                ));
            }
            180..=379 => {
                if self.up(i).write_next() {
                    self.note(format!("r{i} writes a queued record"));
                }
            }
            380..=499 => {
                if self.store.deliver_one() {
                    self.note("a publication is delivered".to_string());
                }
            }
            500..=599 => {
                let n = self.up(i).receive();
                if n > 0 {
                    self.note(format!("r{i} adopts {n} published record(s)"));
                }
            }
            600..=689 => {
                self.traffic(i, 0);
                self.note(format!("r{i}: good traffic, analysis pass"));
            }
            690..=709 => {
                self.traffic(i, 40);
                self.note(format!("r{i}: failing canary, analysis pass"));
            }
            710..=799 => self.operator(i),
            800..=809 => {
                self.version += 1;
                let v = self.version;
                self.note(format!("release: canary v{v} in the config files"));
            }
            810..=849 => {
                let target = self.pick(self.nodes.len());
                if self.nodes[target].version < self.version {
                    self.nodes[target].version = self.version;
                    self.write_config(target);
                    let reloaded = self.nodes[target]
                        .up
                        .as_ref()
                        .map(|u| u.control.reload_from_file("sim").is_ok());
                    self.note(format!(
                        "r{target}'s file names canary v{} (reloaded: {reloaded:?})",
                        self.version
                    ));
                }
            }
            850..=856 => {
                self.store.restart_empty();
                self.store_latched.clear();
                self.note("STORE restarts empty".to_string());
            }
            857..=863 => {
                let lost = 1 + self.pick(3);
                let undone = self.store.restart_older(lost);
                self.store_latched.clear();
                self.note(format!(
                    "STORE fails over to a replica {undone} write(s) behind"
                ));
            }
            864..=879 => {
                self.store.cut(i);
                self.note(format!("r{i} is cut off from the store"));
            }
            880..=919 => {
                let target = self.pick(self.nodes.len());
                if self.store.heal(target) {
                    self.note(format!("r{target}'s link to the store heals"));
                }
            }
            920..=934 => {
                let keep = self.rng.chance(700);
                self.crash(i, keep);
                self.note(format!(
                    "r{i} is killed ({})",
                    if keep {
                        "state dir kept"
                    } else {
                        "state dir lost"
                    }
                ));
            }
            _ => {
                let target = self.pick(self.nodes.len());
                if self.nodes[target].up.is_none() {
                    self.start(target);
                    self.note(format!("r{target} restarts"));
                }
            }
        }
    }

    fn up(&mut self, i: usize) -> &mut Up {
        self.nodes[i].up.as_mut().expect("a running replica")
    }

    fn operator(&mut self, i: usize) {
        let action = match self.rng.below(9) {
            0..=2 => OperatorAction::Rollback,
            3 | 4 => OperatorAction::Resume,
            5 => OperatorAction::Weight([0.0, 5.0, 20.0, 50.0][self.pick(4)]),
            6 => OperatorAction::Promote { drain: false },
            _ => OperatorAction::Pause,
        };
        if action == OperatorAction::Resume {
            let v = format!("v{}", self.nodes[i].version);
            *self.resumes_given.entry(v).or_default() += 1;
        }
        let answer = self.up(i).act(action);
        self.note(format!("operator on r{i}: {action:?} -> {answer}"));
    }

    /// The promises after a step: `Err` says which broke.
    fn check(&mut self) -> Result<(), String> {
        // The store, too, never replaces a rollback by an earlier history while it holds
        // the record (it may lose it: a restart, a failover, or deleted once no replica
        // reports serving its version).
        for v in 2..=self.version {
            let key = format!("{ROUTE}:v{v}");
            let Some(rec) = self.store.record(&key) else {
                self.store_latched.remove(&key);
                continue;
            };
            if rec.rolled_back {
                let r = self.store_latched.entry(key).or_default();
                *r = (*r).max(rec.resumes);
            } else if let Some(&r) = self.store_latched.get(&key) {
                if rec.resumes <= r {
                    return Err(format!(
                        "the store replaced its rollback of v{v} by {} at generation {} without an operator's resume (by {}, {})",
                        rec.phase.name(),
                        rec.generation,
                        rec.by,
                        rec.kind
                    ));
                }
            }
        }
        for i in 0..self.nodes.len() {
            let Some(up) = &self.nodes[i].up else {
                continue;
            };
            let Some(rc) = up.control.route_control(ROUTE) else {
                return Err(format!("r{i} lost the route"));
            };
            let Some(v) = rc.canary_version.clone() else {
                continue;
            };
            let given = self.resumes_given.get(&v).copied().unwrap_or(0);
            if rc.resumes > given {
                return Err(format!(
                    "r{i} counts {} resumes of {v}; operators gave {given}",
                    rc.resumes
                ));
            }
            if matches!(rc.phase, Phase::RolledBack { .. }) {
                let r = self.latched[i].entry(v.clone()).or_default();
                *r = (*r).max(rc.resumes);
            } else if let Some(&r) = self.latched[i].get(&v) {
                if rc.resumes <= r {
                    let last = up
                        .control
                        .events()
                        .last()
                        .map(|e| format!("{}: {}", e.kind, e.reason));
                    return Err(format!(
                        "r{i} undid its rollback of {v} without an operator's resume: now {} (resumes {}, rolled back at {r}; last event {last:?})",
                        rc.phase.name(),
                        rc.resumes
                    ));
                }
            }
            let g = self.generations[i].entry(v.clone()).or_default();
            if rc.fleet_generation < *g {
                return Err(format!(
                    "r{i}'s generation of {v} went down: {} after {}",
                    rc.fleet_generation, *g
                ));
            }
            *g = rc.fleet_generation;
        }
        Ok(())
    }

    /// Every fault heals (the store reachable, every replica up with the newest file),
    /// then `rounds` of polls, writes and deliveries.
    fn heal(&mut self, rounds: usize) -> Result<(), String> {
        self.store.heal_all();
        for i in 0..self.nodes.len() {
            if self.nodes[i].version < self.version {
                self.nodes[i].version = self.version;
                self.write_config(i);
                if let Some(up) = &self.nodes[i].up {
                    let _ = up.control.reload_from_file("sim");
                }
            }
            if self.nodes[i].up.is_none() {
                self.start(i);
            }
        }
        self.note("every fault heals".to_string());
        for _ in 0..rounds {
            self.clock.advance(Duration::from_secs(1));
            for i in 0..self.nodes.len() {
                let up = self.up(i);
                up.poll();
                while up.write_next() {}
            }
            while self.store.deliver_one() {}
            for i in 0..self.nodes.len() {
                self.up(i).receive();
            }
            self.check()?;
        }
        Ok(())
    }

    /// After healing: every replica serves the store's record.
    fn converged(&mut self) -> Result<(), String> {
        let key = format!("{ROUTE}:v{}", self.version);
        let Some(rec) = self.store.record(&key) else {
            return Err(format!("the store has no record {key}"));
        };
        for i in 0..self.nodes.len() {
            let rc = self
                .up(i)
                .control
                .route_control(ROUTE)
                .ok_or("a replica lost the route")?;
            let here = (rc.phase.name(), rc.phase.step(), rc.phase_weight());
            let fleet = (rec.phase.name(), rec.phase.step(), here.2);
            let weight = (rec.weight_percent * 100.0).round() as u32;
            if here != fleet || rc.phase_weight() != weight || rc.fleet_generation != rec.generation
            {
                return Err(format!(
                    "not converged: r{i} serves {here:?} at generation {}, the store holds {} step {:?} at {} % generation {}",
                    rc.fleet_generation,
                    rec.phase.name(),
                    rec.phase.step(),
                    rec.weight_percent,
                    rec.generation
                ));
            }
        }
        self.note(format!(
            "converged: every replica serves {} at generation {}",
            rec.phase.name(),
            rec.generation
        ));
        Ok(())
    }
}

/// Runs one seed; `Err` is the failure with the step log.
fn run(seed: u64, steps: usize) -> Result<Vec<String>, String> {
    let mut sim = Sim::new(seed);
    let mut outcome = sim.check();
    for _ in 0..steps {
        if outcome.is_err() {
            break;
        }
        sim.step();
        outcome = sim.check();
    }
    let outcome = outcome
        .and_then(|()| sim.heal(8))
        .and_then(|()| sim.converged());
    match outcome {
        Ok(()) => Ok(std::mem::take(&mut sim.log)),
        Err(why) => {
            let log = sim.log.join("\n");
            Err(format!(
                "fleet simulation: seed {seed} broke a promise at step {}: {why}\nreplay: SEED={seed} cargo test --all-features --lib fleet::sim\n{log}",
                sim.log.len()
            ))
        }
    }
}

/// Seeds that broke a promise, each kept as a regression case, with what it found (at
/// 300 steps).
const FOUND: [(u64, &str); 9] = [
    (
        19,
        "the store restarted empty while a replica was cut off; a resume elsewhere made the \
         fleet's record a later history at a lower generation than that replica's, so its \
         re-seed was refused and it never adopted the fleet's next step (fixed: the writer \
         writes the store's record again at the higher generation)",
    ),
    (
        388,
        "an operator's pause decided against a store that had since restarted empty was \
         refused (409, 'undone here') but stayed applied: the store's answer was of another \
         incarnation, and then the replica's own record, so the machine ignored it (fixed: \
         a write's answer hands the store's incarnation on as a poll does, and a refusal is \
         adopted as the fleet's, never as this replica's own)",
    ),
    (
        467,
        "a replica that adopted a rollback over its own rollback (the resume between them \
         missed) did not persist the resume it learned; restarted, it took a record counting \
         that same resume as newer and undid its rollback (fixed: a resume learned is \
         persisted even when the phase stays)",
    ),
    (
        535,
        "the store failed over to a replica that lost an operator's resume; a replica \
         restarted with its state knew that resume, so it refused the store's older \
         rollback and nobody wrote the later history: it never converged (fixed: a replica \
         whose state is a later history than the fleet's newer record writes it again, as \
         it already did for a rollback)",
    ),
    (
        719,
        "the store failed over twice, losing a replica's acknowledged pause; another \
         replica's promote then took the pause's generation, so the paused replica held \
         another state at the fleet's generation and never adopted it (fixed: a poll that \
         finds another state at the generation applied re-seeds, and the store's record is \
         written again above it)",
    ),
    (
        1899,
        "a weight set on a replica cut off failed to write and waited; a rollback followed; \
         the poll queued the waiting weight again behind the rollback, and once the store \
         had lost the rollback (a failover) the stale weight was written over it: the fleet \
         ran the canary while that replica stayed rolled back (fixed: each change carries \
         the order it was decided in, and a write older than one already written of the \
         same record is dropped)",
    ),
    (
        42,
        "a seed queued by a replica that then moved to a new canary version was written \
         after the old version's rolled-back record had been deleted (no replica served \
         it): the store held that version progressing again",
    ),
    (
        188,
        "the same with a re-seed after the store restarted empty (fixed for both: a write \
         of a version this replica no longer serves is dropped unless it is a rollback)",
    ),
    (
        7620,
        "a rollback that failed to write waited for the store; a seed that failed after it \
         took its place among the waiting writes (and made it obsolete), so only the seed \
         was written on return, refused, and the rollback never reached the fleet (fixed: a \
         seed neither displaces a waiting change nor makes it obsolete)",
    ),
];

#[test]
fn seeds_that_found_bugs_keep_their_promises() {
    for (seed, found) in FOUND {
        if let Err(failure) = run(seed, 300) {
            panic!("{failure}\n(seed {seed} once found: {found})");
        }
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn the_fleet_keeps_its_promises_under_simulated_faults() {
    let steps = env_number("SIM_STEPS", 300) as usize;
    if let Some(seed) = std::env::var("SEED").ok().filter(|s| !s.is_empty()) {
        let seed: u64 = seed.parse().expect("SEED is a number");
        match run(seed, steps) {
            Ok(log) => println!("{}\nseed {seed}: every promise kept", log.join("\n")),
            Err(failure) => panic!("{failure}"),
        }
        return;
    }
    let seeds = env_number("SIM_SEEDS", 100);
    let first = env_number("SIM_FIRST_SEED", 1);
    // How long the run took, for whoever sizes `SIM_SEEDS` (the simulation itself reads
    // no real clock).
    let started = crate::clock::SystemClock.now();
    for seed in first..first + seeds {
        if let Err(failure) = run(seed, steps) {
            panic!("{failure}");
        }
        if (seed + 1 - first).is_multiple_of(1_000) {
            println!("fleet simulation: seeds {first}..={seed} kept every promise");
        }
    }
    println!(
        "fleet simulation: {seeds} seeds x {steps} steps, every promise kept, in {:?}",
        crate::clock::SystemClock.now() - started
    );
}

/// The same seed is the same run, step for step, even with two runs side by side (no
/// thread's timing decides anything).
#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 19, 42] {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(move || run(seed, 300));
            let b = s.spawn(move || run(seed, 300));
            (a.join().expect("run a"), b.join().expect("run b"))
        });
        assert_eq!(a, b, "seed {seed} ran twice differently");
    }
}
