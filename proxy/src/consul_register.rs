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
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug)]
pub struct Registration {
    consul: String,
    id: String,
    /// The registration with `Address` and the check's host left to fill in.
    body: serde_json::Value,
    /// The address to advertise; `None`: the one this host reaches Consul from, found at
    /// registration (a container's address on its network is not known before it runs).
    ip: Option<IpAddr>,
    check_ip: Option<IpAddr>,
    admin_port: u16,
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
        let ip = Some(cfg.advertise.unwrap_or(inbound.ip())).filter(|ip| !ip.is_unspecified());
        let check_ip = Some(admin.ip()).filter(|ip| !ip.is_unspecified()).or(ip);
        let interval = humantime::format_duration(cfg.check_interval).to_string();
        let body = serde_json::json!({
            "ID": agent,
            "Name": agent,
            "Tags": ["mesh", format!("phase={phase}")],
            "Port": inbound.port(),
            "Meta": { "phase": phase.as_str() },
            "Check": {
                "Interval": interval,
                "Timeout": "2s",
                "DeregisterCriticalServiceAfter": "1m",
            },
        });
        Self {
            consul: cfg.address.trim_start_matches("http://").to_owned(),
            id: agent.to_owned(),
            body,
            ip,
            check_ip,
            admin_port: admin.port(),
            http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    /// Registers, retrying with exponential backoff until it succeeds or `stop` is set.
    pub async fn register(&self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            let attempt = async {
                let body = self.body().await?;
                self.put("/v1/agent/service/register", body).await
            };
            match attempt.await {
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

    /// The registration body with the advertised address filled in.
    async fn body(&self) -> Result<Bytes, String> {
        let local = match self.ip {
            Some(ip) => ip,
            None => self.local_ip().await?,
        };
        let check_ip = self.check_ip.unwrap_or(local);
        let mut body = self.body.clone();
        body["Address"] = local.to_string().into();
        body["Check"]["HTTP"] = format!(
            "http://{}/health",
            SocketAddr::new(check_ip, self.admin_port)
        )
        .into();
        Ok(Bytes::from(body.to_string()))
    }

    /// The address this host sends from towards Consul: a connected UDP socket's local
    /// address (no packet is sent).
    async fn local_ip(&self) -> Result<IpAddr, String> {
        let consul = tokio::net::lookup_host(&self.consul)
            .await
            .map_err(|e| format!("consul address {:?}: {e}", self.consul))?
            .next()
            .ok_or_else(|| format!("consul address {:?}: no address", self.consul))?;
        let any: SocketAddr = if consul.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = tokio::net::UdpSocket::bind(any)
            .await
            .map_err(|e| format!("advertised address: {e}"))?;
        socket
            .connect(consul)
            .await
            .map_err(|e| format!("advertised address towards {consul}: {e}"))?;
        socket
            .local_addr()
            .map(|a| a.ip())
            .map_err(|e| format!("advertised address: {e}"))
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

#[cfg(test)]
mod advertise_tests {
    use super::*;

    fn reg(inbound: &str, advertise: Option<IpAddr>) -> Registration {
        let cfg = ConsulRegistration {
            address: "127.0.0.1:8500".into(),
            advertise,
            check_interval: Duration::from_secs(10),
        };
        Registration::new(
            &cfg,
            "a",
            Phase::Critical,
            inbound.parse().unwrap(),
            "0.0.0.0:15090".parse().unwrap(),
        )
    }

    async fn body(r: &Registration) -> serde_json::Value {
        serde_json::from_slice(&r.body().await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_sidecar_bound_to_any_address_advertises_the_one_it_reaches_consul_from() {
        let b = body(&reg("0.0.0.0:10300", None)).await;
        assert_eq!(b["Address"], "127.0.0.1");
        assert_eq!(b["Port"], 10300);
        assert_eq!(b["Check"]["HTTP"], "http://127.0.0.1:15090/health");
    }

    #[tokio::test]
    async fn an_explicit_address_wins() {
        let b = body(&reg("0.0.0.0:10300", Some([127, 0, 0, 9].into()))).await;
        assert_eq!(b["Address"], "127.0.0.9");
        let b = body(&reg("127.0.0.5:10300", None)).await;
        assert_eq!(b["Address"], "127.0.0.5");
    }
}
