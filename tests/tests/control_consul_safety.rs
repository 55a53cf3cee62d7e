//! The control process does no harm when Consul misbehaves: it publishes nothing it has not
//! read, holds back a catalog that empties out, leaves out what sidecars could not carry,
//! never routes to Connect proxies or failing instances, and says within seconds when Consul
//! hangs. Consul here is the stand-in answering in HashiCorp's layout.

use mesh_tests::consul::{FakeConsul, Instance, Outage};
use mesh_tests::server::{self, SERVED_BY};
use mesh_tests::snapshot::{self, service};
use mesh_tests::{body, bounded, bounded_by, client, control, metrics, proxy};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first version `control` publishes, and sidecar `a` following it once it has applied it.
async fn first_version_followed(control: &control::TestControl) -> (u64, proxy::TestProxy) {
    let v1 = control.wait_version_after(0).await;
    let proxy = proxy::builder()
        .agent("a")
        .bootstrap_extra(&control.sidecar_toml(None))
        .start()
        .await;
    control.wait_applied(v1, 1).await;
    (v1, proxy)
}

/// Calls `target` through a sidecar without pause until stopped; counts calls and failures.
struct Workload {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Workload {
    fn start(outbound: SocketAddr, target: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
            async move {
                let c = client::http1(outbound);
                while !stop.load(Ordering::Relaxed) {
                    let req = c
                        .request(http::Method::GET, target, "/")
                        .body(body::empty())
                        .expect("a request");
                    let outcome = match c.try_send(req).await {
                        Ok(r) if r.status == 200 => None,
                        Ok(r) => Some(format!("{} {}", r.status, r.text())),
                        Err(e) => Some(e.to_string()),
                    };
                    calls.fetch_add(1, Ordering::Relaxed);
                    if let Some(f) = outcome {
                        failures.lock().unwrap().push(f);
                    }
                }
            }
        });
        Self {
            stop,
            calls,
            failures,
            task,
        }
    }

    /// Waits until `n` more calls have been made (the workload is running, not stalled).
    async fn more_calls(&self, n: u64) {
        let from = self.calls.load(Ordering::Relaxed);
        let calls = self.calls.clone();
        mesh_tests::eventually(&format!("{n} more workload calls"), || {
            let done = calls.load(Ordering::Relaxed) >= from + n;
            async move { done.then_some(()) }
        })
        .await
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        bounded("the workload to stop", self.task).await.unwrap();
        let failures = self.failures.lock().unwrap().clone();
        (self.calls.load(Ordering::Relaxed), failures)
    }
}

async fn control_metrics(control: &control::TestControl) -> String {
    client::http1(control.addr())
        .get("control", "/metrics")
        .await
        .text()
}

async fn sidecar_services(admin: SocketAddr) -> Vec<Value> {
    let config = client::http1(admin).get("admin", "/config").await.json();
    config["services"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_started_and_restarted_during_consul_outages_never_breaks_routing() {
    let b = server::fixed(200, "b").label("b").run().await;
    let consul = FakeConsul::start().await;
    consul.set_service("a", "critical", &[b.addr()]);
    consul.set_service("b", "performance", &[b.addr()]);
    // Consul has no leader when the control process starts.
    consul.set_outage(Outage::Error(500));
    let mut control = control::builder().consul(consul.addr()).start().await;
    let files = tempfile::tempdir().unwrap();
    let persist = files.path().join("last-snapshot.json");
    // The sidecar runs on its own last good snapshot (here: its snapshot file).
    let proxy = proxy::builder()
        .agent("a")
        .snapshot(
            snapshot::snapshot(7)
                .service(service("b").endpoint(b.addr()))
                .to_toml(),
        )
        .bootstrap_extra(&control.sidecar_toml(Some(&persist)))
        .start()
        .await;
    let workload = Workload::start(proxy.outbound(), "b");
    workload.more_calls(20).await;

    // Nothing read, nothing published; the status says why.
    let status = control
        .wait_status("the control process to report the failing Consul", |s| {
            s["catalog"]["last_error"].is_string()
        })
        .await;
    assert_eq!(status["snapshot_version"], 0, "{status:#}");
    assert_eq!(status["published"], false);
    let why = status["not_published"].as_str().unwrap();
    assert!(why.contains("no catalog read from consul"), "{why}");
    assert_eq!(status["catalog"]["stale"], true);
    assert_eq!(proxy.snapshot_version(), 7);

    // Consul answers: the first real catalog goes out and the sidecar applies it.
    consul.set_outage(Outage::None);
    let v1 = control.wait_version_after(0).await;
    control.wait_applied(v1, 1).await;
    workload.more_calls(20).await;

    // Consul hangs and the control process restarts meanwhile: it publishes nothing, the
    // sidecar keeps v1 and keeps routing.
    consul.set_outage(Outage::Hang);
    control.stop().await;
    control.restart().await;
    let status = control
        .wait_status("the restarted control process to see Consul hang", |s| {
            s["catalog"]["stale"] == true && s["catalog"]["last_error"].is_string()
        })
        .await;
    assert_eq!(status["snapshot_version"], 0, "{status:#}");
    assert!(status["not_published"].is_string());
    workload.more_calls(50).await;
    assert_eq!(proxy.snapshot_version(), v1);

    // And again with errors instead of a hang.
    consul.set_outage(Outage::Error(500));
    control.stop().await;
    control.restart().await;
    control
        .wait_status("the restarted control process to see Consul fail", |s| {
            s["catalog"]["last_error"].is_string()
        })
        .await;
    workload.more_calls(50).await;
    assert_eq!(proxy.snapshot_version(), v1);

    // Consul returns: a new version (same content) reaches the sidecar.
    consul.set_outage(Outage::None);
    let v2 = control.wait_version_after(0).await;
    control.wait_applied(v2, 1).await;
    workload.more_calls(20).await;

    let (calls, failures) = workload.finish().await;
    println!("workload: {calls} calls through two control restarts in Consul outages");
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {failures:?}",
        failures.len()
    );
    assert_eq!(proxy.snapshot_rejections(), 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_entries_are_left_out_and_reported_while_good_ones_route() {
    let b = server::fixed(200, "b").label("b").run().await;
    let d = server::fixed(200, "d").label("d").run().await;
    let consul = FakeConsul::start().await;
    consul.set_service("a", "critical", &[b.addr()]);
    let good = Instance::agent("b", "performance", b.addr());
    consul.set_instances("b", std::slice::from_ref(&good));
    // Consul Connect registers a sidecar proxy beside b, with b's tags.
    consul.set_instances("b-sidecar-proxy", &[Instance::connect_proxy(&good, 21000)]);
    // A mesh gateway tagged for the mesh.
    consul.set_instances(
        "gateway",
        &[Instance {
            kind: "mesh-gateway".into(),
            ..Instance::agent("gateway", "critical", "127.0.0.1:8443".parse().unwrap())
        }],
    );
    // A name Consul accepts and the model does not.
    consul.set_service("Billing_API", "critical", &[d.addr()]);
    // A host name where an IP is required.
    consul.set_instances(
        "c",
        &[Instance {
            address: "c.internal.example".into(),
            ..Instance::agent("c", "specialized", "127.0.0.1:1".parse().unwrap())
        }],
    );
    // d: the same endpoint twice, and an entry that is not Consul's shape.
    let twice = Instance::agent("d", "specialized", d.addr());
    consul.set_entries(
        "d",
        json!(["mesh", "phase=specialized"]),
        vec![
            twice.entry(),
            Instance {
                id: "d-again".into(),
                ..twice.clone()
            }
            .entry(),
            json!({ "Node": null, "Service": { "ID": "d-broken", "Port": "http" }, "Checks": null }),
        ],
    );
    let control = control::builder().consul(consul.addr()).start().await;
    let (_, proxy) = first_version_followed(&control).await;

    // The good ones route.
    let reply = client::http1(proxy.outbound()).get("b", "/").await;
    assert_eq!(reply.header(SERVED_BY), Some("b"));
    let reply = client::http1(proxy.outbound()).get("d", "/").await;
    assert_eq!(reply.header(SERVED_BY), Some("d"));
    let names: BTreeSet<String> = sidecar_services(proxy.admin())
        .await
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
    assert_eq!(names, expected, "no proxy, gateway or bad name is an agent");

    // The bad ones are reported, each with its reason.
    let status = control.status();
    let rejected: BTreeSet<(String, String)> = status["catalog"]["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["service"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (svc, reason) in [
        ("Billing_API", "bad_name"),
        ("b-sidecar-proxy", "not_an_agent"),
        ("gateway", "not_an_agent"),
        ("c", "hostname_address"),
        ("d", "duplicate_endpoint"),
        ("d", "malformed"),
    ] {
        assert!(
            rejected.contains(&(svc.to_owned(), reason.to_owned())),
            "{svc} {reason} not reported: {status:#}"
        );
    }
    let scrape = control_metrics(&control).await;
    for reason in [
        "bad_name",
        "hostname_address",
        "duplicate_endpoint",
        "malformed",
    ] {
        assert_eq!(
            metrics::metric_value(
                &scrape,
                "mesh_control_catalog_rejected_total",
                &[("reason", reason)]
            ),
            Some(1.0),
            "{reason}"
        );
    }
    assert_eq!(
        metrics::metric_value(
            &scrape,
            "mesh_control_catalog_rejected_total",
            &[("reason", "not_an_agent")]
        ),
        Some(2.0)
    );
    // Only the two real agents of phase critical/performance count in the budgets.
    assert_eq!(status["sidecars"][0]["ack"], "applied", "{status:#}");
    assert_eq!(proxy.snapshot_rejections(), 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consul_that_ignores_passing_still_gets_no_failing_instance_routed() {
    let good = server::fixed(200, "good").label("good").run().await;
    let bad = server::fixed(200, "bad").label("bad").run().await;
    let warn = server::fixed(200, "warn").label("warn").run().await;
    let node_down = server::fixed(200, "node").label("node").run().await;
    let consul = FakeConsul::start().await;
    consul.ignore_passing();
    consul.set_service("a", "critical", &[good.addr()]);
    consul.set_instances(
        "b",
        &[
            Instance::agent("b", "performance", good.addr()),
            Instance {
                checks: vec!["passing", "critical"],
                ..Instance::agent("b", "performance", bad.addr())
            },
            Instance {
                checks: vec!["warning"],
                ..Instance::agent("b", "performance", warn.addr())
            },
            Instance {
                node_check: "critical",
                ..Instance::agent("b", "performance", node_down.addr())
            },
        ],
    );
    let control = control::builder().consul(consul.addr()).start().await;
    let (_, proxy) = first_version_followed(&control).await;
    let services = sidecar_services(proxy.admin()).await;
    let b = services.iter().find(|s| s["name"] == "b").unwrap();
    assert_eq!(b["endpoints"], json!([good.addr().to_string()]));
    for _ in 0..20 {
        let reply = client::http1(proxy.outbound()).get("b", "/").await;
        assert_eq!(reply.header(SERVED_BY), Some("good"));
    }
    assert_eq!(bad.requests() + warn.requests() + node_down.requests(), 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_consul_is_reported_within_seconds_and_its_recovery_at_once() {
    let b = server::fixed(200, "b").label("b").run().await;
    let consul = FakeConsul::start().await;
    consul.set_service("b", "performance", &[b.addr()]);
    consul.set_service("c", "performance", &[b.addr()]);
    let control = control::builder().consul(consul.addr()).start().await;
    let v1 = control.wait_version_after(0).await;
    control
        .wait_status("a fresh catalog", |s| s["catalog"]["stale"] == false)
        .await;

    // Consul accepts connections and answers nothing (its blocking queries wait 5 s here).
    consul.set_outage(Outage::Hang);
    let hung = Instant::now();
    let status = bounded_by(
        Duration::from_secs(3),
        "the hang to be reported",
        control.wait_status("stale", |s| s["catalog"]["stale"] == true),
    )
    .await;
    let reported_after = hung.elapsed();
    assert!(status["catalog"]["last_error"].is_string(), "{status:#}");

    // Consul answers again with nothing changed (the index did not move): staleness clears
    // without waiting for a blocking query to time out.
    consul.set_outage(Outage::None);
    let back = Instant::now();
    bounded_by(
        Duration::from_secs(2),
        "the recovery to be reported",
        control.wait_status("fresh", |s| s["catalog"]["stale"] == false),
    )
    .await;
    let cleared_after = back.elapsed();
    assert_eq!(control.version(), v1, "nothing changed, no new version");
    println!("hang reported after {reported_after:?}, recovery after {cleared_after:?}");

    // One service's health query fails: it is named in the status and keeps its endpoints.
    consul.fail_service("c", Some(403));
    consul.set_service("c", "performance", &[b.addr()]);
    let status = control
        .wait_status("c to be failing", |s| {
            s["catalog"]["failing"]
                .as_array()
                .is_some_and(|f| f.iter().any(|e| e.as_str().unwrap().starts_with("c: ")))
        })
        .await;
    assert_eq!(status["catalog"]["stale"], true);
    assert_eq!(control.version(), v1);
    consul.fail_service("c", None);
    control
        .wait_status("c to answer again", |s| s["catalog"]["stale"] == false)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_that_empties_is_held_until_it_recovers_or_an_operator_confirms() {
    let b = server::fixed(200, "b").label("b").run().await;
    let consul = FakeConsul::start().await;
    consul.set_service("a", "critical", &[b.addr()]);
    consul.set_service("b", "performance", &[b.addr()]);
    // With two services, losing one is a 50 % drop: the limit here holds that too.
    let control = control::builder()
        .consul(consul.addr())
        .max_catalog_drop(20)
        .confirm_token("s3cret")
        .start()
        .await;
    let (v1, proxy) = first_version_followed(&control).await;

    // Consul loses its state: every service goes. Held back, reported, not pushed. (The
    // services' health answers may empty before the service list does: the catalog first
    // held can still name both services, with no endpoints.)
    consul.clear();
    let status = control
        .wait_status("the empty catalog to be held", |s| {
            s["catalog"]["held"]["services_held"] == 0
        })
        .await;
    let held = &status["catalog"]["held"];
    assert_eq!(
        (
            held["services_in_force"].as_u64(),
            held["services_held"].as_u64()
        ),
        (Some(2), Some(0))
    );
    assert_eq!(control.version(), v1);
    let scrape = control_metrics(&control).await;
    assert_eq!(
        metrics::metric_value(&scrape, "mesh_control_catalog_held", &[]),
        Some(1.0)
    );
    assert!(metrics::metric_value(&scrape, "mesh_control_catalog_holds_total", &[]) >= Some(1.0));
    assert_eq!(
        client::http1(proxy.outbound()).get("b", "/").await.status,
        200
    );

    // The services come back, one by one (the first alone is still too few): the hold ends
    // by itself and nothing new is pushed.
    consul.set_service("a", "critical", &[b.addr()]);
    consul.set_service("b", "performance", &[b.addr()]);
    control
        .wait_status("the hold to end", |s| s["catalog"]["held"].is_null())
        .await;
    assert_eq!(control.version(), v1);

    // Again, and this time the operator means it.
    consul.clear();
    control
        .wait_status("the empty catalog to be held again", |s| {
            s["catalog"]["held"]["services_held"] == 0
        })
        .await;
    let confirm = |token: Option<&str>| {
        let c = client::http1(control.addr());
        let mut req = c.request(http::Method::POST, "control", "/v1/catalog/confirm");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(body::empty()).unwrap();
        async move { c.send(req).await }
    };
    assert_eq!(confirm(None).await.status, 401);
    assert_eq!(confirm(Some("guess")).await.status, 401);
    assert_eq!(control.version(), v1);
    let reply = confirm(Some("s3cret")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["published"]["services_held"], 0);
    let v2 = control.wait_version_after(v1).await;
    control.wait_applied(v2, 1).await;
    assert!(sidecar_services(proxy.admin()).await.is_empty());
    assert_eq!(control.status()["catalog"]["held"], Value::Null);
    // Nothing left to confirm.
    assert_eq!(confirm(Some("s3cret")).await.status, 409);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_process_started_while_nothing_listens_for_consul_publishes_nothing() {
    // A port that was just free: nothing answers there (connection refused).
    let nothing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = nothing.local_addr().unwrap();
    drop(nothing);
    let control = control::builder().consul(addr).start().await;
    let status = control
        .wait_status("the unreachable Consul to be reported", |s| {
            s["catalog"]["last_error"].is_string()
        })
        .await;
    assert_eq!(status["snapshot_version"], 0, "{status:#}");
    assert_eq!(status["catalog"]["stale"], true);
    assert!(status["not_published"]
        .as_str()
        .unwrap()
        .contains("no catalog read from consul yet"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_process_restarted_while_consul_has_partly_recovered_holds_the_partial_catalog() {
    let b = server::fixed(200, "b").label("b").run().await;
    let consul = FakeConsul::start().await;
    let names = ["a", "b", "c", "d", "e", "f"];
    for name in names {
        consul.set_service(name, "performance", &[b.addr()]);
    }
    let mut control = control::builder().consul(consul.addr()).start().await;
    let (_, proxy) = first_version_followed(&control).await;
    assert_eq!(sidecar_services(proxy.admin()).await.len(), names.len());

    // Consul restarts with an empty catalog and the control process restarts meanwhile; by
    // its first read only two of six services have registered again.
    consul.clear();
    control.stop().await;
    consul.set_service("a", "performance", &[b.addr()]);
    consul.set_service("b", "performance", &[b.addr()]);
    control.restart().await;
    let status = control
        .wait_status("the partial catalog to be held", |s| {
            s["catalog"]["held"].is_object()
        })
        .await;
    let held = &status["catalog"]["held"];
    assert_eq!(
        (
            held["services_in_force"].as_u64(),
            held["services_held"].as_u64()
        ),
        (Some(6), Some(2)),
        "{status:#}"
    );
    assert_eq!(status["snapshot_version"], 0, "{status:#}");
    // The sidecar still routes to every service it had.
    assert_eq!(sidecar_services(proxy.admin()).await.len(), names.len());
    assert_eq!(
        client::http1(proxy.outbound()).get("e", "/").await.status,
        200
    );

    // The rest registers, one service at a time: once the catalog is back within the drop
    // limit it goes out, version after version, until all six are published; the sidecar
    // takes that last one (the versions between are not waited on: a sidecar may skip them).
    for name in names {
        consul.set_service(name, "performance", &[b.addr()]);
    }
    let status = control
        .wait_status("all six services published again", |s| {
            s["catalog"]["held"].is_null() && s["catalog"]["services"] == names.len()
        })
        .await;
    let full = status["snapshot_version"]
        .as_u64()
        .expect("a published version");
    control.wait_applied(full, 1).await;
    assert_eq!(sidecar_services(proxy.admin()).await.len(), names.len());
    proxy.shutdown().await;
}
