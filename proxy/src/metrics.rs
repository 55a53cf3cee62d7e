//! Every metric the proxy exports: names, help, buckets, and pre-registered handles so the
//! request path increments atomics instead of looking up label sets.

use metrics::{Counter, Gauge, Histogram, Label};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{Arc, OnceLock};

pub const REQUESTS_TOTAL: &str = "agent_requests_total";
pub const REQUEST_DURATION: &str = "agent_request_duration_seconds";
pub const ERRORS_TOTAL: &str = "agent_errors_total";
pub const INFLIGHT: &str = "agent_inflight_requests";
pub const CONNECTIONS_TOTAL: &str = "agent_connections_total";
pub const CONNECTIONS_REFUSED: &str = "agent_connections_refused_total";
pub const PROTOCOL_ERRORS: &str = "agent_protocol_errors_total";
pub const SNAPSHOT_VERSION: &str = "agent_snapshot_version";
pub const SNAPSHOT_APPLIED: &str = "agent_snapshot_applied_total";
pub const SNAPSHOT_REJECTIONS: &str = "agent_snapshot_rejections_total";
pub const INBOUND_QUEUE_DEPTH: &str = "agent_inbound_queue_depth";
pub const RESOURCE_USAGE: &str = "agent_resource_usage_bytes";
pub const UPSTREAM_READY: &str = "agent_upstream_ready";
pub const LOG_LINES_DROPPED: &str = "agent_log_lines_dropped_total";
pub const BREAKER_STATE: &str = "agent_circuit_breaker_state";
pub const BREAKER_TRANSITIONS: &str = "agent_circuit_breaker_transitions_total";
pub const BREAKER_SHORT_CIRCUITS: &str = "agent_circuit_breaker_short_circuits_total";
pub const RETRIES_TOTAL: &str = "agent_retries_total";
pub const RETRY_BUDGET_EXHAUSTED: &str = "agent_retry_budget_exhausted_total";
pub const EJECTIONS_TOTAL: &str = "agent_endpoint_ejections_total";
pub const OLLAMA_QUEUE_DEPTH: &str = "agent_ollama_queue_depth";
pub const OLLAMA_QUEUE_WAIT: &str = "agent_ollama_queue_wait_seconds";
pub const OLLAMA_ADMITTED: &str = "agent_ollama_admitted_total";
pub const OLLAMA_REJECTED: &str = "agent_ollama_rejected_total";
pub const OLLAMA_CANCELLED: &str = "agent_ollama_cancelled_total";
pub const OLLAMA_SLOTS: &str = "agent_ollama_slots";
pub const OLLAMA_SLOTS_BUSY: &str = "agent_ollama_slots_busy";
pub const OLLAMA_SLOT_BUSY: &str = "agent_ollama_slot_busy_microseconds_total";
pub const OLLAMA_BREAKER_OPEN: &str = "agent_ollama_breaker_open";
pub const OLLAMA_RATE_LIMITED: &str = "agent_ollama_rate_limited_total";
pub const IDENTITY_EXPIRY: &str = "agent_identity_expiry_timestamp_seconds";
pub const IDENTITY_RENEWALS: &str = "agent_identity_renewals_total";
pub const TLS_HANDSHAKES: &str = "agent_tls_handshakes_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "agent_tls_handshake_failures_total";
pub const INBOUND_PLAINTEXT: &str = "agent_inbound_plaintext_requests_total";
pub const AUTHZ_DENIED: &str = "agent_authz_denied_total";
pub const TRACE_SPANS_DROPPED: &str = "agent_trace_spans_dropped_total";
pub const TRACE_SPANS_EXPORTED: &str = "agent_trace_spans_exported_total";

const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Statuses with a pre-registered counter; others register on first use.
const COMMON_STATUS: [u16; 19] = [
    200, 201, 202, 204, 206, 301, 302, 304, 400, 401, 403, 404, 408, 409, 429, 500, 502, 503, 504,
];

/// Error kinds counted in `agent_errors_total{kind}`: a closed set.
pub const ERROR_KINDS: [&str; 17] = [
    "no_route",
    "no_authority",
    "no_endpoints",
    "upstream_unavailable",
    "upstream_failed",
    "timeout",
    "overloaded",
    "draining",
    "client_reset",
    "upstream_reset",
    "upstream_idle",
    "upstream_status",
    "breaker_open",
    "request_body",
    "request_body_timeout",
    "bad_request",
    "rate_limited",
];

/// Kinds counted in `agent_protocol_errors_total{kind}`: a closed set, exported at 0.
pub const PROTOCOL_ERROR_KINDS: [&str; 5] = [
    "unknown_protocol",
    "header_too_large",
    "malformed_request",
    "header_timeout",
    "http",
];

/// The `target` label of requests that matched no route. The authority asked for is not a
/// label (any caller could mint new series with it; it is in the access log and the 503
/// body); this value cannot be a service name, which is a DNS label.
pub const NO_ROUTE_TARGET: &str = "(no route)";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), DURATION_BUCKETS)
            .expect("bucket list is not empty")
            .set_buckets_for_metric(Matcher::Full(OLLAMA_QUEUE_WAIT.into()), QUEUE_WAIT_BUCKETS)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding program); ours still renders.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        register_at_zero();
        handle
    })
}

/// Counters alerts read with `increase()` exist from the start: a counter born at 1 on its
/// first event shows no increase, so the first rejection would never alert.
fn register_at_zero() {
    metrics::counter!(SNAPSHOT_APPLIED).increment(0);
    metrics::counter!(SNAPSHOT_REJECTIONS).increment(0);
    for kind in PROTOCOL_ERROR_KINDS {
        metrics::counter!(PROTOCOL_ERRORS, "kind" => kind).increment(0);
    }
    for reason in crate::identity::tls::FAILURE_REASONS {
        metrics::counter!(TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(0);
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUESTS_TOTAL, "Requests that got a response, by status.");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from request received to the end of the response body."
    );
    describe_counter!(ERRORS_TOTAL, "Requests that failed, by kind.");
    describe_gauge!(INFLIGHT, "Requests in flight.");
    describe_counter!(CONNECTIONS_TOTAL, "Connections accepted, by listener.");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections answered 503 and closed because their listener was at limits.max_connections."
    );
    describe_counter!(
        PROTOCOL_ERRORS,
        "Connections closed for bad protocol input."
    );
    describe_gauge!(SNAPSHOT_VERSION, "Version of the snapshot in force.");
    describe_counter!(SNAPSHOT_APPLIED, "Snapshots applied.");
    describe_counter!(
        TRACE_SPANS_DROPPED,
        "Spans not exported: queue_full (collector slow or down) or export_failed."
    );
    describe_counter!(TRACE_SPANS_EXPORTED, "Spans the collector accepted.");
    describe_counter!(SNAPSHOT_REJECTIONS, "Snapshots rejected as invalid.");
    describe_gauge!(INBOUND_QUEUE_DEPTH, "Requests waiting for an inbound slot.");
    describe_gauge!(
        crate::inbound::concurrency::INBOUND_CONCURRENCY_LIMIT,
        "Requests the local app may handle at once: the agent's budget share, else inbound.max_concurrency."
    );
    describe_gauge!(RESOURCE_USAGE, Unit::Bytes, "Resident memory of the proxy.");
    describe_gauge!(UPSTREAM_READY, "1 when the local app answers TCP connects.");
    describe_counter!(
        LOG_LINES_DROPPED,
        "Log lines dropped because the writer thread fell behind."
    );
    describe_gauge!(
        BREAKER_STATE,
        "Circuit breaker state by target and endpoint (empty for the target's own): 0 closed, 1 open, 2 half-open."
    );
    describe_counter!(
        BREAKER_TRANSITIONS,
        "Circuit breaker transitions, by the state entered."
    );
    describe_counter!(
        BREAKER_SHORT_CIRCUITS,
        "Requests answered by a fallback while a breaker was open."
    );
    describe_counter!(RETRIES_TOTAL, "Retry attempts sent.");
    describe_counter!(
        RETRY_BUDGET_EXHAUSTED,
        "Retries not sent because the target's budget was spent."
    );
    describe_counter!(EJECTIONS_TOTAL, "Endpoints ejected from balancing.");
    describe_gauge!(
        OLLAMA_QUEUE_DEPTH,
        "Requests waiting for an Ollama slot, by phase."
    );
    describe_histogram!(
        OLLAMA_QUEUE_WAIT,
        Unit::Seconds,
        "Time from queued to admitted to Ollama, by phase."
    );
    describe_counter!(OLLAMA_ADMITTED, "Requests sent to Ollama, by phase.");
    describe_counter!(
        OLLAMA_REJECTED,
        "Requests the gateway refused, by phase and reason (queue_full, over_quota, queue_timeout, ollama_unavailable)."
    );
    describe_counter!(
        OLLAMA_CANCELLED,
        "Requests whose caller left, by phase and reason (queued, served)."
    );
    describe_gauge!(OLLAMA_SLOTS, "Requests Ollama may serve at once.");
    describe_gauge!(OLLAMA_SLOTS_BUSY, "Ollama slots in use.");
    describe_counter!(
        OLLAMA_SLOT_BUSY,
        Unit::Microseconds,
        "Slot time in use; utilisation = rate(this) / 1e6 / agent_ollama_slots."
    );
    describe_gauge!(
        OLLAMA_BREAKER_OPEN,
        "1 while the gateway refuses because Ollama is down."
    );
    describe_counter!(
        OLLAMA_RATE_LIMITED,
        "Calls to Ollama refused at the caller's sidecar by its rate limit."
    );
    describe_gauge!(
        IDENTITY_EXPIRY,
        Unit::Seconds,
        "Unix time the sidecar's certificate in force expires."
    );
    describe_counter!(
        TLS_HANDSHAKES,
        "Mutual-TLS handshakes begun, by side (server: inbound, client: to peers)."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "Inbound TLS connections refused, by reason (no_certificate, unknown_ca, expired, bad_certificate, not_a_mesh_agent, other)."
    );
    describe_counter!(
        AUTHZ_DENIED,
        "Inbound calls refused by the authorization policy, by target and caller ((unknown) for a name the snapshot does not know)."
    );
    describe_counter!(
        INBOUND_PLAINTEXT,
        "Inbound requests without mutual TLS while the mesh is permissive or strict, by result (accepted, refused)."
    );
    describe_counter!(
        IDENTITY_RENEWALS,
        "Certificate requests to the mesh CA, by result (ok, error)."
    );
}

/// Counters for one (direction, target) pair. Label sets are registered on first use, so a
/// target exports only the statuses it has seen; later uses are one atomic add.
#[derive(Debug)]
pub struct TargetMetrics {
    pub target: Arc<str>,
    labels: Vec<Label>,
    status: [OnceLock<(Counter, Histogram)>; COMMON_STATUS.len()],
    errors: [OnceLock<Counter>; ERROR_KINDS.len()],
    inflight: Gauge,
}

impl TargetMetrics {
    /// `target` empty means no route was found: it is exported as [`NO_ROUTE_TARGET`].
    pub fn new(direction: &'static str, agent: &str, phase: &str, target: &str) -> Arc<Self> {
        let target = if target.is_empty() {
            NO_ROUTE_TARGET
        } else {
            target
        };
        let labels = vec![
            Label::new("direction", direction),
            Label::new("agent", agent.to_owned()),
            Label::new("target", target.to_owned()),
            Label::new("phase", phase.to_owned()),
        ];
        Arc::new(Self {
            target: target.into(),
            inflight: metrics::gauge!(INFLIGHT, labels.clone()),
            labels,
            status: Default::default(),
            errors: Default::default(),
        })
    }

    fn with(&self, key: &'static str, value: impl Into<metrics::SharedString>) -> Vec<Label> {
        let mut l = self.labels.clone();
        l.push(Label::new(key, value));
        l
    }

    pub fn response(&self, status: u16, seconds: f64) {
        match COMMON_STATUS.iter().position(|&c| c == status) {
            Some(i) => {
                let (count, duration) = self.status[i].get_or_init(|| {
                    let labels = self.with("status", status_str(status));
                    (
                        metrics::counter!(REQUESTS_TOTAL, labels.clone()),
                        metrics::histogram!(REQUEST_DURATION, labels),
                    )
                });
                count.increment(1);
                duration.record(seconds);
            }
            None => {
                let labels = self.with("status", status.to_string());
                metrics::counter!(REQUESTS_TOTAL, labels.clone()).increment(1);
                metrics::histogram!(REQUEST_DURATION, labels).record(seconds);
            }
        }
    }

    pub fn error(&self, kind: &'static str) {
        debug_assert!(
            ERROR_KINDS.contains(&kind),
            "error kind {kind} is not counted"
        );
        if let Some(i) = ERROR_KINDS.iter().position(|&k| k == kind) {
            self.errors[i]
                .get_or_init(|| metrics::counter!(ERRORS_TOTAL, self.with("kind", kind)))
                .increment(1);
        }
    }

    pub fn inflight(&self) -> &Gauge {
        &self.inflight
    }

    /// Registers the series a no-route answer would land in, at zero, so a sidecar exports the
    /// request, duration and error metrics (Rule 27) before its first failure.
    pub fn prime_no_route(&self) {
        let Some(i) = COMMON_STATUS.iter().position(|&c| c == 503) else {
            return;
        };
        self.status[i].get_or_init(|| {
            let labels = self.with("status", status_str(503));
            (
                metrics::counter!(REQUESTS_TOTAL, labels.clone()),
                metrics::histogram!(REQUEST_DURATION, labels),
            )
        });
        if let Some(i) = ERROR_KINDS.iter().position(|&k| k == "no_route") {
            self.errors[i]
                .get_or_init(|| metrics::counter!(ERRORS_TOTAL, self.with("kind", "no_route")));
        }
    }
}

fn status_str(code: u16) -> &'static str {
    match code {
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        206 => "206",
        301 => "301",
        302 => "302",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        409 => "409",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => "other",
    }
}

pub fn protocol_error(kind: &'static str) {
    debug_assert!(
        PROTOCOL_ERROR_KINDS.contains(&kind),
        "protocol error kind {kind} is not exported at 0"
    );
    metrics::counter!(PROTOCOL_ERRORS, "kind" => kind).increment(1);
}

/// Publishes how many log lines the writer thread had to drop.
pub fn record_log_drops() {
    if let Some(dropped) = crate::log::dropped_lines() {
        metrics::counter!(LOG_LINES_DROPPED).absolute(dropped);
    }
}

/// Resident set size from /proc, for `agent_resource_usage_bytes`.
pub fn record_rss() {
    if let Some(rss) = read_rss_bytes() {
        metrics::gauge!(RESOURCE_USAGE, "resource" => "rss").set(rss as f64);
    }
}

fn read_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
