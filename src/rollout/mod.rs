//! Rollouts: where each route's canary stands and everything that moves it.
//!
//! The pure state machine decides; the rest drives it: the controller runs health checks
//! and the analysis on their schedules, the analysis windows count outcomes per track,
//! the control module serializes changes and publishes the resulting snapshot, the store
//! persists phases across restarts, the fleet shares them with the other replicas through
//! Redis (`[fleet]`), and the webhook sends events out.

pub mod analysis;
pub(crate) mod control;
pub(crate) mod controller;
pub(crate) mod fleet;
pub(crate) mod machine;
pub(crate) mod phase;
pub(crate) mod store;
pub(crate) mod webhook;
