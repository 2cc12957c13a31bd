//! Faults around the request path, through the real binary: an upstream that hangs (504,
//! counted as a timeout), an upstream that closes the connection mid-body (the client sees a
//! broken answer, the proxy stays healthy and counts a reset), a graceful shutdown with
//! requests in flight (all finish) and with an idle keep-alive connection (its next request
//! is still served, then it closes), and a graceful binary upgrade through Pingora's upgrade
//! socket under load (no failed request).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use common::{client, eventually, kanaria_bin, pool, Mode, Proxy, Upstream};

/// How a [`RawUpstream`] answers.
#[derive(Clone)]
enum Behaviour {
    /// Headers announcing `TRUNCATED_LEN` bytes, a tenth of them, then close.
    Truncate,
    /// Hold every answer until the gate opens, then send `GATED_BODY_LEN` bytes.
    Gate(watch::Receiver<bool>),
}

const TRUNCATED_LEN: usize = 100_000;
const GATED_BODY_LEN: usize = 64 * 1024;

/// An HTTP/1.1 upstream written on raw sockets, for answers a well-behaved server library
/// would not produce. Serves keep-alive connections (Pingora reuses them).
struct RawUpstream {
    addr: std::net::SocketAddr,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    async fn start(behaviour: Behaviour) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, behaviour.clone(), counter.clone()));
            }
        });
        RawUpstream {
            addr,
            requests,
            task,
        }
    }
}

/// Reads one request head (GETs only: no body). `false` when the peer closed.
async fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

async fn serve(mut stream: TcpStream, behaviour: Behaviour, requests: Arc<AtomicU64>) {
    while read_head(&mut stream).await {
        requests.fetch_add(1, Ordering::SeqCst);
        match &behaviour {
            Behaviour::Truncate => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {TRUNCATED_LEN}\r\n\r\n");
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&vec![b'x'; TRUNCATED_LEN / 10]).await;
                let _ = stream.flush().await;
                return; // drops the socket mid-body
            }
            Behaviour::Gate(gate) => {
                let mut gate = gate.clone();
                if gate.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {GATED_BODY_LEN}\r\n\r\n");
                if stream.write_all(head.as_bytes()).await.is_err()
                    || stream.write_all(&vec![b'g'; GATED_BODY_LEN]).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success(), "kill {sig} {pid}");
}

/// `Ok` once the proxy's log has `line`; the log so far otherwise.
fn in_log(proxy: &Proxy, line: &str) -> Result<(), String> {
    let log = proxy.log();
    if log.contains(line) {
        Ok(())
    } else {
        Err(format!("log:\n{log}"))
    }
}

/// The value of one exact series in Prometheus text, 0 when absent.
fn series(metrics: &str, name_and_labels: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

fn stable_route(name: &str, prefix: &str, addr: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\n{extra}\n{}\n",
        pool("routes.stable", "v1", &[addr])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_upstream_is_504_counted_as_timeout_and_others_keep_being_served() {
    let hang = Upstream::start("hang").await;
    hang.set_mode(Mode::Hang);
    let ok = Upstream::start("ok").await;
    let cfg = format!(
        "{}{}",
        stable_route("slow", "/slow", hang.addr, "read_timeout = \"400ms\""),
        stable_route("fine", "/", ok.addr, ""),
    );
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let c = client();
    // Three requests hang at once; the other route answers meanwhile.
    let hung: Vec<_> = (0..3)
        .map(|_| {
            let (c, url) = (c.clone(), proxy.url("/slow"));
            tokio::spawn(async move { c.get(url).send().await })
        })
        .collect();
    eventually(
        "the hanging upstream to hold 3 requests",
        Duration::from_secs(20),
        || {
            std::future::ready(match hang.requests.load(Ordering::SeqCst) {
                n if n >= 3 => Ok(()),
                n => Err(format!("{n} requests")),
            })
        },
    )
    .await;
    let r = c.get(proxy.url("/fine")).send().await.unwrap();
    assert_eq!(r.status(), 200, "a hanging upstream blocks nobody else");
    for h in hung {
        let r = h
            .await
            .unwrap()
            .expect("an answer, not a dropped connection");
        assert_eq!(r.status(), 504);
        assert_eq!(r.text().await.unwrap(), "kanaria: upstream timed out\n");
    }
    // Pingora runs the logging hook (which counts) after the answer went out: the client
    // can read it first.
    let timeouts =
        "kanaria_upstream_errors_total{kind=\"timeout\",route=\"slow\",version=\"stable\"}";
    let m = eventually("3 timeouts counted", Duration::from_secs(20), || async {
        let m = proxy.metrics().await;
        if series(&m, timeouts) >= 3 {
            Ok(m)
        } else {
            Err(m)
        }
    })
    .await;
    assert_eq!(series(&m, timeouts), 3, "{m}");
    assert_eq!(
        series(
            &m,
            "kanaria_requests_total{code_class=\"5xx\",route=\"slow\",version=\"stable\"}"
        ),
        3,
        "{m}"
    );
    assert_eq!(
        series(
            &m,
            "kanaria_upstream_errors_total{kind=\"timeout\",route=\"fine\",version=\"stable\"}"
        ),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_mid_body_breaks_that_answer_only_and_counts_a_reset() {
    let cut = RawUpstream::start(Behaviour::Truncate).await;
    let ok = Upstream::start("ok").await;
    let cfg = format!(
        "{}{}",
        stable_route("cut", "/cut", cut.addr, ""),
        stable_route("fine", "/", ok.addr, ""),
    );
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let c = client();
    for _ in 0..3 {
        let r = c.get(proxy.url("/cut")).send().await.unwrap();
        // The header had already gone out when the upstream vanished: the client sees the
        // promised length, then a connection that ends early, never a complete body.
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-length"],
            TRUNCATED_LEN.to_string().as_str()
        );
        match r.bytes().await {
            Err(_) => {}
            Ok(b) => panic!(
                "a truncated body must not look complete: got {} bytes",
                b.len()
            ),
        }
    }
    assert_eq!(cut.requests.load(Ordering::SeqCst), 3);
    let r = c.get(proxy.url("/fine")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the proxy keeps serving");
    let r = c.get(proxy.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let m = proxy.metrics().await;
    assert_eq!(
        series(
            &m,
            "kanaria_upstream_errors_total{kind=\"reset\",route=\"cut\",version=\"stable\"}"
        ),
        3,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_every_request_in_flight_finish() {
    let (open, gate) = watch::channel(false);
    let up = RawUpstream::start(Behaviour::Gate(gate)).await;
    let mut proxy = Proxy::builder()
        .routes(&stable_route("app", "/", up.addr, ""))
        .proxy("shutdown_grace = \"3s\"")
        .start()
        .await;
    let c = client();
    const IN_FLIGHT: u64 = 8;
    let requests: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let (c, url) = (c.clone(), proxy.url(&format!("/r{i}")));
            tokio::spawn(async move {
                let r = c.get(url).send().await?;
                let status = r.status();
                r.bytes().await.map(|b| (status, b.len()))
            })
        })
        .collect();
    eventually(
        "all requests to reach the upstream",
        Duration::from_secs(20),
        || {
            std::future::ready(match up.requests.load(Ordering::SeqCst) {
                n if n >= IN_FLIGHT => Ok(()),
                n => Err(format!("{n} requests")),
            })
        },
    )
    .await;

    signal(proxy.pid(), "-TERM");
    // The proxy stops listening (Pingora logs it per endpoint) while the requests still wait.
    let stopped = format!("Shutting down 127.0.0.1:{}", proxy.port);
    eventually("the listener to shut down", Duration::from_secs(20), || {
        std::future::ready(in_log(&proxy, &stopped))
    })
    .await;
    assert!(proxy.try_wait().is_none(), "exited with requests in flight");

    open.send(true).expect("open the gate");
    for r in requests {
        let (status, len) = r.await.unwrap().expect("the in-flight request finished");
        assert_eq!((status.as_u16(), len), (200, GATED_BODY_LEN));
    }
    let exit = eventually("the process to exit", Duration::from_secs(30), || {
        std::future::ready(proxy.try_wait().ok_or("running"))
    })
    .await;
    assert!(exit.success(), "exit {exit:?}");
}

/// Sends one GET on a raw connection and reads the whole answer: (head, body).
async fn raw_get(stream: &mut TcpStream, path: &str) -> (String, Vec<u8>) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .expect("send request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.expect("read answer");
        assert!(n > 0, "connection closed before an answer: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    (head, buf[head_end..head_end + len].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_serves_the_next_request_on_an_idle_connection_then_closes_it() {
    let up = Upstream::start("app").await;
    let mut proxy = Proxy::builder()
        .routes(&stable_route("app", "/", up.addr, ""))
        .proxy("shutdown_grace = \"4s\"")
        .start()
        .await;
    let mut conn = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let (head, _) = raw_get(&mut conn, "/first").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");

    // The connection is now idle between two requests. Shut down, and wait until Pingora
    // has stopped listening and the cleanup that used to drop idle connections began.
    signal(proxy.pid(), "-TERM");
    eventually("the drain to start", Duration::from_secs(20), || {
        std::future::ready(in_log(&proxy, "draining: idle client connections close in"))
    })
    .await;
    assert!(
        TcpStream::connect(("127.0.0.1", proxy.port)).await.is_err(),
        "new connections are refused once shutdown began"
    );

    // The next request on the idle connection is still answered, and told to close.
    let (head, body) = raw_get(&mut conn, "/second").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("/second"));
    let mut rest = [0u8; 16];
    assert_eq!(conn.read(&mut rest).await.unwrap_or(0), 0, "then it closes");
    eventually("the process to exit", Duration::from_secs(30), || {
        std::future::ready(proxy.try_wait().ok_or("running"))
    })
    .await;
}

/// A second `kanaria` started by the test; killed when dropped.
struct Successor(Child);

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrade_under_load_fails_no_request() {
    let s = Upstream::start("stable").await;
    let cn = Upstream::start("canary").await;
    let routes = format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = 10\n{}\n{}",
        pool("routes.stable", "v1", &[s.addr]),
        pool("routes.canary", "v2", &[cn.addr]),
    );
    let mut old = Proxy::builder()
        .routes(&routes)
        .proxy("shutdown_grace = \"2s\"")
        .start()
        .await;
    let old = &mut old;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (url, stop, ok, failures) = (old.url("/"), stop.clone(), ok.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let c = client();
            // Bounded: until told to stop, at most 20,000 requests or 90 s per worker.
            let until = Instant::now() + Duration::from_secs(90);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) && i < 20_000 && Instant::now() < until {
                i += 1;
                let r = c
                    .get(&url)
                    .header("x-user-id", format!("w{worker}-{}", i % 300))
                    .send()
                    .await;
                let outcome = match r {
                    Ok(r) if r.status() == 200 => {
                        r.bytes().await.map(|_| ()).map_err(|e| e.to_string())
                    }
                    Ok(r) => Err(format!("status {}", r.status())),
                    Err(e) => Err(format!("{e:?}")),
                };
                match outcome {
                    Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        failures.lock().unwrap().push(e);
                        0
                    }
                };
            }
        }));
    }
    eventually(
        "load through the old process",
        Duration::from_secs(30),
        || {
            std::future::ready(match ok.load(Ordering::SeqCst) {
                n if n >= 200 => Ok(()),
                n => Err(format!("{n} ok")),
            })
        },
    )
    .await;

    // The new binary waits on the upgrade socket; SIGQUIT makes the old one hand over its
    // listeners, then drain.
    let new_log = std::fs::File::create(old.dir.path().join("kanaria-new.log")).unwrap();
    let new = Successor(
        Command::new(kanaria_bin())
            .args(["run", "--upgrade", "-c"])
            .arg(&old.config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(new_log)
            .spawn()
            .expect("spawn the new kanaria"),
    );
    signal(old.pid(), "-QUIT");
    eventually("the old process to exit", Duration::from_secs(40), || {
        std::future::ready(old.try_wait().ok_or("running"))
    })
    .await;
    let after = ok.load(Ordering::SeqCst);
    eventually(
        "load through the new process",
        Duration::from_secs(30),
        || {
            std::future::ready(match ok.load(Ordering::SeqCst) {
                n if n >= after + 200 => Ok(()),
                n => Err(format!("{n} ok, {after} before the upgrade")),
            })
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    let new_log =
        std::fs::read_to_string(old.dir.path().join("kanaria-new.log")).unwrap_or_default();
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed requests ({} ok) during the upgrade, first: {:?}\nold log:\n{}\nnew log:\n{new_log}",
        failures.len(),
        ok.load(Ordering::SeqCst),
        failures.iter().take(5).collect::<Vec<_>>(),
        old.log(),
    );
    let r = client().get(old.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the new process serves the admin API too");
    assert!(
        cn.requests.load(Ordering::SeqCst) > 0,
        "the split still runs"
    );
    drop(new);
}
