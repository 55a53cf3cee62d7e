//! A Consul service definition in HashiCorp's agent-configuration shape
//! (`{"service": {"id", "name", "port", "tags", "meta", "check", "connect"}}`): what
//! `mesh-control render` writes per agent into `deploy/generated/consul/`, and what the
//! agent's sidecar registers (`[consul] service_file`), with the address it is reached at.
//! Parsing refuses fields the mesh does not translate, so a definition means one thing.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The file: one service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub service: ServiceDefinition,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDefinition {
    pub id: String,
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Consul meta values are strings (at most 64 keys, 512 bytes a value).
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    pub check: CheckDefinition,
    /// Written out as `{"native": false}`: the mesh's sidecars are not Connect proxies.
    #[serde(default)]
    pub connect: Connect,
}

/// An HTTP check against the sidecar's admin `/health`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckDefinition {
    pub id: String,
    pub name: String,
    pub http: String,
    pub interval: String,
    pub timeout: String,
    pub deregister_critical_service_after: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connect {
    pub native: bool,
}

const MAX_META_KEYS: usize = 64;
const MAX_META_VALUE: usize = 512;

// === impl Definition ===

impl Definition {
    pub fn from_json(text: &str) -> Result<Self, String> {
        let d: Definition = serde_json::from_str(text).map_err(|e| e.to_string())?;
        d.check()?;
        Ok(d)
    }

    /// What Consul itself would refuse, and Connect, which the mesh does not use.
    pub fn check(&self) -> Result<(), String> {
        let s = &self.service;
        if s.id.is_empty() || s.name.is_empty() {
            return Err("service.id and service.name must not be empty".into());
        }
        if s.port == 0 {
            return Err("service.port must not be 0".into());
        }
        if s.connect.native {
            return Err("service.connect.native: the mesh's sidecars are not Connect".into());
        }
        if s.meta.len() > MAX_META_KEYS {
            return Err(format!("service.meta: at most {MAX_META_KEYS} keys"));
        }
        for (k, v) in &s.meta {
            let key_ok = !k.is_empty()
                && k.len() <= 128
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !key_ok {
                return Err(format!("service.meta: {k:?} is not a Consul meta key"));
            }
            if v.len() > MAX_META_VALUE {
                return Err(format!(
                    "service.meta.{k}: longer than {MAX_META_VALUE} bytes"
                ));
            }
        }
        if !self.service.check.http.starts_with("http://") {
            return Err("service.check.http must be an http:// URL".into());
        }
        Ok(())
    }

    /// The body of `PUT /v1/agent/service/register`: the same service in the HTTP API's
    /// field names, at `address`.
    pub fn register_body(&self, address: &str) -> serde_json::Value {
        let s = &self.service;
        let c = &s.check;
        serde_json::json!({
            "ID": s.id,
            "Name": s.name,
            "Address": address,
            "Port": s.port,
            "Tags": s.tags,
            "Meta": s.meta,
            "Check": {
                "CheckID": c.id,
                "Name": c.name,
                "HTTP": c.http,
                "Interval": c.interval,
                "Timeout": c.timeout,
                "DeregisterCriticalServiceAfter": c.deregister_critical_service_after,
            },
            "Connect": { "Native": s.connect.native },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"{"service": {"id": "a", "name": "a", "port": 10300,
        "tags": ["mesh", "phase=critical"], "meta": {"phase": "critical"},
        "check": {"id": "a-health", "name": "sidecar /health", "http": "http://a:15090/health",
                  "interval": "10s", "timeout": "2s", "deregister_critical_service_after": "1m"},
        "connect": {"native": false}}}"#;

    #[test]
    fn a_definition_becomes_the_api_body_at_an_address() {
        let d = Definition::from_json(TEXT).unwrap();
        let b = d.register_body("172.18.0.5");
        assert_eq!(b["ID"], "a");
        assert_eq!(b["Address"], "172.18.0.5");
        assert_eq!(b["Port"], 10300);
        assert_eq!(b["Tags"][1], "phase=critical");
        assert_eq!(b["Meta"]["phase"], "critical");
        assert_eq!(b["Check"]["HTTP"], "http://a:15090/health");
        assert_eq!(b["Check"]["DeregisterCriticalServiceAfter"], "1m");
        assert_eq!(b["Connect"]["Native"], false);
    }

    #[test]
    fn what_the_mesh_does_not_translate_is_refused() {
        let e = Definition::from_json(&TEXT.replace("\"connect\"", "\"kind\": \"x\", \"connect\""));
        assert!(e.unwrap_err().contains("kind"));
        let e = Definition::from_json(&TEXT.replace("false", "true")).unwrap_err();
        assert!(e.contains("Connect"), "{e}");
        let e =
            Definition::from_json(&TEXT.replace("\"phase\": \"critical\"", "\"ph ase\": \"x\""))
                .unwrap_err();
        assert!(e.contains("meta key"), "{e}");
    }
}
