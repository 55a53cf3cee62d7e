//! The control channel end to end: a catalog change reaches every one of 69 sidecars; with
//! the control process gone sidecars keep routing, a restarted sidecar starts from its
//! persisted snapshot, and everyone catches up when control returns.

use mesh_tests::control::{self, catalog};
use mesh_tests::proxy::{self, TestProxy};
use mesh_tests::server::{self, SERVED_BY};
use mesh_tests::{bounded, client};
use std::net::SocketAddr;

const AGENTS: usize = 69;

fn phase_of(i: usize) -> &'static str {
    match i {
        0..20 => "critical",
        20..50 => "performance",
        _ => "specialized",
    }
}

/// The 69 agents (each at `agent_addr`) plus a target `b` at `b`.
fn mesh(agent_addr: SocketAddr, b: SocketAddr) -> String {
    let names: Vec<String> = (0..AGENTS).map(|i| format!("agent-{i}")).collect();
    let mut entries: Vec<(&str, &str, &[SocketAddr])> = Vec::new();
    let agent_eps = [agent_addr];
    for (i, n) in names.iter().enumerate() {
        entries.push((n, phase_of(i), &agent_eps));
    }
    let b_eps = [b];
    entries.push(("b", "performance", &b_eps));
    catalog(&entries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_change_reaches_all_69_sidecars() {
    let old = server::fixed(200, "old").label("old").run().await;
    let new = server::fixed(200, "new").label("new").run().await;
    let control = control::builder()
        .catalog(&mesh(old.addr(), old.addr()))
        .start()
        .await;
    let v1 = control.wait_version_after(0).await;
    let mut proxies = Vec::with_capacity(AGENTS);
    for i in 0..AGENTS {
        let p = proxy::builder()
            .agent(&format!("agent-{i}"))
            .phase(phase_of(i))
            .bootstrap_extra(&control.sidecar_toml(None))
            .start()
            .await;
        proxies.push(p);
    }
    control.wait_applied(v1, AGENTS).await;

    // `b` moves to a new endpoint: every sidecar applies the new version.
    control.write_catalog(&mesh(old.addr(), new.addr()));
    let v2 = control.wait_version_after(v1).await;
    control.wait_applied(v2, AGENTS).await;
    for p in proxies.iter_mut().step_by(17) {
        let reply = client::http1(p.outbound()).get("b", "/").await;
        assert_eq!(reply.header(SERVED_BY), Some("new"), "{}", reply.text());
    }
    let status = control.status();
    let rows = status["sidecars"].as_array().unwrap();
    assert_eq!(rows.len(), AGENTS);
    assert!(rows.iter().all(|r| r["ack"] == "applied"), "{status:#}");
    // Each sidecar got its own phase's budget.
    let config = client::http1(proxies[60].admin())
        .get("admin", "/config")
        .await
        .json();
    assert_eq!(config["budget"]["phase"], "specialized", "{config}");
    for p in proxies {
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_control_sidecars_keep_routing_restart_from_disk_and_catch_up() {
    let old = server::fixed(200, "old").label("old").run().await;
    let new = server::fixed(200, "new").label("new").run().await;
    let files = tempfile::tempdir().unwrap();
    let persist = files.path().join("last-snapshot.json");
    let mut control = control::builder()
        .catalog(&catalog(&[
            ("a", "critical", &[]),
            ("b", "critical", &[old.addr()]),
        ]))
        .start()
        .await;
    let v1 = control.wait_version_after(0).await;
    let start = |ctl: &control::TestControl| {
        proxy::builder()
            .agent("a")
            .bootstrap_extra(&ctl.sidecar_toml(Some(&persist)))
            .start()
    };
    let proxy = start(&control).await;
    control.wait_applied(v1, 1).await;

    // The control process goes away: routes stay.
    control.stop().await;
    let reply = client::http1(proxy.outbound()).get("b", "/").await;
    assert_eq!(reply.header(SERVED_BY), Some("old"));

    // The sidecar restarts while control is down: it starts from the persisted snapshot,
    // not from its (empty) snapshot file.
    proxy.shutdown().await;
    let proxy: TestProxy = start(&control).await;
    assert_eq!(proxy.snapshot_version(), v1);
    let reply = client::http1(proxy.outbound()).get("b", "/").await;
    assert_eq!(reply.header(SERVED_BY), Some("old"));

    // While control is down, `b` moves; control returns and the sidecar picks it up.
    control.write_catalog(&catalog(&[
        ("a", "critical", &[]),
        ("b", "critical", &[new.addr()]),
    ]));
    control.restart().await;
    let v2 = control.wait_version_after(v1).await;
    control.wait_applied(v2, 1).await;
    let mut versions = proxy.versions();
    bounded(
        "the sidecar to apply the new version",
        versions.wait_for(|v| *v == v2),
    )
    .await
    .unwrap();
    let reply = client::http1(proxy.outbound()).get("b", "/").await;
    assert_eq!(reply.header(SERVED_BY), Some("new"));
    proxy.shutdown().await;
}
