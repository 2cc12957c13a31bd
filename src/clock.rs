//! Time as the control plane sees it: one [`Clock`] handed to whatever decides by time (the
//! rollout control, the analysis loop, the fleet), so that tests can run a rollout whose
//! steps hold for an hour in milliseconds ([`ManualClock`]). The real clock is
//! [`SystemClock`]; `clippy.toml` keeps `Instant::now` and `SystemTime::now` out of the
//! library, but for the request path, which records with the machine's clock where it
//! says so (the control plane judges at this clock's readings: in production, the same).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of the current time: monotonic for spans, wall-clock for what is persisted or
/// shared between replicas.
pub trait Clock: Send + Sync {
    /// Monotonic now.
    fn now(&self) -> Instant;
    /// Wall-clock now.
    fn system_time(&self) -> SystemTime;
    /// Wall-clock now in milliseconds since the Unix epoch (phases, fleet records).
    fn now_ms(&self) -> u64 {
        self.system_time()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// The machine's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // The one place the real clock is read.
    fn now(&self) -> Instant {
        Instant::now()
    }

    #[allow(clippy::disallowed_methods)] // The one place the real clock is read.
    fn system_time(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to ([`ManualClock::advance`]): both readings start at
/// the real time of its creation and move together.
#[derive(Debug)]
pub struct ManualClock {
    start: (Instant, SystemTime),
    elapsed: Mutex<Duration>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    pub fn new() -> Self {
        ManualClock {
            start: (SystemClock.now(), SystemClock.system_time()),
            elapsed: Mutex::new(Duration::ZERO),
        }
    }

    /// A clock whose wall-clock reading starts at `wall` (the monotonic one at the real
    /// now): a run that depends only on the readings repeats exactly (the fleet
    /// simulation replays a seed).
    pub fn starting_at(wall: SystemTime) -> Self {
        ManualClock {
            start: (SystemClock.now(), wall),
            elapsed: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves both readings forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.elapsed.lock().unwrap_or_else(|p| p.into_inner()) += by;
    }

    fn elapsed(&self) -> Duration {
        *self.elapsed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start.0 + self.elapsed()
    }

    fn system_time(&self) -> SystemTime {
        self.start.1 + self.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let c = ManualClock::new();
        let (t0, w0) = (c.now(), c.now_ms());
        assert_eq!(c.now(), t0);
        c.advance(Duration::from_secs(3600));
        assert_eq!(c.now() - t0, Duration::from_secs(3600));
        assert_eq!(c.now_ms() - w0, 3_600_000);
    }
}
