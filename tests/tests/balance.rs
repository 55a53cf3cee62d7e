//! Power of two choices over peak-EWMA latency: between a slow and a fast endpoint, the fast
//! one takes most of the traffic.

use mesh_tests::client;
use mesh_tests::proxy;
use mesh_tests::server::{self, SERVED_BY};
use mesh_tests::snapshot::{service, snapshot};
use std::time::Duration;
use tokio::task::JoinSet;

const REQUESTS: usize = 200;
const CONCURRENCY: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_most_requests_to_the_fast_endpoint() {
    // The delay is the slow endpoint's own latency: the behaviour the balancer must notice.
    let slow = server::fixed(200, "slow")
        .label("slow")
        .delay(Duration::from_millis(50))
        .run()
        .await;
    let fast = server::fixed(200, "fast").label("fast").run().await;
    let snap = snapshot(1).service(service("b").endpoint(slow.addr()).endpoint(fast.addr()));
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;

    // Eight callers, each on its own keep-alive connection, send requests back to back.
    let mut callers = JoinSet::new();
    for _ in 0..CONCURRENCY {
        let client = client::http1(proxy.outbound());
        callers.spawn(async move {
            let mut conn = client.connect().await;
            let mut served = Vec::new();
            for _ in 0..REQUESTS / CONCURRENCY {
                let req = client
                    .request(http::Method::GET, "b", "/")
                    .body(mesh_tests::body::empty())
                    .unwrap();
                let reply = conn.send(req).await;
                assert_eq!(reply.status, 200, "{}", reply.text());
                served.push(reply.header(SERVED_BY).unwrap_or("?").to_owned());
            }
            served
        });
    }
    let served: Vec<String> = mesh_tests::bounded("every caller to finish", callers.join_all())
        .await
        .into_iter()
        .flatten()
        .collect();

    let to_fast = served.iter().filter(|s| *s == "fast").count();
    let to_slow = served.iter().filter(|s| *s == "slow").count();
    assert_eq!(to_fast + to_slow, REQUESTS, "{served:?}");
    assert_eq!((fast.requests() + slow.requests()) as usize, REQUESTS);
    assert!(
        to_fast * 100 >= REQUESTS * 75,
        "the fast endpoint served {to_fast} of {REQUESTS} (slow: {to_slow}); expected at least 75%"
    );
}
