//! What the outbound listener does with bytes that are not a good request: malformed HTTP gets
//! 400 and non-HTTP bytes a closed connection and a counted error (oversized heads and the
//! parser's other refusals, on both listeners: `front_door.rs`).

use mesh_tests::client::{raw_exchange, raw_status};
use mesh_tests::metrics;
use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};

async fn proxy_with_b() -> (server::Server, proxy::TestProxy) {
    let b = server::fixed(200, "b").label("b").run().await;
    let snap = snapshot(1).service(service("b").endpoint(b.addr()));
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;
    (b, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_gets_400() {
    let (b, proxy) = proxy_with_b().await;
    let cases: [&[u8]; 2] = [
        // A header line without a colon.
        b"GET / HTTP/1.1\r\nHost: b\r\nthis line is not a header\r\n\r\n",
        // A space inside the request target.
        b"GET /a b/c HTTP/1.1\r\nHost: b\r\n\r\n",
    ];
    for bytes in cases {
        let out = raw_exchange(proxy.outbound(), bytes).await;
        assert_eq!(
            raw_status(&out),
            Some(400),
            "for {:?} the proxy answered {:?}",
            String::from_utf8_lossy(bytes),
            String::from_utf8_lossy(&out)
        );
    }
    assert_eq!(b.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_http_bytes_close_the_connection_and_are_counted() {
    let (b, proxy) = proxy_with_b().await;
    let labels = [("kind", "unknown_protocol")];
    let before = metrics::metric_or_zero(
        &metrics::scrape(proxy.admin()).await,
        "agent_protocol_errors_total",
        &labels,
    );

    // A TLS ClientHello's first bytes, to a plaintext listener.
    let mut tls = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    tls.extend((0u8..53).map(|i| i.wrapping_mul(37)));
    // Binary garbage.
    let garbage: Vec<u8> = (0u8..64).map(|i| i.wrapping_mul(151) ^ 0xa5).collect();

    for bytes in [&tls, &garbage] {
        let out = raw_exchange(proxy.outbound(), bytes).await;
        assert!(
            out.is_empty(),
            "expected the connection closed without an answer, got {:?}",
            String::from_utf8_lossy(&out)
        );
    }
    let after = metrics::wait_for_metric(
        proxy.admin(),
        "agent_protocol_errors_total",
        &labels,
        before + 2.0,
    )
    .await;
    assert_eq!(after, before + 2.0);
    assert_eq!(b.requests(), 0);
}

/// A caller's own broken body is the caller's fault: 400 `request_body`, never an upstream
/// failure, so it cannot open the target's breaker for every other caller on the sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_body_is_the_callers_fault() {
    let b = server::echo_body().label("b").run().await;
    for http2 in [false, true] {
        let mut svc = service("b").endpoint(b.addr());
        if http2 {
            svc = svc.http2();
        }
        let proxy = proxy::builder()
            .agent("a")
            .snapshot(snapshot(1).service(svc).to_toml())
            .start()
            .await;
        // More than the default breaker threshold (5).
        for _ in 0..7 {
            let out = raw_exchange(
                proxy.outbound(),
                b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            )
            .await;
            let text = String::from_utf8_lossy(&out);
            assert_eq!(
                raw_status(&out),
                Some(400),
                "http2 upstream {http2}: {text}"
            );
        }
        // The target is healthy for everyone else.
        let reply = mesh_tests::client::http1(proxy.outbound())
            .get("b", "/")
            .await;
        assert_eq!(
            reply.status,
            200,
            "http2 upstream {http2}: {}",
            reply.text()
        );
        let text = metrics::scrape(proxy.admin()).await;
        let opened = metrics::metric_or_zero(
            &text,
            "agent_circuit_breaker_transitions_total",
            &[("target", "b"), ("to", "open")],
        );
        assert_eq!(opened, 0.0, "http2 upstream {http2}");
    }
}

/// The same for a body whose framing is too large rather than wrong: a 1 MB chunk extension or
/// 1 MB of trailers is the caller's 4xx, never an upstream failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_chunk_extensions_and_trailers_are_the_callers_fault() {
    let b = server::echo_body().label("b").run().await;
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(
            snapshot(1)
                .service(service("b").endpoint(b.addr()))
                .to_toml(),
        )
        .start()
        .await;
    let huge = "a".repeat(1 << 20);
    let extension = format!(
        "POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n5;ext={huge}\r\nhello\r\n0\r\n\r\n"
    );
    let trailers = format!(
        "POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nTrailer: x-big\r\n\r\n5\r\nhello\r\n0\r\nx-big: {huge}\r\n\r\n"
    );
    for (case, bytes) in [("chunk extension", &extension), ("trailers", &trailers)] {
        // More than the default breaker threshold (5).
        for _ in 0..6 {
            let out = raw_exchange(proxy.outbound(), bytes.as_bytes()).await;
            let status = raw_status(&out);
            assert!(
                status.is_some_and(|s| (400..500).contains(&s)),
                "{case}: {:?}",
                String::from_utf8_lossy(&out[..out.len().min(300)])
            );
        }
    }
    let reply = mesh_tests::client::http1(proxy.outbound())
        .get("b", "/")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let text = metrics::scrape(proxy.admin()).await;
    let opened = metrics::metric_or_zero(
        &text,
        "agent_circuit_breaker_transitions_total",
        &[("target", "b"), ("to", "open")],
    );
    assert_eq!(opened, 0.0);
}
