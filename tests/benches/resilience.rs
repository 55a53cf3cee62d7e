//! Resilience benchmark (run: `cargo bench -p mesh-tests --bench resilience`).
//! 1. Overhead: p50/p99 at 2,000 req/s through one proxy to one upstream, for a service with
//!    every resilience layer off (the baseline) and one with the defaults, interleaved in the
//!    same run; prints the p99 difference.
//! 2. Breaker timing: from the reply to the threshold failure until the first short-circuited
//!    answer, and from the end of the cool-down until the first successful answer.

use http::Method;
use mesh_tests::client;
use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};
use std::time::{Duration, Instant};

const RATE: u64 = 2_000;
const SECONDS: u64 = 5;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let up = server::fixed(200, "ok").label("up").run().await;
    let flaky = server::fixed(200, "ok").label("flaky").run().await;
    let snap = snapshot(1)
        .service(
            service("plain")
                .endpoint(up.addr())
                .policy("retry", "{ max_attempts = 1 }")
                .policy("breaker", "{ enabled = false }")
                .policy("ejection", "{ enabled = false }"),
        )
        .service(service("guarded").endpoint(up.addr()))
        .service(
            service("flaky")
                .endpoint(flaky.addr())
                .policy("retry", "{ max_attempts = 1 }")
                .policy("ejection", "{ enabled = false }")
                .policy(
                    "breaker",
                    "{ consecutive_failures = 5, failure_ratio = 0.0, cooldown = \"200ms\" }",
                ),
        );
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    let c = client::http1(proxy.outbound());
    let mut conn = c.connect().await;

    // Warm up both paths.
    for name in ["plain", "guarded"].iter().cycle().take(2_000) {
        let req = c
            .request(Method::GET, name, "/")
            .body(mesh_tests::body::empty())
            .unwrap();
        conn.send(req).await;
    }

    // Open loop at RATE, alternating the two services request by request.
    let mut lat: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let interval = Duration::from_nanos(1_000_000_000 / RATE);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..(RATE * SECONDS) as usize {
        tick.tick().await;
        let (k, name) = if i % 2 == 0 {
            (0, "plain")
        } else {
            (1, "guarded")
        };
        let req = c
            .request(Method::GET, name, "/")
            .body(mesh_tests::body::empty())
            .unwrap();
        let t = Instant::now();
        let reply = conn.send(req).await;
        lat[k].push(t.elapsed());
        assert_eq!(reply.status, 200);
    }
    for l in &mut lat {
        l.sort();
    }
    let (p50a, p99a) = (pct(&lat[0], 0.5), pct(&lat[0], 0.99));
    let (p50b, p99b) = (pct(&lat[1], 0.5), pct(&lat[1], 0.99));
    println!(
        "overhead at {RATE} req/s, {SECONDS} s, {} requests each:",
        lat[0].len()
    );
    println!("  resilience off (baseline): p50 {p50a:?}  p99 {p99a:?}");
    println!("  resilience defaults:       p50 {p50b:?}  p99 {p99b:?}");
    println!(
        "  p99 difference: {:+.1} us (ratio {:.3})",
        (p99b.as_nanos() as f64 - p99a.as_nanos() as f64) / 1e3,
        p99b.as_secs_f64() / p99a.as_secs_f64()
    );

    // Breaker timing.
    flaky.set_failing(true);
    let get = |c: &client::Client| {
        c.request(Method::GET, "flaky", "/")
            .body(mesh_tests::body::empty())
            .unwrap()
    };
    let mut threshold_at = Instant::now();
    for _ in 0..5 {
        let reply = conn.send(get(&c)).await;
        assert_eq!(reply.status, 503);
        threshold_at = Instant::now();
    }
    let sent_before = flaky.requests();
    let opened_at = loop {
        let reply = conn.send(get(&c)).await;
        if reply.header("content-type") == Some("application/json")
            && reply.json()["error"] == "breaker_open"
        {
            break Instant::now();
        }
    };
    let leaked = flaky.requests() - sent_before;
    flaky.set_failing(false);
    let cooldown_end = opened_at + Duration::from_millis(200);
    let recovered_at = loop {
        let reply = conn.send(get(&c)).await;
        if reply.status == 200 {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    println!("breaker (consecutive_failures = 5, cooldown = 200ms):");
    println!(
        "  threshold failure -> open: {:?} ({leaked} request(s) reached the upstream meanwhile)",
        opened_at - threshold_at
    );
    println!(
        "  cool-down end -> recovered: {:?} (upper bound: measured from the first open answer)",
        recovered_at.saturating_duration_since(cooldown_end)
    );
}
