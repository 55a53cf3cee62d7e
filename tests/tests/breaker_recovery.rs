//! Breakers recover in step with their upstream: an app that fails for a while under load is
//! served again at most one probe interval after it is back, because a probe that fails just
//! before the return costs one cool-down, not a doubled one. Prints the outage and the time the
//! callers saw failures (`benches/README.md`, "Breaker recovery").

use mesh_tests::client;
use mesh_tests::eventually;
use mesh_tests::load::{self, Load};
use mesh_tests::metrics::{metric_value, scrape};
use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};
use std::time::{Duration, Instant};

/// Long enough that the old doubling (probes 1 s, 3 s, 7 s after the trip) failed its second
/// probe just before the app came back and waited 4 s more.
const OUTAGE: Duration = Duration::from_millis(3200);
const COOLDOWN: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_back_after_an_outage_is_served_within_one_probe_interval() {
    let app = server::fixed(200, "ok").label("b").run().await;
    let svc = service("b")
        .endpoint(app.addr())
        .policy("retry", "{ max_attempts = 1 }")
        .policy("ejection", "{ enabled = false }")
        .policy(
            "breaker",
            "{ consecutive_failures = 5, failure_ratio = 0.0, cooldown = \"1s\", max_cooldown = \"30s\" }",
        );
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(snapshot(1).service(svc).to_toml())
        .start()
        .await;
    let c = client::http1(proxy.outbound());
    let mut load = Load::start(c, 4, load::get(c, "b", "/"));
    load.wait_completed(200).await;

    // The app fails every request for the outage (as a dead app behind its sidecar does).
    let down = Instant::now();
    app.set_failing(true);
    tokio::time::sleep(OUTAGE).await;
    app.set_failing(false);
    let back = Instant::now();

    let admin = proxy.admin();
    eventually("the target's breaker to close again", || async move {
        let text = scrape(admin).await;
        let state = metric_value(
            &text,
            "agent_circuit_breaker_state",
            &[("target", "b"), ("endpoint", "")],
        )?;
        (state == 0.0).then_some(())
    })
    .await;
    let settled = load.completed() + 200;
    load.wait_completed(settled).await;
    let report = load.stop().await;

    let last = report
        .failures
        .iter()
        .map(|f| f.at)
        .max()
        .expect("the outage failed some requests");
    let failing = last.saturating_duration_since(down);
    let after = last.saturating_duration_since(back);
    println!(
        "outage {:.2} s, callers saw failures for {:.2} s, the last {:.2} s after the app was back",
        OUTAGE.as_secs_f64(),
        failing.as_secs_f64(),
        after.as_secs_f64()
    );
    // The probe interval at the app's return is the cool-down or half the time open (1.6 s);
    // 1.5 s more for the target's and the endpoint's breakers probing out of step and the
    // load's own timing on a busy host (the doubling this replaces ended failures 3.8 s after
    // the return).
    let interval = COOLDOWN.max(OUTAGE / 2);
    assert!(
        after <= interval + Duration::from_millis(1500),
        "failures went on {after:?} after the app was back (probe interval {interval:?}); {report}"
    );
}
