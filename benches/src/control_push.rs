//! Catalog change -> last sidecar ack, through the real `mesh-control` binary (a child
//! process, so its RSS and CPU are its own). N simulated sidecars each hold one long-poll
//! connection; each round rewrites the catalog file and times every subscriber's ack.
//!
//! Baseline, same run: one long-poll round trip that answers at once (version differs) plus
//! its ack, on an idle control process.
//!
//! `cargo run --release -p mesh-benches --bin control_push [-- N...]` (default 69 1000 10000).

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

const ROUNDS: usize = 5;

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![69, 1000, 10_000]
    } else {
        sizes
    };
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("catalog change -> last ack, {ROUNDS} rounds each; control = mesh-control child process");
        for n in sizes {
            run(n).await;
        }
    });
}

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn control_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe.parent().expect("target dir").join("mesh-control");
    assert!(
        bin.is_file(),
        "build it first: cargo build --release -p mesh-control"
    );
    bin
}

fn catalog(version: usize) -> String {
    // 69 agents; one target's endpoint port moves each round.
    let mut out = String::new();
    for i in 0..69 {
        let phase = match i {
            0..20 => "critical",
            20..50 => "performance",
            _ => "specialized",
        };
        out.push_str(&format!(
            "[[services]]\nname = \"agent-{i}\"\nphase = \"{phase}\"\nendpoints = [\"127.0.0.1:{}\"]\n",
            10300 + i
        ));
    }
    out.push_str(&format!(
        "[[services]]\nname = \"moving\"\nendpoints = [\"127.0.0.1:{}\"]\n",
        20000 + version
    ));
    out
}

struct Control {
    child: Child,
    addr: SocketAddr,
    catalog: PathBuf,
    _dir: tempfile::TempDir,
}

impl Control {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let catalog_path = dir.path().join("catalog.toml");
        std::fs::write(&catalog_path, catalog(0)).expect("write catalog");
        let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mesh");
        let mut child = Command::new(control_binary())
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--poll",
                "5ms",
                "--log",
                "warn,mesh_control::app=info",
            ])
            .arg("--policy")
            .arg(&policy)
            .arg("--catalog")
            .arg(&catalog_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mesh-control");
        let stdout = child.stdout.take().expect("stdout");
        let mut addr = None;
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let line = line.expect("read stdout");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(a) = v["fields"]["addr"].as_str() {
                addr = a.parse().ok();
                break;
            }
        }
        // Keep reading so the child never writes to a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self {
            addr: addr.expect("control ready line with its address"),
            child,
            catalog: catalog_path,
            _dir: dir,
        }
    }

    /// (RSS bytes, CPU seconds) of the child, from /proc.
    fn usage(&self) -> (u64, f64) {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after_comm = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = after_comm.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (rss_kb * 1024, ticks / hz)
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Conn = http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Conn {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let (send, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

/// One long-poll; returns the version served (or `version` on 304).
async fn poll(conn: &mut Conn, agent: &str, version: u64) -> Option<u64> {
    conn.ready().await.ok()?;
    let req = Request::get(format!(
        "/v1/snapshot?agent={agent}&version={version}&wait=60s"
    ))
    .header("host", "control")
    .body(Full::default())
    .expect("request");
    let rsp = conn.send_request(req).await.ok()?;
    let v = rsp
        .headers()
        .get("x-mesh-version")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(version);
    let _ = rsp.into_body().collect().await;
    Some(v)
}

async fn ack(conn: &mut Conn, agent: &str, version: u64) -> Option<()> {
    conn.ready().await.ok()?;
    let body = format!("{{\"agent\":\"{agent}\",\"version\":{version}}}");
    let req = Request::post("/v1/ack")
        .header("host", "control")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let rsp = conn.send_request(req).await.ok()?;
    rsp.into_body().collect().await.ok().map(drop)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(n: usize) {
    let control = Control::start();
    let addr = control.addr;

    // Baseline: an immediate long-poll answer plus its ack, one subscriber, idle control.
    let mut conn = connect(addr).await;
    let mut base = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let v = poll(&mut conn, "baseline", 1).await.expect("baseline poll");
        ack(&mut conn, "baseline", v).await.expect("baseline ack");
        base.push(t.elapsed());
    }
    drop(conn);
    base.sort();
    let baseline = pct(&base, 0.5);

    // N subscribers, each on its own connection, at the current version.
    let (round_tx, round_rx) = watch::channel(Instant::now());
    let acked = Arc::new(AtomicUsize::new(0));
    let all_acked = Arc::new(Notify::new());
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let ready = Arc::new(AtomicUsize::new(0));
    let ready_all = Arc::new(Notify::new());
    for i in 0..n {
        let mut conn = connect(addr).await;
        let agent = format!("sim-{i}");
        let round_rx = round_rx.clone();
        let (acked, all_acked, lat_tx) = (acked.clone(), all_acked.clone(), lat_tx.clone());
        let (ready, ready_all) = (ready.clone(), ready_all.clone());
        tokio::spawn(async move {
            // A subscriber ends when its control process does (the next size's run).
            let Some(mut version) = poll(&mut conn, &agent, 0).await else {
                return;
            };
            if ack(&mut conn, &agent, version).await.is_none() {
                return;
            }
            if ready.fetch_add(1, Ordering::AcqRel) + 1 == n {
                ready_all.notify_one();
            }
            loop {
                let Some(v) = poll(&mut conn, &agent, version).await else {
                    return;
                };
                if v == version {
                    continue;
                }
                version = v;
                if ack(&mut conn, &agent, v).await.is_none() {
                    return;
                }
                let started = *round_rx.borrow();
                let _ = lat_tx.send(started.elapsed());
                if acked.fetch_add(1, Ordering::AcqRel) + 1 == n {
                    all_acked.notify_one();
                }
            }
        });
    }
    if ready.load(Ordering::Acquire) < n {
        ready_all.notified().await;
    }
    let (rss_before, cpu_before) = control.usage();

    let mut lats = Vec::with_capacity(n * ROUNDS);
    let mut last = Vec::with_capacity(ROUNDS);
    for round in 1..=ROUNDS {
        acked.store(0, Ordering::Release);
        let notified = all_acked.notified();
        round_tx.send_replace(Instant::now());
        std::fs::write(control.catalog.with_extension("tmp"), catalog(round)).expect("write");
        std::fs::rename(control.catalog.with_extension("tmp"), &control.catalog).expect("rename");
        tokio::time::timeout(Duration::from_secs(60), notified)
            .await
            .expect("every subscriber acked within 60 s");
        let mut round_lats = Vec::with_capacity(n);
        while let Ok(d) = lat_rx.try_recv() {
            round_lats.push(d);
        }
        last.push(round_lats.iter().copied().max().unwrap_or_default());
        lats.extend(round_lats);
    }
    let (rss, cpu_after) = control.usage();
    lats.sort();
    last.sort();
    let p50 = pct(&lats, 0.5);
    let p99 = pct(&lats, 0.99);
    println!(
        "N={n:>6}: ack p50 {:>8.2} ms  p99 {:>8.2} ms  last-ack (worst round) {:>8.2} ms | \
         baseline round trip {:.3} ms, p99/baseline {:>6.0}x | control RSS {:.1} MiB \
         (idle with N connected {:.1} MiB), CPU {:.3} s over {ROUNDS} rounds",
        ms(p50),
        ms(p99),
        ms(*last.last().unwrap_or(&Duration::ZERO)),
        ms(baseline),
        p99.as_secs_f64() / baseline.as_secs_f64(),
        rss as f64 / (1 << 20) as f64,
        rss_before as f64 / (1 << 20) as f64,
        cpu_after - cpu_before,
    );
}
