//! Rule 17: a sidecar registers its agent in Consul on start (service, port, phase tag, an
//! HTTP check against its /health) and deregisters before draining.

use mesh_tests::consul::FakeConsul;
use mesh_tests::server;
use mesh_tests::{bounded, proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_registers_on_start_and_deregisters_before_draining() {
    let app = server::fixed(200, "app").run().await;
    let consul = FakeConsul::start().await;
    let proxy = proxy::builder()
        .agent("senior-ai-engineer")
        .phase("critical")
        .inbound_app(app.addr())
        .bootstrap_extra(&format!("\n[consul]\naddress = \"{}\"\n", consul.addr()))
        .start()
        .await;
    consul
        .wait_for("the registration", |reg, _| !reg.is_empty())
        .await;
    let reg = consul.registered().remove(0);
    assert_eq!(reg["Name"], "senior-ai-engineer");
    assert_eq!(reg["Port"], proxy.inbound().port());
    let tags = reg["Tags"].as_array().unwrap();
    assert!(tags.iter().any(|t| t == "phase=critical"), "{reg}");
    let check = reg["Check"]["HTTP"].as_str().unwrap();
    assert_eq!(check, format!("http://{}/health", proxy.admin()));

    bounded("shutdown", proxy.shutdown()).await;
    assert_eq!(consul.deregistered(), ["senior-ai-engineer"]);
}
