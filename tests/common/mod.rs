//! Test harness: real HTTP upstreams on OS-picked loopback ports, the real `kanaria` binary
//! as a child process, and a real HTTP client. Readiness is polled, never slept for.

#![allow(dead_code)]

use std::convert::Infallible;
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
}

/// A real HTTP/1.1 server on 127.0.0.1:0 that says who it is and echoes what it received.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    mode: Arc<AtomicU8>,
    status: Arc<AtomicU16>,
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
        let requests = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (m, s, r, c, n) = (
            mode.clone(),
            status.clone(),
            requests.clone(),
            connections.clone(),
            name.to_string(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (m, s, r, n) = (m.clone(), s.clone(), r.clone(), n.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (m, s, r, n) = (m.clone(), s.clone(), r.clone(), n.clone());
                        async move { Ok::<_, Infallible>(answer(req, &m, &s, &r, &n).await) }
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
            requests,
            connections,
            task,
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
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
        let log = std::fs::File::create(dir.path().join("kanaria.log")).expect("log file");
        let mut cmd = Command::new(kanaria_bin());
        cmd.args(["run", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env_remove("KANARIA_ADMIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn kanaria");
        let mut proxy = Proxy {
            port,
            admin_port,
            dir,
            config_path,
            child,
        };
        proxy.wait_ready().await;
        proxy
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
