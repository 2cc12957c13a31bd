//! The access log with real requests: one JSON line per request with its fields, the
//! combined format, and reopening on SIGUSR1 after logrotate renamed the file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{client, eventually, pool, Proxy, Upstream};

fn config(stable: &Upstream, canary: &Upstream, log: &str) -> String {
    format!(
        "[log]\n{log}\n\n[[routes]]\nname = \"app\"\nhosts = [\"app.test\"]\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = 50\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    )
}

/// The file's lines once it has at least `n` (polled; fails after 20 s).
async fn lines(path: &Path, n: usize) -> Vec<String> {
    let what = format!("{n} lines in {}", path.display());
    eventually(&what, Duration::from_secs(20), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        std::future::ready(if lines.len() >= n {
            Ok(lines)
        } else {
            Err(format!("{} of {n} lines:\n{text}", lines.len()))
        })
    })
    .await
}

async fn send(proxy: &Proxy, host: &str, user: &str, id: Option<&str>) -> u16 {
    let mut req = client()
        .get(proxy.url("/lesson?page=2"))
        .header("host", host)
        .header("x-user-id", user);
    if let Some(id) = id {
        req = req.header("x-request-id", id);
    }
    req.send().await.expect("request").status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_for_real_requests_and_reopen_on_sigusr1() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let proxy = Proxy::builder()
        .routes(&config(&stable, &canary, "access = \"access.log\""))
        .start()
        .await;
    let path = proxy.dir.path().join("access.log");

    for i in 0..20 {
        assert_eq!(send(&proxy, "app.test", &format!("u{i}"), None).await, 200);
    }
    assert_eq!(send(&proxy, "app.test", "u0", Some("req-abc")).await, 200);
    assert_eq!(send(&proxy, "other.test", "u0", None).await, 404);

    let got = lines(&path, 22).await;
    assert_eq!(got.len(), 22);
    let parsed: Vec<serde_json::Value> = got
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let first = &parsed[0];
    for key in [
        "time",
        "client",
        "method",
        "host",
        "path",
        "status",
        "bytes",
        "route",
        "track",
        "release",
        "bucket",
        "upstream",
        "upstream_ms",
        "total_ms",
        "retried",
        "request_id",
    ] {
        assert!(first.get(key).is_some(), "no {key} in {first}");
    }
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], "app.test");
    assert_eq!(first["path"], "/lesson?page=2");
    assert_eq!(first["status"], 200);
    assert_eq!(first["route"], "app");
    assert_eq!(first["retried"], false);
    assert!(first["bytes"].as_u64().unwrap() > 0);
    assert!(first["bucket"].as_u64().unwrap() < 10_000);
    assert!(first["upstream_ms"].as_f64().unwrap() >= 0.0);
    assert!(first["total_ms"].as_f64().unwrap() >= first["upstream_ms"].as_f64().unwrap());
    assert_eq!(first["request_id"].as_str().unwrap().len(), 32);
    // Track, release label and upstream agree with each other on every line.
    let mut tracks = std::collections::HashSet::new();
    for l in &parsed[..21] {
        let (want_release, want_addr) = match l["track"].as_str().unwrap() {
            "stable" => ("v1", stable.addr),
            "canary" => ("v2", canary.addr),
            t => panic!("track {t}"),
        };
        assert_eq!(l["release"], want_release, "{l}");
        assert_eq!(l["upstream"], want_addr.to_string(), "{l}");
        tracks.insert(l["track"].as_str().unwrap().to_string());
    }
    assert_eq!(tracks.len(), 2, "20 users at 50 % all on one version");
    assert_eq!(parsed[20]["request_id"], "req-abc");
    // Kanaria's own 404: no route, no track, no upstream.
    assert_eq!(parsed[21]["status"], 404);
    assert_eq!(parsed[21]["route"], serde_json::Value::Null);
    assert_eq!(parsed[21]["upstream"], serde_json::Value::Null);
    let metrics = proxy.metrics().await;
    assert_eq!(
        common::metric(&metrics, "kanaria_access_log_dropped_total"),
        0.0
    );

    // logrotate: rename, then SIGUSR1; new lines go to a new file at the old path.
    let rotated = proxy.dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    assert_eq!(unsafe { libc::kill(proxy.pid() as i32, libc::SIGUSR1) }, 0);
    // The writer reopens on its next wake-up; requests keep flowing meanwhile and must
    // land in one file or the other, none lost.
    let sent = std::cell::Cell::new(0);
    let (p, file, count) = (&proxy, &path, &sent);
    eventually(
        "a new file after SIGUSR1",
        Duration::from_secs(20),
        move || async move {
            if file.exists() {
                return Ok(());
            }
            assert_eq!(send(p, "app.test", "late", None).await, 200);
            count.set(count.get() + 1);
            Err(format!("no new file after {} requests", count.get()))
        },
    )
    .await;
    let sent = sent.get();
    assert_eq!(send(&proxy, "app.test", "after", None).await, 200);
    let new = lines(&path, 1).await;
    let old = std::fs::read_to_string(&rotated).unwrap().lines().count();
    let expected = 22 + sent + 1;
    eventually(
        "every line in one file or the other",
        Duration::from_secs(20),
        || {
            let total = old + std::fs::read_to_string(&path).unwrap().lines().count();
            std::future::ready(if total == expected {
                Ok(())
            } else {
                Err(format!("{total} lines, expected {expected}"))
            })
        },
    )
    .await;
    assert!(new[0].starts_with('{'));
    assert!(
        proxy.log().contains("access log reopened"),
        "{}",
        proxy.log()
    );
    // The process is alive: SIGUSR1 did not kill it.
    assert_eq!(send(&proxy, "app.test", "u1", None).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_format() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let proxy = Proxy::builder()
        .routes(&config(
            &stable,
            &canary,
            "access = \"combined.log\"\nformat = \"combined\"",
        ))
        .start()
        .await;
    let resp = client()
        .get(proxy.url("/a/b"))
        .header("host", "app.test")
        .header("x-user-id", "u1")
        .header("user-agent", "curl/8")
        .header("referer", "http://app.test/")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let line = lines(&proxy.dir.path().join("combined.log"), 1).await[0].clone();
    let re_start = "127.0.0.1 - - [";
    assert!(line.starts_with(re_start), "{line}");
    assert!(line.contains("] \"GET /a/b HTTP/1.1\" 200 "), "{line}");
    assert!(
        line.contains(" \"http://app.test/\" \"curl/8\" route=app track="),
        "{line}"
    );
    assert!(line.contains(" request_id="), "{line}");
}

/// A writer that cannot keep up never slows requests down: lines are dropped and counted.
/// The log is a FIFO whose reader never reads, so the writer blocks once the pipe is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_writer_drops_lines_and_never_blocks_requests() {
    use std::os::unix::fs::OpenOptionsExt;
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stuck.log");
    let c_path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // A reader that never reads, opened without blocking so the proxy's open succeeds.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let proxy = Proxy::builder()
        .routes(&config(
            &stable,
            &canary,
            &format!("access = \"{}\"\nqueue = 8", fifo.display()),
        ))
        .start()
        .await;
    // ~450 bytes a line: the 64 KiB pipe holds ~150 lines, the queue 8 more.
    let c = client();
    for i in 0..600 {
        let r = c
            .get(proxy.url("/"))
            .header("host", "app.test")
            .header("x-user-id", format!("u{i}"))
            .send()
            .await
            .expect("request while the log is stuck");
        assert_eq!(r.status(), 200);
    }
    let dropped = common::metric(&proxy.metrics().await, "kanaria_access_log_dropped_total");
    assert!(dropped >= 100.0, "{dropped} lines dropped of 600");
}
