//! Replica loss benchmark (run: `cargo build --release -p mesh-proxy && cargo bench -p mesh-tests
//! --bench replica_loss`). Service `b` has two replicas, each the real `mesh-proxy` binary in
//! front of one app; eight connections loop requests through the caller's sidecar; one replica
//! is SIGKILLed once it has served 20 requests, and the load goes on for 400 more. Twenty runs
//! per case, in one process:
//! - `GET, mesh defaults`: what callers see with the shipped policy (retries, ejection, breakers);
//! - `GET, no retries`: the same with `max_attempts = 1`, the baseline of what a kill costs when
//!   nothing hides it;
//! - `POST, mesh defaults`: non-idempotent calls, where only those already written to the dead
//!   replica may fail.
//!
//! Prints, per case, the caller errors per kill and, over the runs, the p50 / p99 / max time from
//! the kill to the last caller error (0 for a run without errors).

use mesh_tests::client;
use mesh_tests::load::{self, Load, MakeRequest};
use mesh_tests::replicas::{Replicas, SERVICE};
use mesh_tests::server;
use mesh_tests::snapshot::ServiceToml;
use std::collections::BTreeMap;
use std::time::Duration;

const RUNS: usize = 20;
const CALLERS: usize = 8;

struct Case {
    name: &'static str,
    post: bool,
    policy: fn(ServiceToml) -> ServiceToml,
}

struct Outcome {
    errors: Vec<usize>,
    last_error: Vec<Duration>,
    kinds: BTreeMap<String, usize>,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The error kind of a failure: the JSON `error` of a mesh answer, else its first words.
fn kind(what: &str) -> String {
    if let Some(i) = what.find("\"error\":\"") {
        let rest = &what[i + 9..];
        let code = what.split(' ').next().unwrap_or("");
        return format!("{code} {}", &rest[..rest.find('"').unwrap_or(rest.len())]);
    }
    what.split(':').next().unwrap_or(what).to_owned()
}

async fn run(app: std::net::SocketAddr, case: &Case) -> Outcome {
    let mut out = Outcome {
        errors: Vec::new(),
        last_error: Vec::new(),
        kinds: BTreeMap::new(),
    };
    for _ in 0..RUNS {
        let svc = Replicas::start(SERVICE, app, 2, case.policy).await;
        let c = client::http1(svc.caller.outbound());
        let make: MakeRequest = if case.post {
            load::post(c, SERVICE, "/")
        } else {
            load::get(c, SERVICE, "/")
        };
        let mut load = Load::start(c, CALLERS, make);
        svc.wait_served(1, 20).await;
        let killed = svc.kill(1);
        let after = load.completed() + 400;
        load.wait_completed(after).await;
        let report = load.stop().await;
        let last = report
            .failures
            .iter()
            .map(|f| f.at.saturating_duration_since(killed))
            .max()
            .unwrap_or_default();
        out.errors.push(report.failures.len());
        out.last_error.push(last);
        for f in &report.failures {
            *out.kinds.entry(kind(&f.what)).or_default() += 1;
        }
    }
    out.last_error.sort();
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let app = server::fixed(200, "ok").label("app").run().await;
    let cases = [
        Case {
            name: "GET, mesh defaults",
            post: false,
            policy: |s| s,
        },
        Case {
            name: "GET, no retries (baseline)",
            post: false,
            policy: |s| s.policy("retry", "{ max_attempts = 1 }"),
        },
        Case {
            name: "POST, mesh defaults",
            post: true,
            policy: |s| s,
        },
    ];
    println!(
        "replica loss: {RUNS} runs per case, {CALLERS} connections, SIGKILL of 1 of 2 replicas"
    );
    println!(
        "{:<28} {:>10} {:>14} {:>10} {:>10} {:>10}",
        "case", "errors", "runs w/ error", "p50 last", "p99 last", "max last"
    );
    let mut totals = Vec::new();
    for case in &cases {
        let o = run(app.addr(), case).await;
        let total: usize = o.errors.iter().sum();
        let with = o.errors.iter().filter(|&&e| e > 0).count();
        println!(
            "{:<28} {:>10} {:>14} {:>10.1?} {:>10.1?} {:>10.1?}",
            case.name,
            total,
            format!("{with}/{RUNS}"),
            pct(&o.last_error, 0.5),
            pct(&o.last_error, 0.99),
            o.last_error.last().copied().unwrap_or_default(),
        );
        for (k, n) in &o.kinds {
            println!("    {n:>6} x {k}");
        }
        totals.push(total);
    }
    println!(
        "caller errors per kill, GET: mesh {:.2} vs no retries {:.2}",
        totals[0] as f64 / RUNS as f64,
        totals[1] as f64 / RUNS as f64
    );
}
