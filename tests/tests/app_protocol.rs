//! The inbound side's protocol to the app (`inbound.protocol`): `auto` (the default) sends gRPC
//! calls over h2c and everything else over HTTP/1.1; `http2` sends everything over h2c; `http1`
//! everything over HTTP/1.1, so a gRPC-only app behind it cannot be reached.

use mesh_tests::proxy::{self, TestProxy};
use mesh_tests::snapshot::{service, snapshot};
use mesh_tests::{client, python, server};
use std::net::SocketAddr;

/// Sidecar B in front of `app` with `protocol` (None: the default), and A routing `b` to it.
async fn two_hops(app: SocketAddr, protocol: Option<&str>) -> (TestProxy, TestProxy) {
    let mut b = proxy::builder().agent("b").inbound_app(app);
    if let Some(p) = protocol {
        b = b.inbound_protocol(p);
    }
    let b = b.start().await;
    let snap = snapshot(1).service(service("b").http2().endpoint(b.inbound()));
    let a = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;
    (b, a)
}

async fn app_saw_version(protocol: Option<&str>) -> String {
    let app = server::echo().run().await;
    let (_b, a) = two_hops(app.addr(), protocol).await;
    let reply = client::http1(a.outbound()).get("b", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["version"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_reach_the_app_over_http1_unless_it_is_declared_http2() {
    assert_eq!(app_saw_version(None).await, "HTTP/1.1");
    assert_eq!(app_saw_version(Some("auto")).await, "HTTP/1.1");
    assert_eq!(app_saw_version(Some("http1")).await, "HTTP/1.1");
    assert_eq!(app_saw_version(Some("http2")).await, "HTTP/2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_declared_http1_gets_grpc_over_http1() {
    // grpcio cannot answer HTTP/1.1: the declaration is honoured, and the call fails.
    let app = python::server("grpc_server.py", &[]).await;
    let (_b, a) = two_hops(app.addr, Some("http1")).await;
    let addr = a.outbound().to_string();
    let out = python::run("grpc_client.py", &[&addr, "b", "call", "Unary", "x", "10"]).await;
    assert_eq!(out["code"], 14, "{out}");
    let (_b, a) = two_hops(app.addr, Some("http2")).await;
    let addr = a.outbound().to_string();
    let out = python::run("grpc_client.py", &[&addr, "b", "call", "Unary", "x", "10"]).await;
    assert_eq!(out["code"], 0, "{out}");
    assert_eq!(out["reply"], "x");
}
