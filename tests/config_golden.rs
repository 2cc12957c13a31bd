//! The shipped configs, pinned: `config/kanaria.toml` and `config/demo.toml` validate to
//! exactly these values, every default spelled out. A change of a default, of parsing or of
//! the settings model shows here as a diff of plain data (validation is pure: no DNS, no
//! certificate read, no socket).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kanaria::config::{
    AdminSettings, AnalysisRules, Config, EdgeSettings, Endpoint, HeaderLimits, HealthSettings,
    LatencyTo, LogSettings, PoolSettings, ProxySettings, ReloadSettings, RestartSettings, Route,
    StableDown, Step, Timeouts, WeightSource,
};
use kanaria::split::router::Router;
use kanaria::split::{seed_for, OverrideRule, SplitRule, StickySource};

fn load(name: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name);
    let src = std::fs::read_to_string(&path).expect("read config");
    kanaria::config::load_str(&src, &path.display().to_string())
        .expect("the shipped config validates")
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn addr(s: &str) -> std::net::SocketAddr {
    s.parse().expect("address")
}

fn header(s: &'static str) -> http::HeaderName {
    http::HeaderName::from_static(s)
}

/// `[proxy]`, `[admin]`, `[reload]`, `[edge]` and `[log]` with their defaults, for `listen`.
fn defaults(listen: &str, threads: Option<usize>, upgrade_sock: &str) -> Config {
    Config {
        restart: RestartSettings {
            listen: vec![addr(listen)],
            threads,
            upgrade_sock: upgrade_sock.into(),
            h2c: false,
            shutdown_grace: secs(30),
            tls_listen: Vec::new(),
            tls_http2: false,
            h2_max_concurrent_streams: 100,
            h2_max_header_list_size: 65_536,
            admin_listen: addr("127.0.0.1:9901"),
            log: LogSettings::default(),
            state: None,
            notify: None,
            fleet: None,
            reload: ReloadSettings {
                watch: true,
                debounce: Duration::from_millis(200),
            },
            resolver: None,
        },
        proxy: ProxySettings {
            timeouts: Timeouts {
                connect: secs(2),
                read: secs(30),
                write: secs(30),
                idle: secs(60),
            },
            version_header: Some(header("x-kanaria-version")),
            request_id_header: header("x-request-id"),
            tls: None,
            resolve_interval: secs(10),
        },
        admin: AdminSettings { token: None },
        edge: EdgeSettings {
            header_timeout: secs(10),
            idle_timeout_secs: 60,
            body_timeout: secs(30),
            limits: HeaderLimits {
                max_bytes: 65_536,
                max_count: 100,
            },
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
        },
        routes: Vec::new(),
        router: Router::default(),
    }
}

fn pool(version: &str, endpoint: &str) -> PoolSettings {
    PoolSettings {
        version: version.into(),
        endpoints: vec![Endpoint::Addr(addr(endpoint))],
        h2c: false,
        resolve_interval: secs(10),
    }
}

fn analysis(interval: Duration, window: Duration, max_error_rate: Option<f64>) -> AnalysisRules {
    AnalysisRules {
        enabled: true,
        interval,
        window,
        min_requests: 20,
        max_error_rate,
        max_p99_latency: None,
        max_error_rate_ratio: Some(2.0),
        max_p99_latency_ratio: None,
        max_diff_rate: None,
        confidence: 0.99,
        failure_limit: 1,
        // UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS.
        grpc_error_codes: (1 << 2) | (1 << 4) | (1 << 13) | (1 << 14) | (1 << 15),
        latency: LatencyTo::Answer,
        stream_content_types: vec!["text/event-stream".into(), "application/grpc".into()],
    }
}

fn route(name: &str, canary_buckets: u32, analysis: AnalysisRules) -> Route {
    Route {
        name: name.into(),
        hosts: Vec::new(),
        path_prefix: "/".into(),
        split: SplitRule {
            sticky: vec![
                StickySource::Header(header("x-user-id")),
                StickySource::Cookie("session".into()),
                StickySource::ClientIp,
            ],
            seed: seed_for(name),
            canary_buckets,
            overrides: OverrideRule {
                header: Some(header("x-kanaria-version")),
                cookie: None,
                trusted: Vec::new(),
                key: None,
            },
        },
        issued_cookie: None,
        timeouts: Timeouts {
            connect: secs(2),
            read: secs(30),
            write: secs(30),
            idle: secs(60),
        },
        stable: pool("v1", "127.0.0.1:9001"),
        canary: Some(pool("v2", "127.0.0.1:9002")),
        weight_source: WeightSource::File,
        file_buckets: canary_buckets,
        retry_on_stable: true,
        // Twice the latency limit when there is one; the read timeout otherwise.
        canary_timeout: secs(30),
        rollback_drain: secs(5),
        drain_on_weight_change: false,
        stable_down: StableDown::KeepStable,
        health: None,
        analysis,
        steps: Vec::new(),
        shadow: None,
    }
}

fn with_routes(mut config: Config, routes: Vec<Route>) -> Config {
    config.routes = routes.into_iter().map(Arc::new).collect();
    config.router = Router::new(
        config
            .routes
            .iter()
            .map(|r| (r.hosts.as_slice(), r.path_prefix.as_str())),
    );
    config
}

#[test]
fn the_example_config_is_pinned() {
    let expected = with_routes(
        defaults("127.0.0.1:8080", None, "/tmp/kanaria_upgrade.sock"),
        vec![route("app", 500, analysis(secs(1), secs(30), None))],
    );
    assert_eq!(load("kanaria.toml"), expected);
}

#[test]
fn the_demo_config_is_pinned() {
    let mut lessons = route(
        "lessons",
        0,
        analysis(Duration::from_millis(250), secs(10), Some(0.05)),
    );
    lessons.health = Some(HealthSettings {
        path: "/healthz".into(),
        interval: secs(1),
        timeout: secs(1),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
        expected_status: 200,
    });
    // A shadow step first (the dark launch), then the weighted steps.
    lessons.steps = [
        (0, 3, 10_000),
        (500, 3, 0),
        (2_000, 3, 0),
        (5_000, 30, 0),
        (10_000, 0, 0),
    ]
    .map(|(buckets, hold, shadow)| Step {
        buckets,
        hold: secs(hold),
        shadow,
    })
    .to_vec();
    lessons.shadow = Some(kanaria::config::ShadowSettings {
        share_buckets: 10_000,
        methods: vec![http::Method::GET, http::Method::HEAD],
        amplify: 2,
        max_in_flight: 64,
        queue: 1000,
        marker: http::HeaderName::from_static("x-kanaria-shadow"),
        body_limit: 64 * 1024,
        compare_headers: vec![http::header::CONTENT_TYPE],
        noise_buckets: 1_000,
        endpoints: Vec::new(),
        h2c: false,
        timeout: secs(5),
    });
    let expected = with_routes(
        defaults("127.0.0.1:8080", Some(2), "/tmp/kanaria_demo_upgrade.sock"),
        vec![lessons],
    );
    assert_eq!(load("demo.toml"), expected);
}

/// Validation is offline: a pool endpoint named by a cluster-internal DNS name validates
/// (the runtime layer resolves it), kept as written.
#[test]
fn endpoint_names_are_kept_unresolved() {
    let text = "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"lessons-v1.prod.svc.cluster.local:8080\", \"10.0.0.7:8080\"]\nresolve_interval = \"2s\"\n";
    let config = kanaria::config::load_str(text, "k.toml").expect("validates offline");
    assert_eq!(
        config.routes[0].stable,
        PoolSettings {
            version: "v1".into(),
            endpoints: vec![
                Endpoint::Addr(addr("10.0.0.7:8080")),
                Endpoint::Name {
                    host: "lessons-v1.prod.svc.cluster.local".into(),
                    port: 8080
                },
            ],
            h2c: false,
            resolve_interval: secs(2),
        }
    );
}
