//! Rollouts, decided: where each route's canary stands and what moves it, as pure
//! functions with no I/O, clock or lock (the control plane carries out their effects).
//!
//! - [`spec`]: what the machine knows of a route's config.
//! - [`phase`]: the phases a route can be in, the weight each means, the record persisted.
//! - [`machine`]: the state machine: an input (a reload, an operator's action, a verdict, a
//!   tick, the fleet's record) and the time in, the next state and its effects out.
//! - [`verdict`]: the analysis' judgement of a canary window against stable's.

pub mod machine;
pub mod phase;
pub mod spec;
pub mod verdict;
