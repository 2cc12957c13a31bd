//! A fleet of three real `kanaria run` replicas sharing rollout state through a real
//! `redis-server` (Debian's), with real upstreams and clients: operator actions anywhere,
//! rollbacks everywhere, the same users on the same versions, Redis down and back, the
//! subscription killed, a restart that adopts the fleet's state before it is ready.

mod common;

use std::time::{Duration, Instant};

use common::{client, pool, Load, Proxy, Redis, Upstream};
use serde_json::Value;

const TOKEN: &str = "fleet-secret";

/// Three replicas of one config (each its own ports and `instance`), a `[fleet]` on `redis`.
struct Fleet {
    replicas: Vec<Proxy>,
    _stable: Upstream,
    canary: Upstream,
}

fn route_of(s: &Value) -> &Value {
    &s["routes"][0]
}

fn state_of(s: &Value) -> &str {
    route_of(s)["rollout_state"].as_str().unwrap_or("")
}

fn weight_of(s: &Value) -> f64 {
    route_of(s)["effective_weight_percent"]
        .as_f64()
        .unwrap_or(-1.0)
}

fn step_of(s: &Value) -> Option<u64> {
    route_of(s)["phase"]["step"].as_u64()
}

impl Fleet {
    /// `rollout` is extra TOML for the route (e.g. `[routes.rollout]`), `fleet_extra` extra
    /// `[fleet]` keys, `state`: whether each replica persists to a state dir.
    async fn start(redis: &Redis, canary_weight: f64, rollout: &str, fleet_extra: &str) -> Fleet {
        let stable = Upstream::start("stable").await;
        let canary = Upstream::start("canary").await;
        let mut replicas = Vec::new();
        for name in ["a", "b", "c"] {
            let state = tempfile::tempdir().expect("state dir").keep();
            let routes = format!(
                "[state]\ndir = \"{}\"\n\n[fleet]\nurl = \"{}\"\ncluster = \"test\"\ninstance = \"{name}\"\npoll_interval = \"500ms\"\n{fleet_extra}\n\n[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = {canary_weight}\n{}{}{rollout}\n[routes.analysis]\nenabled = false\n",
                state.display(),
                redis.url(),
                pool("routes.stable", "stable", &[stable.addr]),
                pool("routes.canary", "canary", &[canary.addr]),
            );
            replicas
                .push(Proxy::launch(&routes, "", "", "", &[("KANARIA_ADMIN_TOKEN", TOKEN)]).await);
        }
        let fleet = Fleet {
            replicas,
            _stable: stable,
            canary,
        };
        // Every replica sees all three members.
        for r in &fleet.replicas {
            r.wait_status("three members", |s| {
                s["fleet"]["members"].as_array().map(Vec::len) == Some(3)
            })
            .await;
        }
        fleet
    }

    async fn act(&self, i: usize, action: &str, body: &str) -> (u16, Value) {
        let r = client()
            .post(self.replicas[i].admin_url(&format!("/api/v1/routes/app/{action}")))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("admin action");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits until every replica's status satisfies `pred`.
    async fn converge(&self, what: &str, pred: impl Fn(&Value) -> bool + Copy) -> Vec<Value> {
        let mut out = Vec::new();
        for r in &self.replicas {
            out.push(r.wait_status(what, pred).await);
        }
        out
    }
}

/// Which version served each of `n` users (by `x-kanaria-version`), with 32 clients at once.
async fn versions(proxy: &Proxy, n: usize) -> Vec<String> {
    let url = proxy.url("/");
    let mut tasks = Vec::new();
    for w in 0..32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut out = Vec::new();
            for i in (w..n).step_by(32) {
                out.push((i, common::version_for(&c, &url, &format!("user-{i}")).await));
            }
            out
        }));
    }
    let mut all = vec![String::new(); n];
    for t in tasks {
        for (i, v) in t.await.expect("client task") {
            all[i] = v;
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_action_on_one_replica_applies_to_all_and_users_map_identically() {
    let redis = Redis::start().await;
    let fleet = Fleet::start(&redis, 20.0, "", "").await;
    let users = 10_000;
    let before: Vec<Vec<String>> = {
        let mut v = Vec::new();
        for r in &fleet.replicas {
            v.push(versions(r, users).await);
        }
        v
    };
    assert_eq!(
        before[0], before[1],
        "replicas a and b map users differently"
    );
    assert_eq!(
        before[0], before[2],
        "replicas a and c map users differently"
    );
    let on_canary = before[0].iter().filter(|v| *v == "canary").count();
    assert!(
        (1_500..2_500).contains(&on_canary),
        "{on_canary} of {users} on the canary at 20%"
    );

    // The weight set through replica b is the fleet's: a and c apply it.
    let (code, body) = fleet.act(1, "weight", r#"{"percent": 50}"#).await;
    assert_eq!(code, 200, "{body}");
    let seen = fleet
        .converge("the weight set on b", |s| weight_of(s) == 50.0)
        .await;
    let generations: Vec<u64> = seen
        .iter()
        .map(|s| route_of(s)["fleet_generation"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        generations.iter().all(|g| *g == generations[0] && *g > 0),
        "{generations:?}"
    );
    let events = seen[0]["events"].as_array().cloned().unwrap_or_default();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "adopted"
                && e["reason"].as_str().is_some_and(|r| r.contains("by b"))),
        "replica a's events say where the change came from: {events:?}"
    );
    let after: Vec<Vec<String>> = {
        let mut v = Vec::new();
        for r in &fleet.replicas {
            v.push(versions(r, users).await);
        }
        v
    };
    assert_eq!(
        after[0], after[1],
        "after the change, a and b map users differently"
    );
    assert_eq!(
        after[0], after[2],
        "after the change, a and c map users differently"
    );
    // Sticky: nobody on the canary at 20% left it at 50%.
    for (b, a) in before[0].iter().zip(&after[0]) {
        assert!(
            !(b == "canary" && a == "stable"),
            "a user left the canary on a raise"
        );
    }
    // Status names every member and what it applied.
    let members = seen[2]["fleet"]["members"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = members
        .iter()
        .filter_map(|m| m["instance"].as_str())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(seen[2]["fleet"]["connected"], true);
    assert_eq!(seen[2]["fleet"]["stale"], false);
    let metrics = fleet.replicas[0].metrics().await;
    assert_eq!(common::metric(&metrics, "kanaria_fleet_connected"), 1.0);
    assert_eq!(common::metric(&metrics, "kanaria_fleet_members"), 3.0);
    assert_eq!(
        common::metric(&metrics, "kanaria_fleet_generation{route=\"app\"}"),
        generations[0] as f64
    );
}
