//! `kanaria demo`: a whole canary story in one process, for a newcomer's first minute.
//!
//! It starts two built-in demo apps (stable `v1`, canary `v2`) on loopback ports the OS
//! picks, the proxy with `config/demo.toml` (its endpoints replaced by the apps' ports), and
//! a load generator of simulated students with user ids. The scripted story: the rollout
//! steps up, then the canary starts failing, then Kanaria rolls back on its own. A live
//! display shows step, weights, request rates, error rates and p99 per version; a summary
//! ends the story. The dashboard stays up until Ctrl-C, or the process exits
//! (`--exit-after-scenario`) with 0 only if the story ended in a rollback.

// The demo is a story told in real time (its pacing, its display, the time to rollback it
// reports): the machine's clock is the one it means.
#![allow(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_trait::async_trait;
use http::{Response, StatusCode};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::clock::{Clock, SystemClock};
use crate::control::Control;
use crate::rollout::phase::Phase;
use crate::split::{buckets_to_percent, Track};

/// How long the story may take before it is declared failed.
const STORY_LIMIT: Duration = Duration::from_secs(120);
/// Simulated users.
const USERS: u64 = 5_000;
/// Load generator: workers × rate each ≈ 300 requests per second.
const WORKERS: u64 = 6;
const RATE_PER_WORKER: f64 = 50.0;
/// After the dashboard phase starts, the load keeps running at most this long.
const DASHBOARD_LOAD_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Options of `kanaria demo`.
pub struct DemoOptions {
    pub config: PathBuf,
    pub listen: Option<String>,
    pub admin: Option<String>,
    pub exit_after_scenario: bool,
}

/// One built-in demo app.
struct DemoApp {
    version: &'static str,
    failing: Arc<AtomicBool>,
    delay: Duration,
    requests: Arc<AtomicU64>,
    last_request_ms: Arc<AtomicU64>,
}

fn text(status: StatusCode, body: String) -> Response<Vec<u8>> {
    crate::admin::text(status, "text/plain; charset=utf-8", body)
}

#[async_trait]
impl ServeHttp for DemoApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        if path == "/healthz" {
            // The broken canary still passes its health check: only real traffic shows
            // the failure, which is what the analysis is for.
            return text(StatusCode::OK, "ok\n".into());
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.last_request_ms
            .store(SystemClock.now_ms(), Ordering::Relaxed);
        tokio::time::sleep(self.delay).await;
        if self.failing.load(Ordering::Relaxed) {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{} is broken\n", self.version),
            );
        }
        text(
            StatusCode::OK,
            format!("hello from the {} app: {path}\n", self.version),
        )
    }
}

/// The canary app's handles the story uses.
#[derive(Clone)]
struct AppHandle {
    failing: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    last_request_ms: Arc<AtomicU64>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The demo config with the apps' endpoints and optional listen overrides, as TOML text.
fn effective_config(
    src: &str,
    path: &Path,
    stable: u16,
    canary: u16,
    opts: &DemoOptions,
) -> anyhow::Result<String> {
    // Report a broken demo config exactly as `kanaria check` would.
    crate::config::load_str(src, &path.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut doc: toml::Table = toml::from_str(src).context("parsing the demo config")?;
    let table = |doc: &mut toml::Table, key: &str| -> anyhow::Result<toml::Table> {
        Ok(doc
            .get(key)
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_default())
    };
    if let Some(l) = &opts.listen {
        let mut proxy = table(&mut doc, "proxy")?;
        proxy.insert("listen".into(), toml::Value::String(l.clone()));
        doc.insert("proxy".into(), toml::Value::Table(proxy));
    }
    if let Some(a) = &opts.admin {
        let mut admin = table(&mut doc, "admin")?;
        admin.insert("listen".into(), toml::Value::String(a.clone()));
        doc.insert("admin".into(), toml::Value::Table(admin));
    }
    let Some(route) = doc
        .get_mut("routes")
        .and_then(|r| r.as_array_mut())
        .and_then(|r| r.first_mut())
        .and_then(|r| r.as_table_mut())
    else {
        bail!("{}: the demo needs one [[routes]]", path.display());
    };
    for (pool, port) in [("stable", stable), ("canary", canary)] {
        let Some(p) = route.get_mut(pool).and_then(|p| p.as_table_mut()) else {
            bail!("{}: the demo route needs [routes.{pool}]", path.display());
        };
        p.insert(
            "endpoints".into(),
            toml::Value::Array(vec![toml::Value::String(format!("127.0.0.1:{port}"))]),
        );
    }
    Ok(toml::to_string(&doc)?)
}

/// Runs the demo until Ctrl-C (or the end of the story with `exit_after_scenario`).
pub fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let src = std::fs::read_to_string(&opts.config)
        .with_context(|| format!("reading {}", opts.config.display()))?;
    let (stable_port, canary_port) = (free_port()?, free_port()?);
    let text = effective_config(&src, &opts.config, stable_port, canary_port, &opts)?;
    let dir = std::env::temp_dir().join(format!("kanaria-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("kanaria-demo.toml");
    std::fs::write(&path, text)?;

    let mut built = crate::server::build(&path, false)?;
    let snap = built.shared.snapshot();
    let Some(route) = snap.routes.first() else {
        bail!("the demo config has no route");
    };
    let proxy_addr = snap.config.restart.listen[0];
    let admin_addr = snap.config.restart.admin_listen;

    let mut canary = None;
    for (version, port, delay, pool) in [
        (
            "v1",
            stable_port,
            Duration::from_millis(2),
            &route.stable.version,
        ),
        (
            "v2",
            canary_port,
            Duration::from_millis(3),
            &route
                .canary
                .as_ref()
                .map(|c| c.version.clone())
                .unwrap_or_default(),
        ),
    ] {
        let handle = AppHandle {
            failing: Arc::new(AtomicBool::new(false)),
            requests: Arc::new(AtomicU64::new(0)),
            last_request_ms: Arc::new(AtomicU64::new(0)),
        };
        let app = DemoApp {
            version,
            failing: handle.failing.clone(),
            delay,
            requests: handle.requests.clone(),
            last_request_ms: handle.last_request_ms.clone(),
        };
        let mut svc = Service::new(format!("demo app {version} ({pool})"), app);
        svc.add_tcp(&format!("127.0.0.1:{port}"));
        svc.threads = Some(1);
        built.server.add_service(svc);
        if version == "v2" {
            canary = Some(handle);
        }
    }
    let Some(canary) = canary else {
        bail!("no canary app");
    };
    println!(
        "Kanaria demo\n  proxy      http://{proxy_addr}/\n  dashboard  http://{admin_addr}/\n  stable v1  127.0.0.1:{stable_port}\n  canary v2  127.0.0.1:{canary_port}\n  config     {} (from {})\n",
        path.display(),
        opts.config.display()
    );
    let story = Story {
        shared: built.shared.clone(),
        route: route.name.clone(),
        proxy_url: format!("http://{proxy_addr}/lessons"),
        admin_url: format!("http://{admin_addr}/"),
        canary,
        exit_after_scenario: opts.exit_after_scenario,
    };
    built
        .server
        .add_service(background_service("demo story", story));
    built.server.run_forever()
}

/// Counts of what the simulated users saw.
#[derive(Default)]
struct Seen {
    sent: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
}

/// The load generator: simulated students with user ids, paced.
fn start_load(url: String, seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    for w in 0..WORKERS {
        let (url, seen, stop) = (url.clone(), seen.clone(), stop.clone());
        tokio::spawn(async move {
            let client = match reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
            {
                Ok(c) => c,
                Err(e) => {
                    log::error!("demo load: no HTTP client: {e}");
                    return;
                }
            };
            let started = Instant::now();
            let period = Duration::from_secs_f64(1.0 / RATE_PER_WORKER);
            let mut next = tokio::time::Instant::now();
            let mut i = w;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < DASHBOARD_LOAD_LIMIT {
                // A different student each time, the same students again and again.
                let user = format!("student-{}", (i * 7_919) % USERS);
                i += WORKERS;
                seen.sent.fetch_add(1, Ordering::Relaxed);
                match client.get(&url).header("x-user-id", user).send().await {
                    Ok(r) if r.status().is_success() => seen.ok.fetch_add(1, Ordering::Relaxed),
                    _ => seen.errors.fetch_add(1, Ordering::Relaxed),
                };
                next += period;
                tokio::time::sleep_until(next).await;
            }
        });
    }
}

/// The scripted story.
struct Story {
    shared: Arc<Control>,
    route: String,
    proxy_url: String,
    admin_url: String,
    canary: AppHandle,
    exit_after_scenario: bool,
}

/// Live lines on the terminal (hidden when stderr is not one).
struct Display {
    _multi: MultiProgress,
    lines: Vec<ProgressBar>,
}

impl Display {
    fn new() -> Display {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        let style = ProgressStyle::with_template("{msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let lines = (0..4)
            .map(|_| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar
            })
            .collect();
        Display {
            _multi: multi,
            lines,
        }
    }

    fn show(&self, texts: [String; 4]) {
        for (bar, t) in self.lines.iter().zip(texts) {
            bar.set_message(t);
        }
    }

    fn clear(&self) {
        for bar in &self.lines {
            bar.finish_and_clear();
        }
    }
}

/// Prints a story line above the live display.
fn say(display: &Display, line: String) {
    if std::io::stderr().is_terminal() {
        display._multi.suspend(|| println!("{line}"));
    } else {
        println!("{line}");
    }
}

impl Story {
    async fn wait_for_proxy(&self) -> bool {
        let client = reqwest::Client::builder().no_proxy().build();
        let Ok(client) = client else { return false };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if client.get(&self.proxy_url).send().await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// The share (percent) of a shadow step of the route's rollout; `None` for a weighted
    /// step.
    fn shadow_step(&self, step: usize) -> Option<f64> {
        let live = self.shared.live.load();
        let r = live.snapshot.routes.iter().find(|r| r.name == self.route)?;
        let st = r.steps.get(step)?;
        (st.shadow > 0).then(|| buckets_to_percent(st.shadow))
    }

    /// One frame of the live display; returns (phase, canary weight %).
    fn frame(
        &self,
        display: &Display,
        rates: &mut VecDeque<(Instant, u64, u64)>,
        seen: &Seen,
    ) -> (Option<Phase>, f64) {
        // The control state first: a phase change is published under the same lock, so the
        // snapshot loaded after it is at least as new (the line never pairs a new step with
        // the old weight).
        let control = self.shared.route_control(&self.route);
        let live = self.shared.live.load();
        let Some((i, r)) = live
            .snapshot
            .routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.name == self.route)
        else {
            return (None, 0.0);
        };
        let weight = buckets_to_percent(r.split.canary_buckets);
        let phase = control.map(|c| c.phase);
        let now = Instant::now();
        let Some(m) = live.route_metrics.get(i) else {
            return (phase, weight);
        };
        let (s_total, _) = m.version(Track::Stable).totals();
        let (c_total, _) = m.version(Track::Canary).totals();
        rates.push_back((now, s_total, c_total));
        while rates.len() > 1
            && rates
                .front()
                .is_some_and(|(t, _, _)| now.duration_since(*t) > Duration::from_secs(2))
        {
            rates.pop_front();
        }
        let rps = |pick: fn(&(Instant, u64, u64)) -> u64| match (rates.front(), rates.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                (pick(b) - pick(a)) as f64 / b.0.duration_since(a.0).as_secs_f64()
            }
            _ => 0.0,
        };
        let recent = Duration::from_secs(3);
        let line = |name: &str, label: &str, v: Track, rps: f64| {
            let st = m.version(v).window.stats(now, recent);
            format!(
                "  {name:<7} {label:<4} {rps:>6.0} req/s   errors {:>6.2}%   p99 {:>7.1} ms",
                st.error_rate() * 100.0,
                st.p99 * 1000.0
            )
        };
        let step = match (&phase, r.steps.len()) {
            (Some(p), n) if n > 0 => p
                .step()
                .map_or(String::new(), |s| format!("  step {}/{n}", s + 1)),
            _ => String::new(),
        };
        display.show([
            format!(
                "route {}: {}{step}   canary weight {weight:.0}%",
                r.name,
                phase.as_ref().map_or("?", |p| p.name())
            ),
            line("stable", &r.stable.version, Track::Stable, rps(|x| x.1)),
            line(
                "canary",
                r.canary.as_ref().map_or("-", |c| c.version.as_str()),
                Track::Canary,
                rps(|x| x.2),
            ),
            format!(
                "  users: {} requests, {} errors seen, {} canary failures retried on stable",
                seen.sent.load(Ordering::Relaxed),
                seen.errors.load(Ordering::Relaxed),
                m.retried_on_stable.get()
            ),
        ]);
        (phase, weight)
    }

    /// Plays the story; returns whether it ended in a rollback.
    async fn play(&self, seen: Arc<Seen>) -> bool {
        let display = Display::new();
        let mut rates = VecDeque::new();
        let start = Instant::now();
        let mut failed_at: Option<(Instant, u64)> = None;
        let mut rolled_back_at: Option<Instant> = None;
        let mut last_phase = String::new();
        let mut step_since = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let (phase, weight) = self.frame(&display, &mut rates, &seen);
            let name = phase.as_ref().map_or("?".to_string(), |p| match p.step() {
                Some(s) => match self.shadow_step(s) {
                    Some(share) => format!(
                        "{} step {} (shadow: {share:.0}% of users mirrored to v2, none sent)",
                        p.name(),
                        s + 1
                    ),
                    None => format!("{} step {}", p.name(), s + 1),
                },
                None => p.name().to_string(),
            });
            if name != last_phase {
                say(
                    &display,
                    format!(
                        "[{:>5.1}s] {name}: canary weight {weight:.0}%",
                        start.elapsed().as_secs_f64()
                    ),
                );
                last_phase = name;
                step_since = Instant::now();
            }
            let at_half = matches!(phase, Some(Phase::Progressing { .. })) && weight >= 50.0;
            if failed_at.is_none()
                && ((at_half && step_since.elapsed() >= Duration::from_secs(2))
                    || start.elapsed() > Duration::from_secs(40))
            {
                self.canary.failing.store(true, Ordering::Relaxed);
                failed_at = Some((Instant::now(), SystemClock.now_ms()));
                say(
                    &display,
                    format!(
                        "[{:>5.1}s] the canary starts failing: every request to v2 answers 500",
                        start.elapsed().as_secs_f64()
                    ),
                );
            }
            if failed_at.is_some()
                && rolled_back_at.is_none()
                && matches!(phase, Some(Phase::RolledBack { .. }))
            {
                rolled_back_at = Some(Instant::now());
            }
            if let Some(t) = rolled_back_at {
                if t.elapsed() >= Duration::from_secs(3) {
                    break;
                }
            }
            if start.elapsed() > STORY_LIMIT {
                break;
            }
        }
        display.clear();
        self.summary(&seen, failed_at, rolled_back_at.is_some())
    }

    fn summary(&self, seen: &Seen, failed_at: Option<(Instant, u64)>, rolled_back: bool) -> bool {
        let rollback = self
            .shared
            .events()
            .into_iter()
            .rev()
            .find(|e| e.route == self.route && e.kind == "rollback");
        let live = self.shared.live.load();
        let retries = live
            .snapshot
            .routes
            .iter()
            .position(|r| r.name == self.route)
            .and_then(|i| live.route_metrics.get(i))
            .map_or(0, |m| m.retried_on_stable.get());
        println!("\nDemo summary");
        println!(
            "  requests sent                {}",
            seen.sent.load(Ordering::Relaxed)
        );
        println!(
            "  errors users saw             {}",
            seen.errors.load(Ordering::Relaxed)
        );
        println!("  canary failures retried      {retries}");
        match (failed_at, rollback, rolled_back) {
            (Some((_, fail_ms)), Some(rb), true) => {
                let last = self.canary.last_request_ms.load(Ordering::Relaxed);
                println!(
                    "  failure to rollback          {} ms (reason {})",
                    rb.at_ms.saturating_sub(fail_ms),
                    rb.reason
                );
                println!(
                    "  canary's last request       +{} ms after the failure began",
                    last.saturating_sub(fail_ms)
                );
                println!(
                    "  canary requests in total     {}",
                    self.canary.requests.load(Ordering::Relaxed)
                );
                println!("\nThe canary failed and Kanaria rolled every user back to stable.");
                true
            }
            _ => {
                println!(
                    "\nThe story did not end in a rollback within {}s.",
                    STORY_LIMIT.as_secs()
                );
                false
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Story {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if !self.wait_for_proxy().await {
            eprintln!("demo: the proxy did not come up");
            std::process::exit(1);
        }
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        start_load(self.proxy_url.clone(), seen.clone(), stop.clone());
        let ok = tokio::select! {
            ok = self.play(seen) => ok,
            _ = shutdown.changed() => { stop.store(true, Ordering::Relaxed); return; }
        };
        if self.exit_after_scenario {
            stop.store(true, Ordering::Relaxed);
            // The story is the whole job here: its outcome is the exit code.
            std::process::exit(if ok { 0 } else { 1 });
        }
        println!(
            "\nThe dashboard stays up at {} (simulated users keep coming). Ctrl-C stops the demo.",
            self.admin_url
        );
        let _ = shutdown.changed().await;
        stop.store(true, Ordering::Relaxed);
    }
}
