//! A service with several replicas, as in a deployment: each replica is the real `mesh-proxy`
//! binary running as an inbound sidecar in front of one shared app, and a caller's sidecar
//! (in-process) routes the service to every replica's inbound port over h2c. A test then loses
//! a replica the way production does: SIGKILL (dead) or SIGSTOP (frozen).
//!
//! ```ignore
//! let app = server::fixed(200, "ok").run().await;
//! let mut svc = Replicas::start("b-killed", app.addr(), 2, |s| s).await;
//! let mut load = Load::start(client::http1(svc.caller.outbound()), 8, load::get(..));
//! svc.wait_served(1, 20).await;
//! svc.kill(1);
//! ```

use crate::metrics::{metric_or_zero, scrape};
use crate::proxy::{self, ProxyProcess, TestProxy};
use crate::snapshot::{service, snapshot, ServiceToml};
use std::net::SocketAddr;
use std::time::Instant;

/// A name for the service where one run has the test binary to itself.
pub const SERVICE: &str = "b";

/// The replicas of one service and the caller's sidecar in front of them.
pub struct Replicas {
    /// The service's name in the caller's snapshot. Tests of one binary that run together
    /// give theirs different names: the in-process callers share one metrics registry, and
    /// breaker and ejection series are labelled by target only.
    pub service: &'static str,
    pub caller: TestProxy,
    pub replicas: Vec<ProxyProcess>,
}

impl Replicas {
    /// Spawns `n` inbound sidecars in front of `app` and a caller whose snapshot lists them as
    /// the endpoints of `service`; `policy` adds the service's resilience settings.
    pub async fn start(
        service_name: &'static str,
        app: SocketAddr,
        n: usize,
        policy: impl FnOnce(ServiceToml) -> ServiceToml,
    ) -> Self {
        let spawns = (0..n).map(|i| {
            proxy::builder()
                .agent(&format!("b-{i}"))
                .inbound_app(app)
                .spawn()
        });
        let replicas = futures_util::future::join_all(spawns).await;
        let mut svc = service(service_name).http2();
        for r in &replicas {
            svc = svc.endpoint(r.inbound().expect("a replica has an inbound listener"));
        }
        let caller = proxy::builder()
            .agent("a")
            .snapshot(snapshot(1).service(policy(svc)).to_toml())
            .start()
            .await;
        Self {
            service: service_name,
            caller,
            replicas,
        }
    }

    /// Waits until replica `i` has answered at least `n` requests, so that losing it hits
    /// requests in flight and connections in use.
    pub async fn wait_served(&self, i: usize, n: u64) {
        let admin = self.replicas[i].admin();
        let what = format!("replica {i} to serve {n} requests");
        crate::eventually(&what, || async move {
            let text = scrape(admin).await;
            let served = metric_or_zero(
                &text,
                "agent_requests_total",
                &[("direction", "inbound"), ("status", "200")],
            );
            (served >= n as f64).then_some(())
        })
        .await
    }

    /// SIGKILLs replica `i`; returns when the signal was sent.
    pub fn kill(&self, i: usize) -> Instant {
        let at = Instant::now();
        self.replicas[i].signal(libc::SIGKILL);
        at
    }

    /// SIGSTOPs replica `i`: its sockets stay open and nothing answers.
    pub fn freeze(&self, i: usize) -> Instant {
        let at = Instant::now();
        self.replicas[i].signal(libc::SIGSTOP);
        at
    }
}
