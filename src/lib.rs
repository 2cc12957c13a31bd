//! Kanaria: a canary-release reverse proxy on Pingora.
//!
//! The crate is grouped by subsystem, following a request and then the control loop:
//! - [`config`]: the file model, its validation (no network I/O) and the build step that
//!   turns it into one immutable runtime snapshot; the file watcher that hot-reloads it.
//! - [`proxy`]: Pingora's hooks (the request path), the edge checks, the connection guard,
//!   draining, and the forwarding headers.
//! - [`split`]: routing by host and path, the sticky split of users between the stable and
//!   canary *tracks*, and signed override tokens.
//! - [`rollout`]: the pure rollout state machine and everything that drives it: the
//!   controller, the analysis windows, persistence, events and the webhook.
//! - [`admin`]: the admin API, the dashboard, and the CLI's client of that API.
//! - [`metrics`]: Prometheus metrics.
//! - [`demo`]: `kanaria demo`, the built-in story.
//! - [`server`]: wires all of it into one Pingora server.
//!
//! `bench_api` (hidden) exposes request-path internals to the criterion benchmarks only.

pub mod admin;
#[doc(hidden)]
pub mod bench_api;
pub(crate) mod config;
pub mod demo;
pub mod fuzz_targets;
pub mod metrics;
pub(crate) mod proxy;
pub mod rollout;
pub mod server;
pub mod split;
