//! Validation of `[[routes]]`: each route's hosts and prefix, its split (sticky sources,
//! weight, overrides), timeouts, pools and their endpoints, health checks, analysis rules
//! and rollout steps.

use std::time::Duration;

use super::check::{valid_name, Check};
use crate::config::errors::KeyPath;
use crate::config::file::{AnalysisFile, HealthFile, PoolFile, RolloutFile, RouteFile, ShadowFile};
use crate::config::{
    grpc_code, AnalysisRules, HealthSettings, LatencyTo, PoolSettings, ProxySettings, Route,
    ShadowSettings, StableDown, Step, Timeouts, WeightSource,
};
use crate::split::issued::IssuedCookie;
use crate::split::{seed_for, weight_to_buckets, OverrideRule, SplitRule, StickySource};

pub(super) fn route(
    c: &mut Check,
    path: &KeyPath,
    r: &RouteFile,
    proxy: Option<&ProxySettings>,
) -> Option<Route> {
    let mut ok = true;
    for (i, h) in r.hosts.iter().enumerate() {
        if h.is_empty() || h.contains(['/', ' ', ':']) {
            c.err(
                path.key("hosts").index(i),
                format!("{h:?} is not a host name (no scheme, port or path)"),
            );
            ok = false;
        }
    }
    if !r.path_prefix.starts_with('/') {
        c.err(
            path.key("path_prefix"),
            format!("{:?} must start with \"/\"", r.path_prefix),
        );
        ok = false;
    }
    let mut sticky = Vec::new();
    for (i, s) in r.sticky_by.iter().enumerate() {
        match StickySource::parse(s) {
            Ok(src) => {
                // Issuing gives every request a key: what follows is never reached, and an
                // issued cookie after client_ip would never be issued.
                let blocked = if sticky
                    .iter()
                    .any(|p| matches!(p, StickySource::IssuedCookie(_)))
                {
                    Some("an issued_cookie (every request has a key from it)")
                } else if matches!(src, StickySource::IssuedCookie(_))
                    && sticky.contains(&StickySource::ClientIp)
                {
                    Some("client_ip (every request has a client address)")
                } else {
                    None
                };
                if let Some(prev) = blocked {
                    c.err(
                        path.key("sticky_by").index(i),
                        format!("{s:?} is never reached: it comes after {prev}"),
                    );
                    ok = false;
                }
                sticky.push(src)
            }
            Err(e) => {
                c.err(path.key("sticky_by").index(i), e);
                ok = false;
            }
        }
    }
    let issued_max_age = c.duration(path.key("issued_cookie_max_age"), &r.issued_cookie_max_age);
    let weight = match weight_to_buckets(r.canary_weight) {
        Ok(w) => Some(w),
        Err(e) => {
            c.err(path.key("canary_weight"), e);
            None
        }
    };
    if r.canary_weight > 0.0 && r.canary.is_none() {
        c.err(
            path.key("canary_weight"),
            format!("{} needs a [routes.canary] pool", r.canary_weight),
        );
        ok = false;
    }
    let header = r
        .override_header
        .as_deref()
        .map(|h| c.header_name(path.key("override_header"), h));
    if let Some(cookie) = &r.override_cookie {
        if !valid_name(cookie) {
            c.err(
                path.key("override_cookie"),
                format!("{cookie:?} is not a valid cookie name"),
            );
            ok = false;
        }
    }
    let trusted = c
        .ip_nets(
            path.key("override_trusted_cidrs"),
            &r.override_trusted_cidrs,
        )
        .unwrap_or_else(|| {
            ok = false;
            Vec::new()
        });
    let mut key = None;
    if let Some(secret) = &r.override_secret {
        let secret = secret.trim();
        if secret.len() < crate::split::override_token::MIN_SECRET_LEN {
            c.err(
                path.key("override_secret"),
                format!(
                    "{} bytes is too short: use at least {} random bytes (e.g. `openssl rand -hex 32`)",
                    secret.len(),
                    crate::split::override_token::MIN_SECRET_LEN
                ),
            );
            ok = false;
        } else if r.override_header.is_none() && r.override_cookie.is_none() {
            c.err(
                path.key("override_secret"),
                "set override_header or override_cookie too: the secret signs their values",
            );
            ok = false;
        } else {
            key = crate::split::override_token::OverrideKey::new(secret.as_bytes(), &r.name);
        }
    }
    let defaults = proxy.map(|p| p.timeouts);
    let connect = r
        .connect_timeout
        .as_deref()
        .map(|s| c.duration(path.key("connect_timeout"), s));
    let read = r
        .read_timeout
        .as_deref()
        .map(|s| c.duration(path.key("read_timeout"), s));
    let canary_timeout = r
        .canary_timeout
        .as_deref()
        .map(|s| c.duration(path.key("canary_timeout"), s));
    // Zero is allowed: every upgraded canary connection closed at the rollback itself.
    let rollback_drain = match r.rollback_drain.as_deref() {
        None => Some(Duration::from_secs(5)),
        Some(s) => match humantime::parse_duration(s) {
            Ok(d) => Some(d),
            Err(_) => {
                c.err(
                    path.key("rollback_drain"),
                    format!("{s:?} is not a duration (e.g. \"5s\", or \"0s\" for at once)"),
                );
                None
            }
        },
    };

    let stable_down = match r.stable_down.as_str() {
        "keep_stable" => StableDown::KeepStable,
        "serve_canary" => StableDown::ServeCanary,
        other => {
            c.err(
                path.key("stable_down"),
                format!("{other:?} is not \"keep_stable\" or \"serve_canary\""),
            );
            ok = false;
            StableDown::KeepStable
        }
    };
    let health = r.health.as_ref().map(|h| health(c, &path.key("health"), h));
    let shadow = r.shadow.as_ref().map(|s| {
        if r.canary.is_none() && s.endpoints.is_empty() {
            c.err(
                path.key("shadow"),
                "a shadow needs a [routes.canary] pool or its own endpoints",
            );
        }
        shadow(c, &path.key("shadow"), s)
    });
    let default_analysis = AnalysisFile::default();
    let analysis = analysis(
        c,
        &path.key("analysis"),
        r.analysis.as_ref().unwrap_or(&default_analysis),
    );
    let steps = match &r.rollout {
        Some(ro) => {
            if r.canary.is_none() {
                c.err(
                    path.key("rollout"),
                    "a rollout needs a [routes.canary] pool",
                );
                ok = false;
            }
            if r.canary_weight > 0.0 {
                c.err(
                    path.key("canary_weight"),
                    "set either canary_weight or [routes.rollout], not both: the rollout's steps set the weight",
                );
                ok = false;
            }
            rollout(c, &path.key("rollout"), ro, r.shadow.is_some())
        }
        None => Some(Vec::new()),
    };

    let health = match health {
        Some(Some(h)) => Some(h),
        Some(None) => return None,
        None => None,
    };
    let resolve_default = proxy.map(|p| p.resolve_interval);
    let stable = pool(c, &path.key("stable"), &r.stable, resolve_default);
    let canary = r
        .canary
        .as_ref()
        .map(|p| pool(c, &path.key("canary"), p, resolve_default));
    if let Some(cp) = &r.canary {
        if cp.version == r.stable.version && !cp.version.is_empty() {
            c.err(
                path.key("canary").key("version"),
                format!(
                    "{:?} is also the stable version; the canary must be another release",
                    cp.version
                ),
            );
            ok = false;
        }
    }

    let defaults = defaults?;
    let timeouts = Timeouts {
        connect: connect.unwrap_or(Some(defaults.connect))?,
        read: read.unwrap_or(Some(defaults.read))?,
        ..defaults
    };
    let analysis = analysis?;
    // A canary twice as slow as its latency limit is not worth waiting for: stable answers.
    let canary_timeout = match canary_timeout {
        Some(d) => d?,
        None => analysis
            .max_p99_latency
            .map_or(timeouts.read, |l| (2 * l).min(timeouts.read)),
    };
    let header = header.unwrap_or(None);
    let shadow = match shadow {
        Some(Some(s)) => Some(s),
        Some(None) => return None,
        None => None,
    };
    if !ok || (r.override_header.is_some() && header.is_none()) {
        return None;
    }
    Some(Route {
        name: r.name.clone(),
        hosts: r.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        path_prefix: r.path_prefix.clone(),
        file_buckets: weight?,
        retry_on_stable: r.retry_on_stable,
        canary_timeout,
        rollback_drain: rollback_drain?,
        drain_on_weight_change: r.drain_on_weight_change,
        stable_down,
        health,
        analysis,
        steps: steps?,
        shadow,
        issued_cookie: match sticky.iter().find_map(|s| match s {
            StickySource::IssuedCookie(name) => Some(name.clone()),
            _ => None,
        }) {
            Some(name) => Some(IssuedCookie {
                name,
                max_age: issued_max_age?,
            }),
            None => None,
        },
        split: SplitRule {
            sticky,
            seed: seed_for(r.hash_salt.as_deref().unwrap_or(&r.name)),
            canary_buckets: weight?,
            overrides: OverrideRule {
                header,
                cookie: r.override_cookie.clone(),
                trusted,
                key,
            },
        },
        timeouts,
        stable: stable?,
        canary: match canary {
            Some(p) => Some(p?),
            None => None,
        },
        weight_source: WeightSource::File,
    })
}

fn pool(
    c: &mut Check,
    path: &KeyPath,
    p: &PoolFile,
    resolve_default: Option<Duration>,
) -> Option<PoolSettings> {
    let mut ok = true;
    if !valid_name(&p.version) {
        c.err(
            path.key("version"),
            format!(
                "{:?} is not a valid version label (1 to 64 of A-Z a-z 0-9 - _ .)",
                p.version
            ),
        );
        ok = false;
    }
    if p.endpoints.is_empty() {
        c.err(
            path.key("endpoints"),
            "no endpoints: a pool needs at least one HOST:PORT",
        );
        ok = false;
    }
    let h2c = c.protocol(path.key("protocol"), &p.protocol);
    let resolve_interval = match &p.resolve_interval {
        Some(s) => c.duration(path.key("resolve_interval"), s),
        None => resolve_default,
    };
    let mut endpoints = c.endpoints(&path.key("endpoints"), &p.endpoints);
    if !ok || h2c.is_none() || endpoints.len() != p.endpoints.len() {
        return None;
    }
    endpoints.sort();
    endpoints.dedup();
    Some(PoolSettings {
        version: p.version.clone(),
        endpoints,
        h2c: h2c?,
        resolve_interval: resolve_interval?,
    })
}

fn health(c: &mut Check, path: &KeyPath, h: &HealthFile) -> Option<HealthSettings> {
    let mut ok = true;
    if !h.path.starts_with('/') {
        c.err(
            path.key("path"),
            format!("{:?} must start with \"/\"", h.path),
        );
        ok = false;
    }
    for (key, v) in [
        ("healthy_threshold", h.healthy_threshold),
        ("unhealthy_threshold", h.unhealthy_threshold),
    ] {
        if v == 0 {
            c.err(path.key(key), "must be at least 1");
            ok = false;
        }
    }
    if !(100..=599).contains(&h.expected_status) {
        c.err(
            path.key("expected_status"),
            format!("{} is not an HTTP status", h.expected_status),
        );
        ok = false;
    }
    let interval = c.duration(path.key("interval"), &h.interval);
    let timeout = c.duration(path.key("timeout"), &h.timeout);
    if !ok {
        return None;
    }
    Some(HealthSettings {
        path: h.path.clone(),
        interval: interval?,
        timeout: timeout?,
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
        expected_status: h.expected_status,
    })
}

fn analysis(c: &mut Check, path: &KeyPath, a: &AnalysisFile) -> Option<AnalysisRules> {
    let mut ok = true;
    let interval = c.duration(path.key("interval"), &a.interval);
    let window = c.duration(path.key("window"), &a.window);
    if let Some(w) = window {
        if w.as_secs() > crate::stats::window::MAX_WINDOW_SECS
            || w < std::time::Duration::from_secs(1)
        {
            c.err(
                path.key("window"),
                format!(
                    "{:?} must be between 1s and {}s",
                    a.window,
                    crate::stats::window::MAX_WINDOW_SECS
                ),
            );
            ok = false;
        }
    }
    let max_p99 = a
        .max_p99_latency
        .as_deref()
        .map(|s| c.duration(path.key("max_p99_latency"), s));
    for (key, v) in [
        ("max_error_rate", a.max_error_rate),
        ("max_diff_rate", a.max_diff_rate),
    ] {
        if let Some(r) = v {
            if !(0.0..=1.0).contains(&r) {
                c.err(path.key(key), format!("{r} is not a rate in 0..=1"));
                ok = false;
            }
        }
    }
    for (key, v) in [
        ("max_error_rate_ratio", a.max_error_rate_ratio),
        ("max_p99_latency_ratio", a.max_p99_latency_ratio),
    ] {
        if let Some(v) = v {
            if !(v.is_finite() && v >= 1.0) {
                c.err(path.key(key), format!("{v} must be at least 1.0"));
                ok = false;
            }
        }
    }
    if !(a.confidence > 0.5 && a.confidence < 1.0) {
        c.err(
            path.key("confidence"),
            format!("{} must be between 0.5 and 1 (e.g. 0.99)", a.confidence),
        );
        ok = false;
    }
    if a.failure_limit == 0 {
        c.err(path.key("failure_limit"), "must be at least 1");
        ok = false;
    }
    let mut grpc_error_codes = 0u32;
    for (i, name) in a.grpc_error_codes.iter().enumerate() {
        match grpc_code(name) {
            Some(code) => grpc_error_codes |= 1 << code,
            None => {
                c.err(
                    path.key("grpc_error_codes").index(i),
                    format!(
                        "{name:?} is not a gRPC status code name (e.g. \"UNAVAILABLE\", \"INTERNAL\")"
                    ),
                );
                ok = false;
            }
        }
    }
    let latency = match a.latency.as_str() {
        "answer" => LatencyTo::Answer,
        "head" => LatencyTo::Head,
        other => {
            c.err(
                path.key("latency"),
                format!("{other:?} is not \"answer\" or \"head\""),
            );
            ok = false;
            LatencyTo::Answer
        }
    };
    let mut stream_content_types = Vec::with_capacity(a.stream_content_types.len());
    for (i, t) in a.stream_content_types.iter().enumerate() {
        if media_type(t) {
            stream_content_types.push(t.to_ascii_lowercase());
        } else {
            c.err(
                path.key("stream_content_types").index(i),
                format!("{t:?} is not a media type (as \"text/event-stream\", without parameters)"),
            );
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    Some(AnalysisRules {
        enabled: a.enabled,
        interval: interval?,
        window: window?,
        min_requests: a.min_requests,
        max_error_rate: a.max_error_rate,
        max_p99_latency: match max_p99 {
            Some(d) => Some(d?),
            None => None,
        },
        max_error_rate_ratio: a.max_error_rate_ratio,
        max_p99_latency_ratio: a.max_p99_latency_ratio,
        max_diff_rate: a.max_diff_rate,
        confidence: a.confidence,
        failure_limit: a.failure_limit,
        grpc_error_codes,
        latency,
        stream_content_types,
    })
}

/// `type/subtype`, both HTTP tokens (RFC 9110 §8.3.1), no parameters.
fn media_type(t: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    t.split_once('/')
        .is_some_and(|(ty, sub)| token(ty) && token(sub))
}

fn rollout(c: &mut Check, path: &KeyPath, r: &RolloutFile, has_shadow: bool) -> Option<Vec<Step>> {
    if r.steps.is_empty() {
        c.err(path.key("steps"), "at least one step is required");
        return None;
    }
    let mut steps = Vec::new();
    let mut ok = true;
    let mut last = 0;
    let mut weighted = false;
    for (i, st) in r.steps.iter().enumerate() {
        let p = path.key("steps").index(i);
        let hold = match &st.hold {
            Some(h) => c.duration(p.key("hold"), h),
            None => Some(std::time::Duration::ZERO),
        };
        if let Some(share) = st.shadow {
            let share = match weight_to_buckets(share) {
                Ok(0) => {
                    c.err(p.key("shadow"), "a shadow step's share must be above 0");
                    None
                }
                Ok(b) => Some(b),
                Err(e) => {
                    c.err(p.key("shadow"), e);
                    None
                }
            };
            if st.weight != 0.0 {
                c.err(
                    p.key("weight"),
                    "a step is a shadow step (no user on the canary) or a weighted one, not both",
                );
                ok = false;
            }
            if weighted {
                c.err(
                    p.key("shadow"),
                    "shadow steps come before the weighted ones",
                );
                ok = false;
            }
            if !has_shadow {
                c.err(
                    p.key("shadow"),
                    "a shadow step needs a [routes.shadow] section",
                );
                ok = false;
            }
            match (share, hold) {
                (Some(b), Some(h)) => steps.push(Step {
                    buckets: 0,
                    hold: h,
                    shadow: b,
                }),
                _ => ok = false,
            }
            continue;
        }
        weighted = true;
        let buckets = match weight_to_buckets(st.weight) {
            Ok(0) => {
                c.err(p.key("weight"), "a step's weight must be above 0");
                None
            }
            Ok(b) if b < last => {
                c.err(
                    p.key("weight"),
                    format!("{} is below the previous step's", st.weight),
                );
                None
            }
            Ok(b) => Some(b),
            Err(e) => {
                c.err(p.key("weight"), e);
                None
            }
        };
        match (buckets, hold) {
            (Some(b), Some(h)) => {
                last = b;
                steps.push(Step {
                    buckets: b,
                    hold: h,
                    shadow: 0,
                });
            }
            _ => ok = false,
        }
    }
    ok.then_some(steps)
}

/// `[routes.shadow]`: every error reported, each at its key; `None` when any.
fn shadow(c: &mut Check, path: &KeyPath, s: &ShadowFile) -> Option<ShadowSettings> {
    let before = c.errors.len();
    let percent = |c: &mut Check, key: &str, v: f64| match weight_to_buckets(v) {
        Ok(b) => b,
        Err(e) => {
            c.err(path.key(key), e);
            0
        }
    };
    let share_buckets = percent(c, "share", s.share);
    let noise_buckets = percent(c, "noise_share", s.noise_share);
    let mut methods = Vec::new();
    for (i, m) in s.methods.iter().enumerate() {
        match http::Method::from_bytes(m.as_bytes()) {
            Ok(x) if m.bytes().all(|b| b.is_ascii_uppercase()) => methods.push(x),
            _ => c.err(
                path.key("methods").index(i),
                format!("{m:?} is not a method in capitals (e.g. \"GET\")"),
            ),
        }
    }
    if !(1..=20).contains(&s.amplify) {
        c.err(
            path.key("amplify"),
            format!("{} is not in 1..=20", s.amplify),
        );
    }
    if !(1..=10_000).contains(&s.max_in_flight) {
        c.err(
            path.key("max_in_flight"),
            format!("{} is not in 1..=10000", s.max_in_flight),
        );
    }
    if !(1..=1_000_000).contains(&s.queue) {
        c.err(
            path.key("queue"),
            format!("{} is not in 1..=1000000", s.queue),
        );
    }
    let marker = c.header_name(path.key("marker_header"), &s.marker_header);
    let body_limit = match s.compare_body_limit.as_deref() {
        None => Some(64 * 1024),
        Some(v) => match byte_size(v) {
            Some(n) if n <= 16 << 20 => Some(n),
            _ => {
                let msg = format!("{v:?} is not a size of at most 16MiB");
                c.err(
                    path.key("compare_body_limit"),
                    msg + " (e.g. \"64KiB\", \"1MiB\", \"4096\")",
                );
                None
            }
        },
    };
    let compare_headers: Vec<_> = s
        .compare_headers
        .iter()
        .enumerate()
        .filter_map(|(i, h)| c.header_name(path.key("compare_headers").index(i), h))
        .collect();
    let endpoints = c.endpoints(&path.key("endpoints"), &s.endpoints);
    let h2c = c.protocol(path.key("protocol"), &s.protocol);
    let timeout = match s.timeout.as_deref() {
        None => Some(Duration::from_secs(5)),
        Some(t) => c.duration(path.key("timeout"), t),
    };
    if c.errors.len() > before {
        return None;
    }
    Some(ShadowSettings {
        share_buckets,
        methods,
        amplify: s.amplify,
        max_in_flight: s.max_in_flight,
        queue: s.queue,
        marker: marker?,
        body_limit: body_limit?,
        compare_headers,
        noise_buckets,
        endpoints,
        h2c: h2c?,
        timeout: timeout?,
    })
}

/// `"64KiB"`, `"1MiB"`, `"4096"` (bytes): a size in bytes.
fn byte_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let n: usize = s.get(..digits)?.parse().ok()?;
    let unit = match s.get(digits..)?.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "k" => 1024,
        "MiB" | "MB" | "M" => 1 << 20,
        _ => return None,
    };
    n.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use crate::config::{load_str, LatencyTo};

    fn with_analysis(keys: &str) -> Result<crate::config::Config, String> {
        let text = format!(
            "[[routes]]\nname = \"app\"\n[routes.analysis]\n{keys}\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n"
        );
        load_str(&text, "t.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn latency_defaults_to_the_whole_answer_with_sse_and_grpc_as_streams() {
        let c = with_analysis("").unwrap();
        let a = &c.routes[0].analysis;
        assert_eq!(a.latency, LatencyTo::Answer);
        assert_eq!(
            a.stream_content_types,
            ["text/event-stream", "application/grpc"]
        );
    }

    #[test]
    fn latency_and_stream_content_types_are_read_lowercased() {
        let c =
            with_analysis("latency = \"head\"\nstream_content_types = [\"Application/X-NDJSON\"]")
                .unwrap();
        let a = &c.routes[0].analysis;
        assert_eq!(a.latency, LatencyTo::Head);
        assert_eq!(a.stream_content_types, ["application/x-ndjson"]);
        let c = with_analysis("stream_content_types = []").unwrap();
        assert!(c.routes[0].analysis.stream_content_types.is_empty());
    }

    #[test]
    fn a_bad_latency_names_its_key() {
        let e = with_analysis("latency = \"tail\"").unwrap_err();
        assert!(
            e.contains("routes[app].analysis.latency: \"tail\" is not \"answer\" or \"head\""),
            "{e}"
        );
    }

    #[test]
    fn a_bad_stream_content_type_names_its_key_and_index() {
        for bad in [
            "text",
            "text/",
            "/event-stream",
            "text/event-stream; charset=utf-8",
            "text /plain",
            "",
        ] {
            let e = with_analysis(&format!(
                "stream_content_types = [\"text/event-stream\", {bad:?}]"
            ))
            .unwrap_err();
            assert!(
                e.contains("routes[app].analysis.stream_content_types[1]: ")
                    && e.contains("is not a media type"),
                "{bad:?}: {e}"
            );
        }
    }
}
