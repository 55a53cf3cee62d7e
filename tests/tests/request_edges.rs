//! Requests at the edges of HTTP that a sidecar must not pass on as they came: `CONNECT` (no
//! tunnels: 501), a host name in capitals (`B.MESH` is `b`), an HTTP/1.0 request without
//! `Host` (the next hop gets one), and `x-mesh-timeout-ms: 0` (a deadline already passed: 504,
//! nothing sent).

use mesh_tests::client::{self, raw_exchange, raw_status};
use mesh_tests::proxy::{self, TestProxy};
use mesh_tests::server::{self, Server, SERVED_BY};
use mesh_tests::snapshot::{service, snapshot};

async fn proxy_to_b(b: &Server) -> TestProxy {
    let snap = snapshot(1).service(service("b").endpoint(b.addr()));
    proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_answered_501_by_the_sidecar_on_both_listeners() {
    let b = server::echo().label("b").run().await;
    let proxy = proxy_to_b(&b).await;
    let app = server::echo().label("app").run().await;
    let inbound = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .start()
        .await;
    let connect = b"CONNECT b:80 HTTP/1.1\r\nHost: b:80\r\nConnection: close\r\n\r\n";
    for addr in [proxy.outbound(), inbound.inbound()] {
        let out = raw_exchange(addr, connect).await;
        assert_eq!(
            raw_status(&out),
            Some(501),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    assert_eq!((b.requests(), app.requests()), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_route_whatever_their_case() {
    let b = server::echo().label("b").run().await;
    let proxy = proxy_to_b(&b).await;
    for host in ["B.MESH", "B", "b.Mesh:80"] {
        let reply = client::http1(proxy.outbound()).get(host, "/").await;
        assert_eq!(reply.status, 200, "Host: {host}: {}", reply.text());
        assert_eq!(reply.header(SERVED_BY), Some("b"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_request_without_host_reaches_the_app_with_one() {
    let app = server::echo().label("app").run().await;
    let proxy = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .start()
        .await;
    let out = raw_exchange(proxy.inbound(), b"GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(
        raw_status(&out),
        Some(200),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    let text = String::from_utf8_lossy(&out);
    let (_, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let seen: serde_json::Value = serde_json::from_str(body).expect("the echo's JSON");
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["host"], app.addr().to_string(), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_timeout_is_a_deadline_already_passed() {
    let b = server::echo().label("b").run().await;
    let proxy = proxy_to_b(&b).await;
    let req = http::Request::get("/")
        .header("host", "b")
        .header("x-mesh-timeout-ms", "0")
        .body(mesh_tests::body::empty())
        .unwrap();
    let reply = client::http1(proxy.outbound()).send(req).await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["error"], "timeout");
    assert_eq!(b.requests(), 0, "a request with no time left was sent on");
}

/// Headers the mesh owns reach the next hop once, with the mesh's value, whatever the caller
/// sent twice or named in `Connection`; on the inbound side too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_headers_cannot_be_duplicated_or_named_away_on_either_side() {
    let b = server::echo().label("b").run().await;
    let proxy = proxy_to_b(&b).await;
    let req = http::Request::get("/")
        .header("host", "b")
        .header("x-mesh-caller", "mallory")
        .header("x-mesh-caller", "eve")
        .header("x-mesh-timeout-ms", "60000")
        .header("x-mesh-timeout-ms", "5000")
        .header("connection", "x-mesh-caller, x-mesh-timeout-ms")
        .body(mesh_tests::body::empty())
        .unwrap();
    let reply = client::http1(proxy.outbound()).send(req).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let headers = &reply.json()["headers"];
    assert_eq!(headers["x-mesh-caller"], "a", "{headers}");
    let timeout = headers["x-mesh-timeout-ms"]
        .as_str()
        .expect("one timeout header");
    assert!(!timeout.contains(','), "{headers}");
    assert!(timeout.parse::<u64>().unwrap() <= 5000, "{headers}");

    // A peer's request with the same headers twice reaches the app with each once.
    let app = server::echo().label("app").run().await;
    let inbound = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .start()
        .await;
    let req = http::Request::get("/")
        .header("host", "b")
        .header("x-mesh-caller", "a")
        .header("x-mesh-timeout-ms", "60000")
        .header("x-mesh-timeout-ms", "5000")
        .header("connection", "x-mesh-caller, x-mesh-timeout-ms")
        .body(mesh_tests::body::empty())
        .unwrap();
    let reply = client::http1(inbound.inbound()).send(req).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let headers = &reply.json()["headers"];
    assert_eq!(headers["x-mesh-caller"], "a", "{headers}");
    let timeout = headers["x-mesh-timeout-ms"]
        .as_str()
        .expect("one timeout header");
    assert!(!timeout.contains(','), "{headers}");
}
