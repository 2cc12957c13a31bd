//! Test harness: real HTTP upstreams on OS-picked loopback ports, the real `kanaria` binary
//! as a child process, and a real HTTP client. Readiness is polled, never slept for.

#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
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
pub mod grpc;
pub mod h2load;
pub mod ports;
pub mod raw;

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
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
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
        Upstream {
            addr,
            name: name.to_string(),
            mode,
            status,
            delay_ms,
            requests,
            connections,
            task,
        }
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

/// A loopback port that was free a moment ago (the OS picks it; we release it for the proxy).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// An address where nothing listens: connections are refused.
pub fn dead_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
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
    PathBuf::from(env!("CARGO_BIN_EXE_kanaria"))
}

/// The `kanaria` binary running a config, killed when dropped.
pub struct Proxy {
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    child: Child,
    env: Vec<(String, String)>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// `routes` is the TOML of the `[[routes]]` (and anything after `[admin]`); `[proxy]`
    /// and `[admin]` with fresh ports are prepended.
    pub async fn start(routes: &str) -> Proxy {
        Self::start_with(routes, "").await
    }

    /// Like `start`, with extra `[proxy]` keys.
    pub async fn start_with(routes: &str, proxy_extra: &str) -> Proxy {
        Self::launch(routes, proxy_extra, "", "", &[]).await
    }

    /// The config text for given ports: `[proxy]`, `[admin]`, `[reload]`, then `routes`.
    pub fn config_text(
        &self,
        routes: &str,
        proxy_extra: &str,
        admin_extra: &str,
        reload_extra: &str,
    ) -> String {
        config_text(
            self.port,
            self.admin_port,
            self.dir.path(),
            routes,
            proxy_extra,
            admin_extra,
            reload_extra,
        )
    }

    /// Full control: extra `[proxy]` and `[admin]` keys, environment of the process.
    pub async fn launch(
        routes: &str,
        proxy_extra: &str,
        admin_extra: &str,
        reload_extra: &str,
        env: &[(&str, &str)],
    ) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let admin_port = free_port();
        let config = config_text(
            port,
            admin_port,
            dir.path(),
            routes,
            proxy_extra,
            admin_extra,
            reload_extra,
        );
        let config_path = dir.path().join("kanaria.toml");
        std::fs::File::create(&config_path)
            .and_then(|mut f| f.write_all(config.as_bytes()))
            .expect("write config");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = spawn(&config_path, dir.path(), &env);
        let mut proxy = Proxy {
            port,
            admin_port,
            dir,
            config_path,
            child,
            env,
        };
        proxy.wait_ready().await;
        proxy
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the process again with the same config, ports and environment (after
    /// [`Self::kill`]), without waiting for it to be ready.
    pub fn respawn(&mut self) {
        self.child = spawn(&self.config_path, self.dir.path(), &self.env);
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
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status().await;
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status {s:#}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes the config file in place and waits for a reload newer than `after`.
    pub async fn write_config_and_wait(&self, text: &str, after: u64) -> serde_json::Value {
        std::fs::write(&self.config_path, text).expect("rewrite config");
        self.wait_status("a reload", |s| {
            s["config_generation"].as_u64() > Some(after)
        })
        .await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kanaria.log")).unwrap_or_default()
    }

    /// Polls `/readyz` until the proxy listeners accept; fails fast if the process died.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = client();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "kanaria exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if let Ok(r) = client.get(self.admin_url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "kanaria not ready after 30s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }
}

/// Starts `kanaria run -c CONFIG`, its log appended to `DIR/kanaria.log`.
fn spawn(config_path: &std::path::Path, dir: &std::path::Path, env: &[(String, String)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("kanaria.log"))
        .expect("log file");
    let mut cmd = Command::new(kanaria_bin());
    cmd.args(["run", "-c"])
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
pub struct Redis {
    pub port: u16,
    /// With TLS: the port serving TLS (the plain `port` stays, for the test's own commands).
    pub tls_port: Option<u16>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Redis {
    pub async fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            tls_port: None,
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        r.restart().await;
        r
    }

    /// A server that also serves TLS with a certificate for 127.0.0.1 signed by a test CA;
    /// returns it and the CA's PEM file (what clients must trust).
    pub async fn start_tls() -> (Redis, PathBuf) {
        let mut r = Redis {
            port: free_port(),
            tls_port: Some(free_port()),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        let ca = certs::TestCa::new("kanaria test redis CA");
        let ca_path = ca.write(r.dir.path(), "ca.pem");
        certs::write_pair(r.dir.path(), "redis", &ca.leaf(&["127.0.0.1", "localhost"]));
        r.restart().await;
        (r, ca_path)
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

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a server on the port (stopping one that runs) and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(self.dir.path());
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
            let child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (Debian's redis-server package) must be installed");
            self.child = Some(child);
            loop {
                if self.ping().await {
                    return;
                }
                if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                    // The port was taken meanwhile (a killed server's socket): try again.
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not answer PING"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.child = None;
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
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

    /// A connection for the test's own commands.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.plain_url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }
}

/// The text of a test config.
pub fn config_text(
    port: u16,
    admin_port: u16,
    dir: &std::path::Path,
    routes: &str,
    proxy_extra: &str,
    admin_extra: &str,
    reload_extra: &str,
) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nthreads = 2\nupgrade_sock = \"{}\"\n{proxy_extra}\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{admin_extra}\n\n[reload]\ndebounce = \"50ms\"\n{reload_extra}\n\n{routes}\n",
        dir.join("upgrade.sock").display()
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
