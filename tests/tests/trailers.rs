//! Trailers cross the sidecar both ways: a gRPC-style call over h2c to an h2 service.

use http::{HeaderMap, HeaderValue, Method};
use mesh_tests::body;
use mesh_tests::client;
use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_style_trailers_round_trip_over_h2() {
    let grpc = server::trailers().label("grpc").run().await;
    let snap = snapshot(1).service(service("grpc").http2().endpoint(grpc.addr()));
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;
    let client = client::http2(proxy.outbound());

    // A unary call: a length-prefixed message, then the request's own trailers.
    let message: &[u8] = b"\x00\x00\x00\x00\x05hello";
    let (tx, req_body) = body::channel();
    tx.send(message);
    let mut req_trailers = HeaderMap::new();
    req_trailers.insert("x-checksum", HeaderValue::from_static("5d41402a"));
    tx.trailers(req_trailers);
    let req = client
        .request(Method::POST, "grpc.mesh", "/pkg.Service/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(req_body)
        .unwrap();

    let reply = client.send(req).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/grpc"));
    assert_eq!(reply.body, message);
    // The response trailers came back, and the request trailers had reached the upstream.
    assert!(
        reply.trailers.is_some(),
        "no response trailers; headers: {:?}",
        reply.headers
    );
    assert_eq!(
        reply.trailer("grpc-status"),
        Some("0"),
        "grpc-message: {:?}",
        reply.trailer("grpc-message")
    );
    assert_eq!(reply.trailer("x-echo-x-checksum"), Some("5d41402a"));
    assert_eq!(grpc.requests(), 1);
}
