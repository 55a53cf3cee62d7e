//! Deadlines: a request whose upstream does not answer in time gets 504 with a JSON body,
//! after the service's (or the matching route's) timeout rather than the default.

use mesh_tests::client;
use mesh_tests::proxy;
use mesh_tests::server::{self, SERVED_BY};
use mesh_tests::snapshot::{route, service, snapshot};
use std::time::{Duration, Instant};

/// Far below the 30 s default: a 504 sooner than this came from the configured timeout.
const PROMPTLY: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_timeout_gives_504_json() {
    // The upstream takes the request and never answers (it is held until the test ends).
    let hung = server::fixed(200, "too late").label("b").hold().run().await;
    let snap = snapshot(1).service(service("b").endpoint(hung.addr()).timeout("200ms"));
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;

    for client in [
        client::http1(proxy.outbound()),
        client::http2(proxy.outbound()),
    ] {
        let started = Instant::now();
        let reply = client.get("b", "/slow").await;
        let took = started.elapsed();
        assert_eq!(reply.status, 504, "{}", reply.text());
        assert_eq!(reply.json()["error"], "timeout");
        assert!(reply.header(SERVED_BY).is_none());
        assert!(took < PROMPTLY, "504 after {took:?}");
    }
    assert_eq!(hung.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_overrides_the_service_timeout() {
    let hung = server::fixed(200, "too late").label("b").hold().run().await;
    let snap = snapshot(1)
        .service(service("b").endpoint(hung.addr()).timeout("30s"))
        .route(route("b", "b").path_prefix("/quick/").timeout("200ms"));
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;

    let started = Instant::now();
    let reply = client::http1(proxy.outbound()).get("b", "/quick/x").await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["error"], "timeout");
    assert!(
        started.elapsed() < PROMPTLY,
        "504 after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_within_the_timeout_passes() {
    // Delayed, but well inside its 2 s timeout.
    let b = server::fixed(200, "in time")
        .label("b")
        .delay(Duration::from_millis(50))
        .run()
        .await;
    let snap = snapshot(1).service(service("b").endpoint(b.addr()).timeout("2s"));
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;

    let reply = client::http1(proxy.outbound()).get("b", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "in time");
}
