//! The agent registry (`agents.toml` beside the policy): every agent of the platform once, with
//! its phase, mesh port, image and Rule 23 capability declaration. Everything deployed is
//! rendered from it. Loading guarantees unique names and ports, each port inside its phase's
//! range, and every error names file and line.

use crate::load::{self, LoadError};
use crate::snapshot::{check_name, invalid, Invalid, PathSeg};
use crate::Phase;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

/// The registry's file name inside the policy directory; the policy loader leaves it alone.
pub const FILE_NAME: &str = "agents.toml";

/// The whole registry, in file order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    #[serde(default)]
    pub agents: Vec<Agent>,
}

/// One `[[agents]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub name: String,
    pub phase: Phase,
    /// The port the agent's sidecar publishes on the host (inbound mesh traffic).
    pub port: u16,
    pub image: String,
    /// What the agent's app speaks on its port; the sidecar's `[inbound] protocol`.
    pub protocol: AppProtocol,
    pub capabilities: Capabilities,
    /// Targets the agent reaches on a loopback port of their own, besides Ollama on 11434
    /// (Consul Connect's `upstreams` with `local_bind_port`): a client that cannot set the
    /// authority, such as a gRPC channel to `localhost:PORT`, reaches its target unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<Upstream>,
}

/// One entry of an agent's `upstreams`: `service` on `127.0.0.1:port` in the agent's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub service: String,
    pub port: u16,
}

/// Loopback ports an agent's namespace already uses: its app, Ollama's upstream, the sidecar's
/// outbound and admin listeners.
pub const RESERVED_LOCAL_PORTS: [(u16, &str); 4] = [
    (8080, "the agent's app"),
    (11434, "the Ollama upstream"),
    (15001, "the sidecar's outbound listener"),
    (15090, "the sidecar's admin listener"),
];

/// The protocol of an agent's app, as its sidecar's inbound side supports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 for every request.
    Http1,
    /// h2c with prior knowledge for every request.
    Http2,
    /// A gRPC server: h2c for every request, as `http2`; named so the registry says what the
    /// agent is.
    Grpc,
    /// gRPC calls over h2c, everything else over HTTP/1.1 (an app serving both).
    Auto,
}

/// Rule 23: what the agent does and what it may ask of the shared Ollama.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    pub cognitive: Vec<String>,
    pub ollama_priority: OllamaPriority,
    pub max_context_size: u32,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OllamaPriority {
    High,
    Medium,
    Low,
}

// === impl AppProtocol ===

impl AppProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Grpc => "grpc",
            Self::Auto => "auto",
        }
    }

    /// The value of the sidecar bootstrap's `[inbound] protocol` (`http1`, `http2`, `auto`).
    pub fn sidecar_inbound(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 | Self::Grpc => "http2",
            Self::Auto => "auto",
        }
    }
}

// === impl OllamaPriority ===

impl OllamaPriority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Medium => "medium",
            Self::Low => "low",
        }
    }
}

/// The mesh ports of a phase (Rule 20).
pub fn port_range(phase: Phase) -> RangeInclusive<u16> {
    match phase {
        Phase::Critical => 10300..=10319,
        Phase::Performance => 10320..=10419,
        Phase::Specialized => 10420..=10599,
    }
}

/// Reads and validates a registry file.
pub fn load_file(path: &Path) -> Result<Registry, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    load_str(path, &text)
}

/// Parses and validates registry text; `origin` names it in errors.
pub fn load_str(origin: &Path, text: &str) -> Result<Registry, LoadError> {
    let reg: Registry = load::toml_str(origin, text)?;
    reg.validate()
        .map_err(|e| LoadError::Invalid(load::locate(origin, text, &e)))?;
    Ok(reg)
}

// === impl Registry ===

impl Registry {
    pub fn validate(&self) -> Result<(), Invalid> {
        use PathSeg::*;
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        let mut ports: BTreeMap<u16, usize> = BTreeMap::new();
        for (i, a) in self.agents.iter().enumerate() {
            let at = |k| vec![Key("agents"), Index(i), Key(k)];
            check_name(&a.name).map_err(|r| invalid(at("name"), r))?;
            if let Some(first) = names.insert(&a.name, i) {
                return Err(invalid(
                    at("name"),
                    format!("{:?} is already agents[{first}]", a.name),
                ));
            }
            let range = port_range(a.phase);
            if !range.contains(&a.port) {
                return Err(invalid(
                    at("port"),
                    format!(
                        "{} is outside the {} range {}-{}",
                        a.port,
                        a.phase,
                        range.start(),
                        range.end()
                    ),
                ));
            }
            if let Some(first) = ports.insert(a.port, i) {
                return Err(invalid(
                    at("port"),
                    format!(
                        "{} is already used by {:?}",
                        a.port, self.agents[first].name
                    ),
                ));
            }
            if a.image.is_empty() || a.image.contains(char::is_whitespace) || !a.image.contains(':')
            {
                return Err(invalid(
                    at("image"),
                    "must be a repository with a tag (name:tag), without spaces",
                ));
            }
            let cap = |k| vec![Key("agents"), Index(i), Key("capabilities"), Key(k)];
            let c = &a.capabilities;
            if c.cognitive.is_empty() {
                return Err(invalid(cap("cognitive"), "declare at least one capability"));
            }
            if c.max_context_size == 0 {
                return Err(invalid(cap("max_context_size"), "must be at least 1"));
            }
            if c.timeout.is_zero() {
                return Err(invalid(cap("timeout"), "must be greater than zero"));
            }
        }
        for (i, a) in self.agents.iter().enumerate() {
            check_upstreams(i, a, &names)?;
        }
        Ok(())
    }

    /// Agents per phase, for the budget engine.
    pub fn count(&self, phase: Phase) -> usize {
        self.agents.iter().filter(|a| a.phase == phase).count()
    }

    pub fn in_phase(&self, phase: Phase) -> impl Iterator<Item = &Agent> {
        self.agents.iter().filter(move |a| a.phase == phase)
    }
}

/// An agent's upstreams name agents of the registry (or `ollama`) on distinct loopback
/// ports its namespace does not already use.
fn check_upstreams(i: usize, a: &Agent, agents: &BTreeMap<&str, usize>) -> Result<(), Invalid> {
    use PathSeg::*;
    let mut seen: BTreeMap<u16, usize> = BTreeMap::new();
    for (j, u) in a.upstreams.iter().enumerate() {
        let at = |k| vec![Key("agents"), Index(i), Key("upstreams"), Index(j), Key(k)];
        let known = u.service == "ollama" || agents.contains_key(u.service.as_str());
        if !known {
            return Err(invalid(
                at("service"),
                format!("{:?} is not an agent of the registry", u.service),
            ));
        }
        if u.port < 1024 {
            return Err(invalid(at("port"), format!("{} is below 1024", u.port)));
        }
        if let Some((_, what)) = RESERVED_LOCAL_PORTS.iter().find(|(p, _)| *p == u.port) {
            return Err(invalid(at("port"), format!("{} is {what}", u.port)));
        }
        if u.port == a.port {
            return Err(invalid(
                at("port"),
                format!("{} is the agent's own mesh port", u.port),
            ));
        }
        if let Some(first) = seen.insert(u.port, j) {
            return Err(invalid(
                at("port"),
                format!("{} is already upstreams[{first}]", u.port),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "[[agents]]\nname = \"a\"\nphase = \"critical\"\nport = 10300\n\
        image = \"sutazai/a:1\"\nprotocol = \"http1\"\n\
        capabilities = { cognitive = [\"reasoning\"], ollama_priority = \"high\", \
        max_context_size = 4096, timeout = \"120s\" }\n";

    fn err(text: &str) -> String {
        load_str(Path::new("agents.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_shipped_registry_holds_69_agents_within_their_phases() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("mesh")
            .join(FILE_NAME);
        let reg = load_file(&path).unwrap();
        assert_eq!(reg.agents.len(), 69);
        for phase in Phase::ALL {
            let n = reg.count(phase);
            assert!(n > 0 && n <= port_range(phase).len(), "{phase}: {n}");
        }
    }

    #[test]
    fn a_valid_entry_loads() {
        let reg = load_str(Path::new("agents.toml"), AGENT).unwrap();
        assert_eq!(reg.agents[0].capabilities.timeout, Duration::from_secs(120));
        assert_eq!(reg.count(Phase::Critical), 1);
    }

    #[test]
    fn upstreams_name_agents_on_free_loopback_ports() {
        let with = |upstreams: &str| format!("{AGENT}upstreams = [{upstreams}]\n");
        let reg = load_str(
            Path::new("agents.toml"),
            &with("{ service = \"a\", port = 16001 }, { service = \"ollama\", port = 16002 }"),
        )
        .unwrap();
        assert_eq!(reg.agents[0].upstreams[1].port, 16002);
        assert_eq!(
            err(&with("{ service = \"nobody\", port = 16001 }")),
            "agents.toml:8: agents[0].upstreams[0].service: \"nobody\" is not an agent of the registry"
        );
        assert_eq!(
            err(&with("{ service = \"a\", port = 15001 }")),
            "agents.toml:8: agents[0].upstreams[0].port: 15001 is the sidecar's outbound listener"
        );
        assert_eq!(
            err(&with("{ service = \"a\", port = 10300 }")),
            "agents.toml:8: agents[0].upstreams[0].port: 10300 is the agent's own mesh port"
        );
        assert_eq!(
            err(&with(
                "{ service = \"a\", port = 16001 }, { service = \"ollama\", port = 16001 }"
            )),
            "agents.toml:8: agents[0].upstreams[1].port: 16001 is already upstreams[0]"
        );
    }

    #[test]
    fn duplicate_name_names_its_line() {
        let text = format!("{AGENT}{}", AGENT.replace("10300", "10301"));
        assert_eq!(
            err(&text),
            "agents.toml:9: agents[1].name: \"a\" is already agents[0]"
        );
    }

    #[test]
    fn duplicate_port_names_its_line() {
        let text = format!("{AGENT}{}", AGENT.replace("\"a\"", "\"b\""));
        assert_eq!(
            err(&text),
            "agents.toml:11: agents[1].port: 10300 is already used by \"a\""
        );
    }

    #[test]
    fn port_outside_the_phase_range_names_its_line() {
        let text = AGENT.replace("10300", "10320");
        assert_eq!(
            err(&text),
            "agents.toml:4: agents[0].port: 10320 is outside the critical range 10300-10319"
        );
    }

    #[test]
    fn unknown_phase_names_its_line() {
        let e = err(&AGENT.replace("\"critical\"", "\"urgent\""));
        assert!(e.starts_with("agents.toml:3: "), "{e}");
        assert!(e.contains("urgent"), "{e}");
    }

    #[test]
    fn unknown_protocol_names_its_line() {
        let e = err(&AGENT.replace("\"http1\"", "\"spdy\""));
        assert!(e.starts_with("agents.toml:6: "), "{e}");
        assert!(e.contains("spdy"), "{e}");
        let e = err(&AGENT.replace("protocol = \"http1\"\n", ""));
        assert!(e.contains("protocol"), "{e}");
    }

    #[test]
    fn capability_errors_name_their_line() {
        let e = err(&AGENT.replace("4096", "0"));
        assert_eq!(
            e,
            "agents.toml:7: agents[0].capabilities.max_context_size: must be at least 1"
        );
    }
}
