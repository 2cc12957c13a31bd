//! The dark launch's data plane (`[routes.shadow]`): a mirrored request's copy of the
//! client's request and of stable's answer, taken on the request path ([`Capture`]), and
//! the [`Mirror`] that, once the user's answer went out, sends the copy to the shadow
//! (`amplify` times), sometimes to stable again (to learn noise), and compares the answers.
//!
//! Off the request path: the user's answer never waits for the shadow and never changes
//! because of it. A route's copies wait in a bounded queue (`queue`) for one of
//! `max_in_flight` slots; past it they are dropped and counted, so a slow or dead shadow
//! only drops copies. What each route's shadow saw is in [`ShadowStats`], read by status
//! and metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, Method};
use tokio::sync::Semaphore;

use crate::config::ShadowSettings;
use crate::metrics::RouteMetrics;
use crate::runtime::Route;
use crate::split::{Track, BUCKETS};
use crate::stats::diff::{differences, path_template, Answer};
use crate::stats::shadow::{Dropped, ShadowStats, Shadows};

/// Noise probes every path template gets before the share applies: the first answers of
/// a kind of request are always compared with stable's own second answer.
const FIRST_PROBES: u64 = 3;

/// Request headers not copied: hop-by-hop, and what the copy sets itself.
const NOT_COPIED: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
];

/// One mirrored request, as the request path keeps it until the user's answer is done.
pub struct Capture {
    method: Method,
    /// Path and query, as the client sent them.
    path: String,
    host: Option<String>,
    headers: HeaderMap,
    body: Vec<u8>,
    request_id: String,
    /// Stable's answer, as far as kept.
    answer: Answer,
    limit: usize,
    /// The answer headers compared (the route's `compare_headers`).
    compare: Vec<HeaderName>,
    /// Set when the request's body went past the limit: not mirrored.
    too_large: bool,
}

impl Capture {
    /// A copy of the request head (its body follows in [`Self::request_body`]).
    pub fn new(
        req: &pingora::http::RequestHeader,
        request_id: String,
        settings: &ShadowSettings,
    ) -> Capture {
        let mut headers = HeaderMap::with_capacity(req.headers.len());
        for (k, v) in req.headers.iter() {
            if !NOT_COPIED.contains(&k.as_str()) {
                headers.append(k.clone(), v.clone());
            }
        }
        Capture {
            method: req.method.clone(),
            path: req
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            host: req
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .or_else(|| req.uri.host())
                .map(str::to_string),
            headers,
            body: Vec::new(),
            request_id,
            answer: Answer::default(),
            limit: settings.body_limit,
            compare: settings.compare_headers.clone(),
            too_large: false,
        }
    }

    pub fn request_body(&mut self, chunk: &[u8]) {
        if self.too_large || self.body.len() + chunk.len() > self.limit {
            self.too_large = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(chunk);
    }

    /// Stable's answer head: its status and the compared headers.
    pub fn answer_head(&mut self, status: u16, headers: &HeaderMap) {
        self.answer.status = status;
        self.answer.body.clear();
        self.answer.truncated = false;
        self.answer.headers = compared_headers(&self.compare, headers);
    }

    pub fn answer_body(&mut self, chunk: &[u8]) {
        self.answer.keep(chunk, self.limit);
    }
}

/// The compared headers of an answer, by name in the route's order (`None`: absent or not
/// text).
fn compared_headers(names: &[HeaderName], headers: &HeaderMap) -> Vec<(String, Option<String>)> {
    names
        .iter()
        .map(|h| {
            let v = headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            (h.as_str().to_string(), v)
        })
        .collect()
}

/// A route's queue and slots.
struct Lane {
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    queue: usize,
    /// Copies waiting for a slot.
    waiting: AtomicUsize,
}

/// Sends the copies of every route; one per process.
pub struct Mirror {
    lanes: ArcSwap<HashMap<String, Arc<Lane>>>,
    /// Held only to add a lane (the first copy of a route, or after its limits changed).
    adding: Mutex<()>,
    http1: reqwest::Client,
    h2c: reqwest::Client,
    shadows: Arc<Shadows>,
    next: AtomicUsize,
    /// The thread the copies are sent, read and compared on, started with the first copy:
    /// none of that work runs on the proxy's threads, so a busy shadow does not take their
    /// CPU from the users' requests (at most this one thread's).
    runtime: std::sync::OnceLock<Option<tokio::runtime::Handle>>,
}

/// Starts the shadow's thread and its runtime; `None` when the system refuses a thread or
/// the runtime cannot be built (logged: the copies then run on the proxy's runtime).
fn shadow_runtime() -> Option<tokio::runtime::Handle> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let started = std::thread::Builder::new()
        .name("kanaria-shadow".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match rt {
                Ok(rt) => {
                    let _ = tx.send(Some(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    log::error!("shadow: no runtime for the copies ({e}); they run on the proxy's");
                    let _ = tx.send(None);
                }
            }
        });
    match started {
        Ok(_) => rx.recv().ok().flatten(),
        Err(e) => {
            log::error!("shadow: no thread for the copies ({e}); they run on the proxy's");
            None
        }
    }
}

fn client(h2c: bool) -> reqwest::Client {
    let b = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(30));
    let b = if h2c { b.http2_prior_knowledge() } else { b };
    // The builder fails only for settings not used here (TLS backends, proxies).
    b.build().unwrap_or_else(|_| reqwest::Client::new())
}

impl Mirror {
    pub fn new(shadows: Arc<Shadows>) -> Mirror {
        Mirror {
            lanes: ArcSwap::from_pointee(HashMap::new()),
            adding: Mutex::new(()),
            http1: client(false),
            h2c: client(true),
            shadows,
            next: AtomicUsize::new(0),
            runtime: std::sync::OnceLock::new(),
        }
    }

    fn lane(&self, route: &str, s: &ShadowSettings) -> Arc<Lane> {
        let same = |l: &Lane| l.max_in_flight == s.max_in_flight && l.queue == s.queue;
        if let Some(l) = self.lanes.load().get(route) {
            if same(l) {
                return l.clone();
            }
        }
        let _adding = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let lanes = self.lanes.load_full();
        if let Some(l) = lanes.get(route).filter(|l| same(l)) {
            return l.clone();
        }
        let lane = Arc::new(Lane {
            slots: Arc::new(Semaphore::new(s.max_in_flight)),
            max_in_flight: s.max_in_flight,
            queue: s.queue,
            waiting: AtomicUsize::new(0),
        });
        let mut next = (*lanes).clone();
        next.insert(route.to_string(), lane.clone());
        self.lanes.store(Arc::new(next));
        lane
    }

    /// Takes a mirrored request whose user's answer is done (`stable_seconds`: how long
    /// stable took). Returns at once: the copies go out from a task of their own on the
    /// shadow's thread, or are dropped when the route's queue is full.
    pub fn offer(
        self: &Arc<Self>,
        route: Arc<Route>,
        metrics: Option<Arc<RouteMetrics>>,
        capture: Capture,
        stable_seconds: f64,
    ) {
        let Some(settings) = route.shadow.as_ref() else {
            return;
        };
        let stats = self.shadows.route(&route.name);
        stats
            .mirrored
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if capture.too_large {
            stats.dropped(Dropped::Body);
            return;
        }
        let lane = self.lane(&route.name, settings);
        if lane.waiting.fetch_add(1, Ordering::AcqRel) >= lane.queue {
            lane.waiting.fetch_sub(1, Ordering::AcqRel);
            stats.dropped(Dropped::Queue);
            return;
        }
        let me = self.clone();
        let job = async move {
            let copies = settings_copies(&route);
            let permit = lane.slots.clone().acquire_many_owned(copies).await;
            lane.waiting.fetch_sub(1, Ordering::AcqRel);
            let Ok(_permit) = permit else {
                return;
            };
            me.copies(&route, metrics.as_deref(), &stats, capture, stable_seconds)
                .await;
        };
        match self.runtime.get_or_init(shadow_runtime) {
            Some(rt) => drop(rt.spawn(job)),
            None => drop(tokio::spawn(job)),
        }
    }

    /// The copies of one request, the noise probe, the comparison.
    async fn copies(
        &self,
        route: &Route,
        metrics: Option<&RouteMetrics>,
        stats: &ShadowStats,
        capture: Capture,
        stable_seconds: f64,
    ) {
        let Some(s) = route.shadow.as_ref() else {
            return;
        };
        let sends = (0..s.amplify).map(|_| async {
            let started = Instant::now();
            let answer = match self.shadow_target(route, s) {
                Some((addr, h2c)) => self.send(&addr, h2c, &capture, s).await,
                None => None,
            };
            let error = answer.as_ref().is_none_or(|a| a.status >= 500);
            let seconds = started.elapsed().as_secs_f64();
            stats.answered(error, seconds, stable_seconds);
            // A copy to the canary pool is an outcome of the canary: the analysis judges
            // it, so a canary that fails under the mirrored load is rolled back before any
            // user reaches it.
            if s.endpoints.is_empty() {
                if let Some(m) = metrics {
                    m.version(Track::Canary).observe(error, seconds);
                }
            }
            answer
        });
        let answers = futures::future::join_all(sends).await;
        let template = path_template(&capture.path);
        let probe = stats.probes(&template) < FIRST_PROBES
            || crate::split::bucket(0x5eed, capture.request_id.as_bytes()) < s.noise_buckets;
        if probe {
            if let Some(addr) = route
                .stable
                .select()
                .and_then(|b| b.addr.as_inet().copied())
            {
                let addr = addr.to_string();
                if let Some(again) = self.send(&addr, route.stable.h2c, &capture, s).await {
                    stats.noise(&template, &differences(&capture.answer, &again));
                }
            }
        }
        if let Some(Some(first)) = answers.into_iter().next() {
            stats.compared(
                &template,
                &capture.path,
                &capture.request_id,
                || redacted(&capture.headers),
                &differences(&capture.answer, &first),
            );
        }
    }

    /// Where a copy goes: the shadow's own endpoints round robin (`HOST:PORT` or
    /// `IP:PORT`), else an endpoint of the canary pool in rotation; and whether it is h2c.
    fn shadow_target(&self, route: &Route, s: &ShadowSettings) -> Option<(String, bool)> {
        if !s.endpoints.is_empty() {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % s.endpoints.len();
            return s.endpoints.get(i).map(|e| (e.to_string(), s.h2c));
        }
        let canary = route.canary.as_ref()?;
        let addr = canary.select()?.addr.as_inet().copied()?;
        Some((addr.to_string(), canary.h2c))
    }

    /// One copy of the request to `addr`; its answer as kept for comparing (`None`: no
    /// answer in time).
    async fn send(&self, addr: &str, h2c: bool, c: &Capture, s: &ShadowSettings) -> Option<Answer> {
        let client = if h2c { &self.h2c } else { &self.http1 };
        let mut req = client
            .request(c.method.clone(), format!("http://{addr}{}", c.path))
            .headers(c.headers.clone())
            .header(s.marker.clone(), "1")
            .timeout(s.timeout);
        if let Some(host) = &c.host {
            req = req.header(http::header::HOST, host.as_str());
        }
        if !c.body.is_empty() {
            req = req.body(c.body.clone());
        }
        let mut resp = req.send().await.ok()?;
        let mut answer = Answer {
            status: resp.status().as_u16(),
            headers: compared_headers(&s.compare_headers, resp.headers()),
            body: Vec::new(),
            truncated: false,
        };
        while !answer.truncated {
            let Ok(Some(chunk)) = resp.chunk().await else {
                break;
            };
            answer.keep(&chunk, s.body_limit);
        }
        Some(answer)
    }
}

/// Request headers whose values are secrets: kept in an example by name only.
const SECRET_HEADERS: [&str; 5] = [
    "authorization",
    "cookie",
    "proxy-authorization",
    "x-api-key",
    "x-auth-token",
];

/// A request's headers for a kept example: each value cut to 80 bytes, secrets (the
/// headers above, and any whose name says token, secret, password or key) as `[redacted]`.
pub fn redacted(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            let name = k.as_str();
            let secret = SECRET_HEADERS.contains(&name)
                || ["token", "secret", "password", "key"]
                    .iter()
                    .any(|w| name.contains(w));
            let value = if secret {
                "[redacted]".to_string()
            } else {
                let v = String::from_utf8_lossy(v.as_bytes());
                v.chars().take(80).collect()
            };
            (name.to_string(), value)
        })
        .collect()
}

/// Slots one request's copies take at once (at most the lane's).
fn settings_copies(route: &Route) -> u32 {
    route
        .shadow
        .as_ref()
        .map_or(1, |s| s.amplify.min(s.max_in_flight as u32).max(1))
}

/// Whether this request of a route with a shadow is mirrored: a request the split sent to
/// stable (not by an override), of a listed method, from a user within the share. The
/// share is of the user's bucket permuted (a multiplication by a number prime to
/// `BUCKETS`), so it does not fall on the canary's users first: 20 % mirrors a fifth of
/// stable's users whatever the canary's weight.
pub fn chosen(s: &ShadowSettings, method: &Method, user_bucket: Option<u32>) -> bool {
    s.share_buckets > 0
        && s.methods.contains(method)
        && user_bucket.is_some_and(|b| {
            let permuted = (u64::from(b) * 7919 % u64::from(BUCKETS)) as u32;
            permuted < s.share_buckets
        })
}
