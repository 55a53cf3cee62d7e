//! Host hygiene: two `Host` headers are refused with 400 on both listeners (RFC 9112 3.2);
//! over HTTP/2 the `Host` that reaches the next hop agrees with the `:authority` that routed the
//! request; two services sharing an endpoint address have separate endpoint breakers, labelled
//! with their own names.

use http::Method;
use mesh_tests::client::{self, raw_exchange, raw_status};
use mesh_tests::metrics::{metric_value, scrape, wait_for_metric};
use mesh_tests::proxy;
use mesh_tests::snapshot::{service, snapshot};
use mesh_tests::{body, server};

const TWO_HOSTS: &[u8] = b"GET / HTTP/1.1\r\nHost: b\r\nHost: c\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_headers_are_a_bad_request_on_both_listeners() {
    let app = server::echo().label("b").run().await;
    let b = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .snapshot(
            snapshot(1)
                .service(service("b").endpoint(app.addr()))
                .to_toml(),
        )
        .start()
        .await;
    for (listener, addr) in [("outbound", b.outbound()), ("inbound", b.inbound())] {
        let rsp = raw_exchange(addr, TWO_HOSTS).await;
        assert_eq!(
            raw_status(&rsp),
            Some(400),
            "{listener}: {}",
            String::from_utf8_lossy(&rsp)
        );
    }
    assert_eq!(app.requests(), 0, "neither reached the app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_the_forwarded_host_is_the_authority_that_routed() {
    let b = server::echo().label("b").run().await;
    let c = server::echo().label("c").run().await;
    let snap = snapshot(1)
        .service(service("b").endpoint(b.addr()))
        .service(service("c").endpoint(c.addr()));
    let a = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;
    let h2 = client::http2(a.outbound());
    let req = h2
        .request(Method::GET, "b", "/")
        .header("host", "c")
        .body(body::empty())
        .unwrap();
    let reply = h2.send(req).await;
    assert_eq!(reply.header("x-served-by"), Some("b"), "{}", reply.text());
    assert_eq!(b.hosts(), ["b"]);
    assert_eq!(c.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_sharing_an_endpoint_have_their_own_breakers() {
    let up = server::fixed(200, "ok").label("shared").run().await;
    up.set_failing(true);
    let policy = |s: mesh_tests::snapshot::ServiceToml| {
        s.endpoint(up.addr())
            .policy("retry", "{ max_attempts = 1 }")
            .policy("ejection", "{ enabled = false }")
            .policy(
                "breaker",
                "{ consecutive_failures = 2, failure_ratio = 0.0, cooldown = \"30s\" }",
            )
    };
    let snap = snapshot(1)
        .service(policy(service("hh-b")))
        .service(policy(service("hh-canary")));
    let a = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;
    let c = client::http1(a.outbound());
    for _ in 0..2 {
        assert_eq!(c.get("hh-b", "/").await.status, 503);
    }
    let ep = up.addr().to_string();
    let labels = |target| [("target", target), ("endpoint", ep.as_str())];
    wait_for_metric(
        a.admin(),
        "agent_circuit_breaker_state",
        &labels("hh-b"),
        1.0,
    )
    .await;
    // The canary shares the address but not the breaker: it is still tried.
    up.set_failing(false);
    let reply = c.get("hh-canary", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let text = scrape(a.admin()).await;
    let canary = metric_value(&text, "agent_circuit_breaker_state", &labels("hh-canary"));
    assert_ne!(canary, Some(1.0), "{text}");
}
