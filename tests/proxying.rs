//! Proxying through the real binary: routing by host and prefix, forwarded headers,
//! round robin with upstream keep-alive, and the 404 / 502 / 504 answers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use common::{client, pool, Mode, Proxy, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_then_longest_prefix() {
    let web = Upstream::start("web").await;
    let api = Upstream::start("api").await;
    let lessons = Upstream::start("lessons").await;
    let video = Upstream::start("video").await;
    let cfg = format!(
        "[[routes]]\nname = \"web\"\n{}\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\n{}\n\
         [[routes]]\nname = \"lessons\"\nhosts = [\"lessons.example.com\"]\n{}\n\
         [[routes]]\nname = \"video\"\nhosts = [\"lessons.example.com\"]\npath_prefix = \"/video\"\n{}\n",
        pool("routes.stable", "v1", &[web.addr]),
        pool("routes.stable", "v1", &[api.addr]),
        pool("routes.stable", "v1", &[lessons.addr]),
        pool("routes.stable", "v1", &[video.addr]),
    );
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let c = client();
    let cases = [
        (None, "/", "web"),
        (None, "/apix", "web"),
        (None, "/api", "api"),
        (None, "/api/v1/users?x=1", "api"),
        (Some("lessons.example.com"), "/", "lessons"),
        (Some("LESSONS.example.com:8080"), "/video/42", "video"),
        (Some("lessons.example.com"), "/videos", "lessons"),
        // A host with routes but no matching prefix there falls back to any-host routes.
        (Some("other.example.com"), "/api/x", "api"),
    ];
    for (host, path, want) in cases {
        let mut req = c.get(proxy.url(path));
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200, "{host:?} {path}");
        assert_eq!(r.headers()["x-upstream"], want, "{host:?} {path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["path"], path, "path forwarded unchanged");
        if let Some(h) = host {
            assert_eq!(body["headers"]["host"], h, "Host preserved");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_with_a_body() {
    let api = Upstream::start("api").await;
    let cfg = format!(
        "[[routes]]\nname = \"api\"\nhosts = [\"api.example.com\"]\n{}",
        pool("routes.stable", "v1", &[api.addr])
    );
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let r = client()
        .get(proxy.url("/"))
        .header("host", "www.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().contains_key("x-request-id"));
    let body = r.text().await.unwrap();
    assert!(body.contains("no route"), "{body}");
    assert_eq!(api.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_and_request_id() {
    let app = Upstream::start("app").await;
    let cfg = format!(
        "[[routes]]\nname = \"app\"\n{}",
        pool("routes.stable", "v1", &[app.addr])
    );
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let c = client();

    let r = c.get(proxy.url("/a")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(r.headers()["x-kanaria-version"], "stable");
    let body: serde_json::Value = r.json().await.unwrap();
    let h = &body["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(
        h["x-request-id"],
        id.as_str(),
        "same id upstream and to the client"
    );
    assert_eq!(id.len(), 32);

    let r2 = c.get(proxy.url("/a")).send().await.unwrap();
    assert_ne!(
        r2.headers()["x-request-id"].to_str().unwrap(),
        id,
        "ids are unique"
    );

    // An existing id is kept; an existing X-Forwarded-For is appended to.
    let r = c
        .get(proxy.url("/b"))
        .header("x-request-id", "abc-123")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["headers"]["x-request-id"], "abc-123");
    assert_eq!(body["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1");

    // A client that is not a trusted proxy cannot claim https.
    let r = c
        .get(proxy.url("/c"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["headers"]["x-forwarded-proto"], "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_keeps_its_forwarded_proto() {
    let app = Upstream::start("app").await;
    let cfg = format!(
        "[edge]\ntrusted_proxies = [\"127.0.0.1/32\"]\n[[routes]]\nname = \"app\"\n{}",
        pool("routes.stable", "v1", &[app.addr])
    );
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let r = client()
        .get(proxy.url("/a"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");
}

/// What curl sends with `--path-as-is`: the status, the upstream that answered, the path it saw.
fn curl_as_is(port: u16, path: &str) -> (u16, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "--path-as-is", "--max-time", "10", "-D", "-"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let upstream = head
        .lines()
        .find_map(|l| l.strip_prefix("x-upstream: "))
        .unwrap_or_default()
        .to_string();
    let path = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["path"].as_str().map(str::to_string))
        .unwrap_or_default();
    (status, upstream, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_matches_the_normalized_path_like_nginx() {
    let web = Upstream::start("web").await;
    let api = Upstream::start("api").await;
    let cfg = format!(
        "[[routes]]\nname = \"web\"\n{}\n[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\n{}\n",
        pool("routes.stable", "v1", &[web.addr]),
        pool("routes.stable", "v1", &[api.addr]),
    );
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let port = proxy.port;
    let cases = tokio::task::spawn_blocking(move || {
        [
            "/api/../admin",
            "/api/%2e%2e/admin",
            "//api//v1",
            "/x/../api/v1",
            "/api/./v1",
            "/../etc/passwd",
        ]
        .map(|p| (p, curl_as_is(port, p)))
    })
    .await
    .unwrap();
    let want = [
        (200, "web"),
        (200, "web"),
        (200, "api"),
        (200, "api"),
        (200, "api"),
        (400, ""),
    ];
    for ((path, (status, upstream, seen)), (want_status, want_upstream)) in cases.iter().zip(want) {
        assert_eq!(*status, want_status, "{path}");
        assert_eq!(upstream, want_upstream, "{path}");
        if *status == 200 {
            assert_eq!(seen, path, "forwarded as sent");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_header_can_be_renamed_or_turned_off() {
    let app = Upstream::start("app").await;
    let cfg = format!(
        "[[routes]]\nname = \"app\"\n{}",
        pool("routes.stable", "v1", &[app.addr])
    );
    let proxy = Proxy::builder()
        .routes(&cfg)
        .proxy("version_header = \"x-served-by\"")
        .start()
        .await;
    let r = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.headers()["x-served-by"], "stable");
    assert!(!r.headers().contains_key("x-kanaria-version"));
    drop(proxy);

    let proxy = Proxy::builder()
        .routes(&cfg)
        .proxy("add_version_header = false")
        .start()
        .await;
    let r = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("x-kanaria-version"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_over_kept_alive_connections() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let cfg = format!(
        "[[routes]]\nname = \"app\"\n{}",
        pool("routes.stable", "v1", &[a.addr, b.addr])
    );
    // One worker thread: one connection pool, so reuse is observable.
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let c = client();
    use std::sync::atomic::Ordering::SeqCst;
    // The readiness probe already sent one request.
    let before = a.requests.load(SeqCst) + b.requests.load(SeqCst);
    for _ in 0..100 {
        let r = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let (ra, rb) = (a.requests.load(SeqCst), b.requests.load(SeqCst));
    assert_eq!(ra + rb, before + 100);
    assert!((40..=60).contains(&ra), "round robin split a={ra} b={rb}");
    let conns = a.connections.load(SeqCst) + b.connections.load(SeqCst);
    assert!(
        conns <= 10,
        "{conns} upstream connections for 100 sequential requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_pool_is_502_and_timeout_is_504() {
    let hang = Upstream::start("hang").await;
    hang.set_mode(Mode::Hang);
    let dead = common::ports::DeadAddr::new();
    let cfg = format!(
        "[[routes]]\nname = \"dead\"\npath_prefix = \"/dead\"\n{}\n\
         [[routes]]\nname = \"slow\"\npath_prefix = \"/slow\"\nread_timeout = \"300ms\"\n{}",
        pool("routes.stable", "v1", &[dead.addr]),
        pool("routes.stable", "v1", &[hang.addr]),
    );
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let c = client();

    let r = c.get(proxy.url("/dead")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    let body = r.text().await.unwrap();
    assert!(body.starts_with("kanaria: "), "{body}");

    let r = c.get(proxy.url("/slow")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert!(r.text().await.unwrap().contains("timed out"));

    // The proxy is still healthy afterwards.
    let r = c.get(proxy.url("/dead")).send().await.unwrap();
    assert_eq!(r.status(), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_unchanged() {
    let app = Upstream::start("app").await;
    app.set_status(503);
    let cfg = format!(
        "[[routes]]\nname = \"app\"\n{}",
        pool("routes.stable", "v1", &[app.addr])
    );
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let r = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.text().await.unwrap(), "app says 503\n");
}
