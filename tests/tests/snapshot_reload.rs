//! A new snapshot file replaces the routes without disturbing requests in flight, and a bad one
//! is rejected while the old one stays in force.

use http::Method;
use mesh_tests::client::{self, next_data};
use mesh_tests::proxy;
use mesh_tests::server::{self, SERVED_BY};
use mesh_tests::snapshot::{service, snapshot};
use mesh_tests::{body, bounded};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_keeps_the_stream_in_flight_and_routes_new_requests_anew() {
    let old = server::streaming().label("old").run().await;
    let new = server::fixed(200, "new").label("new").run().await;
    let v1 = snapshot(1).service(service("b").endpoint(old.addr()));
    let v2 = snapshot(2).service(service("b").endpoint(new.addr()));
    let mut proxy = proxy::builder()
        .agent("a")
        .snapshot(v1.to_toml())
        .start()
        .await;
    assert_eq!(proxy.snapshot_version(), 1);
    let client = client::http1(proxy.outbound());

    // A long stream is running on the old endpoint.
    let req = client
        .request(Method::GET, "b", "/stream")
        .body(body::empty())
        .unwrap();
    let pending = tokio::spawn(async move { client.send_streaming(req).await });
    let upstream = old.next_stream().await;
    upstream.send("before ");
    let rsp = bounded("the stream's head", pending)
        .await
        .expect("request task");
    assert_eq!(rsp.headers().get(SERVED_BY).unwrap(), "old");
    let mut stream = rsp.into_body();
    assert_eq!(
        next_data(&mut stream).await.as_deref(),
        Some(&b"before "[..])
    );

    // The swap.
    assert_eq!(proxy.reload(&v2.to_toml()).await, 2);

    // New requests follow the new snapshot...
    let reply = client.get("b", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header(SERVED_BY), Some("new"));
    let health = client::http1(proxy.admin())
        .get("admin", "/health")
        .await
        .json();
    assert_eq!(health["snapshot_version"], 2, "{health}");

    // ...while the stream that began under the old one runs to its end.
    upstream.send("after");
    upstream.finish();
    let mut rest = Vec::new();
    while let Some(chunk) = next_data(&mut stream).await {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"after");
    assert_eq!((old.requests(), new.requests()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshot_file_keeps_the_old_one_and_counts_rejections() {
    let b = server::fixed(200, "b").label("b").run().await;
    let c = server::fixed(200, "c").label("c").run().await;
    let v1 = snapshot(1).service(service("b").endpoint(b.addr()));
    let mut proxy = proxy::builder()
        .agent("a")
        .snapshot(v1.to_toml())
        .start()
        .await;
    let client = client::http1(proxy.outbound());
    assert_eq!(proxy.snapshot_rejections(), 0);

    // Not TOML at all.
    assert_eq!(
        proxy
            .reload_rejected("version = 2\n[[services]\nname = ")
            .await,
        1
    );
    // Valid TOML, invalid snapshot: a route to a service that does not exist.
    let dangling = format!(
        "{}\n[[routes]]\nauthority = \"b\"\nbackend = \"missing\"\n",
        snapshot(3)
            .service(service("b").endpoint(c.addr()))
            .to_toml()
    );
    assert_eq!(proxy.reload_rejected(&dangling).await, 2);

    // Version 1 is still in force and still routes.
    assert_eq!(proxy.snapshot_version(), 1);
    let reply = client.get("b", "/").await;
    assert_eq!(reply.header(SERVED_BY), Some("b"), "{}", reply.text());
    let health = client::http1(proxy.admin())
        .get("admin", "/health")
        .await
        .json();
    assert_eq!(health["snapshot_version"], 1, "{health}");

    // A good file after bad ones applies, and the bad ones were counted once each.
    let v4 = snapshot(4).service(service("b").endpoint(c.addr()));
    assert_eq!(proxy.reload(&v4.to_toml()).await, 4);
    assert_eq!(proxy.snapshot_rejections(), 2);
    assert_eq!(client.get("b", "/").await.header(SERVED_BY), Some("c"));
    assert_eq!(c.requests(), 1);
}
