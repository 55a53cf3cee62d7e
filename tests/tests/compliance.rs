//! `mesh-control compliance` against a real control process and real sidecars: with every
//! sidecar healthy, on the latest version and exporting the Rule 27 metrics, every check
//! passes (the shipped phases' oversubscription is reported, so it only warns); a sidecar that
//! is gone fails its checks and the command exits non-zero.

use http::Method;
use mesh_control::compliance::{self, Outcome};
use mesh_tests::control::{self, catalog};
use mesh_tests::{body, bounded, client, ollama, proxy, server};
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_mesh_passes_and_a_missing_sidecar_fails() {
    // One process holds one metrics recorder: install the sidecars' before the control
    // process's, so their /metrics show what they record (shared by the three here).
    mesh_proxy::metrics::install();
    let app = server::fixed(200, "ok").run().await;
    let fake = ollama::fake().chunks(0).run().await;
    let mut control = control::builder()
        .catalog(&catalog(&[("b", "performance", &[app.addr()])]))
        .start()
        .await;
    control.wait_version_after(0).await;
    let with_control = control.sidecar_toml(None);
    let gateway = proxy::builder()
        .agent("ollama")
        .phase("critical")
        .ollama_gateway(fake.addr())
        .bootstrap_extra(&with_control)
        .start()
        .await;
    let a = proxy::builder()
        .agent("a")
        .phase("critical")
        .inbound_app(app.addr())
        .bootstrap_extra(&with_control)
        .start()
        .await;
    let b = proxy::builder()
        .agent("b")
        .phase("performance")
        .inbound_app(app.addr())
        .bootstrap_extra(&with_control)
        .start()
        .await;
    // Ollama is discovered once its gateway listens.
    let v1 = control.version();
    control.write_catalog(&catalog(&[
        ("a", "critical", &[a.inbound()]),
        ("b", "performance", &[b.inbound()]),
        ("ollama", "critical", &[gateway.inbound()]),
    ]));
    let v2 = control.wait_version_after(v1).await;
    control.wait_applied(v2, 3).await;

    // Traffic: a call between agents, a generation through the gateway, a call to nowhere.
    assert_eq!(client::http1(a.outbound()).get("b", "/").await.status, 200);
    let c = client::http1(a.outbound());
    let req = c
        .request(Method::POST, "ollama", "/api/generate")
        .body(body::full("{\"prompt\":\"hi\"}"))
        .unwrap();
    assert_eq!(bounded("a generation", c.send(req)).await.status, 200);
    let nowhere = client::http1(a.outbound()).get("nowhere", "/").await;
    assert!(nowhere.status.is_client_error() || nowhere.status.is_server_error());

    let url = format!("http://{}/status", control.addr());
    let report = compliance::run(&url, Duration::from_secs(5)).await;
    assert!(report.passed(), "{report}");
    let rows = |check: &str| {
        report
            .checks
            .iter()
            .filter(|c| c.check == check && c.outcome == Outcome::Pass)
            .count()
    };
    // Each of the three sidecars: health, metrics and version checked and passed.
    for check in ["health", "metrics", "snapshot version"] {
        assert_eq!(rows(check), 3, "{check}\n{report}");
    }
    let gateway_row = report
        .checks
        .iter()
        .find(|c| c.check == "metrics" && c.target.starts_with("ollama "))
        .expect("the gateway's metrics row");
    assert_eq!(gateway_row.detail, "6 required", "{report}");
    // The shipped phases ask for 18 CPUs of 12: reported, so a warning, not a failure.
    let budgets = report
        .checks
        .iter()
        .find(|c| c.check == "phase budgets")
        .unwrap();
    assert_eq!(budgets.outcome, Outcome::Warn, "{report}");

    // The binary prints the same table and exits 0.
    let bin = control::binary_path();
    let ok = run_binary(&bin, &url).await;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    // b's sidecar goes away: control still lists it, its health and metrics fail.
    b.shutdown().await;
    let out = run_binary(&bin, &url).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    let failed = table
        .lines()
        .filter(|l| l.contains("FAIL") && l.contains(" b ("))
        .count();
    assert_eq!(failed, 2, "{table}");

    // Without the control process there is nothing to check: one failure, exit 1.
    control.stop().await;
    let report = compliance::run(&url, Duration::from_secs(2)).await;
    assert!(!report.passed());
    assert_eq!(report.failures().count(), 1, "{report}");
    gateway.shutdown().await;
    a.shutdown().await;
}

/// Runs `mesh-control compliance` off the runtime's workers; bounded.
async fn run_binary(bin: &std::path::Path, url: &str) -> std::process::Output {
    let mut cmd = Command::new(bin);
    cmd.args(["compliance", "--status-url", url, "--timeout", "3s"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run mesh-control"));
    bounded("mesh-control compliance", out)
        .await
        .expect("the command ran")
}
