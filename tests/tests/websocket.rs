//! HTTP/1.1 upgrades are tunnelled end to end: client -> sidecar A outbound -> sidecar B
//! inbound -> the agent's app, and raw bytes flow both ways after the 101.

use mesh_tests::bounded;
use mesh_tests::client;
use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_echo_through_two_sidecars() {
    let app_b = server::upgrade_echo().label("b-app").run().await;
    let sidecar_b = proxy::builder()
        .agent("b")
        .inbound_app(app_b.addr())
        .start()
        .await;
    let snap = snapshot(1).service(service("b").endpoint(sidecar_b.inbound()));
    let sidecar_a = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;

    let (head, io) = client::http1(sidecar_a.outbound())
        .upgrade("b.mesh", "/ws")
        .await;
    assert_eq!(head.status(), 101, "headers: {:?}", head.headers());
    assert_eq!(
        head.headers().get("upgrade").and_then(|v| v.to_str().ok()),
        Some("websocket")
    );
    let mut io = io.expect("an upgraded stream after 101");

    // Bytes that are not HTTP, in several round trips, prove a raw tunnel both ways.
    for round in 0..3u8 {
        let frame = [0x82, 0x04, 0x00, round, 0xff, b'\n'];
        io.write_all(&frame).await.expect("write to the tunnel");
        let mut echoed = [0u8; 6];
        bounded("the echoed bytes", io.read_exact(&mut echoed))
            .await
            .expect("read from the tunnel");
        assert_eq!(echoed, frame, "round {round}");
    }

    // Closing our side ends the tunnel: the app's echo closes in turn.
    io.shutdown().await.expect("shutdown write side");
    let mut rest = Vec::new();
    bounded("the tunnel to close", io.read_to_end(&mut rest))
        .await
        .expect("read to the end of the tunnel");
    assert!(rest.is_empty(), "unexpected bytes after close: {rest:?}");
    assert_eq!(app_b.requests(), 1);
}
