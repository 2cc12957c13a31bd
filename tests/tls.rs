//! TLS termination with real clients (`curl --cacert`, `h2load`) against certificates of a
//! CA the test makes: SNI picks the certificate, `X-Forwarded-Proto: https`, the issued
//! cookie is `Secure`, a rotation under load fails no request, a bad new certificate keeps
//! the old one serving and says why, and `kanaria check` refuses expired or mismatched pairs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::path::Path;
use std::time::Duration;

use common::certs::{curl, write_pair, TestCa};
use common::{eventually_every, pool, Proxy, Upstream};

fn routes(stable: &Upstream) -> String {
    format!(
        "[[routes]]\nname = \"app\"\nsticky_by = [\"header:x-user-id\", \"issued_cookie:kanaria_uid\"]\n{}",
        pool("routes.stable", "v1", &[stable.addr]),
    )
}

/// The `[proxy.tls]` keys and certificates (the harness adds `listen`).
fn tls_section(pairs: &[(&Path, &Path)], extra: &str) -> String {
    let mut s = format!("watch_interval = \"100ms\"\n{extra}\n");
    for (cert, key) in pairs {
        s.push_str(&format!(
            "[[proxy.tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    s
}

/// curl until the TLS listener answers 200 (it may accept a moment after the plain one).
async fn curl_ok(ca: &Path, host: &str, port: u16) -> String {
    let what = format!("curl {host} to get a 200");
    eventually_every(
        &what,
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            let (ca, host) = (ca.to_path_buf(), host.to_string());
            async move {
                let h = host.clone();
                let (code, out, err) =
                    tokio::task::spawn_blocking(move || curl(&ca, &h, port, "/", &[]))
                        .await
                        .expect("curl");
                if code == 0 && out.starts_with("HTTP/") && out.contains(" 200") {
                    Ok(out)
                } else {
                    Err(format!("curl {host}: exit {code}: {err}\n{out}"))
                }
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_the_scheme_is_https() {
    let stable = Upstream::start("stable").await;
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Kanaria test CA");
    let ca_path = ca.write(certs.path(), "ca.pem");
    let a = write_pair(certs.path(), "a", &ca.leaf(&["a.test"]));
    let b = write_pair(certs.path(), "b", &ca.leaf(&["b.test", "*.b.test"]));
    let proxy = Proxy::builder()
        .routes(&routes(&stable))
        .tls(&tls_section(&[(&a.0, &a.1), (&b.0, &b.1)], ""))
        .start()
        .await;
    let port = proxy.tls_port();

    // curl verifies the name: each succeeds only with the certificate for its SNI.
    let out = curl_ok(&ca_path, "a.test", port).await;
    assert!(out.contains("\"x-forwarded-proto\":\"https\""), "{out}");
    let cookie = out
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie issued:\n{out}"));
    assert!(
        cookie
            .trim_end()
            .ends_with("HttpOnly; SameSite=Lax; Secure"),
        "{cookie}"
    );
    for host in ["b.test", "www.b.test"] {
        let (code, out, err) = curl(&ca_path, host, port, "/", &[]);
        assert_eq!(code, 0, "{host}: {err}");
        assert!(out.contains(" 200"), "{out}");
    }
    // An unknown name gets the first (default) certificate, which is not valid for it.
    let (code, _, err) = curl(&ca_path, "c.test", port, "/", &[]);
    assert_eq!(
        code, 60,
        "curl should refuse the default certificate: {err}"
    );
    // ... and without verification the request is served by it.
    let (code, out, _) = curl(&ca_path, "c.test", port, "/", &["-k"]);
    assert_eq!(code, 0);
    assert!(out.contains(" 200"));

    // The plain listener says http.
    let body: serde_json::Value = common::client()
        .get(proxy.url("/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["headers"]["x-forwarded-proto"], "http");
    let status = proxy.status().await;
    assert_eq!(
        status["tls"]["certificates"][1]["names"],
        serde_json::json!(["b.test", "*.b.test"])
    );
}

/// Runs h2load over TLS for `secs` seconds; returns its summary output.
fn h2load(port: u16, secs: u32, extra: &[&str]) -> String {
    let secs = secs.to_string();
    let url = format!("https://127.0.0.1:{port}/");
    let mut args = vec!["-c", "4", "-D", secs.as_str()];
    args.extend_from_slice(extra);
    args.push(url.as_str());
    common::h2load::run(&args)
}

/// Points the symlink `link` at `target` atomically (as Kubernetes secret volumes do).
fn swap_symlink(link: &Path, target: &Path) {
    let tmp = link.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_and_a_bad_new_certificate() {
    let stable = Upstream::start("stable").await;
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let (ca1, ca2) = (TestCa::new("CA one"), TestCa::new("CA two"));
    let ca1_path = ca1.write(dir, "ca1.pem");
    let ca2_path = ca2.write(dir, "ca2.pem");
    for (v, ca) in [("v1", &ca1), ("v2", &ca2)] {
        std::fs::create_dir(dir.join(v)).unwrap();
        write_pair(&dir.join(v), "site", &ca.leaf(&["a.test"]));
    }
    // v3: a certificate with the key of another one.
    std::fs::create_dir(dir.join("v3")).unwrap();
    let good = ca2.leaf(&["a.test"]);
    let other = ca2.leaf(&["a.test"]);
    write_pair(&dir.join("v3"), "site", &(good.0, other.1));
    let live = dir.join("live");
    std::os::unix::fs::symlink(dir.join("v1"), &live).unwrap();

    let (cert, key) = (live.join("site.pem"), live.join("site.key"));
    let proxy = Proxy::builder()
        .routes(&routes(&stable))
        .tls(&tls_section(&[(&cert, &key)], ""))
        .start()
        .await;
    let port = proxy.tls_port();
    curl_ok(&ca1_path, "a.test", port).await;

    // Load over kept-alive TLS connections while the certificate is swapped.
    let load = std::thread::spawn(move || h2load(port, 4, &["--h1"]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    swap_symlink(&live, &dir.join("v2"));
    curl_ok(&ca2_path, "a.test", port).await;
    let out = load.join().unwrap();
    let (ok, failed, errored) = common::h2load::counts(&out);
    assert!(ok > 0, "{out}");
    assert_eq!(
        (failed, errored),
        (0, 0),
        "requests failed during the rotation:\n{out}"
    );
    // New handshakes no longer get the old certificate.
    let (code, _, _) = curl(&ca1_path, "a.test", port, "/", &[]);
    assert_eq!(code, 60);

    // A mismatched key: refused, the v2 certificate keeps serving, and Kanaria says why.
    swap_symlink(&live, &dir.join("v3"));
    let s = proxy
        .wait_status("the reload error", |s| {
            !s["tls"]["certificates"][0]["reload_error"].is_null()
        })
        .await;
    let why = s["tls"]["certificates"][0]["reload_error"]
        .as_str()
        .unwrap();
    assert!(
        why.starts_with("proxy.tls.certificates[0].key: the key does not match the certificate"),
        "{why}"
    );
    let c2 = ca2_path.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || curl(&c2, "a.test", port, "/", &[]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(" 200"));
    assert_eq!(
        common::metric(&proxy.metrics().await, "kanaria_tls_reload_failures_total"),
        1.0
    );
    assert!(
        proxy.log().contains("certificate reload refused"),
        "{}",
        proxy.log()
    );
}

fn check(dir: &Path) -> (i32, String) {
    let out = std::process::Command::new(common::kanaria_bin())
        .arg("check")
        .arg(dir.join("k.toml"))
        .env_remove("KANARIA_ADMIN_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_refuses_expired_and_mismatched_pairs_with_relative_paths() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("tls")).unwrap();
    let ca = TestCa::new("CA");
    let good = ca.leaf(&["a.test"]);
    let expired = ca.leaf_with(&["old.test"], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let other = ca.leaf(&["b.test"]);
    write_pair(&d.path().join("tls"), "good", &good);
    write_pair(&d.path().join("tls"), "old", &expired);
    write_pair(&d.path().join("tls"), "mixed", &(good.0.clone(), other.1));
    let config = |pairs: &[&str]| {
        let mut s = "[proxy.tls]\nlisten = \"127.0.0.1:8443\"\n".to_string();
        for p in pairs {
            s.push_str(&format!(
                "[[proxy.tls.certificates]]\ncert = \"tls/{p}.pem\"\nkey = \"tls/{p}.key\"\n"
            ));
        }
        s.push_str("[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n");
        s
    };
    std::fs::write(d.path().join("k.toml"), config(&["good"])).unwrap();
    let (code, err) = check(d.path());
    assert_eq!(code, 0, "{err}");

    std::fs::write(d.path().join("k.toml"), config(&["good", "old", "mixed"])).unwrap();
    let (code, err) = check(d.path());
    assert_eq!(code, 1);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].contains(":7:8: proxy.tls.certificates[1].cert: ")
            && lines[0].contains("tls/old.pem: the certificate expired on "),
        "{err}"
    );
    assert!(
        lines[1].contains(
            ":11:7: proxy.tls.certificates[2].key: the key does not match the certificate "
        ),
        "{err}"
    );

    // No certificate at all, and a missing file.
    std::fs::write(
        d.path().join("k.toml"),
        config(&[]).replace("[[routes]]", "[[proxy.tls.certificates]]\ncert = \"tls/none.pem\"\nkey = \"tls/good.key\"\n[[routes]]"),
    )
    .unwrap();
    let (code, err) = check(d.path());
    assert_eq!(code, 1);
    assert!(
        err.contains("proxy.tls.certificates[0].cert: cannot read ")
            && err.contains("tls/none.pem"),
        "{err}"
    );
}
