//! Refusals are not failures: answers the mesh makes to shed load (the Ollama gateway's full or
//! timed-out queue, the inbound concurrency queue) carry `x-mesh-refused`, which the caller's
//! sidecar takes off and never counts against the target's breaker or endpoint. A real failure
//! of the same target still opens the breaker.

use http::Method;
use mesh_tests::metrics::{metric_or_zero, scrape, wait_for_metric};
use mesh_tests::ollama::{self, gateway_policy};
use mesh_tests::proxy::{self, TestProxy};
use mesh_tests::snapshot::{service, snapshot, ServiceToml};
use mesh_tests::{body, bounded, client, server};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, MutexGuard};

/// Gateway metrics are process-wide; the gateway scenarios run one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

async fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Two failures in a row would open the target's breaker; one attempt per call.
fn guarded(name: &str, endpoint: SocketAddr) -> ServiceToml {
    service(name)
        .http2()
        .endpoint(endpoint)
        .policy("retry", "{ max_attempts = 1 }")
        .policy(
            "breaker",
            "{ consecutive_failures = 2, failure_ratio = 0.0, cooldown = \"30s\" }",
        )
}

fn generate(outbound: SocketAddr, prompt: &str) -> tokio::task::JoinHandle<client::Reply> {
    let c = client::http1(outbound);
    let req = c
        .request(Method::POST, "ollama", "/api/generate")
        .header("content-type", "application/json")
        .body(body::full(format!(
            "{{\"model\":\"fake\",\"prompt\":{prompt:?},\"stream\":false}}"
        )))
        .unwrap();
    tokio::spawn(async move { c.send(req).await })
}

async fn breaker_state(proxy: &TestProxy, target: &str) -> f64 {
    let text = scrape(proxy.admin()).await;
    metric_or_zero(
        &text,
        "agent_circuit_breaker_state",
        &[("target", target), ("endpoint", "")],
    )
}

/// The gateway (agent `ollama`) in front of `ollama_addr`, and agent `a`'s sidecar routing
/// `ollama` to it.
async fn gateway_and_caller(ollama_addr: SocketAddr, policy: &str) -> (TestProxy, TestProxy) {
    let gw = proxy::builder()
        .agent("ollama")
        .ollama_gateway(ollama_addr)
        .snapshot(format!(
            "version = 1\n\n[[services]]\nname = \"a\"\nphase = \"critical\"\n{policy}"
        ))
        .start()
        .await;
    let snap = snapshot(1).service(guarded("ollama", gw.inbound()));
    let a = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;
    (gw, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_gateway_refusals_leaves_the_callers_breaker_closed() {
    let _serial = one_at_a_time().await;
    let ollama = ollama::fake().hold().chunks(0).run().await;
    let policy = gateway_policy(1, "300ms", "queue = { critical = 1 }");
    let (gw, a) = gateway_and_caller(ollama.addr(), &policy).await;

    // Ollama is busy with one generation...
    let busy = generate(a.outbound(), "busy");
    ollama.wait_started(1).await;
    // ...so of four more, one waits in the queue until it times out and three find it full.
    let burst: Vec<_> = (0..4)
        .map(|i| generate(a.outbound(), &format!("refused-{i}")))
        .collect();
    let mut reasons = Vec::new();
    for call in burst {
        let reply = bounded("a refused call", call).await.expect("task");
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert!(reply.header("retry-after").is_some());
        assert_eq!(
            reply.header("x-mesh-refused"),
            None,
            "the agent never sees it"
        );
        reasons.push(reply.json()["reason"].as_str().unwrap().to_owned());
    }
    reasons.sort();
    assert_eq!(
        reasons,
        ["queue_full", "queue_full", "queue_full", "queue_timeout"]
    );

    // Four refusals, twice the breaker's threshold: it stays closed and the next call reaches
    // Ollama as soon as the slot is free.
    assert_eq!(breaker_state(&a, "ollama").await, 0.0);
    ollama.release(2);
    let reply = bounded("the busy generation", busy).await.expect("task");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = bounded("a call after the burst", generate(a.outbound(), "after"))
        .await
        .expect("task");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(ollama.prompts(), ["busy", "after"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ollama_that_is_down_still_opens_the_callers_breaker() {
    let _serial = one_at_a_time().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let (gw, a) = gateway_and_caller(dead, &gateway_policy(1, "1s", "")).await;

    for i in 0..2 {
        let reply = bounded("a failed call", generate(a.outbound(), &format!("f{i}")))
            .await
            .expect("task");
        assert!(reply.status.is_server_error(), "{}", reply.text());
        assert_ne!(reply.json()["error"], "breaker_open", "{}", reply.text());
    }
    wait_for_metric(
        a.admin(),
        "agent_circuit_breaker_state",
        &[("target", "ollama"), ("endpoint", "")],
        1.0,
    )
    .await;
    let reply = bounded("a call while open", generate(a.outbound(), "open"))
        .await
        .expect("task");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error"], "breaker_open", "{}", reply.text());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_queue_refusals_are_neither_failures_nor_seen_by_the_agent() {
    let app = server::fixed(200, "ok").hold().run().await;
    let b = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .inbound_limits(1, 0, "1s")
        .start()
        .await;
    let snap = snapshot(1).service(guarded("b", b.inbound()));
    let a = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;
    let c = client::http1(a.outbound());

    // One request holds the app's only slot; the next four are refused at once.
    let held = tokio::spawn(async move { c.get("b", "/held").await });
    app.wait_requests(1).await;
    for _ in 0..4 {
        let reply = c.get("b", "/").await;
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.json()["error"], "overloaded");
        assert_eq!(reply.header("x-mesh-refused"), None);
    }
    assert_eq!(breaker_state(&a, "b").await, 0.0);
    app.release(2);
    assert_eq!(bounded("held", held).await.expect("task").status, 200);
    assert_eq!(c.get("b", "/after").await.status, 200);
    assert_eq!(app.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_refusal_waits_for_retry_after() {
    let app = server::fixed(200, "ok").hold().run().await;
    let b = proxy::builder()
        .agent("b2")
        .inbound_app(app.addr())
        .inbound_limits(1, 0, "1s")
        .start()
        .await;
    let snap = snapshot(1).service(
        service("b2")
            .http2()
            .endpoint(b.inbound())
            .policy("retry", "{ max_attempts = 2, backoff = \"1ms\" }"),
    );
    let a = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;
    let c = client::http1(a.outbound());
    let held = tokio::spawn(async move { c.get("b2", "/held").await });
    app.wait_requests(1).await;

    // The first attempt is refused with `Retry-After: 1`; the slot frees meanwhile, and the
    // retry, sent after the second the refusal asked for rather than after 1 ms, gets through.
    let started = Instant::now();
    let call = tokio::spawn(async move { c.get("b2", "/retried").await });
    wait_for_metric(
        b.admin(),
        "agent_errors_total",
        &[
            ("agent", "b2"),
            ("direction", "inbound"),
            ("kind", "overloaded"),
        ],
        1.0,
    )
    .await;
    app.release(2);
    assert_eq!(bounded("held", held).await.expect("task").status, 200);
    let reply = bounded("the retried call", call).await.expect("task");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(started.elapsed() >= Duration::from_secs(1));
}
