//! The admin listener: metrics, probes, status and operator actions, served by Pingora.
//!
//! Read-only endpoints are open (bind the listener to loopback or a private network);
//! mutations are POST only, need `Authorization: Bearer <token>` (403 when no token is
//! configured) and `Content-Type: application/json`, and refuse a foreign `Origin`: a
//! browser page elsewhere cannot make an operator's browser change a rollout (CSRF). Every answer is JSON except `/metrics` (Prometheus text) and the probes.

pub mod cli;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::control::rollouts::rollout_state;
use crate::control::{Control, ControlError, OperatorAction};
use crate::runtime::Pool;
use crate::split::buckets_to_percent;
use crate::split::Track;
use crate::stats::window::WindowStats;

/// The window the status API reports.
const STATUS_WINDOW: Duration = crate::stats::window::STATUS_SPAN;
/// The short window the dashboard charts (error rate and p99 "now").
const RECENT_WINDOW: Duration = Duration::from_secs(5);

fn window_json(st: WindowStats) -> Value {
    json!({
        "requests": st.requests,
        "errors": st.errors,
        "error_rate": st.error_rate(),
        "p50_ms": st.p50 * 1000.0,
        "p90_ms": st.p90 * 1000.0,
        "p99_ms": st.p99 * 1000.0,
    })
}

/// The dashboard: one self-contained page (no CDN, works offline).
const DASHBOARD: &str = include_str!("dashboard.html");

fn dashboard() -> Response<Vec<u8>> {
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(http::header::CONTENT_LENGTH, DASHBOARD.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        // Only this page's own inline code, talking only to this listener; never framed.
        .header(
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        )
        .header("x-frame-options", "DENY")
        .body(DASHBOARD.as_bytes().to_vec())
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

/// The admin HTTP application.
pub struct AdminApp {
    shared: Arc<Control>,
    ready: AtomicBool,
}

impl AdminApp {
    pub fn new(shared: Arc<Control>) -> Self {
        AdminApp {
            shared,
            ready: AtomicBool::new(false),
        }
    }

    /// Ready once the config is loaded (always, after start) and a proxy listener accepts.
    /// Probed with an async connect: the admin listener's runtime never blocks on it.
    async fn is_ready(&self) -> bool {
        if self.ready.load(Ordering::Relaxed) {
            return true;
        }
        // A replica of a fleet first adopts the fleet's records (bounded by
        // fleet.startup_timeout, then it serves its local state and status says so).
        // And it waits (as long) for its restored phase to be confirmed by another
        // replica's record or a poll interval of the store's answers: meanwhile it sends
        // nobody to the canary, and a load balancer need not send it anybody.
        if let Some(f) = &self.shared.fleet {
            if !f.ready() || (self.shared.awaits_fleet_confirmation() && !f.startup_over()) {
                return false;
            }
        }
        let snap = self.shared.snapshot();
        let mut up = true;
        let restart = &snap.config.restart;
        for a in restart.listen.iter().chain(&restart.tls_listen) {
            // A wildcard listener is reached through loopback.
            let ip = match a.ip() {
                IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                ip => ip,
            };
            let connect = tokio::net::TcpStream::connect(SocketAddr::new(ip, a.port()));
            if !matches!(
                tokio::time::timeout(Duration::from_millis(200), connect).await,
                Ok(Ok(_))
            ) {
                up = false;
                break;
            }
        }
        if up {
            self.ready.store(true, Ordering::Relaxed);
        }
        up
    }
}

/// A whole answer for a Pingora `ServeHttp` app (the admin API, the demo apps).
pub(crate) fn text(status: StatusCode, content_type: &str, body: String) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body.into_bytes())
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn json_response(status: StatusCode, v: Value) -> Response<Vec<u8>> {
    text(status, "application/json", format!("{v}\n"))
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response<Vec<u8>> {
    json_response(status, json!({ "error": msg.to_string() }))
}

/// Compares in time independent of where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn pool_json(p: &Pool) -> Value {
    let endpoints: Vec<Value> = p
        .health()
        .into_iter()
        .map(|(e, healthy)| json!({ "address": e.to_string(), "healthy": healthy }))
        .collect();
    // Each endpoint name as its lookups left it (the pool serves its last good addresses).
    let names: Vec<Value> = p
        .names
        .iter()
        .map(|e| {
            let st = e.state();
            json!({
                "name": e.name(),
                "addresses": st.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "resolved": st.resolved(),
                "last_error": st.last_error,
                "last_success_unix_ms": st.last_success_ms,
                "last_lookup_unix_ms": st.last_lookup_ms,
                "failures": st.failures,
            })
        })
        .collect();
    json!({
        "version": p.version,
        "endpoints": endpoints,
        "names": names,
        "resolve_interval_seconds": (!p.names.is_empty()).then_some(p.settings.resolve_interval.as_secs_f64()),
        "empty_reason": p.unresolved_reason(),
    })
}

/// The fleet as this replica sees it: who is in it, what each applied, and whether the
/// view is current.
fn fleet_json(f: &crate::control::fleet::Fleet) -> Value {
    let view = f.view();
    let connected = f.connected.load(Ordering::Acquire);
    let synced = f.synced.load(Ordering::Acquire);
    json!({
        "cluster": f.settings.cluster,
        "instance": f.settings.instance,
        "connected": connected,
        "stale": f.stale(),
        "synced": synced,
        "start": if synced { "adopted the fleet's records" } else if f.ready() { "serving local state: the fleet store did not answer within fleet.startup_timeout" } else { "adopting the fleet's records" },
        "last_sync_unix_ms": view.last_sync_ms,
        "pending_writes": view.pending,
        "incarnation": view.incarnation,
        "primary": view.primary,
        "primary_changes": view.primary_changes,
        "sentinel": f.settings.sentinel.as_ref().map(|s| json!({
            "master": s.master,
            "sentinels": s.sentinels.iter().map(|(h, p)| format!("{h}:{p}")).collect::<Vec<_>>(),
        })),
        "store_resets": view.store_resets,
        "last_store_reset_unix_ms": view.last_store_reset_ms,
        "on_partition": f.settings.on_partition.as_str(),
        "partition_timeout_seconds": f.settings.partition_timeout.as_secs_f64(),
        "members": view.members.iter().map(|m| json!({
            "instance": m.instance,
            "last_seen_unix_ms": m.last_seen_ms,
            "generations": m.generations,
            "file_hashes": m.file_hashes,
            // A route whose file this member has decided otherwise than the fleet for
            // longer than fleet.config_skew_warning.
            "config_skew": m.file_skew_since.iter()
                .filter(|(_, since)| view.last_sync_ms.saturating_sub(**since) >= f.settings.config_skew_warning.as_millis() as u64)
                .map(|(route, since)| json!({ "route": route, "since_unix_ms": since }))
                .collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "config_skew_warning_seconds": f.settings.config_skew_warning.as_secs_f64(),
    })
}

impl AdminApp {
    fn status(&self) -> Value {
        let controls = self.shared.controls();
        let live = self.shared.live.load();
        let snap = &live.snapshot;
        let reload = self.shared.last_reload();
        // The windows' clock (the control plane's): the machine's in production.
        let now = self.shared.clock.now();
        let routes: Vec<Value> = snap
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let window = |v: Track, span: Duration| {
                    live.route_metrics
                        .get(i)
                        .map(|m| window_json(m.version(v).window.stats(now, span)))
                };
                let totals = |v: Track| {
                    live.route_metrics.get(i).map(|m| {
                        let (requests, errors) = m.version(v).totals();
                        json!({ "requests": requests, "errors": errors })
                    })
                };
                // Upstream attempts waiting for their answer's head right now.
                let in_flight = |v: Track| {
                    live.route_metrics
                        .get(i)
                        .map(|m| m.version(v).in_flight.count())
                };
                let control = controls.get(&r.name);
                let phase = control.map(|c| &c.phase);
                let rollout = (!r.steps.is_empty()).then(|| {
                    json!({
                        "step": phase.and_then(|p| p.step()),
                        "steps": r.steps.iter().map(|s| json!({
                            "weight_percent": buckets_to_percent(s.buckets),
                            "hold_seconds": s.hold.as_secs_f64(),
                            "shadow_percent": (s.shadow > 0).then(|| buckets_to_percent(s.shadow)),
                        })).collect::<Vec<_>>(),
                    })
                });
                json!({
                    "name": r.name,
                    "hosts": r.hosts,
                    "path_prefix": r.path_prefix,
                    "stable": pool_json(&r.stable),
                    "canary": r.canary.as_deref().map(pool_json),
                    "configured_weight_percent": buckets_to_percent(r.file_buckets),
                    "effective_weight_percent": buckets_to_percent(r.split.canary_buckets),
                    "weight_source": r.weight_source.as_str(),
                    "rollout_state": rollout_state(r, phase),
                    "phase": phase,
                    "rollout": rollout,
                    "consecutive_failures": control.map(|c| c.failures),
                    "evaluations": control.map(|c| c.evaluations),
                    "last_verdict": control.map(|c| c.last_verdict),
                    "fleet_generation": control.filter(|_| self.shared.fleet.is_some()).map(|c| c.fleet_generation),
                    // [fleet]: every user to stable because this replica is cut off from the store.
                    "fleet_cut_off": control.filter(|_| self.shared.fleet.is_some()).map(|c| c.cut_off),
                    // [fleet]: what this replica's file decides (weight, steps) and what the
                    // fleet runs: the newest file decision any replica loaded.
                    "file_decision": control.filter(|c| self.shared.fleet.is_some() && c.canary_version.is_some()).map(|c| {
                        let (own, fleet) = c.file_hashes();
                        json!({
                            "file_hash": own,
                            "fleet_hash": fleet,
                            "differs_since_unix_ms": c.file_skew_since_ms,
                        })
                    }),
                    // [fleet]: the analysis window summed over the replicas, as last judged.
                    "fleet_window": self.shared.fleet.as_ref().zip(r.canary.as_ref()).and_then(|(f, c)| f.fleet_counts(&r.name, &c.version)).map(|(sum, replicas)| json!({
                        "replicas": replicas,
                        "stable": window_json(sum.stable.stats()),
                        "canary": window_json(sum.canary.stats()),
                    })),
                    "analysis": {
                        "enabled": r.analysis.enabled,
                        "interval_seconds": r.analysis.interval.as_secs_f64(),
                        "window_seconds": r.analysis.window.as_secs(),
                        "min_requests": r.analysis.min_requests,
                    },
                    "window_seconds": STATUS_WINDOW.as_secs(),
                    "window": {
                        "stable": window(Track::Stable, STATUS_WINDOW),
                        "canary": window(Track::Canary, STATUS_WINDOW),
                    },
                    "recent_seconds": RECENT_WINDOW.as_secs(),
                    "recent": {
                        "stable": window(Track::Stable, RECENT_WINDOW),
                        "canary": window(Track::Canary, RECENT_WINDOW),
                    },
                    "in_flight": {
                        "stable": in_flight(Track::Stable),
                        "canary": in_flight(Track::Canary),
                    },
                    "totals": {
                        "stable": totals(Track::Stable),
                        "canary": totals(Track::Canary),
                        "retried_on_stable": live.route_metrics.get(i).map(|m| m.retried_on_stable.get()),
                    },
                    "shadow": r.shadow.as_ref().map(|s| {
                        let mut v = shadow_json(s, self.shared.live.metrics.shadows.get(&r.name).as_deref());
                        // [fleet]: the most frequent differences summed over the replicas
                        // (each shares its own with its analysis counts).
                        if let (Some(f), Some(c)) = (self.shared.fleet.as_ref(), r.canary.as_ref()) {
                            v["fleet_differences"] = fleet_differences(f, &r.name, &c.version);
                        }
                        v
                    }),
                })
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "config_path": self.shared.config_path.display().to_string(),
            "config_generation": snap.generation,
            "last_reload": {
                "at_unix": reload.at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                "trigger": reload.trigger,
                "ok": reload.ok,
                "errors": reload.errors,
                "restart_required": reload.restart_required,
            },
            "routes": routes,
            "fleet": self.shared.fleet.as_ref().map(|f| fleet_json(f)),
            "events": self.shared.events(),
            "tls": crate::runtime::certs::store().map(|s| s.status()),
        })
    }

    async fn mutate(
        &self,
        session: &mut ServerSession,
        route: &str,
        action: &str,
    ) -> Response<Vec<u8>> {
        let snap = self.shared.snapshot();
        let Some(token) = snap.config.admin.token.as_deref() else {
            return error(
                StatusCode::FORBIDDEN,
                "admin mutations are disabled: set admin.token_file in the config or KANARIA_ADMIN_TOKEN in the environment, then restart",
            );
        };
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(presented.trim().as_bytes(), token.as_bytes()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer <token>)",
            );
        }
        if let Some(refused) = csrf_refusal(session.req_header()) {
            return refused;
        }
        let act = match action {
            "weight" => {
                let body = match read_body(session).await {
                    Ok(b) => b,
                    Err(resp) => return resp,
                };
                let percent = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("percent").and_then(Value::as_f64));
                let Some(percent) = percent else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "body must be JSON like {\"percent\": 25}",
                    );
                };
                OperatorAction::Weight(percent)
            }
            "rollback" => OperatorAction::Rollback,
            "promote" => {
                // An empty body is a plain promotion; `{"drain": true}` also ends the
                // streams of the stable users it moves to the canary.
                let body = match read_body(session).await {
                    Ok(b) => b,
                    Err(resp) => return resp,
                };
                let drain = if body.iter().all(u8::is_ascii_whitespace) {
                    Some(false)
                } else {
                    serde_json::from_slice::<Value>(&body)
                        .ok()
                        .filter(Value::is_object)
                        .and_then(|v| match v.get("drain") {
                            None => Some(false),
                            Some(d) => d.as_bool(),
                        })
                };
                let Some(drain) = drain else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "body must be empty or JSON like {\"drain\": true}",
                    );
                };
                OperatorAction::Promote { drain }
            }
            "pause" => OperatorAction::Pause,
            "resume" => OperatorAction::Resume,
            _ => return error(StatusCode::NOT_FOUND, format!("no action {action:?}")),
        };
        // The action returns once its state file is durable: wait off the async runtime.
        let (shared, name) = (self.shared.clone(), route.to_string());
        let result = match tokio::task::spawn_blocking(move || shared.act(&name, act)).await {
            Ok(result) => result,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
        };
        // What this replica serves for the route now.
        let served = |generation: u64| {
            let control = self.shared.route_control(route);
            let snap = self.shared.snapshot();
            let r = snap.routes.iter().find(|r| r.name == route);
            json!({
                "route": route,
                "action": action,
                "config_generation": generation.max(snap.generation),
                "effective_weight_percent": r.map(|r| buckets_to_percent(r.split.canary_buckets)),
                "rollout_state": r.map(|r| rollout_state(r, control.as_ref().map(|c| &c.phase))),
                // The canary version the action applied to (a rollback holds that one).
                "canary_version": control.as_ref().and_then(|c| c.canary_version.clone()),
            })
        };
        let with = |mut v: Value, key: &str, value: Value| {
            if let Some(o) = v.as_object_mut() {
                o.insert(key.to_string(), value);
            }
            v
        };
        match result {
            Ok(generation) => json_response(StatusCode::OK, served(generation)),
            Err(e @ ControlError::NoSuchRoute(_)) => error(StatusCode::NOT_FOUND, e),
            Err(e @ ControlError::BadWeight(_)) => error(StatusCode::BAD_REQUEST, e),
            Err(e @ ControlError::Refused(_)) => error(StatusCode::CONFLICT, e),
            // Refused by the fleet's store: undone here; the fleet's record says what is.
            Err(ControlError::FleetRefused { message, current }) => {
                let body = with(served(0), "error", json!(message));
                json_response(
                    StatusCode::CONFLICT,
                    with(body, "fleet_record", json!(current)),
                )
            }
            // Applied here, not yet in the store: not the fleet's change yet.
            Err(e @ ControlError::NotShared(_)) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                with(served(0), "error", json!(e.to_string())),
            ),
        }
    }
}

/// Cross-site request forgery guard for mutations, checked after the token: the body type
/// must be `application/json` (an HTML form cannot send it, and a cross-origin script
/// cannot without a CORS preflight, which this API never grants), and a browser's `Origin`,
/// when sent, must be this listener itself. The API sets and reads no cookies: the token
/// travels only in `Authorization`.
fn csrf_refusal(req: &pingora::http::RequestHeader) -> Option<Response<Vec<u8>>> {
    let content_type = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Some(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "mutations need Content-Type: application/json",
        ));
    }
    if let Some(origin) = req.headers.get(http::header::ORIGIN) {
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host));
        if !same {
            return Some(error(
                StatusCode::FORBIDDEN,
                "cross-origin mutations are refused",
            ));
        }
    }
    None
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_BODY {
                    return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"));
                }
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(error(StatusCode::BAD_REQUEST, format!("reading body: {e}"))),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (segments.as_slice(), &method) {
            ([""] | ["dashboard"], &Method::GET) => dashboard(),
            (["metrics"], &Method::GET) => text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.shared.live.render_metrics(),
            ),
            (["healthz"], &Method::GET) => text(StatusCode::OK, "text/plain", "ok\n".into()),
            (["readyz"], &Method::GET) => {
                if self.is_ready().await {
                    text(StatusCode::OK, "text/plain", "ready\n".into())
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: proxy listeners not accepting yet\n".into(),
                    )
                }
            }
            (["api", "v1", "status"], &Method::GET) => json_response(StatusCode::OK, self.status()),
            (["api", "v1", "routes", route, action], &Method::POST) => {
                let (route, action) = (route.to_string(), action.to_string());
                self.mutate(session, &route, &action).await
            }
            (["metrics"] | ["healthz"] | ["readyz"] | ["api", "v1", "status"], _) => {
                error(StatusCode::METHOD_NOT_ALLOWED, "use GET")
            }
            (["api", "v1", "routes", _, _], _) => {
                let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
                resp.headers_mut()
                    .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
                resp
            }
            _ => error(StatusCode::NOT_FOUND, format!("no admin endpoint {path}")),
        }
    }
}

/// A route's dark launch in the status: its settings and what its shadow saw (copies,
/// drops, errors and p99 beside stable's, the compared answers and the fields that
/// differ, most first, with examples; noise apart).
fn shadow_json(
    s: &crate::config::ShadowSettings,
    seen: Option<&crate::stats::shadow::ShadowStats>,
) -> serde_json::Value {
    use crate::stats::shadow::Dropped;
    use std::sync::atomic::Ordering::Relaxed;
    let report = seen.map(|x| x.report()).unwrap_or_default();
    let mut fields: Vec<_> = report
        .entries
        .iter()
        .filter(|(_, _, e)| e.differences > 0)
        .collect();
    fields.sort_by_key(|e| std::cmp::Reverse(e.2.differences));
    let n = |f: fn(&crate::stats::shadow::ShadowStats) -> u64| seen.map_or(0, f);
    json!({
        "share_percent": buckets_to_percent(s.share_buckets),
        "methods": s.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        "amplify": s.amplify,
        "mirrored": n(|x| x.mirrored.load(Relaxed)),
        "sent": n(|x| x.sent.load(Relaxed)),
        "errors": n(|x| x.errors.load(Relaxed)),
        "dropped": Dropped::ALL.iter().map(|d| (d.as_str().to_string(), json!(seen.map_or(0, |x| x.dropped_count(*d))))).collect::<serde_json::Map<_, _>>(),
        "compared": n(|x| x.compared.load(Relaxed)),
        "differing": n(|x| x.differing.load(Relaxed)),
        "diff_rate": seen.map_or(0.0, |x| x.diff_rate()),
        "p99_ms": {
            "shadow": report.shadow_p99 * 1000.0,
            "stable": report.stable_p99 * 1000.0,
        },
        "differences": fields.iter().take(20).map(|(path, field, e)| json!({
            "path": path,
            "field": field,
            "count": e.differences,
            "examples": e.examples.iter().map(|x| json!({
                "request_id": x.request_id,
                "path": x.path,
                "stable": x.stable,
                "shadow": x.shadow,
                "headers": x.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "noise": report.entries.iter().filter(|(_, _, e)| e.noise > 0).map(|(path, field, e)| json!({
            "path": path,
            "field": field,
            "seen": e.noise,
        })).collect::<Vec<_>>(),
    })
}

/// The most frequent differences of a route's shadow summed over the fleet: this
/// replica's share and the others' recent ones, most first.
fn fleet_differences(
    fleet: &crate::control::fleet::Fleet,
    route: &str,
    version: &str,
) -> serde_json::Value {
    let mut sum: std::collections::BTreeMap<(String, String), u64> = Default::default();
    let mine = fleet.own(route, version);
    for c in mine
        .iter()
        .chain(fleet.others(route, version).iter().map(|(_, c)| c))
    {
        for (path, field, n) in &c.differences {
            *sum.entry((path.clone(), field.clone())).or_default() += n;
        }
    }
    let mut rows: Vec<_> = sum.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    json!(rows
        .into_iter()
        .take(20)
        .map(|((path, field), count)| json!({ "path": path, "field": field, "count": count }))
        .collect::<Vec<_>>())
}
