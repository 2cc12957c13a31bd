//! Kanaria: a canary-release reverse proxy on Pingora.
//!
//! Layers, bottom to top; a module imports only from its own layer or those below
//! (`tests/layers.rs` keeps it so):
//! 1. [`split`] (routing and the sticky split of users between the stable and canary
//!    *tracks*), [`stats`] (outcome windows, requests in flight, the Fisher test) and
//!    [`clock`]: pure data and maths.
//! 2. [`config`]: the file model, its validation and its errors: settings only; it reads
//!    the config file and the admin token file, and nothing else (no socket, no name
//!    resolution).
//! 3. [`runtime`] (the live snapshot built from settings, and the handle the data plane
//!    reads), [`metrics`] and [`rollout`] (the pure rollout state machine).
//! 4. `proxy` (the data plane: Pingora's hooks, the edge checks, the connection guard,
//!    TLS listeners) beside [`control`] (the control plane: rollout state, the analysis
//!    loop, the fleet, reload, persistence, notifications).
//! 5. [`admin`], [`server`], [`demo`] and the binary: wiring.
//!
//! With the `internals` feature, `internals` exposes request-path code to the criterion
//! benchmarks and the fuzz targets; it is not part of the API.
//!
//! Time: whatever decides by time (the [`control`] plane) reads it from one
//! [`clock::Clock`], never from the machine (`clippy.toml`, turned on below). The request
//! path records with the real clock and says so where it reads it.

// `Instant::now` and `SystemTime::now` are refused (clippy.toml), except where allowed.
#![deny(clippy::disallowed_methods)]

pub mod clock;
pub mod split;
pub mod stats;

pub mod config;

pub mod metrics;
pub mod rollout;
pub mod runtime;

pub mod control;
pub(crate) mod proxy;

pub mod admin;
pub mod demo;
pub mod server;

#[cfg(feature = "internals")]
pub mod internals;
