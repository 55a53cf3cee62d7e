//! No answer from Consul can make a snapshot a sidecar rejects. Random service lists and
//! instances (names, tags, kinds, addresses, ports, check states, nulls, malformed and
//! duplicate entries; fixed seeds) go through the control process's own admission and
//! snapshot building, and every view it would serve is parsed and validated exactly as a
//! sidecar does (`serde_json` into `Snapshot`, then `Snapshot::validate`).

use mesh_config::{Phase, Policy, Snapshot};
use mesh_control::consul::admit::{self, HealthPolicy};
use mesh_control::snapshots::Generation;
use mesh_tests::consul::FakeConsul;
use mesh_tests::{bounded, client, control, proxy};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;

const NAME_CHARS: &[char] = &[
    'a', 'b', 'z', '0', '9', '-', '-', '_', '.', 'A', 'Z', ' ', '/', 'é', '?', '%',
];
const KINDS: &[&str] = &[
    "",
    "",
    "",
    "typical",
    "connect-proxy",
    "mesh-gateway",
    "terminating-gateway",
    "ingress-gateway",
    "api-gateway",
    "Connect-Proxy",
];
const STATUSES: &[&str] = &[
    "passing",
    "passing",
    "passing",
    "warning",
    "critical",
    "maintenance",
    "",
    "PASSING",
];
/// Names the extra policy below refers to, so route and fallback targets are sometimes
/// discovered and sometimes not.
const KNOWN: &[&str] = &["b", "c", "senior-ai-engineer", "b-sidecar-proxy"];

/// The shipped policy plus a target whose fallback names another service.
fn policy() -> Policy {
    let mut files = mesh_config::policy::read_dir(&control::shipped_policy()).unwrap();
    files.push((
        "zz-random.toml".into(),
        "[targets.b.resilience]\nfallback = { kind = \"target\", service = \"c\" }\n\
         [[routes]]\nauthority = \"senior-ai-engineer\"\npath_prefix = \"/v2/\"\nbackend = \"c\"\n"
            .into(),
    ));
    mesh_config::policy::load_files(&files).unwrap_or_else(|e| panic!("{e}"))
}

fn name(rng: &mut fastrand::Rng) -> String {
    match rng.u8(0..10) {
        0..=3 => KNOWN[rng.usize(..KNOWN.len())].to_owned(),
        4 => "a".repeat(rng.usize(62..66)),
        5 => String::new(),
        _ => (0..rng.usize(1..12))
            .map(|_| NAME_CHARS[rng.usize(..NAME_CHARS.len())])
            .collect(),
    }
}

fn tags(rng: &mut fastrand::Rng) -> Value {
    match rng.u8(0..8) {
        0 => return Value::Null,
        1..=4 => {
            let phase = ["critical", "performance", "specialized"][rng.usize(..3)];
            return json!(["mesh", format!("phase={phase}")]);
        }
        _ => {}
    }
    let pool = [
        json!("mesh"),
        json!("mesh"),
        json!("phase=critical"),
        json!("phase=performance"),
        json!("phase=specialized"),
        json!("phase=urgent"),
        json!(""),
        json!(7),
        Value::Null,
    ];
    Value::Array(
        (0..rng.usize(0..4))
            .map(|_| pool[rng.usize(..pool.len())].clone())
            .collect(),
    )
}

fn address(rng: &mut fastrand::Rng) -> Value {
    match rng.u8(0..14) {
        0..=4 => json!(format!("10.{}.{}.{}", rng.u8(..), rng.u8(..), rng.u8(..))),
        5 => json!(format!("2001:db8::{:x}", rng.u16(..))),
        6 => json!("::1"),
        7 => json!("fe80::1%eth0"),
        8 => json!("0.0.0.0"),
        9 => json!("b.internal.example"),
        10 => json!(""),
        11 => json!("999.1.1.1"),
        12 => json!("10.0.0.1:80"),
        _ => Value::Null,
    }
}

fn port(rng: &mut fastrand::Rng) -> Value {
    match rng.u8(0..12) {
        0..=7 => json!(rng.u16(1..)),
        8 => json!(0),
        9 => json!(70000),
        10 => json!("http"),
        _ => json!(-1),
    }
}

fn entry(rng: &mut fastrand::Rng, service: &str) -> Value {
    let checks: Value = if rng.u8(0..8) == 0 {
        Value::Null
    } else {
        (0..rng.usize(0..4))
            .map(|_| json!({ "CheckID": "c", "Status": STATUSES[rng.usize(..STATUSES.len())] }))
            .collect()
    };
    let mut e = json!({
        "Node": { "Node": "n", "Address": address(rng), "TaggedAddresses": null, "Meta": null },
        "Service": {
            "ID": format!("{service}-{}", rng.u16(..)),
            "Service": service,
            "Kind": KINDS[rng.usize(..KINDS.len())],
            "Tags": tags(rng),
            "Meta": null,
            "Address": address(rng),
            "Port": port(rng),
            "Weights": { "Passing": 1, "Warning": 1 },
            "Proxy": {},
        },
        "Checks": checks,
    });
    match rng.u8(0..25) {
        0 => e["Service"] = Value::Null,
        1 => e = json!("not an object"),
        2 => e["Node"] = Value::Null,
        _ => {}
    }
    e
}

/// A random Consul: service name -> (listed tags, health entries).
fn world(rng: &mut fastrand::Rng) -> BTreeMap<String, (Value, Vec<Value>)> {
    let mut w = BTreeMap::new();
    for _ in 0..rng.usize(0..12) {
        let name = name(rng);
        let mut entries: Vec<Value> = (0..rng.usize(0..5)).map(|_| entry(rng, &name)).collect();
        if !entries.is_empty() && rng.bool() {
            // The same instance twice, as two registrations of one address.
            let dup = entries[0].clone();
            entries.push(dup);
        }
        w.insert(name, (tags(rng), entries));
    }
    w
}

/// Every view a sidecar of any phase could receive, parsed and validated as it would be.
fn assert_sidecars_accept(gen: &Generation, context: &str) {
    for phase in Phase::ALL.map(Some).into_iter().chain([None]) {
        let body = gen.view(phase);
        let snap: Snapshot = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{context}: view {phase:?} does not parse: {e}"));
        if let Err(e) = snap.validate() {
            panic!(
                "{context}: a sidecar ({phase:?}) rejects it: {e}\n{}",
                String::from_utf8_lossy(&body)
            );
        }
    }
}

#[test]
fn random_consul_answers_never_make_a_snapshot_a_sidecar_rejects() {
    let policy = policy();
    let (mut services, mut endpoints, mut fallbacks_skipped) = (0, 0, 0);
    for seed in 0..400u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let world = world(&mut rng);
        let health = HealthPolicy {
            admit_warning: rng.bool(),
        };
        // The watch's path: the service list, then each listed service's instances.
        let listed: BTreeMap<String, Value> = world
            .iter()
            .filter(|(_, (_, entries))| !entries.is_empty())
            .map(|(n, (t, _))| (n.clone(), t.clone()))
            .collect();
        let listed = admit::services(&listed);
        let instances: Vec<(String, Phase, admit::Admitted)> = listed
            .services
            .iter()
            .map(|(name, phase)| {
                let entries = &world[name].1;
                (
                    name.clone(),
                    *phase,
                    admit::instances(name, entries, health),
                )
            })
            .collect();
        let catalog = admit::catalog(instances.iter().map(|(n, p, a)| (n.as_str(), *p, a)));
        catalog
            .validate()
            .unwrap_or_else(|e| panic!("seed {seed}: catalog invalid: {e}"));
        services += catalog.services.len();
        endpoints += catalog
            .services
            .iter()
            .map(|s| s.endpoints.len())
            .sum::<usize>();
        let gen = Generation::build(&catalog, &policy, 1 + seed);
        fallbacks_skipped += gen
            .skipped
            .iter()
            .filter(|s| s.contains("fallback"))
            .count();
        assert_sidecars_accept(&gen, &format!("seed {seed}"));
        assert_eq!(gen.check(), Ok(()), "seed {seed}");
    }
    // The generator is not so hostile that nothing gets through, and it reaches the case of
    // a policy naming a service Consul does not list.
    println!("{services} services, {endpoints} endpoints, {fallbacks_skipped} fallbacks skipped");
    assert!(services > 150 && endpoints > 50, "{services} {endpoints}");
    assert!(fallbacks_skipped > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_consul_answers_through_the_stand_in_reach_a_sidecar_that_never_rejects() {
    let consul = FakeConsul::start().await;
    let anchor = |round: u16| SocketAddr::from(([127, 0, 0, 1], 20000 + round));
    consul.set_service("a", "critical", &[anchor(0)]);
    // Holds are off here: every random world must reach the sidecar.
    let control = control::builder()
        .consul(consul.addr())
        .max_catalog_drop(100)
        .start()
        .await;
    let v0 = control.wait_version_after(0).await;
    let proxy = proxy::builder()
        .agent("a")
        .bootstrap_extra(&control.sidecar_toml(None))
        .start()
        .await;
    control.wait_applied(v0, 1).await;
    let mut previous: Vec<String> = Vec::new();
    for round in 1..=10u16 {
        let mut rng = fastrand::Rng::with_seed(1000 + u64::from(round));
        let world = world(&mut rng);
        consul.clear();
        for (name, (tags, entries)) in &world {
            // Names that cannot be a URL path segment are still listed; their health query
            // is never made, since admission drops them first.
            consul.set_entries(name, tags.clone(), entries.clone());
        }
        // `a` moves each round, so each round ends in a version of its own.
        consul.set_service("a", "critical", &[anchor(round)]);
        let gen = control
            .wait_generation(&format!("round {round} to be built"), |g| {
                g.snapshot
                    .service("a")
                    .is_some_and(|a| a.endpoints == [anchor(round)])
            })
            .await;
        assert_sidecars_accept(&gen, &format!("round {round}"));
        // Later versions may follow at once (services answering after `a`): any will do.
        let mut versions = proxy.versions();
        bounded(
            &format!("the sidecar to reach round {round}"),
            versions.wait_for(|v| *v >= gen.version),
        )
        .await
        .unwrap();
        assert_eq!(proxy.snapshot_rejections(), 0, "round {round}");
        previous = gen
            .snapshot
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect();
    }
    let status = client::http1(control.addr())
        .get("control", "/status")
        .await
        .json();
    assert_eq!(status["snapshot_invalid"], Value::Null, "{status:#}");
    assert!(previous.contains(&"a".to_owned()));
    proxy.shutdown().await;
}
