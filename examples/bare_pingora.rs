//! The benchmark's floor: a bare Pingora proxy built from the same Pingora version, with
//! the same Pingora settings as Kanaria ([`PingoraTuning::KANARIA`], the same allocator,
//! the same upstream timeouts), doing the same sticky 10% split on `x-user-id` in
//! `upstream_peer`, and nothing else: no routing, no metrics, no analysis, no header
//! rewriting, no connection guard. What Kanaria costs above this is Kanaria's; what this
//! costs above nginx is Pingora's (bench/README.md).
//!
//! Built and run only by the benchmark (`cargo build --release --example bare_pingora`):
//!
//! ```text
//! bare_pingora --listen 127.0.0.1:8080 --stable 127.0.0.1:9001 --canary 127.0.0.1:9002
//! ```
//!
//! The `--work-stealing`, `--compression-module`, `--l4-read-buffer`, `--pool-size`,
//! `--tokio-timers` and `--peer-timeouts` flags change one Pingora setting each, for A/B runs of that setting
//! (`--pingora-defaults` starts from Pingora's own defaults instead of Kanaria's).
//! `--nginx-headers` adds what the benchmark's nginx adds besides the split (the client's
//! address appended to `X-Forwarded-For`, the pool's name in an `x-version` response
//! header), written the cheapest way the vendored Pingora offers (wire headers): the floor
//! with nginx's features, to show how much of Kanaria's cost above the floor those are.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use http::HeaderValue;
use pingora::http::{PreparedHeaderName, RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;

use kanaria::server::PingoraTuning;
use kanaria::split::{bucket, seed_for, BUCKETS};

/// The same allocator as the `kanaria` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// Client-facing address.
    #[arg(long)]
    listen: String,
    /// The stable upstream.
    #[arg(long)]
    stable: SocketAddr,
    /// The canary upstream.
    #[arg(long)]
    canary: SocketAddr,
    /// Percent of users (by `x-user-id`) sent to the canary.
    #[arg(long, default_value_t = 10.0)]
    percent: f64,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Start from Pingora's defaults instead of Kanaria's settings.
    #[arg(long)]
    pingora_defaults: bool,
    /// Override: Tokio work stealing between worker threads.
    #[arg(long)]
    work_stealing: Option<bool>,
    /// Override: keep Pingora's default (disabled) response-compression module.
    #[arg(long)]
    compression_module: Option<bool>,
    /// Override: read buffer of accepted connections in bytes (0: unbuffered).
    #[arg(long)]
    l4_read_buffer: Option<usize>,
    /// Override: upstream keep-alive pool size per worker thread.
    #[arg(long)]
    pool_size: Option<usize>,
    /// Override: I/O timeouts on Tokio's timer instead of Pingora's fast timer.
    #[arg(long)]
    tokio_timers: Option<bool>,
    /// Set Kanaria's default upstream timeouts on every peer (connect 2s, read and write
    /// 30s, idle 60s), as Kanaria does. `false` arms no upstream timer.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    peer_timeouts: bool,
    /// Add nginx's `X-Forwarded-For` and `x-version` headers (see the module docs).
    #[arg(long)]
    nginx_headers: bool,
}

struct Bare {
    stable: SocketAddr,
    canary: SocketAddr,
    seed: u64,
    canary_buckets: u32,
    peer_timeouts: bool,
    nginx_headers: bool,
}

const XFF: PreparedHeaderName = PreparedHeaderName::from_static("x-forwarded-for");
const VERSION: PreparedHeaderName = PreparedHeaderName::from_static("x-version");

#[async_trait]
impl ProxyHttp for Bare {
    /// Whether the request went to the canary (for `--nginx-headers`).
    type CTX = bool;

    fn new_ctx(&self) -> bool {
        false
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut bool,
    ) -> pingora::Result<()> {
        if !self.nginx_headers {
            return Ok(());
        }
        let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        else {
            return Ok(());
        };
        // nginx's `$proxy_add_x_forwarded_for`: the client's header, then its address.
        match upstream_request.headers.get("x-forwarded-for") {
            Some(earlier) => {
                let value = format!("{}, {ip}", String::from_utf8_lossy(earlier.as_bytes()));
                upstream_request.insert_wire_header(XFF, value)
            }
            None => upstream_request.append_wire_header(XFF, ip.to_string()),
        }
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        canary: &mut bool,
    ) -> pingora::Result<()> {
        if !self.nginx_headers {
            return Ok(());
        }
        let pool = if *canary { "canary" } else { "stable" };
        upstream_response.insert_wire_header(VERSION, HeaderValue::from_static(pool))
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        canary: &mut bool,
    ) -> pingora::Result<Box<HttpPeer>> {
        // The same hash and bucket as Kanaria's `header:x-user-id` split.
        let key = session
            .req_header()
            .headers
            .get("x-user-id")
            .map_or(&b""[..], |v| v.as_bytes());
        *canary = bucket(self.seed, key) < self.canary_buckets;
        let addr = if *canary { self.canary } else { self.stable };
        let mut peer = HttpPeer::new(addr, false, String::new());
        if self.peer_timeouts {
            peer.options.connection_timeout = Some(Duration::from_secs(2));
            peer.options.read_timeout = Some(Duration::from_secs(30));
            peer.options.write_timeout = Some(Duration::from_secs(30));
            peer.options.idle_timeout = Some(Duration::from_secs(60));
        }
        Ok(Box::new(peer))
    }
}

fn main() {
    let args = Args::parse();
    let mut tuning = if args.pingora_defaults {
        PingoraTuning::PINGORA_DEFAULTS
    } else {
        // Kanaria's pool for its default `edge.max_connections` on one listener.
        PingoraTuning::KANARIA.with_pool_for(10_000, args.threads.max(1))
    };
    if let Some(v) = args.work_stealing {
        tuning.work_stealing = v;
    }
    if let Some(v) = args.compression_module {
        tuning.compression_module = v;
    }
    if let Some(v) = args.l4_read_buffer {
        tuning.l4_read_buffer = Some(v);
    }
    if let Some(v) = args.pool_size {
        tuning.upstream_keepalive_pool_size = v;
    }
    if let Some(v) = args.tokio_timers {
        tuning.tokio_timers = v;
    }
    let mut conf = ServerConf {
        threads: args.threads.max(1),
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    tuning.apply_conf(&mut conf);
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut http = pingora::proxy::http_proxy(
        &server.configuration,
        Bare {
            stable: args.stable,
            canary: args.canary,
            seed: seed_for("app"),
            canary_buckets: (args.percent / 100.0 * f64::from(BUCKETS)).round() as u32,
            peer_timeouts: args.peer_timeouts,
            nginx_headers: args.nginx_headers,
        },
    );
    tuning.apply_proxy(&mut http);
    let mut service = Service::new("bare pingora".to_string(), http);
    service.add_listener(tuning.listener(&args.listen));
    server.add_service(service);
    eprintln!("bare pingora on {} with {tuning:?}", args.listen);
    server.run_forever();
}
