//! Request outcomes as numbers: pure data and maths, no I/O, no clock of its own (every
//! reading and recording takes `now` from its caller).
//!
//! - [`window`]: sliding windows of outcomes per route and track (errors and a latency
//!   histogram), recorded without a lock, and their [`Totals`](window::Totals).
//! - [`in_flight`]: the attempts still waiting for an answer, so a hanging canary is seen
//!   while it hangs.
//! - [`fisher`]: the one-sided Fisher exact test behind the relative error rule.
//! - [`diff`]: two answers compared field by field, and path templates (the dark launch).
//! - [`shadow`]: what each route's shadow saw: copies, errors, latency, differences.

pub mod diff;
pub mod fisher;
pub mod in_flight;
pub mod shadow;
pub mod window;
