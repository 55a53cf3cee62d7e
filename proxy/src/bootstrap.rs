//! The sidecar's static configuration: who it speaks for, where it listens, where its snapshot
//! comes from. Parsed once at start; everything else takes these typed values.

use mesh_config::{LoadError, Phase};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The embedded default: a sidecar for a local agent with no control process and no Consul.
pub const EMBEDDED: &str = include_str!("../../config/local/sidecar.toml");

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// The agent this sidecar speaks for; sent to peers as `x-mesh-caller`.
    pub agent: String,
    pub phase: Phase,
    pub listen: Listen,
    #[serde(default)]
    pub inbound: Inbound,
    #[serde(default)]
    pub snapshot: SnapshotSource,
    #[serde(default)]
    pub drain: Drain,
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub upstream: Upstream,
    /// The control process; when set it is the snapshot source (see `control_client`).
    #[serde(default)]
    pub control: Option<Control>,
    /// Registers the agent in Consul on start and deregisters it on shutdown.
    #[serde(default)]
    pub consul: Option<ConsulRegistration>,
    /// Mesh identity: a certificate from the control process's CA; needs `[control]`.
    #[serde(default)]
    pub identity: Option<IdentityBootstrap>,
    /// `[[upstreams]]`: local ports that each stand for one target, whatever the Host.
    #[serde(default)]
    pub upstreams: Vec<UpstreamPort>,
    /// `[trace]`: spans exported to an OpenTelemetry collector; absent, no tracing at all.
    #[serde(default)]
    pub trace: Option<Trace>,
}

/// `[trace]`: where spans go and how much may wait for the collector. The sampling ratio is
/// policy (`[trace] sampling` in the snapshot), not bootstrap.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trace {
    /// The collector, e.g. `http://otel-collector:4318` (`/v1/traces` is added), or
    /// `http://otel-collector:4317` with `protocol = "grpc"`.
    pub endpoint: String,
    #[serde(default)]
    pub protocol: TraceProtocol,
    /// Spans waiting for export; beyond this they are dropped and counted.
    #[serde(default = "default_trace_queue")]
    pub queue_size: usize,
    /// Spans per export request.
    #[serde(default = "default_trace_batch")]
    pub max_batch: usize,
    /// Longest a span waits for its batch to fill.
    #[serde(with = "humantime_serde", default = "default_trace_flush")]
    pub flush_interval: Duration,
    /// Longest one export request may take.
    #[serde(with = "humantime_serde", default = "default_trace_timeout")]
    pub export_timeout: Duration,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum TraceProtocol {
    /// OTLP/HTTP with protobuf bodies (the collector's port 4318).
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/gRPC over h2c (the collector's port 4317).
    #[serde(rename = "grpc")]
    Grpc,
}

/// `[[upstreams]]`: a local listener whose every request goes to `service`, as Consul
/// Connect's `local_bind_port`, so clients that send their own address as Host (the
/// official Ollama and OpenAI clients) reach the mesh unchanged.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamPort {
    pub service: String,
    pub listen: SocketAddr,
}

/// `[control]`. With a control address, the snapshot comes from the control process. At start
/// the persisted snapshot (the last one the control process sent) wins over `snapshot.file`,
/// which then serves only as the first snapshot of a sidecar that has never reached control,
/// and is not watched.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// `host:port`; a name is resolved at every connection, so it follows the control
    /// process across restarts (Rule 1: names, not addresses).
    pub address: String,
    /// Where the last good snapshot is kept across restarts.
    pub persist: Option<PathBuf>,
    /// How long one long-poll waits for a new version.
    #[serde(with = "humantime_serde", default = "default_control_wait")]
    pub wait: Duration,
    /// Upper bound of the jittered backoff while control is unreachable.
    #[serde(with = "humantime_serde", default = "default_control_backoff")]
    pub max_backoff: Duration,
    /// The mesh CA certificate (PEM): when set the channel is TLS 1.3 and the control
    /// process's certificate must chain to it and name the host of `address`. Required with
    /// `[identity]`, whose token and certificates never cross plaintext.
    pub ca_file: Option<PathBuf>,
}

/// `[consul]`: the local Consul agent's HTTP API.
/// `[identity]`: how this sidecar proves who it is to the mesh CA.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityBootstrap {
    /// File holding this agent's bootstrap token (a compose secret in deployment); read at
    /// every renewal, never logged.
    pub token_file: PathBuf,
    /// The mesh's SPIFFE trust domain: this sidecar is `spiffe://<trust_domain>/agent/<agent>`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulRegistration {
    /// `host:port` of the Consul agent.
    pub address: String,
    /// The address peers reach this sidecar's inbound listener at; defaults to its bound IP,
    /// or, bound to 0.0.0.0, the address it reaches Consul from.
    pub advertise: Option<std::net::IpAddr>,
    #[serde(with = "humantime_serde", default = "default_check_interval")]
    pub check_interval: Duration,
    /// A Consul service definition (HashiCorp's `{"service": {...}}`, as `mesh-control render`
    /// writes it) to register instead of the built-in one; its id and name must be this
    /// agent's and its port the inbound port. The address is still the advertised one.
    #[serde(default)]
    pub service_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    #[serde(default = "default_outbound")]
    pub outbound: SocketAddr,
    /// The agent's mesh port; without it the sidecar only serves outbound calls.
    pub inbound: Option<SocketAddr>,
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// `app` forwards to the agent; `ollama` makes this sidecar the Ollama gateway, with `app`
    /// the Ollama server and the queue set by the snapshot's `[ollama.gateway]`.
    #[serde(default)]
    pub mode: InboundMode,
    /// How the sidecar speaks to the app: HTTP/1.1, h2c, or by request (`auto`).
    #[serde(default)]
    pub protocol: AppProtocol,
    /// The agent's own HTTP port on localhost.
    #[serde(default = "default_app")]
    pub app: SocketAddr,
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Share of `max_concurrency` one client address may hold (0 < share <= 1).
    #[serde(default = "default_max_client_share")]
    pub max_client_share: f64,
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    #[serde(with = "humantime_serde", default = "default_queue_timeout")]
    pub queue_timeout: Duration,
    #[serde(with = "humantime_serde", default = "default_inbound_timeout")]
    pub timeout: Duration,
    /// Longest silence inside the app's streamed response body before it is cut.
    #[serde(with = "humantime_serde", default = "default_stream_idle_timeout")]
    pub stream_idle_timeout: Duration,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    #[default]
    App,
    Ollama,
}

/// The protocol of the app's port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    Http1,
    /// h2c with prior knowledge for every request.
    Http2,
    /// gRPC requests (`content-type: application/grpc*`) over h2c, others over HTTP/1.1.
    #[default]
    Auto,
}

/// `[snapshot]`; a bootstrap without the section gets no file and the default poll interval.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSource {
    /// A snapshot TOML file, polled for changes. Without it the sidecar starts with no routes.
    pub file: Option<PathBuf>,
    #[serde(with = "humantime_serde", default = "default_poll_interval")]
    pub poll_interval: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    #[serde(with = "humantime_serde", default = "default_grace")]
    pub grace: Duration,
    /// Once draining, a connection with no request open is closed after this, whether or not
    /// its peer has answered GOAWAY and PING (Envoy's `drain_timeout`).
    #[serde(with = "humantime_serde", default = "default_close_idle_after")]
    pub close_idle_after: Duration,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Worker threads; 0 means one per core.
    #[serde(default)]
    pub worker_threads: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `tracing` filter directive, e.g. `info` or `mesh_proxy=debug`.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// One JSON line per request.
    #[serde(default = "yes")]
    pub access: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request head accepted; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(with = "humantime_serde", default = "default_header_read_timeout")]
    pub header_read_timeout: Duration,
    /// Time a caller has to send a request body of declared length, plus a second for every
    /// `body_min_rate` bytes it sends (`upload.rs`).
    #[serde(with = "humantime_serde", default = "default_body_timeout")]
    pub body_timeout: Duration,
    /// Bytes a second.
    #[serde(default = "default_body_min_rate")]
    pub body_min_rate: u64,
    /// Connections each listener holds open at most; more are answered 503 and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

impl Limits {
    pub fn upload(&self) -> crate::upload::UploadLimits {
        crate::upload::UploadLimits {
            timeout: self.body_timeout,
            min_rate: self.body_min_rate,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde", default = "default_idle_timeout")]
    pub pool_idle_timeout: Duration,
    #[serde(default = "default_max_idle")]
    pub pool_max_idle_per_endpoint: usize,
}

// === impl Bootstrap ===

impl Bootstrap {
    pub fn from_toml(origin: &Path, text: &str) -> Result<Bootstrap, LoadError> {
        let boot: Bootstrap = mesh_config::load::toml_str(origin, text)?;
        boot.check(origin)?;
        Ok(boot)
    }

    pub fn from_file(path: &Path) -> Result<Bootstrap, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(path, &text)
    }

    pub fn embedded() -> Bootstrap {
        Self::from_toml(Path::new("<embedded sidecar.toml>"), EMBEDDED)
            .expect("the embedded bootstrap is valid")
    }

    fn check(&self, origin: &Path) -> Result<(), LoadError> {
        let fail = |reason: &str| {
            Err(LoadError::Invalid(mesh_config::load::Located {
                file: origin.to_owned(),
                line: 0,
                reason: reason.to_owned(),
            }))
        };
        if self.agent.is_empty() || self.agent.len() > 63 {
            return fail("agent: must be a service name of 1 to 63 characters");
        }
        if http::HeaderValue::from_str(&self.agent).is_err() {
            return fail("agent: must be printable ASCII");
        }
        if self.inbound.max_concurrency == 0 {
            return fail("inbound.max_concurrency: must be at least 1");
        }
        if !(self.inbound.max_client_share > 0.0 && self.inbound.max_client_share <= 1.0) {
            return fail("inbound.max_client_share: must be above 0 and at most 1");
        }
        if self.inbound.timeout.is_zero() || self.inbound.stream_idle_timeout.is_zero() {
            return fail(
                "inbound.timeout and inbound.stream_idle_timeout: must be greater than zero",
            );
        }
        if self.limits.body_timeout.is_zero() || self.limits.body_min_rate == 0 {
            return fail("limits.body_timeout and limits.body_min_rate: must be greater than zero");
        }
        if self.limits.max_connections == 0 {
            return fail("limits.max_connections: must be at least 1");
        }
        if self.limits.max_header_bytes < 8192 {
            return fail("limits.max_header_bytes: must be at least 8192");
        }
        if let Some(c) = &self.control {
            let authority = c.address.parse::<http::uri::Authority>().ok();
            if authority.as_ref().and_then(|a| a.port_u16()).is_none()
                || authority.is_some_and(|a| a.host().is_empty() || a.as_str().contains('@'))
            {
                return fail("control.address: must be host:port (a name or an IP address)");
            }
            if c.wait.is_zero() || c.max_backoff.is_zero() {
                return fail("control.wait and control.max_backoff: must be greater than zero");
            }
        }
        match (&self.identity, &self.control) {
            (Some(_), None) => {
                return fail("identity: needs [control], whose CA signs the certificate")
            }
            (Some(_), Some(c)) if c.ca_file.is_none() => {
                return fail(
                    "identity: the control channel would carry the agent's token in clear; \
                     set control.ca_file to the mesh CA certificate so it is TLS",
                )
            }
            _ => {}
        }
        if let Some(t) = &self.trace {
            if !(t.endpoint.starts_with("http://") || t.endpoint.starts_with("https://"))
                || t.endpoint.parse::<http::Uri>().is_err()
            {
                return fail(
                    "trace.endpoint: must be an http:// URL, e.g. http://otel-collector:4318",
                );
            }
            if t.endpoint.starts_with("https://") {
                return fail("trace.endpoint: https is not supported; the collector is reached over the host network (http://)");
            }
            if t.protocol == TraceProtocol::Grpc
                && t.endpoint
                    .parse::<http::Uri>()
                    .is_ok_and(|u| u.path() != "/")
            {
                return fail("trace.endpoint: with protocol = \"grpc\" the collector is named without a path, e.g. http://otel-collector:4317");
            }
            if t.queue_size == 0 || t.max_batch == 0 {
                return fail("trace.queue_size and trace.max_batch: must be at least 1");
            }
            if t.flush_interval.is_zero() || t.export_timeout.is_zero() {
                return fail(
                    "trace.flush_interval and trace.export_timeout: must be greater than zero",
                );
            }
        }
        if self.snapshot.poll_interval.is_zero() {
            return fail("snapshot.poll_interval: must be greater than zero");
        }
        for (i, up) in self.upstreams.iter().enumerate() {
            if up.service.is_empty()
                || up.service.len() > 63
                || !up
                    .service
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return fail(&format!(
                    "upstreams[{i}].service: {:?} is not a service name (lower-case letters, digits, '-')",
                    up.service
                ));
            }
            let clash = [
                Some(self.listen.outbound),
                self.listen.inbound,
                Some(self.listen.admin),
            ]
            .into_iter()
            .flatten()
            .chain(self.upstreams[..i].iter().map(|u| u.listen))
            .any(|a| a == up.listen && a.port() != 0);
            if clash {
                return fail(&format!(
                    "upstreams[{i}].listen: {} is already a listener of this sidecar",
                    up.listen
                ));
            }
        }
        Ok(())
    }
}

// === defaults ===

fn default_trust_domain() -> String {
    "mesh".into()
}

fn default_trace_queue() -> usize {
    2048
}

fn default_trace_batch() -> usize {
    512
}

fn default_trace_flush() -> Duration {
    Duration::from_secs(1)
}

fn default_trace_timeout() -> Duration {
    Duration::from_secs(2)
}

impl Default for Inbound {
    fn default() -> Self {
        Self {
            mode: InboundMode::App,
            protocol: AppProtocol::Auto,
            app: default_app(),
            max_concurrency: default_max_concurrency(),
            max_client_share: default_max_client_share(),
            queue_depth: default_queue_depth(),
            queue_timeout: default_queue_timeout(),
            timeout: default_inbound_timeout(),
            stream_idle_timeout: default_stream_idle_timeout(),
        }
    }
}

impl Default for SnapshotSource {
    fn default() -> Self {
        Self {
            file: None,
            poll_interval: default_poll_interval(),
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            grace: default_grace(),
            close_idle_after: default_close_idle_after(),
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            access: true,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: default_max_header_bytes(),
            header_read_timeout: default_header_read_timeout(),
            body_timeout: default_body_timeout(),
            body_min_rate: default_body_min_rate(),
            max_connections: default_max_connections(),
        }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            connect_timeout: default_connect_timeout(),
            pool_idle_timeout: default_idle_timeout(),
            pool_max_idle_per_endpoint: default_max_idle(),
        }
    }
}

fn default_outbound() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15001))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15090))
}
fn default_app() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_concurrency() -> usize {
    256
}
fn default_max_client_share() -> f64 {
    0.5
}
fn default_queue_depth() -> usize {
    1024
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_inbound_timeout() -> Duration {
    mesh_config::snapshot::DEFAULT_TIMEOUT
}
fn default_stream_idle_timeout() -> Duration {
    mesh_config::snapshot::DEFAULT_STREAM_IDLE_TIMEOUT
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_control_wait() -> Duration {
    Duration::from_secs(30)
}
fn default_control_backoff() -> Duration {
    Duration::from_secs(5)
}
fn default_check_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_close_idle_after() -> Duration {
    Duration::from_secs(5)
}
fn default_log_level() -> String {
    "info".into()
}
fn yes() -> bool {
    true
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_min_rate() -> u64 {
    1024
}
fn default_max_connections() -> usize {
    10_000
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(90)
}
fn default_max_idle() -> usize {
    64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let boot = Bootstrap::embedded();
        assert_eq!(boot.listen.outbound.port(), 15001);
    }

    #[test]
    fn unknown_key_is_rejected_with_line() {
        let err = Bootstrap::from_toml(
            Path::new("sidecar.toml"),
            "agent = \"a\"\nphase = \"critical\"\n[listen]\nadmn = \"127.0.0.1:1\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("sidecar.toml:4:"), "{err}");
    }

    const HEAD: &str =
        "agent = \"a\"\nphase = \"critical\"\n[listen]\noutbound = \"127.0.0.1:15001\"\n";

    #[test]
    fn trace_export_is_http_protobuf_unless_grpc_is_asked() {
        let boot =
            |extra: &str| Bootstrap::from_toml(Path::new("s.toml"), &format!("{HEAD}{extra}"));
        let http = boot("[trace]\nendpoint = \"http://c:4318\"\n").unwrap();
        assert_eq!(http.trace.unwrap().protocol, TraceProtocol::HttpProtobuf);
        let grpc = boot("[trace]\nendpoint = \"http://c:4317\"\nprotocol = \"grpc\"\n").unwrap();
        assert_eq!(grpc.trace.unwrap().protocol, TraceProtocol::Grpc);
        // A gRPC collector is an address; a path is a sign of an OTLP/HTTP URL.
        let err = boot("[trace]\nendpoint = \"http://c:4318/v1/traces\"\nprotocol = \"grpc\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("without a path"), "{err}");
        let err =
            boot("[trace]\nendpoint = \"http://c:4317\"\nprotocol = \"thrift\"\n").unwrap_err();
        assert!(err.to_string().starts_with("s.toml:"), "{err}");
    }

    #[test]
    fn app_protocol_defaults_to_auto_and_parses() {
        let boot = Bootstrap::from_toml(Path::new("s.toml"), HEAD).unwrap();
        assert_eq!(boot.inbound.protocol, AppProtocol::Auto);
        let text = format!("{HEAD}[inbound]\nprotocol = \"http2\"\n");
        let boot = Bootstrap::from_toml(Path::new("s.toml"), &text).unwrap();
        assert_eq!(boot.inbound.protocol, AppProtocol::Http2);
        let text = format!("{HEAD}[inbound]\nprotocol = \"h3\"\n");
        assert!(Bootstrap::from_toml(Path::new("s.toml"), &text).is_err());
    }

    #[test]
    fn control_address_is_a_name_or_an_ip_with_a_port() {
        let at = |a: &str| format!("{HEAD}[control]\naddress = \"{a}\"\n");
        let boot = Bootstrap::from_toml(Path::new("s.toml"), &at("mesh-control:15010")).unwrap();
        assert_eq!(boot.control.unwrap().address, "mesh-control:15010");
        Bootstrap::from_toml(Path::new("s.toml"), &at("127.0.0.1:15010")).unwrap();
        for bad in ["mesh-control", "", "user@host:1", "a b:1", "host:port"] {
            let err = Bootstrap::from_toml(Path::new("s.toml"), &at(bad)).unwrap_err();
            assert!(err.to_string().contains("control.address"), "{bad}: {err}");
        }
    }

    #[test]
    fn identity_needs_a_tls_control_channel() {
        let with = |control: &str| {
            format!("{HEAD}[control]\naddress = \"mesh-control:15010\"\n{control}[identity]\ntoken_file = \"/run/secrets/t\"\n")
        };
        let err = Bootstrap::from_toml(Path::new("s.toml"), &with("")).unwrap_err();
        assert!(err.to_string().contains("control.ca_file"), "{err}");
        let boot = Bootstrap::from_toml(Path::new("s.toml"), &with("ca_file = \"/ca.pem\"\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            boot.control.unwrap().ca_file,
            Some(PathBuf::from("/ca.pem"))
        );
    }

    #[test]
    fn upstream_ports_are_checked() {
        let ok =
            format!("{HEAD}[[upstreams]]\nservice = \"ollama\"\nlisten = \"127.0.0.1:11434\"\n");
        let boot = Bootstrap::from_toml(Path::new("s.toml"), &ok).unwrap();
        assert_eq!(boot.upstreams[0].service, "ollama");
        let clash =
            format!("{HEAD}[[upstreams]]\nservice = \"ollama\"\nlisten = \"127.0.0.1:15001\"\n");
        let err = Bootstrap::from_toml(Path::new("s.toml"), &clash).unwrap_err();
        assert!(err.to_string().contains("already a listener"), "{err}");
        let bad =
            format!("{HEAD}[[upstreams]]\nservice = \"Ollama.mesh\"\nlisten = \"127.0.0.1:1\"\n");
        let err = Bootstrap::from_toml(Path::new("s.toml"), &bad).unwrap_err();
        assert!(err.to_string().contains("not a service name"), "{err}");
    }

    #[test]
    fn a_bootstrap_without_snapshot_starts_with_no_routes_and_the_default_poll() {
        // The README documents every `[snapshot]` key as optional: so is the section.
        let boot = Bootstrap::from_toml(
            Path::new("sidecar.toml"),
            "agent = \"a\"\nphase = \"critical\"\n[listen]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(boot.snapshot.file.is_none());
        assert_eq!(boot.snapshot.poll_interval, Duration::from_secs(1));
    }
}
