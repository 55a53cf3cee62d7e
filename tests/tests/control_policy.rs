//! Policy files: a bad edit is rejected with file and line and changes nothing; a good edit
//! applies without a restart; budgets scale oversubscribed phases and say so; the offline
//! validator exits non-zero with the same errors.

use mesh_tests::control::{self, catalog};
use mesh_tests::{client, metrics, proxy};
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_edit_is_rejected_with_file_and_line_and_a_good_one_applies() {
    let control = control::builder()
        .catalog(&catalog(&[("b", "critical", &[control::NOT_LISTENING])]))
        .start()
        .await;
    let v1 = control.wait_version_after(0).await;

    // Line 4 holds a key the policy does not know.
    control.write_policy(
        "traffic.toml",
        "[defaults]\ntimeout = \"30s\"\n[targets.b]\nretry = 3\n",
    );
    let status = control
        .wait_status("the rejection in /status", |s| {
            !s["policy"]["rejected"].is_null()
        })
        .await;
    let rejected = &status["policy"]["rejected"];
    assert!(
        rejected["file"].as_str().unwrap().ends_with("traffic.toml"),
        "{rejected}"
    );
    assert_eq!(rejected["line"], 4, "{rejected}");
    assert!(
        rejected["reason"].as_str().unwrap().contains("retry"),
        "{rejected}"
    );
    assert_eq!(control.version(), v1, "nothing changes");
    let scrape = client::http1(control.addr())
        .get("control", "/metrics")
        .await
        .text();
    assert_eq!(
        metrics::metric_value(&scrape, "mesh_control_policy_rejections_total", &[]),
        Some(1.0),
        "{scrape}"
    );

    // The fixed edit applies: a new version carrying the override.
    control.write_policy(
        "traffic.toml",
        "[defaults]\ntimeout = \"30s\"\n[targets.b]\ntimeout = \"2s\"\n",
    );
    let v2 = control.wait_version_after(v1).await;
    let status = control.status();
    assert!(status["policy"]["rejected"].is_null(), "{status:#}");
    let rsp = client::http1(control.addr())
        .get("control", &format!("/v1/snapshot?agent=b&version={}", 0))
        .await;
    assert_eq!(rsp.header("x-mesh-version"), Some(v2.to_string().as_str()));
    assert_eq!(rsp.json()["services"][0]["timeout"], "2s", "{}", rsp.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversubscribed_phases_are_scaled_and_reported_and_reach_the_sidecar() {
    let control = control::builder()
        .catalog(&catalog(&[
            ("a", "critical", &[]),
            ("c", "specialized", &[]),
        ]))
        .start()
        .await;
    let v = control.wait_version_after(0).await;
    let budget = control.status()["budget"].clone();
    // Rules 20/21 as written: 8 + 6 + 4 CPUs on a 12-core host.
    assert_eq!(budget["oversubscribed"], true, "{budget:#}");
    assert_eq!(budget["requested_cpus"], 18.0);
    let scale = budget["cpu_scale"].as_f64().unwrap();
    assert!((scale - 12.0 / 18.0).abs() < 1e-9, "{budget:#}");
    let granted: f64 = ["critical", "performance", "specialized"]
        .iter()
        .map(|p| budget["phases"][p]["granted_cpus"].as_f64().unwrap())
        .sum();
    assert!((granted - 12.0).abs() < 1e-9);

    let proxy = proxy::builder()
        .agent("a")
        .phase("critical")
        .bootstrap_extra(&control.sidecar_toml(None))
        .start()
        .await;
    control.wait_applied(v, 1).await;
    let config = client::http1(proxy.admin())
        .get("admin", "/config")
        .await
        .json();
    // One critical agent: its share is the 2-CPU per-agent cap, not the 5.3-CPU slice.
    assert_eq!(config["budget"]["cpus"], 2.0, "{config}");
    assert_eq!(config["budget"]["phase"], "critical");
    proxy.shutdown().await;
}

#[test]
fn validate_exits_non_zero_with_file_and_line() {
    let bin = control::binary_path();
    let ok = Command::new(&bin)
        .arg("validate")
        .arg(control::shipped_policy())
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("resources.toml"),
        "[host]\ncpus = 12\n\n[phases.urgent]\ncpus = 1\n",
    )
    .unwrap();
    let bad = Command::new(&bin)
        .arg("validate")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("resources.toml:4:"), "{stderr}");
    assert!(stderr.contains("urgent"), "{stderr}");
}
