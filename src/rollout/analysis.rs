//! Sliding windows of request outcomes per route and version, recorded without a lock.
//!
//! A window is a ring of one-second slots. Each slot holds atomic counters: requests,
//! errors (5xx, or no answer at all) and a latency histogram with geometric buckets, fine
//! enough for p50/p90/p99. Recording is a handful of relaxed atomic adds. A slot is reused
//! for a newer second by whichever thread first sees it stale: it claims the slot with a
//! compare-and-swap on its second stamp and zeroes it; a record racing with that reset
//! may be lost, which costs a sample, never correctness of the proxy.
//!
//! [`evaluate`] turns a canary window and the stable window of the same span into a
//! verdict. Absolute rules (`max_error_rate`, `max_p99_latency`) fail the canary only when
//! stable does not fail them alike; the relative error rule also needs the canary's error
//! rate to be higher than stable's with the configured confidence (a one-sided Fisher exact
//! test, exact at small samples where a normal approximation would roll back on one error).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::AnalysisRules;

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
        self.stats_since(now, window, None)
    }

    /// Like [`Self::stats`], leaving out every second that began before `since` (the
    /// moment a new phase or version started: what came before must not judge it).
    pub fn stats_since(
        &self,
        now: Instant,
        window: Duration,
        since: Option<Instant>,
    ) -> WindowStats {
        self.raw_since(now, window, since).stats()
    }

    /// The counts behind [`Self::stats_since`]: they add up across replicas.
    pub fn raw_since(&self, now: Instant, window: Duration, since: Option<Instant>) -> RawStats {
        let secs = window.as_secs().clamp(1, MAX_WINDOW_SECS);
        let current = self.second(now) + 1;
        let mut oldest = current.saturating_sub(secs - 1);
        if let Some(since) = since {
            // Stamps are second + 1: the second `since` falls in is left out as well.
            oldest = oldest.max(self.second(since) + 2);
        }
        let mut raw = RawStats::default();
        for slot in self.slots.iter() {
            let stamp = slot.stamp.load(Relaxed);
            if stamp == 0 || stamp < oldest || stamp > current {
                continue;
            }
            raw.requests += slot.requests.load(Relaxed);
            raw.errors += slot.errors.load(Relaxed);
            for (acc, b) in raw.latency.iter_mut().zip(&slot.latency) {
                *acc += b.load(Relaxed);
            }
        }
        raw
    }
}

/// Requests, errors and the latency histogram of a span: what a replica contributes to
/// the fleet's analysis, summed before any quantile is taken.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RawStats {
    pub requests: u64,
    pub errors: u64,
    /// Counts per latency bucket (`LAT_BUCKETS` of them; a shorter list is padded).
    pub latency: Vec<u64>,
}

impl Default for RawStats {
    fn default() -> Self {
        RawStats {
            requests: 0,
            errors: 0,
            latency: vec![0; LAT_BUCKETS],
        }
    }
}

impl RawStats {
    pub fn add(&mut self, other: &RawStats) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency.resize(LAT_BUCKETS, 0);
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a += b;
        }
    }

    /// Totals and quantiles (bucket upper bounds).
    pub fn stats(&self) -> WindowStats {
        let lat = &self.latency;
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
        WindowStats {
            requests: self.requests,
            errors: self.errors,
            p50: quantile(0.5),
            p90: quantile(0.9),
            p99: quantile(0.99),
        }
    }
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Too few canary requests to judge.
    Inconclusive,
    Pass,
    Fail {
        /// `error_rate`, `error_rate_ratio`, `latency`, `latency_ratio`.
        reason: &'static str,
        /// The numbers behind the verdict, for events and logs.
        numbers: Value,
    },
}

fn ln_gamma(x: f64) -> f64 {
    // Lanczos approximation (g = 7, n = 9): ~15 significant digits for x > 0.
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

fn ln_choose(n: u64, k: u64) -> f64 {
    ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0)
}

/// One-sided Fisher exact test: the probability of seeing at least `a` canary errors among
/// `n1` canary requests if both versions failed alike (`a + b` errors in `n1 + n2`).
/// Small values mean the canary is worse.
pub fn fisher_upper_p(a: u64, n1: u64, b: u64, n2: u64) -> f64 {
    let (n, k) = (n1 + n2, a + b);
    if n1 == 0 || k == 0 {
        return 1.0;
    }
    let denom = ln_choose(n, n1);
    let hi = n1.min(k);
    let mut p = 0.0;
    for x in a..=hi {
        if k - x > n2 {
            continue;
        }
        let term = (ln_choose(k, x) + ln_choose(n - k, n1 - x) - denom).exp();
        p += term;
        // Terms fall fast past the mode: stop once they no longer matter.
        if term < p * 1e-12 && x > a + 10 {
            break;
        }
    }
    p.min(1.0)
}

/// Judges the canary against stable over the same span.
pub fn evaluate(rules: &AnalysisRules, canary: &WindowStats, stable: &WindowStats) -> Verdict {
    if canary.requests < rules.min_requests.max(1) {
        return Verdict::Inconclusive;
    }
    let stable_judged = stable.requests >= rules.min_requests.max(1);
    let numbers = |threshold: Value, extra: Value| {
        let mut v = json!({
            "canary_requests": canary.requests,
            "canary_errors": canary.errors,
            "canary_error_rate": canary.error_rate(),
            "canary_p99_ms": canary.p99 * 1000.0,
            "stable_requests": stable.requests,
            "stable_errors": stable.errors,
            "stable_error_rate": stable.error_rate(),
            "stable_p99_ms": stable.p99 * 1000.0,
            "threshold": threshold,
        });
        if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
            obj.extend(more);
        }
        v
    };
    let (cr, sr) = (canary.error_rate(), stable.error_rate());
    if let Some(max) = rules.max_error_rate {
        // Stable failing alike means the problem is not the canary: rolling back cannot help.
        if cr > max && !(stable_judged && sr > max) {
            return Verdict::Fail {
                reason: "error_rate",
                numbers: numbers(json!(max), json!({})),
            };
        }
    }
    if let Some(ratio) = rules.max_error_rate_ratio {
        if stable_judged && cr > ratio * sr {
            let p = fisher_upper_p(
                canary.errors,
                canary.requests,
                stable.errors,
                stable.requests,
            );
            if p < 1.0 - rules.confidence {
                return Verdict::Fail {
                    reason: "error_rate_ratio",
                    numbers: numbers(
                        json!(ratio),
                        json!({ "p_value": p, "confidence": rules.confidence }),
                    ),
                };
            }
        }
    }
    if let Some(max) = rules.max_p99_latency {
        let max = max.as_secs_f64();
        if canary.p99 > max && !(stable_judged && stable.p99 > max) {
            return Verdict::Fail {
                reason: "latency",
                numbers: numbers(json!(max * 1000.0), json!({})),
            };
        }
    }
    if let Some(ratio) = rules.max_p99_latency_ratio {
        if stable_judged && canary.p99 > ratio * stable.p99 {
            return Verdict::Fail {
                reason: "latency_ratio",
                numbers: numbers(json!(ratio), json!({})),
            };
        }
    }
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults, as a config without `[routes.analysis]` compiles them.
    fn rules() -> AnalysisRules {
        let snap = crate::config::load_str(
            "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n",
            "test.toml",
        )
        .unwrap();
        let rules = snap.routes[0].analysis.clone();
        assert_eq!(rules.max_error_rate_ratio, Some(2.0));
        assert_eq!((rules.min_requests, rules.failure_limit), (20, 1));
        rules
    }

    fn stats(requests: u64, errors: u64, p99: f64) -> WindowStats {
        WindowStats {
            requests,
            errors,
            p50: p99 / 2.0,
            p90: p99,
            p99,
        }
    }

    #[test]
    fn fisher_matches_known_values() {
        // Hypergeometric by hand: 1 error in 220, 20 of them canary: P(X >= 1) = 20/220.
        assert!((fisher_upper_p(1, 20, 0, 200) - 20.0 / 220.0).abs() < 1e-9);
        assert!(fisher_upper_p(0, 20, 5, 200) > 0.999);
        assert!(fisher_upper_p(100, 100, 0, 900) < 1e-12);
        assert!(fisher_upper_p(2_000, 3_000, 50, 27_000) < 1e-12);
    }

    #[test]
    fn small_samples_neither_trigger_nor_hide() {
        let r = rules();
        // One error in 20 canary requests against a clean stable: not significant.
        assert_eq!(
            evaluate(&r, &stats(20, 1, 0.01), &stats(200, 0, 0.01)),
            Verdict::Pass
        );
        // Below min_requests: no verdict at all.
        assert_eq!(
            evaluate(&r, &stats(19, 19, 0.01), &stats(200, 0, 0.01)),
            Verdict::Inconclusive
        );
        // A dead canary at the minimum sample: significant.
        assert!(matches!(
            evaluate(&r, &stats(20, 20, 0.01), &stats(200, 0, 0.01)),
            Verdict::Fail {
                reason: "error_rate_ratio",
                ..
            }
        ));
    }

    #[test]
    fn failing_alike_is_not_the_canary() {
        let mut r = rules();
        r.max_error_rate = Some(0.05);
        r.max_p99_latency = Some(Duration::from_millis(200));
        assert_eq!(
            evaluate(&r, &stats(100, 50, 0.01), &stats(900, 450, 0.01)),
            Verdict::Pass
        );
        assert_eq!(
            evaluate(&r, &stats(100, 0, 0.5), &stats(900, 0, 0.6)),
            Verdict::Pass
        );
        assert!(matches!(
            evaluate(&r, &stats(100, 10, 0.01), &stats(900, 0, 0.01)),
            Verdict::Fail {
                reason: "error_rate",
                ..
            }
        ));
        assert!(matches!(
            evaluate(&r, &stats(100, 0, 0.5), &stats(900, 0, 0.01)),
            Verdict::Fail {
                reason: "latency",
                ..
            }
        ));
        // Blue/green: no stable traffic, absolute rules still judge.
        assert!(matches!(
            evaluate(&r, &stats(100, 10, 0.01), &stats(0, 0, 0.0)),
            Verdict::Fail {
                reason: "error_rate",
                ..
            }
        ));
        r.max_p99_latency_ratio = Some(2.0);
        r.max_p99_latency = None;
        assert!(matches!(
            evaluate(&r, &stats(100, 0, 0.3), &stats(900, 0, 0.1)),
            Verdict::Fail {
                reason: "latency_ratio",
                ..
            }
        ));
    }

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
