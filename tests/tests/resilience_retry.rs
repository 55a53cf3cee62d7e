//! Retries: only safe requests are replayed, the retry goes to another endpoint, and under a
//! fully failing upstream the retry budget keeps the load near the offered load.

use http::Method;
use mesh_tests::client;
use mesh_tests::h2_peer::{self, Refusal};
use mesh_tests::proxy;
use mesh_tests::server::{self, SERVED_BY};
use mesh_tests::snapshot::{route, service, snapshot, ServiceToml};

/// Retries on, breakers and ejection off, so every attempt reaches an upstream.
const RETRY: &str = "{ max_attempts = 3, backoff = \"1ms\", max_backoff = \"5ms\" }";

/// Service `name` with `retry` as its retry policy and no breaker or ejection in the way.
fn retrying(name: &str, retry: &str) -> ServiceToml {
    service(name)
        .policy("retry", retry)
        .policy("breaker", "{ enabled = false }")
        .policy("ejection", "{ enabled = false }")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_lands_on_the_other_endpoint() {
    // Each endpoint fails its first request: a retry to the same endpoint would succeed on
    // the second attempt and leave the other untouched.
    let x = server::fixed(200, "x").label("x").fail_first(1).run().await;
    let y = server::fixed(200, "y").label("y").fail_first(1).run().await;
    let snap = snapshot(1).service(
        retrying("rt-a", RETRY)
            .endpoint(x.addr())
            .endpoint(y.addr()),
    );
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;

    let reply = client::http1(proxy.outbound()).get("rt-a", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(x.requests() + y.requests(), 3);
    assert!(x.requests() >= 1 && y.requests() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_replayed_only_with_opt_in() {
    let up = server::fixed(200, "done")
        .label("p")
        .fail_first(2)
        .run()
        .await;
    let snap = snapshot(1).service(retrying("rt-p", RETRY).endpoint(up.addr()));
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    let c = client::http1(proxy.outbound());

    // Without opt-in a failed POST is answered as is: the upstream saw it once.
    let req = c
        .request(Method::POST, "rt-p", "/orders")
        .body(mesh_tests::body::full("order"))
        .unwrap();
    let reply = c.send(req).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(up.requests(), 1);

    // With `x-mesh-retryable: true` it is replayed, body and all.
    let req = c
        .request(Method::POST, "rt-p", "/orders")
        .header("x-mesh-retryable", "true")
        .body(mesh_tests::body::full("order"))
        .unwrap();
    let reply = c.send(req).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header(SERVED_BY), Some("p"));
    assert_eq!(up.requests(), 3);
    assert_eq!(up.methods(), ["POST", "POST", "POST"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_rule_opts_its_posts_into_retries() {
    let up = server::fixed(200, "done")
        .label("r")
        .fail_first(1)
        .run()
        .await;
    let snap = snapshot(1)
        .service(retrying("rt-r", RETRY).endpoint(up.addr()))
        .route(
            route("rt-r", "rt-r")
                .path_prefix("/jobs/")
                .retry_non_idempotent(),
        );
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    let c = client::http1(proxy.outbound());
    let post = |path: &str| {
        c.request(Method::POST, "rt-r", path)
            .body(mesh_tests::body::full("job"))
            .unwrap()
    };

    // On the opted-in route the first 503 is replayed without any header from the caller.
    let reply = c.send(post("/jobs/1")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.methods(), ["POST", "POST"]);

    // Elsewhere on the same service a POST is still sent once.
    up.set_failing(true);
    let reply = c.send(post("/other")).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(up.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_stops_a_retry_storm() {
    const OFFERED: u64 = 200;
    let up = server::fixed(200, "ok").label("down").run().await;
    up.set_failing(true);
    let snap = snapshot(1).service(
        retrying(
            "rt-b",
            "{ max_attempts = 3, backoff = \"1ms\", max_backoff = \"1ms\", budget_ratio = 0.2, budget_min_per_second = 0 }",
        )
        .endpoint(up.addr()),
    );
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    let c = client::http1(proxy.outbound());
    let mut conn = c.connect().await;
    for _ in 0..OFFERED {
        let req = c
            .request(Method::GET, "rt-b", "/")
            .body(mesh_tests::body::empty())
            .unwrap();
        assert_eq!(conn.send(req).await.status, 503);
    }
    // Without a budget the upstream would see 3x; with it at most 1.2x (the budget's counters
    // may let one extra retry through per racing bucket reset).
    let seen = up.requests();
    assert!(seen > OFFERED, "no retries at all: {seen}");
    assert!(
        seen <= OFFERED + OFFERED / 5 + 2,
        "upstream saw {seen} requests for {OFFERED} offered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_post_streams_at_once_and_is_replayed_after_a_503() {
    let up = server::echo_body().label("c").fail_first(1).run().await;
    let snap = snapshot(1).service(retrying("rt-c", RETRY).endpoint(up.addr()));
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    let c = client::http1(proxy.outbound());

    // A body of unknown length (chunked), opted in to retries.
    let (tx, body) = mesh_tests::body::channel();
    let req = c
        .request(Method::POST, "rt-c", "/upload")
        .header("x-mesh-retryable", "true")
        .body(body)
        .unwrap();
    let reply = tokio::spawn(async move { c.send(req).await });
    tx.send("first chunk, ");
    // The first attempt reaches the upstream before the body has ended: nothing waited for it.
    up.wait_requests(1).await;
    tx.send("second chunk");
    tx.finish();

    // The upstream answered the first attempt 503; the retry carried the whole body again.
    let reply = mesh_tests::bounded("the replayed POST", reply)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "first chunk, second chunk");
    assert_eq!(up.methods(), ["POST", "POST"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_bound_is_sent_once() {
    let up = server::echo_body().label("o").fail_first(1).run().await;
    let snap = snapshot(1).service(
        retrying(
            "rt-o",
            "{ max_attempts = 3, backoff = \"1ms\", max_backoff = \"5ms\", max_body_bytes = 16 }",
        )
        .endpoint(up.addr()),
    );
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    let c = client::http1(proxy.outbound());
    let (tx, body) = mesh_tests::body::channel();
    let req = c.request(Method::PUT, "rt-o", "/big").body(body).unwrap();
    let reply = tokio::spawn(async move { c.send(req).await });
    for _ in 0..3 {
        tx.send("0123456789");
    }
    tx.finish();
    // A PUT is idempotent, but 30 bytes outgrew the 16-byte bound mid-stream: the 503 stands.
    let reply = mesh_tests::bounded("the PUT", reply).await.unwrap();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(up.requests(), 1);
}

/// An HTTP/2 peer that turns a stream away unprocessed (RFC 9113 8.7) lets any request, a POST
/// included, go out again: nothing of it was acted on.
async fn a_post_turned_away_unprocessed_is_sent_again(
    refusal: Refusal,
    svc: &str,
) -> h2_peer::Peer {
    let peer = h2_peer::refusing_first(refusal).await;
    let snap = snapshot(1).service(retrying(svc, RETRY).endpoint(peer.addr()).http2());
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    let c = client::http1(proxy.outbound());
    let req = c
        .request(Method::POST, svc, "/orders")
        .body(mesh_tests::body::full("one order"))
        .unwrap();
    let reply = c.send(req).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!((peer.refused(), peer.answered()), (1, 1));
    peer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_refused_by_an_http2_peer_is_sent_again() {
    let peer = a_post_turned_away_unprocessed_is_sent_again(Refusal::RefusedStream, "rt-rs").await;
    // REFUSED_STREAM leaves the connection usable: the retry went out on it.
    assert_eq!(peer.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_above_a_goaway_last_stream_is_sent_again() {
    let peer = a_post_turned_away_unprocessed_is_sent_again(Refusal::GoAway, "rt-ga").await;
    // The connection that sent GOAWAY takes no new stream: the retry opened another.
    assert_eq!(peer.connections(), 2);
}
