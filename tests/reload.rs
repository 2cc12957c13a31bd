//! Hot reload through the real file system: in-place writes, editor renames, a Kubernetes
//! ConfigMap symlink swap, SIGHUP; broken and deleted files; restart-only keys; and 100
//! rewrites under steady load with no failed request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{client, pool, Proxy, Upstream};

fn route(weight: f64, stable: &[&Upstream], canary: &Upstream) -> String {
    let addrs: Vec<_> = stable.iter().map(|u| u.addr).collect();
    format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\"]\ncanary_weight = {weight}\n{}\n{}",
        pool("routes.stable", "v1", &addrs),
        pool("routes.canary", "v2", &[canary.addr]),
    )
}

async fn served_by(proxy: &Proxy, user: &str) -> String {
    common::served_by(proxy, &[("x-user-id", user)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_write_and_editor_rename() {
    let (s, c) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let proxy = Proxy::builder()
        .routes(&route(0.0, &[&s], &c))
        .start()
        .await;
    assert_eq!(served_by(&proxy, "u1").await, "stable");

    let text = proxy.config_text(&route(100.0, &[&s], &c));
    proxy.write_config_and_wait(&text, 1).await;
    assert_eq!(served_by(&proxy, "u1").await, "canary");

    // An editor writes a temp file and renames it over the config.
    let gen = proxy.generation().await;
    let tmp = proxy.dir.path().join(".kanaria.toml.swp");
    std::fs::write(&tmp, proxy.config_text(&route(0.0, &[&s], &c))).unwrap();
    std::fs::rename(&tmp, &proxy.config_path).unwrap();
    proxy
        .wait_status("rename reload", |st| {
            st["config_generation"].as_u64() > Some(gen)
        })
        .await;
    assert_eq!(served_by(&proxy, "u1").await, "stable");
    let m = proxy.metrics().await;
    assert!(
        m.contains("kanaria_config_reloads_total{result=\"error\"} 0"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swap() {
    let (s, c) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let proxy = Proxy::builder()
        .routes(&route(0.0, &[&s], &c))
        .start()
        .await;
    let dir = proxy.dir.path();
    // Lay the file out as a ConfigMap volume: kanaria.toml -> ..data/kanaria.toml,
    // ..data -> ..2026_11_25_a (a timestamped directory).
    let first = dir.join("..2026_11_25_a");
    std::fs::create_dir(&first).unwrap();
    std::fs::copy(&proxy.config_path, first.join("kanaria.toml")).unwrap();
    std::os::unix::fs::symlink("..2026_11_25_a", dir.join("..data")).unwrap();
    std::fs::remove_file(&proxy.config_path).unwrap();
    std::os::unix::fs::symlink("..data/kanaria.toml", &proxy.config_path).unwrap();
    let gen = proxy
        .wait_status("the symlinked layout to load", |st| {
            st["config_generation"].as_u64() > Some(1)
        })
        .await["config_generation"]
        .as_u64()
        .unwrap();

    // The kubelet's update: a new directory, a new ..data_tmp link, renamed over ..data.
    let second = dir.join("..2026_11_25_b");
    std::fs::create_dir(&second).unwrap();
    std::fs::write(
        second.join("kanaria.toml"),
        proxy.config_text(&route(100.0, &[&s], &c)),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_11_25_b", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();
    let st = proxy
        .wait_status("the ConfigMap swap", |st| {
            st["routes"][0]["effective_weight_percent"] == 100.0
        })
        .await;
    assert!(st["config_generation"].as_u64() > Some(gen));
    assert_eq!(served_by(&proxy, "u1").await, "canary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_when_watching_is_off() {
    let (s, c) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let proxy = Proxy::builder()
        .routes(&route(0.0, &[&s], &c))
        .reload("watch = false")
        .start()
        .await;
    std::fs::write(
        &proxy.config_path,
        proxy.config_text(&route(100.0, &[&s], &c)),
    )
    .unwrap();
    let ok = Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let st = proxy
        .wait_status("SIGHUP reload", |st| st["config_generation"] == 2)
        .await;
    assert_eq!(st["last_reload"]["trigger"], "sighup");
    assert_eq!(served_by(&proxy, "u1").await, "canary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_file_keeps_old_routing_then_next_good_edit_applies() {
    let (s, c) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let proxy = Proxy::builder()
        .routes(&route(100.0, &[&s], &c))
        .start()
        .await;
    std::fs::write(
        &proxy.config_path,
        proxy.config_text_of(
            &proxy
                .spec()
                .routes(&route(130.0, &[&s], &c))
                .proxy("bogus = 1"),
        ),
    )
    .unwrap();
    let st = proxy
        .wait_status("the rejected reload", |st| st["last_reload"]["ok"] == false)
        .await;
    let errors: Vec<String> = st["last_reload"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    let file = proxy.config_path.display().to_string();
    assert!(
        errors.iter().any(|e| e.starts_with(&format!("{file}:")) && e.contains("proxy.bogus: unknown field")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("routes[app].canary_weight: 130 is not in 0..=100")),
        "{errors:?}"
    );
    assert_eq!(st["config_generation"], 1, "the old config keeps serving");
    assert_eq!(served_by(&proxy, "u1").await, "canary");
    assert!(proxy.log().contains("old config keeps serving"));
    let m = proxy.metrics().await;
    assert!(
        m.contains("kanaria_config_reloads_total{result=\"error\"} 1"),
        "{m}"
    );

    let text = proxy.config_text(&route(0.0, &[&s], &c));
    let st = proxy.write_config_and_wait(&text, 1).await;
    assert_eq!(st["last_reload"]["ok"], true);
    assert_eq!(served_by(&proxy, "u1").await, "stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_file_changes_nothing_and_restart_keys_are_reported() {
    let (s, c) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let proxy = Proxy::builder()
        .routes(&route(100.0, &[&s], &c))
        .start()
        .await;
    std::fs::remove_file(&proxy.config_path).unwrap();
    assert_eq!(served_by(&proxy, "u1").await, "canary");

    // Next edit: a new listen port (restart-only) and weight 0. Nothing binds it (the
    // change is not applied); held so that it is no one else's port either.
    let reserved = common::ports::ReservedPort::new();
    let new_port = reserved.port();
    let text = proxy.config_text(&route(0.0, &[&s], &c)).replace(
        &format!("127.0.0.1:{}\"", proxy.port),
        &format!("127.0.0.1:{new_port}\""),
    );
    let st = proxy.write_config_and_wait(&text, 1).await;
    assert_eq!(
        st["config_generation"], 2,
        "the deletion itself caused no reload"
    );
    assert_eq!(st["last_reload"]["ok"], true);
    assert_eq!(st["last_reload"]["restart_required"][0], "proxy.listen");
    assert!(proxy.log().contains("proxy.listen changed"));
    // The old listener keeps serving, with the new weight.
    assert_eq!(served_by(&proxy, "u1").await, "stable");
    let m = proxy.metrics().await;
    assert!(
        m.contains("kanaria_config_reloads_total{result=\"error\"} 0"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_rewrites_under_load_fail_no_request() {
    let a = Upstream::start("stable-a").await;
    let b = Upstream::start("stable-b").await;
    let c = Upstream::start("canary").await;
    let proxy = Arc::new(
        Proxy::builder()
            .routes(&route(10.0, &[&a], &c))
            .start()
            .await,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (proxy, stop, ok, failed) = (proxy.clone(), stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let cl = client();
            let mut i = 0u64;
            // Bounded: stops when the rewrites are done, or after 20,000 requests.
            while !stop.load(Ordering::SeqCst) && i < 20_000 {
                i += 1;
                let r = cl
                    .get(proxy.url("/"))
                    .header("x-user-id", format!("w{worker}-{}", i % 500))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    let mut gen = proxy.generation().await;
    for i in 0..100 {
        let weight = [0.0, 100.0, 30.0, 5.5][i % 4];
        let stable: Vec<&Upstream> = match i % 3 {
            0 => vec![&a],
            1 => vec![&a, &b],
            _ => vec![&b],
        };
        let text = proxy.config_text(&route(weight, &stable, &c));
        gen = proxy.write_config_and_wait(&text, gen).await["config_generation"]
            .as_u64()
            .unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert_eq!(
        failed, 0,
        "{failed} failed requests during reloads ({ok} ok)"
    );
    assert!(ok > 100, "the load ran: {ok} requests");
    let m = proxy.metrics().await;
    assert!(
        m.contains("kanaria_config_reloads_total{result=\"error\"} 0"),
        "{m}"
    );
    assert!(
        b.requests.load(Ordering::SeqCst) > 0,
        "added endpoints took traffic"
    );
}

/// A change to the file made after the process read it and before its watcher started
/// raises no event: the watcher compares the file once when it starts. Shown with a binary
/// upgrade, whose new process reads its config, then waits for the old one's listeners
/// (Pingora retries every second) before its services, the watcher among them, start
/// (`make chaos` seed 300874: a new process ran a new canary version's file with the old
/// version until it was restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_before_the_watcher_started_is_loaded() {
    let (s, c) = (
        Upstream::start("stable").await,
        Upstream::start("canary").await,
    );
    let routes = |w: u32| {
        format!(
            "[[routes]]\nname = \"app\"\ncanary_weight = {w}\n{}\n{}",
            pool("routes.stable", "v1", &[s.addr]),
            pool("routes.canary", "v2", &[c.addr]),
        )
    };
    let mut p = Proxy::builder()
        .routes(&routes(10))
        .proxy("shutdown_grace = \"1s\"")
        .start()
        .await;
    let mut old = p.begin_upgrade();
    // The new process has read its file and waits for the listeners (the old one hands
    // them over on its first retry, a second in): not a readiness wait, the moment judged.
    tokio::time::sleep(Duration::from_millis(400)).await;
    p.write_config(&p.config_text(&routes(30)));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while old.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = old.kill();
    let _ = old.wait();
    p.wait_status("the new process on the file's 30%", |s| {
        s["routes"][0]["effective_weight_percent"] == 30.0
    })
    .await;
}
