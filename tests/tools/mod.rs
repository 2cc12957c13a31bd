//! External tools the deploy tests run: Prometheus' `promtool` and `prometheus` (Debian
//! package `prometheus`, installed by `make deps`), found on `PATH`.

#![allow(dead_code)]

use std::path::PathBuf;

/// The path of `name` on `PATH`; fails the test, saying what to install, when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on PATH: install Prometheus (Debian/Ubuntu: `make deps` or \
                 `apt-get install prometheus`; elsewhere a release from prometheus.io)"
            )
        })
}

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy")
}
