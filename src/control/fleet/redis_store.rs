//! The fleet's [`Store`] in Redis: the keys under `kanaria:<cluster>:`, the Lua script that
//! compares, sets and publishes a record in one step, the connections (TLS, the password
//! from the environment) and Redis Sentinel.
//!
//! The store holds one record per route and canary version (`rollout:<route>:<version>`, a
//! [`FleetRecord`] as JSON), the set of record keys written (`records`, so records of
//! versions no replica serves are found without a `SCAN`), the store's incarnation
//! (`incarnation`), the members' hash (`members`) and the counts per route and canary
//! version (`counts:<route>:<version>`, a field per replica); records go out on the
//! `changes` channel.
//!
//! The command connection is the `redis` crate's `ConnectionManager` (it reconnects); a
//! subscription is a dedicated connection. With Redis Sentinel (`redis+sentinel://`)
//! [`Store::reconnect`] asks the sentinels for the primary (the crate's `SentinelClient`,
//! which checks the node's `ROLE`) and moves both connections to a new primary when
//! Sentinel names one; until one is known every operation fails (the link is down).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use redis::aio::ConnectionManager;

use super::store::{Primary, Read, Store, StoreError, StoreResult, Written};
use crate::clock::Clock;
use crate::config::FleetSettings;
use crate::rollout::machine::{FleetRecord, ShareMode};

/// Compare-and-set of one record, then publication. KEYS[1]: the record, KEYS[2]: the
/// store's incarnation (set with ARGV[6] if absent, and stamped on the record), KEYS[3]: the
/// set of record keys (for their deletion once no replica serves them); ARGV: the new
/// record (JSON), the generation it was decided on, `cas`, `seed` or `reseed`, the
/// channel, the record's time to live in ms (renewed by every poll while a replica serves
/// the version). Returns `{1, record}` when written, `{0, current}` when refused.
/// Histories order by operator resumes, then a rollback over anything else (`order`), an
/// `unheard` rollback counting as many resumes as the history it meets that did not see
/// it; only the same kind compares generations: `cas` must match the generation and the incarnation
/// it was decided on, `reseed` must be higher. Mirrors
/// [`decide`](crate::rollout::machine::decide), the in-memory store's rule.
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
  local saw = ARGV[3] == 'cas' and not stale and gen == expected
  local nres0 = nres
  if new.unheard == true and nrb then nres = math.max(nres, cres) end
  if c.unheard == true and crb and not saw then cres = math.max(cres, nres0) end
  new.resumes = nres
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

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError(e.to_string())
    }
}

/// The password for the primary: the URL's, else `KANARIA_FLEET_PASSWORD`.
fn env_password() -> Option<String> {
    std::env::var("KANARIA_FLEET_PASSWORD").ok()
}

fn client(settings: &FleetSettings, ca_pem: Option<&[u8]>) -> redis::RedisResult<redis::Client> {
    let mut info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())?;
    if info.redis_settings().password().is_none() {
        if let Some(pw) = env_password() {
            let redis_settings = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(redis_settings);
        }
    }
    match ca_pem {
        // rediss:// trusting the configured authorities only.
        Some(pem) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
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
    fn new(settings: &FleetSettings, ca_pem: Option<&[u8]>) -> redis::RedisResult<Target> {
        use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
        let Some(url) = &settings.sentinel else {
            return Ok(Target::Direct(client(settings, ca_pem)?));
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
            if let Some(pem) = ca_pem {
                let certs = || redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
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

/// The connection in use: commands, and the client a subscription connects with.
/// Replaced as a whole when Sentinel names another primary.
struct Link {
    conn: ConnectionManager,
    client: redis::Client,
    primary: String,
}

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

/// The fleet's store in one Redis (or the primary Sentinel names).
pub struct RedisStore {
    /// `kanaria:<cluster>:`.
    prefix: String,
    /// The records' time to live, in ms (at least 1).
    record_ttl_ms: u64,
    /// Tells this process's incarnation ids apart from another's.
    writer_id: String,
    clock: Arc<dyn Clock>,
    /// The connection in use, none until the primary is first found.
    link: arc_swap::ArcSwapOption<Link>,
    /// Taken out while [`Store::reconnect`] asks for the primary (never locked across the
    /// asking); only the poller reconnects.
    target: Mutex<Option<Target>>,
    script: redis::Script,
}

impl RedisStore {
    /// The store `settings` name (`ca_pem`: `fleet.ca`, read); not connected until the
    /// first [`Store::reconnect`].
    pub fn new(
        settings: &FleetSettings,
        ca_pem: Option<&[u8]>,
        writer_id: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<RedisStore, StoreError> {
        Ok(RedisStore {
            prefix: format!("kanaria:{}:", settings.cluster),
            record_ttl_ms: (settings.record_ttl.as_millis() as u64).max(1),
            writer_id: writer_id.to_string(),
            clock,
            link: arc_swap::ArcSwapOption::empty(),
            target: Mutex::new(Some(Target::new(settings, ca_pem)?)),
            script: redis::Script::new(WRITE_SCRIPT),
        })
    }

    fn channel(&self) -> String {
        format!("{}changes", self.prefix)
    }

    fn counts_key(&self, route: &str, version: &str) -> String {
        format!("{}counts:{route}:{version}", self.prefix)
    }

    /// The set of every record key written (`SADD` by the write script).
    fn records_key(&self) -> String {
        format!("{}records", self.prefix)
    }

    /// Set once per store (`SET NX`) with a random id: a store that comes back without it
    /// lost this fleet's data.
    fn incarnation_key(&self) -> String {
        format!("{}incarnation", self.prefix)
    }

    fn members_key(&self) -> String {
        format!("{}members", self.prefix)
    }

    /// A fresh incarnation id: random enough that two stores never share one (std's hasher
    /// keys are random per process; the writer's id and the time differ between processes).
    fn new_incarnation(&self) -> String {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        self.writer_id.hash(&mut h);
        self.clock.now_ms().hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// The command connection in use.
    fn conn(&self) -> StoreResult<ConnectionManager> {
        match self.link.load().as_ref() {
            Some(l) => Ok(l.conn.clone()),
            None => Err(StoreError("no primary known yet".to_string())),
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    fn record_key(&self, route: &str, version: &str) -> String {
        format!("{}rollout:{route}:{version}", self.prefix)
    }

    async fn write(&self, record: &FleetRecord) -> StoreResult<Written> {
        let mut conn = self.conn()?;
        let body = serde_json::to_string(record).map_err(|e| StoreError(e.to_string()))?;
        let mode = match record.mode {
            ShareMode::Cas => "cas",
            ShareMode::Seed => "seed",
            ShareMode::Reseed => "reseed",
        };
        let (written, text): (i64, Option<String>) = self
            .script
            .key(self.record_key(&record.route, &record.canary_version))
            .key(self.incarnation_key())
            .key(self.records_key())
            .arg(body)
            .arg(record.generation)
            .arg(mode)
            .arg(self.channel())
            .arg(self.record_ttl_ms)
            .arg(self.new_incarnation())
            .invoke_async(&mut conn)
            .await?;
        let parsed = text.and_then(|t| serde_json::from_str::<FleetRecord>(&t).ok());
        Ok(match (written, parsed) {
            (1, Some(r)) => Written::Accepted(r),
            (_, r) => Written::Refused(r),
        })
    }

    async fn read(&self, keys: &[String]) -> StoreResult<Read> {
        let mut conn = self.conn()?;
        // One transaction: the records belong to the incarnation read with them.
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("SET")
            .arg(self.incarnation_key())
            .arg(self.new_incarnation())
            .arg("NX")
            .ignore();
        pipe.cmd("GET").arg(self.incarnation_key());
        if !keys.is_empty() {
            pipe.cmd("MGET").arg(keys);
        }
        let ttl = self.record_ttl_ms as i64;
        for key in keys {
            pipe.pexpire(key, ttl).ignore();
        }
        let (incarnation, values): (String, Vec<Option<String>>) = if keys.is_empty() {
            let (incarnation,): (String,) = pipe.query_async(&mut conn).await?;
            (incarnation, Vec::new())
        } else {
            pipe.query_async(&mut conn).await?
        };
        let records = values
            .into_iter()
            .map(|v| v.and_then(|t| serde_json::from_str::<FleetRecord>(&t).ok()))
            .collect();
        Ok(Read {
            incarnation,
            records,
        })
    }

    async fn written(&self) -> StoreResult<Vec<(String, Option<FleetRecord>)>> {
        let mut conn = self.conn()?;
        let keys: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.records_key())
            .query_async(&mut conn)
            .await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        Ok(keys
            .into_iter()
            .zip(values)
            .map(|(k, v)| (k, v.and_then(|t| serde_json::from_str(&t).ok())))
            .collect())
    }

    async fn delete(&self, keys: &[String]) -> StoreResult<()> {
        let mut conn = self.conn()?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("DEL").arg(keys).ignore();
        pipe.cmd("SREM").arg(self.records_key()).arg(keys).ignore();
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    async fn members(&self, instance: &str, entry: &str) -> StoreResult<HashMap<String, String>> {
        let mut conn = self.conn()?;
        let (_, all): ((), HashMap<String, String>) = redis::pipe()
            .hset(self.members_key(), instance, entry)
            .hgetall(self.members_key())
            .query_async(&mut conn)
            .await?;
        Ok(all)
    }

    async fn forget_members(&self, instances: &[String]) -> StoreResult<()> {
        let mut conn = self.conn()?;
        let () = redis::cmd("HDEL")
            .arg(self.members_key())
            .arg(instances)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn exchange_counts(
        &self,
        route: &str,
        version: &str,
        instance: &str,
        counts: &str,
        ttl_ms: u64,
    ) -> StoreResult<HashMap<String, String>> {
        let mut conn = self.conn()?;
        let key = self.counts_key(route, version);
        let (_, _, all): ((), (), HashMap<String, String>) = redis::pipe()
            .hset(&key, instance, counts)
            .pexpire(&key, ttl_ms as i64)
            .hgetall(&key)
            .query_async(&mut conn)
            .await?;
        Ok(all)
    }

    async fn subscribe(&self) -> StoreResult<BoxStream<'static, FleetRecord>> {
        // The primary in use now (another after a failover).
        let Some(client) = self.link.load().as_ref().map(|l| l.client.clone()) else {
            return Err(StoreError("no primary known yet".to_string()));
        };
        let mut ps = client.get_async_pubsub().await?;
        ps.subscribe(self.channel()).await?;
        let records = ps.into_on_message().filter_map(|msg| async move {
            let text = msg.get_payload::<String>().ok()?;
            match serde_json::from_str::<FleetRecord>(&text) {
                Ok(rec) => Some(rec),
                Err(e) => {
                    log::warn!("fleet: unreadable record on the channel: {e}");
                    None
                }
            }
        });
        Ok(records.boxed())
    }

    fn primary_may_move(&self) -> bool {
        self.target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(Target::is_sentinel)
    }

    /// Finds the primary (at start; with Sentinel, again before every poll) and moves the
    /// connections to it when it changed.
    async fn reconnect(&self) -> Option<Primary> {
        let known = self.link.load_full();
        let mut target = self
            .target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        if known.is_some() && !target.is_sentinel() {
            *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(target);
            return None;
        }
        let found = target.primary().await;
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(target);
        let client = match found {
            Ok(c) => c,
            Err(e) => {
                log::debug!("fleet: no primary: {e}");
                return None;
            }
        };
        let primary = client.get_connection_info().addr().to_string();
        if known.as_ref().is_some_and(|l| l.primary == primary) {
            return None;
        }
        let conn = match manager(client.clone()) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("fleet: cannot connect to the primary {primary}: {e}");
                return None;
            }
        };
        if let Some(before) = &known {
            log::warn!(
                "fleet: the primary moved from {} to {primary}",
                before.primary
            );
        }
        self.link.store(Some(Arc::new(Link {
            conn,
            client,
            primary: primary.clone(),
        })));
        Some(Primary {
            address: primary,
            moved: known.is_some(),
        })
    }
}
