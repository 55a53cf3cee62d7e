//! gRPC through two sidecars with real grpcio at both ends: agent A's client -> sidecar A
//! (outbound, `b` is an `http2` service) -> sidecar B (inbound, app protocol `auto`, the
//! default) -> B's grpcio server, which the inbound side reaches over h2c because the call is
//! gRPC. And the mesh's own errors, read by grpcio as gRPC status codes.

use mesh_tests::proxy::{self, TestProxy};
use mesh_tests::python::{self, PyProcess};
use mesh_tests::snapshot::{service, snapshot, ServiceToml};
use serde_json::Value;

/// B's grpcio server behind sidecar B, and sidecar A whose snapshot routes `b` to B's inbound.
struct TwoHops {
    app: PyProcess,
    _b: TestProxy,
    a: TestProxy,
}

async fn two_hops(b_service: impl FnOnce(ServiceToml) -> ServiceToml) -> TwoHops {
    two_hops_to("b", b_service).await
}

/// As [`two_hops`], with A routing `target` to B: a test that reads A's breaker or ejection
/// series names its target alone, since the in-process sidecars of this file share one
/// metrics registry.
async fn two_hops_to(target: &str, b_service: impl FnOnce(ServiceToml) -> ServiceToml) -> TwoHops {
    let app = python::server("grpc_server.py", &[]).await;
    let b = proxy::builder()
        .agent("b")
        .inbound_app(app.addr)
        .start()
        .await;
    let snap = snapshot(1).service(b_service(service(target).http2().endpoint(b.inbound())));
    let a = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;
    TwoHops { app, _b: b, a }
}

/// One unary call from A's grpcio client, naming `authority`.
async fn call(a: &TestProxy, authority: &str, method: &str, payload: &str, timeout: &str) -> Value {
    let addr = a.outbound().to_string();
    python::run(
        "grpc_client.py",
        &[&addr, authority, "call", method, payload, timeout],
    )
    .await
}

fn code(out: &Value) -> u64 {
    out["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("no code: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_four_call_kinds_cross_two_sidecars() {
    let hops = two_hops(|s| s).await;
    let addr = hops.a.outbound().to_string();
    let out = python::run("grpc_client.py", &[&addr, "b", "calls"]).await;
    assert_eq!(out["unary"], "hello", "{out}");
    assert_eq!(
        out["server_stream"],
        serde_json::json!(["item-0", "item-1", "item-2"])
    );
    assert_eq!(out["client_stream"], "a|b|c");
    assert_eq!(out["bidi"], serde_json::json!(["echo:x", "echo:y"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_details_and_binary_trailing_metadata_reach_the_caller() {
    let hops = two_hops(|s| s).await;
    let out = call(&hops.a, "b", "Unary", "status:7:denied by the app", "10").await;
    assert_eq!(code(&out), 7, "{out}");
    assert_eq!(out["details"], "denied by the app");
    assert_eq!(out["trailing"]["x-detail-bin"], "0001feff", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_deadline_ends_the_call_on_time_and_reaches_the_app() {
    let mut hops = two_hops(|s| s).await;
    // The app would take 5 s; the caller gives it 300 ms.
    let out = call(&hops.a, "b", "Sleep", "5000", "0.3").await;
    assert_eq!(code(&out), 4, "{out}");
    let elapsed = out["elapsed_ms"].as_f64().unwrap();
    assert!((290.0..1300.0).contains(&elapsed), "{out}");
    // The cancellation crossed both sidecars: the app saw its client go away.
    hops.app
        .wait_line("the app to see the call cancelled", |l| {
            l == "CANCELLED Sleep"
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_shorter_than_the_deadline_is_deadline_exceeded() {
    let hops = two_hops(|s| s.timeout("200ms")).await;
    let out = call(&hops.a, "b", "Sleep", "5000", "10").await;
    assert_eq!(code(&out), 4, "{out}");
    assert!(
        out["details"].as_str().unwrap().contains("did not answer"),
        "{out}"
    );
    let elapsed = out["elapsed_ms"].as_f64().unwrap();
    assert!((190.0..1200.0).contains(&elapsed), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_and_an_open_breaker_are_unavailable() {
    let hops = two_hops(|s| s).await;
    let out = call(&hops.a, "nobody", "Unary", "x", "10").await;
    assert_eq!(code(&out), 14, "{out}");
    assert!(
        out["details"].as_str().unwrap().contains("no route"),
        "{out}"
    );

    // A target whose only endpoint refuses connections: the first call fails to connect, which
    // opens a one-failure breaker; the next is short-circuited.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let snap = snapshot(1).service(
        service("dead")
            .http2()
            .endpoint(dead)
            .policy("retry", "{ max_attempts = 1 }")
            .policy(
                "breaker",
                "{ consecutive_failures = 1, cooldown = \"30s\", max_cooldown = \"30s\" }",
            ),
    );
    let a = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;
    let first = call(&a, "dead", "Unary", "x", "10").await;
    assert_eq!(code(&first), 14, "{first}");
    let open = call(&a, "dead", "Unary", "x", "10").await;
    assert_eq!(code(&open), 14, "{open}");
    assert!(
        open["details"]
            .as_str()
            .unwrap()
            .contains("circuit breaker"),
        "{open}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_rate_limit_is_resource_exhausted() {
    // The rate limit applies to the Ollama service by name; here it fronts the grpcio app.
    let app = python::server("grpc_server.py", &[]).await;
    let b = proxy::builder()
        .agent("ollama")
        .inbound_app(app.addr)
        .start()
        .await;
    let snap = format!(
        "version = 1\n\n[[services]]\nname = \"ollama\"\nprotocol = \"http2\"\n\
         endpoints = [\"{}\"]\n\n[ollama.rate_limit]\ncritical = \"1/m\"\n",
        b.inbound()
    );
    let a = proxy::builder().agent("a").snapshot(snap).start().await;
    let first = call(&a, "ollama", "Unary", "one", "10").await;
    assert_eq!(code(&first), 0, "{first}");
    let over = call(&a, "ollama", "Unary", "two", "10").await;
    assert_eq!(code(&over), 8, "{over}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_app_behind_its_sidecar_opens_the_callers_breaker_for_grpc_calls() {
    // Sidecar B answers for its dead app with UNAVAILABLE in a 200; sidecar A reads it as the
    // 503 it stands for, so two in a row open A's breaker for B as two 502s would.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let b = proxy::builder().agent("b").inbound_app(dead).start().await;
    let snap = snapshot(1).service(
        service("b-dead")
            .http2()
            .endpoint(b.inbound())
            .policy("retry", "{ max_attempts = 1 }")
            .policy(
                "breaker",
                "{ consecutive_failures = 2, failure_ratio = 0.0, cooldown = \"30s\" }",
            ),
    );
    let a = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;
    for _ in 0..2 {
        let out = call(&a, "b-dead", "Unary", "x", "10").await;
        assert_eq!(code(&out), 14, "{out}");
        assert!(
            !out["details"].as_str().unwrap().contains("circuit breaker"),
            "{out}"
        );
    }
    mesh_tests::metrics::wait_for_metric(
        a.admin(),
        "agent_circuit_breaker_state",
        &[("target", "b-dead"), ("endpoint", "")],
        1.0,
    )
    .await;
    let open = call(&a, "b-dead", "Unary", "x", "10").await;
    assert_eq!(code(&open), 14, "{open}");
    assert!(
        open["details"]
            .as_str()
            .unwrap()
            .contains("circuit breaker"),
        "{open}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callee_sidecars_refusals_are_unavailable_and_leave_the_breaker_closed() {
    // B lets one call reach its app at a time and queues none: while a slow call holds the
    // slot, B refuses the others with UNAVAILABLE marked as a refusal, which A passes on
    // without counting it; two real failures would open A's breaker.
    let mut app = python::server("grpc_server.py", &[]).await;
    let b = proxy::builder()
        .agent("b")
        .inbound_app(app.addr)
        .inbound_limits(1, 0, "1s")
        .start()
        .await;
    let snap = snapshot(1).service(
        service("b-busy")
            .http2()
            .endpoint(b.inbound())
            .policy("retry", "{ max_attempts = 1 }")
            .policy(
                "breaker",
                "{ consecutive_failures = 2, failure_ratio = 0.0, cooldown = \"30s\" }",
            ),
    );
    let a = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;
    let addr = a.outbound().to_string();
    let slow = {
        let addr = addr.clone();
        tokio::spawn(async move {
            python::run(
                "grpc_client.py",
                &[&addr, "b-busy", "call", "Sleep", "2000", "10"],
            )
            .await
        })
    };
    app.wait_line("the slow call to reach the app", |l| l == "STARTED Sleep")
        .await;
    let burst = python::run(
        "grpc_client.py",
        &[&addr, "b-busy", "burst", "Unary", "x", "4"],
    )
    .await;
    for out in burst.as_array().unwrap() {
        assert_eq!(code(out), 14, "{burst}");
        assert!(
            out["details"]
                .as_str()
                .unwrap()
                .contains("concurrency limit"),
            "{burst}"
        );
        assert!(out["trailing"].get("x-mesh-refused").is_none(), "{burst}");
    }
    let slow = mesh_tests::bounded("the slow call", slow)
        .await
        .expect("task");
    assert_eq!(code(&slow), 0, "{slow}");
    // Four refusals, twice the threshold: the breaker is closed and the app is reached.
    let after = call(&a, "b-busy", "Unary", "after", "10").await;
    assert_eq!(code(&after), 0, "{after}");
    assert_eq!(after["reply"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_failing_in_its_trailers_after_a_200_head_counts_for_the_breaker() {
    // grpcio streams a message, then ends the call UNAVAILABLE: the 200 head looked fine, the
    // trailers say otherwise. Two such calls open A's breaker for the target, as two 503s
    // would.
    let hops = two_hops_to("b-trailers", |svc| {
        svc.policy("retry", "{ max_attempts = 1 }").policy(
            "breaker",
            "{ consecutive_failures = 2, failure_ratio = 0.0, cooldown = \"30s\" }",
        )
    })
    .await;
    let addr = hops.a.outbound().to_string();
    let stream = |payload: &'static str| {
        let addr = addr.clone();
        async move { python::run("grpc_client.py", &[&addr, "b-trailers", "stream", payload]).await }
    };
    // A call that ends OK in its trailers leaves the breaker closed.
    let ok = stream("2").await;
    assert_eq!(code(&ok), 0, "{ok}");
    for _ in 0..2 {
        let out = stream("fail:1:14").await;
        assert_eq!(code(&out), 14, "{out}");
        assert_eq!(out["items"], serde_json::json!(["item-0"]), "{out}");
    }
    mesh_tests::metrics::wait_for_metric(
        hops.a.admin(),
        "agent_circuit_breaker_state",
        &[("target", "b-trailers"), ("endpoint", "")],
        1.0,
    )
    .await;
    let open = stream("2").await;
    assert_eq!(code(&open), 14, "{open}");
    assert!(
        open["details"]
            .as_str()
            .is_some_and(|d| d.contains("circuit breaker")),
        "{open}"
    );
    drop(hops.app);
}
