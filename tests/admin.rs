//! The admin listener: status JSON and Prometheus metrics checked against real traffic,
//! token-guarded mutations that move real users, and the `kanaria status` / `weight` /
//! `rollback` commands.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::process::Command;

use common::{client, metric, pool, Proxy, Upstream};

fn route(weight: f64, stable: &Upstream, canary: &Upstream) -> String {
    format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = {weight}\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    )
}

/// Sends `n` users once each; returns how many were served by the canary.
async fn send_users(proxy: &Proxy, n: usize, prefix: &str) -> usize {
    common::send_users(proxy, n, prefix)
        .await
        .iter()
        .filter(|(_, v)| v == "canary")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_match_the_traffic() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    canary.set_status(503);
    // Raw accounting: no retry on stable, no automatic rollback.
    let cfg = route(50.0, &stable, &canary).replace(
        "canary_weight = 50",
        "canary_weight = 50\nretry_on_stable = false\n[routes.analysis]\nenabled = false",
    );
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let to_canary = send_users(&proxy, 200, "u").await;
    assert!(to_canary > 50 && to_canary < 150, "{to_canary}");

    let m = proxy.metrics().await;
    let canary_5xx = metric(
        &m,
        "kanaria_requests_total{code_class=\"5xx\",route=\"app\",version=\"canary\"}",
    );
    let stable_2xx = metric(
        &m,
        "kanaria_requests_total{code_class=\"2xx\",route=\"app\",version=\"stable\"}",
    );
    assert_eq!(canary_5xx as usize, to_canary, "{m}");
    assert_eq!(stable_2xx as usize, 200 - to_canary);
    assert_eq!(
        metric(
            &m,
            "kanaria_upstream_errors_total{kind=\"5xx\",route=\"app\",version=\"canary\"}"
        ) as usize,
        to_canary
    );
    assert_eq!(
        metric(
            &m,
            "kanaria_request_duration_seconds_count{route=\"app\",version=\"stable\"}"
        ) as usize,
        200 - to_canary
    );
    assert_eq!(
        metric(&m, "kanaria_canary_weight_percent{route=\"app\"}"),
        50.0
    );
    assert_eq!(
        metric(&m, "kanaria_rollout_state{route=\"app\",state=\"manual\"}"),
        1.0
    );
    assert_eq!(metric(&m, "kanaria_config_generation"), 1.0);
    assert_eq!(
        metric(&m, "kanaria_config_reloads_total{result=\"success\"}"),
        1.0
    );
    let ep = format!(
        "kanaria_endpoint_healthy{{endpoint=\"{}\",route=\"app\",version=\"canary\"}}",
        canary.addr
    );
    assert_eq!(metric(&m, &ep), 1.0, "{m}");
    assert!(m.contains("kanaria_pool_info{release=\"v2\",route=\"app\",version=\"canary\"} 1"));

    let s = proxy.status().await;
    let r = &s["routes"][0];
    assert_eq!(r["name"], "app");
    assert_eq!(r["stable"]["version"], "v1");
    assert_eq!(r["canary"]["version"], "v2");
    assert_eq!(r["effective_weight_percent"], 50.0);
    assert_eq!(r["configured_weight_percent"], 50.0);
    assert_eq!(r["weight_source"], "file");
    assert_eq!(r["rollout_state"], "manual");
    assert_eq!(
        r["canary"]["endpoints"][0]["address"],
        canary.addr.to_string()
    );
    assert_eq!(r["canary"]["endpoints"][0]["healthy"], true);
    assert_eq!(s["config_generation"], 1);
    assert_eq!(s["last_reload"]["ok"], true);
    let (wc, ws) = (&r["window"]["canary"], &r["window"]["stable"]);
    assert_eq!(wc["requests"].as_u64(), Some(to_canary as u64), "{r:#}");
    assert_eq!(wc["errors"].as_u64(), Some(to_canary as u64));
    assert_eq!(wc["error_rate"], 1.0);
    assert_eq!(ws["requests"].as_u64(), Some((200 - to_canary) as u64));
    assert_eq!(ws["errors"], 0);
    assert!(ws["p99_ms"].as_f64().unwrap() > 0.0);
    assert!(ws["p50_ms"].as_f64().unwrap() <= ws["p99_ms"].as_f64().unwrap());

    let c = client();
    assert_eq!(
        c.get(proxy.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(proxy.admin_url("/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        c.post(proxy.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        405
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_are_refused_without_a_configured_token() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let proxy = Proxy::builder()
        .routes(&route(10.0, &stable, &canary))
        .start()
        .await;
    let r = client()
        .post(proxy.admin_url("/api/v1/routes/app/rollback"))
        .header("authorization", "Bearer anything")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("admin.token_file") && body.contains("KANARIA_ADMIN_TOKEN"),
        "{body}"
    );
    assert_eq!(
        proxy.status().await["routes"][0]["effective_weight_percent"],
        10.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guarded_weight_rollback_and_promote_move_users() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let admin_extra = format!("token_file = \"{}\"", token_file.display());
    let proxy = Proxy::builder()
        .routes(&route(10.0, &stable, &canary))
        .admin(&admin_extra)
        .start()
        .await;
    let c = client();
    let post = |path: &str, token: Option<&str>, body: Option<&str>| {
        // Every mutation is JSON (the CSRF rule), with or without a body.
        let mut req = c
            .post(proxy.admin_url(path))
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        req.send()
    };
    let w = "/api/v1/routes/app/weight";
    assert_eq!(
        post(w, None, Some("{\"percent\": 100}"))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        post(w, Some("wrong"), Some("{\"percent\": 100}"))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        post(w, Some("s3cret-token"), Some("{\"percent\": 130}"))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        post(w, Some("s3cret-token"), Some("not json"))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        post(
            "/api/v1/routes/nope/weight",
            Some("s3cret-token"),
            Some("{\"percent\": 5}")
        )
        .await
        .unwrap()
        .status(),
        404
    );
    assert_eq!(
        post("/api/v1/routes/app/pause", Some("s3cret-token"), None)
            .await
            .unwrap()
            .status(),
        409
    );
    assert_eq!(
        c.get(proxy.admin_url(w)).send().await.unwrap().status(),
        405
    );

    let r = post(w, Some("s3cret-token"), Some("{\"percent\": 100}"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        send_users(&proxy, 50, "a").await,
        50,
        "at 100% every user is on canary"
    );
    let s = proxy.status().await;
    assert_eq!(s["routes"][0]["effective_weight_percent"], 100.0);
    assert_eq!(s["routes"][0]["configured_weight_percent"], 10.0);
    assert_eq!(s["routes"][0]["weight_source"], "admin");

    let r = post("/api/v1/routes/app/rollback", Some("s3cret-token"), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The answer names the version the rollback holds.
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (&body["rollout_state"], &body["canary_version"]),
        (&serde_json::json!("rolled_back"), &serde_json::json!("v2")),
        "{body:#}"
    );
    assert_eq!(
        send_users(&proxy, 50, "b").await,
        0,
        "after rollback nobody is on canary"
    );
    let s = proxy.status().await;
    assert_eq!(s["routes"][0]["rollout_state"], "rolled_back");
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "kanaria_rollbacks_total{reason=\"manual\",route=\"app\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "kanaria_rollout_state{route=\"app\",state=\"rolled_back\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "kanaria_canary_weight_percent{route=\"app\"}"),
        0.0
    );

    // A rollback holds across reloads, even one that edits the weight: only a new canary
    // version or an operator's resume ends it.
    let gen = proxy.generation().await;
    let changed = proxy.config_text(&route(20.0, &stable, &canary));
    let s = proxy.write_config_and_wait(&changed, gen).await;
    assert_eq!(s["routes"][0]["rollout_state"], "rolled_back");
    assert_eq!(s["routes"][0]["effective_weight_percent"], 0.0);

    // The latch: a weight cannot end a rollback; only a resume (or a new version) does.
    let r = post(w, Some("s3cret-token"), Some("{\"percent\": 50}"))
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body = r.text().await.unwrap();
    assert!(body.contains("resume it first"), "{body}");
    let r = post("/api/v1/routes/app/resume", Some("s3cret-token"), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // An operator's weight holds across a reload that leaves the route alone ...
    let r = post(w, Some("s3cret-token"), Some("{\"percent\": 50}"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let gen = proxy.generation().await;
    let same = proxy.config_text_of(
        &proxy
            .spec()
            .routes(&route(20.0, &stable, &canary))
            .proxy("# touched"),
    );
    let s = proxy.write_config_and_wait(&same, gen).await;
    assert_eq!(s["routes"][0]["weight_source"], "admin");
    assert_eq!(s["routes"][0]["effective_weight_percent"], 50.0);
    // ... and ends when the file changes the route.
    let gen = s["config_generation"].as_u64().unwrap();
    let changed = proxy.config_text(&route(30.0, &stable, &canary));
    let s = proxy.write_config_and_wait(&changed, gen).await;
    assert_eq!(s["routes"][0]["weight_source"], "file");
    assert_eq!(s["routes"][0]["effective_weight_percent"], 30.0);

    let r = post("/api/v1/routes/app/promote", Some("s3cret-token"), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        proxy.status().await["routes"][0]["rollout_state"],
        "promoted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_status_weight_and_rollback() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let proxy = Proxy::builder()
        .routes(&route(10.0, &stable, &canary))
        .env("KANARIA_ADMIN_TOKEN", "tok")
        .start()
        .await;
    let admin = format!("127.0.0.1:{}", proxy.admin_port);
    let run = |args: &[&str], token: Option<&str>| {
        let mut cmd = Command::new(common::kanaria_bin());
        cmd.args(args)
            .arg("--admin")
            .arg(&admin)
            .env_remove("KANARIA_ADMIN_TOKEN");
        if let Some(t) = token {
            cmd.env("KANARIA_ADMIN_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["status"], None);
    assert_eq!(code, Some(0));
    assert!(out.contains("ROUTE"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("app "))
        .expect("a row for app");
    for want in ["v1", "v2", "10", "file", "manual", "stable 1/1 canary 1/1"] {
        assert!(row.contains(want), "{want:?} in {row:?}");
    }

    let (code, _, err) = run(&["weight", "app", "30"], None);
    assert_eq!(code, Some(1));
    assert!(err.contains("401"), "{err}");
    let (code, out, err) = run(&["weight", "app", "30"], Some("tok"));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("canary weight 30"), "{out}");
    assert_eq!(
        proxy.status().await["routes"][0]["effective_weight_percent"],
        30.0
    );

    let (code, out, _) = run(&["rollback", "app"], Some("tok"));
    assert_eq!(code, Some(0));
    assert!(out.contains("rolled_back"), "{out}");
    let (_, out, _) = run(&["status"], None);
    assert!(out.contains("rolled_back"), "{out}");
    let (code, _, err) = run(&["pause", "app"], Some("tok"));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("409") && err.contains("resume it first"),
        "{err}"
    );
    let (code, out, err) = run(&["resume", "app"], Some("tok"));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("manual"), "{out}");
    let (_, out, _) = run(&["status"], None);
    let row = out
        .lines()
        .find(|l| l.starts_with("app "))
        .expect("a row for app");
    assert!(row.contains("file") && row.contains("manual"), "{row}");
}
