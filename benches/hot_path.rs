//! Micro-benchmarks of the per-request work Kanaria adds on top of proxying: the split
//! decision (user key, hash, bucket), the route match, recording an outcome (counters,
//! histogram, analysis window), and, through `kanaria::internals::bench`, what the hooks do with a
//! request: the request filter's decision on a real config (path normalization, route,
//! split), the request-head check, and the forwarding headers (hop-by-hop cleanup,
//! `X-Forwarded-For`/`-Proto`, the response cleanup). Target: under 200 ns each for the
//! decisions. Run with `cargo bench` or `make bench`; never part of the test suite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A benchmark stops where its setup fails.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use pingora::http::{RequestHeader, ResponseHeader};

use kanaria::internals::bench as bench_api;

use kanaria::metrics::{Metrics, UpstreamErrorKind};
use kanaria::split::router::Router;
use kanaria::split::{bucket, seed_for, OverrideRule, SplitRule, StickySource, Track};
use kanaria::stats::window::Window;

/// Headers of a typical browser request, the user id among them.
fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "app.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
        ),
        ("accept", "text/html,application/xhtml+xml"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-US,en;q=0.5"),
        ("cookie", "theme=dark; session=3f2a9c1e7b; lang=en"),
        ("x-user-id", "user-48213"),
    ] {
        h.insert(
            HeaderName::from_static(k),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    h
}

fn rule(sticky: &[&str], overrides: OverrideRule) -> SplitRule {
    SplitRule {
        sticky: sticky
            .iter()
            .map(|s| StickySource::parse(s).expect("sticky source"))
            .collect(),
        seed: seed_for("app"),
        canary_buckets: 1000,
        overrides,
    }
}

fn split(c: &mut Criterion) {
    let headers = request_headers();
    let ip: IpAddr = "10.1.2.3".parse().expect("ip");
    let labels = ("v1", Some("v2"));
    let mut g = c.benchmark_group("split");
    g.bench_function("bucket (xxh3 of a 10-byte key)", |b| {
        let seed = seed_for("app");
        b.iter(|| bucket(black_box(seed), black_box(b"user-48213")))
    });
    let by_header = rule(&["header:x-user-id"], OverrideRule::default());
    g.bench_function("decide: header key", |b| {
        b.iter(|| by_header.decide(black_box(&headers), Some(ip), labels))
    });
    let by_cookie = rule(&["cookie:session"], OverrideRule::default());
    g.bench_function("decide: cookie key", |b| {
        b.iter(|| by_cookie.decide(black_box(&headers), Some(ip), labels))
    });
    let by_ip = rule(&["client_ip"], OverrideRule::default());
    g.bench_function("decide: client ip", |b| {
        b.iter(|| by_ip.decide(black_box(&headers), Some(ip), labels))
    });
    let with_override = rule(
        &["header:x-user-id"],
        OverrideRule {
            header: Some(HeaderName::from_static("x-kanaria-version")),
            cookie: Some("kv".into()),
            trusted: vec!["10.0.0.0/8".parse().expect("cidr")],
            key: None,
        },
    );
    g.bench_function("decide: header key, override rules (absent)", |b| {
        b.iter(|| with_override.decide(black_box(&headers), Some(ip), labels))
    });
    g.finish();
}

fn route(c: &mut Criterion) {
    let none: Vec<String> = vec![];
    let app = ["app.example.com".to_string()];
    let api = ["api.example.com".to_string()];
    let router = Router::new([
        (&none[..], "/"),
        (&none[..], "/static"),
        (&app[..], "/"),
        (&app[..], "/lessons"),
        (&app[..], "/lessons/video"),
        (&api[..], "/v1"),
        (&api[..], "/v2"),
    ]);
    let mut g = c.benchmark_group("route");
    g.bench_function("find: host with port, 3 prefixes", |b| {
        b.iter(|| {
            router.find(
                black_box(Some("app.example.com:8080")),
                black_box("/lessons/video/42?t=10"),
            )
        })
    });
    g.bench_function("find: unknown host, any-host fallback", |b| {
        b.iter(|| {
            router.find(
                black_box(Some("other.example.org")),
                black_box("/static/a.css"),
            )
        })
    });
    g.bench_function("find: upper-case host", |b| {
        b.iter(|| router.find(black_box(Some("APP.Example.com")), black_box("/")))
    });
    g.finish();
}

fn record(c: &mut Criterion) {
    let metrics = Metrics::new(Instant::now()).expect("metrics");
    let route = metrics.route("app", std::time::Duration::from_secs(30));
    let mut g = c.benchmark_group("record");
    g.bench_function("record: 200 in 1.3 ms", |b| {
        let m = route.version(Track::Stable);
        b.iter(|| m.record(black_box(Some(200)), black_box(0.0013)))
    });
    g.bench_function("record: 502 + upstream error", |b| {
        let m = route.version(Track::Canary);
        b.iter(|| {
            m.record(black_box(Some(502)), black_box(0.0007));
            m.upstream_error(UpstreamErrorKind::Reset);
        })
    });
    let window = Window::new(Instant::now());
    g.bench_function("window only", |b| {
        b.iter(|| window.record(Instant::now(), black_box(false), black_box(0.0013)))
    });
    g.finish();
}

/// The bench's config shape: a catch-all route split on `x-user-id` and two more routes.
const CONFIG: &str = r#"
[[routes]]
name = "app"
sticky_by = ["header:x-user-id"]
canary_weight = 10
[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:9001"]
[routes.canary]
version = "v2"
endpoints = ["127.0.0.1:9002"]

[[routes]]
name = "lessons"
hosts = ["app.example.com"]
path_prefix = "/lessons"
sticky_by = ["header:x-user-id", "cookie:session"]
canary_weight = 25
[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:9001"]
[routes.canary]
version = "v2"
endpoints = ["127.0.0.1:9002"]

[[routes]]
name = "api"
hosts = ["api.example.com"]
path_prefix = "/v1"
[routes.stable]
version = "v1"
endpoints = ["127.0.0.1:9003"]
"#;

const HEAD: &[u8] = b"GET /lessons/video/42?t=10 HTTP/1.1\r\nHost: app.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0\r\nAccept: text/html,application/xhtml+xml\r\n\
Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.5\r\n\
Cookie: theme=dark; session=3f2a9c1e7b; lang=en\r\nx-user-id: user-48213\r\n\r\n";

/// The request as Pingora hands it to `upstream_request_filter`.
fn upstream_request() -> RequestHeader {
    let mut req = RequestHeader::build("GET", b"/lessons/video/42?t=10", Some(8)).expect("request");
    for (k, v) in request_headers().iter() {
        req.append_header(k.clone(), v.clone()).expect("header");
    }
    req
}

fn request(c: &mut Criterion) {
    let config = bench_api::Config::parse(CONFIG).expect("bench config");
    let headers = request_headers();
    let ip: IpAddr = "10.1.2.3".parse().expect("ip");
    let mut g = c.benchmark_group("request");
    g.bench_function("filter: normalize + route + split (3 routes)", |b| {
        b.iter(|| {
            config.decide(
                black_box(Some("app.example.com")),
                black_box("/lessons/video/42"),
                black_box(&headers),
                Some(ip),
            )
        })
    });
    g.bench_function("filter: path with dot segments", |b| {
        b.iter(|| {
            config.decide(
                black_box(Some("app.example.com")),
                black_box("/static/../lessons/./video//42"),
                black_box(&headers),
                Some(ip),
            )
        })
    });
    g.bench_function("filter: catch-all route", |b| {
        b.iter(|| {
            config.decide(
                black_box(Some("other.example.org")),
                black_box("/"),
                black_box(&headers),
                Some(ip),
            )
        })
    });
    g.bench_function("head check (8 header lines)", |b| {
        b.iter(|| bench_api::check_head(black_box(HEAD)))
    });
    let proto = upstream_request();
    g.bench_function(
        "clone of the request header (baseline of the next two)",
        |b| b.iter_batched(|| (), |_| proto.clone(), BatchSize::SmallInput),
    );
    g.bench_function("forward: hop-by-hop cleanup", |b| {
        b.iter_batched(
            || proto.clone(),
            |mut req| {
                bench_api::clean_upstream_request(&mut req);
                req
            },
            BatchSize::SmallInput,
        )
    });
    let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("cidr")];
    let outsider: IpAddr = "192.0.2.9".parse().expect("ip");
    g.bench_function("forward: set_forwarding (XFF + proto)", |b| {
        b.iter_batched(
            || proto.clone(),
            |mut req| {
                let _ = bench_api::set_forwarding(&mut req, Some(outsider), &trusted);
                req
            },
            BatchSize::SmallInput,
        )
    });
    let mut resp = ResponseHeader::build(200, Some(4)).expect("response");
    resp.append_header("content-type", "text/plain")
        .expect("header");
    resp.append_header("content-length", "7").expect("header");
    resp.append_header("server", "nginx").expect("header");
    resp.append_header("connection", "keep-alive")
        .expect("header");
    g.bench_function("response: framing check + hop-by-hop cleanup", |b| {
        b.iter_batched(
            || resp.clone(),
            |mut r| {
                bench_api::clean_upstream_response(&mut r);
                r
            },
            BatchSize::SmallInput,
        )
    });
    // What judging an answer whole adds per request (issue 19): the stream check of its head
    // (a `Content-Type` lookup against the default list), and its time in the registry of
    // answers in flight (a start from the attempt's start, a finish at its last byte).
    let types = [
        "text/event-stream".to_string(),
        "application/grpc".to_string(),
    ];
    g.bench_function("answer: stream check (content-type, 2 types)", |b| {
        b.iter(|| bench_api::is_stream(black_box(&resp), black_box(&types)))
    });
    let answers = kanaria::stats::in_flight::InFlight::new(Instant::now());
    g.bench_function(
        "answer: in flight from the attempt's start, then finished",
        |b| {
            b.iter(|| {
                let now = Instant::now();
                let ticket = answers.start_since(black_box(now), now);
                answers.finish(black_box(ticket));
            })
        },
    );
    g.finish();
}

criterion_group!(benches, split, route, record, request);
criterion_main!(benches);
