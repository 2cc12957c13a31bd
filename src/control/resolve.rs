//! Endpoint names looked up again while Kanaria runs (like nginx's `resolve` and HAProxy's
//! `resolvers`): every name of every served pool is asked again each `resolve_interval` of
//! its pool (the shortest, when several pools list it), one lookup per name at a time, on
//! the blocking pool (getaddrinfo blocks; `[resolver]`'s lookups block their caller too).
//!
//! An answer that changes a name's addresses makes the control plane serve the pools that
//! list it over the new addresses ([`Control::refresh_endpoints`], one publication; the
//! endpoints that stay keep their health, requests in flight finish where they are). A
//! failed lookup keeps the last good addresses; it is logged when a name starts or stops
//! failing, counted per name (`kanaria_dns_failures_total`) and shown in status. Every
//! tick also serves any pool that is behind its names' answers (a reload built from a
//! snapshot older than the last answer), and forgets the names no pool lists any more.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::Control;
use crate::runtime::resolve::{LookingUp, NameEntry};

/// How often due names are looked for (a `resolve_interval` shorter than this is served
/// at this pace).
const TICK: Duration = Duration::from_millis(100);

/// The background service.
pub struct EndpointResolver {
    shared: Arc<Control>,
}

impl EndpointResolver {
    pub fn new(shared: Arc<Control>) -> Self {
        EndpointResolver { shared }
    }

    /// Every name the served pools list, each with the shortest `resolve_interval` of the
    /// pools that list it.
    fn names_in_use(&self) -> Vec<(Arc<NameEntry>, Duration)> {
        let live = self.shared.live.load();
        let mut due: HashMap<usize, (Arc<NameEntry>, Duration)> = HashMap::new();
        for route in &live.snapshot.routes {
            for pool in [Some(&route.stable), route.canary.as_ref()]
                .into_iter()
                .flatten()
            {
                for entry in &pool.names {
                    let interval = pool.settings.resolve_interval;
                    due.entry(Arc::as_ptr(entry) as usize)
                        .and_modify(|(_, d)| *d = (*d).min(interval))
                        .or_insert_with(|| (entry.clone(), interval));
                }
            }
        }
        due.into_values().collect()
    }

    fn tick(&self) {
        let now_ms = self.shared.clock.now_ms();
        for (entry, interval) in self.names_in_use() {
            let last = entry.state().last_lookup_ms.unwrap_or(0);
            if now_ms.saturating_sub(last) < interval.as_millis() as u64 {
                continue;
            }
            let Some(running) = LookingUp::start(&entry) else {
                continue;
            };
            let shared = self.shared.clone();
            tokio::task::spawn_blocking(move || look_up(&shared, running));
        }
        // Also catches a pool a reload built before the last answer arrived.
        self.shared.refresh_endpoints();
        self.shared.names.forget_unused();
    }
}

/// One lookup of a name (blocking), logged on a change of outcome; a changed answer is
/// served at once.
fn look_up(shared: &Control, running: LookingUp) {
    let entry = running.entry();
    let name = entry.name();
    let looked = shared.names.look_up(entry, shared.clock.now_ms());
    drop(running);
    match &looked.state.last_error {
        Some(why) if !looked.was_failing => {
            if looked.state.addrs.is_empty() {
                log::warn!("endpoint {name}: lookup failed ({why}); it has no address yet");
            } else {
                log::warn!(
                    "endpoint {name}: lookup failed ({why}); its last addresses {:?} stay",
                    looked.state.addrs
                );
            }
        }
        None if looked.was_failing => {
            log::info!(
                "endpoint {name}: resolves again, to {:?}",
                looked.state.addrs
            );
        }
        _ => {}
    }
    if looked.changed {
        log::info!("endpoint {name} resolves to {:?} now", looked.state.addrs);
        shared.refresh_endpoints();
    }
}

#[async_trait]
impl BackgroundService for EndpointResolver {
    async fn start(&self, shutdown: ShutdownWatch) {
        super::every(TICK, shutdown, || self.tick()).await;
    }
}
