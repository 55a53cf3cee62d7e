//! Outbound routing: by authority over HTTP/1.1 and h2c, the `.mesh` and `.service.consul`
//! forms, explicit route rules, and the JSON errors when there is nowhere (or no one) to go.

use http::Method;
use mesh_tests::client::{self, Client};
use mesh_tests::proxy::{self, TestProxy};
use mesh_tests::server::{self, Server, SERVED_BY};
use mesh_tests::snapshot::{route, service, snapshot};
use mesh_tests::{body, metrics};

async fn proxy_to(agent: &str, servers: &[(&str, &Server)]) -> TestProxy {
    let mut snap = snapshot(1);
    for (name, server) in servers {
        snap = snap.service(service(name).endpoint(server.addr()));
    }
    proxy::builder()
        .agent(agent)
        .snapshot(snap.to_toml())
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_request_is_routed_by_host() {
    let b = server::echo().label("b").run().await;
    let c = server::echo().label("c").run().await;
    let proxy = proxy_to("a", &[("b", &b), ("c", &c)]).await;
    let client = client::http1(proxy.outbound());

    let reply = client.get("b", "/hello?x=1").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header(SERVED_BY), Some("b"));
    assert_eq!(reply.json()["path"], "/hello?x=1");

    let reply = client.get("c", "/").await;
    assert_eq!(reply.header(SERVED_BY), Some("c"));
    assert_eq!((b.requests(), c.requests()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_request_is_routed_by_authority() {
    let b = server::echo().label("b").run().await;
    let c = server::echo().label("c").run().await;
    let proxy = proxy_to("a", &[("b", &b), ("c", &c)]).await;
    let client = client::http2(proxy.outbound());

    let reply = client.get("c", "/over-h2").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.version, http::Version::HTTP_2);
    assert_eq!(reply.header(SERVED_BY), Some("c"));
    assert_eq!(reply.json()["path"], "/over-h2");
    assert_eq!((b.requests(), c.requests()), (0, 1));
}

/// The upstream sees the authority the caller named, not the endpoint's address: over HTTP/1.1
/// an origin-form target with the caller's `Host` (an absolute-form target's authority would
/// override `Host`), over HTTP/2 the caller's `:authority` and no `Host` beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_sees_the_callers_authority_over_http1_and_http2() {
    let h1 = server::echo().label("h1").run().await;
    let h2 = server::echo().label("h2").run().await;
    let snap = snapshot(1)
        .service(service("vh-one").endpoint(h1.addr()))
        .service(service("vh-two").endpoint(h2.addr()).http2());
    let proxy = proxy::builder().snapshot(snap.to_toml()).start().await;
    for c in [
        client::http1(proxy.outbound()),
        client::http2(proxy.outbound()),
    ] {
        let one = c.get("vh-one.mesh", "/a?b=1").await.json();
        assert_eq!(one["version"], "HTTP/1.1");
        assert_eq!(one["authority"], serde_json::Value::Null, "{one}");
        assert_eq!(one["host"], "vh-one.mesh");
        assert_eq!(one["path"], "/a?b=1");

        let two = c.get("vh-two.mesh", "/c").await.json();
        assert_eq!(two["version"], "HTTP/2.0");
        assert_eq!(two["authority"], "vh-two.mesh", "{two}");
        assert!(two["headers"].get("host").is_none(), "{two}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_and_consul_authorities_name_the_same_service() {
    let b = server::echo().label("b").run().await;
    let proxy = proxy_to("a", &[("b", &b)]).await;
    let authorities = [
        "b",
        "b:8080",
        "b.mesh",
        "b.mesh:80",
        "b.service.consul",
        "b.service.consul:9000",
    ];

    for client in [
        client::http1(proxy.outbound()),
        client::http2(proxy.outbound()),
    ] {
        for authority in authorities {
            let reply = client.get(authority, "/").await;
            assert_eq!(reply.status, 200, "{authority}: {}", reply.text());
            assert_eq!(reply.header(SERVED_BY), Some("b"), "{authority}");
        }
    }
    assert_eq!(b.requests(), 2 * authorities.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_service_is_reached_over_h2c() {
    let g = server::echo().label("g").run().await;
    let snap = snapshot(1).service(service("g").http2().endpoint(g.addr()));
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;

    // The app speaks HTTP/1.1; the sidecar speaks h2c to the endpoint.
    let reply = client::http1(proxy.outbound()).get("g", "/h2").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["version"], "HTTP/2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_prefix_and_header_rule_picks_the_backend() {
    let b = server::echo().label("b").run().await;
    let canary = server::echo().label("b-canary").run().await;
    let snap = snapshot(1)
        .service(service("b").endpoint(b.addr()))
        .service(service("b-canary").endpoint(canary.addr()))
        .route(
            route("b", "b-canary")
                .path_prefix("/v2/")
                .header("x-canary", "1"),
        );
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;

    let send = |client: Client, path: &'static str, canary: bool| async move {
        let mut req = client.request(Method::GET, "b.mesh", path);
        if canary {
            req = req.header("x-canary", "1");
        }
        let reply = client.send(req.body(body::empty()).unwrap()).await;
        assert_eq!(
            reply.status,
            200,
            "{path} canary={canary}: {}",
            reply.text()
        );
        reply.header(SERVED_BY).unwrap_or_default().to_owned()
    };
    for client in [
        client::http1(proxy.outbound()),
        client::http2(proxy.outbound()),
    ] {
        // Both conditions hold: the rule applies.
        assert_eq!(send(client, "/v2/items", true).await, "b-canary");
        // Either one missing: the by-name default.
        assert_eq!(send(client, "/v2/items", false).await, "b");
        assert_eq!(send(client, "/v1/items", true).await, "b");
        assert_eq!(send(client, "/v2", true).await, "b");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_target_gets_503_no_route_json() {
    let b = server::echo().label("b").run().await;
    let proxy = proxy_to("a", &[("b", &b)]).await;

    for client in [
        client::http1(proxy.outbound()),
        client::http2(proxy.outbound()),
    ] {
        let reply = client.get("nobody.mesh", "/").await;
        assert_eq!(reply.status, 503, "{}", reply.text());
        let json = reply.json();
        assert_eq!(json["error"], "no_route", "{json}");
        assert_eq!(json["target"], "nobody", "{json}");
    }
    assert_eq!(b.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_gets_502_json() {
    // A port that was just bound and released: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a throwaway port");
    let snap = snapshot(1).service(service("gone").endpoint(closed));
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(snap.to_toml())
        .start()
        .await;

    let reply = client::http1(proxy.outbound()).get("gone", "/").await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.json()["error"], "upstream_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_header_is_set_and_cannot_be_spoofed() {
    let b = server::echo().label("b").run().await;
    let proxy = proxy_to("agent-a", &[("b", &b)]).await;

    for client in [
        client::http1(proxy.outbound()),
        client::http2(proxy.outbound()),
    ] {
        let reply = client.get("b", "/").await;
        assert_eq!(reply.json()["headers"]["x-mesh-caller"], "agent-a");

        // An app claiming to be someone else is overruled, and only one value arrives.
        let req = client
            .request(Method::GET, "b", "/")
            .header("x-mesh-caller", "root")
            .header("x-mesh-caller", "admin")
            .body(body::empty())
            .unwrap();
        let reply = client.send(req).await;
        assert_eq!(reply.json()["headers"]["x-mesh-caller"], "agent-a");
    }

    // Nor can it name the mesh's headers in `Connection` to have them stripped on the way.
    let client = client::http1(proxy.outbound());
    let req = client
        .request(Method::GET, "b", "/")
        .header("connection", "x-mesh-caller, x-mesh-timeout-ms, x-drop-me")
        .header("x-drop-me", "1")
        .body(body::empty())
        .unwrap();
    let reply = client.send(req).await;
    let headers = &reply.json()["headers"];
    assert_eq!(headers["x-mesh-caller"], "agent-a", "{headers}");
    assert!(headers["x-mesh-timeout-ms"].is_string(), "{headers}");
    assert!(headers["x-drop-me"].is_null(), "{headers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_requests_are_counted_per_target() {
    let b = server::fixed(200, "ok").label("b").run().await;
    let proxy = proxy_to("counting-agent", &[("b", &b)]).await;
    let client = client::http1(proxy.outbound());
    for _ in 0..3 {
        assert_eq!(client.get("b", "/").await.status, 200);
    }
    assert_eq!(client.get("nowhere", "/").await.status, 503);

    let labels = [
        ("agent", "counting-agent"),
        ("target", "b"),
        ("status", "200"),
    ];
    let n = metrics::wait_for_metric(proxy.admin(), "agent_requests_total", &labels, 3.0).await;
    assert_eq!(n, 3.0);
    let text = metrics::scrape(proxy.admin()).await;
    assert!(
        metrics::metric_value(&text, "agent_request_duration_seconds_count", &labels[..2])
            .is_some()
            || metrics::metric_value(&text, "agent_request_duration_seconds", &labels[..2])
                .is_some(),
        "no agent_request_duration_seconds samples for target b:\n{text}"
    );
}
