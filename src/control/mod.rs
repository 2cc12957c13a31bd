//! The control plane: everything that changes what the data plane serves, and the only
//! writer of the [`LiveHandle`](crate::runtime::LiveHandle).
//!
//! - [`rollouts`]: [`Control`], each route's rollout state under one lock, the config as
//!   built from the file, and publication (one `ArcSwap::store` per change).
//! - [`analysis_loop`]: runs the health checks and the canary analysis on their schedules
//!   and feeds verdicts to the rollout machine.
//! - [`fleet`]: shares rollout state and analysis counts with the other replicas, through a
//!   narrow [`fleet::Replica`] interface to this replica's control and a narrow
//!   [`fleet::store::Store`] interface to the store (Redis, [`fleet::redis_store`]).
//! - [`resolve`]: looks the pools' endpoint names up again every `resolve_interval` and
//!   serves the pools over their new addresses.
//! - [`reload`]: the config file watcher (and SIGHUP).
//! - [`persist`]: the state files that keep rollouts across restarts.
//! - [`notify`]: the webhook that sends events out.
//!
//! Time comes from one [`Clock`](crate::clock::Clock): none of these modules reads the
//! machine's clock itself (`clippy.toml`), so a test drives them on a
//! [`ManualClock`](crate::clock::ManualClock) (`tests/control_plane.rs`).

pub mod analysis_loop;
pub mod fleet;
pub mod notify;
pub mod persist;
pub mod reload;
pub mod resolve;
pub mod rollouts;

pub use rollouts::{Control, ControlError, OperatorAction, ReloadStatus};

/// Runs `tick` every `every` until shutdown (a late tick is skipped, not caught up): the
/// loop of the control plane's background services.
pub(crate) async fn every(
    every: std::time::Duration,
    mut shutdown: pingora::server::ShutdownWatch,
    mut tick: impl FnMut(),
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticker.tick() => tick(),
        }
    }
}
