//! Every metric the control process exports. Label sets are bounded: phases, resources,
//! results, rejection reasons. Counters an alert watches with `increase()` are registered at 0
//! so their first event counts.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const CATALOG_STALE: &str = "mesh_control_catalog_stale";
pub const CATALOG_SERVICES: &str = "mesh_control_catalog_services";
pub const CONSUL_ERRORS: &str = "mesh_control_consul_errors_total";
pub const CATALOG_REJECTED: &str = "mesh_control_catalog_rejected_total";
pub const CATALOG_HELD: &str = "mesh_control_catalog_held";
pub const CATALOG_HOLDS: &str = "mesh_control_catalog_holds_total";
pub const CATALOG_STATE_WRITE_FAILURES: &str = "mesh_control_catalog_state_write_failures_total";
pub const CATALOG_FILE_REJECTIONS: &str = "mesh_control_catalog_file_rejections_total";
pub const POLICY_APPLIED: &str = "mesh_control_policy_applied_total";
pub const POLICY_REJECTIONS: &str = "mesh_control_policy_rejections_total";
pub const POLICY_REJECTED: &str = "mesh_control_policy_rejected";
pub const SNAPSHOT_VERSION: &str = "mesh_control_snapshot_version";
pub const SNAPSHOT_INVALID: &str = "mesh_control_snapshot_invalid_total";
pub const SUBSCRIBERS: &str = "mesh_control_subscribers";
pub const ACKS: &str = "mesh_control_acks_total";
pub const BUDGET_CPUS: &str = "mesh_control_budget_cpus";
pub const BUDGET_MEMORY: &str = "mesh_control_budget_memory_bytes";
pub const BUDGET_SCALE: &str = "mesh_control_budget_scale";
pub const BUDGET_OVERSUBSCRIBED: &str = "mesh_control_budget_oversubscribed";
pub const BUDGET_OLLAMA_RATE: &str = "mesh_control_budget_ollama_rate";
pub const IDENTITY_ISSUED: &str = "mesh_control_identity_issued_total";
pub const IDENTITY_REFUSED: &str = "mesh_control_identity_refused_total";
pub const CHANNEL_HANDSHAKE_FAILURES: &str = "mesh_control_channel_handshake_failures_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (a test process embedding sidecars).
        let _ = metrics::set_global_recorder(recorder);
        describe();
        register_at_zero();
        handle
    })
}

fn register_at_zero() {
    for reason in crate::consul::admit::Reason::ALL {
        metrics::counter!(CATALOG_REJECTED, "reason" => reason.as_str()).increment(0);
    }
    metrics::counter!(CATALOG_HOLDS).increment(0);
    metrics::counter!(CATALOG_STATE_WRITE_FAILURES).increment(0);
    metrics::counter!(SNAPSHOT_INVALID).increment(0);
    metrics::counter!(CONSUL_ERRORS).increment(0);
    metrics::gauge!(CATALOG_HELD).set(0.0);
    metrics::counter!(IDENTITY_ISSUED).increment(0);
    metrics::counter!(CHANNEL_HANDSHAKE_FAILURES).increment(0);
    for reason in crate::identity::REFUSAL_REASONS {
        metrics::counter!(IDENTITY_REFUSED, "reason" => reason).increment(0);
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_gauge!(
        CATALOG_STALE,
        "1 while discovery fails and the last catalog is served."
    );
    describe_gauge!(CATALOG_SERVICES, "Mesh services in the catalog.");
    describe_counter!(CONSUL_ERRORS, "Failed Consul queries.");
    describe_counter!(
        CATALOG_REJECTED,
        "Consul entries left out of the catalog, by reason (bad_name, hostname_address, bad_address, bad_port, duplicate_endpoint, not_an_agent, malformed)."
    );
    describe_gauge!(
        CATALOG_HELD,
        "1 while a catalog that drops too many services or endpoints is held back."
    );
    describe_counter!(
        CATALOG_HOLDS,
        "Times a catalog was held back instead of pushed."
    );
    describe_counter!(
        CATALOG_STATE_WRITE_FAILURES,
        "Published catalogs that could not be kept in --catalog-state."
    );
    describe_counter!(
        CATALOG_FILE_REJECTIONS,
        "Catalog file edits rejected as invalid."
    );
    describe_counter!(IDENTITY_ISSUED, "Certificates the mesh CA signed.");
    describe_counter!(
        IDENTITY_REFUSED,
        "Control-channel calls refused, by reason (no_token, wrong_token, wrong_certificate, bad_request, bad_csr)."
    );
    describe_counter!(
        CHANNEL_HANDSHAKE_FAILURES,
        "TLS handshakes of the control channel that failed (plaintext clients, untrusted or expired certificates)."
    );
    describe_counter!(POLICY_APPLIED, "Policy edits applied.");
    describe_counter!(POLICY_REJECTIONS, "Policy edits rejected as invalid.");
    describe_gauge!(
        POLICY_REJECTED,
        "1 while the policy files on disk are rejected."
    );
    describe_gauge!(SNAPSHOT_VERSION, "Version of the snapshot served.");
    describe_counter!(
        SNAPSHOT_INVALID,
        "Built snapshots not served because they fail the sidecars' validation."
    );
    describe_gauge!(SUBSCRIBERS, "Long-polls waiting for a new snapshot.");
    describe_counter!(ACKS, "Sidecar reports, by result (applied, rejected).");
    describe_gauge!(
        BUDGET_CPUS,
        "CPU budget by phase and kind (requested, granted, agent, sidecar: one of each)."
    );
    describe_gauge!(
        BUDGET_MEMORY,
        Unit::Bytes,
        "Memory budget by phase and kind (requested, granted, agent, sidecar: one of each)."
    );
    describe_gauge!(
        BUDGET_SCALE,
        "Factor applied to phase requests, by resource (1 = fits)."
    );
    describe_gauge!(
        BUDGET_OLLAMA_RATE,
        "Ollama calls per second each agent of a phase may make (0 = not limited)."
    );
    describe_gauge!(
        BUDGET_OVERSUBSCRIBED,
        "1 when the phases ask for more than the host has."
    );
}
