//! What the shadow (dark launch) of each route saw: mirrored copies sent and dropped, the
//! shadow's errors and latency beside stable's for the same requests, and the answers'
//! differences by path template and field, with noise (a field that differs between two of
//! stable's own answers to one request) told apart and a few examples kept.
//!
//! Written off the request path (by the mirroring workers) and read by status and metrics;
//! counters are atomics, the tables sit behind one lock that nothing holds across I/O.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::diff::Difference;
use super::window::Totals;

/// Examples kept per (path template, field).
pub const EXAMPLES: usize = 3;
/// Distinct (path template, field) entries kept per route; past it new ones count under
/// the field `(other)` (bounds memory and the metric's labels).
pub const MAX_ENTRIES: usize = 200;

/// Why a mirrored copy was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The route's queue was full.
    Queue,
    /// The request's body went past `compare_body_limit` (it could not be replayed whole).
    Body,
}

impl Dropped {
    pub const ALL: [Dropped; 2] = [Dropped::Queue, Dropped::Body];

    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Queue => "queue_full",
            Dropped::Body => "body_too_large",
        }
    }
}

/// One kept example of a difference.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub request_id: String,
    pub path: String,
    pub stable: String,
    pub shadow: String,
    /// The request's headers, secrets redacted (see `proxy::shadow::redacted`).
    pub headers: Vec<(String, String)>,
}

/// A (path template, field) and what was seen of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Entry {
    /// Mirrored requests whose shadow answer differed from stable's in this field.
    pub differences: u64,
    /// Times stable differed from itself in this field: noise, not reported as a difference.
    pub noise: u64,
    pub examples: Vec<Example>,
}

#[derive(Default)]
struct Tables {
    /// By (path template, field).
    entries: BTreeMap<(String, String), Entry>,
    /// Noise probes made per path template (stable asked twice).
    probes: HashMap<String, u64>,
    shadow_latency: Totals,
    stable_latency: Totals,
}

/// One route's shadow.
#[derive(Default)]
pub struct ShadowStats {
    /// Requests chosen for mirroring (each sent `amplify` times).
    pub mirrored: AtomicU64,
    /// Copies sent to the shadow.
    pub sent: AtomicU64,
    /// Copies that failed at the shadow: no answer, or a 5xx.
    pub errors: AtomicU64,
    pub dropped_queue: AtomicU64,
    pub dropped_body: AtomicU64,
    /// Mirrored requests whose shadow answer was compared with stable's.
    pub compared: AtomicU64,
    /// ... of which differed in at least one field that is not noise.
    pub differing: AtomicU64,
    tables: Mutex<Tables>,
}

/// A copy of the tables for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub entries: Vec<(String, String, Entry)>,
    pub shadow_p99: f64,
    pub stable_p99: f64,
    pub shadow_requests: u64,
}

impl ShadowStats {
    pub fn dropped(&self, why: Dropped) {
        match why {
            Dropped::Queue => &self.dropped_queue,
            Dropped::Body => &self.dropped_body,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped_count(&self, why: Dropped) -> u64 {
        match why {
            Dropped::Queue => &self.dropped_queue,
            Dropped::Body => &self.dropped_body,
        }
        .load(Ordering::Relaxed)
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One copy's outcome at the shadow, beside stable's latency for the same request.
    pub fn answered(&self, error: bool, shadow_seconds: f64, stable_seconds: f64) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let mut t = self.tables();
        t.shadow_latency.add(1, shadow_seconds);
        t.stable_latency.add(1, stable_seconds);
    }

    /// Noise probes made so far for `template`.
    pub fn probes(&self, template: &str) -> u64 {
        self.tables().probes.get(template).copied().unwrap_or(0)
    }

    /// Stable against itself for one request of `template`: each differing field is noise.
    pub fn noise(&self, template: &str, fields: &[Difference]) {
        let mut t = self.tables();
        *t.probes.entry(template.to_string()).or_default() += 1;
        for d in fields {
            if let Some(e) = entry(&mut t, template, &d.field) {
                e.noise += 1;
            }
        }
    }

    /// Stable against the shadow for one request: counts the fields that are not noise;
    /// returns whether any was.
    pub fn compared(
        &self,
        template: &str,
        path: &str,
        request_id: &str,
        headers: impl Fn() -> Vec<(String, String)>,
        fields: &[Difference],
    ) -> bool {
        self.compared.fetch_add(1, Ordering::Relaxed);
        let mut t = self.tables();
        let mut real = false;
        for d in fields {
            let Some(e) = entry(&mut t, template, &d.field) else {
                continue;
            };
            if e.noise > 0 {
                continue;
            }
            real = true;
            e.differences += 1;
            if e.examples.len() < EXAMPLES {
                e.examples.push(Example {
                    request_id: request_id.to_string(),
                    path: path.to_string(),
                    stable: d.left.clone(),
                    shadow: d.right.clone(),
                    headers: headers(),
                });
            }
        }
        drop(t);
        if real {
            self.differing.fetch_add(1, Ordering::Relaxed);
        }
        real
    }

    /// Share of compared requests with a real difference (0 without any compared).
    pub fn diff_rate(&self) -> f64 {
        let n = self.compared.load(Ordering::Relaxed);
        if n == 0 {
            return 0.0;
        }
        self.differing.load(Ordering::Relaxed) as f64 / n as f64
    }

    pub fn report(&self) -> Report {
        let t = self.tables();
        Report {
            entries: t
                .entries
                .iter()
                .map(|((p, f), e)| (p.clone(), f.clone(), e.clone()))
                .collect(),
            shadow_p99: t.shadow_latency.quantile(0.99),
            stable_p99: t.stable_latency.quantile(0.99),
            shadow_requests: t.shadow_latency.requests,
        }
    }
}

/// The entry of (template, field), made if there is room; past [`MAX_ENTRIES`], the
/// template's `(other)` entry.
fn entry<'a>(t: &'a mut Tables, template: &str, field: &str) -> Option<&'a mut Entry> {
    let key = (template.to_string(), field.to_string());
    if !t.entries.contains_key(&key) && t.entries.len() >= MAX_ENTRIES {
        let other = (template.to_string(), "(other)".to_string());
        return Some(t.entries.entry(other).or_default());
    }
    Some(t.entries.entry(key).or_default())
}

/// Every route's shadow, by route name: made when a route with a shadow is first served,
/// forgotten when the route goes.
#[derive(Default)]
pub struct Shadows {
    routes: Mutex<HashMap<String, Arc<ShadowStats>>>,
}

impl Shadows {
    pub fn route(&self, name: &str) -> Arc<ShadowStats> {
        let mut m = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(name.to_string()).or_default().clone()
    }

    pub fn get(&self, name: &str) -> Option<Arc<ShadowStats>> {
        let m = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        m.get(name).cloned()
    }

    /// Every route's, sorted by name.
    pub fn all(&self) -> Vec<(String, Arc<ShadowStats>)> {
        let m = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut m = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(field: &str) -> Difference {
        Difference {
            field: field.into(),
            left: "1".into(),
            right: "2".into(),
        }
    }

    #[test]
    fn noise_is_not_a_difference_and_examples_are_bounded() {
        let s = ShadowStats::default();
        s.noise("/items/{id}", &[d("$.ts")]);
        for i in 0..5 {
            let real = s.compared(
                "/items/{id}",
                "/items/1",
                &format!("r{i}"),
                Vec::new,
                &[d("$.ts"), d("$.price")],
            );
            assert!(real);
        }
        assert!(!s.compared("/items/{id}", "/items/1", "r9", Vec::new, &[d("$.ts")]));
        let r = s.report();
        let price = r.entries.iter().find(|e| e.1 == "$.price").unwrap();
        assert_eq!(price.2.differences, 5);
        assert_eq!(price.2.examples.len(), EXAMPLES);
        let ts = r.entries.iter().find(|e| e.1 == "$.ts").unwrap();
        assert_eq!((ts.2.differences, ts.2.noise), (0, 1));
        assert_eq!(s.compared.load(Ordering::Relaxed), 6);
        assert!((s.diff_rate() - 5.0 / 6.0).abs() < 1e-9);
    }

    #[test]
    fn entries_are_bounded() {
        let s = ShadowStats::default();
        for i in 0..(MAX_ENTRIES + 50) {
            s.compared("/t", "/t", "r", Vec::new, &[d(&format!("$.f{i}"))]);
        }
        let r = s.report();
        assert!(r.entries.len() <= MAX_ENTRIES + 1);
        assert!(r.entries.iter().any(|e| e.1 == "(other)"));
    }
}
