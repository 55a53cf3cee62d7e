//! The harness against itself, without a proxy: if these fail, scenario failures say nothing
//! about the proxy.

use http::{HeaderMap, HeaderValue, Method};
use mesh_tests::body;
use mesh_tests::client::{self, next_data};
use mesh_tests::server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_over_http1_and_h2c() {
    let up = server::echo().label("e").run().await;

    let reply = client::http1(up.addr()).get("b.mesh", "/x?y=1").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header(server::SERVED_BY), Some("e"));
    let json = reply.json();
    assert_eq!(json["path"], "/x?y=1");
    assert_eq!(json["host"], "b.mesh");
    assert_eq!(json["version"], "HTTP/1.1");

    let reply = client::http2(up.addr()).get("b.mesh", "/h2").await;
    let json = reply.json();
    assert_eq!(json["version"], "HTTP/2.0");
    assert_eq!(json["host"], "b.mesh");
    assert_eq!(up.requests(), 2);
    assert_eq!(up.hosts(), vec!["b.mesh", "b.mesh"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chunks_arrive_one_by_one() {
    let up = server::streaming().run().await;
    let c = client::http1(up.addr());
    let req = c
        .request(Method::GET, "s", "/")
        .body(body::empty())
        .unwrap();
    let (rsp, upstream) = tokio::join!(c.send_streaming(req), up.next_stream());
    let mut rsp_body = rsp.into_body();
    upstream.send("one");
    assert_eq!(next_data(&mut rsp_body).await.unwrap(), "one");
    upstream.send("two");
    assert_eq!(next_data(&mut rsp_body).await.unwrap(), "two");
    upstream.finish();
    assert_eq!(next_data(&mut rsp_body).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_round_trip_over_h2c() {
    let up = server::trailers().run().await;
    let c = client::http2(up.addr());
    let (tx, req_body) = body::channel();
    tx.send("ping");
    let mut t = HeaderMap::new();
    t.insert("x-checksum", HeaderValue::from_static("abc"));
    tx.trailers(t);
    let req = c
        .request(Method::POST, "g", "/svc/M")
        .body(req_body)
        .unwrap();
    let reply = c.send(req).await;
    assert_eq!(reply.body, "ping");
    assert_eq!(reply.trailer("grpc-status"), Some("0"));
    assert_eq!(reply.trailer("x-echo-x-checksum"), Some("abc"));

    // Without request trailers the upstream says so.
    let req = c
        .request(Method::POST, "g", "/svc/M")
        .body(body::full("x"))
        .unwrap();
    assert_eq!(c.send(req).await.trailer("grpc-status"), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_echoes_raw_bytes() {
    let up = server::upgrade_echo().run().await;
    let (head, io) = client::http1(up.addr()).upgrade("ws", "/chat").await;
    assert_eq!(head.status(), 101);
    let mut io = io.expect("upgraded");
    io.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    mesh_tests::bounded("echo", io.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_responses_wait_for_release() {
    let up = server::fixed(200, "done").hold().run().await;
    let c = client::http1(up.addr());
    let pending = tokio::spawn(async move { c.get("h", "/").await });
    up.wait_requests(1).await;
    assert!(!pending.is_finished());
    up.release(1);
    let reply = mesh_tests::bounded("the released response", pending)
        .await
        .unwrap();
    assert_eq!(reply.text(), "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_exchange_reads_until_close() {
    let up = server::fixed(200, "ok").run().await;
    let out = client::raw_exchange(
        up.addr(),
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(client::raw_status(&out), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_proxy_process_is_killed_and_reaped() {
    let proxy = mesh_tests::proxy::builder().spawn().await;
    let pid = proxy.pid();
    assert_eq!(
        client::http1(proxy.admin())
            .get("admin", "/health")
            .await
            .status,
        200
    );
    drop(proxy);
    // Reaped, not a zombie: the pid no longer names a process of ours.
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid, 0) };
    assert_eq!(rc, -1, "pid {pid} still exists after drop");
}
