//! h2c smuggling: an `Upgrade: h2c` request must not reach the app as an upgrade (an app that
//! accepted it would turn the connection into a tunnel past every per-request policy). The
//! mesh strips it and forwards a plain request; WebSocket upgrades still pass (`websocket.rs`).

use mesh_tests::client;
use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_reaches_the_app_as_a_plain_request() {
    // The app records the headers it receives: no upgrade may be among them.
    let app = server::echo().label("b-app").run().await;
    let b = proxy::builder()
        .agent("b")
        .inbound_app(app.addr())
        .start()
        .await;
    let a = proxy::builder()
        .agent("a")
        .snapshot(
            snapshot(1)
                .service(service("b").endpoint(b.inbound()))
                .to_toml(),
        )
        .start()
        .await;
    // Through a's outbound, and straight to b's inbound; `h2c` alone, and on a second
    // `Upgrade` line after a `websocket` one.
    for (addr, what) in [(a.outbound(), "via a"), (b.inbound(), "to b's inbound")] {
        for upgrades in [&["h2c"][..], &["websocket", "h2c"]] {
            let c = client::http1(addr);
            let mut req = c.request(http::Method::GET, "b", "/");
            for up in upgrades {
                req = req.header("upgrade", *up);
            }
            let req = req
                .header("connection", "Upgrade, HTTP2-Settings")
                .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
                .body(mesh_tests::body::empty())
                .unwrap();
            let reply = c.send(req).await;
            assert_eq!(
                reply.status, 200,
                "{what}, {upgrades:?}: answered as a plain request"
            );
            let seen = app.request_headers();
            let last = seen.last().expect("the app got the request");
            assert!(
                last.get("upgrade").is_none(),
                "{what}, {upgrades:?}: {last:?}"
            );
            assert!(
                last.get("http2-settings").is_none(),
                "{what}, {upgrades:?}: {last:?}"
            );
        }
    }
}
