//! Registers this sidecar's agent in Consul on start (service, port, phase tags, an HTTP check
//! against the sidecar's `/health`) and deregisters it on shutdown before draining (Rule 17),
//! so peers stop choosing it while requests in flight finish. With `[consul] service_file` the
//! registration is that rendered definition, checked against this sidecar at start, with only
//! the address added.

use crate::bootstrap::ConsulRegistration;
use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use mesh_config::backoff::Backoff;
use mesh_config::consul_service::Definition;
use mesh_config::Phase;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug)]
pub struct Registration {
    consul: String,
    id: String,
    /// The registration with `Address` (and, when built in, the check's host) left to fill in.
    body: serde_json::Value,
    /// The check's URL is the definition's own (by name), not built from the address.
    check_given: bool,
    /// The address to advertise; `None`: the one this host reaches Consul from, found at
    /// registration (a container's address on its network is not known before it runs).
    ip: Option<IpAddr>,
    check_ip: Option<IpAddr>,
    admin_port: u16,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Registration {
    /// `inbound` is where peers reach the agent; `admin` serves the `/health` Consul checks.
    /// Fails when `service_file` cannot be read, does not parse, or names another agent or
    /// port: registering it would send peers elsewhere.
    pub fn new(
        cfg: &ConsulRegistration,
        agent: &str,
        phase: Phase,
        inbound: SocketAddr,
        admin: SocketAddr,
    ) -> Result<Self, String> {
        let ip = Some(cfg.advertise.unwrap_or(inbound.ip())).filter(|ip| !ip.is_unspecified());
        let check_ip = Some(admin.ip()).filter(|ip| !ip.is_unspecified()).or(ip);
        if let Some(path) = &cfg.service_file {
            let def = definition(path, agent, inbound.port())?;
            return Ok(Self {
                consul: cfg.address.trim_start_matches("http://").to_owned(),
                id: def.service.id.clone(),
                body: def.register_body(""),
                check_given: true,
                ip,
                check_ip,
                admin_port: admin.port(),
                http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            });
        }
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
        Ok(Self {
            consul: cfg.address.trim_start_matches("http://").to_owned(),
            id: agent.to_owned(),
            body,
            check_given: false,
            ip,
            check_ip,
            admin_port: admin.port(),
            http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        })
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
        if !self.check_given {
            body["Check"]["HTTP"] = format!(
                "http://{}/health",
                SocketAddr::new(check_ip, self.admin_port)
            )
            .into();
        }
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

/// Reads the definition at `path` and checks that it registers this agent on its port.
fn definition(path: &std::path::Path, agent: &str, port: u16) -> Result<Definition, String> {
    let at = path.display();
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("consul.service_file {at}: {e}"))?;
    let def = Definition::from_json(&text).map_err(|e| format!("consul.service_file {at}: {e}"))?;
    let s = &def.service;
    if s.id != agent || s.name != agent {
        return Err(format!(
            "consul.service_file {at}: registers {:?} (id {:?}), this sidecar is {agent:?}",
            s.name, s.id
        ));
    }
    if s.port != port {
        return Err(format!(
            "consul.service_file {at}: port {} is not the inbound port {port}",
            s.port
        ));
    }
    Ok(def)
}

#[cfg(test)]
mod advertise_tests {
    use super::*;

    fn reg(inbound: &str, advertise: Option<IpAddr>) -> Registration {
        let cfg = ConsulRegistration {
            address: "127.0.0.1:8500".into(),
            advertise,
            check_interval: Duration::from_secs(10),
            service_file: None,
        };
        Registration::new(
            &cfg,
            "a",
            Phase::Critical,
            inbound.parse().unwrap(),
            "0.0.0.0:15090".parse().unwrap(),
        )
        .unwrap()
    }

    const DEFINITION: &str = r#"{"service": {"id": "a", "name": "a", "port": 10300,
        "tags": ["mesh", "phase=critical"], "meta": {"phase": "critical", "protocol": "grpc"},
        "check": {"id": "a-health", "name": "sidecar /health", "http": "http://a:15090/health",
                  "interval": "10s", "timeout": "2s", "deregister_critical_service_after": "1m"},
        "connect": {"native": false}}}"#;

    fn from_file(text: &str, agent: &str, inbound: &str) -> Result<Registration, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        std::fs::write(&path, text).unwrap();
        let cfg = ConsulRegistration {
            address: "127.0.0.1:8500".into(),
            advertise: None,
            check_interval: Duration::from_secs(10),
            service_file: Some(path),
        };
        Registration::new(
            &cfg,
            agent,
            Phase::Critical,
            inbound.parse().unwrap(),
            "0.0.0.0:15090".parse().unwrap(),
        )
    }

    #[tokio::test]
    async fn a_service_file_is_registered_as_written_at_the_advertised_address() {
        let r = from_file(DEFINITION, "a", "0.0.0.0:10300").unwrap();
        let b = body(&r).await;
        assert_eq!(b["ID"], "a");
        assert_eq!(b["Address"], "127.0.0.1");
        assert_eq!(b["Port"], 10300);
        assert_eq!(b["Meta"]["protocol"], "grpc");
        // The definition's check (by compose name) is kept, not rebuilt from the address.
        assert_eq!(b["Check"]["HTTP"], "http://a:15090/health");
        assert_eq!(b["Check"]["CheckID"], "a-health");
    }

    #[test]
    fn a_service_file_for_another_agent_or_port_is_refused() {
        let e = from_file(DEFINITION, "b", "0.0.0.0:10300").unwrap_err();
        assert!(e.contains("this sidecar is \"b\""), "{e}");
        let e = from_file(DEFINITION, "a", "0.0.0.0:10301").unwrap_err();
        assert!(
            e.contains("port 10300 is not the inbound port 10301"),
            "{e}"
        );
        let e = from_file("{", "a", "0.0.0.0:10300").unwrap_err();
        assert!(e.starts_with("consul.service_file "), "{e}");
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
