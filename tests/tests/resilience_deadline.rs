//! Deadlines across hops: the caller's budget travels in `x-mesh-timeout-ms`, shrinking as it
//! goes, and the next sidecar gives up when it runs out rather than at its own, longer timeout.

use mesh_tests::client;
use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remaining_budget_reaches_the_next_hop() {
    let b = server::echo().label("b").run().await;
    let snap = snapshot(1).service(service("dl-b").endpoint(b.addr()).timeout("1s"));
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;

    let reply = client::http1(proxy.outbound()).get("dl-b", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let left: u64 = reply.json()["headers"]["x-mesh-timeout-ms"]
        .as_str()
        .expect("budget header forwarded")
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&left), "{left}");

    // A caller that asks for less gets less.
    let c = client::http1(proxy.outbound());
    let req = c
        .request(http::Method::GET, "dl-b", "/")
        .header("x-mesh-timeout-ms", "200")
        .body(mesh_tests::body::empty())
        .unwrap();
    let left: u64 = c.send(req).await.json()["headers"]["x-mesh-timeout-ms"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(left <= 200, "{left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_ends_when_the_first_callers_budget_does() {
    // Hop 2: a sidecar whose own inbound timeout is the 30 s default, in front of an app that
    // never answers. Hop 1 calls it with a 1 s timeout.
    let hung = server::fixed(200, "late").label("hung").hold().run().await;
    let hop2 = proxy::builder()
        .agent("dl-second")
        .inbound_app(hung.addr())
        .start()
        .await;
    let snap = snapshot(1).service(
        service("dl-second")
            .endpoint(hop2.inbound())
            .timeout("1s")
            .policy("retry", "{ max_attempts = 1 }"),
    );
    let hop1 = proxy::builder()
        .agent("dl-first")
        .snapshot(snap.to_toml())
        .start()
        .await;

    let started = Instant::now();
    let reply = mesh_tests::bounded(
        "the chain to answer",
        client::http1(hop1.outbound()).get("dl-second", "/"),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1500),
        "{took:?}"
    );

    // Hop 2 honoured the budget it was given: asked directly with 300 ms left, it gives up
    // after about 300 ms, not after its own 30 s.
    let c = client::http1(hop2.inbound());
    let req = c
        .request(http::Method::GET, "dl-second", "/")
        .header("x-mesh-timeout-ms", "300")
        .body(mesh_tests::body::empty())
        .unwrap();
    let started = Instant::now();
    let reply = c.send(req).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(took < Duration::from_millis(1000), "{took:?}");
}
