//! The CLI's side of the admin API: `kanaria status`, `weight`, `rollback`, `promote`,
//! `pause`, `resume`: one request each (through `reqwest`, on a small runtime of its own:
//! the CLI is synchronous), and the status table.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

/// Sends one request to the admin API and returns (status, body).
pub fn request(
    admin: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the CLI's runtime")?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let url = format!("http://{admin}{path}");
        let mut req = match method {
            "POST" => client
                .post(&url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.unwrap_or("").to_string()),
            _ => client.get(&url),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("connecting to the admin API at {admin}"))?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    })
}

/// `kanaria status`: the status API as a table.
pub fn status_table(v: &Value) -> String {
    let mut out = format!(
        "config generation {}  last reload: {} ({})\n",
        v["config_generation"],
        if v["last_reload"]["ok"].as_bool() == Some(true) {
            "ok"
        } else {
            "FAILED"
        },
        v["last_reload"]["trigger"].as_str().unwrap_or("?"),
    );
    for e in v["last_reload"]["errors"].as_array().into_iter().flatten() {
        out.push_str(&format!("  error: {}\n", e.as_str().unwrap_or("")));
    }
    out.push_str(&format!(
        "{:<16} {:<10} {:<10} {:>9} {:>9} {:<8} {:<12} {}\n",
        "ROUTE",
        "STABLE",
        "CANARY",
        "WEIGHT%",
        "CONFIG%",
        "SOURCE",
        "STATE",
        "ENDPOINTS (healthy/all)"
    ));
    for r in v["routes"].as_array().into_iter().flatten() {
        let health = |p: &Value| {
            let eps = p["endpoints"].as_array().cloned().unwrap_or_default();
            let up = eps
                .iter()
                .filter(|e| e["healthy"].as_bool() == Some(true))
                .count();
            format!("{up}/{}", eps.len())
        };
        let canary = &r["canary"];
        out.push_str(&format!(
            "{:<16} {:<10} {:<10} {:>9} {:>9} {:<8} {:<12} stable {} canary {}\n",
            r["name"].as_str().unwrap_or("?"),
            r["stable"]["version"].as_str().unwrap_or("-"),
            canary["version"].as_str().unwrap_or("-"),
            r["effective_weight_percent"].to_string(),
            r["configured_weight_percent"].to_string(),
            r["weight_source"].as_str().unwrap_or("?"),
            r["rollout_state"].as_str().unwrap_or("?"),
            health(&r["stable"]),
            if canary.is_null() {
                "-".to_string()
            } else {
                health(canary)
            },
        ));
    }
    // The dark launch of each route that has one: copies, drops, errors, p99 against
    // stable's, the compared answers and the fields that differ most.
    for r in v["routes"].as_array().into_iter().flatten() {
        let sh = &r["shadow"];
        if !sh.is_object() {
            continue;
        }
        let dropped: u64 = sh["dropped"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        out.push_str(&format!(
            "shadow {}: share {}% x{}  mirrored {}  dropped {}  errors {}/{}  p99 shadow {:.1} ms / stable {:.1} ms  compared {}  differing {} ({:.2}%)\n",
            r["name"].as_str().unwrap_or("?"),
            sh["share_percent"],
            sh["amplify"],
            sh["mirrored"],
            dropped,
            sh["errors"],
            sh["sent"],
            sh["p99_ms"]["shadow"].as_f64().unwrap_or(0.0),
            sh["p99_ms"]["stable"].as_f64().unwrap_or(0.0),
            sh["compared"],
            sh["differing"],
            sh["diff_rate"].as_f64().unwrap_or(0.0) * 100.0,
        ));
        for d in sh["differences"].as_array().into_iter().flatten().take(5) {
            let ex = &d["examples"][0];
            out.push_str(&format!(
                "  {} {}: {} (e.g. {}: stable {} / shadow {})\n",
                d["path"].as_str().unwrap_or("?"),
                d["field"].as_str().unwrap_or("?"),
                d["count"],
                ex["path"].as_str().unwrap_or("-"),
                ex["stable"].as_str().unwrap_or("-"),
                ex["shadow"].as_str().unwrap_or("-"),
            ));
        }
    }
    let fleet = &v["fleet"];
    if fleet.is_object() {
        out.push_str(&format!(
            "fleet {} (this replica: {}): {}{}\n",
            fleet["cluster"].as_str().unwrap_or("?"),
            fleet["instance"].as_str().unwrap_or("?"),
            if fleet["connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "Redis NOT REACHABLE"
            },
            if fleet["stale"].as_bool() == Some(true) {
                ", view STALE"
            } else {
                ""
            },
        ));
        out.push_str(&format!(
            "  {:<24} {:>14} GENERATIONS\n",
            "MEMBER", "LAST SEEN (s)"
        ));
        // The CLI runs apart from any control plane: "last seen" is by the operator's clock.
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        for m in fleet["members"].as_array().into_iter().flatten() {
            let seen = m["last_seen_unix_ms"].as_u64().unwrap_or(0);
            out.push_str(&format!(
                "  {:<24} {:>14.1} {}\n",
                m["instance"].as_str().unwrap_or("?"),
                now.saturating_sub(seen) as f64 / 1000.0,
                m["generations"],
            ));
        }
    }
    out
}

/// GETs the status and renders it.
pub fn status(admin: &str) -> anyhow::Result<String> {
    let (code, body) = request(admin, "GET", "/api/v1/status", None, None)?;
    if code != 200 {
        bail!("admin API answered {code}: {body}");
    }
    let v: Value = serde_json::from_str(&body).context("status is not JSON")?;
    Ok(status_table(&v))
}

/// POSTs an action on a route; returns the API's answer or its error message.
pub fn act(admin: &str, route: &str, action: &str, body: Option<&str>) -> anyhow::Result<String> {
    let token = std::env::var("KANARIA_ADMIN_TOKEN").ok();
    let path = format!("/api/v1/routes/{route}/{action}");
    let (code, answer) = request(admin, "POST", &path, token.as_deref(), body)?;
    let v: Value = serde_json::from_str(&answer).unwrap_or(Value::String(answer.clone()));
    if code != 200 {
        bail!(
            "{action} {route}: {code}: {}",
            v["error"].as_str().unwrap_or(answer.trim())
        );
    }
    Ok(format!(
        "{route}: {action} done; canary weight {}%, state {}, config generation {}",
        v["effective_weight_percent"],
        v["rollout_state"].as_str().unwrap_or("?"),
        v["config_generation"]
    ))
}
