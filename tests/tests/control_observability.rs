//! What operators watch works from the first event: the sidecar's counters that alerts read
//! with `increase()` exist at 0 from the start, every gauge has help text, calls with no
//! route are counted under a fixed target, a bootstrap without `[snapshot]` starts, and the
//! deployment's Prometheus and compose files load outside their containers.

use mesh_tests::metrics::{metric_value, samples, scrape, wait_for_metric};
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};
use mesh_tests::{client, proxy};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_sidecar_exports_what_alerts_read_at_zero_with_help_text() {
    let app = server::fixed(200, "app").run().await;
    let proxy = proxy::builder().inbound_app(app.addr()).start().await;
    let text = scrape(proxy.admin()).await;
    // MeshSnapshotRejected is `increase(...[10m]) > 0`: a counter born at 1 on the first
    // rejection never increases, so it must exist at 0 before.
    assert_eq!(
        metric_value(&text, "agent_snapshot_rejections_total", &[]),
        Some(0.0),
        "{text}"
    );
    for kind in [
        "unknown_protocol",
        "header_too_large",
        "malformed_request",
        "header_timeout",
        "http",
    ] {
        assert_eq!(
            metric_value(&text, "agent_protocol_errors_total", &[("kind", kind)]),
            Some(0.0),
            "{kind}"
        );
    }
    // Every family the sidecar exports says what it is.
    let families: std::collections::BTreeSet<String> =
        samples(&text).into_iter().map(|s| s.name).collect();
    for family in &families {
        let base = family
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            text.contains(&format!("# HELP {base} "))
                || text.contains(&format!("# HELP {family} ")),
            "{family} has no HELP text"
        );
    }
    assert!(families.contains("agent_inbound_concurrency_limit"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_with_no_route_are_counted_under_a_fixed_target() {
    let b = server::fixed(200, "b").run().await;
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(
            snapshot(1)
                .service(service("b").endpoint(b.addr()))
                .to_toml(),
        )
        .start()
        .await;
    for authority in ["nobody", "nobody-else.mesh", "x"] {
        let reply = client::http1(proxy.outbound()).get(authority, "/").await;
        assert_eq!(reply.status, 503);
    }
    let labels = [
        ("kind", "no_route"),
        ("target", "(no route)"),
        ("agent", "a"),
    ];
    assert_eq!(
        wait_for_metric(proxy.admin(), "agent_errors_total", &labels, 3.0).await,
        3.0
    );
    // Whatever authority is asked for, no series gets a target named after it, or none.
    let text = scrape(proxy.admin()).await;
    for s in samples(&text) {
        if let Some((_, target)) = s.labels.iter().find(|(k, _)| k == "target") {
            assert!(
                !target.is_empty() && !target.starts_with("nobody") && target != "x",
                "{s:?}"
            );
        }
    }
    proxy.shutdown().await;
}

#[test]
fn a_bootstrap_without_a_snapshot_section_is_accepted() {
    let text = "agent = \"a\"\nphase = \"critical\"\n[listen]\noutbound = \"127.0.0.1:0\"\n";
    let boot = mesh_proxy::bootstrap::Bootstrap::from_toml(Path::new("sidecar.toml"), text)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(boot.snapshot.file.is_none());
}

#[test]
fn prometheus_rule_files_resolve_next_to_the_config() {
    let config = root().join("deploy/prometheus/prometheus.yml");
    let text = std::fs::read_to_string(&config).unwrap();
    let mut rules = Vec::new();
    let mut in_rules = false;
    for line in text.lines() {
        if line.starts_with("rule_files:") {
            in_rules = true;
        } else if in_rules {
            match line.trim().strip_prefix("- ") {
                Some(path) => rules.push(path.trim().trim_matches('"').to_owned()),
                None if line.trim().is_empty() || line.trim_start().starts_with('#') => {}
                None => in_rules = false,
            }
        }
    }
    assert!(!rules.is_empty(), "no rule_files in {}", config.display());
    for rule in rules {
        // Relative paths resolve against the config file's directory, in the container
        // (/etc/prometheus/) as in the repository: `promtool check config` works in both.
        assert!(
            !rule.starts_with('/'),
            "{rule} only exists inside the container"
        );
        assert!(
            config.parent().unwrap().join(&rule).is_file(),
            "{rule} is not next to prometheus.yml"
        );
    }
    // Where promtool is installed, it has the last word, from the repository root.
    match std::process::Command::new("promtool")
        .args(["check", "config"])
        .arg(&config)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            println!("promtool not run ({e}); the rule paths were checked above");
            return;
        }
    }
    // The alert rules' own tests, among them MeshSnapshotRejected firing on the first
    // rejection of a counter that starts at 0.
    let out = std::process::Command::new("promtool")
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(config.parent().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_has_no_top_level_name_that_docker_compose_1_refuses() {
    let compose = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let top_level: Vec<&str> = compose
        .lines()
        .filter(|l| !l.starts_with([' ', '#', '-']) && l.contains(':'))
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert!(!top_level.contains(&"name"), "{top_level:?}");
    assert!(top_level.contains(&"services"), "{top_level:?}");
}

#[test]
fn dashboard_panels_that_count_rare_events_show_zero_not_no_data() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dashboards/mesh.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    let mut stack = vec![&dashboard];
    while let Some(v) = stack.pop() {
        if let Some(e) = v.get("expr").and_then(|e| e.as_str()) {
            exprs.push(e.to_owned());
        }
        match v {
            serde_json::Value::Array(a) => stack.extend(a),
            serde_json::Value::Object(o) => stack.extend(o.values()),
            _ => {}
        }
    }
    for metric in [
        "agent_snapshot_rejections_total",
        "agent_protocol_errors_total",
    ] {
        let expr = exprs
            .iter()
            .find(|e| e.contains(metric))
            .unwrap_or_else(|| panic!("no panel reads {metric}"));
        assert!(expr.ends_with(" or vector(0)"), "{expr}");
    }
}
