//! Endpoint names and their addresses: the resolvers ([`SystemResolver`], getaddrinfo;
//! [`DnsResolver`], the nameservers of `[resolver]`) and [`Names`], the answers kept per
//! name, shared by every pool that lists the name, by the build of a new config and by the
//! control plane's background lookups.
//!
//! The rule for an answer ([`NameState::record`]): a lookup that returns addresses replaces
//! the name's addresses; a lookup that fails (no answer, SERVFAIL, NXDOMAIN, no address)
//! keeps the last good ones and says why. A name that never resolved has no address, so a
//! pool of only such names is empty, and its status says why. A build asks only for names
//! never looked up (a reload of an unchanged pool neither waits on DNS nor goes back to
//! older addresses); the control plane looks every name up again on its pools'
//! `resolve_interval`.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::config::ResolverSettings;

/// Looks up a name's addresses. Blocking: callers on an async runtime run it with
/// `spawn_blocking`.
pub trait Resolve: Send + Sync {
    /// Every address of `host`, with `port`, sorted and without duplicates; `Err` says why
    /// there is none (without the name: whoever keeps the answer names it).
    fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String>;
}

/// The system's resolver (`getaddrinfo`: `/etc/hosts`, then DNS per `/etc/resolv.conf`).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("does not resolve: {e}"))?
            .collect();
        sorted(addrs)
    }
}

fn sorted(mut addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, String> {
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err("resolves to no address".into());
    }
    Ok(addrs)
}

/// The nameservers of `[resolver]`, asked for A and AAAA records (hickory-resolver, UDP,
/// TCP when an answer is truncated or UDP fails). Every lookup asks the nameservers: no
/// cache here (`resolve_interval` says how often a name is asked), and no hosts file.
///
/// Its lookups run on a runtime of its own (one thread), so a blocking [`Resolve::lookup`]
/// works from any thread, inside an async runtime or not.
pub struct DnsResolver {
    resolver: hickory_resolver::TokioResolver,
    runtime: Option<tokio::runtime::Runtime>,
    timeout: Duration,
}

impl DnsResolver {
    pub fn new(settings: &ResolverSettings) -> Result<Self, String> {
        use hickory_resolver::config::{
            LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kanaria-dns")
            .enable_all()
            .build()
            .map_err(|e| format!("resolver: cannot start its thread: {e}"))?;
        let servers = settings
            .nameservers
            .iter()
            .map(|a| {
                let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                for c in &mut ns.connections {
                    c.port = a.port();
                }
                // Another nameserver may know the name: ask it before giving up.
                ns.trust_negative_responses = false;
                ns
            })
            .collect();
        let mut opts = ResolverOpts::default();
        opts.timeout = settings.timeout;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.try_tcp_on_error = true;
        // Kanaria decides how often a name is asked (resolve_interval), not the records'
        // TTL: nothing is cached.
        opts.cache_size = 0;
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        let _entered = runtime.enter();
        let resolver = hickory_resolver::Resolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), servers),
            hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .map_err(|e| format!("resolver: {e}"))?;
        drop(_entered);
        Ok(DnsResolver {
            resolver,
            runtime: Some(runtime),
            timeout: settings.timeout,
        })
    }
}

impl Resolve for DnsResolver {
    fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let Some(runtime) = &self.runtime else {
            return Err("the resolver is shut down".into());
        };
        // Fully qualified: no search domain is tried.
        let fqdn = if host.ends_with('.') {
            host.to_string()
        } else {
            format!("{host}.")
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (resolver, timeout) = (self.resolver.clone(), self.timeout);
        runtime.spawn(async move {
            let answer = tokio::time::timeout(timeout, resolver.lookup_ip(fqdn)).await;
            let _ = tx.send(answer);
        });
        // The task ends by its own timeout; the margin only covers a stalled runtime.
        let answer = rx
            .recv_timeout(timeout + Duration::from_secs(1))
            .map_err(|_| format!("no answer within {timeout:?}"))?;
        let ips = match answer {
            Ok(Ok(ips)) => ips,
            Ok(Err(e)) => return Err(format!("does not resolve: {e}")),
            Err(_) => return Err(format!("no answer within {timeout:?}")),
        };
        sorted(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect())
    }
}

impl Drop for DnsResolver {
    fn drop(&mut self) {
        // Dropping a runtime waits for its thread, which an async context may not do.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The resolver a config asks for: `[resolver]`'s nameservers, else the system's.
pub fn resolver_for(settings: Option<&ResolverSettings>) -> Result<Box<dyn Resolve>, String> {
    Ok(match settings {
        Some(s) => Box::new(DnsResolver::new(s)?),
        None => Box::new(SystemResolver),
    })
}

/// What is known of one endpoint name: its last good addresses and how its lookups went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameState {
    /// The addresses of the last lookup that returned any (sorted); empty until one did.
    pub addrs: Vec<SocketAddr>,
    /// Why the last lookup failed; `None` when it succeeded.
    pub last_error: Option<String>,
    /// When a lookup last succeeded (Unix ms); `None`: never.
    pub last_success_ms: Option<u64>,
    /// When the last lookup recorded started (Unix ms); `None`: never looked up.
    pub last_lookup_ms: Option<u64>,
    /// Failed lookups so far.
    pub failures: u64,
}

impl NameState {
    /// Records a lookup that started at `started_ms`: addresses replace the name's, a
    /// failure keeps the last good ones and says why. A lookup that started before the one
    /// already recorded is older news and is dropped. Returns whether the addresses changed.
    pub fn record(&mut self, result: Result<Vec<SocketAddr>, String>, started_ms: u64) -> bool {
        if self.last_lookup_ms.is_some_and(|last| started_ms < last) {
            return false;
        }
        self.last_lookup_ms = Some(started_ms);
        match result {
            Ok(addrs) if !addrs.is_empty() => {
                self.last_error = None;
                self.last_success_ms = Some(started_ms);
                let changed = self.addrs != addrs;
                self.addrs = addrs;
                changed
            }
            Ok(_) => {
                self.failures += 1;
                self.last_error = Some("no address".into());
                false
            }
            Err(why) => {
                self.failures += 1;
                self.last_error = Some(why);
                false
            }
        }
    }

    /// Whether a lookup ever returned addresses.
    pub fn resolved(&self) -> bool {
        self.last_success_ms.is_some()
    }
}

/// One endpoint name (`HOST:PORT`) and its answers, shared by every pool that lists it.
#[derive(Debug)]
pub struct NameEntry {
    pub host: String,
    pub port: u16,
    state: Mutex<NameState>,
    /// A lookup of this name is running (the control plane starts one at a time).
    pub looking_up: AtomicBool,
}

impl NameEntry {
    fn new(host: &str, port: u16) -> Self {
        NameEntry {
            host: host.to_string(),
            port,
            state: Mutex::new(NameState::default()),
            looking_up: AtomicBool::new(false),
        }
    }

    /// The name as written in the config, `HOST:PORT`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn lock(&self) -> MutexGuard<'_, NameState> {
        // Replaced field by field in `record`, each step leaving a coherent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is known now.
    pub fn state(&self) -> NameState {
        self.lock().clone()
    }

    /// The last good addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.lock().addrs.clone()
    }
}

/// The answers of every endpoint name in use, and the resolver that gets them.
pub struct Names {
    resolver: Box<dyn Resolve>,
    entries: Mutex<HashMap<(String, u16), Arc<NameEntry>>>,
}

/// How a lookup went, for the caller's log and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Looked {
    /// The name's addresses changed.
    pub changed: bool,
    /// The name's state after the lookup.
    pub state: NameState,
    /// The lookup before this one failed (so a success is a recovery).
    pub was_failing: bool,
}

impl Names {
    pub fn new(resolver: Box<dyn Resolve>) -> Self {
        Names {
            resolver,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<(String, u16), Arc<NameEntry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry of `host:port`, looked up first (blocking) when it never was. A known name
    /// is answered from what its lookups found so far, without asking again.
    pub fn entry(&self, host: &str, port: u16, now_ms: u64) -> Arc<NameEntry> {
        let entry = self
            .entries()
            .entry((host.to_string(), port))
            .or_insert_with(|| Arc::new(NameEntry::new(host, port)))
            .clone();
        if entry.lock().last_lookup_ms.is_none() {
            self.look_up(&entry, now_ms);
        }
        entry
    }

    /// Looks `entry` up now (blocking; no lock held while the resolver works) and records
    /// the answer by the keep-last-good rule.
    pub fn look_up(&self, entry: &NameEntry, now_ms: u64) -> Looked {
        let result = self.resolver.lookup(&entry.host, entry.port);
        let mut state = entry.lock();
        let was_failing = state.last_error.is_some();
        let changed = state.record(result, now_ms);
        Looked {
            changed,
            state: state.clone(),
            was_failing,
        }
    }

    /// Forgets the names no pool holds any more (a name listed again is looked up afresh).
    pub fn forget_unused(&self) {
        self.entries().retain(|_, e| Arc::strong_count(e) > 1);
    }

    /// How many names are known (for tests).
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Marks an entry's lookup as running until dropped.
pub struct LookingUp(Arc<NameEntry>);

impl LookingUp {
    /// `None` when a lookup of the name is already running.
    pub fn start(entry: &Arc<NameEntry>) -> Option<Self> {
        entry
            .looking_up
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| LookingUp(entry.clone()))
    }

    pub fn entry(&self) -> &Arc<NameEntry> {
        &self.0
    }
}

impl Drop for LookingUp {
    fn drop(&mut self) {
        self.0.looking_up.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Addresses replace, a failure keeps the last good ones and says why, a success clears
    /// the error; a late answer of an older lookup changes nothing.
    #[test]
    fn a_failed_lookup_keeps_the_last_good_addresses() {
        let mut s = NameState::default();
        assert!(!s.resolved());
        assert!(s.record(Ok(vec![a("10.0.0.1:80")]), 100));
        assert_eq!(s.last_success_ms, Some(100));
        assert!(!s.record(Err("SERVFAIL".into()), 200));
        assert_eq!(s.addrs, [a("10.0.0.1:80")]);
        assert_eq!(s.last_error.as_deref(), Some("SERVFAIL"));
        assert_eq!((s.failures, s.last_success_ms), (1, Some(100)));
        assert!(
            !s.record(Ok(Vec::new()), 300),
            "an empty answer is a failure"
        );
        assert_eq!(s.addrs, [a("10.0.0.1:80")]);
        assert_eq!(s.failures, 2);
        assert!(!s.record(Ok(vec![a("10.0.0.1:80")]), 400), "same answer");
        assert_eq!(s.last_error, None);
        assert!(s.record(Ok(vec![a("10.0.0.1:80"), a("10.0.0.2:80")]), 500));
        assert!(!s.record(Ok(vec![a("10.0.0.9:80")]), 450), "older lookup");
        assert_eq!(s.addrs, [a("10.0.0.1:80"), a("10.0.0.2:80")]);
        assert_eq!(s.last_lookup_ms, Some(500));
    }

    /// A name that never resolved has no address and says why.
    #[test]
    fn a_name_that_never_resolved_has_no_address() {
        let mut s = NameState::default();
        s.record(Err("NXDOMAIN".into()), 1);
        assert!(!s.resolved());
        assert!(s.addrs.is_empty());
        assert_eq!(s.last_error.as_deref(), Some("NXDOMAIN"));
    }

    struct Table(Mutex<Vec<Result<Vec<SocketAddr>, String>>>, Mutex<u32>);

    impl Resolve for Table {
        fn lookup(&self, _: &str, _: u16) -> Result<Vec<SocketAddr>, String> {
            *self.1.lock().unwrap() += 1;
            self.0.lock().unwrap().remove(0)
        }
    }

    /// A known name is answered from the cache (no new lookup); unused names are forgotten.
    #[test]
    fn known_names_are_not_asked_again_by_a_build() {
        let table = Arc::new(Table(
            Mutex::new(vec![Ok(vec![a("10.0.0.1:80")]), Err("down".into())]),
            Mutex::new(0),
        ));
        struct Shared(Arc<Table>);
        impl Resolve for Shared {
            fn lookup(&self, h: &str, p: u16) -> Result<Vec<SocketAddr>, String> {
                self.0.lookup(h, p)
            }
        }
        let names = Names::new(Box::new(Shared(table.clone())));
        let e = names.entry("app.test", 80, 1);
        assert_eq!(e.addrs(), [a("10.0.0.1:80")]);
        let again = names.entry("app.test", 80, 2);
        assert!(Arc::ptr_eq(&e, &again));
        assert_eq!(*table.1.lock().unwrap(), 1);
        let looked = names.look_up(&e, 3);
        assert!(!looked.changed && !looked.was_failing);
        assert_eq!(looked.state.addrs, [a("10.0.0.1:80")]);
        drop((e, again));
        names.forget_unused();
        assert!(names.is_empty());
    }
}
