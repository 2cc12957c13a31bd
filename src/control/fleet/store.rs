//! The fleet's store as the fleet's decisions see it: the narrow [`Store`] interface
//! (compare-and-set write, read, publish and subscribe, and the few small operations the
//! members' view, the fleet-wide counts and the records' deletion need), and what it holds
//! besides the records ([`Member`], [`Contribution`]). Redis is one implementation
//! ([`super::redis_store`]); the tests' seeded in-memory store is another, so the rules
//! written over this interface run unchanged under simulated faults.

use std::collections::HashMap;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::rollout::machine::FleetRecord;
use crate::stats::window::Totals;

/// A replica as the fleet sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub instance: String,
    pub last_seen_ms: u64,
    /// The fleet generation applied per route.
    pub generations: HashMap<String, u64>,
    /// The canary version served per route (routes with a canary).
    #[serde(default)]
    pub versions: HashMap<String, String>,
    /// Says `versions` is there: a member written by an older Kanaria does not, and while
    /// one is alive no record is deleted for not being served.
    #[serde(default)]
    pub reports_versions: bool,
    /// Per route: the hash of what this member's config file decides (weight, steps).
    #[serde(default)]
    pub file_hashes: HashMap<String, String>,
    /// Per route whose file decides otherwise than the fleet: since when (ms since the
    /// Unix epoch).
    #[serde(default)]
    pub file_skew_since: HashMap<String, u64>,
}

/// One track pair's counts over a span.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Spans {
    pub canary: Totals,
    pub stable: Totals,
}

impl Spans {
    pub fn add(&mut self, other: &Spans) {
        self.canary.merge(&other.canary);
        self.stable.merge(&other.stable);
    }
}

/// What one replica counted for a route: over the analysis window and the short span.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Contribution {
    pub at_ms: u64,
    /// When the phase these counts start from began on that replica (wall clock, ms; 0 from
    /// a replica that does not say): counts from an earlier phase are not summed with a
    /// later one's (issue 21: a resume was rolled back again at once on the other replicas'
    /// counts from before the rollback).
    #[serde(default)]
    pub since_ms: u64,
    pub canary_version: String,
    pub window: Spans,
    pub fast: Spans,
    /// The dark launch's answers compared since the phase began on that replica, and how
    /// many differed beyond noise (0, 0 without a shadow, and from a replica that does not
    /// say).
    #[serde(default)]
    pub shadow: (u64, u64),
    /// The dark launch's most frequent differences on that replica since it started:
    /// (path template, field, count), at most [`SHARED_DIFFERENCES`].
    #[serde(default)]
    pub differences: Vec<(String, String, u64)>,
}

/// How many of its most frequent differences a replica shares with its counts.
pub const SHARED_DIFFERENCES: usize = 20;

/// The store's answer to a write.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// Written (and published) as this record: the generation and incarnation the store
    /// gave it.
    Accepted(FleetRecord),
    /// Refused by the compare-and-set: the store's record (`None`: unreadable).
    Refused(Option<FleetRecord>),
}

/// The store did not answer (or answered nonsense): the link is down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

pub type StoreResult<T> = Result<T, StoreError>;

/// What a poll reads at once: the store's incarnation and the records asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Read {
    /// Set by this read when the store had none (a new fleet, or a store that lost it).
    pub incarnation: String,
    /// One per key asked for, in order (`None`: the store has no record there).
    pub records: Vec<Option<FleetRecord>>,
}

/// A primary found again after a failure ([`Store::reconnect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    /// `host:port`.
    pub address: String,
    /// Another primary than the one in use before (a failover).
    pub moved: bool,
}

/// The fleet's store. Records are named by [`Store::record_key`]; a write is a
/// compare-and-set by [`decide`](crate::rollout::machine::decide)'s rule, done atomically by
/// the store, which also stamps its incarnation on the record and publishes it.
#[async_trait]
pub trait Store: Send + Sync {
    /// The key of the record of a route's canary version.
    fn record_key(&self, route: &str, version: &str) -> String;
    /// Compare-and-set of `record` (its generation: the one it was decided on; its mode:
    /// how it compares), then publication of what was written.
    async fn write(&self, record: &FleetRecord) -> StoreResult<Written>;
    /// The incarnation (set now if the store has none) and the records at `keys`, read
    /// together; renews those records' time to live.
    async fn read(&self, keys: &[String]) -> StoreResult<Read>;
    /// Every record key written and not deleted yet, with its record (`None`: lapsed).
    async fn written(&self) -> StoreResult<Vec<(String, Option<FleetRecord>)>>;
    /// Deletes records (and their place among the written ones).
    async fn delete(&self, keys: &[String]) -> StoreResult<()>;
    /// Says `instance` is alive with its `entry` (a [`Member`] as JSON) and reads every
    /// member's entry as text, per instance (an unreadable one is for the caller to
    /// forget). Entries and counts go in and come out as the caller's text: it alone
    /// encodes and decodes them.
    async fn members(&self, instance: &str, entry: &str) -> StoreResult<HashMap<String, String>>;
    /// Removes members' entries.
    async fn forget_members(&self, instances: &[String]) -> StoreResult<()>;
    /// Writes `instance`'s counts (a [`Contribution`] as JSON) of a route's canary
    /// version (kept `ttl_ms`) and reads every replica's, as text per instance.
    async fn exchange_counts(
        &self,
        route: &str,
        version: &str,
        instance: &str,
        counts: &str,
        ttl_ms: u64,
    ) -> StoreResult<HashMap<String, String>>;
    /// The records published from now on (ends when the subscription breaks).
    async fn subscribe(&self) -> StoreResult<BoxStream<'static, FleetRecord>>;
    /// Finds the store again (Redis Sentinel: asks which node is the primary now): after
    /// a failed operation, and before every poll (see [`Store::primary_may_move`]). `Some`
    /// when the primary in use changed.
    async fn reconnect(&self) -> Option<Primary>;
    /// Whether the primary can change while every operation still succeeds, so the poller
    /// asks before every poll: with Sentinel, a primary failed over from may still answer
    /// (it was starved or cut off from the sentinels, not from this replica; or demoted,
    /// when reads still succeed) until Sentinel demotes it, up to its 10 s INFO period,
    /// and a replica that stayed on it would split from those on the new one (found by
    /// `make chaos`, seeds 302869 and 836038).
    fn primary_may_move(&self) -> bool {
        false
    }
}
