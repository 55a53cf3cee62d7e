//! The shipped deployment is the rendering of the agent registry and the policy: the
//! checked-in files equal what `mesh-control render` produces (a hand edit fails here), every
//! generated sidecar bootstrap parses with the real `Bootstrap::from_file`, the seed snapshot
//! validates, and Debian's `docker-compose` accepts the compose file with 69 agents and 69
//! sidecars carrying the limits the budget engine computed.

use mesh_config::Phase;
use mesh_proxy::bootstrap::{Bootstrap, InboundMode};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn policy() -> mesh_config::Policy {
    mesh_config::policy::load_dir(&root().join("config/mesh")).unwrap_or_else(|e| panic!("{e}"))
}

fn registry() -> mesh_config::Registry {
    mesh_config::registry::load_file(&root().join("config/mesh/agents.toml"))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_checked_in_deployment_is_the_rendering() {
    let files = mesh_control::render::render(&policy(), &registry()).unwrap();
    let differ = mesh_control::render::diff(&root(), &files);
    assert!(
        differ.is_empty(),
        "edited by hand or not re-rendered (run `mesh-control render`): {differ:?}"
    );
}

#[test]
fn a_hand_edit_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let files = mesh_control::render::render(&policy(), &registry()).unwrap();
    mesh_control::render::write(dir.path(), &files).unwrap();
    assert!(mesh_control::render::diff(dir.path(), &files).is_empty());
    let compose = dir.path().join("docker-compose.yml");
    let text = std::fs::read_to_string(&compose).unwrap();
    std::fs::write(&compose, text.replacen("memory: ", "memory: 9", 1)).unwrap();
    let stray = dir
        .path()
        .join("deploy/generated/sidecars/retired-agent.toml");
    std::fs::write(&stray, "").unwrap();
    let differ = mesh_control::render::diff(dir.path(), &files);
    assert_eq!(
        differ,
        vec![
            PathBuf::from("docker-compose.yml"),
            PathBuf::from("deploy/generated/sidecars/retired-agent.toml")
        ]
    );
    // Rendering again restores the file and removes the stray one.
    mesh_control::render::write(dir.path(), &files).unwrap();
    assert!(mesh_control::render::diff(dir.path(), &files).is_empty());
}

#[test]
fn every_sidecar_bootstrap_and_the_seed_snapshot_load() {
    let dir = root().join("deploy/generated/sidecars");
    let registry = registry();
    let mut gateways = 0;
    let mut with_upstreams = 0;
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let boot = Bootstrap::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let stem = path.file_stem().unwrap().to_string_lossy();
        assert_eq!(boot.agent, stem, "{} names another agent", path.display());
        let control = boot.control.expect("[control]");
        assert_eq!(
            control.address, "mesh-control:15010",
            "by name, not address"
        );
        // Identity: the token from its compose secret, the control channel over TLS.
        let identity = boot.identity.expect("[identity]");
        assert_eq!(
            identity.token_file,
            Path::new("/run/secrets/agent-token"),
            "{stem}"
        );
        assert_eq!(
            control.ca_file.as_deref(),
            Some(Path::new("/run/secrets/mesh-ca")),
            "{stem}"
        );
        assert_eq!(boot.consul.expect("[consul]").address, "consul:8500");
        if boot.inbound.mode == InboundMode::Ollama {
            gateways += 1;
        } else {
            // Ollama on 11434 for every agent, then the registry's own upstreams.
            let agent = registry
                .agents
                .iter()
                .find(|a| a.name == stem)
                .unwrap_or_else(|| panic!("{stem} is not in the registry"));
            let mut want = vec![("ollama".to_owned(), 11434)];
            want.extend(agent.upstreams.iter().map(|u| (u.service.clone(), u.port)));
            let got: Vec<_> = boot
                .upstreams
                .iter()
                .map(|u| {
                    assert!(u.listen.ip().is_loopback(), "{stem}: {}", u.listen);
                    (u.service.clone(), u.listen.port())
                })
                .collect();
            assert_eq!(got, want, "{stem}");
            with_upstreams += usize::from(!agent.upstreams.is_empty());
        }
        n += 1;
    }
    assert_eq!(n, 70, "69 agents and the Ollama gateway");
    assert_eq!(gateways, 1);
    assert!(
        with_upstreams > 0,
        "the shipped registry declares upstreams"
    );
    let snap =
        mesh_config::load::snapshot_file(&root().join("deploy/generated/snapshot.toml")).unwrap();
    assert_eq!(snap.services.len(), 70);
    assert_eq!(
        snap.identity,
        policy().identity,
        "the policy's mutual-TLS mode"
    );
    assert_eq!(
        snap.identity.mode,
        mesh_config::identity::MtlsMode::Permissive
    );
}

/// What `mesh-control secrets` makes is what the compose file names: every secret file
/// exists after one run, each agent's token admits that agent in the tokens file.
#[test]
fn mesh_control_secrets_makes_every_file_the_compose_file_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(mesh_tests::control::binary_path())
        .current_dir(root())
        .args(["secrets", "--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compose = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let files: Vec<&str> = compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("file: ./deploy/secrets/"))
        .collect();
    assert_eq!(
        files.len(),
        4 + 69 + 1,
        "CA pair, tokens, operator, 70 agent tokens"
    );
    for rel in &files {
        let path = dir.path().join("deploy/secrets").join(rel);
        assert!(path.is_file(), "{} missing", path.display());
    }
    let tokens =
        std::fs::read_to_string(dir.path().join("deploy/secrets/agent-tokens.toml")).unwrap();
    let tokens = mesh_control::identity::tokens::Tokens::parse(&tokens).unwrap();
    for agent in registry()
        .agents
        .iter()
        .map(|a| a.name.as_str())
        .chain(["ollama"])
    {
        let own = std::fs::read_to_string(
            dir.path()
                .join(format!("deploy/secrets/agents/{agent}.token")),
        )
        .unwrap();
        assert!(tokens.admits(agent, own.trim()), "{agent}");
        assert!(!tokens.admits("senior-ai-engineer", own.trim()) || agent == "senior-ai-engineer");
    }
}

#[test]
fn sidecar_concurrency_comes_from_the_same_budget_as_the_limits() {
    let policy = policy();
    let registry = registry();
    let report = mesh_control::budget_engine::for_registry(&policy, &registry).unwrap();
    for agent in &registry.agents {
        let path = root().join(format!("deploy/generated/sidecars/{}.toml", agent.name));
        let boot = Bootstrap::from_file(&path).unwrap();
        let budget = report.agent(agent.phase).unwrap();
        assert_eq!(boot.inbound.max_concurrency, budget.inbound_concurrency());
        assert_eq!(boot.listen.inbound.unwrap().port(), agent.port);
        // Both traffic listeners full of kept-alive connections (18 KiB each, measured) fit
        // beside the sidecar's working set under load (14 MiB) in its memory limit.
        let side = report.phases[&agent.phase].sidecar;
        let full = 14 * (1 << 20) + 2 * boot.limits.max_connections as u64 * (18 << 10);
        assert!(
            full <= side.memory.0,
            "{}: {full} over {}",
            agent.name,
            side.memory
        );
    }
}

#[test]
fn every_sidecar_speaks_the_protocol_its_agent_declares() {
    use mesh_config::registry::AppProtocol as Declared;
    use mesh_proxy::bootstrap::AppProtocol;
    let mut seen = BTreeMap::new();
    for agent in &registry().agents {
        let path = root().join(format!("deploy/generated/sidecars/{}.toml", agent.name));
        let boot = Bootstrap::from_file(&path).unwrap();
        let want = match agent.protocol {
            Declared::Http1 => AppProtocol::Http1,
            Declared::Http2 | Declared::Grpc => AppProtocol::Http2,
            Declared::Auto => AppProtocol::Auto,
        };
        assert_eq!(boot.inbound.protocol, want, "{}", agent.name);
        *seen.entry(agent.protocol.as_str()).or_insert(0) += 1;
    }
    // The shipped registry uses every protocol, so each mapping is exercised.
    assert_eq!(seen.len(), 4, "{seen:?}");
}

/// Debian's docker-compose (1.x; `.ci/run` installs it) reads the file as compose would.
#[test]
fn docker_compose_accepts_the_file_with_69_agents_and_their_budget_limits() {
    let out = std::process::Command::new("docker-compose")
        .current_dir(root())
        .args(["-p", "agent-mesh", "-f", "docker-compose.yml", "config"])
        .env("HOST_BIND", "127.0.0.1")
        .output()
        .expect("docker-compose (apt package docker-compose, installed by .ci/run)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "docker-compose config: {stderr}");
    let text = String::from_utf8(out.stdout).unwrap();

    // The normalised output: two-space service keys, limits under deploy.resources.limits.
    let services = services(&text);
    let policy = policy();
    let registry = registry();
    let report = mesh_control::budget_engine::for_registry(&policy, &registry).unwrap();
    let mut per_phase: BTreeMap<Phase, usize> = BTreeMap::new();
    for agent in &registry.agents {
        let body = services
            .get(agent.name.as_str())
            .unwrap_or_else(|| panic!("{} missing", agent.name));
        let side = services
            .get(format!("{}-sidecar", agent.name).as_str())
            .unwrap_or_else(|| panic!("{}-sidecar missing", agent.name));
        assert!(side.contains(&format!("network_mode: service:{}", agent.name)));
        // Its own token and the CA, no other agent's token.
        let own = format!("source: token-{}\ntarget: agent-token\n", agent.name);
        assert!(side.contains(&own), "{}: {side}", agent.name);
        assert!(side.contains("source: mesh-ca\n"), "{}", agent.name);
        assert_eq!(side.matches("source: token-").count(), 1, "{}", agent.name);
        let phase = &report.phases[&agent.phase];
        let (budget, sidecar) = (phase.agent, phase.sidecar);
        let (ac, am) = limits(body);
        let (sc, sm) = limits(side);
        assert!(ac > 0.0 && am > 0, "{}: no limits", agent.name);
        assert!(
            ac + sc <= budget.cpus + sidecar.cpus + 1e-6,
            "{}: cpus over budget",
            agent.name
        );
        assert!(
            am + sm <= budget.memory.0 + sidecar.memory.0,
            "{}: memory over budget",
            agent.name
        );
        // The sidecar never under its floor (policy [sidecar]).
        assert!(sc >= policy.budget.sidecar.cpus - 1e-9, "{}", agent.name);
        assert!(sm >= policy.budget.sidecar.memory.0, "{}", agent.name);
        // Within a MiB and a hundredth of a CPU of the budget: the same computation.
        assert!(budget.memory.0 - am < 2 << 20, "{}", agent.name);
        assert!(budget.cpus - ac < 0.021, "{}", agent.name);
        *per_phase.entry(agent.phase).or_default() += 1;
    }
    assert_eq!(per_phase.values().sum::<usize>(), 69);
    let sidecars = services.keys().filter(|k| k.ends_with("-sidecar")).count();
    assert_eq!(sidecars, 69);
}

/// Service name -> its block of `docker-compose config` output.
fn services(text: &str) -> BTreeMap<&str, String> {
    let mut out = BTreeMap::new();
    let mut in_services = false;
    let mut current: Option<(&str, String)> = None;
    for line in text.lines() {
        if !line.starts_with(' ') {
            in_services = line == "services:";
            if let Some((k, v)) = current.take() {
                out.insert(k, v);
            }
            continue;
        }
        if !in_services {
            continue;
        }
        if let Some(name) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':')) {
            if !name.starts_with(' ') {
                if let Some((k, v)) = current.take() {
                    out.insert(k, v);
                }
                current = Some((name, String::new()));
                continue;
            }
        }
        if let Some((_, body)) = &mut current {
            body.push_str(line.trim());
            body.push('\n');
        }
    }
    if let Some((k, v)) = current {
        out.insert(k, v);
    }
    out
}

/// (cpus, memory bytes) from a service block's `limits:`.
fn limits(block: &str) -> (f64, u64) {
    let after = block.split("limits:\n").nth(1).expect("limits");
    let mut cpus = None;
    let mut mem = None;
    for line in after.lines().take(2) {
        if let Some(v) = line.strip_prefix("cpus: ") {
            cpus = v.trim_matches('\'').parse().ok();
        }
        if let Some(v) = line.strip_prefix("memory: ") {
            let v = v.trim_matches('\'');
            let mib: u64 = v.trim_end_matches('m').parse().expect("memory in MiB");
            mem = Some(mib << 20);
        }
    }
    (cpus.expect("cpus limit"), mem.expect("memory limit"))
}
