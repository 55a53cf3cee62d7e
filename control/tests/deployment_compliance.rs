//! `mesh-control compliance --deployment` over the rendered files: the shipped deployment
//! passes, and each injected violation fails the check that names it, with the container.

use mesh_control::compliance::{Outcome, Report};
use mesh_control::deployment_check;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn compose() -> String {
    std::fs::read_to_string(root().join("docker-compose.yml")).unwrap()
}

fn generated() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for rel in [
        "prometheus/sidecars.json",
        "snapshot.toml",
        "sidecars/ollama.toml",
    ] {
        let path = root().join("deploy/generated").join(rel);
        out.push((rel.to_owned(), std::fs::read_to_string(path).unwrap()));
    }
    let mut defs: Vec<_> = std::fs::read_dir(root().join("deploy/generated/consul"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    defs.sort();
    for path in defs {
        let rel = format!("consul/{}", path.file_name().unwrap().to_string_lossy());
        out.push((rel, std::fs::read_to_string(path).unwrap()));
    }
    out
}

/// `edit` applied to the block of `service` only.
fn in_service(text: &str, service: &str, edit: impl Fn(&str) -> String) -> String {
    let head = format!("\n  {service}:\n");
    let start = text.find(&head).expect("service") + 1;
    let end = text[start..]
        .find("\n\n")
        .map_or(text.len(), |e| start + e + 1);
    let edited = edit(&text[start..end]);
    assert_ne!(edited, text[start..end], "the edit changed nothing");
    format!("{}{}{}", &text[..start], edited, &text[end..])
}

fn failed(report: &Report) -> Vec<(&'static str, String)> {
    report
        .checks
        .iter()
        .filter(|c| c.outcome == Outcome::Fail)
        .map(|c| (c.check, c.detail.clone()))
        .collect()
}

/// The injected violation fails exactly `check` (and the Rule 30 check above it), naming
/// `service`.
fn assert_caught(text: &str, check: &str, service: &str, rule30: &str) {
    let report = deployment_check::check(text, &generated());
    assert!(!report.passed());
    let failed = failed(&report);
    let names: Vec<&str> = failed.iter().map(|(c, _)| *c).collect();
    assert_eq!(names, vec![check, rule30], "{failed:?}");
    assert!(failed[0].1.contains(service), "{failed:?}");
}

#[test]
fn the_shipped_deployment_passes_every_check() {
    let report = deployment_check::check_dir(&root());
    assert!(report.passed(), "{report}");
    assert_eq!(report.score(), 100.0);
    for named in [
        "resource_limits_enforced",
        "health_endpoints_responding",
        "metrics_exported",
        "logging_structured",
        "security_headers_present",
        "network_policies_applied",
    ] {
        assert!(report.checks.iter().any(|c| c.check == named), "{named}");
    }
}

#[test]
fn a_port_outside_its_phase_range_is_caught() {
    let text = in_service(&compose(), "document-knowledge-manager", |b| {
        b.replace(":10420:10420", ":10300:10420")
    });
    assert_caught(
        &text,
        "ports_in_range",
        "document-knowledge-manager",
        "network_policies_applied",
    );
    let text = in_service(&compose(), "consul", |b| {
        b.replace(":10002:8500", ":8500:8500")
    });
    assert_caught(
        &text,
        "ports_in_range",
        "consul",
        "network_policies_applied",
    );
}

#[test]
fn a_missing_memory_limit_is_caught() {
    let text = in_service(&compose(), "senior-ai-engineer", |b| {
        let at = b.find(", memory: ").unwrap();
        let end = b[at..].find('}').unwrap();
        format!("{}{}", &b[..at], &b[at + end..])
    });
    assert_caught(
        &text,
        "memory_limit",
        "senior-ai-engineer",
        "resource_limits_enforced",
    );
}

#[test]
fn a_hard_coded_address_is_caught() {
    let text = in_service(&compose(), "testing-qa-validator", |b| {
        b.replace(
            "      AGENT_PHASE: critical\n",
            "      AGENT_PHASE: critical\n      PEER: http://10.230.0.5:10300\n",
        )
    });
    assert_caught(
        &text,
        "no_hardcoded_addresses",
        "10.230.0.5",
        "network_policies_applied",
    );
    // In a generated file too.
    let mut files = generated();
    files[1]
        .1
        .push_str("# endpoints = [\"172.18.0.4:10300\"]\n");
    let report = deployment_check::check(&compose(), &files);
    let failed = failed(&report);
    assert_eq!(failed[0].0, "no_hardcoded_addresses");
    assert!(
        failed[0].1.contains("snapshot.toml: 172.18.0.4"),
        "{failed:?}"
    );
}

#[test]
fn a_root_user_is_caught() {
    let text = in_service(&compose(), "senior-ai-engineer-sidecar", |b| {
        b.replace(
            "    restart: always\n",
            "    restart: always\n    user: \"0:0\"\n",
        )
    });
    assert_caught(
        &text,
        "non_root_user",
        "senior-ai-engineer-sidecar",
        "container_hardening",
    );
}

#[test]
fn a_missing_healthcheck_is_caught() {
    let text = in_service(&compose(), "consul", |b| {
        let at = b.find("    healthcheck:\n").unwrap();
        let end = b.find("    deploy:\n").unwrap();
        format!("{}{}", &b[..at], &b[end..])
    });
    assert_caught(
        &text,
        "healthcheck_defined",
        "consul",
        "health_endpoints_responding",
    );
}

#[test]
fn a_writable_root_filesystem_is_caught() {
    let text = in_service(&compose(), "grafana", |b| {
        b.replace(
            "    restart: always\n",
            "    restart: always\n    read_only: false\n",
        )
    });
    assert_caught(&text, "read_only_rootfs", "grafana", "container_hardening");
}

#[test]
fn the_command_line_prints_json_and_exits_1_on_a_violation() {
    let dir = tempfile::tempdir().unwrap();
    let gen = dir.path().join("deploy/generated/prometheus");
    std::fs::create_dir_all(&gen).unwrap();
    std::fs::copy(
        root().join("deploy/generated/prometheus/sidecars.json"),
        gen.join("sidecars.json"),
    )
    .unwrap();
    let text = in_service(&compose(), "grafana", |b| {
        b.replace(
            "    restart: always\n",
            "    restart: always\n    read_only: false\n",
        )
    });
    std::fs::write(dir.path().join("docker-compose.yml"), text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .args(["compliance", "--deployment"])
        .arg(dir.path())
        .arg("--json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["passed"], false);
    assert!(json["score"].as_f64().unwrap() < 100.0);
    let rows = json["checks"].as_array().unwrap();
    let row = |name: &str| rows.iter().find(|r| r["check"] == name).unwrap().clone();
    assert_eq!(row("read_only_rootfs")["result"], "fail");
    assert_eq!(row("security_headers_present")["result"], "not_applicable");
    assert_eq!(row("resource_limits_enforced")["result"], "pass");
}

#[test]
fn a_consul_definition_on_the_wrong_port_or_loaded_by_consul_is_caught() {
    let mut others = generated();
    let def = others
        .iter_mut()
        .find(|(f, _)| f == "consul/senior-ai-engineer.json")
        .unwrap();
    def.1 = def.1.replace("\"port\": 10300", "\"port\": 10301");
    let report = deployment_check::check(&compose(), &others);
    let failed = failed(&report);
    let names: Vec<&str> = failed.iter().map(|(c, _)| *c).collect();
    assert_eq!(
        names,
        ["consul_registration", "network_policies_applied"],
        "{failed:?}"
    );
    assert!(
        failed[0]
            .1
            .contains("senior-ai-engineer: consul/senior-ai-engineer.json registers port 10301"),
        "{failed:?}"
    );

    // Consul loading the definitions itself would register every agent a second time.
    let text = in_service(&compose(), "consul", |b| {
        b.replace(
            "    ports:\n",
            "    volumes:\n      - ./deploy/generated/consul:/consul/config:ro\n    ports:\n",
        )
    });
    assert_caught(
        &text,
        "consul_registration",
        "consul: mounts Consul definitions",
        "network_policies_applied",
    );
}

#[test]
fn a_sidecar_mounting_another_agents_token_or_the_ca_key_is_caught() {
    let text = in_service(&compose(), "senior-ai-engineer-sidecar", |b| {
        b.replace(
            "      - mesh-ca\n",
            "      - mesh-ca\n      - source: token-testing-qa-validator\n        target: other\n",
        )
    });
    assert_caught(
        &text,
        "secrets_least_privilege",
        "senior-ai-engineer-sidecar: mounts token-testing-qa-validator",
        "network_policies_applied",
    );
    let text = in_service(&compose(), "senior-ai-engineer-sidecar", |b| {
        b.replace(
            "      - mesh-ca\n",
            "      - mesh-ca\n      - mesh-ca-key\n",
        )
    });
    assert_caught(
        &text,
        "secrets_least_privilege",
        "mounts mesh-ca-key",
        "network_policies_applied",
    );
    // Without its own token it cannot prove who it is.
    let text = in_service(&compose(), "senior-ai-engineer-sidecar", |b| {
        b.replace(
            "      - source: token-senior-ai-engineer\n        target: agent-token\n",
            "",
        )
    });
    assert_caught(
        &text,
        "secrets_least_privilege",
        "no token-senior-ai-engineer",
        "network_policies_applied",
    );
}
