//! The compose file: infrastructure, then every agent of the registry with its sidecar in its
//! network namespace. Limits come from the budget (agents, sidecars) and the reserved pools
//! (Ollama, Prometheus, Grafana); every container is hardened (Rule 26), has a healthcheck in
//! exec form (no shell), publishes nothing outside 10000-10599 and names its peers (no IPs).

use super::{budget_comment, Limits, PairLimits};
use mesh_config::registry::{Agent, AppProtocol};
use mesh_config::units::ByteSize;
use mesh_config::{BudgetReport, Phase, Policy, Registry};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Host ports of the operator-facing infrastructure, inside the published range (Rule 26).
pub const GRAFANA_PORT: u16 = 10000;
pub const PROMETHEUS_PORT: u16 = 10001;
pub const CONSUL_PORT: u16 = 10002;

/// Rule 20 restart policy of a phase.
pub fn restart(phase: Phase) -> &'static str {
    match phase {
        Phase::Critical => "always",
        Phase::Performance => "on-failure",
        Phase::Specialized => "unless-stopped",
    }
}

/// A reserved pool's memory split evenly among the services it lists.
fn pool_share(policy: &Policy, service: &str, fallback: ByteSize) -> ByteSize {
    policy
        .budget
        .pools
        .values()
        .find(|p| p.phases.is_empty() && p.services.iter().any(|s| s == service))
        .map_or(fallback, |p| {
            ByteSize((p.memory.0 / p.services.len() as u64) >> 20 << 20)
        })
}

fn limits(cpus: f64, memory: ByteSize) -> String {
    Limits { cpus, memory }.compose()
}

pub fn render(
    policy: &Policy,
    registry: &Registry,
    report: &BudgetReport,
    pairs: &BTreeMap<String, PairLimits>,
) -> String {
    let mut s = String::new();
    s.push_str(HEADER);
    s.push_str(&budget_comment(report));
    s.push_str(SHARED);
    s.push_str("services:\n  # === infrastructure ===\n");
    let ollama_threads = 4;
    let infra = INFRA
        .replace(
            "@OLLAMA_LIMITS@",
            &limits(
                f64::from(ollama_threads),
                pool_share(policy, "ollama", ByteSize::gib(4)),
            ),
        )
        .replace(
            "@PROMETHEUS_LIMITS@",
            &limits(0.5, pool_share(policy, "prometheus", ByteSize::mib(512))),
        )
        .replace(
            "@GRAFANA_LIMITS@",
            &limits(0.5, pool_share(policy, "grafana", ByteSize::mib(512))),
        )
        .replace(
            "@QUEUE_TIMEOUT@",
            &humantime::format_duration(policy.ollama.gateway.queue_timeout).to_string(),
        )
        .replace(
            "@OLLAMA_NUM_PARALLEL@",
            &policy.ollama.gateway.parallel.to_string(),
        )
        .replace("@OLLAMA_NUM_THREADS@", &ollama_threads.to_string())
        .replace(
            "@GATEWAY_LIMITS@",
            &limits(0.25, super::limits::GATEWAY_MEMORY),
        )
        .replace("@GRAFANA_PORT@", &GRAFANA_PORT.to_string())
        .replace("@PROMETHEUS_PORT@", &PROMETHEUS_PORT.to_string())
        .replace("@CONSUL_PORT@", &CONSUL_PORT.to_string());
    s.push_str(&infra);
    for phase in Phase::ALL {
        let range = mesh_config::registry::port_range(phase);
        let _ = writeln!(
            s,
            "\n  # === {phase} agents (mesh ports {}-{}) ===",
            range.start(),
            range.end()
        );
        for agent in registry.in_phase(phase) {
            agent_pair(&mut s, agent, &pairs[&agent.name]);
        }
    }
    s.push_str("\nvolumes:\n  ollama-models:\n  ollama-gateway-state:\n  mesh-control-state:\n  prometheus-data:\n  grafana-data:\n  tempo-data:\n");
    s.push_str("  # Each sidecar's last snapshot from mesh-control, kept across restarts.\n");
    for agent in &registry.agents {
        let _ = writeln!(s, "  {}-state:", agent.name);
    }
    s.push_str(&super::secrets::top_level(registry));
    s
}

/// The agent's own healthcheck, in the protocol its app speaks (exec form: no shell).
fn app_healthcheck(protocol: AppProtocol) -> &'static str {
    match protocol {
        AppProtocol::Http1 | AppProtocol::Auto => {
            r#"["CMD", "curl", "-fsS", "-o", "/dev/null", "--max-time", "2", "http://127.0.0.1:8080/health"]"#
        }
        AppProtocol::Http2 => {
            r#"["CMD", "curl", "-fsS", "--http2-prior-knowledge", "-o", "/dev/null", "--max-time", "2", "http://127.0.0.1:8080/health"]"#
        }
        // The gRPC health protocol (grpc.health.v1.Health/Check).
        AppProtocol::Grpc => {
            r#"["CMD", "grpc_health_probe", "-addr=127.0.0.1:8080", "-connect-timeout=2s", "-rpc-timeout=2s"]"#
        }
    }
}

fn agent_pair(s: &mut String, agent: &Agent, p: &PairLimits) {
    let name = &agent.name;
    let phase = agent.phase;
    let restart = restart(phase);
    let port = agent.port;
    let image = &agent.image;
    let agent_limits = p.agent.compose();
    let healthcheck = app_healthcheck(agent.protocol);
    let sidecar_limits = p.sidecar.compose();
    let secrets = super::secrets::sidecar_mounts(name);
    let _ = write!(
        s,
        r#"
  {name}:
    <<: *agent
    image: {image}
    profiles: [{phase}, all]
    restart: {restart}
    labels:
      mesh.phase: {phase}
      mesh.role: agent
    environment:
      <<: *agent-env
      AGENT_ID: {name}
      AGENT_PHASE: {phase}
    healthcheck:
      <<: *app-health
      test: {healthcheck}
    ports:
      - "${{HOST_BIND:-127.0.0.1}}:{port}:{port}"
    deploy:
      resources:
        limits: {agent_limits}

  {name}-sidecar:
    <<: *sidecar
    profiles: [{phase}, all]
    restart: {restart}
    labels:
      mesh.phase: {phase}
      mesh.role: sidecar
    network_mode: "service:{name}"
    depends_on: [{name}]
    volumes:
      - ./deploy/generated/sidecars/{name}.toml:/etc/mesh/sidecar.toml:ro
      - ./deploy/generated/consul/{name}.json:/etc/mesh/consul-service.json:ro
      - ./deploy/generated/snapshot.toml:/etc/mesh/snapshot.toml:ro
      - {name}-state:/var/lib/mesh
{secrets}    deploy:
      resources:
        limits: {sidecar_limits}
"#
    );
}

const HEADER: &str = r#"# Generated by `mesh-control render` from config/mesh/agents.toml and the policy in
# config/mesh: do not edit; edit those and re-render (deploy/README.md).
#
# The agent mesh on one host: infrastructure (Consul, Ollama behind its gateway sidecar,
# mesh-control, Prometheus, Grafana, the OpenTelemetry collector) and every agent of the
# registry, each with a mesh-proxy sidecar in its network namespace.
#
#   ./deploy/deploy.sh --env local --phase all         # phase by phase, canary first
#
# Every service has a profile named after its phase (Rule 25) and the profile `all`. CPU and
# memory limits come from the budget engine (Rules 20-21): each phase's slice holds its sidecars'
# floors ([sidecar] in config/mesh/resources.toml) first, then its agents' shares, and each
# sidecar's inbound concurrency is computed from its agent's share.
# Services find each other by name (Docker DNS on the project's default network) and through
# Consul, where every sidecar registers its agent's rendered definition
# (deploy/generated/consul/); no address is fixed.
"#;

const SHARED: &str = r#"
# === shared settings ===

# Rule 26 on every container: non-root, read-only root filesystem, no capabilities, no
# privilege escalation; JSON logs with rotation.
x-hardened: &hardened
  user: "65532:65532"
  cap_drop: [ALL]
  security_opt:
    - no-new-privileges:true
  read_only: true
  tmpfs:
    - /tmp
  logging:
    driver: json-file
    options:
      max-size: "10m"
      max-file: "3"

# An agent: its app listens on 127.0.0.1:8080, the port its sidecar forwards to. Its
# healthcheck speaks the app's protocol (registry `protocol`): HTTP/1.1 or h2c GET /health, or
# the gRPC health service.
x-app-health: &app-health
  interval: 30s
  timeout: 3s
  retries: 3
  start_period: 20s

x-agent: &agent
  <<: *hardened
  stop_grace_period: 35s
  environment: &agent-env
    MESH_OUTBOUND: http://127.0.0.1:15001
    # The sidecar's upstream port for Ollama: the official clients need nothing else.
    OLLAMA_HOST: http://127.0.0.1:11434
    OPENAI_BASE_URL: http://127.0.0.1:11434/v1
    OTEL_EXPORTER_OTLP_ENDPOINT: http://otel-collector:4318

# A mesh-proxy sidecar in its agent's network namespace: its ports are the agent's, and
# Prometheus scrapes it at <agent>:15090. It drains for 30 s on SIGTERM.
x-sidecar: &sidecar
  <<: *hardened
  image: ${MESH_PROXY_IMAGE:-mesh-proxy:local}
  stop_signal: SIGTERM
  stop_grace_period: 35s
  healthcheck:
    test: ["CMD", "curl", "-fsS", "-o", "/dev/null", "--max-time", "2", "http://127.0.0.1:15090/health"]
    interval: 10s
    timeout: 3s
    retries: 3
    start_period: 10s

"#;

const INFRA: &str = r#"
  consul:
    <<: *hardened
    image: hashicorp/consul:1.20.1
    profiles: [infrastructure, all]
    # The image's user; its entrypoint skips the chown when not started as root.
    user: "100:1000"
    command: ["agent", "-dev", "-client", "0.0.0.0", "-log-json"]
    restart: always
    labels:
      mesh.phase: infrastructure
    tmpfs:
      - /tmp
      - /consul/data:uid=100,gid=1000
    ports:
      - "${HOST_BIND:-127.0.0.1}:@CONSUL_PORT@:8500"
    healthcheck:
      test: ["CMD", "consul", "members"]
      interval: 10s
      timeout: 3s
      retries: 5
    deploy:
      resources:
        limits: {cpus: "0.5", memory: 256m}

  ollama:
    <<: *hardened
    image: ollama/ollama:0.5.7
    profiles: [infrastructure, all]
    restart: always
    labels:
      mesh.phase: infrastructure
    environment:
      # Rule 22: one request and one model at a time, unloaded after 30 s idle.
      OLLAMA_NUM_PARALLEL: "@OLLAMA_NUM_PARALLEL@"
      OLLAMA_NUM_THREADS: "@OLLAMA_NUM_THREADS@"
      OLLAMA_MAX_LOADED_MODELS: "1"
      OLLAMA_KEEP_ALIVE: 30s
      # Loopback only: agents reach Ollama through its gateway sidecar on 11435, which
      # queues generations for at most @QUEUE_TIMEOUT@ (Rule 22).
      OLLAMA_HOST: 127.0.0.1:11434
      OLLAMA_MODELS: /models
      HOME: /tmp
    volumes:
      # Owned by 65532: deploy.sh prepares it once, before the first start.
      - ollama-models:/models
    healthcheck:
      test: ["CMD", "ollama", "list"]
      interval: 15s
      timeout: 5s
      retries: 5
      start_period: 20s
    # Infrastructure pool (Rule 21), split among its services; a core per thread.
    deploy:
      resources:
        limits: @OLLAMA_LIMITS@

  # The Ollama gateway: a mesh-proxy in Ollama's network namespace (`[inbound] mode =
  # "ollama"`), registered in Consul as `ollama`.
  ollama-gateway:
    <<: *sidecar
    profiles: [infrastructure, all]
    restart: always
    labels:
      mesh.phase: infrastructure
      mesh.role: sidecar
    network_mode: "service:ollama"
    depends_on: [ollama, mesh-control]
    volumes:
      - ./deploy/generated/sidecars/ollama.toml:/etc/mesh/sidecar.toml:ro
      - ./deploy/generated/consul/ollama.json:/etc/mesh/consul-service.json:ro
      - ./deploy/generated/snapshot.toml:/etc/mesh/snapshot.toml:ro
      - ollama-gateway-state:/var/lib/mesh
    secrets:
      - mesh-ca
      - source: token-ollama
        target: agent-token
    deploy:
      resources:
        limits: @GATEWAY_LIMITS@

  # The control process: routes from Consul, policy from config/mesh, budgets and Ollama
  # rates, pushed to every sidecar by long-poll. Same image, other entrypoint. It is the mesh
  # CA (the CA, the agents' tokens and the operator token are compose secrets) and serves its
  # channel over TLS as mesh-control.
  mesh-control:
    <<: *hardened
    image: ${MESH_PROXY_IMAGE:-mesh-proxy:local}
    profiles: [infrastructure, all]
    entrypoint: ["/usr/local/bin/mesh-control"]
    command: ["run", "--listen", "0.0.0.0:15010", "--policy", "/etc/mesh/policy",
              "--consul", "consul:8500",
              "--agent-tokens", "/run/secrets/agent-tokens",
              "--ca-cert", "/run/secrets/mesh-ca", "--ca-key", "/run/secrets/mesh-ca-key",
              "--tls-name", "mesh-control", "--tls-name", "localhost",
              "--operator-token-file", "/run/secrets/operator-token",
              "--catalog-state", "/var/lib/mesh/catalog.json"]
    secrets: [mesh-ca, mesh-ca-key, agent-tokens, operator-token]
    restart: always
    labels:
      mesh.phase: infrastructure
    depends_on:
      consul:
        condition: service_healthy
    volumes:
      - ./config/mesh:/etc/mesh/policy:ro
      # The catalog last published (the image makes /var/lib/mesh its own): a restart
      # judges its first Consul read against it.
      - mesh-control-state:/var/lib/mesh
    healthcheck:
      test: ["CMD", "curl", "-fsS", "-o", "/dev/null", "--max-time", "2", "--cacert", "/run/secrets/mesh-ca", "https://localhost:15010/health"]
      interval: 10s
      timeout: 3s
      retries: 3
      start_period: 5s
    deploy:
      resources:
        limits: {cpus: "0.25", memory: 128m}

  otel-collector:
    <<: *hardened
    image: otel/opentelemetry-collector:0.115.0
    profiles: [infrastructure, all]
    user: "10001:10001"
    command: ["--config=/etc/otelcol/collector.yml"]
    restart: always
    labels:
      mesh.phase: infrastructure
    volumes:
      - ./deploy/otel/collector.yml:/etc/otelcol/collector.yml:ro
    # The image has no HTTP client: the check proves the binary runs its mounted config.
    healthcheck:
      test: ["CMD", "/otelcol", "validate", "--config=/etc/otelcol/collector.yml"]
      interval: 30s
      timeout: 5s
      retries: 3
    deploy:
      resources:
        limits: {cpus: "0.25", memory: 256m}

  # Tracing backend (Rule 28): the collector forwards traces here; Grafana's Tempo data source.
  tempo:
    <<: *hardened
    image: grafana/tempo:2.6.1
    profiles: [infrastructure, all]
    user: "10001:10001"
    command: ["-config.file=/etc/tempo/tempo.yml"]
    restart: always
    labels:
      mesh.phase: infrastructure
    volumes:
      - ./deploy/tempo/tempo.yml:/etc/tempo/tempo.yml:ro
      - tempo-data:/var/tempo
    healthcheck:
      test: ["CMD", "wget", "-qO", "/dev/null", "http://127.0.0.1:3200/ready"]
      interval: 10s
      timeout: 3s
      retries: 5
      start_period: 10s
    deploy:
      resources:
        limits: {cpus: "0.25", memory: 512m}

  prometheus:
    <<: *hardened
    image: prom/prometheus:v2.53.3
    profiles: [infrastructure, all]
    command:
      - --config.file=/etc/prometheus/prometheus.yml
      - --storage.tsdb.path=/prometheus
      - --storage.tsdb.retention.time=15d
      - --log.format=json
      - --web.enable-lifecycle
    restart: always
    labels:
      mesh.phase: infrastructure
    volumes:
      - ./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro
      - ./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro
      - ./deploy/generated/prometheus/sidecars.json:/etc/prometheus/targets/sidecars.json:ro
      - prometheus-data:/prometheus
    # mesh-control's /metrics is on its TLS channel.
    secrets: [mesh-ca]
    ports:
      - "${HOST_BIND:-127.0.0.1}:@PROMETHEUS_PORT@:9090"
    healthcheck:
      test: ["CMD", "wget", "-qO", "/dev/null", "http://127.0.0.1:9090/-/ready"]
      interval: 10s
      timeout: 3s
      retries: 5
    # Monitoring pool (Rule 21), split among its services.
    deploy:
      resources:
        limits: @PROMETHEUS_LIMITS@

  grafana:
    <<: *hardened
    image: grafana/grafana:11.3.0
    profiles: [infrastructure, all]
    user: "472:0"
    restart: always
    labels:
      mesh.phase: infrastructure
    environment:
      GF_SECURITY_ADMIN_PASSWORD: ${GRAFANA_ADMIN_PASSWORD:-admin}
      GF_LOG_MODE: console
      GF_LOG_CONSOLE_FORMAT: json
      GF_ANALYTICS_REPORTING_ENABLED: "false"
      GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH: /etc/grafana/dashboards/mesh.json
    volumes:
      - ./deploy/grafana/provisioning:/etc/grafana/provisioning:ro
      - ./deploy/grafana/dashboards:/etc/grafana/dashboards:ro
      - grafana-data:/var/lib/grafana
    ports:
      - "${HOST_BIND:-127.0.0.1}:@GRAFANA_PORT@:3000"
    healthcheck:
      test: ["CMD", "wget", "-qO", "/dev/null", "http://127.0.0.1:3000/api/health"]
      interval: 10s
      timeout: 3s
      retries: 5
      start_period: 20s
    deploy:
      resources:
        limits: @GRAFANA_LIMITS@
"#;
