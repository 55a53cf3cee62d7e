//! `mesh-control compliance`: checks a running mesh against the platform rules (17, 27, 30)
//! from the outside. It reads the control process's `/status`, then asks every sidecar listed
//! there for its admin `/health` and `/metrics`, and reports one row per check. Any failed
//! check makes the run fail; warnings (an oversubscription that is reported, a stale catalog)
//! do not.

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

/// Rule 27 metrics every sidecar exports.
pub const SIDECAR_METRICS: [&str; 5] = [
    "agent_requests_total",
    "agent_request_duration_seconds",
    "agent_errors_total",
    "agent_resource_usage_bytes",
    "agent_circuit_breaker_state",
];
/// Rule 27 metrics the Ollama gateway exports besides those.
pub const GATEWAY_METRICS: [&str; 1] = ["agent_ollama_queue_depth"];

/// Largest `/status`, `/health` or `/metrics` body read.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// The result of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// Not a violation, but worth an operator's look.
    Warn,
    /// Cannot be observed from here.
    Skip,
    Fail,
}

/// One row of the report.
#[derive(Clone, Debug)]
pub struct Check {
    pub check: &'static str,
    pub target: String,
    pub outcome: Outcome,
    pub detail: String,
}

/// Every check made, in order.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

/// Why one HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0:?} is not an http:// or https:// URL with a host")]
    Url(String),
    #[error("{uri}: {reason}")]
    Transport { uri: String, reason: String },
    #[error("{uri}: no answer within {after:?}")]
    Timeout { uri: String, after: Duration },
}

struct Reply {
    status: StatusCode,
    content_type: String,
    body: Bytes,
}

/// How the tool reaches the control process's `/status`.
#[derive(Clone, Debug, Default)]
pub struct ControlAccess {
    /// The mesh CA certificate, for an `https://` status URL (identity on).
    pub ca_file: Option<std::path::PathBuf>,
    /// The operator token; never sent to the sidecars.
    pub token: Option<String>,
}

/// Runs every check against the control process at `status_url` (`http://host:port` or its
/// `/status`), waiting at most `timeout` for each answer; the operator token from
/// `MESH_CONTROL_TOKEN`.
pub async fn run(status_url: &str, timeout: Duration) -> Report {
    let access = ControlAccess {
        ca_file: None,
        token: std::env::var("MESH_CONTROL_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    run_with(status_url, timeout, &access).await
}

/// [`run`] with the CA file and operator token given: an `https://` status URL is verified
/// against the CA.
pub async fn run_with(status_url: &str, timeout: Duration, access: &ControlAccess) -> Report {
    let mut report = Report::default();
    let tls = match &access.ca_file {
        Some(path) => match crate::status_tls::StatusTls::from_ca_file(path) {
            Ok(t) => Some(t),
            Err(e) => {
                report.fail("control status", status_url, format!("--ca-file: {e}"));
                return report;
            }
        },
        None => None,
    };
    let http = Http::new(timeout, tls);
    let url = status_url.trim_end_matches('/');
    let url = if url.ends_with("/status") {
        url.to_owned()
    } else {
        format!("{url}/status")
    };
    // The operator token, when the control process guards `/status` with one; never sent to
    // the sidecars.
    let status = match http.fetch(&url, access.token.as_deref()).await {
        Ok(r) if r.status == StatusCode::OK => match serde_json::from_slice::<Value>(&r.body) {
            Ok(v) => v,
            Err(e) => {
                report.fail("control status", &url, format!("not JSON: {e}"));
                return report;
            }
        },
        Ok(r) => {
            report.fail("control status", &url, format!("status {}", r.status));
            return report;
        }
        Err(e) => {
            report.fail("control status", &url, e.to_string());
            return report;
        }
    };
    report.pass("control status", &url, "answered with JSON");
    control_checks(&status, &mut report);

    let latest = status["snapshot_version"].as_u64().unwrap_or(0);
    let sidecars = status["sidecars"].as_array().cloned().unwrap_or_default();
    if sidecars.is_empty() {
        report.fail(
            "sidecars",
            "control",
            "no sidecar has polled the control process",
        );
    }
    for s in &sidecars {
        sidecar_checks(&http, s, latest, &mut report).await;
    }
    report.push(
        "structured logs",
        "all",
        Outcome::Skip,
        "stdout is not observable over HTTP; `docker compose logs` lines must be JSON",
    );
    report
}

/// The catalog source, the policy files and the budgets, as `/status` reports them.
fn control_checks(status: &Value, report: &mut Report) {
    let catalog = &status["catalog"];
    if catalog["stale"].as_bool().unwrap_or(false) {
        let err = catalog["last_error"].as_str().unwrap_or("source failing");
        report.warn("catalog", "control", format!("stale: {err}"));
    } else {
        let source = catalog["source"].as_str().unwrap_or("?");
        report.pass("catalog", "control", format!("fresh from {source}"));
    }
    match status["policy"]["rejected"].as_object() {
        Some(r) => report.warn(
            "policy",
            "control",
            format!(
                "an edit is rejected; the previous policy is in force: {}:{}: {}",
                r.get("file").and_then(Value::as_str).unwrap_or("?"),
                r.get("line").and_then(Value::as_u64).unwrap_or(0),
                r.get("reason").and_then(Value::as_str).unwrap_or("?"),
            ),
        ),
        None => report.pass("policy", "control", "in force, no rejected edit"),
    }
    let budget = &status["budget"];
    if budget.is_null() {
        report.skip("phase budgets", "control", "the policy models no phases");
    } else if budget["oversubscribed"].as_bool() == Some(false) {
        report.pass("phase budgets", "control", "phases fit the host");
    } else if let (Some(cpu), Some(mem)) = (
        budget["cpu_scale"].as_f64(),
        budget["memory_scale"].as_f64(),
    ) {
        report.warn(
            "phase budgets",
            "control",
            format!(
                "oversubscribed and reported: phases scaled to cpu x{cpu:.2}, memory x{mem:.2}"
            ),
        );
    } else {
        report.fail(
            "phase budgets",
            "control",
            "oversubscription not reported with its scale",
        );
    }
}

async fn sidecar_checks(http: &Http, s: &Value, latest: u64, report: &mut Report) {
    let agent = s["agent"].as_str().unwrap_or("?").to_owned();
    let version = s["version"].as_u64().unwrap_or(0);
    match s["ack"].as_str() {
        Some("applied") if version == latest => {
            report.pass("snapshot version", &agent, format!("on {latest}"))
        }
        Some("rejected") => report.fail(
            "snapshot version",
            &agent,
            format!(
                "rejected {latest}: {}",
                s["reason"].as_str().unwrap_or("no reason given")
            ),
        ),
        _ => report.fail(
            "snapshot version",
            &agent,
            format!("on {version}, latest is {latest}"),
        ),
    }
    let Some(admin) = s["admin"].as_str() else {
        report.fail("health", &agent, "admin address not reported to control");
        return;
    };
    let target = format!("{agent} ({admin})");
    match http.get(&format!("http://{admin}/health")).await {
        Err(e) => report.fail("health", &target, e.to_string()),
        Ok(r) => {
            let json = r.content_type.starts_with("application/json")
                && serde_json::from_slice::<Value>(&r.body).is_ok();
            match (r.status.is_success(), json) {
                (true, true) => report.pass("health", &target, "200, JSON"),
                (_, false) => report.fail("health", &target, "the answer is not JSON"),
                (false, true) => report.fail(
                    "health",
                    &target,
                    format!("{}: {}", r.status, String::from_utf8_lossy(&r.body)),
                ),
            }
        }
    }
    let mut required: Vec<&str> = SIDECAR_METRICS.to_vec();
    if s["mode"].as_str() == Some("ollama") {
        required.extend(GATEWAY_METRICS);
    }
    match http.get(&format!("http://{admin}/metrics")).await {
        Err(e) => report.fail("metrics", &target, e.to_string()),
        Ok(r) if !r.status.is_success() => {
            report.fail("metrics", &target, format!("status {}", r.status))
        }
        Ok(r) => {
            let names = exported(&String::from_utf8_lossy(&r.body));
            let missing: Vec<&str> = required
                .iter()
                .copied()
                .filter(|n| !names.contains(*n))
                .collect();
            if missing.is_empty() {
                report.pass("metrics", &target, format!("{} required", required.len()));
            } else {
                report.fail(
                    "metrics",
                    &target,
                    format!("missing {}", missing.join(", ")),
                );
            }
        }
    }
}

/// Metric family names in a Prometheus exposition, histogram and summary suffixes removed.
pub fn exported(text: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    for line in text.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            continue;
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(family.to_owned());
        names.insert(name.to_owned());
    }
    names
}

// === impl Report ===

impl Report {
    fn push(&mut self, check: &'static str, target: &str, outcome: Outcome, detail: &str) {
        self.checks.push(Check {
            check,
            target: target.to_owned(),
            outcome,
            detail: detail.to_owned(),
        });
    }

    fn pass(&mut self, check: &'static str, target: &str, detail: impl AsRef<str>) {
        self.push(check, target, Outcome::Pass, detail.as_ref());
    }

    fn warn(&mut self, check: &'static str, target: &str, detail: impl AsRef<str>) {
        self.push(check, target, Outcome::Warn, detail.as_ref());
    }

    fn skip(&mut self, check: &'static str, target: &str, detail: impl AsRef<str>) {
        self.push(check, target, Outcome::Skip, detail.as_ref());
    }

    fn fail(&mut self, check: &'static str, target: &str, detail: impl AsRef<str>) {
        self.push(check, target, Outcome::Fail, detail.as_ref());
    }

    /// No check failed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.outcome != Outcome::Fail)
    }

    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.outcome == Outcome::Fail)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Outcome::Pass => "PASS",
            Outcome::Warn => "WARN",
            Outcome::Skip => "SKIP",
            Outcome::Fail => "FAIL",
        })
    }
}

/// A table: check, target, result, detail; then a summary line.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w_check = self.checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
        let w_target = self
            .checks
            .iter()
            .map(|c| c.target.len())
            .max()
            .unwrap_or(0);
        let (w_check, w_target) = (w_check.max(5), w_target.max(6));
        writeln!(
            f,
            "{:w_check$}  {:w_target$}  RESULT  DETAIL",
            "CHECK", "TARGET"
        )?;
        for c in &self.checks {
            writeln!(
                f,
                "{:w_check$}  {:w_target$}  {:6}  {}",
                c.check, c.target, c.outcome, c.detail
            )?;
        }
        let count = |o| self.checks.iter().filter(|c| c.outcome == o).count();
        write!(
            f,
            "{} checks: {} passed, {} warnings, {} skipped, {} failed",
            self.checks.len(),
            count(Outcome::Pass),
            count(Outcome::Warn),
            count(Outcome::Skip),
            count(Outcome::Fail)
        )
    }
}

// === impl Http ===

struct Http {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// For an `https://` control URL.
    tls: Option<crate::status_tls::StatusTls>,
    timeout: Duration,
}

impl Http {
    fn new(timeout: Duration, tls: Option<crate::status_tls::StatusTls>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            tls,
            timeout,
        }
    }

    async fn get(&self, url: &str) -> Result<Reply, FetchError> {
        self.fetch(url, None).await
    }

    async fn fetch(&self, url: &str, bearer: Option<&str>) -> Result<Reply, FetchError> {
        let uri: Uri = url.parse().map_err(|_| FetchError::Url(url.to_owned()))?;
        if uri.host().is_none() {
            return Err(FetchError::Url(url.to_owned()));
        }
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return self.fetch_tls(url, &uri, bearer).await,
            _ => return Err(FetchError::Url(url.to_owned())),
        }
        let mut req = Request::get(uri);
        if let Some(t) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::new())
            .map_err(|_| FetchError::Url(url.to_owned()))?;
        let transport = |e: &dyn fmt::Display| FetchError::Transport {
            uri: url.to_owned(),
            reason: e.to_string(),
        };
        let exchange = async {
            let rsp = self.client.request(req).await.map_err(|e| transport(&e))?;
            let status = rsp.status();
            let content_type = rsp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = Limited::new(rsp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| transport(&e))?
                .to_bytes();
            Ok(Reply {
                status,
                content_type,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(FetchError::Timeout {
                    uri: url.to_owned(),
                    after: self.timeout,
                })
            })
    }
}

// === impl Http (https) ===

impl Http {
    async fn fetch_tls(
        &self,
        url: &str,
        uri: &Uri,
        bearer: Option<&str>,
    ) -> Result<Reply, FetchError> {
        let Some(tls) = &self.tls else {
            return Err(FetchError::Transport {
                uri: url.to_owned(),
                reason: "an https:// URL needs --ca-file (the mesh CA certificate)".into(),
            });
        };
        match tokio::time::timeout(self.timeout, tls.get(uri, bearer, MAX_BODY)).await {
            Ok(Ok((status, content_type, body))) => Ok(Reply {
                status,
                content_type,
                body,
            }),
            Ok(Err(reason)) => Err(FetchError::Transport {
                uri: url.to_owned(),
                reason,
            }),
            Err(_) => Err(FetchError::Timeout {
                uri: url.to_owned(),
                after: self.timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_include_histogram_families() {
        let text = "# HELP agent_requests_total Requests.\n\
                    # TYPE agent_requests_total counter\n\
                    agent_requests_total{status=\"200\"} 3\n\
                    agent_request_duration_seconds_bucket{le=\"0.1\"} 1\n\
                    agent_request_duration_seconds_sum 0.2\n\
                    agent_resource_usage_bytes 1024\n";
        let names = exported(text);
        for n in [
            "agent_requests_total",
            "agent_request_duration_seconds",
            "agent_resource_usage_bytes",
        ] {
            assert!(names.contains(n), "{n}");
        }
        assert!(!names.contains("agent_errors_total"));
        assert!(!names.contains("HELP"));
    }

    #[test]
    fn an_unreported_oversubscription_fails_and_a_reported_one_warns() {
        let mut report = Report::default();
        let status = serde_json::json!({
            "catalog": {"source": "file", "stale": false},
            "policy": {"rejected": null},
            "budget": {"oversubscribed": true, "cpu_scale": 0.67, "memory_scale": 1.0},
        });
        control_checks(&status, &mut report);
        assert!(report.passed(), "{report}");
        assert_eq!(report.checks[2].outcome, Outcome::Warn);
        let mut report = Report::default();
        let status = serde_json::json!({"budget": {"oversubscribed": true}});
        control_checks(&status, &mut report);
        assert!(!report.passed(), "{report}");
    }
}
