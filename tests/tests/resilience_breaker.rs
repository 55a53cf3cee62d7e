//! Circuit breakers: a target's breaker opens at its threshold, short-circuits with the
//! configured fallback (no request reaches the upstream), half-opens after the cool-down and
//! closes when the probe succeeds.

use http_body_util::BodyExt;
use mesh_tests::client;
use mesh_tests::metrics::{metric_value, scrape};
use mesh_tests::proxy::{self, TestProxy};
use mesh_tests::server::{self, Server, SERVED_BY};
use mesh_tests::snapshot::{service, snapshot, ServiceToml};
use std::net::SocketAddr;

const STATE: &str = "agent_circuit_breaker_state";

/// Three failures in a row open it; no retries and no ejection, so each request is one attempt.
fn breaking(name: &str, up: &Server) -> ServiceToml {
    service(name)
        .endpoint(up.addr())
        .policy("retry", "{ max_attempts = 1 }")
        .policy("ejection", "{ enabled = false }")
        .policy(
            "breaker",
            "{ consecutive_failures = 3, failure_ratio = 0.0, cooldown = \"300ms\" }",
        )
}

async fn wait_state(admin: SocketAddr, target: &str, endpoint: &str, want: f64) {
    let what = format!("breaker {target}/{endpoint:?} to reach state {want}");
    mesh_tests::eventually(&what, || async {
        let text = scrape(admin).await;
        let v = metric_value(&text, STATE, &[("target", target), ("endpoint", endpoint)]);
        (v == Some(want)).then_some(())
    })
    .await
}

async fn trip(proxy: &TestProxy, name: &str, up: &Server) {
    let c = client::http1(proxy.outbound());
    for _ in 0..3 {
        let reply = c.get(name, "/").await;
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.header(SERVED_BY), Some(up.label()));
    }
    wait_state(proxy.admin(), name, "", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_short_circuits_half_opens_and_closes() {
    let up = server::fixed(200, "ok").label("brk-up").run().await;
    up.set_failing(true);
    let snap = snapshot(1).service(breaking("brk-a", &up));
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    let c = client::http1(proxy.outbound());

    // Three 503s from the upstream open the breaker.
    trip(&proxy, "brk-a", &up).await;

    // Open: the default fallback answers at once, naming the breaker; nothing is sent.
    let reply = c.get("brk-a", "/").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error"], "breaker_open");
    assert_eq!(reply.json()["breaker"]["target"], "brk-a");
    assert!(reply.header("retry-after").is_some());
    assert_eq!(up.requests(), 3);

    // The upstream recovers; after the cool-down the breakers half-open...
    up.set_failing(false);
    let ep = up.addr().to_string();
    wait_state(proxy.admin(), "brk-a", &ep, 2.0).await;
    wait_state(proxy.admin(), "brk-a", "", 2.0).await;
    // ...and one successful probe closes them.
    let reply = c.get("brk-a", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    wait_state(proxy.admin(), "brk-a", "", 0.0).await;
    let reply = c.get("brk-a", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.requests(), 5);

    let text = scrape(proxy.admin()).await;
    let opened = metric_value(
        &text,
        "agent_circuit_breaker_transitions_total",
        &[("target", "brk-a"), ("endpoint", ""), ("to", "open")],
    );
    assert_eq!(opened, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_fallback_answers_while_open() {
    let up = server::fixed(200, "ok").label("brk-up").run().await;
    up.set_failing(true);
    let snap = snapshot(1).service(breaking("brk-s", &up).policy(
        "fallback",
        "{ kind = \"static\", status = 200, headers = { x-fallback = \"1\" }, body = { answer = \"cached\" } }",
    ));
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    trip(&proxy, "brk-s", &up).await;

    let reply = client::http1(proxy.outbound()).get("brk-s", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["answer"], "cached");
    assert_eq!(reply.header("x-fallback"), Some("1"));
    assert_eq!(up.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_target_takes_the_request_while_open() {
    let up = server::fixed(200, "ok").label("brk-up").run().await;
    up.set_failing(true);
    let alt = server::echo().label("brk-alt").run().await;
    let snap = snapshot(1)
        .service(
            breaking("brk-t", &up)
                .policy("fallback", "{ kind = \"target\", service = \"brk-alt\" }"),
        )
        .service(service("brk-alt").endpoint(alt.addr()));
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    trip(&proxy, "brk-t", &up).await;

    let reply = client::http1(proxy.outbound()).get("brk-t", "/x").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header(SERVED_BY), Some("brk-alt"));
    assert_eq!(reply.json()["path"], "/x");
    assert_eq!(up.requests(), 3);
}

/// A 200 head whose stream the upstream then lets fall silent is a failure too: outcomes of
/// answers that look fine by their status are judged when the body ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_broken_off_after_a_good_head_open_it() {
    let up = server::streaming().label("brk-idle").run().await;
    let snap = snapshot(1).service(breaking("brk-idle", &up).stream_idle_timeout("200ms"));
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    let c = client::http1(proxy.outbound());
    for _ in 0..3 {
        let req = c
            .request(http::Method::GET, "brk-idle", "/")
            .body(mesh_tests::body::empty())
            .unwrap();
        let pending = tokio::spawn(async move { c.send_streaming(req).await });
        let upstream = up.next_stream().await;
        upstream.send("first");
        let rsp = mesh_tests::bounded("the head", pending)
            .await
            .expect("task");
        assert_eq!(rsp.status(), 200);
        // The caller reads until the sidecar cuts the silent stream.
        let mut body = rsp.into_body();
        while let Some(Ok(_)) = mesh_tests::bounded("a frame", body.frame()).await {}
        drop(upstream);
    }
    wait_state(proxy.admin(), "brk-idle", "", 1.0).await;
    let reply = c.get("brk-idle", "/").await;
    assert_eq!(reply.json()["error"], "breaker_open", "{}", reply.text());
    assert_eq!(up.requests(), 3);
}
