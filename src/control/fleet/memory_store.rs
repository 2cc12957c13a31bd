//! A seeded in-memory fleet store for the simulation (tests only): the compare-and-set
//! rule of [`decide`], and the faults a real store shows, each decided by the seed:
//! publications dropped, delayed and delivered out of order, a replica cut off, a restart
//! empty (a new incarnation) and a restart older (a failover to a replica that lost the
//! last writes, same incarnation). Records never expire here (the simulation's releases
//! are few), and nothing reads a clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures::channel::mpsc;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::store::{Primary, Read, Store, StoreError, StoreResult, Written};
use crate::rollout::machine::{decide, FleetRecord};

/// SplitMix64: small, fast and the same sequence on every machine for one seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True `per_mille` times in a thousand.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1_000) < per_mille
    }
}

/// A publication on its way to one replica.
#[derive(Debug, Clone)]
struct InFlight {
    to: usize,
    record: FleetRecord,
}

struct State {
    rng: Rng,
    /// How many incarnations this store has had (names the next).
    incarnations: u64,
    incarnation: Option<String>,
    records: BTreeMap<String, FleetRecord>,
    /// Per accepted write, the record it replaced: a restart older undoes the last ones.
    undo: Vec<(String, Option<FleetRecord>)>,
    written: BTreeSet<String>,
    members: BTreeMap<String, String>,
    counts: BTreeMap<String, BTreeMap<String, String>>,
    /// Replicas cut off: every operation of theirs fails.
    cut: BTreeSet<usize>,
    /// Each subscribed replica's subscription.
    subscribers: BTreeMap<usize, mpsc::UnboundedSender<FleetRecord>>,
    in_flight: Vec<InFlight>,
    /// Publications lost, per mille.
    drop_per_mille: u64,
}

/// The store itself; each replica talks to it through its own [`Handle`].
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// A store whose faults follow `seed`; `drop_per_mille` of the publications are lost.
    pub fn new(seed: u64, drop_per_mille: u64) -> Arc<MemoryStore> {
        Arc::new(MemoryStore {
            state: Mutex::new(State {
                rng: Rng::new(seed ^ 0x0053_544f_5245),
                incarnations: 0,
                incarnation: None,
                records: BTreeMap::new(),
                undo: Vec::new(),
                written: BTreeSet::new(),
                members: BTreeMap::new(),
                counts: BTreeMap::new(),
                cut: BTreeSet::new(),
                subscribers: BTreeMap::new(),
                in_flight: Vec::new(),
                drop_per_mille,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replica `replica`'s connection.
    pub fn handle(self: &Arc<Self>, replica: usize) -> Arc<Handle> {
        Arc::new(Handle {
            store: self.clone(),
            replica,
        })
    }

    /// The record at `key`, as the store holds it.
    pub fn record(&self, key: &str) -> Option<FleetRecord> {
        self.lock().records.get(key).cloned()
    }

    /// Cuts `replica` off: its operations fail and its subscription ends.
    pub fn cut(&self, replica: usize) {
        let mut s = self.lock();
        s.cut.insert(replica);
        s.subscribers.remove(&replica);
        s.in_flight.retain(|m| m.to != replica);
    }

    /// Returns whether `replica` was cut off.
    pub fn heal(&self, replica: usize) -> bool {
        self.lock().cut.remove(&replica)
    }

    pub fn heal_all(&self) {
        self.lock().cut.clear();
    }

    /// A restart without data: every key gone (the incarnation too), every subscription
    /// ended.
    pub fn restart_empty(&self) {
        let mut s = self.lock();
        s.incarnation = None;
        s.records.clear();
        s.undo.clear();
        s.written.clear();
        s.members.clear();
        s.counts.clear();
        s.subscribers.clear();
        s.in_flight.clear();
    }

    /// A failover to a replica that lost the last `lost` writes (acknowledged ones): the
    /// records as they were before them, the incarnation kept; every subscription ended.
    /// Returns how many writes were undone.
    pub fn restart_older(&self, lost: usize) -> usize {
        let mut s = self.lock();
        let mut undone = 0;
        while undone < lost {
            let Some((key, before)) = s.undo.pop() else {
                break;
            };
            match before {
                Some(rec) => s.records.insert(key, rec),
                None => s.records.remove(&key),
            };
            undone += 1;
        }
        s.subscribers.clear();
        s.in_flight.clear();
        undone
    }

    /// Delivers one publication in flight, chosen by the seed (so they arrive out of
    /// order, and those not chosen are delayed). Returns whether there was one.
    pub fn deliver_one(&self) -> bool {
        let mut s = self.lock();
        if s.in_flight.is_empty() {
            return false;
        }
        let n = s.in_flight.len() as u64;
        let i = s.rng.below(n) as usize;
        let m = s.in_flight.remove(i);
        if let Some(tx) = s.subscribers.get(&m.to) {
            // A subscription the replica dropped (it restarted) is gone with it.
            let _ = tx.unbounded_send(m.record);
        }
        true
    }

    fn incarnation(s: &mut State) -> String {
        if let Some(i) = &s.incarnation {
            return i.clone();
        }
        s.incarnations += 1;
        let id = format!("inc{}", s.incarnations);
        s.incarnation = Some(id.clone());
        id
    }
}

/// One replica's connection to the [`MemoryStore`].
pub struct Handle {
    store: Arc<MemoryStore>,
    replica: usize,
}

impl Handle {
    /// The store's state, unless this replica is cut off.
    fn reach(&self) -> StoreResult<MutexGuard<'_, State>> {
        let s = self.store.lock();
        if s.cut.contains(&self.replica) {
            return Err(StoreError(format!("replica {} is cut off", self.replica)));
        }
        Ok(s)
    }
}

#[async_trait]
impl Store for Handle {
    fn record_key(&self, route: &str, version: &str) -> String {
        format!("{route}:{version}")
    }

    async fn write(&self, record: &FleetRecord) -> StoreResult<Written> {
        let mut s = self.reach()?;
        let incarnation = MemoryStore::incarnation(&mut s);
        let key = self.record_key(&record.route, &record.canary_version);
        let current = s.records.get(&key).cloned();
        let (accepted, out) = decide(current.as_ref(), record, &incarnation);
        if !accepted {
            return Ok(Written::Refused(current));
        }
        s.undo.push((key.clone(), current));
        s.records.insert(key.clone(), out.clone());
        s.written.insert(key);
        let to: Vec<usize> = s.subscribers.keys().copied().collect();
        let drop_per_mille = s.drop_per_mille;
        for replica in to {
            if !s.rng.chance(drop_per_mille) {
                s.in_flight.push(InFlight {
                    to: replica,
                    record: out.clone(),
                });
            }
        }
        Ok(Written::Accepted(out))
    }

    async fn read(&self, keys: &[String]) -> StoreResult<Read> {
        let mut s = self.reach()?;
        let incarnation = MemoryStore::incarnation(&mut s);
        let records = keys.iter().map(|k| s.records.get(k).cloned()).collect();
        Ok(Read {
            incarnation,
            records,
        })
    }

    async fn written(&self) -> StoreResult<Vec<(String, Option<FleetRecord>)>> {
        let s = self.reach()?;
        Ok(s.written
            .iter()
            .map(|k| (k.clone(), s.records.get(k).cloned()))
            .collect())
    }

    async fn delete(&self, keys: &[String]) -> StoreResult<()> {
        let mut s = self.reach()?;
        for k in keys {
            s.records.remove(k);
            s.written.remove(k);
        }
        Ok(())
    }

    async fn members(&self, instance: &str, entry: &str) -> StoreResult<HashMap<String, String>> {
        let mut s = self.reach()?;
        s.members.insert(instance.to_string(), entry.to_string());
        Ok(s.members.clone().into_iter().collect())
    }

    async fn forget_members(&self, instances: &[String]) -> StoreResult<()> {
        let mut s = self.reach()?;
        for i in instances {
            s.members.remove(i);
        }
        Ok(())
    }

    async fn exchange_counts(
        &self,
        route: &str,
        version: &str,
        instance: &str,
        counts: &str,
        _ttl_ms: u64,
    ) -> StoreResult<HashMap<String, String>> {
        let mut s = self.reach()?;
        let all = s.counts.entry(format!("{route}:{version}")).or_default();
        all.insert(instance.to_string(), counts.to_string());
        Ok(all.clone().into_iter().collect())
    }

    async fn subscribe(&self) -> StoreResult<BoxStream<'static, FleetRecord>> {
        let mut s = self.reach()?;
        let (tx, rx) = mpsc::unbounded();
        s.subscribers.insert(self.replica, tx);
        Ok(rx.boxed())
    }

    async fn reconnect(&self) -> Option<Primary> {
        None
    }
}
