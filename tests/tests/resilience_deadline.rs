//! Deadlines across hops: the caller's budget travels in `x-mesh-timeout-ms`, shrinking as it
//! goes, and the next sidecar gives up when it runs out rather than at its own, longer timeout.

use mesh_tests::client;
use mesh_tests::metrics::{metric_value, scrape};
use mesh_tests::proxy;
use mesh_tests::relay;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};
use std::net::SocketAddr;
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

/// Waits, until `by` at the latest, for `agent`'s sidecar to have nothing in flight towards
/// `target` on its `direction` side: that hop has stopped waiting (answered or been cancelled).
async fn gave_up(admin: SocketAddr, direction: &str, agent: &str, target: &str, by: Instant) {
    let what = format!("{agent}'s {direction} side to stop waiting on {target}");
    let labels = [
        ("direction", direction),
        ("agent", agent),
        ("target", target),
    ];
    let wait = mesh_tests::eventually(&what, || async {
        let text = scrape(admin).await;
        let inflight = metric_value(&text, "agent_inflight_requests", &labels);
        (inflight == Some(0.0)).then_some(())
    });
    mesh_tests::bounded_by(by.saturating_duration_since(Instant::now()), &what, wait).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_hop_chain_ends_by_the_first_callers_deadline() {
    // agent -> sidecar A -> sidecar B -> app B (relays) -> sidecar B -> sidecar C -> app C,
    // which never answers. Only sidecar A knows the 1 s deadline; every other hop has the
    // default 30 s and learns the budget from `x-mesh-timeout-ms`. Default retry policies.
    let app_c = server::fixed(200, "late").label("app-c").hold().run().await;
    let sidecar_c = proxy::builder()
        .agent("ch-c")
        .inbound_app(app_c.addr())
        .start()
        .await;
    let app_b = relay::to("ch-c").run().await;
    let sidecar_b = proxy::builder()
        .agent("ch-b")
        .inbound_app(app_b.addr())
        .snapshot(
            snapshot(1)
                .service(service("ch-c").http2().endpoint(sidecar_c.inbound()))
                .to_toml(),
        )
        .start()
        .await;
    app_b.via(sidecar_b.outbound());
    let sidecar_a = proxy::builder()
        .agent("ch-a")
        .snapshot(
            snapshot(1)
                .service(
                    service("ch-b")
                        .http2()
                        .endpoint(sidecar_b.inbound())
                        .timeout("1s"),
                )
                .to_toml(),
        )
        .start()
        .await;

    let started = Instant::now();
    let limit = started + Duration::from_millis(1500);
    let reply = mesh_tests::bounded_by(
        Duration::from_millis(1500),
        "the chain to answer",
        client::http1(sidecar_a.outbound()).get("ch-b", "/work"),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(took >= Duration::from_millis(900), "{took:?}");
    // The request did reach the hung app at the end of the chain, with what was left of the
    // first caller's budget: B's outbound (30 s by default) learned it only from the relay.
    assert_eq!(app_c.requests(), 1);
    let left: u64 = app_c.request_headers()[0]["x-mesh-timeout-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..1000).contains(&left), "{left}");

    // Every hop gave up within the bound, not only the first. The request reached app C, so
    // each hop held it in flight; none may still be waiting. (B's inbound and outbound share
    // one deadline: whichever fires first ends the other's wait, as a 504 or a cancel.)
    gave_up(sidecar_c.admin(), "inbound", "ch-c", "ch-c", limit).await;
    gave_up(sidecar_b.admin(), "outbound", "ch-b", "ch-c", limit).await;
    gave_up(sidecar_b.admin(), "inbound", "ch-b", "ch-b", limit).await;
    gave_up(sidecar_a.admin(), "outbound", "ch-a", "ch-b", limit).await;
}
