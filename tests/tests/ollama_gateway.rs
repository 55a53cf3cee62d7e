//! The Ollama gateway: one shared Ollama behind a queue that admits `parallel` requests, orders
//! them by caller phase, is fair between callers of a phase, bounds waiting, and lets streams
//! through chunk by chunk. Callers are named by `x-mesh-caller`, as their sidecars set it; the
//! tests talk to the gateway's inbound port directly with that header.
//!
//! Gateway metrics are process-wide, and some scenarios wait on the queue depth gauge, so the
//! scenarios in this file run one at a time.

use http::Method;
use http_body_util::BodyExt;
use mesh_tests::client::{self, next_data, Reply};
use mesh_tests::metrics::{self, wait_for_metric};
use mesh_tests::ollama::{self, gateway_policy, FakeOllama};
use mesh_tests::proxy::{self, TestProxy};
use mesh_tests::{body, bounded};
use std::net::SocketAddr;
use tokio::sync::{Mutex, MutexGuard};
use tokio::task::JoinHandle;

static SERIAL: Mutex<()> = Mutex::const_new(());

async fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// A snapshot naming each caller's phase, plus the gateway policy text.
fn snapshot(callers: &[(String, &str)], policy: &str) -> String {
    let mut out = String::from("version = 1\n");
    for (name, phase) in callers {
        out.push_str(&format!(
            "\n[[services]]\nname = {name:?}\nphase = {phase:?}\n"
        ));
    }
    out.push_str(policy);
    out
}

async fn gateway(ollama: &FakeOllama, callers: &[(String, &str)], policy: &str) -> TestProxy {
    proxy::builder()
        .agent("ollama")
        .ollama_gateway(ollama.addr())
        .snapshot(snapshot(callers, policy))
        .start()
        .await
}

fn request(path: &str, caller: &str, prompt: &str) -> http::Request<body::Body> {
    client::http1(([127, 0, 0, 1], 1).into())
        .request(Method::POST, "ollama", path)
        .header("x-mesh-caller", caller)
        .header("content-type", "application/json")
        .body(body::full(format!(
            "{{\"model\":\"fake\",\"prompt\":{prompt:?},\"stream\":true}}"
        )))
        .expect("valid request")
}

/// Sends one generation from `caller` (prompt = `prompt`) on its own connection.
fn generate(addr: SocketAddr, caller: &str, prompt: &str) -> JoinHandle<Reply> {
    let req = request("/api/generate", caller, prompt);
    tokio::spawn(async move { client::http1(addr).send(req).await })
}

async fn queued(gw: &TestProxy, n: f64) {
    wait_for_metric(gw.admin(), "agent_ollama_queue_depth", &[], n).await;
}

fn named(prefix: &str, n: usize, phase: &'static str) -> Vec<(String, &'static str)> {
    (0..n).map(|i| (format!("{prefix}{i}"), phase)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_nine_callers_across_three_phases_never_exceed_parallel() {
    let _serial = one_at_a_time().await;
    for parallel in [1, 2] {
        let ollama = ollama::fake().parallel(parallel).chunks(2).run().await;
        let mut callers = named("crit-", 23, "critical");
        callers.extend(named("perf-", 23, "performance"));
        callers.extend(named("spec-", 23, "specialized"));
        let gw = gateway(&ollama, &callers, &gateway_policy(parallel, "30s", "")).await;

        let inbound = gw.inbound();
        let calls: Vec<_> = callers
            .iter()
            .map(|(name, _)| generate(inbound, name, name))
            .collect();
        for call in calls {
            let reply = bounded("a caller's generation", call).await.expect("task");
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert!(
                reply.text().ends_with("\"done\":true}\n"),
                "{}",
                reply.text()
            );
        }
        ollama.assert_never_overlapped();
        assert_eq!(ollama.generations().len(), 69);
        assert!(ollama.max_in_flight() <= parallel);
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_critical_requests_go_before_queued_specialized() {
    let _serial = one_at_a_time().await;
    let ollama = ollama::fake().hold().chunks(0).run().await;
    let callers = vec![
        ("spec-a".to_owned(), "specialized"),
        ("spec-b".to_owned(), "specialized"),
        ("perf-a".to_owned(), "performance"),
        ("crit-a".to_owned(), "critical"),
        ("crit-b".to_owned(), "critical"),
    ];
    let gw = gateway(&ollama, &callers, &gateway_policy(1, "30s", "")).await;
    let inbound = gw.inbound();

    // The slot is busy with a specialized request while the others queue, worst first.
    let busy = generate(inbound, "spec-a", "spec-a-1");
    ollama.wait_started(1).await;
    let mut calls = vec![busy];
    for (i, (caller, prompt)) in [
        ("spec-a", "spec-a-2"),
        ("spec-b", "spec-b-1"),
        ("perf-a", "perf-a-1"),
        ("crit-a", "crit-a-1"),
        ("crit-b", "crit-b-1"),
    ]
    .into_iter()
    .enumerate()
    {
        calls.push(generate(inbound, caller, prompt));
        queued(&gw, (i + 1) as f64).await;
    }

    ollama.release(6);
    for call in calls {
        assert_eq!(bounded("generation", call).await.expect("task").status, 200);
    }
    assert_eq!(
        ollama.prompts(),
        ["spec-a-1", "crit-a-1", "crit-b-1", "perf-a-1", "spec-a-2", "spec-b-1"]
    );
    ollama.assert_never_overlapped();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bursting_agent_delays_another_of_its_phase_by_at_most_one_slot() {
    let _serial = one_at_a_time().await;
    let ollama = ollama::fake().hold().chunks(0).run().await;
    let callers = vec![
        ("bursty".to_owned(), "specialized"),
        ("quiet".to_owned(), "specialized"),
    ];
    let gw = gateway(&ollama, &callers, &gateway_policy(1, "30s", "")).await;
    let inbound = gw.inbound();

    let mut calls = vec![generate(inbound, "bursty", "b0")];
    ollama.wait_started(1).await;
    for i in 1..=6 {
        calls.push(generate(inbound, "bursty", &format!("b{i}")));
        queued(&gw, i as f64).await;
    }
    // The quiet agent arrives behind a queue of six bursty requests.
    calls.push(generate(inbound, "quiet", "q1"));
    queued(&gw, 7.0).await;

    ollama.release(8);
    for call in calls {
        assert_eq!(bounded("generation", call).await.expect("task").status, 200);
    }
    let order = ollama.prompts();
    let quiet_at = order
        .iter()
        .position(|p| p == "q1")
        .expect("quiet was served");
    // b0 was being served; at most one more bursty request goes before the quiet one.
    assert!(quiet_at <= 2, "quiet served at {quiet_at}: {order:?}");
    assert_eq!(order, ["b0", "b1", "q1", "b2", "b3", "b4", "b5", "b6"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_answers_503_with_retry_after_and_position() {
    let _serial = one_at_a_time().await;
    let ollama = ollama::fake().hold().chunks(0).run().await;
    let callers = vec![
        ("holder".to_owned(), "critical"),
        ("waiter".to_owned(), "performance"),
    ];
    let gw = gateway(&ollama, &callers, &gateway_policy(1, "300ms", "")).await;

    let holder = generate(gw.inbound(), "holder", "h");
    ollama.wait_started(1).await;
    let reply = bounded(
        "the queued request to time out",
        generate(gw.inbound(), "waiter", "w"),
    )
    .await
    .expect("task");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.header("retry-after").is_some(), "{:?}", reply.headers);
    let why = reply.json();
    assert_eq!(why["reason"], "queue_timeout");
    assert_eq!(why["phase"], "performance");
    assert_eq!(why["queue_position"], 1);
    assert!(why["waited_ms"].as_u64().unwrap() >= 300, "{why}");

    ollama.release(1);
    assert_eq!(bounded("holder", holder).await.expect("task").status, 200);
    assert_eq!(
        ollama.prompts(),
        ["h"],
        "the timed-out request reached Ollama"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_phase_queue_is_503_and_an_agent_over_its_quota_is_429() {
    let _serial = one_at_a_time().await;
    let ollama = ollama::fake().hold().chunks(0).run().await;
    let callers = vec![
        ("a".to_owned(), "specialized"),
        ("b".to_owned(), "specialized"),
        ("c".to_owned(), "specialized"),
    ];
    let policy = gateway_policy(1, "30s", "per_agent_queue = 1\nqueue = { specialized = 2 }");
    let gw = gateway(&ollama, &callers, &policy).await;
    let inbound = gw.inbound();

    let mut calls = vec![generate(inbound, "a", "a0")];
    ollama.wait_started(1).await;
    calls.push(generate(inbound, "a", "a1"));
    queued(&gw, 1.0).await;
    let over = bounded("over quota", generate(inbound, "a", "a2"))
        .await
        .expect("task");
    assert_eq!(over.status, 429, "{}", over.text());
    assert_eq!(over.json()["reason"], "over_quota");
    assert!(over.header("retry-after").is_some());

    calls.push(generate(inbound, "b", "b0"));
    queued(&gw, 2.0).await;
    let full = bounded("queue full", generate(inbound, "c", "c0"))
        .await
        .expect("task");
    assert_eq!(full.status, 503, "{}", full.text());
    assert_eq!(full.json()["reason"], "queue_full");
    assert_eq!(full.json()["queue_position"], 3);
    assert!(full.header("retry-after").is_some());

    ollama.release(3);
    for call in calls {
        assert_eq!(bounded("generation", call).await.expect("task").status, 200);
    }
    assert_eq!(ollama.prompts(), ["a0", "a1", "b0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_disconnects_while_queued_is_never_sent_to_ollama() {
    let _serial = one_at_a_time().await;
    let ollama = ollama::fake().hold().chunks(0).run().await;
    let callers = vec![("a".to_owned(), "critical"), ("b".to_owned(), "critical")];
    let gw = gateway(&ollama, &callers, &gateway_policy(1, "30s", "")).await;
    let admin = gw.admin();
    let before = metrics::metric_or_zero(
        &metrics::scrape(admin).await,
        "agent_ollama_cancelled_total",
        &[("reason", "queued")],
    );

    let holder = generate(gw.inbound(), "a", "first");
    ollama.wait_started(1).await;
    let leaver = generate(gw.inbound(), "b", "left");
    queued(&gw, 1.0).await;
    // The caller goes away: its connection closes while it waits.
    leaver.abort();
    let _ = leaver.await;
    wait_for_metric(
        admin,
        "agent_ollama_cancelled_total",
        &[("reason", "queued")],
        before + 1.0,
    )
    .await;

    ollama.release(1);
    assert_eq!(bounded("holder", holder).await.expect("task").status, 200);
    let after = generate(gw.inbound(), "a", "after");
    ollama.release(1);
    assert_eq!(bounded("after", after).await.expect("task").status, 200);
    assert_eq!(ollama.prompts(), ["first", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_disconnects_while_served_frees_the_slot_at_once() {
    let _serial = one_at_a_time().await;
    let ollama = ollama::fake().hold().chunks(3).run().await;
    let callers = vec![("a".to_owned(), "critical"), ("b".to_owned(), "critical")];
    let gw = gateway(&ollama, &callers, &gateway_policy(1, "30s", "")).await;

    let mut conn = client::http1(gw.inbound()).connect().await;
    let streaming = tokio::spawn(async move {
        let rsp = conn
            .try_send_streaming(request("/api/generate", "a", "cut"))
            .await;
        (conn, rsp)
    });
    ollama.wait_started(1).await;
    ollama.release(1);
    let (conn, rsp) = bounded("the stream's head", streaming).await.expect("task");
    let mut rsp_body = rsp.expect("response").into_body();
    assert!(next_data(&mut rsp_body).await.is_some());
    let next = generate(gw.inbound(), "b", "next");
    queued(&gw, 1.0).await;
    // The caller hangs up mid-stream: Ollama sees the request go, the next one starts.
    drop(rsp_body);
    drop(conn);
    ollama.wait_abandoned(1).await;
    ollama.wait_started(2).await;
    ollama.release(ollama.chunks_per_generation());
    assert_eq!(bounded("next", next).await.expect("task").status, 200);
    ollama.assert_never_overlapped();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_that_falls_silent_is_cut_and_frees_the_slot() {
    let _serial = one_at_a_time().await;
    let ollama = ollama::fake().hold().chunks(3).run().await;
    let callers = vec![("a".to_owned(), "critical"), ("b".to_owned(), "critical")];
    let policy = gateway_policy(1, "30s", "stream_idle_timeout = \"300ms\"");
    let gw = gateway(&ollama, &callers, &policy).await;

    let client = client::http1(gw.inbound());
    let req = request("/api/generate", "a", "stalls");
    let pending = tokio::spawn(async move { client.send_streaming(req).await });
    ollama.wait_started(1).await;
    ollama.release(1);
    let rsp = bounded("the stream's head", pending).await.expect("task");
    let mut rsp_body = rsp.into_body();
    assert!(next_data(&mut rsp_body).await.is_some());
    let next = generate(gw.inbound(), "b", "next");
    queued(&gw, 1.0).await;

    // Ollama produces nothing more but keeps the connection: the gateway cuts the stream,
    // the caller sees it fail, Ollama sees it go, and the queued generation starts.
    let end = bounded("the cut stream", rsp_body.frame()).await;
    assert!(matches!(end, Some(Err(_))), "{end:?}");
    ollama.wait_abandoned(1).await;
    ollama.wait_started(2).await;
    ollama.release(ollama.chunks_per_generation());
    assert_eq!(bounded("next", next).await.expect("task").status, 200);
    ollama.assert_never_overlapped();
}

async fn stream_arrives_chunk_by_chunk(path: &str, first_chunk_starts: &str) {
    let ollama = ollama::fake().hold().chunks(3).run().await;
    let callers = vec![("a".to_owned(), "critical"), ("b".to_owned(), "critical")];
    let gw = gateway(&ollama, &callers, &gateway_policy(1, "30s", "")).await;

    let client = client::http1(gw.inbound());
    let req = request(path, "a", "stream");
    let pending = tokio::spawn(async move { client.send_streaming(req).await });
    ollama.wait_started(1).await;
    ollama.release(1);
    let rsp = bounded("the stream's head", pending).await.expect("task");
    assert_eq!(rsp.status(), 200);
    let mut rsp_body = rsp.into_body();
    // Ollama has produced one chunk: the caller has it before the next exists.
    let first = bounded("first chunk", next_data(&mut rsp_body))
        .await
        .expect("a chunk");
    assert!(
        String::from_utf8_lossy(&first).starts_with(first_chunk_starts),
        "{first:?}"
    );

    // The slot is held for the whole stream: another caller waits.
    let other = generate(gw.inbound(), "b", "other");
    queued(&gw, 1.0).await;
    assert_eq!(ollama.generations().len(), 1);

    ollama.release(1);
    let second = bounded("second chunk", next_data(&mut rsp_body))
        .await
        .expect("a chunk");
    assert!(
        String::from_utf8_lossy(&second).contains("tok1"),
        "{second:?}"
    );
    ollama.release(2);
    let mut rest = Vec::new();
    while let Some(chunk) = bounded("the rest", next_data(&mut rsp_body)).await {
        rest.extend_from_slice(&chunk);
    }
    assert!(String::from_utf8_lossy(&rest).contains("tok2"));

    ollama.wait_started(2).await;
    ollama.release(ollama.chunks_per_generation());
    assert_eq!(bounded("other", other).await.expect("task").status, 200);
    ollama.assert_never_overlapped();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_stream_chunks_reach_the_caller_as_produced() {
    let _serial = one_at_a_time().await;
    stream_arrives_chunk_by_chunk(
        "/api/generate",
        "{\"model\":\"fake\",\"response\":\"tok0 \"",
    )
    .await;
    stream_arrives_chunk_by_chunk("/api/chat", "{\"model\":\"fake\",\"message\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_chunks_reach_the_caller_as_produced() {
    let _serial = one_at_a_time().await;
    stream_arrives_chunk_by_chunk("/v1/chat/completions", "data: {\"choices\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_endpoints_bypass_a_busy_queue() {
    let _serial = one_at_a_time().await;
    let ollama = ollama::fake().hold().chunks(0).run().await;
    let callers = vec![("a".to_owned(), "critical")];
    let gw = gateway(&ollama, &callers, &gateway_policy(1, "30s", "")).await;
    let busy = generate(gw.inbound(), "a", "busy");
    ollama.wait_started(1).await;
    for path in ["/api/tags", "/api/version", "/api/ps"] {
        let reply = bounded(path, client::http1(gw.inbound()).get("ollama", path)).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
    }
    ollama.release(1);
    assert_eq!(bounded("busy", busy).await.expect("task").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_limits_fill_omitted_options_and_refuse_larger_ones() {
    let _serial = one_at_a_time().await;
    let ollama = ollama::fake().chunks(0).run().await;
    let callers = vec![("senior-ai-engineer".to_owned(), "critical")];
    let policy = format!(
        "{}\n[ollama.agents.senior-ai-engineer]\nmax_context_size = 4096\nmax_tokens = 512\n",
        gateway_policy(1, "30s", "")
    );
    let gw = gateway(&ollama, &callers, &policy).await;

    let ok = generate(gw.inbound(), "senior-ai-engineer", "p");
    assert_eq!(bounded("ok", ok).await.expect("task").status, 200);
    let seen = &ollama.generations()[0].body;
    assert_eq!(seen["options"]["num_ctx"], 4096, "{seen}");
    assert_eq!(seen["options"]["num_predict"], 512, "{seen}");

    let req = client::http1(gw.inbound())
        .request(Method::POST, "ollama", "/api/chat")
        .header("x-mesh-caller", "senior-ai-engineer")
        .body(body::full(r#"{"model":"fake","options":{"num_ctx":8192}}"#))
        .unwrap();
    let reply = bounded("too big", client::http1(gw.inbound()).send(req)).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("num_ctx 8192 is above senior-ai-engineer's max_context_size 4096"),
        "{}",
        reply.text()
    );
    assert_eq!(ollama.generations().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ollama_down_the_breaker_opens_and_refuses_at_once() {
    let _serial = one_at_a_time().await;
    // A port nothing listens on: every connect is refused.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let callers = vec![("a".to_owned(), "critical")];
    let policy = gateway_policy(1, "30s", "breaker = { failures = 2, cooldown = \"60s\" }");
    let gw = proxy::builder()
        .agent("ollama")
        .ollama_gateway(down)
        .snapshot(snapshot(&callers, &policy))
        .start()
        .await;

    for _ in 0..2 {
        let reply = bounded("a call to a dead ollama", generate(gw.inbound(), "a", "p"))
            .await
            .expect("task");
        assert_eq!(reply.status, 502, "{}", reply.text());
    }
    // Two failures in a row: the gateway stops trying and says when to come back.
    let reply = bounded(
        "a call with the breaker open",
        generate(gw.inbound(), "a", "p"),
    )
    .await
    .expect("task");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["reason"], "ollama_unavailable");
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
}
