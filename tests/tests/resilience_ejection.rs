//! Outlier ejection: an endpoint that fails in a row leaves the balancer for its interval and
//! comes back once it has passed; never more than the configured share of a target's endpoints
//! is out at once.
//!
//! Retries and breakers are off, so each request is one attempt on one endpoint and the
//! upstreams' labels say where every attempt went.

use mesh_tests::client::{self, Client, Conn};
use mesh_tests::metrics::{metric_or_zero, scrape, wait_for_metric};
use mesh_tests::proxy;
use mesh_tests::server::{self, SERVED_BY};
use mesh_tests::snapshot::{service, snapshot};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const EJECTIONS: &str = "agent_endpoint_ejections_total";

/// One request on `conn` (opened by `c`): when it started and ended, and which upstream
/// answered.
async fn call(c: &Client, conn: &mut Conn, target: &str) -> (Instant, Instant, String) {
    let req = c
        .request(http::Method::GET, target, "/")
        .body(mesh_tests::body::empty())
        .unwrap();
    let start = Instant::now();
    let reply = conn.send(req).await;
    let end = Instant::now();
    let by = reply
        .header(SERVED_BY)
        .unwrap_or_else(|| panic!("answered by the proxy, not an upstream: {}", reply.text()))
        .to_owned();
    (start, end, by)
}

async fn ejections(admin: SocketAddr, target: &str) -> f64 {
    metric_or_zero(&scrape(admin).await, EJECTIONS, &[("target", target)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_endpoint_gets_no_traffic_until_its_interval_passes() {
    const INTERVAL: Duration = Duration::from_millis(500);
    // The healthy endpoint is slower than a failure costs the balancer (30 ms), so power of two
    // choices keeps preferring the failing one: only ejection keeps traffic away from it.
    let bad = server::fixed(200, "bad").label("bad").run().await;
    bad.set_failing(true);
    let good = server::fixed(200, "good")
        .label("good")
        .delay(Duration::from_millis(40))
        .run()
        .await;
    let snap = snapshot(1).service(
        service("ej-a")
            .endpoint(bad.addr())
            .endpoint(good.addr())
            .policy("retry", "{ max_attempts = 1 }")
            .policy("breaker", "{ enabled = false }")
            .policy(
                "ejection",
                "{ consecutive_failures = 2, interval = \"500ms\", max_interval = \"10s\", max_ejected_percent = 50 }",
            ),
    );
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    let c = client::http1(proxy.outbound());
    let mut conn = c.connect().await;

    // Until the second failure in a row on `bad`, which ejects it.
    let mut bad_seen = 0;
    let mut ejecting_start = None;
    for _ in 0..50 {
        let (start, _, by) = call(&c, &mut conn, "ej-a").await;
        if by == "bad" {
            bad_seen += 1;
            if bad_seen == 2 {
                ejecting_start = Some(start);
                break;
            }
        }
    }
    let ejecting_start = ejecting_start.expect("the failing endpoint got two requests");
    assert_eq!(ejections(proxy.admin(), "ej-a").await, 1.0);

    // The ejection happened after `ejecting_start`, so it lasts at least until
    // `ejecting_start + INTERVAL`: any request that ended before then went to `good`. After
    // that, `bad` must get traffic again.
    let window_end = ejecting_start + INTERVAL;
    let mut in_window = 0;
    let back = mesh_tests::bounded("the ejected endpoint to get traffic again", async {
        loop {
            let (_, end, by) = call(&c, &mut conn, "ej-a").await;
            if by == "bad" {
                return end;
            }
            if end < window_end {
                in_window += 1;
            }
        }
    })
    .await;
    assert!(back >= window_end, "bad was picked while ejected");
    assert!(
        in_window >= 3,
        "only {in_window} request(s) finished inside the ejection interval"
    );
    assert_eq!(bad.requests(), 3);

    // Still failing once back, it is ejected again (for twice as long).
    let again = mesh_tests::bounded("the second ejection", async {
        loop {
            if call(&c, &mut conn, "ej-a").await.2 == "bad" {
                break;
            }
        }
    });
    again.await;
    wait_for_metric(proxy.admin(), EJECTIONS, &[("target", "ej-a")], 2.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_the_configured_share_is_ejected() {
    // Four endpoints, all failing; at most half may be out at once, and the interval is far
    // longer than the test so no ejected endpoint returns.
    let ups = [
        server::fixed(200, "x").label("e0").run().await,
        server::fixed(200, "x").label("e1").run().await,
        server::fixed(200, "x").label("e2").run().await,
        server::fixed(200, "x").label("e3").run().await,
    ];
    let mut svc = service("ej-s")
        .policy("retry", "{ max_attempts = 1 }")
        .policy("breaker", "{ enabled = false }")
        .policy(
            "ejection",
            "{ consecutive_failures = 2, interval = \"60s\", max_ejected_percent = 50 }",
        );
    for up in &ups {
        up.set_failing(true);
        svc = svc.endpoint(up.addr());
    }
    let proxy = proxy::builder()
        .snapshot(snapshot(1).service(svc).to_toml())
        .start()
        .await;
    let c = client::http1(proxy.outbound());
    let mut conn = c.connect().await;

    // Every endpoint fails every time: two of them are ejected within a few requests...
    mesh_tests::bounded("two ejections", async {
        while ejections(proxy.admin(), "ej-s").await < 2.0 {
            let (_, _, by) = call(&c, &mut conn, "ej-s").await;
            assert!(by.starts_with('e'), "{by}");
        }
    })
    .await;

    // ...and then no more, however long the other two keep failing: they take all traffic.
    let mut served = BTreeSet::new();
    for _ in 0..40 {
        served.insert(call(&c, &mut conn, "ej-s").await.2);
    }
    assert_eq!(ejections(proxy.admin(), "ej-s").await, 2.0);
    assert_eq!(served.len(), 2, "{served:?}");
    let total: u64 = ups.iter().map(|u| u.requests()).sum();
    let to_ejected: u64 = ups
        .iter()
        .filter(|u| !served.contains(u.label()))
        .map(|u| u.requests())
        .sum();
    // The ejected pair got only the requests that ejected them (two each at most, as each
    // was ejected on its second failure).
    assert!(to_ejected <= 4, "{to_ejected} of {total}");
}
