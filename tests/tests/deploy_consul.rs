//! The rendered Consul service definitions (deploy/generated/consul/): one per agent of the
//! registry and one for the Ollama gateway, in HashiCorp's shape, matching the registry
//! (port, phase, protocol, capabilities) and checking the sidecar's `/health`; every sidecar's
//! bootstrap registers its own definition, mounted where the bootstrap says, and what reaches
//! Consul is that definition with the sidecar's address.

use mesh_config::consul_service::Definition;
use mesh_proxy::bootstrap::Bootstrap;
use mesh_tests::bounded;
use mesh_tests::consul::FakeConsul;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tokio::sync::watch;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn registry() -> mesh_config::Registry {
    mesh_config::registry::load_file(&root().join("config/mesh/agents.toml"))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn definition(name: &str) -> Definition {
    let path = root().join(format!("deploy/generated/consul/{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    Definition::from_json(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

#[test]
fn every_agent_has_a_definition_that_matches_the_registry() {
    let registry = registry();
    let dir = root().join("deploy/generated/consul");
    let files: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut want: BTreeSet<String> = registry
        .agents
        .iter()
        .map(|a| format!("{}.json", a.name))
        .collect();
    want.insert("ollama.json".into());
    assert_eq!(files, want, "one definition per agent and the gateway");

    for agent in &registry.agents {
        let s = definition(&agent.name).service;
        let c = &agent.capabilities;
        assert_eq!(
            (s.id.as_str(), s.name.as_str()),
            (&*agent.name, &*agent.name)
        );
        assert_eq!(s.port, agent.port, "{}", agent.name);
        assert_eq!(
            s.tags,
            ["mesh".to_owned(), format!("phase={}", agent.phase)],
            "{}",
            agent.name
        );
        let meta = |k: &str| s.meta.get(k).map(String::as_str);
        assert_eq!(meta("phase"), Some(agent.phase.as_str()));
        assert_eq!(meta("performance_tier"), Some(agent.phase.as_str()));
        assert_eq!(meta("protocol"), Some(agent.protocol.as_str()));
        assert_eq!(meta("image"), Some(agent.image.as_str()));
        assert_eq!(meta("cognitive"), Some(c.cognitive.join(",").as_str()));
        assert_eq!(meta("ollama_priority"), Some(c.ollama_priority.as_str()));
        assert_eq!(
            meta("max_context_size"),
            Some(c.max_context_size.to_string().as_str())
        );
        let secs: f64 = meta("timeout")
            .and_then(|t| t.strip_suffix('s'))
            .and_then(|t| t.parse().ok())
            .expect("timeout in seconds");
        assert_eq!(secs, c.timeout.as_secs_f64(), "{}", agent.name);
        // The check reaches the sidecar's admin /health by the agent's compose name.
        assert_eq!(s.check.http, format!("http://{}:15090/health", agent.name));
        // Consul's duration syntax, the check answering well within its interval.
        assert_eq!((&*s.check.interval, &*s.check.timeout), ("10s", "2s"));
        assert_eq!(s.check.deregister_critical_service_after, "1m");
        assert!(!s.connect.native);
    }
    let gw = definition("ollama").service;
    assert_eq!((gw.name.as_str(), gw.port), ("ollama", 11435));
}

#[test]
fn every_sidecar_registers_its_own_definition_mounted_where_its_bootstrap_reads_it() {
    let compose = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let mut names: Vec<String> = registry().agents.into_iter().map(|a| a.name).collect();
    names.push("ollama".into());
    for name in names {
        let boot =
            Bootstrap::from_file(&root().join(format!("deploy/generated/sidecars/{name}.toml")))
                .unwrap();
        let consul = boot.consul.expect("[consul]");
        let file = consul.service_file.expect("service_file");
        let mount = format!(
            "./deploy/generated/consul/{name}.json:{}:ro",
            file.display()
        );
        assert!(compose.contains(&mount), "{name}: {mount} not in compose");
        let def = definition(&name);
        assert_eq!(
            def.service.port,
            boot.listen.inbound.unwrap().port(),
            "{name}"
        );
        assert!(
            def.service
                .check
                .http
                .ends_with(&format!(":{}/health", boot.listen.admin.port())),
            "{name}"
        );
    }
    // Consul loads no definition itself: the sidecars register them (no id twice).
    let consul = compose.split("\n  consul:\n").nth(1).unwrap();
    let consul = consul.split("\n\n").next().unwrap();
    assert!(!consul.contains("generated/consul"), "{consul}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rendered_definition_reaches_consul_as_written_with_the_sidecars_address() {
    // The rendered bootstrap of one agent, its Consul address pointed at a stand-in Consul
    // and its service file at the rendered definition.
    let consul = FakeConsul::start().await;
    let name = "agent-orchestrator";
    let path = root().join(format!("deploy/generated/sidecars/{name}.toml"));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("consul:8500", &consul.addr().to_string())
        .replace(
            "/etc/mesh/consul-service.json",
            &root()
                .join(format!("deploy/generated/consul/{name}.json"))
                .display()
                .to_string(),
        );
    let boot = Bootstrap::from_toml(&path, &text).unwrap();
    let inbound =
        std::net::SocketAddr::new([127, 0, 0, 1].into(), boot.listen.inbound.unwrap().port());
    let reg = mesh_proxy::consul_register::Registration::new(
        boot.consul.as_ref().unwrap(),
        &boot.agent,
        boot.phase,
        inbound,
        "127.0.0.1:15090".parse().unwrap(),
    )
    .unwrap();
    let (_stop, stopped) = watch::channel(false);
    bounded("registration", reg.register(stopped)).await;

    let body = consul.registered().remove(0);
    let want = definition(name).register_body("127.0.0.1");
    assert_eq!(body, want, "Consul got the definition with the address");
    assert_eq!(body["Meta"]["protocol"], "grpc");
    bounded("deregistration", reg.deregister()).await;
    assert_eq!(consul.deregistered(), [name]);
}
