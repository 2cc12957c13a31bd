//! The dark launch (`[routes.shadow]`, issue 22) with real upstreams and a real Kanaria:
//! stable's users' requests copied to the canary after their answer went out, the answers
//! compared field by field with stable's own noise told apart, only listed methods
//! mirrored, and a dead or hanging shadow costing users nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{client, eventually, metric, pool, Proxy, Upstream};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// A request an app server saw.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    marked: bool,
    body: Vec<u8>,
}

/// A JSON app: `/items/ID` and `/users/ID` answer `{"id", "name", "price", "tags", "ts"}`,
/// `ts` a fresh counter (a field that differs between any two answers: noise). With
/// `price_bump`, `/items/ID`'s price is one more (the difference to find). With `hang`,
/// nothing is answered.
struct App {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    hang: Arc<AtomicBool>,
    /// With a capacity, each request takes 30 ms and one arriving while that many are in
    /// flight is answered 503 (an app that fails only under more load than it has).
    capacity: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

static TS: AtomicU64 = AtomicU64::new(1);

impl App {
    async fn start(price_bump: u64) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hang = Arc::new(AtomicBool::new(false));
        let capacity = Arc::new(AtomicU64::new(0));
        let in_flight = Arc::new(AtomicU64::new(0));
        let (s, h, cap, busy) = (seen.clone(), hang.clone(), capacity.clone(), in_flight);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, h, cap, busy) = (s.clone(), h.clone(), cap.clone(), busy.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, h, cap, busy) = (s.clone(), h.clone(), cap.clone(), busy.clone());
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let marked = req.headers().contains_key("x-kanaria-shadow");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            s.lock().unwrap().push(Seen {
                                method,
                                path: path.clone(),
                                marked,
                                body: body.to_vec(),
                            });
                            if h.load(Ordering::SeqCst) {
                                std::future::pending::<()>().await;
                            }
                            let cap = cap.load(Ordering::SeqCst);
                            if cap > 0 {
                                let n = busy.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(30)).await;
                                busy.fetch_sub(1, Ordering::SeqCst);
                                if n >= cap {
                                    return Ok(Response::builder()
                                        .status(503)
                                        .body(Full::new(Bytes::from_static(b"busy")))
                                        .unwrap());
                                }
                            }
                            let id: u64 = path.rsplit('/').next().unwrap().parse().unwrap_or(0);
                            let bump = if path.starts_with("/items/") {
                                price_bump
                            } else {
                                0
                            };
                            let doc = json!({
                                "id": id,
                                "name": format!("thing {id}"),
                                "price": 10 + bump,
                                "tags": ["a", "b"],
                                "ts": TS.fetch_add(1, Ordering::SeqCst),
                            });
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(doc.to_string())))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        App {
            addr,
            seen,
            hang,
            capacity,
            task,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn routes(stable: SocketAddr, canary: SocketAddr, shadow: &str) -> String {
    format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\n{}\n{}\n[routes.shadow]\n{shadow}\n",
        pool("routes.stable", "v1", &[stable]),
        pool("routes.canary", "v2", &[canary]),
    )
}

async fn shadow_status(p: &Proxy) -> Value {
    p.status().await["routes"][0]["shadow"].clone()
}

/// A GET of `url` as `user`, answered 200.
async fn get_as(c: &reqwest::Client, url: String, user: String) {
    let r = c.get(url).header("x-user-id", user).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Waits until the shadow's `key` counter reaches `n`.
async fn wait_shadow(p: &Proxy, key: &str, n: u64) -> Value {
    eventually(
        &format!("shadow {key} >= {n}"),
        Duration::from_secs(30),
        || async move {
            let s = shadow_status(p).await;
            if s[key].as_u64() >= Some(n) {
                Ok(s)
            } else {
                Err(format!("{s:#}"))
            }
        },
    )
    .await
}

/// The canary answers `/items/ID` with another price. Every user's answer is stable's;
/// the shadow finds `$.price` on `/items/{id}` (with examples), nothing on `/users/{id}`,
/// and `$.ts` (stable differs from itself there) is noise, not a difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_that_differs_on_one_path_is_found_and_noise_is_not() {
    let (stable, canary) = (App::start(0).await, App::start(1).await);
    let p = Proxy::builder()
        .routes(&routes(stable.addr, canary.addr, "share = 100"))
        .start()
        .await;
    let c = client();
    for i in 0..40u64 {
        for path in [format!("/items/{i}"), format!("/users/{i}")] {
            let r = c
                .get(p.url(&path))
                .header("x-user-id", format!("u{i}"))
                .header("authorization", "Bearer very-secret")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["price"], 10, "every user gets stable's answer");
        }
    }
    let s = wait_shadow(&p, "compared", 80).await;
    let diffs = s["differences"].as_array().unwrap();
    assert_eq!(diffs.len(), 1, "{s:#}");
    assert_eq!(diffs[0]["path"], "/items/{id}");
    assert_eq!(diffs[0]["field"], "$.price");
    assert_eq!(diffs[0]["count"], 40);
    let ex = &diffs[0]["examples"][0];
    assert_eq!(
        (ex["stable"].as_str(), ex["shadow"].as_str()),
        (Some("10"), Some("11"))
    );
    assert!(ex["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    // The example's request headers, the secret redacted.
    let headers = ex["headers"].as_array().unwrap();
    assert!(
        headers.contains(&json!(["authorization", "[redacted]"])),
        "{ex:#}"
    );
    assert!(headers.iter().any(|h| h[0] == "x-user-id"), "{ex:#}");
    assert!(!ex.to_string().contains("very-secret"));
    // `kanaria status` prints the shadow and its differing field.
    let out = std::process::Command::new(common::kanaria_bin())
        .args(["status", "--admin", &format!("127.0.0.1:{}", p.admin_port)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("shadow app: share 100.0% x1"), "{text}");
    assert!(text.contains("/items/{id} $.price: 40"), "{text}");
    let noise: Vec<&str> = s["noise"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["field"].as_str().unwrap())
        .collect();
    assert!(noise.contains(&"$.ts"), "{s:#}");
    assert_eq!(s["differing"], 40);
    assert_eq!(s["errors"], 0);
    // Every copy reached the canary marked; stable saw only the users' requests and the
    // noise probes (marked too).
    let at_canary = canary.seen();
    assert_eq!(at_canary.len(), 80);
    assert!(at_canary.iter().all(|x| x.marked && x.method == "GET"));
    assert_eq!(
        at_canary
            .iter()
            .filter(|x| x.path.starts_with("/items/"))
            .count(),
        40
    );
    let unmarked = stable.seen().iter().filter(|x| !x.marked).count();
    assert_eq!(unmarked, 80);
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "kanaria_shadow_differences_total{field=\"$.price\",route=\"app\"}"
        ),
        40.0
    );
    assert_eq!(
        metric(&m, "kanaria_shadow_requests_total{route=\"app\"}"),
        80.0
    );
    assert!(!m.contains("field=\"$.ts\""), "noise is not a difference");
}

/// A POST is not mirrored by default (it may have side effects); listed in `methods`, it
/// is, with its body. `amplify` sends each mirrored request that many times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_mirrored_only_when_listed_and_amplify_multiplies_copies() {
    let (stable, canary) = (App::start(0).await, App::start(0).await);
    let p = Proxy::builder()
        .routes(&routes(stable.addr, canary.addr, "share = 100"))
        .start()
        .await;
    let c = client();
    let post = |body: &'static str| {
        c.post(p.url("/users/1"))
            .header("x-user-id", "u1")
            .body(body)
            .send()
    };
    assert_eq!(post("first").await.unwrap().status(), 200);
    get_as(&c, p.url("/users/2"), "u2".into()).await;
    wait_shadow(&p, "compared", 1).await;
    assert!(
        canary.seen().iter().all(|x| x.method == "GET"),
        "a POST was mirrored: {:?}",
        canary.seen()
    );

    let generation = p.generation().await;
    p.write_config_and_wait(
        &p.config_text(&routes(
            stable.addr,
            canary.addr,
            "share = 100\nmethods = [\"GET\", \"POST\"]\namplify = 3",
        )),
        generation,
    )
    .await;
    assert_eq!(post("second").await.unwrap().status(), 200);
    wait_shadow(&p, "compared", 2).await;
    eventually("three copies of the POST", Duration::from_secs(20), || {
        let posts: Vec<Seen> = canary
            .seen()
            .into_iter()
            .filter(|x| x.method == "POST")
            .collect();
        async move {
            if posts.len() == 3 && posts.iter().all(|x| x.body == b"second" && x.marked) {
                Ok(())
            } else {
                Err(format!("{posts:?}"))
            }
        }
    })
    .await;
}

/// A shadow that is down or hangs: every user is answered by stable as usual; copies fail
/// (counted as the shadow's errors) or, past `max_in_flight` and `queue`, are dropped and
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_hanging_shadow_costs_users_nothing() {
    let stable = App::start(0).await;
    let hanging = App::start(0).await;
    hanging.hang.store(true, Ordering::SeqCst);
    let dead = Upstream::start("dead").await;
    let dead_addr = dead.addr;
    drop(dead);
    // The shadow's own endpoint, by name (looked up when a copy connects).
    let shadow = format!(
        "share = 100\nmax_in_flight = 2\nqueue = 3\ntimeout = \"20s\"\nendpoints = [\"localhost:{}\"]",
        hanging.addr.port()
    );
    let p = Proxy::builder()
        .routes(&routes(stable.addr, dead_addr, &shadow))
        .start()
        .await;
    let c = client();
    for i in 0..30u64 {
        let r = c
            .get(p.url(&format!("/items/{i}")))
            .header("x-user-id", format!("u{i}"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // A copy is offered when the user's answer is done, which the client may see first.
    wait_shadow(&p, "mirrored", 30).await;
    let s = shadow_status(&p).await;
    assert_eq!(s["mirrored"], 30);
    // Two copies at the hanging shadow, three waiting: the others dropped (a copy counts
    // as waiting from its offer until its task takes a slot, so a few more may be).
    let dropped = s["dropped"]["queue_full"].as_u64().unwrap();
    assert!((25..=28).contains(&dropped), "{s:#}");
    eventually(
        "two copies at the hanging shadow",
        Duration::from_secs(10),
        || {
            let n = hanging.seen().len();
            async move {
                if n == 2 {
                    Ok(())
                } else {
                    Err(format!("{n} copies"))
                }
            }
        },
    )
    .await;
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "kanaria_shadow_dropped_total{reason=\"queue_full\",route=\"app\"}"
        ),
        dropped as f64
    );

    // The shadow is the (dead) canary pool now: each copy fails, counted.
    let generation = p.generation().await;
    p.write_config_and_wait(
        &p.config_text(&routes(stable.addr, dead_addr, "share = 100")),
        generation,
    )
    .await;
    for i in 0..10u64 {
        get_as(&c, p.url(&format!("/users/{i}")), format!("u{i}")).await;
    }
    let s = wait_shadow(&p, "errors", 10).await;
    assert_eq!(s["compared"], 0, "{s:#}");
}

/// A rollout that starts in the shadow: `{ shadow = 100 }` mirrors every stable user's
/// requests, three copies each (`amplify = 3`), to a canary that has room for two requests
/// at once. It fails only under that load; the analysis judges the copies as the canary's
/// outcomes and rolls it back in the shadow step: no user ever reached it, and mirroring
/// stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_fails_under_the_mirrored_load_is_rolled_back_before_any_user() {
    let (stable, canary) = (App::start(0).await, App::start(0).await);
    canary.capacity.store(2, Ordering::SeqCst);
    let routes = format!(
        "{}\n[routes.rollout]\nsteps = [{{ shadow = 100, hold = \"60s\" }}, {{ weight = 50 }}]\n[routes.analysis]\nwindow = \"10s\"\n",
        routes(stable.addr, canary.addr, "amplify = 3")
    );
    let p = Proxy::builder().routes(&routes).start().await;
    let load = common::Load::start(p.url("/users/1"), 2, 50);
    let s = p
        .wait_status("rolled back in the shadow step", |s| {
            s["routes"][0]["rollout_state"] == "rolled_back"
        })
        .await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "users are answered by stable throughout");
    assert!(ok > 0);
    let r = &s["routes"][0];
    assert_eq!(r["rollout"]["steps"][0]["shadow_percent"], 100.0, "{r:#}");
    assert_eq!(
        r["totals"]["canary"]["requests"], 0,
        "no user on the canary: {r:#}"
    );
    let at_canary = canary.seen();
    assert!(!at_canary.is_empty());
    assert!(
        at_canary.iter().all(|x| x.marked),
        "a user's request reached the canary"
    );
    // Rolled back: no more copies.
    let mirrored = shadow_status(&p).await["mirrored"].as_u64().unwrap();
    let c = client();
    for i in 0..10 {
        get_as(&c, p.url("/users/1"), format!("late{i}")).await;
    }
    assert_eq!(shadow_status(&p).await["mirrored"].as_u64(), Some(mirrored));
}

/// `max_diff_rate`: a canary whose answers differ from stable's (another price on every
/// `/items/{id}`) is rolled back in its shadow step for `diff_rate`, with no user ever on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_whose_answers_differ_is_rolled_back_for_its_diff_rate() {
    let (stable, canary) = (App::start(0).await, App::start(1).await);
    let routes = format!(
        "{}\n[routes.rollout]\nsteps = [{{ shadow = 100, hold = \"60s\" }}, {{ weight = 50 }}]\n[routes.analysis]\nmax_diff_rate = 0.1\n",
        routes(stable.addr, canary.addr, "")
    );
    let p = Proxy::builder().routes(&routes).start().await;
    let load = common::Load::start(p.url("/items/7"), 2, 50);
    let s = p
        .wait_status("rolled back for its differences", |s| {
            s["routes"][0]["rollout_state"] == "rolled_back"
        })
        .await;
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
    let r = &s["routes"][0];
    assert_eq!(r["phase"]["reason"], "diff_rate", "{r:#}");
    assert!(canary.seen().iter().all(|x| x.marked));
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "kanaria_rollbacks_total{reason=\"diff_rate\",route=\"app\"}"
        ),
        1.0
    );
}

/// With `[fleet]`, the compared answers are summed over the replicas like the outcomes: each
/// of three replicas compares 20 answers (fewer than `min_requests = 30`, so none could judge
/// alone), the fleet's 60 are judged, and the fleet rolls the canary back for `diff_rate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_sums_the_compared_answers() {
    let redis = common::Redis::start().await;
    let (stable, canary) = (App::start(0).await, App::start(1).await);
    let mut replicas = Vec::new();
    for name in ["a", "b", "c"] {
        let cfg = format!(
            "[fleet]\nurl = \"{}\"\ncluster = \"shadow\"\ninstance = \"{name}\"\npoll_interval = \"500ms\"\n\n{}\n[routes.rollout]\nsteps = [{{ shadow = 100, hold = \"1h\" }}, {{ weight = 50 }}]\n[routes.analysis]\nmin_requests = 50\nmax_diff_rate = 0.1\n",
            redis.url(),
            routes(stable.addr, canary.addr, "")
        );
        replicas.push(Proxy::builder().routes(&cfg).start().await);
    }
    for p in &replicas {
        p.wait_status("three members", |s| {
            s["fleet"]["members"].as_array().map(Vec::len) == Some(3)
        })
        .await;
    }
    let c = client();
    for (i, p) in replicas.iter().enumerate() {
        for n in 0..20u64 {
            get_as(&c, p.url(&format!("/items/{n}")), format!("r{i}u{n}")).await;
        }
        wait_shadow(p, "compared", 20).await;
    }
    // The replica that decided judged all three replicas' answers: with min_requests 50,
    // no one replica (20) nor two (40) had enough. Its status is read as soon as it
    // decided, while the others' shared differences are still fresh.
    let decided = eventually(
        "a replica rolls back for the fleet's differences",
        Duration::from_secs(20),
        || {
            let replicas = &replicas;
            async move {
                for p in replicas {
                    let s = p.status().await;
                    let own = s["events"].as_array().and_then(|e| {
                        e.iter()
                            .find(|e| e["kind"] == "rollback" && e["numbers"]["compared"].is_u64())
                            .cloned()
                    });
                    if let Some(event) = own {
                        return Ok((event, s["routes"][0]["shadow"]["fleet_differences"].clone()));
                    }
                }
                Err("no replica decided a rollback yet")
            }
        },
    )
    .await;
    let (event, differences) = decided;
    assert_eq!(event["reason"], "diff_rate", "{event:#}");
    // The deciding replica may decide before its own last copies are compared: at least
    // 50 (more than two replicas hold), all differing.
    let compared = event["numbers"]["compared"].as_u64().unwrap_or(0);
    assert!((50..=60).contains(&compared), "{event:#}");
    assert_eq!(
        event["numbers"]["differing"].as_u64(),
        Some(compared),
        "{event:#}"
    );
    // The differing field, summed over the replicas.
    let d = &differences[0];
    assert_eq!(
        (d["path"].as_str(), d["field"].as_str()),
        (Some("/items/{id}"), Some("$.price")),
        "{differences:#}"
    );
    assert!(
        (50..=60).contains(&d["count"].as_u64().unwrap_or(0)),
        "{differences:#}"
    );
    for p in &replicas {
        let s = p
            .wait_status("every replica rolled back", |s| {
                s["routes"][0]["rollout_state"] == "rolled_back"
            })
            .await;
        assert_eq!(s["routes"][0]["phase"]["reason"], "diff_rate", "{s:#}");
        // No replica compared enough alone.
        assert_eq!(shadow_status(p).await["compared"], 20);
    }
}

/// A healthy canary passes its shadow step and the rollout moves on to the first weighted
/// step: users reach it then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_shadow_moves_on_to_the_first_weighted_step() {
    let (stable, canary) = (App::start(0).await, App::start(0).await);
    let routes = format!(
        "{}\n[routes.rollout]\nsteps = [{{ shadow = 100, hold = \"2s\" }}, {{ weight = 50, hold = \"1h\" }}, {{ weight = 100 }}]\n[routes.analysis]\nwindow = \"5s\"\n",
        routes(stable.addr, canary.addr, "")
    );
    let p = Proxy::builder().routes(&routes).start().await;
    let load = common::Load::start(p.url("/users/1"), 2, 50);
    let s = p
        .wait_status("on the weighted step", |s| {
            s["routes"][0]["effective_weight_percent"] == 50.0
        })
        .await;
    assert_eq!(s["routes"][0]["rollout"]["step"], 1, "{s:#}");
    eventually("users on the canary", Duration::from_secs(20), || {
        let n = canary.seen().iter().filter(|x| !x.marked).count();
        async move {
            if n > 0 {
                Ok(())
            } else {
                Err("no user request at the canary yet")
            }
        }
    })
    .await;
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
}

/// `kanaria check` names each bad key of `[routes.shadow]`.
#[tokio::test]
async fn bad_shadow_settings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(
        &path,
        "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n[routes.shadow]\nshare = 120\nmethods = [\"get\"]\namplify = 0\ncompare_body_limit = \"lots\"\nprotocol = \"h3\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::kanaria_bin())
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    for key in [
        "routes[app].shadow",
        "routes[app].shadow.share",
        "routes[app].shadow.methods[0]",
        "routes[app].shadow.amplify",
        "routes[app].shadow.compare_body_limit",
        "routes[app].shadow.protocol",
    ] {
        assert!(text.contains(key), "{key} not named in:\n{text}");
    }
}
