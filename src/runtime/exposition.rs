//! The Prometheus exposition of a live process: the metrics' own series, and the gauges
//! of the live config read from it at scrape time (each would otherwise be a series of the
//! `prometheus` crate, ~450 bytes apiece: ~11 per route).

use std::sync::atomic::Ordering::Relaxed;

use crate::metrics::{family_head, sample};
use crate::rollout::phase::STATES;
use crate::split::buckets_to_percent;
use crate::stats::shadow::{Dropped, ShadowStats};

use super::{LiveHandle, Route};

impl LiveHandle {
    /// The Prometheus exposition: the metrics' own series and the gauges of the live
    /// config, read from it now (each would otherwise be a series of the `prometheus` crate,
    /// ~450 bytes apiece: ~11 per route): `kanaria_canary_weight_percent`,
    /// `kanaria_rollout_state` (as of the last publish, which every change of phase makes),
    /// `kanaria_pool_info`, `kanaria_endpoint_healthy` (the load balancers' health now) and
    /// `kanaria_dns_failures_total` (each endpoint name's failed lookups, kept with the
    /// name's answers while a pool lists it).
    /// Routes, pools and endpoints that went away have no series.
    pub fn render_metrics(&self) -> String {
        let live = self.load();
        let mut routes: Vec<(&Route, &'static str)> = live
            .snapshot
            .routes
            .iter()
            .map(|r| &**r)
            .zip(live.states.iter().copied())
            .collect();
        routes.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let pools = |r: &'_ Route| {
            [
                ("stable", Some(r.stable.clone())),
                ("canary", r.canary.clone()),
            ]
            .into_iter()
            .filter_map(|(role, p)| p.map(|p| (role, p)))
            .collect::<Vec<_>>()
        };
        let weight = |out: &mut String| {
            let name = "kanaria_canary_weight_percent";
            if routes.is_empty() {
                return;
            }
            family_head(out, name, "Effective canary weight in percent.", "gauge");
            for (r, _) in &routes {
                sample(
                    out,
                    name,
                    &[("route", r.name.as_str())],
                    buckets_to_percent(r.split.canary_buckets),
                );
            }
        };
        let state = |out: &mut String| {
            let name = "kanaria_rollout_state";
            if routes.is_empty() {
                return;
            }
            family_head(
                out,
                name,
                "1 for the route's current rollout state.",
                "gauge",
            );
            let mut names = STATES;
            names.sort();
            for (r, current) in &routes {
                for st in names {
                    sample(
                        out,
                        name,
                        &[("route", r.name.as_str()), ("state", st)],
                        f64::from(u8::from(st == *current)),
                    );
                }
            }
        };
        let info = |out: &mut String| {
            let name = "kanaria_pool_info";
            // Sorted by label values, labels by name: release, route, version.
            let mut rows: Vec<(String, &str, &str)> = routes
                .iter()
                .flat_map(|(r, _)| {
                    pools(r)
                        .into_iter()
                        .map(move |(role, p)| (p.version.clone(), r.name.as_str(), role))
                })
                .collect();
            if rows.is_empty() {
                return;
            }
            rows.sort();
            family_head(
                out,
                name,
                "The release label each version of a route runs.",
                "gauge",
            );
            for (release, route, role) in &rows {
                sample(
                    out,
                    name,
                    &[
                        ("release", release.as_str()),
                        ("route", route),
                        ("version", role),
                    ],
                    1.0,
                );
            }
        };
        let healthy = |out: &mut String| {
            let name = "kanaria_endpoint_healthy";
            // Labels by name: endpoint, route, version.
            let mut rows: Vec<(String, &str, &str, bool)> = routes
                .iter()
                .flat_map(|(r, _)| {
                    pools(r).into_iter().flat_map(move |(role, p)| {
                        p.health()
                            .into_iter()
                            .map(move |(addr, up)| (addr.to_string(), r.name.as_str(), role, up))
                    })
                })
                .collect();
            if rows.is_empty() {
                return;
            }
            rows.sort();
            family_head(out, name, "1 when the endpoint is in rotation.", "gauge");
            for (endpoint, route, role, up) in &rows {
                sample(
                    out,
                    name,
                    &[
                        ("endpoint", endpoint.as_str()),
                        ("route", route),
                        ("version", role),
                    ],
                    f64::from(u8::from(*up)),
                );
            }
        };
        let dns_failures = |out: &mut String| {
            let name = "kanaria_dns_failures_total";
            // Labels by name: name, route, version.
            let mut rows: Vec<(String, &str, &str, u64)> = routes
                .iter()
                .flat_map(|(r, _)| {
                    pools(r).into_iter().flat_map(move |(role, p)| {
                        p.names
                            .iter()
                            .map(move |e| (e.name(), r.name.as_str(), role, e.state().failures))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            if rows.is_empty() {
                return;
            }
            rows.sort();
            family_head(
                out,
                name,
                "Failed lookups of an endpoint name (its last good addresses stay), by the route and version that list it.",
                "counter",
            );
            for (endpoint, route, role, n) in &rows {
                sample(
                    out,
                    name,
                    &[
                        ("name", endpoint.as_str()),
                        ("route", route),
                        ("version", role),
                    ],
                    *n as f64,
                );
            }
        };
        // The dark launch: what each route's shadow saw (routes that had one in this
        // process; a removed route's are forgotten with its other series).
        let shadows = self.metrics.shadows.all();
        let shadow_counter =
            |name: &'static str, help: &'static str, get: fn(&ShadowStats) -> u64| {
                let shadows = &shadows;
                move |out: &mut String| {
                    if shadows.is_empty() {
                        return;
                    }
                    family_head(out, name, help, "counter");
                    for (route, s) in shadows {
                        sample(out, name, &[("route", route.as_str())], get(s) as f64);
                    }
                }
            };
        let shadow_requests = shadow_counter(
            "kanaria_shadow_requests_total",
            "Copies of mirrored requests sent to the shadow (each mirrored request `amplify` times).",
            |s| s.sent.load(Relaxed),
        );
        let shadow_errors = shadow_counter(
            "kanaria_shadow_errors_total",
            "Copies the shadow failed: no answer in time, or a 5xx.",
            |s| s.errors.load(Relaxed),
        );
        let shadow_compared = shadow_counter(
            "kanaria_shadow_compared_total",
            "Mirrored requests whose shadow answer was compared with stable's.",
            |s| s.compared.load(Relaxed),
        );
        let shadow_dropped = |out: &mut String| {
            let name = "kanaria_shadow_dropped_total";
            if shadows.is_empty() {
                return;
            }
            family_head(
                out,
                name,
                "Mirrored requests not sent to the shadow, by reason (queue_full, body_too_large).",
                "counter",
            );
            for (route, s) in &shadows {
                for d in Dropped::ALL {
                    sample(
                        out,
                        name,
                        &[("reason", d.as_str()), ("route", route.as_str())],
                        s.dropped_count(d) as f64,
                    );
                }
            }
        };
        let shadow_differences = |out: &mut String| {
            let name = "kanaria_shadow_differences_total";
            if shadows.is_empty() {
                return;
            }
            family_head(
                out,
                name,
                "Compared answers in which the shadow differed from stable, by field (noise excluded; every path template summed).",
                "counter",
            );
            for (route, s) in &shadows {
                let mut by_field: std::collections::BTreeMap<String, u64> = Default::default();
                for (_, field, e) in s.report().entries {
                    if e.differences > 0 {
                        *by_field.entry(field).or_default() += e.differences;
                    }
                }
                for (field, n) in by_field {
                    sample(
                        out,
                        name,
                        &[("field", field.as_str()), ("route", route.as_str())],
                        n as f64,
                    );
                }
            }
        };
        self.metrics.render_with(&[
            ("kanaria_shadow_compared_total", &shadow_compared),
            ("kanaria_shadow_differences_total", &shadow_differences),
            ("kanaria_shadow_dropped_total", &shadow_dropped),
            ("kanaria_shadow_errors_total", &shadow_errors),
            ("kanaria_shadow_requests_total", &shadow_requests),
            ("kanaria_canary_weight_percent", &weight),
            ("kanaria_dns_failures_total", &dns_failures),
            ("kanaria_endpoint_healthy", &healthy),
            ("kanaria_pool_info", &info),
            ("kanaria_rollout_state", &state),
        ])
    }
}
