//! What `/health` and `/ready` report: the sidecar's own state and its local app's.

use crate::app::BoundAddrs;
use crate::state::State;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// The local app's reachability, as last probed.
#[derive(Debug, Default)]
pub struct AppProbe {
    /// 0 unknown, 1 reachable, 2 unreachable.
    state: AtomicU8,
}

impl AppProbe {
    fn set(&self, reachable: bool) {
        self.state
            .store(if reachable { 1 } else { 2 }, Ordering::Relaxed);
        ::metrics::gauge!(crate::metrics::UPSTREAM_READY).set(if reachable { 1.0 } else { 0.0 });
    }

    fn describe(&self) -> &'static str {
        match self.state.load(Ordering::Relaxed) {
            1 => "ready",
            2 => "unreachable",
            _ => "unknown",
        }
    }

    fn reachable(&self) -> bool {
        self.state.load(Ordering::Relaxed) == 1
    }

    /// Connects to the app every `every` until `stop`; a refused connect marks it unreachable.
    pub async fn run(
        self: Arc<Self>,
        app: SocketAddr,
        every: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(app)).await,
                Ok(Ok(_))
            );
            self.set(ok);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = crate::drain::stopped(&mut stop) => return,
            }
        }
    }
}

/// The control channel as the control client last found it: `/health` says why a sidecar
/// gets no snapshot (an untrusted control certificate, a refused token) without a log search.
#[derive(Debug)]
pub struct ControlLink {
    pub address: String,
    /// `None`: not tried yet or reachable (see `reached`); else the last failure.
    error: arc_swap::ArcSwapOption<String>,
    reached: std::sync::atomic::AtomicBool,
}

impl ControlLink {
    pub fn new(address: &str) -> Arc<Self> {
        Arc::new(Self {
            address: address.to_owned(),
            error: arc_swap::ArcSwapOption::empty(),
            reached: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn reachable(&self) {
        self.reached.store(true, Ordering::Relaxed);
        if self.error.load().is_some() {
            self.error.store(None);
        }
    }

    pub fn failed(&self, error: String) {
        self.error.store(Some(Arc::new(error)));
    }

    fn describe(&self) -> serde_json::Value {
        match self.error.load_full() {
            Some(e) => json!({ "address": self.address, "status": "unreachable", "error": *e }),
            None if self.reached.load(Ordering::Relaxed) => {
                json!({ "address": self.address, "status": "reachable" })
            }
            None => json!({ "address": self.address, "status": "unknown" }),
        }
    }
}

/// Everything the admin endpoints read.
#[derive(Debug)]
pub struct Health {
    pub agent: String,
    pub phase: mesh_config::Phase,
    pub started: Instant,
    pub addrs: BoundAddrs,
    pub app: Option<(SocketAddr, Arc<AppProbe>)>,
    pub state: Arc<State>,
    pub draining: watch::Receiver<bool>,
    /// With `[control]`: whether the control process answers, and why not.
    pub control: Option<Arc<ControlLink>>,
}

impl Health {
    pub fn draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Ready to take traffic: not draining.
    pub fn ready(&self) -> bool {
        !self.draining()
    }

    /// Healthy: ready, and the local app (when there is one) answers.
    pub fn healthy(&self) -> bool {
        self.ready() && self.app.as_ref().is_none_or(|(_, p)| p.reachable())
    }

    pub fn report(&self) -> serde_json::Value {
        let status = if self.draining() {
            "draining"
        } else if self.healthy() {
            "ok"
        } else {
            "degraded"
        };
        let mut upstreams = serde_json::Map::new();
        if let Some((addr, probe)) = &self.app {
            upstreams.insert(
                "app".into(),
                json!({ "address": addr.to_string(), "status": probe.describe() }),
            );
        }
        json!({
            "status": status,
            "agent": self.agent,
            "phase": self.phase,
            "version": env!("CARGO_PKG_VERSION"),
            "snapshot_version": self.state.load().version(),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "listeners": {
                "outbound": self.addrs.outbound.to_string(),
                "inbound": self.addrs.inbound.map(|a| a.to_string()),
                "admin": self.addrs.admin.to_string(),
            },
            "upstreams": upstreams,
            "control": self.control.as_ref().map(|c| c.describe()),
        })
    }
}
