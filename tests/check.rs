//! `kanaria check` and `kanaria --version` on good and broken configs: exit codes and the
//! exact places the messages name.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::process::Command;

fn check(src: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(&path, src).unwrap();
    let out = Command::new(common::kanaria_bin())
        .arg("check")
        .arg(&path)
        .env_remove("KANARIA_ADMIN_TOKEN")
        .output()
        .expect("run kanaria check");
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

const GOOD_ROUTE: &str = r#"
[[routes]]
name = "app"
[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:9001"]
"#;

#[test]
fn the_shipped_configs_are_valid() {
    for file in ["config/kanaria.toml", "config/demo.toml"] {
        let out = Command::new(common::kanaria_bin())
            .args(["check", file])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok ("));
    }
    let (code, stdout, _) = check(GOOD_ROUTE);
    assert_eq!(code, 0);
    assert!(stdout.contains("ok (1 route)"), "{stdout}");
}

/// `kanaria check` works offline: a pool endpoint named by a cluster-internal name (which
/// resolves nowhere here) is not an error of the file; the runtime resolves it when running.
#[test]
fn a_cluster_internal_name_checks_ok_offline() {
    let (code, stdout, stderr) = check(
        r#"
[[routes]]
name = "lessons"
[routes.stable]
version = "v1"
endpoints = ["lessons-v1.prod.svc.cluster.local:8080"]
[routes.canary]
version = "v2"
endpoints = ["lessons-v2.prod.svc.cluster.local:8080", "10.0.0.7:8080"]
resolve_interval = "5s"
"#,
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.trim().ends_with(": ok (1 route)"), "{stdout}");
    // A malformed endpoint is still an error of the file, with its place.
    let (code, _, stderr) = check(
        "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"lessons v1:8080\", \"app.svc:http\"]\n",
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains(
            "FILE:5:14: routes[app].stable.endpoints[0]: \"lessons v1:8080\" is not HOST:PORT"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("routes[app].stable.endpoints[1]: \"app.svc:http\" is not HOST:PORT"),
        "{stderr}"
    );
}

#[test]
fn version_flag() {
    let out = Command::new(common::kanaria_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("kanaria {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_missing_file_is_named() {
    let out = Command::new(common::kanaria_bin())
        .args(["check", "/nonexistent/kanaria.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("/nonexistent/kanaria.toml: cannot read config"));
}

/// Each broken config, and the lines `kanaria check` must print for it.
#[test]
fn broken_configs_print_every_error_with_its_place() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "syntax error",
            "[proxy\nlisten = \"0.0.0.0:1\"\n",
            &["FILE:1:7: unclosed table, expected `]`"],
        ),
        (
            "weight out of range",
            "[[routes]]\nname = \"app\"\ncanary_weight = 130\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n[routes.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:2\"]\n",
            &["FILE:3:17: routes[app].canary_weight: 130 is not in 0..=100"],
        ),
        (
            "weight finer than 0.01",
            "[[routes]]\nname = \"app\"\ncanary_weight = 1.234\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n[routes.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:2\"]\n",
            &["FILE:3:17: routes[app].canary_weight: 1.234 has more than two decimals"],
        ),
        (
            "weight without canary pool",
            "[[routes]]\nname = \"app\"\ncanary_weight = 5\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n",
            &["FILE:3:17: routes[app].canary_weight: 5 needs a [routes.canary] pool"],
        ),
        (
            "duplicate route names",
            &format!("{GOOD_ROUTE}{}", GOOD_ROUTE.replace("name = \"app\"", "name = \"app\"\npath_prefix = \"/x\"")),
            &["FILE:9:8: routes[app].name: duplicate route name \"app\" (first used by routes[0])"],
        ),
        (
            "same host and prefix twice",
            &format!("{GOOD_ROUTE}{}", GOOD_ROUTE.replace("\"app\"", "\"app2\"")),
            &["routes[app2].path_prefix: \"/\" on any host is already served by route \"app\""],
        ),
        (
            "bad canary timeouts",
            &format!("{GOOD_ROUTE}{}", GOOD_ROUTE.replace("name = \"app\"", "name = \"app2\"\npath_prefix = \"/x\"\ncanary_timeout = \"0s\"")).replace("name = \"app\"", "name = \"app\"\ncanary_timeout = \"soon\""),
            &[
                "FILE:4:18: routes[app].canary_timeout: \"soon\" is not a duration",
                "FILE:12:18: routes[app2].canary_timeout: \"0s\" must be greater than zero",
            ],
        ),
        (
            "empty stable pool",
            "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = []\n",
            &["FILE:5:13: routes[app].stable.endpoints: no endpoints"],
        ),
        (
            "missing stable pool",
            "[[routes]]\nname = \"app\"\n",
            &["routes[app]: missing field `stable`"],
        ),
        (
            "unparseable endpoint",
            "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\", \"10.0.0.1\", \"h:99999\"]\n",
            &[
                "FILE:5:29: routes[app].stable.endpoints[1]: \"10.0.0.1\" is not HOST:PORT",
                "FILE:5:41: routes[app].stable.endpoints[2]: \"h:99999\" is not HOST:PORT",
            ],
        ),
        (
            "bad durations",
            &format!("[proxy]\nconnect_timeout = \"10 parsecs\"\nread_timeout = \"0s\"\n{GOOD_ROUTE}"),
            &[
                "FILE:2:19: proxy.connect_timeout: \"10 parsecs\" is not a duration",
                "FILE:3:16: proxy.read_timeout: \"0s\" must be greater than zero",
            ],
        ),
        (
            "unknown keys, all of them",
            &format!("[proxy]\nlisten = \"0.0.0.0:1\"\nlistn = 1\n[admn]\nx = 1\n{}", GOOD_ROUTE.replace("name = \"app\"", "name = \"app\"\ncanry_weight = 3")),
            &[
                "FILE:3:1: proxy.listn: unknown field `listn`",
                "FILE:4:2: admn: unknown field `admn`",
                "FILE:9:1: routes[app].canry_weight: unknown field `canry_weight`",
            ],
        ),
        (
            "wrong types",
            "[proxy]\nthreads = \"two\"\n[[routes]]\nname = \"app\"\nsticky_by = \"client_ip\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n",
            &[
                "FILE:2:11: proxy.threads: invalid type: string \"two\", expected usize",
                "FILE:5:13: routes[app].sticky_by: invalid type: string \"client_ip\", expected a sequence",
            ],
        ),
        (
            "bad listen, sticky source, cidr, header and prefix",
            "[proxy]\nlisten = [\"127.0.0.1:8080\", \"localhost\"]\n[[routes]]\nname = \"app\"\npath_prefix = \"api\"\nsticky_by = [\"query:u\"]\noverride_header = \"bad header\"\noverride_trusted_cidrs = [\"10.0.0.0/33\"]\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n",
            &[
                "FILE:2:29: proxy.listen[1]: \"localhost\" is not an IP:PORT address",
                "FILE:5:15: routes[app].path_prefix: \"api\" must start with \"/\"",
                "FILE:6:14: routes[app].sticky_by[0]: \"query:u\" is not a user key source",
                "FILE:7:19: routes[app].override_header: \"bad header\" is not a valid header name",
                "FILE:8:27: routes[app].override_trusted_cidrs[0]: \"10.0.0.0/33\" is not a CIDR",
            ],
        ),
        (
            "canary with the stable version, and no routes elsewhere",
            "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n[routes.canary]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:2\"]\n",
            &["FILE:7:11: routes[app].canary.version: \"v1\" is also the stable version"],
        ),
        ("no routes", "[proxy]\n", &["FILE: routes: at least one [[routes]] is required"]),
        (
            "bad rollout, analysis, health, stable_down and webhook",
            "[notify]\nwebhook_url = \"https://hooks.example.com/x\"\n[[routes]]\nname = \"app\"\ncanary_weight = 5\nstable_down = \"panic\"\n[routes.health]\nunhealthy_threshold = 0\n[routes.analysis]\nwindow = \"10m\"\nmax_error_rate = 2\nconfidence = 1.5\nfailure_limit = 0\n[routes.rollout]\nsteps = [{ weight = 50, hold = \"1m\" }, { weight = 10 }, { weight = 0 }]\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n[routes.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:2\"]\n",
            &[
                "FILE:2:15: notify.webhook_url: \"https://hooks.example.com/x\" must start with http://",
                "FILE:5:17: routes[app].canary_weight: set either canary_weight or [routes.rollout], not both",
                "FILE:6:15: routes[app].stable_down: \"panic\" is not \"keep_stable\" or \"serve_canary\"",
                "FILE:8:23: routes[app].health.unhealthy_threshold: must be at least 1",
                "FILE:10:10: routes[app].analysis.window: \"10m\" must be between 1s and 120s",
                "FILE:11:18: routes[app].analysis.max_error_rate: 2 is not a rate in 0..=1",
                "FILE:12:14: routes[app].analysis.confidence: 1.5 must be between 0.5 and 1",
                "FILE:13:17: routes[app].analysis.failure_limit: must be at least 1",
                "FILE:15:51: routes[app].rollout.steps[1].weight: 10 is below the previous step's",
                "FILE:15:68: routes[app].rollout.steps[2].weight: a step's weight must be above 0",
            ],
        ),
        (
            "bad access log, issued cookie order and max age",
            "[log]\naccess = \"\"\nformat = \"xml\"\nqueue = 0\n[[routes]]\nname = \"app\"\nsticky_by = [\"client_ip\", \"issued_cookie:uid\", \"header:x\"]\nissued_cookie_max_age = \"forever\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n",
            &[
                "FILE:2:10: log.access: empty: use \"off\", \"stdout\" or a file path",
                "FILE:3:10: log.format: \"xml\" is not \"json\" or \"combined\"",
                "FILE:4:9: log.queue: must be at least 1",
                "FILE:7:27: routes[app].sticky_by[1]: \"issued_cookie:uid\" is never reached: it comes after client_ip",
                "FILE:7:48: routes[app].sticky_by[2]: \"header:x\" is never reached: it comes after an issued_cookie",
                "FILE:8:25: routes[app].issued_cookie_max_age: \"forever\" is not a duration",
            ],
        ),
        (
            "bad TLS, HTTP/2 limits, gRPC codes and pool protocol",
            "[proxy.tls]\nlisten = [\"127.0.0.1:8443\"]\nwatch_interval = \"never\"\n[[proxy.tls.certificates]]\ncert = \"/nonexistent/site.pem\"\nkey = \"/nonexistent/site.key\"\n[edge]\nh2_max_concurrent_streams = 0\nh2_max_header_list_size = 10\n[[routes]]\nname = \"app\"\n[routes.analysis]\ngrpc_error_codes = [\"UNAVAILABLE\", \"TEAPOT\"]\n[routes.stable]\nversion = \"v1\"\nprotocol = \"h3\"\nendpoints = [\"127.0.0.1:1\"]\n",
            &[
                "FILE:3:18: proxy.tls.watch_interval: \"never\" is not a duration",
                "FILE:5:8: proxy.tls.certificates[0].cert: cannot read /nonexistent/site.pem",
                "FILE:8:29: edge.h2_max_concurrent_streams: 0 is not in 1..=10000",
                "FILE:9:27: edge.h2_max_header_list_size: 10 is not in 1024..=1048576",
                "FILE:13:36: routes[app].analysis.grpc_error_codes[1]: \"TEAPOT\" is not a gRPC status code name",
                "FILE:16:12: routes[app].stable.protocol: \"h3\" is not \"http1\" or \"h2c\"",
            ],
        ),
        (
            "TLS without certificates",
            &format!("[proxy.tls]\nlisten = \"127.0.0.1:8443\"\n{GOOD_ROUTE}"),
            &["FILE:1:1: proxy.tls.certificates: at least one [[proxy.tls.certificates]] (cert and key) is required"],
        ),
        (
            "admin on the network without a token",
            &format!("[admin]\nlisten = \"0.0.0.0:9901\"\n{GOOD_ROUTE}"),
            &["FILE:2:10: admin.listen: 0.0.0.0:9901 is reachable from other hosts but no admin token is set"],
        ),
        (
            "unreadable token file and bad debounce",
            &format!("[admin]\ntoken_file = \"/nonexistent/token\"\n[reload]\ndebounce = \"soon\"\n{GOOD_ROUTE}"),
            &[
                "FILE:2:14: admin.token_file: cannot read \"/nonexistent/token\"",
                "FILE:4:12: reload.debounce: \"soon\" is not a duration",
            ],
        ),
        (
            "bad [fleet]",
            &format!("[fleet]\nbackend = \"etcd\"\nurl = \"http://127.0.0.1:6379\"\ncluster = \"a b\"\ninstance = \"\"\npoll_interval = \"often\"\nstartup_timeout = \"0s\"\non_partition = \"drain\"\npartition_timeout = \"soon\"\n{GOOD_ROUTE}"),
            &[
                "FILE:2:11: fleet.backend: \"etcd\" is not a fleet backend: the only one is \"redis\"",
                "FILE:3:7: fleet.url: not a Redis URL",
                "FILE:4:11: fleet.cluster: \"a b\" is not a valid fleet name",
                "FILE:5:12: fleet.instance: \"\" must be 1 to 253 characters without spaces",
                "FILE:6:17: fleet.poll_interval: \"often\" is not a duration",
                "FILE:7:19: fleet.startup_timeout: \"0s\" must be greater than zero",
                "FILE:8:16: fleet.on_partition: \"drain\" is not a policy: \"hold\" (keep the last weight) or \"stable\"",
                "FILE:9:21: fleet.partition_timeout: \"soon\" is not a duration",
            ],
        ),
        (
            "[fleet] without url and cluster, with an unknown key",
            &format!("[fleet]\nhost = \"redis\"\n{GOOD_ROUTE}"),
            &[
                "FILE:1:1: fleet: missing field `url`",
                "FILE:2:1: fleet.host: unknown field `host`",
            ],
        ),
        (
            "[fleet] ca without TLS",
            &format!("[fleet]\nurl = \"redis://cache.example.com:6379\"\ncluster = \"prod\"\nca = \"ca.pem\"\n{GOOD_ROUTE}"),
            &["FILE:4:6: fleet.ca: only applies to a rediss:// or rediss+sentinel:// url (TLS to Redis)"],
        ),
        (
            "[fleet] Sentinel URL without the master's name",
            &format!("[fleet]\nurl = \"redis+sentinel://10.0.0.1:26379,10.0.0.2:26379\"\ncluster = \"prod\"\n{GOOD_ROUTE}"),
            &["FILE:2:7: fleet.url: not a Redis Sentinel URL: names no master: write redis+sentinel://host:26379[,host:26379]/<master>[/<db>]"],
        ),
        (
            "[fleet] TLS with a missing ca file",
            &format!("[fleet]\nurl = \"rediss://cache.example.com:6380\"\ncluster = \"prod\"\nca = \"no-such-ca.pem\"\n{GOOD_ROUTE}"),
            &["FILE:4:6: fleet.ca: cannot read"],
        ),
        (
            "[fleet] records that could lapse between two polls",
            &format!("[fleet]\nurl = \"redis://127.0.0.1:6379\"\ncluster = \"prod\"\npoll_interval = \"1s\"\nrecord_ttl = \"5s\"\n{GOOD_ROUTE}"),
            &["FILE:5:14: fleet.record_ttl: \"5s\" must be at least 10 × poll_interval (10s)"],
        ),
    ];
    assert!(cases.len() >= 12);
    for (what, src, expected) in cases {
        let (code, stdout, stderr) = check(src);
        assert_eq!(code, 1, "{what}: exit code; stdout {stdout}");
        for line in *expected {
            assert!(
                stderr.contains(line),
                "{what}: expected {line:?} in:\n{stderr}"
            );
        }
        assert_eq!(
            stderr.lines().count(),
            expected.len(),
            "{what}: one line per error, got:\n{stderr}"
        );
    }
}

#[test]
fn run_fails_fast_naming_the_key_when_a_listen_address_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(
        &path,
        format!(
            // The admin port is the OS's pick: the run fails on the proxy listener first.
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{GOOD_ROUTE}"
        ),
    )
    .unwrap();
    let out = Command::new(common::kanaria_bin())
        .args(["run", "-c"])
        .arg(&path)
        .env_remove("KANARIA_ADMIN_TOKEN")
        .output()
        .expect("run kanaria");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: proxy.listen[0]: cannot listen on 127.0.0.1:{port}",
            path.display()
        )),
        "{stderr}"
    );
    drop(taken);
}
