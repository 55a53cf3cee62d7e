//! The mesh control process. Read it in data order: `consul::watch` (with `consul::admit`
//! checking every entry) or `catalog_file` (the catalog) -> `guard` (holds back a catalog that
//! drops too much) and `policy_watch` (the policy) -> `budget_engine` -> `snapshots`
//! (versioned per-phase views, each checked as a sidecar will) -> `push` (long-poll to
//! sidecars) and `status`. `app` wires it all; `compliance` checks a running mesh from the
//! outside.
//!
//! The process is stateless: everything it serves derives from the catalog source and the
//! policy files, so instances can run side by side and a restart loses nothing.

pub mod app;
pub mod budget_engine;
pub mod catalog_file;
pub mod compliance;
pub mod consul;
pub mod deploy_secrets;
pub mod deployment_check;
pub mod guard;
pub mod identity;
pub mod metrics;
pub mod policy_watch;
pub mod push;
pub mod render;
pub mod snapshots;
pub mod status;
pub mod status_tls;

pub use app::{start, Config, IdentityConfig, Running, Source, StartError};

/// Resolves once a stop flag is set (or its sender is gone).
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The clock of a loop that polls a file or directory: the first tick at once, then one per
/// period; a late tick delays the next rather than bunching them.
pub(crate) struct PollEvery(tokio::time::Interval);

impl PollEvery {
    pub(crate) fn new(period: std::time::Duration) -> Self {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self(tick)
    }

    /// Waits for the next tick; false once `stop` is set.
    pub(crate) async fn tick(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
        tokio::select! {
            _ = self.0.tick() => true,
            _ = stopped(stop) => false,
        }
    }
}
