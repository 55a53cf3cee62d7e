//! Tracing across the mesh (Rule 28): one call is one trace from the caller's sidecar to the
//! callee's app, retries show as attempts, B3 callers join W3C traces, sampling follows the
//! policy without a restart, spans reach the collector over OTLP/HTTP or OTLP/gRPC, and a
//! collector that hangs or refuses costs requests nothing.

use mesh_tests::client;
use mesh_tests::metrics::{metric_value, scrape, wait_for_metric};
use mesh_tests::otlp::{self, RecordedSpan};
use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};

/// SpanKind in OTLP: SERVER = 2, CLIENT = 3.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

fn with_sampling(toml: String, ratio: &str) -> String {
    format!("{toml}\n[trace]\nsampling = {ratio}\n")
}

fn one(spans: &[RecordedSpan], what: impl Fn(&RecordedSpan) -> bool) -> &RecordedSpan {
    let found: Vec<_> = spans.iter().filter(|s| what(s)).collect();
    assert_eq!(found.len(), 1, "{spans:#?}");
    found[0]
}

/// `00-<trace>-<parent>-<flags>` as the app received it.
fn traceparent_of(app: &server::Server) -> (String, String, String) {
    let headers = app.request_headers();
    let last = headers.last().expect("the app got the request");
    let tp = last
        .get("traceparent")
        .expect("the app got a traceparent")
        .to_str()
        .unwrap()
        .to_owned();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_across_two_sidecars_is_one_trace() {
    let collector = otlp::collector().await;
    let app_b = server::fixed(200, "from b").run().await;
    let sidecar_b = proxy::builder()
        .agent("tr-b")
        .inbound_app(app_b.addr())
        .snapshot(with_sampling(snapshot(1).to_toml(), "1.0"))
        .bootstrap_extra(&otlp::trace_bootstrap(&collector.endpoint()))
        .start()
        .await;
    let snap = snapshot(1).service(service("tr-b").http2().endpoint(sidecar_b.inbound()));
    let sidecar_a = proxy::builder()
        .agent("tr-a")
        .phase("performance")
        .snapshot(with_sampling(snap.to_toml(), "1.0"))
        .bootstrap_extra(&otlp::trace_bootstrap(&collector.endpoint()))
        .start()
        .await;

    let reply = client::http1(sidecar_a.outbound())
        .get("tr-b", "/v1/answer")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // The client span and the server span (a lone attempt has no span of its own).
    let spans = collector.wait_spans(2).await;
    let client_span = one(&spans, |s| s.kind == CLIENT && s.service == "tr-a");
    let server_span = one(&spans, |s| s.kind == SERVER && s.service == "tr-b");
    assert!(
        spans.iter().all(|s| s.trace_id == client_span.trace_id),
        "{spans:#?}"
    );
    // The callee's server span is a child of the caller's client span.
    assert_eq!(server_span.parent_span_id, client_span.span_id);
    // The agent sent no context: the trace starts at its sidecar.
    assert_eq!(client_span.parent_span_id, "");

    let a = &client_span.attributes;
    assert_eq!(client_span.name, "GET");
    assert_eq!(a["http.request.method"], "GET");
    assert_eq!(a["url.path"], "/v1/answer");
    assert_eq!(a["server.address"], "tr-b");
    assert_eq!(a["http.response.status_code"], "200");
    assert_eq!(a["agent.id"], "tr-a");
    assert_eq!(a["agent.phase"], "performance");
    assert_eq!(a["target.agent"], "tr-b");
    assert_eq!(a["operation.type"], "http");
    let b = &server_span.attributes;
    assert_eq!(b["agent.id"], "tr-b");
    assert_eq!(b["mesh.caller"], "tr-a");
    assert_eq!(b["http.response.status_code"], "200");

    // Agent B saw the same trace, with B's server span as its parent.
    let (trace, parent, flags) = traceparent_of(&app_b);
    assert_eq!(trace, client_span.trace_id);
    assert_eq!(parent, server_span.span_id);
    assert_eq!(flags, "01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_call_shows_two_attempts() {
    let collector = otlp::collector().await;
    let up = server::fixed(200, "ok").fail_first(1).run().await;
    let snap = snapshot(1).service(
        service("tr-retry")
            .endpoint(up.addr())
            .policy("retry", "{ max_attempts = 3, backoff = \"1ms\" }")
            .policy("breaker", "{ enabled = false }")
            .policy("ejection", "{ enabled = false }"),
    );
    let sidecar = proxy::builder()
        .snapshot(with_sampling(snap.to_toml(), "1.0"))
        .bootstrap_extra(&otlp::trace_bootstrap(&collector.endpoint()))
        .start()
        .await;
    let reply = client::http1(sidecar.outbound()).get("tr-retry", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let spans = collector.wait_spans(3).await;
    let client_span = one(&spans, |s| s.kind == CLIENT);
    let mut attempts: Vec<_> = spans.iter().filter(|s| s.name == "attempt").collect();
    attempts.sort_by_key(|s| s.attributes["mesh.attempt"].clone());
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    for (i, at) in attempts.iter().enumerate() {
        assert_eq!(at.parent_span_id, client_span.span_id);
        assert_eq!(at.attributes["mesh.attempt"], (i + 1).to_string());
        assert_eq!(
            at.attributes["network.peer.port"],
            up.addr().port().to_string()
        );
    }
    assert_eq!(attempts[0].attributes["mesh.attempt.outcome"], "failed");
    assert!(attempts[0].error);
    assert_eq!(attempts[1].attributes["mesh.attempt.outcome"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_b3_callers_trace_id_survives_into_w3c() {
    let collector = otlp::collector().await;
    let app = server::fixed(200, "ok").run().await;
    let snap = snapshot(1).service(service("tr-b3").endpoint(app.addr()));
    let sidecar = proxy::builder()
        .snapshot(with_sampling(snap.to_toml(), "0"))
        .bootstrap_extra(&otlp::trace_bootstrap(&collector.endpoint()))
        .start()
        .await;
    let c = client::http1(sidecar.outbound());
    let req = c
        .request(http::Method::GET, "tr-b3", "/")
        .header("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")
        .body(mesh_tests::body::empty())
        .unwrap();
    assert_eq!(c.send(req).await.status, 200);
    let (trace, _, flags) = traceparent_of(&app);
    assert_eq!(trace, "80f198ee56343ba864fe8b2a57d3eff7");
    // The caller's `sampled` decision is kept although the policy samples nothing.
    assert_eq!(flags, "01");
    let seen = app.request_headers();
    assert!(
        !seen.last().unwrap().contains_key("b3"),
        "B3 is translated, not forwarded"
    );
    let spans = collector.wait_spans(1).await;
    let client_span = one(&spans, |s| s.kind == CLIENT);
    assert_eq!(client_span.trace_id, trace);
    assert_eq!(client_span.parent_span_id, "e457b5a2e4d86bd1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_follows_the_policy_without_a_restart() {
    let collector = otlp::collector().await;
    let app = server::fixed(200, "ok").run().await;
    let snap = |v| snapshot(v).service(service("tr-s").endpoint(app.addr()));
    let mut sidecar = proxy::builder()
        .snapshot(with_sampling(snap(1).to_toml(), "0"))
        .bootstrap_extra(&otlp::trace_bootstrap(&collector.endpoint()))
        .start()
        .await;
    let c = client::http1(sidecar.outbound());

    // Sampling 0: nothing is exported, the context still travels (not sampled).
    for _ in 0..20 {
        assert_eq!(c.get("tr-s", "/").await.status, 200);
    }
    let (trace, _, flags) = traceparent_of(&app);
    assert_eq!(trace.len(), 32);
    assert_eq!(flags, "00");

    // Sampling 1 from the next snapshot on: every call is exported.
    sidecar
        .reload(&with_sampling(snap(2).to_toml(), "1.0"))
        .await;
    for _ in 0..5 {
        assert_eq!(c.get("tr-s", "/").await.status, 200);
    }
    let spans = collector.wait_spans(5).await;
    let clients = spans.iter().filter(|s| s.kind == CLIENT).count();
    // All five, and none of the twenty before: a flush of those would have come first.
    assert_eq!(clients, 5, "{spans:#?}");
    let (_, _, flags) = traceparent_of(&app);
    assert_eq!(flags, "01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_collector_costs_requests_nothing_and_drops_are_counted() {
    let collector = otlp::hanging_collector().await;
    let app = server::fixed(200, "ok").run().await;
    let snap = snapshot(1).service(service("tr-h").endpoint(app.addr()));
    let boot = format!(
        "\n[trace]\nendpoint = {:?}\nqueue_size = 4\nmax_batch = 2\nflush_interval = \"5ms\"\nexport_timeout = \"30s\"\n",
        collector.endpoint()
    );
    let sidecar = proxy::builder()
        .snapshot(with_sampling(snap.to_toml(), "1.0"))
        .bootstrap_extra(&boot)
        .start()
        .await;
    let c = client::http1(sidecar.outbound());
    let started = std::time::Instant::now();
    for _ in 0..50 {
        assert_eq!(c.get("tr-h", "/").await.status, 200);
    }
    // The export in flight hangs for 30 s; the requests did not wait for it.
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let dropped = wait_for_metric(
        sidecar.admin(),
        "agent_trace_spans_dropped_total",
        &[("reason", "queue_full")],
        1.0,
    )
    .await;
    assert!(dropped >= 1.0);
    let text = scrape(sidecar.admin()).await;
    assert!(metric_value(&text, "agent_trace_spans_dropped_total", &[]).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ollama_call_shows_its_queue_wait_and_its_generation() {
    let collector = otlp::collector().await;
    let ollama = mesh_tests::ollama::fake().run().await;
    let snap = format!(
        "version = 1\n\n[[services]]\nname = \"tr-caller\"\nphase = \"critical\"\n{}",
        mesh_tests::ollama::gateway_policy(1, "5s", "")
    );
    let gateway = proxy::builder()
        .agent("ollama")
        .ollama_gateway(ollama.addr())
        .snapshot(with_sampling(snap, "0"))
        .bootstrap_extra(&otlp::trace_bootstrap(&collector.endpoint()))
        .start()
        .await;
    // The caller's sidecar sampled the trace: the gateway keeps that decision.
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let c = client::http1(gateway.inbound());
    let req = c
        .request(http::Method::POST, "ollama", "/api/generate")
        .header("x-mesh-caller", "tr-caller")
        .header("traceparent", parent)
        .header("content-type", "application/json")
        .body(mesh_tests::body::full(
            "{\"model\":\"fake\",\"prompt\":\"hi\",\"stream\":true}",
        ))
        .unwrap();
    let reply = c.send(req).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let spans = collector.wait_spans(3).await;
    let server_span = one(&spans, |s| s.kind == SERVER);
    assert_eq!(server_span.parent_span_id, "b7ad6b7169203331");
    let queue = one(&spans, |s| s.name == "ollama.queue");
    let generation = one(&spans, |s| s.name == "text_completion fake");
    for child in [queue, generation] {
        assert_eq!(child.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(child.parent_span_id, server_span.span_id);
    }
    assert_eq!(queue.attributes["mesh.caller"], "tr-caller");
    assert_eq!(queue.attributes["mesh.caller.phase"], "critical");
    assert_eq!(queue.attributes["ollama.queue.position"], "1");
    assert_eq!(queue.attributes["ollama.queue.wait_reason"], "none");
    assert_eq!(generation.attributes["gen_ai.request.model"], "fake");
    assert_eq!(
        generation.attributes["gen_ai.operation.name"],
        "text_completion"
    );
    assert_eq!(generation.attributes["http.response.status_code"], "200");
    // From Ollama's final chunk.
    assert_eq!(generation.attributes["gen_ai.usage.input_tokens"], "7");
    // Every chunk but the final one carries a token.
    let tokens = ollama.chunks_per_generation() - 1;
    assert_eq!(
        generation.attributes["gen_ai.usage.output_tokens"],
        tokens.to_string()
    );
    assert!(!generation.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_name_the_trace_also_when_it_is_not_sampled() {
    let collector = otlp::collector().await;
    let app = server::fixed(500, "broken").run().await;
    let snap = snapshot(1).service(
        service("tr-log")
            .endpoint(app.addr())
            .policy("retry", "{ max_attempts = 1 }"),
    );
    let sidecar = proxy::builder()
        .snapshot(with_sampling(snap.to_toml(), "0"))
        .bootstrap_extra(&otlp::trace_bootstrap(&collector.endpoint()))
        .spawn()
        .await;
    let reply = client::http1(sidecar.outbound())
        .get("tr-log", "/fails")
        .await;
    assert_eq!(reply.status, 500);
    let (trace, span, flags) = traceparent_of(&app);
    assert_eq!(flags, "00");
    // The error line of a sampled-out request carries the ids the next hop saw.
    let line = mesh_tests::eventually("the access line", || {
        let lines = sidecar.stdout_lines();
        async move {
            lines
                .into_iter()
                .find(|l| l.contains("\"target\":\"access\"") && l.contains("/fails"))
        }
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["status"], 500);
    assert_eq!(v["trace_id"], trace.as_str());
    assert_eq!(v["span_id"], span.as_str());
    assert!(collector.spans().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_fallbacks_and_deadlines_are_span_events() {
    let collector = otlp::collector().await;
    let broken = server::fixed(200, "ok").run().await;
    broken.set_failing(true);
    let slow = server::fixed(200, "late")
        .delay(std::time::Duration::from_secs(5))
        .run()
        .await;
    let snap = snapshot(1)
        .service(
            service("tr-open")
                .endpoint(broken.addr())
                .policy("retry", "{ max_attempts = 1 }")
                .policy("ejection", "{ enabled = false }")
                .policy(
                    "breaker",
                    "{ consecutive_failures = 1, failure_ratio = 0.0, cooldown = \"30s\" }",
                )
                .policy(
                    "fallback",
                    "{ kind = \"static\", status = 200, body = { answer = \"cached\" } }",
                ),
        )
        .service(
            service("tr-slow")
                .endpoint(slow.addr())
                .timeout("100ms")
                .policy("retry", "{ max_attempts = 1 }"),
        );
    let sidecar = proxy::builder()
        .snapshot(with_sampling(snap.to_toml(), "1.0"))
        .bootstrap_extra(&otlp::trace_bootstrap(&collector.endpoint()))
        .start()
        .await;
    let c = client::http1(sidecar.outbound());
    // The first failure opens the breaker; the next call gets the fallback.
    assert_eq!(c.get("tr-open", "/").await.status, 503);
    mesh_tests::eventually("the breaker to open", || async {
        let text = scrape(sidecar.admin()).await;
        let state = metric_value(
            &text,
            "agent_circuit_breaker_state",
            &[("target", "tr-open"), ("endpoint", "")],
        );
        (state == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(c.get("tr-open", "/").await.status, 200);
    assert_eq!(c.get("tr-slow", "/").await.status, 504);

    let spans = collector.wait_spans(3).await;
    let fallback = spans
        .iter()
        .find(|s| s.events.iter().any(|e| e == "fallback"))
        .unwrap_or_else(|| panic!("no fallback event: {spans:#?}"));
    assert!(fallback.events.iter().any(|e| e == "breaker.short_circuit"));
    assert_eq!(fallback.attributes["http.response.status_code"], "200");
    let expired = spans
        .iter()
        .find(|s| s.attributes["server.address"] == "tr-slow")
        .unwrap();
    assert!(
        expired.events.iter().any(|e| e == "deadline.expired"),
        "{expired:#?}"
    );
    assert_eq!(expired.attributes["error.type"], "timeout");
    assert!(expired.error);
}

/// A call the caller's own rate limit refuses is still a span, with the refusal as an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_call_is_a_span_with_the_refusal_event() {
    let collector = otlp::collector().await;
    let ollama = mesh_tests::ollama::fake().chunks(0).run().await;
    let snap = format!(
        "version = 1\n\n[[services]]\nname = \"ollama\"\nendpoints = [\"{}\"]\n\n\
         [ollama.rate_limit]\nspecialized = \"1/m\"\n",
        ollama.addr()
    );
    let sidecar = proxy::builder()
        .agent("chatty")
        .phase("specialized")
        .snapshot(with_sampling(snap, "1.0"))
        .bootstrap_extra(&otlp::trace_bootstrap(&collector.endpoint()))
        .start()
        .await;
    let c = client::http1(sidecar.outbound());
    let generate = || {
        c.request(http::Method::POST, "ollama", "/api/generate")
            .body(mesh_tests::body::full("{\"prompt\":\"p\"}"))
            .unwrap()
    };
    assert_eq!(c.send(generate()).await.status, 200);
    let over = c.send(generate()).await;
    assert_eq!(over.status, 429, "{}", over.text());

    let spans = collector.wait_spans(2).await;
    let refused = spans
        .iter()
        .find(|s| s.events.iter().any(|e| e == "rate_limit.refused"))
        .unwrap_or_else(|| panic!("no rate_limit.refused event: {spans:#?}"));
    assert_eq!(refused.attributes["http.response.status_code"], "429");
    assert_eq!(refused.attributes["agent.id"], "chatty");
    assert_eq!(ollama.prompts(), ["p"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_arrive_over_grpc_when_the_bootstrap_asks() {
    let collector = otlp::collector().await;
    let app = server::fixed(200, "ok").run().await;
    let snap = snapshot(1).service(service("tr-grpc").endpoint(app.addr()));
    // The real binary: the gRPC transport is what the sidecar ships.
    let sidecar = proxy::builder()
        .agent("tr-g")
        .snapshot(with_sampling(snap.to_toml(), "1.0"))
        .bootstrap_extra(&otlp::grpc_trace_bootstrap(&collector.endpoint()))
        .spawn()
        .await;
    let c = client::http1(sidecar.outbound());
    for path in ["/one", "/two"] {
        assert_eq!(c.get("tr-grpc", path).await.status, 200);
    }

    let spans = collector.wait_spans(2).await;
    assert!(spans.iter().all(|s| s.transport == "grpc"), "{spans:#?}");
    let first = one(&spans, |s| s.attributes["url.path"] == "/one");
    assert_eq!(first.kind, CLIENT);
    assert_eq!(first.service, "tr-g");
    assert_eq!(first.attributes["target.agent"], "tr-grpc");
    assert_eq!(first.attributes["http.response.status_code"], "200");
    // The span that arrived over gRPC is the one whose context the app received.
    let (trace, parent, flags) = traceparent_of(&app);
    let second = one(&spans, |s| s.attributes["url.path"] == "/two");
    assert_eq!(
        (trace, parent, flags),
        (second.trace_id.clone(), second.span_id.clone(), "01".into())
    );
    wait_for_metric(
        sidecar.admin(),
        "agent_trace_spans_exported_total",
        &[],
        2.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_answering_grpc_errors_counts_the_spans_dropped() {
    // UNAVAILABLE, in the trailers of an HTTP 200 answer, as a gRPC server refuses.
    let collector = otlp::refusing_grpc_collector(14).await;
    let app = server::fixed(200, "ok").run().await;
    let snap = snapshot(1).service(service("tr-gerr").endpoint(app.addr()));
    // The real binary: its metrics are its own (in-process sidecars share one recorder).
    let sidecar = proxy::builder()
        .snapshot(with_sampling(snap.to_toml(), "1.0"))
        .bootstrap_extra(&otlp::grpc_trace_bootstrap(&collector.endpoint()))
        .spawn()
        .await;
    let c = client::http1(sidecar.outbound());
    for _ in 0..5 {
        assert_eq!(c.get("tr-gerr", "/").await.status, 200);
    }
    collector.wait_refused(1).await;
    // Every span the collector refused is counted as dropped, none as exported.
    let dropped = wait_for_metric(
        sidecar.admin(),
        "agent_trace_spans_dropped_total",
        &[("reason", "export_failed")],
        5.0,
    )
    .await;
    assert_eq!(dropped, 5.0);
    let text = scrape(sidecar.admin()).await;
    assert!(
        metric_value(&text, "agent_trace_spans_exported_total", &[]).unwrap_or(0.0) == 0.0,
        "{text}"
    );
    assert!(collector.spans().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_collector_that_never_answers_delays_no_request() {
    let collector = otlp::hanging_collector().await;
    let app = server::fixed(200, "ok").run().await;
    let snap = snapshot(1).service(service("tr-ghang").endpoint(app.addr()));
    let boot = format!(
        "{}queue_size = 4\nmax_batch = 2\nexport_timeout = \"200ms\"\n",
        otlp::grpc_trace_bootstrap(&collector.endpoint())
    );
    let sidecar = proxy::builder()
        .snapshot(with_sampling(snap.to_toml(), "1.0"))
        .bootstrap_extra(&boot)
        .spawn()
        .await;
    let c = client::http1(sidecar.outbound());
    let started = std::time::Instant::now();
    for _ in 0..50 {
        assert_eq!(c.get("tr-ghang", "/").await.status, 200);
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // The queue overflowed while a call hung, and the hung calls timed out: both counted.
    wait_for_metric(
        sidecar.admin(),
        "agent_trace_spans_dropped_total",
        &[("reason", "queue_full")],
        1.0,
    )
    .await;
    wait_for_metric(
        sidecar.admin(),
        "agent_trace_spans_dropped_total",
        &[("reason", "export_failed")],
        1.0,
    )
    .await;
}
