//! A listener holds at most `limits.max_connections` connections open: a flood of idle
//! connections costs bounded memory, and the connection over the cap gets a clear 503 (marked
//! `x-mesh-refused: connection_limit`) rather than a silent drop. Room comes back as
//! connections close.

use mesh_tests::client::{self, raw_exchange, raw_status};
use mesh_tests::metrics::wait_for_metric;
use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};
use mesh_tests::{bounded, eventually};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_cap_gets_503_and_room_comes_back() {
    let b = server::fixed(200, "b").label("b").run().await;
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(
            snapshot(1)
                .service(service("b").endpoint(b.addr()))
                .to_toml(),
        )
        .bootstrap_extra("\n[limits]\nmax_connections = 4\n")
        .start()
        .await;

    // Four idle connections fill the outbound listener.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(
            bounded("an idle connection", TcpStream::connect(proxy.outbound()))
                .await
                .unwrap(),
        );
    }
    wait_for_metric(
        proxy.admin(),
        "agent_connections_total",
        &[("listener", "outbound")],
        4.0,
    )
    .await;

    let out = raw_exchange(proxy.outbound(), b"GET / HTTP/1.1\r\nHost: b\r\n\r\n").await;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(raw_status(&out), Some(503), "{text}");
    assert!(text.contains("x-mesh-refused: connection_limit"), "{text}");
    assert!(text.contains("limit of 4 connections"), "{text}");
    wait_for_metric(
        proxy.admin(),
        "agent_connections_refused_total",
        &[("listener", "outbound")],
        1.0,
    )
    .await;
    assert_eq!(b.requests(), 0);

    // One idle connection leaves: a caller gets through again.
    drop(idle.pop());
    let outbound = proxy.outbound();
    eventually("room for a new connection", || async move {
        let c = client::http1(outbound);
        let req = c
            .request(http::Method::GET, "b", "/")
            .body(mesh_tests::body::empty())
            .unwrap();
        let reply = c.try_send(req).await.ok()?;
        (reply.status == 200).then_some(())
    })
    .await;
}
