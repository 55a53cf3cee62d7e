//! Discovery from Consul (a test double honouring blocking queries): routes follow the
//! catalog, an index that goes backwards is followed, Consul down leaves routes in place and
//! marks the catalog stale.

use mesh_tests::consul::FakeConsul;
use mesh_tests::server::{self, SERVED_BY};
use mesh_tests::{client, control, metrics, proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_consul_and_stay_when_consul_goes_down() {
    let old = server::fixed(200, "old").label("old").run().await;
    let new = server::fixed(200, "new").label("new").run().await;
    let consul = FakeConsul::start().await;
    consul.set_service("b", "performance", &[old.addr()]);
    let control = control::builder().consul(consul.addr()).start().await;
    let v1 = control.wait_version_after(0).await;
    let proxy = proxy::builder()
        .agent("a")
        .bootstrap_extra(&control.sidecar_toml(None))
        .start()
        .await;
    control.wait_applied(v1, 1).await;
    let reply = client::http1(proxy.outbound()).get("b", "/").await;
    assert_eq!(reply.header(SERVED_BY), Some("old"));
    assert_eq!(control.status()["catalog"]["stale"], false);

    // Consul's index goes backwards (a restore), then the service moves: the watch resets
    // its index and still sees the change.
    consul.set_index(1);
    consul.set_service("b", "performance", &[new.addr()]);
    let v2 = control.wait_version_after(v1).await;
    control.wait_applied(v2, 1).await;
    let reply = client::http1(proxy.outbound()).get("b", "/").await;
    assert_eq!(reply.header(SERVED_BY), Some("new"));

    // Consul goes away: the catalog is stale, routes stay.
    consul.stop();
    let status = control
        .wait_status("the catalog to be stale", |s| s["catalog"]["stale"] == true)
        .await;
    assert!(status["catalog"]["last_error"].is_string(), "{status:#}");
    assert_eq!(control.version(), v2);
    let scrape = client::http1(control.addr())
        .get("control", "/metrics")
        .await
        .text();
    assert_eq!(
        metrics::metric_value(&scrape, "mesh_control_catalog_stale", &[]),
        Some(1.0)
    );
    let reply = client::http1(proxy.outbound()).get("b", "/").await;
    assert_eq!(reply.header(SERVED_BY), Some("new"));
    proxy.shutdown().await;
}
