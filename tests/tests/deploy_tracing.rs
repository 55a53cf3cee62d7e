//! The shipped deployment traces (Rule 28), checked statically: every sidecar exports to the
//! compose file's collector, the collector forwards traces to Tempo, compose runs Tempo,
//! Grafana has it as a data source, and the mesh dashboard links agent pairs to their traces.

use mesh_proxy::bootstrap::{Bootstrap, TraceProtocol};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn every_sidecar_exports_to_the_compose_collector() {
    let mut n = 0;
    for entry in std::fs::read_dir(root().join("deploy/generated/sidecars")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let boot = Bootstrap::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let trace = boot
            .trace
            .unwrap_or_else(|| panic!("{}: no [trace]", path.display()));
        assert_eq!(trace.endpoint, "http://otel-collector:4318");
        assert_eq!(trace.protocol, TraceProtocol::HttpProtobuf);
        n += 1;
    }
    // Every agent of the registry and the Ollama gateway.
    assert!(n >= 70, "{n} bootstraps");
    let compose = read("docker-compose.yml");
    assert!(compose.contains("\n  otel-collector:\n"));
    assert!(compose.contains("\n  tempo:\n"));
    assert!(compose.contains("./deploy/tempo/tempo.yml:/etc/tempo/tempo.yml:ro"));
}

#[test]
fn the_collector_forwards_traces_to_tempo_and_grafana_reads_it() {
    let collector = read("deploy/otel/collector.yml");
    let traces = collector
        .split("    traces:\n")
        .nth(1)
        .expect("a traces pipeline");
    let exporters = traces
        .lines()
        .find(|l| l.trim_start().starts_with("exporters:"))
        .expect("traces exporters");
    assert!(exporters.contains("otlp/tempo"), "{exporters}");
    assert!(collector.contains("endpoint: tempo:4317"));
    assert!(collector.contains("endpoint: 0.0.0.0:4318"));
    let tempo = read("deploy/tempo/tempo.yml");
    assert!(tempo.contains("endpoint: 0.0.0.0:4317"));
    assert!(tempo.contains("http_listen_port: 3200"));
    let ds = read("deploy/grafana/provisioning/datasources/tempo.yml");
    assert!(ds.contains("type: tempo") && ds.contains("uid: tempo"));
    assert!(ds.contains("url: http://tempo:3200"));

    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/mesh.json")).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    let pairs = panels
        .iter()
        .find(|p| {
            p["title"]
                .as_str()
                .is_some_and(|t| t.starts_with("Slowest agent pairs"))
        })
        .expect("a panel of slow agent pairs");
    let link = pairs["fieldConfig"]["defaults"]["links"][0]["url"]
        .as_str()
        .unwrap();
    assert!(
        link.contains("tempo") && link.contains("span.target.agent"),
        "{link}"
    );
    let ids: Vec<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(ids.len(), unique.len(), "panel ids repeat");
}
