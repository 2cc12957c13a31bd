//! The dashboard in a real headless Chromium (Debian `chromium` + `chromium-driver`, driven
//! over the WebDriver protocol): the page loads from the admin listener, its charts fill
//! with live traffic, and its rollback button rolls the canary back. A screenshot is saved
//! as a test artifact (`target/test-artifacts/dashboard.png`). With `[fleet]`, the Fleet
//! card lists the replicas from a real `redis-server`, a rollback clicked on one replica's
//! page reaches the other, and the card says when Redis is gone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::{client, eventually_every, pool, ports, Load, Proxy, Redis, Upstream};
use serde_json::{json, Value};

/// chromedriver on a loopback port, and the Chromium it starts, killed when dropped.
struct Driver {
    child: Child,
    url: String,
    http: reqwest::Client,
    session: Option<String>,
    /// Chromium's profile, removed once it is gone.
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver leads its own process group, and Chromium's processes stay in it:
        // killing the group stops the browser too, whether or not the test ended its
        // WebDriver session (killing chromedriver alone left Chromium running).
        // SAFETY: `kill` with a negative pid signals a process group; no memory is shared.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chromedriver not found: install Debian's chromium and chromium-driver (make deps does)");
        let child = Command::new(bin)
            .arg("--port=0")
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let profile_path = profile.path().display().to_string();
        let mut d = Driver {
            child,
            url: String::new(),
            http: client(),
            session: None,
            _profile: profile,
        };
        // The port the OS gave it (on 127.0.0.1 and ::1), read back from /proc.
        d.url = eventually_every(
            "chromedriver to start",
            Duration::from_secs(20),
            Duration::from_millis(50),
            || {
                if let Ok(Some(status)) = d.child.try_wait() {
                    panic!("chromedriver exited with {status}");
                }
                let port = match ports::listening_ports(d.child.id())[..] {
                    [port] => Ok(port),
                    ref ports => Err(format!("listening on {ports:?}, waiting for one port")),
                };
                let http = d.http.clone();
                async move {
                    let url = format!("http://127.0.0.1:{}", port?);
                    match http.get(format!("{url}/status")).send().await {
                        Ok(r) if r.status().is_success() => Ok(url),
                        Ok(r) => Err(format!("/status answers {}", r.status())),
                        Err(e) => Err(format!("/status: {e}")),
                    }
                }
            },
        )
        .await;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-quic", "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--window-size=1400,1100",
                         format!("--user-data-dir={profile_path}")]
            }
        }}});
        let v = d.call("POST", "/session", caps).await;
        d.session = Some(v["sessionId"].as_str().expect("session id").to_string());
        d
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{}", self.url, path);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let v: Value = req
            .send()
            .await
            .expect("webdriver call")
            .json()
            .await
            .expect("webdriver json");
        assert!(v["value"]["error"].is_null(), "webdriver {path}: {v}");
        v.get("value").cloned().unwrap_or(Value::Null)
    }

    async fn session_call(&self, method: &str, path: &str, body: Value) -> Value {
        let s = self.session.as_ref().expect("session");
        self.call(method, &format!("/session/{s}{path}"), body)
            .await
    }

    async fn script(&self, js: &str) -> Value {
        self.session_call("POST", "/execute/sync", json!({"script": js, "args": []}))
            .await
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .session_call(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|id| id.as_str())
            .expect("element id")
            .to_string()
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.session_call("POST", &format!("/element/{id}/click"), json!({}))
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.session_call(
            "POST",
            &format!("/element/{id}/value"),
            json!({"text": text}),
        )
        .await;
    }

    /// Polls a script until it returns true.
    async fn wait_for(&self, what: &str, js: &str) {
        eventually_every(
            what,
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async {
                match self.script(js).await {
                    Value::Bool(true) => Ok(()),
                    v => Err(format!("the script returned {v}")),
                }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_traffic_and_rolls_back() {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let cfg = format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = 30\n[routes.analysis]\nenabled = false\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    );
    let proxy = Proxy::builder()
        .routes(&cfg)
        .env("KANARIA_ADMIN_TOKEN", "dash-token")
        .start()
        .await;
    let page = client().get(proxy.admin_url("/")).send().await.unwrap();
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'none'"));
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external assets"
    );

    let load = Load::start(proxy.url("/"), 4, 300);
    let driver = Driver::start().await;
    driver
        .session_call("POST", "/url", json!({"url": proxy.admin_url("/")}))
        .await;
    driver
        .wait_for(
            "charts with live data",
            "return window.kanaria.points >= 4 && document.querySelector('[data-route=\"app\"] canvas').getAttribute('data-points') >= 4",
        )
        .await;
    driver
        .wait_for(
            "canary traffic on the page",
            "return /canary\\s*\\d+ req\\/s/.test(document.querySelector('[data-route=\"app\"] [data-field=\"now\"]').innerText) && !/canary\\s*0 req\\/s/.test(document.querySelector('[data-route=\"app\"] [data-field=\"now\"]').innerText)",
        )
        .await;
    let weight = driver
        .script("return document.querySelector('[data-route=\"app\"] [data-field=\"weight\"]').textContent")
        .await;
    assert_eq!(weight, "30%");

    // Without a token the page says so and nothing changes.
    driver
        .click("button[data-route=\"app\"][data-action=\"pause\"]")
        .await;
    driver
        .wait_for(
            "the token hint",
            "return document.getElementById('msg').textContent.includes('admin token')",
        )
        .await;

    driver.type_into("#token", "dash-token").await;
    driver.click("#save-token").await;
    // Rollback needs two clicks.
    driver
        .click("button[data-route=\"app\"][data-action=\"rollback\"]")
        .await;
    assert_eq!(
        proxy.status().await["routes"][0]["rollout_state"],
        "manual",
        "one click does not roll back"
    );
    driver
        .click("button[data-route=\"app\"][data-action=\"rollback\"]")
        .await;
    proxy
        .wait_status("the dashboard's rollback", |s| {
            s["routes"][0]["rollout_state"] == "rolled_back"
        })
        .await;
    driver
        .wait_for(
            "the page to show it",
            "return document.querySelector('[data-route=\"app\"] [data-field=\"state\"]').textContent === 'rolled back' && document.querySelector('#events li[data-kind=\"rollback\"]') !== null",
        )
        .await;
    // Two more polls, so the picture shows the canary line dropping.
    let polls = driver
        .script("return window.kanaria.polls")
        .await
        .as_u64()
        .unwrap();
    driver
        .wait_for(
            "two more polls",
            &format!("return window.kanaria.polls >= {}", polls + 2),
        )
        .await;
    let png = driver.session_call("GET", "/screenshot", json!({})).await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().expect("screenshot"))
        .expect("png");
    assert!(bytes.starts_with(b"\x89PNG"));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.png"), &bytes).unwrap();
    driver.session_call("DELETE", "", json!({})).await;
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
}

/// The Shadow card (the dark launch): the route mirrors every stable user's requests to a
/// canary that answers otherwise (its echo names itself); the card shows the copies and the
/// differing field with an example, and the rollout's shadow step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_card_shows_the_copies_and_the_fields_that_differ() {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let cfg = format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\n[routes.rollout]\nsteps = [{{ shadow = 100, hold = \"1h\" }}, {{ weight = 10 }}]\n[routes.analysis]\nenabled = false\n[routes.shadow]\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    );
    let proxy = Proxy::builder().routes(&cfg).start().await;
    let load = Load::start(proxy.url("/"), 2, 100);
    let driver = Driver::start().await;
    driver
        .session_call("POST", "/url", json!({"url": proxy.admin_url("/")}))
        .await;
    driver
        .wait_for(
            "the differing field on the Shadow card",
            "const b = document.querySelector('[data-route=\"app\"] [data-field=\"shadow\"]'); return b && !b.hidden && !!b.querySelector('[data-diff-field=\"$.upstream\"]')",
        )
        .await;
    let text = driver
        .script("return document.querySelector('[data-route=\"app\"] [data-field=\"shadow\"]').innerText")
        .await;
    let text = text.as_str().unwrap();
    assert!(text.contains("share 100%"), "{text}");
    assert!(
        text.contains("stable \"stable\" → shadow \"canary\""),
        "{text}"
    );
    let steps = driver
        .script("return document.querySelector('[data-route=\"app\"] [data-field=\"source\"]').textContent")
        .await;
    assert!(
        steps.as_str().unwrap().contains("shadow 100% → 10%"),
        "{steps}"
    );
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_card_lists_the_replicas_and_its_rollback_reaches_them_all() {
    let mut redis = Redis::start().await;
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let cfg = format!(
            "[fleet]\nurl = \"{}\"\ncluster = \"dash\"\ninstance = \"{name}\"\npoll_interval = \"250ms\"\n\n[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = 30\n[routes.analysis]\nenabled = false\n{}\n{}",
            redis.url(),
            pool("routes.stable", "v1", &[stable.addr]),
            pool("routes.canary", "v2", &[canary.addr]),
        );
        replicas.push(
            Proxy::builder()
                .routes(&cfg)
                .env("KANARIA_ADMIN_TOKEN", "dash-token")
                .start()
                .await,
        );
    }
    let driver = Driver::start().await;
    driver
        .session_call("POST", "/url", json!({"url": replicas[0].admin_url("/")}))
        .await;
    driver
        .wait_for(
            "both replicas on the Fleet card",
            "const f = document.getElementById('fleet'); return !f.hidden && f.querySelector('li[data-instance=\"a\"]') !== null && f.querySelector('li[data-instance=\"b\"]') !== null && f.querySelector('[data-field=\"fleet-meta\"]').textContent.includes('dash · this replica a · Redis connected')",
        )
        .await;
    // Each member's file decision (its hash), and the primary in use.
    driver
        .wait_for(
            "the members' file hashes and the primary",
            "const f = document.getElementById('fleet'); return f.querySelector('li[data-instance=\"b\"]').textContent.includes(' · file app ') && f.querySelector('[data-field=\"fleet-meta\"]').textContent.includes(' · primary 127.0.0.1:')",
        )
        .await;

    // The rollback clicked on a's page is the fleet's: b rolls back too.
    driver.type_into("#token", "dash-token").await;
    driver.click("#save-token").await;
    for _ in 0..2 {
        driver
            .click("button[data-route=\"app\"][data-action=\"rollback\"]")
            .await;
    }
    replicas[1]
        .wait_status("the rollback from a's dashboard", |s| {
            s["routes"][0]["rollout_state"] == "rolled_back"
        })
        .await;

    // Redis gone: the card says so.
    redis.stop();
    driver
        .wait_for(
            "the card to say Redis is unreachable",
            "return document.querySelector('#fleet [data-field=\"fleet-meta\"]').textContent.includes('Redis NOT reachable')",
        )
        .await;
    driver.session_call("DELETE", "", json!({})).await;
}
