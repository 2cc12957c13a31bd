//! Replays the committed fuzz corpus (`fuzz/corpus/TARGET/*`) through the fuzz target
//! bodies on stable, so `make test` (`cargo test --all-features`: this test needs the
//! `internals` feature) checks the regression inputs even where `cargo fuzz` (nightly) is
//! not available.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A test stops where it fails.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        if path.is_file() {
            let data = std::fs::read(&path).expect("corpus file");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} fails", path.display());
            n += 1;
        }
    }
    assert!(n > 0, "{target}: empty corpus in {}", dir.display());
}

#[test]
fn config_corpus() {
    replay("config", kanaria::internals::fuzz::config);
}

#[test]
fn override_token_corpus() {
    replay("override_token", kanaria::internals::fuzz::override_token);
}

#[test]
fn route_split_corpus() {
    replay("route_split", kanaria::internals::fuzz::route_split);
}

#[test]
fn request_head_corpus() {
    replay("request_head", kanaria::internals::fuzz::request_head);
}
