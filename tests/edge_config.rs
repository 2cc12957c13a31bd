//! `[edge]` and `override_secret` validation: every bad value is reported with its key path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::process::Command;

#[test]
fn bad_edge_values_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(
        &path,
        "[edge]\nheader_timeout = \"0s\"\nmax_header_bytes = 2000000\nmax_headers = 300\nmax_connections = 0\ntrusted_proxies = [\"10.0.0.0/33\"]\n\n[[routes]]\nname = \"app\"\noverride_header = \"x-v\"\noverride_secret = \"short\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n",
    )
    .unwrap();
    let out = Command::new(common::kanaria_bin())
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "edge.header_timeout",
        "edge.max_header_bytes",
        "edge.max_headers",
        "edge.max_connections",
        "edge.trusted_proxies[0]",
        "routes[app].override_secret",
    ] {
        assert!(
            err.contains(&format!(" {key}: ")),
            "{key} missing from:\n{err}"
        );
    }
}
