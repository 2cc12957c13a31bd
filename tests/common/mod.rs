//! Test harness: real HTTP upstreams on OS-picked loopback ports, the real `kanaria` binary
//! as a child process ([`Proxy::builder`]), and a real HTTP client. Readiness is polled
//! ([`eventually`]), never slept for; the ports children listen on are read back or held
//! for them ([`ports`]), never freed for them to bind.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub mod certs;
pub mod dns;
pub mod grpc;
pub mod h2load;
pub mod ports;
pub mod raw;
pub mod relay;
pub mod sentinel;

use ports::ReservedPort;

/// What an upstream does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// 200 with a JSON echo of the request.
    Ok = 0,
    /// Answer with the status in `Upstream::status`.
    Status = 1,
    /// Never answer (until the test ends).
    Hang = 2,
    /// Answer 200 after `Upstream::set_delay`.
    Slow = 3,
    /// Drop the connection without an answer.
    Reset = 4,
}

/// A real HTTP/1.1 server on 127.0.0.1:0 that says who it is and echoes what it received.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    mode: Arc<AtomicU8>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    pub requests: Arc<AtomicU64>,
    pub connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind upstream")
    }

    /// [`Self::start`] on a given address (e.g. `127.0.0.2:PORT`: every 127.0.0.0/8 address
    /// is loopback on Linux); `Err` when it cannot be bound.
    pub async fn start_on(name: &str, addr: SocketAddr) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr().expect("upstream addr");
        let mode = Arc::new(AtomicU8::new(Mode::Ok as u8));
        let status = Arc::new(AtomicU16::new(200));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (m, s, r, c, n, d) = (
            mode.clone(),
            status.clone(),
            requests.clone(),
            connections.clone(),
            name.to_string(),
            delay_ms.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (m, s, r, n, d) = (m.clone(), s.clone(), r.clone(), n.clone(), d.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (m, s, r, n, d) =
                            (m.clone(), s.clone(), r.clone(), n.clone(), d.clone());
                        async move {
                            if m.load(Ordering::SeqCst) == Mode::Reset as u8 {
                                r.fetch_add(1, Ordering::SeqCst);
                                return Err("reset");
                            }
                            if m.load(Ordering::SeqCst) == Mode::Slow as u8 {
                                let ms = d.load(Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            Ok::<_, &'static str>(answer(req, &m, &s, &r, &n).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Upstream {
            addr,
            name: name.to_string(),
            mode,
            status,
            delay_ms,
            requests,
            connections,
            task,
        })
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
        self.set_mode(Mode::Slow);
    }

    pub fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
        self.set_mode(Mode::Status);
    }
}

async fn answer(
    req: Request<Incoming>,
    mode: &AtomicU8,
    status: &AtomicU16,
    requests: &AtomicU64,
    name: &str,
) -> Response<Full<Bytes>> {
    requests.fetch_add(1, Ordering::SeqCst);
    match mode.load(Ordering::SeqCst) {
        2 => {
            // Hang well past any timeout a test configures; the task is aborted at the end.
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        1 => {
            let code = status.load(Ordering::SeqCst);
            return Response::builder()
                .status(code)
                .header("x-upstream", name)
                .body(Full::new(Bytes::from(format!("{name} says {code}\n"))))
                .expect("response");
        }
        _ => {}
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                serde_json::Value::String(v.to_str().unwrap_or("").to_string()),
            )
        })
        .collect();
    let body = serde_json::json!({
        "upstream": name,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "headers": headers,
    });
    Response::builder()
        .header("x-upstream", name)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

/// The value of one series in Prometheus text (`name{labels}` as rendered), 0 when absent
/// and -1 when present but not a number (so a malformed line fails the comparison).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .map(|v| v.trim().parse().unwrap_or(-1.0))
        })
        .unwrap_or(0.0)
}

/// Polls `check` every 20 ms until its future gives `Ok`, and returns that value; panics
/// after `timeout` with `what` and the last `Err`, which says what the check saw. The check
/// runs at least once, and once more at the deadline.
///
/// A check is a closure returning a future: `|| std::future::ready(..)` for a check without
/// I/O; `move || async move { .. }` over references, copies and clones for one with I/O.
/// (Not an async closure: the future of a wait that borrows from an async closure cannot
/// be proven `Send`, so it could not be spawned.)
pub async fn eventually<T, S, F>(what: &str, timeout: Duration, check: impl FnMut() -> F) -> T
where
    S: std::fmt::Display,
    F: std::future::Future<Output = Result<T, S>>,
{
    eventually_every(what, timeout, Duration::from_millis(20), check).await
}

/// [`eventually`], polling every `every` (for a check whose cost or whose timing matters).
pub async fn eventually_every<T, S, F>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> F,
) -> T
where
    S: std::fmt::Display,
    F: std::future::Future<Output = Result<T, S>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match check().await {
            Ok(t) => return t,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last seen: {seen}"
        );
        tokio::time::sleep(every).await;
    }
}

/// What a check saw, shown with a process's log when the wait fails (the log file is read
/// only then).
pub struct SeenWithLog {
    pub seen: String,
    pub log: PathBuf,
}

impl std::fmt::Display for SeenWithLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        write!(f, "{}\nlog:\n{log}", self.seen)
    }
}

pub fn kanaria_bin() -> PathBuf {
    // `KANARIA_BIN`: a copy of the binary, so a long run (the chaos soak) is not changed
    // under it by a rebuild of the tree it was built from.
    std::env::var_os("KANARIA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kanaria")))
}

/// The sections of a test config and the environment of the process: what
/// [`Proxy::builder`] starts, and what [`Proxy::config_text_of`] renders on a running
/// proxy's ports. Each setter replaces what it sets.
#[derive(Clone, Default)]
pub struct ProxyBuilder {
    routes: String,
    proxy: String,
    tls: Option<String>,
    admin: String,
    reload: String,
    env: Vec<(String, String)>,
}

impl ProxyBuilder {
    /// The `[[routes]]`, and any other top-level sections (`[edge]`, `[fleet]`, `[state]`,
    /// `[notify]`, ...): everything after `[proxy]`, `[admin]` and `[reload]`.
    pub fn routes(mut self, toml: &str) -> Self {
        self.routes = toml.to_string();
        self
    }

    /// Extra `[proxy]` keys (`listen`, `threads` and `upgrade_sock` are the harness's).
    pub fn proxy(mut self, keys: &str) -> Self {
        self.proxy = keys.to_string();
        self
    }

    /// A TLS listener: `[proxy.tls]` with `listen` on a port of the harness
    /// ([`Proxy::tls_port`]), then `toml` (its keys and `[[proxy.tls.certificates]]`).
    pub fn tls(mut self, toml: &str) -> Self {
        self.tls = Some(toml.to_string());
        self
    }

    /// Extra `[admin]` keys (`listen` is the harness's).
    pub fn admin(mut self, keys: &str) -> Self {
        self.admin = keys.to_string();
        self
    }

    /// Extra `[reload]` keys (`debounce = "50ms"` comes first).
    pub fn reload(mut self, keys: &str) -> Self {
        self.reload = keys.to_string();
        self
    }

    /// An environment variable of the process (the harness sets `RUST_LOG=info` and
    /// removes `KANARIA_ADMIN_TOKEN` before these).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts `kanaria run` on this config and waits until it is ready.
    pub async fn start(self) -> Proxy {
        Proxy::start(self).await
    }
}

/// The ports a config is rendered with.
#[derive(Clone, Copy)]
struct Ports {
    proxy: u16,
    tls: Option<u16>,
    /// 0 (the OS picks) until a respawn pins the port the first process got.
    admin: u16,
}

/// The text of a test config: `[proxy]` (and `[proxy.tls]`), `[admin]`, `[reload]`, then
/// the routes.
fn render(spec: &ProxyBuilder, ports: Ports, dir: &Path) -> String {
    let mut text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{}\"\nthreads = 2\nupgrade_sock = \"{}\"\n{}\n",
        ports.proxy,
        dir.join("upgrade.sock").display(),
        spec.proxy
    );
    if let (Some(port), Some(tls)) = (ports.tls, &spec.tls) {
        text.push_str(&format!(
            "\n[proxy.tls]\nlisten = [\"127.0.0.1:{port}\"]\n{tls}\n"
        ));
    }
    text.push_str(&format!(
        "\n{}{}\n\n[reload]\ndebounce = \"50ms\"\n{}\n\n{}\n",
        admin_listen(ports.admin),
        spec.admin,
        spec.reload,
        spec.routes
    ));
    text
}

/// The head of the `[admin]` section for a port.
fn admin_listen(port: u16) -> String {
    format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n")
}

/// The `kanaria` binary running a config, killed when dropped.
///
/// Its ports: the admin listener is configured on port 0, and the harness reads back the
/// port the process bound. The proxy listeners (plain, TLS) cannot be: Kanaria accepts
/// `127.0.0.1:0` there, but `/readyz` probes the configured port (0, so never ready), the
/// per-listener connection cap matches connections to listeners by configured port, and
/// `admin.listen` equal to a proxy listener is refused even when both say port 0. So they
/// are [`ReservedPort`]s the harness holds for the proxy's whole life (over respawns too),
/// and the harness checks, from `/proc`, that the process does listen on them.
pub struct Proxy {
    pub port: u16,
    pub admin_port: u16,
    tls_port: Option<u16>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    child: Child,
    spec: ProxyBuilder,
    /// The admin port the config file says: 0, or `admin_port` once a respawn pinned it.
    admin_listen: u16,
    /// The proxy listeners' ports, and the admin port once pinned.
    _reserved: Vec<ReservedPort>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// A config to start: `Proxy::builder().routes(..).proxy(..).env(..).start().await`.
    pub fn builder() -> ProxyBuilder {
        ProxyBuilder::default()
    }

    async fn start(spec: ProxyBuilder) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let proxy_port = ReservedPort::new();
        let tls_port = spec.tls.as_ref().map(|_| ReservedPort::new());
        let ports = Ports {
            proxy: proxy_port.port(),
            tls: tls_port.as_ref().map(ReservedPort::port),
            admin: 0,
        };
        let config_path = dir.path().join("kanaria.toml");
        std::fs::write(&config_path, render(&spec, ports, dir.path())).expect("write config");
        let child = spawn(&config_path, dir.path(), &spec.env);
        let mut proxy = Proxy {
            port: ports.proxy,
            admin_port: 0,
            tls_port: ports.tls,
            dir,
            config_path,
            child,
            spec,
            admin_listen: 0,
            _reserved: std::iter::once(proxy_port).chain(tls_port).collect(),
        };
        proxy.wait_ready().await;
        proxy
    }

    fn ports(&self) -> Ports {
        Ports {
            proxy: self.port,
            tls: self.tls_port,
            admin: self.admin_listen,
        }
    }

    /// The config this proxy started with, but with `routes`: same ports and sections.
    pub fn config_text(&self, routes: &str) -> String {
        self.config_text_of(&self.spec().routes(routes))
    }

    /// `spec` rendered on this proxy's ports (start from [`Self::spec`]). Its environment
    /// is not part of the text.
    pub fn config_text_of(&self, spec: &ProxyBuilder) -> String {
        render(spec, self.ports(), self.dir.path())
    }

    /// What this proxy was started with, to change a section for [`Self::config_text_of`].
    pub fn spec(&self) -> ProxyBuilder {
        self.spec.clone()
    }

    /// The routes (and other sections) this proxy was started with, as TOML.
    pub fn routes_toml(&self) -> String {
        self.spec.routes.clone()
    }

    /// The TLS listener's port (the proxy must have been built with `.tls(..)`).
    pub fn tls_port(&self) -> u16 {
        self.tls_port.expect("a proxy started with .tls(..)")
    }

    /// Kills the process (SIGKILL) and reaps it. The admin port it had is held from now on,
    /// for [`Self::respawn`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.admin_listen == 0 && !self._reserved.iter().any(|r| r.port() == self.admin_port) {
            let held = ReservedPort::on(self.admin_port).unwrap_or_else(|e| {
                panic!(
                    "the admin port {} was taken as soon as kanaria died: {e}",
                    self.admin_port
                )
            });
            self._reserved.push(held);
        }
    }

    /// Starts the process again with the same config, ports and environment (after
    /// [`Self::kill`]), without waiting for it to be ready. The first respawn pins the
    /// admin port in the config file (`[admin] listen` on port 0 becomes the port the first
    /// process got); nothing runs to reload it meanwhile.
    pub fn respawn(&mut self) {
        assert!(
            self._reserved.iter().any(|r| r.port() == self.admin_port),
            "respawn after kill"
        );
        if self.admin_listen == 0 {
            let text = std::fs::read_to_string(&self.config_path).expect("read config");
            let (any, pinned) = (admin_listen(0), admin_listen(self.admin_port));
            assert!(
                text.contains(&any),
                "respawn: no {any:?} in the config file to pin:\n{text}"
            );
            std::fs::write(&self.config_path, text.replacen(&any, &pinned, 1))
                .expect("pin the admin port");
            self.admin_listen = self.admin_port;
        }
        self.child = spawn(&self.config_path, self.dir.path(), &self.spec.env);
    }

    /// Begins a graceful binary upgrade: a new process on the same config, started with
    /// `--upgrade`, and `SIGQUIT` to this one, which hands its listeners over and drains.
    /// From now on this `Proxy` is the new process; the old one is returned, for the caller
    /// to wait for (it exits once drained, within `shutdown_grace`).
    pub fn begin_upgrade(&mut self) -> Child {
        let new = spawn_with(
            &self.config_path,
            self.dir.path(),
            &self.spec.env,
            &["--upgrade"],
        );
        let old = std::mem::replace(&mut self.child, new);
        // SAFETY: kill(2) on a child this harness started and has not reaped.
        unsafe { libc::kill(old.id() as i32, libc::SIGQUIT) };
        old
    }

    /// Whether `/readyz` answers 200 right now.
    pub async fn is_ready(&self) -> bool {
        client()
            .get(self.admin_url("/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    }

    /// Waits until `/readyz` answers 200 (fails if the process died or after 30 s).
    pub async fn wait_until_ready(&mut self) {
        self.wait_ready().await;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the process has ended (reaps it), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    pub async fn status(&self) -> serde_json::Value {
        client()
            .get(self.admin_url("/api/v1/status"))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("status json")
    }

    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// POSTs an operator action on route `app` with bearer token `token`; returns the status.
    pub async fn act(&self, action: &str, token: &str) -> u16 {
        client()
            .post(self.admin_url(&format!("/api/v1/routes/app/{action}")))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .send()
            .await
            .expect("admin action")
            .status()
            .as_u16()
    }

    pub async fn generation(&self) -> u64 {
        self.status().await["config_generation"]
            .as_u64()
            .expect("generation")
    }

    /// Polls `/api/v1/status` until `pred` holds (or fails after 20 s with the last status).
    pub async fn wait_status(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let (proxy, pred, log) = (self, &pred, self.log_path());
        eventually(what, Duration::from_secs(20), move || {
            let log = log.clone();
            async move {
                let s = proxy.status().await;
                if pred(&s) {
                    Ok(s)
                } else {
                    Err(SeenWithLog {
                        seen: format!("status {s:#}"),
                        log,
                    })
                }
            }
        })
        .await
    }

    /// Writes the config file in place (a hot reload follows; nothing waits for it).
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).expect("rewrite config");
    }

    /// Writes the config file in place and waits for a reload newer than `after`.
    pub async fn write_config_and_wait(&self, text: &str, after: u64) -> serde_json::Value {
        self.write_config(text);
        self.wait_status("a reload", |s| {
            s["config_generation"].as_u64() > Some(after)
        })
        .await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("kanaria.log")
    }

    /// Reads back the admin port (the first time), checks that the process listens on the
    /// proxy's ports and the admin port and nothing else, then polls `/readyz` until the
    /// proxy listeners accept; fails fast if the process died.
    async fn wait_ready(&mut self) {
        let client = client();
        let log = self.log_path();
        eventually("kanaria to be ready", Duration::from_secs(30), || {
            let listening = self.check_listeners();
            let (client, log) = (client.clone(), log.clone());
            async move {
                let seen = |seen: String| SeenWithLog {
                    seen,
                    log: log.clone(),
                };
                let url = listening.map_err(&seen)?;
                match client.get(url).send().await {
                    Ok(r) if r.status() == 200 => Ok(()),
                    Ok(r) => Err(seen(format!("/readyz answers {}", r.status()))),
                    Err(e) => Err(seen(format!("/readyz: {e}"))),
                }
            }
        })
        .await;
    }

    /// Panics if the process exited. Reads back the admin port the first time; checks,
    /// from `/proc`, that the process listens on the proxy's ports and one admin port, and
    /// returns the `/readyz` URL, or what it listens on.
    fn check_listeners(&mut self) -> Result<String, String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "kanaria exited with {status} before it was ready:\n{}",
                self.log()
            );
        }
        let proxy_ports: Vec<u16> = std::iter::once(self.port).chain(self.tls_port).collect();
        let ports = ports::listening_ports(self.pid());
        let others: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| !proxy_ports.contains(p))
            .collect();
        match others[..] {
            [admin] if proxy_ports.iter().all(|p| ports.contains(p)) => {
                if self.admin_port == 0 {
                    self.admin_port = admin;
                }
                if admin == self.admin_port {
                    Ok(self.admin_url("/readyz"))
                } else {
                    Err(format!(
                        "the admin listener on {admin}, not {}",
                        self.admin_port
                    ))
                }
            }
            _ => Err(format!(
                "listening on {ports:?}; expecting the proxy listeners {proxy_ports:?} and one admin listener"
            )),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }
}

/// Starts `kanaria run -c CONFIG`, its log appended to `DIR/kanaria.log`.
fn spawn(config_path: &Path, dir: &Path, env: &[(String, String)]) -> Child {
    spawn_with(config_path, dir, env, &[])
}

fn spawn_with(config_path: &Path, dir: &Path, env: &[(String, String)], more: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("kanaria.log"))
        .expect("log file");
    let mut cmd = Command::new(kanaria_bin());
    cmd.args(["run"])
        .args(more)
        .arg("-c")
        .arg(config_path)
        .env("RUST_LOG", "info")
        .env_remove("KANARIA_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn kanaria")
}

/// A real `redis-server` (Debian's) on a loopback port, no persistence, killed when
/// dropped. `restart` starts a fresh one (empty) on the same port.
///
/// `redis-server --port 0` does not pick a port, it turns TCP off, so the ports are
/// [`ReservedPort`]s held for the value's life: no one takes them while Redis is down
/// between a `stop` and a `restart`.
pub struct Redis {
    pub port: u16,
    /// With TLS: the port serving TLS (the plain `port` stays, for the test's own commands).
    pub tls_port: Option<u16>,
    child: Option<Child>,
    dir: tempfile::TempDir,
    _reserved: Vec<ReservedPort>,
    /// More arguments for `redis-server` (e.g. `--replicaof`).
    extra: Vec<String>,
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Redis {
    pub async fn start() -> Redis {
        let mut r = Redis::new(false);
        r.restart().await;
        r
    }

    /// A server that also serves TLS with a certificate for 127.0.0.1 signed by a test CA;
    /// returns it and the CA's PEM file (what clients must trust).
    pub async fn start_tls() -> (Redis, PathBuf) {
        let mut r = Redis::new(true);
        let ca = certs::TestCa::new("kanaria test redis CA");
        let ca_path = ca.write(r.dir.path(), "ca.pem");
        certs::write_pair(r.dir.path(), "redis", &ca.leaf(&["127.0.0.1", "localhost"]));
        r.restart().await;
        (r, ca_path)
    }

    fn new(tls: bool) -> Redis {
        let port = ReservedPort::new();
        let tls_port = tls.then(ReservedPort::new);
        Redis {
            port: port.port(),
            tls_port: tls_port.as_ref().map(ReservedPort::port),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            _reserved: std::iter::once(port).chain(tls_port).collect(),
            extra: Vec::new(),
        }
    }

    /// The URL replicas use: `rediss://` on the TLS port when there is one.
    pub fn url(&self) -> String {
        match self.tls_port {
            Some(p) => format!("rediss://127.0.0.1:{p}/0"),
            None => self.plain_url(),
        }
    }

    fn plain_url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The server's log, every run of it on this port (appended across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts a server on the ports (stopping one that runs) and waits until it listens on
    /// them (read back from `/proc`) and answers PING.
    pub async fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra);
        if let Some(tls) = self.tls_port {
            let file = |n: &str| self.dir.path().join(n);
            cmd.args(["--tls-port", &tls.to_string()])
                .arg("--tls-cert-file")
                .arg(file("redis.pem"))
                .arg("--tls-key-file")
                .arg(file("redis.key"))
                .arg("--tls-ca-cert-file")
                .arg(file("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("redis log file");
        let child = cmd
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package) must be installed");
        self.child = Some(child);
        let want: Vec<u16> = std::iter::once(self.port).chain(self.tls_port).collect();
        let (log, port) = (self.log_path(), self.port);
        let child = self.child.as_mut().expect("started");
        eventually(
            "redis-server to answer PING",
            Duration::from_secs(20),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "redis-server exited with {status}:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                let ports = ports::listening_ports(child.id());
                let listening = want.iter().all(|p| ports.contains(p));
                let (log, want) = (log.clone(), want.clone());
                async move {
                    let seen = if !listening {
                        format!("listening on {ports:?}, not yet {want:?}")
                    } else if ping(port).await {
                        return Ok(());
                    } else {
                        "no +PONG".to_string()
                    };
                    Err(SeenWithLog { seen, log })
                }
            },
        )
        .await;
    }

    /// A connection for the test's own commands.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.plain_url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }
}

/// Whether a server on `port` answers `PING` with `+PONG` (within a second).
async fn ping(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await,
        Ok(Ok(n)) if buf[..n].starts_with(b"+PONG")
    )
}

/// A real HTTP client that ignores proxy settings of the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// What a reconnecting test client saw, shared with its task: the server of its current
/// connection or stream, how many times it reconnected, how many connections or streams
/// failed (instead of ending cleanly).
#[derive(Clone, Default)]
pub struct Reconnecting {
    pub on: Arc<std::sync::Mutex<String>>,
    pub reconnects: Arc<AtomicU64>,
    pub failures: Arc<AtomicU64>,
}

impl Reconnecting {
    /// A client that runs `session` (one connection or stream, until it ends) again and
    /// again until `stop` is set, counting each run after the first as a reconnect.
    /// Bounded: a forgotten client cannot run away.
    pub fn spawn<F, Fut>(stop: Arc<std::sync::atomic::AtomicBool>, mut session: F) -> Reconnecting
    where
        F: FnMut(Reconnecting, Arc<std::sync::atomic::AtomicBool>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let client = Reconnecting::default();
        let c = client.clone();
        tokio::spawn(async move {
            for run in 0..1_000 {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                if run > 0 {
                    c.reconnects.fetch_add(1, Ordering::SeqCst);
                }
                session(c.clone(), stop.clone()).await;
            }
        });
        client
    }
}

/// Each client's server and reconnect count now.
pub fn seen(clients: &[Reconnecting]) -> Vec<(String, u64)> {
    clients
        .iter()
        .map(|cl| {
            (
                cl.on.lock().unwrap().clone(),
                cl.reconnects.load(Ordering::SeqCst),
            )
        })
        .collect()
}

/// The clients' failures, summed.
pub fn failures(clients: &[Reconnecting]) -> u64 {
    clients
        .iter()
        .map(|cl| cl.failures.load(Ordering::SeqCst))
        .sum()
}

/// Waits (5 s at most) until `server` holds nothing open.
pub async fn none_open(server: &CountingServer) {
    let open = server.open.clone();
    eventually("nothing left open", Duration::from_secs(5), || {
        let n = open.load(Ordering::SeqCst);
        async move {
            if n == 0 {
                Ok(())
            } else {
                Err(format!("{n} still open"))
            }
        }
    })
    .await;
}

/// Waits (20 s at most) until each client of `on` (the server its client is on, empty
/// until it heard from one) is held open by one of `servers` and heard from it.
pub async fn all_connected(
    on: &[Arc<std::sync::Mutex<String>>],
    servers: (&CountingServer, &CountingServer),
) {
    let (s, c) = (servers.0.open.clone(), servers.1.open.clone());
    eventually("every client connected", Duration::from_secs(20), || {
        let open = s.load(Ordering::SeqCst) + c.load(Ordering::SeqCst);
        let heard = on.iter().filter(|o| !o.lock().unwrap().is_empty()).count();
        let n = on.len();
        async move {
            if open == n && heard == n {
                Ok(())
            } else {
                Err(format!("{open} open, {heard} heard from their server"))
            }
        }
    })
    .await;
}

/// Every client that was on `moved` (in `before`, from [`seen`]) reconnected since; every
/// other one did not.
pub fn assert_only_moved(clients: &[Reconnecting], before: &[(String, u64)], moved: &str) {
    for (i, (cl, (was, n))) in clients.iter().zip(before).enumerate() {
        let now = cl.reconnects.load(Ordering::SeqCst);
        if was == moved {
            assert!(now > *n, "user-{i}, on {was}, did not reconnect");
        } else {
            assert_eq!(now, *n, "user-{i}, on {was}, reconnected");
        }
    }
}

/// A test server on 127.0.0.1 that counts what it holds open (connections or streams, as
/// its handler says): each accepted connection goes to `serve` with the counter, on a task
/// of its own; the accept loop stops when the server is dropped.
pub struct CountingServer {
    pub addr: SocketAddr,
    pub open: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingServer {
    pub async fn start<F, Fut>(serve: F) -> CountingServer
    where
        F: Fn(tokio::net::TcpStream, Arc<std::sync::atomic::AtomicUsize>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve(tcp, counter.clone()));
            }
        });
        CountingServer { addr, open, task }
    }
}

/// Serves one accepted connection with `svc`: HTTP/2 with prior knowledge (h2c) when `h2`,
/// else HTTP/1.1; returns when the connection ends. The HTTP/2 server takes header lists
/// up to Kanaria's own default bound (`edge.h2_max_header_list_size`, 64 KiB); hyper's
/// default, 16 KiB, would answer 431 to heads Kanaria passes on.
pub async fn serve_hyper<S, B>(tcp: tokio::net::TcpStream, svc: S, h2: bool)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(tcp);
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_header_list_size(64 * 1024)
            .serve_connection(io, svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await;
    }
}

/// A pool section for a route.
pub fn pool(section: &str, version: &str, addrs: &[SocketAddr]) -> String {
    let eps: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[{section}]\nversion = \"{version}\"\nendpoints = [{}]\n",
        eps.join(", ")
    )
}

/// The name of the upstream that answered a GET with these headers (its `x-upstream`).
pub async fn served_by(proxy: &Proxy, headers: &[(&str, &str)]) -> String {
    let mut req = client().get(proxy.url("/"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request through the proxy");
    resp.headers()
        .get("x-upstream")
        .and_then(|v| v.to_str().ok())
        .expect("x-upstream header")
        .to_string()
}

/// Sends one GET for each of `n` users (`PREFIX-0`, `PREFIX-1`, ...) in turn; returns each
/// answer's status and the version that served it (`x-kanaria-version`, empty if absent).
pub async fn send_users(proxy: &Proxy, n: usize, prefix: &str) -> Vec<(u16, String)> {
    let c = client();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = c
            .get(proxy.url("/"))
            .header("x-user-id", format!("{prefix}-{i}"))
            .send()
            .await
            .expect("request through the proxy");
        let version = r
            .headers()
            .get("x-kanaria-version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        out.push((r.status().as_u16(), version));
    }
    out
}

/// Which version served a user, read from the `x-kanaria-version` response header.
pub async fn version_for(c: &reqwest::Client, url: &str, user: &str) -> String {
    let resp = c
        .get(url)
        .header("x-user-id", user)
        .send()
        .await
        .expect("request through the proxy");
    assert_eq!(resp.status(), 200, "user {user}");
    resp.headers()
        .get("x-kanaria-version")
        .and_then(|v| v.to_str().ok())
        .expect("x-kanaria-version header")
        .to_string()
}

/// Steady background traffic of many users; counts what clients saw.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    /// Answers served by the canary (per `x-kanaria-version`).
    pub canary: Arc<AtomicU64>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `workers` clients, each sending GETs for users `0..users` in turn, until stopped or
    /// 50,000 requests each (a bound, so a forgotten load cannot run away).
    pub fn start(url: String, workers: usize, users: u64) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ok, failed, canary) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let handles = (0..workers)
            .map(|w| {
                let (stop, ok, failed, canary, url) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    canary.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let c = client();
                    for i in 0..50_000u64 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let user = format!("user-{}", (i * workers as u64 + w as u64) % users);
                        match c.get(&url).header("x-user-id", user).send().await {
                            Ok(r) if r.status() == 200 => {
                                if r.headers()
                                    .get("x-kanaria-version")
                                    .is_some_and(|v| v == "canary")
                                {
                                    canary.fetch_add(1, Ordering::SeqCst);
                                }
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            _ => {
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            canary,
            handles,
        }
    }

    /// Stops the clients and returns (ok, failed).
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            let _ = h.await;
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

/// A webhook receiver: keeps every POSTed body.
pub struct Webhook {
    pub addr: SocketAddr,
    pub bodies: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Webhook {
    pub async fn start() -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind webhook");
        let addr = listener.local_addr().expect("webhook addr");
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let b = bodies.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let b = b.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let b = b.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let body = req.into_body().collect().await.map(|c| c.to_bytes());
                            if let Ok(body) = body {
                                b.lock()
                                    .unwrap()
                                    .push(String::from_utf8_lossy(&body).into_owned());
                            }
                            Ok::<_, &'static str>(Response::new(Full::new(Bytes::from("ok"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Webhook { addr, bodies, task }
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .filter_map(|b| serde_json::from_str(b).ok())
            .collect()
    }
}
