//! Automatic rollback with real upstreams that fail, slow down, reset or die: the decision
//! rules, retries that hide a bad canary from users, health checks, progressive steps,
//! blue/green, persisted state across kill -9, and events to a webhook.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use common::{client, eventually, pool, Load, Proxy, Upstream, Webhook};
use serde_json::Value;

const FAST_ANALYSIS: &str =
    "[routes.analysis]\ninterval = \"200ms\"\nwindow = \"10s\"\nmin_requests = 20\n";

fn route(keys: &str, tables: &str, stable: &Upstream, canary: &Upstream) -> String {
    format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\n{keys}\n{tables}\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    )
}

fn app(status: &Value) -> &Value {
    &status["routes"][0]
}

/// Waits until the canary window has seen `n` requests (traffic is flowing).
async fn wait_canary_traffic(proxy: &Proxy, n: u64) {
    proxy
        .wait_status("canary traffic", |s| {
            app(s)["window"]["canary"]["requests"].as_u64() >= Some(n)
        })
        .await;
}

fn events_of(status: &Value, kind: &str) -> Vec<Value> {
    status["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind && e["route"] == "app")
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_rollback_hides_errors_and_stops_canary_traffic() {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let tables = format!("{FAST_ANALYSIS}max_error_rate = 0.1\n");
    let proxy = Proxy::builder()
        .routes(&route("canary_weight = 50", &tables, &stable, &canary))
        .start()
        .await;
    let load = Load::start(proxy.url("/"), 4, 400);
    wait_canary_traffic(&proxy, 50).await;

    canary.set_status(500);
    let failed_at = Instant::now();
    let st = proxy
        .wait_status("the rollback", |s| app(s)["rollout_state"] == "rolled_back")
        .await;
    let took = failed_at.elapsed();
    // Loose: the benchmark measures this; the test only shows it is prompt.
    assert!(took < Duration::from_secs(10), "rollback took {took:?}");
    assert_eq!(app(&st)["effective_weight_percent"], 0.0);
    let rb = events_of(&st, "rollback");
    assert_eq!(rb.len(), 1, "{:#}", st["events"]);
    let reason = rb[0]["reason"].as_str().unwrap().to_string();
    assert!(
        reason == "error_rate" || reason == "error_rate_ratio",
        "{reason}"
    );
    assert!(rb[0]["numbers"]["canary_error_rate"].as_f64().unwrap() > 0.1);
    assert!(rb[0]["numbers"]["canary_requests"].as_u64().unwrap() >= 20);

    // No canary traffic after the switch (requests already in flight aside).
    let after = canary.requests.load(SeqCst);
    let c = client();
    for i in 0..100 {
        let r = c
            .get(proxy.url("/"))
            .header("x-user-id", format!("late-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-kanaria-version"], "stable");
    }
    let (ok, failed) = load.stop().await;
    assert!(
        canary.requests.load(SeqCst) - after <= 8,
        "canary still got traffic"
    );
    assert_eq!(
        failed, 0,
        "users saw errors ({ok} ok): retries on stable must hide them"
    );

    let m = proxy.metrics().await;
    assert!(
        m.contains(&format!(
            "kanaria_rollbacks_total{{reason=\"{reason}\",route=\"app\"}} 1"
        )),
        "{m}"
    );
    assert!(m.contains("kanaria_rollout_state{route=\"app\",state=\"rolled_back\"} 1"));
    assert!(!m.contains("kanaria_retries_total{from=\"canary\",route=\"app\",to=\"stable\"} 0"));
    assert!(
        proxy.log().contains("\"kind\":\"rollback\""),
        "one structured event line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_rollback() {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let tables = format!("{FAST_ANALYSIS}max_p99_latency = \"100ms\"\n");
    let proxy = Proxy::builder()
        .routes(&route("canary_weight = 50", &tables, &stable, &canary))
        .start()
        .await;
    let load = Load::start(proxy.url("/"), 8, 400);
    wait_canary_traffic(&proxy, 30).await;
    canary.set_delay(300);
    let st = proxy
        .wait_status("the latency rollback", |s| {
            app(s)["rollout_state"] == "rolled_back"
        })
        .await;
    let rb = &events_of(&st, "rollback")[0];
    assert_eq!(rb["reason"], "latency");
    assert!(rb["numbers"]["canary_p99_ms"].as_f64().unwrap() > 100.0);
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_error_rollback_without_retries_shows_the_errors() {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let keys = "canary_weight = 50\nretry_on_stable = false";
    let proxy = Proxy::builder()
        .routes(&route(keys, FAST_ANALYSIS, &stable, &canary))
        .start()
        .await;
    let load = Load::start(proxy.url("/"), 4, 400);
    wait_canary_traffic(&proxy, 30).await;
    canary.set_status(503);
    let st = proxy
        .wait_status("the relative rollback", |s| {
            app(s)["rollout_state"] == "rolled_back"
        })
        .await;
    let rb = &events_of(&st, "rollback")[0];
    assert_eq!(rb["reason"], "error_rate_ratio");
    assert!(rb["numbers"]["p_value"].as_f64().unwrap() < 0.01);
    assert_eq!(rb["numbers"]["stable_error_rate"], 0.0);
    let (_, failed) = load.stop().await;
    assert!(failed > 0, "without retries users saw the canary's 503s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_rollback_when_both_fail_alike_or_below_min_requests() {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    stable.set_status(500);
    canary.set_status(500);
    let tables = format!("{FAST_ANALYSIS}max_error_rate = 0.05\n");
    let proxy = Proxy::builder()
        .routes(&route("canary_weight = 50", &tables, &stable, &canary))
        .start()
        .await;
    let load = Load::start(proxy.url("/"), 4, 400);
    wait_canary_traffic(&proxy, 100).await;
    let evals = app(&proxy.status().await)["evaluations"].as_u64().unwrap();
    let st = proxy
        .wait_status("ten more evaluations", |s| {
            app(s)["evaluations"].as_u64() >= Some(evals + 10)
        })
        .await;
    assert_eq!(app(&st)["rollout_state"], "manual", "{:#}", st["events"]);
    assert_eq!(app(&st)["last_verdict"], "pass");
    load.stop().await;
    drop(proxy);

    // A dead canary, but fewer canary requests than min_requests: no verdict.
    stable.set_mode(common::Mode::Ok);
    let tables = FAST_ANALYSIS.replace("min_requests = 20", "min_requests = 100000");
    let proxy = Proxy::builder()
        .routes(&route("canary_weight = 50", &tables, &stable, &canary))
        .start()
        .await;
    let c = client();
    for i in 0..100 {
        c.get(proxy.url("/"))
            .header("x-user-id", format!("u{i}"))
            .send()
            .await
            .unwrap();
    }
    let evals = app(&proxy.status().await)["evaluations"].as_u64().unwrap();
    let st = proxy
        .wait_status("five more evaluations", |s| {
            app(s)["evaluations"].as_u64() >= Some(evals + 5)
        })
        .await;
    assert_eq!(app(&st)["rollout_state"], "manual");
    assert_eq!(app(&st)["last_verdict"], "inconclusive");
    assert!(app(&st)["window"]["canary"]["errors"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_dead_or_resetting_canary() {
    let stable = Upstream::start("stable").await;
    let dead = common::ports::DeadAddr::new();
    let cfg = format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = 50\n[routes.analysis]\nenabled = false\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[dead.addr]),
    );
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let c = client();
    for i in 0..200 {
        let r = c
            .get(proxy.url("/"))
            .header("x-user-id", format!("u{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "user u{i}");
        assert_eq!(r.headers()["x-kanaria-version"], "stable");
    }
    let m = proxy.metrics().await;
    let retried: f64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("kanaria_retries_total{from=\"canary\",route=\"app\",to=\"stable\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        retried > 50.0 && retried < 150.0,
        "{retried} retries for ~100 canary users"
    );
    assert!(m.contains(
        "kanaria_upstream_errors_total{kind=\"connect\",route=\"app\",version=\"canary\"}"
    ));
    drop(proxy);

    // A canary that resets connections: GETs are retried; a POST with a body is not
    // (it may have reached the canary), and fails visibly.
    let canary = Upstream::start("canary").await;
    canary.set_mode(common::Mode::Reset);
    let keys = "canary_weight = 100\n";
    let proxy = Proxy::builder()
        .routes(&route(
            keys,
            "[routes.analysis]\nenabled = false\n",
            &stable,
            &canary,
        ))
        .start()
        .await;
    for i in 0..50 {
        let r = c
            .get(proxy.url("/"))
            .header("x-user-id", format!("u{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = c
        .post(proxy.url("/"))
        .header("x-user-id", "u1")
        .body("payment=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502, "a POST with a body is never replayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_roll_back_a_dead_canary_and_guard_stable() {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let health = "[routes.health]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"500ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 1\n";
    let tables = format!("{health}[routes.analysis]\nenabled = false\n");
    let proxy = Proxy::builder()
        .routes(&route("canary_weight = 50", &tables, &stable, &canary))
        .start()
        .await;
    let st = proxy.status().await;
    assert_eq!(app(&st)["canary"]["endpoints"][0]["healthy"], true);
    canary.set_status(503);
    let st = proxy
        .wait_status("the health rollback", |s| {
            app(s)["rollout_state"] == "rolled_back"
        })
        .await;
    let rb = &events_of(&st, "rollback")[0];
    assert_eq!(rb["reason"], "health_check");
    let m = proxy.metrics().await;
    assert!(
        m.contains(&format!(
            "kanaria_endpoint_healthy{{endpoint=\"{}\",route=\"app\",version=\"canary\"}} 0",
            canary.addr
        )),
        "{m}"
    );
    drop(proxy);

    // Stable down: by default its users get 502, never the canary ...
    canary.set_mode(common::Mode::Ok);
    stable.set_status(503);
    let proxy = Proxy::builder()
        .routes(&route("canary_weight = 1", &tables, &stable, &canary))
        .start()
        .await;
    proxy
        .wait_status("stable to be unhealthy", |s| {
            app(s)["stable"]["endpoints"][0]["healthy"] == false
        })
        .await;
    let c = client();
    let mut saw_502 = false;
    for i in 0..50 {
        let r = c
            .get(proxy.url("/"))
            .header("x-user-id", format!("u{i}"))
            .send()
            .await
            .unwrap();
        if r.status() == 502 {
            saw_502 = true;
        } else {
            assert_eq!(
                r.headers()["x-kanaria-version"],
                "canary",
                "only canary users get answers"
            );
        }
    }
    assert!(saw_502);
    drop(proxy);

    // ... unless configured to serve them from the canary.
    let keys = "canary_weight = 1\nstable_down = \"serve_canary\"";
    let proxy = Proxy::builder()
        .routes(&route(keys, &tables, &stable, &canary))
        .start()
        .await;
    proxy
        .wait_status("stable to be unhealthy", |s| {
            app(s)["stable"]["endpoints"][0]["healthy"] == false
        })
        .await;
    for i in 0..50 {
        let r = c
            .get(proxy.url("/"))
            .header("x-user-id", format!("u{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-kanaria-version"], "canary");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_steps_advance_on_healthy_analysis_and_stop_on_failure() {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let steps = "[routes.rollout]\nsteps = [{ weight = 10, hold = \"1s\" }, { weight = 50, hold = \"1s\" }, { weight = 100 }]\n";
    let tables = format!("{FAST_ANALYSIS}{steps}");
    let proxy = Proxy::builder()
        .routes(&route("", &tables, &stable, &canary))
        .start()
        .await;
    let st = proxy.status().await;
    assert_eq!(app(&st)["rollout_state"], "progressing");
    assert_eq!(app(&st)["effective_weight_percent"], 10.0);
    let load = Load::start(proxy.url("/"), 4, 400);
    let st = proxy
        .wait_status("promotion", |s| app(s)["rollout_state"] == "promoted")
        .await;
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
    assert_eq!(app(&st)["effective_weight_percent"], 100.0);
    let weights: Vec<f64> = events_of(&st, "step")
        .iter()
        .map(|e| e["weight_percent"].as_f64().unwrap())
        .collect();
    assert_eq!(weights, vec![50.0, 100.0]);
    assert_eq!(events_of(&st, "promoted").len(), 1);
    drop(proxy);

    // A failing canary stops the rollout at its step and rolls back.
    let steps = "[routes.rollout]\nsteps = [{ weight = 20, hold = \"1h\" }, { weight = 100 }]\n";
    let tables = format!("{FAST_ANALYSIS}{steps}");
    let proxy = Proxy::builder()
        .routes(&route("", &tables, &stable, &canary))
        .start()
        .await;
    let load = Load::start(proxy.url("/"), 4, 400);
    wait_canary_traffic(&proxy, 30).await;
    canary.set_status(500);
    let st = proxy
        .wait_status("the rollback", |s| app(s)["rollout_state"] == "rolled_back")
        .await;
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
    assert_eq!(app(&st)["effective_weight_percent"], 0.0);
    assert!(events_of(&st, "step").is_empty(), "never advanced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_cut_over_and_switch_back() {
    let (blue, green) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let steps = "[routes.rollout]\nsteps = [{ weight = 100 }]\n";
    let tables = format!("{FAST_ANALYSIS}max_error_rate = 0.05\n{steps}");
    let proxy = Proxy::builder()
        .routes(&route("", &tables, &blue, &green))
        .start()
        .await;
    proxy
        .wait_status("the cut-over", |s| app(s)["rollout_state"] == "promoted")
        .await;
    let c = client();
    for i in 0..50 {
        let r = c
            .get(proxy.url("/"))
            .header("x-user-id", format!("u{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-upstream"], "canary", "every user on green");
    }
    let load = Load::start(proxy.url("/"), 4, 400);
    green.set_status(500);
    let st = proxy
        .wait_status("the switch back", |s| {
            app(s)["rollout_state"] == "rolled_back"
        })
        .await;
    assert_eq!(events_of(&st, "rollback")[0]["reason"], "error_rate");
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0, "retries on blue hid green's failure");
    for i in 0..50 {
        let r = c
            .get(proxy.url("/"))
            .header("x-user-id", format!("u{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()["x-upstream"],
            "stable",
            "every user back on blue"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_kill_9_and_new_versions_start_afresh() {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let state = tempfile::tempdir().unwrap();
    let steps = "[routes.rollout]\nsteps = [{ weight = 10, hold = \"1h\" }, { weight = 50, hold = \"1h\" }, { weight = 100 }]\n";
    let cfg = |version: &str| {
        format!(
            "[state]\ndir = \"{}\"\n\n{}",
            state.path().display(),
            route("", &format!("{FAST_ANALYSIS}{steps}"), &stable, &canary)
                .replace("version = \"v2\"", &format!("version = \"{version}\""))
        )
    };

    let proxy = Proxy::builder()
        .routes(&cfg("v2"))
        .env("KANARIA_ADMIN_TOKEN", "t")
        .start()
        .await;
    assert_eq!(proxy.act("promote", "t").await, 200);
    let st = proxy.status().await;
    assert_eq!(app(&st)["rollout"]["step"], 1);
    assert_eq!(app(&st)["effective_weight_percent"], 50.0);
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(state.path().join("app.json")).unwrap())
            .unwrap();
    assert_eq!(saved["canary_version"], "v2");
    assert_eq!(saved["phase"]["state"], "progressing");
    drop(proxy); // SIGKILL

    let proxy = Proxy::builder()
        .routes(&cfg("v2"))
        .env("KANARIA_ADMIN_TOKEN", "t")
        .start()
        .await;
    let st = proxy.status().await;
    assert_eq!(
        app(&st)["rollout_state"],
        "progressing",
        "resumed after kill -9"
    );
    assert_eq!(app(&st)["rollout"]["step"], 1);
    assert_eq!(app(&st)["effective_weight_percent"], 50.0);
    assert_eq!(events_of(&st, "restored").len(), 1);
    assert_eq!(proxy.act("rollback", "t").await, 200);
    drop(proxy);

    let proxy = Proxy::builder()
        .routes(&cfg("v2"))
        .env("KANARIA_ADMIN_TOKEN", "t")
        .start()
        .await;
    let st = proxy.status().await;
    assert_eq!(
        app(&st)["rollout_state"],
        "rolled_back",
        "a rolled-back version stays rolled back"
    );
    assert_eq!(app(&st)["effective_weight_percent"], 0.0);
    drop(proxy);

    let proxy = Proxy::builder()
        .routes(&cfg("v3"))
        .env("KANARIA_ADMIN_TOKEN", "t")
        .start()
        .await;
    let st = proxy.status().await;
    assert_eq!(
        app(&st)["rollout_state"],
        "progressing",
        "a new version starts afresh"
    );
    assert_eq!(app(&st)["rollout"]["step"], 0);
    assert_eq!(app(&st)["effective_weight_percent"], 10.0);
    drop(proxy);

    // A corrupt state file: a clear error, the safe side, no crash; an operator resumes.
    std::fs::write(state.path().join("app.json"), "{ torn").unwrap();
    let proxy = Proxy::builder()
        .routes(&cfg("v3"))
        .env("KANARIA_ADMIN_TOKEN", "t")
        .start()
        .await;
    let st = proxy.status().await;
    assert_eq!(app(&st)["rollout_state"], "rolled_back");
    assert_eq!(app(&st)["phase"]["reason"], "state_unreadable");
    assert!(
        proxy.log().contains("app.json: not a Kanaria state file"),
        "{}",
        proxy.log()
    );
    assert_eq!(proxy.act("resume", "t").await, 200);
    let st = proxy.status().await;
    assert_eq!(app(&st)["rollout_state"], "progressing");
    assert_eq!(app(&st)["effective_weight_percent"], 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_pause_resume_promote_and_webhook_events() {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let hook = Webhook::start().await;
    let steps = "[routes.rollout]\nsteps = [{ weight = 5, hold = \"1h\" }, { weight = 100 }]\n";
    let cfg = format!(
        "[notify]\nwebhook_url = \"http://{}/hooks/kanaria\"\n\n{}",
        hook.addr,
        route("", &format!("{FAST_ANALYSIS}{steps}"), &stable, &canary)
    );
    let proxy = Proxy::builder()
        .routes(&cfg)
        .env("KANARIA_ADMIN_TOKEN", "t")
        .start()
        .await;
    assert_eq!(proxy.act("resume", "t").await, 409, "nothing to resume");
    assert_eq!(proxy.act("pause", "t").await, 200);
    assert_eq!(app(&proxy.status().await)["rollout_state"], "paused");
    assert_eq!(proxy.act("pause", "t").await, 409);
    assert_eq!(proxy.act("resume", "t").await, 200);
    assert_eq!(app(&proxy.status().await)["rollout_state"], "progressing");
    assert_eq!(proxy.act("promote", "t").await, 200);
    let st = proxy.status().await;
    assert_eq!(app(&st)["rollout"]["step"], 1);
    assert_eq!(proxy.act("rollback", "t").await, 200);

    let kinds = eventually(
        "the rollback at the webhook",
        Duration::from_secs(20),
        || {
            let kinds: Vec<String> = hook
                .events()
                .iter()
                .map(|e| e["kind"].as_str().unwrap_or("").to_string())
                .collect();
            std::future::ready(if kinds.contains(&"rollback".to_string()) {
                Ok(kinds)
            } else {
                Err(format!("webhook got {kinds:?}"))
            })
        },
    )
    .await;
    assert!(kinds.contains(&"paused".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"resumed".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"step".to_string()), "{kinds:?}");
    let rb = hook
        .events()
        .into_iter()
        .find(|e| e["kind"] == "rollback")
        .unwrap();
    assert_eq!(rb["route"], "app");
    assert_eq!(rb["reason"], "manual");
    assert_eq!(rb["to"], "rolled_back");
}
