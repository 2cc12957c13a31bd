//! The user split through the real proxy: share, stickiness, monotone weight changes and
//! overrides, with two real upstreams.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::collections::HashMap;

use common::{client, pool, version_for, Proxy, Upstream};

fn route(weight: f64, stable: &Upstream, canary: &Upstream, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\", \"cookie:session\", \"client_ip\"]\ncanary_weight = {weight}\n{extra}\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    )
}

/// Sends each user once (16 at a time) and returns user → version.
async fn assign(proxy: &Proxy, users: impl Iterator<Item = String>) -> HashMap<String, String> {
    let c = client();
    let url = proxy.url("/lesson");
    let users: Vec<String> = users.collect();
    let mut out = HashMap::new();
    for chunk in users.chunks(16) {
        let results = futures_join(chunk.iter().map(|u| {
            let (c, url, u) = (c.clone(), url.clone(), u.clone());
            async move {
                let v = version_for(&c, &url, &u).await;
                (u, v)
            }
        }))
        .await;
        out.extend(results);
    }
    out
}

async fn futures_join<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_stickiness_and_monotone_raise() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let users = || (0..3000).map(|i| format!("student-{i}"));

    let proxy = Proxy::builder()
        .routes(&route(10.0, &stable, &canary, ""))
        .start()
        .await;
    let first = assign(&proxy, users()).await;
    let on_canary = first.values().filter(|v| *v == "canary").count();
    let share = on_canary as f64 / 3000.0 * 100.0;
    assert!(
        (8.5..=11.5).contains(&share),
        "{share:.2}% of 3000 users on canary at weight 10"
    );

    // Sticky: the same users again, in another order, get the same versions.
    let again = assign(&proxy, users().rev()).await;
    assert_eq!(first, again, "a user changed version between requests");

    // Restart (a new process, same config): same assignment.
    drop(proxy);
    let proxy = Proxy::builder()
        .routes(&route(10.0, &stable, &canary, ""))
        .start()
        .await;
    let restarted = assign(&proxy, users()).await;
    assert_eq!(first, restarted, "a user changed version across a restart");

    // Raise 10 -> 30: no canary user goes back to stable, and the share grows.
    drop(proxy);
    let proxy = Proxy::builder()
        .routes(&route(30.0, &stable, &canary, ""))
        .start()
        .await;
    let raised = assign(&proxy, users()).await;
    for (user, v) in &first {
        if v == "canary" {
            assert_eq!(raised[user], "canary", "{user} moved back to stable at 30%");
        }
    }
    let share30 = raised.values().filter(|v| *v == "canary").count() as f64 / 30.0;
    assert!(
        (27.0..=33.0).contains(&share30),
        "{share30:.2}% at weight 30"
    );

    // The version header matches the upstream that answered.
    let c = client();
    for u in ["student-1", "student-2", "student-3"] {
        let resp = c
            .get(proxy.url("/"))
            .header("x-user-id", u)
            .send()
            .await
            .unwrap();
        let said = resp.headers()["x-kanaria-version"]
            .to_str()
            .unwrap()
            .to_string();
        let served = resp.headers()["x-upstream"].to_str().unwrap().to_string();
        assert_eq!(said, served);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_key_and_client_ip_fallback_are_sticky() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let proxy = Proxy::builder()
        .routes(&route(50.0, &stable, &canary, ""))
        .start()
        .await;
    let c = client();
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        let cookie = format!("theme=dark; session=s{i}");
        let mut versions = std::collections::HashSet::new();
        for _ in 0..5 {
            let r = c
                .get(proxy.url("/"))
                .header("cookie", &cookie)
                .send()
                .await
                .unwrap();
            versions.insert(
                r.headers()["x-kanaria-version"]
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(versions.len(), 1, "session s{i} saw {versions:?}");
        seen.extend(versions);
    }
    assert_eq!(
        seen.len(),
        2,
        "50% of 40 sessions should reach both versions"
    );

    // No header, no cookie: the client IP decides, the same way every time.
    let mut by_ip = std::collections::HashSet::new();
    for _ in 0..10 {
        let r = c.get(proxy.url("/")).send().await.unwrap();
        by_ip.insert(
            r.headers()["x-kanaria-version"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(by_ip.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_header_and_cookie() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let extra = "override_header = \"x-kanaria-version\"\noverride_cookie = \"kv\"";
    let proxy = Proxy::builder()
        .routes(&route(0.0, &stable, &canary, extra))
        .start()
        .await;
    let c = client();
    for (header, want) in [
        ("canary", "canary"),
        ("v2", "canary"),
        ("stable", "stable"),
        ("v1", "stable"),
        ("nonsense", "stable"),
    ] {
        let r = c
            .get(proxy.url("/"))
            .header("x-user-id", "someone")
            .header("x-kanaria-version", header)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-upstream"], want, "override {header}");
    }
    let r = c
        .get(proxy.url("/"))
        .header("cookie", "kv=canary")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-upstream"], "canary", "override cookie");

    // At 100%, "stable" still forces stable.
    drop(proxy);
    let proxy = Proxy::builder()
        .routes(&route(100.0, &stable, &canary, extra))
        .start()
        .await;
    let r = c
        .get(proxy.url("/"))
        .header("x-kanaria-version", "stable")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-upstream"], "stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_ignored_when_disabled_or_untrusted() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    async fn forced(proxy: &Proxy) -> String {
        common::served_by(
            proxy,
            &[("x-user-id", "someone"), ("x-kanaria-version", "canary")],
        )
        .await
    }

    // No override_header configured: the header is just a header.
    let proxy = Proxy::builder()
        .routes(&route(0.0, &stable, &canary, ""))
        .start()
        .await;
    assert_eq!(forced(&proxy).await, "stable");
    drop(proxy);

    // Only 10.0.0.0/8 may override; the test client is 127.0.0.1.
    let extra =
        "override_header = \"x-kanaria-version\"\noverride_trusted_cidrs = [\"10.0.0.0/8\"]";
    let proxy = Proxy::builder()
        .routes(&route(0.0, &stable, &canary, extra))
        .start()
        .await;
    assert_eq!(forced(&proxy).await, "stable");
    drop(proxy);

    // Loopback trusted: honoured.
    let extra = "override_header = \"x-kanaria-version\"\noverride_trusted_cidrs = [\"127.0.0.0/8\", \"::1\"]";
    let proxy = Proxy::builder()
        .routes(&route(0.0, &stable, &canary, extra))
        .start()
        .await;
    assert_eq!(forced(&proxy).await, "canary");
}
