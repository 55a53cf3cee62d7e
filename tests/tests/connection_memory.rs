//! A flood of connections leaves no lasting cost: after 2,000 keep-alive connections that each
//! made one request have closed, the sidecar's resident memory returns near its idle size
//! (it stayed at its peak before: `benches/README.md`, "Idle connection flood").
//!
//! Needs `target/<profile>/mesh-proxy`: run `cargo build -p mesh-proxy` first.

use mesh_tests::proxy;
use mesh_tests::server;
use mesh_tests::snapshot::{service, snapshot};
use mesh_tests::{bounded, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECTIONS: usize = 2000;

fn rss_kib(pid: libc::pid_t) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// Room for the connections on both ends, within the hard limit.
fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on this process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur as usize > 2 * CONNECTIONS + 256,
        "the open-files limit {} is too low for {CONNECTIONS} connections",
        lim.rlim_cur
    );
}

async fn one_request(stream: &mut TcpStream) {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    // The answer is `ok` with its length: the head and two bytes.
    while !seen.ends_with(b"ok") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_near_idle_after_a_connection_flood() {
    raise_open_files();
    let b = server::fixed(200, "ok").label("b").run().await;
    let mut proxy = proxy::builder()
        .agent("a")
        .snapshot(
            snapshot(1)
                .service(service("b").endpoint(b.addr()))
                .to_toml(),
        )
        .spawn()
        .await;
    let mut warm = TcpStream::connect(proxy.outbound()).await.unwrap();
    one_request(&mut warm).await;
    drop(warm);
    let idle = rss_kib(proxy.pid());

    let mut conns = Vec::with_capacity(CONNECTIONS);
    bounded("the flood", async {
        for _ in 0..CONNECTIONS {
            let mut c = TcpStream::connect(proxy.outbound()).await.unwrap();
            one_request(&mut c).await;
            conns.push(c);
        }
    })
    .await;
    let peak = rss_kib(proxy.pid());
    drop(conns);

    let pid = proxy.pid();
    let limit = idle + 8 * 1024;
    let after = eventually("resident memory to come back near idle", || async move {
        let rss = rss_kib(pid);
        (rss <= limit).then_some(rss)
    })
    .await;
    println!("idle {idle} KiB, {CONNECTIONS} connections {peak} KiB, after {after} KiB");
    proxy.sigterm();
    proxy.wait_exit(std::time::Duration::from_secs(10)).await;
}
