//! The upstream attempts still waiting for an answer, recorded without a lock.
//!
//! [`InFlight`] counts the upstream attempts waiting for an answer, by the 200 ms tick they
//! started in, so the analysis sees a canary that hangs: an attempt unanswered past the
//! latency limit counts as a slow request, past the read timeout as a failed one, at the
//! next evaluation, long before it finishes (or never does).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::window::Totals;

/// Granularity of [`InFlight`]: an attempt's age is known to within one tick (so a hanging
/// attempt counts as slow at most one tick after the latency limit).
const TICK_MS: u64 = 200;
/// Ticks told apart (25.6 s); attempts older than that share one overflow count, known to
/// be at least that old (slow; failed when the read timeout is shorter, and otherwise
/// failed soon anyway: an attempt waiting for its answer's head ends at the read timeout).
/// 1 KB a track (1,024 ticks of 100 ms took 8 KB).
const TICKS: u64 = 128;
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// Upstream attempts waiting for an answer, by the tick they started in.
///
/// Each cell packs (tick + 1, count) into one atomic word, so starting, finishing and
/// moving a cell's count along are single compare-and-swaps and never mix up two ticks.
/// A cell is taken over by a newer tick (`TICKS` ticks later) only when an attempt starts
/// in it; the attempts still counted there move to `overflow` (known to be at least 25.6 s
/// old), and their tickets then finish against `overflow`.
pub struct InFlight {
    epoch: Instant,
    cells: Box<[AtomicU64]>,
    /// May dip below 0 for a moment while a cell's count moves here.
    overflow: AtomicI64,
}

/// What [`InFlight::start`] hands out, to give back to [`InFlight::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The tick + 1 of the cell that counts it; 0 = counted in the overflow.
    tick: u64,
}

fn unpack(v: u64) -> (u64, u64) {
    (v >> COUNT_BITS, v & COUNT_MASK)
}

impl InFlight {
    /// Counting ticks from `epoch`: every instant passed in later is of the same clock, no
    /// earlier than it (it reads no clock itself).
    pub fn new(epoch: Instant) -> Self {
        InFlight {
            epoch,
            cells: (0..TICKS).map(|_| AtomicU64::new(0)).collect(),
            overflow: AtomicI64::new(0),
        }
    }

    fn tick(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64 / TICK_MS
    }

    /// Counts an attempt that starts now.
    #[inline]
    pub fn start(&self, now: Instant) -> Ticket {
        let tick = self.tick(now) + 1;
        let cell = &self.cells[(tick % TICKS) as usize];
        let mut v = cell.load(Relaxed);
        loop {
            let (t, n) = unpack(v);
            let (next, moved, ticket) = if t >= tick {
                // `t > tick`: another thread's clock read is a tick ahead; count there.
                if n == COUNT_MASK {
                    self.overflow.fetch_add(1, Relaxed);
                    return Ticket { tick: 0 };
                }
                (v + 1, 0, t)
            } else {
                ((tick << COUNT_BITS) | 1, n, tick)
            };
            match cell.compare_exchange_weak(v, next, Relaxed, Relaxed) {
                Ok(_) => {
                    if moved > 0 {
                        self.overflow.fetch_add(moved as i64, Relaxed);
                    }
                    return Ticket { tick: ticket };
                }
                Err(now_v) => v = now_v,
            }
        }
    }

    /// Counts an attempt that started at `started` (before `now`), as one whose answer's
    /// head came and whose body is still arriving is counted from its attempt's start. One
    /// that started a ring or more ago goes to the overflow at once: its tick's cell may
    /// already count younger attempts, which it must not join.
    #[inline]
    pub fn start_since(&self, started: Instant, now: Instant) -> Ticket {
        if self.tick(now).saturating_sub(self.tick(started)) >= TICKS - 1 {
            self.overflow.fetch_add(1, Relaxed);
            return Ticket { tick: 0 };
        }
        self.start(started)
    }

    /// The attempt of `ticket` got its answer, failed, or was abandoned.
    #[inline]
    pub fn finish(&self, ticket: Ticket) {
        if ticket.tick != 0 {
            let cell = &self.cells[(ticket.tick % TICKS) as usize];
            let mut v = cell.load(Relaxed);
            loop {
                let (t, n) = unpack(v);
                if t != ticket.tick || n == 0 {
                    break;
                }
                match cell.compare_exchange_weak(v, v - 1, Relaxed, Relaxed) {
                    Ok(_) => return,
                    Err(now_v) => v = now_v,
                }
            }
        }
        // Its cell moved on: the count went to the overflow.
        self.overflow.fetch_sub(1, Relaxed);
    }

    /// Attempts in flight now.
    pub fn count(&self) -> u64 {
        let cells: u64 = self.cells.iter().map(|c| unpack(c.load(Relaxed)).1).sum();
        cells + self.overflow.load(Relaxed).max(0) as u64
    }

    /// Adds to `t` the attempts that started at or after `since` and are still waiting
    /// after `slow_after` (as requests that took the age they reached, a lower bound) and
    /// after `fail_after` (also as errors). Ages are counted from the end of an attempt's
    /// tick, so nothing is called slow before it surely is.
    pub fn add_pending(
        &self,
        now: Instant,
        slow_after: Duration,
        fail_after: Duration,
        since: Option<Instant>,
        t: &mut Totals,
    ) {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let since_ms = since.map_or(0, |s| {
            s.saturating_duration_since(self.epoch).as_millis() as u64
        });
        let (slow_ms, fail_ms) = (slow_after.as_millis() as u64, fail_after.as_millis() as u64);
        let mut add = |n: u64, age_ms: u64| {
            if n == 0 || age_ms < slow_ms.max(1) {
                return;
            }
            t.add(n, age_ms as f64 / 1000.0);
            t.in_flight_slow += n;
            if age_ms >= fail_ms {
                t.errors += n;
                t.in_flight_failed += n;
            }
        };
        for cell in self.cells.iter() {
            let (tick, n) = unpack(cell.load(Relaxed));
            if tick == 0 || n == 0 {
                continue;
            }
            let started_ms = (tick - 1) * TICK_MS;
            if started_ms < since_ms {
                continue;
            }
            add(n, now_ms.saturating_sub(started_ms + TICK_MS));
        }
        let old = TICKS * TICK_MS;
        if now_ms.saturating_sub(since_ms) > old {
            add(self.overflow.load(Relaxed).max(0) as u64, old);
        }
    }
}

// The tests start their counts at an arbitrary instant: the machine's now.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn requests_in_flight_count_as_slow_then_failed() {
        let f = InFlight::new(Instant::now());
        let t0 = f.epoch;
        let a = f.start(t0);
        let b = f.start(t0 + Duration::from_millis(50));
        let c = f.start(t0 + Duration::from_millis(900));
        assert_eq!(f.count(), 3);
        let limit = Duration::from_millis(500);
        let timeout = Duration::from_secs(2);
        let pending = |now: Instant, since: Option<Instant>| {
            let mut t = Totals::default();
            f.add_pending(now, limit, timeout, since, &mut t);
            t
        };
        // 400 ms in: nothing is surely past the limit yet.
        assert_eq!(pending(t0 + Duration::from_millis(400), None).requests, 0);
        // 800 ms in: a and b (tick 0, ended at 200 ms) are 600 ms old at least.
        let t = pending(t0 + Duration::from_millis(800), None);
        assert_eq!((t.requests, t.in_flight_slow, t.errors), (2, 2, 0));
        let st = t.stats();
        assert!((st.p99 - 0.6).abs() < 0.6 * 0.05, "{st:?}");
        // 2.5 s in: a and b are past the timeout, c is slow.
        let t = pending(t0 + Duration::from_millis(2500), None);
        assert_eq!((t.requests, t.in_flight_failed, t.errors), (3, 2, 2));
        // What started before `since` does not judge the new phase.
        let since = Some(t0 + Duration::from_millis(500));
        assert_eq!(pending(t0 + Duration::from_millis(2500), since).requests, 1);
        f.finish(a);
        f.finish(b);
        assert_eq!(pending(t0 + Duration::from_millis(2500), None).requests, 1);
        f.finish(c);
        assert_eq!(f.count(), 0);
        assert_eq!(pending(t0 + Duration::from_secs(5), None).requests, 0);
    }

    #[test]
    fn attempts_counted_from_an_earlier_start_keep_their_age() {
        let f = InFlight::new(Instant::now());
        let t0 = f.epoch;
        // Head after 300 ms, body still arriving: counted from the attempt's start.
        let a = f.start_since(t0, t0 + Duration::from_millis(300));
        let mut t = Totals::default();
        let (limit, never) = (Duration::from_millis(500), Duration::from_millis(u64::MAX));
        f.add_pending(t0 + Duration::from_millis(900), limit, never, None, &mut t);
        assert_eq!((t.in_flight_slow, t.errors), (1, 0));
        f.finish(a);
        // A start older than the ring goes to the overflow, not into a younger cell.
        let ring = Duration::from_millis(TICKS * TICK_MS);
        let young = f.start(t0 + ring);
        let old = f.start_since(t0, t0 + ring + Duration::from_millis(100));
        assert_eq!(f.overflow.load(Relaxed), 1);
        f.finish(old);
        f.finish(young);
        assert_eq!((f.count(), f.overflow.load(Relaxed)), (0, 0));
    }

    #[test]
    fn in_flight_cells_reused_a_ring_later_keep_old_attempts_as_overflow() {
        let f = InFlight::new(Instant::now());
        let t0 = f.epoch;
        let old = f.start(t0);
        let ring = Duration::from_millis(TICKS * TICK_MS);
        // A new attempt lands in the same cell a ring later: the old one moves along.
        let new = f.start(t0 + ring);
        assert_eq!(f.count(), 2);
        let mut t = Totals::default();
        f.add_pending(
            t0 + ring + Duration::from_secs(1),
            Duration::from_millis(500),
            Duration::from_secs(20),
            None,
            &mut t,
        );
        // The new attempt is 800 ms old, the old one at least a ring old and past 20 s.
        assert_eq!((t.in_flight_slow, t.in_flight_failed), (2, 1));
        f.finish(old);
        f.finish(new);
        assert_eq!(f.count(), 0);
        assert_eq!(f.overflow.load(Relaxed), 0);
    }
}
