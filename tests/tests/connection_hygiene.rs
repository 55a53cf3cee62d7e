//! Connection hygiene: when an upstream closes an idle keep-alive connection (HTTP/1.1) or
//! sends GOAWAY (HTTP/2), requests that had not been sent on that connection go to a fresh one
//! and succeed: the caller never sees a 502 for the peer's housekeeping.
//!
//! Retries are off, so a request that failed on a dead connection would reach the caller.

use http::Method;
use mesh_tests::client;
use mesh_tests::proxy;
use mesh_tests::server::{self, SERVED_BY};
use mesh_tests::snapshot::{service, snapshot, ServiceToml};

const ROUNDS: u64 = 20;

fn no_retries(svc: ServiceToml) -> ServiceToml {
    svc.policy("retry", "{ max_attempts = 1 }")
        .policy("breaker", "{ enabled = false }")
        .policy("ejection", "{ enabled = false }")
}

async fn survives_closes(svc: &str, http2: bool) {
    let up = server::echo_body().label(svc).run().await;
    let mut s = service(svc).endpoint(up.addr());
    if http2 {
        s = s.http2();
    }
    let proxy = proxy::builder()
        .snapshot(snapshot(1).service(no_retries(s)).to_toml())
        .start()
        .await;
    let c = client::http1(proxy.outbound());
    for round in 0..ROUNDS {
        // A POST: never retried by the proxy, so only a fresh connection can save it.
        let req = c
            .request(Method::POST, svc, "/")
            .body(mesh_tests::body::full(format!("round {round}")))
            .unwrap();
        let reply = c.send(req).await;
        assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
        assert_eq!(reply.header(SERVED_BY), Some(svc));
        assert_eq!(reply.text(), format!("round {round}"));
        // The proxy now holds a pooled connection; the upstream closes it behind its back.
        up.close_connections().await;
    }
    // Each request went out once, each on a connection of its own.
    assert_eq!(up.requests(), ROUNDS);
    assert_eq!(up.connections(), ROUNDS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_connection_closed_by_the_peer_is_not_reused() {
    survives_closes("hy-h1", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_goaway_sends_later_requests_to_a_fresh_connection() {
    survives_closes("hy-h2", true).await;
}
