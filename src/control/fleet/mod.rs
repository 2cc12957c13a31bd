//! The fleet: replicas sharing each route's rollout through a store (`[fleet]`), and the
//! rules by which each replica writes to it and adopts from it.
//!
//! The store ([`store::Store`]; Redis in production, [`redis_store`]) holds one record per
//! route and canary version (a [`FleetRecord`]). Every change is decided by the state
//! machine of the replica where it happens and handed here as an
//! [`Effect::Share`](crate::rollout::machine::Effect::Share); the store writes it with a
//! compare-and-set on the generation (a rollback is written whatever the generation: it
//! always wins; [`decide`](crate::rollout::machine::decide) states the rule) and publishes
//! the new record. Every replica applies the records it receives
//! ([`Input::Adopt`](crate::rollout::machine::Input::Adopt)) when they are newer than what
//! it applied. Publication is at-most-once, so each replica also re-reads the records
//! every `poll_interval`, and says there that it is alive (the members). Records expire
//! after `record_ttl`; each poll renews those of the versions the replica serves, and
//! records of versions no alive replica serves are deleted.
//!
//! Analysis is fleet-wide: each replica's analysis loop hands its raw counts (requests,
//! errors, latency histogram, per track, over the analysis window and the short span) to
//! [`Fleet::contribute`]; the poll writes them to the store per route and canary version
//! and reads the others'. The verdict is taken on the sum.
//!
//! Store down: the replica keeps serving what it knows; its machines are told the link is
//! down (nothing advances, only rollbacks apply); the writes that failed are kept, the
//! newest per record, and written when the store answers again (a rollback still wins
//! then). Steps wait [`Fleet::settle_ms`] after the link is back, so such a rollback
//! reaches the other replicas before any of them moves on. A store whose incarnation
//! changed (it lost its data) or that is behind what a replica applied (it lost its last
//! writes) is re-seeded with the replicas' state.
//!
//! The decisions ([`FleetService::write_one`], [`FleetService::poll`]) are plain code over
//! the store; the loops around them ([`BackgroundService::start`]) only pace them, so the
//! simulation (`sim`, tests only) runs the same decisions on a seeded in-memory store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{mpsc, Notify};

use crate::clock::Clock;
use crate::config::FleetSettings;
use crate::metrics::Metrics;
use crate::rollout::machine::{FleetRecord, ShareMode};

#[cfg(test)]
mod memory_store;
pub mod redis_store;
#[cfg(test)]
mod sim;
pub mod store;

pub use store::{Contribution, Member, Spans};
use store::{Store, StoreError, StoreResult, Written};

/// What the fleet view is, for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub members: Vec<Member>,
    /// The last time the store answered a poll (ms since the Unix epoch; 0: never).
    pub last_sync_ms: u64,
    /// Writes waiting for the store.
    pub pending: usize,
    /// The store's incarnation as last read (empty: not yet).
    pub incarnation: String,
    /// How many times this process saw the incarnation change (the store lost its data).
    pub store_resets: u64,
    /// When it last did (ms since the Unix epoch; 0: never).
    pub last_store_reset_ms: u64,
    /// The primary in use (`host:port`), as Redis Sentinel last named it or as the URL
    /// says; empty until the first connection is made.
    pub primary: String,
    /// How many times Sentinel named another primary than the one in use (failovers
    /// seen by this replica).
    pub primary_changes: u64,
}

/// A write for the store, with whoever waits for its answer.
struct Job {
    record: FleetRecord,
    reply: Option<Reply>,
    /// The order this process decided its changes in (a failed write queued again keeps
    /// its own): a write older than one already written of the same record is obsolete.
    seq: u64,
}

/// The fleet link of one process: shared by the control module (which queues writes) and
/// the background service (which talks to Redis).
pub struct Fleet {
    pub settings: FleetSettings,
    /// `fleet.ca`, read at start.
    ca_pem: Option<Vec<u8>>,
    pub clock: Arc<dyn Clock>,
    /// Tells this process's own records: instance, pid and start time.
    pub writer_id: String,
    tx: mpsc::UnboundedSender<Job>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Job>>>,
    /// The next [`Job::seq`].
    next_seq: AtomicU64,
    pub connected: AtomicBool,
    /// The first poll answered (records adopted or seeded): ready to serve as the fleet.
    pub synced: AtomicBool,
    pub started: Instant,
    view: Mutex<View>,
    /// This replica's latest counts per route, written by the next poll.
    mine: Mutex<HashMap<String, Contribution>>,
    /// The other replicas' latest counts per route, as the last poll read them.
    others: Mutex<HashMap<String, Vec<(String, Contribution)>>>,
    /// Wakes the poller (a subscription re-made, a write refused).
    poke: Notify,
    /// Wakes the subscriber when the link comes back: it re-subscribes then, not after its
    /// backoff (up to 1 s), during which records published would reach this replica only
    /// by the next poll (issue 21: a rollback up to a poll interval late after Redis restarted).
    link_back: Notify,
    /// Sentinel named another primary: the subscription moves there at once.
    primary_moved: Notify,
}

/// The store's answer to a write an operator waits for.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Written, at this generation.
    Written(u64),
    /// Refused: the fleet's record changed meanwhile (and is adopted instead): why, and
    /// the store's record.
    Refused {
        message: String,
        current: Option<Box<FleetRecord>>,
    },
    /// The store did not answer: applied here, written when it is back.
    Unreachable(String),
}

/// Where the answer to a write goes.
pub type Reply = std::sync::mpsc::SyncSender<Answer>;

impl Fleet {
    /// The link for `settings` (`fleet.ca` is read now), on `clock`.
    pub fn new(settings: FleetSettings, clock: Arc<dyn Clock>) -> anyhow::Result<Arc<Fleet>> {
        let ca_pem = match &settings.ca {
            Some(path) => Some(
                crate::runtime::certs::read_ca(path)
                    .map_err(|e| anyhow::anyhow!("fleet.ca: {e}"))?,
            ),
            None => None,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let writer_id = format!(
            "{}/{}/{}",
            settings.instance,
            std::process::id(),
            clock.now_ms()
        );
        Ok(Arc::new(Fleet {
            started: clock.now(),
            settings,
            ca_pem,
            clock,
            writer_id,
            tx,
            rx: Mutex::new(Some(rx)),
            next_seq: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            view: Mutex::new(View::default()),
            mine: Mutex::new(HashMap::new()),
            others: Mutex::new(HashMap::new()),
            poke: Notify::new(),
            link_back: Notify::new(),
            primary_moved: Notify::new(),
        }))
    }

    /// Hands this replica's latest counts of a route to the fleet (written by the next poll).
    pub fn contribute(&self, route: &str, c: Contribution) {
        self.mine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(route.to_string(), c);
    }

    /// This replica's latest counts of a route and canary version, as handed to the fleet.
    pub fn own(&self, route: &str, version: &str) -> Option<Contribution> {
        self.mine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(route)
            .filter(|c| c.canary_version == version)
            .cloned()
    }

    /// The other replicas' recent counts of a route and canary version: (instance, counts).
    pub fn others(&self, route: &str, version: &str) -> Vec<(String, Contribution)> {
        let fresh = self.fresh_ms();
        let now = self.clock.now_ms();
        self.others
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(route)
            .map(|v| {
                v.iter()
                    .filter(|(_, c)| {
                        c.canary_version == version && now.saturating_sub(c.at_ms) <= fresh
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The fleet-wide counts of a route over its analysis window, as last judged: this
    /// replica's plus the others' recent ones, and how many replicas they come from.
    pub fn fleet_counts(&self, route: &str, version: &str) -> Option<(Spans, usize)> {
        let mine = self
            .mine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(route)
            .filter(|c| c.canary_version == version)
            .cloned()?;
        let others = self.others(route, version);
        let mut sum = mine.window;
        for (_, c) in &others {
            sum.add(&c.window);
        }
        Some((sum, others.len() + 1))
    }

    /// How long steps wait after the store comes back (ms): long enough for a replica that
    /// decided a rollback during the outage to reconnect (it retries every 250 ms while the
    /// store is down) and write it, so the others adopt it before they move on.
    pub fn settle_ms(&self) -> u64 {
        (3 * self.settings.poll_interval.as_millis() as u64).max(2_000)
    }

    /// How long the store must have answered before a restarted replica serves the phase
    /// it started with, unconfirmed by another replica's record (`RouteRollout::fleet_unconfirmed`):
    /// a poll interval (the others re-seed a store that lost its data at their next poll)
    /// and a margin for that write.
    pub fn confirm_ms(&self) -> u64 {
        self.settings.poll_interval.as_millis() as u64 + 250
    }

    /// How old another replica's counts may be and still count.
    fn fresh_ms(&self) -> u64 {
        (3 * self.settings.poll_interval.as_millis() as u64).max(5_000)
    }

    /// Forgets the `kanaria_fleet_*` series of routes removed from the config. (Their
    /// counts go at the next poll, which keeps only the routes with a canary and rebuilds
    /// the others' counts from those.)
    pub fn forget_routes(&self, metrics: &Metrics, gone: &[String]) {
        for route in gone {
            let labels = [self.settings.cluster.as_str(), route.as_str()];
            let _ = metrics.fleet_generation.remove_label_values(&labels);
            let _ = metrics.fleet_cut_off.remove_label_values(&labels);
            let _ = metrics.fleet_config_skew.remove_label_values(&labels);
        }
    }

    /// Queues a record for the store (never blocks). Called under the control lock.
    pub fn share(&self, mut record: FleetRecord, reply: Option<Reply>) {
        record.by = self.settings.instance.clone();
        record.writer = self.writer_id.clone();
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.queue(Job { record, reply, seq });
    }

    fn queue(&self, job: Job) {
        if self.tx.send(job).is_err() {
            log::error!("fleet: the writer is gone; a change was not shared");
        }
    }

    pub fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_view(&self, f: impl FnOnce(&mut View)) {
        f(&mut self.view.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Whether `/readyz` may say ready: the fleet's records are adopted, or the startup
    /// timeout passed (then the replica serves its local state, and status says so).
    pub fn ready(&self) -> bool {
        self.synced.load(Ordering::Acquire) || self.startup_over()
    }

    /// `fleet.startup_timeout` has passed since this process started.
    pub fn startup_over(&self) -> bool {
        self.clock.now().saturating_duration_since(self.started) >= self.settings.startup_timeout
    }

    /// The fleet view is stale when the store has not answered for three polls.
    pub fn stale(&self) -> bool {
        let last = self.view().last_sync_ms;
        let limit = 3 * self.settings.poll_interval.as_millis() as u64;
        last == 0 || self.clock.now_ms().saturating_sub(last) > limit.max(1_000)
    }
}

/// What the fleet service needs of this replica's control plane, and no more.
pub trait Replica: Send + Sync {
    /// The fleet's record for a route: applied when newer than what this replica applied.
    fn adopt(&self, record: FleetRecord);
    /// The store's record that refused a change this replica made: applied as the fleet's
    /// even when this process wrote it (the refused change is undone).
    fn adopt_refusal(&self, record: FleetRecord);
    /// The store became reachable (`up`) or unreachable.
    fn fleet_link(&self, up: bool);
    /// The store's incarnation as a poll read it, before the records read with it: on a
    /// change every route re-seeds the store with this replica's state.
    fn incarnation(&self, incarnation: &str);
    /// Every route with a canary: (route, canary version, the record to seed the store
    /// with when it has none).
    fn fleet_routes(&self) -> Vec<(String, String, Option<FleetRecord>)>;
    /// Per route with a canary: the hash of this replica's file decision, and since when
    /// it differs from the fleet's (`None`: it agrees).
    fn fleet_files(&self) -> HashMap<String, (String, Option<u64>)>;
    /// The fleet generation applied per route.
    fn fleet_generations(&self) -> HashMap<String, u64>;
    fn metrics(&self) -> &Metrics;
}

/// The background service: the fleet's decisions over the store, paced by three loops (the
/// writer, the poller and the subscriber).
pub struct FleetService {
    shared: Arc<dyn Replica>,
    fleet: Arc<Fleet>,
    /// The store given to [`FleetService::with_store`]; `None`: the Redis `fleet.url`
    /// names, connected at start.
    store: Option<Arc<dyn Store>>,
    /// Writes that failed on the connection, the newest per record (by key), written again
    /// when the store answers: (their [`Job::seq`], the record).
    pending: Mutex<BTreeMap<String, (u64, FleetRecord)>>,
}

/// What the writer remembers between writes.
#[derive(Default)]
struct Writes {
    /// The newest generation this process wrote per record: two changes decided here in
    /// a row were both decided on the older one, and the second must not be refused
    /// for the first.
    written: HashMap<String, u64>,
    /// The newest [`Job::seq`] written (or failed) per record.
    newest: HashMap<String, u64>,
    /// How many entries the last pruning kept.
    kept: usize,
}

/// Whether the store's `current` record is behind the generation `mine` was decided on,
/// in the same incarnation of the store: the store lost writes it had acknowledged.
fn behind(current: &FleetRecord, mine: &FleetRecord) -> bool {
    !mine.incarnation.is_empty()
        && current.incarnation == mine.incarnation
        && current.generation < mine.generation
}

/// Whether the store's `current` record holds, at the generation this replica applied,
/// another state than this replica's `mine`, in the same incarnation: the store lost the
/// write this replica applied and gave its generation to another (or this replica's own
/// change is not written yet, and then the re-seed this asks for loses to it).
fn diverged(current: &FleetRecord, mine: &FleetRecord) -> bool {
    !mine.incarnation.is_empty()
        && current.incarnation == mine.incarnation
        && current.generation == mine.generation
        && (current.phase.name(), current.phase.step(), current.resumes)
            != (mine.phase.name(), mine.phase.step(), mine.resumes)
}

impl FleetService {
    /// The service on the Redis `fleet.url` names.
    pub fn new(shared: Arc<dyn Replica>, fleet: Arc<Fleet>) -> Self {
        FleetService {
            shared,
            fleet,
            store: None,
            pending: Mutex::new(BTreeMap::new()),
        }
    }

    /// The service on another store.
    pub fn with_store(shared: Arc<dyn Replica>, fleet: Arc<Fleet>, store: Arc<dyn Store>) -> Self {
        FleetService {
            store: Some(store),
            ..FleetService::new(shared, fleet)
        }
    }

    /// The incarnation read from the store, handed to every route's machine (which
    /// re-seeds the store when it changed). A change from the one this process knew is
    /// counted, logged and shown in status.
    fn saw_incarnation(&self, incarnation: &str) {
        self.shared.incarnation(incarnation);
        let now = self.fleet.clock.now_ms();
        let mut known = String::new();
        self.fleet.set_view(|v| {
            known = std::mem::replace(&mut v.incarnation, incarnation.to_string());
            if !known.is_empty() && known != incarnation {
                v.store_resets += 1;
                v.last_store_reset_ms = now;
            }
        });
        if known.is_empty() || known == incarnation {
            return;
        }
        log::warn!(
            "fleet: the store's incarnation changed ({known} -> {incarnation}): it lost the fleet's data; this replica's state re-seeds it"
        );
        self.shared
            .metrics()
            .fleet_store_resets
            .with_label_values(&[&self.fleet.settings.cluster])
            .inc();
    }

    /// Marks the link up or down; the machines learn it on a change.
    fn link(&self, up: bool) {
        let was = self.fleet.connected.swap(up, Ordering::AcqRel);
        self.shared
            .metrics()
            .fleet_connected
            .with_label_values(&[&self.fleet.settings.cluster])
            .set(i64::from(up));
        if was != up {
            if up {
                log::info!("fleet: connected to the store");
                self.fleet.link_back.notify_one();
            } else {
                log::warn!("fleet: the store does not answer: serving the last known state; only rollbacks apply until it is back");
            }
            self.shared.fleet_link(up);
        }
    }

    /// What a poll's outcome says: the store answers (and the fleet's records are
    /// adopted), or it does not.
    fn polled(&self, answered: bool) {
        self.link(answered);
        if answered && !self.fleet.synced.swap(true, Ordering::AcqRel) {
            log::info!("fleet: the fleet's records are adopted");
        }
    }

    /// Before the first poll: until the store first answers, nothing advances (a replica
    /// started while the store is down must not step on its own).
    fn begin(&self) {
        self.shared.fleet_link(false);
        self.shared
            .metrics()
            .fleet_connected
            .with_label_values(&[&self.fleet.settings.cluster])
            .set(0);
        // The counter's series from the start, so increase() sees the first reset.
        self.shared
            .metrics()
            .fleet_store_resets
            .with_label_values(&[&self.fleet.settings.cluster]);
    }

    /// Writes one queued record and answers whoever waits for it. A refused write adopts
    /// the store's record; a write that fails on the connection waits (the newest per
    /// record) for the store to return.
    async fn write_one(&self, store: &dyn Store, job: Job, w: &mut Writes) {
        let Job {
            mut record,
            reply,
            seq,
        } = job;
        let key = store.record_key(&record.route, &record.canary_version);
        // Versions and routes come and go with releases: keep only the records this
        // replica still serves (checked once the map outgrows them).
        if w.written.len() > 2 * w.kept + 64 {
            let served: HashSet<String> = self
                .shared
                .fleet_routes()
                .iter()
                .map(|(r, v, _)| store.record_key(r, v))
                .collect();
            w.written.retain(|k, _| served.contains(k));
            w.newest.retain(|k, _| served.contains(k));
            w.kept = w.written.len();
        }
        // A failed write queued again by a poll behind a newer change of the same record
        // (a weight that failed, then a rollback): written now it would undo that change
        // in the store, once the store lost it.
        if w.newest.get(&key).is_some_and(|&newest| newest > seq) {
            log::debug!("fleet: an obsolete write of {key} is dropped");
            return;
        }
        // A seed only fills an empty store: it makes no change of this replica's obsolete.
        if record.mode != ShareMode::Seed {
            w.newest.insert(key.clone(), seq);
        }
        // A change of a version this replica moved on from while the write waited: its
        // record may be gone for good (deleted once no replica served the version), and
        // must not come back as this replica's old state. Only a rollback still goes (a
        // replica that has not moved on yet applies it).
        if !record.rolled_back
            && !self
                .shared
                .fleet_routes()
                .iter()
                .any(|(r, v, _)| *r == record.route && *v == record.canary_version)
        {
            if let Some(reply) = reply {
                let _ = reply.try_send(Answer::Refused {
                    message: format!(
                        "canary version {} of {} is no longer served here: the change was not shared",
                        record.canary_version, record.route
                    ),
                    current: None,
                });
            }
            return;
        }
        if let Some(&g) = w.written.get(&key) {
            if record.mode == ShareMode::Cas {
                record.generation = record.generation.max(g);
            }
        }
        let mut result = store.write(&record).await;
        // Refused by a store behind the generation this change was decided on, in the
        // same incarnation: it lost acknowledged writes (a failover to a replica that had
        // not received them). This replica's state is newer than the store's: it is
        // written as a re-seed (which still loses to a later history, a rollback).
        if let Ok(Written::Refused(Some(c))) = &result {
            if behind(c, &record) {
                log::warn!(
                    "fleet: the store's record of {} is at generation {} behind this replica's {}: it lost writes; re-seeding it",
                    record.route, c.generation, record.generation
                );
                record.mode = ShareMode::Reseed;
                result = store.write(&record).await;
            }
        }
        // A re-seed refused for a record the store holds at no higher generation than this
        // replica knows (a later history, a rollback or a resume, at a lower one; another
        // state at the same one): the store lost data, and would stay at or below this
        // replica's generation, which never goes down, so this replica would never adopt
        // the fleet's record nor its next change. The store's record is written again
        // above it: generations go on from the highest any replica knows.
        if let Ok(Written::Refused(Some(c))) = &result {
            if record.mode == ShareMode::Reseed && c.generation <= record.generation {
                let mut raised = c.clone();
                raised.generation = record.generation.max(c.generation + 1);
                raised.mode = ShareMode::Reseed;
                raised.writer = self.fleet.writer_id.clone();
                if let Ok(Written::Accepted(r)) = store.write(&raised).await {
                    result = Ok(Written::Refused(Some(r)));
                }
            }
        }
        // The store's answer says which incarnation it is, as a poll does: a change decided
        // on another one (the store lost its data since) re-seeds it like a poll would.
        if let Ok(Written::Accepted(r) | Written::Refused(Some(r))) = &result {
            if !r.incarnation.is_empty() {
                self.saw_incarnation(&r.incarnation);
            }
        }
        let answer = match result {
            Ok(Written::Accepted(rec)) => {
                w.written.insert(key.clone(), rec.generation);
                self.forget_pending(&key);
                let generation = rec.generation;
                self.shared.adopt(rec);
                Answer::Written(generation)
            }
            Ok(Written::Refused(current)) => {
                self.forget_pending(&key);
                let message = match &current {
                    Some(c) => format!(
                        "the fleet's record changed meanwhile (generation {}: {} by {}): this change was refused and is undone here; the fleet's record applies",
                        c.generation,
                        c.phase.name(),
                        c.by
                    ),
                    None => "the fleet store refused the change".to_string(),
                };
                // Adopted before the answer goes: whoever waits sees the fleet's state. A
                // refused change is undone here (a seed changed nothing here to undo).
                if let Some(c) = &current {
                    match record.mode {
                        ShareMode::Seed => self.shared.adopt(c.clone()),
                        ShareMode::Cas | ShareMode::Reseed => self.shared.adopt_refusal(c.clone()),
                    }
                }
                Answer::Refused {
                    message,
                    current: current.map(Box::new),
                }
            }
            Err(e) => {
                if self.fleet.connected.load(Ordering::Acquire) {
                    log::warn!(
                        "fleet: cannot write {} ({e}); written when the store is back",
                        record.route
                    );
                }
                self.link(false);
                // The poller finds the store again (with Sentinel: asks for the primary).
                self.fleet.poke.notify_one();
                let n = {
                    let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                    // A seed (it only fills an empty store) never displaces a change
                    // waiting to be written.
                    if record.mode != ShareMode::Seed || !p.contains_key(&key) {
                        p.insert(key, (seq, record));
                    }
                    p.len()
                };
                self.fleet.set_view(|v| v.pending = n);
                Answer::Unreachable(format!(
                    "the fleet store is unreachable ({e}): applied on this replica, shared when the store is back"
                ))
            }
        };
        if let Some(reply) = reply {
            let _ = reply.try_send(answer);
        }
    }

    /// A record's write is answered: nothing waits for the store any more.
    fn forget_pending(&self, key: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Writes queued records in order.
    async fn writer(&self, store: &dyn Store, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut writes = Writes::default();
        while let Some(job) = rx.recv().await {
            self.write_one(store, job, &mut writes).await;
        }
    }

    /// Re-reads every record, seeds those the store lacks, says this replica is alive and
    /// reads who else is. Any error is the link down.
    async fn poll(&self, store: &dyn Store) -> StoreResult<()> {
        let routes = self.shared.fleet_routes();
        let versions: HashMap<String, String> = routes
            .iter()
            .map(|(r, v, _)| (r.clone(), v.clone()))
            .collect();
        // Counts of routes that no longer have a canary are not exchanged any more.
        self.fleet
            .mine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|r, _| versions.contains_key(r));
        let keys: Vec<String> = routes
            .iter()
            .map(|(r, v, _)| store.record_key(r, v))
            .collect();
        // The incarnation and the records read together, the records this replica serves
        // renewed: a record lapses only when no replica has served its version for
        // `record_ttl` (a finished release).
        let read = store.read(&keys).await?;
        self.saw_incarnation(&read.incarnation);
        // The store answers: writes that waited for it go now, ahead of anything adopted
        // below (a local rollback not yet shared is not undone by the older records read
        // here: the machine keeps it, and the store lets it win).
        let waiting: Vec<(u64, FleetRecord)> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for (seq, record) in waiting {
            self.fleet.queue(Job {
                record,
                reply: None,
                seq,
            });
        }
        for ((_, _, seed), value) in routes.into_iter().zip(read.records) {
            match value {
                Some(rec) => {
                    // The store behind what this replica applied, in the same incarnation:
                    // it lost acknowledged writes (a failover to a lagging replica). This
                    // replica's state re-seeds it; the store keeps the later history (and
                    // at the same generation its own record, raised above it).
                    if let Some(mut seed) = seed.filter(|s| behind(&rec, s) || diverged(&rec, s)) {
                        seed.mode = ShareMode::Reseed;
                        seed.kind = "store_behind".into();
                        self.fleet.share(seed, None);
                    }
                    self.shared.adopt(rec)
                }
                // A new fleet, or a store that lost its data: this replica's state seeds it
                // (only if no other replica's got there first).
                None => {
                    if let Some(seed) = seed {
                        self.fleet.share(seed, None);
                    }
                }
            }
        }
        self.exchange_counts(store).await?;
        let now = self.fleet.clock.now_ms();
        let mut me = Member {
            instance: self.fleet.settings.instance.clone(),
            last_seen_ms: now,
            generations: self.shared.fleet_generations(),
            versions,
            reports_versions: true,
            file_hashes: HashMap::new(),
            file_skew_since: HashMap::new(),
        };
        let warn_ms = self.fleet.settings.config_skew_warning.as_millis() as u64;
        for (route, (hash, since)) in self.shared.fleet_files() {
            let skewed = since.is_some_and(|t| now.saturating_sub(t) >= warn_ms);
            self.shared
                .metrics()
                .fleet_config_skew
                .with_label_values(&[&self.fleet.settings.cluster, &route])
                .set(i64::from(skewed));
            if let Some(t) = since {
                me.file_skew_since.insert(route.clone(), t);
            }
            me.file_hashes.insert(route, hash);
        }
        let entry = serde_json::to_string(&me).map_err(|e| StoreError(e.to_string()))?;
        let all = store.members(&me.instance, &entry).await?;
        // A replica silent for 10 polls (at least 30 s) is gone from the view; after an
        // hour its entry is removed.
        let alive = (10 * self.fleet.settings.poll_interval.as_millis() as u64).max(30_000);
        let mut members: Vec<Member> = Vec::new();
        let mut gone = Vec::new();
        for (instance, text) in all {
            match serde_json::from_str::<Member>(&text) {
                Ok(m) if now.saturating_sub(m.last_seen_ms) <= alive => members.push(m),
                Ok(m) if now.saturating_sub(m.last_seen_ms) > 3_600_000 => gone.push(instance),
                Ok(_) => {}
                Err(_) => gone.push(instance),
            }
        }
        if !gone.is_empty() {
            store.forget_members(&gone).await?;
        }
        members.sort_by(|a, b| a.instance.cmp(&b.instance));
        self.delete_unserved(store, &members, now, self.fleet.fresh_ms())
            .await?;
        self.shared
            .metrics()
            .fleet_members
            .with_label_values(&[&self.fleet.settings.cluster])
            .set(members.len() as i64);
        let waiting = self.pending.lock().unwrap_or_else(|p| p.into_inner()).len();
        self.fleet.set_view(|v| {
            v.members = members;
            v.last_sync_ms = now;
            v.pending = waiting;
        });
        Ok(())
    }

    /// Deletes the records of versions no alive replica serves (every member moved to
    /// another canary version, or the route is gone), once they have not changed for
    /// `grace_ms`: a replica that just wrote a new version's record may not have said yet
    /// that it serves it. Records otherwise lapse after `record_ttl`.
    async fn delete_unserved(
        &self,
        store: &dyn Store,
        members: &[Member],
        now: u64,
        grace_ms: u64,
    ) -> StoreResult<()> {
        if members.is_empty() || !members.iter().all(|m| m.reports_versions) {
            return Ok(());
        }
        let served: HashSet<String> = members
            .iter()
            .flat_map(|m| m.versions.iter().map(|(r, v)| store.record_key(r, v)))
            .collect();
        let gone: Vec<String> = store
            .written()
            .await?
            .into_iter()
            .filter(|(key, _)| !served.contains(key))
            .filter(|(_, rec)| match rec {
                Some(rec) => now.saturating_sub(rec.at_ms) > grace_ms,
                // Lapsed (or unreadable): only its place among the written is left.
                None => true,
            })
            .map(|(key, _)| key)
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        store.delete(&gone).await?;
        log::info!(
            "fleet: deleted {} record(s) of versions no replica serves",
            gone.len()
        );
        Ok(())
    }

    /// Writes this replica's counts and reads the others'.
    async fn exchange_counts(&self, store: &dyn Store) -> StoreResult<()> {
        let mine: Vec<(String, Contribution)> = self
            .fleet
            .mine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(r, c)| (r.clone(), c.clone()))
            .collect();
        let me = &self.fleet.settings.instance;
        let ttl_ms = self.fleet.fresh_ms() * 4;
        let mut others = HashMap::new();
        for (route, c) in mine {
            let counts = serde_json::to_string(&c).map_err(|e| StoreError(e.to_string()))?;
            let all = store
                .exchange_counts(&route, &c.canary_version, me, &counts, ttl_ms)
                .await?;
            let theirs: Vec<(String, Contribution)> = all
                .into_iter()
                .filter(|(inst, _)| inst != me)
                .filter_map(|(inst, text)| {
                    serde_json::from_str::<Contribution>(&text)
                        .ok()
                        .map(|c| (inst, c))
                })
                .collect();
            others.insert(route, theirs);
        }
        *self.fleet.others.lock().unwrap_or_else(|p| p.into_inner()) = others;
        Ok(())
    }

    async fn poller(&self, store: &dyn Store) {
        let every = self.fleet.settings.poll_interval;
        let mut failed = true;
        loop {
            // At start, after a failure, and with Sentinel before every poll (the primary
            // may have moved while the old one still answers: `Store::primary_may_move`).
            if failed || store.primary_may_move() {
                if let Some(p) = store.reconnect().await {
                    if p.moved {
                        self.fleet.primary_moved.notify_one();
                    }
                    self.fleet.set_view(|v| {
                        v.primary = p.address;
                        if p.moved {
                            v.primary_changes += 1;
                        }
                    });
                }
            }
            let answered =
                match tokio::time::timeout(every.max(Duration::from_secs(1)), self.poll(store))
                    .await
                {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        log::debug!("fleet: poll failed: {e}");
                        false
                    }
                    Err(_) => false,
                };
            failed = !answered;
            self.polled(answered);
            // While the store is down, retry sooner than the poll: a rollback waits to be
            // shared, and a starting replica waits to be ready.
            let wait = if self.fleet.connected.load(Ordering::Acquire) {
                every
            } else {
                every.min(Duration::from_millis(250))
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.fleet.poke.notified() => {}
            }
        }
    }

    /// The subscription: every record published is adopted at once. Re-made whenever it
    /// ends (a killed connection, the store restarted), at once when the poller finds the
    /// link back, then a poll catches up on what was missed meanwhile.
    async fn subscriber(&self, store: &dyn Store) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match tokio::time::timeout(Duration::from_secs(2), store.subscribe()).await {
                Ok(Ok(mut records)) => {
                    backoff = Duration::from_millis(50);
                    self.fleet.poke.notify_one();
                    let moved = loop {
                        tokio::select! {
                            rec = records.next() => match rec {
                                Some(rec) => self.shared.adopt(rec),
                                None => break false,
                            },
                            // A subscription to a primary Sentinel failed over from may
                            // live on and hear nothing more: subscribe on the new one now
                            // (a rollback reached a replica only by its next poll, 421 ms
                            // late, before: seed 302869 replayed).
                            _ = self.fleet.primary_moved.notified() => break true,
                        }
                    };
                    if moved {
                        log::info!("fleet: the primary moved; subscribing on the new one");
                        continue;
                    }
                    log::info!("fleet: the subscription ended; re-subscribing");
                }
                Ok(Err(e)) => log::debug!("fleet: cannot subscribe: {e}"),
                Err(_) => log::debug!("fleet: subscribing timed out"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.fleet.link_back.notified() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

#[async_trait]
impl BackgroundService for FleetService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(rx) = self
            .fleet
            .rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let store: Arc<dyn Store> = match &self.store {
            Some(s) => s.clone(),
            None => match redis_store::RedisStore::new(
                &self.fleet.settings,
                self.fleet.ca_pem.as_deref(),
                &self.fleet.writer_id,
                self.fleet.clock.clone(),
            ) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    log::error!("fleet: {e}: this replica runs alone");
                    return;
                }
            },
        };
        self.begin();
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = self.writer(&*store, rx) => {}
            _ = self.poller(&*store) => {}
            _ = self.subscriber(&*store) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::machine::decide;
    use crate::rollout::phase::Phase;

    fn rec(generation: u64, phase: Phase, mode: ShareMode) -> FleetRecord {
        FleetRecord {
            route: "app".into(),
            canary_version: "v2".into(),
            rolled_back: matches!(phase, Phase::RolledBack { .. }),
            phase,
            generation,
            weight_percent: 0.0,
            step: None,
            paused: false,
            kind: "weight".into(),
            reason: "test".into(),
            by: "a".into(),
            writer: "a/1/1".into(),
            at_ms: 1,
            mode,
            incarnation: String::new(),
            resumes: 0,
            unheard: false,
            file: None,
        }
    }

    #[test]
    fn the_store_compares_and_sets_and_a_rollback_always_wins() {
        let raise = rec(0, Phase::Weight { buckets: 5_000 }, ShareMode::Cas);
        let rollback = rec(
            0,
            Phase::RolledBack {
                reason: "manual".into(),
            },
            ShareMode::Cas,
        );
        // The raise first: the rollback, decided on the same generation, still lands.
        let (ok, first) = decide(None, &raise, "i1");
        assert!(ok);
        assert_eq!(first.generation, 1);
        let (ok, second) = decide(Some(&first), &rollback, "i1");
        assert!(ok);
        assert_eq!(second.generation, 2);
        // The rollback first: the raise is refused with the rollback.
        let (_, first) = decide(None, &rollback, "i1");
        assert_eq!(decide(Some(&first), &raise, "i1"), (false, first.clone()));
        // A seed never overwrites.
        let seed = rec(0, Phase::Manual, ShareMode::Seed);
        assert_eq!(decide(Some(&first), &seed, "i1"), (false, first.clone()));
        assert_eq!(decide(None, &seed, "i1").1.generation, 1);
    }

    /// A compare-and-set decided against a store that since lost its data (another
    /// incarnation) is refused even when the generation happens to match; a rollback still
    /// lands. What is written carries the store's incarnation.
    #[test]
    fn a_write_decided_on_another_incarnation_is_refused_unless_a_rollback() {
        let (_, current) = decide(None, &rec(0, Phase::Manual, ShareMode::Cas), "new");
        assert_eq!(current.generation, 1);
        assert_eq!(current.incarnation, "new");
        let mut raise = rec(1, Phase::Weight { buckets: 5_000 }, ShareMode::Cas);
        raise.incarnation = "old".into();
        assert_eq!(
            decide(Some(&current), &raise, "new"),
            (false, current.clone())
        );
        raise.incarnation = "new".into();
        assert!(decide(Some(&current), &raise, "new").0);
        let mut rollback = rec(
            1,
            Phase::RolledBack {
                reason: "manual".into(),
            },
            ShareMode::Cas,
        );
        rollback.incarnation = "old".into();
        let (ok, written) = decide(Some(&current), &rollback, "new");
        assert!(ok);
        assert_eq!(written.incarnation, "new");
    }
}
