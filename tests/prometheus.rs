//! A real Prometheus (the Debian `prometheus` binary, loopback only, storage in a tempdir)
//! scrapes a running Kanaria's admin listener with deploy/prometheus/rules.yml loaded; a
//! rollback through the admin API then shows up in Prometheus' query API as
//! `kanaria_rollbacks_total` going from 0 to 1, and the `KanariaCanaryRolledBack` alert fires.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;
mod tools;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{client, eventually_every, pool, ports, Proxy, SeenWithLog, Upstream};
use serde_json::Value;
use tools::{deploy_dir, tool};

/// A Prometheus server child process, killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, evaluating `rules` every second,
    /// on a port the OS picks (read back from `/proc`), and waits until it serves queries.
    async fn start(target: &str, rules: &Path) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: kanaria\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let mut prom = Prometheus {
            child,
            port: 0,
            dir,
        };
        prom.wait_ready().await;
        prom
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Makes what a check saw into a message with Prometheus' log.
    fn seen_with(&self) -> impl Fn(String) -> SeenWithLog {
        let log = self.dir.path().join("prometheus.log");
        move |seen| SeenWithLog {
            seen,
            log: log.clone(),
        }
    }

    /// Panics with the log if Prometheus has exited.
    fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("prometheus exited with {status}:\n{}", self.log());
        }
    }

    /// GETs a JSON API path until `pred` finds what it wants in the answer (60 s at most;
    /// the answer is stale by at most one scrape or evaluation, i.e. one second).
    async fn poll<T>(&mut self, what: &str, path: &str, pred: impl Fn(&Value) -> Option<T>) -> T {
        let (c, pred) = (client(), &pred);
        // The last answer, kept through requests that fail.
        let last = std::cell::RefCell::new(Value::Null);
        let last = &last;
        eventually_every(
            what,
            Duration::from_secs(60),
            Duration::from_millis(100),
            || {
                self.check_running();
                let (request, seen) = (c.get(self.url(path)).send(), self.seen_with());
                async move {
                    if let Ok(r) = request.await {
                        if let Ok(v) = r.json::<Value>().await {
                            if let Some(t) = pred(&v) {
                                return Ok(t);
                            }
                            *last.borrow_mut() = v;
                        }
                    }
                    Err(seen(format!("last answer {:#}", last.borrow())))
                }
            },
        )
        .await
    }

    /// Reads back the port Prometheus listens on, then polls `/-/ready` until it serves
    /// queries.
    async fn wait_ready(&mut self) {
        let c = client();
        eventually_every(
            "prometheus to be ready",
            Duration::from_secs(60),
            Duration::from_millis(50),
            || {
                self.check_running();
                let seen = self.seen_with();
                let listening = match ports::listening_ports(self.child.id())[..] {
                    _ if self.port != 0 => Ok(()),
                    [port] => {
                        self.port = port;
                        Ok(())
                    }
                    ref ports => Err(format!("listening on {ports:?}, waiting for one port")),
                };
                let request = c.get(self.url("/-/ready")).send();
                async move {
                    listening.map_err(&seen)?;
                    match request.await {
                        Ok(r) if r.status() == 200 => Ok(()),
                        Ok(r) => Err(seen(format!("/-/ready answers {}", r.status()))),
                        Err(e) => Err(seen(format!("/-/ready: {e}"))),
                    }
                }
            },
        )
        .await;
    }
}

/// The `result` vector of a successful instant query.
fn result(v: &Value) -> Option<&Vec<Value>> {
    (v["status"] == "success")
        .then(|| v["data"]["result"].as_array())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_kanaria_and_sees_a_rollback() {
    let (stable, canary) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let routes = format!(
        "[[routes]]\nname = \"app\"\ncanary_weight = 50\nsticky_by = [\"header:x-user-id\"]\n{}\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
        pool("routes.canary", "v2", &[canary.addr]),
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .env("KANARIA_ADMIN_TOKEN", "tok")
        .start()
        .await;
    for (status, _) in common::send_users(&proxy, 20, "user").await {
        assert_eq!(status, 200);
    }

    let rules = deploy_dir().join("prometheus/rules.yml");
    let mut prom = Prometheus::start(&format!("127.0.0.1:{}", proxy.admin_port), &rules).await;

    // The rules file loads into a real Prometheus, and the target is scraped.
    prom.poll("the target to be up", "/api/v1/targets", |v| {
        let t = &v["data"]["activeTargets"][0];
        (t["health"] == "up").then_some(())
    })
    .await;
    let groups = prom
        .poll("the rule groups", "/api/v1/rules", |v| {
            v["data"]["groups"]
                .as_array()
                .filter(|g| g.len() == 2)
                .cloned()
        })
        .await;
    let names: Vec<&str> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"KanariaCanaryRolledBack"), "{names:?}");

    // Before the rollback Prometheus has the route's traffic but no rollback.
    let requests = prom
        .poll(
            "kanaria_requests_total",
            "/api/v1/query?query=sum(kanaria_requests_total)",
            |v| {
                result(v)?
                    .first()?
                    .get("value")?
                    .get(1)?
                    .as_str()?
                    .parse::<f64>()
                    .ok()
                    .filter(|n| *n >= 20.0)
            },
        )
        .await;
    assert_eq!(requests, 20.0);
    // Before the rollback the counter is there, at 0 (so `increase()` sees the first one).
    let manual = "/api/v1/query?query=kanaria_rollbacks_total%7Breason%3D%22manual%22%7D";
    let before = prom
        .poll("kanaria_rollbacks_total at 0", manual, |v| {
            result(v).filter(|r| !r.is_empty()).cloned()
        })
        .await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["value"][1], "0");

    // An operator's rollback, through the admin API with the token.
    assert_eq!(proxy.act("rollback", "tok").await, 200);

    // ... is read back through Prometheus' query API.
    let series = prom
        .poll("kanaria_rollbacks_total at 1", manual, |v| {
            result(v)
                .filter(|r| r.iter().any(|s| s["value"][1] == "1"))
                .cloned()
        })
        .await;
    assert_eq!(series.len(), 1, "{series:?}");
    let s = &series[0];
    assert_eq!(s["metric"]["__name__"], "kanaria_rollbacks_total");
    assert_eq!(s["metric"]["route"], "app");
    assert_eq!(s["metric"]["reason"], "manual");
    assert_eq!(s["metric"]["job"], "kanaria");
    assert_eq!(
        s["metric"]["instance"],
        format!("127.0.0.1:{}", proxy.admin_port).as_str()
    );
    assert_eq!(s["value"][1], "1");
    // Every other reason stays at 0, and `increase()` over the scrapes sees this one.
    let all = prom
        .poll(
            "every reason",
            "/api/v1/query?query=kanaria_rollbacks_total",
            |v| result(v).cloned(),
        )
        .await;
    assert_eq!(
        all.len(),
        kanaria::metrics::ROLLBACK_REASONS.len(),
        "{all:?}"
    );
    let total = prom
        .poll(
            "the increase",
            "/api/v1/query?query=sum(increase(kanaria_rollbacks_total%5B5m%5D))",
            |v| {
                result(v)?
                    .first()?
                    .get("value")?
                    .get(1)?
                    .as_str()?
                    .parse::<f64>()
                    .ok()
                    .filter(|n| *n > 0.0)
            },
        )
        .await;
    assert!(total >= 1.0, "increase {total}");

    // The alert rule of deploy/prometheus/rules.yml fires on the same scrape data.
    let alert = prom
        .poll("KanariaCanaryRolledBack firing", "/api/v1/alerts", |v| {
            v["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "KanariaCanaryRolledBack" && a["state"] == "firing"
                })
                .cloned()
        })
        .await;
    assert_eq!(alert["labels"]["route"], "app");
    assert_eq!(alert["labels"]["severity"], "warning");

    // No rule fails to evaluate against Kanaria's real series.
    let rules = prom
        .poll("rule health", "/api/v1/rules", |v| {
            let rules: Vec<Value> = v["data"]["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            rules
                .iter()
                .all(|r| r["health"] != "unknown")
                .then_some(rules)
        })
        .await;
    for r in &rules {
        assert_eq!(
            r["health"], "ok",
            "rule {} failed: {}",
            r["name"], r["lastError"]
        );
    }
}
