//! Consul service definitions (`deploy/generated/consul/<name>.json`), one per agent and one
//! for the Ollama gateway, in HashiCorp's agent-configuration shape. Each is mounted into its
//! sidecar, which registers exactly it (adding the address it is reached at) when it starts
//! and deregisters it before draining (Rule 17); Consul does not load them itself, so no
//! service id is registered twice.

use mesh_config::consul_service::{CheckDefinition, Connect, Definition, ServiceDefinition};
use mesh_config::registry::Agent;
use std::collections::BTreeMap;

/// Where a sidecar finds its definition (the compose file mounts it there).
pub const MOUNT: &str = "/etc/mesh/consul-service.json";
/// The gateway's port on the mesh (its bootstrap's inbound).
pub const GATEWAY_PORT: u16 = 11435;

/// The definition of `agent`: its mesh port, its phase as tag and meta, the Rule 23 capability
/// declaration as meta, an HTTP check on its sidecar's `/health` by compose name.
pub fn agent(agent: &Agent) -> Definition {
    let c = &agent.capabilities;
    let meta: BTreeMap<String, String> = [
        ("phase", agent.phase.as_str().to_owned()),
        ("performance_tier", agent.phase.as_str().to_owned()),
        ("protocol", agent.protocol.as_str().to_owned()),
        ("image", agent.image.clone()),
        ("cognitive", c.cognitive.join(",")),
        ("ollama_priority", c.ollama_priority.as_str().to_owned()),
        ("max_context_size", c.max_context_size.to_string()),
        ("timeout", format!("{}s", c.timeout.as_secs_f64())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    definition(&agent.name, agent.port, agent.phase.as_str(), meta)
}

/// The Ollama gateway, registered as `ollama` (the sidecars' route to Ollama).
pub fn gateway() -> Definition {
    let meta = [("phase", "critical"), ("role", "ollama-gateway")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    // Its compose service is `ollama` too: the gateway shares Ollama's network namespace.
    definition("ollama", GATEWAY_PORT, "critical", meta)
}

fn definition(name: &str, port: u16, phase: &str, meta: BTreeMap<String, String>) -> Definition {
    Definition {
        service: ServiceDefinition {
            id: name.to_owned(),
            name: name.to_owned(),
            port,
            tags: vec!["mesh".into(), format!("phase={phase}")],
            meta,
            check: CheckDefinition {
                id: format!("{name}-health"),
                name: "sidecar /health".into(),
                http: format!("http://{name}:15090/health"),
                interval: "10s".into(),
                timeout: "2s".into(),
                deregister_critical_service_after: "1m".into(),
            },
            connect: Connect { native: false },
        },
    }
}

/// Pretty JSON with a trailing newline.
pub fn to_text(d: &Definition) -> String {
    let mut s = serde_json::to_string_pretty(d).unwrap_or_default();
    s.push('\n');
    s
}
