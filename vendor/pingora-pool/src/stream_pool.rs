// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

//! A keep-alive pool that holds idle streams directly
//!
//! [`ConnectionPool`](crate::ConnectionPool) watches every idle connection with a task of its
//! own: the connection behind an `Arc<Mutex>`, an LRU node with a `Notify`, a oneshot to
//! signal its reuse, and a spawned task per release that is woken (and the reusing request
//! made to wait for it to let go of the lock) on every reuse. [`StreamPool`] keeps each idle
//! stream in place with the instant it was released and its idle deadline; one sweeper task
//! per pool closes the connections past their deadline or found closed (or sent unexpected
//! data) by the upstream, at the earliest deadline or every [`SWEEP_INTERVAL`] at most.
//! Release and reuse take a shard's lock for the push or the pop only; the checks of the
//! stream itself (the caller's) run outside it.

use parking_lot::Mutex;
use pingora_timeout::timeout;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

type GroupKey = u64;

/// The longest the sweeper sleeps: an idle connection the upstream closed (or one past its
/// idle timeout, when the sweeper was not woken for it) is closed at most this late. Until
/// then it is never handed out: [`StreamPool::get`] checks the deadline and its caller the
/// stream.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

// Shards of the per-key map; the key picks its shard, so one key's connections share a lock.
const N_SHARDS: usize = 16;

// The group keys are hashes already (`Peer::reuse_hash`): one multiplication spreads them
// (and small test keys) over the table without hashing them again.
const MIX: u64 = 0x9E37_79B9_7F4A_7C15;

#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(MIX);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(MIX);
    }
}

struct Idle<S> {
    stream: S,
    since: Instant,
    deadline: Option<Instant>,
    // Release order across the pool (lower: older), for the LRU eviction.
    order: u64,
}

// Per key, oldest first: a release pushes at the back, a reuse pops the back (the most
// recently used connection; older ones are left to time out), eviction the front.
type Shard<S> = HashMap<GroupKey, VecDeque<Idle<S>>, BuildHasherDefault<KeyHasher>>;

/// A pool of idle streams under group keys, with a global size cap (LRU eviction) and a
/// per-stream idle timeout.
///
/// The sweeper ([`StreamPool::sweeper`]) is started by the caller, once per pool, when
/// [`StreamPool::start_sweeper`] says so (after a release).
pub struct StreamPool<S> {
    shards: [Mutex<Shard<S>>; N_SHARDS],
    len: AtomicUsize,
    size: usize,
    order: AtomicU64,
    // A sweeper task is running (or spawned and not yet dropped).
    sweeper: AtomicBool,
    epoch: Instant,
    // When the sweeper wakes next, in nanoseconds since `epoch`: a release with an earlier
    // deadline wakes it.
    next_sweep: AtomicU64,
    wake: Arc<Notify>,
}

impl<S> StreamPool<S> {
    /// A pool that keeps at most `size` idle streams: releasing one more closes the least
    /// recently released.
    pub fn new(size: usize) -> Self {
        StreamPool {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::default())),
            len: AtomicUsize::new(0),
            size,
            order: AtomicU64::new(0),
            sweeper: AtomicBool::new(false),
            epoch: Instant::now(),
            next_sweep: AtomicU64::new(u64::MAX),
            wake: Arc::new(Notify::new()),
        }
    }

    /// The number of idle streams held.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no idle stream is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    fn shard(&self, key: GroupKey) -> &Mutex<Shard<S>> {
        &self.shards[(key.wrapping_mul(MIX) >> 32) as usize % N_SHARDS]
    }

    /// Keep `stream` under `key` for reuse, for `idle_timeout` at most (`None`: until it is
    /// reused, evicted, or found closed).
    ///
    /// If the pool then holds more than its size, the least recently released streams are
    /// taken out and handed to `on_evict` with the instant each was released (outside any
    /// lock; dropping the stream closes it).
    pub fn put(
        &self,
        key: GroupKey,
        stream: S,
        idle_timeout: Option<Duration>,
        mut on_evict: impl FnMut(S, Instant),
    ) {
        let since = Instant::now();
        // A timeout too large for an `Instant` never expires.
        let deadline = idle_timeout.and_then(|t| since.checked_add(t));
        let order = self.order.fetch_add(1, Ordering::Relaxed);
        self.shard(key)
            .lock()
            .entry(key)
            .or_default()
            .push_back(Idle {
                stream,
                since,
                deadline,
                order,
            });
        if self.len.fetch_add(1, Ordering::Relaxed) + 1 > self.size {
            self.evict(&mut on_evict);
        }
        if let Some(deadline) = deadline {
            self.wake_by(deadline);
        }
    }

    /// Take an idle stream released under `key`, the most recently released first, that is
    /// within its idle timeout and passes `usable` (run outside the lock). The streams found
    /// past their timeout or not usable are dropped on the way.
    pub fn get(&self, key: &GroupKey, mut usable: impl FnMut(&mut S) -> bool) -> Option<S> {
        let mut now = None;
        loop {
            let idle = self.shard(*key).lock().get_mut(key)?.pop_back()?;
            self.len.fetch_sub(1, Ordering::Relaxed);
            let Idle {
                mut stream,
                deadline,
                ..
            } = idle;
            if let Some(deadline) = deadline {
                // The clock is read once per reuse, and only for a stream with a timeout.
                if deadline <= *now.get_or_insert_with(Instant::now) {
                    continue; // past its idle timeout: dropped (closed)
                }
            }
            if usable(&mut stream) {
                return Some(stream);
            }
        }
    }

    // Take out the least recently released streams until the pool is within its size. Only
    // when the pool is full: a pass over every key of every shard (one lock at a time) finds
    // the oldest; a stream reused meanwhile just makes it look again.
    fn evict(&self, on_evict: &mut impl FnMut(S, Instant)) {
        // Bounded: concurrent releases and reuses can keep `len` above `size` for a moment.
        for _ in 0..N_SHARDS * 4 {
            if self.len.load(Ordering::Relaxed) <= self.size {
                return;
            }
            let mut oldest: Option<(usize, GroupKey, u64)> = None;
            for (i, shard) in self.shards.iter().enumerate() {
                for (key, idle) in shard.lock().iter() {
                    if let Some(front) = idle.front() {
                        if oldest.is_none_or(|(_, _, order)| front.order < order) {
                            oldest = Some((i, *key, front.order));
                        }
                    }
                }
            }
            let Some((i, key, _)) = oldest else { return };
            let victim = self.shards[i]
                .lock()
                .get_mut(&key)
                .and_then(VecDeque::pop_front);
            if let Some(victim) = victim {
                self.len.fetch_sub(1, Ordering::Relaxed);
                on_evict(victim.stream, victim.since);
            }
        }
    }

    fn nanos_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    // Wake the sweeper if `deadline` comes before its next sweep. In a steady state every
    // release's deadline is later than the earliest one held, so this is one atomic load.
    fn wake_by(&self, deadline: Instant) {
        let at = self.nanos_since_epoch(deadline);
        if at < self.next_sweep.load(Ordering::Relaxed)
            && self.next_sweep.fetch_min(at, Ordering::Relaxed) > at
        {
            self.wake.notify_one();
        }
    }

    /// Drop every idle stream past its idle timeout or not `usable` any more (the upstream
    /// closed it, or sent something), and every key left without streams. Returns how long to
    /// wait before the next sweep: until the earliest deadline left, [`SWEEP_INTERVAL`] at
    /// most.
    ///
    /// `usable` runs under the shard's lock, so it must not block (a read polled once without
    /// a waker, as [`StreamPool::get`]'s callers check a stream); the streams are dropped
    /// after the lock is released.
    pub fn sweep(&self, mut usable: impl FnMut(&mut S) -> bool) -> Duration {
        let now = Instant::now();
        let mut next = now + SWEEP_INTERVAL;
        let mut closed = Vec::new();
        for shard in &self.shards {
            {
                let mut shard = shard.lock();
                shard.retain(|_, idle| {
                    let mut i = 0;
                    while i < idle.len() {
                        let c = &mut idle[i];
                        let live = c.deadline.is_none_or(|d| d > now) && usable(&mut c.stream);
                        if live {
                            if let Some(d) = c.deadline {
                                next = next.min(d);
                            }
                            i += 1;
                        } else if let Some(c) = idle.remove(i) {
                            closed.push(c.stream);
                        }
                    }
                    !idle.is_empty()
                });
            }
            if !closed.is_empty() {
                self.len.fetch_sub(closed.len(), Ordering::Relaxed);
                closed.clear(); // closes them, outside the lock
            }
        }
        self.next_sweep
            .store(self.nanos_since_epoch(next), Ordering::Relaxed);
        next.saturating_duration_since(now)
    }

    /// Whether the caller is to start the sweeper ([`StreamPool::sweeper`]): true once, until
    /// that task is dropped (its runtime shut down), then once again.
    #[inline]
    pub fn start_sweeper(&self) -> bool {
        !self.sweeper.load(Ordering::Relaxed)
            && self
                .sweeper
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// The sweeper task of `pool`, to spawn when [`StreamPool::start_sweeper`] returns true:
    /// [`StreamPool::sweep`] with `usable`, then a sleep until the next deadline (woken early
    /// by a release with an earlier one). It holds the pool weakly and ends when the pool is
    /// dropped.
    pub fn sweeper<F>(pool: &Arc<Self>, mut usable: F) -> impl Future<Output = ()> + Send + 'static
    where
        S: Send + 'static,
        F: FnMut(&mut S) -> bool + Send + 'static,
    {
        // Made here, not in the task: a task dropped before its first poll still clears the
        // flag, so the next release starts another sweeper.
        let running = SweeperRunning(Arc::downgrade(pool));
        let wake = pool.wake.clone();
        async move {
            loop {
                let wait = match running.0.upgrade() {
                    Some(pool) => pool.sweep(&mut usable),
                    None => return,
                };
                // Elapsed or woken: sweep again either way.
                let _ = timeout(wait, wake.notified()).await;
            }
        }
    }
}

struct SweeperRunning<S>(Weak<StreamPool<S>>);

impl<S> Drop for SweeperRunning<S> {
    fn drop(&mut self) {
        if let Some(pool) = self.0.upgrade() {
            pool.sweeper.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn always(_: &mut String) -> bool {
        true
    }

    fn no_evict(_: String, _: Instant) {
        panic!("nothing is to be evicted");
    }

    #[test]
    fn reuse_most_recent_first_per_key() {
        let pool = StreamPool::new(8);
        pool.put(101, "a1".to_string(), None, no_evict);
        pool.put(102, "b1".to_string(), None, no_evict);
        pool.put(101, "a2".to_string(), None, no_evict);
        assert_eq!(pool.len(), 3);
        assert_eq!(pool.get(&101, always).as_deref(), Some("a2"));
        assert_eq!(pool.get(&101, always).as_deref(), Some("a1"));
        assert_eq!(pool.get(&101, always), None);
        assert_eq!(pool.get(&103, always), None);
        assert_eq!(pool.get(&102, always).as_deref(), Some("b1"));
        assert!(pool.is_empty());
    }

    #[test]
    fn unusable_streams_are_dropped_not_returned() {
        let pool = StreamPool::new(8);
        pool.put(101, "good".to_string(), None, no_evict);
        pool.put(101, "closed".to_string(), None, no_evict);
        let got = pool.get(&101, |s: &mut String| s != "closed");
        assert_eq!(got.as_deref(), Some("good"));
        assert!(pool.is_empty(), "the unusable one is dropped, not put back");
    }

    #[test]
    fn expired_streams_are_not_reused() {
        let pool = StreamPool::new(8);
        pool.put(101, "forever".to_string(), None, no_evict);
        pool.put(101, "expired".to_string(), Some(Duration::ZERO), no_evict);
        assert_eq!(pool.get(&101, always).as_deref(), Some("forever"));
        assert!(pool.is_empty());
        pool.put(
            101,
            "fresh".to_string(),
            Some(Duration::from_secs(60)),
            no_evict,
        );
        assert_eq!(pool.get(&101, always).as_deref(), Some("fresh"));
        // A timeout no `Instant` can hold never expires.
        pool.put(101, "max".to_string(), Some(Duration::MAX), no_evict);
        assert_eq!(pool.get(&101, always).as_deref(), Some("max"));
    }

    #[test]
    fn cap_evicts_least_recently_released() {
        let pool = StreamPool::new(2);
        let mut evicted = Vec::new();
        pool.put(101, "a".to_string(), None, |s, _| evicted.push(s));
        pool.put(202, "b".to_string(), None, |s, _| evicted.push(s));
        assert!(evicted.is_empty());
        pool.put(101, "c".to_string(), None, |s, _| evicted.push(s));
        assert_eq!(evicted, ["a"]);
        assert_eq!(pool.len(), 2);
        pool.put(303, "d".to_string(), None, |s, _| evicted.push(s));
        assert_eq!(evicted, ["a", "b"]);
        assert_eq!(pool.get(&202, always), None);
        assert_eq!(pool.get(&101, always).as_deref(), Some("c"));
        assert_eq!(pool.get(&303, always).as_deref(), Some("d"));
    }

    #[test]
    fn zero_size_keeps_nothing() {
        let pool = StreamPool::new(0);
        let mut evicted = Vec::new();
        pool.put(101, "a".to_string(), None, |s, _| evicted.push(s));
        assert_eq!(evicted, ["a"]);
        assert!(pool.is_empty());
    }

    #[test]
    fn sweep_drops_expired_and_unusable_and_empty_keys() {
        let pool = StreamPool::new(8);
        pool.put(101, "expired".to_string(), Some(Duration::ZERO), no_evict);
        pool.put(102, "closed".to_string(), None, no_evict);
        pool.put(
            103,
            "open".to_string(),
            Some(Duration::from_millis(300)),
            no_evict,
        );
        let wait = pool.sweep(|s: &mut String| s != "closed");
        assert_eq!(pool.len(), 1);
        assert!(
            wait <= Duration::from_millis(300),
            "wakes by the deadline left: {wait:?}"
        );
        let keys: usize = pool.shards.iter().map(|s| s.lock().len()).sum();
        assert_eq!(keys, 1, "keys left empty are dropped");
        assert_eq!(pool.get(&103, always).as_deref(), Some("open"));
        assert_eq!(pool.sweep(always), SWEEP_INTERVAL);
    }

    #[tokio::test]
    async fn sweeper_closes_expired_ends_with_pool_and_restarts() {
        let pool = Arc::new(StreamPool::new(8));
        assert!(pool.start_sweeper());
        assert!(!pool.start_sweeper(), "one sweeper per pool");
        let sweeps = Arc::new(AtomicUsize::new(0));
        let counted = sweeps.clone();
        let task = tokio::spawn(StreamPool::sweeper(&pool, move |_: &mut String| {
            counted.fetch_add(1, Ordering::Relaxed);
            true
        }));
        pool.put(
            101,
            "short".to_string(),
            Some(Duration::from_millis(50)),
            no_evict,
        );
        pool.put(102, "long".to_string(), None, no_evict);
        // The release with a deadline wakes the sweeper for it: well before SWEEP_INTERVAL.
        let start = Instant::now();
        while pool.len() > 1 {
            assert!(
                start.elapsed() < Duration::from_millis(900),
                "not swept in time"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(sweeps.load(Ordering::Relaxed) > 0);
        assert_eq!(pool.get(&102, always).as_deref(), Some("long"));

        // A sweeper dropped (its runtime gone) lets the next release start another.
        task.abort();
        let _ = task.await;
        assert!(pool.start_sweeper());

        // The sweeper holds the pool weakly and ends with it.
        let task = tokio::spawn(StreamPool::sweeper(&pool, always));
        tokio::task::yield_now().await;
        drop(pool);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the sweeper ends once the pool is dropped")
            .expect("the sweeper does not panic");
    }

    #[test]
    fn concurrent_put_get_keeps_count() {
        let pool = Arc::new(StreamPool::new(64));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000u64 {
                        let key = (t * 7 + i) % 5;
                        pool.put(key, format!("{t}-{i}"), None, |_, _| {});
                        if i % 2 == 0 {
                            let _ = pool.get(&key, always);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let held: usize = pool
            .shards
            .iter()
            .map(|s| s.lock().values().map(VecDeque::len).sum::<usize>())
            .sum();
        assert_eq!(pool.len(), held);
        assert!(held <= 64);
    }
}
