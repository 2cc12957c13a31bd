//! Sliding windows of request outcomes per route and version, recorded without a lock.
//!
//! A window is a ring of one-second slots. Each slot holds atomic counters: requests,
//! errors (5xx, or no answer at all) and a latency histogram with geometric buckets, fine
//! enough for p50/p90/p99. Recording is a handful of relaxed atomic adds. A slot is reused
//! for a newer second by whichever thread first sees it stale: it claims the slot with a
//! compare-and-swap on its second stamp and zeroes it; a record racing with that reset
//! may be lost, which costs a sample, never correctness of the proxy.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Slots kept: the longest window that can be asked for, in seconds.
pub const MAX_WINDOW_SECS: u64 = 120;

/// Latency buckets: upper bounds `LAT_BASE_SECS × LAT_FACTOR^i`, 0.25 ms … ~2 min.
const LAT_BUCKETS: usize = 40;
const LAT_BASE_SECS: f64 = 0.000_25;
const LAT_FACTOR: f64 = 1.4;

fn lat_bound(i: usize) -> f64 {
    LAT_BASE_SECS * LAT_FACTOR.powi(i as i32)
}

fn lat_index(seconds: f64) -> usize {
    if seconds <= LAT_BASE_SECS {
        return 0;
    }
    let i = ((seconds / LAT_BASE_SECS).ln() / LAT_FACTOR.ln()).ceil() as usize;
    i.min(LAT_BUCKETS - 1)
}

struct Slot {
    /// The second (since the window's epoch) this slot counts, plus one; 0 = never used.
    stamp: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; LAT_BUCKETS],
}

impl Slot {
    fn new() -> Self {
        Slot {
            stamp: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Aggregated numbers of one window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowStats {
    pub requests: u64,
    pub errors: u64,
    /// Seconds; 0 with no requests.
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl WindowStats {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// One version's sliding window.
pub struct Window {
    epoch: Instant,
    slots: Box<[Slot]>,
}

impl Default for Window {
    fn default() -> Self {
        Self::new()
    }
}

impl Window {
    pub fn new() -> Self {
        Window {
            epoch: Instant::now(),
            slots: (0..MAX_WINDOW_SECS).map(|_| Slot::new()).collect(),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    /// Records one finished request.
    #[inline]
    pub fn record(&self, now: Instant, is_error: bool, seconds: f64) {
        let sec = self.second(now);
        let slot = &self.slots[(sec % MAX_WINDOW_SECS) as usize];
        let stamp = sec + 1;
        let seen = slot.stamp.load(Relaxed);
        if seen != stamp
            && seen < stamp
            && slot
                .stamp
                .compare_exchange(seen, stamp, Relaxed, Relaxed)
                .is_ok()
        {
            slot.requests.store(0, Relaxed);
            slot.errors.store(0, Relaxed);
            for b in &slot.latency {
                b.store(0, Relaxed);
            }
        }
        slot.requests.fetch_add(1, Relaxed);
        if is_error {
            slot.errors.fetch_add(1, Relaxed);
        }
        slot.latency[lat_index(seconds)].fetch_add(1, Relaxed);
    }

    /// Totals over the last `window` (whole seconds, the current one included).
    pub fn stats(&self, now: Instant, window: Duration) -> WindowStats {
        let secs = window.as_secs().clamp(1, MAX_WINDOW_SECS);
        let current = self.second(now) + 1;
        let oldest = current.saturating_sub(secs - 1);
        let mut st = WindowStats::default();
        let mut lat = [0u64; LAT_BUCKETS];
        for slot in self.slots.iter() {
            let stamp = slot.stamp.load(Relaxed);
            if stamp == 0 || stamp < oldest || stamp > current {
                continue;
            }
            st.requests += slot.requests.load(Relaxed);
            st.errors += slot.errors.load(Relaxed);
            for (acc, b) in lat.iter_mut().zip(&slot.latency) {
                *acc += b.load(Relaxed);
            }
        }
        let total: u64 = lat.iter().sum();
        let quantile = |q: f64| {
            if total == 0 {
                return 0.0;
            }
            let rank = (q * total as f64).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, n) in lat.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return lat_bound(i);
                }
            }
            lat_bound(LAT_BUCKETS - 1)
        };
        st.p50 = quantile(0.5);
        st.p90 = quantile(0.9);
        st.p99 = quantile(0.99);
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_errors_and_quantiles_within_the_window() {
        let w = Window::new();
        let t0 = w.epoch;
        for i in 0..100 {
            let lat = if i < 90 { 0.010 } else { 0.500 };
            w.record(t0, i % 10 == 0, lat);
        }
        let st = w.stats(t0, Duration::from_secs(30));
        assert_eq!(st.requests, 100);
        assert_eq!(st.errors, 10);
        assert!((st.error_rate() - 0.1).abs() < 1e-9);
        // Bucket upper bounds: within one factor (1.4) above the true value.
        assert!(st.p50 >= 0.010 && st.p50 < 0.014, "{}", st.p50);
        assert!(st.p99 >= 0.5 && st.p99 < 0.7, "{}", st.p99);

        // 40 s later the old second is outside a 30 s window, and its slot is reusable.
        let later = t0 + Duration::from_secs(40);
        assert_eq!(w.stats(later, Duration::from_secs(30)).requests, 0);
        w.record(later, false, 0.001);
        assert_eq!(w.stats(later, Duration::from_secs(30)).requests, 1);
        // A slot reused a full ring later forgets what it held.
        let ring = t0 + Duration::from_secs(MAX_WINDOW_SECS);
        w.record(ring, false, 0.001);
        assert_eq!(w.stats(ring, Duration::from_secs(1)).requests, 1);
    }
}
