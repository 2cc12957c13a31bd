//! Sliding windows of request outcomes per route and track, recorded without a lock.
//!
//! A window keeps its counts at two resolutions, so that its memory does not grow with its
//! span: a *fine* ring of three one-second slots for the short span the analysis judges
//! beside the window (the last 2 s), and a *coarse* ring of slots of `G` seconds for the
//! window itself, where `G` is a fifth of the ring's span (the longer of the route's
//! `window` and the status API's 30 s), rounded up: 6 s for windows up to 30 s, 24 s for
//! 120 s. A span longer than 2 s is answered from the coarse ring, by whole slots: it
//! reaches back at least the span asked and less than one slot more (30 to 36 s for the
//! default 30 s window; a span that is not a multiple of `G` rounds up to one), and what
//! began before a new phase is left out by whole slots (the window starts judging a new
//! phase at the first slot boundary after it began; the 2 s span, by the second).
//!
//! Each slot holds atomic counters: errors (5xx, or no answer at all) and a latency
//! histogram whose counts add up to the requests. The histogram is logarithmic: 8 buckets
//! per power of two of microseconds, each 2^(1/8) ≈ 1.09 times as wide as the previous one,
//! so a quantile, reported as its bucket's geometric midpoint, is within 4.5% of the true
//! value (from 32 µs to ~2 minutes), in 182 buckets of 4 bytes (744 bytes a slot with its
//! stamp and error count; the previous 16 linear sub-buckets per power of two took 1.6 KB
//! for a 3.2% bound). Recording is a few relaxed atomic adds in each ring.
//!
//! A slot is reused for a newer period by whichever writer first sees it stale, with a
//! seqlock-like protocol: the writer claims the slot by swapping its stamp to `RESETTING`
//! (a compare-and-swap, so one writer wins), zeroes the counters, then publishes the new
//! stamp with `Release`. A reader loads the stamp with `Acquire`, reads the counters, and
//! after an `Acquire` fence loads the stamp again: a slot whose stamp changed (or was being
//! reset) is read again or skipped, so a new stamp is never paired with an old period's
//! counts. A record racing with a reset may be lost, which costs a sample, never a verdict.
//!

use std::sync::atomic::{
    fence, AtomicU32, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The longest window that can be configured, in seconds.
pub const MAX_WINDOW_SECS: u64 = 120;
/// The span the status API shows (`window` in `/api/v1/status`): every ring holds at least it.
pub const STATUS_SPAN: Duration = Duration::from_secs(30);
/// Spans up to this many seconds are answered by the second, from the fine ring.
pub const FINE_SECS: u64 = 2;
/// Coarse slots a ring's span is divided into.
const COARSE_PER_SPAN: u64 = 5;

/// Latency histogram: values in microseconds. Below 2^`LOW_MSB` µs one bucket per power of
/// two (0, 1, 2–3, 4–7, 8–15, 16–31 µs); from there to 2^(`MAX_MSB` + 1) µs ≈ 134 s,
/// `PER_OCTAVE` geometric buckets per power of two; longer latencies share the last bucket.
const LOW_MSB: u32 = 5;
const MAX_MSB: u32 = 26;
const PER_OCTAVE: usize = 8;
const LOW_BUCKETS: usize = LOW_MSB as usize + 1;
const LAT_BUCKETS: usize = LOW_BUCKETS + (MAX_MSB - LOW_MSB + 1) as usize * PER_OCTAVE;
/// Where each geometric bucket starts within a power of two, as an f64 mantissa:
/// round((2^(k/8) − 1) · 2^52) (checked against `powf` by a test); the last is 2^52, which
/// no mantissa reaches.
const SUB_START: [u64; PER_OCTAVE + 1] = [
    0,
    407_610_591_105_403,
    852_113_092_622_101,
    1_336_846_507_715_111,
    1_865_452_045_155_277,
    2_441_900_471_263_451,
    3_070_521_937_417_133,
    3_756_038_507_177_095,
    1 << 52,
];

/// The bucket of a latency in seconds.
#[inline]
fn lat_index(seconds: f64) -> usize {
    let us = seconds * 1e6;
    // `as` saturates: negative and NaN become 0.
    if us.is_nan() || us < (1u64 << LOW_MSB) as f64 {
        return (64 - (us as u64).leading_zeros()) as usize;
    }
    // The exponent of an f64 is the power of two, its mantissa the place within it.
    let bits = us.to_bits();
    let msb = ((bits >> 52) as u32).wrapping_sub(1023);
    if msb > MAX_MSB {
        return LAT_BUCKETS - 1;
    }
    let mantissa = bits & ((1 << 52) - 1);
    // Branch-free: the number of bucket starts at or below the mantissa.
    let sub: usize = SUB_START[1..PER_OCTAVE]
        .iter()
        .map(|&s| usize::from(mantissa >= s))
        .sum();
    LOW_BUCKETS + (msb - LOW_MSB) as usize * PER_OCTAVE + sub
}

/// The value a bucket stands for, in seconds: the geometric midpoint of its range.
fn lat_value(i: usize) -> f64 {
    if i == 0 {
        return 0.5e-6;
    }
    if i < LOW_BUCKETS {
        return 2f64.powf(i as f64 - 0.5) / 1e6;
    }
    let octave = (i - LOW_BUCKETS) / PER_OCTAVE;
    let sub = (i - LOW_BUCKETS) % PER_OCTAVE;
    2f64.powf((LOW_MSB as usize + octave) as f64 + (sub as f64 + 0.5) / PER_OCTAVE as f64) / 1e6
}

/// Stamp of a slot being zeroed for a new period.
const RESETTING: u64 = u64::MAX;

struct Slot {
    /// The period (since the window's epoch) this slot counts, plus one; 0 = never used;
    /// `RESETTING` while a writer zeroes it.
    stamp: AtomicU64,
    errors: AtomicU64,
    /// Counts per bucket; their sum is the slot's requests (u32: ~4 billion a bucket in a
    /// slot of at most 12 s is plenty, and halves the slot's memory).
    latency: [AtomicU32; LAT_BUCKETS],
}

impl Slot {
    fn new() -> Self {
        Slot {
            stamp: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    /// Counts a request of latency bucket `bucket` in period `period`.
    #[inline]
    fn record(&self, period: u64, is_error: bool, bucket: usize) {
        let stamp = period + 1;
        let seen = self.stamp.load(Acquire);
        if seen != stamp && seen != RESETTING {
            if seen > stamp {
                // The slot already counts a later period: this sample is a ring too old.
                return;
            }
            if self
                .stamp
                .compare_exchange(seen, RESETTING, Acquire, Relaxed)
                .is_ok()
            {
                // Readers that see any of the zeroes below also see RESETTING (or later).
                fence(Release);
                self.errors.store(0, Relaxed);
                for b in &self.latency {
                    b.store(0, Relaxed);
                }
                self.stamp.store(stamp, Release);
            }
            // Lost the claim: another writer is zeroing this slot for the same period;
            // this sample may be zeroed with it.
        }
        if is_error {
            self.errors.fetch_add(1, Relaxed);
        }
        if let Some(b) = self.latency.get(bucket) {
            b.fetch_add(1, Relaxed);
        }
    }

    /// Adds this slot's counts to `t` if it holds a period whose stamp is in
    /// `oldest..=current` and no writer reset it while it was read.
    fn read_into(&self, oldest: u64, current: u64, t: &mut Totals) {
        let mut lat = [0u32; LAT_BUCKETS];
        // A reset takes a few hundred nanoseconds: a couple of tries see it through.
        for _ in 0..4 {
            let before = self.stamp.load(Acquire);
            if before == RESETTING {
                std::hint::spin_loop();
                continue;
            }
            if before == 0 || before < oldest || before > current {
                return;
            }
            let errors = self.errors.load(Relaxed);
            for (acc, b) in lat.iter_mut().zip(&self.latency) {
                *acc = b.load(Relaxed);
            }
            // Orders the counter loads before the second stamp load: if any of them saw a
            // reset's zeroing, the stamp load sees that reset's RESETTING or newer stamp.
            fence(Acquire);
            if self.stamp.load(Relaxed) != before {
                continue;
            }
            t.errors += errors;
            for (acc, n) in t.latency.iter_mut().zip(lat) {
                *acc += u64::from(n);
                t.requests += u64::from(n);
            }
            return;
        }
    }
}

/// Aggregated numbers of one window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowStats {
    /// Finished requests, plus those in flight past the latency limit when judged.
    pub requests: u64,
    /// Errors, plus requests in flight past their timeout when judged.
    pub errors: u64,
    /// Seconds; 0 with no requests.
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    /// Requests still unanswered past the latency limit (counted in `requests`, and in the
    /// quantiles at the age they had reached).
    pub in_flight_slow: u64,
    /// Of those, the ones past their timeout (counted in `errors`).
    pub in_flight_failed: u64,
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

/// Raw totals over a span: counts and the merged histogram, before quantiles. They add
/// up: a fleet's replicas exchange them and the verdict is taken on the sum.
///
/// On the wire the histogram is `latency_g8` (this layout, 8 buckets per power of two). A
/// replica of an older build sends `latency` (16 linear sub-buckets per power of two): its
/// counts are moved to the buckets of this layout that hold their values. An older build
/// cannot read `latency_g8`, and leaves a newer replica's counts out of its sums until it
/// is upgraded too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "TotalsWire", into = "TotalsWire")]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub in_flight_slow: u64,
    pub in_flight_failed: u64,
    /// Counts per latency bucket (`LAT_BUCKETS` of them).
    latency: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct TotalsWire {
    requests: u64,
    errors: u64,
    #[serde(default)]
    in_flight_slow: u64,
    #[serde(default)]
    in_flight_failed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latency_g8: Option<Vec<u64>>,
    /// The layout of builds before `latency_g8`; read, never written.
    #[serde(default, skip_serializing)]
    latency: Option<Vec<u64>>,
}

/// The value a bucket of the older layout (16 linear sub-buckets per power of two from
/// 32 µs, one bucket per microsecond below) stands for, in seconds.
fn legacy_lat_value(i: usize) -> f64 {
    const SUB: u64 = 16;
    let i = i as u64;
    if i < 2 * SUB {
        return (i as f64 + 0.5) / 1e6;
    }
    let shift = ((i - 2 * SUB) / SUB + 1).min(40);
    let sub = (i - 2 * SUB) % SUB;
    let low = (SUB + sub) << shift;
    (low as f64 + (1u64 << shift) as f64 / 2.0) / 1e6
}

impl From<TotalsWire> for Totals {
    fn from(w: TotalsWire) -> Self {
        let mut latency = vec![0; LAT_BUCKETS];
        match (w.latency_g8, w.latency) {
            (Some(l), _) => {
                for (a, b) in latency.iter_mut().zip(&l) {
                    *a = *b;
                }
            }
            (None, Some(old)) => {
                for (i, n) in old.iter().enumerate().filter(|(_, n)| **n > 0) {
                    latency[lat_index(legacy_lat_value(i))] += n;
                }
            }
            (None, None) => {}
        }
        Totals {
            requests: w.requests,
            errors: w.errors,
            in_flight_slow: w.in_flight_slow,
            in_flight_failed: w.in_flight_failed,
            latency,
        }
    }
}

impl From<Totals> for TotalsWire {
    fn from(t: Totals) -> Self {
        TotalsWire {
            requests: t.requests,
            errors: t.errors,
            in_flight_slow: t.in_flight_slow,
            in_flight_failed: t.in_flight_failed,
            latency_g8: Some(t.latency),
            latency: None,
        }
    }
}

impl Default for Totals {
    fn default() -> Self {
        Totals {
            requests: 0,
            errors: 0,
            in_flight_slow: 0,
            in_flight_failed: 0,
            latency: vec![0; LAT_BUCKETS],
        }
    }
}

impl Totals {
    /// Adds another span's totals (another replica's, for the fleet-wide verdict).
    pub fn merge(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.in_flight_slow += other.in_flight_slow;
        self.in_flight_failed += other.in_flight_failed;
        self.latency.resize(LAT_BUCKETS, 0);
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a += b;
        }
    }

    /// Adds `n` requests that took (at least) `seconds`.
    pub(crate) fn add(&mut self, n: u64, seconds: f64) {
        self.requests += n;
        if let Some(b) = self.latency.get_mut(lat_index(seconds)) {
            *b += n;
        }
    }

    /// The quantile `q` (0..1): the midpoint of the bucket holding the sample of rank
    /// ⌈q·n⌉; 0 without samples.
    pub fn quantile(&self, q: f64) -> f64 {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return lat_value(i);
            }
        }
        lat_value(LAT_BUCKETS - 1)
    }

    pub fn stats(&self) -> WindowStats {
        WindowStats {
            requests: self.requests,
            errors: self.errors,
            p50: self.quantile(0.5),
            p90: self.quantile(0.9),
            p99: self.quantile(0.99),
            in_flight_slow: self.in_flight_slow,
            in_flight_failed: self.in_flight_failed,
        }
    }
}

/// A ring of slots of `secs` seconds each.
struct Ring {
    secs: u64,
    slots: Box<[Slot]>,
}

impl Ring {
    fn new(secs: u64, slots: u64) -> Self {
        Ring {
            secs,
            slots: (0..slots).map(|_| Slot::new()).collect(),
        }
    }

    #[inline]
    fn record(&self, second: u64, is_error: bool, bucket: usize) {
        let period = second / self.secs;
        self.slots[(period % self.slots.len() as u64) as usize].record(period, is_error, bucket);
    }

    /// Adds the periods with stamps in `oldest..=current` to `t`.
    fn read_into(&self, oldest: u64, current: u64, t: &mut Totals) {
        for slot in self.slots.iter() {
            slot.read_into(oldest, current, t);
        }
    }
}

/// One track's sliding window: a fine ring of one-second slots for the short span and a
/// coarse ring sized from the longest span asked of it (see the module docs).
///
/// Its seconds count from an `epoch` given at creation: whoever records and reads it passes
/// instants of the same clock, no earlier than the epoch (the window reads no clock itself).
pub struct Window {
    epoch: Instant,
    /// The longest span answered, in seconds.
    span: u64,
    fine: Ring,
    coarse: Ring,
}

impl Window {
    /// A window that can answer for any span up to [`MAX_WINDOW_SECS`], counting from
    /// `epoch`.
    pub fn new(epoch: Instant) -> Self {
        Self::with_span(Duration::from_secs(MAX_WINDOW_SECS), epoch)
    }

    /// A window that can answer for spans up to `span` (whole seconds, 1 to
    /// [`MAX_WINDOW_SECS`]), counting from `epoch`; longer questions get the longest span
    /// it holds.
    pub fn with_span(span: Duration, epoch: Instant) -> Self {
        let span = Self::span_secs_for(span);
        let g = span.div_ceil(COARSE_PER_SPAN);
        // The current slot, the whole slots of the span, and one more: the slot being
        // reused for the next period is never one a reader of the full span still counts.
        Window {
            epoch,
            span,
            fine: Ring::new(1, FINE_SECS + 1),
            coarse: Ring::new(g, span.div_ceil(g) + 2),
        }
    }

    /// The span, in whole seconds, that [`Self::with_span`] makes for `span`.
    pub fn span_secs_for(span: Duration) -> u64 {
        span.as_secs().clamp(1, MAX_WINDOW_SECS)
    }

    /// The longest span this window answers for, in seconds.
    pub fn span_secs(&self) -> u64 {
        self.span
    }

    /// The length of a coarse slot, in seconds: spans longer than [`FINE_SECS`] are
    /// answered by whole slots of this length.
    pub fn slot_secs(&self) -> u64 {
        self.coarse.secs
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    /// Records one finished request (or upstream attempt).
    #[inline]
    pub fn record(&self, now: Instant, is_error: bool, seconds: f64) {
        let sec = self.second(now);
        let bucket = lat_index(seconds);
        self.fine.record(sec, is_error, bucket);
        self.coarse.record(sec, is_error, bucket);
    }

    /// Totals over the last `window` (whole seconds, the current one included).
    pub fn stats(&self, now: Instant, window: Duration) -> WindowStats {
        self.totals_since(now, window, None).stats()
    }

    /// The raw totals over the last `window`, leaving out every period that began before
    /// `since` (the moment a new phase or version started: what came before must not judge
    /// it); requests in flight are merged into them before the verdict. Up to
    /// [`FINE_SECS`] by the second; longer spans by whole coarse slots, reaching back at
    /// least `window` and less than one slot more.
    pub fn totals_since(&self, now: Instant, window: Duration, since: Option<Instant>) -> Totals {
        let secs = window.as_secs().clamp(1, self.span);
        let ring = if secs <= FINE_SECS {
            &self.fine
        } else {
            &self.coarse
        };
        // Stamps are period + 1.
        let current = self.second(now) / ring.secs + 1;
        let mut oldest = current.saturating_sub(secs.div_ceil(ring.secs));
        if secs <= FINE_SECS {
            // By the second: the current one and the `secs - 1` before it.
            oldest = current.saturating_sub(secs - 1);
        }
        if let Some(since) = since {
            // The period `since` falls in is left out as well.
            oldest = oldest.max(self.second(since) / ring.secs + 2);
        }
        let mut t = Totals::default();
        ring.read_into(oldest, current, &mut t);
        t
    }
}

// The tests start their windows at an arbitrary instant: the machine's now.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn counts_errors_and_quantiles_within_the_window() {
        let w = Window::with_span(Duration::from_secs(30), Instant::now());
        assert_eq!((w.span_secs(), w.slot_secs()), (30, 6));
        let t0 = w.epoch;
        for i in 0..100 {
            let lat = if i < 90 { 0.010 } else { 0.500 };
            w.record(t0, i % 10 == 0, lat);
        }
        let st = w.stats(t0, Duration::from_secs(30));
        assert_eq!(st.requests, 100);
        assert_eq!(st.errors, 10);
        assert!((st.error_rate() - 0.1).abs() < 1e-9);
        // Logarithmic buckets: within 5% of the true value.
        assert!((st.p50 / 0.010 - 1.0).abs() < 0.05, "{}", st.p50);
        assert!((st.p99 / 0.5 - 1.0).abs() < 0.05, "{}", st.p99);
        // The short span sees them too, by the second.
        assert_eq!(w.stats(t0, Duration::from_secs(2)).requests, 100);
        assert_eq!(
            w.stats(t0 + Duration::from_secs(1), Duration::from_secs(2))
                .requests,
            100
        );
        assert_eq!(
            w.stats(t0 + Duration::from_secs(2), Duration::from_secs(2))
                .requests,
            0
        );
        // By whole 6 s slots, a 30 s window reaches back at least 30 s and less than 36 s.
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(w.stats(at(35), Duration::from_secs(30)).requests, 100);
        assert_eq!(w.stats(at(36), Duration::from_secs(30)).requests, 0);
        // A span that is not a multiple of the slot rounds up to one: 10 s reaches 12–18 s.
        assert_eq!(w.stats(at(17), Duration::from_secs(10)).requests, 100);
        assert_eq!(w.stats(at(18), Duration::from_secs(10)).requests, 0);

        // 40 s later the old second is outside a 30 s window, and its slot is reusable.
        let later = at(40);
        assert_eq!(w.stats(later, Duration::from_secs(30)).requests, 0);
        w.record(later, false, 0.001);
        assert_eq!(w.stats(later, Duration::from_secs(30)).requests, 1);
        // A slot reused a full ring later forgets what it held.
        let ring = at(MAX_WINDOW_SECS);
        w.record(ring, false, 0.001);
        assert_eq!(w.stats(ring, Duration::from_secs(1)).requests, 1);
        // A sample a full ring older than the slot's period is dropped, not miscounted.
        w.record(t0, true, 0.001);
        assert_eq!(w.stats(ring, Duration::from_secs(1)).errors, 0);
    }

    /// What began before `since` is left out: by the second in the short span, by the
    /// whole coarse slot in the window.
    #[test]
    fn since_leaves_out_the_period_it_falls_in() {
        let w = Window::with_span(Duration::from_secs(30), Instant::now());
        let at = |ms: u64| w.epoch + Duration::from_millis(ms);
        w.record(at(6_500), true, 0.001); // second 6, slot 1 (6–11 s)
        w.record(at(7_500), false, 0.001); // second 7, slot 1
        w.record(at(12_500), false, 0.001); // second 12, slot 2 (12–17 s)
        let since = Some(at(7_200));
        let fast = w.totals_since(at(9_900), Duration::from_secs(2), since);
        assert_eq!((fast.requests, fast.errors), (0, 0));
        let fast = w.totals_since(at(8_100), Duration::from_secs(2), since);
        assert_eq!((fast.requests, fast.errors), (0, 0));
        let fast = w.totals_since(at(8_100), Duration::from_secs(2), None);
        assert_eq!((fast.requests, fast.errors), (1, 0));
        w.record(at(8_500), false, 0.001); // second 8, slot 1
        let fast = w.totals_since(at(9_100), Duration::from_secs(2), since);
        assert_eq!((fast.requests, fast.errors), (1, 0));
        let full = w.totals_since(at(12_900), Duration::from_secs(30), since);
        assert_eq!((full.requests, full.errors), (1, 0));
        let full = w.totals_since(at(12_900), Duration::from_secs(30), None);
        assert_eq!((full.requests, full.errors), (4, 1));
    }

    /// Rings are sized from the span: memory does not grow with the window.
    #[test]
    fn rings_are_sized_from_the_span() {
        for (span, g, coarse) in [(1, 1, 3), (30, 6, 7), (45, 9, 7), (50, 10, 7), (120, 24, 7)] {
            let w = Window::with_span(Duration::from_secs(span), Instant::now());
            assert_eq!(w.fine.slots.len() as u64, FINE_SECS + 1);
            assert_eq!((w.coarse.secs, w.coarse.slots.len()), (g, coarse), "{span}");
        }
        assert_eq!(LAT_BUCKETS, 182);
        assert!(
            std::mem::size_of::<Slot>() <= 744,
            "{}",
            std::mem::size_of::<Slot>()
        );
    }

    /// Every bucket index maps back into itself, and bucket values grow with the index.
    #[test]
    fn latency_buckets_are_consistent() {
        for (k, start) in SUB_START.iter().enumerate() {
            let want = (2f64.powf(k as f64 / PER_OCTAVE as f64) - 1.0) * (1u64 << 52) as f64;
            assert_eq!(*start, want.round() as u64, "bucket start {k}");
        }
        let mut prev = 0.0;
        for i in 0..LAT_BUCKETS {
            let v = lat_value(i);
            assert!(v > prev, "bucket {i}: {v} after {prev}");
            assert_eq!(lat_index(v), i, "bucket {i} value {v}");
            prev = v;
        }
        assert_eq!(lat_index(0.0), 0);
        assert_eq!(lat_index(-1.0), 0);
        assert_eq!(lat_index(f64::NAN), 0);
        assert_eq!(lat_index(f64::INFINITY), LAT_BUCKETS - 1);
        assert_eq!(lat_index(1e9), LAT_BUCKETS - 1);
        // Bucket starts: exactly at 2^(k/8) times a power of two.
        assert_eq!(lat_index(32e-6), LOW_BUCKETS);
        assert_eq!(lat_index(31.9e-6), LOW_BUCKETS - 1);
        assert_eq!(
            lat_index(2f64.powf(13.0 + 3.0 / 8.0) * 1.000_001 / 1e6),
            LOW_BUCKETS + 8 * 8 + 3
        );
        assert_eq!(
            lat_index(2f64.powf(13.0 + 3.0 / 8.0) * 0.999_999 / 1e6),
            LOW_BUCKETS + 8 * 8 + 2
        );
    }

    /// Every latency from 32 µs to 2^27 µs reads back within 4.5% (the geometric midpoint
    /// of a bucket 2^(1/8) wide is within 2^(1/16) − 1 ≈ 4.43% of anything in it).
    #[test]
    fn bucket_values_are_within_four_and_a_half_percent() {
        let mut x = 32e-6;
        let mut worst: f64 = 0.0;
        while x < 2f64.powi(27) / 1e6 {
            let err = (lat_value(lat_index(x)) / x - 1.0).abs();
            worst = worst.max(err);
            x *= 1.000_7;
        }
        assert!(worst < 0.045, "{worst}");
        assert!(worst > 0.04, "the sweep missed the bucket edges: {worst}");
    }

    /// Totals from a replica of an older build (16 linear sub-buckets per power of two,
    /// sent as `latency`) are moved to this layout; this build sends `latency_g8`.
    #[test]
    fn totals_read_the_older_layout() {
        // Old layout: 300 ms is msb 18, shift 14, sub (300000 >> 14) - 16 = 2.
        let mut old = vec![0u64; 400];
        old[32 + 13 * 16 + 2] = 7;
        old[5] = 1; // 5 µs
        let text = json!({"requests": 8, "errors": 1, "latency": old}).to_string();
        let t: Totals = serde_json::from_str(&text).unwrap();
        assert_eq!((t.requests, t.errors), (8, 1));
        assert_eq!(t.latency.iter().sum::<u64>(), 8);
        assert!(
            (t.quantile(0.99) / 0.3 - 1.0).abs() < 0.08,
            "{}",
            t.quantile(0.99)
        );
        let back: Value = serde_json::to_value(&t).unwrap();
        assert!(back.get("latency").is_none(), "{back}");
        assert_eq!(
            back["latency_g8"].as_array().map(|a| a.len()),
            Some(LAT_BUCKETS)
        );
        let again: Totals = serde_json::from_value(back).unwrap();
        assert_eq!(again, t);
    }

    /// The exact quantile of a sorted sample by the same rank rule (⌈q·n⌉).
    fn exact(sorted: &[f64], q: f64) -> f64 {
        let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
        sorted[rank - 1]
    }

    #[test]
    fn quantiles_are_within_five_percent_on_known_distributions() {
        // A deterministic generator: no dependency, same numbers every run.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut uniform = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let dists: Vec<(&str, Vec<f64>)> = vec![
            // A constant 300 ms: the case that read p50 = p99 = 410 ms before.
            ("constant 300ms", vec![0.3; 1000]),
            // Uniform 1..500 ms.
            (
                "uniform",
                (0..5000).map(|_| 0.001 + 0.499 * uniform()).collect(),
            ),
            // Exponential, mean 20 ms (a long tail).
            (
                "exponential",
                (0..5000)
                    .map(|_| -0.020 * (1.0 - uniform()).ln() + 0.000_05)
                    .collect(),
            ),
            // Log-normal-ish across four decades, 100 µs .. 10 s.
            (
                "log-uniform",
                (0..5000)
                    .map(|_| 10f64.powf(-4.0 + 5.0 * uniform()))
                    .collect(),
            ),
            // Bimodal: 95% at 5 ms, 5% at 2 s.
            (
                "bimodal",
                (0..2000)
                    .map(|i| if i % 20 == 0 { 2.0 } else { 0.005 })
                    .collect(),
            ),
        ];
        let t0 = Instant::now();
        for (name, mut sample) in dists {
            let w = Window::new(t0);
            for &v in &sample {
                w.record(t0, false, v);
            }
            sample.sort_by(|a, b| a.total_cmp(b));
            let st = w.stats(t0, Duration::from_secs(10));
            assert_eq!(st.requests, sample.len() as u64);
            for (q, got) in [(0.5, st.p50), (0.9, st.p90), (0.99, st.p99)] {
                let want = exact(&sample, q);
                let err = (got / want - 1.0).abs();
                assert!(err < 0.05, "{name} p{q}: {got} vs {want} ({err:.4})");
            }
        }
    }

    /// A writer keeps reusing one slot of each ring for newer periods while readers read
    /// them: a reader that sees a period's stamp must see only that period's counts, never
    /// the previous one's. Even seconds record fast successes, odd seconds slow errors, so any count
    /// carried over from the previous second shows as an error or a slow p99.
    #[test]
    fn readers_never_pair_a_new_stamp_with_old_counts() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::{Arc, Barrier};
        const READERS: usize = 2;
        const READS: u64 = 3000;
        // Bounds the writer should the readers stall.
        const MAX_GENERATIONS: u64 = 50_000_000;
        let w = Arc::new(Window::new(Instant::now()));
        // A step of whole turns of both rings: each generation reuses the same fine slot
        // and the same coarse slot.
        let turn = w.coarse.secs * w.coarse.slots.len() as u64;
        assert_eq!(turn % w.fine.slots.len() as u64, 0);
        let ring = Duration::from_secs(turn);
        let generation = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(READERS + 1));
        let writer = {
            let (w, generation, finished, start) = (
                w.clone(),
                generation.clone(),
                finished.clone(),
                start.clone(),
            );
            std::thread::spawn(move || {
                start.wait();
                let mut g = 0;
                while finished.load(Relaxed) < READERS && g < MAX_GENERATIONS {
                    generation.store(g, Relaxed);
                    let now = w.epoch + ring * g as u32;
                    let slow = g % 2 == 1;
                    // Seconds of varied length: some end while a read is under way,
                    // some last long enough for whole reads.
                    for _ in 0..1 + (g * 7919) % 300 {
                        w.record(now, slow, if slow { 1.0 } else { 0.001 });
                    }
                    g += 1;
                }
                g
            })
        };
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let (w, generation, finished, start) = (
                    w.clone(),
                    generation.clone(),
                    finished.clone(),
                    start.clone(),
                );
                std::thread::spawn(move || {
                    start.wait();
                    let (mut checked, mut reads) = (0u64, 0u64);
                    let deadline = Instant::now() + Duration::from_secs(20);
                    // Until it has also checked a filled slot: on a loaded machine the
                    // writer may not have run while a reader made all its reads.
                    while (reads < READS || checked == 0) && Instant::now() < deadline {
                        let g = generation.load(Relaxed);
                        if g % 2 == 1 {
                            std::hint::spin_loop();
                            continue;
                        }
                        reads += 1;
                        let now = w.epoch + ring * g as u32;
                        // The fine ring and the coarse one, in turn.
                        let span = if reads % 2 == 0 { 1 } else { MAX_WINDOW_SECS };
                        let st = w.stats(now, Duration::from_secs(span));
                        if st.requests > 0 {
                            checked += 1;
                            assert_eq!(st.errors, 0, "generation {g}: {st:?}");
                            assert!(st.p99 < 0.01, "generation {g}: {st:?}");
                        }
                    }
                    finished.fetch_add(1, Relaxed);
                    checked
                })
            })
            .collect();
        let checked: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        let generations = writer.join().unwrap();
        assert!(generations > 100, "the writer barely ran: {generations}");
        assert!(checked > 0, "no reader ever saw a filled slot");
    }
}
