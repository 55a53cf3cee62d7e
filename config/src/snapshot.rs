//! The dynamic configuration a sidecar runs with: services, their endpoints, route rules and
//! defaults. A snapshot is immutable once built and is replaced as a whole.

use crate::authz::Authorization;
use crate::budget::AgentBudget;
use crate::identity::MeshIdentity;
use crate::ollama::OllamaPolicy;
use crate::policy::Trace;
use crate::resilience::Resilience;
use crate::Phase;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Default per-route timeout (Rule 18: 30 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest silence inside a streamed response body (Envoy's `stream_idle_timeout`).
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Suffixes an agent may add to a target's name in the authority.
pub const AUTHORITY_SUFFIXES: [&str; 2] = [".mesh", ".service.consul"];

/// A versioned, validated view of the mesh.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub version: u64,
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub routes: Vec<RouteRule>,
    /// This sidecar's agent budget, set by the control process per sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<AgentBudget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Trace>,
    #[serde(default)]
    pub ollama: OllamaPolicy,
    /// The mesh's mutual-TLS mode.
    #[serde(default, skip_serializing_if = "MeshIdentity::is_default")]
    pub identity: MeshIdentity,
    /// Who may call whom; `None` allows every call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
    /// How long a response body may go without a frame once its head has arrived; then the
    /// stream is cut and counted (`upstream_idle`). The route timeout covers only the head.
    #[serde(with = "humantime_serde", default = "default_stream_idle_timeout")]
    pub stream_idle_timeout: Duration,
    /// Mesh-wide resilience policies; a service overrides each one.
    #[serde(default)]
    pub resilience: Resilience,
}

/// A named target: where an agent's requests for `name` go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_phase")]
    pub phase: Phase,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub stream_idle_timeout: Option<Duration>,
    #[serde(default)]
    pub resilience: Resilience,
}

/// The protocol the sidecar speaks to a service's endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), as sidecars speak to each other.
    Http2,
}

/// An explicit rule, checked in order before the by-name default: requests for `authority`
/// matching the path prefix and every header go to `backend`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    pub authority: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    pub backend: String,
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Retries non-idempotent requests (POST, PATCH) on this route under the backend's retry
    /// policy, as if each carried `x-mesh-retryable: true`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry_non_idempotent: bool,
}

/// One step in the path to an invalid value, for error messages and line lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathSeg {
    Key(&'static str),
    Index(usize),
    Name(String),
}

/// A semantic error in a snapshot: where it is and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub path: Vec<PathSeg>,
    pub reason: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.path.iter().enumerate() {
            match seg {
                PathSeg::Key(k) if i == 0 => write!(f, "{k}")?,
                PathSeg::Key(k) => write!(f, ".{k}")?,
                PathSeg::Name(k) => write!(f, ".{k}")?,
                PathSeg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for Invalid {}

impl Invalid {
    pub fn new(path: Vec<PathSeg>, reason: impl Into<String>) -> Self {
        invalid(path, reason)
    }
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

fn default_stream_idle_timeout() -> Duration {
    DEFAULT_STREAM_IDLE_TIMEOUT
}

fn default_phase() -> Phase {
    Phase::Specialized
}

// === impl Defaults ===

impl Default for Defaults {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
            resilience: Resilience::default(),
        }
    }
}

// === impl Snapshot ===

impl Snapshot {
    /// Checks what serde cannot: names, references, non-zero timeouts.
    pub fn validate(&self) -> Result<(), Invalid> {
        use PathSeg::*;
        for (key, zero) in [
            ("timeout", self.defaults.timeout.is_zero()),
            (
                "stream_idle_timeout",
                self.defaults.stream_idle_timeout.is_zero(),
            ),
        ] {
            if zero {
                return Err(invalid(
                    vec![Key("defaults"), Key(key)],
                    "must be greater than zero",
                ));
            }
        }
        let known: HashSet<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
        let exists = |name: &str| known.contains(name);
        self.defaults
            .resilience
            .validate(&[Key("defaults"), Key("resilience")], None, &exists)?;
        if let Some(b) = &self.budget {
            b.validate().map_err(|r| invalid(vec![Key("budget")], r))?;
        }
        if let Some(t) = &self.trace {
            t.check()?;
        }
        if let Some(a) = &self.authorization {
            a.validate()?;
        }
        let mut names = HashSet::with_capacity(self.services.len());
        for (i, svc) in self.services.iter().enumerate() {
            let at = |k| vec![Key("services"), Index(i), Key(k)];
            if let Err(reason) = check_name(&svc.name) {
                return Err(invalid(at("name"), reason));
            }
            if !names.insert(svc.name.as_str()) {
                return Err(invalid(
                    at("name"),
                    format!("duplicate service {:?}", svc.name),
                ));
            }
            if svc.timeout.is_some_and(|t| t.is_zero()) {
                return Err(invalid(at("timeout"), "must be greater than zero"));
            }
            if svc.stream_idle_timeout.is_some_and(|t| t.is_zero()) {
                return Err(invalid(
                    at("stream_idle_timeout"),
                    "must be greater than zero",
                ));
            }
            let mut seen = HashSet::with_capacity(svc.endpoints.len());
            for ep in &svc.endpoints {
                if !seen.insert(ep) {
                    return Err(invalid(at("endpoints"), format!("duplicate endpoint {ep}")));
                }
            }
            svc.resilience.validate(
                &[Key("services"), Index(i), Key("resilience")],
                Some(&svc.name),
                &exists,
            )?;
        }
        for (i, rule) in self.routes.iter().enumerate() {
            let at = |k| vec![Key("routes"), Index(i), Key(k)];
            if let Err(reason) = check_name(normalize_authority(&rule.authority)) {
                return Err(invalid(at("authority"), reason));
            }
            if !names.contains(rule.backend.as_str()) {
                return Err(invalid(
                    at("backend"),
                    format!("unknown service {:?}", rule.backend),
                ));
            }
            if let Some(prefix) = &rule.path_prefix {
                if !prefix.starts_with('/') {
                    return Err(invalid(at("path_prefix"), "must start with '/'"));
                }
            }
            for (name, value) in &rule.headers {
                if http_header_name_invalid(name) {
                    return Err(invalid(
                        vec![Key("routes"), Index(i), Key("headers"), Name(name.clone())],
                        "not a valid lower-case header name",
                    ));
                }
                if value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
                    return Err(invalid(
                        vec![Key("routes"), Index(i), Key("headers"), Name(name.clone())],
                        "header value holds control characters",
                    ));
                }
            }
            if rule.timeout.is_some_and(|t| t.is_zero()) {
                return Err(invalid(at("timeout"), "must be greater than zero"));
            }
        }
        self.ollama.validate()?;
        Ok(())
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// Strips the port and a mesh suffix (`.mesh`, `.service.consul`) from an authority.
pub fn normalize_authority(authority: &str) -> &str {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    for suffix in AUTHORITY_SUFFIXES {
        if let Some(name) = host.strip_suffix(suffix) {
            return name;
        }
    }
    host
}

/// Service names are DNS labels: what fits in a Host header and what a sidecar accepts. The
/// control process checks every name it discovers with this before it enters a snapshot.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a service name (lower-case letters, digits and '-', at most 63)"
        ))
    }
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

pub(crate) fn invalid(path: Vec<PathSeg>, reason: impl Into<String>) -> Invalid {
    Invalid {
        path,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_forms_name_the_same_service() {
        for a in [
            "senior-ai-engineer",
            "senior-ai-engineer:80",
            "senior-ai-engineer.mesh",
            "senior-ai-engineer.service.consul",
            "senior-ai-engineer.service.consul.:8080",
        ] {
            assert_eq!(normalize_authority(a), "senior-ai-engineer", "{a}");
        }
    }

    #[test]
    fn unknown_backend_is_named() {
        let snap = Snapshot {
            version: 1,
            routes: vec![RouteRule {
                authority: "a".into(),
                path_prefix: None,
                headers: BTreeMap::new(),
                backend: "missing".into(),
                timeout: None,
                retry_non_idempotent: false,
            }],
            ..Default::default()
        };
        let err = snap.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "routes[0].backend: unknown service \"missing\""
        );
    }
}
