//! Kanaria: a canary-release reverse proxy on Pingora.
//!
//! Requests are routed by host and path ([`route`]), each user is assigned stickily to the
//! stable or canary version of the route ([`split`]), and the request is proxied to an
//! endpoint of that version's pool ([`proxy`]). The configuration ([`config`]) is one
//! immutable snapshot shared by every request. [`server`] wires it into a Pingora server.

pub mod admin;
pub mod analysis;
pub mod client;
pub mod config;
pub mod conn_guard;
pub mod controller;
pub mod demo;
pub mod drain;
pub mod edge;
pub mod edge_hooks;
pub mod fuzz_targets;
pub mod metrics;
pub mod notify;
pub mod override_token;
pub mod proxy;
pub mod reload;
pub mod rollout;
pub mod route;
pub mod server;
pub mod split;
pub mod state;
