//! The fleet: replicas sharing each route's rollout through Redis (`[fleet]`).
//!
//! The store holds one record per route and canary version (`kanaria:<cluster>:rollout:
//! <route>:<version>`, a [`FleetRecord`] as JSON). Every change is decided by the state
//! machine of the replica where it happens and handed here as an
//! [`Effect::Share`](crate::rollout::machine::Effect::Share); this module writes it with
//! one Lua script that compares and sets the generation (a rollback is written whatever
//! the generation: it always wins) and publishes the new record on the fleet's channel.
//! Every replica applies the records it receives ([`Input::Adopt`](crate::rollout::machine::Input::Adopt)) when they are newer
//! than what it applied. Pub/sub is at-most-once, so each replica also re-reads the
//! records every `poll_interval`, and says there that it is alive (`members` hash).
//! Records expire after `record_ttl`; each poll renews those of the versions the replica
//! serves, so only the records of releases no replica serves any more go.
//!
//! Analysis is fleet-wide: each replica's analysis loop hands its raw counts (requests,
//! errors, latency histogram, per track, over the analysis window and the short span) to
//! [`Fleet::contribute`]; the poll writes them to a hash per route and canary version
//! (`counts:<route>:<version>`, a field per replica) and reads the others'. The verdict
//! is taken on the sum.
//!
//! Redis down: the replica keeps serving what it knows; its machines are told the link is
//! down (nothing advances, only rollbacks apply); the writes that failed are kept, the
//! newest per record, and written when Redis answers again (a rollback still wins then).
//! Steps wait [`Fleet::settle_ms`] after the link is back, so such a rollback reaches the
//! other replicas before any of them moves on.
//! The command connection is the `redis` crate's `ConnectionManager` (it reconnects); the
//! subscription is a dedicated connection re-made whenever it ends. With Redis Sentinel
//! (`redis+sentinel://`) the poller asks the sentinels for the primary (the `redis` crate's
//! `SentinelClient`, which checks the node's `ROLE`) at start and after every failed
//! poll, and moves both connections to a new primary when Sentinel names one: while no
//! primary answers the link is down (nothing advances, rollbacks wait to be shared).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

use crate::clock::Clock;
use crate::config::FleetSettings;
use crate::metrics::Metrics;
use crate::rollout::machine::{FleetRecord, ShareMode};
use crate::stats::window::Totals;

/// Compare-and-set of one record, then publication. KEYS[1]: the record, KEYS[2]: the
/// store's incarnation (set with ARGV[6] if absent, and stamped on the record), KEYS[3]: the
/// set of record keys (for their deletion once no replica serves them); ARGV: the new
/// record (JSON), the generation it was decided on, `cas`, `seed` or `reseed`, the
/// channel, the record's time to live in ms (renewed by every poll while a replica serves
/// the version). Returns `{1, record}` when written, `{0, current}` when refused.
/// Histories order by operator resumes, then a rollback over anything else (`order`); only
/// the same kind compares generations: `cas` must match the generation and the incarnation
/// it was decided on, `reseed` must be higher. Mirrored by [`decide`].
const WRITE_SCRIPT: &str = r#"
redis.call('SET', KEYS[2], ARGV[6], 'NX')
local inc = redis.call('GET', KEYS[2])
local cur = redis.call('GET', KEYS[1])
local new = cjson.decode(ARGV[1])
local stale = type(new.incarnation) == 'string' and new.incarnation ~= '' and new.incarnation ~= inc
new.incarnation = inc
local expected = tonumber(ARGV[2])
local gen = 0
if cur then
  local c = cjson.decode(cur)
  gen = tonumber(c.generation) or 0
  if ARGV[3] == 'seed' then return {0, cur} end
  local nres = tonumber(new.resumes) or 0
  local cres = tonumber(c.resumes) or 0
  local nrb = new.rolled_back == true
  local crb = c.rolled_back == true
  local order = 0
  if nres > cres then order = 1 elseif nres < cres then order = -1
  elseif nrb and not crb then order = 1 elseif crb and not nrb then order = -1 end
  if order < 0 then return {0, cur} end
  if order == 0 then
    if ARGV[3] == 'reseed' then
      if expected <= gen then return {0, cur} end
    elseif gen ~= expected or stale then
      return {0, cur}
    end
  end
end
if expected > gen then gen = expected end
new.generation = gen + 1
local out = cjson.encode(new)
redis.call('SET', KEYS[1], out, 'PX', ARGV[5])
redis.call('SADD', KEYS[3], KEYS[1])
redis.call('PUBLISH', ARGV[4], out)
return {1, out}
"#;

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
}

/// A write for the store, with whoever waits for its answer.
struct Job {
    record: FleetRecord,
    reply: Option<Reply>,
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

    fn prefix(&self) -> String {
        format!("kanaria:{}:", self.settings.cluster)
    }

    pub fn record_key(&self, route: &str, version: &str) -> String {
        format!("{}rollout:{route}:{version}", self.prefix())
    }

    fn channel(&self) -> String {
        format!("{}changes", self.prefix())
    }

    fn counts_key(&self, route: &str, version: &str) -> String {
        format!("{}counts:{route}:{version}", self.prefix())
    }

    /// Hands this replica's latest counts of a route to the fleet (written by the next poll).
    pub fn contribute(&self, route: &str, c: Contribution) {
        self.mine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(route.to_string(), c);
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

    /// The records' time to live in the store, in ms (at least 1).
    fn record_ttl_ms(&self) -> u64 {
        (self.settings.record_ttl.as_millis() as u64).max(1)
    }

    /// How long steps wait after the store comes back (ms): long enough for a replica that
    /// decided a rollback during the outage to reconnect (it retries every 250 ms while the
    /// store is down) and write it, so the others adopt it before they move on.
    pub fn settle_ms(&self) -> u64 {
        (3 * self.settings.poll_interval.as_millis() as u64).max(2_000)
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

    /// The set of every record key written (`SADD` by the write script), so records of
    /// versions no replica serves can be found and deleted without a `SCAN`.
    fn records_key(&self) -> String {
        format!("{}records", self.prefix())
    }

    /// Set once per store (`SET NX`) with a random id: a store that comes back without it
    /// lost this fleet's data.
    fn incarnation_key(&self) -> String {
        format!("{}incarnation", self.prefix())
    }

    fn members_key(&self) -> String {
        format!("{}members", self.prefix())
    }

    /// Queues a record for the store (never blocks). Called under the control lock.
    pub fn share(&self, mut record: FleetRecord, reply: Option<Reply>) {
        record.by = self.settings.instance.clone();
        record.writer = self.writer_id.clone();
        if self.tx.send(Job { record, reply }).is_err() {
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
        self.synced.load(Ordering::Acquire)
            || self.clock.now().saturating_duration_since(self.started)
                >= self.settings.startup_timeout
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

/// The background service talking to Redis.
pub struct FleetService {
    shared: Arc<dyn Replica>,
    fleet: Arc<Fleet>,
}

impl FleetService {
    pub fn new(shared: Arc<dyn Replica>, fleet: Arc<Fleet>) -> Self {
        FleetService { shared, fleet }
    }
}

/// The password for the primary: the URL's, else `KANARIA_FLEET_PASSWORD`.
fn env_password() -> Option<String> {
    std::env::var("KANARIA_FLEET_PASSWORD").ok()
}

fn client(fleet: &Fleet) -> redis::RedisResult<redis::Client> {
    let settings = &fleet.settings;
    let mut info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())?;
    if info.redis_settings().password().is_none() {
        if let Some(pw) = env_password() {
            let redis_settings = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(redis_settings);
        }
    }
    match &fleet.ca_pem {
        // rediss:// trusting the configured authorities only.
        Some(pem) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            },
        ),
        // redis://, or rediss:// trusting the system's store.
        None => redis::Client::open(info),
    }
}

/// Where the store's primary is: the URL itself, or whatever Redis Sentinel names.
enum Target {
    Direct(redis::Client),
    Sentinel(redis::sentinel::SentinelClient),
}

impl Target {
    fn new(fleet: &Fleet) -> redis::RedisResult<Target> {
        use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
        let Some(url) = &fleet.settings.sentinel else {
            return Ok(Target::Direct(client(fleet)?));
        };
        let sentinels = url
            .sentinels
            .iter()
            .map(|(host, port)| redis::ConnectionAddr::Tcp(host.clone(), *port));
        let mut b = SentinelClientBuilder::new(sentinels, &url.master, SentinelServerType::Master)?
            .set_client_to_redis_db(url.db);
        if let Some(user) = &url.username {
            b = b.set_client_to_redis_username(user);
        }
        if let Some(pw) = url.password.clone().or_else(env_password) {
            b = b.set_client_to_redis_password(pw);
        }
        if url.tls {
            b = b
                .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
            if let Some(pem) = &fleet.ca_pem {
                let certs = || redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                };
                b = b
                    .set_client_to_redis_certificates(certs())
                    .set_client_to_sentinel_certificates(certs());
            }
        }
        Ok(Target::Sentinel(b.build()?))
    }

    /// The client for the primary now: for Sentinel, asked of the sentinels in order (the
    /// first that answers), the node's role checked; bounded, so a dead sentinel does not
    /// hold the poll.
    async fn primary(&mut self) -> redis::RedisResult<redis::Client> {
        match self {
            Target::Direct(c) => Ok(c.clone()),
            Target::Sentinel(s) => {
                match tokio::time::timeout(Duration::from_secs(2), s.async_get_client()).await {
                    Ok(r) => r,
                    Err(_) => Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "no sentinel named a primary within 2 s",
                    ))),
                }
            }
        }
    }

    fn is_sentinel(&self) -> bool {
        matches!(self, Target::Sentinel(_))
    }
}

/// Whether the store's `current` record is behind the generation `mine` was decided on,
/// in the same incarnation of the store: the store lost writes it had acknowledged.
fn behind(current: &FleetRecord, mine: &FleetRecord) -> bool {
    !mine.incarnation.is_empty()
        && current.incarnation == mine.incarnation
        && current.generation < mine.generation
}

/// The connection in use: commands, and the client the subscription connects with.
/// Replaced as a whole when Sentinel names another primary.
struct Link {
    conn: ConnectionManager,
    client: redis::Client,
    primary: String,
}

/// The connection in use, none until the primary is first found.
type CurrentLink = arc_swap::ArcSwapOption<Link>;

/// A command connection to `client`, with short timeouts: a store that does not answer
/// must not hold a rollback back.
fn manager(client: redis::Client) -> redis::RedisResult<ConnectionManager> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client, config)
}

fn no_primary() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "no primary known yet"))
}

/// The store's answer to a write.
enum Written {
    Accepted(FleetRecord),
    Refused(Option<FleetRecord>),
}

/// A fresh incarnation id: random enough that two stores never share one (std's hasher
/// keys are random per process; the writer's id and the time differ between processes).
fn new_incarnation(fleet: &Fleet) -> String {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    fleet.writer_id.hash(&mut h);
    fleet.clock.now_ms().hash(&mut h);
    format!("{:016x}", h.finish())
}

impl FleetService {
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

    async fn write(
        &self,
        conn: &mut ConnectionManager,
        script: &redis::Script,
        record: &FleetRecord,
    ) -> redis::RedisResult<Written> {
        let body = serde_json::to_string(record).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Client, "encode", e.to_string()))
        })?;
        let mode = match record.mode {
            ShareMode::Cas => "cas",
            ShareMode::Seed => "seed",
            ShareMode::Reseed => "reseed",
        };
        let (written, text): (i64, Option<String>) = script
            .key(self.fleet.record_key(&record.route, &record.canary_version))
            .key(self.fleet.incarnation_key())
            .key(self.fleet.records_key())
            .arg(body)
            .arg(record.generation)
            .arg(mode)
            .arg(self.fleet.channel())
            .arg(self.fleet.record_ttl_ms())
            .arg(new_incarnation(&self.fleet))
            .invoke_async(conn)
            .await?;
        let parsed = text.and_then(|t| serde_json::from_str::<FleetRecord>(&t).ok());
        Ok(match (written, parsed) {
            (1, Some(r)) => Written::Accepted(r),
            (_, r) => Written::Refused(r),
        })
    }

    /// Writes queued records in order. A refused write adopts the store's record; a write
    /// that fails on the connection waits (the newest per record) for the store to return.
    async fn writer(
        &self,
        link: Arc<CurrentLink>,
        mut rx: mpsc::UnboundedReceiver<Job>,
        pending: Arc<tokio::sync::Mutex<HashMap<String, FleetRecord>>>,
    ) {
        let script = redis::Script::new(WRITE_SCRIPT);
        // The newest generation this process wrote per record: two changes decided here in
        // a row were both decided on the older one, and the second must not be refused
        // for the first.
        let mut written: HashMap<String, u64> = HashMap::new();
        // How many entries the last pruning kept.
        let mut kept = 0usize;
        while let Some(job) = rx.recv().await {
            let Job { mut record, reply } = job;
            let key = self.fleet.record_key(&record.route, &record.canary_version);
            // Versions and routes come and go with releases: keep only the records this
            // replica still serves (checked once the map outgrows them).
            if written.len() > 2 * kept + 64 {
                let served: std::collections::HashSet<String> = self
                    .shared
                    .fleet_routes()
                    .iter()
                    .map(|(r, v, _)| self.fleet.record_key(r, v))
                    .collect();
                written.retain(|k, _| served.contains(k));
                kept = written.len();
            }
            if let Some(&g) = written.get(&key) {
                if record.mode == ShareMode::Cas {
                    record.generation = record.generation.max(g);
                }
            }
            let current = link.load_full();
            let mut result = match &current {
                Some(l) => self.write(&mut l.conn.clone(), &script, &record).await,
                None => Err(no_primary()),
            };
            // Refused by a store behind the generation this change was decided on, in the
            // same incarnation: it lost acknowledged writes (a failover to a replica that
            // had not received them). This replica's state is newer than the store's: it is
            // written as a re-seed (which still loses to a later history, a rollback).
            if let (Some(l), Ok(Written::Refused(Some(c)))) = (&current, &result) {
                if behind(c, &record) {
                    log::warn!(
                        "fleet: the store's record of {} is at generation {} behind this replica's {}: it lost writes; re-seeding it",
                        record.route, c.generation, record.generation
                    );
                    record.mode = ShareMode::Reseed;
                    result = self.write(&mut l.conn.clone(), &script, &record).await;
                }
            }
            let answer = match result {
                Ok(Written::Accepted(rec)) => {
                    written.insert(key.clone(), rec.generation);
                    pending.lock().await.remove(&key);
                    let generation = rec.generation;
                    self.shared.adopt(rec);
                    Answer::Written(generation)
                }
                Ok(Written::Refused(current)) => {
                    pending.lock().await.remove(&key);
                    let message = match &current {
                        Some(c) => format!(
                            "the fleet's record changed meanwhile (generation {}: {} by {}): this change was refused and is undone here; the fleet's record applies",
                            c.generation,
                            c.phase.name(),
                            c.by
                        ),
                        None => "the fleet store refused the change".to_string(),
                    };
                    // Adopted before the answer goes: whoever waits sees the fleet's state.
                    if let Some(c) = &current {
                        self.shared.adopt(c.clone());
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
                    let mut p = pending.lock().await;
                    p.insert(key, record);
                    let n = p.len();
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
    }

    /// Re-reads every record, seeds those the store lacks, says this replica is alive and
    /// reads who else is. Any error marks the link down.
    async fn poll(
        &self,
        conn: &mut ConnectionManager,
        pending: &tokio::sync::Mutex<HashMap<String, FleetRecord>>,
    ) -> redis::RedisResult<()> {
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
            .map(|(r, v, _)| self.fleet.record_key(r, v))
            .collect();
        // The store's incarnation (set here if it has none) and the records, read in one
        // transaction: the records belong to the incarnation read with them. Read, and
        // renew the records this replica serves: a record lapses only when no replica has
        // served its version for `record_ttl` (a finished release).
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("SET")
            .arg(self.fleet.incarnation_key())
            .arg(new_incarnation(&self.fleet))
            .arg("NX")
            .ignore();
        pipe.cmd("GET").arg(self.fleet.incarnation_key());
        if !keys.is_empty() {
            pipe.cmd("MGET").arg(&keys);
        }
        let ttl = self.fleet.record_ttl_ms() as i64;
        for key in &keys {
            pipe.pexpire(key, ttl).ignore();
        }
        let (incarnation, values): (String, Vec<Option<String>>) = if keys.is_empty() {
            let (incarnation,): (String,) = pipe.query_async(conn).await?;
            (incarnation, Vec::new())
        } else {
            pipe.query_async(conn).await?
        };
        self.saw_incarnation(&incarnation);
        // The store answers: writes that waited for it go now, ahead of anything adopted
        // below (a local rollback not yet shared is not undone by the older records read
        // here: the machine keeps it, and the store lets it win).
        let waiting: Vec<FleetRecord> = pending.lock().await.values().cloned().collect();
        for rec in waiting {
            self.fleet.share(rec, None);
        }
        for ((_, _, seed), value) in routes.into_iter().zip(values) {
            match value.and_then(|t| serde_json::from_str::<FleetRecord>(&t).ok()) {
                Some(rec) => {
                    // The store behind what this replica applied, in the same incarnation:
                    // it lost acknowledged writes (a failover to a lagging replica). This
                    // replica's state re-seeds it; the store keeps the later history.
                    if let Some(mut seed) = seed.filter(|s| behind(&rec, s)) {
                        seed.mode = ShareMode::Reseed;
                        seed.kind = "store_behind".into();
                        self.fleet.share(seed, None);
                    }
                    self.shared.adopt(rec)
                }
                // A new fleet, or a Redis that lost its data: this replica's state seeds it
                // (only if no other replica's got there first).
                None => {
                    if let Some(seed) = seed {
                        self.fleet.share(seed, None);
                    }
                }
            }
        }
        self.exchange_counts(conn).await?;
        let now = self.fleet.clock.now_ms();
        let me = Member {
            instance: self.fleet.settings.instance.clone(),
            last_seen_ms: now,
            generations: self.shared.fleet_generations(),
            versions,
            reports_versions: true,
            file_hashes: HashMap::new(),
            file_skew_since: HashMap::new(),
        };
        let mut me = me;
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
        let body = serde_json::to_string(&me).unwrap_or_default();
        let (_, all): ((), HashMap<String, String>) = redis::pipe()
            .hset(self.fleet.members_key(), &me.instance, body)
            .hgetall(self.fleet.members_key())
            .query_async(conn)
            .await?;
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
            let _: () = redis::cmd("HDEL")
                .arg(self.fleet.members_key())
                .arg(&gone)
                .query_async(conn)
                .await?;
        }
        members.sort_by(|a, b| a.instance.cmp(&b.instance));
        self.delete_unserved(conn, &members, now, self.fleet.fresh_ms())
            .await?;
        self.shared
            .metrics()
            .fleet_members
            .with_label_values(&[&self.fleet.settings.cluster])
            .set(members.len() as i64);
        let waiting = pending.lock().await.len();
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
        conn: &mut ConnectionManager,
        members: &[Member],
        now: u64,
        grace_ms: u64,
    ) -> redis::RedisResult<()> {
        if members.is_empty() || !members.iter().all(|m| m.reports_versions) {
            return Ok(());
        }
        let served: std::collections::HashSet<String> = members
            .iter()
            .flat_map(|m| m.versions.iter().map(|(r, v)| self.fleet.record_key(r, v)))
            .collect();
        let written: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.fleet.records_key())
            .query_async(conn)
            .await?;
        let candidates: Vec<String> = written
            .into_iter()
            .filter(|k| !served.contains(k))
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&candidates)
            .query_async(conn)
            .await?;
        let mut gone = Vec::new();
        for (key, value) in candidates.into_iter().zip(values) {
            let settled = match value.and_then(|t| serde_json::from_str::<FleetRecord>(&t).ok()) {
                Some(rec) => now.saturating_sub(rec.at_ms) > grace_ms,
                // Lapsed (or unreadable): only the set's entry is left.
                None => true,
            };
            if settled {
                gone.push(key);
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("DEL").arg(&gone).ignore();
        pipe.cmd("SREM")
            .arg(self.fleet.records_key())
            .arg(&gone)
            .ignore();
        let () = pipe.query_async(conn).await?;
        log::info!(
            "fleet: deleted {} record(s) of versions no replica serves",
            gone.len()
        );
        Ok(())
    }

    /// Writes this replica's counts and reads the others'.
    async fn exchange_counts(&self, conn: &mut ConnectionManager) -> redis::RedisResult<()> {
        let mine: Vec<(String, Contribution)> = self
            .fleet
            .mine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(r, c)| (r.clone(), c.clone()))
            .collect();
        let me = &self.fleet.settings.instance;
        let ttl = self.fleet.fresh_ms() * 4;
        let mut others = HashMap::new();
        for (route, c) in mine {
            let key = self.fleet.counts_key(&route, &c.canary_version);
            let body = serde_json::to_string(&c).unwrap_or_default();
            let (_, _, all): ((), (), HashMap<String, String>) = redis::pipe()
                .hset(&key, me, body)
                .pexpire(&key, ttl as i64)
                .hgetall(&key)
                .query_async(conn)
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

    /// Finds the primary (at start; with Sentinel, before every poll) and moves the
    /// connections to it when it changed.
    async fn find_primary(&self, target: &mut Target, link: &CurrentLink) {
        let client = match target.primary().await {
            Ok(c) => c,
            Err(e) => {
                log::debug!("fleet: no primary: {e}");
                return;
            }
        };
        let primary = client.get_connection_info().addr().to_string();
        let known = link.load();
        if known.as_ref().is_some_and(|l| l.primary == primary) {
            return;
        }
        let conn = match manager(client.clone()) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("fleet: cannot connect to the primary {primary}: {e}");
                return;
            }
        };
        let before = known.as_ref().map(|l| l.primary.clone());
        if let Some(before) = &before {
            log::warn!("fleet: the primary moved from {before} to {primary}");
        }
        link.store(Some(Arc::new(Link {
            conn,
            client,
            primary: primary.clone(),
        })));
        if before.is_some() {
            self.fleet.primary_moved.notify_one();
        }
        self.fleet.set_view(|v| {
            v.primary = primary;
            if before.is_some() {
                v.primary_changes += 1;
            }
        });
    }

    async fn poller(
        &self,
        mut target: Target,
        link: Arc<CurrentLink>,
        pending: Arc<tokio::sync::Mutex<HashMap<String, FleetRecord>>>,
    ) {
        let every = self.fleet.settings.poll_interval;
        let mut failed = true;
        loop {
            // With Sentinel the primary is asked for before every poll, not only after a
            // failed one: a primary the sentinel failed over from may still answer (it was
            // starved or cut off from the sentinel, not from this replica; or demoted, when
            // reads still succeed), and a replica that stayed on it would split from those
            // on the new one until the sentinel demotes it, up to its 10 s INFO period.
            // Found by `make chaos` (seeds 302869, 836038).
            if target.is_sentinel() || (failed && link.load().is_none()) {
                self.find_primary(&mut target, &link).await;
            }
            let Some(current) = link.load_full() else {
                self.link(false);
                tokio::select! {
                    _ = tokio::time::sleep(every.min(Duration::from_millis(250))) => {}
                    _ = self.fleet.poke.notified() => {}
                }
                continue;
            };
            let mut conn = current.conn.clone();
            match tokio::time::timeout(
                every.max(Duration::from_secs(1)),
                self.poll(&mut conn, &pending),
            )
            .await
            {
                Ok(Ok(())) => {
                    failed = false;
                    self.link(true);
                    if !self.fleet.synced.swap(true, Ordering::AcqRel) {
                        log::info!("fleet: the fleet's records are adopted");
                    }
                }
                Ok(Err(e)) => {
                    log::debug!("fleet: poll failed: {e}");
                    failed = true;
                    self.link(false);
                }
                Err(_) => {
                    failed = true;
                    self.link(false);
                }
            }
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
    /// ends (a killed connection, Redis restarted), at once when the poller finds the link
    /// back, then a poll catches up on what was missed meanwhile.
    async fn subscriber(&self, link: Arc<CurrentLink>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            // The primary in use now (another after a failover).
            let Some(client) = link.load().as_ref().map(|l| l.client.clone()) else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            };
            let sub = async {
                let mut ps = client.get_async_pubsub().await?;
                ps.subscribe(self.fleet.channel()).await?;
                redis::RedisResult::Ok(ps)
            };
            match tokio::time::timeout(Duration::from_secs(2), sub).await {
                Ok(Ok(ps)) => {
                    backoff = Duration::from_millis(50);
                    self.fleet.poke.notify_one();
                    let mut stream = ps.into_on_message();
                    let moved = loop {
                        let msg = tokio::select! {
                            msg = stream.next() => msg,
                            // A subscription to a primary Sentinel failed over from may
                            // live on and hear nothing more: subscribe on the new one now.
                            _ = self.fleet.primary_moved.notified() => break true,
                        };
                        let Some(msg) = msg else {
                            break false;
                        };
                        let Ok(text) = msg.get_payload::<String>() else {
                            continue;
                        };
                        match serde_json::from_str::<FleetRecord>(&text) {
                            Ok(rec) => self.shared.adopt(rec),
                            Err(e) => log::warn!("fleet: unreadable record on the channel: {e}"),
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
        let target = match Target::new(&self.fleet) {
            Ok(t) => t,
            Err(e) => {
                log::error!("fleet: {e}: this replica runs alone");
                return;
            }
        };
        let link: Arc<CurrentLink> = Arc::new(CurrentLink::empty());
        // Until the store first answers, nothing advances (a replica started while Redis
        // is down must not step on its own).
        self.shared.fleet_link(false);
        let pending = Arc::new(tokio::sync::Mutex::new(HashMap::new()));
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
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = self.writer(link.clone(), rx, pending.clone()) => {}
            _ = self.poller(target, link.clone(), pending) => {}
            _ = self.subscriber(link) => {}
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
