//! Admin API rules for mutations: POST only (405 with `Allow: POST` otherwise), the bearer
//! token in `Authorization` and nowhere else, `Content-Type: application/json` required,
//! and a foreign `Origin` refused: what makes the API safe against cross-site requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use common::{client, pool, Proxy, Upstream};

const TOKEN: &str = "admin-rules-token";

async fn proxy() -> (Proxy, Upstream, Upstream) {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let routes = format!(
        "[[routes]]\nname = \"app\"\ncanary_weight = 10\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr])
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .env("KANARIA_ADMIN_TOKEN", TOKEN)
        .start()
        .await;
    (proxy, stable, canary)
}

async fn weight(proxy: &Proxy) -> f64 {
    proxy.status().await["routes"][0]["effective_weight_percent"]
        .as_f64()
        .expect("weight")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_need_post_token_json_and_same_origin() {
    let (proxy, _s, _c) = proxy().await;
    let c = client();
    let url = proxy.admin_url("/api/v1/routes/app/rollback");
    let bearer = format!("Bearer {TOKEN}");

    for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let r = c
            .request(method.parse().unwrap(), &url)
            .header("authorization", &bearer)
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method}");
        assert_eq!(r.headers()["allow"], "POST", "{method}");
        assert!(r.headers().get("access-control-allow-origin").is_none());
    }

    // A form post (what a forged cross-site form sends), even with the right token: 415.
    let r = c
        .post(&url)
        .header("authorization", &bearer)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("x=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = c
        .post(&url)
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415, "no content type");

    // The token is read from the header only: not from a cookie or the query string.
    let r = c
        .post(format!("{url}?token={TOKEN}"))
        .header("cookie", format!("token={TOKEN}"))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A browser page on another origin is refused even if it somehow had the token.
    let r = c
        .post(&url)
        .header("authorization", &bearer)
        .header("content-type", "application/json")
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        weight(&proxy).await,
        10.0,
        "a refused mutation changed the weight"
    );

    // The same-origin page (a dashboard served by the admin listener) and the CLI work.
    let r = c
        .post(&url)
        .header("authorization", &bearer)
        .header("content-type", "application/json; charset=utf-8")
        .header("origin", format!("http://127.0.0.1:{}", proxy.admin_port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(weight(&proxy).await, 0.0);
    assert!(r_has_no_cookie(&proxy).await);
}

/// No admin answer sets a cookie.
async fn r_has_no_cookie(proxy: &Proxy) -> bool {
    let c = client();
    for path in ["/api/v1/status", "/metrics", "/healthz", "/readyz"] {
        let r = c.get(proxy.admin_url(path)).send().await.unwrap();
        if r.headers().get("set-cookie").is_some() {
            return false;
        }
    }
    true
}
