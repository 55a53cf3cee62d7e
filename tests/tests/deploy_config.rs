//! The shipped deployment loads: every sidecar bootstrap under deploy/sidecars/ parses with the
//! real `Bootstrap::from_file`, the first snapshot validates, the compose file mounts exactly
//! those bootstraps, and every sidecar points at the control process compose runs.

use mesh_proxy::bootstrap::{Bootstrap, InboundMode};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sidecar_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/sidecars"))
        .expect("deploy/sidecars")
        .map(|e| e.expect("a dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no sidecar bootstraps in deploy/sidecars"
    );
    files
}

#[test]
fn every_sidecar_bootstrap_and_the_first_snapshot_load() {
    for path in sidecar_files() {
        let boot = Bootstrap::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let stem = path.file_stem().unwrap().to_string_lossy();
        assert_eq!(boot.agent, stem, "{} names another agent", path.display());
    }
    let mut toml = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            toml.push(path);
        }
    }
    assert!(!toml.is_empty(), "no deploy/*.toml");
    for path in toml {
        // deploy/*.toml are snapshots: the first one a sidecar runs with.
        mesh_config::load::snapshot_file(&path).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn compose_mounts_every_bootstrap_and_runs_the_control_they_name() {
    let compose = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let mounted = compose.matches("./deploy/sidecars/").count();
    let files = sidecar_files();
    assert_eq!(mounted, files.len(), "each bootstrap is mounted once");
    let mut gateways = 0;
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        let mount = format!("./deploy/sidecars/{name}:/etc/mesh/sidecar.toml:ro");
        assert!(compose.contains(&mount), "{name} is not mounted");
        let boot = Bootstrap::from_file(path).unwrap();
        let control = boot
            .control
            .unwrap_or_else(|| panic!("{name} has no [control]"));
        // mesh-control's static address and the port it listens on.
        let (host, port) = control.address.rsplit_once(':').unwrap();
        let ip = format!("ipv4_address: {host}");
        let listen = format!("0.0.0.0:{port}");
        assert!(compose.contains(&ip), "{name}: no service at {ip}");
        assert!(compose.contains(&listen), "{name}: control not on {listen}");
        assert!(
            control
                .persist
                .is_some_and(|p| p.starts_with("/var/lib/mesh")),
            "{name}: the persisted snapshot belongs on the state volume"
        );
        if boot.inbound.mode == InboundMode::Ollama {
            gateways += 1;
        }
    }
    assert_eq!(gateways, 1, "one Ollama gateway in front of Ollama");
    // The control process reads the shipped policy, which loads.
    assert!(compose.contains("./config/mesh:/etc/mesh/policy:ro"));
    mesh_config::policy::load_dir(&root().join("config/mesh")).unwrap_or_else(|e| panic!("{e}"));
}
