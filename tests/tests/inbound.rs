//! The inbound side: everything is forwarded to the agent's app, at most `max_concurrency` at a
//! time; beyond that requests queue, and a full queue or a long wait gets 503 + Retry-After.

use mesh_tests::client::{self, Reply};
use mesh_tests::proxy;
use mesh_tests::server::{self, SERVED_BY};
use mesh_tests::{body, bounded};
use tokio::task::JoinHandle;

fn get(addr: std::net::SocketAddr, path: &'static str) -> JoinHandle<Reply> {
    tokio::spawn(async move {
        let req = http::Request::get(path)
            .header("host", "b")
            .body(body::empty())
            .unwrap();
        client::http1(addr).send(req).await
    })
}

fn assert_shed(reply: &Reply) {
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        reply.header("retry-after").is_some(),
        "503 without Retry-After; headers: {:?}",
        reply.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_forwards_to_the_app() {
    let app = server::echo().label("app").run().await;
    let proxy = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .start()
        .await;

    let reply = client::http1(proxy.inbound())
        .get("b.mesh", "/task?id=7")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header(SERVED_BY), Some("app"));
    assert_eq!(reply.json()["path"], "/task?id=7");
    let reply = client::http2(proxy.inbound()).get("b.mesh", "/h2").await;
    assert_eq!(reply.header(SERVED_BY), Some("app"));
    assert_eq!(app.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_sheds_with_503_and_retry_after() {
    let app = server::fixed(200, "done").label("app").hold().run().await;
    // One at a time, one waiting; the queue timeout is far beyond the test so only a full
    // queue can shed.
    let proxy = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .inbound_limits(1, 1, "60s")
        .start()
        .await;

    let first = get(proxy.inbound(), "/1");
    app.wait_requests(1).await;

    // Two more arrive while the app is busy: one takes the queue slot, the other is shed.
    // Which one is a race between the two; that exactly one is shed is not.
    let mut second = get(proxy.inbound(), "/2");
    let mut third = get(proxy.inbound(), "/3");
    let (shed, mut queued) = bounded("one of the two extra requests to be shed", async {
        tokio::select! {
            r = &mut second => (r.expect("request task"), third),
            r = &mut third => (r.expect("request task"), second),
        }
    })
    .await;
    assert_shed(&shed);
    assert_eq!(
        app.requests(),
        1,
        "the queued request reached the app past the limit"
    );
    assert!(!first.is_finished() && !queued.is_finished());

    // The app answers: the first completes, then the queued one is let through.
    app.release(2);
    let first = bounded("the first request", first)
        .await
        .expect("request task");
    assert_eq!(first.status, 200, "{}", first.text());
    let queued = bounded("the queued request", &mut queued)
        .await
        .expect("request task");
    assert_eq!(queued.status, 200, "{}", queued.text());
    assert_eq!(app.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_queued_past_the_queue_timeout_is_shed() {
    let app = server::fixed(200, "done").label("app").hold().run().await;
    let proxy = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .inbound_limits(1, 8, "200ms")
        .start()
        .await;

    let first = get(proxy.inbound(), "/1");
    app.wait_requests(1).await;
    // Room in the queue, but the app stays busy longer than the queue timeout.
    let waited = bounded("the queued request to time out", get(proxy.inbound(), "/2"))
        .await
        .expect("request task");
    assert_shed(&waited);
    assert_eq!(app.requests(), 1);

    app.release(1);
    let first = bounded("the first request", first)
        .await
        .expect("request task");
    assert_eq!(first.status, 200);
}
