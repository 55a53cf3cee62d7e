//! The Ollama gateway under load, against a fake Ollama in the same process:
//!
//! 1. Added latency: one caller, one request at a time, straight to the fake and through the
//!    gateway, interleaved on kept-alive connections.
//! 2. Saturation: more callers than slots, short generations. Ollama's busy time over the window
//!    (slot utilisation) and the idle gap between one generation's end and the next one's start,
//!    both seen at the fake. The baseline is one caller calling the fake directly back to back:
//!    the best a caller with no gateway can do.
//!
//! `cargo run --release -p mesh-bench-ollama [seconds] [callers] [chunks per generation]`

use http::Method;
use mesh_tests::client::{self, Conn};
use mesh_tests::ollama::{self, gateway_policy, FakeOllama, Generation};
use mesh_tests::{body, proxy};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const PHASES: [&str; 3] = ["critical", "performance", "specialized"];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map_or(3, |a| a.parse().expect("seconds"));
    let callers: usize = args.next().map_or(32, |a| a.parse().expect("callers"));
    let chunks: usize = args.next().map_or(2, |a| a.parse().expect("chunks"));
    let names: Vec<String> = (0..callers).map(|i| format!("agent-{i}")).collect();

    println!("== uncontended latency (one request at a time, 2000 each way)");
    let (direct, via) = latency(&names).await;
    let added_mean = via.mean - direct.mean;
    let added_p50 = via.p50 - direct.p50;
    println!("direct to ollama : {direct}");
    println!("through gateway  : {via}");
    println!(
        "added latency    : mean {:.3} ms, p50 {:.3} ms (ratio {:.2}x)  target < 0.300 ms: {}",
        added_mean * 1e3,
        added_p50 * 1e3,
        via.mean / direct.mean,
        verdict(added_mean < 0.3e-3)
    );

    println!(
        "\n== saturation ({callers} callers, parallel = 1, {seconds} s, generations of {chunks} chunks x 1 ms)"
    );
    let window = Duration::from_secs(seconds);
    let baseline = saturate_direct(window, chunks).await;
    let gateway = saturate_gateway(&names, window, chunks).await;
    println!("baseline (one caller, direct): {baseline}");
    println!("through gateway              : {gateway}");
    println!(
        "slot utilisation  : {:.3} % (baseline {:.3} %)  target >= 99 %: {}",
        gateway.utilisation * 100.0,
        baseline.utilisation * 100.0,
        verdict(gateway.utilisation >= 0.99)
    );
    println!(
        "mean idle gap     : {:.3} ms (baseline {:.3} ms, ratio {:.2}x)  target < 0.500 ms: {}",
        gateway.mean_gap * 1e3,
        baseline.mean_gap * 1e3,
        gateway.mean_gap / baseline.mean_gap,
        verdict(gateway.mean_gap < 0.5e-3)
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT MET"
    }
}

fn snapshot(names: &[String]) -> String {
    let mut out = String::from("version = 1\n");
    for (i, name) in names.iter().enumerate() {
        out.push_str(&format!(
            "\n[[services]]\nname = {name:?}\nphase = {:?}\n",
            PHASES[i % 3]
        ));
    }
    out.push_str(&gateway_policy(1, "60s", "per_agent_queue = 64"));
    out
}

async fn gateway(ollama: &FakeOllama, names: &[String]) -> proxy::TestProxy {
    proxy::builder()
        .agent("ollama")
        .ollama_gateway(ollama.addr())
        .snapshot(snapshot(names))
        .start()
        .await
}

fn request(addr: SocketAddr, caller: &str) -> http::Request<body::Body> {
    client::http1(addr)
        .request(Method::POST, "ollama", "/api/generate")
        .header("x-mesh-caller", caller)
        .body(body::full(r#"{"model":"fake","prompt":"p"}"#))
        .expect("valid request")
}

async fn call(conn: &mut Conn, addr: SocketAddr, caller: &str) -> bool {
    conn.send(request(addr, caller)).await.status == 200
}

// === latency ===

struct Latency {
    mean: f64,
    p50: f64,
    p99: f64,
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mean {:.3} ms, p50 {:.3} ms, p99 {:.3} ms",
            self.mean * 1e3,
            self.p50 * 1e3,
            self.p99 * 1e3
        )
    }
}

fn summarize(mut v: Vec<f64>) -> Latency {
    v.sort_by(f64::total_cmp);
    Latency {
        mean: v.iter().sum::<f64>() / v.len() as f64,
        p50: v[v.len() / 2],
        p99: v[v.len() * 99 / 100],
    }
}

async fn latency(names: &[String]) -> (Latency, Latency) {
    let ollama = ollama::fake().chunks(0).run().await;
    let gw = gateway(&ollama, names).await;
    let (fake, inbound) = (ollama.addr(), gw.inbound());
    let mut direct = client::http1(fake).connect().await;
    let mut via = client::http1(inbound).connect().await;
    for _ in 0..200 {
        assert!(call(&mut direct, fake, &names[0]).await);
        assert!(call(&mut via, inbound, &names[0]).await);
    }
    let (mut d, mut g) = (Vec::new(), Vec::new());
    for _ in 0..2000 {
        let t = Instant::now();
        assert!(call(&mut direct, fake, &names[0]).await);
        d.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        assert!(call(&mut via, inbound, &names[0]).await);
        g.push(t.elapsed().as_secs_f64());
    }
    gw.shutdown().await;
    (summarize(d), summarize(g))
}

// === saturation ===

struct Saturation {
    generations: usize,
    refused: usize,
    utilisation: f64,
    mean_gap: f64,
    p99_gap: f64,
}

impl std::fmt::Display for Saturation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} generations, {} refused, utilisation {:.3} %, idle gap mean {:.3} ms p99 {:.3} ms",
            self.generations,
            self.refused,
            self.utilisation * 100.0,
            self.mean_gap * 1e3,
            self.p99_gap * 1e3
        )
    }
}

fn fake(chunks: usize) -> ollama::Builder {
    ollama::fake()
        .chunks(chunks)
        .chunk_delay(Duration::from_millis(1))
}

async fn saturate_direct(window: Duration, chunks: usize) -> Saturation {
    let ollama = fake(chunks).run().await;
    let mut conn = client::http1(ollama.addr()).connect().await;
    let end = Instant::now() + window;
    let mut refused = 0;
    while Instant::now() < end {
        if !call(&mut conn, ollama.addr(), "solo").await {
            refused += 1;
        }
    }
    measure(&ollama.generations(), refused)
}

async fn saturate_gateway(names: &[String], window: Duration, chunks: usize) -> Saturation {
    let ollama = fake(chunks).run().await;
    let gw = gateway(&ollama, names).await;
    let inbound = gw.inbound();
    let end = Instant::now() + window;
    let tasks: Vec<_> = names
        .iter()
        .cloned()
        .map(|name| {
            tokio::spawn(async move {
                let mut conn = client::http1(inbound).connect().await;
                let mut refused = 0;
                while Instant::now() < end {
                    if !call(&mut conn, inbound, &name).await {
                        refused += 1;
                    }
                }
                refused
            })
        })
        .collect();
    let mut refused = 0;
    for t in tasks {
        refused += t.await.expect("caller task");
    }
    ollama.assert_never_overlapped();
    let gens = ollama.generations();
    gw.shutdown().await;
    measure(&gens, refused)
}

/// Utilisation and idle gaps over the generations that ran while callers were all active.
fn measure(gens: &[Generation], refused: usize) -> Saturation {
    let mut done: Vec<(Instant, Instant)> = gens
        .iter()
        .filter_map(|g| g.ended.map(|e| (g.started, e)))
        .collect();
    done.sort_by_key(|(s, _)| *s);
    // Leave out the first and last tenth: warm-up and callers stopping one by one.
    let cut = done.len() / 10;
    let steady = &done[cut..done.len() - cut];
    let window = steady.last().unwrap().1 - steady[0].0;
    let busy: Duration = steady.iter().map(|(s, e)| *e - *s).sum();
    let mut gaps: Vec<f64> = steady
        .windows(2)
        .map(|w| w[1].0.saturating_duration_since(w[0].1).as_secs_f64())
        .collect();
    gaps.sort_by(f64::total_cmp);
    Saturation {
        generations: done.len(),
        refused,
        utilisation: busy.as_secs_f64() / window.as_secs_f64(),
        mean_gap: gaps.iter().sum::<f64>() / gaps.len() as f64,
        p99_gap: gaps[gaps.len() * 99 / 100],
    }
}
