//! Where Consul's answers enter the mesh model. Every service and every instance is checked
//! on its own: what the snapshot model cannot carry (a name that is not a DNS label, an
//! address that is not an IP, port 0, a duplicate endpoint, an entry that does not decode) or
//! that is not an agent (Connect proxies, gateways: any non-empty `Kind`) is left out and
//! returned as a [`Rejected`], and the rest still flows. Health is read from each entry's
//! `Checks`: an instance is routed only when every check on it and on its node passes
//! (`warning` too when [`HealthPolicy::admit_warning`] is set), whatever filter Consul applied.
//!
//! Everything here is pure, so the same code runs in the watch and in the tests that feed it
//! random answers.

use super::{MESH_TAG, PHASE_TAG};
use mesh_config::{Catalog, CatalogService, Phase};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

/// Which check states count as healthy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Routes to instances whose worst check is `warning`, as Consul's `?passing` does not.
    pub admit_warning: bool,
}

/// Why an entry was left out. A closed set: it is a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The service name is not a DNS label (`Billing_API`, `a.b`, 64+ characters).
    BadName,
    /// A host name where an IP address is required; the control process does not resolve.
    HostnameAddress,
    /// No address at all, or something that is neither an IP nor a host name.
    BadAddress,
    BadPort,
    /// The same address and port twice in one service: one is kept.
    DuplicateEndpoint,
    /// A Connect proxy, a gateway or any other non-`typical` kind.
    NotAnAgent,
    /// The entry does not have Consul's shape.
    Malformed,
}

/// One entry left out of the catalog, for the log, the metric and `/status`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Rejected {
    pub service: String,
    /// The instance's `Service.ID`, when the rejection is about one instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub reason: Reason,
    pub detail: String,
}

/// The mesh services of one `/v1/catalog/services` answer.
#[derive(Debug, Default, PartialEq)]
pub struct Listed {
    pub services: BTreeMap<String, Phase>,
    pub rejected: Vec<Rejected>,
}

/// The instances of one service, as admitted.
#[derive(Debug, Default, PartialEq)]
pub struct Admitted {
    /// Healthy, typical instances with valid, distinct addresses; sorted.
    pub endpoints: Vec<SocketAddr>,
    /// Instances that are agents (typical kind), healthy or not; with `instances > 0` and no
    /// agents, the service is not an agent at all.
    pub agents: usize,
    pub instances: usize,
    /// Agent instances left out because a check does not pass.
    pub unhealthy: usize,
    pub rejected: Vec<Rejected>,
}

// === impl Reason ===

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::BadName,
        Reason::HostnameAddress,
        Reason::BadAddress,
        Reason::BadPort,
        Reason::DuplicateEndpoint,
        Reason::NotAnAgent,
        Reason::Malformed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadName => "bad_name",
            Reason::HostnameAddress => "hostname_address",
            Reason::BadAddress => "bad_address",
            Reason::BadPort => "bad_port",
            Reason::DuplicateEndpoint => "duplicate_endpoint",
            Reason::NotAnAgent => "not_an_agent",
            Reason::Malformed => "malformed",
        }
    }
}

// === impl Admitted ===

impl Admitted {
    /// Consul listed instances and none of them is an agent.
    pub fn not_an_agent(&self) -> bool {
        self.instances > 0 && self.agents == 0
    }
}

/// The mesh services of a `/v1/catalog/services` answer (name -> tags): those tagged `mesh`
/// with a name the model carries. The phase comes from a `phase=` tag (specialized without).
pub fn services(listed: &BTreeMap<String, Value>) -> Listed {
    let mut out = Listed::default();
    for (name, tags) in listed {
        let tags: Vec<&str> = match tags {
            Value::Array(tags) => tags.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let Some(phase) = mesh_phase(&tags) else {
            continue;
        };
        if let Err(detail) = mesh_config::snapshot::check_name(name) {
            out.rejected.push(Rejected {
                service: name.clone(),
                instance: None,
                reason: Reason::BadName,
                detail,
            });
            continue;
        }
        out.services.insert(name.clone(), phase);
    }
    out
}

/// The catalog of the admitted services: a service Consul lists only non-agents for is left
/// out (it is reported by [`instances`]).
pub fn catalog<'a>(admitted: impl IntoIterator<Item = (&'a str, Phase, &'a Admitted)>) -> Catalog {
    Catalog::new(
        admitted
            .into_iter()
            .filter(|(_, _, a)| !a.not_an_agent())
            .map(|(name, phase, a)| CatalogService {
                name: name.to_owned(),
                phase,
                endpoints: a.endpoints.clone(),
            })
            .collect(),
    )
}

/// The phase a service's tags name, if it is a mesh service.
pub fn mesh_phase(tags: &[&str]) -> Option<Phase> {
    if !tags.contains(&MESH_TAG) {
        return None;
    }
    let phase = tags
        .iter()
        .filter_map(|t| t.strip_prefix(PHASE_TAG))
        .find_map(|p| Phase::ALL.into_iter().find(|ph| ph.as_str() == p));
    Some(phase.unwrap_or(Phase::Specialized))
}

/// The routable endpoints of one `/v1/health/service/<service>` answer.
pub fn instances(service: &str, entries: &[Value], health: HealthPolicy) -> Admitted {
    let mut out = Admitted {
        instances: entries.len(),
        ..Admitted::default()
    };
    let mut seen = BTreeSet::new();
    for (i, raw) in entries.iter().enumerate() {
        let entry = match Entry::deserialize(raw) {
            Ok(e) => e,
            Err(e) => {
                out.rejected.push(Rejected {
                    service: service.to_owned(),
                    instance: raw
                        .pointer("/Service/ID")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .or_else(|| Some(format!("#{i}"))),
                    reason: Reason::Malformed,
                    detail: e.to_string(),
                });
                continue;
            }
        };
        let reject = |reason, detail: String| Rejected {
            service: service.to_owned(),
            instance: Some(entry.service.id.clone()),
            reason,
            detail,
        };
        if !entry.service.kind.is_empty() && entry.service.kind != "typical" {
            out.rejected.push(reject(
                Reason::NotAnAgent,
                format!("kind {:?} is not an agent", entry.service.kind),
            ));
            continue;
        }
        out.agents += 1;
        if !entry.healthy(health) {
            out.unhealthy += 1;
            continue;
        }
        let addr = match entry.socket_addr() {
            Ok(a) => a,
            Err((reason, detail)) => {
                out.rejected.push(reject(reason, detail));
                continue;
            }
        };
        if !seen.insert(addr) {
            out.rejected.push(reject(
                Reason::DuplicateEndpoint,
                format!("{addr} is already an endpoint of {service}"),
            ));
            continue;
        }
        out.endpoints.push(addr);
    }
    out
}

/// One entry of `/v1/health/service/<name>`: the fields the mesh reads. Consul writes `null`
/// for empty lists and maps; unknown fields (`Proxy`, `Weights`, `Meta`, ...) are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    #[serde(default, deserialize_with = "nullable")]
    node: Node,
    service: Service,
    #[serde(default, deserialize_with = "nullable")]
    checks: Vec<Check>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Node {
    #[serde(default, deserialize_with = "nullable")]
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Service {
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    id: String,
    /// `""` (or `"typical"`) for a plain service; `connect-proxy`, `mesh-gateway`, ...
    #[serde(default, deserialize_with = "nullable")]
    kind: String,
    #[serde(default, deserialize_with = "nullable")]
    address: String,
    #[serde(default)]
    port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Check {
    #[serde(default, deserialize_with = "nullable")]
    status: String,
}

fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

// === impl Entry ===

impl Entry {
    /// Every check, the node's and the service's, passes (or warns, when admitted). An
    /// instance without checks passes, as in Consul.
    fn healthy(&self, health: HealthPolicy) -> bool {
        self.checks
            .iter()
            .all(|c| c.status == "passing" || (health.admit_warning && c.status == "warning"))
    }

    /// The service address, or the node's when the service has none; an IP only.
    fn socket_addr(&self) -> Result<SocketAddr, (Reason, String)> {
        let (host, whose) = if self.service.address.is_empty() {
            (&self.node.address, "node")
        } else {
            (&self.service.address, "service")
        };
        if self.service.port == 0 {
            return Err((Reason::BadPort, "port 0".into()));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            // A bind-all or group address reaches no one instance: it is not an endpoint.
            let unroutable = ip.is_unspecified()
                || ip.is_multicast()
                || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
            if unroutable {
                return Err((
                    Reason::BadAddress,
                    format!("{whose} address {host} is not one instance's address"),
                ));
            }
            return Ok(SocketAddr::new(ip, self.service.port));
        }
        if is_hostname(host) {
            Err((
                Reason::HostnameAddress,
                format!("{whose} address {host:?} is a host name; register an IP address"),
            ))
        } else {
            Err((
                Reason::BadAddress,
                format!("{whose} address {host:?} is not an IP address"),
            ))
        }
    }
}

fn is_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(id: &str, kind: &str, addr: &str, port: u16, checks: &[&str]) -> Value {
        json!({
            "Node": { "Node": "n1", "Address": "10.0.0.9", "TaggedAddresses": null, "Meta": null },
            "Service": {
                "ID": id, "Service": "b", "Kind": kind, "Tags": null, "Meta": null,
                "Address": addr, "Port": port, "Weights": { "Passing": 1, "Warning": 1 },
            },
            "Checks": checks.iter().map(|s| json!({ "CheckID": "c", "Status": s })).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn only_valid_healthy_agents_are_endpoints() {
        let entries = vec![
            entry("ok", "", "10.0.0.1", 80, &["passing", "passing"]),
            entry("critical", "", "10.0.0.2", 80, &["passing", "critical"]),
            entry("warn", "", "10.0.0.3", 80, &["warning"]),
            entry("proxy", "connect-proxy", "10.0.0.4", 21000, &["passing"]),
            entry("host", "", "b.internal", 80, &["passing"]),
            entry("dup", "", "10.0.0.1", 80, &["passing"]),
            entry("node-addr", "", "", 81, &[]),
            entry("port0", "", "10.0.0.5", 0, &["passing"]),
            entry("any", "", "0.0.0.0", 80, &["passing"]),
            json!({ "Service": { "ID": "broken", "Port": "eighty" } }),
        ];
        let got = instances("b", &entries, HealthPolicy::default());
        let eps: Vec<String> = got.endpoints.iter().map(|a| a.to_string()).collect();
        assert_eq!(eps, ["10.0.0.1:80", "10.0.0.9:81"]);
        let reasons: Vec<(&str, Reason)> = got
            .rejected
            .iter()
            .map(|r| (r.instance.as_deref().unwrap(), r.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("proxy", Reason::NotAnAgent),
                ("host", Reason::HostnameAddress),
                ("dup", Reason::DuplicateEndpoint),
                ("port0", Reason::BadPort),
                ("any", Reason::BadAddress),
                ("broken", Reason::Malformed),
            ]
        );
        assert_eq!(got.unhealthy, 2);
        assert!(!got.not_an_agent());

        // A policy admitting `warning` routes the warning instance too.
        let warn = instances(
            "b",
            &entries,
            HealthPolicy {
                admit_warning: true,
            },
        );
        assert_eq!(warn.endpoints.len(), 3);
    }

    #[test]
    fn a_service_of_proxies_only_is_not_an_agent() {
        let got = instances(
            "b-sidecar-proxy",
            &[entry(
                "p",
                "connect-proxy",
                "10.0.0.4",
                21000,
                &["critical"],
            )],
            HealthPolicy::default(),
        );
        assert!(got.not_an_agent());
        assert!(got.endpoints.is_empty());
    }

    #[test]
    fn listed_services_need_the_mesh_tag_and_a_valid_name() {
        let listed: BTreeMap<String, Value> = serde_json::from_value(json!({
            "consul": null,
            "a": ["mesh", "phase=critical"],
            "b": ["mesh"],
            "Billing_API": ["mesh", "phase=critical"],
            "web": ["http"],
            "odd": ["mesh", 7, null],
        }))
        .unwrap();
        let got = services(&listed);
        assert_eq!(
            got.services.into_iter().collect::<Vec<_>>(),
            [
                ("a".to_owned(), Phase::Critical),
                ("b".to_owned(), Phase::Specialized),
                ("odd".to_owned(), Phase::Specialized),
            ]
        );
        assert_eq!(got.rejected.len(), 1);
        assert_eq!(got.rejected[0].reason, Reason::BadName);
        assert_eq!(got.rejected[0].service, "Billing_API");
    }

    #[test]
    fn mesh_services_are_tagged() {
        assert_eq!(
            mesh_phase(&["mesh", "phase=critical"]),
            Some(Phase::Critical)
        );
        assert_eq!(mesh_phase(&["mesh"]), Some(Phase::Specialized));
        assert_eq!(mesh_phase(&["phase=critical"]), None);
    }
}
