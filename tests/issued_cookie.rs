//! Stickiness for users without an id: `issued_cookie:NAME` in `sticky_by`. Thousands of
//! clients from one address (a school behind one NAT) each get their own random key in a
//! cookie, spread over the versions at the configured share, and stay on their version on
//! later requests, on every replica.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{pool, Proxy, Upstream};

fn route(stable: &Upstream, canary: &Upstream, weight: f64) -> String {
    format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\", \"issued_cookie:kanaria_uid\"]\nissued_cookie_max_age = \"30d\"\ncanary_weight = {weight}\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    )
}

/// A browser-like client: its own cookie jar and connections.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .cookie_store(true)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

struct Seen {
    version: String,
    set_cookie: Option<String>,
}

async fn get(c: &reqwest::Client, url: &str) -> Seen {
    let r = c.get(url).send().await.expect("request through the proxy");
    assert_eq!(r.status(), 200);
    Seen {
        version: r.headers()["x-kanaria-version"]
            .to_str()
            .unwrap()
            .to_string(),
        set_cookie: r
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_from_one_address_spread_and_stay() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let text = route(&stable, &canary, 10.0);
    let a = Arc::new(Proxy::builder().routes(&text).start().await);
    // A second replica with the same config: the key lives in the cookie, not the process.
    let b = Arc::new(Proxy::builder().routes(&text).start().await);

    const CLIENTS: usize = 2000;
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (a, b, sem) = (a.clone(), b.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let c = browser();
            let first = get(&c, &a.url("/lesson")).await;
            let cookie = first.set_cookie.expect("a key issued on the first request");
            // Later requests, on this replica and the other one, carry the cookie: no new
            // key, the same version.
            for url in [a.url("/lesson"), b.url("/quiz"), a.url("/")] {
                let again = get(&c, &url).await;
                assert_eq!(again.set_cookie, None, "a second key was issued");
                assert_eq!(again.version, first.version, "the client changed version");
            }
            (first.version, cookie)
        }));
    }
    let mut canary_users = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (version, cookie) = t.await.expect("client task");
        if version == "canary" {
            canary_users += 1;
        }
        let (pair, attrs) = cookie.split_once("; ").unwrap();
        let id = pair
            .strip_prefix("kanaria_uid=")
            .expect("the cookie's name");
        assert_eq!(id.len(), 32, "{cookie}");
        assert_eq!(attrs, "Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax");
        ids.insert(id.to_string());
    }
    assert_eq!(ids.len(), CLIENTS, "every client got its own key");
    let share = canary_users as f64 / CLIENTS as f64 * 100.0;
    // Binomial spread at 10 % of 2000: sd 0.67 points; ±2 points is 3 sd.
    assert!(
        (8.0..=12.0).contains(&share),
        "{share:.2}% of {CLIENTS} anonymous clients on canary at weight 10"
    );
    // Keyed by client IP, all of them would have been on one version.
    assert!(canary_users > 0 && canary_users < CLIENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_id_wins_and_gets_no_cookie() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let proxy = Proxy::builder()
        .routes(&route(&stable, &canary, 50.0))
        .start()
        .await;
    let c = browser();
    for i in 0..20 {
        let r = c
            .get(proxy.url("/"))
            .header("x-user-id", format!("user-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("set-cookie").is_none());
    }
    // A client that drops cookies gets a new key each time (nothing is kept server-side).
    let plain = common::client();
    let mut keys = std::collections::HashSet::new();
    for _ in 0..5 {
        let r = plain.get(proxy.url("/x")).send().await.unwrap();
        keys.insert(r.headers()["set-cookie"].to_str().unwrap().to_string());
    }
    assert_eq!(keys.len(), 5);
}
