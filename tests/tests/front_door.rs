//! Regression tests for the HTTP/1 front door of both listeners, so that a dependency update
//! (hyper, httparse) cannot loosen what a sidecar refuses: conflicting `Content-Length`s,
//! obs-fold, NUL and bare CR in a head are 400 and never reach the app; an oversized head is
//! 431; garbage and TLS bytes on the plaintext outbound listener cost their own connection
//! only, and the next client, and a client already connected, are served.

use mesh_tests::client::{self, raw_exchange, raw_status};
use mesh_tests::proxy::{self, TestProxy};
use mesh_tests::server::{self, Server, SERVED_BY};
use mesh_tests::snapshot::{service, snapshot};

/// Sidecar `a` whose outbound routes `b` to `app`, and sidecar `b` whose inbound serves `app`.
async fn both_listeners(app: &Server) -> (TestProxy, TestProxy) {
    let outbound = proxy::builder()
        .agent("a")
        .snapshot(
            snapshot(1)
                .service(service("b").endpoint(app.addr()))
                .to_toml(),
        )
        .start()
        .await;
    let inbound = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .start()
        .await;
    (outbound, inbound)
}

/// Heads that a lenient parser would accept and forward, each of which the front door must
/// answer 400 itself.
const MALFORMED: [(&str, &[u8]); 8] = [
    (
        "two Content-Length headers that disagree",
        b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
    ),
    (
        "one Content-Length listing two lengths",
        b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 3, 5\r\n\r\nabcde",
    ),
    (
        "obs-fold (a header continued on a line starting with a space)",
        b"GET / HTTP/1.1\r\nHost: b\r\nX-Folded: one\r\n two\r\n\r\n",
    ),
    (
        "obs-fold with a tab",
        b"GET / HTTP/1.1\r\nHost: b\r\nX-Folded: one\r\n\ttwo\r\n\r\n",
    ),
    (
        "NUL in a header value",
        b"GET / HTTP/1.1\r\nHost: b\r\nX-Nul: a\0b\r\n\r\n",
    ),
    (
        "NUL in a header name",
        b"GET / HTTP/1.1\r\nHost: b\r\nX-N\0ul: a\r\n\r\n",
    ),
    (
        "bare CR inside a header value",
        b"GET / HTTP/1.1\r\nHost: b\r\nX-Cr: a\rb\r\n\r\n",
    ),
    (
        "bare CR ending the request line",
        b"GET / HTTP/1.1\rHost: b\r\n\r\n",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_heads_are_400_on_both_listeners_and_never_reach_the_app() {
    let app = server::echo().label("app").run().await;
    let (outbound, inbound) = both_listeners(&app).await;
    for (listener, addr) in [
        ("outbound", outbound.outbound()),
        ("inbound", inbound.inbound()),
    ] {
        for (case, bytes) in MALFORMED {
            let out = raw_exchange(addr, bytes).await;
            assert_eq!(
                raw_status(&out),
                Some(400),
                "{listener}, {case}: the sidecar answered {:?}",
                String::from_utf8_lossy(&out)
            );
        }
    }
    assert_eq!(app.requests(), 0, "a malformed head reached the app");
    // The same requests well formed are served: the 400s are about the defects alone.
    for addr in [outbound.outbound(), inbound.inbound()] {
        let out = raw_exchange(
            addr,
            b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\nX-Folded: one two\r\nConnection: close\r\n\r\nabc",
        )
        .await;
        assert_eq!(
            raw_status(&out),
            Some(200),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    assert_eq!(app.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_head_is_431_on_both_listeners() {
    let app = server::echo().label("app").run().await;
    let (outbound, inbound) = both_listeners(&app).await;
    // 96 KiB of headers, over the 64 KiB limit on a request head.
    let mut bytes = b"GET / HTTP/1.1\r\nHost: b\r\n".to_vec();
    for i in 0..96 {
        bytes.extend_from_slice(format!("x-filler-{i:02}: ").as_bytes());
        bytes.extend_from_slice(&[b'a'; 1000]);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    for (listener, addr) in [
        ("outbound", outbound.outbound()),
        ("inbound", inbound.inbound()),
    ] {
        let out = raw_exchange(addr, &bytes).await;
        assert_eq!(
            raw_status(&out),
            Some(431),
            "{listener}: the sidecar answered {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
    }
    assert_eq!(app.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_tls_bytes_cost_only_their_own_connection() {
    let app = server::echo().label("b").run().await;
    let (outbound, _inbound) = both_listeners(&app).await;
    let addr = outbound.outbound();
    // A client connected before the garbage arrives, kept alive across it.
    let mut before = client::http1(addr).connect().await;
    let req = |path: &str| {
        client::http1(addr)
            .request(http::Method::GET, "b", path)
            .body(mesh_tests::body::empty())
            .unwrap()
    };
    assert_eq!(before.send(req("/before")).await.status, 200);

    // A TLS 1.2/1.3 ClientHello record header and the start of its body.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03,
    ];
    hello.extend((0u8..32).map(|i| i.wrapping_mul(73)));
    let garbage: Vec<u8> = (0u8..200).map(|i| i.wrapping_mul(151) ^ 0x5a).collect();
    // Starts like a request line, so it reaches the HTTP parser rather than detection.
    let http_like: &[u8] = b"GET \x01\x02\xff\xfe HTTP/9.9\r\n\x00\r\n\r\n";
    for (case, bytes) in [
        ("a TLS ClientHello", &hello[..]),
        ("binary garbage", &garbage[..]),
        ("a garbled request line", http_like),
    ] {
        let out = raw_exchange(addr, bytes).await;
        assert!(
            out.is_empty() || raw_status(&out) == Some(400),
            "{case}: {:?}",
            String::from_utf8_lossy(&out)
        );
        // The next client is served at once, on a fresh connection...
        let reply = client::http1(addr).get("b", "/next").await;
        assert_eq!(reply.status, 200, "after {case}: {}", reply.text());
        assert_eq!(reply.header(SERVED_BY), Some("b"));
        // ...and so is the one that was connected all along.
        let reply = before.send(req("/still")).await;
        assert_eq!(reply.status, 200, "kept-alive client after {case}");
    }
    assert_eq!(app.requests(), 7);
}

/// A server should skip empty lines before a request line (RFC 9112 2.2): a request after
/// them is served, not taken for a foreign protocol and closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_empty_lines_is_served_on_both_listeners() {
    let app = server::echo().label("app").run().await;
    let (outbound, inbound) = both_listeners(&app).await;
    for addr in [outbound.outbound(), inbound.inbound()] {
        for bytes in [
            &b"\r\nGET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"[..],
            b"\r\n\r\nGET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
        ] {
            let out = raw_exchange(addr, bytes).await;
            assert_eq!(
                raw_status(&out),
                Some(200),
                "{:?}",
                String::from_utf8_lossy(&out)
            );
        }
    }
    assert_eq!(app.requests(), 4);
}
