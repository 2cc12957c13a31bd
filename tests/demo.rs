//! `kanaria demo --exit-after-scenario`: the whole story (steps, failure, automatic
//! rollback) in one process, as a newcomer runs it, ending with exit code 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

mod common;

use std::process::Command;

#[test]
fn demo_story_ends_in_a_rollback_that_users_do_not_see() {
    // Ports held for the demo, which binds them itself. Not port 0: the demo's simulated
    // users connect to the configured proxy address, and the dashboard URL is checked.
    let reserved = (
        common::ports::ReservedPort::new(),
        common::ports::ReservedPort::new(),
    );
    let (port, admin) = (reserved.0.port(), reserved.1.port());
    let out = Command::new(common::kanaria_bin())
        .args(["demo", "--exit-after-scenario"])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--admin")
        .arg(format!("127.0.0.1:{admin}"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // As a newcomer runs it: no RUST_LOG, and no log lines in the story.
        .env_remove("RUST_LOG")
        .output()
        .expect("run kanaria demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        !stderr.contains(" INFO ") && !stdout.contains(" INFO "),
        "INFO log lines interleave with the story:\n{stderr}"
    );
    for line in [
        "progressing step 1 (shadow: 100% of users mirrored to v2, none sent): canary weight 0%",
        "progressing step 2: canary weight 5%",
        "progressing step 4: canary weight 50%",
        "the canary starts failing",
        "rolled_back: canary weight 0%",
        "Demo summary",
        "errors users saw             0",
        "The canary failed and Kanaria rolled every user back to stable.",
    ] {
        assert!(stdout.contains(line), "{line:?} missing in:\n{stdout}");
    }
    assert!(stdout.contains(&format!("dashboard  http://127.0.0.1:{admin}/")));
    let took: u64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("failure to rollback"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("failure to rollback figure");
    // Loose bound (the benchmark measures it): the story's analysis runs every 250 ms.
    assert!(took < 5_000, "rollback took {took} ms");
}
