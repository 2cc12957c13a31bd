//! The vendored Pingora crates are the pristine crates.io sources plus the patches in
//! `vendor/patches`, nothing else: `vendor/vendor.sh check` reverse-applies each crate's
//! patches and compares the result with the pristine tree's recorded hash (offline).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

use std::process::Command;

#[test]
fn vendored_pingora_is_pristine_plus_patches() {
    let out = Command::new("bash")
        .arg("vendor/vendor.sh")
        .arg("check")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run vendor/vendor.sh (needs bash, patch, sha256sum)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vendor/ is not pristine + vendor/patches:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok   pingora-http"), "{stdout}");
}
