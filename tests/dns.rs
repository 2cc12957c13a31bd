//! Endpoints given by name are looked up again while Kanaria runs: against a DNS server
//! the test runs on loopback (`[resolver]`), whose answers the test changes. Upstreams
//! listen on 127.0.0.2 and 127.0.0.3 (all of 127.0.0.0/8 is loopback on Linux) on one port,
//! since an A record carries no port.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::dns::{Answer, DnsServer};
use common::{client, eventually, metric, Proxy, Upstream};

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Upstreams named `names[i]` on 127.0.0.(2+i), all on one port.
async fn upstreams_on_one_port(names: &[&str]) -> Vec<Upstream> {
    for _ in 0..20 {
        let first = Upstream::start_on(names[0], SocketAddr::new(ip(2), 0))
            .await
            .expect("bind 127.0.0.2");
        let port = first.addr.port();
        let mut all = vec![first];
        for (i, name) in names.iter().enumerate().skip(1) {
            match Upstream::start_on(name, SocketAddr::new(ip(2 + i as u8), port)).await {
                Ok(u) => all.push(u),
                Err(_) => break,
            }
        }
        if all.len() == names.len() {
            return all;
        }
    }
    panic!("no port free on every address");
}

/// `[resolver]` pointed at the test's DNS server.
fn resolver(dns: &DnsServer, timeout: &str) -> String {
    format!(
        "[resolver]\nnameservers = [\"{}\"]\ntimeout = \"{timeout}\"\n\n",
        dns.addr
    )
}

/// The stable pool's endpoint addresses in a status.
fn stable_endpoints(s: &serde_json::Value) -> Vec<String> {
    s["routes"][0]["stable"]["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Clients sending GETs until stopped (at most 20,000 each), counting answers by the
/// upstream that served them and every failure.
struct Traffic {
    stop: Arc<AtomicBool>,
    served: Arc<Mutex<HashMap<String, u64>>>,
    failed: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(url: String, workers: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let served: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let failed = Arc::new(AtomicU64::new(0));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let handles = (0..workers)
            .map(|_| {
                let (stop, served, failed, failures, url) = (
                    stop.clone(),
                    served.clone(),
                    failed.clone(),
                    failures.clone(),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let c = client();
                    for _ in 0..20_000 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        match c.get(&url).send().await {
                            Ok(r) if r.status() == 200 => {
                                let by = r
                                    .headers()
                                    .get("x-upstream")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("?")
                                    .to_string();
                                *served.lock().unwrap().entry(by).or_default() += 1;
                            }
                            other => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                let what = match other {
                                    Ok(r) => format!("{}: {:?}", r.status(), r.text().await),
                                    Err(e) => e.to_string(),
                                };
                                failures.lock().unwrap().push(what);
                            }
                        }
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            served,
            failed,
            failures,
            handles,
        }
    }

    fn served_by(&self, name: &str) -> u64 {
        self.served.lock().unwrap().get(name).copied().unwrap_or(0)
    }

    /// Waits until `name` served at least `n` answers (fails after 20 s).
    async fn wait_served(&self, name: &str, n: u64) {
        let what = format!("{n} answers from {name}");
        eventually(&what, Duration::from_secs(20), || {
            std::future::ready(if self.served_by(name) >= n {
                Ok(())
            } else {
                Err(format!("served: {:?}", self.served.lock().unwrap()))
            })
        })
        .await
    }

    /// Stops the clients; returns (answers by upstream, failures).
    async fn stop(self) -> (HashMap<String, u64>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            let _ = h.await;
        }
        let served = self.served.lock().unwrap().clone();
        let failures = self.failures.lock().unwrap().clone();
        assert_eq!(failures.len() as u64, self.failed.load(Ordering::SeqCst));
        (served, failures)
    }
}

/// Under continuous load, the name's answer gains an address, then loses the old one: the
/// new upstream gets traffic, the removed one stops getting any, a reload in between
/// keeps the current addresses, and not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoint_set_changes_under_load_with_no_failed_request() {
    let dns = DnsServer::start().await;
    let ups = upstreams_on_one_port(&["a", "b"]).await;
    let port = ups[0].addr.port();
    dns.set("app.test", Answer::Addrs(vec![ip(2)]));
    let routes = format!(
        "{}[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"app.test:{port}\"]\n[routes.health]\ninterval = \"200ms\"\n",
        resolver(&dns, "1s")
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .proxy("resolve_interval = \"200ms\"")
        .start()
        .await;
    let (a, b) = (format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}"));
    assert_eq!(stable_endpoints(&proxy.status().await), [a.as_str()]);

    let load = Traffic::start(proxy.url("/"), 4);
    load.wait_served("a", 100).await;

    // A second address: served within a few intervals, both endpoints health-checked.
    dns.set("app.test", Answer::Addrs(vec![ip(2), ip(3)]));
    let s = proxy
        .wait_status("both addresses", |s| {
            stable_endpoints(s) == [a.clone(), b.clone()]
        })
        .await;
    let names = &s["routes"][0]["stable"]["names"][0];
    assert_eq!(names["name"], format!("app.test:{port}"));
    assert_eq!(names["addresses"], serde_json::json!([a, b]));
    assert_eq!(names["last_error"], serde_json::Value::Null);
    load.wait_served("b", 100).await;
    let a_with_both = load.served_by("a");
    load.wait_served("b", load.served_by("b") + 200).await;
    assert!(
        load.served_by("a") > a_with_both,
        "the old address stopped getting traffic while it was still listed"
    );

    // The old address leaves: once the status shows it gone, requests starting from then
    // on never reach it (those already under way may finish there: at most one a client).
    dns.set("app.test", Answer::Addrs(vec![ip(3)]));
    proxy
        .wait_status("only the new address", |s| {
            stable_endpoints(s) == [b.clone()]
        })
        .await;
    let a_at_removal = load.served_by("a");
    load.wait_served("b", load.served_by("b") + 300).await;
    let a_after = load.served_by("a");
    assert!(
        a_after <= a_at_removal + 4,
        "the removed address still got traffic: {a_at_removal} -> {a_after}"
    );

    // A reload (a change elsewhere in the file) keeps the re-resolved addresses.
    let generation = proxy.generation().await;
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    let edited = text.replace(
        "name = \"app\"\n",
        "name = \"app\"\nretry_on_stable = false\n",
    );
    assert_ne!(text, edited);
    let s = proxy.write_config_and_wait(&edited, generation).await;
    assert!(s["last_reload"]["ok"].as_bool().unwrap(), "{s:#}");
    assert_eq!(stable_endpoints(&s), [b.as_str()]);
    load.wait_served("b", load.served_by("b") + 100).await;

    let (served, failures) = load.stop().await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(served.get("a").copied().unwrap_or(0) <= a_after);
    let total: u64 = served.values().sum();
    println!("answers: {served:?} ({total} in all, 0 failed)");
    let m = proxy.metrics().await;
    let series = format!(
        "kanaria_dns_failures_total{{name=\"app.test:{port}\",route=\"app\",version=\"stable\"}}"
    );
    assert_eq!(metric(&m, &series), 0.0, "{m}");
    assert!(m.contains(&series), "{m}");
}

/// A lookup that fails (SERVFAIL, then no answer at all) keeps the last addresses serving
/// and says so in status and metrics; a name that never resolved leaves its pool empty,
/// with why in status and a clean 502, unless `stable_down = "serve_canary"` sends its
/// users to a canary that resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_lookups_keep_the_last_addresses_and_unresolved_names_say_why() {
    let dns = DnsServer::start().await;
    let ups = upstreams_on_one_port(&["a", "b"]).await;
    let port = ups[0].addr.port();
    dns.set("app.test", Answer::Addrs(vec![ip(2)]));
    dns.set("canary.test", Answer::Addrs(vec![ip(3)]));
    // ghost.test is not in the table: NXDOMAIN.
    let routes = format!(
        "{}[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"app.test:{port}\"]\n\n\
         [[routes]]\nname = \"ghost\"\npath_prefix = \"/ghost\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"ghost.test:{port}\"]\n\n\
         [[routes]]\nname = \"fallback\"\npath_prefix = \"/fallback\"\nstable_down = \"serve_canary\"\n\
         [routes.stable]\nversion = \"v1\"\nendpoints = [\"ghost.test:{port}\"]\n\
         [routes.canary]\nversion = \"v2\"\nendpoints = [\"canary.test:{port}\"]\n",
        resolver(&dns, "300ms")
    );
    let proxy = Proxy::builder()
        .routes(&routes)
        .proxy("resolve_interval = \"200ms\"")
        .start()
        .await;
    let c = client();
    let a = format!("127.0.0.2:{port}");

    // The name that never resolved: an empty pool, why in status, a clean 502.
    let s = proxy.status().await;
    let ghost = &s["routes"][1]["stable"];
    assert_eq!(ghost["endpoints"], serde_json::json!([]), "{s:#}");
    assert_eq!(ghost["names"][0]["resolved"], false);
    let why = ghost["empty_reason"].as_str().expect("empty_reason");
    assert!(why.contains(&format!("ghost.test:{port}")), "{why}");
    let r = c.get(proxy.url("/ghost")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert_eq!(
        body,
        "kanaria: no upstream endpoint: the pool's endpoint names do not resolve\n"
    );
    // With serve_canary, its users get the canary, which resolves.
    let r = c.get(proxy.url("/fallback")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream"], "b");
    assert_eq!(r.headers()["x-kanaria-version"], "canary");

    // SERVFAIL: the last addresses stay, status and metrics say so.
    let series = format!(
        "kanaria_dns_failures_total{{name=\"app.test:{port}\",route=\"app\",version=\"stable\"}}"
    );
    assert_eq!(metric(&proxy.metrics().await, &series), 0.0);
    dns.set("app.test", Answer::ServFail);
    let s = proxy
        .wait_status("a failed lookup", |s| {
            s["routes"][0]["stable"]["names"][0]["failures"].as_u64() >= Some(2)
        })
        .await;
    let name = &s["routes"][0]["stable"]["names"][0];
    assert!(name["last_error"].as_str().is_some(), "{name:#}");
    assert_eq!(name["addresses"], serde_json::json!([a]));
    assert!(name["last_success_unix_ms"].as_u64().is_some());
    assert_eq!(stable_endpoints(&s), [a.as_str()]);
    let r = c.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream"], "a");
    assert!(metric(&proxy.metrics().await, &series) >= 2.0);

    // No answer at all (the lookup times out): the same.
    let before = s["routes"][0]["stable"]["names"][0]["failures"]
        .as_u64()
        .unwrap();
    dns.set("app.test", Answer::Silent);
    let s = proxy
        .wait_status("lookups timing out", |s| {
            s["routes"][0]["stable"]["names"][0]["failures"].as_u64() >= Some(before + 2)
        })
        .await;
    assert_eq!(stable_endpoints(&s), [a.as_str()]);
    let r = c.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(r.headers()["x-upstream"], "a");

    // Answers again: the error clears; a name that resolves at last fills its pool.
    dns.set("app.test", Answer::Addrs(vec![ip(2)]));
    dns.set("ghost.test", Answer::Addrs(vec![ip(3)]));
    let s = proxy
        .wait_status("recovered lookups", |s| {
            s["routes"][0]["stable"]["names"][0]["last_error"].is_null()
                && s["routes"][1]["stable"]["endpoints"][0]["address"].is_string()
        })
        .await;
    assert_eq!(
        s["routes"][1]["stable"]["empty_reason"],
        serde_json::Value::Null
    );
    let r = c.get(proxy.url("/ghost")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream"], "b");
    assert!(proxy.log().contains("lookup failed"), "{}", proxy.log());
    assert!(dns.queries.load(Ordering::SeqCst) > 0);
}
