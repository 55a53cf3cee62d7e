//! `mesh-control render`: the deployment generated from the agent registry and the policy.
//! Every container's CPU and memory limit comes from one budget computation
//! ([`crate::budget_engine::for_registry`]), which also sets each sidecar's inbound
//! concurrency, so compose and the sidecars cannot disagree. Output is deterministic: the same
//! registry and policy give the same bytes, which a test compares with the checked-in files.

mod compose;
pub mod consul;
mod limits;
mod rollout;
pub mod secrets;
mod sidecar;

pub use compose::restart as restart_policy;
pub use limits::{Limits, PairLimits};

use mesh_config::{BudgetReport, Policy, Registry};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Rendered files, by path relative to the repository root.
pub type Files = BTreeMap<PathBuf, String>;

/// Where rendered files go, relative to the repository root; the compose file is the
/// repository's own `docker-compose.yml`.
pub const OUT_DIR: &str = "deploy/generated";
pub const COMPOSE_FILE: &str = "docker-compose.yml";

/// Renders every file of the deployment; errors when the policy models no phases.
pub fn render(policy: &Policy, registry: &Registry) -> Result<Files, String> {
    let report = crate::budget_engine::for_registry(policy, registry)
        .ok_or("the policy models no phases ([phases.*]): nothing to size containers with")?;
    let pairs = limits::pairs(&report, registry)?;
    let mut files = Files::new();
    let out = Path::new(OUT_DIR);
    files.insert(
        PathBuf::from(COMPOSE_FILE),
        compose::render(policy, registry, &report, &pairs),
    );
    for agent in &registry.agents {
        files.insert(
            out.join("sidecars").join(format!("{}.toml", agent.name)),
            sidecar::render(agent, &pairs[&agent.name]) + &secrets::sidecar_identity(),
        );
    }
    files.insert(
        out.join("sidecars").join("ollama.toml"),
        sidecar::gateway() + &secrets::sidecar_identity(),
    );
    for agent in &registry.agents {
        files.insert(
            out.join("consul").join(format!("{}.json", agent.name)),
            consul::to_text(&consul::agent(agent)),
        );
    }
    files.insert(
        out.join("consul").join("ollama.json"),
        consul::to_text(&consul::gateway()),
    );
    // The policy's mutual-TLS mode from the first snapshot on, as mesh-control will push it.
    let seed = format!(
        "{}
[identity]
mode = \"{}\"\n",
        sidecar::seed_snapshot(registry),
        policy.identity.mode.as_str()
    );
    files.insert(out.join("snapshot.toml"), seed);
    files.insert(
        out.join("prometheus").join("sidecars.json"),
        sidecar::prometheus_targets(registry),
    );
    files.insert(out.join("rollout.env"), rollout::render(policy));
    Ok(files)
}

/// Writes `files` under `root`, creating directories, and removes files under [`OUT_DIR`] the
/// rendering no longer has (an agent taken out of the registry); returns the paths changed.
pub fn write(root: &Path, files: &Files) -> std::io::Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for rel in stale(root, files) {
        std::fs::remove_file(root.join(&rel))?;
        changed.push(rel);
    }
    for (rel, text) in files {
        let path = root.join(rel);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            continue;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, text)?;
        changed.push(rel.clone());
    }
    Ok(changed)
}

/// Files under `root` that differ from the rendering or that it would remove, for the
/// "checked in = rendered" check.
pub fn diff(root: &Path, files: &Files) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = files
        .iter()
        .filter(|(rel, text)| {
            std::fs::read_to_string(root.join(rel)).ok().as_deref() != Some(text.as_str())
        })
        .map(|(rel, _)| rel.clone())
        .collect();
    out.extend(stale(root, files));
    out
}

/// Files under [`OUT_DIR`] that the rendering does not produce.
fn stale(root: &Path, files: &Files) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::from(OUT_DIR)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let rel = dir.join(entry.file_name());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(rel);
            } else if !files.contains_key(&rel) {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

/// The budget report's oversubscription, as comment lines for the rendered compose file.
fn budget_comment(report: &BudgetReport) -> String {
    let mut s = String::new();
    for line in crate::budget_engine::oversubscription(report) {
        s.push_str(&format!("# budget: {line}\n"));
    }
    s
}
