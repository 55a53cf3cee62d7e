//! Callers that send slowly cannot hold the agent: a request body of declared length must
//! arrive within `limits.body_timeout` plus a second per `limits.body_min_rate` bytes, or it is
//! cut with 408 (the caller's fault: no endpoint or breaker is charged) and its concurrency
//! slot is free for the next caller. A head not complete within `limits.header_read_timeout`
//! is answered 408 too; a keep-alive connection idle that long is closed without one.

use mesh_tests::bounded;
use mesh_tests::client;
use mesh_tests::metrics::wait_for_metric;
use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends a head declaring `Content-Length: 100` and one byte of the body, then nothing more,
/// and returns the status of the answer, keeping the connection open meanwhile.
async fn dribble_one_byte(addr: SocketAddr) -> (u16, TcpStream) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: b\r\nContent-Length: 100\r\n\r\nx")
        .await
        .expect("write the head");
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let head = bounded("an answer to the dribbled upload", async {
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed without an answer: {:?}",
                String::from_utf8_lossy(&out)
            );
            out.extend_from_slice(&buf[..n]);
            if out.windows(4).any(|w| w == b"\r\n\r\n") {
                return out;
            }
        }
    })
    .await;
    let status = client::raw_status(&head)
        .unwrap_or_else(|| panic!("not an HTTP answer: {:?}", String::from_utf8_lossy(&head)));
    (status, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_body_sent_too_slowly_gets_408_and_frees_its_slot() {
    let app = server::echo_body().label("app").run().await;
    // One slot, so a dribbling caller that kept it would turn every other caller away.
    let proxy = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .inbound_limits(1, 4, "100ms")
        .bootstrap_extra("\n[limits]\nbody_timeout = \"500ms\"\nbody_min_rate = 1024\n")
        .start()
        .await;
    let inbound = proxy.inbound();

    // The route timeout is 30 s, longer than the test waits: only the upload clock answers.
    let (status, _conn) = dribble_one_byte(inbound).await;
    assert_eq!(status, 408);
    wait_for_metric(
        proxy.admin(),
        "agent_errors_total",
        &[("kind", "request_body_timeout")],
        1.0,
    )
    .await;

    // The slot is free again: a prompt caller gets through.
    let reply = client::http1(inbound).get("b", "/after").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_at_the_minimum_rate_is_not_cut() {
    let app = server::echo_body().label("app").run().await;
    let proxy = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .bootstrap_extra("\n[limits]\nbody_timeout = \"300ms\"\nbody_min_rate = 1024\n")
        .start()
        .await;
    let inbound = proxy.inbound();

    // 4 KiB in four parts 200 ms apart: 600 ms in all, past the 300 ms base, but each 1 KiB
    // earns a second.
    let mut stream = TcpStream::connect(inbound).await.expect("connect");
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: b\r\nContent-Length: 4096\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let part = [b'a'; 1024];
    for _ in 0..4 {
        stream.write_all(&part).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut out = Vec::new();
    bounded("the answer", stream.read_to_end(&mut out))
        .await
        .unwrap();
    assert_eq!(
        client::raw_status(&out),
        Some(200),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_slow_uploads_from_one_address_leave_slots_for_other_callers() {
    let app = server::echo_body().label("app").run().await;
    // 64 slots; one address may hold half. The upload clock is set far beyond the test, so
    // only the per-address share protects the other callers here.
    let proxy = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .inbound_limits(64, 256, "1s")
        .bootstrap_extra("\n[limits]\nbody_timeout = \"5m\"\n")
        .start()
        .await;
    let inbound = proxy.inbound();

    // A hostile local process on 127.0.0.2: 300 uploads that send one byte of 100.
    let mut hostile = Vec::new();
    for _ in 0..300 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut stream = bounded("a hostile connection", socket.connect(inbound))
            .await
            .unwrap();
        stream
            .write_all(b"POST /slow HTTP/1.1\r\nHost: b\r\nContent-Length: 100\r\n\r\nx")
            .await
            .unwrap();
        hostile.push(stream);
    }
    // Half the slots reach the app; the rest of the uploads wait in the queue.
    app.wait_requests(32).await;

    // Real callers (from 127.0.0.1) get the other half at once.
    for i in 0..20 {
        let reply = client::http1(inbound).get("b", &format!("/real/{i}")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(
        app.requests(),
        32 + 20,
        "the hostile address got more than its share of the slots"
    );
    drop(hostile);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_too_slowly_gets_408_and_an_idle_keep_alive_is_closed_quietly() {
    let app = server::fixed(200, "ok").run().await;
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(
            snapshot(1)
                .service(service("b").endpoint(app.addr()))
                .to_toml(),
        )
        .bootstrap_extra("\n[limits]\nheader_read_timeout = \"300ms\"\n")
        .start()
        .await;

    // A slowloris head: a request line and part of a header, then nothing.
    let mut slow = TcpStream::connect(proxy.outbound()).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: b\r\nX-Slow: ")
        .await
        .expect("write");
    let mut answer = Vec::new();
    bounded("the answer to a slow head", slow.read_to_end(&mut answer))
        .await
        .expect("read");
    assert_eq!(
        client::raw_status(&answer),
        Some(408),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(String::from_utf8_lossy(&answer).contains("request_header_timeout"));
    wait_for_metric(
        proxy.admin(),
        "agent_protocol_errors_total",
        &[("kind", "header_timeout")],
        1.0,
    )
    .await;

    // A request answered, then silence on the same connection: closed after the timeout with
    // nothing more written, and not counted as a slow head.
    let mut idle = TcpStream::connect(proxy.outbound()).await.expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    bounded("the idle connection closing", idle.read_to_end(&mut rest))
        .await
        .expect("read");
    assert_eq!(client::raw_status(&rest), Some(200));
    let text = String::from_utf8_lossy(&rest);
    assert!(!text.contains("408"), "{text}");
    let scraped = mesh_tests::metrics::scrape(proxy.admin()).await;
    let slow_heads = mesh_tests::metrics::metric_or_zero(
        &scraped,
        "agent_protocol_errors_total",
        &[("kind", "header_timeout")],
    );
    assert_eq!(slow_heads, 1.0, "{scraped}");
}
