//! Integration harness for the agent mesh: fake upstreams (`server`), clients that speak
//! HTTP/1.1, h2c and raw TCP (`client`), an HTTP/2 peer written frame by frame (`h2_peer`), the
//! proxy under test in-process or as a child process
//! (`proxy`), an app that calls onward through its sidecar (`relay`), snapshot text builders
//! (`snapshot`), metric lookups (`metrics`), a closed-loop workload (`load`), a service whose
//! replicas are real sidecar processes a test can kill (`replicas`) and real Python clients and
//! servers (`python`), and a TLS client with certificates made on the spot (`tls`).
//!
//! Every wait in the harness is bounded by [`WAIT`] and panics with what it was waiting for.

pub mod body;
pub mod client;
pub mod consul;
pub mod control;
pub mod h2_peer;
pub mod load;
pub mod metrics;
pub mod ollama;
pub mod otlp;
pub mod proxy;
pub mod python;
pub mod relay;
pub mod replicas;
pub mod server;
pub mod snapshot;
pub mod tls;

use std::future::Future;
use std::time::Duration;

/// The longest any single step of a test may wait before it is declared stuck.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `fut` for at most [`WAIT`]; panics naming `what` when it takes longer.
#[track_caller]
pub fn bounded<F: Future>(what: &str, fut: F) -> impl Future<Output = F::Output> {
    bounded_by(WAIT, what, fut)
}

/// Awaits `fut` for at most `limit`; panics naming `what` when it takes longer.
#[track_caller]
pub fn bounded_by<F: Future>(
    limit: Duration,
    what: &str,
    fut: F,
) -> impl Future<Output = F::Output> {
    let caller = std::panic::Location::caller();
    let what = what.to_owned();
    async move {
        match tokio::time::timeout(limit, fut).await {
            Ok(out) => out,
            Err(_) => panic!("timed out after {limit:?} waiting for {what} (at {caller})"),
        }
    }
}

/// Re-checks `check` every 10 ms until it yields `Some`, for at most [`WAIT`]. Only for
/// conditions the system under test exposes as state and never as an event (a listener that
/// has closed, a counter scraped over HTTP); everything else waits on the event itself.
#[track_caller]
pub fn eventually<T, F, Fut>(what: &str, mut check: F) -> impl Future<Output = T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let what = what.to_owned();
    let wait = bounded(&what, async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tick.tick().await;
            if let Some(out) = check().await {
                return out;
            }
        }
    });
    wait
}
