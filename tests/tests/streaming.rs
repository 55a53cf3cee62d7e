//! Response bodies stream through the sidecar: the caller reads each chunk while the upstream
//! has not yet produced the next one.

use http::Method;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mesh_tests::body::BodySender;
use mesh_tests::client::{self, next_data, Client};
use mesh_tests::metrics::{metric_value, scrape};
use mesh_tests::proxy::{self, TestProxy};
use mesh_tests::server::{self, Server};
use mesh_tests::snapshot::{service, snapshot, ServiceToml};
use mesh_tests::{body, bounded};

/// A sidecar in front of a streaming upstream (service `svc`, endpoint added here) and one
/// POST streamed through it: returns the proxy, the caller's body with the upstream's first
/// chunk `token-1 ` already read from it, and the upstream's side of the stream.
async fn stream_first_token(
    svc: ServiceToml,
    make_client: fn(std::net::SocketAddr) -> Client,
) -> (TestProxy, Incoming, BodySender, Server) {
    let up = server::streaming().label("tokens").run().await;
    let name = svc.name().to_owned();
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(snapshot(1).service(svc.endpoint(up.addr())).to_toml())
        .start()
        .await;
    let client = make_client(proxy.outbound());

    let req = client
        .request(Method::POST, &name, "/generate")
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
    (proxy, rsp_body, upstream, up)
}

async fn first_chunk_arrives_before_the_last_is_produced(
    make_client: fn(std::net::SocketAddr) -> Client,
    h2_upstream: bool,
) {
    let mut svc = service("llm");
    if h2_upstream {
        svc = svc.http2();
    }
    let (_proxy, mut rsp_body, upstream, _up) = stream_first_token(svc, make_client).await;

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

/// The route timeout bounds the wait for the head only; a stream that falls silent afterwards
/// is cut once it has sent nothing for the service's `stream_idle_timeout`, and counted.
async fn a_stream_that_falls_silent_is_cut(
    name: &str,
    make_client: fn(std::net::SocketAddr) -> Client,
) {
    // A service of its own per test: the tests of one binary share one metrics recorder.
    let svc = service(name).stream_idle_timeout("300ms");
    let (proxy, mut rsp_body, upstream, _up) = stream_first_token(svc, make_client).await;

    // The upstream keeps its connection open and sends nothing more: the caller sees the
    // stream end in an error (HTTP/1.1: the connection closes mid-body; HTTP/2: RST_STREAM),
    // not hang and not a clean (truncated) end.
    let end = bounded("the cut stream", rsp_body.frame()).await;
    assert!(matches!(end, Some(Err(_))), "{end:?}");
    let text = scrape(proxy.admin()).await;
    let labels = [("target", name), ("kind", "upstream_idle")];
    assert_eq!(
        metric_value(&text, "agent_errors_total", &labels),
        Some(1.0),
        "{text}"
    );
    drop(upstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_a_stream_that_falls_silent_is_cut_after_the_idle_timeout() {
    a_stream_that_falls_silent_is_cut("stalls-h1", client::http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_a_stream_that_falls_silent_is_cut_after_the_idle_timeout() {
    a_stream_that_falls_silent_is_cut("stalls-h2", client::http2).await;
}
