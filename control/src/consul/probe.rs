//! Consul's liveness, asked every `probe_interval` (a quarter of it while Consul is down) with
//! a short timeout (`/v1/status/leader`).
//! A blocking query cannot tell a hung Consul from a quiet one until its wait is over; the
//! probe can, within `probe_interval + probe_timeout`. The watch stops querying a Consul the
//! probe finds down, abandons queries in flight, and retries at once when it comes back.

use super::client::ConsulClient;
use super::watch::Params;
use tokio::sync::watch;

/// What the probe last found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Liveness {
    pub up: bool,
    pub error: Option<String>,
    /// Bumped on every return from down to up, so a backoff can be cut short.
    pub recoveries: u64,
}

impl Default for Liveness {
    /// Up until the first probe says otherwise: the first queries go out at once.
    fn default() -> Self {
        Self {
            up: true,
            error: None,
            recoveries: 0,
        }
    }
}

pub async fn run(
    client: ConsulClient,
    params: Params,
    out: watch::Sender<Liveness>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let result = tokio::select! {
            r = client.leader(params.probe_timeout) => r,
            _ = crate::stopped(&mut stop) => return,
        };
        out.send_if_modified(|l| match result {
            Ok(()) if l.up => false,
            Ok(()) => {
                tracing::info!("consul answers again");
                l.up = true;
                l.error = None;
                l.recoveries += 1;
                true
            }
            Err(e) => {
                let error = e.to_string();
                if l.up {
                    tracing::warn!(%error, "consul does not answer; serving the last catalog");
                }
                let changed = l.up || l.error.as_ref() != Some(&error);
                l.up = false;
                l.error = Some(error);
                changed
            }
        });
        // A Consul that is down is asked four times as often, so its return is seen soon.
        let next = if out.borrow().up {
            params.probe_interval
        } else {
            params.probe_interval / 4
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = crate::stopped(&mut stop) => return,
        }
    }
}
