//! Response bodies stream through the sidecar: the caller reads each chunk while the upstream
//! has not yet produced the next one.

use http::Method;
use mesh_tests::client::{self, next_data, Client};
use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};
use mesh_tests::{body, bounded};

async fn first_chunk_arrives_before_the_last_is_produced(
    make_client: fn(std::net::SocketAddr) -> Client,
    h2_upstream: bool,
) {
    let up = server::streaming().label("tokens").run().await;
    let mut svc = service("llm").endpoint(up.addr());
    if h2_upstream {
        svc = svc.http2();
    }
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(snapshot(1).service(svc).to_toml())
        .start()
        .await;
    let client = make_client(proxy.outbound());

    let req = client
        .request(Method::POST, "llm", "/generate")
        .body(body::full("prompt"))
        .unwrap();
    // The response head may wait for the first chunk, so the request runs on its own.
    let pending = tokio::spawn(async move { client.send_streaming(req).await });
    let upstream = up.next_stream().await;

    upstream.send("token-1 ");
    let rsp = bounded("the streamed response head", pending)
        .await
        .expect("request task");
    assert_eq!(rsp.status(), 200);
    let mut rsp_body = rsp.into_body();
    // The upstream has produced one chunk only: the caller must already have it.
    assert_eq!(
        next_data(&mut rsp_body).await.as_deref(),
        Some(&b"token-1 "[..])
    );

    upstream.send("token-2 ");
    assert_eq!(
        next_data(&mut rsp_body).await.as_deref(),
        Some(&b"token-2 "[..])
    );

    upstream.send("last");
    upstream.finish();
    // The proxy may split or join frames of the tail; what matters is the bytes and the end.
    let mut rest = Vec::new();
    while let Some(chunk) = next_data(&mut rsp_body).await {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"last");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_first_chunk_reaches_caller_before_upstream_finishes() {
    first_chunk_arrives_before_the_last_is_produced(client::http1, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_first_chunk_reaches_caller_before_upstream_finishes() {
    first_chunk_arrives_before_the_last_is_produced(client::http2, true).await;
}
