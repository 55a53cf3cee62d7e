//! Registers this sidecar's agent in Consul on start (service, port, phase tags, an HTTP check
//! against the sidecar's `/health`) and deregisters it on shutdown before draining (Rule 17),
//! so peers stop choosing it while requests in flight finish.

use crate::bootstrap::ConsulRegistration;
use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use mesh_config::backoff::Backoff;
use mesh_config::Phase;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug)]
pub struct Registration {
    consul: String,
    id: String,
    body: Bytes,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Registration {
    /// `inbound` is where peers reach the agent; `admin` serves the `/health` Consul checks.
    pub fn new(
        cfg: &ConsulRegistration,
        agent: &str,
        phase: Phase,
        inbound: SocketAddr,
        admin: SocketAddr,
    ) -> Self {
        let ip = cfg.advertise.unwrap_or(inbound.ip());
        let check_ip = if admin.ip().is_unspecified() {
            ip
        } else {
            admin.ip()
        };
        let interval = humantime::format_duration(cfg.check_interval).to_string();
        let body = serde_json::json!({
            "ID": agent,
            "Name": agent,
            "Tags": ["mesh", format!("phase={phase}")],
            "Address": ip.to_string(),
            "Port": inbound.port(),
            "Meta": { "phase": phase.as_str() },
            "Check": {
                "HTTP": format!("http://{}/health", SocketAddr::new(check_ip, admin.port())),
                "Interval": interval,
                "Timeout": "2s",
                "DeregisterCriticalServiceAfter": "1m",
            },
        });
        Self {
            consul: cfg.address.trim_start_matches("http://").to_owned(),
            id: agent.to_owned(),
            body: Bytes::from(body.to_string()),
            http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    /// Registers, retrying with exponential backoff until it succeeds or `stop` is set.
    pub async fn register(&self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            match self
                .put("/v1/agent/service/register", self.body.clone())
                .await
            {
                Ok(()) => {
                    tracing::info!(service = %self.id, consul = %self.consul, "registered in consul");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "consul registration failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = crate::drain::stopped(&mut stop) => return,
            }
        }
    }

    /// One attempt, bounded: shutdown must not hang on an unreachable Consul.
    pub async fn deregister(&self) {
        let path = format!("/v1/agent/service/deregister/{}", self.id);
        match self.put(&path, Bytes::new()).await {
            Ok(()) => tracing::info!(service = %self.id, "deregistered from consul"),
            Err(e) => tracing::warn!(error = %e, "consul deregistration failed"),
        }
    }

    async fn put(&self, path: &str, body: Bytes) -> Result<(), String> {
        let uri: Uri = format!("http://{}{path}", self.consul)
            .parse()
            .map_err(|e| format!("consul address {:?}: {e}", self.consul))?;
        let req = Request::builder()
            .method(Method::PUT)
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let rsp = tokio::time::timeout(Duration::from_secs(2), self.http.request(req))
            .await
            .map_err(|_| format!("{path}: no answer within 2s"))?
            .map_err(|e| format!("{path}: {e}"))?;
        if rsp.status().is_success() {
            Ok(())
        } else {
            Err(format!("{path}: status {}", rsp.status()))
        }
    }
}
