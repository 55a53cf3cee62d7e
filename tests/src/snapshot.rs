//! Snapshot TOML text for tests, built from typed pieces so a scenario states only what it
//! needs:
//!
//! ```ignore
//! let text = snapshot(1)
//!     .service(service("b").endpoint(b.addr()).timeout("200ms"))
//!     .route(route("b", "b-canary").path_prefix("/v2/"))
//!     .to_toml();
//! ```

use std::fmt::Write;
use std::net::SocketAddr;

/// A whole snapshot file.
#[derive(Clone, Debug)]
pub struct SnapshotToml {
    version: u64,
    default_timeout: Option<String>,
    services: Vec<ServiceToml>,
    routes: Vec<RouteToml>,
}

/// One `[[services]]` entry.
#[derive(Clone, Debug)]
pub struct ServiceToml {
    name: String,
    phase: String,
    protocol: &'static str,
    endpoints: Vec<SocketAddr>,
    timeout: Option<String>,
    stream_idle_timeout: Option<String>,
    /// `policy = inline table` lines of `[services.resilience]`, e.g. `("retry", "{ max_attempts = 1 }")`.
    resilience: Vec<(String, String)>,
}

/// One `[[routes]]` entry.
#[derive(Clone, Debug)]
pub struct RouteToml {
    authority: String,
    backend: String,
    path_prefix: Option<String>,
    headers: Vec<(String, String)>,
    timeout: Option<String>,
    retry_non_idempotent: bool,
}

pub fn snapshot(version: u64) -> SnapshotToml {
    SnapshotToml {
        version,
        default_timeout: None,
        services: Vec::new(),
        routes: Vec::new(),
    }
}

/// An HTTP/1.1 service in phase `performance` with no endpoints yet.
pub fn service(name: &str) -> ServiceToml {
    ServiceToml {
        name: name.to_owned(),
        phase: "performance".to_owned(),
        protocol: "http1",
        endpoints: Vec::new(),
        timeout: None,
        stream_idle_timeout: None,
        resilience: Vec::new(),
    }
}

/// A rule sending requests for `authority` to `backend`.
pub fn route(authority: &str, backend: &str) -> RouteToml {
    RouteToml {
        authority: authority.to_owned(),
        backend: backend.to_owned(),
        path_prefix: None,
        headers: Vec::new(),
        timeout: None,
        retry_non_idempotent: false,
    }
}

// === impl SnapshotToml ===

impl SnapshotToml {
    pub fn default_timeout(mut self, timeout: &str) -> Self {
        self.default_timeout = Some(timeout.to_owned());
        self
    }

    pub fn service(mut self, service: ServiceToml) -> Self {
        self.services.push(service);
        self
    }

    pub fn route(mut self, route: RouteToml) -> Self {
        self.routes.push(route);
        self
    }

    pub fn to_toml(&self) -> String {
        let mut out = format!("version = {}\n", self.version);
        if let Some(t) = &self.default_timeout {
            let _ = write!(out, "\n[defaults]\ntimeout = {}\n", quote(t));
        }
        for s in &self.services {
            let endpoints: Vec<String> =
                s.endpoints.iter().map(|e| quote(&e.to_string())).collect();
            let _ = write!(
                out,
                "\n[[services]]\nname = {}\nphase = {}\nprotocol = {}\nendpoints = [{}]\n",
                quote(&s.name),
                quote(&s.phase),
                quote(s.protocol),
                endpoints.join(", ")
            );
            if let Some(t) = &s.timeout {
                let _ = writeln!(out, "timeout = {}", quote(t));
            }
            if let Some(t) = &s.stream_idle_timeout {
                let _ = writeln!(out, "stream_idle_timeout = {}", quote(t));
            }
            if !s.resilience.is_empty() {
                let _ = writeln!(out, "[services.resilience]");
                for (policy, table) in &s.resilience {
                    let _ = writeln!(out, "{policy} = {table}");
                }
            }
        }
        for r in &self.routes {
            let _ = write!(
                out,
                "\n[[routes]]\nauthority = {}\nbackend = {}\n",
                quote(&r.authority),
                quote(&r.backend)
            );
            if let Some(p) = &r.path_prefix {
                let _ = writeln!(out, "path_prefix = {}", quote(p));
            }
            if !r.headers.is_empty() {
                let headers: Vec<String> = r
                    .headers
                    .iter()
                    .map(|(k, v)| format!("{} = {}", quote(k), quote(v)))
                    .collect();
                let _ = writeln!(out, "headers = {{ {} }}", headers.join(", "));
            }
            if let Some(t) = &r.timeout {
                let _ = writeln!(out, "timeout = {}", quote(t));
            }
            if r.retry_non_idempotent {
                let _ = writeln!(out, "retry_non_idempotent = true");
            }
        }
        out
    }
}

// === impl ServiceToml ===

impl ServiceToml {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn endpoint(mut self, addr: SocketAddr) -> Self {
        self.endpoints.push(addr);
        self
    }

    /// The sidecar speaks h2c (prior knowledge) to this service's endpoints.
    pub fn http2(mut self) -> Self {
        self.protocol = "http2";
        self
    }

    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.to_owned();
        self
    }

    pub fn timeout(mut self, timeout: &str) -> Self {
        self.timeout = Some(timeout.to_owned());
        self
    }

    pub fn stream_idle_timeout(mut self, after: &str) -> Self {
        self.stream_idle_timeout = Some(after.to_owned());
        self
    }

    /// Sets one resilience policy as a TOML inline table: `.policy("retry", "{ max_attempts = 1 }")`.
    pub fn policy(mut self, policy: &str, table: &str) -> Self {
        self.resilience.push((policy.to_owned(), table.to_owned()));
        self
    }
}

// === impl RouteToml ===

impl RouteToml {
    pub fn path_prefix(mut self, prefix: &str) -> Self {
        self.path_prefix = Some(prefix.to_owned());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn timeout(mut self, timeout: &str) -> Self {
        self.timeout = Some(timeout.to_owned());
        self
    }

    /// Opts this route's POSTs (and other non-idempotent requests) into retries.
    pub fn retry_non_idempotent(mut self) -> Self {
        self.retry_non_idempotent = true;
        self
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn builds_a_snapshot_the_model_accepts() {
        let text = snapshot(7)
            .default_timeout("30s")
            .service(
                service("b")
                    .endpoint("127.0.0.1:4000".parse().unwrap())
                    .timeout("2s"),
            )
            .service(
                service("b-canary")
                    .http2()
                    .endpoint("127.0.0.1:4001".parse().unwrap()),
            )
            .route(
                route("b", "b-canary")
                    .path_prefix("/v2/")
                    .header("x-canary", "1"),
            )
            .to_toml();
        let snap = mesh_config::load::snapshot_str(Path::new("test.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(snap.version, 7);
        assert_eq!(snap.services.len(), 2);
        assert_eq!(snap.services[1].protocol, mesh_config::Protocol::Http2);
        assert_eq!(snap.routes[0].headers["x-canary"], "1");
    }
}
