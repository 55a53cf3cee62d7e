//! The real binary under SIGTERM: it stops accepting at once, reports not-ready, lets requests
//! in flight finish, and exits 0; a second SIGTERM ends it without waiting. Connections with
//! nothing in flight never hold the drain: not a silent one, not an HTTP/2 peer deaf to PING.
//!
//! Needs `target/<profile>/mesh-proxy`: run `cargo build -p mesh-proxy` first.

use mesh_tests::client;
use mesh_tests::h2_peer::{DeafClient, Seen};
use mesh_tests::metrics::wait_for_metric;
use mesh_tests::proxy::{self, ProxyProcess};
use mesh_tests::server::{self, Server, SERVED_BY};
use mesh_tests::snapshot::{service, snapshot};
use mesh_tests::{bounded, eventually};
use std::time::Duration;
use tokio::net::TcpStream;

async fn spawn_proxy_to(up: &Server, grace: &str) -> ProxyProcess {
    let snap = snapshot(1).service(service("b").endpoint(up.addr()));
    proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .grace(grace)
        .spawn()
        .await
}

/// Waits until the listener at `addr` refuses connections. The proxy closes it on SIGTERM but
/// announces that only through the closed port itself, so this checks it repeatedly.
async fn until_refused(addr: std::net::SocketAddr) {
    eventually(
        "the outbound listener to refuse new connections",
        || async move {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
                _ => None,
            }
        },
    )
    .await
}

async fn ready_status(proxy: &ProxyProcess) -> Option<u16> {
    let req = http::Request::get("/ready")
        .header("host", "admin")
        .body(mesh_tests::body::empty())
        .unwrap();
    client::http1(proxy.admin())
        .try_send(req)
        .await
        .ok()
        .map(|r| r.status.as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_request_then_exits_zero() {
    let up = server::fixed(200, "finished").label("b").hold().run().await;
    let mut proxy = spawn_proxy_to(&up, "10s").await;
    assert_eq!(ready_status(&proxy).await, Some(200));

    // A request is in flight: the upstream holds it.
    let outbound = proxy.outbound();
    let in_flight = tokio::spawn(async move { client::http1(outbound).get("b", "/work").await });
    up.wait_requests(1).await;

    proxy.sigterm();
    until_refused(proxy.outbound()).await;
    let draining = eventually("/ready to answer 503 while draining", || async {
        ready_status(&proxy).await.filter(|s| *s == 503)
    })
    .await;
    assert_eq!(draining, 503);
    assert!(
        !in_flight.is_finished(),
        "the in-flight request ended before its upstream answered"
    );

    // The upstream answers: the request completes and the proxy exits cleanly.
    up.release(1);
    let reply = bounded("the in-flight request", in_flight)
        .await
        .expect("request task");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header(SERVED_BY), Some("b"));
    assert_eq!(reply.text(), "finished");
    let status = proxy.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; stderr:\n{}",
        proxy.stderr_lines().join("\n")
    );
    assert_eq!(up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_proxy_exits_zero_on_sigterm() {
    let up = server::fixed(200, "ok").label("b").run().await;
    let mut proxy = spawn_proxy_to(&up, "30s").await;
    assert_eq!(
        client::http1(proxy.outbound()).get("b", "/").await.status,
        200
    );

    proxy.sigterm();
    // Nothing in flight: no reason to wait for the grace period.
    let status = proxy.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_without_waiting_for_the_drain() {
    let up = server::fixed(200, "never").label("b").hold().run().await;
    // A grace far longer than the test: only the second signal can end the proxy in time.
    let mut proxy = spawn_proxy_to(&up, "60s").await;
    let outbound = proxy.outbound();
    let in_flight = tokio::spawn(async move {
        let req = http::Request::get("/stuck")
            .header("host", "b")
            .body(mesh_tests::body::empty())
            .unwrap();
        client::http1(outbound)
            .try_send(req)
            .await
            .map(|r| r.status)
    });
    up.wait_requests(1).await;

    proxy.sigterm();
    until_refused(proxy.outbound()).await;
    proxy.sigterm();
    let _status = proxy.wait_exit(Duration::from_secs(5)).await;
    // The held request could not have completed normally.
    let outcome = bounded("the cut-off request to end", in_flight)
        .await
        .expect("request task");
    assert!(
        outcome.as_ref().map_or(true, |s| *s != 200),
        "the held request got {outcome:?} although its upstream never answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_answers_ping_does_not_hold_the_drain() {
    let up = server::fixed(200, "ok").label("b").run().await;
    let snap = snapshot(1).service(service("b").endpoint(up.addr()));
    let mut proxy = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .grace("30s")
        .close_idle_after("1s")
        .spawn()
        .await;
    let mut deaf = DeafClient::connect(proxy.outbound()).await;
    // The server's SETTINGS: hyper is serving the connection.
    let first = bounded("the server's SETTINGS", deaf.next()).await;
    assert_eq!(first, Some(Seen::Other(0x4)));

    proxy.sigterm();
    // GOAWAY and PING go out; the PING is never answered, and the proxy closes the connection
    // anyway, long before the 30 s grace.
    let mut seen = Vec::new();
    while let Some(frame) = bounded("the proxy to close the deaf connection", deaf.next()).await {
        seen.push(frame);
    }
    assert!(
        seen.contains(&Seen::GoAway),
        "frames after SIGTERM: {seen:?}"
    );
    assert!(seen.contains(&Seen::Ping), "frames after SIGTERM: {seen:?}");
    let status = proxy.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_does_not_delay_exit() {
    let up = server::fixed(200, "ok").label("b").run().await;
    let mut proxy = spawn_proxy_to(&up, "30s").await;
    // Connected and accepted, but not a byte sent (the head timeout is 10 s).
    let _silent = TcpStream::connect(proxy.outbound()).await.unwrap();
    wait_for_metric(
        proxy.admin(),
        "agent_connections_total",
        &[("listener", "outbound")],
        1.0,
    )
    .await;

    proxy.sigterm();
    let status = proxy.wait_exit(Duration::from_secs(3)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
}
