//! Losing a replica is invisible to callers: a dead or frozen endpoint is the business of its own
//! breaker, ejection and the caller's retries, and never opens the breaker of the whole target.
//! Only a target whose every endpoint fails opens it and serves its fallback.

use mesh_tests::client;
use mesh_tests::load::{self, Load};
use mesh_tests::metrics::{metric_value, scrape};
use mesh_tests::proxy;
use mesh_tests::replicas::Replicas;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};
use std::net::SocketAddr;

/// The kill races requests at every stage of their life; enough runs to meet each stage.
const RUNS: usize = 20;
const CALLERS: usize = 8;

/// An address where nothing listens: bound once, then closed.
async fn dead_address() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn target_breaker_opened(text: &str, target: &str) -> f64 {
    metric_value(
        text,
        "agent_circuit_breaker_transitions_total",
        &[("target", target), ("endpoint", ""), ("to", "open")],
    )
    .unwrap_or(0.0)
}

/// Eight callers loop GETs through sidecar A to `b` (two replicas); one replica is SIGKILLed
/// mid-load. No caller sees an error, in any of the runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_fails_no_idempotent_request() {
    let app = server::fixed(200, "ok").label("app").run().await;
    for run in 0..RUNS {
        let svc = Replicas::start("b-killed", app.addr(), 2, |s| s).await;
        let c = client::http1(svc.caller.outbound());
        let mut load = Load::start(c, CALLERS, load::get(c, svc.service, "/"));
        svc.wait_served(1, 20).await;
        svc.kill(1);
        let after = load.completed() + 400;
        load.wait_completed(after).await;
        let report = load.stop().await;
        assert!(report.failures.is_empty(), "run {run}: {report}");
        let text = scrape(svc.caller.admin()).await;
        assert_eq!(target_breaker_opened(&text, svc.service), 0.0, "run {run}");
    }
}

/// The same with the replica frozen (SIGSTOP): its connections stay open and nothing answers, so
/// attempts end at the per-try timeout rather than with a refusal, count against the endpoint,
/// and go to the other replica within the request's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_fails_no_idempotent_request() {
    let app = server::fixed(200, "ok").label("app").run().await;
    for run in 0..RUNS {
        let svc = Replicas::start("b-frozen", app.addr(), 2, |s| {
            s.timeout("5s")
                .policy("retry", "{ max_attempts = 3, per_try_timeout = \"500ms\" }")
        })
        .await;
        let c = client::http1(svc.caller.outbound());
        let mut load = Load::start(c, CALLERS, load::get(c, svc.service, "/"));
        svc.wait_served(1, 20).await;
        // The count goes on from the runs before (one registry for the test binary).
        let admin = svc.caller.admin();
        let ejections = |text: &str| {
            metric_value(
                text,
                "agent_endpoint_ejections_total",
                &[("target", "b-frozen")],
            )
            .unwrap_or(0.0)
        };
        let before = ejections(&scrape(admin).await);
        svc.freeze(1);
        // The healthy replica can serve hundreds of requests before the first per-try timeout
        // on the frozen one fires, so ejection is awaited under load, not read at a fixed count.
        mesh_tests::eventually("the frozen replica to be ejected", || async move {
            (ejections(&scrape(admin).await) > before).then_some(())
        })
        .await;
        let after = load.completed() + 400;
        load.wait_completed(after).await;
        let report = load.stop().await;
        assert!(report.failures.is_empty(), "run {run}: {report}");
        let text = scrape(svc.caller.admin()).await;
        assert_eq!(target_breaker_opened(&text, svc.service), 0.0, "run {run}");
    }
}

/// Half of four endpoints refuse connections: the survivors take every request and the target
/// never refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_the_endpoints_dead_the_survivors_take_all_traffic() {
    let up1 = server::fixed(200, "ok").label("up1").run().await;
    let up2 = server::fixed(200, "ok").label("up2").run().await;
    let svc = service("half")
        .endpoint(up1.addr())
        .endpoint(dead_address().await)
        .endpoint(up2.addr())
        .endpoint(dead_address().await);
    let a = proxy::builder()
        .snapshot(snapshot(1).service(svc).to_toml())
        .start()
        .await;
    let c = client::http1(a.outbound());
    let mut load = Load::start(c, CALLERS, load::get(c, "half", "/"));
    load.wait_completed(1_000).await;
    let report = load.stop().await;
    assert!(report.failures.is_empty(), "{report}");
    assert_eq!(up1.requests() + up2.requests(), report.completed);
    let text = scrape(a.admin()).await;
    assert_eq!(target_breaker_opened(&text, "half"), 0.0);
}

/// Every endpoint refuses: the requests fail as the caller sees them, so the target's breaker
/// opens and its fallback answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_dead_opens_the_target_breaker_and_serves_the_fallback() {
    let svc = service("gone")
        .endpoint(dead_address().await)
        .endpoint(dead_address().await)
        .policy(
            "fallback",
            "{ kind = \"static\", status = 200, body = { answer = \"cached\" } }",
        );
    let a = proxy::builder()
        .snapshot(snapshot(1).service(svc).to_toml())
        .start()
        .await;
    let c = client::http1(a.outbound());
    // Five failed requests (the default threshold) open it.
    for _ in 0..5 {
        let reply = c.get("gone", "/").await;
        assert!(
            matches!(reply.status.as_u16(), 502 | 503),
            "{}",
            reply.text()
        );
    }
    mesh_tests::eventually("the target breaker to open", || async {
        let text = scrape(a.admin()).await;
        (target_breaker_opened(&text, "gone") == 1.0).then_some(())
    })
    .await;
    let reply = c.get("gone", "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["answer"], "cached");
}

/// Non-idempotent calls are not retried once written: only those already on the killed replica
/// fail, each with a clear `502 upstream_failed`, and the target stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_fails_only_the_posts_written_to_it() {
    let app = server::fixed(200, "ok").label("app").run().await;
    for run in 0..RUNS / 4 {
        let svc = Replicas::start("b-posts", app.addr(), 2, |s| s).await;
        let c = client::http1(svc.caller.outbound());
        let mut load = Load::start(c, CALLERS, load::post(c, svc.service, "/"));
        svc.wait_served(1, 20).await;
        svc.kill(1);
        let after = load.completed() + 400;
        load.wait_completed(after).await;
        let report = load.stop().await;
        // At most the one request each connection had on the replica, and the next it wrote
        // before the caller's sidecar saw the connection die.
        assert!(report.failures.len() <= 2 * CALLERS, "run {run}: {report}");
        for f in &report.failures {
            assert!(
                f.what.starts_with("502") && f.what.contains("upstream_failed"),
                "run {run}: {}",
                f.what
            );
        }
        let text = scrape(svc.caller.admin()).await;
        assert_eq!(target_breaker_opened(&text, svc.service), 0.0, "run {run}");
    }
}

/// Without a per-try timeout, a frozen replica is found out by its silence: the sidecar pings
/// its HTTP/2 connections (after 4 s without a frame), and one that leaves a ping unanswered
/// for 2 s fails its requests, which are retried on the other replica; no caller sees an error.
/// The balancer then all but stops sending to it (its latency sample is seconds), so with the
/// default ejection (5 failures in a row) it is ejected only after about five such cycles,
/// ~50 s; a per-try timeout ejects it within a second (the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_is_found_out_by_its_silence() {
    let app = server::fixed(200, "ok").label("app").run().await;
    let svc = Replicas::start("b-silent", app.addr(), 2, |s| s).await;
    let c = client::http1(svc.caller.outbound());
    let mut load = Load::start(c, CALLERS, load::get(c, svc.service, "/"));
    svc.wait_served(1, 20).await;
    svc.freeze(1);
    // The first request that the unanswered ping failed, retried: about 6 s after the freeze,
    // more than `eventually`'s bound leaves on a slow machine.
    let admin = svc.caller.admin();
    mesh_tests::bounded_by(
        std::time::Duration::from_secs(30),
        "a request on the frozen replica to fail its ping and be retried",
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
            loop {
                tick.tick().await;
                let text = scrape(admin).await;
                let retried = metric_value(&text, "agent_retries_total", &[("target", "b-silent")]);
                if retried >= Some(1.0) {
                    break;
                }
            }
        },
    )
    .await;
    let after = load.completed() + 400;
    load.wait_completed(after).await;
    let report = load.stop().await;
    assert!(report.failures.is_empty(), "{report}");
    let text = scrape(svc.caller.admin()).await;
    assert_eq!(target_breaker_opened(&text, svc.service), 0.0);
}
