//! Signed overrides and the trusted client address: with `override_secret` only signed,
//! unexpired tokens for this route force a version; the override header and cookie never
//! reach the app; honoured overrides are counted; `X-Forwarded-For` is believed only from
//! `edge.trusted_proxies`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::collections::HashSet;
use std::process::Command;

use common::{client, kanaria_bin, metric, pool, Proxy, Upstream};
use kanaria::split::override_token::{unix_now, OverrideKey};

const SECRET: &str = "test-secret-0123456789-0123456789-abcdef";

async fn served_by(
    proxy: &Proxy,
    header: Option<&str>,
    cookie: Option<&str>,
) -> (String, serde_json::Value) {
    let mut req = client()
        .get(proxy.url("/"))
        .header("x-user-id", "always-stable-user");
    if let Some(h) = header {
        req = req.header("x-kanaria-version", h);
    }
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req.send().await.expect("request");
    assert_eq!(resp.status(), 200);
    let version = resp.headers()["x-kanaria-version"]
        .to_str()
        .unwrap()
        .to_string();
    (version, resp.json().await.expect("echo"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_signed_unexpired_tokens_for_this_route_are_honoured() {
    let stable = Upstream::start("v1").await;
    let canary = Upstream::start("v2").await;
    let routes = format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = 0\noverride_header = \"x-kanaria-version\"\noverride_cookie = \"kv\"\noverride_secret = \"{SECRET}\"\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr])
    );
    let proxy = Proxy::builder().routes(&routes).start().await;

    // The CLI signs with the route's secret from the config.
    let out = Command::new(kanaria_bin())
        .args([
            "sign-override",
            "--version",
            "canary",
            "--ttl",
            "1h",
            "--route",
            "app",
            "-c",
        ])
        .arg(&proxy.config_path)
        .output()
        .expect("sign-override");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("k1:canary:"), "{token}");

    // Unsigned values no longer work once a secret is set.
    assert_eq!(served_by(&proxy, Some("canary"), None).await.0, "stable");
    // A signed token does, in the header or the cookie, and the app never sees it.
    let (v, echo) = served_by(&proxy, Some(&token), None).await;
    assert_eq!(v, "canary");
    assert!(echo["headers"].get("x-kanaria-version").is_none(), "{echo}");
    let (v, echo) = served_by(&proxy, None, Some(&format!("a=1; kv={token}"))).await;
    assert_eq!(v, "canary");
    assert_eq!(echo["headers"]["cookie"], "a=1", "{echo}");

    let key = OverrideKey::new(SECRET.as_bytes(), "app").unwrap();
    let expired = key.sign("canary", unix_now() - 1);
    assert_eq!(served_by(&proxy, Some(&expired), None).await.0, "stable");
    let tampered = token.replacen("k1:canary:", "k1:v2:", 1);
    assert_eq!(served_by(&proxy, Some(&tampered), None).await.0, "stable");
    let other_route = OverrideKey::new(SECRET.as_bytes(), "other")
        .unwrap()
        .sign("canary", unix_now() + 3600);
    assert_eq!(
        served_by(&proxy, Some(&other_route), None).await.0,
        "stable"
    );
    let wrong_secret = OverrideKey::new(b"another-secret-of-at-least-32-bytes!!", "app")
        .unwrap()
        .sign("canary", unix_now() + 3600);
    assert_eq!(
        served_by(&proxy, Some(&wrong_secret), None).await.0,
        "stable"
    );

    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "kanaria_overrides_total{route=\"app\",version=\"canary\"}"
        ),
        2.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_override_refuses_without_a_secret() {
    let out = Command::new(kanaria_bin())
        .args(["sign-override", "--version", "canary", "--route", "app"])
        .env_remove("KANARIA_OVERRIDE_SECRET")
        .output()
        .expect("sign-override");
    assert!(!out.status.success());
    let out = Command::new(kanaria_bin())
        .args([
            "sign-override",
            "--version",
            "canary",
            "--route",
            "app",
            "--ttl",
            "10m",
        ])
        .env("KANARIA_OVERRIDE_SECRET", SECRET)
        .output()
        .expect("sign-override");
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let key = OverrideKey::new(SECRET.as_bytes(), "app").unwrap();
    assert_eq!(
        key.verify(token.trim().as_bytes(), unix_now()),
        Ok("canary")
    );
}

async fn versions_by_xff(proxy: &Proxy) -> Vec<String> {
    let c = client();
    let mut out = Vec::new();
    for i in 0..40 {
        let r = c
            .get(proxy.url("/"))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .send()
            .await
            .expect("request");
        out.push(
            r.headers()["x-kanaria-version"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    let stable = Upstream::start("v1").await;
    let canary = Upstream::start("v2").await;
    let route = format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"client_ip\"]\ncanary_weight = 50\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr])
    );
    // Untrusted peer: the claimed addresses are ignored, everyone is 127.0.0.1.
    let proxy = Proxy::builder().routes(&route).start().await;
    let seen: HashSet<String> = versions_by_xff(&proxy).await.into_iter().collect();
    assert_eq!(
        seen.len(),
        1,
        "XFF from an untrusted peer moved users: {seen:?}"
    );
    drop(proxy);

    // Loopback trusted: each forwarded address is its own sticky user.
    let proxy = Proxy::builder()
        .routes(&format!(
            "[edge]\ntrusted_proxies = [\"127.0.0.1\"]\n\n{route}"
        ))
        .start()
        .await;
    let first = versions_by_xff(&proxy).await;
    let seen: HashSet<&String> = first.iter().collect();
    assert_eq!(
        seen.len(),
        2,
        "forwarded addresses were not used: {first:?}"
    );
    assert_eq!(
        versions_by_xff(&proxy).await,
        first,
        "not sticky per forwarded address"
    );
}
