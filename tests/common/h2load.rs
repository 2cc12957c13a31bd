//! `h2load` (Debian's nghttp2-client) as a load client: run it, read its summary.

/// Runs `h2load ARGS` and returns its standard output.
pub fn run(args: &[&str]) -> String {
    let out = std::process::Command::new("h2load")
        .args(args)
        .output()
        .expect("run h2load (Debian package nghttp2-client)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (succeeded, failed, errored) from the `requests:` line of h2load's summary.
pub fn counts(out: &str) -> (u64, u64, u64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("no summary in h2load output:\n{out}"));
    let field = |name: &str| -> u64 {
        line.split(',')
            .find_map(|p| p.trim().strip_suffix(name).map(str::trim))
            .and_then(|n| n.trim_start_matches("requests:").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    (field("succeeded"), field("failed"), field("errored"))
}
