//! The CLI's side of the admin API: `kanaria status`, `weight`, `rollback`, `promote`,
//! `pause`, `resume`. A minimal HTTP/1.1 client over one TCP connection (the admin API is
//! ours and local, so no TLS or redirects), and the status table.

use std::io::{Read, Write};
use std::net::TcpStream;
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
    let mut stream = TcpStream::connect(admin)
        .with_context(|| format!("connecting to the admin API at {admin}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if method == "POST" {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, rest) = raw
        .split_once("\r\n\r\n")
        .context("malformed answer from the admin API")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status in the admin API's answer")?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
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
