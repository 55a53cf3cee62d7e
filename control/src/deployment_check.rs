//! `mesh-control compliance --deployment`: the Rule 30 checks over the rendered deployment,
//! offline (no engine, no network). It reads `docker-compose.yml` (anchors and merge keys
//! resolved as compose does) and the generated files, and reports each container that breaks
//! a rule by name: resource limits, ports inside the phase ranges, Rule 26 hardening,
//! healthchecks that need no shell, no fixed addresses, the logging driver, restart policies.
//! Each of Rule 30's named checks is then pass, fail or not applicable with its evidence.

use crate::compliance::{Check, Outcome, Report};
use mesh_config::registry::port_range;
use mesh_config::Phase;
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

const MAX_MERGE_DEPTH: usize = 8;
/// Offenders named per check; the rest are counted.
const MAX_NAMED: usize = 5;

/// Host ports a deployment may publish (Rule 26's network policy).
pub const PUBLISHED: std::ops::RangeInclusive<u16> = 10000..=10599;

/// Checks the deployment under `root`: its `docker-compose.yml` and `deploy/generated/`.
pub fn check_dir(root: &Path) -> Report {
    let compose = root.join(crate::render::COMPOSE_FILE);
    let text = match std::fs::read_to_string(&compose) {
        Ok(t) => t,
        Err(e) => {
            return single_failure(
                "compose_file",
                &compose.display().to_string(),
                e.to_string(),
            )
        }
    };
    let mut extra = Vec::new();
    let generated = root.join(crate::render::OUT_DIR);
    collect_texts(&generated, &mut extra);
    check(&text, &extra)
}

/// Checks compose text and the texts of the other generated files (for fixed addresses).
pub fn check(compose: &str, others: &[(String, String)]) -> Report {
    let mut doc: Value = match serde_yaml::from_str(compose) {
        Ok(v) => v,
        Err(e) => return single_failure("compose_file", "docker-compose.yml", e.to_string()),
    };
    // A merged mapping may itself carry `<<` (an anchor built on another): merge until none
    // is left, as YAML's merge keys mean.
    for _ in 0..MAX_MERGE_DEPTH {
        if let Err(e) = doc.apply_merge() {
            return single_failure("compose_file", "docker-compose.yml", e.to_string());
        }
    }
    let Some(services) = doc.get("services").and_then(Value::as_mapping) else {
        return single_failure("compose_file", "docker-compose.yml", "no services".into());
    };
    let services: BTreeMap<String, &Value> = services
        .iter()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v)))
        .collect();

    let mut rows: Vec<(&'static str, Vec<String>, String)> = Vec::new();
    let n = services.len();
    let mut per =
        |name: &'static str, evidence: String, f: &dyn Fn(&str, &Value) -> Option<String>| {
            let bad: Vec<String> = services
                .iter()
                .filter_map(|(s, v)| f(s, v).map(|why| format!("{s}: {why}")))
                .collect();
            rows.push((name, bad, evidence));
        };
    per(
        "memory_limit",
        format!("{n} containers have a memory limit"),
        &|_, v| {
            limit(v, "memory")
                .is_none()
                .then(|| "no memory limit".into())
        },
    );
    per(
        "cpu_limit",
        format!("{n} containers have a CPU limit"),
        &|_, v| limit(v, "cpus").is_none().then(|| "no CPU limit".into()),
    );
    per(
        "ports_in_range",
        "published ports within 10000-10599, agents' within their phase's range".into(),
        &|_, v| {
            let phase = label(v, "mesh.phase").and_then(phase_of);
            let agent = label(v, "mesh.role") == Some("agent");
            for port in published(v) {
                let Some(port) = port else {
                    return Some("a published port that is not a number".into());
                };
                if !PUBLISHED.contains(&port) {
                    return Some(format!("publishes {port}, outside 10000-10599"));
                }
                if let (true, Some(phase)) = (agent, phase) {
                    let range = port_range(phase);
                    if !range.contains(&port) {
                        return Some(format!(
                            "port {port} is outside the {phase} range {}-{}",
                            range.start(),
                            range.end()
                        ));
                    }
                }
            }
            None
        },
    );
    per(
        "non_root_user",
        format!("{n} containers run as a non-root user"),
        &|_, v| match v.get("user").and_then(scalar) {
            None => Some("no user: runs as the image's, root by default".into()),
            Some(u)
                if u == "root" || u.split(':').next() == Some("0") || u.starts_with("root:") =>
            {
                Some(format!("runs as {u}"))
            }
            Some(_) => None,
        },
    );
    per(
        "read_only_rootfs",
        format!("{n} containers have a read-only root filesystem"),
        &|_, v| {
            (v.get("read_only").and_then(Value::as_bool) != Some(true))
                .then(|| "root filesystem is writable (read_only not true)".into())
        },
    );
    per(
        "cap_drop_all",
        format!("{n} containers drop all capabilities"),
        &|_, v| {
            let all = seq(v.get("cap_drop")).iter().any(|c| c == "ALL");
            (!all).then(|| "capabilities not dropped (cap_drop: [ALL])".into())
        },
    );
    per(
        "no_new_privileges",
        format!("{n} containers set no-new-privileges"),
        &|_, v| {
            let set = seq(v.get("security_opt"))
                .iter()
                .any(|o| o == "no-new-privileges:true" || o == "no-new-privileges");
            (!set).then(|| "no-new-privileges not set".into())
        },
    );
    per(
        "healthcheck_defined",
        format!("{n} containers have an exec-form healthcheck"),
        &|_, v| {
            let Some(hc) = v.get("healthcheck") else {
                return Some("no healthcheck".into());
            };
            if hc.get("disable").and_then(Value::as_bool) == Some(true) {
                return Some("healthcheck disabled".into());
            }
            let test = seq(hc.get("test"));
            match test.first().map(String::as_str) {
                Some("CMD") if test.len() > 1 => None,
                Some("CMD-SHELL") => Some("healthcheck needs a shell (CMD-SHELL)".into()),
                _ => Some("no healthcheck test".into()),
            }
        },
    );
    per(
        "logging_driver",
        format!("{n} containers log through the json-file driver"),
        &|_, v| {
            let driver = v
                .get("logging")
                .and_then(|l| l.get("driver"))
                .and_then(scalar);
            match driver.as_deref() {
                Some("json-file") => None,
                Some(d) => Some(format!("logging driver {d}, not json-file")),
                None => Some("no logging driver".into()),
            }
        },
    );
    per(
        "restart_policy",
        "agents restart as their phase asks (Rule 20)".into(),
        &|_, v| {
            let phase = label(v, "mesh.phase").and_then(phase_of)?;
            let want = crate::render::restart_policy(phase);
            let got = v.get("restart").and_then(scalar);
            (got.as_deref() != Some(want)).then(|| {
                format!(
                    "restart {:?}, the {phase} phase asks for {want}",
                    got.unwrap_or_default()
                )
            })
        },
    );
    per(
        "sidecar_in_agent_namespace",
        "every sidecar shares its agent's network namespace".into(),
        &|s, v| {
            let agent = s.strip_suffix("-sidecar")?;
            let mode = v.get("network_mode").and_then(scalar);
            (mode.as_deref() != Some(&format!("service:{agent}"))).then(|| {
                format!(
                    "network_mode {:?}, not service:{agent}",
                    mode.unwrap_or_default()
                )
            })
        },
    );
    per(
        "secrets_least_privilege",
        "each sidecar mounts the mesh CA and its own agent's token only; the CA key, tokens \
         file and operator token only mesh-control"
            .into(),
        &|s, v| {
            let mounted = secret_sources(v);
            let own = s
                .strip_suffix("-sidecar")
                .or((s == "ollama-gateway").then_some("ollama"));
            for secret in &mounted {
                let allowed = match secret.strip_prefix("token-") {
                    Some(agent) => own == Some(agent),
                    None => match secret.as_str() {
                        "mesh-ca" => true,
                        _ => s == "mesh-control",
                    },
                };
                if !allowed {
                    return Some(format!("mounts {secret}, not its own"));
                }
            }
            let sidecar = label(v, "mesh.role") == Some("sidecar");
            let needs = own.map(|a| format!("token-{a}"));
            match needs {
                Some(token) if sidecar && !mounted.contains(&token) => {
                    Some(format!("no {token}: its sidecar cannot prove who it is"))
                }
                _ if sidecar && !mounted.iter().any(|m| m == "mesh-ca") => {
                    Some("no mesh-ca: it cannot verify mesh-control".into())
                }
                _ => None,
            }
        },
    );
    // Each agent is registered once, by its sidecar, with its rendered definition.
    let mut consul = Vec::new();
    for (s, v) in &services {
        let mounts = seq(v.get("volumes"));
        let mounted = mounts.iter().any(|m| m.contains("generated/consul"));
        if mounted && !s.ends_with("-sidecar") && s != "ollama-gateway" {
            consul.push(format!(
                "{s}: mounts Consul definitions (the sidecars register them: twice)"
            ));
        }
        if label(v, "mesh.role") != Some("agent") {
            continue;
        }
        if let Some(why) = consul_definition(s, v, others) {
            consul.push(format!("{s}: {why}"));
        }
        let sidecar = services.get(&format!("{s}-sidecar"));
        let want = format!("generated/consul/{s}.json:");
        if !sidecar.is_some_and(|v| seq(v.get("volumes")).iter().any(|m| m.contains(&want))) {
            consul.push(format!("{s}: its sidecar does not mount {want}"));
        }
    }
    rows.push((
        "consul_registration",
        consul,
        "every agent's sidecar registers its rendered definition (its port and phase)".into(),
    ));
    // Fixed addresses anywhere: compose values and the generated files.
    let mut fixed = Vec::new();
    for (s, v) in &services {
        let mut found = Vec::new();
        addresses(v, &mut found);
        if v.get("networks").is_some_and(|n| {
            n.to_owned()
                .as_mapping()
                .is_some_and(|m| m.values().any(|x| x.get("ipv4_address").is_some()))
        }) {
            found.push("ipv4_address".into());
        }
        if !found.is_empty() {
            fixed.push(format!("{s}: {}", found.join(", ")));
        }
    }
    for (file, text) in others {
        let found = ip_literals(text);
        if !found.is_empty() {
            fixed.push(format!("{file}: {}", found.join(", ")));
        }
    }
    rows.push((
        "no_hardcoded_addresses",
        fixed,
        "peers by name and Consul; only loopback and 0.0.0.0 appear".into(),
    ));

    let mut report = Report::default();
    let mut outcome: BTreeMap<&str, bool> = BTreeMap::new();
    for (name, bad, evidence) in &rows {
        outcome.insert(name, bad.is_empty());
        report.checks.push(if bad.is_empty() {
            row(name, "deployment", Outcome::Pass, evidence.clone())
        } else {
            let mut detail = bad[..bad.len().min(MAX_NAMED)].join("; ");
            if bad.len() > MAX_NAMED {
                detail.push_str(&format!("; and {} more", bad.len() - MAX_NAMED));
            }
            row(name, "deployment", Outcome::Fail, detail)
        });
    }
    let all = |names: &[&str]| names.iter().all(|n| outcome[n]);
    let rule30 = |check: &'static str, ok: bool, evidence: &str, failing: &[&str]| {
        if ok {
            row(check, "rule 30", Outcome::Pass, evidence.into())
        } else {
            let which: Vec<&str> = failing.iter().copied().filter(|n| !outcome[n]).collect();
            row(
                check,
                "rule 30",
                Outcome::Fail,
                format!("failing: {}", which.join(", ")),
            )
        }
    };
    let limits = ["memory_limit", "cpu_limit"];
    report.checks.push(rule30(
        "resource_limits_enforced",
        all(&limits),
        "CPU and memory limits on every container",
        &limits,
    ));
    let health = ["healthcheck_defined"];
    report.checks.push(rule30(
        "health_endpoints_responding",
        all(&health),
        "every container declares a healthcheck (responding: check live with --status-url)",
        &health,
    ));
    let metrics_ok = metrics_targets(&services, others);
    report.checks.push(match metrics_ok {
        None => row(
            "metrics_exported",
            "rule 30",
            Outcome::Pass,
            "every sidecar is a Prometheus target (admin :15090)".into(),
        ),
        Some(why) => row("metrics_exported", "rule 30", Outcome::Fail, why),
    });
    let logging = ["logging_driver"];
    report.checks.push(rule30(
        "logging_structured",
        all(&logging),
        "json-file driver with rotation on every container",
        &logging,
    ));
    report.checks.push(row(
        "security_headers_present",
        "rule 30",
        Outcome::Skip,
        "not applicable offline: response headers are observed live (--status-url)".into(),
    ));
    let network = [
        "ports_in_range",
        "no_hardcoded_addresses",
        "sidecar_in_agent_namespace",
        "consul_registration",
        "secrets_least_privilege",
    ];
    report.checks.push(rule30("network_policies_applied", all(&network), "published ports in 10000-10599, names instead of addresses, sidecars in their agents' namespaces, registered in Consul by their sidecars, each sidecar with only its own identity secrets", &network));
    let hardening = [
        "non_root_user",
        "read_only_rootfs",
        "cap_drop_all",
        "no_new_privileges",
    ];
    report.checks.push(rule30(
        "container_hardening",
        all(&hardening),
        "Rule 26 on every container",
        &hardening,
    ));
    report
}

/// Every agent in compose (label `mesh.role: agent`) has a target in the generated list.
fn metrics_targets(
    services: &BTreeMap<String, &Value>,
    others: &[(String, String)],
) -> Option<String> {
    let Some(targets) = others
        .iter()
        .find(|(f, _)| f.ends_with("sidecars.json"))
        .map(|(_, t)| t.as_str())
    else {
        return Some("no generated Prometheus targets (prometheus/sidecars.json)".into());
    };
    let missing: Vec<&str> = services
        .iter()
        .filter(|(_, v)| label(v, "mesh.role") == Some("agent"))
        .map(|(s, _)| s.as_str())
        .filter(|s| !targets.contains(&format!("\"{s}:15090\"")))
        .collect();
    (!missing.is_empty()).then(|| format!("no Prometheus target for {}", missing.join(", ")))
}

/// Why agent `s`'s Consul definition (`consul/<s>.json` among the generated files) does not
/// register it on its published port in its phase, if it does not.
fn consul_definition(s: &str, v: &Value, others: &[(String, String)]) -> Option<String> {
    let file = format!("consul/{s}.json");
    let Some((_, text)) = others.iter().find(|(f, _)| f.ends_with(&file)) else {
        return Some(format!("no Consul definition ({file})"));
    };
    let def = match mesh_config::consul_service::Definition::from_json(text) {
        Ok(d) => d.service,
        Err(e) => return Some(format!("{file}: {e}")),
    };
    if def.id != s || def.name != s {
        return Some(format!("{file} registers {:?} (id {:?})", def.name, def.id));
    }
    // Peers reach the agent on its container port (the sidecar's inbound listener).
    let ports = seq(v.get("ports"));
    let container = |p: &String| {
        p.rsplit(':')
            .next()
            .and_then(|c| c.split('/').next()?.parse().ok())
    };
    if !ports.iter().any(|p| container(p) == Some(def.port)) {
        return Some(format!(
            "{file} registers port {}, which the agent does not expose",
            def.port
        ));
    }
    let phase = label(v, "mesh.phase").unwrap_or_default();
    if !def.tags.iter().any(|t| *t == format!("phase={phase}")) {
        return Some(format!("{file} lacks the tag phase={phase}"));
    }
    None
}

fn row(check: &'static str, target: &str, outcome: Outcome, detail: String) -> Check {
    Check {
        check,
        target: target.into(),
        outcome,
        detail,
    }
}

fn single_failure(check: &'static str, target: &str, detail: String) -> Report {
    Report {
        checks: vec![row(check, target, Outcome::Fail, detail)],
    }
}

fn collect_texts(dir: &Path, out: &mut Vec<(String, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            collect_texts(&path, out);
        } else if let Ok(text) = std::fs::read_to_string(&path) {
            out.push((path.display().to_string(), text));
        }
    }
}

/// The secrets a service mounts: short (`- name`) and long (`- source: name`) forms.
fn secret_sources(v: &Value) -> Vec<String> {
    let Some(list) = v.get("secrets").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| scalar(e).or_else(|| e.get("source").and_then(scalar)))
        .collect()
}

fn limit<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get("deploy")?.get("resources")?.get("limits")?.get(key)
}

fn label<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get("labels")?.get(key)?.as_str()
}

fn phase_of(s: &str) -> Option<Phase> {
    Phase::ALL.into_iter().find(|p| p.as_str() == s)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn seq(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Sequence(items)) => items.iter().filter_map(scalar).collect(),
        Some(v) => scalar(v).into_iter().collect(),
        None => Vec::new(),
    }
}

/// Host ports a service publishes (`[IP:]HOST:CONTAINER` or `HOST:CONTAINER`); `None` for one
/// that is not a plain number (a range or a variable).
fn published(v: &Value) -> Vec<Option<u16>> {
    seq(v.get("ports"))
        .iter()
        .map(|p| {
            // `${HOST_BIND:-127.0.0.1}:10300:10300`: the host port is the second from the end.
            let parts: Vec<&str> = p.rsplitn(3, ':').collect();
            let host = if parts.len() >= 2 { parts[1] } else { parts[0] };
            host.split('/').next().unwrap_or(host).parse().ok()
        })
        .collect()
}

/// IPv4 literals in every string of a value, other than loopback and the unspecified address.
fn addresses(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.extend(ip_literals(s)),
        Value::Sequence(items) => items.iter().for_each(|i| addresses(i, out)),
        Value::Mapping(m) => {
            for (k, v) in m {
                addresses(k, out);
                addresses(v, out);
            }
        }
        _ => {}
    }
}

fn ip_literals(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|t| t.parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .map(|ip| ip.to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

// === impl Report (offline) ===

impl Report {
    /// Passed checks per applicable check (skipped ones do not count), as a percentage.
    pub fn score(&self) -> f64 {
        let applicable = self
            .checks
            .iter()
            .filter(|c| c.outcome != Outcome::Skip)
            .count();
        let passed = self
            .checks
            .iter()
            .filter(|c| c.outcome == Outcome::Pass)
            .count();
        if applicable == 0 {
            100.0
        } else {
            (passed as f64 * 1000.0 / applicable as f64).round() / 10.0
        }
    }

    /// The report for machines: every row, the score and the verdict.
    pub fn to_json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .checks
            .iter()
            .map(|c| {
                serde_json::json!({
                    "check": c.check,
                    "target": c.target,
                    "result": match c.outcome {
                        Outcome::Pass => "pass",
                        Outcome::Warn => "warn",
                        Outcome::Skip => "not_applicable",
                        Outcome::Fail => "fail",
                    },
                    "evidence": c.detail,
                })
            })
            .collect();
        serde_json::json!({
            "passed": self.passed(),
            "score": self.score(),
            "checks": rows,
        })
    }
}
