//! HTTP/2 with real clients: `curl --http2` over TLS (ALPN), `curl --http2-prior-knowledge`
//! on a plain listener with `h2c = true`, `h2load` as a load client with 0 errors, the split
//! and overrides deciding alike on HTTP/2 and HTTP/1.1; and gRPC: h2c upstreams answering
//! with `grpc-status` trailers, whose canary starts answering UNAVAILABLE and is rolled back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::path::Path;

use common::certs::{write_pair, TestCa};
use common::grpc::{frame, GrpcUpstream};
use common::{client, pool, version_for, Proxy, Upstream};

/// `curl` with `args`; returns (the `%{http_version} %{http_code}` line, response headers).
fn curl(args: &[&str]) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--noproxy",
            "*",
            "-D",
            "-",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "\n%{http_version} %{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (headers, last) = text.rsplit_once('\n').unwrap_or(("", &text));
    (last.trim().to_string(), headers.to_ascii_lowercase())
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_and_h2c_splits_like_http1() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new("CA");
    let ca_path = ca.write(certs.path(), "ca.pem");
    let (cert, key) = write_pair(certs.path(), "site", &ca.leaf(&["app.test"]));
    let tls = format!(
        "[[proxy.tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let routes = format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = 50\noverride_header = \"x-kanaria-version\"\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .proxy("h2c = true")
        .tls(&tls)
        .start()
        .await;
    let tls_port = proxy.tls_port();
    let plain = proxy.url("/");
    let tls_url = format!("https://app.test:{tls_port}/");
    let resolve = format!("app.test:{tls_port}:127.0.0.1");
    let ca_arg = ca_path.display().to_string();

    // The same users get the same versions over HTTP/2 (TLS and h2c) as over HTTP/1.1.
    let c = client();
    for i in 0..16 {
        let user = format!("user-{i}");
        let h1 = version_for(&c, &plain, &user).await;
        let id = format!("x-user-id: {user}");
        let (line, headers) = tokio::task::spawn_blocking({
            let (id, plain) = (id.clone(), plain.clone());
            move || curl(&["--http2-prior-knowledge", "-H", &id, &plain])
        })
        .await
        .unwrap();
        assert_eq!(line, "2 200", "h2c");
        assert_eq!(header(&headers, "x-kanaria-version"), Some(h1.as_str()));
        let (line, headers) = tokio::task::spawn_blocking({
            let (id, url, resolve, ca) = (id, tls_url.clone(), resolve.clone(), ca_arg.clone());
            move || {
                curl(&[
                    "--http2",
                    "--cacert",
                    &ca,
                    "--resolve",
                    &resolve,
                    "-H",
                    &id,
                    &url,
                ])
            }
        })
        .await
        .unwrap();
        assert_eq!(line, "2 200", "HTTP/2 over TLS");
        assert_eq!(header(&headers, "x-kanaria-version"), Some(h1.as_str()));
    }
    // An override on HTTP/2.
    let (line, headers) = tokio::task::spawn_blocking({
        let plain = plain.clone();
        move || {
            curl(&[
                "--http2-prior-knowledge",
                "-H",
                "x-user-id: user-1",
                "-H",
                "x-kanaria-version: canary",
                &plain,
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(line, "2 200");
    assert_eq!(header(&headers, "x-upstream"), Some("canary"));
    // Plain HTTP/1.1 clients are still served on the h2c listener, and TLS offers 1.1 too.
    let (line, _) = tokio::task::spawn_blocking({
        let (url, resolve, ca) = (tls_url.clone(), resolve.clone(), ca_arg.clone());
        move || curl(&["--http1.1", "--cacert", &ca, "--resolve", &resolve, &url])
    })
    .await
    .unwrap();
    assert_eq!(line, "1.1 200");

    // h2load: many streams on few connections, h2c and TLS, no error.
    for url in [plain.clone(), format!("https://127.0.0.1:{tls_port}/")] {
        let out = tokio::task::spawn_blocking(move || {
            common::h2load::run(&["-n", "2000", "-c", "4", "-m", "8", &url])
        })
        .await
        .unwrap();
        assert!(out.contains("h2"), "not HTTP/2:\n{out}");
        assert_eq!(common::h2load::counts(&out), (2000, 0, 0), "h2load:\n{out}");
        assert!(out.contains("2000 2xx"), "{out}");
    }
}

/// h2load sending gRPC-shaped unary calls (POST, gRPC content type, `te: trailers`).
fn grpc_load(url: &str, body: &Path, n: usize) -> String {
    let n = n.to_string();
    common::h2load::run(&[
        "-n",
        &n,
        "-c",
        "2",
        "-m",
        "4",
        "-d",
        &body.display().to_string(),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        url,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_canary_answering_unavailable_is_rolled_back() {
    let stable = GrpcUpstream::start("stable").await;
    let canary = GrpcUpstream::start("canary").await;
    let eps = |u: &GrpcUpstream| format!("[\"{}\"]", u.addr);
    // Every call is a new anonymous user (h2load keeps no cookies): an issued key each,
    // so the calls spread over both versions.
    let routes = format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"issued_cookie:uid\"]\ncanary_weight = 50\n\
         [routes.analysis]\ninterval = \"200ms\"\nwindow = \"10s\"\nmin_requests = 20\nmax_error_rate = 0.1\n\
         [routes.stable]\nversion = \"v1\"\nprotocol = \"h2c\"\nendpoints = {}\n\
         [routes.canary]\nversion = \"v2\"\nprotocol = \"h2c\"\nendpoints = {}\n",
        eps(&stable),
        eps(&canary),
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .proxy("h2c = true")
        .start()
        .await;
    let body = proxy.dir.path().join("call.bin");
    std::fs::write(&body, frame(b"hello")).unwrap();
    let url = proxy.url("/school.Lessons/Get");

    // Healthy: both versions answer grpc-status 0; no rollback.
    let out = tokio::task::spawn_blocking({
        let (url, body) = (url.clone(), body.clone());
        move || grpc_load(&url, &body, 200)
    })
    .await
    .unwrap();
    assert_eq!(common::h2load::counts(&out), (200, 0, 0), "{out}");
    assert!(stable.requests.load(std::sync::atomic::Ordering::SeqCst) > 20);
    assert!(canary.requests.load(std::sync::atomic::Ordering::SeqCst) > 20);
    assert!(
        canary
            .saw_grpc_headers
            .load(std::sync::atomic::Ordering::SeqCst),
        "the upstream did not get te: trailers and the gRPC content type"
    );
    let st = proxy.status().await;
    assert_ne!(st["routes"][0]["rollout_state"], "rolled_back", "{st:#}");
    assert_eq!(st["routes"][0]["window"]["canary"]["errors"], 0, "{st:#}");

    // The canary starts failing with UNAVAILABLE in its trailers (HTTP status still 200).
    canary.set_status(14);
    // Calls in batches until the analysis (which judges whole seconds after the phase
    // began) rolls the canary back; bounded.
    let mut st = proxy.status().await;
    for _ in 0..100 {
        if st["routes"][0]["rollout_state"] == "rolled_back" {
            break;
        }
        let out = tokio::task::spawn_blocking({
            let (url, body) = (url.clone(), body.clone());
            move || grpc_load(&url, &body, 50)
        })
        .await
        .unwrap();
        // HTTP-wise every call succeeds: only grpc-status tells the canary is broken.
        assert_eq!(common::h2load::counts(&out).1, 0, "{out}");
        st = proxy.status().await;
    }
    assert_eq!(st["routes"][0]["rollout_state"], "rolled_back", "{st:#}");
    let rollback = st["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "rollback")
        .cloned()
        .expect("a rollback event");
    assert!(rollback.to_string().contains("error_rate"), "{rollback:#}");
    // After the rollback every call goes to stable.
    let before = canary.requests.load(std::sync::atomic::Ordering::SeqCst);
    let out = tokio::task::spawn_blocking(move || grpc_load(&url, &body, 100))
        .await
        .unwrap();
    assert_eq!(common::h2load::counts(&out), (100, 0, 0), "{out}");
    assert_eq!(
        canary.requests.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
}

/// The request-header deadline (`edge.header_timeout`, against HTTP/1 slowloris) does not
/// apply to HTTP/2 connections, whose frames interleave many requests: one h2 connection
/// serves calls for longer than the deadline without being cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_outlive_the_http1_header_deadline() {
    let stable = Upstream::start("stable").await;
    let routes = format!(
        "[edge]\nheader_timeout = \"1s\"\n\n[[routes]]\nname = \"app\"\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .proxy("h2c = true")
        .start()
        .await;
    let url = proxy.url("/");
    // One connection, a request every 100 ms for 3 s.
    let out = tokio::task::spawn_blocking(move || {
        common::h2load::run(&["-c", "1", "-D", "3", "--rps", "10", &url])
    })
    .await
    .unwrap();
    let (ok, failed, errored) = common::h2load::counts(&out);
    assert!(ok >= 20, "{out}");
    assert_eq!((failed, errored), (0, 0), "{out}");
    assert_eq!(
        stable.connections.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// The HTTP/2 limits from `[edge]` are what the server announces in its SETTINGS, and a
/// dead canary is retried on stable for HTTP/2 clients as for HTTP/1.1 ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_limits_are_announced_and_retries_on_stable_work() {
    let stable = Upstream::start("stable").await;
    let dead = common::ports::DeadAddr::new();
    let routes = format!(
        "[edge]\nh2_max_concurrent_streams = 7\nh2_max_header_list_size = 4096\n\n[[routes]]\nname = \"app\"\ncanary_weight = 100\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[dead.addr]),
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .proxy("h2c = true")
        .start()
        .await;
    let url = proxy.url("/");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("nghttp")
            .args(["-nv", &url])
            .output()
            .expect("run nghttp")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let settings = text
        .lines()
        .skip_while(|l| !l.contains("recv SETTINGS frame"))
        .take(6)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        settings.contains("SETTINGS_MAX_CONCURRENT_STREAMS(0x03):7"),
        "{text}"
    );
    assert!(
        settings.contains("SETTINGS_MAX_HEADER_LIST_SIZE(0x06):4096"),
        "{text}"
    );
    // The canary refuses connections: the HTTP/2 request is answered by stable.
    assert!(text.contains(":status: 200"), "{text}");
    let (line, headers) = tokio::task::spawn_blocking({
        let url = proxy.url("/");
        move || curl(&["--http2-prior-knowledge", &url])
    })
    .await
    .unwrap();
    assert_eq!(line, "2 200");
    assert_eq!(header(&headers, "x-upstream"), Some("stable"));
    let st = proxy.status().await;
    assert!(
        st["routes"][0]["totals"]["retried_on_stable"].as_u64() >= Some(2),
        "{st:#}"
    );
}
